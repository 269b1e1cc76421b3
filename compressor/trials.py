"""A rank search's trials: a candidate built, briefly trained on the run's data, and scored.

A selector that searches (``pstrn``) needs what only the run has: the data, the loss and a
training step. The run makes ``trial(starts, steps) -> loss`` here
(:func:`candidate_trial`) and hands it to that selector's ``prepare``; the selector never
sees a loader and nothing of the run's state changes.

Every trial is the same experiment on a different candidate, so their losses compare:

* the candidate is built ungated from the pretrained model, as the fine-tune would build it
  (``surgery.apply``), on the run's device;
* it trains ``steps`` Adam steps at the run's learning rate on the first ``steps`` batches
  of the training data's first pass (seeded with the run's seed), with the run's task loss
  (cross-entropy, or distillation from the original model without labels; a hidden-state
  distillation term is left out of trials);
* it is scored by its mean task loss, in evaluation mode, on the :data:`PROBE_BATCHES`
  batches that follow them: data it was not trained on (the evaluation data, which may be
  the test set a benchmark reports, never takes part in the choice).

Every generator is restored after a trial: a search leaves the run's random stream where
it found it, and the same seed gives the same losses.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable

import torch
from torch import nn

from .batches import forward
from .config import CompressConfig
from .losses import Distillation, task_loss
from .plan import CompressionPlan, Starts
from .resume import random_state_kept, set_loader_epoch
from .selectors import Trial
from .surgery import apply, evaluation_mode, set_training

#: Batches after a trial's training batches that score it (as many as early stop measures).
PROBE_BATCHES = 4


def trial_batches(loader: Iterable, seed: int, count: int) -> list[Any]:
    """The first ``count`` batches of ``loader``'s passes from its first (epoch 0, then 1, ...),
    drawn with the torch stream seeded with ``seed`` and restored afterwards."""
    out: list[Any] = []
    with random_state_kept():
        torch.manual_seed(seed)
        for epoch in itertools.count():
            set_loader_epoch(loader, epoch)
            before = len(out)
            out += itertools.islice(iter(loader), count - len(out))
            if len(out) >= count or len(out) == before:
                return out
    return out


def candidate_trial(module: nn.Module, the_plan: CompressionPlan, loader: Iterable, teacher: nn.Module | None,
                    config: CompressConfig, labelled: bool) -> Trial:
    """``trial(starts, steps) -> loss`` for the run ``config`` describes (settled: its learning
    rate chosen), on ``loader``; ``teacher`` is the original model (distillation), ``labelled``
    whether the batches carry labels. The batches are drawn once per length asked for."""
    distill = Distillation(config.distill, 0.0, config.distill_loss, config.temperature)
    original = teacher if distill.needs_teacher(labelled) else None
    device = torch.device(config.device) if config.device is not None else None
    drawn: dict[int, list[Any]] = {}

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        ran = forward(model, batch, config.forward_fn)
        with torch.no_grad():
            reference = forward(original, batch, config.forward_fn) if original is not None else None
        return task_loss(ran, reference, distill)

    def trial(starts: Starts, steps: int) -> float:
        if steps not in drawn:
            drawn[steps] = trial_batches(loader, config.seed, steps + PROBE_BATCHES)
        batches = drawn[steps]
        with random_state_kept():
            torch.manual_seed(config.seed)
            model = apply(module, the_plan, starts, sigma=config.sigma, seed=config.seed).model
            model = set_training(model.to(device) if device is not None else model, True)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                   weight_decay=config.weight_decay)
            for batch in batches[:steps]:
                opt.zero_grad(set_to_none=True)
                value = loss(model, batch)
                if not torch.isfinite(value):
                    return math.inf
                value.backward()
                opt.step()
            with evaluation_mode(model), torch.no_grad():
                probes = batches[steps:] or batches[-1:]
                return sum(float(loss(model, b)) for b in probes) / len(probes)

    return trial
