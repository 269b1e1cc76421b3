"""Module surgery: build the factorized layers and put them into (a copy of) the model.

:func:`apply` takes the plan (which layers) and a rank selector's starts (how each starts) and
returns a new model with every planned layer replaced by a factorized one, and where each went
(:class:`Applied`). Layers are swapped into an ``nn.Module`` by attribute, so it keeps its class
and state-dict names; in a ``torch.export`` graph the aten call reading the weight is replaced by
a ``call_module`` node. A module that shared the weight computes from the new layer's cores
(:func:`tie_in`). Neither the model nor the plan is changed.

Also the model utilities the later stages share: :func:`tn_layers`, :func:`tied_layers`,
:func:`set_training`, :func:`evaluation_mode`, :func:`replace_module`, and :func:`site_in`, where a checkpoint's layer goes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import ModelError
from .layers import TiedTNLinear, TNLayer, aten_layers, layer_class, tied_layer
from .plan import CompressionPlan, LayerPlan, LayerStart, Site, Starts
from .trace import as_module, get_attr, is_graph_model

#: ``make_gate(size, dtype)``: the gate a selector puts on a bond of ``size`` slices.
MakeGate = Callable[[int, torch.dtype], nn.Module]


def set_training(module: nn.Module, mode: bool) -> nn.Module:
    """``module.train(mode)``, also for torch.export modules that refuse it.

    An exported graph has its train/eval behaviour baked in, but our factorized layers
    inside it still need the flag (gates sample noise only in training).
    """
    try:
        module.train(mode)
    except NotImplementedError:
        for sub in module.modules():
            sub.training = mode
    return module


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in evaluation mode for a block, then every submodule back in its own mode.

    Restoring only the top module's flag would flatten a model whose parts are in different
    modes (a factorized layer training inside a model in evaluation mode, a frozen BatchNorm),
    so whether a run was evaluated, probed or checked would change how it trains."""
    modes = [(m, m.training) for m in module.modules()]
    set_training(module, False)
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _aten_args(node: fx.Node) -> dict[str, Any]:
    """An aten call's arguments by name (the layer class knows the op's signature)."""
    return aten_layers()[node.target].aten_args(node)


@dataclass(frozen=True)
class Applied:
    """What :func:`apply` did: the new model, and where each planned layer went.

    ``sites`` maps a plan's layer name to its site; a graph layer whose name was taken by
    a module holding other tensors lives under a new name (``fc1_tn``). Such a layer has
    no dense home in the model, so it must stay factorized (:attr:`homeless`).
    """

    model: nn.Module
    sites: Mapping[str, Site] = field(default_factory=dict)
    tied: Mapping[str, str] = field(default_factory=dict)  # module computing from another layer's cores -> that layer

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
    bias = get_attr(module, lp.bias_attr) if lp.bias_attr else None
    return layer_class(lp.kind).standin(get_attr(module, lp.weight_attr), bias, args)


def layer_weight(module: nn.Module, lp: LayerPlan) -> torch.Tensor:
    """The dense weight a planned layer starts from (module or graph attribute), in its class's layout."""
    if lp.weight_attr:
        return get_attr(module, lp.weight_attr)
    return layer_class(lp.kind).dense_view(module.get_submodule(lp.name)).weight


def build_layer(lp: LayerPlan, start: LayerStart, source_module: nn.Module, sigma: float,
                generator: torch.Generator | None, make_gate: MakeGate | None = None) -> TNLayer:
    """The factorized layer for ``lp`` as ``start`` says, cores initialised from ``source_module``'s weight."""
    extra: dict[str, Any] = {"merge_spatial": True} if start.layout.merge_spatial else {}
    if start.layout.paired:
        extra["paired"] = True
    if start.whiten is not None:
        extra["whiten"] = start.whiten
    if start.whiten_out is not None:
        extra["whiten_out"] = start.whiten_out
    layer = layer_class(lp.kind).from_dense(source_module, start.decomp, start.ranks, start.layout.tensorization,
                                            gated=False, sigma=sigma, generator=generator, **extra)
    if make_gate is not None:
        dtype = layer.cores[0].dtype
        layer.set_gates_(lambda size: make_gate(size, dtype))
    return layer.to(source_module.weight.device)  # cores and gates live where the weight did


def apply(model: Any, the_plan: CompressionPlan, starts: Starts, *, sigma: float, seed: int,
          make_gate: MakeGate | None = None, progress: Callable[[str, int, int], None] | None = None) -> Applied:
    """A copy of ``model`` with every planned layer replaced by a factorized one built as its
    start says (``sigma``: the layers' gate noise, recorded in their spec; ``seed``: the draws
    of a ring's initialisation).

    ``make_gate(size, dtype)`` puts a gate on every bond (None: ungated layers, for
    selectors whose ranks are final). Neither ``model`` nor ``the_plan`` is changed.
    """
    module = copy.deepcopy(as_module(model))
    gen = torch.Generator().manual_seed(seed)
    by_name = {st.name: st for st in starts.layers}
    sites: dict[str, Site] = {}
    tied: dict[str, str] = {}
    for i, lp in enumerate(the_plan.layers):
        if progress:
            progress(lp.name, i, len(the_plan.layers))
        layer = build_layer(lp, by_name[lp.name], dense_source(module, lp), sigma, gen, make_gate)
        layer.train(_mode_of(module, lp))  # the mode of what it replaces, not a new module's default
        site = _graph_site(module, lp) if lp.weight_attr is not None else Site(lp.name)
        swap_in(module, site, layer)
        sites[lp.name] = site
        for user in lp.tied:
            tie_in(module, user, layer)
            tied[user] = site.name
    return Applied(module, sites, tied)


def _mode_of(module: nn.Module, lp: LayerPlan) -> bool:
    """Whether the layer ``lp`` replaces is in training mode (a graph's weight: the graph's mode)."""
    return module.get_submodule(lp.name).training if lp.weight_attr is None else module.training


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
