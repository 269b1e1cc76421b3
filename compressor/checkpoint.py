"""Slim checkpoints: one safetensors file that describes itself, and torch.export programs.

The file holds every tensor of the slim model plus JSON metadata (format version, each
factorized layer's spec, how to find it in the base architecture, parameter counts).
``load`` rebuilds the factorized layers from that metadata *before* loading tensors, so
changed ranks never cause size-mismatch errors, and nothing is ever unpickled. What the
tensors do not tell (the dense size behind the ratio, graph sites, the run's decomposition
and target) is the slim model's :class:`~compressor.blueprint.Blueprint`, passed to ``save``
and read back with :func:`read_blueprint`.

The metadata is never trusted: :func:`read_metadata` checks every layer spec against the
tensor shapes in the file's header before anything is built, so a doctored checkpoint
cannot make ``load`` allocate more than the file holds.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from . import tensornet as tn
from .blueprint import ELEMENT_TARGET, Blueprint, Blueprinted, blueprint_of
from .errors import CheckpointError, CompressorError, ModelError, first_line
from .files import (atomic_write, read_safetensors, read_safetensors_dtypes, read_safetensors_each,
                    read_safetensors_header)
from .plan import Site, count_state, tensor_key
from .surgery import set_submodule, set_training, site_in, swap_in, tied_layers, tn_layers
from .trace import as_module, is_graph_model, unwrapped
from .layers import TiedTNLinear, TNLayer, layer_class, tied_head_size
from .model_files import load_model
from .quantize import Quantization, check_metadata, check_written, dequantized, scale_names
from .forms import check_form
from .serving import FormChoice, serve_as, size_budget

FORMAT = "compressor.slim"
VERSION = 4
#: Version 2 added ``tied`` (layers computing from another layer's cores); a file without
#: ties is still written as version 1, so older readers keep reading it.
TIED_VERSION = 2
#: Version 3 added ``quantization`` (int8 tensors and their scales, see compressor/quantize.py):
#: an older reader would cast the int8 values into float weights, so it must refuse the file.
QUANTIZED_VERSION = 3
#: Version 4 added paired (mpo) layouts (a spec's ``"paired": true``: core k holds input mode k and
#: output mode k): an older reader would take the cores for inputs-then-outputs and compute a
#: scrambled weight, so it must refuse the file. A file without one keeps its older version.
PAIRED_VERSION = 4


def describe(model: nn.Module, blueprint: Blueprint) -> dict[str, Any]:
    """The metadata ``save`` writes for the slim ``model`` that ``blueprint`` describes."""
    layers = {}
    for name, layer in tn_layers(model).items():
        if layer.gated:
            raise CheckpointError(f"layer {name!r} still has gates; prune it (layer.prune_()) before saving")
        entry = {"spec": layer.spec()}
        site = blueprint.site(name)
        if site is not None:
            entry.update(weight_attr=site.weight_attr, bias_attr=site.bias_attr)
        layers[name] = entry
    tied = describe_tied(model)
    params = count_state(model)
    dense = blueprint.dense_params
    meta = {
        "format": FORMAT,
        "version": max(TIED_VERSION if tied else 1,
                       PAIRED_VERSION if any(e["spec"].get("paired") for e in layers.values()) else 1),
        "source": blueprint.source,
        "layers": layers,
        "params": params,
        "dense_params": dense,
        "ratio": (dense / params) if dense else None,
        "extra": blueprint.file_extra(),
    }
    if tied:
        meta["tied"] = tied
    return meta


def describe_tied(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: entry}`` of every module computing from another layer's cores: a tied Linear
    (``{"kind": "tied_linear", "source", "bias"}``) or the factorized layer met again under
    another name (``{"kind": "alias", "source"}``). Its cores are written once, under the source."""
    out = {}
    for name, (source, module) in tied_layers(model).items():
        if not source:
            raise CheckpointError(f"{name!r} computes from the cores of a factorized layer that is no longer in the "
                                  "model (did that layer go back to dense?); it cannot be saved")
        if isinstance(module, TiedTNLinear):
            out[name] = {"kind": module.kind, "source": source, "bias": module.bias is not None}
        else:
            out[name] = {"kind": "alias", "source": source}
    return out


def save(model: nn.Module | Blueprinted, path: str | os.PathLike, extra: dict[str, Any] | None = None, *,
         blueprint: Blueprint | None = None, quantization: Quantization | None = None) -> Path:
    """Write a slim model to ``path`` (.safetensors) atomically.

    ``model`` is what ``compress`` returned (its model, blueprint and quantization) or a slim model. A
    model's blueprint is ``blueprint`` when given, else what the model tells by itself
    (:func:`~compressor.blueprint.blueprint_of`): enough for factorized layers held as
    submodules, not for a ``torch.export`` graph. ``extra`` adds JSON to the metadata.
    ``quantization`` (else the result's) writes those tensors as int8 with their scales; the
    model must hold exactly their dequantized values (``Quantization.load_into``).
    """
    if quantization is None and not isinstance(model, nn.Module):  # what compress returned
        quantization = getattr(model, "quantization", None)
    model, blueprint = _model_and_blueprint(model, blueprint)
    meta = describe(model, blueprint)
    if extra:
        meta["extra"] = {**meta["extra"], **extra}
    tensors, aliases = _unique_tensors(model)
    if aliases:
        meta["aliases"] = aliases
    if quantization is not None:
        check_written(quantization, tensors)
        tensors.update(quantization.file_tensors())
        meta.update(version=max(meta["version"], QUANTIZED_VERSION), quantization=quantization.describe())
    header = {"compressor": json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _model_and_blueprint(slim: Any, blueprint: Blueprint | None) -> tuple[nn.Module, Blueprint]:
    """The model to save and the blueprint describing it (an explicit ``blueprint`` wins)."""
    if isinstance(slim, nn.Module):
        slim = unwrapped(slim)
        return slim, blueprint if blueprint is not None else blueprint_of(slim)
    if isinstance(slim, Blueprinted) and isinstance(slim.model, nn.Module):
        return slim.model, blueprint if blueprint is not None else slim.blueprint
    raise CheckpointError(f"save takes what compress returned or a slim nn.Module, not {type(slim).__name__}")


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state to write, a tensor shared under several names (tied weights) once, and
    ``{other name: written name}`` so :func:`load` can give it back every name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = tensor_key(t)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a slim checkpoint, with clear errors for anything else."""
    path = Path(path).expanduser()
    header, shapes = read_safetensors_header(path, CheckpointError, "checkpoint")
    raw = header.get("compressor")
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a compressor checkpoint (no 'compressor' metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError: bad JSON, or an integer of more than 4300 digits
        raise CheckpointError(f"{path} has corrupted compressor metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has corrupted compressor metadata")
    if meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise CheckpointError(f"{path} has unknown checkpoint format {str(meta.get('format'))[:60]!r}")
    version = meta.get("version", 0)
    if not _is_int(version):
        raise CheckpointError(f"{path} has a malformed format version {repr(version)[:60]}")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer compressor (format version {version})")
    if not shapes:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    meta["tensor_names"] = list(shapes)
    _check_fields(path, meta)
    check_metadata(path, meta, shapes, read_safetensors_dtypes(path, CheckpointError, "checkpoint"))
    for name, entry in meta["layers"].items():
        check_layer(path, name, entry, shapes)
    for name, entry in meta.get("tied", {}).items():
        check_tied(path, name, entry, meta["layers"], shapes)
    return meta


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity, sorted."""
    return sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def read_blueprint(path: str | os.PathLike) -> Blueprint:
    """The blueprint recorded in the slim checkpoint at ``path``: with the model ``load`` rebuilt
    from it, ``save(model, path2, blueprint=read_blueprint(path))`` writes the same description
    again (a ``torch.export`` graph cannot tell it by itself)."""
    return blueprint_in(read_metadata(path))


def blueprint_in(meta: dict[str, Any]) -> Blueprint:
    """The blueprint a checkpoint's (checked) metadata records: :func:`read_blueprint` without reading the file."""
    extra = dict(meta.get("extra", {}))
    decomp, target = extra.pop("decomp", None), extra.pop("target", None)
    sites = tuple(Site(name, entry["weight_attr"], entry.get("bias_attr"))
                  for name, entry in meta["layers"].items() if entry.get("weight_attr") is not None)
    return Blueprint(meta.get("source", "module"), meta.get("dense_params"), sites,
                     decomp if isinstance(decomp, str) else None,
                     target if isinstance(target, (int, float)) and not isinstance(target, bool) else None, extra)


def check_tied(path: Path, name: str, entry: Any, layers: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """A tied entry names a layer of the file and, for a tied Linear, a bias of the right size."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    source = entry.get("source") if isinstance(entry, dict) else None
    well_named = bool(name) and all(name.split(".")) and name not in layers
    if kind not in (TiedTNLinear.kind, "alias") or not isinstance(source, str) or source not in layers or not well_named:
        raise CheckpointError(f"{path}: tied layer {name!r} has a malformed entry")
    if kind == "alias":
        return
    spec = layers[source]["spec"]
    out = tied_head_size(spec)
    if out is None or not isinstance(entry.get("bias"), bool):
        raise CheckpointError(f"{path}: tied layer {name!r} has a malformed entry")
    key = f"{name}.bias"
    if entry["bias"] and shapes.get(key) != (out,):
        raise CheckpointError(f"{path}: tied layer {name!r} needs a bias {key!r} of shape [{out}]")


#: No size or count in a checkpoint can exceed this (a tensor has fewer than 2**63 elements).
MAX_SIZE = 2 ** 62


def _is_int(value: Any, low: int = 0) -> bool:
    """A JSON integer (not a bool, not a float) of at least ``low`` and at most :data:`MAX_SIZE`."""
    return type(value) is int and low <= value <= MAX_SIZE


def _is_fraction(value: Any) -> bool:
    """A JSON number between 0 and 1 (an accuracy): never NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    """The metadata fields other than layers that code reads have the types it expects."""
    extra = meta.get("extra", {})
    report = extra.get("report", {}) if isinstance(extra, dict) else None
    accuracy = report.get("accuracy") if isinstance(report, dict) else None
    problems = [
        ("source", isinstance(meta.get("source", ""), str)),
        ("dense_params", meta.get("dense_params") is None or _is_int(meta.get("dense_params"), 1)),
        ("extra", isinstance(extra, dict)),
        ("extra.arch", isinstance(extra, dict) and isinstance(extra.get("arch", ""), str)),
        ("extra.report", report is None or isinstance(report, dict)),
        ("extra.report.accuracy", accuracy is None or _is_fraction(accuracy)),
    ]
    problems.append(("tied", isinstance(meta.get("tied", {}), dict)))
    aliases = meta.get("aliases", {})
    problems.append(("aliases", isinstance(aliases, dict) and all(
        isinstance(k, str) and isinstance(v, str) and v in meta["tensor_names"] and k not in meta["tensor_names"]
        for k, v in aliases.items())))
    bad = [field for field, ok in problems if not ok]
    if bad:
        raise CheckpointError(f"{path} has malformed metadata field {bad[0]!r}")


def _check_spec_values(spec: dict[str, Any], klass: type[TNLayer]) -> None:
    """Sizes are positive ints, modes and ranks lists of them, flags bools (before any arithmetic)."""
    missing = [f for f in klass.spec_fields if f not in spec and f not in klass.spec_optional]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    tn.check_decomp(spec["decomp"])
    for f in klass.shape_fields:
        value = spec[f]
        if not (_is_int(value, 1) or (isinstance(value, list) and value and all(_is_int(v, 1) for v in value))):
            raise ValueError(f"{f} must be a positive integer, not {repr(value)[:60]}")
    for f in (*klass.mode_fields, "ranks"):
        value = spec[f]
        if not (isinstance(value, list) and len(value) <= 64 and all(_is_int(v, 1) for v in value)):
            raise ValueError(f"{f} must be a list of positive integers, not {repr(value)[:60]}")
    for f in ("bias", "merge_spatial", "paired"):
        if f in spec and not isinstance(spec[f], bool):
            raise ValueError(f"{f} must be true or false, not {repr(spec[f])[:60]}")


def expected_tensors(name: str, entry: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that the layer ``entry`` (a metadata ``layers`` value) implies."""
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
        raise ValueError("its entry is not an object with a 'spec'")
    if any(entry.get(a) is not None and not isinstance(entry.get(a), str) for a in ("weight_attr", "bias_attr")):
        raise ValueError("weight_attr/bias_attr must be strings")
    spec = entry["spec"]
    klass = layer_class(spec.get("kind"))
    _check_spec_values(spec, klass)
    try:
        modes, _ = TNLayer.spec_size(spec)
    except IndexError:  # core k reads ranks[k]
        raise ValueError(f"it has fewer ranks ({len(spec['ranks'])}) than cores") from None
    ranks = spec["ranks"]
    if len(ranks) != len(modes):
        raise ValueError(f"it has {len(ranks)} ranks for {len(modes)} cores")
    shapes = {f"{name}.cores.{k}": tuple(s) for k, s in enumerate(tn.core_shapes(modes, ranks))}
    if spec.get("bias"):
        shapes[f"{name}.bias"] = (spec[klass.shape_fields[0]],)
    return shapes


def check_layer(path: Path, name: str, entry: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """The layer's spec is well-formed and its cores (and bias) are in the file with exactly
    the shapes the spec implies: rebuilding it then allocates only what the file holds."""
    try:
        expected = expected_tensors(name, entry)
    except (CompressorError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{path}: layer {name!r} has a malformed spec ({first_line(exc, 160)})") from None
    for key, shape in expected.items():
        if key not in shapes:
            raise CheckpointError(f"{path}: layer {name!r} lacks tensor {key!r} that its spec declares")
        if shapes[key] != shape:
            raise CheckpointError(f"{path}: layer {name!r} declares {key!r} of shape {list(shape)[:8]} "
                                  f"but the file holds {list(shapes[key])}")
    stray = sorted(k for k in shapes if k.startswith(f"{name}.cores.") and k not in expected)
    if stray:
        raise CheckpointError(f"{path}: layer {name!r} has tensor {stray[0]!r} that its spec does not declare")


def _build_base(base: Any, trust_pickle: bool = False) -> nn.Module:
    """A fresh module from ``base``; a path loads through ``load_model`` (code runs only if trusted)."""
    if isinstance(base, (str, os.PathLike)):
        return as_module(load_model(base, trust_pickle=trust_pickle))
    if isinstance(base, (nn.Module, torch.export.ExportedProgram)):
        return copy.deepcopy(as_module(base))
    if callable(base):
        return as_module(base())
    raise CheckpointError("base must be a model, a torch.export program, a .pt2 path, or a factory returning a model")


def rebuild(base: Any, meta: dict[str, Any], trust_pickle: bool = False) -> nn.Module:
    """The base architecture with every factorized layer of ``meta`` swapped in (empty cores).

    ``meta`` must come from :func:`read_metadata`, which checked it against the file's tensors.
    """
    module = _build_base(base, trust_pickle)
    for name, entry in meta["layers"].items():
        try:
            site = site_in(module, name, entry.get("weight_attr"), entry.get("bias_attr"))
            layer = TNLayer.from_spec(entry["spec"])
            _check_dense_shape(module, site, layer)
            swap_in(module, site, layer)
        except (AttributeError, KeyError, ModelError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this base architecture at layer {name!r} "
                                  f"({first_line(exc)})") from None
    _rebuild_tied(module, meta.get("tied", {}))
    return module


def _check_dense_shape(module: nn.Module, site: Site, layer: TNLayer) -> None:
    """The base's dense layer at ``site`` has the weight shape the factorized layer stands for
    (a base built from a config that lies about a size is refused here, not run)."""
    if site.in_graph:
        weight = module.get_parameter(site.weight_attr)
    else:
        weight = layer.dense_view(module.get_submodule(site.name)).weight
    if tuple(weight.shape) != tuple(layer.dense_shape()):
        raise ValueError(f"the base's dense weight is {list(weight.shape)[:8]}, the checkpoint's "
                         f"{list(layer.dense_shape())}")


def _rebuild_tied(module: nn.Module, tied: dict[str, Any]) -> None:
    """Swap in the modules that compute from another layer's cores (after those layers)."""
    if tied and is_graph_model(module):
        raise CheckpointError("this checkpoint has tied layers (" + ", ".join(sorted(tied)) + "): load it onto "
                              "the nn.Module it was made from, not a torch.export program")
    for name, entry in tied.items():
        try:
            source, dense = module.get_submodule(entry["source"]), module.get_submodule(name)  # both must exist
            set_submodule(module, name, source if entry["kind"] == "alias" else TiedTNLinear.from_dense(dense, source))
        except (AttributeError, CompressorError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this base architecture at tied layer {name!r} "
                                  f"({first_line(exc)})") from None


def check_fits(path: str | os.PathLike, base: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint at ``path`` loads onto ``base``: every
    factorized layer stands for the base's dense layer at its place, and the rest of the state has
    the base's names and shapes. Reads only the header; ``base`` may be built on ``meta``."""
    meta = read_metadata(path)
    _check_state(path, rebuild(base, meta), meta.get("aliases", {}), scale_names(meta))


def load(path: str | os.PathLike, base: Any, trust_pickle: bool = False, *, form: str = "cores",
         serve_shapes: Any = None, example: Any = None) -> nn.Module:
    """Rebuild the slim model saved at ``path`` on top of ``base`` (model, factory or .pt2 path).
    The model of :func:`load_served`, without the choice of forms."""
    return load_served(path, base, trust_pickle, form=form, serve_shapes=serve_shapes, example=example)[0]


def load_served(path: str | os.PathLike, base: Any, trust_pickle: bool = False, *, form: str = "cores",
                serve_shapes: Any = None, example: Any = None) -> tuple[nn.Module, FormChoice | None]:
    """The slim model saved at ``path`` rebuilt on top of ``base`` (model, factory or .pt2 path),
    and how its layers are served (``None`` in cores, the file's own form): for ``auto``, which
    form each layer took and the speed-ups measured, which a caller keeps or shows.

    ``trust_pickle`` lets a ``base`` path run code when loaded (see ``model_files.load_model``).
    ``form`` is how the factorized layers are served (``compressor.forms``): ``"cores"`` (the
    default: the model the file holds, bit for bit, which trains further and saves again),
    ``"factors"`` or ``"dense"`` for every layer, or ``"auto"``: each layer's fastest form at
    ``serve_shapes`` (default: a decode step and an 8 x 128 prefill for token ids, else batch 1 and
    256 of ``example``) within the checkpoint's size target (``compressor.serving``).
    """
    form = check_form(form)  # before anything is read
    meta = read_metadata(path)  # validated against the file before anything is allocated
    module = rebuild(base, meta, trust_pickle)
    _check_state(path, module, meta.get("aliases", {}), scale_names(meta))
    materialize(module)
    for layer in tn_layers(module).values():  # before the values arrive: loading copies them into this layout
        layer.lay_out_for_serving_()
    _load_values(path, meta, module)
    module = set_training(module, False)
    if form == "cores":
        return module, None
    return serve_as(module, form, budget=served_budget(meta, blueprint_in(meta)),
                    shapes=serve_shapes, example=example)


#: How many bytes of the file :func:`_load_values` reads before copying them into the model.
LOAD_PART_BYTES = 32 << 20


def _file_parts(path: str | os.PathLike, meta: dict[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
    """The file's state a part of about :data:`LOAD_PART_BYTES` at a time, each tensor under its
    written name and its aliases. An int8 file comes in one part: its values are dequantized with
    their scales (and it is a quarter of the float32 model's size)."""
    names: dict[str, list[str]] = {}
    for alias, written in meta.get("aliases", {}).items():
        names.setdefault(written, []).append(alias)
    if "quantization" in meta:
        each: Iterable[tuple[str, torch.Tensor]] = dequantized(
            path, meta, read_safetensors(path, CheckpointError, "checkpoint")).items()
    else:
        each = read_safetensors_each(path, CheckpointError, "checkpoint")
    part: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in each:
        part.update({n: t for n in [name] + names.get(name, [])})
        size += t.numel() * t.element_size()
        if size >= LOAD_PART_BYTES and "quantization" not in meta:
            yield part
            part, size = {}, 0
    yield part


def _load_values(path: str | os.PathLike, meta: dict[str, Any], module: nn.Module) -> None:
    """The file's values copied into ``module``'s tensors (their layout kept) a part at a time, so
    loading holds the model and one part, not the model and a second copy of the whole file."""
    loaded: set[str] = set()
    unexpected: list[str] = []
    for part in _file_parts(path, meta):
        try:
            result = module.load_state_dict(part, strict=False)
        except RuntimeError as exc:  # size mismatches of the dense layers, listed one per line
            lines = [line.strip() for line in str(exc).strip().splitlines()]
            raise CheckpointError(f"the checkpoint {path} does not fit the base architecture: "
                                  f"{' '.join(lines[1:3] or lines[:1])[:300]}") from None
        loaded.update(part)
        unexpected += result.unexpected_keys
        del part
    missing = [name for name in module.state_dict(keep_vars=True) if name not in loaded]
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint does not match the base architecture: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}")


def served_budget(meta: dict[str, Any], blueprint: Blueprint) -> int | None:
    """The state elements a model loaded from a file may grow to when its layers change form:
    dense / the element ratio the run aimed at. A target in bytes (an int8 file) is not one in
    elements (5x in bytes is about 1.3x in elements): its run records the element ratio it
    aimed at; an int8 file written before that record may grow to its own stored size only."""
    target = blueprint.element_target()
    if "quantization" in meta and ELEMENT_TARGET not in blueprint.extra:
        stored = meta.get("ratio")
        target = float(stored) if isinstance(stored, (int, float)) and stored > 0 else target
    return size_budget(blueprint.dense_params, target)


def _check_state(path: str | os.PathLike, module: nn.Module, aliases: dict[str, str], scales: set[str]) -> None:
    """Every tensor of the rebuilt model's state is in the file with its shape, and the file holds
    nothing else but the ``scales`` of its quantized tensors: checked on the header, before any
    tensor is read or any memory is given to a base built on the ``meta`` device."""
    _, shapes = read_safetensors_header(path, CheckpointError, "checkpoint")
    state = {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}
    for name, shape in state.items():
        stored = shapes.get(aliases.get(name, name))
        if stored is not None and stored != shape:
            raise CheckpointError(f"the checkpoint {path} does not fit the base architecture: size mismatch for "
                                  f"{name}: the file holds {list(stored)[:8]}, the base {list(shape)[:8]}")
    missing = sorted(name for name in state if aliases.get(name, name) not in shapes)
    unexpected = sorted(set(shapes) - set(state) - scales)
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint does not match the base architecture: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def materialize(module: nn.Module) -> nn.Module:
    """Give the parameters and buffers of a base built on the ``meta`` device (sized, holding
    nothing) empty CPU memory, the same tensor wherever one is shared; loading fills them.
    A non-persistent buffer on ``meta`` has no value to load and is refused."""
    made: dict[int, torch.Tensor] = {}
    for owner_name, owner in module.named_modules():
        for store in (owner._parameters, owner._buffers):
            for name, t in store.items():
                if t is None or not t.is_meta:
                    continue
                if store is owner._buffers and name in owner._non_persistent_buffers_set:
                    raise CheckpointError(f"the base's buffer {owner_name}.{name} is on the meta device and no "
                                          "checkpoint holds its value")
                if id(t) not in made:
                    empty = torch.empty_like(t, device="cpu")
                    made[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                store[name] = made[id(t)]
    return module


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
