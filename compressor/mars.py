"""MARS (Kodryan, Kropotov & Vetrov, AISTATS 2023), the rank selection the IJCAI 2024 paper
compares its ℓ0 gates with (supplementary Fig. 1).

MARS multiplies every rank slice by a binary mask m_j and learns the masks by relaxed maximum
a posteriori estimation: q(m_j) = Bernoulli(φ_j), φ_j = sigmoid(θ_j), trained through a
hard-concrete sample and pulled shut by a Bernoulli(π) prior on the masks. :class:`MARSGate`
is that mask on one bond, behind the interface every gate has (:class:`~compressor.gates.Gate`),
and :class:`MARSSelector` puts it on every bond of the start ``l0`` uses, under the same target
controller and budget: a ``mars`` run differs from an ``l0`` run only in how slices are masked
and penalised. What comes from MARS (the paper and the authors' code), and what had to change:

* **relaxation**: with u ~ U(0, 1) and temperature T,
  s = clamp(sigmoid((θ + log u − log(1 − u)) / T) · (ζ − γ) + γ, 0, 1), stretched to
  (γ, ζ) = (−0.1, 1.1) so that a sample is exactly 0 or 1 with positive probability. At the
  temperatures MARS uses (0.1 and below) nearly every sample is 0 or 1: training sees masks
  close to Bernoulli(φ) draws, and only a sample landing in between carries a gradient to θ.
* **evaluation**: the MAP mask m_j = [θ_j > 0] (φ_j > 1/2). It is binary, so pruning drops the
  closed slices and leaves the rest unscaled: the pruned layer computes what the masked one did.
* **prior**: the regulariser is the masks' expected log-prior,
  E_q[log p(m)] = Σ_j φ_j log π + (1 − φ_j) log(1 − π), π = 0.01 (the authors' default). It is
  KL(q ‖ p) without q's entropy, which MAP estimation leaves out; :meth:`MARSGate.penalty`
  is −E_q[log p(m)].
* **its weight**: MARS adds the prior term to the data term divided by the size of the
  training set (the ELBO per example), and π sets how hard it compresses. Here the target
  controller's λ takes that place, calibrated on the first batch and steered to the target as
  for ``l0``, on the ``count`` penalty: the prior term averaged over every slice of the model.
  The term is linear in φ_j with slope log((1 − π) / π), the same for every slice, so π only
  scales it and a calibrated λ divides the scale out: π changes a run only when λ is given
  (``lam``). Every slice costs alike, as in MARS; ``l0`` by default weighs each slice by the
  parameters it frees (``penalty="params"``), which is not MARS's prior, so a ``mars`` run
  takes ``count`` and refuses ``params``.
* **temperature**: the authors start at 0.1 and multiply it by 0.99 after each of 300 epochs,
  never below 0.01, which it reaches after 229 epochs (76 % of the run). A run here has a gate
  phase of hundreds of steps, not 300 epochs; the same path is laid over the gate phase
  (:func:`temperature`).
* **start**: the authors train from scratch, logits drawn around −1.5 to −1.75 (most masks
  closed until the data opens them). A compressed model starts from the pretrained
  decomposition, which closed masks would erase, so the logits start at :data:`START_LOGIT`
  (every evaluation mask open: the gated model equals the decomposed one; a training sample
  closes a slice about 4 % of the time); a deep stack's start margin (``gate_margin``) adds to
  it, in logits. The controller keeps logits within ±start (the gate's ceiling and floor), where
  the prior's pull, φ(1 − φ) log((1 − π) / π), still moves them.
* **left out**: the Gaussian prior on the cores (an L2 term the run's ``weight_decay`` stands
  for), the straight-through option (off by default in the authors' code) and ensembles.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError
from .gates import Gate, start_margin
from .selectors import L0Selector, SelectorOptions

#: The hard-concrete stretch (γ, ζ): a relaxed sample is clamped from this interval to [0, 1].
STRETCH = (-0.1, 1.1)
#: The prior probability that a mask is open (the authors' default π).
PRIOR = 0.01
#: The relaxation's temperature at the start of the gate phase, and the lowest it may go.
TEMPERATURE_START, TEMPERATURE_FLOOR = 0.1, 0.01
#: How far the temperature would fall over a run without its floor: the authors' x0.99 per
#: epoch for 300 epochs (the floor stops it at 229).
TEMPERATURE_FALL = 0.99 ** 300
#: The logit every mask starts at (φ = 0.953): open in evaluation, closed in ~4 % of training samples.
START_LOGIT = 3.0


def temperature(progress: float) -> float:
    """The relaxation's temperature ``progress`` (0 to 1) of the way through the gate phase:
    a geometric fall from :data:`TEMPERATURE_START` by :data:`TEMPERATURE_FALL`, held at
    :data:`TEMPERATURE_FLOOR` from 76 % of the way on."""
    progress = min(max(progress, 0.0), 1.0)
    return max(TEMPERATURE_FLOOR, TEMPERATURE_START * TEMPERATURE_FALL ** progress)


class MARSGate(Gate):
    """MARS's masks on one bond: one logit θ_j per rank slice, kept as ``mu`` (the name the
    controller reads), q(m_j) = Bernoulli(sigmoid(θ_j)).

    Training multiplies each slice by a hard-concrete sample at the current temperature
    (:meth:`relaxed`); evaluation by the MAP mask [θ_j > 0]. Closing a slice sets its logit to
    the floor; reopening to just above 0, where the MAP mask is open again (fully: it is binary).
    """

    anneals = True

    def __init__(self, size: int, start_logit: float = START_LOGIT, prior: float = PRIOR, dtype=None):
        super().__init__()
        if size <= 0:
            raise ConfigError(f"gate size must be positive, got {size}")
        if not start_logit > 0:
            raise ConfigError(f"MARS masks must start open (a logit above 0), got {start_logit}")
        if not 0 < prior < 1:
            raise ConfigError(f"the MARS prior must be in (0, 1), got {prior}")
        self.prior = float(prior)
        self.ceiling = float(start_logit)
        self.floor = self.closed_value = -self.ceiling
        self.temperature = TEMPERATURE_START
        self.mu = nn.Parameter(torch.full((size,), float(start_logit), dtype=dtype or torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"size={self.mu.numel()}, prior={self.prior:g}, temperature={self.temperature:.4g}"

    def anneal(self, progress: float) -> None:
        self.temperature = temperature(progress)

    def relaxed(self, u: torch.Tensor) -> torch.Tensor:
        """The hard-concrete sample for uniform noise ``u`` in (0, 1), differentiable in θ."""
        gamma, zeta = STRETCH
        logistic = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((self.mu + logistic) / self.temperature)
        return (soft * (zeta - gamma) + gamma).clamp(0.0, 1.0)

    def forward(self) -> torch.Tensor:
        if self.training:
            tiny = torch.finfo(self.mu.dtype).eps
            return self.relaxed(torch.rand_like(self.mu).clamp(tiny, 1.0 - tiny))
        return self.eval_value()

    def eval_value(self) -> torch.Tensor:
        """The MAP mask, [θ_j > 0], as the dtype the cores are scaled in."""
        return self.open_mask().to(self.mu.dtype)

    def open_mask(self) -> torch.Tensor:
        return self.mu.detach() > 0

    def open_probability(self) -> torch.Tensor:
        """φ_j = sigmoid(θ_j): q's probability that mask j is open (differentiable in θ)."""
        return torch.sigmoid(self.mu)

    def penalty(self) -> torch.Tensor:
        """−E_q[log p(m)] over the bond: Σ_j −φ_j log π − (1 − φ_j) log(1 − π)."""
        phi = self.open_probability()
        return -(phi * math.log(self.prior) + (1.0 - phi) * math.log1p(-self.prior)).sum()


class MARSSelector(L0Selector, name="mars"):
    """``l0``'s start (faithful or the ladder) with MARS's masks on every bond and its prior as
    the penalty (``count``: every slice alike), under the same target controller and budget."""

    help = "MARS's relaxed-Bernoulli masks and Bernoulli prior (Kodryan et al., AISTATS 2023) in place of ℓ0 gates"
    gate = MARSGate
    penalty = "count"

    def gate_factory(self, options: SelectorOptions, layers: int = 0) -> Callable[[int, torch.dtype], Gate]:
        start = START_LOGIT + start_margin(options.gate_margin, layers)
        return lambda size, dtype: MARSGate(size, start, dtype=dtype)
