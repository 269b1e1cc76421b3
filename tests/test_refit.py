"""--refit: the gates choose the ranks, the cores start again from the pretrained weights."""

import pytest
import torch
from click.testing import CliRunner

from compressor import compress
from compressor.cli import main
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.errors import ConfigError
from compressor.plan import planned_starts
from compressor.planner import plan
from compressor.surgery import apply, replace_module, tn_layers
from compressor.refit import refit_layers
from test_calibration import TwoLayers, _anisotropic

MATRICES = {"fc1": ((48,), (64,)), "fc2": ((64,), (10,))}


def _run(refit: bool):
    """A run whose budget ends in the gate phase (λ 0: only the forced closing picks ranks), so
    nothing trains after the freeze and the slim layers are exactly what the freeze left."""
    model = TwoLayers()
    x = _anisotropic(400, 48, seed=6, live=12)
    with torch.no_grad():
        y = model(x).argmax(-1)
    events = []
    result = compress(model, TensorLoader(x, y, 50), "tt", "2.5x", init="activations", calibration_batches=8,
                      epochs=2, gate_fraction=1.0, lam=0.0, lr=1e-2, min_params=1, tensorization=MATRICES,
                      refit=refit, callback=events.append)
    return model, x, result, events


def _whitened_truncation(weight: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` weight with the least output error on ``x`` (SVD-LLM's truncation)."""
    gram = (x.double().T @ x.double())
    factor = torch.linalg.cholesky(gram + 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype))
    u, s, vh = torch.linalg.svd(factor.T @ weight.double().T, full_matrices=False)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return torch.linalg.solve_triangular(factor.T, kept, upper=True).T


def _distance_to_truncation(result, model, x, name: str) -> float:
    layer = tn_layers(result.model)[name]
    dense = getattr(model, name)
    inputs = x if name == "fc1" else torch.tanh(model.fc1(x)).detach()
    best = _whitened_truncation(dense.weight.detach(), inputs, layer.ranks[0])
    got = layer.to_dense().weight.detach().double()
    return float((got - best).norm() / best.norm())


def test_refit_restarts_the_pruned_cores_from_the_pretrained_weights_at_the_learned_ranks():
    model, x, result, events = _run(refit=True)
    assert result.report.ratio >= 2.5 and result.report.forced
    freeze = next(e for e in events if e.kind == "freeze")
    assert freeze.message == "2 layers refitted to the pretrained weights at the learned ranks"
    for name in ("fc1", "fc2"):
        assert _distance_to_truncation(result, model, x, name) < 1e-4
    assert torch.equal(result.model.fc1.bias, model.fc1.bias)  # the bias starts again too


def test_without_refit_the_slim_layers_keep_what_the_gate_phase_trained():
    model, x, result, events = _run(refit=False)
    assert next(e for e in events if e.kind == "freeze").message == ""
    assert _distance_to_truncation(result, model, x, "fc1") > 1e-2


def test_refit_gives_a_layer_that_went_dense_its_pretrained_weight_back():
    model = TwoLayers()
    config = CompressConfig(target=2, decomp="tt", rank=4, min_params=1, refit=True)
    the_plan = plan(model, config.plan_options())
    starts = planned_starts(the_plan, config.decomp)  # the user's rank, in each layer's own layout
    applied = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed)
    went_dense = tn_layers(applied.model)["fc2"].to_dense()
    replace_module(applied.model, "fc2", went_dense)
    with torch.no_grad():
        went_dense.weight.add_(1.0)
        for core in applied.model.fc1.cores:
            core.mul_(1.5)
    assert refit_layers(applied.model, model, the_plan, starts, applied.sites, config.seed) == 2
    assert torch.equal(applied.model.fc2.weight, model.fc2.weight)
    start = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed).model  # the same ranks, fitted afresh
    assert all(torch.equal(a, b) for a, b in zip(applied.model.fc1.cores, start.fc1.cores))


def test_refit_needs_gates():
    with pytest.raises(ConfigError, match="refit keeps the ranks gates learned"):
        CompressConfig(refit=True, rank_select="svd-llm")


def test_the_cli_offers_refit_and_refuses_it_without_gates_with_exit_2(tmp_path):
    runner = CliRunner()
    assert "--refit" in runner.invoke(main, ["run", "--help"]).output
    res = runner.invoke(main, ["examples/lenet5.pt2", "--target", "5x", "--data", "digits", "--refit",
                               "--rank-select", "energy", "-o", str(tmp_path / "slim.safetensors")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: refit keeps the ranks gates learned")
    assert not (tmp_path / "slim.safetensors").exists()


def _left_to_choose(refit: bool | None):
    """A small network whose gates freeze mid-run, so a weight phase trains after the choice."""
    model = TwoLayers()
    x = _anisotropic(400, 48, seed=6, live=12)
    with torch.no_grad():
        y = model(x).argmax(-1)
    events = []
    # a DataLoader draws each epoch's order from the global random state: a probe that moved it would show
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True)
    result = compress(model, loader, "tt", "2.5x", epochs=3, min_params=1,
                      tensorization=MATRICES, refit=refit, callback=events.append)
    freeze = next(e for e in events if e.kind == "freeze")
    return result, freeze


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_left_to_the_tool_a_small_network_starts_the_weight_phase_from_the_start_that_fits_better():
    auto, freeze = _left_to_choose(None)
    history = auto.history
    assert history.frozen_at < history.steps  # the choice was made mid-run
    losses = history.refit_losses
    assert set(losses) == {"adapted", "refitted"} and all(v > 0 for v in losses.values())
    assert history.refitted == (losses["refitted"] <= losses["adapted"])
    assert auto.report.chosen["refit"] is history.refitted
    assert "task loss" in freeze.message and "on 4 batches" in freeze.message
    told, _ = _left_to_choose(history.refitted)  # the probe leaves no trace: same run as if told
    assert _same_weights(auto, told)


def test_a_refit_that_fits_worse_is_undone_exactly(monkeypatch):
    import compressor.api as api

    def spoiled(model, *args):
        with torch.no_grad():
            for layer in tn_layers(model).values():
                for core in layer.cores:
                    core.mul_(3.0)
        return 2
    monkeypatch.setattr(api, "refit_layers", spoiled)
    auto, freeze = _left_to_choose(None)
    assert auto.history.refitted is False
    assert auto.history.refit_losses["refitted"] > auto.history.refit_losses["adapted"]
    assert freeze.message.startswith("kept the gate phase's weights: task loss")
    kept, _ = _left_to_choose(False)
    assert _same_weights(auto, kept)


def test_the_help_names_the_constants_it_cannot_import():
    """config sits below train and calibration, so their counts are spelt out in its help."""
    from dataclasses import fields

    from compressor.calibration import COUNT_BATCHES
    from compressor.gate_phase import PROBE_BATCHES
    help_of = {f.name: f.metadata.get("help", "") for f in fields(CompressConfig)}
    assert f"measures both starts on {PROBE_BATCHES} training batches" in help_of["refit"]
    assert f"cover up to {COUNT_BATCHES}," in help_of["calibration_batches"]
