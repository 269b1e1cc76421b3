"""The model pass: decide which layers become factorized (and why not), then swap them in.

Two kinds of model are understood:

* an ``nn.Module``: a trace of the forward tells which module reads each weight:
  ``torch.fx`` when it can trace the model, else ``torch.export`` on an example input
  (Hugging Face transformers; used only as an analysis), else a walk of ``named_modules()``
  with a warning. Layers are swapped into the model itself by attribute, so it keeps its
  class and state-dict names (``fc1.cores.0``).
* a ``torch.export`` program (or its ``.module()`` GraphModule): ``aten.linear`` /
  ``aten.conv2d`` / ``aten.embedding`` calls on parameters are found in the graph and
  replaced by ``call_module`` nodes of the factorized layer.

One weight, one decision. In a module, a weight held by several layers (``lm_head.weight is
embed_tokens.weight``) is factorized once and the other holders compute from the same cores
(:class:`~compressor.layers.TiedTNLinear`); a weight also read outside its layers
(``F.linear(h, emb.weight)``) stays dense, and so does every holder of a weight one of them
cannot give up. Every Linear / Conv2d / Embedding-like module not factorized is listed in
``plan.skipped`` with the reason.

``plan`` and ``apply`` mutate nothing they are given: ``apply`` returns a new model and
where each layer went (:class:`Applied`).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from . import tensornet as tn
from .errors import CompressorError, ModelError, first_line
from .layers import TiedTNLinear, TNLayer, aten_layers, layer_class, layer_class_for, tie_reason, tied_layer

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
    tied: tuple[str, ...] = ()  # modules sharing this weight: they will compute from the same cores
    whiten: torch.Tensor | None = None  # input factor L (G = L L^T): cores fitted to outputs (calibration.py)
    whiten_out: torch.Tensor | None = None  # a tied embedding's: its head's input factor (calibration.py)
    extra: int = 0  # elements the factorized layer saves beside cores and bias (an embedding's padding row)


@dataclass
class Skipped:
    name: str
    kind: str
    reason: str


@dataclass
class CompressionPlan:
    source: str  # "module" (torch.fx), "export" (torch.export analysis), "module-walk" (neither) or "graph"
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
    direct_use: bool = False  # graph: the forward also reads the weight outside this call (e.g. aten.t of a tied weight)
    paths: tuple[str, ...] = ()  # module: every path the module is registered under

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def view(self) -> nn.Module:
        """The dense layer as its class reads it (a Conv1D as the Linear it is)."""
        return self.cls.dense_view(self.module)


def _module_candidates(model: nn.Module) -> list[_Candidate]:
    """Every Linear / Conv2d / Embedding-like module (subclasses and Conv1D included), once each."""
    paths: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
    cands = []
    for name, mod in model.named_modules():
        cls = layer_class_for(mod)
        if cls is not None:
            cands.append(_Candidate(name, cls, mod, getattr(mod, "weight", None), paths=tuple(paths[id(mod)])))
    return cands


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


# ------------------------------------------------------------------ who reads each weight
@dataclass
class _Reads:
    """What a trace of the forward says about the weights.

    ``scopes`` maps ``id(parameter)`` to the module paths whose forward read it ("" for the
    model's own forward), once per read; ``None`` when nothing was traced (module walk).
    """

    source: str  # "module" (torch.fx), "export" (torch.export, as an analysis) or "module-walk"
    scopes: dict[int, list[str]] | None = None

    def of(self, weight: Any) -> list[str] | None:
        return None if self.scopes is None else self.scopes.get(id(weight), [])

    @property
    def unused(self) -> str:
        """The skip reason of a layer the forward never calls."""
        return "never called by forward()" + (" on the example input" if self.source == "export" else "")


class _LayerTracer(fx.Tracer):
    """torch.fx that keeps layers (and ``nn.MultiheadAttention``) as leaves but traces into the
    torch.nn containers holding layers (``nn.TransformerEncoderLayer``), so their layers are seen."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if layer_class_for(m) is not None or isinstance(m, nn.MultiheadAttention):
            return True
        if not super().is_leaf_module(m, module_qualified_name):
            return False
        return not any(layer_class_for(sub) is not None for sub in m.modules())


def _scope(node: fx.Node, prefix: str = "") -> str:
    """The innermost module whose forward made ``node`` ("" for the model's own forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    if prefix:
        path = path[len(prefix) + 1:] if path.startswith(prefix + ".") else ""
    return path


def _fx_reads(model: nn.Module) -> _Reads:
    graph = _LayerTracer().trace(model)
    scopes: dict[int, list[str]] = {}
    for n in graph.nodes:
        if n.op == "call_module":  # a leaf reads its own tensors
            for p in model.get_submodule(n.target).parameters():
                scopes.setdefault(id(p), []).append(n.target)
        elif n.op == "get_attr":
            obj = _get_attr(model, n.target)
            if isinstance(obj, torch.Tensor):
                scopes.setdefault(id(obj), []).append(_scope(n))
    return _Reads("module", scopes)


def example_inputs(example: Any) -> tuple[tuple, dict[str, Any]]:
    """(positional, keyword) arguments of a forward from an example input, read as the training
    loop calls the model: a dict is keyword arguments (a Hugging Face batch), a tuple positional
    ones, anything else the one input."""
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, tuple):
        return example, {}
    return (example,), {}


class _TensorOutputs(nn.Module):
    """``model`` returning only the tensors of its output: a Hugging Face ``ModelOutput`` holds a
    KV-cache object torch.export cannot return, and the analysis needs only the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return tuple(_tensors(self.inner(*args, **kwargs)))


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _dynamic_dims(value: Any) -> Any:
    """Dynamic batch (dim 0) for every tensor, and sequence length (dim 1) for integer ones (tokens, masks)."""
    if isinstance(value, torch.Tensor):
        dims = {0: torch.export.Dim.AUTO} if value.dim() >= 1 else {}
        if value.dim() >= 2 and not value.is_floating_point():
            dims[1] = torch.export.Dim.AUTO
        return dims or None
    if isinstance(value, (list, tuple)):
        return type(value)(_dynamic_dims(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _dynamic_dims(v) for k, v in value.items()}
    return None


def _export_reads(model: nn.Module, example: Any) -> _Reads:
    """Which module reads each parameter, from ``torch.export`` of the forward (an analysis only:
    the layers are then swapped into ``model`` itself, which keeps its class and names)."""
    args, kwargs = example_inputs(example)
    wrapper = _TensorOutputs(model)
    with warnings.catch_warnings(), torch.enable_grad():  # with grad on, no fused fast path hides the layers
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(wrapper, (args, kwargs), strict=False,
                                          dynamic_shapes=(_dynamic_dims(args), _dynamic_dims(kwargs)))
        except Exception:  # dynamic shapes are a nicety: try once with the example's own shapes
            program = torch.export.export(wrapper, (args, kwargs), strict=False)
    names = program.graph_signature.inputs_to_parameters
    scopes: dict[int, list[str]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            if arg.name in names:
                scopes.setdefault(id(wrapper.get_parameter(names[arg.name])), []).append(_scope(node, "inner"))
    return _Reads("export", scopes)


def _trace_reads(model: nn.Module, example: Any) -> _Reads:
    """torch.fx when it traces, else torch.export on ``example``, else the module walk (with a warning)."""
    try:
        return _fx_reads(model)
    except Exception as exc:  # any tracing failure: try the next way, never crash
        fx_error = first_line(exc, 200)
    if example is None:
        export_error = "no example input was given to export it with"
    else:
        try:
            reads = _export_reads(model, example)
            log.info("torch.fx could not trace %s (%s); analysed with torch.export", type(model).__name__, fx_error)
            return reads
        except Exception as exc:
            export_error = f"torch.export failed: {first_line(exc, 200)}"
    warnings.warn(
        f"torch.fx could not trace {type(model).__name__} ({fx_error}) and {export_error}; falling back to walking "
        "named_modules(): layers defined but unused in forward() may be compressed too",
        stacklevel=3,  # the caller of plan()
    )
    return _Reads("module-walk")


# ------------------------------------------------------------------ planning
def plan_modes(lp: LayerPlan) -> tuple[int, ...]:
    """Core modes the planned layer will have."""
    return layer_class(lp.kind).core_modes(lp.shape, lp.tensorization, lp.merge_spatial)


def layer_size(lp: LayerPlan, ranks: Any, decomp: str) -> int:
    """Elements the planned layer saves at ``ranks`` (an int or bond list): cores, bias and any
    buffer it keeps (an embedding's padding row)."""
    modes = plan_modes(lp)
    cores = tn.param_count(modes, tn.resolve_ranks(ranks, modes, lp.decomp or decomp))
    return cores + lp.params_before - math.prod(lp.shape) + lp.extra


def layer_weight(module: nn.Module, lp: LayerPlan) -> torch.Tensor:
    """The dense weight a planned layer starts from (module or graph attribute), in its class's layout."""
    if lp.weight_attr:
        return _get_attr(module, lp.weight_attr)
    return layer_class(lp.kind).dense_view(module.get_submodule(lp.name)).weight


def plan(model: Any, config: CompressConfig, example: Any = None) -> CompressionPlan:
    """Decide what to factorize; mutates nothing.

    ``example`` is one input of the model (a tensor, a tuple of positional inputs, or a dict
    of keyword inputs such as a Hugging Face batch). It is needed only for a module torch.fx
    cannot trace: the forward is then analysed with ``torch.export`` on it.
    """
    module = as_module(model)
    if is_graph_model(module):
        cands = _graph_candidates(module)
        result = CompressionPlan(source="graph", dense_params=count_state(module))
        _check_option_names(config, cands)
        _plan_graph(cands, config, result)
        return result
    cands = _module_candidates(module)
    _check_option_names(config, cands)
    reads = _trace_reads(module, example)
    result = CompressionPlan(source=reads.source, dense_params=count_state(module))
    holders = _holders(module) if reads.scopes is None else {}
    groups: dict[int, list[_Candidate]] = {}
    for c in cands:
        groups.setdefault(id(c.weight) if c.weight is not None else id(c), []).append(c)
    skipped: dict[str, str] = {}
    for group in groups.values():
        owner, users = _decide_group(module, group, reads, holders, config, skipped)
        if owner is None:
            continue
        lp = _layer_plan(owner, config)
        if isinstance(lp, str):  # too small or no useful split: every sharer stays dense with it
            skipped[owner.name] = lp
            skipped.update({u.name: f"shares its weight with {owner.name}, which stays dense ({lp})" for u in users})
            continue
        lp.tied = tuple(u.name for u in users)
        result.layers.append(lp)
    result.skipped = [Skipped(c.name, c.kind, skipped[c.name]) for c in cands if c.name in skipped]
    _check_tied_options(config, result)
    return result


def _check_option_names(config: CompressConfig, cands: list[_Candidate]) -> None:
    names = {c.name for c in cands}
    unknown = set(config.tensorization) | set(config.layer_ranks)
    if unknown - names:
        raise ModelError(f"per-layer options name unknown layers: {', '.join(sorted(unknown - names))} "
                         f"(eligible layers: {', '.join(sorted(names)) or 'none'})")
    for pattern in config.skip:  # a typo must not silently compress what the user meant to keep
        if not any(_skip_matches(pattern, c) for c in cands):
            kinds = ", ".join(sorted({c.kind for c in cands})) or "none"
            raise ModelError(f"skip {pattern!r} matches no layer kind ({kinds}) and no module path "
                             f"(e.g. {', '.join(sorted(names)[:3]) or 'none'})")


def _check_tied_options(config: CompressConfig, result: CompressionPlan) -> None:
    """Per-layer options for a layer that computes from another's cores belong to that other layer."""
    for lp in result.layers:
        for user in lp.tied:
            if user in config.tensorization or user in config.layer_ranks:
                raise ModelError(f"{user} shares its weight with {lp.name}: give its per-layer options to {lp.name}")


def _plan_graph(cands: list[_Candidate], config: CompressConfig, result: CompressionPlan) -> None:
    """The graph source: one aten call, one decision; a weight read twice stays dense."""
    owners: dict[int, list[str]] = {}
    for c in cands:
        owners.setdefault(id(c.weight), []).append(c.name)
    planned_weights: set[int] = set()
    for c in cands:
        if id(c.weight) in planned_weights:
            continue  # one weight, one decision: a weight read by several calls is not planned twice
        planned_weights.add(id(c.weight))
        skip = _graph_skip_reason(c, config, owners)
        lp = _layer_plan(c, config) if skip is None else skip
        if isinstance(lp, str):
            result.skipped.append(Skipped(c.name, c.kind, lp))
        else:
            result.layers.append(lp)


def _layer_plan(c: _Candidate, config: CompressConfig) -> LayerPlan | str:
    """The plan of a layer cleared to be factorized, or why its size rules it out."""
    view = c.view
    shape = tuple(view.weight.shape)
    if view.weight.numel() < config.min_params and c.name not in config.tensorization and c.name not in config.layer_ranks:
        return f"too small to gain ({view.weight.numel()} weights < min_params={config.min_params})"
    try:
        tz = c.cls.tensorization(shape, config.tensorization.get(c.name))
        modes = c.cls.core_modes(shape, tz)
    except CompressorError as exc:
        if c.name in config.tensorization:
            raise
        return str(exc)
    if len(modes) < 2:
        return f"shape {shape} gives a single mode {modes}: nothing to factorize"
    bias = getattr(view, "bias", None)
    params = view.weight.numel() + (bias.numel() if bias is not None else 0)
    rank = config.layer_ranks.get(c.name, config.rank)  # None: the rank selector chooses
    return LayerPlan(c.name, c.kind, shape, tz, rank, params, c.weight_attr, c.bias_attr,
                     extra=c.cls.saved_extra(view))


def _skip_matches(pattern: str, c: _Candidate) -> bool:
    """Whether a ``skip`` entry names this layer's kind or matches its module path."""
    return pattern == c.kind or fnmatch.fnmatchcase(c.name, pattern)


def _skip_pattern(c: _Candidate, config: CompressConfig) -> str | None:
    """The first ``skip`` entry that matches this layer."""
    return next((p for p in config.skip if _skip_matches(p, c)), None)


def _user_reason(c: _Candidate, config: CompressConfig) -> str | None:
    """Why the user's own choices leave this layer dense (``skip``, ``filter_fn``)."""
    if (pattern := _skip_pattern(c, config)) is not None:
        return f"left dense by skip {pattern!r}"
    if config.filter_fn is not None and not config.filter_fn(c.module, c.name):
        return "excluded by filter_fn"
    return None


def _graph_skip_reason(c: _Candidate, config: CompressConfig, owners: dict[int, list[str]]) -> str | None:
    if (why := _user_reason(c, config)) is not None:
        return why
    users = owners[id(c.weight)]
    if len(users) > 1:
        others = sorted(set(users) - {c.name})
        shared = f"shared with {', '.join(others)}" if others else f"used by {len(users)} calls"
        return f"weight {shared} (shared weights stay dense in a torch.export program)"
    if c.direct_use:
        return "the forward also uses its weight directly, outside the layer (shared weights stay dense)"
    return c.cls.unsupported_reason(c.module)


# ------------------------------------------------------------------ one weight, one decision
def _holders(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter)`` -> every name it is registered under (a tied weight has several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _own_reason(model: nn.Module, c: _Candidate, config: CompressConfig) -> str | None:
    """Why this module cannot be replaced, whatever else shares its weight."""
    if (why := _user_reason(c, config)) is not None:
        return why
    parent_name, _, leaf = c.name.rpartition(".")
    if isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
        return (f"nn.MultiheadAttention computes with {leaf}.weight itself (F.multi_head_attention_forward), "
                "not by calling the layer")
    if not isinstance(c.module._parameters.get("weight"), nn.Parameter):
        return "its weight is not a plain parameter (parametrized, or a buffer)"
    return c.cls.support_reason(c.module)


def _outside(model: nn.Module, group: list[_Candidate], reads: _Reads, holders: dict[int, list[str]]) -> list[str]:
    """Who else uses the group's weight: forwards reading it outside the layers (traced), or
    other names holding it (module walk, which cannot tell whether they read it)."""
    own = {p for c in group for p in c.paths}
    scopes = reads.of(group[0].weight)
    if scopes is not None:
        return [_describe_scope(model, s) for s in dict.fromkeys(s for s in scopes if s not in own)]
    return [n for n in holders.get(id(group[0].weight), []) if n.rpartition(".")[0] not in own]


def _describe_scope(model: nn.Module, scope: str) -> str:
    if not scope:
        return "the model's forward"
    try:
        return f"{scope} ({type(model.get_submodule(scope)).__name__})"
    except AttributeError:
        return scope


def _decide_group(model: nn.Module, group: list[_Candidate], reads: _Reads, holders: dict[int, list[str]],
                  config: CompressConfig, skipped: dict[str, str]) -> tuple[_Candidate | None, list[_Candidate]]:
    """One decision for every module holding one weight: (the layer to factorize, the layers that
    will compute from its cores); every other holder gets its reason in ``skipped``.

    The factorized one is a called holder, an embedding if there is one (its cores are the
    table, read by lookups; a tied head contracts them). A holder the forward never calls is
    tied along when it can be, so no dense copy of the weight stays behind.
    """
    own = {c.name: _own_reason(model, c, config) for c in group}
    outside = _outside(model, group, reads, holders) if group[0].weight is not None else []
    seen = reads.of(group[0].weight)
    called = [c for c in group if seen is None or any(s in c.paths for s in seen)]
    shared_out = (f"its weight is also read outside the layer, by {', '.join(outside)} "
                  "(a shared weight read outside its layers stays dense)") if outside else None
    blocked = next((c for c in called if own[c.name]), None)
    if not called or blocked is not None or shared_out:
        for c in group:
            if c in called and not own[c.name] and not shared_out:
                skipped[c.name] = f"shares its weight with {blocked.name}, which stays dense ({own[blocked.name]})"
            else:
                skipped[c.name] = own[c.name] or shared_out or reads.unused
        return None, []
    owner = next((c for c in called if c.kind == "embedding"), called[0])
    users = [c for c in group if c is not owner and not own[c.name]]
    skipped.update({c.name: own[c.name] for c in group if own[c.name]})  # never called, and cannot be tied
    why = next((r for u in users if (r := tie_reason(owner.kind, owner.module, u.kind, u.module))), None)
    if why is not None:
        for c in [owner, *users]:
            skipped[c.name] = f"weight shared by {', '.join(x.name for x in [owner, *users])}: {why}"
        return None, []
    return owner, users


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
    tied: dict[str, str] = field(default_factory=dict)  # module computing from another layer's cores -> that layer

    @property
    def homeless(self) -> set[str]:
        return {site.name for name, site in self.sites.items() if site.name != name}

    @property
    def keep_factorized(self) -> set[str]:
        """Layers that must never go back to dense: the homeless, and those whose cores tied
        layers compute from (a dense source would leave them computing from a detached copy)."""
        return self.homeless | set(self.tied.values())


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Put ``new`` at ``name`` and at every other path holding the same module object (T5's
    ``shared`` is also ``encoder.embed_tokens``); returns those paths."""
    old = root.get_submodule(name)
    paths = [p for p, m in root.named_modules(remove_duplicate=False) if m is old and p] or [name]
    for p in paths:
        set_submodule(root, p, new)
    return paths


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


def dense_source(module: nn.Module, lp: LayerPlan) -> nn.Module:
    """The dense module ``lp`` starts from (a stand-in sharing the tensors, for a graph)."""
    if lp.weight_attr is None:
        return layer_class(lp.kind).dense_view(module.get_submodule(lp.name))
    args = _aten_args(_aten_node(module, lp.weight_attr))
    bias = _get_attr(module, lp.bias_attr) if lp.bias_attr else None
    return layer_class(lp.kind).standin(_get_attr(module, lp.weight_attr), bias, args)


def build_layer(lp: LayerPlan, source_module: nn.Module, config: CompressConfig,
                generator: torch.Generator | None, make_gate: MakeGate | None = None) -> TNLayer:
    """The factorized layer for ``lp``, cores initialised from ``source_module``'s weight."""
    extra = {"merge_spatial": True} if lp.merge_spatial else {}
    if lp.whiten is not None:
        extra["whiten"] = lp.whiten
    if lp.whiten_out is not None:
        extra["whiten_out"] = lp.whiten_out
    layer = layer_class(lp.kind).from_dense(source_module, lp.decomp or config.decomp, lp.rank, lp.tensorization,
                                            gated=False, sigma=config.sigma, generator=generator, **extra)
    if make_gate is not None:
        dtype = layer.cores[0].dtype
        layer.set_gates_(lambda size: make_gate(size, dtype))
    return layer.to(source_module.weight.device)  # cores and gates live where the weight did


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
        layer = build_layer(lp, dense_source(module, lp), config, gen, make_gate)
        site = _graph_site(module, lp) if lp.weight_attr is not None else Site(lp.name)
        swap_in(module, site, layer)
        applied.sites[lp.name] = site
        for user in lp.tied:
            tie_in(module, user, layer)
            applied.tied[user] = site.name
    return applied


def tie_in(module: nn.Module, name: str, source: TNLayer) -> None:
    """Replace the dense module at ``name``, whose weight was ``source``'s, by one computing from
    ``source``'s cores (see :func:`~compressor.layers.tied_layer`)."""
    replace_module(module, name, tied_layer(module.get_submodule(name), source))


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
        replace_module(module, site.name, layer)


def tn_layers(module: nn.Module) -> dict[str, TNLayer]:
    """Every factorized layer, once, under its first name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, TNLayer)}


def tied_layers(module: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Modules computing from another layer's cores, as ``{name: (source layer's name, module)}``:
    a :class:`TiedTNLinear`, or a factorized layer met again under another name."""
    first = {id(m): name for name, m in module.named_modules() if isinstance(m, TNLayer)}
    out = {}
    for name, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, TiedTNLinear):
            out[name] = (first.get(id(m.source), ""), m)
        elif isinstance(m, TNLayer) and first.get(id(m)) not in (None, name):
            out[name] = (first[id(m)], m)
    return out
