import torch

from compressor.config import CompressConfig
from compressor.graph import apply, plan, tn_layers
from compressor.train import SizeMeter, _bound_gates, force_target, reopen_to_target


def _gated(model, target=4.0):
    config = CompressConfig(target=target, rank=16)
    the_plan = plan(model, config)
    gm = apply(model, the_plan, config)
    return gm, SizeMeter(gm, the_plan.dense_params)


def test_force_target_reaches_the_target_by_closing_slices(trained_digits_net):
    gm, meter = _gated(trained_digits_net)
    target = 2 * meter.ratio()
    closed = force_target(meter, target)
    assert closed > 0 and meter.ratio() >= target
    for layer in tn_layers(gm).values():
        assert all(g.open_count() >= 1 for g in layer.gates.values())


def test_reopen_gives_back_overshoot_without_missing_the_target(trained_digits_net):
    gm, meter = _gated(trained_digits_net)
    target = 2 * meter.ratio()
    force_target(meter, 2 * target)  # overshoot on purpose: closed far more than the target needs
    before = meter.ratio()
    reopened = reopen_to_target(meter, target)
    assert reopened > 0
    assert target <= meter.ratio() < before


def test_gate_means_are_bounded(trained_digits_net):
    gm, meter = _gated(trained_digits_net)
    layer = next(iter(tn_layers(gm).values()))
    gate = next(iter(layer.gates.values()))
    with torch.no_grad():
        gate.mu[0], gate.mu[1] = 7.0, -9.0
    _bound_gates(meter)
    assert float(gate.mu[0]) == 1.0 + gate.sigma and float(gate.mu[1]) == -1.0
