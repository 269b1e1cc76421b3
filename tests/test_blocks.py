"""Hidden-state distillation per block: which modules are blocks, the loss, and a real run."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from compressor import compress  # noqa: E402
from compressor.blocks import BlockRecorder, find_blocks, hidden_loss  # noqa: E402
from compressor.config import CompressConfig  # noqa: E402
from compressor.errors import ConfigError  # noqa: E402
from compressor.zoo import lenet5  # noqa: E402

VOCAB = 64


def tiny_llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int = 6, b: int = 4, s: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (b, s), generator=g)
        mask = torch.ones_like(ids)
        mask[0, s // 2:] = 0  # one padded example: padding must not count
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_blocks_are_the_longest_list_of_same_type_modules():
    assert find_blocks(tiny_llama(3)) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert find_blocks(lenet5()) == []


def hooks(model: nn.Module) -> list[int]:
    """How many forward hooks each module has (transformers puts some of its own)."""
    return [len(m._forward_hooks) for m in model.modules()]


def test_recorder_keeps_each_blocks_output_only_while_on_and_leaves_no_hook():
    model = tiny_llama(2)
    with torch.no_grad():
        model(**batches(1)[0], output_hidden_states=True)  # transformers adds hooks of its own on first use
    before = hooks(model)
    rec = BlockRecorder(model, find_blocks(model))
    with torch.no_grad():
        model(**batches(1)[0])
        assert rec.take() == []  # off: nothing kept
        rec.on = True
        out = model(**batches(1)[0], output_hidden_states=True)
    states = rec.take()
    assert len(states) == 2 and torch.equal(states[0], out.hidden_states[1])  # block 0's output
    assert hooks(model) != before
    rec.close()
    assert hooks(model) == before


def test_hidden_loss_is_zero_for_equal_states_and_measures_each_channel_in_its_own_units():
    torch.manual_seed(0)
    t = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    assert float(hidden_loss(t, t, None)) == 0.0
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    base = float(hidden_loss(s, t, None))
    assert base > 0
    scale = torch.ones(8)
    scale[3] = 1000.0  # one massive-activation channel, in both models
    assert float(hidden_loss([x * scale for x in s], [x * scale for x in t], None)) == pytest.approx(base, rel=0.2)
    mask = torch.ones(2, 5)
    mask[1, 2:] = 0
    wild = [x.clone() for x in s]
    for x in wild:
        x[1, 2:] += 100.0  # only padding differs wildly
    assert float(hidden_loss(wild, t, mask)) == pytest.approx(float(hidden_loss(s, t, mask)))


def test_objective_adds_the_weighted_hidden_term_to_the_logit_kl():
    from compressor.planner import plan
    from compressor.surgery import apply, set_training
    from compressor.losses import task_loss
    from compressor.runspec import begin_run
    from compressor.selectors import get_selector
    from compressor.train import FineTune

    model, data = tiny_llama(2), batches()
    losses = {}
    for weight in (0.0, 2.0):
        config = CompressConfig(target=1.5, min_params=500, distill_hidden=weight, epochs=1)
        the_plan = plan(model, config.plan_options(), example=data[0])
        options = config.selector_options()
        starts, _ = get_selector("l0").prepare(the_plan, model, options)
        gm = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed,
                   make_gate=get_selector("l0").gate_factory(options)).model
        teacher = set_training(tiny_llama(2), False)
        spec = begin_run(config.settled(len(the_plan.layers)), data, gm, the_plan.dense_params)
        run = FineTune(set_training(gm, False), teacher, data, spec)
        student = run.passes.student(run.runner, data[0])  # what a training step computes
        task = task_loss(student, run.passes.original(data[0], student), spec.distillation)
        losses[weight] = float(task)
        if weight:
            original = run.passes.original(data[0], student)
            expected = float(hidden_loss(student.hidden, original.hidden, student.mask))
            assert len(student.hidden) == 2 and expected > 0
    assert losses[2.0] == pytest.approx(losses[0.0] + 2.0 * expected, rel=1e-4)


def test_compress_with_hidden_distillation_runs_and_hands_back_models_without_hooks():
    model = tiny_llama(3)
    before = hooks(model)
    result = compress(model, batches(), target="1.5x", epochs=2, min_params=500, distill_hidden=1.0)
    assert result.report.ratio >= 1.5 and result.report.steps == 12
    assert hooks(model) == before
    blocks = dict(result.model.named_modules())
    assert all(not blocks[name]._forward_hooks for name in find_blocks(model))


def test_hidden_distillation_on_a_model_without_blocks_is_refused_before_any_work(trained_digits_net,
                                                                                  digits_loaders):
    train, _ = digits_loaders
    with pytest.raises(ConfigError, match="repeated blocks"):
        compress(trained_digits_net, train, target="2x", distill_hidden=1.0)
