"""The gated selectors' faithful start: every layer begins as close to its pretrained weight
as START_ERROR asks, in the layout (down to a plain matrix) that needs the fewest parameters,
never larger than dense; what cannot start faithfully is listed."""

import math
import warnings

import pytest
import torch
from torch import nn

from compressor import tensornet as tn
from compressor.config import CompressConfig
from compressor.planner import plan
from compressor.surgery import apply, layer_weight, tn_layers
from compressor.layers import layer_class
from compressor.selectors import (
    START_ERROR,
    TIGHTEST_ERROR,
    candidate_layouts,
    faithful_start,
    get_selector,
)


def _low_rank(rows: int, cols: int, spectrum: torch.Tensor, seed: int, noise: float = 0.0) -> torch.Tensor:
    """U diag(spectrum) V^T with orthonormal U, V, plus Gaussian noise of ``noise`` x its norm."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    w = (u * spectrum) @ v.T
    return w + torch.randn(rows, cols, generator=g) * noise * w.norm() / math.sqrt(rows * cols)


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _linear(weight: torch.Tensor) -> OneLayer:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
    return OneLayer(lin)


def _start(model: nn.Module, config: CompressConfig):
    """(plan, starts, FaithfulStart, gated model at step 0 in evaluation mode) as ``compress`` builds them."""
    selector = get_selector(config.rank_select)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers cannot be traced: the module walk warns
        the_plan = plan(model, config.plan_options())
    options = config.selector_options()
    starts, start = selector.prepare(the_plan, model, options)
    gm = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed,
               make_gate=selector.gate_factory(options)).model.eval()
    return the_plan, starts, start, gm


def _built_errors(model: nn.Module, the_plan, starts, gm) -> dict[str, float]:
    """Relative Frobenius error of every built layer's weight against the dense one."""
    out = {}
    layers = tn_layers(gm)
    for lp in the_plan.layers:
        layer = layers[lp.name]
        tz = starts.of(lp.name).layout.tensorization
        w = layer_class(lp.kind).weight_tensor(layer_weight(model, lp), tz).reshape(layer.modes)
        with torch.no_grad():
            out[lp.name] = float(torch.linalg.norm(layer.dense_tensor().double() - w.double()) / torch.linalg.norm(w.double()))
    return out


def _check_start_is_what_it_says(model, the_plan, starts, start, gm, eps):
    """Each layer: built error within its recorded bound, faithful iff within eps, never above dense."""
    errors = _built_errors(model, the_plan, starts, gm)
    layers = tn_layers(gm)
    for st in start.layers:
        layer = layers[st.name]
        assert errors[st.name] <= st.error + 1e-5
        assert st.faithful == (st.error <= eps)
        assert st.params == tn.param_count(layer.modes, layer.ranks) <= st.dense
        assert layer.decomp == "tt" and layer.ranks[-1] == 1 and len(layer.gates) == len(layer.modes) - 1
    assert [s.name for s in start.unfaithful] == [s.name for s in start.layers if s.error > eps]
    return errors


def test_a_rank_4_matrix_starts_as_a_rank_4_matrix_factorization():
    model = _linear(_low_rank(256, 256, torch.tensor([4.0, 3.0, 2.0, 1.0]), seed=0))
    the_plan, starts, start, gm = _start(model, CompressConfig(target=2))
    (st,) = start.layers
    layouts = [lay.modes for lay in candidate_layouts(plan(model, CompressConfig(target=2).plan_options()).layers[0])]
    assert (4, 8, 8, 4, 8, 8) in layouts and (256, 256) in layouts  # the default was a candidate, and lost
    assert st.layout.modes == (256, 256) and st.ranks == (4, 1) and st.params == 4 * 512
    errors = _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)
    assert errors["layer"] < 1e-5
    # 28x already at the exact start: nothing left for the gates to give up, and the report can say so
    assert start.gates_idle and start.ratio > 20 and start.used_eps == TIGHTEST_ERROR


def test_a_weight_with_small_tensor_train_ranks_keeps_its_many_modes():
    g = torch.Generator().manual_seed(1)
    modes, ranks = (4, 8, 8, 4, 8, 8), [1, 2, 2, 16, 2, 2, 1]
    cores = [torch.randn(ranks[k], n, ranks[k + 1], generator=g) for k, n in enumerate(modes)]
    model = _linear(tn.contract(cores).reshape(256, 256).T)  # W^T is the tensor
    the_plan, starts, start, gm = _start(model, CompressConfig(target=2))
    (st,) = start.layers
    assert st.layout.modes == modes and st.params <= tn.param_count(modes, ranks[1:]) < 16 * 512
    errors = _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)
    assert errors["layer"] < 1e-4


def test_a_conv_whose_kernel_matrix_is_low_rank_starts_merged():
    conv = nn.Conv2d(16, 32, 3)
    with torch.no_grad():
        conv.weight.copy_(_low_rank(32, 16 * 9, torch.tensor([3.0, 2.0, 1.0]), seed=2).reshape(32, 16, 3, 3))
    model = OneLayer(conv)
    the_plan, starts, start, gm = _start(model, CompressConfig(target=2, decomp="tr"))
    (st,) = start.layers
    assert st.layout.merge_spatial and st.layout.modes == (144, 32) and st.params == 3 * (144 + 32)
    assert starts.layers[0].decomp == "tt"  # a start is a train: no one-slice closing gate
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4)
    _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)


def test_a_full_rank_weight_cannot_start_faithfully_and_is_listed_at_its_best_within_dense():
    torch.manual_seed(3)
    model = _linear(torch.randn(128, 128))
    the_plan, starts, start, gm = _start(model, CompressConfig(target=2, start="faithful"))
    (st,) = start.unfaithful
    assert st.name == "layer" and START_ERROR < st.error < 1
    # no layout can tell: the plan's own one, as faithful as the dense size allows
    own = plan(model, CompressConfig(target=2).plan_options()).layers[0]
    assert st.layout.tensorization == own.tensorization and st.layout.modes == (4, 4, 8, 4, 4, 8)
    assert 0.9 * 128 * 128 < st.params <= 128 * 128
    _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)


def test_a_start_that_would_overshoot_the_target_is_made_more_faithful_instead():
    spectrum = torch.exp(-torch.arange(256) / 10.0)
    model = _linear(_low_rank(256, 256, spectrum, seed=4))
    loose = faithful_start(plan(model, CompressConfig(target=3).plan_options()), model, 100.0, "tr").faithful
    assert loose.ratio > 3 and loose.used_eps == START_ERROR and not loose.gates_idle
    the_plan, starts, start, gm = _start(model, CompressConfig(target=3))
    assert TIGHTEST_ERROR < start.used_eps < START_ERROR
    assert 2.7 < start.ratio < 3 and not start.gates_idle  # just short of the target: the gates make the last cuts
    (st,) = start.layers
    assert st.faithful and st.error <= start.used_eps
    _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)


def test_a_looser_tolerance_starts_smaller():
    spectrum = torch.exp(-torch.arange(128) / 12.0)
    model = _linear(_low_rank(128, 192, spectrum, seed=5))
    sizes = [faithful_start(plan(model, CompressConfig(target=2).plan_options()), model, 1000.0, "tt", eps).faithful.layers[0].params
             for eps in (0.005, 0.02, 0.1)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_user_tensorization_and_layer_ranks_are_kept(trained_digits_net):
    config = CompressConfig(target=2, tensorization={"fc1": ((8, 64), (96,))}, layer_ranks={"fc2": 3},
                            decomp="tt", start="faithful")
    the_plan, starts, start, gm = _start(trained_digits_net, config)
    assert [s.name for s in start.layers] == ["fc1"]
    assert start.layers[0].layout.modes == (8, 64, 96) == tuple(tn_layers(gm)["fc1"].modes)
    _check_start_is_what_it_says(trained_digits_net, the_plan, starts, start, gm, START_ERROR)
    assert tn_layers(gm)["fc2"].ranks == [3, 3, 3, 1]  # the plain rank, capped per bond


def test_the_gated_digits_net_at_step_0_keeps_the_dense_accuracy(trained_digits_net, digits):
    _, _, xte, yte = digits
    for selector in ("l0", "reinforce"):
        the_plan, starts, start, gm = _start(trained_digits_net, CompressConfig(target=6, rank_select=selector, start="faithful"))
        _check_start_is_what_it_says(trained_digits_net, the_plan, starts, start, gm, START_ERROR)
        with torch.no_grad():
            dense, ours = trained_digits_net(xte), gm(xte)
        acc_dense = float((dense.argmax(1) == yte).float().mean())
        acc_ours = float((ours.argmax(1) == yte).float().mean())
        assert abs(acc_ours - acc_dense) <= 0.01
        assert float(torch.linalg.norm(ours - dense) / torch.linalg.norm(dense)) < 0.01
        assert start.ratio < 6 and not start.gates_idle


def test_a_tiny_bert_with_pretrained_looking_weights_starts_faithful():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=128)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for i, mod in enumerate(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))):
            rows, cols = mod.weight.shape
            k = min(rows, cols)
            w = _low_rank(rows, cols, torch.exp(-torch.arange(k) / (k / 8)), seed=10 + i, noise=0.01)
            mod.weight.copy_(w / w.norm() * mod.weight.norm())
    the_plan, starts, start, gm = _start(model, CompressConfig(target=2))
    assert len(start.layers) == 15 and not start.unfaithful  # embeddings and every encoder Linear
    errors = _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)
    assert max(errors.values()) <= START_ERROR
    assert 1.2 < start.ratio < 2  # smaller than dense, and the gates still have the last cuts to make
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, ours = model(ids).last_hidden_state, gm(ids).last_hidden_state
    assert float(torch.linalg.norm(ours - dense) / torch.linalg.norm(dense)) < 0.03
    assert float(nn.functional.cosine_similarity(ours.flatten(0, 1), dense.flatten(0, 1)).mean()) > 0.999


def test_a_padded_vocabulary_may_start_unpadded_as_a_matrix():
    emb = nn.Embedding(1009, 32)  # a prime: the plan pads the vocabulary to split it
    with torch.no_grad():
        emb.weight.copy_(_low_rank(1009, 32, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), seed=6))
    model = OneLayer(emb)
    own = plan(model, CompressConfig(target=2).plan_options()).layers[0]
    assert math.prod(own.tensorization[0]) > 1009
    the_plan, starts, start, gm = _start(model, CompressConfig(target=2))
    (st,) = start.layers
    assert st.layout.modes == (1009, 32) and st.ranks == (5, 1) and st.faithful
    idx = torch.arange(1009)
    with torch.no_grad():
        assert torch.allclose(gm(idx), model(idx), atol=1e-5)
    _check_start_is_what_it_says(model, the_plan, starts, start, gm, START_ERROR)


def test_auto_falls_back_to_the_ladder_when_a_layer_cannot_start_faithfully():
    torch.manual_seed(3)
    model = _linear(torch.randn(128, 128))  # full rank: nothing low-rank to keep
    the_plan = plan(model, CompressConfig(target=2).plan_options())
    starts, start = get_selector("l0").prepare(the_plan, model, CompressConfig(target=2).selector_options())
    assert start.chosen == "ladder" and len(start.unfaithful) == 1
    ladder, _ = get_selector("l0").prepare(the_plan, model, CompressConfig(target=2, start="ladder").selector_options())
    assert [(st.layout, st.ranks) for st in starts.layers] == [(st.layout, st.ranks) for st in ladder.layers]
    assert isinstance(starts.layers[0].ranks, int)  # one ladder rank, not a bond list from the weights


def test_the_report_says_how_the_run_started(trained_digits_net, digits_loaders):
    from compressor import compress, evaluate

    train, test = digits_loaders
    ladder = compress(trained_digits_net, train, target="6x", epochs=1, eval_loader=test)
    assert ladder.report.start["chosen"] == "ladder" and ladder.report.start["unfaithful"]  # fc1 is noise-dominated
    faithful = compress(trained_digits_net, train, target="6x", epochs=1, eval_loader=test, start="faithful")
    start = faithful.report.start
    assert start["chosen"] == "faithful" and start["ratio"] < 6
    dense = evaluate(trained_digits_net, test)
    assert abs(start["accuracy"] - dense) <= 0.01  # within a point of the dense model before any training


def test_auto_keeps_the_faithful_start_when_the_ladder_would_start_past_a_mild_target():
    """A wide, full-rank weight at 1.5x: the ladder's top rank (64) would already be 8x, leaving
    the gates nothing to choose; the start stays dense-sized and lossy, and below the target."""
    torch.manual_seed(0)
    model = OneLayer(nn.Linear(1024, 1024, bias=False))
    for target, chosen in ((1.5, "faithful"), (40.0, "ladder")):
        config = CompressConfig(target=target, min_params=1)
        the_plan = plan(model, config.plan_options())
        starts, start = get_selector("l0").prepare(the_plan, model, config.selector_options())
        assert start.chosen == chosen and start.unfaithful
        if chosen == "faithful":  # the least-error layout within dense, not the plan's own split
            own = faithful_start(plan(model, config.plan_options()), model, target, "tt").faithful.layers[0]
            assert start.layers[0].error <= own.error and start.layers[0].params <= start.layers[0].dense
        gm = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed).model
        ratio = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in gm.parameters())
        assert ratio < target
