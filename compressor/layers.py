"""Factorized drop-in layers: TNLinear, TNConv2d, TNEmbedding (tensor train or ring).

Each layer keeps its weight as cores (``tensornet`` conventions), optionally with an
:class:`~compressor.gates.L0Gate` on every bond.  ``from_dense`` initialises the cores
from a pretrained module; ``prune_`` removes closed slices and folds the gate values
into the cores, after which the layer is ungated and smaller but computes the same thing.
``spec()`` / ``from_spec`` describe a layer in plain JSON so checkpoints rebuild it.

How each layer computes (chosen for speed on CPU, see METHOD.md section 7):
* Linear: one einsum of the input with all cores, contraction order picked by opt_einsum
  for the actual batch size (small batches never rebuild the weight, large ones may).
* Conv2d: rebuild the (small) kernel from the cores, then one ``F.conv2d``: a conv's
  cost is dominated by the image, and any factored conv with r^2 channels costs more.
* Embedding: builds only the looked-up rows, never the V x D table.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import tensornet as tn
from .errors import ConfigError, TensorizationError
from .gates import L0Gate

#: Batch size assumed for contraction order while tracing with a symbolic batch.
EXPORT_BATCH_HINT = 256


def _nontrivial(modes: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(m) for m in modes if int(m) > 1)


def _auto_modes(dim: int, given: Sequence[int] | None, what: str) -> tuple[int, ...]:
    if given is None:
        return _nontrivial(tn.factorize(dim))
    return _nontrivial(tn.check_modes(given, dim, what))


class TNLayer(nn.Module):
    """Shared machinery: cores, bond gates, pruning, parameter counting."""

    kind = "base"

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
        self.gates = nn.ModuleDict({str(k): L0Gate(r, sigma, dtype=dtype) for k, r in self._gated_bonds(ranks)}) if gated else None

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

    def param_count(self) -> int:
        """Parameters of the layer as it stands (cores + bias; gates are training-only)."""
        bias = getattr(self, "bias", None)
        return tn.param_count(self.modes, self.ranks) + (bias.numel() if bias is not None else 0)

    def open_ranks(self) -> list[int]:
        """Bond sizes after pruning with the current evaluation-mode gates (>= 1 each)."""
        ranks = self.ranks
        if self.gates is not None:
            for key, gate in self.gates.items():
                ranks[int(key)] = max(1, gate.open_count())
        return ranks

    def dense_param_count(self) -> int:
        """Parameters of the dense layer this one stands for (weight + bias)."""
        bias = getattr(self, "bias", None)
        return math.prod(self.dense_shape()) + (bias.numel() if bias is not None else 0)

    def dense_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def live_param_count(self) -> int:
        """What :meth:`param_count` will be after ``prune_()``."""
        bias = getattr(self, "bias", None)
        return tn.param_count(self.modes, self.open_ranks()) + (bias.numel() if bias is not None else 0)

    def expected_param_count(self) -> torch.Tensor:
        """Differentiable expected parameter count under the gate distribution.

        Bonds are independent, so E[r_k n_k r_{k+1}] = E[r_k] n_k E[r_{k+1}] with
        E[r] = sum_j Phi(mu_j / sigma).
        """
        exp_ranks: list[Any] = [float(r) for r in self.ranks]
        if self.gates is not None:
            for key, gate in self.gates.items():
                exp_ranks[int(key)] = gate.penalty() if not gate.frozen else float(gate.open_count())
        n = len(self.modes)
        total = 0.0
        for k in range(n):
            total = total + exp_ranks[k - 1] * self.modes[k] * exp_ranks[k]
        return torch.as_tensor(total) if not torch.is_tensor(total) else total

    def gate_penalty(self) -> torch.Tensor:
        """Sum over gates of sum_j Phi(mu_j / sigma) (the paper's l0 penalty)."""
        if self.gates is None:
            return torch.zeros(())
        return sum(g.penalty() for g in self.gates.values())

    # ----------------------------------------------------------------- compute
    def effective_cores(self) -> list[torch.Tensor]:
        """Cores with the current gate values folded into their right rank axis."""
        cores = list(self.cores)
        if self.gates is not None:
            for key, gate in self.gates.items():
                k = int(key)
                cores[k] = cores[k] * gate()
        return cores

    def dense_tensor(self) -> torch.Tensor:
        return tn.contract(self.effective_cores())

    # ----------------------------------------------------------------- pruning
    @torch.no_grad()
    def prune_(self) -> "TNLayer":
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
        return self

    def set_gates_(self, make_gate) -> "TNLayer":
        """Replace every gate by ``make_gate(size)`` (e.g. REINFORCE's Bernoulli gates)."""
        self.gates = nn.ModuleDict({str(k): make_gate(r) for k, r in self._gated_bonds(self.ranks)})
        return self

    # ----------------------------------------------------------------- description
    def spec(self) -> dict[str, Any]:
        """JSON-able description sufficient to rebuild this layer's structure."""
        raise NotImplementedError

    @staticmethod
    def from_spec(spec: dict[str, Any]) -> "TNLayer":
        cls = LAYER_KINDS.get(spec.get("kind"))
        if cls is None:
            raise ConfigError(f"unknown factorized layer kind {spec.get('kind')!r}")
        return cls._from_spec(spec)

    def extra_repr(self) -> str:
        return f"decomp={self.decomp}, modes={self.modes}, ranks={self.ranks}, gated={self.gated}"


def weight_tensor(kind: str, weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The dense weight laid out as (input side..., output side) like the cores expect.

    Linear: W^T (in x out); Conv2d: (in, kh*kw, out); Embedding: (V, D), zero-padded to
    ``rows`` vocabulary rows.
    """
    w = weight.detach()
    if kind == "linear":
        return w.T
    if kind == "conv2d":
        c_out, c_in = w.shape[:2]
        return w.reshape(c_out, c_in, -1).permute(1, 2, 0)
    if rows is not None and rows > w.shape[0]:
        w = torch.cat([w, torch.zeros(rows - w.shape[0], w.shape[1], dtype=w.dtype)], dim=0)
    return w


def _init_cores(layer: TNLayer, tensor: torch.Tensor, generator: torch.Generator | None) -> None:
    cores = tn.decompose(tensor.reshape(layer.modes), layer.decomp, layer.ranks, generator)
    with torch.no_grad():
        for p, c in zip(layer.cores, cores):
            p.copy_(c)


def _resolve(modes: tuple[int, ...], decomp: str, rank) -> list[int]:
    return tn.resolve_ranks(rank, modes, decomp)


class TNLinear(TNLayer):
    """``y = x W^T + b`` with W^T (in x out) tensorized as (in modes..., out modes...)."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, in_modes: Sequence[int], out_modes: Sequence[int],
                 ranks: Sequence[int], decomp: str = "tr", bias: bool = True, gated: bool = True,
                 sigma: float = 0.5, dtype=None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.in_modes = _nontrivial(tn.check_modes(in_modes, in_features, "input size")) if in_features > 1 else ()
        self.out_modes = _nontrivial(tn.check_modes(out_modes, out_features, "output size")) if out_features > 1 else ()
        super().__init__(self.in_modes + self.out_modes, ranks, decomp, gated, sigma, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.cores[0].dtype)) if bias else None
        letters, bonds = tn.network_letters(len(self.modes))
        a = len(self.in_modes)
        cores = [bonds[k - 1] + letters[k] + bonds[k] for k in range(len(self.modes))]
        self._einsum = tn.Contraction(f"Z{''.join(letters[:a])}," + ",".join(cores) + f"->Z{''.join(letters[a:])}")

    @classmethod
    def from_dense(cls, module: nn.Linear, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None) -> "TNLinear":
        tn.check_decomp(decomp)
        out_f, in_f = module.weight.shape
        in_modes = _auto_modes(in_f, tensorization[0] if tensorization else None, "input size")
        out_modes = _auto_modes(out_f, tensorization[1] if tensorization else None, "output size")
        ranks = _resolve(in_modes + out_modes, decomp, rank)
        layer = cls(in_f, out_f, in_modes, out_modes, ranks, decomp, module.bias is not None, gated, sigma,
                    dtype=module.weight.dtype)
        _init_cores(layer, weight_tensor("linear", module.weight), generator)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape((-1,) + self.in_modes)
        cores = self.effective_cores()
        batch = xb.shape[0]
        hint = None
        if not isinstance(batch, int):
            hint = [(EXPORT_BATCH_HINT,) + self.in_modes] + [tuple(c.shape) for c in cores]
        y = self._einsum(xb, *cores, shape_hint=hint).reshape(lead + (self.out_features,))
        return y + self.bias if self.bias is not None else y

    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.cores[0].dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_tensor().reshape(self.in_features, self.out_features).T)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "decomp": self.decomp, "in_features": self.in_features,
                "out_features": self.out_features, "in_modes": list(self.in_modes),
                "out_modes": list(self.out_modes), "ranks": self.ranks, "bias": self.bias is not None,
                "sigma": self.sigma}

    @classmethod
    def _from_spec(cls, s: dict[str, Any]) -> "TNLinear":
        return cls(s["in_features"], s["out_features"], s["in_modes"], s["out_modes"], s["ranks"], s["decomp"],
                   s["bias"], gated=False, sigma=s.get("sigma", 0.5))


def conv_modes(in_modes: Sequence[int], k: int, out_modes: Sequence[int], merge_spatial: bool) -> tuple[int, ...]:
    """Core modes of a conv kernel: (in..., kh*kw, out...) or, merged, (in*kh*kw, out...).

    The merged layout with one input and one output mode is a plain low-rank matrix
    factorization of the (C_out, C_in*kh*kw) kernel (the "svd" baseline).
    """
    in_modes, out_modes = tuple(in_modes), tuple(out_modes)
    if merge_spatial:
        return _nontrivial((math.prod(in_modes) * k,) + out_modes)
    return _nontrivial(in_modes + (k,) + out_modes)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TNConv2d(TNLayer):
    """Conv2d whose kernel is a network over (in-channel modes, kh*kw, out-channel modes)."""

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, in_modes: Sequence[int],
                 out_modes: Sequence[int], ranks: Sequence[int], decomp: str = "tr", stride=1, padding=0,
                 dilation=1, bias: bool = True, gated: bool = True, sigma: float = 0.5, dtype=None,
                 merge_spatial: bool = False):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.merge_spatial = bool(merge_spatial)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.in_modes = _nontrivial(tn.check_modes(tuple(in_modes) or (1,), in_channels, "input channels"))
        self.out_modes = _nontrivial(tn.check_modes(tuple(out_modes) or (1,), out_channels, "output channels"))
        k = self.kernel_size[0] * self.kernel_size[1]
        modes = conv_modes(self.in_modes, k, self.out_modes, self.merge_spatial)
        super().__init__(modes, ranks, decomp, gated, sigma, dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=self.cores[0].dtype)) if bias else None

    @staticmethod
    def check_supported(module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ConfigError(f"Conv2d with groups={module.groups} is not supported (only groups=1)")
        if module.padding_mode != "zeros":
            raise ConfigError(f"Conv2d with padding_mode={module.padding_mode!r} is not supported (only 'zeros')")

    @classmethod
    def from_dense(cls, module: nn.Conv2d, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None,
                   merge_spatial: bool = False) -> "TNConv2d":
        tn.check_decomp(decomp)
        cls.check_supported(module)
        c_out, c_in, kh, kw = module.weight.shape
        in_modes = _auto_modes(c_in, tensorization[0] if tensorization else None, "input channels")
        out_modes = _auto_modes(c_out, tensorization[1] if tensorization else None, "output channels")
        modes = conv_modes(in_modes, kh * kw, out_modes, merge_spatial)
        ranks = _resolve(modes, decomp, rank)
        layer = cls(c_in, c_out, (kh, kw), in_modes, out_modes, ranks, decomp, module.stride, module.padding,
                    module.dilation, module.bias is not None, gated, sigma, dtype=module.weight.dtype,
                    merge_spatial=merge_spatial)
        _init_cores(layer, weight_tensor("conv2d", module.weight), generator)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    def kernel(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self.dense_tensor().reshape(self.in_channels, kh * kw, self.out_channels)
        return w.permute(2, 0, 1).reshape(self.out_channels, self.in_channels, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation)

    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels) + self.kernel_size

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, dtype=self.cores[0].dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "decomp": self.decomp, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "in_modes": list(self.in_modes), "out_modes": list(self.out_modes), "ranks": self.ranks,
                "stride": list(self.stride), "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "bias": self.bias is not None, "sigma": self.sigma, "merge_spatial": self.merge_spatial}

    @classmethod
    def _from_spec(cls, s: dict[str, Any]) -> "TNConv2d":
        return cls(s["in_channels"], s["out_channels"], s["kernel_size"], s["in_modes"], s["out_modes"], s["ranks"],
                   s["decomp"], s["stride"], s["padding"], s["dilation"], s["bias"], gated=False,
                   sigma=s.get("sigma", 0.5), merge_spatial=s.get("merge_spatial", False))


class TNEmbedding(TNLayer):
    """Embedding table V x D as a network over (vocab modes..., dim modes...).

    The vocabulary may be padded up to a rounder size (``prod(vocab_modes) >= V``) so that
    a vocabulary like 30522 still splits into small modes; padded rows are never looked up.
    """

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_modes: Sequence[int], dim_modes: Sequence[int],
                 ranks: Sequence[int], decomp: str = "tr", padding_idx: int | None = None, gated: bool = True,
                 sigma: float = 0.5, dtype=None):
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        vocab_modes = tuple(int(m) for m in vocab_modes)
        if not vocab_modes or any(m < 1 for m in vocab_modes) or math.prod(vocab_modes) < num_embeddings:
            raise TensorizationError(
                f"vocabulary tensorization {vocab_modes} must multiply to at least {num_embeddings}")
        self.vocab_modes = _nontrivial(vocab_modes)
        self.dim_modes = _nontrivial(tn.check_modes(dim_modes, embedding_dim, "embedding size"))
        self.padding_idx = padding_idx
        super().__init__(self.vocab_modes + self.dim_modes, ranks, decomp, gated, sigma, dtype)
        strides, acc = [], 1
        for m in reversed(self.vocab_modes):
            strides.append(acc)
            acc *= m
        self._strides = tuple(reversed(strides))

    @classmethod
    def from_dense(cls, module: nn.Embedding, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None) -> "TNEmbedding":
        tn.check_decomp(decomp)
        if module.max_norm is not None or module.sparse:
            raise ConfigError("Embedding with max_norm or sparse=True is not supported")
        v, d = module.weight.shape
        if tensorization is not None:
            vocab_modes = tuple(int(m) for m in tensorization[0])
            dim_modes = tn.check_modes(tensorization[1], d, "embedding size")
        else:
            vocab_modes, dim_modes = padded_factorization(v), tn.factorize(d)
        modes = _nontrivial(vocab_modes) + _nontrivial(dim_modes)
        ranks = _resolve(modes, decomp, rank)
        layer = cls(v, d, vocab_modes, dim_modes, ranks, decomp, module.padding_idx, gated, sigma,
                    dtype=module.weight.dtype)
        _init_cores(layer, weight_tensor("embedding", module.weight, math.prod(layer.vocab_modes)), generator)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cores = self.effective_cores()
        a = len(self.vocab_modes)
        flat = idx.reshape(-1)
        rows = None
        for k in range(a):
            digit = torch.div(flat, self._strides[k], rounding_mode="floor") % self.vocab_modes[k]
            piece = cores[k][:, digit, :].permute(1, 0, 2)  # (n, r_k, r_{k+1})
            rows = piece if rows is None else torch.bmm(rows, piece)
        if a == len(cores):  # no dimension cores: D == 1
            out = torch.diagonal(rows, dim1=1, dim2=2).sum(-1, keepdim=True)
        else:
            tail = tn.merge_cores(cores[a:])  # (r_a, D, r_0)
            if rows is None:  # vocabulary of size 1
                out = torch.diagonal(tail, dim1=0, dim2=2).sum(-1).expand(flat.shape[0], -1)
            else:
                out = torch.einsum("nab,bda->nd", rows, tail)
        if self.padding_idx is not None:
            out = out * (flat != self.padding_idx).unsqueeze(-1).to(out.dtype)
        return out.reshape(idx.shape + (self.embedding_dim,))

    def dense_shape(self) -> tuple[int, ...]:
        return (self.num_embeddings, self.embedding_dim)

    def to_dense(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           dtype=self.cores[0].dtype)
        with torch.no_grad():
            w = self.dense_tensor().reshape(-1, self.embedding_dim)[: self.num_embeddings]
            if self.padding_idx is not None:
                w[self.padding_idx] = 0
            emb.weight.copy_(w)
        return emb

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "decomp": self.decomp, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "vocab_modes": list(self.vocab_modes),
                "dim_modes": list(self.dim_modes), "ranks": self.ranks, "padding_idx": self.padding_idx,
                "sigma": self.sigma}

    @classmethod
    def _from_spec(cls, s: dict[str, Any]) -> "TNEmbedding":
        return cls(s["num_embeddings"], s["embedding_dim"], s["vocab_modes"], s["dim_modes"], s["ranks"], s["decomp"],
                   s["padding_idx"], gated=False, sigma=s.get("sigma", 0.5))


def padded_factorization(n: int, max_pad: float = 0.02) -> tuple[int, ...]:
    """Factorize ``n``, padding it by at most ``max_pad`` when it has a large prime factor."""
    try:
        return tn.factorize(n)
    except TensorizationError:
        for m in range(n + 1, int(n * (1 + max_pad)) + 2):
            try:
                return tn.factorize(m)
            except TensorizationError:
                continue
        raise


LAYER_KINDS: dict[str, type[TNLayer]] = {"linear": TNLinear, "conv2d": TNConv2d, "embedding": TNEmbedding}

#: Which factorized layer replaces which dense module (the dispatch table of the graph pass).
REPLACEMENTS: dict[type[nn.Module], type[TNLayer]] = {nn.Linear: TNLinear, nn.Conv2d: TNConv2d,
                                                       nn.Embedding: TNEmbedding}
