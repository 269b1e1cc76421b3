"""Who reads each weight: a trace of the model's forward, for the planner's one decision per weight.

``torch.fx`` when it can trace the model, else ``torch.export`` on an example input (Hugging
Face transformers; used only as an analysis: the layers are then swapped into the model itself,
which keeps its class and state-dict names), else a walk of ``named_modules()`` with a warning.
Also what kind of model object this is: an ``nn.Module``, or a ``torch.export`` program whose
graph calls aten ops directly (its layers are found as calls, see the planner).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .errors import ModelError, first_line
from .layers import aten_layers, layer_class_for

log = logging.getLogger(__name__)


def as_module(model: Any) -> nn.Module:
    """An ``nn.Module`` for any supported model object (ExportedProgram -> GraphModule)."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module):
        return model
    raise ModelError(f"expected an nn.Module or a torch.export program, got {type(model).__name__}")


def is_graph_model(module: nn.Module) -> bool:
    """True for a GraphModule whose graph calls aten ops directly (a torch.export program)."""
    return isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and n.target in aten_layers() for n in module.graph.nodes
    )


def is_export_graph(model: nn.Module) -> bool:
    """True for a module traced by ``torch.export`` (its graph calls aten operators), even once
    every Linear / Conv2d / Embedding call was replaced by a factorized layer, which
    :func:`is_graph_model` no longer sees: a slim graph's layers cannot tell which aten call
    each replaced."""
    return isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers users train and serve with: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod``) and DDP / ``DataParallel`` (``module``). Their state dict
    prefixes every name, which would not load onto the base model."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def get_attr(root: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` (a graph's ``get_attr`` target)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Reads:
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


def _fx_reads(model: nn.Module) -> Reads:
    graph = _LayerTracer().trace(model)
    scopes: dict[int, list[str]] = {}
    for n in graph.nodes:
        if n.op == "call_module":  # a leaf reads its own tensors
            for p in model.get_submodule(n.target).parameters():
                scopes.setdefault(id(p), []).append(n.target)
        elif n.op == "get_attr":
            obj = get_attr(model, n.target)
            if isinstance(obj, torch.Tensor):
                scopes.setdefault(id(obj), []).append(_scope(n))
    return Reads("module", scopes)


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


def _export_reads(model: nn.Module, example: Any) -> Reads:
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
    return Reads("export", scopes)


def trace_reads(model: nn.Module, example: Any) -> Reads:
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
    return Reads("module-walk")
