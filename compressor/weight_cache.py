"""What a layer computes from its weights alone, kept between calls while nothing can change it.

A factorized layer serving one token at a time spends its time joining cores with each other:
work that does not depend on the input. In evaluation without grad (a served model, an
evaluation pass) a layer makes such a value once (a Linear's two matrices, a conv's kernel, an
embedding's dimension cores joined) and reuses it. A stale value would silently compute with
old weights, so a value is reused only when every one of these holds:

* the module is in evaluation mode and grad is off (``torch.no_grad`` or
  ``torch.inference_mode``): training, or anything autograd may need the cores for, computes
  from the cores every call;
* nothing is being traced (``torch.export``, ``torch.compile``, ``torch.jit``) and the input is
  a plain tensor (not an fx ``Proxy`` or a fake tensor): a graph must read the parameters, not
  a snapshot of them;
* every parameter it was made from is the same tensor with the same version: an optimizer
  step, ``load_state_dict``, any in-place write (``copy_`` under ``no_grad`` included) bumps the
  version; ``.to()`` / ``.half()`` / assigning ``.data`` moves the storage.

``train()`` and ``eval()`` drop every value, as do ``prune_`` and ``.to()``. The one write no
check can see is an in-place change through ``param.data`` (it has its own version counter):
call ``model.eval()`` after one. A value is memory held beside the cores (at most the dense
weight's size, see each layer's docstring) unless it is a view of them: a loaded layer's cores
are laid out so a matrix made from one core alone is (``TNLayer.lay_out_for_serving_``); set a
layer's ``weight_cache`` to False to compute from the cores every call.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def frozen_call(module: torch.nn.Module, x: Any) -> bool:
    """Whether a call of ``module`` on ``x`` may reuse values made from its weights (see the module doc)."""
    return (not module.training and not torch.is_grad_enabled() and type(x) is torch.Tensor
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class WeightCache:
    """Values made from some parameters, each kept with the (identity, version, storage) of
    those parameters when it was made and made again when any of them differs."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[tuple, Any]] = {}

    def get(self, name: str, params: Iterable[torch.Tensor], make: Callable[[], Any]) -> Any:
        key = tuple((id(p), p._version, p.data_ptr()) for p in params)
        found = self._values.get(name)
        if found is not None and found[0] == key:
            return found[1]
        value = make()
        self._values[name] = (key, value)
        return value

    def clear(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
