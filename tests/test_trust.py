"""Defects found by the trust review, each pinned by a test that failed before its fix."""

import pytest
import tensorly as tl
import torch
from torch import nn

from compressor import compress
from compressor.config import CompressConfig
from compressor.controller import SizeMeter, TargetController
from compressor.data import TensorLoader
from compressor.errors import DataError
from compressor.gates import BernoulliGate
from compressor.graph import apply, count_params, plan, tn_layers
from compressor.layers import TNLinear
from compressor.selectors import get_selector


def test_decomposition_works_and_leaves_a_pytorch_tensorly_backend_alone():
    lin = nn.Linear(64, 32)
    tl.set_backend("pytorch")  # what tensorly-torch does on import
    try:
        layer = TNLinear.from_dense(lin, "tt", 64).eval()
        assert tl.get_backend() == "pytorch"
    finally:
        tl.set_backend("numpy")
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert (layer(x) - lin(x)).abs().max() < 1e-4  # full rank: the same layer


def test_a_generator_loader_is_refused_with_one_line(trained_digits_net, digits):
    xtr, ytr = digits[0], digits[1]
    batches = ((xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 640, 64))
    with pytest.raises(DataError, match="one-shot iterator .*re-iterable") as info:
        compress(trained_digits_net, batches, "tr", 4, epochs=1)
    assert "\n" not in str(info.value)


class _RunsDry:
    """Re-iterable on paper, with a length, but empty after two passes (a hand-written loader bug)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes <= 2 else [])


def test_a_loader_that_runs_dry_is_a_clear_error_not_a_hang(trained_digits_net, digits):
    xtr, ytr = digits[0], digits[1]
    loader = _RunsDry([(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 640, 64)])
    with pytest.raises(DataError, match="no batch in epoch 2"):  # before: epoch after epoch, forever
        compress(trained_digits_net, loader, "tr", 4, epochs=3, lam=1.0)


def test_reinforce_give_back_reopens_for_real(trained_digits_net):
    config = CompressConfig(target=4, rank_select="reinforce", rank=16)
    selector = get_selector("reinforce")
    the_plan = plan(trained_digits_net, config)
    gm = apply(trained_digits_net, the_plan, config, make_gate=selector.gate_factory(config)).model
    meter = SizeMeter(gm, the_plan.dense_params)
    assert isinstance(meter.gates()[0], BernoulliGate)
    target = 2 * meter.ratio()
    TargetController(meter, 2 * target, 100).force()
    before = meter.ratio()
    open_before = sum(g.open_count() for g in meter.gates())
    reopened = TargetController(meter, target, 100).give_back()
    assert reopened > 0
    assert sum(g.open_count() for g in meter.gates()) == open_before + reopened
    assert target <= meter.ratio() < before


def test_progress_ratio_counts_layers_that_went_back_to_dense(trained_digits_net, digits):
    xtr, ytr, xte, yte = digits
    events = []
    # fc2 (96 -> 10) at rank 64 is bigger than dense, so it goes back to dense when pruned.
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", 3,
                   layer_ranks={"fc2": 64}, min_params=0, epochs=1, callback=events.append)
    assert any(l.name == "fc2" and l.kept_dense for l in res.report.layers)
    real = res.report.dense_params / count_params(res.model)
    assert res.report.epochs[-1]["ratio"] == pytest.approx(real)
    assert events[-1].kind == "end" and events[-1].ratio == pytest.approx(real)
