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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, ModelError, first_line
from .files import atomic_write, read_safetensors, read_safetensors_header
from .graph import Site, as_module, count_params, set_training, swap_in, tn_layers
from .layers import TNLayer
from .model_files import load_model

FORMAT = "compressor.slim"
VERSION = 1
_INFO_ATTR = "_compressor_slim_info"


@dataclass
class SlimInfo:
    """What a checkpoint records about a slim model besides its tensors and layer specs.

    ``sites`` names, for layers that replaced an aten call of a ``torch.export`` graph,
    the attributes that call read, so :func:`rebuild` finds the same call in the base
    program. ``extra`` is free-form JSON (decomposition, target, report figures).
    """

    source: str = "module"
    dense_params: int | None = None
    sites: dict[str, Site] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def mark_slim(model: nn.Module, info: SlimInfo) -> nn.Module:
    """Attach ``info`` to ``model`` so :func:`save` can describe it (``compress``/``load`` do this)."""
    object.__setattr__(model, _INFO_ATTR, info)
    return model


def slim_info(model: nn.Module) -> SlimInfo:
    """What :func:`mark_slim` attached, or defaults for a model that was never marked."""
    return getattr(model, _INFO_ATTR, None) or SlimInfo()


def describe(model: nn.Module) -> dict[str, Any]:
    """The metadata ``save`` writes, for a slim model produced by ``compress``/``load``."""
    info = slim_info(model)
    layers = {}
    for name, layer in tn_layers(model).items():
        if layer.gated:
            raise CheckpointError(f"layer {name!r} still has gates; prune it (layer.prune_()) before saving")
        entry = {"spec": layer.spec()}
        site = info.sites.get(name)
        if site is not None:
            entry.update(weight_attr=site.weight_attr, bias_attr=site.bias_attr)
        layers[name] = entry
    params = count_params(model)
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": info.source,
        "layers": layers,
        "params": params,
        "dense_params": info.dense_params,
        "ratio": (info.dense_params / params) if info.dense_params else None,
        "extra": dict(info.extra),
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
    path = Path(path).expanduser()
    header, keys = read_safetensors_header(path, CheckpointError, "checkpoint")
    raw = header.get("compressor")
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
        return as_module(load_model(base))
    if isinstance(base, (nn.Module, torch.export.ExportedProgram)):
        return copy.deepcopy(as_module(base))
    if callable(base):
        return as_module(base())
    raise CheckpointError("base must be a model, a torch.export program, a .pt2 path, or a factory returning a model")


def rebuild(base: Any, meta: dict[str, Any]) -> nn.Module:
    """The base architecture with every factorized layer of ``meta`` swapped in (empty cores)."""
    module = _build_base(base)
    sites = {}
    for name, entry in meta["layers"].items():
        try:
            site = Site(name, entry.get("weight_attr"), entry.get("bias_attr"))
            swap_in(module, site, TNLayer.from_spec(entry["spec"]))
        except (AttributeError, KeyError, ModelError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this base architecture at layer {name!r} "
                                  f"({first_line(exc)})") from None
        if site.in_graph:
            sites[name] = site
    return mark_slim(module, SlimInfo(meta.get("source", "module"), meta.get("dense_params"), sites,
                                      meta.get("extra", {})))


def load(path: str | os.PathLike, base: Any) -> nn.Module:
    """Rebuild the slim model saved at ``path`` on top of ``base`` (model, factory or .pt2 path)."""
    meta = read_metadata(path)
    module = rebuild(base, meta)
    tensors = read_safetensors(path, CheckpointError, "checkpoint")
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
