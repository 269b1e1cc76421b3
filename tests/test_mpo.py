"""The mpo layout (``tensorization="mpo"``): every core carries one input mode and one output mode.

Checked against references written out by hand here: the weight tensor TT-SVD splits is the
weight permuted to (i1 o1, i2 o2, ...) (numpy's transpose, not the code's own helpers), a
full-rank start rebuilds the weight, and every way a layer computes (the contraction in
training, the kept weight in evaluation, lookups, a tied head) equals the dense product of
the weight it rebuilds; then a real run, its checkpoint and ``compress inspect``.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from compressor import CompressConfig, compress, load, read_metadata, save
from compressor import tensornet as tn
from compressor.cli import main
from compressor.data import TensorLoader
from compressor.errors import CompressorError, ConfigError, TensorizationError
from compressor.layers import TiedTNLinear, TNConv2d, TNEmbedding, TNLayer, TNLinear
from compressor.plan import own_layout
from compressor.planner import plan
from compressor.selectors import candidate_layouts, faithful_start
from compressor.zoo import DigitsNet

FULL = 10 ** 6  # every bond at its largest useful size: the start is exact


def rel_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_paired_factorization_splits_both_sides_into_as_many_balanced_modes():
    assert tn.paired_factorization(400, 120) == ((5, 8, 10), (4, 5, 6))  # LeNet-5's fc1
    assert tn.paired_factorization(6, 16) == ((2, 3), (4, 4))  # its conv2's channels
    assert tn.paired_factorization(512, 96) == ((8, 8, 8), (4, 4, 6))
    assert tn.paired_factorization(7, 16) == ((7,), (16,))  # a prime side: one pair
    assert tn.paired_factorization(1, 6) == ((1,), (6,))
    with pytest.raises(TensorizationError, match="prime factor 1009"):
        tn.paired_factorization(1009, 16)


def test_weight_tensor_is_the_weight_permuted_to_input_output_pairs():
    """W^T (i1 i2, o1 o2) read as the cores read it, [(i1 o1), (i2 o2)], by numpy's transpose."""
    w = torch.randn(20, 12)  # out 20 = (4, 5), in 12 = (3, 4)
    got = TNLinear.layout_tensor(w, ((3, 4), (4, 5)), paired=True)
    expected = w.numpy().T.reshape(3, 4, 4, 5).transpose(0, 2, 1, 3).reshape(-1)
    np.testing.assert_array_equal(got.numpy(), expected)
    # a conv: (C_out, C_in, kh, kw) -> [window, (i1 o1), (i2 o2)]
    k = torch.randn(8, 6, 3, 3)  # out 8 = (2, 4), in 6 = (2, 3)
    got = TNConv2d.layout_tensor(k, ((2, 3), (2, 4)), paired=True)
    expected = k.numpy().reshape(2, 4, 2, 3, 9).transpose(4, 2, 0, 3, 1).reshape(-1)
    np.testing.assert_array_equal(got.numpy(), expected)


def _full_rank_cases():
    conv = nn.Conv2d(6, 16, 5, padding=2)
    return {
        "linear": (nn.Linear(400, 120), {}),
        "conv2d": (conv, {}),
        "conv2d merged window": (conv, {"merge_spatial": True}),
        "embedding": (nn.Embedding(1009, 24, padding_idx=3), {}),  # vocabulary padded to 1012
    }


@pytest.mark.parametrize("kind", list(_full_rank_cases()))
@pytest.mark.parametrize("decomp", ["tt", "tr"])
def test_full_rank_start_rebuilds_the_weight(kind, decomp):
    dense, extra = _full_rank_cases()[kind]
    layer = type_of(dense).from_dense(dense, decomp, FULL, paired=True, gated=False, **extra)
    assert layer.paired and len(layer.modes) >= 2
    assert rel_error(layer.dense_weight(), dense.weight) < 1e-5
    assert rel_error(layer.to_dense().weight, dense.weight) < 1e-5


def type_of(dense):
    return {nn.Linear: TNLinear, nn.Conv2d: TNConv2d, nn.Embedding: TNEmbedding}[type(dense)]


def test_cores_carry_their_pairs():
    lin = TNLinear.from_dense(nn.Linear(400, 120), "tt", 4, paired=True, gated=False)
    assert lin.pairs() == ((5, 4), (8, 5), (10, 6)) and lin.modes == (20, 40, 60)
    conv = TNConv2d.from_dense(nn.Conv2d(6, 16, 5), "tt", 4, paired=True, gated=False)
    assert conv.pairs() == ((25,), (2, 4), (3, 4)) and conv.modes == (25, 8, 12)
    merged = TNConv2d.from_dense(nn.Conv2d(6, 16, 5), "tt", 4, paired=True, gated=False, merge_spatial=True)
    assert merged.pairs() == ((50, 4), (3, 4)) and merged.modes == (200, 12)
    balanced = TNLinear.from_dense(nn.Linear(400, 120), "tt", 4, gated=False)
    assert not balanced.paired and balanced.modes == (5, 8, 10, 4, 5, 6)


@pytest.mark.parametrize("decomp", ["tt", "tr"])
def test_linear_output_is_x_times_its_rebuilt_weight(decomp):
    """Truncated, gated, in training (the contraction) and in evaluation (the kept weight)."""
    dense = nn.Linear(96, 60)
    layer = TNLinear.from_dense(dense, decomp, 3, paired=True, gated=True)
    x = torch.randn(5, 7, 96)
    layer.eval()  # deterministic gates: the weight is fixed
    weight = layer.dense_weight().detach()
    assert rel_error(weight, dense.weight) > 1e-2  # truncated: not the dense layer itself
    expected = x @ weight.T + layer.bias.detach()
    assert rel_error(layer(x), expected) < 1e-5  # grad on: the contraction of x with the cores
    with torch.no_grad():
        assert rel_error(layer(x), expected) < 1e-5  # the kept dense weight
    before = layer(x).detach()
    layer.prune_()
    assert not layer.gated and rel_error(layer(x), before) < 1e-5


def test_conv_output_is_the_convolution_with_its_rebuilt_kernel():
    dense = nn.Conv2d(6, 16, 5, padding=2)
    layer = TNConv2d.from_dense(dense, "tr", 4, paired=True, gated=False)
    x = torch.randn(2, 6, 12, 12)
    kernel = layer.kernel().detach()
    assert kernel.shape == dense.weight.shape
    assert rel_error(layer(x), F.conv2d(x, kernel, layer.bias, padding=2)) < 1e-5


def test_embedding_lookups_and_tied_head_read_the_rebuilt_table():
    dense = nn.Embedding(1009, 24, padding_idx=3)
    with torch.no_grad():
        dense.weight[3] = torch.randn(24)  # a padding row kept exactly, not zero
    layer = TNEmbedding.from_dense(dense, "tr", 5, paired=True, gated=False)
    table = layer.dense_weight().detach()
    idx = torch.tensor([[0, 3, 1008], [517, 3, 42]])
    assert torch.equal(table[3], dense.weight[3])
    assert rel_error(layer(idx), table[idx]) < 1e-5  # the rows joined core by core
    layer.eval()
    with torch.no_grad():
        assert rel_error(layer(idx), table[idx]) < 1e-5  # the kept table
    head = TiedTNLinear(layer)
    x = torch.randn(4, 24)
    layer.train(), head.train()
    assert rel_error(head(x), x @ table.T) < 1e-5
    head.eval(), layer.eval()
    with torch.no_grad():
        assert rel_error(head(x), x @ table.T) < 1e-5
    with pytest.raises(IndexError):
        layer.train()(torch.tensor([1009]))


def test_spec_round_trip_and_unpaired_modes_refused():
    layer = TNConv2d.from_dense(nn.Conv2d(6, 16, 5), "tt", 4, paired=True, gated=False)
    spec = layer.spec()
    assert spec["paired"] is True
    again = TNLayer.from_spec(spec)
    again.load_state_dict(layer.state_dict())
    assert again.paired and torch.equal(again.kernel(), layer.kernel())
    assert "paired" not in TNLinear.from_dense(nn.Linear(12, 20), "tt", 2, gated=False).spec()
    with pytest.raises(CompressorError, match="pairs input and output modes"):
        TNLayer.from_spec({**TNLinear.from_dense(nn.Linear(12, 20), "tt", 2, gated=False, paired=True).spec(),
                           "in_modes": [12]})
    with pytest.raises(ConfigError, match="whole input in one core"):
        TNLinear.from_dense(nn.Linear(12, 20), "tt", 2, paired=True, whiten=torch.eye(12))


# ------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def mpo_run(trained_digits_net, digits):
    xtr, ytr, xte, yte = digits
    return compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", "5x",
                    eval_loader=TensorLoader(xte, yte, 256), epochs=3, seed=0, tensorization="mpo", min_params=500)


def test_run_reaches_the_target_with_every_layer_paired(mpo_run):
    report = mpo_run.report
    assert report.ratio >= 5.0
    assert {l.name: l.paired for l in report.layers} == {"fc1": True, "fc2": True}
    fc1 = next(l for l in report.layers if l.name == "fc1")
    assert fc1.tensorization == [[8, 8, 8], [4, 4, 6]]
    assert mpo_run.model.fc1.paired and mpo_run.model.fc1.pairs() == ((8, 4), (8, 4), (8, 6))
    assert mpo_run.model.fc2.paired and mpo_run.model.fc2.pairs() == ((8, 2), (12, 5))
    assert report.accuracy > 0.9


def test_faithful_start_keeps_the_paired_layout(trained_digits_net):
    """The l0 start chooses ranks only: a balanced plan tries coarser layouts, a paired one none."""
    paired = plan(trained_digits_net, CompressConfig(tensorization="mpo", min_params=500).plan_options())
    balanced = plan(trained_digits_net, CompressConfig(min_params=500).plan_options())
    fc1 = next(lp for lp in paired.layers if lp.name == "fc1")
    assert fc1.paired and candidate_layouts(fc1) == [own_layout(fc1)] and own_layout(fc1).paired
    assert len(candidate_layouts(next(lp for lp in balanced.layers if lp.name == "fc1"))) > 1
    start = faithful_start(paired, trained_digits_net, 5.0, "tr").starts.of("fc1")
    assert start.layout == own_layout(fc1) and start.layout.modes == (32, 32, 48)


def test_checkpoint_records_the_layout_and_round_trips_identical_logits(mpo_run, digits, tmp_path, monkeypatch):
    path = save(mpo_run, tmp_path / "mpo.safetensors")
    meta = read_metadata(path)
    assert meta["version"] == 4
    assert meta["layers"]["fc1"]["spec"]["paired"] is True
    loaded = load(path, DigitsNet()).eval()
    x = digits[2][:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), mpo_run.model.eval()(x))
    assert loaded.fc1.pairs() == ((8, 4), (8, 4), (8, 6))
    from compressor import cli

    monkeypatch.setattr(cli.out_console, "_width", 200)  # one table row per line
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "fc1" in line)
    assert "mpo 8×4 · 8×4 · 8×6" in row, r.output


def test_balanced_overrides_still_apply(trained_digits_net, digits):
    xtr, ytr, _, _ = digits
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tt", "3x", epochs=1, seed=0,
                   tensorization={"fc1": ((8, 64), (96,))})
    fc1 = next(l for l in res.report.layers if l.name == "fc1")
    assert not fc1.paired and fc1.tensorization == [[8, 64], [96]] and not res.model.fc1.paired


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensorization="tucker"), "unknown tensorization 'tucker'; choose balanced or mpo"),
    (dict(tensorization=42), "unknown tensorization '42'"),
    (dict(tensorization="mpo", rank_select="svd"), "cannot use tensorization 'mpo'"),
    (dict(tensorization="mpo", init="activations"), "spreads it over every core"),
])
def test_bad_values_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompressConfig(**kwargs)
    assert CompressConfig(tensorization="balanced").tensorization == {}


def test_cli_runs_mpo_and_refuses_bad_values_in_one_line(trained_digits_net, digits, tmp_path):
    xtr, ytr, xte, _ = digits
    ep = torch.export.export(trained_digits_net, (xte[:4].clone(),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(tmp_path / "model.pt2"))
    out = tmp_path / "slim.safetensors"
    base = [str(tmp_path / "model.pt2"), "--target", "4x", "--data", "digits", "-o", str(out), "--epochs", "1"]
    r = CliRunner().invoke(main, base + ["--tensorization", "mpo"])
    assert r.exit_code == 0, r.output + r.stderr
    assert read_metadata(out)["layers"]["fc1"]["spec"]["paired"] is True
    for extra, fragment in ((["--tensorization", "tucker"], "unknown tensorization 'tucker'"),
                            (["--tensorization", "mpo", "--rank-select", "svd"], "cannot use tensorization 'mpo'")):
        r = CliRunner().invoke(main, base + ["--force"] + extra)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
