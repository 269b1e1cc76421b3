"""Rank selectors: how a run picks its starting ranks, and whether gates then learn them.

One registry maps a name (``--rank-select``, ``rank_select=``) to a selector object;
nothing else in the package checks selector names. Each selector says

* how it lays out and sizes each planned layer (:meth:`RankSelector.prepare`), and
* which gate sits on every bond (:attr:`RankSelector.gate`; ``None``: no gates, the
  ranks are final and training is the plain fine-tune).

Registered here:

* ``l0`` (the method): a faithful start, ℓ0 gates learn what to give up. Every layer
  starts with the layout (tensorization, down to a plain matrix) and bond sizes that
  reproduce its pretrained weight within :data:`START_ERROR` at the fewest parameters,
  never above its dense size (:func:`faithful_start`), so the gated model at step 0
  computes what the original does; a layer no layout reproduces within its dense size
  starts as close as that size allows, and is listed as unfaithful.
* ``reinforce``: the same start, true Bernoulli gates trained by REINFORCE
  (supplementary §2.1), the ablation the paper compares against.
* ``uniform`` (TRN): one rank for every bond, the largest that meets the target.
* ``energy``: per-bond ranks from the singular values of the pretrained weights alone,
  allocated greedily across all layers (drop the slice that loses the least relative
  energy per parameter saved) until the whole model meets the target.
* ``svd``: no tensor network: every weight as two low-rank factors (a conv as a
  kh x kw conv to r channels, then a 1 x 1 conv), ranks allocated like ``energy``.
* ``whitened-svd``: two factors fitted to each layer's outputs on calibration inputs
  (SVD-LLM's whitening), ranks by one global threshold on relative output energy.
* ``svd-llm``: the same factors at SVD-LLM's own allocation: one share of parameters
  kept in every layer, embeddings dense.

Registered in their own module:

* ``pstrn`` (:mod:`compressor.pstrn`): PSTRN's progressive genetic search over ring ranks
  (Li et al., 2021), each candidate briefly trained and scored. It is the one selector that
  *searches*: it declares :attr:`RankSelector.searches`, and the run hands its ``prepare`` a
  :class:`Search` (a ``trial`` that trains a candidate, and the steps it may spend).
* ``mars`` (:mod:`compressor.mars`): ``l0``'s start and target controller with MARS's
  relaxed-Bernoulli masks and their Bernoulli prior (Kodryan et al., AISTATS 2023) in place of
  the ℓ0 gates, the comparator of supplementary Fig. 1; it prescribes its penalty
  (:attr:`RankSelector.penalty`).

A new selector is a subclass with ``name=...``: ``class Mine(RankSelector, name="mine")``.
A selector never changes the plan: :meth:`RankSelector.prepare` returns how every layer
starts (:class:`~compressor.plan.Starts`), with its :class:`FaithfulStart` for the report.
Selectors read only :class:`SelectorOptions`, built from the run's config by
``CompressConfig.selector_options()``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from . import tensornet as tn
from .errors import CompressorError, ConfigError, TargetError
from .gates import BernoulliGate, Gate, L0Gate, start_margin
from .layers import layer_class, whitened_tensor
from .plan import (CompressionPlan, LayerPlan, LayerStart, Layout, Ranks, Skipped, StartFactors, Starts, layer_size,
                   layout_of, own_layout, params_with_cores, plan_modes, plan_params, planned_starts)
from .surgery import layer_weight

#: The uniform baseline never uses a bond above this: beyond it training cost grows with no
#: gain on small models. energy and svd allocate from full rank (a cap would leave them far
#: past a mild target on a wide model); the gated selectors start where the weights say.
MAX_RANK = 64


@dataclass(frozen=True)
class SelectorOptions:
    """What a selector reads of a run's options (``CompressConfig.selector_options()``).

    ``target``: the ratio to meet; ``decomp``: the run's decomposition; ``sigma`` and
    ``gate_margin``: the gates' noise and how far above 1 their means start; ``rank``: a rank
    the user set for every layer; ``start``, ``start_error``, ``init``: how a gated start is
    chosen and fitted; ``fixed_layouts``: layers whose tensorization the user set.
    """

    target: float
    decomp: str
    sigma: float
    gate_margin: float | None
    rank: int | None
    start: str
    start_error: float
    init: str
    fixed_layouts: tuple[str, ...]


# ------------------------------------------------------------------ unfolding spectra (TT-SVD error terms)
def unfolding_spectrum(tensor: torch.Tensor, left: int) -> torch.Tensor:
    """Squared singular values of the (left x rest) unfolding, relative to ||W||^2
    (a TT-SVD error term: the energy beyond rank r is what truncating that bond loses)."""
    t = tensor.detach().to(torch.float64).reshape(-1)
    return tn.squared_singular_values(t.reshape(left, -1)) / (float(t @ t) or 1.0)


def unfolding_spectra(tensor: torch.Tensor, modes: tuple[int, ...], caps: list[int]) -> list[torch.Tensor]:
    """:func:`unfolding_spectrum` of each inner unfolding of ``modes``, the first ``caps[k]`` values."""
    return [unfolding_spectrum(tensor, math.prod(modes[: k + 1]))[: caps[k]] for k in range(len(modes) - 1)]


# ------------------------------------------------------------------ faithful start (gated selectors)
#: Relative Frobenius error (TT-SVD bound) each layer's starting factorization may have:
#: the gated model at step 0 then computes what the dense one does (config ``start_error``).
START_ERROR = 0.02

#: The most faithful start a run is tightened to when the ``START_ERROR`` start already
#: meets the target: the spare budget buys fidelity instead of a ratio nobody asked for.
TIGHTEST_ERROR = 1e-4


@dataclass(frozen=True)
class FaithfulLayer:
    """A layer's faithful starting factorization, as the report lists it."""

    name: str
    layout: Layout
    ranks: tuple[int, ...]  # every bond, closing bond (1) included
    params: int  # core parameters (bias excluded)
    dense: int  # weight elements of the dense layer
    error: float  # bound on ||W - W_start|| / ||W|| (of the whitened weight when ``whitened``)
    faithful: bool  # error within the run's tolerance (the size is within dense either way)
    whitened: bool = False  # fitted to the layer's outputs on calibration inputs (see calibration.py)
    head_weighted: bool = False  # a tied embedding fitted to what its LM head sees as well


@dataclass(frozen=True)
class FaithfulStart:
    """What :func:`faithful_start` chose, for the report.

    ``unfaithful`` lists layers no layout reproduces within ``eps`` inside their dense
    size (each in the plan's own layout at its best error within dense); ``gates_idle`` says the start already
    meets the target, so the gates have nothing to give up. ``used_eps`` is below ``eps``
    when a start at ``eps`` would have overshot the target and the run started more
    faithful instead. Layers with a rank set by the user are not listed.
    """

    eps: float
    used_eps: float
    target: float
    ratio: float  # whole model at step 0
    layers: tuple[FaithfulLayer, ...]
    chosen: str = "faithful"  # "ladder" when start="auto" found unfaithful layers and used the ladder

    @property
    def unfaithful(self) -> list[FaithfulLayer]:
        return [s for s in self.layers if not s.faithful]

    @property
    def gates_idle(self) -> bool:
        return self.ratio >= self.target


#: ``trial(starts, steps) -> loss``: a candidate built from ``starts`` (ungated), trained
#: ``steps`` optimiser steps on the run's data and scored by its task loss on held-back batches
#: (lower is better). Made by :func:`compressor.trials.candidate_trial`.
Trial = Callable[[Starts, int], float]


@dataclass(frozen=True)
class Search:
    """What a searching selector is given to choose with: ``trial`` (:data:`Trial`), the
    ``budget`` of optimiser steps all its trials together may train, and the ``seed`` its own
    draws start from. The run gives it only to a selector that declares
    :attr:`RankSelector.searches`, and takes :meth:`RankSelector.search_steps` of the budget off
    the fine-tune that follows."""

    trial: Trial
    budget: int
    seed: int


class Prepared(NamedTuple):
    """What :meth:`RankSelector.prepare` chose: how every layer starts, and (gated selectors)
    the faithful start for the report."""

    starts: Starts
    faithful: FaithfulStart | None = None


def _coarser(side: tuple[int, ...]) -> list[tuple[int, ...]]:
    """``side`` and the balanced splits of its product into fewer modes, down to one."""
    side = tuple(m for m in side if m > 1) or (1,)
    n = math.prod(side)
    return list(dict.fromkeys([side] + [tn.factorize(n, k, max_factor=n) for k in range(len(side) - 1, 0, -1)]))


def candidate_layouts(lp: LayerPlan) -> list[Layout]:
    """The plan's layout (first) and coarser ones with fewer, larger modes, down to a plain matrix.

    Mode counts are tried per side (input, output) independently; a conv is also tried
    with its kernel window merged into the input mode when its kind offers that layout.
    A paired (mpo) plan keeps its own layout only: the user asked for that structure, and a
    coarser split of one side would unpair it.
    """
    if lp.paired:
        return [own_layout(lp)]
    cls = layer_class(lp.kind)
    (m_in, m_out), m_merge = cls.matrix_layout(lp.shape)
    sides_in = list(dict.fromkeys(_coarser(tuple(lp.tensorization[0])) + [tuple(m_in)]))
    sides_out = list(dict.fromkeys(_coarser(tuple(lp.tensorization[1])) + [tuple(m_out)]))
    own = own_layout(lp)
    found: dict[tuple[int, ...], Layout] = {own.modes: own}
    for merge in dict.fromkeys((own.merge_spatial, m_merge)):
        for a in sides_in:
            for b in sides_out:
                try:
                    tz = cls.tensorization(lp.shape, (a, b))
                    modes = tuple(cls.core_modes(lp.shape, tz, merge))
                except CompressorError:
                    continue
                if len(modes) >= 2 and modes not in found:
                    found[modes] = Layout(tz, merge, modes)
    return list(found.values())


def single_input_core(lay: Layout) -> bool:
    """Whether the layout keeps the whole input in one core, where a whitening folds back exactly
    (never a paired layout's: its one input core also holds output modes)."""
    return not lay.paired and len([m for m in lay.tensorization[0] if m > 1]) == 1


def single_output_core(lay: Layout) -> bool:
    """Whether the layout keeps the whole output in one core, where a head's factor folds back."""
    return not lay.paired and len([m for m in lay.tensorization[1] if m > 1]) == 1


def truncation_paths(lp: LayerPlan, module: nn.Module, layouts: list[Layout], whiten: torch.Tensor | None = None,
                     whiten_out: torch.Tensor | None = None) -> list[tuple[Layout, tn.TruncationPath]]:
    """Each layout's TT-SVD truncation path from the layer's pretrained weight (whitened by the
    input factor ``whiten`` when given, and by a tied head's ``whiten_out``: then the errors are
    relative output errors).

    Layouts share unfoldings (the in|out split is the weight matrix itself for all of
    them), so each unfolding's spectrum is computed once per layer.
    """
    cls = layer_class(lp.kind)
    weight = layer_weight(module, lp)
    spectra: dict[tuple[int, int], torch.Tensor] = {}
    flats: dict[int, torch.Tensor] = {}  # by padded size: an embedding's layouts may pad its vocabulary
    out = []
    for lay in layouts:
        w = cls.layout_tensor(weight, lay.tensorization, lay.paired).detach()
        if w.numel() not in flats:  # whitened once per size: the matrix does not depend on the split
            flats[w.numel()] = (whitened_tensor(w, whiten, whiten_out) if whiten is not None
                                else w.to(torch.float64)).reshape(-1)
        flat = flats[w.numel()]
        bonds = []
        for k in range(len(lay.modes) - 1):
            key = (flat.numel(), math.prod(lay.modes[: k + 1]))
            if key not in spectra:
                spectra[key] = unfolding_spectrum(flat, key[1])
            bonds.append(spectra[key])
        out.append((lay, tn.TruncationPath(lay.modes, bonds)))
    return out


def pick_start(lp: LayerPlan, paths: list[tuple[Layout, tn.TruncationPath]], eps: float,
               whitened: bool = False, least_error: bool = False) -> FaithfulLayer:
    """The smallest start within ``eps`` and the dense size (ties: fewer modes).

    When no layout gets there and ``least_error`` is set (a start fitted to activations,
    which aims at output fidelity throughout), the layer takes the layout with the least
    error within dense; otherwise it keeps the plan's own layout (``paths[0]``) at
    its most faithful size within dense, marked unfaithful. Such a weight is far from
    every layout, so reconstruction error no longer tells them apart; what matters then
    is where the gates end. Measured on the digits net (fc1 noise-dominated), the matrix
    layout is a hair better in error at every size yet, cut to 20x, leaves a rank-2
    bottleneck (46 % accuracy) where the balanced tensorization keeps rank 6 (93 %).
    """
    dense = math.prod(lp.shape)
    best = None
    for lay, path in paths:
        step = path.within_error(eps)
        key = (int(path.sizes[step]), len(lay.modes))
        if path.error(step) <= eps and path.sizes[step] <= dense and (best is None or key < best[0]):
            best = (key, lay, path, step)
    if best is None:
        best = min((_within_dense(lay, path, dense) for lay, path in (paths if least_error else paths[:1])),
                   key=lambda b: b[0])
    _, lay, path, step = best
    return FaithfulLayer(lp.name, lay, tuple(path.ranks(step)), int(path.sizes[step]), dense, path.error(step),
                      path.error(step) <= eps, whitened)


def _within_dense(lay: Layout, path: tn.TruncationPath, dense: int) -> tuple[tuple[float, int], Layout, Any, int]:
    """(sort key: error, modes), layout, path and step of ``path``'s most faithful size within dense."""
    step = path.within_size(dense)
    step = len(path.sizes) - 1 if step is None else step
    return (path.error(step), len(lay.modes)), lay, path, step


def _start_params(the_plan: CompressionPlan, starts: Mapping[str, FaithfulLayer], decomp: str) -> int:
    """Model size with ``starts`` for the chosen layers and the plan's ranks for the others."""
    return params_with_cores(the_plan, {name: st.params for name, st in starts.items()}, decomp)


def faithful_start(the_plan: CompressionPlan, module: nn.Module, target: float, decomp: str,
                   eps: float = START_ERROR, fixed_layouts: Iterable[str] = (),
                   whiten: StartFactors | None = None, least_error: bool = False) -> Prepared:
    """Lay out and size every planned layer without a rank so it reproduces its weight.

    Each layer gets, over :func:`candidate_layouts` (only the plan's own for names in
    ``fixed_layouts``: a user's tensorization), the fewest parameters whose TT-SVD is
    within ``eps`` relative Frobenius error, never more than the dense weight
    (:func:`pick_start`). If that start already meets ``target``, the layouts stay and
    ``eps`` is tightened (down to :data:`TIGHTEST_ERROR`) to the loosest start that does
    not, so the gates make the last cuts. The start is a train (closing bond 1, built as
    ``"tt"``): a one-slice closing gate could only switch the whole layer off. Returns the
    starts (a layer with the user's rank in its own layout, built as ``decomp``) and what it
    chose. ``least_error``: a layer no layout reproduces takes the layout with the least error
    within its dense size (always so with ``whiten``). A tied embedding with a head factor in
    ``whiten.heads`` keeps its whole output in one core too, and is fitted to both sides.
    """
    by_name = {lp.name: lp for lp in the_plan.layers}
    layouts, factors, heads = _start_layouts(the_plan, set(fixed_layouts), whiten)
    paths = {name: truncation_paths(by_name[name], module, lays, factors.get(name), heads.get(name))
             for name, lays in layouts.items()}

    def pick(name: str, p: list[tuple[Layout, tn.TruncationPath]], e: float) -> FaithfulLayer:
        return pick_start(by_name[name], p, e, name in factors, least_error=bool(factors) or least_error)

    starts = {name: pick(name, p, eps) for name, p in paths.items()}
    used = eps
    if starts and the_plan.dense_params / _start_params(the_plan, starts, decomp) >= target:
        chosen = {name: [next(pair for pair in paths[name] if pair[0] == st.layout)] for name, st in starts.items()}

        def ratio_at(e: float) -> float:
            trial = {name: pick(name, p, e) for name, p in chosen.items()}
            return the_plan.dense_params / _start_params(the_plan, trial, decomp)

        used = _loosest_below(ratio_at, target, TIGHTEST_ERROR, eps)
        starts = {name: pick(name, p, used) for name, p in chosen.items()}
    # Faithful means within the error asked for, even when the start was tightened below it.
    starts = {name: replace(st, faithful=st.error <= eps, head_weighted=name in heads) for name, st in starts.items()}
    built = Starts(tuple(LayerStart(lp.name, starts[lp.name].layout, starts[lp.name].ranks, "tt", factors.get(lp.name),
                                    heads.get(lp.name)) if lp.name in starts
                         else LayerStart(lp.name, own_layout(lp), lp.rank, decomp) for lp in the_plan.layers))
    ratio = the_plan.dense_params / _start_params(the_plan, starts, decomp)
    return Prepared(built, FaithfulStart(eps, used, target, ratio, tuple(starts.values())))


def _start_layouts(the_plan: CompressionPlan, fixed: set[str], whiten: StartFactors | None) -> tuple[
        dict[str, list[Layout]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The layouts a faithful start tries for every layer without a rank, and the whitening
    factors it fits them with: input factors where a layout keeps the whole input in one core,
    a tied head's factor where one also keeps the whole output there."""
    layouts = {lp.name: [own_layout(lp)] if lp.name in fixed else candidate_layouts(lp)
               for lp in the_plan.layers if lp.rank is None}
    whiten = whiten or StartFactors()
    factors = {name: f for name, f in whiten.inputs.items()
               if name in layouts and any(single_input_core(lay) for lay in layouts[name])}
    for name in factors:
        layouts[name] = [lay for lay in layouts[name] if single_input_core(lay)]
    heads = {name: f for name, f in whiten.heads.items()
             if name in factors and any(single_output_core(lay) for lay in layouts[name])}
    for name in heads:
        layouts[name] = [lay for lay in layouts[name] if single_output_core(lay)]
    return layouts, factors, heads


def _loosest_below(ratio_at: Callable[[float], float], target: float, low: float, high: float) -> float:
    """The largest error in [low, high] whose start stays below ``target`` (bisection in
    log error; the ratio grows with the error), or ``low`` if even that start meets it."""
    if ratio_at(low) >= target:
        return low
    for _ in range(24):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if ratio_at(mid) < target else (low, mid)
    return low


# ------------------------------------------------------------------ hand-set ranks (baselines)


def uniform_ranks(the_plan: CompressionPlan, target: float, decomp: str) -> dict[str, list[int]]:
    """Every layer's bonds at the largest single rank whose model meets ``target``."""
    for r in range(MAX_RANK, 0, -1):
        ranks = {lp.name: tn.resolve_ranks(r, plan_modes(lp), decomp) for lp in the_plan.layers}
        if the_plan.dense_params / plan_params(the_plan, ranks, decomp) >= target:
            return ranks
    raise TargetError(f"no uniform rank reaches {target:g}x")


def energy_ranks(the_plan: CompressionPlan, module: nn.Module, target: float,
                 layouts: Mapping[str, Layout] | None = None) -> dict[str, list[int]]:
    """Greedy global truncation by singular-value energy per parameter (closing bond 1), of
    every layer in ``layouts[name]`` (default: the plan's own layout).

    Every bond starts at its full TT-SVD rank; the slice that loses the least relative
    energy per parameter saved is dropped until the whole model meets ``target``. A heap
    keeps this fast on LLMs (hundreds of layers, bonds in the hundreds): only the bonds of
    the layer just cut are re-scored (a bond's saving depends on its neighbours).
    """
    layouts = {lp.name: (layouts or {}).get(lp.name) or own_layout(lp) for lp in the_plan.layers}
    state: dict[str, tuple[LayerPlan, list[torch.Tensor], list[int]]] = {}
    for lp in the_plan.layers:
        modes = layouts[lp.name].modes
        caps = tn.max_ranks(modes, "tt")
        w = layer_class(lp.kind).layout_tensor(layer_weight(module, lp), layouts[lp.name].tensorization,
                                               layouts[lp.name].paired)
        spectra = unfolding_spectra(w, modes, caps)
        state[lp.name] = (lp, spectra, [min(caps[k], len(spectra[k])) for k in range(len(modes) - 1)] + [1])

    def size(lp: LayerPlan, ranks: list[int]) -> int:
        return layer_size(lp, ranks, "tt", layouts[lp.name])

    counted = {name: min(size(lp, ranks), lp.params_before) for name, (lp, _, ranks) in state.items()}
    total = plan_params(the_plan, {name: ranks for name, (_, _, ranks) in state.items()}, "tt", layouts)
    version = dict.fromkeys(state, 0)
    heap: list[tuple[float, int, str, int]] = []

    def push_bonds(name: str) -> None:
        lp, spectra, ranks = state[name]
        now = size(lp, ranks)
        for k in range(len(ranks) - 1):
            if ranks[k] > 1:
                trial = list(ranks)
                trial[k] -= 1
                saved = now - size(lp, trial)
                if saved > 0:
                    heapq.heappush(heap, (float(spectra[k][ranks[k] - 1]) / saved, version[name], name, k))

    for name in state:
        push_bonds(name)
    while the_plan.dense_params / total < target:
        if not heap:
            raise TargetError(f"energy allocation cannot reach {target:g}x")
        _, seen, name, k = heapq.heappop(heap)
        if seen != version[name]:
            continue  # scored before this layer's last cut
        lp, _, ranks = state[name]
        ranks[k] -= 1
        now = min(size(lp, ranks), lp.params_before)
        total += now - counted[name]
        counted[name] = now
        version[name] += 1
        push_bonds(name)
    return {name: list(ranks) for name, (_, _, ranks) in state.items()}


def matrix_layout(lp: LayerPlan) -> Layout:
    """The layer as a plain two-factor matrix: one input mode, one output mode (a conv's
    kernel window merged into its input)."""
    tensorization, merge_spatial = layer_class(lp.kind).matrix_layout(lp.shape)
    return layout_of(lp, tensorization, merge_spatial, paired=False)


def svd_layout(the_plan: CompressionPlan) -> dict[str, Layout]:
    """Every planned layer's :func:`matrix_layout` (built as a two-factor tensor train: a
    two-core ring would be a trace of a product, not a matrix factorization)."""
    return {lp.name: matrix_layout(lp) for lp in the_plan.layers}


def matrix_spectrum(lp: LayerPlan, module: nn.Module, whiten: torch.Tensor | None = None) -> torch.Tensor:
    """Relative squared singular values of a layer in its matrix layout (of the whitened
    weight, whose truncation error is the output error, when ``whiten`` is given)."""
    cls = layer_class(lp.kind)
    lay = matrix_layout(lp)
    w = cls.weight_tensor(layer_weight(module, lp), lay.tensorization)
    if whiten is not None:
        w = whitened_tensor(w, whiten)
    return unfolding_spectrum(w, lay.modes[0])


def threshold_ranks(the_plan: CompressionPlan, spectra: Mapping[str, torch.Tensor], target: float) -> dict[str, int]:
    """Matrix ranks keeping every slice whose relative energy per parameter is above one
    global threshold, the loosest that meets ``target`` (bisection: the size shrinks as the
    threshold rises). A layer is never cut below rank 1; one not smaller than dense counts dense."""
    layouts = svd_layout(the_plan)
    value = {lp.name: spectra[lp.name] / sum(layouts[lp.name].modes) for lp in the_plan.layers}

    def ranks_at(tau: float) -> dict[str, int]:
        return {name: max(1, int((v >= tau).sum())) for name, v in value.items()}

    def ratio(tau: float) -> float:
        ranks = {n: [r, 1] for n, r in ranks_at(tau).items()}
        return the_plan.dense_params / plan_params(the_plan, ranks, "tt", layouts)

    positive = [float(v[v > 0].min()) for v in value.values() if bool((v > 0).any())]
    low, high = (min(positive), max(float(v.max()) for v in value.values()) * 2) if positive else (0.0, 1.0)
    if ratio(high) < target:
        raise TargetError(f"no allocation of matrix ranks reaches {target:g}x")
    if ratio(low) >= target:
        return ranks_at(low)
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if ratio(mid) < target else (low, mid)
    return ranks_at(high)


# ------------------------------------------------------------------ the registry
# ------------------------------------------------------------------ the ladder (starts with no structure to keep)
#: Starting ranks tried when the weights hold no low-rank structure a faithful start could keep.
RANK_LADDER = (4, 6, 8, 12, 16, 20, 25, 32, 40, 48, 64)


def layer_rank_cap(lp: LayerPlan, decomp: str) -> int:
    """Largest ladder rank whose factorization is no bigger than the dense layer.

    Starting bigger than dense only costs time: those parameters would all have to be
    pruned again before the layer saves anything.
    """
    fitting = [r for r in RANK_LADDER if layer_size(lp, r, decomp) <= lp.params_before]
    return fitting[-1] if fitting else RANK_LADDER[0]


def planned_params(the_plan: CompressionPlan, rank: int, decomp: str) -> int:
    """Model size if every planned layer starts at ``rank`` (capped per layer), as built."""
    ranks = {lp.name: lp.rank if lp.rank is not None else min(rank, layer_rank_cap(lp, decomp))
             for lp in the_plan.layers}
    return plan_params(the_plan, ranks, decomp, dense_if_larger=False)


def generous_rank(the_plan: CompressionPlan, target: float, decomp: str) -> int:
    """The ladder rank a generous start gives every layer without an explicit rank: the
    first (from 16) whose whole model starts at no more than half the target ratio (the
    gates then choose which half to drop), else the top of the ladder."""
    for r in RANK_LADDER[4:]:  # at least 16
        if the_plan.dense_params / planned_params(the_plan, r, decomp) <= target / 2:
            return r
    return RANK_LADDER[-1]


def generous_layer_ranks(the_plan: CompressionPlan, target: float, decomp: str) -> dict[str, Ranks]:
    """Each layer's generous start: its explicit rank, else the :func:`generous_rank`, but
    never a start bigger than the layer was."""
    chosen = generous_rank(the_plan, target, decomp)
    return {lp.name: lp.rank if lp.rank is not None else min(chosen, layer_rank_cap(lp, decomp))
            for lp in the_plan.layers}


def _ladder_overshoots(the_plan: CompressionPlan, options: SelectorOptions) -> bool:
    """Whether the generous ladder would start the model already past ``options.target``."""
    ranks = generous_layer_ranks(the_plan, options.target, options.decomp)
    return the_plan.dense_params / plan_params(the_plan, ranks, options.decomp) >= options.target


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
    #: Whether ``prepare`` always needs the layers' input statistics (a calibration pass);
    #: gated selectors need them only with ``init="activations"``.
    calibrates: ClassVar[bool] = False
    #: Whether the selector lays every weight out as a two-factor matrix (no tensor network):
    #: then no other layout, an mpo one included, applies.
    two_factors: ClassVar[bool] = False
    #: Whether ``prepare`` trains candidates to choose (it then takes ``search=``, a :class:`Search`).
    searches: ClassVar[bool] = False
    #: The size penalty the selector's method prescribes (``"count"``: the gates' own
    #: ``penalty()`` summed, every slice alike), or None to let the run choose (``penalty``).
    penalty: ClassVar[str | None] = None

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            RankSelector.registry[name] = cls()

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        """How every planned layer starts (layout, ranks, decomposition, whitening); a gated
        selector adds the :class:`FaithfulStart` it chose (None when the user set the rank).
        ``whiten`` holds the factors of the layers observed on calibration data (init
        ``activations``)."""
        raise NotImplementedError

    def gate_factory(self, options: SelectorOptions, layers: int = 0) -> Callable[[int, torch.dtype], Gate] | None:
        """``make_gate(size, dtype)`` for the bonds of a model with ``layers`` factorized
        layers, or None for an ungated model."""
        return None

    def needs_calibration(self, options: SelectorOptions) -> bool:
        """Whether a run with ``options`` must observe the layers' inputs before ``prepare``."""
        return self.calibrates or (self.gated and options.init == "activations")

    def search_steps(self, budget: int) -> int:
        """The optimiser steps ``prepare`` trains when its :class:`Search` has ``budget`` (exactly:
        the run takes them off the fine-tune, so search and fine-tune spend the budget together)."""
        return 0


class L0Selector(RankSelector, name="l0"):
    help = "learned ℓ0 gates on every rank slice (the paper)"
    gate = L0Gate

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        """A faithful start when the weights allow one (``start="auto"``), else the ladder.

        When every layer can start within ``start_error`` of its pretrained weight, it does
        and the gates choose what to give up. Small CNN/MLP weights often cannot (a
        noise-dominated layer is not reproduced within its dense size); there a faithful
        start only buys a full-size matrix whose forced cuts hurt more, so ``auto`` falls
        back to the generous ladder. A start fitted to activations (``whiten``) is always
        kept: trained transformer weights are near full rank, but what their layers do on
        real inputs is not, and a ladder would throw that away. Nor is a ladder taken that
        would start past the target: on a wide model (an LLM at 1.5x) even its top rank, 64,
        is already ten times smaller, and the gates would have nothing to choose. Such a
        start takes each unfaithful layer's least-error layout within its dense size (as a
        start fitted to activations does): the plan's own ten-mode split of SmolLM2's
        embedding needs bonds of 2,548 there, and the run ran out of 24 GiB.
        """
        if options.rank is not None:
            return Prepared(planned_starts(the_plan, options.decomp))  # the plan carries the user's rank
        start = None
        observed = whiten is not None and bool(whiten.inputs)
        if options.start != "ladder":
            overshoots = options.start == "auto" and not observed and _ladder_overshoots(the_plan, options)
            faithful = faithful_start(the_plan, module, options.target, options.decomp, options.start_error,
                                      fixed_layouts=options.fixed_layouts, whiten=whiten, least_error=overshoots)
            start = faithful.faithful
            if options.start == "faithful" or not start.unfaithful or observed or overshoots:
                return faithful
            start = replace(start, chosen="ladder")
        ranks = generous_layer_ranks(the_plan, options.target, options.decomp)
        return Prepared(planned_starts(the_plan, options.decomp, ranks), start)

    def gate_factory(self, options: SelectorOptions, layers: int = 0) -> Callable[[int, torch.dtype], Gate]:
        mu = 1.0 + start_margin(options.gate_margin, layers) * options.sigma
        return lambda size, dtype: L0Gate(size, options.sigma, mu_init=mu, dtype=dtype)


class ReinforceSelector(L0Selector, name="reinforce"):
    help = "Bernoulli gates trained by REINFORCE (supplementary §2.1), M samples per step"
    gate = BernoulliGate

    def gate_factory(self, options: SelectorOptions, layers: int = 0) -> Callable[[int, torch.dtype], Gate]:
        return lambda size, dtype: BernoulliGate(size, dtype=dtype)


class UniformSelector(RankSelector, name="uniform"):
    help = "one rank for every bond, the largest that meets the target (TRN)"

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        ranks = uniform_ranks(the_plan, options.target, options.decomp)
        return Prepared(planned_starts(the_plan, options.decomp, ranks))


class EnergySelector(RankSelector, name="energy"):
    help = "singular values of the pretrained weights, allocated greedily over all layers"

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        ranks = energy_ranks(the_plan, module, options.target)
        return Prepared(planned_starts(the_plan, options.decomp, ranks))


class SVDSelector(RankSelector, name="svd"):
    help = "no tensor network: each weight as two low-rank factors, ranks allocated like energy"
    two_factors = True

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        layouts = svd_layout(the_plan)
        ranks = energy_ranks(the_plan, module, options.target, layouts)
        return Prepared(Starts(tuple(LayerStart(lp.name, layouts[lp.name], ranks[lp.name], "tt")
                                     for lp in the_plan.layers)))


class WhitenedSVDSelector(RankSelector, name="whitened-svd"):
    help = ("no tensor network: each weight as two factors fitted to its outputs on calibration inputs "
            "(SVD-LLM's whitening), ranks allocated over all layers")
    calibrates = True
    two_factors = True

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        """Matrix layout; each layer's whitened spectrum (its weight's, when it was not
        observed); one global threshold on relative output energy per parameter."""
        inputs = whiten.inputs if whiten is not None else {}
        spectra = {lp.name: matrix_spectrum(lp, module, inputs.get(lp.name)) for lp in the_plan.layers}
        return Prepared(matrix_starts(the_plan, threshold_ranks(the_plan, spectra, options.target), inputs))


def matrix_starts(the_plan: CompressionPlan, ranks: Mapping[str, int], whiten: Mapping[str, torch.Tensor]) -> Starts:
    """Every planned layer as two factors (:func:`matrix_layout`, a train) at its rank and, where
    it was observed, fitted with its input factor."""
    return Starts(tuple(LayerStart(lp.name, matrix_layout(lp), (ranks[lp.name], 1), "tt", whiten.get(lp.name))
                        for lp in the_plan.layers))


def same_ratio_ranks(the_plan: CompressionPlan, target: float) -> dict[str, int]:
    """Matrix ranks that keep one share of the parameters in every planned layer, the largest
    share that meets ``target`` (layers outside the plan count dense).

    A rank-r factorization of an m x n weight costs r(m + n), so a share p of the
    parameters is rank p·mn / (m + n), never below 1. The share is found by bisection (the
    model grows with it); ranks are rounded down, so the target holds.
    """
    layouts = svd_layout(the_plan)
    sides = {name: (lay.modes[0], math.prod(lay.modes[1:])) for name, lay in layouts.items()}

    def ranks_at(share: float) -> dict[str, int]:
        return {name: max(1, min(m, n, int(share * m * n / (m + n)))) for name, (m, n) in sides.items()}

    def ratio(share: float) -> float:
        ranks = {n: [r, 1] for n, r in ranks_at(share).items()}
        return the_plan.dense_params / plan_params(the_plan, ranks, "tt", layouts)

    if ratio(0.0) < target:
        raise TargetError(f"the same share in every layer cannot reach {target:g}x, even at rank 1 "
                          "with the embeddings dense")
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if ratio(mid) >= target else (low, mid)
    return ranks_at(low)


class SVDLLMSelector(WhitenedSVDSelector, name="svd-llm"):
    help = ("SVD-LLM as published: whitened two-factor truncation, the same share of parameters "
            "kept in every layer, embeddings left dense")

    def prepare(self, the_plan: CompressionPlan, module: nn.Module, options: SelectorOptions,
                whiten: StartFactors | None = None) -> Prepared:
        """Why a separate row: ``whitened-svd``'s global threshold compares relative energies
        across layers, which spends most of a mild target on a large embedding (SmolLM2's
        tied embedding, also its output head, went to rank 26 of 576 at 1.5x). SVD-LLM
        itself compresses every linear weight by the same ratio and never the embeddings:
        they are returned as kept dense, and the report lists them as skipped."""
        dense = tuple(Skipped(lp.name, lp.kind, "svd-llm leaves embeddings dense")
                      for lp in the_plan.layers if layer_class(lp.kind).lookup)
        kept = the_plan.leaving_dense(dense)
        starts = matrix_starts(kept, self.matrix_ranks(kept, options), whiten.inputs if whiten is not None else {})
        return Prepared(replace(starts, dense=dense))

    def matrix_ranks(self, the_plan: CompressionPlan, options: SelectorOptions) -> dict[str, int]:
        """The rank of every two-factor layer left in the plan: one share of parameters each
        (a benchmark's ablation puts other ranks on the same truncation here)."""
        return same_ratio_ranks(the_plan, options.target)


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
