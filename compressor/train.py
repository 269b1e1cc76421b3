"""Fine-tuning with the ℓ0 penalty, in two phases inside one budget of steps.

1. **gate phase** (``gate_fraction`` of the budget): cores, other weights and gate means
   learn together; loss = task loss + λ · penalty. The :class:`~compressor.gate_phase.
   GatePhase` steers λ, and the moment the ratio reaches the target (or the phase ends and
   the controller forces it) the gates freeze and the layers are pruned.
2. **weight phase**: the pruned, ungated model is fine-tuned with a cosine-decaying
   learning rate; the size no longer changes, so the delivered ratio is exact.

A model without gates (the baselines, or a target met at the start) spends the whole
budget in the weight phase. Every option comes from the run's
:class:`~compressor.runspec.RunSpec`. The library never prints: progress goes to
``callback(TrainEvent)``.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .batches import BatchCheck, Ran, check_pass, forward, located, token_count
from .blocks import BlockRecorder, shared_blocks
from .budget import Limits, measured, new_phases, probe_batches
from .distributed import World
from .errors import TrainingError
from .gate_phase import GatePhase
from .gates import reinforce_surrogate
from .surgery import set_training
from .losses import task_loss
from .resume import (Position, ResumeError, RunInterrupted, StopRequest, check_same_run, random_state_kept,
                     restore_model, save_state, set_rng_state)
from .runspec import RunSpec

log = logging.getLogger(__name__)

#: Steps between snapshots of the last good state (restored if the loss turns NaN).
SNAPSHOT_EVERY = 100


@dataclass
class TrainEvent:
    """What a progress display needs; ``kind`` is start/step/epoch/freeze/force/end, or
    ``stage`` (a line to say, in ``message``: a set-up step before fine-tuning, or during it the
    time estimate after the first steps, a cut to fit the time budget, an early stop). The
    ``end`` event's ``message`` says why the run stopped."""

    kind: str
    step: int
    total_steps: int
    epoch: int
    loss: float = float("nan")
    task_loss: float = float("nan")
    penalty: float = float("nan")
    ratio: float = float("nan")
    accuracy: float | None = None
    eval_accuracy: float | None = None
    lam: float = float("nan")
    frozen: bool = False
    message: str = ""


@dataclass
class TrainHistory:
    frozen_at: int | None = None
    gate_lr: float | None = None  # the gate means' learning rate this run used (None: no gates)
    forced: bool = False
    ratio_before_force: float | None = None  # how far the gates alone got, when forced
    kept_dense: list[str] = field(default_factory=list)
    reopened: int = 0  # slices given back after the gates overshot the target
    steps: int = 0
    resumed_from: int | None = None  # the step a resumed run started from
    epochs: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0  # training examples this process saw (a resumed run counts its own)
    samples_per_rank: list[int] = field(default_factory=list)  # every process's, at the end
    tokens: int = 0  # real (non-padding) tokens of the batches the loss saw (0: the batches are not tokens)
    tokens_per_rank: list[int] = field(default_factory=list)
    # Whether the weight phase started from refitted cores (None: no refit was offered), and,
    # when the run measured both starts, their mean task loss on the probe batches.
    refitted: bool | None = None
    refit_losses: dict[str, float] | None = None
    planned_steps: int = 0  # the steps the schedule planned (a time budget or early stop may end sooner)
    stopped: str = ""  # why the run stopped: budget, epochs, max_steps, early_stop or time_budget
    # Per phase ("gates", "weights"): steps, samples, tokens and seconds (a resumed run's include the saved ones).
    phases: dict[str, dict[str, float]] = field(default_factory=new_phases)
    early_stop: dict[str, Any] | None = None  # its checks ([step, held-out loss]) and where it stopped (None: off)
    time_budget: float | None = None  # seconds the run was given (None: no limit)
    budget: dict[str, Any] | None = None  # the default budget the schedule came from (None: the user's epochs)

    def count(self, phase: str, samples: int, tokens: int) -> None:
        """One step of ``phase`` that saw ``samples`` and ``tokens``."""
        counts = self.phases[phase]
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens
        counts["steps"], counts["samples"], counts["tokens"] = (counts["steps"] + 1, counts["samples"] + samples,
                                                                counts["tokens"] + tokens)


def cosine_lr(base: float, t: int, span: int) -> float:
    """Learning rate ``t`` steps into a weight phase of ``span`` steps: cosine from base to 5 %."""
    frac = min(1.0, t / max(span, 1))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class Tally:
    """Running sums of the task loss and training accuracy over a window of steps."""

    loss: float = 0.0
    batches: int = 0
    correct: int = 0
    seen: int = 0

    def add(self, task: torch.Tensor, ran: Ran) -> None:
        self.loss += float(task.detach())
        self.batches += 1
        if ran.labels is not None and ran.out.dim() == 2:
            self.correct += int((ran.out.detach().argmax(-1) == ran.labels).sum())
            self.seen += ran.labels.numel()

    def reset(self) -> None:
        self.loss, self.batches, self.correct, self.seen = 0.0, 0, 0, 0

    def mean_loss(self) -> float | None:
        return self.loss / self.batches if self.batches else None

    def accuracy(self) -> float | None:
        return self.correct / self.seen if self.seen else None


class Optimizers:
    """Adam on the weights (cores, biases, untouched layers) and, while the gates move, on the
    gate means."""

    def __init__(self, model: nn.Module, gates: list[nn.Module], moving: bool, spec: RunSpec):
        gate_params = [p for g in gates for p in g.parameters()]
        gate_ids = {id(p) for p in gate_params}
        weights = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
        self.weights = torch.optim.Adam(weights, lr=spec.lr, weight_decay=spec.weight_decay)
        self.gates = torch.optim.Adam(gate_params, lr=spec.gates.lr) if gate_params and moving else None

    def zero_grad(self) -> None:
        for opt in (self.weights, self.gates):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in (self.weights, self.gates):
            if opt is not None:
                opt.step()

    def gate_rate(self, lr: float | None) -> float | None:
        """Set the gate means' learning rate (a gate phase the time budget shortened); returns it."""
        if lr is not None and self.gates is not None:
            for group in self.gates.param_groups:
                group["lr"] = lr
        return lr

    def decay(self, lr: float) -> None:
        """Set the weights' learning rate (the weight phase's cosine schedule)."""
        for group in self.weights.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"opt_w": self.weights.state_dict(),
                "opt_g": self.gates.state_dict() if self.gates is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["opt_w"])
        if self.gates is not None and state["opt_g"] is not None:
            self.gates.load_state_dict(state["opt_g"])


class Passes:
    """One batch through the model being trained and, when a loss needs it, the original model,
    with their blocks' outputs recorded when hidden-state distillation matches them."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, spec: RunSpec, check: BatchCheck | None = None):
        self.model, self.teacher, self.spec = model, teacher, spec
        self.check = check or BatchCheck()  # every batch held to the first one's conventions
        # (student, original) recorders of the blocks' outputs
        self.recorders: tuple[BlockRecorder, BlockRecorder] | None = None
        if spec.distillation.hidden > 0 and teacher is not None:
            names = shared_blocks(model, teacher)
            self.recorders = (BlockRecorder(model, names), BlockRecorder(teacher, names))

    def _recorded(self, model: nn.Module, batch: Any, which: int) -> Ran:
        if self.recorders is None:
            return forward(model, batch, self.spec.forward_fn)
        recorder = self.recorders[which]
        recorder.on = True
        try:
            ran = forward(model, batch, self.spec.forward_fn)
        finally:
            recorder.on = False
        ran.hidden = recorder.take()
        return ran

    def student(self, runner: nn.Module, batch: Any) -> Ran:
        """The trained model on ``batch``, called through ``runner`` (itself, or DDP around it),
        its labels checked (:class:`~compressor.batches.BatchCheck`)."""
        return self.check(self._recorded(runner, batch, 0))

    def original(self, batch: Any, student: Ran) -> Ran | None:
        """The original model's output on ``batch``, when a loss will use it."""
        if self.teacher is None or not self.spec.distillation.needs_teacher(student.labels is not None):
            return None
        with torch.no_grad():
            return self._recorded(self.teacher, batch, 1)

    def task_loss(self, batch: Any) -> torch.Tensor:
        """The task loss of the model itself on ``batch`` (no DDP: nothing to synchronise)."""
        ran = self.student(self.model, batch)
        return task_loss(ran, self.original(batch, ran), self.spec.distillation)

    def reinforce(self, runner: nn.Module, batch: Any, gates: GatePhase
                  ) -> tuple[Ran, torch.Tensor, torch.Tensor, torch.Tensor]:
        """M Bernoulli samples of the gates, score-function gradient (supplementary §2.1):
        (last output, mean task loss, mean sampled penalty, loss), the gradients already taken."""
        lam = gates.lam
        outs, tasks, sizes, logps = [], [], [], []
        teacher = None
        for i in range(self.spec.gates.samples):
            outs.append(self.student(runner, batch))
            teacher = self.original(batch, outs[-1]) if i == 0 else teacher
            tasks.append(task_loss(outs[-1], teacher, self.spec.distillation))
            size, logp = gates.sampled()
            sizes.append(size)
            logps.append(logp)
        reinforce_surrogate(tasks, sizes, logps, lam).backward()
        task = sum(j.detach() for j in tasks) / len(tasks)
        pen = torch.tensor(sum(sizes) / len(sizes))
        return outs[-1], task, pen, (task + lam * pen).detach()

    def close(self) -> None:
        """Remove the hooks: the models go back to the caller as they came."""
        for recorder in self.recorders or ():
            recorder.close()


# ------------------------------------------------------------------ the run
def _check_finite(loss: torch.Tensor, model: nn.Module, good: tuple[dict[str, torch.Tensor], int], step: int,
                  lr: float) -> None:
    """A non-finite loss stops the run with ``model`` back at its last good state (``good``: the
    state and its step, when the shapes still fit: a prune since then changed them)."""
    if torch.isfinite(loss):
        return
    sd, (good_state, good_step) = model.state_dict(), good
    if sd.keys() == good_state.keys() and all(sd[k].shape == good_state[k].shape for k in sd):
        model.load_state_dict(good_state)
    err = TrainingError(f"the loss became {float(loss.detach())} at step {step}; stopped and kept the last good "
                        f"state (step {good_step}); try a lower learning rate (lr={lr})")
    err.model = model  # type: ignore[attr-defined]
    raise err


class FineTune:
    """One fine-tuning run: the loop over epochs and steps, its optimisers, events and history.

    What the run does is its :class:`RunSpec`'s; the size decisions are its
    :class:`GatePhase`'s; where it stands is a :class:`~compressor.resume.Position`.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, loader: Iterable, spec: RunSpec, *,
                 callback: Callable[[TrainEvent], None] | None = None,
                 evaluate: Callable[[nn.Module], float] | None = None,
                 refit: Callable[[nn.Module], int] | None = None, resume_state: dict[str, Any] | None = None,
                 labelled: bool | None = None, held_out: Iterable | None = None, started: float | None = None):
        self.model, self.teacher, self.loader, self.spec = model, teacher, loader, spec
        self.world = World.current()
        self.limits = Limits(spec.schedule.total_steps, spec.schedule.limit, spec.time_budget,
                             started if started is not None else time.perf_counter(), self.world, spec.early_stop)
        self.held_out, self.probe = held_out, []  # early stop's loader and its batches
        self.clock = time.perf_counter()  # since when the current phase's seconds count
        self.runner = self.world.wrap(model)  # what a training step calls: DDP with several processes
        self.emit = _side_effect_free(callback) if callback is not None and self.world.main else (lambda e: None)
        self.evaluate, self.resume_state = evaluate, resume_state
        self.history = TrainHistory(gate_lr=spec.gates.lr)
        self.passes = Passes(model, teacher, spec, BatchCheck(labelled))
        self.gates = GatePhase(model, spec, loader, self.passes.task_loss, refit)
        self.position = Position()
        self.tallies = (Tally(), Tally())  # (progress window, current epoch)
        self.weight_phase_start: int | None = None  # the weight phase's learning rate decays from here

    @property
    def total(self) -> int:
        """The last step as planned now (a time budget or early stop may bring it forward)."""
        return self.limits.total

    # ----------------------------------------------------------------- the step
    def _step(self, batch: Any) -> None:
        """One optimiser step: zeroed gradients; the batch forward (and the original model's, when a
        loss needs it); the loss (task + λ · penalty while the gates move); backward; the optimiser
        steps (gate means kept in bounds); the weight phase's learning rate; the tallies; the
        controller's decision (which may freeze the gates); the progress event; a snapshot."""
        gates, frozen, opt = self.gates, self.gates.frozen, self.optimizers
        gates.anneal(self.position.step)  # the relaxation's schedule while the gates move (MARS's temperature)
        opt.zero_grad()
        with self.spec.autocast(self.model):
            if gates.score_function and not frozen:
                out, task, pen, loss = self.passes.reinforce(self.runner, batch, gates)  # backward taken
            else:
                out = self.passes.student(self.runner, batch)
                task = task_loss(out, self.passes.original(batch, out), self.spec.distillation)
                pen = torch.zeros(()) if frozen else gates.penalty()
                loss = task if frozen else task + gates.lam * pen
        _check_finite(loss, self.model, (self.good_state, self.good_step), self.position.step, self.spec.lr)
        if loss.requires_grad:
            loss.backward()
        opt.step()
        if opt.gates is not None:
            gates.bound()
        self.position.step += 1
        step, start = self.position.step, self.weight_phase_start
        if start is not None:
            opt.decay(cosine_lr(self.spec.lr, step - start, self.total - start))
        for tally in self.tallies:
            tally.add(task, out)
        self.history.count("weights" if frozen else "gates", int(out.out.shape[0]), token_count(out))
        if not frozen and (decision := gates.update(step)) is not None:
            self._freeze(decision)
        if step % self.spec.log_every == 0 or step == self.total:
            window = self.tallies[0]
            self._event("step", loss=float(loss.detach()), task_loss=window.mean_loss() or 0.0,
                        penalty=float(pen.detach()), accuracy=window.accuracy())
            window.reset()
        if step % SNAPSHOT_EVERY == 0:
            self._snapshot()

    def _tick(self) -> None:
        """Add the seconds since the last tick to the phase under way."""
        now = time.perf_counter()
        self.history.phases["gates" if self.weight_phase_start is None else "weights"]["seconds"] += now - self.clock
        self.clock = now

    def _after_step(self) -> None:
        """The time plan and early stop (``Limits``); a gate phase the time budget shortens ends sooner."""
        total, weights = self.total, self.weight_phase_start is not None
        measure = (lambda: measured(self.gates.mean_task_loss, self.probe)) if weights else None
        for line in self.limits.after_step(self.position.step, measure):
            self._event("stage", message=line)
        if self.total < total and not self.gates.frozen:  # the gate phase keeps its share; its means move faster
            self.history.gate_lr = self.optimizers.gate_rate(self.gates.shorten(self.position.step, self.total))

    def _snapshot(self) -> None:
        self.good_state, self.good_step = copy.deepcopy(self.model.state_dict()), self.position.step

    # ----------------------------------------------------------------- the phases
    def _freeze(self, decision: str) -> None:
        """Stop the gates (after forcing or giving back), prune, start the weight phase."""
        if decision == "forced":
            closed = self.gates.force()
            self._event("force", message=f"closed {closed} more slices to reach the target")
        else:
            self.history.reopened = self.gates.give_back()
        message = self._prune(refit=True)
        set_training(self.model, True)  # the weight phase trains whatever the probe or refit left
        self.history.frozen_at = self.position.step
        self._snapshot()
        self.optimizers = self._optimizers()
        self._tick()
        self.weight_phase_start = self.position.step
        self.limits.weight_phase(self.position.step)
        self._event("freeze", message=message)

    def _prune(self, refit: bool) -> str:
        """Prune (and, with ``refit``, refit or keep): what the freeze event says."""
        self.history.kept_dense += self.gates.prune()
        self.runner = self.world.wrap(self.model)  # DDP must see the pruned parameters
        if not refit:
            return ""
        choice = self.gates.refit_or_keep()
        self.history.refitted, self.history.refit_losses = choice.refitted, choice.losses
        return choice.message

    def _optimizers(self) -> Optimizers:
        return Optimizers(self.model, self.gates.meter.gates(), not self.gates.frozen, self.spec)

    def _event(self, kind: str, **fields: Any) -> None:
        fields.setdefault("ratio", self.gates.meter.ratio())
        self.emit(TrainEvent(kind, self.position.step, self.total, self.position.epoch, lam=self.gates.lam,
                             frozen=self.gates.frozen, **fields))

    # ----------------------------------------------------------------- the loop
    def run(self) -> tuple[nn.Module, TrainHistory]:
        """Train until the budget is spent; return the pruned (ungated) model and the history.

        With a ``spec.state_file``, Ctrl-C or SIGTERM stops at the next step boundary, saves
        the state there and raises :class:`~compressor.resume.RunInterrupted`.
        """
        try:
            if self.teacher is not None:
                set_training(self.teacher, False)
            self._start()
            self._event("start", ratio=self.gates.control.start_ratio if self.position.step == 0 else
                        self.gates.meter.ratio())
            self._snapshot()
            self.limits.pace.begin(self.position.step)
            with StopRequest(enabled=self.spec.state_file is not None) as stop:
                while self.position.step < self.total:
                    self._run_epoch(stop)
            self._keep_final()
        finally:
            self.passes.close()
        if not self.gates.frozen:  # budget ended inside the gate phase (e.g. epochs=0 or tiny max_steps)
            if not self.gates.control.reached:
                self.gates.force()
            self.history.frozen_at = self.position.step
            self._prune(refit=True)
        else:
            self._prune(refit=False)
        self._tick()
        _record_end(self.history, self.position.step, self.gates.control, self.limits, self.spec, self.world)
        set_training(self.model, False)
        self.emit(TrainEvent("end", self.position.step, self.total, self.position.epoch,
                             ratio=self.gates.meter.ratio(), frozen=True,
                             message=self.limits.stopped(self.position.step)))
        return self.model, self.history

    def _start(self) -> None:
        """A fresh run takes its λ (and prunes at once if the target already holds); a resumed
        one takes everything from its state."""
        if self.limits.early is not None:  # drawn now, the same batches for a resumed run
            self.probe = probe_batches(self.held_out if self.held_out is not None else self.loader, self.spec.seed)
        if self.resume_state is not None:
            self._restore(self.resume_state)
            return
        set_training(self.model, True)  # whatever mode it came in (and whether it was evaluated at step 0)
        self.gates.start()
        if self.gates.frozen:
            self._prune(refit=False)
            self.weight_phase_start = 0
            self.limits.weight_phase(0)
        self.optimizers = self._optimizers()

    def _run_epoch(self, stop: StopRequest) -> None:
        batches, new = self.position.epoch_batches(self.loader)
        if new:
            self.tallies = (self.tallies[0], Tally())
        set_training(self.model, True)
        for batch in batches:
            if self.position.step >= self.total:
                break
            if self.world.any(stop.requested):  # all ranks stop at the same step boundary
                raise RunInterrupted(self.position.step, self.total, self.save_state(), stop.signum or signal.SIGINT)
            with located(f"batch {self.position.batch_in_epoch + 1} of epoch {self.position.epoch}"):
                self._step(batch)
            self.position.batch_in_epoch += 1
            self._after_step()
            step, every = self.position.step, self.spec.checkpoint_every
            if every and self.spec.state_file is not None and step % every == 0 and step < self.total:
                self.save_state()
        else:  # the pass ended by itself, not at the end of the budget: was it a full one?
            check_pass(self.position.batch_in_epoch, self.spec.schedule.batches_per_epoch, self.position.epoch)
        tally = self.tallies[1]
        eval_acc = self.evaluate(self.model) if self.evaluate is not None else None
        self.history.epochs.append({
            "epoch": self.position.epoch, "step": self.position.step, "ratio": self.gates.meter.ratio(),
            "lambda": self.gates.lam, "frozen": self.gates.frozen, "train_loss": tally.mean_loss(),
            "train_accuracy": tally.accuracy(), "eval_accuracy": eval_acc})
        self._event("epoch", accuracy=tally.accuracy(), eval_accuracy=eval_acc)

    # ----------------------------------------------------------------- saved state
    def _keep_final(self) -> None:
        """When the run keeps its final state, save it at the end of the budget: whatever fails after the
        training (an output that cannot be written) costs none of it, since a resumed run goes
        straight to the end. A state that cannot be saved is said, and the run goes on."""
        if not self.spec.keep_final or self.history.resumed_from == self.total:
            return
        try:
            self.save_state()
        except OSError as exc:
            log.warning("could not save the finished run's state in %s (%s)", self.spec.state_file,
                        exc.strerror or exc)

    def save_state(self) -> Path:
        """Write everything a resumed run needs to continue from this step boundary (rank 0
        writes it; the ranks hold the same model, gates and optimiser state)."""
        if self.spec.state_file is None:
            raise ResumeError("no state file was given to save the run's state in")
        self._tick()
        if not self.world.main:
            return self.spec.state_file
        return save_state(self.spec.state_file, {
            "fingerprint": self.spec.fingerprint, **self.position.state_dict(), **self.gates.state_dict(),
            "limits": self.limits.state_dict(), "weight_phase_start": self.weight_phase_start,
            "model": self.model.state_dict(),
            **self.optimizers.state_dict(), "history": asdict(self.history),
            "tallies": [asdict(t) for t in self.tallies]})

    def _restore(self, state: dict[str, Any]) -> None:
        """Rebuild the saved run's model, gate phase, optimisers and position."""
        check_same_run(state, self.spec.fingerprint, self.spec.state_file or "the state")
        self.history = TrainHistory(**state["history"])
        restore_model(self.model, state["model"], self.history.kept_dense)
        self.gates.load_state_dict(state)
        self.runner = self.world.wrap(self.model)
        self.weight_phase_start = state["weight_phase_start"]
        self.limits.load_state_dict(state["limits"])
        self.optimizers = self._optimizers()
        self.optimizers.load_state_dict(state)
        self.position = Position.saved(state)
        self.tallies = tuple(Tally(**t) for t in state["tallies"])
        self.history.resumed_from = self.position.step
        if self.position.step >= self.total:  # saved at the end: no epoch will take the random state up
            set_rng_state(state["rng"])


def _record_end(history: TrainHistory, step: int, control: Any, limits: Limits, spec: RunSpec, world: World) -> None:
    """The history's totals at the end: steps, what every rank saw, what the controller forced,
    why the run stopped (``limits``) and the budget it had."""
    history.steps = step
    history.samples_per_rank = [int(n) for n in world.gather(history.samples)]
    history.tokens_per_rank = [int(n) for n in world.gather(history.tokens)]
    history.forced, history.ratio_before_force = control.forced, control.ratio_before_force
    history.planned_steps, history.stopped = limits.planned, limits.limit
    history.early_stop = limits.early.summary() if limits.early is not None else None
    history.time_budget = spec.time_budget
    history.budget = asdict(spec.schedule.budget) if spec.schedule.budget is not None else None


def _side_effect_free(callback: Callable[[TrainEvent], None]) -> Callable[[TrainEvent], None]:
    """``callback`` run without moving the run's random generators: what a progress display
    or a user's logging draws cannot change the training."""
    def emit(event: TrainEvent) -> None:
        with random_state_kept():
            callback(event)
    return emit


def finetune(model: nn.Module, teacher: nn.Module | None, loader: Iterable, spec: RunSpec, *,
             callback: Callable[[TrainEvent], None] | None = None,
             evaluate: Callable[[nn.Module], float] | None = None,
             refit: Callable[[nn.Module], int] | None = None,
             resume_state: dict[str, Any] | None = None, labelled: bool | None = None,
             held_out: Iterable | None = None, started: float | None = None) -> tuple[nn.Module, TrainHistory]:
    """Train the gated model until the target holds, then fine-tune the pruned model, as
    ``spec`` says (from :func:`~compressor.runspec.begin_run`).

    ``teacher`` is the original model (used for distillation); ``evaluate(model) ->
    accuracy`` is called after each epoch; ``refit(model) -> layers`` re-fits the pruned
    cores when the gates freeze (``spec.gates.refit``); ``resume_state`` (from
    :func:`compressor.resume.load_state`) continues a saved run; ``labelled`` says whether the
    run's batches carry labels (None: as the first batch trained on does); ``held_out`` is the
    loader whose first batches early stop measures (None: the training loader's); ``started`` is
    when the run began (``time.perf_counter()``; the time budget counts from it, default: now).
    Returns the pruned model and the history.
    """
    return FineTune(model, teacher, loader, spec, callback=callback, evaluate=evaluate, refit=refit,
                    resume_state=resume_state, labelled=labelled, held_out=held_out, started=started).run()
