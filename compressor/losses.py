"""The task loss a fine-tune minimises (before the ℓ0 penalty is added).

With labels: cross-entropy, plus optional distillation from the original model. Without
labels: distillation only, which needs nothing but the inputs the user already has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import CompressConfig


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """KL between softened output distributions, or MSE between outputs.

    ``"auto"`` picks KL for (batch, classes) logits and MSE otherwise (regression heads,
    feature maps), where a softmax would mean nothing.
    """
    if kind == "auto":
        kind = "kl" if student.dim() == 2 and student.shape[-1] > 1 else "mse"
    if kind == "mse":
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def task_loss(out: torch.Tensor, y: torch.Tensor | None, t_out: torch.Tensor | None,
              config: CompressConfig) -> torch.Tensor:
    """Cross-entropy on labels (+ optional distillation), or pure distillation without labels."""
    if y is None:
        return distill_loss(out, t_out, config.distill_loss, config.temperature)
    loss = F.cross_entropy(out, y)
    if t_out is not None and config.distill > 0:
        loss = loss + config.distill * distill_loss(out, t_out, config.distill_loss, config.temperature)
    return loss
