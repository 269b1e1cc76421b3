"""The target controller: reach the size target inside the gate phase, then stop the gates.

The paper trains gates and weights with a fixed λ for as long as it takes and freezes the
gates once a pre-defined ratio is reached (supplementary §1.3). A tool with a budget of
minutes cannot wait for that, so the controller owns every decision about size:

* **λ**: calibrated on the first batch (:meth:`TargetController.calibrate`, given to the
  controller with :meth:`TargetController.start_from`), then steered
  along a planned geometric path from the starting ratio to the target
  (:func:`planned_ratio`), raised when the ratio lags the plan and eased when it leads;
* **freeze**: the step the evaluation-mode ratio reaches the target;
* **give-back**: gates cross zero in bunches, so the freezing step usually overshoots;
  the slices nearest to open reopen while the target still holds;
* **forced closing**: if the gate phase ends short of the target, the least valuable
  slices per parameter are closed until it holds (never silently short);
* **μ bounds** that keep the penalty's gradient alive.

Sizes are those the model will have after pruning (:class:`SizeMeter`), so the ratio the
controller sees is the ratio the user gets.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from . import tensornet as tn
from .plan import count_state
from .surgery import tn_layers
from .layers import TNLayer

#: How often (in steps) λ is adjusted; the ratio itself is checked every step.
CHECK_EVERY = 10
#: The planned path reaches the target at this share of the gate phase, leaving slack.
PLAN_REACHES_TARGET_AT = 0.8
#: λ multipliers when the ratio lags / leads the plan, and λ's floor.
LAMBDA_UP, LAMBDA_DOWN, LAMBDA_FLOOR = 1.15, 0.93, 1e-4
#: Calibrated λ starts this far below the balance of task and penalty gradients.
CALIBRATION_SHARE = 0.05
#: Forced closing re-ranks the slices after closing 1/FORCE_ROUNDS of the open ones (at
#: least one): a small net is closed one slice at a time, an LLM's ~10^5 slices in a few
#: hundred rounds instead of 10^5 full re-rankings.
FORCE_ROUNDS = 256
#: Forced closing first keeps every bond at 1 / (FORCE_FLOOR x target) of its starting size.
FORCE_FLOOR = 2.0


def model_gates(model: nn.Module) -> list[nn.Module]:
    """Every gate of ``model``'s factorized layers, layer by layer, bond by bond."""
    return [g for layer in tn_layers(model).values() if layer.gates is not None for g in layer.gates.values()]


class SizeMeter:
    """Whole-model ratio as it will be after pruning with the current eval-mode gates."""

    def __init__(self, model: nn.Module, dense_params: int):
        self.dense = dense_params
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """Recount the state outside factorized layers; call after a layer goes dense."""
        prefixes = tuple(f"{name}." for name in tn_layers(self.model))
        self.other = count_state(self.model, exclude=lambda key: key.startswith(prefixes))

    def layers(self) -> dict[str, TNLayer]:
        return tn_layers(self.model)

    def gated_layers(self) -> list[TNLayer]:
        return [layer for layer in self.layers().values() if layer.gates is not None]

    def gates(self) -> list[nn.Module]:
        return model_gates(self.model)

    @staticmethod
    def layer_params(layer: TNLayer) -> int:
        # A layer whose factorized form would not be smaller goes back to dense at pruning.
        return min(layer.live_param_count() + layer.buffer_count(), layer.dense_param_count())

    def params(self) -> int:
        return self.other + sum(self.layer_params(layer) for layer in self.layers().values())

    def ratio(self) -> float:
        return self.dense / self.params()

    def tally(self) -> "RunningSize":
        """A running count for closing or reopening slices one by one (see :class:`RunningSize`)."""
        return RunningSize(self)

    def expected_params(self) -> torch.Tensor:
        return sum(layer.expected_param_count() for layer in self.layers().values())

    def penalty(self, kind: str) -> torch.Tensor:
        """The ℓ0 penalty, scaled to about 1 at the start so λ means the same for any model.

        ``"params"``: expected parameter count / dense count (aims straight at a size
        target); ``"count"``: the paper's mean of Φ(μ/σ) over all slices.
        """
        if kind == "params":
            return self.expected_params() / self.dense
        total = sum(g.mu.numel() for g in self.gates())
        return sum(layer.gate_penalty() for layer in self.layers().values()) / max(total, 1)

    def sampled_penalty(self, kind: str) -> float:
        """:meth:`penalty` of the gates' last samples (REINFORCE's cost of one sample)."""
        total_params, open_slices, slices = 0.0, 0.0, 0
        for layer in self.layers().values():
            ranks = [float(r) for r in layer.ranks]
            if layer.gates is not None:
                for key, g in layer.gates.items():
                    z = g.last_z if getattr(g, "last_z", None) is not None else g.eval_value()
                    ranks[int(key)] = float(z.sum())
                    open_slices += float(z.sum())
                    slices += z.numel()
            total_params += tn.param_count(layer.modes, ranks)
        if kind == "params":
            return total_params / self.dense
        return open_slices / max(slices, 1)


class RunningSize:
    """:meth:`SizeMeter.ratio` kept up to date slice by slice: recounting the whole model
    after each of thousands of slices (walking every module each time) cost SmolLM2 a
    quarter of a minute per forced closing."""

    def __init__(self, meter: SizeMeter):
        self.meter = meter
        layers = list(meter.layers().values())
        self.owner = {id(g): layer for layer in layers if layer.gates is not None for g in layer.gates.values()}
        self.sizes = {id(layer): meter.layer_params(layer) for layer in layers}
        self.total = meter.other + sum(self.sizes.values())

    def ratio(self) -> float:
        return self.meter.dense / self.total

    def changed(self, gate: nn.Module) -> None:
        """Recount the layer whose ``gate`` just closed or reopened a slice."""
        layer = self.owner[id(gate)]
        new = self.meter.layer_params(layer)
        self.total += new - self.sizes[id(layer)]
        self.sizes[id(layer)] = new


def planned_ratio(start: float, target: float, step: int, gate_steps: int) -> float:
    """Ratio the plan expects after ``step`` of ``gate_steps``: a geometric path to the target.

    Parameters vanish multiplicatively as gates close, so equal steps in log-ratio ask
    the same effort of every stretch of the phase.
    """
    progress = min(1.0, step / (PLAN_REACHES_TARGET_AT * gate_steps))
    log_start = math.log(max(start, 1e-9))
    return math.exp(log_start + (math.log(target) - log_start) * progress)


class TargetController:
    """Decides λ and when (and how) the gates stop, for one gated model and one target."""

    def __init__(self, meter: SizeMeter, target: float, gate_steps: int, penalty: str = "params"):
        self.meter = meter
        self.target = target
        self.gate_steps = gate_steps
        self.penalty_kind = penalty
        self.start_ratio = meter.ratio()
        self.lam = 1.0
        self.forced = False
        self.ratio_before_force: float | None = None

    @property
    def reached(self) -> bool:
        return self.meter.ratio() >= self.target

    def start_from(self, lam: float) -> None:
        """Steer from ``lam`` (the user's λ, or the one :meth:`calibrate` measured, agreed by every rank)."""
        self.lam = lam

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to make the same decisions (plain numbers)."""
        return {"lam": self.lam, "forced": self.forced, "ratio_before_force": self.ratio_before_force,
                "start_ratio": self.start_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.forced = state["lam"], state["forced"]
        self.ratio_before_force, self.start_ratio = state["ratio_before_force"], state["start_ratio"]

    def penalty(self) -> torch.Tensor:
        return self.meter.penalty(self.penalty_kind)

    def calibrate(self, task: Callable[[], torch.Tensor]) -> float:
        """Start λ where the penalty pulls on the gates a fixed share as hard as the task.

        Penalty gradients are tiny while gates sit near 1 (the normal pdf is flat out
        there), so a fixed default would waste hundreds of steps ramping up; one extra
        backward of ``task()`` (the task loss on the first batch) sets the scale for any
        model and data. Starting well below the balance point lets only the least useful
        slices close at first; :meth:`update` raises λ from there as the plan demands.

        Both gradients are taken as if every gate stood at most at 1, where it starts to
        matter: gates parked higher (a deep stack's start margin) have next to no gradient
        of either kind, and a ratio of two vanishing numbers would set λ at random.

        Returns the λ measured (the current one when there is nothing to measure); the
        controller steers from it once given it (:meth:`start_from`), so that under several
        processes every rank can start from their mean.
        """
        mus = [g.mu for g in self.meter.gates()]
        if not mus:
            return self.lam
        parked = [mu.detach().clone() for mu in mus]
        with torch.no_grad():
            for mu in mus:
                mu.clamp_(max=1.0)
        try:
            g_task = torch.autograd.grad(task(), mus, allow_unused=True)
            g_pen = torch.autograd.grad(self.penalty(), mus, allow_unused=True)
        finally:
            with torch.no_grad():
                for mu, value in zip(mus, parked):
                    mu.copy_(value)
        t = sum(float(g.abs().sum()) for g in g_task if g is not None)
        p = sum(float(g.abs().sum()) for g in g_pen if g is not None)
        if p > 0 and math.isfinite(t) and t > 0:
            return CALIBRATION_SHARE * t / p
        return self.lam

    def update(self, step: int) -> str | None:
        """After optimiser step ``step`` of the gate phase: ``"reached"``, ``"forced"`` or None.

        Counting open slices is cheap, so the target is checked every step; λ moves every
        :data:`CHECK_EVERY` steps. At the end of the gate phase the target is forced.
        """
        ratio = self.meter.ratio()
        if ratio >= self.target:
            return "reached"
        if step % CHECK_EVERY == 0:
            planned = planned_ratio(self.start_ratio, self.target, step, self.gate_steps)
            self.lam = self.lam * LAMBDA_UP if ratio < planned else max(self.lam * LAMBDA_DOWN, LAMBDA_FLOOR)
        if step >= self.gate_steps:
            return "forced"
        return None

    def bound_gates(self) -> None:
        """Keep gate means in [floor, ceiling]: for an ℓ0 gate [-1, 1 + sigma] (or a higher start).

        Beyond 1 + sigma a slice is open in nearly every sample and its penalty gradient,
        Φ'(μ/σ), vanishes: the task loss would park useful slices out of the penalty's
        reach, and the controller could no longer trade them off. Nothing observable
        changes: eval gates are clamp(μ, 0, 1) = 1 there.
        """
        with torch.no_grad():
            for g in self.meter.gates():
                g.mu.clamp_(g.floor, g.ceiling)

    def force(self) -> int:
        """Close the least valuable slices, per parameter saved, until the target holds.

        A slice's value is its gate value times the norms of the two core slices it joins
        (how much it contributes to the weight), as a share of its bond's total: core
        scales are arbitrary between bonds, and a share protects narrow bonds, whose last
        slices carry everything (cutting one to rank 1 is a bottleneck fine-tuning cannot
        repair). Its cost is the parameters it frees. Returns the number of slices closed.

        Shares per parameter favour cutting wide, costly bonds, and unchecked they would
        gut one layer (SmolLM2's tied embedding went from rank 570 to 7 at a 1.5x target).
        So no bond is first cut below 1 / (:data:`FORCE_FLOOR` x target) of the slices it
        started with; only if the target still does not hold is that floor dropped.
        """
        self.ratio_before_force = self.meter.ratio()
        self.forced = True
        closed = 0
        layers = self.meter.gated_layers()
        size = self.meter.tally()
        for share in (1.0 / (FORCE_FLOOR * self.target), 0.0):
            while size.ratio() < self.target:
                ranked = sorted((c for layer in layers for c in _closing_candidates(layer, share)), key=lambda c: c[0])
                if not ranked:
                    break  # nothing left to close above this floor
                taken: dict[int, int] = {}  # per bond this round: never more than half its open slices
                for _, gate, j, still_open in ranked[: max(1, len(ranked) // FORCE_ROUNDS)]:
                    if taken.get(id(gate), 0) >= max(1, still_open // 2) or size.ratio() >= self.target:
                        continue
                    gate.close(j)
                    size.changed(gate)
                    taken[id(gate)] = taken.get(id(gate), 0) + 1
                    closed += 1
        return closed

    def give_back(self) -> int:
        """Reopen the closed slices nearest to open while the target holds.

        Gates cross zero in bunches (Adam moves every gate at about the same speed), so
        the step that reaches the target usually passes it; the parameters between the
        two are free capacity for the weight phase. Returns the number of slices reopened.
        """
        closed = []
        for gate in self.meter.gates():
            mu = gate.mu.detach()
            for j in torch.nonzero(~gate.open_mask()).flatten().tolist():
                closed.append((float(mu[j]), gate, j))
        reopened = 0
        size = self.meter.tally()
        for value, gate, j in sorted(closed, key=lambda c: -c[0]):
            gate.reopen(j)
            size.changed(gate)
            if size.ratio() >= self.target:
                reopened += 1
            else:
                with torch.no_grad():
                    gate.mu[j] = value
                size.changed(gate)
        return reopened


def _closing_candidates(layer: TNLayer, floor_share: float = 0.0):
    """(value per parameter, gate, slice, open slices of its bond) of every open slice of each
    bond that has more than its floor (``floor_share`` of its starting size, at least 1) open."""
    ranks = layer.open_ranks()
    n = len(layer.modes)
    for key, gate in layer.gates.items():
        k = int(key)
        if ranks[k] <= max(1, math.ceil(floor_share * gate.mu.numel())):
            continue
        mask = gate.open_mask()
        with torch.no_grad():
            left = layer.cores[k].detach().norm(dim=(0, 1))
            right = layer.cores[(k + 1) % n].detach().norm(dim=(1, 2))
            value = gate.eval_value().detach() * left * right
            value = value / (value[mask].sum() + 1e-12)
        cost = ranks[k - 1] * layer.modes[k] + layer.modes[(k + 1) % n] * ranks[(k + 1) % n]
        values = value.tolist()
        for j in torch.nonzero(mask).flatten().tolist():
            yield values[j] / cost, gate, j, ranks[k]
