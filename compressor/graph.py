"""The model pass: decide which layers become factorized (and why not), then swap them in.

Two kinds of model are understood:

* an ``nn.Module``: ``torch.fx.symbolic_trace`` tells which Linear / Conv2d / Embedding
  modules the forward actually calls; when tracing fails we warn and walk
  ``named_modules()`` instead.  Layers are swapped by attribute, so state-dict keys keep
  the user's names (``fc1.cores.0``).
* a ``torch.export`` program (or its ``.module()`` GraphModule): ``aten.linear`` /
  ``aten.conv2d`` / ``aten.embedding`` calls on parameters are found in the graph and
  replaced by ``call_module`` nodes of the factorized layer.

``plan`` never mutates anything; ``apply`` works on the copy it is given.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from . import tensornet as tn
from .config import CompressConfig
from .errors import CompressorError, ModelError
from .layers import REPLACEMENTS, TNConv2d, TNEmbedding, TNLayer

log = logging.getLogger(__name__)

ATEN_KINDS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv2d.default: "conv2d",
    torch.ops.aten.embedding.default: "embedding",
}
KIND_OF_MODULE = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}


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
    dense_params: int = 0


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
        n.op == "call_function" and n.target in ATEN_KINDS for n in module.graph.nodes
    )


def count_params(module: nn.Module) -> int:
    """Parameters that matter at inference: every parameter, each shared tensor once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ------------------------------------------------------------------ dense stand-ins
def _standin(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, args: dict[str, Any]) -> nn.Module:
    """A real nn.Linear/Conv2d/Embedding sharing the graph's tensors (for from_dense)."""
    if kind == "linear":
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    elif kind == "conv2d":
        m = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=args.get("stride", 1),
                      padding=args.get("padding", 0), dilation=args.get("dilation", 1),
                      groups=args.get("groups", 1), bias=bias is not None, device="meta")
    else:
        pad = args.get("padding_idx", -1)
        m = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=None if pad in (-1, None) else pad, device="meta")
    m.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return m


def _aten_args(node: fx.Node) -> dict[str, Any]:
    kind = ATEN_KINDS[node.target]
    names = {
        "linear": ["input", "weight", "bias"],
        "conv2d": ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
        "embedding": ["weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"],
    }[kind]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _get_attr(root: nn.Module, target: str) -> torch.Tensor:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------ candidates
@dataclass
class _Candidate:
    name: str
    kind: str
    module: nn.Module  # real module or stand-in
    weight_attr: str | None = None
    bias_attr: str | None = None
    node: fx.Node | None = None


def _module_candidates(model: nn.Module) -> tuple[list[_Candidate], str]:
    try:
        traced = fx.symbolic_trace(model)
        called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
        source = "module"
    except Exception as exc:  # any tracing failure: fall back, never crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({first[:200]}); falling back to walking "
            "named_modules(): layers defined but unused in forward() may be compressed too",
            stacklevel=3,
        )
        called, source = None, "module-walk"
    cands = []
    for name, mod in model.named_modules():
        kind = KIND_OF_MODULE.get(type(mod))
        if kind is None or (called is not None and name not in called):
            continue
        cands.append(_Candidate(name, kind, mod))
    return cands, source


def _graph_candidates(gm: fx.GraphModule) -> list[_Candidate]:
    cands = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ATEN_KINDS:
            continue
        kind = ATEN_KINDS[node.target]
        args = _aten_args(node)
        w, b = args.get("weight"), args.get("bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue  # weight computed at run time: nothing to factorize
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            continue
        weight = _get_attr(gm, w.target)
        bias = _get_attr(gm, b.target) if b is not None else None
        name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target.replace(".", "_")
        stand = _standin(kind, weight, bias, args)
        cands.append(_Candidate(name, kind, stand, w.target, b.target if b is not None else None, node))
    return cands


# ------------------------------------------------------------------ planning
def _tensorization(cand: _Candidate, config: CompressConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    m = cand.module
    override = config.tensorization.get(cand.name)
    if cand.kind == "embedding":
        from .layers import padded_factorization

        v, d = m.weight.shape
        if override:
            return tuple(override[0]), tn.check_modes(override[1], d, "embedding size")
        return padded_factorization(v), tn.factorize(d)
    if cand.kind == "linear":
        dims = (m.weight.shape[1], m.weight.shape[0])
    else:
        dims = (m.weight.shape[1], m.weight.shape[0])
    if override:
        return tn.check_modes(override[0], dims[0], "input size"), tn.check_modes(override[1], dims[1], "output size")
    return tn.factorize(dims[0]), tn.factorize(dims[1])


def _modes_of(kind: str, shape: tuple[int, ...], tz: tuple[tuple[int, ...], tuple[int, ...]],
              merge_spatial: bool = False) -> tuple[int, ...]:
    if kind == "conv2d":
        from .layers import conv_modes

        return conv_modes(tz[0], math.prod(shape[2:]), tz[1], merge_spatial)
    return tuple(m for m in tz[0] + tz[1] if m > 1)


def plan_modes(lp: LayerPlan) -> tuple[int, ...]:
    """Core modes the planned layer will have."""
    return _modes_of(lp.kind, lp.shape, lp.tensorization, lp.merge_spatial)


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
    result = CompressionPlan(source=source, dense_params=count_params(module))
    owners: dict[int, list[str]] = {}
    for c in cands:
        owners.setdefault(id(c.module.weight), []).append(c.name)
    names = {c.name for c in cands}
    unknown = set(config.tensorization) | set(config.layer_ranks)
    if unknown - names:
        raise ModelError(f"per-layer options name unknown layers: {', '.join(sorted(unknown - names))} "
                         f"(eligible layers: {', '.join(sorted(names)) or 'none'})")
    for c in cands:
        shape = tuple(c.module.weight.shape)
        skip = _skip_reason(c, config, owners)
        if skip is None:
            try:
                tz = _tensorization(c, config)
                modes = _modes_of(c.kind, shape, tz)
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
        rank = config.layer_ranks.get(c.name, config.rank)  # None: chosen by the api from the target
        result.layers.append(LayerPlan(c.name, c.kind, shape, tz, rank, params, c.weight_attr, c.bias_attr))
    return result


def _skip_reason(c: _Candidate, config: CompressConfig, owners: dict[int, list[str]]) -> str | None:
    m = c.module
    if config.filter_fn is not None and not config.filter_fn(m, c.name):
        return "excluded by filter_fn"
    if len(owners[id(m.weight)]) > 1:
        return f"weight shared with {', '.join(n for n in owners[id(m.weight)] if n != c.name)} (tied weights stay dense)"
    if c.kind == "conv2d":
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups}) is not supported"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} is not supported"
    if c.kind == "embedding" and (m.max_norm is not None or m.sparse):
        return "embedding with max_norm or sparse gradients is not supported"
    if m.weight.numel() < config.min_params and c.name not in config.tensorization and c.name not in config.layer_ranks:
        return f"too small to gain ({m.weight.numel()} weights < min_params={config.min_params})"
    return None


# ------------------------------------------------------------------ applying
def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _graph_swap(gm: fx.GraphModule, lp: LayerPlan, layer: nn.Module) -> None:
    """Replace the aten call reading ``lp.weight_attr`` by a call to ``layer``."""
    node = next(
        (n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATEN_KINDS
         and isinstance(_aten_args(n).get("weight"), fx.Node) and _aten_args(n)["weight"].target == lp.weight_attr),
        None,
    )
    if node is None:
        raise ModelError(f"layer {lp.name!r} ({lp.weight_attr}) is not in this graph")
    args = _aten_args(node)
    x = args["indices"] if lp.kind == "embedding" else args["input"]
    set_submodule(gm, lp.name, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(lp.name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target in (lp.weight_attr, lp.bias_attr) and not n.users:
            gm.graph.erase_node(n)
    # The dense tensors must leave the model, or they would still be saved and counted.
    for attr in (lp.weight_attr, lp.bias_attr):
        if attr and attr.rpartition(".")[0] != lp.name:
            owner_name, _, leaf = attr.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if hasattr(owner, leaf) and not any(n.op == "get_attr" and n.target == attr for n in gm.graph.nodes):
                delattr(owner, leaf)
    gm.graph.lint()
    gm.recompile()


def _module_name_free(gm: nn.Module, lp: LayerPlan) -> bool:
    """The graph keeps ``fc1.weight`` in a plain container module ``fc1``: may we replace it?"""
    try:
        owner = gm.get_submodule(lp.name)
    except AttributeError:
        return True
    own = {n for n, _ in owner.named_parameters()} | {n for n, _ in owner.named_buffers()}
    allowed = {lp.weight_attr.rpartition(".")[2]} | ({lp.bias_attr.rpartition(".")[2]} if lp.bias_attr else set())
    return own <= allowed and not list(owner.children())


def build_layer(lp: LayerPlan, source_module: nn.Module | None, config: CompressConfig,
                generator: torch.Generator | None) -> TNLayer:
    cls = {"linear": REPLACEMENTS[nn.Linear], "conv2d": TNConv2d, "embedding": TNEmbedding}[lp.kind]
    extra = {"merge_spatial": True} if lp.merge_spatial else {}
    layer = cls.from_dense(source_module, lp.decomp or config.decomp, lp.rank, lp.tensorization, gated=True,
                           sigma=config.sigma, generator=generator, **extra)
    if config.rank_select == "reinforce":
        from .gates import BernoulliGate

        layer.set_gates_(lambda size: BernoulliGate(size, dtype=layer.cores[0].dtype))
    return layer


def apply(model: Any, the_plan: CompressionPlan, config: CompressConfig,
          progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Return a copy of ``model`` with every planned layer replaced by a gated factorized one."""
    module = copy.deepcopy(as_module(model))
    gen = torch.Generator().manual_seed(config.seed)
    graph = the_plan.source == "graph"
    for i, lp in enumerate(the_plan.layers):
        if progress:
            progress(lp.name, i, len(the_plan.layers))
        if graph:
            args = {}
            node = next(n for n in module.graph.nodes if n.op == "call_function" and n.target in ATEN_KINDS
                        and isinstance(_aten_args(n).get("weight"), fx.Node)
                        and _aten_args(n)["weight"].target == lp.weight_attr)
            args = _aten_args(node)
            weight = _get_attr(module, lp.weight_attr)
            bias = _get_attr(module, lp.bias_attr) if lp.bias_attr else None
            source = _standin(lp.kind, weight, bias, args)
            layer = build_layer(lp, source, config, gen)
            if not _module_name_free(module, lp):
                lp.name = lp.name + "_tn"
                module._compressor_renamed = getattr(module, "_compressor_renamed", ()) + (lp.name,)
            swap_in(module, lp, layer, graph=True)
        else:
            layer = build_layer(lp, module.get_submodule(lp.name), config, gen)
            swap_in(module, lp, layer, graph=False)
    return module


def swap_in(module: nn.Module, lp: LayerPlan, layer: nn.Module, graph: bool) -> None:
    """Put ``layer`` where the dense layer ``lp`` was (module attribute or graph node)."""
    if graph:
        _graph_swap(module, lp, layer)
    else:
        set_submodule(module, lp.name, layer)


def tn_layers(module: nn.Module) -> dict[str, TNLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, TNLayer)}
