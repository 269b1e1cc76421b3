"""What a fine-tune may spend and when it stops: the default budget, the time plan, early stop.

* **The default budget** (:func:`default_budget`), stated in what it costs: examples seen,
  i.e. samples, or real (non-padding) tokens when the batches are tokens. A small model gets
  :data:`BUDGET_EXAMPLES` (3,000 steps of 128: LeNet-5's budget on Fashion-MNIST when
  budgets were counted in steps), a large one what :data:`BUDGET_COMPUTE` parameter-examples
  allow (a step costs in proportion to both). The steps that makes are at least
  :data:`MIN_STEPS`, rounded up to whole epochs when they cover one, and at most
  :data:`MAX_EPOCHS` passes over the data.
* **The time budget** (:class:`Pace`): the run times its first :data:`TIMING_STEPS` steps,
  then plans how many steps fit before ``time_budget`` (counted from the start of the run,
  :data:`RESERVE` of it kept for what follows the last step), and cuts the plan again as it
  goes if the steps turn out slower. The gate phase keeps its share of what fits.
* **Early stop** (:class:`EarlyStop`): after the gates froze, the held-out loss (the task
  loss: distillation or cross-entropy, as training has it) is measured :data:`EARLY_STOP_CHECKS`
  times over the weight phase on :data:`EARLY_STOP_BATCHES` fixed batches (of the evaluation
  data when there is some, else training batches drawn at the start); ``patience`` checks in a
  row that do not improve on the best by ``min_delta`` (relative) end the run.

Nothing here moves the run's random stream: the probe batches are drawn and measured with
every generator restored afterwards, and clocks are read, never slept on.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .batches import Ran, token_count
from .distributed import World
from .resume import random_state_kept, set_loader_epoch

#: A default budget for a small model: examples seen (samples, or real tokens for token batches).
BUDGET_EXAMPLES = 384_000
#: ... for a large one: examples x the dense model's parameters (tensor elements of its state).
#: A 22.4M-parameter sentence encoder gets 134k tokens (11 epochs of its 700 sentences in encoder_budget.py).
BUDGET_COMPUTE = 3e12
#: At least this many steps (the gates need room to move), at most this many passes over the data.
MIN_STEPS, MAX_EPOCHS = 100, 100
#: Steps timed before the run estimates (and, with a time budget, plans) its length; the plan is
#: checked again every as many steps after that.
TIMING_STEPS = 5
#: Share of the time budget kept for what follows the last step (pruning, the final evaluation).
RESERVE = 0.05
#: Checks of the held-out loss over a weight phase, and the batches each one measures.
EARLY_STOP_CHECKS, EARLY_STOP_BATCHES = 10, 4


@dataclass(frozen=True)
class Budget:
    """A default budget: what it costs (``examples`` of ``unit``) and the steps that makes."""

    unit: str  # "samples", or "tokens" for token batches
    per_batch: float  # examples a batch holds (the first batch's, averaged over the ranks)
    examples: float  # what the rule asks for, before rounding to steps
    epochs: int
    steps: int
    bound: str  # what set it: "examples", "compute", "min_steps" or "max_epochs"

    def describe(self, batches_per_epoch: int, dense_params: int) -> str:
        """One line: the steps, and the part of the rule that set them."""
        why = {"examples": f"the default {BUDGET_EXAMPLES:,} {self.unit}",
               "compute": f"{BUDGET_COMPUTE:.0e} parameter-{self.unit} for {dense_params / 1e6:.1f}M parameters "
                          f"({self.examples:,.0f} {self.unit})",
               "min_steps": f"at least {MIN_STEPS} steps",
               "max_epochs": f"at most {MAX_EPOCHS} epochs"}[self.bound]
        shape = (f"{self.epochs} epochs of {batches_per_epoch} batches" if self.steps >= batches_per_epoch
                 else f"part of one epoch of {batches_per_epoch} batches")
        return (f"fine-tuning budget: {self.steps:,} steps ({shape}, about {self.steps * self.per_batch:,.0f} "
                f"{self.unit}): {why}")


def default_budget(batches_per_epoch: int, per_batch: float, dense_params: int, unit: str = "samples") -> Budget:
    """The default budget of a run whose epoch is ``batches_per_epoch`` batches of ``per_batch``
    examples (samples, or tokens: ``unit``), for a model of ``dense_params`` tensor elements.

    ``min(BUDGET_EXAMPLES, BUDGET_COMPUTE / dense_params)`` examples, as steps: at least
    :data:`MIN_STEPS`; when that covers an epoch, rounded up to whole epochs, at most
    :data:`MAX_EPOCHS`. LeNet-5 on Fashion-MNIST at batch 128 (469 batches): 3,000 steps, so
    7 epochs, 3,283 steps.
    """
    examples = min(float(BUDGET_EXAMPLES), BUDGET_COMPUTE / max(dense_params, 1))
    bound = "examples" if examples == BUDGET_EXAMPLES else "compute"
    steps = math.ceil(examples / max(per_batch, 1e-9))
    if steps < MIN_STEPS:
        steps, bound = MIN_STEPS, "min_steps"
    epochs = 1
    if steps >= batches_per_epoch:
        epochs = math.ceil(steps / batches_per_epoch)
        if epochs > MAX_EPOCHS:
            epochs, bound = MAX_EPOCHS, "max_epochs"
        steps = epochs * batches_per_epoch
    return Budget(unit, per_batch, examples, epochs, steps, bound)


@dataclass(frozen=True)
class BatchSize:
    """Examples in one batch (the first, averaged over the ranks so that every rank plans alike)."""

    samples: float
    tokens: float = 0.0  # real tokens (0: the batches are not tokens)

    @classmethod
    def of(cls, ran: Ran) -> "BatchSize":
        """What one batch the model ran holds: its samples and its real tokens."""
        return cls(float(ran.out.shape[0]), float(token_count(ran)))

    @property
    def unit(self) -> str:
        return "tokens" if self.tokens > 0 else "samples"

    @property
    def per_batch(self) -> float:
        return self.tokens if self.tokens > 0 else self.samples

    def agreed(self, world: World) -> "BatchSize":
        samples, tokens = world.sum([self.samples, self.tokens])
        return BatchSize(samples / world.size, tokens / world.size)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``1 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


# ------------------------------------------------------------------ where the time goes
PHASES = ("gates", "weights")


def new_phases() -> dict[str, dict[str, float]]:
    """Per phase (the gate phase, the weight phase): steps, samples, tokens and seconds spent."""
    return {name: {"steps": 0, "samples": 0, "tokens": 0, "seconds": 0.0} for name in PHASES}


class Pace:
    """The clock of a fine-tune: its time per step, measured on the first steps, and, with a
    time budget, how many steps fit before the deadline.

    Under several processes every rank plans from the mean of their clocks, so they all stop
    at the same step.
    """

    def __init__(self, time_budget: float | None, started: float, world: World):
        self.budget, self.started, self.world = time_budget, started, world
        self.deadline = started + time_budget * (1 - RESERVE) if time_budget is not None else None
        self.loop_start, self.first_step = started, 0

    def begin(self, step: int) -> None:
        """The loop starts (or resumes) at ``step``: the steps are timed from now."""
        self.loop_start, self.first_step = time.perf_counter(), step

    def due(self, step: int) -> bool:
        """Whether the plan is looked at after ``step``: every :data:`TIMING_STEPS` steps."""
        return step > self.first_step and (step - self.first_step) % TIMING_STEPS == 0

    def seconds_per_step(self, step: int) -> float:
        """Mean time of the steps so far (epoch ends and checks included), agreed by the ranks."""
        elapsed = time.perf_counter() - self.loop_start
        return self.world.sum([elapsed])[0] / self.world.size / max(step - self.first_step, 1)

    def fitting(self, step: int, rate: float) -> int | None:
        """The last step that ends before the deadline at ``rate`` seconds a step (None: no budget)."""
        if self.deadline is None:
            return None
        left = self.world.sum([self.deadline - time.perf_counter()])[0] / self.world.size
        return step + max(0, math.floor(left / max(rate, 1e-9)))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def estimate(self, step: int, total: int, rate: float) -> str:
        """The line said once the first steps are timed."""
        line = (f"{rate:.3g} s a step over the first {step - self.first_step} steps: the {total:,} steps end in "
                f"about {format_seconds(rate * (total - step))}")
        return line if self.budget is None else line + f" ({format_seconds(self.elapsed())} of the " \
                                                       f"{format_seconds(self.budget)} time budget spent)"


@dataclass(frozen=True)
class StopRule:
    """Early stop of the weight phase: ``patience`` checks without a relative improvement of ``min_delta``."""

    patience: int
    min_delta: float


@dataclass
class EarlyStop:
    """The weight phase's checks of the held-out loss, and the decision to end it."""

    rule: StopRule
    start: int = 0  # the weight phase's first step
    every: int = 1  # steps between checks
    best: float = math.inf
    since: int = 0  # checks since the best one
    checks: list[list[float]] = field(default_factory=list)  # [step, loss] of every check
    stopped_at: int | None = None

    def arm(self, start: int, total: int) -> None:
        """The weight phase starts at ``start`` and ends at ``total`` at the latest."""
        self.start, self.every = start, max(1, math.ceil((total - start) / EARLY_STOP_CHECKS))

    def due(self, step: int, total: int) -> bool:
        return step > self.start and (step - self.start) % self.every == 0 and step < total

    def check(self, step: int, loss: float) -> bool:
        """Record the loss at ``step``; True when the run should stop here."""
        self.checks.append([step, loss])
        if loss < self.best * (1 - self.rule.min_delta) or not math.isfinite(self.best):
            self.best, self.since = min(loss, self.best), 0
            return False
        self.since += 1
        if self.since >= self.rule.patience:
            self.stopped_at = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "every": self.every, "best": self.best, "since": self.since,
                "checks": self.checks, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def summary(self) -> dict[str, Any]:
        """What the report says about early stop."""
        return {"patience": self.rule.patience, "min_delta": self.rule.min_delta, "every": self.every,
                "best": self.best if math.isfinite(self.best) else None, "checks": self.checks,
                "stopped_at": self.stopped_at}


def probe_batches(loader: Iterable, seed: int, count: int = EARLY_STOP_BATCHES) -> list[Any]:
    """The first ``count`` batches of ``loader``'s first epoch, drawn from a generator seeded with
    ``seed`` and with every generator restored afterwards: the same batches for a fresh run and
    a resumed one, and no draw taken from the run."""
    with random_state_kept():
        torch.manual_seed(seed)
        set_loader_epoch(loader, 0)
        return list(itertools.islice(iter(loader), count))


def measured(measure: Callable[[list[Any]], float], batches: list[Any]) -> float:
    """``measure(batches)`` (a mean loss in evaluation mode) without moving any generator."""
    with random_state_kept():
        return measure(batches)


#: How the report and the last event say why a run stopped.
STOPPED = {"budget": "the budget was spent", "epochs": "the epochs asked for were done",
           "max_steps": "max_steps was reached", "early_stop": "early stop: the held-out loss stopped improving",
           "time_budget": "the time budget was spent"}


class Limits:
    """Where a fine-tune ends: the last step and what set it (the schedule's ``limit``), moved
    earlier by the time budget (:class:`Pace`) or by early stop (:class:`EarlyStop`)."""

    def __init__(self, total: int, limit: str, time_budget: float | None, started: float, world: World,
                 rule: StopRule | None):
        self.planned, self.total, self.limit, self.planned_limit = total, total, limit, limit
        self.pace = Pace(time_budget, started, world)
        self.early = EarlyStop(rule) if rule is not None else None
        self.cut_said = False

    def weight_phase(self, start: int) -> None:
        """The weight phase starts at step ``start``: early stop's checks are spread over it."""
        if self.early is not None:
            self.early.arm(start, self.total)

    def after_step(self, step: int, measure: Callable[[], float] | None) -> list[str]:
        """After optimiser step ``step``: the time plan (every :data:`TIMING_STEPS` steps) and,
        once the weight phase runs (``measure()``: the held-out loss; None while the gates move),
        early stop. Returns the lines to say: the time estimate, a first cut to fit the time
        budget, an early stop."""
        said = []
        if self.pace.due(step):
            rate = self.pace.seconds_per_step(step)
            said += self._fit(step, rate)
            if step - self.pace.first_step == TIMING_STEPS:
                said.append(self.pace.estimate(step, self.total, rate))
        if measure is not None and self.early is not None and self.early.due(step, self.total):
            if self.early.check(step, measure()):
                self.total, self.limit = step, "early_stop"
                said.append(f"early stop at step {step} of {self.planned:,}: the held-out loss has not fallen "
                            f"{100 * self.early.rule.min_delta:g} % below its best ({self.early.best:.4g}) in "
                            f"{self.early.rule.patience} checks, {self.early.every} steps apart")
        return said

    def _fit(self, step: int, rate: float) -> list[str]:
        """Cut the last step to what fits in the time budget at ``rate`` seconds a step (or, when
        the steps turned out faster than a cut assumed, give steps back, never past the plan)."""
        fits = self.pace.fitting(step, rate)
        if fits is None:
            return []
        if fits >= self.total:
            if self.limit == "time_budget":
                self.total = min(self.planned, fits)
                self.limit = "time_budget" if self.total < self.planned else self.planned_limit
            return []
        self.total, self.limit = max(step, fits), "time_budget"
        if self.cut_said:
            return []
        self.cut_said = True
        return [f"time budget {format_seconds(self.pace.budget)}: {self.total:,} of the {self.planned:,} steps fit "
                f"at {rate:.3g} s a step"]

    def stopped(self, step: int) -> str:
        """The last event's line: why the run stopped, and how close it came to its time budget."""
        line = f"stopped at step {step:,}: {STOPPED[self.limit]}"
        if self.pace.budget is not None:
            line += (f"; {format_seconds(self.pace.elapsed())} of the {format_seconds(self.pace.budget)} "
                     "time budget spent")
        return line

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "limit": self.limit, "cut_said": self.cut_said,
                "early_stop": self.early.state_dict() if self.early is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.limit, self.cut_said = state["total"], state["limit"], state["cut_said"]
        if self.early is not None and state["early_stop"] is not None:
            self.early.load_state_dict(state["early_stop"])
