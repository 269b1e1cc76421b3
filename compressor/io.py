"""Slim checkpoints: one safetensors file that describes itself, and torch.export programs.

The file holds every tensor of the slim model plus JSON metadata (format version, each
factorized layer's spec, how to find it in the base architecture, parameter counts).
``load`` rebuilds the factorized layers from that metadata *before* loading tensors, so
changed ranks never cause size-mismatch errors, and nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, ModelError, require_file
from .graph import LayerPlan, as_module, count_params, set_training, swap_in, tn_layers
from .layers import TNLayer

FORMAT = "compressor.slim"
VERSION = 1
META_ATTR = "_compressor_meta"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def describe(model: nn.Module) -> dict[str, Any]:
    """The metadata ``save`` writes, for a slim model produced by ``compress``/``load``."""
    info = getattr(model, META_ATTR, None) or {}
    layers = {}
    for name, layer in tn_layers(model).items():
        if layer.gated:
            raise CheckpointError(f"layer {name!r} still has gates; prune it (layer.prune_()) before saving")
        entry = {"spec": layer.spec()}
        entry.update(info.get("attrs", {}).get(name, {}))
        layers[name] = entry
    params = count_params(model)
    dense = info.get("dense_params")
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": info.get("source", "module"),
        "layers": layers,
        "params": params,
        "dense_params": dense,
        "ratio": (dense / params) if dense else None,
        "extra": info.get("extra", {}),
    }


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the slim model to ``path`` (.safetensors) atomically."""
    meta = describe(model)
    if extra:
        meta["extra"] = {**meta["extra"], **extra}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    header = {"compressor": json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a slim checkpoint, with clear errors for anything else."""
    path = require_file(path, CheckpointError, "checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("compressor")
            keys = list(f.keys())
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a compressor checkpoint (no 'compressor' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupted compressor metadata") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise CheckpointError(f"{path} has unknown checkpoint format {meta.get('format')!r}")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer compressor (format version {meta['version']})")
    meta["tensor_names"] = keys
    return meta


def _build_base(base: Any) -> nn.Module:
    if isinstance(base, (str, os.PathLike)):
        from .modelio import load_model

        return as_module(load_model(base))
    if isinstance(base, (nn.Module, torch.export.ExportedProgram)):
        return copy.deepcopy(as_module(base))
    if callable(base):
        return as_module(base())
    raise CheckpointError("base must be a model, a torch.export program, a .pt2 path, or a factory returning a model")


def rebuild(base: Any, meta: dict[str, Any]) -> nn.Module:
    """The base architecture with every factorized layer of ``meta`` swapped in (empty cores)."""
    module = _build_base(base)
    graph = meta.get("source") == "graph"
    for name, entry in meta["layers"].items():
        try:
            layer = TNLayer.from_spec(entry["spec"])
            lp = LayerPlan(name, entry["spec"]["kind"], (), ((), ()), 1, 0,
                           entry.get("weight_attr"), entry.get("bias_attr"))
            swap_in(module, lp, layer, graph=graph)
        except (AttributeError, KeyError, ModelError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this base architecture at layer {name!r} "
                                  f"({_first_line(exc)})") from None
    info = {"source": meta.get("source", "module"), "dense_params": meta.get("dense_params"),
            "attrs": {n: {k: e[k] for k in ("weight_attr", "bias_attr") if k in e} for n, e in meta["layers"].items()},
            "extra": meta.get("extra", {})}
    setattr(module, META_ATTR, info)
    return module


def load(path: str | os.PathLike, base: Any) -> nn.Module:
    """Rebuild the slim model saved at ``path`` on top of ``base`` (model, factory or .pt2 path)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    module = rebuild(base, meta)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} is truncated or corrupted ({_first_line(exc)})") from None
    result = module.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"the checkpoint does not match the base architecture: missing {sorted(result.missing_keys)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}")
    return set_training(module, False)


def export_program(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a self-contained ``torch.export`` program of ``model`` with a dynamic batch."""
    set_training(model, False)
    example = example.detach().clone()
    if example.shape[0] < 2:
        example = torch.cat([example, example], 0)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # torch.export.save insists on a .pt2 name; our temp file has none
    torch.export.save(program, buffer)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
