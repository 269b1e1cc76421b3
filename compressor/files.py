"""Safe file handling: every user file compressor reads or writes goes through here.

Reading a safetensors file never unpickles (a file from someone else cannot run code),
and every way a read can fail ends as the caller's :class:`CompressorError` subclass with
one line that names the file; writing is atomic, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import CompressorError, first_line


def require_file(path: str | os.PathLike, error: type[CompressorError], what: str) -> Path:
    """``Path(path)`` if it names an existing regular file, else ``error`` saying which of the two failed."""
    p = Path(path).expanduser()
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a directory, not a file")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def temporary_for(path: Path) -> Path:
    """A fresh hidden file beside ``path`` to write into before renaming (see :func:`stale_temporaries`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Hidden half-written files a killed process (``kill -9``, power loss) left beside ``path``.

    Nothing can clean up after SIGKILL, but a write never renames a partial file into
    place, so what is left is only these hidden temporaries; the next run sweeps them.
    """
    p = Path(path)
    return sorted(p.parent.glob(f".{p.name}.*.tmp")) if p.parent.is_dir() else []


@contextmanager
def staged_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[dict[Path, Path]]:
    """All-or-nothing writing of several files: ``{final: temporary}`` to write into.

    Each output is written to a hidden temporary file beside its final place; only when
    every write has succeeded are they all renamed into place. If anything fails (or the
    user presses Ctrl-C), the temporaries are removed and no output appears: a run never
    leaves a checkpoint without the report or plot the user asked for.
    """
    staged: dict[Path, Path] = {}
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            staged[path] = temporary_for(path)
        yield staged
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()


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


def read_safetensors(path: str | os.PathLike, error_cls: type[CompressorError], what: str,
                     hint: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on CPU); any failure is one ``error_cls`` line."""
    read_safetensors_header(path, error_cls, what, hint)
    p = Path(path).expanduser()
    try:
        return load_file(str(p))
    except Exception as exc:
        raise error_cls(f"{what} {p} is truncated or corrupted ({first_line(exc)})") from None
