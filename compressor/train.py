"""Fine-tuning with the l0 penalty and the target controller (METHOD.md section 4).

The run has two phases inside one budget of steps:

1. **gate phase** (``gate_fraction`` of the budget): cores, other weights and gate means
   learn together; loss = task loss + lambda * penalty.  lambda follows a planned path
   (the ratio should grow geometrically and reach the target at 80 % of the phase): it is
   raised when the evaluation-mode ratio lags the plan and eased when it leads.  The
   moment the ratio reaches the target the gates are frozen and the layers pruned.
   If the phase ends short of the target, the least valuable slices per parameter are
   closed until the target holds (never silently short).
2. **weight phase**: the pruned, ungated model is fine-tuned with a cosine-decaying
   learning rate; the size no longer changes, so the delivered ratio is exact.

The library never prints: progress goes to ``callback(TrainEvent)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import CompressConfig
from .errors import DataError, TrainingError
from .graph import set_submodule, set_training, tn_layers
from .layers import TNLayer


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
    events: list[TrainEvent] = field(default_factory=list)
    frozen_at: int | None = None
    forced: bool = False
    ratio_before_force: float | None = None  # how far the gates alone got, when forced
    kept_dense: list[str] = field(default_factory=list)
    reopened: int = 0  # slices given back after the gates overshot the target
    steps: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------ batches and losses
def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(x, y)`` -> (x, y); ``x`` alone -> (x, None)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DataError(f"a batch must be x or (x, y); got a sequence of {len(batch)} items")
    if isinstance(batch, dict):
        raise DataError("dict batches are not supported; yield x or (x, y)")
    return batch, None


def run_model(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(*x) if isinstance(x, tuple) else model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise DataError(f"the model returned {type(out).__name__}; compressor needs a tensor output (logits)")
    return out


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "auto":
        kind = "kl" if student.dim() == 2 and student.shape[-1] > 1 else "mse"
    if kind == "mse":
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def loader_length(loader: Iterable) -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in loader)
    if n <= 0:
        raise DataError("the data loader is empty: it yielded no batch")
    return n


# ------------------------------------------------------------------ ratio bookkeeping
class SizeMeter:
    """Whole-model ratio as it will be after pruning with the current eval-mode gates."""

    def __init__(self, model: nn.Module, dense_params: int):
        self.dense = dense_params
        inside = {id(p) for layer in tn_layers(model).values() for p in layer.parameters()}
        seen, other = set(), 0
        for p in model.parameters():
            if id(p) not in inside and id(p) not in seen:
                seen.add(id(p))
                other += p.numel()
        self.other = other
        self.model = model

    def layers(self) -> dict[str, TNLayer]:
        return tn_layers(self.model)

    def params(self) -> int:
        # A layer whose factorized form would not be smaller goes back to dense at pruning.
        return self.other + sum(min(layer.live_param_count(), layer.dense_param_count())
                                for layer in self.layers().values())

    def ratio(self) -> float:
        return self.dense / self.params()

    def expected_params(self) -> torch.Tensor:
        return sum(layer.expected_param_count() for layer in self.layers().values())


def penalty_term(meter: SizeMeter, kind: str) -> torch.Tensor:
    """The l0 penalty, scaled to about 1 at the start so lambda means the same for any model."""
    layers = meter.layers().values()
    if kind == "params":
        return meter.expected_params() / meter.dense
    total = sum(g.mu.numel() for layer in layers if layer.gates is not None for g in layer.gates.values())
    return sum(layer.gate_penalty() for layer in layers) / max(total, 1)


def force_target(meter: SizeMeter, target: float) -> int:
    """Close the least valuable slices, per parameter saved, until the target holds.

    A slice's value is its gate value times the norms of the two core slices it joins
    (how much it contributes to the weight), as a share of its bond's total: core scales
    are arbitrary between bonds, and a share protects narrow bonds, whose last slices
    carry everything (cutting one to rank 1 is a bottleneck fine-tuning cannot repair).
    Its cost is the parameters it frees.
    Returns the number of slices closed.
    """
    closed = 0
    layers = [layer for layer in meter.layers().values() if layer.gates is not None]
    while meter.ratio() < target:
        best = None
        for layer in layers:
            ranks = layer.open_ranks()
            n = len(layer.modes)
            for key, gate in layer.gates.items():
                k = int(key)
                if ranks[k] <= 1:
                    continue
                mask = gate.open_mask()
                with torch.no_grad():
                    left = layer.cores[k].detach().norm(dim=(0, 1))
                    right = layer.cores[(k + 1) % n].detach().norm(dim=(1, 2))
                    value = gate.eval_value().detach() * left * right
                    value = value / (value[mask].sum() + 1e-12)
                cost = ranks[k - 1] * layer.modes[k] + layer.modes[(k + 1) % n] * ranks[(k + 1) % n]
                value = torch.where(mask, value, torch.full_like(value, float("inf")))
                j = int(torch.argmin(value))
                score = float(value[j]) / cost
                if best is None or score < best[0]:
                    best = (score, gate, j)
        if best is None:
            break  # nothing left to close: the caller checked reachability up front
        best[1].close(best[2])
        closed += 1
    return closed


def task_loss(out: torch.Tensor, y: torch.Tensor | None, t_out: torch.Tensor | None, config: CompressConfig) -> torch.Tensor:
    """Cross-entropy on labels (+ optional distillation), or pure distillation without labels."""
    if y is None:
        return distill_loss(out, t_out, config.distill_loss, config.temperature)
    loss = F.cross_entropy(out, y)
    if t_out is not None and config.distill > 0:
        loss = loss + config.distill * distill_loss(out, t_out, config.distill_loss, config.temperature)
    return loss


def calibrate_lambda(model: nn.Module, teacher: nn.Module | None, loader: Iterable, meter: SizeMeter,
                     config: CompressConfig) -> float:
    """Start lambda where the penalty pulls on the gates as hard as the task pushes back.

    Penalty gradients are tiny while gates sit near 1 (the normal pdf is flat out there),
    so a fixed default would waste hundreds of steps ramping up; one extra backward on
    the first batch sets the scale for any model and data.
    """
    gates = [g.mu for layer in meter.layers().values() if layer.gates is not None for g in layer.gates.values()]
    if not gates:
        return 1.0
    x, y = split_batch(next(iter(loader)))
    with torch.no_grad():
        t_out = run_model(teacher, x) if teacher is not None else None
    task = task_loss(run_model(model, x), y, t_out, config)
    g_task = torch.autograd.grad(task, gates, allow_unused=True)
    g_pen = torch.autograd.grad(penalty_term(meter, config.penalty), gates, allow_unused=True)
    t = sum(float(g.abs().sum()) for g in g_task if g is not None)
    p = sum(float(g.abs().sum()) for g in g_pen if g is not None)
    if not (p > 0 and math.isfinite(t) and t > 0):
        return 1.0
    # Start well below the balance point so only the least useful slices start closing;
    # the controller raises lambda from there as the planned ratio demands.
    return 0.05 * t / p


def reinforce_step(model: nn.Module, meter: SizeMeter, x: Any, y: torch.Tensor | None, t_out: torch.Tensor | None,
                   config: CompressConfig, lam: float):
    """One REINFORCE-l0 step (supplementary eq. 3): M Bernoulli samples, score-function gradient.

    Surrogate per sample: log P(Z) * (c - b) + J, with c = J + lambda * size(Z) held
    constant and b the mean of c over the M samples (a standard variance reduction).
    Gradients are accumulated here; the returned loss is detached.
    """
    m = config.reinforce_samples
    gates = [g for layer in meter.layers().values() if layer.gates is not None for g in layer.gates.values()]
    samples = []
    for _ in range(m):
        out = run_model(model, x)
        j = task_loss(out, y, t_out, config)
        size = sampled_size(meter, config.penalty)
        samples.append((out, j, size, sum(g.log_prob() for g in gates)))
    costs = [float(j.detach()) + lam * s for _, j, s, _ in samples]
    base = sum(costs) / m
    total = 0.0
    for (out, j, size, logp), c in zip(samples, costs):
        total = total + (logp * (c - base) + j) / m
    total.backward()
    out = samples[-1][0]
    task = sum(j.detach() for _, j, _, _ in samples) / m
    pen = torch.tensor(sum(s for _, _, s, _ in samples) / m)
    return out, task, pen, (task + lam * pen).detach()


def sampled_size(meter: SizeMeter, kind: str) -> float:
    """Penalty of the last sampled Bernoulli gates, on the same scale as :func:`penalty_term`."""
    total_params, open_slices, slices = 0.0, 0.0, 0
    for layer in meter.layers().values():
        ranks = [float(r) for r in layer.ranks]
        if layer.gates is not None:
            for key, g in layer.gates.items():
                z = g.last_z if getattr(g, "last_z", None) is not None else g.eval_value()
                ranks[int(key)] = float(z.sum())
                open_slices += float(z.sum())
                slices += z.numel()
        n = len(layer.modes)
        total_params += sum(ranks[k - 1] * layer.modes[k] * ranks[k] for k in range(n))
    if kind == "params":
        return total_params / meter.dense
    return open_slices / max(slices, 1)


def reopen_to_target(meter: SizeMeter, target: float) -> int:
    """Give back the overshoot: reopen the closed slices nearest to open while the target holds.

    Gates cross zero in bunches (Adam moves every gate at about the same speed), so the
    step that reaches the target usually passes it; the parameters between the two are
    free capacity for the weight phase.  Returns the number of slices reopened.
    """
    closed = []
    for layer in meter.layers().values():
        if layer.gates is None:
            continue
        for gate in layer.gates.values():
            mu = gate.mu.detach()
            for j in torch.nonzero(~gate.open_mask()).flatten().tolist():
                closed.append((float(mu[j]), gate, j))
    reopened = 0
    for value, gate, j in sorted(closed, key=lambda c: -c[0]):
        gate.reopen(j)
        if meter.ratio() >= target:
            reopened += 1
        else:
            with torch.no_grad():
                gate.mu[j] = value
    return reopened


# ------------------------------------------------------------------ the loop
def default_epochs(steps_per_epoch: int) -> int:
    """About 3000 optimiser steps, at least 2 and at most 100 epochs."""
    return int(min(100, max(2, math.ceil(3000 / steps_per_epoch))))


def finetune(model: nn.Module, teacher: nn.Module | None, loader: Iterable, config: CompressConfig,
             dense_params: int, callback: Callable[[TrainEvent], None] | None = None,
             evaluate: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, TrainHistory]:
    """Train the gated model until the target holds, then fine-tune the pruned model.

    Returns the pruned (ungated) model and the history.  ``teacher`` is the original model
    (used for distillation); ``evaluate(model) -> accuracy`` is called after each epoch.
    """
    torch.manual_seed(config.seed)
    history = TrainHistory()
    emit = callback or (lambda e: None)
    spe = loader_length(loader)
    epochs = config.epochs if config.epochs is not None else default_epochs(spe)
    total = spe * epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    gate_steps = max(1, int(config.gate_fraction * total)) if total else 0
    lr = config.lr if config.lr is not None else 1e-3
    meter = SizeMeter(model, dense_params)
    reinforce = config.rank_select == "reinforce"
    r0 = meter.ratio()
    frozen = r0 >= config.target
    lam = config.lam if config.lam is not None else (1.0 if frozen else calibrate_lambda(model, teacher, loader, meter, config))

    def make_optimizers(m: nn.Module):
        gates = [p for layer in tn_layers(m).values() if layer.gates is not None
                 for g in layer.gates.values() for p in g.parameters()]
        gate_ids = {id(p) for p in gates}
        weights = [p for p in m.parameters() if id(p) not in gate_ids and p.requires_grad]
        opt_w = torch.optim.Adam(weights, lr=lr, weight_decay=config.weight_decay)
        opt_g = torch.optim.Adam(gates, lr=config.gate_lr) if gates and not frozen else None
        return opt_w, opt_g

    def prune_all():
        for name, layer in tn_layers(model).items():
            layer.prune_()
            if layer.param_count() >= layer.dense_param_count() and name not in renamed:
                set_submodule(model, name, layer.to_dense())
                history.kept_dense.append(name)

    renamed = set(getattr(model, "_compressor_renamed", ()))

    if frozen:
        prune_all()
    opt_w, opt_g = make_optimizers(model)
    emit(TrainEvent("start", 0, total, 0, ratio=r0, lam=lam, frozen=frozen))

    if teacher is not None:
        set_training(teacher, False)
    good_state = copy.deepcopy(model.state_dict())
    good_step = 0
    step = 0
    phase_b_start = 0 if frozen else None  # the weight phase's learning rate decays (cosine)
    win_correct = win_seen = 0
    win_loss = 0.0
    win_n = 0
    check_every = 10
    epoch = 0
    while step < total:
        epoch += 1
        set_training(model, True)
        ep_correct = ep_seen = ep_batches = 0
        ep_loss = 0.0
        for batch in loader:
            if step >= total:
                break
            x, y = split_batch(batch)
            t_out = None
            if teacher is not None and (y is None or config.distill > 0):
                with torch.no_grad():
                    t_out = run_model(teacher, x)
            opt_w.zero_grad(set_to_none=True)
            if opt_g is not None:
                opt_g.zero_grad(set_to_none=True)
            if reinforce and not frozen:
                out, task, pen, loss = reinforce_step(model, meter, x, y, t_out, config, lam)
            else:
                out = run_model(model, x)
                task = task_loss(out, y, t_out, config)
                if not frozen:
                    pen = penalty_term(meter, config.penalty)
                    loss = task + lam * pen
                else:
                    pen = torch.zeros(())
                    loss = task
            if not torch.isfinite(loss):
                model.load_state_dict(good_state) if _same_keys(model, good_state) else None
                err = TrainingError(
                    f"the loss became {float(loss.detach())} at step {step}; stopped and kept the last good state "
                    f"(step {good_step}); try a lower learning rate (lr={lr})")
                err.model = model  # type: ignore[attr-defined]
                raise err
            if loss.requires_grad:
                loss.backward()
            opt_w.step()
            if opt_g is not None:
                opt_g.step()
                _bound_gates(meter)
            step += 1
            if phase_b_start is not None:
                _cosine(opt_w, lr, step - phase_b_start, total - phase_b_start)

            # bookkeeping
            win_loss += float(task.detach())
            win_n += 1
            ep_loss += float(task.detach())
            ep_batches += 1
            if y is not None and out.dim() == 2:
                correct = int((out.detach().argmax(-1) == y).sum())
                win_correct += correct
                win_seen += y.numel()
                ep_correct += correct
                ep_seen += y.numel()

            if not frozen:
                ratio = meter.ratio()  # counting open slices is cheap: check every step
                if ratio >= config.target:
                    frozen = True
                elif step % check_every == 0:
                    progress = min(1.0, step / (0.8 * gate_steps))
                    planned = math.exp(math.log(max(r0, 1e-9)) + (math.log(config.target) - math.log(max(r0, 1e-9))) * progress)
                    lam = lam * 1.15 if ratio < planned else max(lam * 0.93, 1e-4)
                if not frozen and step >= gate_steps:
                    history.ratio_before_force = meter.ratio()
                    n_closed = force_target(meter, config.target)
                    history.forced = True
                    emit(TrainEvent("force", step, total, epoch, ratio=meter.ratio(), lam=lam,
                                    message=f"closed {n_closed} more slices to reach the target"))
                    frozen = True
                if frozen:
                    if not history.forced:
                        history.reopened = reopen_to_target(meter, config.target)
                    prune_all()
                    history.frozen_at = step
                    good_state, good_step = copy.deepcopy(model.state_dict()), step
                    opt_w, opt_g = make_optimizers(model)
                    phase_b_start = step
                    emit(TrainEvent("freeze", step, total, epoch, ratio=meter.ratio(), lam=lam, frozen=True))
            if step % config.log_every == 0 or step == total:
                emit(TrainEvent("step", step, total, epoch, loss=float(loss.detach()), task_loss=win_loss / max(win_n, 1),
                                penalty=float(pen.detach()), ratio=meter.ratio(),
                                accuracy=win_correct / win_seen if win_seen else None, lam=lam, frozen=frozen))
                win_correct = win_seen = win_n = 0
                win_loss = 0.0
            if step % 100 == 0:
                good_state, good_step = copy.deepcopy(model.state_dict()), step
        eval_acc = evaluate(model) if evaluate is not None else None
        record = {"epoch": epoch, "step": step, "ratio": meter.ratio(), "lambda": lam, "frozen": frozen,
                  "train_loss": ep_loss / ep_batches if ep_batches else None,
                  "train_accuracy": ep_correct / ep_seen if ep_seen else None, "eval_accuracy": eval_acc}
        history.epochs.append(record)
        emit(TrainEvent("epoch", step, total, epoch, ratio=record["ratio"], accuracy=record["train_accuracy"],
                        eval_accuracy=eval_acc, lam=lam, frozen=frozen))
        if step == 0:
            break  # zero-length budget
    if not frozen:  # budget ended inside the gate phase (e.g. epochs=0 or tiny max_steps)
        if meter.ratio() < config.target:
            history.ratio_before_force = meter.ratio()
            force_target(meter, config.target)
            history.forced = True
        history.frozen_at = step
    prune_all()
    history.steps = step
    set_training(model, False)
    emit(TrainEvent("end", step, total, epoch, ratio=meter.ratio(), frozen=True))
    return model, history


def _bound_gates(meter: SizeMeter) -> None:
    """Keep gate means in [-1, 1 + sigma].

    Beyond 1 + sigma a slice is open in every sample and its penalty gradient, Phi'(mu/sigma),
    vanishes: the task loss would park useful slices out of the penalty's reach, and the
    controller could no longer trade them off.  Nothing observable changes: eval gates
    are clamp(mu, 0, 1) = 1 there.
    """
    with torch.no_grad():
        for layer in meter.layers().values():
            if layer.gates is not None:
                for g in layer.gates.values():
                    upper = 1.0 + getattr(g, "sigma", 0.0)
                    g.mu.clamp_(-1.0, upper)


def _same_keys(model: nn.Module, state: dict) -> bool:
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(sd[k].shape == state[k].shape for k in sd)


def _cosine(opt: torch.optim.Optimizer, base: float, t: int, span: int) -> None:
    frac = min(1.0, t / max(span, 1))
    for g in opt.param_groups:
        g["lr"] = base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
