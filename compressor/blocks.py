"""Hidden-state distillation per block (CoFi-style layer-wise matching).

Matching only the last layer's logits tells a deep student *that* it drifted, not *where*.
Matching each block's output to the original model's tells every block what it should
compute, which is how structured-pruning work (CoFi, Xia et al. 2022) keeps deep
transformers close to the original. Factorizing leaves hidden sizes unchanged, so the
states are compared directly, without CoFi's learned projection.

A *block* is a child of the model's longest ``nn.ModuleList`` of same-type modules (a
transformer's layers); both models are read through forward hooks, so any architecture
with such a list works and nothing is asked of its ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the repeated blocks: the children of the longest ``nn.ModuleList``
    whose children share one type (at least two), e.g. ``model.layers.0`` ... ``model.layers.29``."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if len(module) > len(best):
                best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return best


class BlockRecorder:
    """Keeps the output of every block of ``model`` from its last forward while ``on``.

    The hooks stay on the model only for the recorder's life: :meth:`close` removes them, so
    a model handed back to the user carries none.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.on = False
        self.states: dict[str, torch.Tensor] = {}
        self.names = names
        modules = dict(model.named_modules())
        self.hooks = [modules[name].register_forward_hook(self._keeper(name)) for name in names]

    def _keeper(self, name: str):
        def keep(module, args, output) -> None:
            if self.on:
                out = output[0] if isinstance(output, (tuple, list)) else output
                if torch.is_tensor(out):
                    self.states[name] = out
        return keep

    def take(self) -> list[torch.Tensor]:
        """The states recorded since the last call, in block order (then forgotten)."""
        states, self.states = [self.states[n] for n in self.names if n in self.states], {}
        return states

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def shared_blocks(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The blocks both models have under the same names, or a one-line error."""
    names = [n for n in find_blocks(teacher) if n in dict(student.named_modules())]
    if not names:
        raise ConfigError("hidden-state distillation needs repeated blocks (an nn.ModuleList of same-type layers, "
                          "as in a transformer) that the compressed model keeps under the same names; this model "
                          "has none: leave distill_hidden at 0")
    return names


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over blocks of the squared error of each hidden channel, in units of that
    channel's mean square in the original model (over the real tokens of the batch).

    Per-channel units matter on LLMs: a few channels carry activations hundreds of times
    larger than the rest, and a plain MSE would be about those channels alone.
    """
    if len(student) != len(teacher) or not student:
        raise ConfigError(f"hidden-state distillation saw {len(student)} student and {len(teacher)} original blocks")
    total = torch.zeros((), device=student[0].device)
    for s, t in zip(student, teacher):
        if s.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(s.shape[:2]):
            s, t = s[mask.bool()], t[mask.bool()]
        s, t = s.reshape(-1, s.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float()
        scale = t.pow(2).mean(0).clamp_min(1e-6)
        total = total + ((s - t).pow(2).mean(0) / scale).mean()
    return total / len(student)
