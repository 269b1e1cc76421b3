"""The model pass: decide which layers become factorized (and why not), then swap them in.

Two kinds of model are understood:

* an ``nn.Module``: ``torch.fx.symbolic_trace`` tells which Linear / Conv2d / Embedding
  modules the forward actually calls; when tracing fails we warn and walk
  ``named_modules()`` instead.  Layers are swapped by attribute, so state-dict keys keep
  the user's names (``fc1.cores.0``).
* a ``torch.export`` program (or its ``.module()`` GraphModule): ``aten.linear`` /
  ``aten.conv2d`` / ``aten.embedding`` calls on parameters are found in the graph and
  replaced by ``call_module`` nodes of the factorized layer.

``plan`` and ``apply`` mutate nothing they are given: ``apply`` returns a new model and
where each layer went (:class:`Applied`).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx, nn

from . import tensornet as tn
from .errors import CompressorError, ModelError, first_line
from .layers import TNLayer, aten_layers, layer_class, layer_class_for

if TYPE_CHECKING:  # the config names selectors, whose module builds on this one
    from .config import CompressConfig

log = logging.getLogger(__name__)

#: ``make_gate(size, dtype)``: the gate a selector puts on a bond of ``size`` slices.
MakeGate = Callable[[int, torch.dtype], nn.Module]


@dataclass
class LayerPlan:
    """One layer that will be factorized."""

    name: str  # module path in the compressed model
    kind: str
    shape: tuple[int, ...]  # original weight shape
    tensorization: tuple[tuple[int, ...], tuple[int, ...]]
    rank: Any  # int or list of bond sizes (before feasibility capping)
    params_before: int  # weight + bias
    weight_attr: str | None = None  # graph source: the parameter the aten call reads
    bias_attr: str | None = None
    merge_spatial: bool = False  # conv only: one (C_in*kh*kw) mode instead of a spatial core
    decomp: str | None = None  # None: the run's decomposition


@dataclass
class Skipped:
    name: str
    kind: str
    reason: str


@dataclass
class CompressionPlan:
    source: str  # "module", "module-walk" (fx failed) or "graph"
    layers: list[LayerPlan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    dense_params: int = 0  # tensor elements of the dense model's state (see count_state)


# ------------------------------------------------------------------ model normalisation
def as_module(model: Any) -> nn.Module:
    """An ``nn.Module`` for any supported model object (ExportedProgram -> GraphModule)."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module):
        return model
    raise ModelError(f"expected an nn.Module or a torch.export program, got {type(model).__name__}")


def set_training(module: nn.Module, mode: bool) -> nn.Module:
    """``module.train(mode)``, also for torch.export modules that refuse it.

    An exported graph has its train/eval behaviour baked in, but our factorized layers
    inside it still need the flag (gates sample noise only in training).
    """
    try:
        module.train(mode)
    except NotImplementedError:
        for sub in module.modules():
            object.__setattr__(sub, "training", mode)
    return module


def is_graph_model(module: nn.Module) -> bool:
    """True for a GraphModule whose graph calls aten ops directly (a torch.export program)."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and n.target in aten_layers() for n in module.graph.nodes
    )


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


# ------------------------------------------------------------------ aten calls
def _aten_args(node: fx.Node) -> dict[str, Any]:
    """An aten call's arguments by name (the layer class knows the op's signature)."""
    return aten_layers()[node.target].aten_args(node)


def _get_attr(root: nn.Module, target: str) -> torch.Tensor:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------ candidates
@dataclass
class _Candidate:
    name: str
    cls: type[TNLayer]  # the factorized layer that would replace it
    module: nn.Module  # real module or stand-in
    weight: nn.Parameter  # the model's own parameter (a stand-in holds a detached view): identity of the weight
    weight_attr: str | None = None
    bias_attr: str | None = None
    direct_use: bool = False  # the forward also reads the weight outside this layer (e.g. F.linear(h, emb.weight))

    @property
    def kind(self) -> str:
        return self.cls.kind


def _module_candidates(model: nn.Module) -> tuple[list[_Candidate], str]:
    try:
        traced = fx.symbolic_trace(model)
        called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
        source = "module"
    except Exception as exc:  # any tracing failure: fall back, never crash
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({first_line(exc, 200)}); falling back to walking "
            "named_modules(): layers defined but unused in forward() may be compressed too",
            stacklevel=3,
        )
        called, source = None, "module-walk"
    read = {n.target for n in traced.graph.nodes if n.op == "get_attr"} if called is not None else set()
    cands = []
    for name, mod in model.named_modules():
        cls = layer_class_for(mod)
        if cls is None or (called is not None and name not in called):
            continue
        direct = any(f"{name}.{p}" in read for p, _ in mod.named_parameters())
        cands.append(_Candidate(name, cls, mod, mod.weight, direct_use=direct))
    return cands, source


def _graph_candidates(gm: fx.GraphModule) -> list[_Candidate]:
    cands = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in aten_layers():
            continue
        cls = aten_layers()[node.target]
        args = cls.aten_args(node)
        w, b = args.get("weight"), args.get("bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue  # weight computed at run time: nothing to factorize
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            continue
        weight = _get_attr(gm, w.target)
        if not isinstance(weight, nn.Parameter):
            continue  # a buffer or constant (e.g. a slim embedding's bounds table): not a learned weight
        bias = _get_attr(gm, b.target) if b is not None else None
        name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target.replace(".", "_")
        stand = cls.standin(weight, bias, args)
        direct = any(u.target not in aten_layers() for u in w.users)  # e.g. aten.t / matmul of a tied weight
        cands.append(_Candidate(name, cls, stand, weight, w.target, b.target if b is not None else None, direct))
    return cands


# ------------------------------------------------------------------ planning
def plan_modes(lp: LayerPlan) -> tuple[int, ...]:
    """Core modes the planned layer will have."""
    return layer_class(lp.kind).core_modes(lp.shape, lp.tensorization, lp.merge_spatial)


def layer_size(lp: LayerPlan, ranks: Any, decomp: str) -> int:
    """Parameters of the planned layer at ``ranks`` (an int or bond list), bias included."""
    modes = plan_modes(lp)
    return tn.param_count(modes, tn.resolve_ranks(ranks, modes, lp.decomp or decomp)) + lp.params_before - math.prod(lp.shape)


def layer_weight(module: nn.Module, lp: LayerPlan) -> torch.Tensor:
    """The dense weight a planned layer starts from (module or graph attribute)."""
    if lp.weight_attr:
        return _get_attr(module, lp.weight_attr)
    return module.get_submodule(lp.name).weight


def plan(model: Any, config: CompressConfig) -> CompressionPlan:
    """Decide what to factorize; mutates nothing."""
    module = as_module(model)
    graph = is_graph_model(module)
    if graph:
        cands, source = _graph_candidates(module), "graph"
    else:
        cands, source = _module_candidates(module)
    result = CompressionPlan(source=source, dense_params=count_state(module))
    owners: dict[int, list[str]] = {}
    for c in cands:
        owners.setdefault(id(c.weight), []).append(c.name)
    names = {c.name for c in cands}
    unknown = set(config.tensorization) | set(config.layer_ranks)
    if unknown - names:
        raise ModelError(f"per-layer options name unknown layers: {', '.join(sorted(unknown - names))} "
                         f"(eligible layers: {', '.join(sorted(names)) or 'none'})")
    planned_weights: set[int] = set()
    for c in cands:
        if id(c.weight) in planned_weights:
            continue  # one weight, one decision: a weight read by several calls is not planned twice
        planned_weights.add(id(c.weight))
        shape = tuple(c.module.weight.shape)
        skip = _skip_reason(c, config, owners)
        if skip is None:
            try:
                tz = c.cls.tensorization(shape, config.tensorization.get(c.name))
                modes = c.cls.core_modes(shape, tz)
                if len(modes) < 2:
                    skip = f"shape {shape} gives a single mode {modes}: nothing to factorize"
            except CompressorError as exc:
                if c.name in config.tensorization:
                    raise
                skip = str(exc)
        if skip is not None:
            result.skipped.append(Skipped(c.name, c.kind, skip))
            continue
        bias = getattr(c.module, "bias", None)
        params = c.module.weight.numel() + (bias.numel() if bias is not None else 0)
        rank = config.layer_ranks.get(c.name, config.rank)  # None: the rank selector chooses
        result.layers.append(LayerPlan(c.name, c.kind, shape, tz, rank, params, c.weight_attr, c.bias_attr))
    return result


def _skip_reason(c: _Candidate, config: CompressConfig, owners: dict[int, list[str]]) -> str | None:
    m = c.module
    if config.filter_fn is not None and not config.filter_fn(m, c.name):
        return "excluded by filter_fn"
    users = owners[id(c.weight)]
    if len(users) > 1:
        others = sorted(set(users) - {c.name})
        shared = f"shared with {', '.join(others)}" if others else f"used by {len(users)} calls"
        return f"weight {shared} (shared weights stay dense)"
    if c.direct_use:
        return "the forward also uses its weight directly, outside the layer (shared weights stay dense)"
    unsupported = c.cls.unsupported_reason(m)
    if unsupported is not None:
        return unsupported
    if m.weight.numel() < config.min_params and c.name not in config.tensorization and c.name not in config.layer_ranks:
        return f"too small to gain ({m.weight.numel()} weights < min_params={config.min_params})"
    return None


# ------------------------------------------------------------------ applying
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


@dataclass
class Applied:
    """What :func:`apply` did: the new model, and where each planned layer went.

    ``sites`` maps a plan's layer name to its site; a graph layer whose name was taken by
    a module holding other tensors lives under a new name (``fc1_tn``). Such a layer has
    no dense home in the model, so it must stay factorized (:attr:`homeless`).
    """

    model: nn.Module
    sites: dict[str, Site] = field(default_factory=dict)

    @property
    def homeless(self) -> set[str]:
        return {site.name for name, site in self.sites.items() if site.name != name}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _aten_node(gm: fx.GraphModule, weight_attr: str) -> fx.Node:
    """The aten call that reads the parameter ``weight_attr``."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in aten_layers():
            weight = _aten_args(n).get("weight")
            if isinstance(weight, fx.Node) and weight.target == weight_attr:
                return n
    raise ModelError(f"no Linear, Conv2d or Embedding call in this graph reads {weight_attr!r}")


def _graph_swap(gm: fx.GraphModule, site: Site, layer: TNLayer) -> None:
    """Replace the aten call reading ``site.weight_attr`` by a call to ``layer``."""
    node = _aten_node(gm, site.weight_attr)
    x = _aten_args(node)[layer.aten_input]
    set_submodule(gm, site.name, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(site.name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target in (site.weight_attr, site.bias_attr) and not n.users:
            gm.graph.erase_node(n)
    # The dense tensors must leave the model, or they would still be saved and counted.
    for attr in (site.weight_attr, site.bias_attr):
        if attr and attr.rpartition(".")[0] != site.name:
            owner_name, _, leaf = attr.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if hasattr(owner, leaf) and not any(n.op == "get_attr" and n.target == attr for n in gm.graph.nodes):
                delattr(owner, leaf)
    gm.graph.lint()
    gm.recompile()


def _graph_site(gm: nn.Module, lp: LayerPlan) -> Site:
    """``lp``'s site in a graph: its own name when the module there holds only the dense
    layer's tensors (``fc1`` keeping ``fc1.weight``), else a fresh ``<name>_tn``."""
    site = Site(lp.name, lp.weight_attr, lp.bias_attr)
    try:
        owner = gm.get_submodule(lp.name)
    except AttributeError:
        return site
    own = {n for n, _ in owner.named_parameters()} | {n for n, _ in owner.named_buffers()}
    allowed = {lp.weight_attr.rpartition(".")[2]} | ({lp.bias_attr.rpartition(".")[2]} if lp.bias_attr else set())
    if own <= allowed and not list(owner.children()):
        return site
    return Site(lp.name + "_tn", lp.weight_attr, lp.bias_attr)


def _dense_source(module: nn.Module, lp: LayerPlan) -> nn.Module:
    """The dense module ``lp`` starts from (a stand-in sharing the tensors, for a graph)."""
    if lp.weight_attr is None:
        return module.get_submodule(lp.name)
    args = _aten_args(_aten_node(module, lp.weight_attr))
    bias = _get_attr(module, lp.bias_attr) if lp.bias_attr else None
    return layer_class(lp.kind).standin(_get_attr(module, lp.weight_attr), bias, args)


def build_layer(lp: LayerPlan, source_module: nn.Module, config: CompressConfig,
                generator: torch.Generator | None, make_gate: MakeGate | None = None) -> TNLayer:
    """The factorized layer for ``lp``, cores initialised from ``source_module``'s weight."""
    extra = {"merge_spatial": True} if lp.merge_spatial else {}
    layer = layer_class(lp.kind).from_dense(source_module, lp.decomp or config.decomp, lp.rank, lp.tensorization,
                                            gated=False, sigma=config.sigma, generator=generator, **extra)
    if make_gate is not None:
        dtype = layer.cores[0].dtype
        layer.set_gates_(lambda size: make_gate(size, dtype))
    return layer


def apply(model: Any, the_plan: CompressionPlan, config: CompressConfig, make_gate: MakeGate | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> Applied:
    """A copy of ``model`` with every planned layer replaced by a factorized one.

    ``make_gate(size, dtype)`` puts a gate on every bond (None: ungated layers, for
    selectors whose ranks are final). Neither ``model`` nor ``the_plan`` is changed.
    """
    module = copy.deepcopy(as_module(model))
    gen = torch.Generator().manual_seed(config.seed)
    applied = Applied(module)
    for i, lp in enumerate(the_plan.layers):
        if progress:
            progress(lp.name, i, len(the_plan.layers))
        layer = build_layer(lp, _dense_source(module, lp), config, gen, make_gate)
        site = _graph_site(module, lp) if lp.weight_attr is not None else Site(lp.name)
        swap_in(module, site, layer)
        applied.sites[lp.name] = site
    return applied


def site_in(module: nn.Module, name: str, weight_attr: str | None = None, bias_attr: str | None = None) -> Site:
    """Where the layer a checkpoint recorded as ``name`` goes in ``module``, whatever the source.

    A checkpoint made from an ``nn.Module`` names module paths; one made from a
    ``torch.export`` program also names the attributes its aten call read. Either kind may
    be loaded onto either kind of base: on a graph, a module path ``fc1`` means the call
    reading ``fc1.weight``; on a module, the recorded attributes are not needed.
    """
    if not is_graph_model(module):
        return Site(name)
    if weight_attr is None:
        weight_attr = f"{name}.weight"
        bias = _aten_args(_aten_node(module, weight_attr)).get("bias")
        bias_attr = bias.target if isinstance(bias, fx.Node) else None
    return Site(name, weight_attr, bias_attr)


def swap_in(module: nn.Module, site: Site, layer: TNLayer) -> None:
    """Put ``layer`` at ``site`` (a module attribute, or in place of a graph's aten call)."""
    if site.in_graph:
        _graph_swap(module, site, layer)
    else:
        set_submodule(module, site.name, layer)


def tn_layers(module: nn.Module) -> dict[str, TNLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, TNLayer)}
