"""Defaults that depend on depth: a deep stack (a transformer) starts from its activations and
refits when the gates freeze; a small network starts from its weights and measures at the freeze
whether refitting helps."""

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compressor import cli, compress
from compressor.config import DEEP_STACK_LR, DEFAULT_LR, CompressConfig
from compressor.data import TensorLoader
from compressor.gates import DEEP_MARGIN, DEEP_STACK
from test_calibration import TwoLayers, _anisotropic

DEEP = DEEP_STACK + 2
SHALLOW = 2


@pytest.mark.parametrize("options, layers, init, refit", [
    ({}, DEEP, "activations", True),
    ({}, DEEP_STACK, "weights", None),  # the line itself is still shallow: refit measured at the freeze
    ({}, SHALLOW, "weights", None),
    ({"init": "weights"}, DEEP, "weights", True),  # what the user set stands
    ({"refit": False}, DEEP, "activations", False),
    ({"init": "activations", "refit": True}, SHALLOW, "activations", True),
    ({"rank": 8}, DEEP, "weights", True),  # a fixed rank cannot start from activations
    ({"start": "ladder"}, DEEP, "weights", True),
    ({"rank_select": "svd"}, DEEP, "weights", False),  # no gates: nothing to start or refit
])
def test_settled_makes_the_depth_dependent_choices(options, layers, init, refit):
    config = CompressConfig(**options)
    settled = config.settled(layers)
    assert (settled.config.init, settled.config.refit) == (init, refit)
    assert settled.config.lr == (DEEP_STACK_LR if layers > DEEP_STACK else DEFAULT_LR)
    assert settled.config.gate_margin == (DEEP_MARGIN if layers > DEEP_STACK else 0.0)
    assert settled.deep == (layers > DEEP_STACK) and settled.layers == layers
    assert config.init == options.get("init", "auto") and config.refit is options.get("refit")  # not mutated
    assert config.gate_margin is None and config.lr is None


def test_the_users_learning_rate_stands_at_any_depth():
    assert CompressConfig(lr=3e-4).settled(DEEP).config.lr == 3e-4 == CompressConfig(lr=3e-4).settled(SHALLOW).config.lr
    assert CompressConfig(gate_margin=1.0).settled(DEEP).config.gate_margin == 1.0


def test_a_deep_stack_with_nothing_to_observe_starts_from_its_weights():
    settled = CompressConfig().settled(DEEP, observable=False)  # e.g. a deep CNN: convolutions only
    assert (settled.config.init, settled.config.refit) == ("weights", True)


def test_what_the_tool_chose_is_worked_out_once_for_the_line_and_the_report():
    settled = CompressConfig().settled(DEEP)
    assert settled.left == ("init", "refit", "lr", "gate_lr")
    assert settled.stage_line() == (f"a deep stack of {DEEP} factorized layers: --init activations, --refit, "
                                    "--lr 5e-05 by default")
    assert settled.chosen(None, 0.07) == {"init": "activations", "refit": True, "lr": 5e-5, "gate_lr": 0.07}
    small = CompressConfig(gate_lr=0.1).settled(SHALLOW)
    assert small.stage_line() is None and small.left == ("init", "refit", "lr")
    assert small.chosen(False, 0.1) == {"init": "weights", "refit": False, "lr": DEFAULT_LR}  # refit: the freeze's
    assert small.chosen() == {"init": "weights", "refit": None, "lr": DEFAULT_LR}


class Stack(nn.Module):
    """``depth`` square Linear layers: deep enough to count as a transformer-like stack."""

    def __init__(self, depth: int, dim: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        for layer in self.layers:
            x = x + 0.5 * torch.tanh(layer(x))
        return self.head(x)


def _compress(model: nn.Module, dim: int, **options):
    x = _anisotropic(256, dim, seed=3)
    with torch.no_grad():
        y = model(x).argmax(-1)
    events = []
    result = compress(model, TensorLoader(x, y, 32), "tt", "2x", epochs=1, min_params=1, calibration_batches=4,
                      callback=events.append, **options)
    return result, [e.message for e in events if e.kind in ("stage", "freeze")]


def test_a_deep_stack_starts_from_its_activations_and_refits_by_default():
    model = Stack(DEEP - 1)  # + the head
    result, messages = _compress(model, 24)
    assert f"a deep stack of {DEEP} factorized layers: --init activations, --refit, --lr 5e-05 by default" in messages
    assert any(m.startswith("calibration: the inputs of") for m in messages)
    assert result.report.start["whitened"] == DEEP
    assert result.report.chosen == {"init": "activations", "refit": True, "lr": 5e-5,
                                    "gate_lr": result.history.gate_lr}  # what ran, in the report JSON too
    assert f"{DEEP} layers refitted to the pretrained weights at the learned ranks" in messages
    assert result.report.ratio >= 2


def test_the_users_choice_on_a_deep_stack_stands():
    result, messages = _compress(Stack(DEEP - 1), 24, init="weights", refit=False)
    assert f"a deep stack of {DEEP} factorized layers: --lr 5e-05 by default" in messages  # the one choice left
    assert not any(m.startswith("calibration") or "refitted" in m for m in messages)
    assert result.report.start["whitened"] == 0
    assert set(result.report.chosen) == {"lr", "gate_lr"}  # init and refit were the user's


def test_a_small_network_keeps_the_weights_start_and_measures_whether_to_refit():
    result, messages = _compress(TwoLayers(dim=24), 24)
    assert not any("deep stack" in m or m.startswith("calibration") for m in messages)
    assert result.report.start["whitened"] == 0
    assert any("task loss" in m and "on 4 batches" in m for m in messages)  # the freeze says what it chose
    assert result.report.chosen["refit"] is result.history.refitted is not None


@pytest.mark.parametrize("flags, refit", [([], None), (["--refit"], True), (["--no-refit"], False)])
def test_the_cli_leaves_refit_to_the_tool_unless_told(monkeypatch, tmp_path, flags, refit):
    seen = {}

    def capture(model, loader, config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt  # stop before any training: only the parsed options matter here

    monkeypatch.setattr(cli, "compress", capture)
    res = CliRunner().invoke(cli.main, ["examples/lenet5.pt2", "--target", "5x", "--data", "digits",
                                        "-o", str(tmp_path / "slim.safetensors"), *flags])
    assert seen["config"].refit is refit and seen["config"].init == "auto", res.output
    assert res.exit_code == 130 and not list(tmp_path.iterdir())
