"""What a batch is and what a model's output is, in one place.

Every stage that touches data (the up-front check, λ calibration, the training loop,
evaluation) goes through these helpers, so one convention holds everywhere: a batch is
``(x, y)`` or ``x`` alone, and the output used for losses is a tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import DataError


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(x, y)`` -> (x, y); ``x`` alone -> (x, None)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DataError(f"a batch must be x or (x, y); got a sequence of {len(batch)} items")
    if isinstance(batch, dict):
        raise DataError("dict batches are not supported; yield x or (x, y)")
    return batch, None


def run_model(model: nn.Module, x: Any) -> torch.Tensor:
    """Call ``model`` on ``x`` (a tuple is several inputs) and return its tensor output."""
    out = model(*x) if isinstance(x, tuple) else model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise DataError(f"the model returned {type(out).__name__}; compressor needs a tensor output (logits)")
    return out


def require_reiterable(loader: Iterable, what: str = "data loader") -> Iterable:
    """``loader`` if each ``iter()`` starts a new pass, else a one-line DataError.

    A run reads its loader several times (the fit check, λ calibration, every epoch); a
    generator or other one-shot iterator would be used up after the first batch.
    """
    if not isinstance(loader, Iterable):
        raise DataError(f"the {what} is a {type(loader).__name__}, not an iterable of batches")
    if isinstance(loader, Iterator):  # has __next__: iterating it again continues, never restarts
        raise DataError(f"the {what} is a one-shot iterator ({type(loader).__name__}), but compression reads it "
                        "several times; pass something re-iterable: a list of batches, a torch DataLoader, "
                        "or compressor.data.TensorLoader")
    return loader


def loader_length(loader: Iterable) -> int:
    """Batches per pass: ``len(loader)``, or one counting pass for loaders without a length."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in loader)
    if n <= 0:
        raise DataError("the data loader is empty: it yielded no batch")
    return n
