"""The planner: which layers of a model become factorized, and why each other one stays dense.

Two kinds of model are understood:

* an ``nn.Module``: a trace of the forward (:mod:`compressor.trace`) tells which module reads
  each weight. Layers will be swapped into the model itself by attribute, so it keeps its class
  and state-dict names (``fc1.cores.0``).
* a ``torch.export`` program (or its ``.module()`` GraphModule): ``aten.linear`` /
  ``aten.conv2d`` / ``aten.embedding`` calls on parameters are found in the graph.

One weight, one decision. In a module, a weight held by several layers (``lm_head.weight is
embed_tokens.weight``) is factorized once and the other holders compute from the same cores
(:class:`~compressor.layers.TiedTNLinear`); a weight also read outside its layers
(``F.linear(h, emb.weight)``) stays dense, and so does every holder of a weight one of them
cannot give up. Every Linear / Conv2d / Embedding-like module not factorized is listed in
``plan.skipped`` with the reason.

The planner reads only :class:`PlanOptions`, the part of a run's options about which layers
to factorize and how they are split; it mutates nothing it is given and returns a frozen
:class:`~compressor.plan.CompressionPlan`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .errors import CompressorError, ModelError
from .layers import TNLayer, aten_layers, layer_class_for, tie_reason
from .plan import CompressionPlan, LayerPlan, Ranks, Skipped, count_state
from .trace import Reads, as_module, get_attr, is_graph_model, trace_reads


@dataclass(frozen=True)
class PlanOptions:
    """What the planner reads of a run's options (``CompressConfig.plan_options()``).

    ``skip``: layer kinds or module-path globs to leave dense; ``filter_fn(module, fqn)``: False
    leaves a layer dense; ``min_params``: a weight with fewer entries stays dense (unless a
    per-layer option names it); ``tensorization`` / ``layer_ranks``: per-layer overrides;
    ``rank``: every other layer's rank (None: the rank selector chooses); ``paired``: every
    layer in an mpo layout, its input and output split into as many modes, paired per core.
    """

    min_params: int
    skip: tuple[str, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    tensorization: Mapping[str, tuple[Sequence[int], Sequence[int]]] = field(default_factory=dict)
    layer_ranks: Mapping[str, Ranks] = field(default_factory=dict)
    rank: int | None = None
    paired: bool = False


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
        weight = get_attr(gm, w.target)
        if not isinstance(weight, nn.Parameter):
            continue  # a buffer or constant (e.g. a slim embedding's bounds table): not a learned weight
        bias = get_attr(gm, b.target) if b is not None else None
        name = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target.replace(".", "_")
        stand = cls.standin(weight, bias, args)
        direct = any(u.target not in aten_layers() for u in w.users)  # e.g. aten.t / matmul of a tied weight
        cands.append(_Candidate(name, cls, stand, weight, w.target, b.target if b is not None else None, direct))
    return cands



def plan(model: Any, options: PlanOptions, example: Any = None) -> CompressionPlan:
    """Decide what to factorize; mutates nothing.

    ``example`` is one input of the model (a tensor, a tuple of positional inputs, or a dict
    of keyword inputs such as a Hugging Face batch). It is needed only for a module torch.fx
    cannot trace: the forward is then analysed with ``torch.export`` on it.
    """
    module = as_module(model)
    if is_graph_model(module):
        cands = _graph_candidates(module)
        _check_option_names(options, cands)
        layers, skipped = _plan_graph(cands, options)
        return CompressionPlan("graph", tuple(layers), tuple(skipped), count_state(module))
    cands = _module_candidates(module)
    _check_option_names(options, cands)
    reads = trace_reads(module, example)
    holders = _holders(module) if reads.scopes is None else {}
    groups: dict[int, list[_Candidate]] = {}
    for c in cands:
        groups.setdefault(id(c.weight) if c.weight is not None else id(c), []).append(c)
    reasons: dict[str, str] = {}
    layers = []
    for group in groups.values():
        owner, users = _decide_group(module, group, reads, holders, options, reasons)
        if owner is None:
            continue
        lp = _layer_plan(owner, options, tied=tuple(u.name for u in users))
        if isinstance(lp, str):  # too small or no useful split: every sharer stays dense with it
            reasons[owner.name] = lp
            reasons.update({u.name: f"shares its weight with {owner.name}, which stays dense ({lp})" for u in users})
            continue
        layers.append(lp)
    skipped = tuple(Skipped(c.name, c.kind, reasons[c.name]) for c in cands if c.name in reasons)
    result = CompressionPlan(reads.source, tuple(layers), skipped, count_state(module))
    _check_tied_options(options, result)
    return result


def _check_option_names(options: PlanOptions, cands: list[_Candidate]) -> None:
    names = {c.name for c in cands}
    unknown = set(options.tensorization) | set(options.layer_ranks)
    if unknown - names:
        raise ModelError(f"per-layer options name unknown layers: {', '.join(sorted(unknown - names))} "
                         f"(eligible layers: {', '.join(sorted(names)) or 'none'})")
    for pattern in options.skip:  # a typo must not silently compress what the user meant to keep
        if not any(_skip_matches(pattern, c) for c in cands):
            kinds = ", ".join(sorted({c.kind for c in cands})) or "none"
            raise ModelError(f"skip {pattern!r} matches no layer kind ({kinds}) and no module path "
                             f"(e.g. {', '.join(sorted(names)[:3]) or 'none'})")


def _check_tied_options(options: PlanOptions, result: CompressionPlan) -> None:
    """Per-layer options for a layer that computes from another's cores belong to that other layer."""
    for lp in result.layers:
        for user in lp.tied:
            if user in options.tensorization or user in options.layer_ranks:
                raise ModelError(f"{user} shares its weight with {lp.name}: give its per-layer options to {lp.name}")


def _plan_graph(cands: list[_Candidate], options: PlanOptions) -> tuple[list[LayerPlan], list[Skipped]]:
    """The graph source: one aten call, one decision; a weight read twice stays dense."""
    owners: dict[int, list[str]] = {}
    for c in cands:
        owners.setdefault(id(c.weight), []).append(c.name)
    planned_weights: set[int] = set()
    layers, skipped = [], []
    for c in cands:
        if id(c.weight) in planned_weights:
            continue  # one weight, one decision: a weight read by several calls is not planned twice
        planned_weights.add(id(c.weight))
        skip = _graph_skip_reason(c, options, owners)
        lp = _layer_plan(c, options) if skip is None else skip
        if isinstance(lp, str):
            skipped.append(Skipped(c.name, c.kind, lp))
        else:
            layers.append(lp)
    return layers, skipped


def _layer_plan(c: _Candidate, options: PlanOptions, tied: tuple[str, ...] = ()) -> LayerPlan | str:
    """The plan of a layer cleared to be factorized, or why its size rules it out."""
    view = c.view
    shape = tuple(view.weight.shape)
    if view.weight.numel() < options.min_params and c.name not in options.tensorization and c.name not in options.layer_ranks:
        return f"too small to gain ({view.weight.numel()} weights < min_params={options.min_params})"
    try:
        tz = c.cls.tensorization(shape, options.tensorization.get(c.name), options.paired)
        modes = c.cls.core_modes(shape, tz, paired=options.paired)
    except CompressorError as exc:
        if c.name in options.tensorization:
            raise
        return str(exc)
    if len(modes) < 2:
        return f"shape {shape} gives a single mode {modes}: nothing to factorize"
    bias = getattr(view, "bias", None)
    params = view.weight.numel() + (bias.numel() if bias is not None else 0)
    rank = options.layer_ranks.get(c.name, options.rank)  # None: the rank selector chooses
    rank = rank if rank is None or isinstance(rank, int) else tuple(rank)
    return LayerPlan(c.name, c.kind, shape, tz, rank, params, c.weight_attr, c.bias_attr, tied,
                     extra=c.cls.saved_extra(view), paired=options.paired)


def _skip_matches(pattern: str, c: _Candidate) -> bool:
    """Whether a ``skip`` entry names this layer's kind or matches its module path."""
    return pattern == c.kind or fnmatch.fnmatchcase(c.name, pattern)


def _skip_pattern(c: _Candidate, options: PlanOptions) -> str | None:
    """The first ``skip`` entry that matches this layer."""
    return next((p for p in options.skip if _skip_matches(p, c)), None)


def _user_reason(c: _Candidate, options: PlanOptions) -> str | None:
    """Why the user's own choices leave this layer dense (``skip``, ``filter_fn``)."""
    if (pattern := _skip_pattern(c, options)) is not None:
        return f"left dense by skip {pattern!r}"
    if options.filter_fn is not None and not options.filter_fn(c.module, c.name):
        return "excluded by filter_fn"
    return None


def _graph_skip_reason(c: _Candidate, options: PlanOptions, owners: dict[int, list[str]]) -> str | None:
    if (why := _user_reason(c, options)) is not None:
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


def _own_reason(model: nn.Module, c: _Candidate, options: PlanOptions) -> str | None:
    """Why this module cannot be replaced, whatever else shares its weight."""
    if (why := _user_reason(c, options)) is not None:
        return why
    parent_name, _, leaf = c.name.rpartition(".")
    if isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
        return (f"nn.MultiheadAttention computes with {leaf}.weight itself (F.multi_head_attention_forward), "
                "not by calling the layer")
    if not isinstance(c.module._parameters.get("weight"), nn.Parameter):
        return "its weight is not a plain parameter (parametrized, or a buffer)"
    return c.cls.support_reason(c.module)


def _outside(model: nn.Module, group: list[_Candidate], reads: Reads, holders: dict[int, list[str]]) -> list[str]:
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


def _decide_group(model: nn.Module, group: list[_Candidate], reads: Reads, holders: dict[int, list[str]],
                  options: PlanOptions, skipped: dict[str, str]) -> tuple[_Candidate | None, list[_Candidate]]:
    """One decision for every module holding one weight: (the layer to factorize, the layers that
    will compute from its cores); every other holder gets its reason in ``skipped``.

    The factorized one is a called holder, an embedding if there is one (its cores are the
    table, read by lookups; a tied head contracts them). A holder the forward never calls is
    tied along when it can be, so no dense copy of the weight stays behind.
    """
    own = {c.name: _own_reason(model, c, options) for c in group}
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
    owner = next((c for c in called if c.cls.lookup), called[0])
    users = [c for c in group if c is not owner and not own[c.name]]
    skipped.update({c.name: own[c.name] for c in group if own[c.name]})  # never called, and cannot be tied
    why = next((r for u in users if (r := tie_reason(owner.kind, owner.module, u.kind, u.module))), None)
    if why is not None:
        for c in [owner, *users]:
            skipped[c.name] = f"weight shared by {', '.join(x.name for x in [owner, *users])}: {why}"
        return None, []
    return owner, users


