"""Rank selectors that do not learn: the baselines ℓ0 gates are measured against.

* ``uniform`` (TRN): one rank for every bond, the largest that meets the target.
* ``energy``: per-bond ranks from the singular values of the pretrained weights alone,
  allocated greedily across all layers (drop the slice that loses the least relative
  energy per parameter saved) until the whole model meets the target.
* ``svd``: no tensor network: every weight as two low-rank factors (a conv as a
  kh x kw conv to r channels, then a 1 x 1 conv), ranks allocated like ``energy``.

Each fills ``LayerPlan.rank`` (and for ``svd`` the layout); training is then the plain,
ungated fine-tune.  Pure functions of the plan and the weights: nothing is mutated but
the plan they are given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import tensornet as tn
from .errors import TargetError
from .graph import CompressionPlan, layer_size, layer_weight, plan_modes
from .layers import weight_tensor

SELECTORS = ("l0", "uniform", "energy", "reinforce", "svd")
#: Ranks never start above this: beyond it training cost grows with no gain on small models.
MAX_RANK = 64


def _total(the_plan: CompressionPlan, ranks_of: dict[str, list[int]], decomp: str) -> int:
    """Model size at these ranks; a layer that would not shrink is counted dense (it will be)."""
    total = the_plan.dense_params
    for lp in the_plan.layers:
        total += min(layer_size(lp, ranks_of[lp.name], decomp), lp.params_before) - lp.params_before
    return total


def uniform_ranks(the_plan: CompressionPlan, target: float, decomp: str) -> int:
    """Set every layer to the largest single rank whose model meets ``target``."""
    for r in range(MAX_RANK, 0, -1):
        ranks = {lp.name: tn.resolve_ranks(r, plan_modes(lp), decomp) for lp in the_plan.layers}
        if the_plan.dense_params / _total(the_plan, ranks, decomp) >= target:
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
        w = weight_tensor(lp.kind, layer_weight(module, lp), math.prod(lp.tensorization[0]) if lp.kind == "embedding" else None)
        spectra = unfolding_spectra(w, modes, caps)
        ranks = [min(caps[k], len(spectra[k])) for k in range(len(modes) - 1)] + [1]
        state[lp.name] = (lp, spectra, ranks)
    ranks_of = {name: st[2] for name, st in state.items()}
    while the_plan.dense_params / _total(the_plan, ranks_of, "tt") < target:
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
    """Turn every planned layer into a plain two-factor (matrix) factorization."""
    for lp in the_plan.layers:
        if lp.kind == "conv2d":
            lp.tensorization = ((lp.shape[1],), (lp.shape[0],))
            lp.merge_spatial = True
        elif lp.kind == "linear":
            lp.tensorization = ((lp.shape[1],), (lp.shape[0],))
        else:  # embedding: (V x D)
            lp.tensorization = ((lp.shape[0],), (lp.shape[1],))
