"""What a layer sees: input statistics from a calibration pass, for a data-aware start.

A trained transformer's weights are close to full rank, so a factorization fitted to the
raw weight throws away directions the layer's inputs actually use (SVD of SmolLM2-135M's
attention projections at half their rank loses 18-39 % of the weight). What matters is the
layer's *output* on real inputs: with X the inputs (rows) and ``G = X^T X = L L^T``,

    ||X (W - W')^T||_F = ||L^T (W - W')^T||_F,

so fitting the cores to the *whitened* weight ``L^T W^T`` and multiplying ``L^-T`` back
into the input core minimises the output error exactly (SVD-LLM's truncation-aware
whitening, Wang et al. 2024). On the same projections the whitened error at half rank is
1-2 %. Layers with a plain matrix input (Linear, GPT-2's Conv1D) are observed so.

An embedding's input is a one-hot row per token, whose Gram matrix is the diagonal of token
counts: its factor is ``sqrt(counts)``, and the truncation keeps the directions the text
actually looks up. Counts are cheap (the forward stops at the embedding), so they cover many
more batches than the activations (:data:`COUNT_BATCHES`): 8 batches of Shakespeare see 1,619
of SmolLM2's 49,152 tokens and miss a fifth of the held-out text's; 100 batches see 6,856,
and SmolLM2 with only its tied embedding truncated to rank 278 scores 295 instead of 337
(dense 235). Every row, seen or not, is then projected onto those directions (the rows of a
truncated SVD are the rows of the matrix projected onto its kept right singular vectors,
whatever their weight), so a rare token is approximated, never dropped.

A tied embedding is also its LM head, whose error is measured on the final hidden states
``H``: with ``H^T H = L_out L_out^T`` the start is fitted to ``D E L_out`` (``D`` the count
weights) and ``L_out^-1`` goes back into the output core. Neither weighting alone serves
both uses: on SmolLM2-135M, replacing only the embedding by its rank-278 fit gives held-out
perplexity 669 with the counts, 877 with the head side, 337 with both (dense 234.6).
Convolutions start from their weights.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .batches import ForwardFn, attention_mask, forward, located, split_batch
from .distributed import World
from .layers import layer_class
from .plan import CompressionPlan, LayerPlan, StartFactors
from .surgery import evaluation_mode

log = logging.getLogger(__name__)

#: Ridge added to a singular Gram matrix, relative to its mean diagonal; raised tenfold until
#: the Cholesky factorization succeeds (a dead input channel makes G singular).
RIDGE = 1e-6
#: Batches whose token ids an embedding's counts cover, when the activations cover fewer: the
#: forward stops once every counted embedding has seen its batch, so a batch costs little more
#: than loading it. 128 batches of 8 x 128 tokens cover a 100k-token fine-tune.
COUNT_BATCHES = 128


class _Counted(Exception):
    """Raised from a hook to end a forward that was only run for its token ids."""


def observable(lp: LayerPlan) -> bool:
    """Whether ``lp``'s inputs can be watched: a module (not a graph call) whose kind is
    observed (a matrix input, or token ids; ``TNLayer.calibration``)."""
    return layer_class(lp.kind).calibration is not None and lp.weight_attr is None


def is_counted(lp: LayerPlan) -> bool:
    """Whether ``lp``'s input is token ids, observed as counts (a diagonal Gram matrix)."""
    return layer_class(lp.kind).calibration == "counts"


def tied_heads(model: nn.Module, lp: LayerPlan) -> list[str]:
    """The modules of ``model`` that compute a Linear from ``lp``'s weight (an embedding's LM head)."""
    if not is_counted(lp):
        return []
    names = []
    for name in lp.tied:
        try:
            if isinstance(model.get_submodule(name), nn.Linear):
                names.append(name)
        except AttributeError:  # a call in the graph, not a module: nothing to hook
            continue
    return names


def start_factors(model: nn.Module, the_plan: CompressionPlan, grams: dict[str, torch.Tensor]) -> StartFactors:
    """The whitening factors of ``grams`` (from :func:`input_grams`) for a start fitted to activations."""
    planned = {lp.name for lp in the_plan.layers}
    heads = {}
    for lp in the_plan.layers:
        seen = [grams[h] for h in tied_heads(model, lp) if h in grams]
        if seen and lp.name in grams:
            heads[lp.name] = whitening(sum(seen))
    return StartFactors({name: whitening(g) for name, g in grams.items() if name in planned}, heads)


class _Observer:
    """Forward pre-hooks that sum each watched layer's input Gram matrix (an embedding's token
    counts) over a run of batches. While ``counting``, only embeddings are watched and the
    forward is stopped (:class:`_Counted`) once every one of them has seen the batch."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes  # {embedding: vocabulary size}
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.counting = False
        self.fired: set[str] = set()

    def hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def observe(mod: nn.Module, args: tuple) -> None:
            if self.counting and name not in self.sizes:
                return
            x, mask = args[0].detach(), self.mask
            if name in self.sizes:  # token ids
                ids = x[mask.bool()] if mask is not None and tuple(x.shape) == tuple(mask.shape) else x
                gram = torch.bincount(ids.reshape(-1).cpu(), minlength=self.sizes[name]).double()
                self.fired.add(name)
            else:
                if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask.bool()]
                x = x.reshape(-1, x.shape[-1]).float()
                gram = (x.T @ x).double()  # one batch in float32 (fast), the sum over batches in float64
            self.grams[name] = self.grams[name] + gram if name in self.grams else gram
            if self.counting and self.fired >= self.sizes.keys():
                raise _Counted
        return observe


def input_grams(model: nn.Module, the_plan: CompressionPlan, loader: Iterable, batches: int,
                forward_fn: ForwardFn | None = None, world: World | None = None,
                count_batches: int = COUNT_BATCHES) -> dict[str, torch.Tensor]:
    """``{layer: X^T X}`` (float64) over the inputs each observable planned layer receives in the
    first ``batches`` batches of ``loader``, and those of the Linear heads tied to an embedding
    (:func:`tied_heads`); for an embedding its diagonal, the token counts, over the first
    ``max(batches, count_batches)`` batches. Padding tokens (``attention_mask`` 0) are left out.
    Under several processes the sums cover every rank's batches, so all start alike."""
    names = [lp.name for lp in the_plan.layers if observable(lp)]
    names += [h for lp in the_plan.layers if lp.name in names for h in tied_heads(model, lp)]
    if not names or batches <= 0:
        return {}
    seen = _Observer({lp.name: lp.shape[0] for lp in the_plan.layers if is_counted(lp) and lp.name in names})
    handles = [model.get_submodule(name).register_forward_pre_hook(seen.hook(name)) for name in names]
    counted = batches
    try:
        with evaluation_mode(model), torch.no_grad():
            total = max(batches, count_batches) if seen.sizes else batches
            for i, batch in enumerate(itertools.islice(iter(loader), total)):
                seen.counting, seen.fired = i >= batches, set()
                seen.mask = attention_mask(split_batch(batch)[0]) if forward_fn is None else None
                try:
                    with located(f"calibration batch {i + 1}"):
                        forward(model, batch, forward_fn)
                except _Counted:
                    counted = i + 1
                    continue
                if seen.counting:
                    break  # an embedding this batch did not reach: counting would cost whole forwards
    finally:
        for h in handles:
            h.remove()
    world = world or World.current()
    for name in names:  # the same order on every rank (the same layers run on any batch)
        if name in seen.grams:
            world.sum_tensor_(seen.grams[name])
    log.info("calibration: input statistics of %d layers from %d batches, token counts from %d",
             len(seen.grams), batches, counted if seen.sizes else 0)
    return seen.grams


def whitening(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = G + ridge I`` (float64); the ridge starts at
    :data:`RIDGE` times the mean diagonal and grows until ``G`` is positive definite.
    A diagonal ``G`` (an embedding's token counts, 1-D) gives the diagonal of ``L``."""
    gram = gram.to("cpu", torch.float64)  # the start is chosen on the CPU, where the weights are read
    if gram.dim() == 1:
        scale = float(gram.mean())
        return torch.sqrt(gram + RIDGE * scale) if scale > 0 else torch.ones_like(gram)
    scale = float(gram.diagonal().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    ridge = RIDGE * scale
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            return factor
        ridge *= 10.0
    return torch.sqrt(torch.tensor(scale, dtype=torch.float64)) * eye  # no usable statistics: plain start
