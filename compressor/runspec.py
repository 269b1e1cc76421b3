"""What a fine-tune run needs, settled once before its first step: the :class:`RunSpec`.

The options a user gave, the defaults the tool chose for the plan's depth
(:class:`~compressor.config.Settled`) and the facts of the data and the gated model (batches
per epoch, how far a gate mean may travel) become one frozen value. The fine-tune reads
its learning rates, schedule, gate phase, distillation and cadences there and decides
nothing of the kind itself; the report and the resume fingerprint read the same value.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Collection, ContextManager, Iterable

import torch
from torch import nn

from .batches import ForwardFn, forward, loader_length
from .budget import BatchSize, Budget, StopRule, default_budget
from .config import CompressConfig, Settled
from .controller import model_gates
from .distributed import World
from .surgery import evaluation_mode, tn_layers
from .losses import Distillation
from .resume import fingerprint, random_state_kept

#: Adam learning rate of the gate means when the budget leaves them time (see :func:`gate_lr`).
DEFAULT_GATE_LR = 0.05
#: A gate mean must be able to travel from its ceiling to zero within this share of the gate phase,
#: at a rate of at most GATE_LR_CAP. Faster gates decide on fewer samples: a digits net at 4x in
#: 23 steps fell from 97 % to 27 % at 0.55 (every mean crossed zero at step 2), and a toy
#: sequence tagger healed less of its cut at 0.25 than at 0.15 (token KL 1.01 / 0.92 of the
#: untrained cut's).
GATE_TRAVEL_SHARE, GATE_LR_CAP = 0.25, 0.15


def gate_lr(configured: float | None, travel: float, gate_steps: int) -> float:
    """The gate means' learning rate: ``configured``, else :data:`DEFAULT_GATE_LR` raised
    (up to :data:`GATE_LR_CAP`) until a mean can ``travel`` from its ceiling to closed in
    :data:`GATE_TRAVEL_SHARE` of the gate phase.

    Adam moves each mean by about its learning rate per step whatever the size of its
    gradient, so no slice can close before ``travel / lr`` steps. On a short budget that
    floor eats the gate phase: SmolLM2 at 117 steps (a 58-step gate phase, means starting
    at 2) kept every slice open for 40 steps while λ rose to no effect.
    """
    if configured is not None:
        return configured
    return min(GATE_LR_CAP, max(DEFAULT_GATE_LR, travel / (GATE_TRAVEL_SHARE * max(gate_steps, 1))))


@dataclass(frozen=True)
class Schedule:
    """The budget in optimiser steps: all of it, and the share in which the gates may move."""

    batches_per_epoch: int
    epochs: int
    total_steps: int  # epochs x batches, cut to max_steps
    gate_steps: int  # the gate phase's end at the latest (0 for an empty budget)
    gate_fraction: float = 0.5  # the gate phase's share of the budget (kept when a time budget cuts it)
    budget: Budget | None = None  # the default budget (None: the user gave epochs)
    limit: str = "budget"  # what ends the run unless something stops it sooner: budget, epochs or max_steps
    searched: int = 0  # steps a rank search (pstrn) trained before the fine-tune, taken off its budget

    @classmethod
    def of(cls, batches_per_epoch: int, epochs: int | None, max_steps: int | None, gate_fraction: float,
           budget: Budget | None = None) -> "Schedule":
        """``epochs`` of ``batches_per_epoch`` (None: the default ``budget``), cut to ``max_steps``."""
        if epochs is None and budget is None:
            raise ValueError("a schedule without epochs needs the default budget")
        budget = budget if epochs is None else None
        epochs = epochs if epochs is not None else budget.epochs
        total = budget.steps if budget is not None else batches_per_epoch * epochs
        limit = "budget" if budget is not None else "epochs"
        if max_steps is not None and max_steps < total:
            total, limit = max_steps, "max_steps"
        return cls(batches_per_epoch, epochs, total, cls.gate_steps_of(total, gate_fraction), gate_fraction,
                   budget, limit)

    def after_search(self, searched: int) -> "Schedule":
        """This schedule with ``searched`` of its steps already spent by a rank search: the
        fine-tune trains the rest, so search and fine-tune together train ``total_steps``."""
        total = max(0, self.total_steps - searched)
        return replace(self, total_steps=total, gate_steps=self.gate_steps_of(total, self.gate_fraction),
                       searched=self.total_steps - total)

    @staticmethod
    def gate_steps_of(total: int, gate_fraction: float) -> int:
        """The gate phase's end at the latest in a budget of ``total`` steps."""
        return max(1, int(gate_fraction * total)) if total else 0


@dataclass(frozen=True)
class GatePhaseSpec:
    """How the gate phase runs and ends."""

    target: float  # the whole model's ratio the gates must reach
    penalty: str  # "params" or "count" (``SizeMeter.penalty``)
    lam: float | None  # the user's starting λ (None: calibrated on the first batch)
    lr: float | None  # the gate means' Adam rate, from their travel (:func:`gate_lr`); None: no gates
    samples: int  # gate samples per step of a score-function (REINFORCE) gate
    refit: bool | None  # at the freeze: refit (True), keep (False), or measure both on probe batches (None)
    keep_factorized: frozenset[str] = frozenset()  # layers with no dense home: never back to dense
    travel: float = 0.0  # how far a gate mean may travel from its ceiling to closed (its rate is planned on it)
    configured_lr: float | None = None  # the user's rate for the gate means (None: planned by :func:`gate_lr`)

    def lr_for(self, gate_steps: int) -> float | None:
        """The gate means' rate for a gate phase of ``gate_steps`` (a time budget may shorten it)."""
        return gate_lr(self.configured_lr, self.travel, gate_steps) if self.lr is not None else None


@dataclass(frozen=True)
class RunSpec:
    """Everything a fine-tune reads, settled once (:func:`begin_run`)."""

    schedule: Schedule
    lr: float  # the weights' Adam rate (cosine-decayed through the weight phase)
    weight_decay: float
    gates: GatePhaseSpec
    distillation: Distillation
    dense_params: int  # tensor elements of the dense model's state: what the ratio is counted on
    seed: int  # the random stream the run started from
    log_every: int  # steps between progress events
    checkpoint_every: int | None  # steps between saved states (None: only when stopped)
    state_file: Path | None  # where the resumable state goes (None: the run cannot be resumed)
    bf16: bool  # the forward under bfloat16 autocast
    forward_fn: ForwardFn | None
    time_budget: float | None  # seconds the whole run may take (None: no limit)
    early_stop: StopRule | None  # when the weight phase ends early (None: it runs to the end of the budget)
    chosen: Settled  # what the tool chose for the options left to it, and why
    fingerprint: dict[str, Any]  # what makes a resumed run the same run (``resume.fingerprint``)
    keep_final: bool = False  # save the state once more when the budget is spent (``compress(keep_state=)``)

    def autocast(self, model: nn.Module) -> ContextManager:
        """bfloat16 autocast for the forward (:attr:`bf16`), on ``model``'s device type."""
        if not self.bf16:
            return contextlib.nullcontext()
        device = next(model.parameters()).device
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def begin_run(settled: Settled, loader: Iterable, model: nn.Module, dense_params: int,
              keep_factorized: Collection[str] = (), state_file: str | Path | None = None,
              keep_final: bool = False, batch: BatchSize | None = None, searched: int = 0) -> RunSpec:
    """Start a fine-tune of the gated ``model`` on ``loader``: seed the run's random stream
    (``settled.config.seed``), then settle its :class:`RunSpec`. ``batch`` is what one batch
    holds (the default budget is sized on it; None: the first batch is measured here);
    ``searched``: steps a rank search already trained, which the fine-tune's budget gives up.

    The seed comes first because counting a loader's batches may draw from the stream (a
    ``DataLoader`` without a length takes a base seed per pass): a run's draws, the first
    batch λ is calibrated on included, follow from its seed alone.
    """
    config = settled.config
    torch.manual_seed(config.seed)
    schedule = planned_schedule(config, loader, model, dense_params, batch)
    schedule = schedule.after_search(searched) if searched else schedule
    budget = schedule.budget
    gates = model_gates(model)
    travel = max((g.travel() for g in gates), default=0.0)
    gate_phase = GatePhaseSpec(config.target, config.penalty, config.lam,
                               gate_lr(config.gate_lr, travel, schedule.gate_steps) if gates else None,
                               config.reinforce_samples, config.refit, frozenset(keep_factorized), travel,
                               config.gate_lr)
    distillation = Distillation(config.distill, config.distill_hidden, config.distill_loss, config.temperature)
    identity = fingerprint(config, total_steps=schedule.total_steps, batches_per_epoch=schedule.batches_per_epoch,
                           budget=asdict(budget) if budget is not None else None,
                           dense=dense_params, layers={n: l.ranks for n, l in tn_layers(model).items()})
    stop = StopRule(config.early_stop_patience, config.early_stop_min_delta) if config.early_stop else None
    return RunSpec(schedule=schedule, lr=config.lr, weight_decay=config.weight_decay, gates=gate_phase,
                   distillation=distillation, dense_params=dense_params, seed=config.seed, log_every=config.log_every,
                   checkpoint_every=config.checkpoint_every,
                   state_file=Path(state_file) if state_file is not None else None, bf16=config.bf16,
                   forward_fn=config.forward_fn, time_budget=config.time_budget, early_stop=stop, chosen=settled,
                   fingerprint=identity, keep_final=keep_final and state_file is not None)


def planned_schedule(config: CompressConfig, loader: Iterable, model: nn.Module, dense_params: int,
                     batch: BatchSize | None = None) -> Schedule:
    """The run's whole budget in steps (``epochs``, else the default budget; cut to ``max_steps``):
    what the fine-tune trains, or a rank search and the fine-tune together."""
    batches = loader_length(loader)
    budget = None
    if config.epochs is None:
        size = (batch or first_batch_size(loader, config.forward_fn, model)).agreed(World.current())
        budget = default_budget(batches, size.per_batch, dense_params, size.unit)
    return Schedule.of(batches, config.epochs, config.max_steps, config.gate_fraction, budget)


def first_batch_size(loader: Iterable, forward_fn: ForwardFn | None, model: nn.Module) -> BatchSize:
    """What the first batch of ``loader`` holds: samples, and real tokens when they are tokens
    (one forward of ``model`` in evaluation mode, with every generator kept)."""
    with random_state_kept(), evaluation_mode(model), torch.no_grad():
        ran = forward(model, next(iter(loader)), forward_fn)
    return BatchSize.of(ran)
