"""What a batch is and what a model's output is, in one place.

Every stage that touches data (the up-front check, λ calibration, the training loop,
evaluation) goes through :func:`forward`, so one convention holds everywhere:

* a batch is ``x``, ``(x,)`` or ``(x, y)``, where ``x`` is a tensor or a tuple of
  positional inputs; or a mapping (a tokenizer's output, a ``BatchEncoding``) passed as
  keyword arguments, whose ``labels`` entry is taken out and used as the labels;
* the output used for losses is a tensor: the output itself, the first element of a tuple,
  or of a mapping / ``ModelOutput`` its ``logits`` (else ``last_hidden_state``);
* anything else goes through the user's ``forward_fn(model, batch) -> (output, labels)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import DataError
from .trace import unwrapped

#: ``forward_fn(model, batch) -> (output, labels)``: how to run a model on a batch of any shape.
ForwardFn = Callable[[nn.Module, Any], "tuple[Any, torch.Tensor | None]"]
#: Mapping keys that hold labels (taken out of the model's keyword inputs).
LABEL_KEY = "labels"
#: Label value that marks a position to ignore (the PyTorch and Hugging Face convention).
IGNORE_INDEX = -100
#: Output keys tried in order when a model returns a mapping or a ``ModelOutput``.
OUTPUT_KEYS = (("logits", "logits"), ("last_hidden_state", "hidden"))


@dataclass
class Ran:
    """One batch through a model: what the losses need.

    ``kind`` says what ``out`` is: ``"logits"`` (scores over classes or a vocabulary, so a
    KL between softmaxes means something), ``"hidden"`` (features: compared by MSE) or
    ``"tensor"`` (a bare tensor: logits when 2-D, else treated as features). ``mask`` marks
    the real tokens of a padded batch (its ``attention_mask``), so padding is not learned.
    ``hidden`` holds the blocks' outputs when a :class:`~compressor.blocks.BlockRecorder` took them.
    """

    out: torch.Tensor
    labels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    kind: str = "tensor"
    next_token: bool = False  # position t scores token t + 1 (a causal LM): labels shift by one
    hidden: list[torch.Tensor] | None = None  # each block's output, when hidden-state distillation records them


def token_count(ran: Ran) -> int:
    """The real tokens of a batch the loss saw: its ``attention_mask``'s ones, every position of
    per-token outputs without a mask, 0 when the outputs are not per token (images, sentences).
    Counted, not estimated, so a budget in tokens means what the loss learned from."""
    if ran.mask is not None:
        return int(ran.mask.sum())
    return int(ran.out.shape[0] * ran.out.shape[1]) if ran.kind == "logits" and ran.out.dim() == 3 else 0


def predicts_next_token(model: nn.Module) -> bool:
    """A Hugging Face causal LM (``...ForCausalLM``, ``...LMHeadModel``): by its convention the
    labels are the input ids, unshifted, and the loss compares position t with token t + 1."""
    name = type(unwrapped(model)).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels) of a batch; inputs are a tensor, a tuple (positional) or a dict (keywords)."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != LABEL_KEY}
        if not inputs:
            raise DataError("a dict batch must hold the model's inputs (e.g. input_ids), not only labels")
        return inputs, batch.get(LABEL_KEY)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DataError(f"a batch must be x, (x,) or (x, y), or a dict of keyword inputs; got a sequence of "
                        f"{len(batch)} items (several inputs go in a tuple: ((a, b), y))")
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensor(out: Any) -> tuple[torch.Tensor, str]:
    """The tensor a model's output stands for, and its kind (see :class:`Ran`)."""
    if isinstance(out, Mapping):  # dicts and transformers' ModelOutput
        for key, kind in OUTPUT_KEYS:
            if torch.is_tensor(out.get(key)):
                return out[key], kind
        keys = ", ".join(k for k, v in out.items() if v is not None) or "none"
        raise DataError(f"the model returned a {type(out).__name__} without 'logits' or 'last_hidden_state' "
                        f"(keys: {keys}); pass forward_fn(model, batch) -> (output, labels) to say which to use")
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not torch.is_tensor(out):
        raise DataError(f"the model returned {type(out).__name__}; compressor needs a tensor output (logits), "
                        "a tuple starting with one, or a dict/ModelOutput with 'logits' or 'last_hidden_state'")
    return out, "tensor"


def attention_mask(inputs: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (1 = real token), when its inputs are keywords that carry one."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask if torch.is_tensor(mask) and mask.dim() == 2 else None


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device`` (tensors already there are not copied)."""
    if torch.is_tensor(batch):
        return batch if batch.device == device else batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device | None:
    """Where ``model``'s parameters live (None for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else None


def forward(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Ran:
    """Run ``model`` on one raw batch, the same way at every stage of a run.

    The batch goes where the model is (data loaders yield CPU tensors; the model may be on
    a GPU); a ``forward_fn`` is given the batch as it came. A batch without a single example
    is refused before the model sees it (its loss would be NaN, blamed on the learning rate)."""
    if forward_fn is None and (device := model_device(model)) is not None:
        batch = to_device(batch, device)
    if forward_fn is not None:
        result = forward_fn(model, batch)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise DataError("forward_fn(model, batch) must return a pair (output, labels); labels may be None")
        raw, labels = result
        inputs = split_batch(batch)[0] if isinstance(batch, Mapping) else None
    else:
        inputs, labels = split_batch(batch)
        if examples(inputs) == 0:
            raise DataError(f"the batch {describe_inputs(inputs)} is empty: it holds no example")
        raw = call_model(model, inputs)
    out, kind = output_tensor(raw)
    if out.dim() > 0 and out.shape[0] == 0:
        raise DataError(f"the batch is empty: the model's output has shape {tuple(out.shape)}")
    return Ran(out, labels, attention_mask(inputs), kind, predicts_next_token(model))


def examples(inputs: Any) -> int | None:
    """How many examples a batch's inputs hold: the first dimension of their first tensor
    (None when no input is a tensor with a dimension)."""
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    return next((int(v.shape[0]) for v in values if torch.is_tensor(v) and v.dim() > 0), None)


def describe_inputs(inputs: Any) -> str:
    """How a batch's inputs look, for an error message."""
    if isinstance(inputs, Mapping):
        return "with keys " + ", ".join(f"{k} {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}"
                                        for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return "of inputs " + ", ".join(str(tuple(v.shape)) if torch.is_tensor(v) else type(v).__name__
                                        for v in inputs)
    return f"of shape {tuple(inputs.shape)}" if torch.is_tensor(inputs) else f"of {type(inputs).__name__}"


def check_labels(ran: Ran) -> None:
    """Labels must be class indices that fit the output: one per example for ``(batch, classes)``,
    one per token for ``(batch, tokens, vocabulary)`` (``-100`` marks a token to ignore)."""
    out, y = ran.out, ran.labels
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError("labels must be an integer tensor of class indices")
    if out.dim() == 2:
        if y.dim() != 1 or y.shape[0] != out.shape[0]:
            raise DataError(f"labels of shape {tuple(y.shape)} for outputs {tuple(out.shape)}: expected one class "
                            f"index per example, shape ({out.shape[0]},)")
    elif out.dim() == 3:
        if tuple(y.shape) != tuple(out.shape[:2]):
            raise DataError(f"labels of shape {tuple(y.shape)} for outputs {tuple(out.shape)}: expected one index "
                            f"per token, shape {tuple(out.shape[:2])}")
    else:
        raise DataError(f"labels given but the model outputs shape {tuple(out.shape)}, not (batch, classes) or "
                        "(batch, tokens, vocabulary)")
    classes = out.shape[-1]
    bad = (y >= classes) | ((y < 0) & (y != IGNORE_INDEX))
    if bool(bad.any()):  # one reduction and one sync a batch: cheap beside the forward
        raise DataError(f"label {int(y[bad][0])} is out of range for a model with {classes} outputs")


@dataclass
class BatchCheck:
    """Every batch a run reads held to the first one's conventions, at no extra forward: labelled
    or not as the first was (``labelled``, None until the first batch says), labels that fit
    the outputs (:func:`check_labels`). The caller says which batch failed (:func:`located`)."""

    labelled: bool | None = None

    def __call__(self, ran: Ran) -> Ran:
        labelled = ran.labels is not None
        if self.labelled is None:
            self.labelled = labelled
        elif labelled != self.labelled:
            had, has = ("inputs alone", "labels") if labelled else ("labels", "no labels")
            raise DataError(f"it has {has} but the first batch had {had}: a loader yields (x, y) batches "
                            "throughout, or inputs alone throughout")
        if labelled:
            check_labels(ran)
        return ran


@contextmanager
def located(where: str) -> Iterator[None]:
    """A data error inside the block names the batch it came from: ``"batch 7 of epoch 2: ..."``."""
    try:
        yield
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def check_pass(count: int, expected: int, epoch: int) -> None:
    """A full pass of the loader gives as many batches as the run was planned with (its length,
    or its first pass): a loader that runs dry or shrinks would silently stretch the budget."""
    if count != expected:
        got = "no batch" if count == 0 else f"{count} batches"
        raise DataError(f"the data loader yielded {got} in epoch {epoch} but {expected} per pass when the run "
                        "was planned; it must give a full pass every time it is iterated")


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
