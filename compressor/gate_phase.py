"""The gate phase of a fine-tune: λ, the freeze, pruning, and refit or keep.

While the gates move, the :class:`~compressor.controller.TargetController` steers λ from a
calibrated start and says when the gates stop. Then the phase ends the same way whatever
stopped it: slices are forced shut or given back, every layer is pruned (one whose
factorization is not smaller than dense goes dense), and the weight phase starts either
from refitted cores or from the weights the gate phase adapted (:meth:`GatePhase.refit_or_keep`).
The loop (``train.FineTune``) records what each decision returns.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .controller import SizeMeter, TargetController
from .distributed import World
from .surgery import evaluation_mode, replace_module, set_training, tn_layers
from .resume import random_state_kept, set_loader_epoch
from .runspec import RunSpec, Schedule

log = logging.getLogger(__name__)

#: Batches on which a run left to choose compares refitted cores with the gate phase's weights.
PROBE_BATCHES = 4

#: ``task_loss(batch)``: the task loss of the model itself (no DDP) on one batch, teacher included.
TaskLoss = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class RefitChoice:
    """How the weight phase starts: ``refitted`` (None: no refit was offered), the probe's mean
    task losses when both starts were measured, and the line the freeze event says."""

    refitted: bool | None = None
    losses: dict[str, float] | None = None
    message: str = ""


class GatePhase:
    """The size decisions of one run: its meter, its controller and whether the gates are frozen."""

    def __init__(self, model: nn.Module, spec: RunSpec, loader: Iterable, task_loss: TaskLoss,
                 refit: Callable[[nn.Module], int] | None = None):
        self.model, self.spec, self.loader, self.task_loss = model, spec, loader, task_loss
        self.refit = refit  # refit(pruned model) -> layers whose cores start again (spec.gates.refit)
        self.world = World.current()
        self.meter = SizeMeter(model, spec.dense_params)
        self.control = TargetController(self.meter, spec.gates.target, spec.schedule.gate_steps, spec.gates.penalty)
        # An ungated model's ranks are final: no gate phase, and nothing to close should its
        # selector's size estimate fall short (said once, never reported as a forced closing).
        gates = self.meter.gates()
        self.frozen = self.control.reached or not gates
        if not gates and not self.control.reached:
            log.warning("the fixed ranks give %.4fx, short of the %gx target: the rank selector's size "
                        "estimate missed something", self.meter.ratio(), spec.gates.target)
        self.score_function = any(g.score_function for g in gates)  # REINFORCE: several sampled forwards a step
        self.annealed = [g for g in gates if g.anneals]  # gates whose relaxation follows a schedule (MARS's)

    @property
    def lam(self) -> float:
        return self.control.lam

    def start(self) -> None:
        """λ for the first step: the user's, or calibrated on the first batch (the ranks' mean).

        Calibrated in training mode, the mode the gate phase runs in: the task gradient it
        balances is the one the steps see, through noisy gates (evaluation-mode gates give
        another, several times larger gradient), whatever mode the model came in. The batch is
        the first of the first epoch, however often the loader was read before (the fit check,
        calibration, an evaluation on the same loader)."""
        if self.spec.gates.lam is not None:
            self.control.start_from(self.spec.gates.lam)
        elif not self.frozen:
            set_training(self.model, True)
            set_loader_epoch(self.loader, 0)  # the first training batch, whatever passes came before
            batch = next(iter(self.loader))
            lam = self.control.calibrate(lambda: self.task_loss(batch))
            self.control.start_from(self.world.sum([lam])[0] / self.world.size)  # every rank starts alike

    def anneal(self, step: int) -> None:
        """Before step ``step`` of a gate phase: tell every gate how far through the phase it is (a
        schedule of its relaxation, MARS's temperature, follows the step alone, so a resumed run
        anneals alike). Nothing once the gates are frozen."""
        if self.frozen:
            return
        progress = min(1.0, step / max(self.control.gate_steps, 1))
        for gate in self.annealed:
            gate.anneal(progress)

    def penalty(self) -> torch.Tensor:
        """The differentiable size penalty of the gates' present means (``spec.gates.penalty``)."""
        return self.control.penalty()

    def sampled(self) -> tuple[float, torch.Tensor]:
        """(size penalty, log-probability) of the gates' last samples: a REINFORCE sample's cost."""
        return (self.meter.sampled_penalty(self.spec.gates.penalty),
                sum(g.log_prob() for g in self.meter.gates()))

    def bound(self) -> None:
        """Keep the gate means where the penalty still pulls on them (after each gate step)."""
        self.control.bound_gates()

    def update(self, step: int) -> str | None:
        """After step ``step``: ``"reached"`` or ``"forced"`` when the gates must stop now (λ steered)."""
        return self.control.update(step)

    def shorten(self, step: int, total: int) -> float | None:
        """The budget now ends at ``total`` (a time budget cut it at ``step``): the gate phase keeps
        its share of it (``gate_fraction``), never ending before ``step``. Returns the gate means'
        learning rate for the shorter phase (None: no gates)."""
        fraction = self.spec.schedule.gate_fraction
        self.control.gate_steps = max(step, min(self.control.gate_steps, Schedule.gate_steps_of(total, fraction)))
        return self.spec.gates.lr_for(self.control.gate_steps)

    def force(self) -> int:
        """Close slices until the target holds; the number closed."""
        return self.control.force()

    def give_back(self) -> int:
        """Reopen what the freezing step overshot; the number reopened."""
        return self.control.give_back()

    def prune(self) -> list[str]:
        """Freeze the gates and prune every layer; one whose factorization is not smaller than
        dense goes dense (its name is returned). The caller re-wraps the model for DDP."""
        self.frozen = True
        kept_dense = []
        for name, layer in tn_layers(self.model).items():
            layer.prune_()
            if layer.param_count() >= layer.dense_param_count() and name not in self.spec.gates.keep_factorized:
                replace_module(self.model, name, layer.to_dense())
                kept_dense.append(name)
        self.meter.refresh()
        return kept_dense

    def refit_or_keep(self) -> RefitChoice:
        """With ``spec.gates.refit``: the pruned layers' cores start again from the pretrained weights.

        Left to the tool on a small network (``refit`` None), both starts are measured on the
        same :data:`PROBE_BATCHES` batches and the weight phase starts from the one with the
        lower task loss: at mild ratios the clean truncation is the better start, at high
        ratios (LeNet-5 at 100x) the truncation is far from useful and the weights the gate
        phase adapted step by step are better.
        """
        if self.refit is None:
            return RefitChoice()
        if self.spec.gates.refit:
            return RefitChoice(True, None, f"{self.refit(self.model)} layers refitted to the pretrained weights "
                                           "at the learned ranks")
        with random_state_kept():  # the probe leaves the run's data order and noise as they were
            probe = list(itertools.islice(iter(self.loader), PROBE_BATCHES))
            adapted = self.mean_task_loss(probe)
        adapted_state = copy.deepcopy(self.model.state_dict())
        layers = self.refit(self.model)
        with random_state_kept():
            refitted = self.mean_task_loss(probe)
        losses = {"adapted": adapted, "refitted": refitted}
        if not refitted <= adapted:
            self.model.load_state_dict(adapted_state)
            return RefitChoice(False, losses, f"kept the gate phase's weights: task loss {adapted:.4g} on "
                                              f"{PROBE_BATCHES} batches, {refitted:.4g} with the {layers} layers "
                                              "refitted to the pretrained weights")
        return RefitChoice(True, losses, f"{layers} layers refitted to the pretrained weights at the learned ranks: "
                                         f"task loss {refitted:.4g} on {PROBE_BATCHES} batches, {adapted:.4g} with "
                                         "the gate phase's weights")

    def mean_task_loss(self, batches: list[Any]) -> float:
        """Mean task loss of the model in evaluation mode on ``batches``, over every rank."""
        with evaluation_mode(self.model), torch.no_grad(), self.spec.autocast(self.model):
            total = sum(float(self.task_loss(batch)) for batch in batches)
        total, count = self.world.sum([total, float(len(batches))])
        return total / max(count, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "controller": self.control.state_dict(), "gate_steps": self.control.gate_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved run's decisions (after its model, pruned or not, is loaded) and its gate
        phase's end (a time budget may have brought it forward)."""
        self.meter.refresh()
        self.frozen = state["frozen"]
        self.control.load_state_dict(state["controller"])
        self.control.gate_steps = state["gate_steps"]
