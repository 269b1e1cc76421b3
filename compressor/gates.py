"""The probabilistic ℓ0 gate on one bond of a tensor network (Cao et al., IJCAI 2024; docs/method.md §3).

Each rank slice j has a learnable ``mu_j``.  Training uses the Gaussian relaxation
``z = clamp(mu + eps, 0, 1)`` with ``eps ~ N(0, sigma^2)``; evaluation uses
``z = clamp(mu, 0, 1)``; the expected number of open slices is ``sum Phi(mu / sigma)``.

Parametrisation: ``mu`` is used as written (no hidden shift) and starts at
``1 + margin * sigma`` (:func:`start_margin`), so every gate is exactly 1 in evaluation
(the gated model equals the plain decomposed model); training noise dims a slice only when
it draws ε < -margin·σ. At margin 0 (:data:`MU_INIT` = 1, small nets) half the samples dim
every slice, a useful regulariser; a deep stack multiplies that noise through every layer
(SmolLM2-135M: 7.7 nats/token of KL to the dense model in training mode against 1.5 in
evaluation at margin 0, 1.6 at margin 2), so deep stacks start two sigmas higher and let
the penalty bring each slice down to where its noise is worth measuring.

The REINFORCE baseline (supplementary §2.1) lives here too: its Bernoulli gate and the
score-function surrogate that trains it (:func:`reinforce_surrogate`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError

MU_INIT = 1.0
#: More factorized layers than this make a deep stack, whose gates start
#: :data:`DEEP_MARGIN` sigmas above 1 unless the run says otherwise (and whose start is
#: fitted to activations and refitted when the gates freeze: ``CompressConfig.settled``).
DEEP_STACK = 16
DEEP_MARGIN = 2.0


def deep_stack(layers: int) -> bool:
    """Whether ``layers`` factorized layers make a deep stack (a transformer, not LeNet-5)."""
    return layers > DEEP_STACK


def start_margin(margin: float | None, layers: int) -> float:
    """How many sigmas above 1 the gate means start: ``margin`` if given, else 0 for a
    shallow model and :data:`DEEP_MARGIN` beyond :data:`DEEP_STACK` factorized layers."""
    if margin is not None:
        return float(margin)
    return DEEP_MARGIN if deep_stack(layers) else 0.0


def std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Gate(nn.Module):
    """What the layers and the target controller need from any gate on a bond.

    Subclasses define ``forward`` (training sample / eval value), ``eval_value``,
    ``open_mask`` and ``open_probability``; closing and reopening a slice set ``mu`` to the
    subclass's ``closed_value`` / ``reopen_value``.
    """

    closed_value = -1.0
    reopen_value = 0.05
    #: True when the gate's samples carry no gradient and training needs the
    #: score-function estimator (:func:`reinforce_surrogate`) with several samples.
    score_function = False
    #: True when the gate's relaxation follows a schedule over the gate phase (:meth:`anneal`).
    anneals = False
    #: The highest mean the controller lets a gate keep, and the mean below which a slice
    #: is closed: a mean may have ``ceiling - closes_below`` to travel before it closes.
    ceiling = 1.0
    closes_below = 0.0
    #: The lowest mean the controller lets a gate keep: a closed slice stays within reach of
    #: the task's gradient, should the weights come to need it again.
    floor = -1.0
    mu: nn.Parameter

    def travel(self) -> float:
        return self.ceiling - self.closes_below

    def expected_open(self) -> torch.Tensor:
        """Expected number of open slices, sum_j P(z_j > 0): the bond's expected rank."""
        return self.open_probability().sum()

    def penalty(self) -> torch.Tensor:
        """What the ``count`` penalty adds up for this bond: the expected number of open
        slices (the paper's ℓ0 term). A gate whose method puts its own prior on the slices
        (MARS) returns that prior's term instead."""
        return self.expected_open()

    def anneal(self, progress: float) -> None:
        """The gate phase is ``progress`` (0 to 1) of the way through. A gate whose relaxation
        follows a schedule (MARS's temperature) sets it here; the ℓ0 gate has none."""

    def open_count(self) -> int:
        return int(self.open_mask().sum())

    def close(self, index: int) -> None:
        """Shut one slice for good (used by the target controller)."""
        with torch.no_grad():
            self.mu[index] = self.closed_value

    def reopen(self, index: int) -> None:
        """Open a closed slice again, as little as the gate allows."""
        with torch.no_grad():
            self.mu[index] = self.reopen_value


class L0Gate(Gate):
    """Diagonal gate between two cores; one ``mu`` per rank slice.

    Reopening sets z = 0.05: the function barely changes, and the weights may grow the
    slice back during fine-tuning. ``ceiling`` is the highest ``mu`` the controller lets
    the task push a slice to: 1 + sigma, or the start if that is higher.
    """

    def __init__(self, size: int, sigma: float = 0.5, mu_init: float = MU_INIT, dtype=None):
        super().__init__()
        if size <= 0:
            raise ConfigError(f"gate size must be positive, got {size}")
        if not sigma > 0:
            raise ConfigError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.ceiling = max(1.0 + self.sigma, float(mu_init))
        self.mu = nn.Parameter(torch.full((size,), float(mu_init), dtype=dtype or torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"size={self.mu.numel()}, sigma={self.sigma}"

    def eval_value(self) -> torch.Tensor:
        """Deterministic gate used at evaluation (and folded into the cores at pruning)."""
        return self.mu.clamp(0.0, 1.0)

    def forward(self) -> torch.Tensor:
        if self.training:
            eps = torch.randn_like(self.mu) * self.sigma
            return (self.mu + eps).clamp(0.0, 1.0)
        return self.eval_value()

    def open_probability(self) -> torch.Tensor:
        """P(z_j > 0) = Phi(mu_j / sigma), differentiable in mu."""
        return std_normal_cdf(self.mu / self.sigma)

    def open_mask(self) -> torch.Tensor:
        return self.mu.detach() > 0


class BernoulliGate(Gate):
    """REINFORCE baseline gate (supplementary section 2.1): true Bernoulli slices.

    pi = clamp(mu, 0, 1) starts at 0.55; training samples z ~ Bern(pi) (no gradient through
    z, the score-function estimator supplies it via :meth:`log_prob`); evaluation rounds,
    z = [pi >= 0.5].  Offered to compare against, not as a default.
    """

    score_function = True
    #: π = 0.5: the least open a slice can be and still count as open (eval rounds π >= 0.5).
    reopen_value = 0.5
    closes_below = 0.5

    def __init__(self, size: int, pi_init: float = 0.55, dtype=None):
        super().__init__()
        if size <= 0:
            raise ConfigError(f"gate size must be positive, got {size}")
        self.mu = nn.Parameter(torch.full((size,), float(pi_init), dtype=dtype or torch.get_default_dtype()))
        self.last_z: torch.Tensor | None = None

    def probs(self) -> torch.Tensor:
        return self.mu.clamp(0.0, 1.0)

    def eval_value(self) -> torch.Tensor:
        return (self.mu.detach() >= 0.5).to(self.mu.dtype)

    def forward(self) -> torch.Tensor:
        if self.training:
            z = torch.bernoulli(self.probs().detach())
            self.last_z = z
            return z
        return self.eval_value()

    def log_prob(self) -> torch.Tensor:
        """log P(last sampled z) under the current pi (differentiable in mu)."""
        if self.last_z is None:
            return torch.zeros((), dtype=self.mu.dtype)
        p = self.mu.clamp(1e-4, 1 - 1e-4)
        z = self.last_z
        return (z * torch.log(p) + (1 - z) * torch.log1p(-p)).sum()

    def open_probability(self) -> torch.Tensor:
        return self.probs()

    def open_mask(self) -> torch.Tensor:
        return self.mu.detach() >= 0.5


def reinforce_surrogate(task_losses: list[torch.Tensor], sizes: list[float], log_probs: list[torch.Tensor],
                        lam: float) -> torch.Tensor:
    """REINFORCE-ℓ0's surrogate loss over M samples (supplementary eq. 3).

    Per sample: log P(Z) * (c - b) + J, with c = J + λ·size(Z) held constant and b the
    mean of c over the M samples (a standard variance reduction). Its gradient is the
    score-function estimate for the gates plus the ordinary gradient for the weights.
    """
    m = len(task_losses)
    costs = [float(j.detach()) + lam * s for j, s in zip(task_losses, sizes)]
    base = sum(costs) / m
    total = 0.0
    for j, logp, c in zip(task_losses, log_probs, costs):
        total = total + (logp * (c - base) + j) / m
    return total
