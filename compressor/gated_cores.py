"""A network of cores (train or ring) with an ℓ0 gate on every bond: the part of a factorized
layer that learns its ranks.

A layer kind (layers.py) says how its cores stand for a dense weight; everything about the
gates is the same for every kind and lives here: which bonds carry a gate, folding the gate
values into the cores, the expected size under the gate distribution (the penalty the
target controller steers), one gate sample shared with a tied layer, and ``prune_``, which
cuts the closed slices so the layer is smaller, ungated and computes the same thing.

:class:`GatedCores` is the base class of :class:`~compressor.layers.TNLayer`, not a module
the layer holds: the cores and gates stay the layer's own attributes, so a checkpoint's
keys (``cores.0``, ``gates.0.mu``, ``bias``) are the layer's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import tensornet as tn
from .errors import TensorizationError
from .gates import Gate, L0Gate
from .weight_cache import WeightCache, frozen_call


class GatedCores(nn.Module):
    """Cores ``(r_{k-1}, n_k, r_k)`` over ``modes`` and, when ``gated``, an :class:`L0Gate` on
    every bond (``gates[str(k)]`` scales the right rank axis of core ``k``)."""

    #: Set when a :class:`~compressor.layers.TiedTNLinear` computes from these cores (a tied LM head).
    shares_cores: bool = False
    #: Whether evaluation without grad reuses values made from the cores (see weight_cache.py);
    #: False computes from the cores every call (no memory beside them).
    weight_cache: bool = True

    def __init__(self, modes: Sequence[int], ranks: Sequence[int], decomp: str, gated: bool, sigma: float, dtype=None):
        super().__init__()
        tn.check_decomp(decomp)
        if len(modes) < 1:
            raise TensorizationError("a factorized layer needs at least one mode larger than 1")
        self.decomp = decomp
        self.modes = tuple(int(m) for m in modes)
        dtype = dtype or torch.get_default_dtype()
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in tn.core_shapes(self.modes, ranks)]
        )
        self.sigma = float(sigma)
        self.gates = (nn.ModuleDict({str(k): L0Gate(r, sigma, dtype=dtype) for k, r in self._gated_bonds(ranks)})
                      if gated else None)

    # ----------------------------------------------------------------- structure
    def _gated_bonds(self, ranks: Sequence[int]) -> list[tuple[int, int]]:
        """(bond index, size) of every bond that carries a gate: TT's closing bond does not."""
        n = len(self.modes)
        bonds = range(n - 1) if self.decomp == "tt" else range(n)
        return [(k, int(ranks[k])) for k in bonds]

    @property
    def ranks(self) -> list[int]:
        return [int(c.shape[2]) for c in self.cores]

    @property
    def gated(self) -> bool:
        return self.gates is not None

    def open_ranks(self) -> list[int]:
        """Bond sizes after pruning with the current evaluation-mode gates (>= 1 each)."""
        ranks = self.ranks
        if self.gates is not None:
            for key, gate in self.gates.items():
                ranks[int(key)] = max(1, gate.open_count())
        return ranks

    def expected_param_count(self) -> torch.Tensor:
        """Differentiable expected parameter count of the cores under the gate distribution.

        Bonds are independent, so E[r_k n_k r_{k+1}] = E[r_k] n_k E[r_{k+1}] with
        E[r] = sum_j P(z_j > 0) (Phi(mu_j / sigma) for an ℓ0 gate).
        """
        exp_ranks: list[Any] = [float(r) for r in self.ranks]
        if self.gates is not None:
            for key, gate in self.gates.items():
                exp_ranks[int(key)] = gate.expected_open()
        n = len(self.modes)
        total = 0.0
        for k in range(n):
            total = total + exp_ranks[k - 1] * self.modes[k] * exp_ranks[k]
        return torch.as_tensor(total) if not torch.is_tensor(total) else total

    def gate_penalty(self) -> torch.Tensor:
        """Sum over gates of their ``penalty()``: sum_j Phi(mu_j / sigma) for ℓ0 gates (the
        paper's l0 penalty), the masks' prior term for MARS's."""
        if self.gates is None:
            return torch.zeros(())
        return sum(g.penalty() for g in self.gates.values())

    # ----------------------------------------------------------------- the cores the layer computes with
    def core_list(self) -> list[torch.Tensor]:
        """The cores in order: ``list(self.cores)`` at a tenth of its cost (a ParameterList's
        iterator looks each one up by name, ~4 µs a core: more than a served layer's product)."""
        return list(self.cores._parameters.values())

    def effective_cores(self) -> list[torch.Tensor]:
        """Cores with the current gate values folded into their right rank axis."""
        cores = self.core_list()
        if self.gates is not None:
            for key, gate in self.gates.items():
                k = int(key)
                cores[k] = cores[k] * gate()
        return cores

    def forward_cores(self) -> list[torch.Tensor]:
        """:meth:`effective_cores` for this layer's forward. In training, a layer whose cores are
        shared keeps its gate sample so the tied layer uses the same one (one weight, one sample)."""
        cores = self.effective_cores()
        if self.shares_cores and self.training and self.gates is not None:
            self._sample = (self._core_versions(), cores)
        return cores

    def take_cores(self) -> list[torch.Tensor]:
        """The cores a tied layer computes with: this step's gate sample when the forward drew one."""
        versions, cores = self.__dict__.pop("_sample", (None, None))
        if cores is not None and self.training and versions == self._core_versions():
            return cores
        return self.effective_cores()

    # ----------------------------------------------------------------- values made from the weights alone
    def frozen(self, name: str, x: Any, make: Callable[[], Any]) -> Any:
        """``make()`` (a value computed from the cores alone), kept between calls on inputs like
        ``x`` while the cores and gates are unchanged; None when this call must compute from the
        cores (training, grad on, tracing: see weight_cache.py)."""
        if not (self.weight_cache and frozen_call(self, x)):
            return None
        if self.gates is not None and any(g.training for g in self.gates.values()):
            return None  # a gate still sampling: its value changes every call
        weights = self.core_list() + (list(self.gates.parameters()) if self.gates is not None else [])
        return self._weight_cache().get(name, weights, make)

    def _weight_cache(self) -> WeightCache:
        cache = self.__dict__.get("_frozen")
        if cache is None:
            cache = self.__dict__["_frozen"] = WeightCache()
        return cache

    def drop_weight_cache(self) -> None:
        """Let go of every value kept from the weights (they are made again when next needed)."""
        self._weight_cache().clear()

    def train(self, mode: bool = True) -> "GatedCores":
        self._weight_cache().clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._weight_cache().clear()  # .to() / .half(): the kept values are of the old tensors
        return super()._apply(fn, *args, **kwargs)

    def _core_versions(self) -> tuple[int, ...]:
        """Changes at every optimizer step: a sample from an earlier step is never reused."""
        return tuple(c._version for c in self.core_list())

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_sample", None)  # autograd results cannot be copied, and belong to one step
        state.pop("_frozen", None)  # made again from the weights when needed
        return state

    # ----------------------------------------------------------------- pruning
    @torch.no_grad()
    def prune_(self) -> "GatedCores":
        """Drop closed slices, fold gate values into the cores, remove the gates."""
        if self.gates is None:
            return self
        cores = [c.detach().clone() for c in self.cores]
        n = len(cores)
        for key, gate in self.gates.items():
            k = int(key)
            z = gate.eval_value().detach().to(cores[k].dtype)
            keep = torch.nonzero(z > 0).flatten()
            if keep.numel() == 0:  # every slice closed: the layer's weight is zero; keep one zero slice
                keep = torch.argmax(gate.mu.detach()).reshape(1)
            cores[k] = cores[k][:, :, keep] * z[keep]
            nxt = (k + 1) % n
            cores[nxt] = cores[nxt][keep, :, :]
        self.cores = nn.ParameterList([nn.Parameter(c.contiguous()) for c in cores])
        self.gates = None
        self.__dict__.pop("_sample", None)
        self._weight_cache().clear()
        return self

    def set_gates_(self, make_gate: Callable[[int], Gate]) -> "GatedCores":
        """Replace every gate by ``make_gate(size)`` (e.g. REINFORCE's Bernoulli gates)."""
        self.gates = nn.ModuleDict({str(k): make_gate(r) for k, r in self._gated_bonds(self.ranks)})
        return self

    def extra_repr(self) -> str:
        return f"decomp={self.decomp}, modes={self.modes}, ranks={self.ranks}, gated={self.gated}"
