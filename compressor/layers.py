"""Factorized drop-in layers: TNLinear, TNConv2d, TNEmbedding (tensor train or ring).

Each layer keeps its weight as cores (``tensornet`` conventions), optionally with an
:class:`~compressor.gates.L0Gate` on every bond: the gates, their penalty and ``prune_``
(which removes closed slices and folds the gate values into the cores, after which the
layer is ungated and smaller but computes the same thing) are the same for every kind and
live in :class:`~compressor.gated_cores.GatedCores`, the layers' base. ``from_dense``
initialises the cores from a pretrained module (:func:`fitted_cores`); ``spec()`` /
``from_spec`` describe a layer in plain JSON so checkpoints rebuild it.

Every layer class declares itself (``class TNLinear(TNLayer, kind="linear", replaces=nn.Linear,
aten=...)``) and owns everything kind-specific: which dense modules it supports, how their
weight is tensorized, its core modes, its spec fields.  The graph pass, the rank
selectors and the CLI go through :func:`layer_class` / :func:`layer_class_for` /
:func:`aten_layers` and never name a kind themselves.

How each layer computes (chosen for speed on CPU):
* Linear: one einsum of the input with all cores, contraction order picked by opt_einsum
  for the batch size class (small batches never rebuild the weight, large ones may), run as
  plain matmuls (contraction.py). In evaluation without grad, the two matrices at the cut
  between input and output cores (or the dense weight, if smaller) are kept while the cores
  are unchanged (weight_cache.py): a served layer is two ``F.linear`` calls.
* Conv2d: rebuild the (small) kernel from the cores, then one ``F.conv2d``: a conv's
  cost is dominated by the image, and any factored conv with r^2 channels costs more. In
  evaluation without grad the kernel is kept while the cores are unchanged.
* Embedding: builds only the looked-up rows, never the V x D table.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import tensornet as tn
from .contraction import Contraction
from .conv_kernel import conv2d
from .errors import ConfigError, TensorizationError
from .gated_cores import GatedCores

#: Batch size assumed for contraction order while tracing with a symbolic batch.
EXPORT_BATCH_HINT = 256


def whitened_tensor(weight_t: torch.Tensor, whiten: torch.Tensor,
                    whiten_out: torch.Tensor | None = None) -> torch.Tensor:
    """``L^T W^T`` (float64) for a Linear's ``W^T`` (in x out) and its input factor ``L``
    (``G = L L^T``): the truncation error of this matrix is the layer's output error.

    A 1-D ``whiten`` is a diagonal factor: an embedding's, whose one-hot inputs have the
    diagonal Gram matrix of token counts. Its rows beyond ``len(whiten)`` (a vocabulary
    padded to rounder modes, zero rows never looked up) keep weight 1. ``whiten_out`` (a tied
    embedding's: the factor of its LM head's input Gram matrix, see calibration.py) weighs
    the output side as well: ``L^T W^T L_out``.
    """
    weight_t = weight_t.to(torch.float64)
    if whiten.dim() == 1:
        weighted = _padded(whiten, weight_t.shape[0])[:, None] * weight_t
    else:
        weighted = whiten.T @ weight_t
    return weighted if whiten_out is None else weighted @ whiten_out.to(torch.float64)


def unwhiten_input_core(core: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """``L^-T`` multiplied into an input core ``(r0, in, r1)`` fitted to a whitened weight, so
    the layer computes the original weight again up to the truncation."""
    if whiten.dim() == 1:
        return core / _padded(whiten, core.shape[1])[None, :, None].to(core.dtype)
    folded = torch.linalg.solve_triangular(whiten.T, core.permute(1, 0, 2).reshape(core.shape[1], -1), upper=True)
    return folded.reshape(core.shape[1], core.shape[0], core.shape[2]).permute(1, 0, 2)


def unwhiten_output_core(core: torch.Tensor, whiten_out: torch.Tensor) -> torch.Tensor:
    """``L_out^-1`` multiplied into an output core ``(r, out, r0)`` fitted to ``W^T L_out``."""
    r, n, r0 = core.shape
    flat = core.permute(0, 2, 1).reshape(r * r0, n)  # each bond pair's row over the output mode
    folded = torch.linalg.solve_triangular(whiten_out.to(flat.dtype), flat, upper=False, left=False)  # X L = C
    return folded.reshape(r, r0, n).permute(0, 2, 1)


def fitted_cores(tensor: torch.Tensor, modes: Sequence[int], decomp: str, ranks: Sequence[int], tz,
                 generator: torch.Generator | None, whiten: torch.Tensor | None = None,
                 whiten_out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Cores at ``ranks`` decomposed from a dense weight laid out as ``tensor`` (a kind's
    ``weight_tensor`` under tensorization ``tz``): a layer's start.

    With an input factor ``whiten`` (``L``, ``G = L L^T`` of the layer's inputs, see
    calibration.py) the cores are fitted to ``L^T W^T``, whose error is the output error,
    and ``L^-T`` is multiplied back into the input core: exact when the whole input is
    that one core (a ring or a train alike), so the layer computes ``W`` again up to the
    truncation. The fold leaves the input core tiny next to the next one (its entries
    shrink by the inputs' scale, about sqrt(tokens)), and a shared Adam step would then
    move it by a large share of itself: the slices of that bond are rebalanced.

    ``whiten_out`` (a tied embedding's head factor) weighs the output side too, and
    ``L_out^-1`` goes back into the output core, which must then hold the whole output.
    """
    if whiten is not None:
        if len(_nontrivial(tz[0])) != 1:
            raise ConfigError(f"a whitened start needs the whole input in one core, not modes {tuple(tz[0])}")
        if whiten_out is not None and len(_nontrivial(tz[1])) != 1:
            raise ConfigError(f"a start weighted by its head needs the whole output in one core, "
                              f"not modes {tuple(tz[1])}")
        tensor = whitened_tensor(tensor, whiten, whiten_out)
    cores = tn.decompose(tensor.reshape(modes), decomp, ranks, generator)
    if whiten is not None:
        cores[0] = unwhiten_input_core(cores[0], whiten)
        if whiten_out is not None:
            cores[-1] = unwhiten_output_core(cores[-1], whiten_out)
        cores[0], cores[1] = tn.balance_bond(cores[0], cores[1])
    return cores


def _padded(diagonal: torch.Tensor, rows: int) -> torch.Tensor:
    d = diagonal.to(torch.float64)
    return torch.cat([d, d.new_ones(rows - d.shape[0])]) if rows > d.shape[0] else d


def _nontrivial(modes: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(m) for m in modes if int(m) > 1)


def _pair_products(tensorization) -> tuple[int, ...]:
    """``i_k o_k`` of every (input mode, output mode) pair of a paired layout (checked to pair up)."""
    tn.check_pairs(tensorization[0], tensorization[1])
    return tuple(int(i) * int(o) for i, o in zip(tensorization[0], tensorization[1]))


def paired_cores(in_modes: Sequence[int], out_modes: Sequence[int], window: Sequence[int] = (),
                 merge_spatial: bool = False) -> tuple[tuple[int, ...], ...]:
    """What each core of a paired layout carries: ``(kh*kw,)`` for a conv's window core (first),
    then ``(input mode, output mode)`` per core; a merged window multiplies the first input mode.
    Pairs of two 1s get no core (like modes of 1)."""
    pairs = [(int(i), int(o)) for i, o in zip(in_modes, out_modes)]
    k = math.prod(window)
    if k > 1 and merge_spatial:
        pairs[0] = (pairs[0][0] * k, pairs[0][1])
    cores: list[tuple[int, ...]] = [(k,)] if k > 1 and not merge_spatial else []
    return tuple(cores + [p for p in pairs if p[0] * p[1] > 1])


def _side(modes: Sequence[int], dim: int, what: str, paired: bool) -> tuple[int, ...]:
    """A layer's checked modes of one side: without modes of 1, except in a paired layout, where
    each keeps its place beside its partner on the other side."""
    checked = tn.check_modes(tuple(modes) or (1,), dim, what)
    return checked if paired else _nontrivial(checked)


def _flat(values) -> tuple[int, ...]:
    """Spec/attribute values as one shape tuple (a conv's kernel_size is itself a pair)."""
    out: list[int] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(int(x) for x in v)
        else:
            out.append(int(v))
    return tuple(out)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------ registry
# Filled by ``TNLayer.__init_subclass__`` (the registry pattern of tensorly-torch's
# ``FactorizedTensor``): adding a layer kind is writing its class, nothing else.
_BY_KIND: dict[str, type["TNLayer"]] = {}
_BY_DENSE: dict[type[nn.Module], type["TNLayer"]] = {}
#: Dense types named by import path (``transformers.pytorch_utils.Conv1D``): the package
#: imports without the library that defines them.
_BY_DENSE_PATH: dict[str, type["TNLayer"]] = {}
_BY_ATEN: dict[Any, type["TNLayer"]] = {}


def _type_path(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _registered_base(module: nn.Module) -> tuple[type[nn.Module], type["TNLayer"]] | None:
    """(the registered dense type ``module`` is or derives from, the class replacing it)."""
    for t in type(module).__mro__:
        cls = _BY_DENSE.get(t) or _BY_DENSE_PATH.get(_type_path(t))
        if cls is not None:
            return t, cls
    return None


def layer_class(kind: Any) -> type["TNLayer"]:
    """The factorized layer class registered as ``kind`` (a plan's or a spec's ``kind``)."""
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(f"unknown factorized layer kind {kind!r} (known: {', '.join(sorted(_BY_KIND))})")
    return cls


def layer_class_for(module: nn.Module) -> type["TNLayer"] | None:
    """The class replacing ``module``: its type's or the nearest registered base's (a subclass of
    nn.Linear included; :meth:`TNLayer.support_reason` says whether it can really be replaced)."""
    found = _registered_base(module)
    return found[1] if found is not None else None


def aten_layers() -> Mapping[Any, type["TNLayer"]]:
    """aten op -> layer class: which calls of a torch.export graph can be factorized."""
    return MappingProxyType(_BY_ATEN)


def layer_kinds() -> tuple[str, ...]:
    """Every registered kind, in definition order (for messages and tests)."""
    return tuple(_BY_KIND)


# ------------------------------------------------------------------ what a kind says about its dense module
class DenseRules:
    """What a layer kind says about the dense module it would replace: whether it can, how the
    weight reads as a tensor, which cores that makes, how a graph's aten call becomes a module.

    The planner, the selectors and the graph pass ask these before any factorized layer
    exists, so they are class methods and touch no cores; each kind overrides the ones its
    dense layer needs (:class:`TNLayer` inherits them, next to its kind's class attributes).
    """

    #: Declared with the kind's other class attributes on :class:`TNLayer`.
    aten_arg_names: ClassVar[tuple[str, ...]]
    _side_names: ClassVar[tuple[str, str]]

    @classmethod
    def support_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be replaced (None: it can): a subclass whose ``forward`` is its
        own computes something else; then the kind's own limits (:meth:`unsupported_reason`)."""
        found = _registered_base(module)
        if found is not None and type(module).forward is not found[0].forward:
            return f"subclass {type(module).__name__} of {found[0].__name__} overrides forward"
        return cls.unsupported_reason(cls.dense_view(module))

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be factorized by this class (None: it can)."""
        return None

    @classmethod
    def saved_extra(cls, module: nn.Module) -> int:
        """Elements the factorized layer saves beyond its cores and bias (see :meth:`TNLayer.buffer_count`),
        from the dense ``module`` it would replace: a plan must count them to meet a target."""
        return 0

    @classmethod
    def dense_view(cls, module: nn.Module) -> nn.Module:
        """``module`` as the dense layer this class reads (``.weight`` in its layout); itself by default."""
        return module

    @classmethod
    def tensorization(cls, shape: tuple[int, ...], override: Any = None,
                      paired: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input modes, output modes) of a dense weight of ``shape``: the checked override or a balanced
        split; ``paired``: as many input modes as output modes (:func:`~compressor.tensornet.paired_factorization`)."""
        (a, b), (d_in, d_out) = cls._side_names, (shape[1], shape[0])
        if override:
            tz = tn.check_modes(override[0], d_in, a), tn.check_modes(override[1], d_out, b)
        else:
            tz = tn.paired_factorization(d_in, d_out) if paired else (tn.factorize(d_in), tn.factorize(d_out))
        if paired:
            tn.check_pairs(*tz, what=f"a {shape} weight")
        return tz

    @classmethod
    def window(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Modes between the input and the output side of the weight tensor (a conv's kernel window)."""
        return ()

    @classmethod
    def matrix_layout(cls, shape: tuple[int, ...]) -> tuple[tuple[tuple[int], tuple[int]], bool]:
        """(tensorization, merge_spatial) that makes the layer a plain two-factor matrix
        factorization (the ``svd`` baseline): one input mode, one output mode."""
        return ((shape[1],), (shape[0],)), False

    @classmethod
    def core_modes(cls, shape: tuple[int, ...], tensorization, merge_spatial: bool = False,
                   paired: bool = False) -> tuple[int, ...]:
        """Mode of every core (modes of size 1 carry nothing and get no core): the input modes, then
        the output modes; ``paired`` (an mpo layout), core k carries input k and output k, ``i_k o_k``."""
        if paired:
            return _nontrivial(_pair_products(tensorization))
        return _nontrivial(tensorization[0]) + _nontrivial(tensorization[1])

    @classmethod
    def layout_tensor(cls, weight: torch.Tensor, tensorization, paired: bool = False) -> torch.Tensor:
        """The dense weight with its elements in the cores' order: :meth:`weight_tensor`, or for a
        paired layout that tensor's modes interleaved (window first, then (input k, output k)), flat.
        Reshaped to the core modes it is what TT-SVD splits."""
        t = cls.weight_tensor(weight, tensorization)
        if not paired:
            return t
        return tn.interleave(t, tensorization[0], cls.window(tuple(weight.shape)), tensorization[1])

    @classmethod
    def weight_tensor(cls, weight: torch.Tensor, tensorization=None) -> torch.Tensor:
        """The dense weight laid out as (input side..., output side), reshapeable to the core modes."""
        raise NotImplementedError

    @classmethod
    def aten_args(cls, node) -> dict[str, Any]:
        """The aten call's arguments by name."""
        out = dict(zip(cls.aten_arg_names, node.args))
        out.update(node.kwargs)
        return out

    @classmethod
    def standin(cls, weight: torch.Tensor, bias: torch.Tensor | None, args: dict[str, Any]) -> nn.Module:
        """A real dense module sharing an aten call's tensors, so ``from_dense`` and the checks apply to graphs."""
        m = cls._meta_module(tuple(weight.shape), bias is not None, args)
        m.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return m

    @classmethod
    def _meta_module(cls, shape: tuple[int, ...], bias: bool, args: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def _prepare(cls, module: nn.Module, decomp: str, rank, tensorization, merge_spatial: bool = False,
                 paired: bool = False):
        """The checks every ``from_dense`` starts with; returns (tensorization, bond ranks)."""
        tn.check_decomp(decomp)
        reason = cls.unsupported_reason(module)
        if reason is not None:
            raise ConfigError(reason)
        shape = tuple(module.weight.shape)
        tz = cls.tensorization(shape, tensorization, paired)
        return tz, tn.resolve_ranks(rank, cls.core_modes(shape, tz, merge_spatial, paired), decomp)


# ------------------------------------------------------------------ the layer
class TNLayer(DenseRules, GatedCores):
    """A factorized layer: gated cores (:class:`~compressor.gated_cores.GatedCores`) standing for
    a dense layer's weight, registered as a kind.

    What is shared by every kind lives here: the kind registry, the counts a plan and the
    target controller compare (with the bias and saved buffers), rebuilding the dense
    weight, the spec a checkpoint records, and fitting the cores to a dense weight. The
    gates are :class:`GatedCores`'; the questions asked of a dense module before a layer
    exists are :class:`DenseRules`'.

    A subclass registers itself with ``class X(TNLayer, kind=..., replaces=DenseType,
    aten=torch.ops.aten.op.default)``; one without ``kind`` (a helper or a user's
    variant) inherits its parent's kind and registers nothing. Its constructor builds its
    own fields, then ``super().__init__(modes, ranks, decomp, gated, sigma, dtype)``.
    """

    kind: ClassVar[str] = "base"
    replaces: ClassVar[type[nn.Module] | None] = None
    #: Import path of the dense type when it lives in an optional library (set instead of ``replaces``).
    replaces_path: ClassVar[str | None] = None
    aten: ClassVar[Any] = None
    #: Positional argument names of the aten call, and the one that carries the layer's input.
    aten_arg_names: ClassVar[tuple[str, ...]] = ()
    aten_input: ClassVar[str] = "input"
    #: Attributes giving the dense weight's shape, in order (flattened).
    shape_fields: ClassVar[tuple[str, ...]] = ()
    #: Spec keys holding the (input side, output side) modes.
    mode_fields: ClassVar[tuple[str, str]] = ("in_modes", "out_modes")
    #: How tensorization errors name the (input, output) dimensions.
    _side_names: ClassVar[tuple[str, str]] = ("input size", "output size")
    #: Spec keys in the order they are written; each is also a constructor argument.
    spec_fields: ClassVar[tuple[str, ...]] = ()
    #: Spec keys older checkpoints may lack: the constructor's default applies.
    spec_optional: ClassVar[tuple[str, ...]] = ("sigma",)
    #: What a calibration pass observes of the layer's input: "inputs" (a (..., in_features)
    #: matrix, whose Gram matrix whitens the start), "counts" (token ids, counted: a diagonal
    #: Gram matrix) or None (not observed: the start is fitted to the weight).
    calibration: ClassVar[str | None] = None
    #: Whether the layer is a lookup table: the one that owns a weight it shares with a head
    #: (a tied head contracts its cores), and what svd-llm leaves dense.
    lookup: ClassVar[bool] = False
    #: Whether core k carries input mode k and output mode k (an mpo layout, ``tensorization="mpo"``)
    #: rather than the input modes' cores first and the output modes' after; set by the constructor.
    paired: bool = False

    def __init_subclass__(cls, kind: str | None = None, replaces: type[nn.Module] | None = None,
                          aten: Any = None, replaces_path: str | None = None, **kwargs):
        """Register the class, refusing a kind, dense type or op another class already claims."""
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        entries = [(_BY_KIND, kind, "kind"), (_BY_DENSE, replaces, "dense type"), (_BY_ATEN, aten, "aten op"),
                   (_BY_DENSE_PATH, replaces_path, "dense type")]
        for table, key, what in entries:
            if key is not None and key in table:
                raise ConfigError(f"{cls.__name__}: {what} {key!r} is already registered by {table[key].__name__}")
        cls.kind, cls.replaces, cls.aten, cls.replaces_path = kind, replaces, aten, replaces_path
        for table, key, _ in entries:
            if key is not None:
                table[key] = cls

    # ----------------------------------------------------------------- sizes
    def param_count(self) -> int:
        """Parameters of the layer as it stands (cores + bias; gates are training-only)."""
        bias = getattr(self, "bias", None)
        return tn.param_count(self.modes, self.ranks) + (bias.numel() if bias is not None else 0)

    def dense_param_count(self) -> int:
        """Parameters of the dense layer this one stands for (weight + bias)."""
        bias = getattr(self, "bias", None)
        return math.prod(self.dense_shape()) + (bias.numel() if bias is not None else 0)

    def dense_shape(self) -> tuple[int, ...]:
        return _flat(getattr(self, f) for f in self.shape_fields)

    def live_param_count(self) -> int:
        """What :meth:`param_count` will be after ``prune_()``."""
        bias = getattr(self, "bias", None)
        return tn.param_count(self.modes, self.open_ranks()) + (bias.numel() if bias is not None else 0)

    def buffer_count(self) -> int:
        """Elements of the layer's saved buffers (an embedding's padding row), beyond its parameters."""
        return sum(b.numel() for name, b in self.named_buffers(recurse=False)
                   if name not in self._non_persistent_buffers_set)

    # ----------------------------------------------------------------- memory
    def lay_out_for_serving_(self) -> "TNLayer":
        """Give each core the memory order in which the ``F.linear`` weights this layer serves
        from (:func:`serving_matrices`, kept by the weight cache) are views of it, not copies
        beside it; the values do not change. A kind without such weights keeps its cores."""
        return self

    @torch.no_grad()
    def _relay_cores(self, orders: Sequence[tuple[int, ...] | None]) -> None:
        for core, order in zip(self.core_list(), orders):
            if order is not None:
                core.data = laid_out(core.detach(), order)
        self.drop_weight_cache()

    # ----------------------------------------------------------------- the dense weight
    def dense_tensor(self, cores: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The weight tensor of ``cores`` (default: the layer's own, gates folded in) with its
        elements laid out as (input side, window, output side): a paired layout's cores read
        interleaved modes, put back in that order (flat) here, so every kind rebuilds its weight
        from it the same way whatever the layout."""
        t = tn.contract(self.effective_cores() if cores is None else cores)
        if not self.paired:
            return t
        in_field, out_field = self.mode_fields
        return tn.deinterleave(t, getattr(self, in_field), self.window(self.dense_shape()), getattr(self, out_field))

    def pairs(self) -> tuple[tuple[int, ...], ...]:
        """What each core carries, for a reader: ``(input mode, output mode)`` per core of a paired
        layout (the conv window's core as ``(kh*kw,)``, merged into the first pair's input when
        ``merge_spatial``); ``(mode,)`` per core of the others."""
        if not self.paired:
            return tuple((m,) for m in self.modes)
        in_field, out_field = self.mode_fields
        return paired_cores(getattr(self, in_field), getattr(self, out_field), self.window(self.dense_shape()),
                            bool(getattr(self, "merge_spatial", False)))

    def dense_weight(self) -> torch.Tensor:
        """The weight the dense layer would hold, rebuilt from the cores (differentiable)."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """:meth:`dense_weight`, for code that reads ``layer.weight`` itself (the fast path of
        ``nn.TransformerEncoderLayer``, a dtype check): it works, at the cost of a rebuild."""
        return self.dense_weight()

    def load_dense_(self, module: nn.Module, tz, generator: torch.Generator | None,
                    whiten: torch.Tensor | None = None, whiten_out: torch.Tensor | None = None) -> "TNLayer":
        """Cores decomposed from the dense weight at the layer's present ranks (:func:`fitted_cores`,
        weighted by the inputs when ``whiten`` is given); the bias copied as is. What
        ``from_dense`` starts with, and what ``--refit`` does again at the freeze."""
        if self.paired and whiten is not None:
            raise ConfigError("a whitened start needs the whole input in one core; an mpo layout spreads it over "
                              "every core (use init 'weights')")
        tensor = self.layout_tensor(module.weight, tz, self.paired)
        cores = fitted_cores(tensor, self.modes, self.decomp, self.ranks, tz, generator, whiten, whiten_out)
        with torch.no_grad():
            for p, c in zip(self.cores, cores):
                p.copy_(c)
            if getattr(module, "bias", None) is not None:
                self.bias.copy_(module.bias)
        return self

    # ----------------------------------------------------------------- description
    def spec(self) -> dict[str, Any]:
        """JSON-able description sufficient to rebuild this layer's structure."""
        spec = {"kind": self.kind, **{f: _jsonable(self._spec_value(f)) for f in self.spec_fields}}
        if not spec.get("paired", True):
            del spec["paired"]  # the input-then-output layout is what a spec without the key means
        return spec

    def _spec_value(self, name: str) -> Any:
        """A spec field's value; the bias is recorded as present/absent (its values are in the state dict)."""
        return self.bias is not None if name == "bias" else getattr(self, name)

    @classmethod
    def _spec_class(cls, spec: dict[str, Any]) -> type["TNLayer"]:
        klass = layer_class(spec.get("kind"))
        if not issubclass(klass, cls):
            raise ConfigError(f"a {spec.get('kind')!r} spec does not describe a {cls.__name__}")
        return klass

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TNLayer":
        """The (ungated) layer ``spec`` describes; ``TNLayer.from_spec`` picks the class by kind."""
        klass = cls._spec_class(spec)
        missing = [f for f in klass.spec_fields if f not in spec and f not in klass.spec_optional]
        if missing:
            raise ConfigError(f"{klass.kind} layer spec lacks {', '.join(missing)}")
        return klass(**{f: spec[f] for f in klass.spec_fields if f in spec}, gated=False)

    @classmethod
    def spec_size(cls, spec: dict[str, Any]) -> tuple[tuple[int, ...], int]:
        """(core modes, parameters incl. bias) of a spec, without building the layer (inspect, planning)."""
        klass = cls._spec_class(spec)
        shape = _flat(spec[f] for f in klass.shape_fields)
        tz = (tuple(spec[klass.mode_fields[0]]), tuple(spec[klass.mode_fields[1]]))
        modes = klass.core_modes(shape, tz, bool(spec.get("merge_spatial", False)), bool(spec.get("paired", False)))
        bias = shape[0] if spec.get("bias") else 0
        return modes, tn.param_count(modes, spec["ranks"]) + bias


class TNLinear(TNLayer, kind="linear", replaces=nn.Linear, aten=torch.ops.aten.linear.default):
    """``y = x W^T + b`` with W^T (in x out) tensorized as (in modes..., out modes...)."""

    aten_arg_names = ("input", "weight", "bias")
    shape_fields = ("out_features", "in_features")
    spec_fields = ("decomp", "in_features", "out_features", "in_modes", "out_modes", "ranks", "bias", "sigma",
                   "paired")
    spec_optional = ("sigma", "paired")
    calibration = "inputs"

    def __init__(self, in_features: int, out_features: int, in_modes: Sequence[int], out_modes: Sequence[int],
                 ranks: Sequence[int], decomp: str = "tr", bias: bool = True, gated: bool = True,
                 sigma: float = 0.5, dtype=None, paired: bool = False):
        self.in_features, self.out_features, self.paired = int(in_features), int(out_features), bool(paired)
        self.in_modes = _side(in_modes, in_features, "input size", paired) if in_features > 1 or paired else ()
        self.out_modes = _side(out_modes, out_features, "output size", paired) if out_features > 1 or paired else ()
        super().__init__(self.core_modes(self.dense_shape(), (self.in_modes, self.out_modes), paired=self.paired),
                         ranks, decomp, gated, sigma, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.cores[0].dtype)) if bias else None
        if self.paired:
            self._pairs = tuple((i, o) for i, o in zip(self.in_modes, self.out_modes) if i * o > 1)
            self._einsum = paired_contraction(len(self._pairs))
        else:
            self._einsum = linear_contraction(len(self.in_modes), len(self.out_modes))

    @classmethod
    def from_dense(cls, module: nn.Linear, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None,
                   whiten: torch.Tensor | None = None, paired: bool = False) -> "TNLinear":
        """``whiten``: the input factor of a data-aware start (see :meth:`TNLayer.load_dense_`);
        ``paired``: an mpo layout (core k carries input mode k and output mode k)."""
        tz, ranks = cls._prepare(module, decomp, rank, tensorization, paired=paired)
        out_f, in_f = module.weight.shape
        layer = cls(in_f, out_f, tz[0], tz[1], ranks, decomp, module.bias is not None, gated, sigma,
                    dtype=module.weight.dtype, paired=paired)
        return layer.load_dense_(module, tz, generator, whiten)

    @classmethod
    def weight_tensor(cls, weight: torch.Tensor, tensorization=None) -> torch.Tensor:
        """W^T (in x out): the input modes come first in the cores."""
        return weight.detach().T

    @classmethod
    def _meta_module(cls, shape: tuple[int, ...], bias: bool, args: dict[str, Any]) -> nn.Module:
        return nn.Linear(shape[1], shape[0], bias=bias, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mats = self.frozen("matrices", x, self.serving_matrices)
        if mats is not None:
            return linear_through(x, mats, self.bias)
        y = self.contract_input(x, self.forward_cores())
        return y + self.bias if self.bias is not None else y

    def serving_matrices(self) -> tuple[torch.Tensor, ...]:
        """The layer as ``F.linear`` weights, what a call in evaluation without grad reads (see
        :func:`serving_matrices`). A paired layout has no cut between its inputs and its outputs
        (every core holds both), so it serves its dense weight."""
        if self.paired:
            return (self.dense_weight().contiguous(),)
        return serving_matrices(self.effective_cores(), len(self.in_modes), self.in_features, self.out_features)

    def lay_out_for_serving_(self) -> "TNLinear":
        if not self.paired:
            shapes = [tuple(c.shape) for c in self.cores]
            self._relay_cores(view_orders(shapes, len(self.in_modes), self.in_features, self.out_features))
        return self

    def contract_input(self, x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x W^T`` with W given by ``cores`` (no bias); a paired layout's cores are read as
        ``(r, i_k, o_k, r')`` (a view), each taking its input mode and giving its output mode."""
        if self.paired:
            cores = [c.reshape(c.shape[0], i, o, c.shape[2]) for c, (i, o) in zip(cores, self._pairs)]
            return apply_linear(self._einsum, x, cores, tuple(i for i, _ in self._pairs), self.out_features)
        return apply_linear(self._einsum, x, cores, self.in_modes, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.dense_tensor().reshape(self.in_features, self.out_features).T

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.cores[0].dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def linear_contraction(n_in: int, n_out: int) -> Contraction:
    """``x (Z, in modes...) . ring of cores -> (Z, out modes...)``: the input modes' cores come first."""
    letters, bonds = tn.network_letters(n_in + n_out)
    cores = [bonds[k - 1] + letters[k] + bonds[k] for k in range(n_in + n_out)]
    return Contraction(f"Z{''.join(letters[:n_in])}," + ",".join(cores) + f"->Z{''.join(letters[n_in:])}", batch="Z")


def paired_contraction(n_cores: int) -> Contraction:
    """``x (Z, in modes...) . cores (r, i_k, o_k, r') -> (Z, out modes...)``: a matrix product operator."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXY"  # Z is the batch
    if 3 * n_cores > len(letters):
        raise TensorizationError(f"{n_cores} paired cores is more than the einsum alphabet allows")
    ins, outs, bonds = letters[:n_cores], letters[n_cores:2 * n_cores], letters[2 * n_cores:3 * n_cores]
    cores = [bonds[k - 1] + ins[k] + outs[k] + bonds[k] for k in range(n_cores)]
    return Contraction(f"Z{ins}," + ",".join(cores) + f"->Z{outs}", batch="Z")


def serving_matrices(cores: Sequence[torch.Tensor], split: int, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """``F.linear`` weights computing ``x W`` for the (rows x cols) matrix ``W`` of ``cores`` whose
    first ``split`` hold the input side: the two matrices at that cut, ``(r, rows)`` and
    ``(cols, r)`` with ``r = r_0 r_split``, or the dense ``(cols, rows)`` weight when those two
    hold more. Per token this reads the fewest numbers any two-matrix form can, and at batch 1
    it is two calls where the cores are one per core; a served layer keeps it beside its cores
    (at most the dense weight's size: weight_cache.py). Each is laid out by :func:`gemv_layout`."""
    if 0 < split < len(cores):
        u, v = tn.halves(cores, split)
        if u.numel() + v.numel() < rows * cols:
            return gemv_layout(u[:rows].T), gemv_layout(v[:, :cols].T)
    return (gemv_layout(tn.contract(cores).reshape(rows, -1)[:, :cols].T),)


def view_orders(shapes: Sequence[tuple[int, int, int]], split: int, rows: int,
                cols: int) -> list[tuple[int, int, int] | None]:
    """For each core of ``shapes`` (cut as :func:`serving_matrices` cuts them), the order of its
    three axes in memory (outermost first) that makes its served matrix a view of it, or None.

    A side of the cut held by one core ``(r_a, n, r_b)`` is served as an ``(r, n)`` matrix with
    ``r = r_a r_b``, laid out along ``n`` by :func:`gemv_layout` (two matrices are served only when
    ``r (rows + cols) < rows cols``, so ``r`` is below both sizes): the input side's core stored as
    ``(r_a, r_b, n)``, the output side's as ``(r_b, r_a, n)``, is that matrix. A side of several
    cores is their product (new memory anyway), a sliced side (a padded vocabulary) is copied by
    the slice, and a layer served dense gains nothing: those keep their layout."""
    orders: list[tuple[int, int, int] | None] = [None] * len(shapes)
    if not 0 < split < len(shapes):
        return orders
    inner = shapes[0][0] * shapes[split][0]
    sides = math.prod(n for _, n, _ in shapes[:split]) + math.prod(n for _, n, _ in shapes[split:])
    if inner * sides >= rows * cols:  # served as its dense weight
        return orders
    if split == 1 and shapes[0][1] == rows:
        orders[0] = (0, 2, 1)
    if len(shapes) - split == 1 and shapes[-1][1] == cols:
        orders[-1] = (2, 0, 1)
    return orders


def laid_out(core: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """``core``'s values in new memory whose axes run in ``order`` (outermost first), same shape."""
    buffer = torch.empty([core.shape[d] for d in order], dtype=core.dtype, device=core.device)
    view = buffer.permute([list(order).index(d) for d in range(core.dim())])
    return view.copy_(core)


def gemv_layout(weight: torch.Tensor) -> torch.Tensor:
    """An ``F.linear`` weight (out x in) whose memory runs along its longer side: contiguous when
    ``out <= in``, else the transposed view of a contiguous (in x out) matrix. BLAS reads the
    strides, so the math is the same; but a matrix-vector product over short rows (a rank of
    100-300 against an output of 576-49152: the second factor of every served layer, the tied
    head's ``V x r`` table) is a long column of short dot products, measured 1.1-2.3x slower at
    batch 1 on a CPU than the same product streamed along the long side. At larger batches
    (a GEMM) BLAS packs either layout and the two run alike."""
    out_f, in_f = weight.shape
    return weight.T.contiguous().T if out_f > in_f else weight.contiguous()


def linear_through(x: torch.Tensor, mats: Sequence[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` through the ``F.linear`` weights of :func:`serving_matrices`, then ``bias``."""
    if len(mats) == 1:
        return F.linear(x, mats[0], bias)
    return F.linear(F.linear(x, mats[0]), mats[1], bias)


def apply_linear(einsum: Contraction, x: torch.Tensor, cores: Sequence[torch.Tensor], in_modes: tuple[int, ...],
                 out_size: int) -> torch.Tensor:
    """``x`` (..., prod in_modes) through the network of ``cores`` (input modes first) -> (..., out_size)."""
    lead = x.shape[:-1]
    xb = x.reshape((-1,) + in_modes)
    hint = None
    if not isinstance(xb.shape[0], int):  # a symbolic batch while exporting
        hint = [(EXPORT_BATCH_HINT,) + in_modes] + [tuple(c.shape) for c in cores]
    return einsum(xb, *cores, shape_hint=hint).reshape(lead + (out_size,))


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TNConv2d(TNLayer, kind="conv2d", replaces=nn.Conv2d, aten=torch.ops.aten.conv2d.default):
    """Conv2d whose kernel is a network over (in-channel modes, kh*kw, out-channel modes)."""

    aten_arg_names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    shape_fields = ("out_channels", "in_channels", "kernel_size")
    spec_fields = ("decomp", "in_channels", "out_channels", "kernel_size", "in_modes", "out_modes", "ranks", "stride",
                   "dilation", "padding", "bias", "sigma", "merge_spatial", "paired")
    spec_optional = ("sigma", "merge_spatial", "paired")
    _side_names = ("input channels", "output channels")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, in_modes: Sequence[int],
                 out_modes: Sequence[int], ranks: Sequence[int], decomp: str = "tr", stride=1, padding=0,
                 dilation=1, bias: bool = True, gated: bool = True, sigma: float = 0.5, dtype=None,
                 merge_spatial: bool = False, paired: bool = False):
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.merge_spatial, self.paired = bool(merge_spatial), bool(paired)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.in_modes = _side(in_modes, in_channels, "input channels", self.paired)
        self.out_modes = _side(out_modes, out_channels, "output channels", self.paired)
        modes = self.core_modes(self.dense_shape(), (self.in_modes, self.out_modes), self.merge_spatial, self.paired)
        super().__init__(modes, ranks, decomp, gated, sigma, dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=self.cores[0].dtype)) if bias else None

    @classmethod
    def unsupported_reason(cls, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported"
        return None

    @classmethod
    def matrix_layout(cls, shape: tuple[int, ...]) -> tuple[tuple[tuple[int], tuple[int]], bool]:
        """The (C_in*kh*kw) x C_out kernel matrix: a kh x kw conv to r channels, then a 1 x 1 conv."""
        return ((shape[1],), (shape[0],)), True

    @classmethod
    def window(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The kernel window, ``kh*kw``: the middle of the weight tensor (C_in, kh*kw, C_out)."""
        return (math.prod(shape[2:]),)

    @classmethod
    def core_modes(cls, shape: tuple[int, ...], tensorization, merge_spatial: bool = False,
                   paired: bool = False) -> tuple[int, ...]:
        """(in..., kh*kw, out...) or, merged, (in*kh*kw, out...).

        The merged layout with one input and one output mode is a plain low-rank matrix
        factorization of the (C_out, C_in*kh*kw) kernel (the "svd" baseline).

        Paired (an mpo layout): (kh*kw, i_1 o_1, i_2 o_2, ...), the window a core of its own
        ahead of the pairs, as in the TT convolutions of Garipov et al. (2016): it pairs with no
        output mode, and kept apart it is a bond the gates can narrow on its own (a merged
        window, (kh*kw i_1 o_1, i_2 o_2, ...), would make the first core 25 times wider for a
        5 x 5 kernel). Merged, it joins the first pair.
        """
        in_modes, out_modes, k = tuple(tensorization[0]), tuple(tensorization[1]), math.prod(shape[2:])
        if paired:
            pairs = _pair_products(tensorization)
            if merge_spatial:
                return _nontrivial((pairs[0] * k,) + pairs[1:])
            return _nontrivial((k,) + pairs)
        if merge_spatial:
            return _nontrivial((math.prod(in_modes) * k,) + out_modes)
        return _nontrivial(in_modes + (k,) + out_modes)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None,
                   merge_spatial: bool = False, paired: bool = False) -> "TNConv2d":
        tz, ranks = cls._prepare(module, decomp, rank, tensorization, merge_spatial, paired)
        c_out, c_in, kh, kw = module.weight.shape
        layer = cls(c_in, c_out, (kh, kw), tz[0], tz[1], ranks, decomp, module.stride, module.padding,
                    module.dilation, module.bias is not None, gated, sigma, dtype=module.weight.dtype,
                    merge_spatial=merge_spatial, paired=paired)
        return layer.load_dense_(module, tz, generator)

    @classmethod
    def weight_tensor(cls, weight: torch.Tensor, tensorization=None) -> torch.Tensor:
        """(C_in, kh*kw, C_out): input channels, then the kernel window, then output channels."""
        w = weight.detach()
        c_out, c_in = w.shape[:2]
        return w.reshape(c_out, c_in, -1).permute(1, 2, 0)

    @classmethod
    def _meta_module(cls, shape: tuple[int, ...], bias: bool, args: dict[str, Any]) -> nn.Module:
        groups = int(args.get("groups", 1))  # a grouped kernel holds C_in / groups input channels
        return nn.Conv2d(shape[1] * groups, shape[0], tuple(shape[2:]), stride=args.get("stride", 1),
                         padding=args.get("padding", 0), dilation=args.get("dilation", 1),
                         groups=groups, bias=bias, device="meta")

    def dense_weight(self) -> torch.Tensor:
        return self.kernel()

    def _served_kernel(self) -> torch.Tensor:
        return self.kernel().contiguous()  # the rebuilt kernel is a strided view; conv2d reads a dense one faster

    def kernel(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self.dense_tensor().reshape(self.in_channels, kh * kw, self.out_channels)
        return w.permute(2, 0, 1).reshape(self.out_channels, self.in_channels, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel is rebuilt every call, except in evaluation without grad, where it is kept
        while the cores are unchanged (weight_cache.py): a conv then costs what the dense one does, and
        a small call runs on torch's direct kernel rather than oneDNN (``conv_kernel``)."""
        kernel = self.frozen("kernel", x, self._served_kernel)
        if kernel is None:
            return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation)
        return conv2d(x, kernel, self.bias, self.stride, self.padding, self.dilation)

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, dtype=self.cores[0].dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class TNEmbedding(TNLayer, kind="embedding", replaces=nn.Embedding, aten=torch.ops.aten.embedding.default):
    """Embedding table V x D as a network over (vocab modes..., dim modes...).

    The vocabulary may be padded up to a rounder size (``prod(vocab_modes) >= V``) so that
    a vocabulary like 30522 still splits into small modes; padded rows are never looked up.
    """

    aten_arg_names = ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse")
    aten_input = "indices"
    shape_fields = ("num_embeddings", "embedding_dim")
    mode_fields = ("vocab_modes", "dim_modes")
    spec_fields = ("decomp", "num_embeddings", "embedding_dim", "vocab_modes", "dim_modes", "ranks", "padding_idx",
                   "sigma", "paired")
    spec_optional = ("sigma", "paired")
    calibration = "counts"
    lookup = True

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_modes: Sequence[int], dim_modes: Sequence[int],
                 ranks: Sequence[int], decomp: str = "tr", padding_idx: int | None = None, gated: bool = True,
                 sigma: float = 0.5, dtype=None, paired: bool = False):
        self.num_embeddings, self.embedding_dim, self.paired = int(num_embeddings), int(embedding_dim), bool(paired)
        vocab = _check_vocab(vocab_modes, num_embeddings)
        self.vocab_modes = vocab if self.paired else _nontrivial(vocab)
        self.dim_modes = _side(dim_modes, embedding_dim, "embedding size", self.paired)
        self.padding_idx = padding_idx
        super().__init__(self.core_modes(self.dense_shape(), (self.vocab_modes, self.dim_modes), paired=self.paired),
                         ranks, decomp, gated, sigma, dtype)
        dtype = self.cores[0].dtype
        # nn.Embedding returns the padding row as stored and never trains it: keep it exactly.
        self.register_buffer("padding_row", torch.zeros(embedding_dim, dtype=dtype) if padding_idx is not None else None)
        # A (V, 1) lookup table whose only job is to raise IndexError on an index outside
        # [0, V) exactly as nn.Embedding does (mode digits would silently wrap around).
        self.register_buffer("_bounds", torch.zeros(num_embeddings, 1, dtype=dtype), persistent=False)
        strides, acc = [], 1
        for m in reversed(self.vocab_modes):
            strides.append(acc)
            acc *= m
        self._strides = tuple(reversed(strides))

    @classmethod
    def unsupported_reason(cls, module: nn.Embedding) -> str | None:
        if module.max_norm is not None or module.sparse:
            return "embedding with max_norm or sparse gradients is not supported"
        return None

    @classmethod
    def saved_extra(cls, module: nn.Embedding) -> int:
        """The padding row, kept exactly as stored."""
        return module.embedding_dim if module.padding_idx is not None else 0

    @classmethod
    def tensorization(cls, shape: tuple[int, ...], override: Any = None,
                      paired: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(vocab modes, dim modes); the vocabulary may be padded so a prime-ish V still splits.
        ``paired``: as many vocabulary modes as dimension modes (an mpo layout)."""
        v, d = shape
        if override:
            tz = _check_vocab(override[0], v), tn.check_modes(override[1], d, "embedding size")
        elif paired:
            tz = tn.paired_factorization(math.prod(padded_factorization(v)), d)
        else:
            tz = padded_factorization(v), tn.factorize(d)
        if paired:
            tn.check_pairs(*tz, what=f"a {shape} embedding")
        return tz

    @classmethod
    def matrix_layout(cls, shape: tuple[int, ...]) -> tuple[tuple[tuple[int], tuple[int]], bool]:
        """The V x D table itself."""
        return ((shape[0],), (shape[1],)), False

    @classmethod
    def from_dense(cls, module: nn.Embedding, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None,
                   whiten: torch.Tensor | None = None, whiten_out: torch.Tensor | None = None,
                   paired: bool = False) -> "TNEmbedding":
        """``whiten``: square roots of the calibration text's token counts (a start weighted by
        how often each row is looked up, see :meth:`TNLayer.load_dense_`); ``whiten_out``: the
        factor of a tied head's input Gram matrix (the start weighted by what the head sees);
        ``paired``: an mpo layout (core k carries vocabulary mode k and dimension mode k)."""
        tz, ranks = cls._prepare(module, decomp, rank, tensorization, paired=paired)
        v, d = module.weight.shape
        layer = cls(v, d, tz[0], tz[1], ranks, decomp, module.padding_idx, gated, sigma, dtype=module.weight.dtype,
                    paired=paired)
        if module.padding_idx is not None:
            with torch.no_grad():
                layer.padding_row.copy_(module.weight[module.padding_idx])
        return layer.load_dense_(module, tz, generator, whiten, whiten_out)

    @classmethod
    def weight_tensor(cls, weight: torch.Tensor, tensorization=None) -> torch.Tensor:
        """(V, D), with zero rows up to the padded vocabulary ``prod(tensorization[0])``."""
        w = weight.detach()
        rows = math.prod(tensorization[0]) if tensorization else None
        if rows is not None and rows > w.shape[0]:
            w = torch.cat([w, torch.zeros(rows - w.shape[0], w.shape[1], dtype=w.dtype)], dim=0)
        return w

    @classmethod
    def _meta_module(cls, shape: tuple[int, ...], bias: bool, args: dict[str, Any]) -> nn.Module:
        pad = args.get("padding_idx", -1)
        return nn.Embedding(shape[0], shape[1], padding_idx=None if pad in (-1, None) else pad, device="meta")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.paired:
            return self._paired_forward(idx)
        cores = self.forward_cores()
        a = len(self.vocab_modes)
        flat = idx.reshape(-1)
        F.embedding(flat, self._bounds)  # IndexError for an out-of-range index, like the dense layer
        rows = None
        for k in range(a):
            digit = torch.div(flat, self._strides[k], rounding_mode="floor") % self.vocab_modes[k]
            piece = cores[k][:, digit, :].permute(1, 0, 2)  # (n, r_k, r_{k+1})
            rows = piece if rows is None else torch.bmm(rows, piece)
        if a == len(cores):  # no dimension cores: D == 1
            out = torch.diagonal(rows, dim1=1, dim2=2).sum(-1, keepdim=True)
        elif rows is None:  # vocabulary of size 1
            tail = tn.merge_cores(cores[a:])  # (r_a, D, r_0)
            out = torch.diagonal(tail, dim1=0, dim2=2).sum(-1).expand(flat.shape[0], -1)
        else:
            tail = self.frozen("tail", idx, lambda: self._tail(self.effective_cores()))
            out = rows.reshape(rows.shape[0], -1) @ (self._tail(cores) if tail is None else tail)
        if self.padding_idx is not None:
            out = torch.where((flat == self.padding_idx).unsqueeze(-1), self.padding_row.to(out.dtype), out)
        return out.reshape(idx.shape + (self.embedding_dim,))

    def _paired_forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of a paired layout: each core's slice at the row's vocabulary digit, ``(r, d_k, r')``,
        joined along the ring (the dimension modes grow, ``r0 x D x r``) and traced; in evaluation
        without grad, rows of the table built once (weight_cache.py)."""
        flat = idx.reshape(-1)
        table = self.frozen("table", idx, self.dense_weight)
        if table is not None:
            return F.embedding(flat, table).reshape(idx.shape + (self.embedding_dim,))
        F.embedding(flat, self._bounds)  # IndexError for an out-of-range index, like the dense layer
        rows = None
        pairs = [(k, v, d) for k, (v, d) in enumerate(zip(self.vocab_modes, self.dim_modes)) if v * d > 1]
        for core, (k, v, d) in zip(self.forward_cores(), pairs):
            digit = torch.div(flat, self._strides[k], rounding_mode="floor") % v
            piece = core.reshape(core.shape[0], v, d, core.shape[2])[:, digit]  # (r, n, d, r')
            piece = piece.permute(1, 0, 2, 3)
            if rows is None:
                rows = piece  # (n, r0, D so far, r)
            else:
                n, r0, width, r = rows.shape
                joined = torch.bmm(rows.reshape(n, r0 * width, r), piece.reshape(n, r, -1))
                rows = joined.reshape(n, r0, width * d, piece.shape[-1])
        out = torch.diagonal(rows, dim1=1, dim2=3).sum(-1)  # trace over the closing bond: (n, D)
        if self.padding_idx is not None:
            out = torch.where((flat == self.padding_idx).unsqueeze(-1), self.padding_row.to(out.dtype), out)
        return out.reshape(idx.shape + (self.embedding_dim,))

    def lay_out_for_serving_(self) -> "TNEmbedding":
        """Only a table a tied head reads (:class:`TiedTNLinear`) is served as matrices: the
        head's cut, dimension cores first, is where its cores are laid out; a lookup alone gathers
        rows and keeps its cores as they are."""
        if self.shares_cores and not self.paired:
            shapes, a = [tuple(c.shape) for c in self.cores], len(self.vocab_modes)
            n = len(shapes)
            turned = view_orders(shapes[a:] + shapes[:a], n - a, self.embedding_dim, self.num_embeddings)
            self._relay_cores([turned[(k - a) % n] for k in range(n)])
        return self

    def _tail(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """The dimension cores joined, as the (r_0 * r_a, D) matrix a row's (r_0, r_a) product meets."""
        tail = tn.merge_cores(cores[len(self.vocab_modes):])  # (r_a, D, r_0)
        return tail.permute(2, 0, 1).reshape(-1, tail.shape[1])

    def dense_weight(self, cores: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The V x D table (the stored padding row included), from ``cores`` or the layer's own."""
        w = self.dense_tensor(cores).reshape(-1, self.embedding_dim)[: self.num_embeddings]
        if self.padding_idx is None:
            return w
        rows = torch.arange(self.num_embeddings, device=w.device).unsqueeze(-1)
        return torch.where(rows == self.padding_idx, self.padding_row.to(w.dtype), w)

    def to_dense(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           dtype=self.cores[0].dtype)
        with torch.no_grad():
            emb.weight.copy_(self.dense_weight())
        return emb


def _check_vocab(vocab_modes: Sequence[int], num_embeddings: int) -> tuple[int, ...]:
    """A vocabulary split may pad (product >= V) but never drop rows."""
    vocab_modes = tuple(int(m) for m in vocab_modes)
    if not vocab_modes or any(m < 1 for m in vocab_modes) or math.prod(vocab_modes) < num_embeddings:
        raise TensorizationError(f"vocabulary tensorization {vocab_modes} must multiply to at least {num_embeddings}")
    return vocab_modes


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


# ------------------------------------------------------------------ GPT-2's Conv1D and tied layers
class TNConv1D(TNLinear, kind="conv1d", replaces_path="transformers.pytorch_utils.Conv1D"):
    """``transformers``' ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, (in, out).

    It is planned, tensorized and counted as the Linear it is (weight shape (out, in)): only
    reading the dense layer (:meth:`dense_view`) and giving it back (:meth:`dense_weight`,
    :meth:`to_dense`) use the stored layout, so a layer that goes back to dense is a ``Conv1D``
    again and the model still loads in ``transformers``. Named by path: ``transformers`` is
    imported only when such a layer goes back to dense.
    """

    @classmethod
    def dense_view(cls, module: nn.Module) -> nn.Module:
        """A Linear stand-in sharing the Conv1D's tensors (the weight as its transpose, a view)."""
        if isinstance(module, nn.Linear):  # already a view
            return module
        return TNLinear.standin(module.weight.T, module.bias, {})

    @classmethod
    def from_dense(cls, module: nn.Module, decomp: str = "tr", rank: int | Sequence[int] = 25,
                   tensorization: tuple[Sequence[int], Sequence[int]] | None = None, *, gated: bool = True,
                   sigma: float = 0.5, generator: torch.Generator | None = None,
                   whiten: torch.Tensor | None = None, paired: bool = False) -> "TNConv1D":
        return super().from_dense(cls.dense_view(module), decomp, rank, tensorization, gated=gated, sigma=sigma,
                                  generator=generator, whiten=whiten, paired=paired)

    def dense_weight(self) -> torch.Tensor:
        return self.dense_tensor().reshape(self.in_features, self.out_features)

    def to_dense(self) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(self.cores[0].dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            conv.bias.copy_(self.bias if self.bias is not None else torch.zeros_like(conv.bias))
        return conv


class TiedTNLinear(nn.Module):
    """A Linear that computes with another factorized layer's cores: a tied weight
    (``lm_head.weight is embed_tokens.weight``) factorized once.

    ``source`` is referenced, not registered as a submodule, so the shared cores are trained,
    counted and saved once, under the source's name; only the layer's own bias (if any) is a
    parameter here. With a :class:`TNEmbedding` source (the V x D table) the output is
    ``x table^T``, contracted from the dimension cores to the vocabulary cores (the ring read
    from the other side) without building the table; with a :class:`TNLinear` source it is that
    layer's product. In training both users see the same gate sample (:meth:`GatedCores.take_cores`).
    """

    kind = "tied_linear"

    def __init__(self, source: TNLayer, bias: nn.Parameter | bool = False):
        super().__init__()
        if type(source) not in (TNEmbedding, TNLinear):
            raise ConfigError(f"a tied Linear shares the cores of an embedding or a Linear, not of {type(source).__name__}")
        self.__dict__["_source"] = source  # not a submodule: see the class docstring
        self.transposed = isinstance(source, TNEmbedding)
        if self.transposed:
            self.in_features, self.out_features = source.embedding_dim, source.num_embeddings
            self._einsum = linear_contraction(len(source.dim_modes), len(source.vocab_modes))
        else:
            self.in_features, self.out_features = source.in_features, source.out_features
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=source.cores[0].dtype)) if bias else None
        source.shares_cores = True

    @classmethod
    def from_dense(cls, module: nn.Linear, source: TNLayer) -> "TiedTNLinear":
        """The layer replacing ``module``, whose weight is ``source``'s. Its bias Parameter is kept
        as is, so whatever else holds it (BERT's ``cls.predictions.bias``) still does."""
        layer = cls(source, module.bias if module.bias is not None else False)
        if tuple(module.weight.shape) != (layer.out_features, layer.in_features):
            raise ConfigError(f"a {tuple(module.weight.shape)} Linear cannot share the weight of a "
                              f"{layer.out_features} x {layer.in_features} {source.kind} layer")
        return layer

    @property
    def source(self) -> TNLayer:
        return self.__dict__["_source"]

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out x in) weight, rebuilt from the shared cores (see :attr:`TNLayer.weight`)."""
        return self.source.dense_weight()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        mats = src.frozen("head", x, self._head_matrices) if self.transposed else src.frozen(
            "matrices", x, src.serving_matrices)
        if mats is not None:  # evaluation without grad: the source's kept matrices (weight_cache.py)
            y = linear_through(x, mats, None)
            y = self._padding_column(x, y) if self.transposed else y
        else:
            cores = src.take_cores()
            y = self._logits(x, cores) if self.transposed else src.contract_input(x, cores)
        return y + self.bias if self.bias is not None else y

    def _head_matrices(self) -> tuple[torch.Tensor, ...]:
        """The table's transpose as ``F.linear`` weights (:func:`serving_matrices`), dimension cores first."""
        src = self.source
        if src.paired:  # no cut between vocabulary and dimension cores: the table itself
            return (src.dense_weight().contiguous(),)
        cores, a = src.effective_cores(), len(src.vocab_modes)
        return serving_matrices(cores[a:] + cores[:a], len(cores) - a, src.embedding_dim, src.num_embeddings)

    def _logits(self, x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
        """``x table^T`` for an embedding source; the padding column from its stored padding row."""
        src = self.source
        a = len(src.vocab_modes)
        if a == 0 or a == len(cores) or src.paired:  # a vocabulary or a dimension of 1, or paired: the table
            return F.linear(x, src.dense_weight(cores))
        y = apply_linear(self._einsum, x, cores[a:] + cores[:a], src.dim_modes, math.prod(src.vocab_modes))
        return self._padding_column(x, y[..., : self.out_features])

    def _padding_column(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The padding index's logit from the embedding's stored padding row. Without grad the
        column is written in place: ``y`` is this call's own output, and a copy of it (what
        ``torch.cat`` makes) is a second logits tensor, V floats a token (192 MiB for an 8 x 128
        prefill of a 49152-word vocabulary) held at the model's peak."""
        src = self.source
        if src.padding_idx is None:
            return y
        p = src.padding_idx
        pad = (x @ src.padding_row.to(x.dtype)).unsqueeze(-1)
        if not torch.is_grad_enabled():
            y[..., p:p + 1] = pad
            return y
        return torch.cat([y[..., :p], pad, y[..., p + 1:]], -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tied to a {self.source.kind} layer")


def tied_head_size(spec: dict[str, Any]) -> int | None:
    """The output size of a :class:`TiedTNLinear` computing from the layer ``spec`` records (an
    embedding's vocabulary, a Linear's outputs), or None when no tied Linear can use such a
    layer: what a checkpoint's tied entry is checked against."""
    kind = spec.get("kind")
    if kind == "embedding":
        return spec.get("num_embeddings")
    if kind == "linear":
        return spec.get("out_features")
    return None


def tie_reason(owner_kind: str, owner: nn.Module, user_kind: str, user: nn.Module) -> str | None:
    """Why ``user``, whose weight is ``owner``'s, cannot compute from the cores ``owner`` will
    be factorized into (None: it can, through :func:`tied_layer`)."""
    if user_kind == "linear" and owner_kind in ("embedding", "linear"):
        return None
    if user_kind == owner_kind == "embedding":
        same = (user.padding_idx, user.max_norm, user.sparse) == (owner.padding_idx, owner.max_norm, owner.sparse)
        return None if same else "the embeddings differ in padding_idx, max_norm or sparse"
    return f"a {user_kind} layer cannot compute from the cores of a {owner_kind} layer"


def tied_layer(dense: nn.Module, source: TNLayer) -> nn.Module:
    """What replaces ``dense``, whose weight is ``source``'s: the factorized embedding itself for
    an identical embedding, else a :class:`TiedTNLinear` keeping ``dense``'s bias."""
    if isinstance(source, TNEmbedding) and isinstance(dense, nn.Embedding):
        return source
    return TiedTNLinear.from_dense(dense, source)
