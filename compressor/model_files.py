"""Read a user's model file, whatever its extension says.

Users call all of these ``model.pt``, so the format is detected from the content:

* a ``torch.export`` program (zip archive with ``archive_format``),
* a safetensors state dict (8-byte header length + JSON) — needs ``arch``,
* a ``torch.save`` file holding a state dict (loaded with ``weights_only=True``) — needs ``arch``,
* a pickled full module: only with ``trust_pickle=True``, because unpickling runs
  arbitrary code from the file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError, first_line
from .files import read_safetensors, require_file

PICKLE_HINT = ("it holds a pickled model, and unpickling can run arbitrary code from the file; "
               "pass --trust-pickle (Python: trust_pickle=True) only if you trust its source, "
               "or re-save it as a torch.export program or a state dict")


def detect_format(path: str | os.PathLike) -> str:
    """One of ``"export"``, ``"safetensors"``, ``"torch"`` (a torch.save zip or legacy pickle)."""
    path = require_file(path, ModelError, "model file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise ModelError(f"model file {path} is empty")
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError):
            raise ModelError(f"{path} is a damaged zip archive") from None
        if any(n.endswith("archive_format") for n in names):
            return "export"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise ModelError(f"{path} is a zip archive but neither a torch.export program nor a torch.save file")
    if head[:1] == b"\x80":  # legacy (non-zip) pickle protocol 2+
        return "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    raise ModelError(
        f"{path} is not a model file compressor can read (expected a torch.export program, a safetensors "
        "state dict, or a torch.save file)")


def import_arch(spec: str) -> nn.Module:
    """Build a model from ``package.module:factory`` (a class or a function without arguments)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelError(f"--arch {spec!r} must look like package.module:factory")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:
        raise ModelError(f"cannot import {mod_name!r} for --arch ({first_line(exc, with_type=True)})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"{mod_name!r} has no callable {attr!r} for --arch")
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"--arch {spec} failed to build the model ({first_line(exc, with_type=True)})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--arch {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _state_dict_into(arch: str | None, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    if arch is None:
        raise ModelError(f"{path} holds only weights (a state dict); say which architecture they belong to "
                         "with --arch package.module:factory")
    model = import_arch(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise ModelError(f"the weights in {path} do not fit --arch {arch}: {detail}") from None
    return model.eval()


def load_model(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False) -> Any:
    """Load a model file: returns an ``ExportedProgram`` or an ``nn.Module``."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "export":
        try:
            with open(path, "rb") as f:  # a file object: torch.export.load would complain about the name
                return torch.export.load(f)
        except Exception as exc:
            raise ModelError(f"{path} looks like a torch.export program but cannot be loaded "
                             f"({first_line(exc, 200, with_type=True)})") from None
    if fmt == "safetensors":
        return _state_dict_into(arch, read_safetensors(path, ModelError, "model file"), path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ModelError(f"{path} was not loaded: {PICKLE_HINT}") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelError(f"{path} cannot be unpickled ({first_line(exc, 200, with_type=True)})") from None
    except Exception as exc:
        raise ModelError(f"{path} is truncated or corrupted ({first_line(exc, 160, with_type=True)})") from None
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _state_dict_into(arch, obj, path)
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")
