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

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable

import torch
from torch import nn

from .batches import loader_length, run_model, split_batch
from .config import CompressConfig
from .controller import SizeMeter, TargetController
from .errors import DataError, TrainingError
from .gates import reinforce_surrogate
from .graph import set_submodule, set_training, tn_layers
from .losses import task_loss

#: Optimiser steps a default budget aims at (at least 2, at most 100 epochs).
DEFAULT_STEPS = 3000
#: Default Adam learning rate of the weights (cores, biases, untouched layers).
DEFAULT_LR = 1e-3
#: Steps between snapshots of the last good state (restored if the loss turns NaN).
SNAPSHOT_EVERY = 100


@dataclass
class TrainEvent:
    """What a progress display needs; ``kind`` is start/step/epoch/freeze/force/end."""

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
    forced: bool = False
    ratio_before_force: float | None = None  # how far the gates alone got, when forced
    kept_dense: list[str] = field(default_factory=list)
    reopened: int = 0  # slices given back after the gates overshot the target
    steps: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------ schedules (pure functions)
def default_epochs(steps_per_epoch: int) -> int:
    """About :data:`DEFAULT_STEPS` optimiser steps, at least 2 and at most 100 epochs."""
    return int(min(100, max(2, math.ceil(DEFAULT_STEPS / steps_per_epoch))))


def cosine_lr(base: float, t: int, span: int) -> float:
    """Learning rate ``t`` steps into a weight phase of ``span`` steps: cosine from base to 5 %."""
    frac = min(1.0, t / max(span, 1))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class _Tally:
    """Running sums of the task loss and training accuracy over a window of steps."""

    loss: float = 0.0
    batches: int = 0
    correct: int = 0
    seen: int = 0

    def add(self, task: torch.Tensor, out: torch.Tensor, y: torch.Tensor | None) -> None:
        self.loss += float(task.detach())
        self.batches += 1
        if y is not None and out.dim() == 2:
            self.correct += int((out.detach().argmax(-1) == y).sum())
            self.seen += y.numel()

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
                 evaluate: Callable[[nn.Module], float] | None = None, keep_factorized: Collection[str] = ()):
        torch.manual_seed(config.seed)
        self.model, self.teacher, self.loader, self.config = model, teacher, loader, config
        self.emit = callback or (lambda e: None)
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
        self.frozen = self.control.reached
        self.score_function = any(g.score_function for g in self.meter.gates())
        self.step = self.epoch = 0
        self.weight_phase_start: int | None = None  # the weight phase's learning rate decays from here

    # ----------------------------------------------------------------- pieces
    def _teacher_out(self, x: Any, y: torch.Tensor | None) -> torch.Tensor | None:
        if self.teacher is None or (y is not None and self.config.distill <= 0):
            return None
        with torch.no_grad():
            return run_model(self.teacher, x)

    def _calibrate(self) -> float:
        if self.config.lam is not None:
            self.control.lam = self.config.lam
            return self.control.lam
        if self.frozen:
            return self.control.lam
        x, y = split_batch(next(iter(self.loader)))
        t_out = self._teacher_out(x, y) if self.teacher is not None else None
        return self.control.calibrate(lambda: task_loss(run_model(self.model, x), y, t_out, self.config))

    def _make_optimizers(self) -> None:
        gates = [p for g in self.meter.gates() for p in g.parameters()]
        gate_ids = {id(p) for p in gates}
        weights = [p for p in self.model.parameters() if id(p) not in gate_ids and p.requires_grad]
        self.opt_w = torch.optim.Adam(weights, lr=self.lr, weight_decay=self.config.weight_decay)
        self.opt_g = torch.optim.Adam(gates, lr=self.config.gate_lr) if gates and not self.frozen else None

    def _prune_all(self) -> None:
        """Prune every layer; one whose factorization is not smaller than dense goes dense."""
        for name, layer in tn_layers(self.model).items():
            layer.prune_()
            if layer.param_count() >= layer.dense_param_count() and name not in self.keep_factorized:
                set_submodule(self.model, name, layer.to_dense())
                self.history.kept_dense.append(name)
        self.meter.refresh()

    def _snapshot(self) -> None:
        self.good_state, self.good_step = copy.deepcopy(self.model.state_dict()), self.step

    def _objective(self, x: Any, y: torch.Tensor | None, t_out: torch.Tensor | None):
        """(output, task loss, penalty, total loss) of one batch; REINFORCE backpropagates itself."""
        if self.score_function and not self.frozen:
            return self._reinforce(x, y, t_out)
        out = run_model(self.model, x)
        task = task_loss(out, y, t_out, self.config)
        if self.frozen:
            return out, task, torch.zeros(()), task
        pen = self.control.penalty()
        return out, task, pen, task + self.control.lam * pen

    def _reinforce(self, x: Any, y: torch.Tensor | None, t_out: torch.Tensor | None):
        """M Bernoulli samples of the gates, score-function gradient (supplementary §2.1)."""
        gates, lam = self.meter.gates(), self.control.lam
        outs, tasks, sizes, logps = [], [], [], []
        for _ in range(self.config.reinforce_samples):
            outs.append(run_model(self.model, x))
            tasks.append(task_loss(outs[-1], y, t_out, self.config))
            sizes.append(self.meter.sampled_penalty(self.config.penalty))
            logps.append(sum(g.log_prob() for g in gates))
        reinforce_surrogate(tasks, sizes, logps, lam).backward()
        task = sum(j.detach() for j in tasks) / len(tasks)
        pen = torch.tensor(sum(sizes) / len(sizes))
        return outs[-1], task, pen, (task + lam * pen).detach()

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
        self.history.frozen_at = self.step
        self._snapshot()
        self._make_optimizers()
        self.weight_phase_start = self.step
        self._event("freeze")

    def _event(self, kind: str, **fields: Any) -> None:
        fields.setdefault("ratio", self.meter.ratio())
        self.emit(TrainEvent(kind, self.step, self.total, self.epoch, lam=self.control.lam, frozen=self.frozen,
                             **fields))

    # ----------------------------------------------------------------- the loop
    def _train_step(self, batch: Any, window: _Tally, epoch: _Tally) -> None:
        x, y = split_batch(batch)
        t_out = self._teacher_out(x, y)
        self.opt_w.zero_grad(set_to_none=True)
        if self.opt_g is not None:
            self.opt_g.zero_grad(set_to_none=True)
        out, task, pen, loss = self._objective(x, y, t_out)
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
        window.add(task, out, y)
        epoch.add(task, out, y)
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

    def run(self) -> tuple[nn.Module, TrainHistory]:
        """Train until the budget is spent; return the pruned (ungated) model and the history."""
        lam = self._calibrate()
        if self.frozen:
            self._prune_all()
            self.weight_phase_start = 0
        self._make_optimizers()
        self.emit(TrainEvent("start", 0, self.total, 0, ratio=self.control.start_ratio, lam=lam, frozen=self.frozen))
        if self.teacher is not None:
            set_training(self.teacher, False)
        self._snapshot()
        window = _Tally()
        while self.step < self.total:
            self.epoch += 1
            set_training(self.model, True)
            tally = _Tally()
            for batch in self.loader:
                if self.step >= self.total:
                    break
                self._train_step(batch, window, tally)
            if tally.batches == 0:
                raise DataError(f"the data loader yielded no batch in epoch {self.epoch}; it must give a full "
                                "pass every time it is iterated")
            self._end_epoch(tally)
        if not self.frozen:  # budget ended inside the gate phase (e.g. epochs=0 or tiny max_steps)
            if not self.control.reached:
                self.control.force()
            self.history.frozen_at = self.step
        self._prune_all()
        self.history.steps = self.step
        self.history.forced = self.control.forced
        self.history.ratio_before_force = self.control.ratio_before_force
        set_training(self.model, False)
        self.emit(TrainEvent("end", self.step, self.total, self.epoch, ratio=self.meter.ratio(), frozen=True))
        return self.model, self.history


def finetune(model: nn.Module, teacher: nn.Module | None, loader: Iterable, config: CompressConfig,
             dense_params: int, callback: Callable[[TrainEvent], None] | None = None,
             evaluate: Callable[[nn.Module], float] | None = None,
             keep_factorized: Collection[str] = ()) -> tuple[nn.Module, TrainHistory]:
    """Train the gated model until the target holds, then fine-tune the pruned model.

    ``teacher`` is the original model (used for distillation); ``evaluate(model) ->
    accuracy`` is called after each epoch; layers named in ``keep_factorized`` never go
    back to dense (they have no dense home in the model). Returns the pruned model and
    the history.
    """
    return FineTune(model, teacher, loader, config, dense_params, callback, evaluate, keep_factorized).run()
