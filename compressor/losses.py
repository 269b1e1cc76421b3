"""The task loss a fine-tune minimises (before the ℓ0 penalty is added).

With labels: cross-entropy, plus optional distillation from the original model. Without
labels: distillation only, which needs nothing but the inputs the user already has.
Sequence outputs (``[batch, tokens, ...]``) are compared token by token, padding excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batches import IGNORE_INDEX, Ran
from .blocks import hidden_loss


@dataclass(frozen=True)
class Distillation:
    """How the original model teaches: the weight of its outputs when labels exist (without
    labels a run always distils), the weight of its blocks' hidden states, the loss on outputs
    (``kl``, ``mse`` or ``auto``) and the KL's temperature."""

    weight: float = 0.0
    hidden: float = 0.0
    loss: str = "auto"
    temperature: float = 1.0

    def needs_teacher(self, labels: bool) -> bool:
        """Whether a batch (with or without ``labels``) needs the original model's outputs."""
        return not labels or self.weight > 0 or self.hidden > 0


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` as one row per example (2-D) or per real token (``[B, T, ...]`` with a ``[B, T]`` mask)."""
    if t.dim() <= 2:
        return t
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


def distill_loss(student: Ran, teacher: Ran, kind: str, temperature: float) -> torch.Tensor:
    """KL between softened output distributions, or MSE between outputs, per example or token.

    ``"auto"`` picks KL for logits (a ``logits`` output, or a bare 2-D ``(batch, classes)``
    tensor) and MSE otherwise (hidden states, regression heads, feature maps), where a
    softmax would mean nothing. On sequences the KL is averaged over real tokens.
    """
    if kind == "auto":
        logits = student.kind == "logits" or (student.kind == "tensor" and student.out.dim() == 2)
        kind = "kl" if logits and student.out.shape[-1] > 1 else "mse"
    s, t = _rows(student.out, student.mask), _rows(teacher.out, student.mask)
    if kind == "mse":
        return F.mse_loss(s, t)
    tau = temperature
    return F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                    reduction="batchmean") * tau * tau


def label_loss(ran: Ran) -> torch.Tensor:
    """Cross-entropy on class labels, or on token labels (``IGNORE_INDEX`` and padding skipped;
    shifted by one for a causal LM, as Hugging Face models do)."""
    out, y = ran.out, ran.labels
    if out.dim() <= 2:
        return F.cross_entropy(out, y)
    mask = ran.mask
    if ran.next_token:
        out, y = out[:, :-1], y[:, 1:]
        mask = mask[:, 1:] if mask is not None else None
    if mask is not None and tuple(mask.shape) == tuple(y.shape):
        y = y.masked_fill(mask == 0, IGNORE_INDEX)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)


def count_correct(ran: Ran) -> tuple[int, int]:
    """(correct top-1 predictions, labels counted): per example, or per real token of a sequence."""
    out, y = ran.out, ran.labels
    if out.dim() <= 2:
        return int((out.argmax(-1) == y).sum()), y.numel()
    mask = ran.mask
    if ran.next_token:
        out, y = out[:, :-1], y[:, 1:]
        mask = mask[:, 1:] if mask is not None else None
    keep = y != IGNORE_INDEX
    if mask is not None and tuple(mask.shape) == tuple(y.shape):
        keep &= mask.bool()
    return int(((out.argmax(-1) == y) & keep).sum()), int(keep.sum())


def task_loss(student: Ran, teacher: Ran | None, distill: Distillation) -> torch.Tensor:
    """Cross-entropy on labels (+ optional distillation), or pure distillation without labels;
    plus, with ``distill.hidden``, the blocks' hidden states matched to the original's."""
    if student.labels is None:
        loss = distill_loss(student, teacher, distill.loss, distill.temperature)
    else:
        loss = label_loss(student)
        if teacher is not None and distill.weight > 0:
            loss = loss + distill.weight * distill_loss(student, teacher, distill.loss, distill.temperature)
    if teacher is not None and distill.hidden > 0 and student.hidden is not None:
        loss = loss + distill.hidden * hidden_loss(student.hidden, teacher.hidden or [], student.mask)
    return loss
