"""Read a user's model file, whatever its extension says.

Users call all of these ``model.pt``, so the format is detected from the content:

* a ``torch.export`` program (zip archive with ``archive_format``),
* a safetensors state dict (8-byte header length + JSON) — needs ``arch``,
* a ``torch.save`` file holding a state dict (loaded with ``weights_only=True``) — needs ``arch``,
* a pickled full module: only with ``trust_pickle=True``, because unpickling runs
  arbitrary code from the file.

A ``torch.export`` archive can run code too: ``torch.export.load`` unpickles weights and
constants marked ``use_pickle`` and opaque objects (``weights_only=False``), retries
sample inputs with ``weights_only=False`` when the safe load fails, ``sympify``s (evals)
every shape expression, loads AOTInductor shared libraries; ``.module()`` ``exec``s the
guard code, and fx pastes argument and attribute names unquoted into the Python it
generates. So before loading, :func:`check_export_archive` reads the archive with the
reader torch uses and refuses anything it cannot prove is tensor data, plain arithmetic
or a plain name, unless ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import struct
import tokenize
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive import constants as pt2

from .errors import ModelError, first_line
from .files import read_safetensors, require_file

PICKLE_HINT = ("loading that can run arbitrary code from the file; "
               "pass --trust-pickle (Python: trust_pickle=True) only if you trust its source, "
               "or re-save it as a state dict or a torch.export program without pickled parts")


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


# ------------------------------------------------------------------ torch.export archives
class UnsafeArchive(Exception):
    """Why loading a torch.export archive could run code from it (``load_model`` words it for the user)."""


#: Bookkeeping entries every archive has; torch reads them as short strings.
_FIXED_ENTRIES = frozenset({pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version",
                            ".data/serialization_id"})
_MODEL_ENTRY = re.compile(re.escape(pt2.MODELS_DIR) + r"([A-Za-z0-9_\-]+)\.json")
#: Names a shape expression (``sympy.srepr`` of torch's symbolic sizes) may use: sympy
#: evaluates the string, so only these harmless constructors and keywords may appear.
_SYMPY_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling Piecewise ExprCondPair "
    "Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan Eq Ne Lt Le Gt Ge And Or Not "
    "true false True False oo zoo nan int_oo IntInfinity NegativeIntInfinity "
    "FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift "
    "PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt "
    "RoundToInt RoundDecimal ToFloat Identity "
    "positive negative nonnegative nonpositive nonzero integer real finite precision".split())
#: Names a guard (Python source that ``ExportedProgram.module()`` execs) may use.
_GUARD_NAMES = frozenset(
    "L size stride storage_offset torch math sym_float sym_int sym_max sym_min sym_sqrt trunc floor ceil "
    "isnan inf abs min max int float and or not True False".split())
_SYMPY_OPS = frozenset("( ) , + - * / // % ** = == != < <= > >= & | ~".split())
_GUARD_OPS = _SYMPY_OPS - {"="} | {"[", "]", "."}
_PLAIN_STRING = re.compile(r"'[\w.+\- ]*'")


def plain_expression(text: Any, names: frozenset[str], ops: frozenset[str]) -> bool:
    """True if ``text`` is arithmetic over ``names``: no attribute chains, dunders, calls of
    anything else or string tricks, so evaluating it cannot reach code."""
    if not isinstance(text, str) or len(text) > 20_000:
        return False
    skip = {tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            ok = (tok.type in skip or (tok.type == tokenize.NAME and tok.string in names)
                  or (tok.type == tokenize.OP and tok.string in ops)
                  or (tok.type == tokenize.STRING and _PLAIN_STRING.fullmatch(tok.string)))
            if not ok:
                return False
    except (tokenize.TokenError, SyntaxError):
        return False
    return True


def _check_payloads(reader: PT2ArchiveReader, names: set[str], model: str, constants: bool) -> set[str]:
    """Every weight/constant of ``model`` is raw tensor data; returns the entries they use."""
    what, directory, config_file, prefix = (
        ("constant", pt2.CONSTANTS_DIR, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
        if constants else
        ("weight", pt2.WEIGHTS_DIR, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.WEIGHT_FILENAME_PREFIX))
    config_file = config_file.format(model)
    if config_file not in names:
        raise UnsafeArchive(f"has no {config_file} (an older or foreign layout)")
    config = json.loads(reader.read_string(config_file)).get("config")
    if not isinstance(config, dict):
        raise UnsafeArchive(f"has a malformed {config_file}")
    used = {config_file}
    for fqn, entry in config.items():
        if not _PLAIN_NAME.fullmatch(fqn):
            raise UnsafeArchive(f"has a {what} named {fqn[:80]!r}, not a plain identifier")
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise UnsafeArchive(f"stores {what} {fqn!r} as a pickle")
        file = entry.get("path_name")
        if not (isinstance(file, str) and re.fullmatch(re.escape(prefix) + r"\d+", file)):
            raise UnsafeArchive(f"stores {what} {fqn!r} as {file!r}, not as tensor data")
        if not isinstance(entry.get("tensor_meta"), dict) or directory + file not in names:
            raise UnsafeArchive(f"has no tensor data for {what} {fqn!r}")
        used.add(directory + file)
    return used


def _check_sample_inputs(reader: PT2ArchiveReader, names: set[str], model: str) -> set[str]:
    """torch retries a failed safe load of the sample inputs with ``weights_only=False``:
    they must load safely here, so that retry never happens."""
    file = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
    if file not in names:
        return set()
    data = reader.read_bytes(file)
    if data:
        try:
            with warnings.catch_warnings():  # a refused pickle is reported below, not as a protocol warning
                warnings.simplefilter("ignore")
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            raise UnsafeArchive("stores its sample inputs as a pickle that is not plain tensors") from None
    return {file}


#: Program fields torch never turns into code: node metadata (debug text) and string constants (repr'd).
_FREE_TEXT = frozenset({"metadata", "as_string", "as_strings", "torch_version"})
#: Fields holding JSON inside a string (pytree specs and their contexts).
_NESTED_JSON = frozenset({"in_spec", "out_spec", "context"})
#: Every other name in a program (tensors, nodes, arguments, attributes, forward arguments)
#: reaches the Python that fx generates, some unquoted: they must be plain dotted identifiers.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]*")
#: Keys of ``range_constraints`` are printed sizes (``2*s40``), only ever looked up.
_RANGE_KEY = re.compile(r"[A-Za-z0-9_*+\-/%(), ]*")


def _check_program(reader: PT2ArchiveReader, file: str) -> None:
    """Names are plain identifiers (fx pastes them into generated code), shape expressions
    (sympified) and guards (exec'd) plain arithmetic."""
    stack: list[tuple[str, Any]] = [("", json.loads(reader.read_string(file)))]
    while stack:  # iterative: a deeply nested file must not overflow the Python stack
        key, node = stack.pop()
        if key in _FREE_TEXT or node is None or isinstance(node, (bool, int, float)):
            continue
        if key == "guards_code":
            if not isinstance(node, list) or not all(plain_expression(g, _GUARD_NAMES, _GUARD_OPS) for g in node):
                raise UnsafeArchive(f"has guard code that is not plain arithmetic: {str(node)[:80]!r}")
        elif key == "expr_str":
            if not plain_expression(node, _SYMPY_NAMES, _SYMPY_OPS):
                raise UnsafeArchive(f"has a shape expression that is not plain arithmetic: {str(node)[:80]!r}")
        elif isinstance(node, list):
            stack.extend((key, value) for value in node)
        elif isinstance(node, dict):
            for name, value in node.items():
                if not (_RANGE_KEY if key == "range_constraints" else _PLAIN_NAME).fullmatch(name):
                    raise UnsafeArchive(f"has a name that is not a plain identifier: {name[:80]!r}")
                stack.append((name, value))
        elif key in _NESTED_JSON and isinstance(node, str) and node[:1] in ("[", "{", "n"):
            stack.append(("", json.loads(node)))
        elif not (isinstance(node, str) and _PLAIN_NAME.fullmatch(node)):
            raise UnsafeArchive(f"has a name that is not a plain identifier: {str(node)[:80]!r}")


def check_export_archive(data: bytes) -> None:
    """Raise :class:`UnsafeArchive` unless loading this torch.export archive runs nothing from it.

    Reads the archive with torch's own reader (so both see the same entries) and allows only
    known entries: programs, raw tensor payloads, safely loadable sample inputs, extra files.
    """
    reader = PT2ArchiveReader(io.BytesIO(data))
    listed = reader.get_file_names()
    names = set(listed)
    if len(names) != len(listed):
        raise UnsafeArchive("lists an entry twice")
    # torch.export.load falls back to reading the zip with Python's zipfile: it must see the same entries.
    in_zip = zipfile.ZipFile(io.BytesIO(data)).namelist()
    if len({n.split("/", 1)[0] for n in in_zip}) != 1 or {n.partition("/")[2] for n in in_zip} != names:
        raise UnsafeArchive("lists entries torch's reader does not see")
    used = set(_FIXED_ENTRIES) | {n for n in names if n.startswith(pt2.EXTRA_DIR)}
    for file in sorted(n for n in names if n.startswith(pt2.MODELS_DIR)):
        match = _MODEL_ENTRY.fullmatch(file)
        if match is None:
            raise UnsafeArchive(f"has an unexpected program entry {file!r}")
        model = match.group(1)
        _check_program(reader, file)
        used |= {file} | _check_sample_inputs(reader, names, model)
        used |= _check_payloads(reader, names, model, constants=False)
        used |= _check_payloads(reader, names, model, constants=True)
    unknown = sorted(names - used)
    if unknown:
        kind = "compiled code" if unknown[0].startswith(pt2.AOTINDUCTOR_DIR) else "data that is not plain tensors"
        raise UnsafeArchive(f"has {kind} ({unknown[0]!r})")


def _load_export(path: Path, trust_pickle: bool) -> Any:
    """Check the archive (unless trusted), then load the very bytes that were checked."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if not trust_pickle:
            check_export_archive(data)
        return torch.export.load(io.BytesIO(data))
    except UnsafeArchive as exc:
        raise ModelError(f"{path} was not loaded: its torch.export archive {exc}, and {PICKLE_HINT}") from None
    except Exception as exc:
        raise ModelError(f"{path} looks like a torch.export program but cannot be loaded "
                         f"({first_line(exc, 200, with_type=True)})") from None


def load_model(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False) -> Any:
    """Load a model file: returns an ``ExportedProgram`` or an ``nn.Module``."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "export":
        return _load_export(path, trust_pickle)
    if fmt == "safetensors":
        return _state_dict_into(arch, read_safetensors(path, ModelError, "model file"), path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ModelError(f"{path} was not loaded: it holds a pickled model, and {PICKLE_HINT}") from None
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
