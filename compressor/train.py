"""Fine-tuning with the ℓ0 penalty, in two phases inside one budget of steps.

1. **gate phase** (``gate_fraction`` of the budget): cores, other weights and gate means
   learn together; loss = task loss + λ · penalty. The :class:`~compressor.controller.
   TargetController` steers λ, and the moment the ratio reaches the target (or the phase
   ends and the controller forces it) the gates freeze and the layers are pruned.
2. **weight phase**: the pruned, ungated model is fine-tuned with a cosine-decaying
   learning rate; the size no longer changes, so the delivered ratio is exact.

A model without gates (the baselines, or a target met at the start) spends the whole
budget in the weight phase. The library never prints: progress goes to
``callback(TrainEvent)``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import torch
from torch import nn

from .batches import Ran, forward, loader_length
from .blocks import BlockRecorder, shared_blocks
from .config import DEFAULT_LR, CompressConfig
from .controller import SizeMeter, TargetController
from .distributed import World
from .errors import DataError, TrainingError
from .gates import reinforce_surrogate
from .surgery import replace_module, set_training, tn_layers
from .losses import task_loss
from .resume import (ResumeError, RunInterrupted, StopRequest, check_same_run, fingerprint, restore_structure,
                     random_state_kept, rng_state, save_state, set_rng_state)

log = logging.getLogger(__name__)

#: Optimiser steps a default budget aims at (at least 2, at most 100 epochs).
DEFAULT_STEPS = 3000
#: Adam learning rate of the gate means when the budget leaves them time (see :func:`gate_lr`).
DEFAULT_GATE_LR = 0.05
#: A gate mean must be able to travel from its ceiling to zero within this share of the gate phase,
#: at a rate of at most GATE_LR_CAP. Faster gates decide on fewer samples: a digits net at 4x in
#: 23 steps fell from 97 % to 27 % at 0.55 (every mean crossed zero at step 2), and a toy
#: sequence tagger healed less of its cut at 0.25 than at 0.15 (token KL 1.01 / 0.92 of the
#: untrained cut's).
GATE_TRAVEL_SHARE, GATE_LR_CAP = 0.25, 0.15
#: Steps between snapshots of the last good state (restored if the loss turns NaN).
SNAPSHOT_EVERY = 100
#: Batches on which a run left to choose compares refitted cores with the gate phase's weights.
PROBE_BATCHES = 4


@dataclass
class TrainEvent:
    """What a progress display needs; ``kind`` is start/step/epoch/freeze/force/end, or
    ``stage`` (a set-up step before fine-tuning, described in ``message``)."""

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
    # Whether the weight phase started from refitted cores (None: no refit was offered), and,
    # when the run measured both starts, their mean task loss on the probe batches.
    refitted: bool | None = None
    refit_losses: dict[str, float] | None = None


# ------------------------------------------------------------------ schedules (pure functions)
def default_epochs(steps_per_epoch: int) -> int:
    """About :data:`DEFAULT_STEPS` optimiser steps, at least 2 and at most 100 epochs."""
    return int(min(100, max(2, math.ceil(DEFAULT_STEPS / steps_per_epoch))))


def cosine_lr(base: float, t: int, span: int) -> float:
    """Learning rate ``t`` steps into a weight phase of ``span`` steps: cosine from base to 5 %."""
    frac = min(1.0, t / max(span, 1))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


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


@dataclass
class _Tally:
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


# ------------------------------------------------------------------ the run
class FineTune:
    """One fine-tuning run: its model, optimisers, controller and history."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, loader: Iterable, config: CompressConfig,
                 dense_params: int, callback: Callable[[TrainEvent], None] | None = None,
                 evaluate: Callable[[nn.Module], float] | None = None, keep_factorized: Collection[str] = (),
                 state_file: str | Path | None = None, resume_state: dict[str, Any] | None = None,
                 refit: Callable[[nn.Module], int] | None = None):
        torch.manual_seed(config.seed)
        self.refit = refit  # refit(pruned model) -> layers whose cores start again (config.refit)
        self.state_file = Path(state_file) if state_file is not None else None
        self.resume_state = resume_state
        self.model, self.teacher, self.loader, self.config = model, teacher, loader, config
        self.world = World.current()
        self.runner = self.world.wrap(model)  # what a training step calls: DDP with several processes
        self.emit = (callback if self.world.main else None) or (lambda e: None)
        self.evaluate = evaluate
        self.keep_factorized = set(keep_factorized)  # layers that must not go back to dense
        self.history = TrainHistory()
        per_epoch = loader_length(loader)
        epochs = config.epochs if config.epochs is not None else default_epochs(per_epoch)
        self.total = per_epoch * epochs
        if config.max_steps is not None:
            self.total = min(self.total, config.max_steps)
        gate_steps = max(1, int(config.gate_fraction * self.total)) if self.total else 0
        self.lr = config.lr if config.lr is not None else DEFAULT_LR
        self.meter = SizeMeter(model, dense_params)
        self.control = TargetController(self.meter, config.target, gate_steps, config.penalty)
        # An ungated model's ranks are final: no gate phase, and nothing to close should its
        # selector's size estimate fall short (said once, never reported as a forced closing).
        gates = self.meter.gates()
        gated = bool(gates)
        self.frozen = self.control.reached or not gated
        if not gated and not self.control.reached:
            log.warning("the fixed ranks give %.4fx, short of the %gx target: the rank selector's size "
                        "estimate missed something", self.meter.ratio(), config.target)
        self.score_function = any(g.score_function for g in gates)
        travel = max((g.travel() for g in gates), default=0.0)
        self.history.gate_lr = gate_lr(config.gate_lr, travel, gate_steps) if gated else None
        self.step = self.epoch = 0
        self.weight_phase_start: int | None = None  # the weight phase's learning rate decays from here
        self.fingerprint = fingerprint(config, total_steps=self.total, batches_per_epoch=per_epoch,
                                       dense=dense_params, layers={n: l.ranks for n, l in self.meter.layers().items()})
        self.batch_in_epoch = 0  # batches of the current epoch already trained on
        self.epoch_rng: dict[str, Any] | None = None  # random state as the current epoch began
        self.tallies = (_Tally(), _Tally())  # (progress window, current epoch)
        self._resume_at: dict[str, Any] | None = None  # where a resumed run re-enters its epoch
        # (student, original) recorders of the blocks' outputs, for hidden-state distillation
        self.recorders: tuple[BlockRecorder, BlockRecorder] | None = None
        if config.distill_hidden > 0 and teacher is not None:
            names = shared_blocks(model, teacher)
            self.recorders = (BlockRecorder(model, names), BlockRecorder(teacher, names))

    # ----------------------------------------------------------------- pieces
    def _forward(self, batch: Any, model: nn.Module | None = None) -> Ran:
        return self._recorded(0, model if model is not None else self.runner, batch)

    def _teacher_out(self, batch: Any, labels: torch.Tensor | None) -> Ran | None:
        """The original model's output on ``batch``, when a loss will use it."""
        if self.teacher is None or (labels is not None and self.config.distill <= 0
                                    and self.config.distill_hidden <= 0):
            return None
        with torch.no_grad():
            return self._recorded(1, self.teacher, batch)

    def _recorded(self, which: int, model: nn.Module, batch: Any) -> Ran:
        """``forward``, with the blocks' outputs when hidden-state distillation needs them."""
        if self.recorders is None:
            return forward(model, batch, self.config.forward_fn)
        recorder = self.recorders[which]
        recorder.on = True
        try:
            ran = forward(model, batch, self.config.forward_fn)
        finally:
            recorder.on = False
        ran.hidden = recorder.take()
        return ran

    def _bare_task_loss(self, batch: Any) -> torch.Tensor:
        """The task loss of the model itself on ``batch`` (no DDP: nothing to synchronise)."""
        ran = self._forward(batch, self.model)
        return task_loss(ran, self._teacher_out(batch, ran.labels), self.config)

    def _calibrate(self) -> float:
        if self.config.lam is not None:
            self.control.lam = self.config.lam
            return self.control.lam
        if self.frozen:
            return self.control.lam
        batch = next(iter(self.loader))
        lam = self.control.calibrate(lambda: self._bare_task_loss(batch))
        self.control.lam = self.world.sum([lam])[0] / self.world.size  # every rank starts from the same λ
        return self.control.lam

    def _make_optimizers(self) -> None:
        gates = [p for g in self.meter.gates() for p in g.parameters()]
        gate_ids = {id(p) for p in gates}
        weights = [p for p in self.model.parameters() if id(p) not in gate_ids and p.requires_grad]
        self.opt_w = torch.optim.Adam(weights, lr=self.lr, weight_decay=self.config.weight_decay)
        self.opt_g = torch.optim.Adam(gates, lr=self.history.gate_lr) if gates and not self.frozen else None

    def _prune_all(self) -> None:
        """Prune every layer; one whose factorization is not smaller than dense goes dense."""
        for name, layer in tn_layers(self.model).items():
            layer.prune_()
            if layer.param_count() >= layer.dense_param_count() and name not in self.keep_factorized:
                replace_module(self.model, name, layer.to_dense())
                self.history.kept_dense.append(name)
        self.meter.refresh()
        self.runner = self.world.wrap(self.model)  # DDP must see the pruned parameters

    def _snapshot(self) -> None:
        self.good_state, self.good_step = copy.deepcopy(self.model.state_dict()), self.step

    def _objective(self, batch: Any):
        """(output, task loss, penalty, total loss) of one batch; REINFORCE backpropagates itself."""
        if self.score_function and not self.frozen:
            return self._reinforce(batch)
        out = self._forward(batch)
        task = task_loss(out, self._teacher_out(batch, out.labels), self.config)
        if self.frozen:
            return out, task, torch.zeros(()), task
        pen = self.control.penalty()
        return out, task, pen, task + self.control.lam * pen

    def _reinforce(self, batch: Any):
        """M Bernoulli samples of the gates, score-function gradient (supplementary §2.1)."""
        gates, lam = self.meter.gates(), self.control.lam
        outs, tasks, sizes, logps = [], [], [], []
        teacher = None
        for i in range(self.config.reinforce_samples):
            outs.append(self._forward(batch))
            teacher = self._teacher_out(batch, outs[-1].labels) if i == 0 else teacher
            tasks.append(task_loss(outs[-1], teacher, self.config))
            sizes.append(self.meter.sampled_penalty(self.config.penalty))
            logps.append(sum(g.log_prob() for g in gates))
        reinforce_surrogate(tasks, sizes, logps, lam).backward()
        task = sum(j.detach() for j in tasks) / len(tasks)
        pen = torch.tensor(sum(sizes) / len(sizes))
        return outs[-1], task, pen, (task + lam * pen).detach()

    def _autocast(self):
        """bfloat16 autocast for the forward (``config.bf16``), on the model's device type."""
        if not self.config.bf16:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss):
            return
        sd = self.model.state_dict()
        if sd.keys() == self.good_state.keys() and all(sd[k].shape == self.good_state[k].shape for k in sd):
            self.model.load_state_dict(self.good_state)
        err = TrainingError(
            f"the loss became {float(loss.detach())} at step {self.step}; stopped and kept the last good state "
            f"(step {self.good_step}); try a lower learning rate (lr={self.lr})")
        err.model = self.model  # type: ignore[attr-defined]
        raise err

    def _freeze(self, decision: str) -> None:
        """Stop the gates (after forcing or giving back), prune, start the weight phase."""
        if decision == "forced":
            n_closed = self.control.force()
            self._event("force", message=f"closed {n_closed} more slices to reach the target")
        else:
            self.history.reopened = self.control.give_back()
        self.frozen = True
        self._prune_all()
        refitted = self._refit()
        self.history.frozen_at = self.step
        self._snapshot()
        self._make_optimizers()
        self.weight_phase_start = self.step
        self._event("freeze", message=refitted)

    def _refit(self) -> str:
        """With ``config.refit``: the pruned layers' cores start again from the pretrained weights.

        Left to the tool on a small network (``config.refit`` None), both starts are measured
        on the same :data:`PROBE_BATCHES` batches and the weight phase starts from the one with
        the lower task loss: at mild ratios the clean truncation is the better start, at high
        ratios (LeNet-5 at 100x) the truncation is far from useful and the weights the gate phase
        adapted step by step are better.
        """
        if self.refit is None:
            return ""
        if self.config.refit:
            self.history.refitted = True
            return f"{self.refit(self.model)} layers refitted to the pretrained weights at the learned ranks"
        with random_state_kept():  # the probe leaves the run's data order and noise as they were
            probe = list(itertools.islice(iter(self.loader), PROBE_BATCHES))
            adapted = self._mean_task_loss(probe)
        adapted_state = copy.deepcopy(self.model.state_dict())
        layers = self.refit(self.model)
        with random_state_kept():
            refitted = self._mean_task_loss(probe)
        self.history.refit_losses = {"adapted": adapted, "refitted": refitted}
        self.history.refitted = refitted <= adapted
        if not self.history.refitted:
            self.model.load_state_dict(adapted_state)
            return (f"kept the gate phase's weights: task loss {adapted:.4g} on {PROBE_BATCHES} batches, "
                    f"{refitted:.4g} with the {layers} layers refitted to the pretrained weights")
        return (f"{layers} layers refitted to the pretrained weights at the learned ranks: task loss "
                f"{refitted:.4g} on {PROBE_BATCHES} batches, {adapted:.4g} with the gate phase's weights")

    def _mean_task_loss(self, batches: list[Any]) -> float:
        """Mean task loss of the model in evaluation mode on ``batches``, over every rank."""
        was_training = self.model.training
        set_training(self.model, False)
        try:
            with torch.no_grad(), self._autocast():
                total = sum(float(self._bare_task_loss(batch)) for batch in batches)
        finally:
            set_training(self.model, was_training)
        total, count = self.world.sum([total, float(len(batches))])
        return total / max(count, 1.0)

    def _event(self, kind: str, **fields: Any) -> None:
        fields.setdefault("ratio", self.meter.ratio())
        self.emit(TrainEvent(kind, self.step, self.total, self.epoch, lam=self.control.lam, frozen=self.frozen,
                             **fields))

    # ----------------------------------------------------------------- the loop
    def _train_step(self, batch: Any, window: _Tally, epoch: _Tally) -> None:
        self.opt_w.zero_grad(set_to_none=True)
        if self.opt_g is not None:
            self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            out, task, pen, loss = self._objective(batch)
        self._check_finite(loss)
        if loss.requires_grad:
            loss.backward()
        self.opt_w.step()
        if self.opt_g is not None:
            self.opt_g.step()
            self.control.bound_gates()
        self.step += 1
        if self.weight_phase_start is not None:
            lr = cosine_lr(self.lr, self.step - self.weight_phase_start, self.total - self.weight_phase_start)
            for group in self.opt_w.param_groups:
                group["lr"] = lr
        window.add(task, out)
        epoch.add(task, out)
        self.history.samples += int(out.out.shape[0])
        if not self.frozen and (decision := self.control.update(self.step)) is not None:
            self._freeze(decision)
        if self.step % self.config.log_every == 0 or self.step == self.total:
            self._event("step", loss=float(loss.detach()), task_loss=window.mean_loss() or 0.0,
                        penalty=float(pen.detach()), accuracy=window.accuracy())
            window.reset()
        if self.step % SNAPSHOT_EVERY == 0:
            self._snapshot()

    def _end_epoch(self, tally: _Tally) -> None:
        eval_acc = self.evaluate(self.model) if self.evaluate is not None else None
        record = {"epoch": self.epoch, "step": self.step, "ratio": self.meter.ratio(), "lambda": self.control.lam,
                  "frozen": self.frozen, "train_loss": tally.mean_loss(), "train_accuracy": tally.accuracy(),
                  "eval_accuracy": eval_acc}
        self.history.epochs.append(record)
        self._event("epoch", accuracy=record["train_accuracy"], eval_accuracy=eval_acc)

    def _start(self) -> None:
        """A fresh run calibrates λ (and prunes at once if the target already holds); a
        resumed one takes everything from its state."""
        if self.resume_state is not None:
            self._restore(self.resume_state)
            return
        self._calibrate()
        if self.frozen:
            self._prune_all()
            self.weight_phase_start = 0
        self._make_optimizers()

    def run(self) -> tuple[nn.Module, TrainHistory]:
        """Train until the budget is spent; return the pruned (ungated) model and the history.

        With a ``state_file``, Ctrl-C or SIGTERM stops at the next step boundary, saves the
        state there and raises :class:`~compressor.resume.RunInterrupted`.
        """
        try:
            self._start()
            self.emit(TrainEvent("start", self.step, self.total, self.epoch,
                                 ratio=self.control.start_ratio if self.step == 0 else self.meter.ratio(),
                                 lam=self.control.lam, frozen=self.frozen))
            if self.teacher is not None:
                set_training(self.teacher, False)
            self._snapshot()
            with StopRequest(enabled=self.state_file is not None) as stop:
                while self.step < self.total:
                    self._run_epoch(stop)
        finally:
            for recorder in self.recorders or ():
                recorder.close()  # the models go back to the caller without hooks
        if not self.frozen:  # budget ended inside the gate phase (e.g. epochs=0 or tiny max_steps)
            if not self.control.reached:
                self.control.force()
            self.history.frozen_at = self.step
            self._prune_all()
            self._refit()
        else:
            self._prune_all()
        self.history.steps = self.step
        self.history.samples_per_rank = [int(n) for n in self.world.gather(self.history.samples)]
        self.history.forced = self.control.forced
        self.history.ratio_before_force = self.control.ratio_before_force
        set_training(self.model, False)
        self.emit(TrainEvent("end", self.step, self.total, self.epoch, ratio=self.meter.ratio(), frozen=True))
        return self.model, self.history

    def _epoch_batches(self) -> Iterable:
        """This epoch's batches, from where a resumed run left off.

        The loader is told the epoch (``set_epoch``, as for a DistributedSampler), so its
        order depends on the epoch alone. A resumed epoch replays the random state the
        epoch began with, draws the batches already trained on without using them, then
        takes the random state of the step it stopped at: the same batches in the same
        order as the uninterrupted run, whatever shuffles the loader does.
        """
        resume, self._resume_at = self._resume_at, None
        if resume is None:
            self.epoch += 1
            self.batch_in_epoch = 0
            self.tallies = (self.tallies[0], _Tally())
            self.epoch_rng = rng_state()
        else:
            set_rng_state(self.epoch_rng)
        _set_loader_epoch(self.loader, self.epoch - 1)
        batches = iter(self.loader)
        for _ in range(self.batch_in_epoch if resume is not None else 0):
            if next(batches, None) is None:
                raise ResumeError("the data loader gives fewer batches than when the state was saved")
        if resume is not None:
            set_rng_state(resume)
        return batches

    def _run_epoch(self, stop: StopRequest) -> None:
        batches = self._epoch_batches()
        set_training(self.model, True)
        window, tally = self.tallies
        for batch in batches:
            if self.step >= self.total:
                break
            if self.world.any(stop.requested):  # all ranks stop at the same step boundary
                raise RunInterrupted(self.step, self.total, self.save_state(), stop.signum or signal.SIGINT)
            self._train_step(batch, window, tally)
            self.batch_in_epoch += 1
            every = self.config.checkpoint_every
            if every and self.state_file is not None and self.step % every == 0 and self.step < self.total:
                self.save_state()
        if tally.batches == 0:
            raise DataError(f"the data loader yielded no batch in epoch {self.epoch}; it must give a full "
                            "pass every time it is iterated")
        self._end_epoch(tally)

    # ----------------------------------------------------------------- saved state
    def save_state(self) -> Path:
        """Write everything a resumed run needs to continue from this step boundary (rank 0
        writes it; the ranks hold the same model, gates and optimiser state)."""
        if self.state_file is None:
            raise ResumeError("no state file was given to save the run's state in")
        if not self.world.main:
            return self.state_file
        state = {
            "fingerprint": self.fingerprint, "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "frozen": self.frozen,
            "weight_phase_start": self.weight_phase_start, "model": self.model.state_dict(),
            "opt_w": self.opt_w.state_dict(), "opt_g": self.opt_g.state_dict() if self.opt_g is not None else None,
            "controller": {"lam": self.control.lam, "forced": self.control.forced,
                           "ratio_before_force": self.control.ratio_before_force,
                           "start_ratio": self.control.start_ratio},
            "history": asdict(self.history), "tallies": [asdict(t) for t in self.tallies],
            "epoch_rng": self.epoch_rng, "rng": rng_state(),
        }
        return save_state(self.state_file, state)

    def _restore(self, state: dict[str, Any]) -> None:
        """Rebuild the saved run's model, optimisers, controller and position."""
        check_same_run(state, self.fingerprint, self.state_file or "the state")
        self.history = TrainHistory(**state["history"])
        try:
            restore_structure(self.model, state["model"], self.history.kept_dense)
            self.model.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as exc:
            raise ResumeError(f"the saved model does not fit this run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
        self.meter.refresh()
        self.runner = self.world.wrap(self.model)
        self.frozen, self.weight_phase_start = state["frozen"], state["weight_phase_start"]
        self._make_optimizers()
        self.opt_w.load_state_dict(state["opt_w"])
        if self.opt_g is not None and state["opt_g"] is not None:
            self.opt_g.load_state_dict(state["opt_g"])
        for key, value in state["controller"].items():
            setattr(self.control, key, value)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.tallies = tuple(_Tally(**t) for t in state["tallies"])
        self.epoch_rng = state["epoch_rng"]
        self.history.resumed_from = self.step
        self._resume_at = state["rng"]  # states are saved inside an epoch, never before the first


def _set_loader_epoch(loader: Iterable, epoch: int) -> None:
    """Tell a loader (or its DistributedSampler-like sampler) which epoch it serves."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return


def finetune(model: nn.Module, teacher: nn.Module | None, loader: Iterable, config: CompressConfig,
             dense_params: int, callback: Callable[[TrainEvent], None] | None = None,
             evaluate: Callable[[nn.Module], float] | None = None,
             keep_factorized: Collection[str] = (), state_file: str | Path | None = None,
             resume_state: dict[str, Any] | None = None,
             refit: Callable[[nn.Module], int] | None = None) -> tuple[nn.Module, TrainHistory]:
    """Train the gated model until the target holds, then fine-tune the pruned model.

    ``teacher`` is the original model (used for distillation); ``evaluate(model) ->
    accuracy`` is called after each epoch; layers named in ``keep_factorized`` never go
    back to dense (they have no dense home in the model). ``state_file`` is where the
    resumable state goes (every ``config.checkpoint_every`` steps and on Ctrl-C);
    ``resume_state`` (from :func:`compressor.resume.load_state`) continues a saved run.
    ``refit(model) -> layers`` re-fits the pruned cores when the gates freeze (``config.refit``).
    Returns the pruned model and the history.
    """
    return FineTune(model, teacher, loader, config, dense_params, callback, evaluate, keep_factorized,
                    state_file, resume_state, refit).run()
