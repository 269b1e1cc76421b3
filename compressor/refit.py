"""Keep the ranks the gates learned, start the weights again from the pretrained model.

The gate phase trains the cores under multiplicative gate noise and an ℓ0 penalty that
walks slices shut one by one, and the slim model carries that history. On SmolLM2-135M at
1.25x (embedding dense) an ``l0`` run ended at held-out perplexity 276.2, while the whitened
truncation of the pretrained weights at exactly the ranks it learned, fine-tuned on the same
tokens, reached 226.4 (``benchmarks/learned_ranks.py``). ``refit`` keeps what the gates are
for, the per-bond ranks, and re-fits each layer's cores to its pretrained weight at those
ranks, the same way the start was fitted (to the layer's outputs on calibration inputs
where it was observed: the whitened truncation). The weight phase then fine-tunes that.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layers import layer_class
from .plan import CompressionPlan, Site, Starts
from .surgery import dense_source, tn_layers


def refit_layers(model: nn.Module, source: nn.Module, the_plan: CompressionPlan, starts: Starts,
                 sites: Mapping[str, Site], seed: int) -> int:
    """Overwrite, in place, every factorized layer of the pruned ``model`` with the cores a fresh
    start would give it at its present ranks, from ``source`` (the untouched dense model): in its
    start's layout and with its start's whitening factors (``starts``), the ring initialised from
    ``seed`` as the start was. ``sites`` says where each planned layer lives in ``model``
    (``Applied.sites``). A layer that went back to dense gets its pretrained weight back,
    exactly. Returns the number of layers refitted."""
    layers = tn_layers(model)
    generator = torch.Generator().manual_seed(seed)
    for lp in the_plan.layers:
        site = sites[lp.name].name
        start = starts.of(lp.name)
        original = dense_source(source, lp)
        layer = layers.get(site)
        if layer is not None:
            layer.load_dense_(original, start.layout.tensorization, generator, start.whiten, start.whiten_out)
            continue
        dense = layer_class(lp.kind).dense_view(model.get_submodule(site))
        with torch.no_grad():
            dense.weight.copy_(original.weight)
            if getattr(dense, "bias", None) is not None:
                dense.bias.copy_(original.bias)
    return len(the_plan.layers)
