"""Safe file handling: every user file compressor reads or writes goes through here.

Reading a safetensors file never unpickles (a file from someone else cannot run code), only
regular files are read (a FIFO would block forever), and every way a read can fail ends as
the caller's :class:`CompressorError` subclass with one line that names the file. Writing is
atomic, so a crash never leaves half a file; files get the mode the umask gives, as any tool's
do; a hidden temporary carries its writer's pid, so a run sweeps only what a dead process left.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import CompressorError, first_line


def require_file(path: str | os.PathLike, error: type[CompressorError], what: str) -> Path:
    """``Path(path)`` if it names an existing regular file, else ``error`` saying what it is instead."""
    p = Path(path).expanduser()
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a directory, not a file")
    if not p.is_file():
        raise error(f"{what} {p} is not a regular file (a FIFO, socket or device); give a file")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file (nor a
    folder made for it)."""
    path = Path(path)
    made = make_parents(path.parent)
    tmp = None
    try:
        tmp = temporary_for(path)
        write(tmp)
        os.chmod(tmp, umask_mode())  # a writer may have made the file anew, 0600 (safetensors does)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        remove_empty(made)
        raise
    return path


def umask_mode() -> int:
    """The mode a new file gets under this process's umask (``0o666 & ~umask``), as ``open`` gives it."""
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            line = next((line for line in f if line.startswith("Umask:")), None)
        if line is not None:
            return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_for(path: Path) -> Path:
    """A fresh hidden file beside ``path`` to write into before renaming, named with this process's
    pid (see :func:`stale_temporaries`) and given the umask's mode (``mkstemp`` makes it 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
    finally:
        os.close(fd)
    return Path(tmp)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OverflowError, ValueError):
        return False
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Hidden half-written files a killed process (``kill -9``, power loss) left beside ``path``.

    Nothing can clean up after SIGKILL, but a write never renames a partial file into
    place, so what is left is only these hidden temporaries; the next run sweeps them. A
    temporary whose writer (the pid in its name) still runs belongs to a live run writing the
    same output and is left alone.
    """
    p = Path(path)
    if not p.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(p.name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp")
    stale = []
    for f in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        m = name.fullmatch(f.name)
        if m is not None and not (m.group(1) and _alive(int(m.group(1)))):
            stale.append(f)
    return sorted(stale)


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            made.append(d)
    except BaseException:
        remove_empty(made)
        raise
    return made


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders :func:`make_parents` made, innermost first, those still empty."""
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            pass


def probe_writable(path: str | os.PathLike, error: type[CompressorError], what: str = "output") -> None:
    """Create and remove a file where ``path`` will be written (its missing folders made and removed
    again), so a location that cannot be written fails before the run, not after it."""
    path = Path(path)
    made: list[Path] = []
    try:
        made = make_parents(path.parent)
        temporary_for(path).unlink()
    except OSError as exc:
        raise error(f"cannot write the {what} {path}: {exc.strerror or first_line(exc)}") from None
    finally:
        remove_empty(made)


class OutputAppeared(FileExistsError):
    """An output that did not exist when the run began exists at the moment of its rename: another
    run wrote it meanwhile; without ``--force`` it is not replaced."""


def _place_new(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` only if ``path`` does not exist, atomically (a hard link fails on
    an existing name; where a file system has no hard links, checked just before the rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputAppeared(errno.EEXIST, "written by someone else while this run was going", str(path)) from None
    except OSError:
        if os.path.lexists(path):
            raise OutputAppeared(errno.EEXIST, "written by someone else while this run was going", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def _naming_outputs(staged: dict[Path, Path]) -> Iterator[None]:
    """An ``OSError`` while writing a temporary (or a writer's own temporary beside it) names the
    output, not the hidden file: ``could not write slim.safetensors``, not ``.slim.safetensors.123-x.tmp``."""
    try:
        yield
    except OSError as exc:
        name = Path(exc.filename).name if isinstance(exc.filename, (str, os.PathLike)) else None
        final = next((path for path, tmp in staged.items() if name and name.lstrip(".").startswith(tmp.name.lstrip("."))),
                     None)
        if final is not None:
            exc.filename = str(final)
        raise


@contextmanager
def staged_outputs(paths: Sequence[str | os.PathLike], overwrite: bool = True) -> Iterator[dict[Path, Path]]:
    """All-or-nothing writing of several files: ``{final: temporary}`` to write into.

    Each output is written to a hidden temporary file beside its final place; only when
    every write has succeeded are they all renamed into place. If anything fails (or the
    user presses Ctrl-C), the temporaries and the folders made for them are removed and no
    output appears: a run never leaves a checkpoint without the report or plot the user asked
    for. Without ``overwrite``, an output that exists at the moment of its rename (another run
    wrote it meanwhile) is not replaced: :class:`OutputAppeared`, and those already placed go.
    """
    staged: dict[Path, Path] = {}
    made: list[Path] = []
    placed: list[Path] = []
    try:
        for path in map(Path, paths):
            made += make_parents(path.parent)
            staged[path] = temporary_for(path)
        with _naming_outputs(staged):
            yield staged
        mode = umask_mode()
        for tmp in staged.values():  # a writer may have made the file anew, 0600 (safetensors does)
            os.chmod(tmp, mode)
        for path, tmp in staged.items():
            if overwrite:
                os.replace(tmp, path)
            else:
                _place_new(tmp, path)
                placed.append(path)
        made, placed = [], []
    finally:
        for path in placed:  # a new output was taken half way: the new ones this run placed go too
            path.unlink(missing_ok=True)
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()
        remove_empty(made)


def read_safetensors_header(path: str | os.PathLike, error_cls: type[CompressorError], what: str,
                            hint: str = "") -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The string metadata and ``{tensor name: shape}`` of a safetensors file, without reading any tensor.

    Parsing the header first is what tells "this is not a safetensors file at all" apart
    from "it is one, but its data is damaged"; ``hint`` is appended to the first kind.
    """
    p = require_file(path, error_cls, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise error_cls(f"{what} {p} is not a readable safetensors file ({first_line(exc)}){hint}") from None


def read_safetensors_dtypes(path: str | os.PathLike, error_cls: type[CompressorError], what: str) -> dict[str, str]:
    """``{tensor name: dtype}`` of a safetensors file as its header names them (``F32``, ``I8``, ...),
    without reading any tensor: what a file claims to hold is checked against what it holds."""
    p = require_file(path, error_cls, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:
        raise error_cls(f"{what} {p} is not a readable safetensors file ({first_line(exc)})") from None


#: safetensors' dtype names of the tensors :func:`read_safetensors_each` reads.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_each(path: str | os.PathLike, error_cls: type[CompressorError],
                          what: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file one at a time, ``(name, tensor)`` in the file's order: a
    reader that copies each into place holds one tensor beside the model, not the whole file.
    Read with plain reads, not mapped: a mapped file's pages count in the process's resident
    memory (the whole file, beside the model) for as long as the map lives. The header is
    checked by safetensors first (offsets in bounds, no overlap); no byte is unpickled."""
    read_safetensors_header(path, error_cls, what)
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0])
            for name, entry in entries:
                low, high = entry["data_offsets"]
                t = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
                raw = t.reshape(-1).view(torch.uint8).numpy()
                f.seek(8 + size + low)
                if high - low != raw.nbytes or f.readinto(memoryview(raw)) != raw.nbytes:
                    raise ValueError(f"{name} holds {high - low} bytes, not {raw.nbytes}")
                yield name, t
    except (OSError, ValueError, KeyError) as exc:
        raise error_cls(f"{what} {p} is truncated or corrupted ({first_line(exc)})") from None


def read_safetensors(path: str | os.PathLike, error_cls: type[CompressorError], what: str,
                     hint: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on CPU); any failure is one ``error_cls`` line."""
    read_safetensors_header(path, error_cls, what, hint)
    p = Path(path).expanduser()
    try:
        return load_file(str(p))
    except Exception as exc:
        raise error_cls(f"{what} {p} is truncated or corrupted ({first_line(exc)})") from None
