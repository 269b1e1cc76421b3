"""Keep the ranks the gates learned, start the weights again from the pretrained model.

The gate phase trains the cores under multiplicative gate noise and an ℓ0 penalty that
walks slices shut one by one, so at the freeze the slim model carries that history: on
SmolLM2-135M its distillation loss was about twice that of the same layers truncated
straight from the pretrained weights at the same ranks. ``refit`` keeps what the gates are
for, the per-bond ranks, and re-fits each layer's cores to its pretrained weight at those
ranks, the same way the start was fitted (to the layer's outputs on calibration inputs
where it was observed: the whitened truncation). The weight phase then fine-tunes that.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .config import CompressConfig
from .graph import Applied, CompressionPlan, build_layer, dense_source, tn_layers


def refit_layers(model: nn.Module, source: nn.Module, the_plan: CompressionPlan, applied: Applied,
                 config: CompressConfig) -> int:
    """Overwrite, in place, every factorized layer of the pruned ``model`` with the cores a fresh
    start would give it at its present ranks, from ``source`` (the untouched dense model).
    Layers that went back to dense keep what they hold. Returns the number of layers refitted."""
    layers = tn_layers(model)
    generator = torch.Generator().manual_seed(config.seed)
    refitted = 0
    for lp in the_plan.layers:
        layer = layers.get(applied.sites[lp.name].name)
        if layer is None:
            continue
        fresh = build_layer(replace(lp, rank=list(layer.ranks)), dense_source(source, lp), config, generator)
        with torch.no_grad():
            for core, new in zip(layer.cores, fresh.cores):
                core.copy_(new)
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(fresh.bias)
        refitted += 1
    return refitted
