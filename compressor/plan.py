"""What a run decided, as values: the plan, where each layer lives, how each layer starts,
and the one size arithmetic every other module counts with.

The planner (:mod:`compressor.planner`) makes a :class:`CompressionPlan` (which layers become
factorized, which stay dense and why); a rank selector returns :class:`Starts` (each planned
layer's layout, ranks, decomposition and whitening factors); :func:`~compressor.surgery.apply`
builds the factorized model from both. All three are frozen: a later stage makes a new value,
it never fills in an earlier stage's object.

Sizes are tensor elements of what a checkpoint saves (cores, biases, kept buffers such as an
embedding's padding row), a tensor shared under several names once. Every size a selector, the
target check or the report needs comes from the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import tensornet as tn
from .layers import layer_class

#: (input-side modes, output-side modes) of a layer's weight.
Tensorization = tuple[tuple[int, ...], tuple[int, ...]]
#: One rank for every bond, or one per bond (closing bond included).
Ranks = int | tuple[int, ...] | list[int]


@dataclass(frozen=True)
class LayerPlan:
    """One layer that will be factorized, as the planner decided it."""

    name: str  # module path in the compressed model
    kind: str
    shape: tuple[int, ...]  # original weight shape
    tensorization: Tensorization  # the kind's balanced split, or the user's
    rank: Ranks | None  # the user's rank (int or bond sizes), None: the rank selector chooses
    params_before: int  # weight + bias
    weight_attr: str | None = None  # graph source: the parameter the aten call reads
    bias_attr: str | None = None
    tied: tuple[str, ...] = ()  # modules sharing this weight: they will compute from the same cores
    extra: int = 0  # elements the factorized layer saves beside cores and bias (an embedding's padding row)
    paired: bool = False  # an mpo layout: core k carries input mode k and output mode k (tensorization="mpo")


@dataclass(frozen=True)
class Skipped:
    name: str
    kind: str
    reason: str


@dataclass(frozen=True)
class CompressionPlan:
    source: str  # "module" (torch.fx), "export" (torch.export analysis), "module-walk" (neither) or "graph"
    layers: tuple[LayerPlan, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    dense_params: int = 0  # tensor elements of the dense model's state (see count_state)

    def leaving_dense(self, kept: Iterable[Skipped]) -> CompressionPlan:
        """This plan with the layers in ``kept`` moved to ``skipped`` (after the planner's own
        entries): what a selector that keeps some planned layers dense leaves to build."""
        kept = tuple(kept)
        names = {s.name for s in kept}
        return replace(self, layers=tuple(lp for lp in self.layers if lp.name not in names),
                       skipped=self.skipped + kept)


@dataclass(frozen=True)
class Site:
    """Where a factorized layer lives: its module path and, in a ``torch.export`` graph,
    the parameter attributes its aten call read (they tell the checkpoint loader which
    call to replace in the base program)."""

    name: str
    weight_attr: str | None = None
    bias_attr: str | None = None

    @property
    def in_graph(self) -> bool:
        return self.weight_attr is not None


# ------------------------------------------------------------------ how a layer starts
@dataclass(frozen=True)
class Layout:
    """One way to lay out a layer's weight: tensorization, merged conv window, core modes, and
    whether the cores pair input and output modes (an mpo layout: core k carries ``i_k o_k``)
    or hold the input modes first and the output modes after."""

    tensorization: Tensorization
    merge_spatial: bool
    modes: tuple[int, ...]
    paired: bool = False


def layout_of(lp: LayerPlan, tensorization: Tensorization, merge_spatial: bool = False,
              paired: bool | None = None) -> Layout:
    """``lp``'s weight laid out as ``tensorization`` (its kind says the core modes), paired as the
    plan says unless ``paired`` is given (a two-factor matrix layout is never paired)."""
    paired = lp.paired if paired is None else paired
    modes = layer_class(lp.kind).core_modes(lp.shape, tensorization, merge_spatial, paired)
    return Layout(tensorization, merge_spatial, tuple(modes), paired)


def own_layout(lp: LayerPlan) -> Layout:
    """The layout the plan gave the layer (its kind's balanced or paired split, or the user's)."""
    return layout_of(lp, lp.tensorization)


@dataclass(frozen=True)
class LayerStart:
    """What one planned layer is built from: its layout, starting ranks and decomposition, and
    the whitening factors its cores are fitted with (``whiten``: the input factor ``L`` of a
    start fitted to the layer's outputs; ``whiten_out``: a tied embedding's head factor; see
    calibration.py). The refit at the freeze fits the cores the same way again."""

    name: str
    layout: Layout
    ranks: Ranks
    decomp: str
    whiten: torch.Tensor | None = field(default=None, compare=False)
    whiten_out: torch.Tensor | None = field(default=None, compare=False)


@dataclass(frozen=True, eq=False)
class StartFactors:
    """Whitening factors from a calibration pass (calibration.py), for a start fitted to
    activations: ``inputs``, ``{layer: input factor L}`` of the planned layers observed, and
    ``heads``, ``{tied embedding: L_out}``, the factor of the summed input Gram matrices of the
    Linear heads that share its weight."""

    inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    heads: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Starts:
    """A rank selector's answer: how every layer it builds starts (in plan order), and the
    planned layers it keeps dense, with the reason (svd-llm's embeddings)."""

    layers: tuple[LayerStart, ...]
    dense: tuple[Skipped, ...] = ()

    def of(self, name: str) -> LayerStart:
        """The start of the planned layer ``name``."""
        for st in self.layers:
            if st.name == name:
                return st
        raise KeyError(f"no start for layer {name!r}")


def planned_starts(the_plan: CompressionPlan, decomp: str, ranks: Mapping[str, Ranks] | None = None) -> Starts:
    """Every planned layer started in its own layout at ``ranks`` (default: the plan's, a rank
    the user set), built as ``decomp``."""
    return Starts(tuple(LayerStart(lp.name, own_layout(lp), lp.rank if ranks is None else ranks[lp.name], decomp)
                        for lp in the_plan.layers))


# ------------------------------------------------------------------ sizes
def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's data: a tensor shared under several names (tied weights) is one."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())


def count_state(module: nn.Module, exclude: Callable[[str], bool] = lambda name: False) -> int:
    """Elements of everything a checkpoint of ``module`` holds: every state tensor (parameters
    and persistent buffers such as BatchNorm statistics), a tensor shared under several names
    once. This is what a compression ratio is counted on."""
    seen, total = set(), 0
    for name, t in module.state_dict(keep_vars=True).items():
        key = tensor_key(t)
        if key not in seen and not exclude(name):
            seen.add(key)
            total += t.numel()
    return total


def count_params(module: nn.Module) -> int:
    """Parameters that matter at inference: every parameter, each shared tensor once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def plan_modes(lp: LayerPlan, layout: Layout | None = None) -> tuple[int, ...]:
    """Core modes the planned layer will have (in ``layout``, default the plan's own)."""
    return (layout or own_layout(lp)).modes


def layer_size(lp: LayerPlan, ranks: Ranks, decomp: str, layout: Layout | None = None) -> int:
    """Elements the planned layer saves at ``ranks`` (an int or bond list) in ``layout``
    (default: the plan's own): cores, bias and any buffer it keeps (an embedding's padding row)."""
    modes = plan_modes(lp, layout)
    cores = tn.param_count(modes, tn.resolve_ranks(ranks, modes, decomp))
    return cores + lp.params_before - math.prod(lp.shape) + lp.extra


def plan_params(the_plan: CompressionPlan, ranks_of: Mapping[str, Ranks], decomp: str,
                layouts: Mapping[str, Layout] | None = None, dense_if_larger: bool = True) -> int:
    """Model size with every planned layer at ``ranks_of[name]`` (in ``layouts[name]`` when
    given); a layer that would not shrink is counted dense (it will be), unless
    ``dense_if_larger`` is off (a start is built at its size whatever it is)."""
    total = the_plan.dense_params
    for lp in the_plan.layers:
        size = layer_size(lp, ranks_of[lp.name], decomp, (layouts or {}).get(lp.name))
        total += (min(size, lp.params_before) if dense_if_larger else size) - lp.params_before
    return total


def min_params(the_plan: CompressionPlan, decomp: str) -> int:
    """Smallest size reachable: every factorized bond at rank 1, everything else dense."""
    return plan_params(the_plan, {lp.name: 1 for lp in the_plan.layers}, decomp)


def params_with_cores(the_plan: CompressionPlan, cores: Mapping[str, int], decomp: str) -> int:
    """Model size with the layers in ``cores`` holding that many core elements in place of
    their weight (bias kept) and the others at the plan's ranks: a faithful start's size."""
    total = the_plan.dense_params
    for lp in the_plan.layers:
        if lp.name in cores:
            total += cores[lp.name] - math.prod(lp.shape)
        else:
            total += min(layer_size(lp, lp.rank, decomp), lp.params_before) - lp.params_before
    return total
