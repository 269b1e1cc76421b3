"""Datasets that already exist on this machine: nothing here ever downloads.

Compression runs offline (CI, air-gapped boxes), so every loader reads local files
only and fails with a one-line :class:`~compressor.errors.DataError` that says how to
get the data, instead of hanging on a network call or writing a cache somewhere.
The library never prints; callers (CLI, examples) decide what to show.
"""

from __future__ import annotations

import copy

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from .errors import DataError, first_line
from .files import read_safetensors

__all__ = [
    "FASHION_MNIST_ENV",
    "DEBIAN_FASHION_MNIST",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_digits_data",
    "DIGITS_HINT",
    "load_tensor_file",
    "TensorLoader",
    "split_holdout",
    "resolve_data",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Environment variable that points at a folder with the four Fashion-MNIST IDX files.
FASHION_MNIST_ENV = "COMPRESSOR_FASHION_MNIST"
#: Where Debian's ``dataset-fashion-mnist`` package installs them.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dims.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

#: What to install for ``--data digits`` (scikit-learn, an optional extra).
DIGITS_HINT = ("the 'digits' data set needs scikit-learn, which is optional: "
               "install it with `pip install 'compressor[digits]'` (or `pip install scikit-learn`)")

_ACCEPTED_SPECS = (
    "'fashion-mnist', 'fashion-mnist:/path/to/idx-folder', 'digits', "
    "or a path to a .safetensors file with an 'inputs' tensor (and optional integer 'labels')"
)


# --------------------------------------------------------------------------- Fashion-MNIST


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    """The IDX file ``stem`` in ``directory``, raw or gzipped (raw wins), or None."""
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_files(directory: Path) -> bool:
    stems = [stem for pair in _FASHION_FILES.values() for stem in pair]
    return directory.is_dir() and all(_find_idx(directory, s) is not None for s in stems)


def fashion_mnist_dir(root: Optional[PathLike] = None) -> Path:
    """Folder holding the four Fashion-MNIST IDX files (gzipped or not).

    Precedence: the explicit ``root``, else ``$COMPRESSOR_FASHION_MNIST``, else Debian's
    ``/usr/share/datasets/fashion-mnist``. The first one given is the only one used: a
    wrong explicit location is an error rather than silently reading another copy.
    """
    if root is not None and str(root) != "":
        tried = [Path(root).expanduser()]
    elif os.environ.get(FASHION_MNIST_ENV):
        tried = [Path(os.environ[FASHION_MNIST_ENV]).expanduser()]
    else:
        tried = [DEBIAN_FASHION_MNIST]
    for directory in tried:
        if _has_fashion_files(directory):
            return directory
    where = ", ".join(str(d) for d in tried)
    raise DataError(
        f"Fashion-MNIST not found in {where}; install it with "
        f"`apt-get install dataset-fashion-mnist` or point {FASHION_MNIST_ENV} "
        "(or --data fashion-mnist:/path) at a folder with the IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, optionally .gz)"
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one unsigned-byte IDX file (raw or .gz) into a uint8 array.

    Hand-rolled so no torchvision or download helper is needed; every check names the
    file, because a half-copied dataset is the usual cause.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {first_line(exc)}") from None
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated (only {len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"IDX file {path} has magic number 0x{found:08x}, expected 0x{magic:08x} "
            "(wrong or corrupt file)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    have = len(raw) - header
    if have != expected:
        state = "truncated" if have < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"IDX file {path} is {state}: header says {'x'.join(map(str, dims))} "
            f"= {expected} bytes of data, found {have}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: Optional[PathLike] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as float32 (N,1,28,28) in [0,1]
    and int64 labels (N,).

    Read straight from the local IDX files every time (about half a second); nothing is
    cached on disk so there is no stale cache to go wrong.
    """
    if split not in _FASHION_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = fashion_mnist_dir(root)
    image_stem, label_stem = _FASHION_FILES[split]
    image_path = _find_idx(directory, image_stem)
    label_path = _find_idx(directory, label_stem)
    assert image_path is not None and label_path is not None  # fashion_mnist_dir checked
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_path} has {images.shape[0]} images but {label_path} has "
            f"{labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"IDX file {image_path} holds no images")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"IDX file {label_path} has labels outside 0..9 (corrupt file)")
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# --------------------------------------------------------------------------- digits


def load_digits_data() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images) as float32 (N,1,8,8) in [0,1]
    and int64 labels.

    Ships inside the sklearn wheel, so it needs no download: the data set of the tests and
    quick demos. scikit-learn is not a core dependency but the ``digits`` extra (the core
    install stays small); without it this raises one :class:`DataError` naming the extra.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(DIGITS_HINT) from None
    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return x.unsqueeze(1).contiguous(), y


# --------------------------------------------------------------------------- tensor files

_INTEGER_DTYPES = (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
)
_NOT_SAFETENSORS_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".npz", ".npy", ".bin"}
_SAVE_HINT = (" (pickled/numpy files are not read: save a dict {'inputs': ..., 'labels': ...} "
              "with safetensors.torch.save_file)")


def load_tensor_file(path: PathLike) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """User data from a ``.safetensors`` file: tensor ``inputs`` (first dim = samples)
    and optional integer ``labels`` (N,).

    safetensors rather than ``torch.load`` because a data file from someone else must
    never be able to run code (pickle can). float64 inputs (numpy's default) are turned
    into float32, the dtype models are trained in; labels become int64.
    """
    p = Path(path).expanduser()
    hint = _SAVE_HINT if p.suffix.lower() in _NOT_SAFETENSORS_SUFFIXES else ""
    tensors = read_safetensors(p, DataError, "data file", hint=hint)
    if "inputs" not in tensors:
        keys = ", ".join(sorted(tensors)) or "none"
        raise DataError(
            f"data file {p} has no tensor named 'inputs' (found: {keys}); save the samples "
            "as 'inputs' and optional integer class ids as 'labels'"
        )
    inputs = tensors["inputs"]
    if inputs.dim() == 0 or inputs.shape[0] == 0 or inputs.numel() == 0:
        raise DataError(f"data file {p}: 'inputs' is empty (shape {tuple(inputs.shape)})")
    if inputs.dtype == torch.float64:
        inputs = inputs.to(torch.float32)
    labels = tensors.get("labels")
    if labels is not None:
        if labels.dtype not in _INTEGER_DTYPES:
            raise DataError(
                f"data file {p}: 'labels' must be integer class ids, got dtype "
                f"{str(labels.dtype).replace('torch.', '')}"
            )
        if labels.dim() != 1:
            raise DataError(
                f"data file {p}: 'labels' must be 1-D (N,), got shape {tuple(labels.shape)}"
            )
        if labels.shape[0] != inputs.shape[0]:
            raise DataError(
                f"data file {p}: {inputs.shape[0]} inputs but {labels.shape[0]} labels"
            )
        labels = labels.to(torch.int64)
        if int(labels.min()) < 0:
            raise DataError(f"data file {p}: 'labels' has negative class ids")
    return inputs, labels


# --------------------------------------------------------------------------- batching


class TensorLoader:
    """Batches over tensors already in memory: ``(x, y)`` or ``x`` when ``labels`` is None;
    with a dict of input tensors (a tokenizer's output), dict batches of keyword inputs.

    A torch DataLoader collates sample by sample; for in-memory tensors that overhead is
    larger than a small model's forward pass. Here a batch is one slice (no shuffle) or
    one ``index_select`` with a slice of a permutation. With ``shuffle`` each pass over
    the data draws a new order from ``seed + epoch``, so runs are reproducible and
    epochs still differ; :meth:`set_epoch` replays a given epoch.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
        tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
        if not tensors or any(not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == 0 for t in tensors):
            raise DataError("no data: inputs must be a non-empty tensor (or a dict of them) with samples on dim 0")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise DataError("every input tensor must have the same number of samples on dim 0")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
                raise DataError("labels must be a tensor with one entry per sample")
            if labels.shape[0] != n:
                raise DataError(f"{n} inputs but {labels.shape[0]} labels")
        if drop_last and n < batch_size:
            raise DataError(f"no batches: {n} samples is fewer than batch size {batch_size} with drop_last")
        self.inputs = inputs
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> "TensorLoader":
        """This loader for rank ``rank`` of ``world``: each epoch's order (the same on every
        rank) dealt out sample by sample, as a DistributedSampler does, the few samples that
        would leave the ranks uneven dropped."""
        if self.num_samples // world == 0:
            raise DataError(f"{self.total_samples} samples cannot be shared by {world} processes")
        out = copy.copy(self)
        out.rank, out.world = int(rank), int(world)
        return out

    @property
    def total_samples(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs
        return int(first.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples this loader yields per pass (its rank's share when sharded)."""
        return self.total_samples // self.world

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of ``epoch`` (0-based)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int):
        n, b = self.num_samples, self.batch_size
        stop = (n // b) * b if self.drop_last else n
        perm = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.total_samples, generator=gen)
        if self.world > 1:
            order = perm if perm is not None else torch.arange(self.total_samples)
            perm = order[self.rank: n * self.world: self.world]
        for start in range(0, stop, b):
            if perm is None:
                def take(t, start=start):
                    return t[start:start + b]
            else:
                def take(t, idx=perm[start:start + b]):
                    return t.index_select(0, idx.to(t.device))
            y = None if self.labels is None else take(self.labels)
            if isinstance(self.inputs, dict):  # keyword inputs: a dict batch, labels under "labels"
                batch = {k: take(v) for k, v in self.inputs.items()}
                yield batch if y is None else {**batch, "labels": y}
            else:
                x = take(self.inputs)
                yield x if y is None else (x, y)


# --------------------------------------------------------------------------- splits / specs


def split_holdout(
    inputs: torch.Tensor,
    labels: Optional[torch.Tensor],
    fraction: float = 0.1,
    seed: int = 0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Hold out a random ``fraction`` of samples for testing: (train_x, train_y, test_x, test_y).

    Deterministic for a given ``seed`` so that "accuracy before" and "accuracy after"
    compression are measured on the very same samples. ``labels`` may be None.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
        raise DataError(f"hold-out fraction must be between 0 and 1, got {fraction!r}")
    n = int(inputs.shape[0]) if inputs.dim() else 0
    if n < 2:
        raise DataError(f"need at least 2 samples to hold some out for testing, got {n}")
    if labels is not None and labels.shape[0] != n:
        raise DataError(f"{n} inputs but {labels.shape[0]} labels")
    n_test = min(n - 1, max(1, int(round(n * float(fraction)))))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    # Sorted indices keep each part in the file's original order (nicer to inspect).
    test_idx, _ = perm[:n_test].sort()
    train_idx, _ = perm[n_test:].sort()
    take = lambda t, idx: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
    return take(inputs, train_idx), take(labels, train_idx), take(inputs, test_idx), take(labels, test_idx)


def resolve_data(spec: str) -> dict:
    """Turn a ``--data`` string into ``{"train": (x, y), "test": (x, y)}``.

    Accepted: ``fashion-mnist`` (official train/test split), ``fashion-mnist:/dir``,
    ``digits`` (fixed 80/20 split) or a ``.safetensors`` file (10 % held out for test;
    without labels both parts have labels None, e.g. for distillation from the original
    model). One string form everywhere keeps CLI, API and config files in agreement.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"no data given; use {_ACCEPTED_SPECS}")
    text = spec.strip()
    lowered = text.lower()
    if lowered == "fashion-mnist" or lowered.startswith("fashion-mnist:"):
        root = text.split(":", 1)[1] if ":" in text else None
        if root is not None and not root.strip():
            root = None
        return {
            "train": load_fashion_mnist("train", root),
            "test": load_fashion_mnist("test", root),
        }
    if lowered == "digits":
        x, y = load_digits_data()
        tx, ty, vx, vy = split_holdout(x, y, fraction=0.2, seed=0)
        return {"train": (tx, ty), "test": (vx, vy)}
    path = Path(text).expanduser()
    if path.exists() or path.suffix.lower() == ".safetensors":
        x, y = load_tensor_file(path)
        tx, ty, vx, vy = split_holdout(x, y, fraction=0.1, seed=0)
        return {"train": (tx, ty), "test": (vx, vy)}
    raise DataError(f"unknown data {spec!r}: not a known data set or an existing file; use {_ACCEPTED_SPECS}")
