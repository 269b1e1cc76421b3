"""Int8 weights in a slim checkpoint: the quantizer, the metadata that describes it, its check, and
the byte arithmetic a size target in bytes is met with.

What is quantized: every factorized layer's cores and the weight of every layer left dense (a
Linear, Conv2d, Embedding or ``transformers`` Conv1D module, or the weight an aten
linear/conv2d/embedding call of a ``torch.export`` graph reads). Biases, norms and buffers stay
in their dtype: they are a small share of a model, and an error in a bias or a norm's scale
shifts every output instead of adding noise to one product.

The scheme is symmetric and per channel: ``scale = max|w| / 127`` over each slice along the
channel axis, ``q = round(w / scale)`` in [-127, 127], so the error of every element is at most
``scale / 2``. A dense weight's channel axis is its output axis (0; the last one for a weight
stored transposed, as Conv1D's). A core ``(r_left, mode, r_right)`` has three axes and takes the
one whose scales leave the smallest error (:func:`quantize_core`): no single axis is best for
every core. A ring's middle cores are small and their bond slices carry very different
magnitudes (a slice the gates left small would be rounded to zero by a large neighbour), so they
mostly take a bond: on LeNet-5 at 5x (Fashion-MNIST) the left bond gave 1.3 / 1.8 / 1.1 % weight
error for conv2 / fc1 / fc2, against 1.6 / 2.7 / 1.1 % per mode slice. A train's end core has a
bond of 1, where a bond's scale is one scale for the whole core; SmolLM2-135M's layers at 1.5x
are two-core trains ``(1, in, r), (r, out, 1)``, and scaling them per left bond raised the
held-out perplexity by 5.4 % over float32 (495.3 -> 521.9, 64 examples), per mode slice by 0.75 %
(-> 499.0), for 1.2 MB of scales in a 90 MB file. The scales a core can have are at most its
largest side, which is what a byte target counts on (:func:`planned_scales`).

The quantizer is this module's own few lines of torch, not torchao's ``quantize_``: the file must
be the same on every machine, with or without an optional package, and no CPU kernel pays here
(torchao 0.18's int8 weight-only Linear is 2-5x slower than fp32 at batch 1 and no faster at
8x128 on this project's 2-core AVX2 machines; its int4 kernels need CUDA or an ARM library). So
a loaded model computes in the weights' own dtype: the file shrinks, the runtime does not change.

Dequantizing is ``(q.float() * scale).to(dtype)``, the same function at save and at load, so the
weights a compressed model held when it was saved are the weights it has after loading, bit for
bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import tensornet as tn
from .errors import CheckpointError, TargetError
from .layers import TNLayer, aten_layers, layer_class_for
from .plan import CompressionPlan, Starts, min_params, tensor_key
from .surgery import tn_layers
from .trace import get_attr

#: What ``quantize`` accepts: ``none`` (every tensor in its dtype) or ``int8``.
SCHEMES = ("none", "int8")
#: The largest quantized magnitude: symmetric, so -128 is never used.
QMAX = 127
#: Which implementation made the int8 weights (recorded in the file and the report).
QUANTIZER = "compressor.quantize: symmetric per-channel int8, scale = max|w|/127"
#: A scale never falls below this (a channel of zeros would otherwise get scale 0, which a
#: checkpoint's check refuses): float32's machine epsilon, as torchao uses.
MIN_SCALE = torch.finfo(torch.float32).eps
#: The dtypes a quantized tensor may be given back as, by the name the metadata uses.
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Bytes of an element that is not quantized (the dense file is counted in float32) and of a scale.
FLOAT_BYTES = SCALE_BYTES = 4


def scale_name(name: str) -> str:
    """The name a checkpoint gives the scales of the quantized tensor ``name``: outside the state's
    dotted names (a colon), so no module's tensor can have it and no layer's prefix covers it."""
    return f"scale:{name}"


# ------------------------------------------------------------------ the quantizer
@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """An int8 tensor and its float32 scales along ``axis``, standing for a ``dtype`` tensor."""

    values: torch.Tensor
    scale: torch.Tensor
    axis: int
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.values, self.scale, self.axis, self.dtype)


def quantize_tensor(w: torch.Tensor, axis: int) -> QuantizedTensor:
    """``w`` quantized symmetrically with one scale per slice along ``axis`` (``max|w| / 127``)."""
    w32 = w.detach().to(torch.float32)
    others = [d for d in range(w.dim()) if d != axis]
    amax = w32.abs().amax(dim=others) if others else w32.abs()
    scale = (amax / QMAX).clamp(min=MIN_SCALE).contiguous()
    values = torch.round(w32 / _along(scale, axis, w.dim())).clamp(-QMAX, QMAX).to(torch.int8)
    return QuantizedTensor(values.contiguous(), scale, axis, w.dtype)


def quantize_core(core: torch.Tensor) -> QuantizedTensor:
    """``core`` quantized along the axis whose scales leave the smallest squared error (ties: the
    lower axis), so a core with a bond of 1 is not scaled as one block (module docstring)."""
    best, best_error = None, math.inf
    for axis in range(core.dim()):
        q = quantize_tensor(core, axis)
        error = float((q.dequantize().to(torch.float32) - core.detach().to(torch.float32)).square().sum())
        if error < best_error:
            best, best_error = q, error
    return best


def dequantize(values: torch.Tensor, scale: torch.Tensor, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor int8 ``values`` with ``scale`` along ``axis`` stand for (the one formula, save and load)."""
    return (values.to(torch.float32) * _along(scale, axis, values.dim())).to(dtype)


def _along(scale: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


# ------------------------------------------------------------------ which tensors
def _dense_weights(model: nn.Module) -> dict[tuple, tuple[torch.Tensor, int]]:
    """``{tensor key: (weight, channel axis)}`` of every dense layer a kind could replace: registered
    modules, and the parameters aten linear/conv2d/embedding calls of a graph read."""
    found = {}
    for module in model.modules():
        cls = layer_class_for(module) if not isinstance(module, TNLayer) else None
        weight = getattr(module, "weight", None) if cls is not None else None
        if isinstance(weight, nn.Parameter):
            transposed = cls.dense_view(module).weight is not weight  # Conv1D: (in, out)
            found[tensor_key(weight)] = (weight, weight.dim() - 1 if transposed else 0)
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in aten_layers():
                w = aten_layers()[node.target].aten_args(node).get("weight")
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    weight = get_attr(model, w.target)
                    if isinstance(weight, nn.Parameter):
                        found[tensor_key(weight)] = (weight, 0)
    return {k: (w, axis) for k, (w, axis) in found.items() if w.is_floating_point() and w.dim() >= 2}


def quantizable(model: nn.Module) -> dict[str, int | None]:
    """``{state name: channel axis}`` of the tensors ``int8`` quantizes in ``model``: the weight of every
    layer left dense (its channel axis) and every core of its factorized layers (None: the core's
    own best axis, :func:`quantize_core`). A tensor shared under several names appears once, under
    the first (the name a checkpoint writes)."""
    axes: dict[tuple, int | None] = {key: axis for key, (_, axis) in _dense_weights(model).items()}
    for layer in tn_layers(model).values():
        axes.update({tensor_key(core): None for core in layer.cores})
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = tensor_key(t)
        if key in axes and key not in seen:
            seen.add(key)
            out[name] = axes[key]
    return out


@dataclass(frozen=True, eq=False)
class Quantization:
    """The int8 form of a slim model's weights, by state name: what ``save`` writes in their place."""

    scheme: str
    tensors: Mapping[str, QuantizedTensor]

    def describe(self) -> dict[str, Any]:
        """The checkpoint metadata's ``quantization`` entry (see :func:`check_metadata`)."""
        return {"scheme": self.scheme, "quantizer": QUANTIZER,
                "tensors": {name: {"dtype": _dtype_name(q.dtype), "scale": scale_name(name), "axis": q.axis}
                            for name, q in self.tensors.items()}}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The int8 tensors under their names and their scales under :func:`scale_name`'s."""
        out = {}
        for name, q in self.tensors.items():
            out[name], out[scale_name(name)] = q.values, q.scale
        return out

    def load_into(self, model: nn.Module) -> nn.Module:
        """Give ``model``'s quantized tensors their dequantized values (in place): the weights the
        saved file will load as, so the model measured is the model delivered."""
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, q in self.tensors.items():
                state[name].copy_(q.dequantize())
        return model

    def scales(self) -> int:
        return sum(q.scale.numel() for q in self.tensors.values())

    def elements(self) -> int:
        return sum(q.values.numel() for q in self.tensors.values())


def state_bytes(elements: int, quantization: Quantization | None) -> int:
    """Bytes of a checkpoint's tensors whose state holds ``elements``, ``quantization``'s among them
    stored as int8 with their float32 scales, every other element as float32 (headers aside)."""
    if quantization is None:
        return FLOAT_BYTES * elements
    q = quantization.elements()
    return FLOAT_BYTES * (elements - q) + q + SCALE_BYTES * quantization.scales()


def quantize_model(model: nn.Module, scheme: str) -> Quantization | None:
    """The ``scheme`` form of ``model``'s weights as they are now (None for ``none``); ``model`` is not changed."""
    if scheme == "none":
        return None
    if scheme != "int8":
        raise CheckpointError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    state = model.state_dict(keep_vars=True)
    return Quantization(scheme, {name: quantize_core(state[name]) if axis is None else quantize_tensor(state[name], axis)
                                 for name, axis in quantizable(model).items()})


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in FLOAT_DTYPES.items() if d == dtype)


def check_written(quantization: Quantization, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every quantized tensor is among the ``tensors`` a checkpoint writes, holding exactly its
    dequantized values (a weight changed after quantizing would be written as something else),
    and no scale's name is taken by a tensor of the model."""
    for name, q in quantization.tensors.items():
        if name not in tensors:
            raise CheckpointError(f"the quantization describes {name!r}, which the model does not hold")
        if not torch.equal(tensors[name], q.dequantize()):
            raise CheckpointError(f"{name!r} no longer holds the weights it was quantized to (changed after "
                                  "quantizing?): quantize the model again before saving")
        if scale_name(name) in tensors:
            raise CheckpointError(f"the model has a tensor named {scale_name(name)!r}, the name the scales of "
                                  f"{name!r} would be written under")


# ------------------------------------------------------------------ the checkpoint's side
def scale_names(meta: Mapping[str, Any]) -> set[str]:
    """The scale tensors a checked metadata's quantization names (none without one)."""
    entry = meta.get("quantization")
    return {e["scale"] for e in entry["tensors"].values()} if isinstance(entry, dict) else set()


def check_metadata(path: Path, meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                   dtypes: Mapping[str, str]) -> None:
    """The ``quantization`` entry agrees with the file's header: every tensor it calls int8 is stored
    as int8, its scales are float32 of one value per slice along a valid axis, names exist and
    are used once; and the file holds no int8 tensor the entry does not describe."""
    entry = meta.get("quantization")
    described = _check_entry(path, entry, shapes, dtypes) if entry is not None else set()
    stray = sorted(name for name, dtype in dtypes.items() if dtype == "I8" and name not in described)
    if stray:
        raise CheckpointError(f"{path} holds int8 tensor {stray[0]!r} that its metadata does not describe as "
                              "quantized")


def _check_entry(path: Path, entry: Any, shapes: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, str]) -> set[str]:
    """The quantized tensors' names, once :func:`check_metadata`'s rules hold for each."""
    tensors = entry.get("tensors") if isinstance(entry, dict) else None
    if not isinstance(tensors, dict) or not tensors or entry.get("scheme") != "int8":
        scheme = entry.get("scheme") if isinstance(entry, dict) else None
        raise CheckpointError(f"{path} has a malformed quantization entry (scheme {str(scheme)[:40]!r}, int8 "
                              "tensors described one by one)")
    scales = [e.get("scale") if isinstance(e, dict) else None for e in tensors.values()]
    for name, e in tensors.items():
        _check_tensor(path, name, e, shapes, dtypes)
    if len(set(scales)) != len(scales) or set(scales) & set(tensors):
        raise CheckpointError(f"{path}: a quantization scale tensor is named twice")
    return set(tensors)


def _check_tensor(path: Path, name: str, e: Any, shapes: Mapping[str, tuple[int, ...]],
                  dtypes: Mapping[str, str]) -> None:
    """One described tensor: int8 in the file, a known dtype, an axis of its shape, a float32 scale
    tensor of one value per slice along it."""
    if name not in shapes:
        raise CheckpointError(f"{path}: quantized tensor {name!r} is not in the file")
    if dtypes[name] != "I8":
        raise CheckpointError(f"{path}: {name!r} is described as int8 but the file holds {dtypes[name]}")
    ok = (isinstance(e, dict) and e.get("dtype") in FLOAT_DTYPES and isinstance(e.get("scale"), str)
          and type(e.get("axis")) is int and 0 <= e["axis"] < len(shapes[name]))
    if not ok:
        raise CheckpointError(f"{path}: quantized tensor {name!r} has a malformed entry (dtype, scale, axis)")
    scale = e["scale"]
    if scale not in shapes:
        raise CheckpointError(f"{path}: the scales {scale!r} of quantized tensor {name!r} are not in the file")
    if dtypes[scale] != "F32":
        raise CheckpointError(f"{path}: the scales {scale!r} of {name!r} must be float32, the file holds "
                              f"{dtypes[scale]}")
    needed = (shapes[name][e["axis"]],)
    if tuple(shapes[scale]) != needed:
        raise CheckpointError(f"{path}: the scales {scale!r} of {name!r} have shape {list(shapes[scale])[:8]}, "
                              f"not {list(needed)} (one per slice along axis {e['axis']})")


def dequantized(path: Path, meta: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` read from a checked checkpoint with every int8 tensor dequantized and the scales
    taken out; a scale that is not finite or not positive is refused (it would give NaN or a
    sign flip where a weight should be)."""
    entry = meta.get("quantization")
    if entry is None:
        return tensors
    out = dict(tensors)
    for name, e in entry["tensors"].items():
        scale = out.pop(e["scale"])
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise CheckpointError(f"{path}: the scales {e['scale']!r} of {name!r} hold a value that is not "
                                  "finite and positive")
        out[name] = dequantize(out[name], scale, e["axis"], FLOAT_DTYPES[e["dtype"]])
    return out


# ------------------------------------------------------------------ a size target in bytes
@dataclass(frozen=True)
class ByteBudget:
    """The byte arithmetic of a target in bytes: ``target`` is the dense file's bytes (every element
    in float32) over the slim file's, whose quantized elements take 1 byte and each of their
    scales 4, the rest (biases, norms, buffers) 4.

    A run counts elements (:func:`~compressor.plan.count_state`); with ``kept`` of them staying
    float32, ``n`` elements and ``s`` scales take ``4 kept + (n - kept) + 4 s`` bytes. The run
    therefore aims at the element ratio whose size meets the byte target
    (:meth:`element_target`), with the scales it can have at most."""

    target: float
    dense: int  # elements of the dense model's state
    kept: int  # elements of the slim model that stay float32
    dense_scales: int  # scales of the layers no plan factorizes

    def bytes_of(self, elements: int, scales: int) -> int:
        return FLOAT_BYTES * self.kept + (elements - self.kept) + SCALE_BYTES * scales

    def ratio(self, elements: int, scales: int) -> float:
        return FLOAT_BYTES * self.dense / self.bytes_of(elements, scales)

    def element_target(self, scales: int) -> float:
        """The element ratio whose model, with ``scales`` scales, meets the byte target (inf: none does)."""
        allowed = FLOAT_BYTES * self.dense / self.target - (FLOAT_BYTES - 1) * self.kept - SCALE_BYTES * scales
        return self.dense / allowed if allowed > 0 else math.inf


def byte_budget(module: nn.Module, the_plan: CompressionPlan, target: float) -> ByteBudget:
    """The :class:`ByteBudget` of compressing the dense ``module`` as ``the_plan`` says to ``target``
    in bytes: what stays float32 is every element but the dense layers' weights, plus what a
    factorized layer saves beside its cores (an embedding's padding row)."""
    weights = _dense_weights(module)
    quantized = sum(w.numel() for w, _ in weights.values())
    planned = {id(w) for w in _planned_weights(module, the_plan)}
    dense_scales = sum(w.shape[axis] for w, axis in weights.values() if id(w) not in planned)
    return ByteBudget(target, the_plan.dense_params, the_plan.dense_params - quantized
                      + sum(lp.extra for lp in the_plan.layers), dense_scales)


def _planned_weights(module: nn.Module, the_plan: CompressionPlan) -> list[torch.Tensor]:
    """The weights of the layers ``the_plan`` factorizes (a graph's by attribute, a module's by path)."""
    out = []
    for lp in the_plan.layers:
        try:
            out.append(module.get_parameter(lp.weight_attr) if lp.weight_attr else module.get_submodule(lp.name).weight)
        except AttributeError:
            continue
    return out


def planned_scales(the_plan: CompressionPlan, starts: Starts | None = None) -> int:
    """The most scales the planned layers can end with: each core's largest side at its layer's
    start (ranks only shrink, and a core is scaled along one of its sides), or the layer's output
    channels should it stay or go back to dense; before the starts are chosen, the output channels
    alone (the estimate a rank selector aims with)."""
    total = 0
    for lp in the_plan.layers:
        st = next((s for s in starts.layers if s.name == lp.name), None) if starts is not None else None
        sides = 0
        if st is not None:
            ranks = tn.resolve_ranks(st.ranks, st.layout.modes, st.decomp)
            sides = sum(max(ranks[k - 1], mode, ranks[k]) for k, mode in enumerate(st.layout.modes))
        total += max(sides, lp.shape[0])
    return total


def aim(budget: ByteBudget, the_plan: CompressionPlan, decomp: str, scales: int) -> float:
    """The element ratio a run aims at to meet ``budget``'s byte target with ``scales`` scales in its
    planned layers. A target that int8 alone reaches, or that no rank can, is a ``TargetError``."""
    alone = budget.ratio(the_plan.dense_params, budget.dense_scales + sum(lp.shape[0] for lp in the_plan.layers))
    if budget.target <= alone:
        raise TargetError(f"target {budget.target:g}x in bytes is met by int8 quantization alone: it makes the file "
                          f"{alone:.2f}x smaller than the dense float32 file without factorizing any layer; ask for "
                          f"more than {alone:.2f}x, or leave quantization out to count the target in parameters")
    wanted = budget.element_target(budget.dense_scales + scales)
    most = the_plan.dense_params / min_params(the_plan, decomp)  # every factorized bond at rank 1
    if wanted > most:
        best = budget.ratio(min_params(the_plan, decomp), budget.dense_scales + scales)
        raise TargetError(f"target {budget.target:g}x in bytes is more than this model can give with int8 weights: "
                          f"about {best:.1f}x at most, with every factorized bond at rank 1")
    return wanted
