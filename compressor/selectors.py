"""Rank selectors: how a run picks its starting ranks, and whether gates then learn them.

One registry maps a name (``--rank-select``, ``rank_select=``) to a selector object;
nothing else in the package checks selector names. Each selector says

* how it lays out and sizes each planned layer (:meth:`RankSelector.prepare`), and
* which gate sits on every bond (:attr:`RankSelector.gate`; ``None``: no gates, the
  ranks are final and training is the plain fine-tune).

Registered here:

* ``l0`` (the method): a generous starting rank, ℓ0 gates learn what to keep.
* ``reinforce``: the same start, true Bernoulli gates trained by REINFORCE
  (supplementary §2.1), the ablation the paper compares against.
* ``uniform`` (TRN): one rank for every bond, the largest that meets the target.
* ``energy``: per-bond ranks from the singular values of the pretrained weights alone,
  allocated greedily across all layers (drop the slice that loses the least relative
  energy per parameter saved) until the whole model meets the target.
* ``svd``: no tensor network: every weight as two low-rank factors (a conv as a
  kh x kw conv to r channels, then a 1 x 1 conv), ranks allocated like ``energy``.

A new selector is a subclass with ``name=...``: ``class Mine(RankSelector, name="mine")``.
Selectors mutate only the plan they are given.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from . import tensornet as tn
from .errors import ConfigError, TargetError
from .gates import BernoulliGate, Gate, L0Gate
from .graph import CompressionPlan, LayerPlan, layer_size, layer_weight, plan_modes
from .layers import layer_class

#: Ranks never start above this: beyond it training cost grows with no gain on small models.
MAX_RANK = 64


def plan_params(the_plan: CompressionPlan, ranks_of: dict[str, Any], decomp: str) -> int:
    """Model size at these ranks; a layer that would not shrink is counted dense (it will be)."""
    total = the_plan.dense_params
    for lp in the_plan.layers:
        total += min(layer_size(lp, ranks_of[lp.name], decomp), lp.params_before) - lp.params_before
    return total


def min_params(the_plan: CompressionPlan, decomp: str) -> int:
    """Smallest size reachable: every factorized bond at rank 1, everything else dense."""
    return plan_params(the_plan, {lp.name: 1 for lp in the_plan.layers}, decomp)


# ------------------------------------------------------------------ generous starting ranks (gated selectors)
#: Starting ranks the gated selectors choose from (up to :data:`MAX_RANK`).
RANK_LADDER = (4, 6, 8, 12, 16, 20, 25, 32, 40, 48, 64)


def layer_rank_cap(lp: LayerPlan, decomp: str) -> int:
    """Largest ladder rank whose factorization is no bigger than the dense layer.

    Starting bigger than dense only costs time: those parameters would all have to be
    pruned again before the layer saves anything.
    """
    fitting = [r for r in RANK_LADDER if layer_size(lp, r, decomp) <= lp.params_before]
    return fitting[-1] if fitting else RANK_LADDER[0]


def planned_params(the_plan: CompressionPlan, rank: int, decomp: str) -> int:
    """Model size if every planned layer starts at ``rank`` (capped per layer)."""
    total = the_plan.dense_params
    for lp in the_plan.layers:
        r = lp.rank if lp.rank is not None else min(rank, layer_rank_cap(lp, decomp))
        total += layer_size(lp, r, decomp) - lp.params_before
    return total


def generous_ranks(the_plan: CompressionPlan, target: float, decomp: str) -> None:
    """Give every layer without an explicit rank a generous starting rank.

    Generous means: the whole model starts at no more than half the target ratio (the
    gates then choose which half to drop), but no layer starts bigger than it was.
    """
    chosen = RANK_LADDER[-1]
    for r in RANK_LADDER[4:]:  # at least 16
        if the_plan.dense_params / planned_params(the_plan, r, decomp) <= target / 2:
            chosen = r
            break
    for lp in the_plan.layers:
        if lp.rank is None:
            lp.rank = min(chosen, layer_rank_cap(lp, decomp))


# ------------------------------------------------------------------ hand-set ranks (baselines)


def uniform_ranks(the_plan: CompressionPlan, target: float, decomp: str) -> int:
    """Set every layer to the largest single rank whose model meets ``target``."""
    for r in range(MAX_RANK, 0, -1):
        ranks = {lp.name: tn.resolve_ranks(r, plan_modes(lp), decomp) for lp in the_plan.layers}
        if the_plan.dense_params / plan_params(the_plan, ranks, decomp) >= target:
            for lp in the_plan.layers:
                lp.rank = ranks[lp.name]
            return r
    raise TargetError(f"no uniform rank reaches {target:g}x")


def unfolding_spectra(tensor: torch.Tensor, modes: tuple[int, ...], caps: list[int]) -> list[torch.Tensor]:
    """Squared singular values of each inner unfolding, relative to ||W||^2 (TT-SVD's error terms)."""
    t = tensor.detach().to(torch.float64).reshape(modes)
    total = float((t ** 2).sum()) or 1.0
    out = []
    for k in range(len(modes) - 1):
        mat = t.reshape(math.prod(modes[: k + 1]), -1)
        s = torch.linalg.svdvals(mat)[: caps[k]]
        out.append((s ** 2) / total)
    return out


def energy_ranks(the_plan: CompressionPlan, module: nn.Module, target: float, decomp: str) -> None:
    """Greedy global truncation by singular-value energy per parameter (closing bond 1)."""
    state = {}
    for lp in the_plan.layers:
        modes = plan_modes(lp)
        caps = [min(c, MAX_RANK) for c in tn.max_ranks(modes, "tt")]
        w = layer_class(lp.kind).weight_tensor(layer_weight(module, lp), lp.tensorization)
        spectra = unfolding_spectra(w, modes, caps)
        ranks = [min(caps[k], len(spectra[k])) for k in range(len(modes) - 1)] + [1]
        state[lp.name] = (lp, spectra, ranks)
    ranks_of = {name: st[2] for name, st in state.items()}
    while the_plan.dense_params / plan_params(the_plan, ranks_of, "tt") < target:
        best = None
        for name, (lp, spectra, ranks) in state.items():
            now = layer_size(lp, ranks, "tt")
            for k in range(len(ranks) - 1):
                if ranks[k] <= 1:
                    continue
                trial = list(ranks)
                trial[k] -= 1
                saved = now - layer_size(lp, trial, "tt")
                if saved <= 0:
                    continue
                loss = float(spectra[k][ranks[k] - 1])
                score = loss / saved
                if best is None or score < best[0]:
                    best = (score, name, k)
        if best is None:
            raise TargetError(f"energy allocation cannot reach {target:g}x")
        state[best[1]][2][best[2]] -= 1
    for name, (lp, _, ranks) in state.items():
        lp.rank = list(ranks)


def svd_layout(the_plan: CompressionPlan) -> None:
    """Turn every planned layer into a plain two-factor (matrix) tensor train."""
    for lp in the_plan.layers:
        lp.tensorization, lp.merge_spatial = layer_class(lp.kind).matrix_layout(lp.shape)
        lp.decomp = "tt"  # a two-core ring would be a trace of a product, not a matrix factorization


# ------------------------------------------------------------------ the registry
class RankSelector:
    """How a run picks ranks. Subclasses register themselves with ``name=...``.

    ``gate`` is the gate class put on every bond, or ``None`` for selectors whose ranks
    are final (the model is built ungated and only fine-tuned). ``help`` is the one-line
    description shown by ``--help``.
    """

    registry: ClassVar[dict[str, "RankSelector"]] = {}
    name: ClassVar[str]
    help: ClassVar[str] = ""
    gate: ClassVar[type[Gate] | None] = None

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            RankSelector.registry[name] = cls()

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, config: Any) -> None:
        """Fill in every planned layer's layout and starting ranks."""
        raise NotImplementedError

    def gate_factory(self, config: Any) -> Callable[[int, torch.dtype], Gate] | None:
        """``make_gate(size, dtype)`` for the layers' bonds, or None for an ungated model."""
        return None


class L0Selector(RankSelector, name="l0"):
    help = "learned ℓ0 gates on every rank slice (the paper)"
    gate = L0Gate

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, config: Any) -> None:
        if config.rank is None:
            generous_ranks(the_plan, config.target, config.decomp)

    def gate_factory(self, config: Any) -> Callable[[int, torch.dtype], Gate]:
        return lambda size, dtype: L0Gate(size, config.sigma, dtype=dtype)


class ReinforceSelector(L0Selector, name="reinforce"):
    help = "Bernoulli gates trained by REINFORCE (supplementary §2.1), M samples per step"
    gate = BernoulliGate

    def gate_factory(self, config: Any) -> Callable[[int, torch.dtype], Gate]:
        return lambda size, dtype: BernoulliGate(size, dtype=dtype)


class UniformSelector(RankSelector, name="uniform"):
    help = "one rank for every bond, the largest that meets the target (TRN)"

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, config: Any) -> None:
        uniform_ranks(the_plan, config.target, config.decomp)


class EnergySelector(RankSelector, name="energy"):
    help = "singular values of the pretrained weights, allocated greedily over all layers"

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, config: Any) -> None:
        energy_ranks(the_plan, module, config.target, config.decomp)


class SVDSelector(RankSelector, name="svd"):
    help = "no tensor network: each weight as two low-rank factors, ranks allocated like energy"

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, config: Any) -> None:
        svd_layout(the_plan)
        energy_ranks(the_plan, module, config.target, config.decomp)


#: The selector a run uses unless told otherwise: the paper's method.
DEFAULT_SELECTOR = L0Selector.name


def selector_names() -> tuple[str, ...]:
    """Every registered selector name, the default (``l0``) first."""
    return tuple(RankSelector.registry)


def get_selector(name: str) -> RankSelector:
    """The registered selector called ``name``, or a one-line ConfigError listing the choices."""
    try:
        return RankSelector.registry[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown rank selector {name!r}; choose one of {', '.join(selector_names())}") from None
