"""One validated configuration object for a compression run.

Everything a run needs is checked here, before any model is touched, so a bad option
fails in milliseconds with a one-line message instead of after minutes of fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from .errors import ConfigError, TargetError
from .tensornet import DECOMPS

RANK_SELECTORS = ("l0", "uniform", "energy", "reinforce", "svd")
PENALTIES = ("params", "count")
DISTILL_LOSSES = ("auto", "kl", "mse")


def parse_target(target: Any) -> float:
    """Accept ``"5x"``, ``"5X"``, ``"5"``, ``5`` or ``5.0``: dense params / compressed params."""
    raw = target
    if isinstance(target, str):
        text = target.strip().lower()
        if text.endswith("x") or text.endswith("×"):
            text = text[:-1].strip()
        try:
            target = float(text)
        except ValueError:
            raise TargetError(f"target {raw!r} is not a number; write it like '5x' or 5.0") from None
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TargetError(f"target {raw!r} is not a number; write it like '5x' or 5.0")
    target = float(target)
    if not math.isfinite(target):
        raise TargetError(f"target {raw!r} must be a finite number")
    if target <= 1.0:
        raise TargetError(f"target {raw!r} must be greater than 1 (it is dense size / compressed size)")
    return target


FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class CompressConfig:
    """Options of :func:`compressor.compress`; ``None`` means "the tool chooses".

    target: compression ratio to reach, counted on the whole model (all parameters,
        biases and untouched layers included): dense params / compressed params.
    decomp: ``"tr"`` (tensor ring) or ``"tt"`` (tensor train).
    rank: generous initial bond size (the gates then learn how much of it to keep);
        ``None`` picks the smallest of 16..64 whose model is at most half the target size
        ratio, so the gates always have room to choose.
    sigma: gate noise std (METHOD.md: 0.5 works best).
    lam: weight of the l0 penalty at the start; the target controller adapts it.
    rank_select: ``"l0"`` (learned gates, the method), or a baseline: ``"uniform"`` (one rank
        for all), ``"energy"`` (singular-value energy), ``"svd"`` (two low-rank factors per
        weight), ``"reinforce"`` (Bernoulli gates trained by REINFORCE, M samples per step).
    penalty: ``"params"`` weighs each slice by the parameters it costs (aims straight at a
        size target); ``"count"`` is the paper's plain sum of Phi(mu/sigma).
    epochs: total fine-tuning epochs (gate phase + weight-only phase).
    gate_fraction: share of the budget in which the gates may move; the target is
        enforced by the end of it at the latest.
    lr / gate_lr: Adam learning rates of cores (and other weights) and of gate means.
    distill: weight of distillation from the original model when labels exist (0 = off);
        without labels the run always distils.
    distill_loss: ``"kl"`` on logits, ``"mse"`` on outputs, or ``"auto"`` (KL for 2-D outputs).
    min_params: layers whose weight has fewer entries stay dense.
    filter_fn: ``filter_fn(module, fqn) -> bool`` narrows which layers are compressed.
    tensorization: per-layer override, ``{fqn: (in_modes, out_modes)}``.
    layer_ranks: per-layer initial rank override, ``{fqn: int or [bond sizes]}``.
    """

    target: Any = 5.0
    decomp: str = "tr"
    rank: int | None = None
    sigma: float = 0.5
    lam: float | None = None
    penalty: str = "params"
    rank_select: str = "l0"
    reinforce_samples: int = 5
    epochs: int | None = None
    max_steps: int | None = None
    gate_fraction: float = 0.5
    lr: float | None = None
    gate_lr: float = 0.05
    weight_decay: float = 0.0
    distill: float = 0.0
    distill_loss: str = "auto"
    temperature: float = 1.0
    min_params: int = 1000
    filter_fn: FilterFn | None = None
    tensorization: dict[str, tuple[Sequence[int], Sequence[int]]] = field(default_factory=dict)
    layer_ranks: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    log_every: int = 20

    def __post_init__(self):
        self.target = parse_target(self.target)
        if self.decomp not in DECOMPS:
            raise ConfigError(f"unknown decomposition {self.decomp!r}; choose 'tr' (tensor ring) or 'tt' (tensor train)")
        if self.rank_select not in RANK_SELECTORS:
            raise ConfigError(f"unknown rank selector {self.rank_select!r}; choose one of {', '.join(RANK_SELECTORS)}")
        if self.penalty not in PENALTIES:
            raise ConfigError(f"unknown penalty {self.penalty!r}; choose one of {', '.join(PENALTIES)}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ConfigError(f"unknown distillation loss {self.distill_loss!r}; choose one of {', '.join(DISTILL_LOSSES)}")
        if self.rank is not None:
            _positive_int("rank", self.rank)
        _positive("sigma", self.sigma)
        _positive("gate_lr", self.gate_lr)
        _positive("temperature", self.temperature)
        if self.lam is not None and not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if self.lr is not None:
            _positive("lr", self.lr)
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0):
            raise ConfigError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        if not 0.0 < self.gate_fraction <= 1.0:
            raise ConfigError(f"gate_fraction must be in (0, 1], got {self.gate_fraction}")
        if not (self.distill >= 0 and math.isfinite(self.distill)):
            raise ConfigError(f"distill weight must be >= 0, got {self.distill}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.min_params < 0:
            raise ConfigError(f"min_params must be >= 0, got {self.min_params}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError("filter_fn must be callable as filter_fn(module, fqn) -> bool")
        for name, rank in self.layer_ranks.items():
            ranks = [rank] if isinstance(rank, int) else list(rank)
            if not ranks or any(not isinstance(r, int) or r <= 0 for r in ranks):
                raise ConfigError(f"layer_ranks[{name!r}] must be positive integers, got {rank!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
