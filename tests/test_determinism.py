"""One run, one result: how often a run is evaluated or logged never changes how it trains.

The step-0 evaluation once switched the whole gated model to evaluation mode (so λ was
calibrated on deterministic gates with an ``eval_loader`` and on noisy ones without), and a
``DataLoader``'s pass draws a base seed from the global generator (so each epoch's evaluation
moved the gate noise of the epochs after it).
"""

import copy

import pytest
import torch

from compressor import compress, evaluate
from compressor.data import TensorLoader
from compressor.surgery import tn_layers

# A target the gates must learn (DigitsNet starts near 2x), over two short epochs.
RUN = dict(epochs=2, seed=3)
TARGET = 8.0


def _run(model, digits, **kwargs):
    xtr, ytr, _, _ = digits
    loader = TensorLoader(xtr, ytr, 64, shuffle=True, seed=0)
    if kwargs.get("eval_loader") == "the training loader":
        kwargs["eval_loader"] = loader  # each evaluation moves its epoch counter
    return compress(copy.deepcopy(model), loader, "tr", TARGET, **RUN, **kwargs)


def _fingerprint(res):
    return {"ratio": res.report.ratio, "steps": res.history.steps, "frozen_at": res.history.frozen_at,
            "forced": res.history.forced, "reopened": res.history.reopened, "refitted": res.history.refitted,
            "ranks": {row.name: row.final_ranks for row in res.report.layers},
            "lambda": [e["lambda"] for e in res.history.epochs],
            "train_loss": [e["train_loss"] for e in res.history.epochs]}


def _assert_same(a, b):
    assert _fingerprint(a) == _fingerprint(b)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class _NoisyLogger:
    """A progress callback with side effects a display might have: it draws random numbers."""

    def __call__(self, event):
        torch.rand(3)


@pytest.fixture(scope="module")
def plain_run(trained_digits_net, digits):
    return _run(trained_digits_net, digits)


def test_gates_learn_in_this_setting(plain_run):
    assert plain_run.history.frozen_at is not None and plain_run.history.frozen_at > 0
    assert plain_run.report.ratio >= TARGET


@pytest.mark.parametrize("how", ["tensor loader", "torch DataLoader", "the training loader", "logging callback"])
def test_a_run_is_the_same_evaluated_or_not(plain_run, trained_digits_net, digits, how):
    """Without ``eval_loader``, with one (step 0 and every epoch: a loader of our own, a
    ``DataLoader`` drawing a base seed per pass, or the training loader itself, whose epoch
    counter each evaluation moves), or with a callback drawing random numbers:
    the same seed gives the same ranks, steps, ratio and weights, bit for bit."""
    _, _, xte, yte = digits
    if how == "tensor loader":
        kwargs = {"eval_loader": TensorLoader(xte, yte, 256)}
    elif how == "the training loader":
        kwargs = {"eval_loader": how}
    elif how == "torch DataLoader":
        data = torch.utils.data.TensorDataset(xte, yte)
        kwargs = {"eval_loader": torch.utils.data.DataLoader(data, batch_size=256)}
    else:
        kwargs = {"callback": _NoisyLogger()}
    evaluated = _run(trained_digits_net, digits, **kwargs)
    if "eval_loader" in kwargs:
        assert evaluated.report.start["accuracy"] is not None
        assert all(e["eval_accuracy"] is not None for e in evaluated.history.epochs)
    _assert_same(plain_run, evaluated)


def test_the_input_models_mode_does_not_change_the_run(plain_run, trained_digits_net, digits):
    """A model handed over in training mode trains as one in evaluation mode (DigitsNet has no
    dropout or BatchNorm, so nothing else tells the two apart)."""
    assert not trained_digits_net.training
    _assert_same(plain_run, _run(copy.deepcopy(trained_digits_net).train(), digits))


def test_evaluate_restores_every_submodules_mode(trained_digits_net, digits):
    """Modes are restored per submodule, not flattened to the top module's, and no generator moves."""
    _, _, xte, yte = digits
    model = copy.deepcopy(trained_digits_net).eval()
    first = next(iter(model.children()))
    first.train()
    before = {name: m.training for name, m in model.named_modules()}
    state = torch.get_rng_state()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xte, yte), batch_size=256)
    evaluate(model, data)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(torch.get_rng_state(), state)


def test_factorized_layers_take_the_mode_of_what_they_replace(trained_digits_net, digits):
    """A gated layer swapped into a model in evaluation mode is in evaluation mode too (no
    training-mode gates hidden inside an evaluation-mode model)."""
    from compressor import planner
    from compressor.selectors import get_selector
    from compressor.config import CompressConfig
    from compressor.surgery import apply

    model = copy.deepcopy(trained_digits_net).eval()
    config = CompressConfig(decomp="tr", target=TARGET)
    the_plan = planner.plan(model, config.plan_options())
    selector = get_selector("l0")
    starts, _ = selector.prepare(the_plan, model, config.selector_options(), None)
    applied = apply(model, the_plan.leaving_dense(starts.dense), starts, sigma=0.5, seed=0,
                    make_gate=selector.gate_factory(config.selector_options(), len(the_plan.layers)))
    layers = tn_layers(applied.model)
    assert layers and not any(m.training for m in applied.model.modules())
