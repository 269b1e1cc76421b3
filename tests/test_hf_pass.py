"""The model pass on real Hugging Face transformers (tiny random ones, built offline).

torch.fx cannot trace them: ``plan`` analyses the forward with ``torch.export`` on an example
batch, then swaps factorized layers into the model itself. Tied weights are factorized once
and shared, GPT-2's Conv1D is a linear layer, and every layer not compressed says why.
"""

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from compressor.checkpoint import load, read_metadata, save  # noqa: E402
from compressor.config import CompressConfig  # noqa: E402
from compressor.plan import count_state, planned_starts  # noqa: E402
from compressor.planner import plan  # noqa: E402
from compressor.surgery import apply, tn_layers  # noqa: E402
from compressor.layers import TiedTNLinear, TNConv1D, TNEmbedding  # noqa: E402

VOCAB = 240
FULL = CompressConfig(target=1.1, rank=4096, decomp="tt", min_params=0)  # every bond at its exact rank


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, num_labels=3)
        return transformers.BertForSequenceClassification(config).eval()
    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def batch(b: int = 2, s: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def planned():
    """name -> (dense model, its full-rank plan): exporting costs a second or two per model."""
    out = {}
    for name in ("bert", "llama", "gpt2"):
        model = tiny(name)
        out[name] = (model, plan(model, FULL.plan_options(), example=batch()))
    return out


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, Conv1D))}


# ------------------------------------------------------------------ planning
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_plan_comes_from_export_accounts_for_every_layer_and_changes_nothing(planned, name):
    model, the_plan = planned[name]
    assert the_plan.source == "export"
    planned_names = [lp.name for lp in the_plan.layers] + [u for lp in the_plan.layers for u in lp.tied]
    skipped = [s.name for s in the_plan.skipped]
    assert sorted(planned_names + skipped) == sorted(_layers(model))  # each exactly once
    assert all(s.reason for s in the_plan.skipped)
    assert the_plan.dense_params == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n in model.state_dict())
    fresh = tiny(name).state_dict()
    assert model.training is False and all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_layers_too_small_to_gain_are_listed_with_the_reason():
    model = tiny("bert")
    the_plan = plan(model, CompressConfig(target=1.5).plan_options(), example=batch())  # the default min_params
    small = {n for n, m in _layers(model).items() if m.weight.numel() < 1000}
    assert small and small == {s.name for s in the_plan.skipped if "too small to gain" in s.reason}
    assert {lp.name for lp in the_plan.layers} == set(_layers(model)) - small


def test_without_an_example_the_module_walk_is_used_and_says_why():
    model = tiny("llama")
    with pytest.warns(UserWarning, match="no example input"):
        the_plan = plan(model, FULL.plan_options())
    assert the_plan.source == "module-walk"
    tied = {lp.name: lp.tied for lp in the_plan.layers}
    assert tied["model.embed_tokens"] == ("lm_head",)  # identity still finds the tie


# ------------------------------------------------------------------ applying
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_full_rank_model_computes_what_the_dense_one_did_for_any_batch_shape(planned, name):
    model, the_plan = planned[name]
    applied = apply(model, the_plan, planned_starts(the_plan, FULL.decomp), sigma=FULL.sigma, seed=FULL.seed)
    assert type(applied.model) is type(model)  # the user's own class, layers swapped by attribute
    for shape in ((2, 8), (3, 13)):
        inputs = batch(*shape, seed=shape[1])
        assert max_rel_diff(logits(applied.model, inputs), logits(model, inputs)) < 1e-4
    assert not tn_layers(model)  # the original is untouched
    assert len(tn_layers(applied.model)) == len(the_plan.layers)


def test_lower_ranks_approximate_and_the_error_falls_with_the_rank(planned):
    model, full_plan = planned["llama"]
    inputs = batch(2, 8)
    ref = logits(model, inputs)
    errors = []
    for rank in (2, 8, 4096):
        config = CompressConfig(target=1.1, rank=rank, decomp="tt", min_params=0)
        starts = planned_starts(full_plan, config.decomp, {lp.name: rank for lp in full_plan.layers})
        slim = apply(model, full_plan, starts, sigma=config.sigma, seed=config.seed).model
        errors.append(max_rel_diff(logits(slim, inputs), ref))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4 and errors[0] < 1.0


def test_llama_tied_embedding_is_planned_once_shared_counted_once_and_round_trips(planned, tmp_path):
    model, the_plan = planned["llama"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb_plan = [lp for lp in the_plan.layers if lp.name == "model.embed_tokens"]
    assert len(emb_plan) == 1 and emb_plan[0].tied == ("lm_head",)
    assert "lm_head" not in {lp.name for lp in the_plan.layers} | {s.name for s in the_plan.skipped}
    assert emb_plan[0].params_before == VOCAB * 32  # the shared table once

    applied = apply(model, the_plan, planned_starts(the_plan, FULL.decomp), sigma=FULL.sigma, seed=FULL.seed)
    slim = applied.model
    emb, head = slim.model.embed_tokens, slim.lm_head
    assert isinstance(emb, TNEmbedding) and isinstance(head, TiedTNLinear) and head.source is emb
    assert not list(head.parameters())  # it holds nothing of its own
    assert applied.tied == {"lm_head": "model.embed_tokens"}
    assert "model.embed_tokens" in applied.keep_factorized
    growth = sum(tn_layers(slim)[lp.name].param_count() - lp.params_before for lp in the_plan.layers)
    assert count_state(slim) == the_plan.dense_params + growth  # the cores counted once
    assert not [k for k in slim.state_dict() if k.startswith("lm_head.")]

    path = save(slim, tmp_path / "llama.safetensors")
    meta = read_metadata(path)
    assert meta["tied"] == {"lm_head": {"kind": "tied_linear", "source": "model.embed_tokens", "bias": False}}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        on_disk = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert on_disk == count_state(slim)
    back = load(path, base=tiny("llama"))
    assert back.lm_head.source is back.model.embed_tokens
    inputs = batch(3, 10)
    assert float((logits(back, inputs) - logits(slim, inputs)).abs().max()) <= 1e-5


def test_gpt2_conv1d_layers_are_factorized_and_round_trip(planned, tmp_path):
    model, the_plan = planned["gpt2"]
    kinds = {lp.name: lp.kind for lp in the_plan.layers}
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert conv1d and all(kinds[n] == "conv1d" for n in conv1d)
    lp = next(lp for lp in the_plan.layers if lp.name == "transformer.h.0.mlp.c_fc")
    assert lp.shape == (128, 32)  # planned as the Linear it is: (out, in)
    slim = apply(model, the_plan, planned_starts(the_plan, FULL.decomp), sigma=FULL.sigma, seed=FULL.seed).model
    layer = slim.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(layer, TNConv1D)
    dense = layer.to_dense()  # back to dense: a Conv1D again, with the stored (in, out) layout
    assert isinstance(dense, Conv1D) and torch.allclose(dense.weight, model.transformer.h[0].mlp.c_fc.weight, atol=1e-5)
    assert isinstance(slim.lm_head, TiedTNLinear) and slim.lm_head.source is slim.transformer.wte
    back = load(save(slim, tmp_path / "gpt2.safetensors"), base=tiny("gpt2"))
    inputs = batch(2, 9)
    assert float((logits(back, inputs) - logits(slim, inputs)).abs().max()) <= 1e-5


def test_bert_masked_lm_head_shares_the_table_and_keeps_its_shared_bias():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    the_plan = plan(model, FULL.plan_options(), example=batch())
    word = next(lp for lp in the_plan.layers if lp.name == "bert.embeddings.word_embeddings")
    assert word.tied == ("cls.predictions.decoder",)
    slim = apply(model, the_plan, planned_starts(the_plan, FULL.decomp), sigma=FULL.sigma, seed=FULL.seed).model
    decoder = slim.cls.predictions.decoder
    assert isinstance(decoder, TiedTNLinear) and decoder.bias is slim.cls.predictions.bias
    inputs = batch(2, 7)  # BERT's padding row (token 0) appears: the tied head uses the stored row too
    inputs["input_ids"][0, 0] = 0
    assert max_rel_diff(logits(slim, inputs), logits(model, inputs)) < 1e-4


def test_skip_embedding_keeps_a_tied_embedding_and_its_head_dense():
    model = tiny("llama")
    the_plan = plan(model, CompressConfig(skip=("embedding",), min_params=1).plan_options(), example=batch())
    names = {lp.name for lp in the_plan.layers}
    assert "model.embed_tokens" not in names and "lm_head" not in names
    assert any(n.endswith("mlp.down_proj") for n in names)  # the rest is still compressed
    reasons = {s.name: s.reason for s in the_plan.skipped}
    assert reasons["model.embed_tokens"] == "left dense by skip 'embedding'"
    assert "shares its weight with model.embed_tokens, which stays dense" in reasons["lm_head"]
