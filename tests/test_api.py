
import copy
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor import CompressConfig, compress, evaluate, export_program, load, save
from compressor.data import TensorLoader
from compressor.errors import CompressorError, DataError, ModelError, TargetError, ConfigError, TrainingError
from compressor.layers import TNLayer

from compressor.zoo import DigitsNet

FAST = dict(epochs=4, seed=0)

# How many accuracy points compression may cost on the ~97.8 % DigitsNet of conftest (359
# held-out digits, one digit = 0.28 points). Measured over the fixture with seeds 0-7 for
# each run below (tr 5x with labels, tt 4x from a torch.export program, tr 5x label-free):
# the worst drop was 1.11 points (4 digits), the median 0.3-0.6. 2 points (7 digits) leaves
# room for two or three digits of platform/seed noise while still failing a method that
# really loses accuracy (the old bound of 5 points let 18 digits go).
MAX_ACCURACY_DROP = 0.02

# DigitsNet by hand: conv 1*8*3*3 + 8, fc1 512*96 + 96, fc2 96*10 + 10.
DIGITS_NET_PARAMS = (8 * 9 + 8) + (512 * 96 + 96) + (96 * 10 + 10)


def _file_numel(path):
    """Number of values stored in a safetensors file, read back from the file itself."""
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _ring_params(modes, ranks, decomp):
    """Cores (r_{k-1}, n_k, r_k) of a tensor ring; a train is the ring closed by a rank-1 bond."""
    assert len(modes) == len(ranks)
    if decomp == "tt":
        assert ranks[-1] == 1
    return sum(ranks[k - 1] * modes[k] * ranks[k] for k in range(len(modes)))


def _state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in sd)


@pytest.fixture(scope="module")
def result_5x(trained_digits_net, digits):
    xtr, ytr, xte, yte = digits
    before = _state_copy(trained_digits_net)
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", "5x",
                   eval_loader=TensorLoader(xte, yte, 256), **FAST)
    assert _same_state(trained_digits_net, before), "the caller's model was modified"
    assert not any(isinstance(m, TNLayer) for m in trained_digits_net.modules())
    return res


def test_compress_reaches_target_and_keeps_accuracy(result_5x, trained_digits_net, digits, tmp_path):
    r = result_5x.report
    assert r.ratio >= 5.0
    params = sum(p.numel() for p in result_5x.model.parameters())
    assert r.params == params and r.dense_params / params == pytest.approx(r.ratio)
    # Independent counts: the dense net by hand, the slim one as the values its checkpoint stores.
    assert r.dense_params == DIGITS_NET_PARAMS
    stored = _file_numel(save(result_5x.model, tmp_path / "slim.safetensors"))
    assert r.params == stored and r.ratio == pytest.approx(DIGITS_NET_PARAMS / stored)
    assert DIGITS_NET_PARAMS / stored >= 5
    # ... and from the learned ranks: every factorized layer's cores + bias, the rest dense.
    expected = 8 * 9 + 8  # conv stays dense
    for l in r.layers:
        if l.kept_dense:
            assert l.params_after == l.params_before == l.shape[0] * l.shape[1] + l.shape[0]
            expected += l.params_after
            continue
        modes = [m for m in l.tensorization[0] + l.tensorization[1] if m > 1]
        assert math.prod(l.tensorization[0]) == l.shape[1] and math.prod(l.tensorization[1]) == l.shape[0]
        by_hand = _ring_params(modes, l.final_ranks, r.decomp) + l.shape[0]
        assert l.params_after == by_hand
        expected += by_hand
    if "fc2" not in {l.name for l in r.layers}:
        expected += 96 * 10 + 10
    assert stored == expected
    # The accuracies are real evaluations on the held-out digits, and compression cost little.
    test = TensorLoader(digits[2], digits[3], 256)
    assert r.dense_accuracy == evaluate(trained_digits_net, test) and r.accuracy == evaluate(result_5x.model, test)
    assert r.dense_accuracy > 0.95
    assert r.accuracy >= r.dense_accuracy - MAX_ACCURACY_DROP
    assert r.accuracy >= r.dense_accuracy - 0.05
    names = {l.name for l in r.layers}
    assert names == {"fc1"} | ({"fc2"} if "fc2" in names else set())
    assert any(s["name"] == "conv" and "too small" in s["reason"] for s in r.skipped)
    for l in r.layers:
        assert all(f <= i for f, i in zip(l.final_ranks, l.initial_ranks))
        assert l.params_after < l.params_before


def test_checkpoint_round_trip_identical_logits_and_small_file(result_5x, trained_digits_net, digits, tmp_path):
    x = digits[2][:50]
    path = save(result_5x.model, tmp_path / "slim.safetensors")
    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in trained_digits_net.state_dict().items()}, str(dense_path))
    assert path.stat().st_size <= dense_path.stat().st_size / (0.9 * 5)
    for base in (DigitsNet, trained_digits_net):
        back = load(path, base=base)
        with torch.no_grad():
            assert (back(x) - result_5x.model(x)).abs().max() <= 1e-5
    assert not list(tmp_path.glob("*.tmp"))


def test_exported_slim_program_same_logits_dynamic_batch(result_5x, digits, tmp_path):
    x = digits[2][:33]
    p = export_program(result_5x.model, x[:4], tmp_path / "slim.pt2")
    prog = torch.export.load(str(p)).module()
    with torch.no_grad():
        ref = result_5x.model(x)
        assert (prog(x) - ref).abs().max() <= 1e-5
        assert (prog(x[:1]) - ref[:1]).abs().max() <= 1e-5


def test_exported_program_input_is_compressed(trained_digits_net, digits, digits_loaders, tmp_path):
    xtr, ytr, xte, yte = digits
    ep = torch.export.export(trained_digits_net, (xte[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))
    ep_state = {k: v.clone() for k, v in ep.state_dict.items()}
    ep_graph = str(ep.graph)
    res = compress(ep, digits_loaders[0], "tt", 4.0, eval_loader=digits_loaders[1], **FAST)
    assert ep.state_dict.keys() == ep_state.keys()
    assert all(torch.equal(ep.state_dict[k], v) for k, v in ep_state.items())
    assert str(ep.graph) == ep_graph, "the caller's exported program was modified"
    assert res.report.source == "graph" and res.report.ratio >= 4.0
    assert res.report.accuracy >= res.report.dense_accuracy - MAX_ACCURACY_DROP
    assert res.report.accuracy >= res.report.dense_accuracy - 0.05
    path = save(res, tmp_path / "g.safetensors")
    back = load(path, base=ep)
    with torch.no_grad():
        assert (back(xte[:20]) - res.model(xte[:20])).abs().max() <= 1e-5


class Untraceable(DigitsNet):
    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            h = torch.relu(self.fc1(h))
        else:
            h = torch.relu(self.fc1(h)) * 0.5
        return self.fc2(h)


def test_untraceable_model_falls_back_with_warning(trained_digits_net, digits_loaders):
    model = Untraceable()
    model.load_state_dict(trained_digits_net.state_dict())
    with pytest.warns(UserWarning, match="could not trace"):
        res = compress(model, digits_loaders[0], "tr", 3, **FAST)
    assert res.report.source == "module-walk" and res.report.ratio >= 3


def test_label_free_distillation(trained_digits_net, digits):
    xtr, ytr, xte, yte = digits
    res = compress(trained_digits_net, TensorLoader(xtr, None, 64, shuffle=True), "tr", "5x",
                   eval_loader=TensorLoader(xte, yte, 256), **FAST)
    assert res.report.ratio >= 5
    assert res.report.accuracy >= res.report.dense_accuracy - MAX_ACCURACY_DROP
    assert res.report.accuracy >= res.report.dense_accuracy - 0.05


def test_skip_leaves_a_layer_dense_by_path_and_refuses_a_pattern_that_matches_nothing(trained_digits_net,
                                                                                       digits_loaders):
    res = compress(trained_digits_net, digits_loaders[0], "tr", 2, skip="f*2", max_steps=30)
    assert [l.name for l in res.report.layers] == ["fc1"]
    assert any(s["name"] == "fc2" and s["reason"] == "left dense by skip 'f*2'" for s in res.report.skipped)
    assert type(res.model.fc2) is nn.Linear  # dense (and fine-tuned with the rest)
    with pytest.raises(ModelError, match=r"skip 'fc3' matches no layer kind \(conv2d, linear\) and no module path"):
        compress(trained_digits_net, digits_loaders[0], "tr", 2, skip=["fc3"], max_steps=1)


def test_filter_fn_narrows_choice(trained_digits_net, digits_loaders):
    res = compress(trained_digits_net, digits_loaders[0], "tr", 2, filter_fn=lambda m, name: name != "fc2",
                   max_steps=30)
    assert [l.name for l in res.report.layers] == ["fc1"]
    assert any(s["name"] == "fc2" and s["reason"] == "excluded by filter_fn" for s in res.report.skipped)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(target="abc"), TargetError, "not a number"),
    (dict(target=0.5), TargetError, "greater than 1"),
    (dict(target="1x"), TargetError, "greater than 1"),
    (dict(target=1e6), TargetError, "more than this model can give"),
    (dict(decomp="cp"), ConfigError, "unknown decomposition"),
    (dict(sigma=0), ConfigError, "sigma"),
    (dict(epochs=-1), ConfigError, "epochs"),
    (dict(lam=-1.0), ConfigError, "lambda"),
])
def test_bad_options_fail_fast_and_mutate_nothing(trained_digits_net, digits_loaders, kwargs, exc, msg):
    before = _state_copy(trained_digits_net)
    kw = dict(decomp="tr", target="5x")
    kw.update(kwargs)
    with pytest.raises(exc, match=msg) as info:
        compress(trained_digits_net, digits_loaders[0], **kw)
    assert isinstance(info.value, CompressorError) and "\n" not in str(info.value)
    assert _same_state(trained_digits_net, before)


class Stop(Exception):
    pass


def _caller_view(model):
    """Everything of the caller's model that compress must leave alone, bit for bit."""
    return {
        "state": _state_copy(model),
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "params": [(n, id(p), p.requires_grad, p.dtype) for n, p in model.named_parameters()],
        "modules": [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
    }


def _view_changes(a, b):
    """What differs between two ``_caller_view`` results (empty: nothing)."""
    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    changes = [f"{what} {k!r}" for what in ("state", "grads") for k in sorted(a[what].keys() | b[what].keys())
               if k not in a[what] or k not in b[what] or not same(a[what][k], b[what][k])]
    changes += [f"parameter {x} -> {y}" for x, y in zip(a["params"], b["params"]) if x != y]
    changes += [f"module {x} -> {y}" for x, y in zip(a["modules"], b["modules"]) if x != y]
    if len(a["params"]) != len(b["params"]) or len(a["modules"]) != len(b["modules"]):
        changes.append("modules or parameters added/removed")
    return changes


@pytest.mark.parametrize("when", ["step", "freeze", "end"])
def test_late_failure_mutates_nothing(trained_digits_net, digits_loaders, when):
    """Errors raised mid-training (here by the caller's own callback: after some gate-phase
    steps, right after pruning, once training is over) leave the caller's model untouched:
    weights, gradients, parameter objects, requires_grad and train/eval flags."""
    # A caller's model of its own (so one case cannot hide another's damage), mid-training:
    # gradients lying around, train mode on.
    model = copy.deepcopy(trained_digits_net).train()
    x, y = next(iter(digits_loaders[0]))
    nn.functional.cross_entropy(model(x), y).backward()
    before = _caller_view(model)
    seen = []

    def callback(event):
        seen.append(event.kind)
        if event.kind == when and event.step >= 4:
            # the working copy has moved by now: the failure really is late
            raise Stop(f"{event.kind} at step {event.step}")

    with pytest.raises(Stop):
        # gate_lr 0.05: the default for 12 steps would close slices fast enough to freeze before step 4
        compress(model, digits_loaders[0], "tr", 3, max_steps=12, log_every=4, callback=callback, seed=0,
                 gate_lr=0.05)
    training = [k for k in seen if k != "stage"]  # set-up stages come before training starts
    assert seen.index("stage") < seen.index("start") and training[0] == "start" and training[-1] == when
    assert seen.count("step") >= 1
    changes = _view_changes(before, _caller_view(model))
    assert not changes, f"the caller's model was modified: {changes}"
    assert not any(isinstance(m, TNLayer) for m in model.modules())


def test_no_eligible_layer():
    tiny = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ModelError, match="no eligible layer"):
        compress(tiny, [torch.randn(2, 4)], "tr", 2)


def test_loader_shape_mismatch_says_what_was_expected(trained_digits_net):
    bad = TensorLoader(torch.randn(10, 3, 8, 8), torch.zeros(10, dtype=torch.long), 5)
    with pytest.raises(DataError, match=r"shape \(5, 3, 8, 8\).*expected \(batch, 1, H, W\)"):
        compress(trained_digits_net, bad, "tr", 2)


def test_empty_loader(trained_digits_net):
    with pytest.raises(DataError, match="empty"):
        compress(trained_digits_net, [], "tr", 2)


def test_nan_loss_stops_and_keeps_last_good_state(trained_digits_net, digits):
    xtr, ytr, _, _ = digits
    x = xtr.clone()
    x[200:] = float("nan")  # the first batches are fine, then the loss turns NaN
    with pytest.raises(TrainingError, match="became nan.*kept the last good state") as info:
        compress(trained_digits_net, TensorLoader(x, ytr, 64), "tr", 2, epochs=2)
    kept = info.value.model
    with torch.no_grad():
        assert torch.isfinite(kept(xtr[:10])).all()


def test_config_object_and_target_forms():
    assert CompressConfig(target="5x").target == 5.0
    assert CompressConfig(target="5").target == 5.0
    assert CompressConfig(target=5).target == 5.0


def test_layer_whose_factorization_is_not_smaller_goes_back_to_dense(trained_digits_net, digits, tmp_path):
    xtr, ytr, xte, yte = digits
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64), "tr", 3, min_params=0,
                   layer_ranks={"fc2": 64}, max_steps=40)
    fc2 = next(l for l in res.report.layers if l.name == "fc2")
    assert fc2.kept_dense and fc2.params_after == fc2.params_before == 970
    assert isinstance(res.model.fc2, nn.Linear)
    back = load(save(res.model, tmp_path / "m.safetensors"), base=DigitsNet)
    with torch.no_grad():
        assert (back(xte[:9]) - res.model(xte[:9])).abs().max() <= 1e-5
