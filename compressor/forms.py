"""The forms a trained factorized layer can be served in: its cores, two standard factors, or dense.

A factorized layer (``layers``) computes with its cores: the smallest form, the one a checkpoint
keeps. The same weight can be served two other ways, each equal to it up to float round-off:

* ``"factors"``: the ring cut in two, each half contracted into one matrix, served as two standard
  modules with a narrow middle: ``nn.Linear(in, r, bias=False) -> nn.Linear(r, out)``; a conv's
  ``k x k`` conv to ``r`` channels then a ``1 x 1`` conv (or ``1 x 1`` then ``k x k``, or three
  convs: ``1 x 1``, ``k x k``, ``1 x 1``); an embedding's ``nn.Embedding(V, r) -> nn.Linear(r, D,
  bias=False)``. Plain BLAS / conv calls, no einsum plan: what every runtime, quantizer (torchao's
  ``quantize_``) and compiler (``torch.export``, ``torch.compile``) already knows, at
  ``r (in + out)`` parameters.
* ``"dense"``: the weight rebuilt (``to_dense``): the largest form, often the fastest at large
  batches.

The convs of both forms are :class:`~compressor.conv_kernel.ServedConv2d`: standard ``nn.Conv2d``
modules whose small calls in evaluation run on torch's direct conv kernel instead of oneDNN,
whose fixed cost per call (~70 us) is most of a small conv's time (``conv_kernel``: at batch 1,
LeNet-5's second conv 2.2x faster, the 5 x 5 conv of its factors 3.5x). A conv the user's model
keeps dense stays as it is.

Where the ring is cut. The first factor must read the whole input and the second write the whole
output, so the cut must separate the input modes from the output modes. A layer's cores list its
inputs first and its outputs last, so on a ring exactly one pair of bonds does that: the bond
between the last input core and the first output core, and the closing bond. A train's closing
bond is 1, so ``r`` is the inner bond; a ring's ``r`` is the product of the two, ``r_s * r_0``
(the factors hold ``r_s r_0 (in + out)`` parameters, as many as a two-core ring and more than a
longer one). Any other cut leaves input and output modes on the same side, which no pair of
standard modules computes. A conv has a third group, its kernel window (between the input and
output channels), which may go with either side: a ``k x k`` conv to ``r`` channels then ``1 x 1``
(window with the inputs), or ``1 x 1`` to ``r`` channels then ``k x k`` (window with the outputs);
or, its core being one of its own, the ring may be cut on both sides of it: ``1 x 1`` to ``r_a``
channels, the window core as a ``k x k`` conv to ``r_b``, ``1 x 1`` to the outputs (Tucker-2's
shape). Each side's channels are then a bond, never a bond times the window, so this layout is
often the smallest, sometimes smaller than the cores themselves (LeNet-5's second conv at 20x:
6,445 parameters against its cores' 6,561 and the dense 25,050), and there the fastest (batch
256, one thread: 0.37x the dense conv's time, against 0.5x window first and 0.6x window last;
about 0.85x at batch 1). The layout with the fewest parameters is taken, which at stride 1 is also
about the one with the fewest FLOPs per output pixel; a strided conv keeps the window with the
inputs, since a ``1 x 1`` conv first would run on the unstrided input.

Tied layers (an LM head computing from the embedding's cores, :class:`~compressor.layers.TiedTNLinear`)
go to the same form as their source and stay tied: in factors an embedding ``E (V x r)``,
``B (D x r)`` serves its head as ``Linear(D, r)`` with ``B^T`` then ``Linear(r, V)`` whose weight
*is* the embedding's ``E`` Parameter (the large part stays shared; the ``D x r`` part is copied,
since no standard module reads a transpose); in dense the head's weight is the table itself, as in
the original model. A factorized layer met under two names is converted once and put at both.

An embedding's padding row is kept exactly: a zero row is a zero row of ``E``; any other row gets
one extra rank (its own column in ``E`` and ``B``), so the lookup still returns it as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from . import tensornet as tn
from .conv_kernel import ServedConv2d
from .errors import ConfigError
from .layers import TiedTNLinear, TNConv2d, TNEmbedding, TNLayer, TNLinear
from .plan import count_state
from .surgery import replace_module, tied_layers, tn_layers

#: The forms a layer can be served in, smallest first.
FORMS = ("cores", "factors", "dense")
#: What ``form=`` accepts: a form for every layer, or ``auto`` (each layer's fastest within the size target).
FORM_CHOICES = ("auto",) + FORMS


def check_form(form: object) -> str:
    """``form`` if it is one of :data:`FORM_CHOICES`, else one :class:`ConfigError` line."""
    if form not in FORM_CHOICES:
        raise ConfigError(f"unknown form {form!r}: choose {', '.join(FORM_CHOICES)}")
    return form  # type: ignore[return-value]


# ------------------------------------------------------------------ one layer
@torch.no_grad()
def _halves(layer: TNLayer, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left ``P x r``, right ``r x Q``) with ``left @ right`` the layer's weight tensor, cores
    ``[:s]`` on the left (rows: their modes, row-major) and ``[s:]`` on the right; ``r`` is
    bond ``s-1`` times the closing bond. Contracted in float64 so the factors lose nothing."""
    if layer.gated:
        raise ConfigError("a gated layer has no served form yet: prune it first (layer.prune_())")
    cores = [c.detach().to(torch.float64) for c in layer.effective_cores()]
    a, b = tn.merge_cores(cores[:s]), tn.merge_cores(cores[s:])  # (r0, P, rm), (rm, Q, r0)
    r0, p, rm = a.shape
    return a.permute(1, 0, 2).reshape(p, r0 * rm), b.permute(2, 0, 1).reshape(r0 * rm, b.shape[1])


def split_rank(layer: TNLayer, s: int) -> int:
    """The middle width of the factors cut before core ``s``: bond ``s-1`` times the closing bond."""
    return layer.ranks[s - 1] * layer.ranks[-1]


def _param(t: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(t.to(dtype).contiguous())


def _linear(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Linear:
    """A standard ``nn.Linear`` holding ``weight`` (out x in; a Parameter is shared as is) and ``bias``."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")  # no random init to throw away
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.contiguous())
    lin.bias = bias
    return lin


def linear_factors(layer: TNLinear) -> nn.Sequential | None:
    """``Linear(in, r, bias=False) -> Linear(r, out)`` (None: the layer has no input or no output cores)."""
    s = len(layer.in_modes)
    if s == 0 or s == len(layer.modes):
        return None
    left, right = _halves(layer, s)
    dtype = layer.cores[0].dtype
    return nn.Sequential(_linear(left.T.to(dtype), None), _linear(right.T.to(dtype), layer.bias))


#: The ways a conv's cores can be served as standard convs (:func:`conv_layout`), named by where
#: the kernel window goes: with the inputs (``k x k`` to ``r`` channels, then ``1 x 1``), with the
#: outputs (``1 x 1`` to ``r`` channels, then ``k x k``), or on its own between them (``1 x 1``,
#: ``k x k``, ``1 x 1``).
CONV_LAYOUTS = ("window_first", "window_last", "window_between")


def conv_layout(layer: TNConv2d) -> str | None:
    """The layout of a conv's factors (:data:`CONV_LAYOUTS`; None: its cores hold no input or no
    output channels): the one holding the fewest parameters among those the layer allows. The
    window has a side of its own only when it is a core of its own (not merged with the input
    channels, ``k > 1``) and some input core precedes it; a strided conv keeps it with the
    inputs, since a ``1 x 1`` conv first would run on the unstrided input."""
    return min(_conv_layout_params(layer).items(), key=lambda item: item[1], default=(None, 0))[0]


def _conv_layout_params(layer: TNConv2d) -> dict[str, int]:
    """The weights (bias aside) each layout ``layer`` allows would hold, from its bonds."""
    n, window_at = len(layer.modes), len(layer.modes) - len(layer.out_modes) - 1
    if window_at + 1 in (0, n):
        return {}
    k, c_in, c_out = layer.kernel_size[0] * layer.kernel_size[1], layer.in_channels, layer.out_channels
    closing = layer.ranks[-1]
    out = {"window_first": split_rank(layer, window_at + 1) * (c_in * k + c_out)}
    if layer.merge_spatial or k == 1 or window_at == 0 or layer.stride != (1, 1):
        return out
    r_in, r_out = layer.ranks[window_at - 1], layer.ranks[window_at]
    out["window_last"] = split_rank(layer, window_at) * (c_in + k * c_out)
    out["window_between"] = closing * (r_in * c_in + r_in * k * r_out + r_out * c_out)
    return out


def _conv_cut(layer: TNConv2d, layout: str) -> int:
    """Where a two-conv ``layout`` cuts the ring: before the window core for ``window_last``,
    after it for ``window_first``."""
    return len(layer.in_modes) if layout == "window_last" else len(layer.modes) - len(layer.out_modes)


def _conv(weight: torch.Tensor, dtype: torch.dtype, bias: nn.Parameter | None, window: TNConv2d | None = None,
          groups: int = 1) -> nn.Conv2d:
    """A standard ``nn.Conv2d`` holding ``weight``; ``window``: the layer whose stride, padding and
    dilation it takes (a ``1 x 1`` conv takes none). A :class:`~compressor.conv_kernel.ServedConv2d`:
    a small call runs on torch's direct kernel rather than oneDNN (``conv_kernel``)."""
    geometry = dict(stride=window.stride, padding=window.padding, dilation=window.dilation) if window else {}
    conv = ServedConv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None,
                        groups=groups, device="meta", **geometry)
    conv.weight, conv.bias = _param(weight, dtype), bias
    return conv


def conv_factors(layer: TNConv2d) -> nn.Sequential | None:
    """Standard convs in the layout :func:`conv_layout` picks; the stride, padding and dilation go
    to the ``k x k`` one, the bias to the last."""
    layout = conv_layout(layer)
    if layout is None:
        return None
    if layout == "window_between":
        return _window_between(layer)
    left, right = _halves(layer, _conv_cut(layer, layout))
    (kh, kw), c_in, c_out, r = layer.kernel_size, layer.in_channels, layer.out_channels, left.shape[1]
    dtype = layer.cores[0].dtype
    if layout == "window_first":
        return nn.Sequential(_conv(left.T.reshape(r, c_in, kh, kw), dtype, None, layer),
                             _conv(right.T.reshape(c_out, r, 1, 1), dtype, layer.bias))
    return nn.Sequential(_conv(left.T.reshape(r, c_in, 1, 1), dtype, None),
                         _conv(right.reshape(r, kh, kw, c_out).permute(3, 0, 1, 2), dtype, layer.bias, layer))


@torch.no_grad()
def _window_between(layer: TNConv2d) -> nn.Sequential:
    """``1 x 1`` to ``r0 r_a`` channels, the window core as a ``k x k`` conv to ``r0 r_b``, ``1 x 1``
    to the outputs: the ring cut on both sides of its window core (``r_a``, ``r_b`` its bonds, ``r0``
    the closing bond). The middle conv is the window core itself, so the narrow channels on both
    sides are the bonds, not their product with the window; in a ring the closing bond runs
    through all three, so the window is applied to each of its ``r0`` slices alone: a grouped
    conv (``groups = r0``) holding the window core ``r0`` times."""
    at = len(layer.modes) - len(layer.out_modes) - 1
    cores = [c.detach().to(torch.float64) for c in layer.effective_cores()]
    inputs, window, outputs = tn.merge_cores(cores[:at]), cores[at], tn.merge_cores(cores[at + 1:])
    (r0, c_in, r_a), (_, _, r_b), (kh, kw) = inputs.shape, window.shape, layer.kernel_size
    first = inputs.permute(0, 2, 1).reshape(r0 * r_a, c_in, 1, 1)  # channel (g, a) reads inputs[g, :, a]
    middle = window.permute(2, 0, 1).reshape(r_b, r_a, kh, kw).repeat(r0, 1, 1, 1)  # group g: (g, b) from (g, a)
    last = outputs.permute(1, 2, 0).reshape(layer.out_channels, r0 * r_b, 1, 1)  # channel (g, b) -> out q
    dtype = layer.cores[0].dtype
    return nn.Sequential(_conv(first, dtype, None), _conv(middle, dtype, None, layer, groups=r0),
                         _conv(last, dtype, layer.bias))


def dense_module(layer: TNLayer) -> nn.Module:
    """The layer's weight rebuilt as its standard module (``to_dense``); a conv as a
    :class:`~compressor.conv_kernel.ServedConv2d` sharing the layer's bias, as the factors' convs
    are. ``to_dense`` itself returns a plain ``nn.Conv2d``: it also puts a layer back into the
    user's model (a run storing a layer dense), which stays as the user wrote it."""
    if isinstance(layer, TNConv2d):
        with torch.no_grad():
            return _conv(layer.kernel(), layer.cores[0].dtype, layer.bias, layer)
    return layer.to_dense()


def embedding_factors(layer: TNEmbedding) -> nn.Sequential | None:
    """``Embedding(V, r) -> Linear(r, D, bias=False)``; the padding row kept exactly (module docstring)."""
    s = len(layer.vocab_modes)
    if s == 0 or s == len(layer.modes):
        return None
    left, right = _halves(layer, s)
    table, out = left[: layer.num_embeddings].clone(), right.T  # (V, r), (D, r)
    p = layer.padding_idx
    if p is not None:
        table[p] = 0
        row = layer.padding_row.detach().to(torch.float64)
        if bool(row.any()):  # a rank of its own: column r of E is the one-hot of p, column r of B the row
            table = torch.cat([table, torch.zeros(table.shape[0], 1, dtype=table.dtype)], 1)
            table[p, -1] = 1
            out = torch.cat([out, row[:, None]], 1)
    dtype = layer.cores[0].dtype
    emb = nn.Embedding(table.shape[0], table.shape[1], padding_idx=p, device="meta")
    emb.weight = _param(table, dtype)
    return nn.Sequential(emb, _linear(out.to(dtype), None))


def factors(layer: TNLayer) -> nn.Sequential | None:
    """The layer as two standard modules (None: its cores cannot be cut between inputs and outputs,
    as a paired (mpo) layout's, whose every core holds an input mode and an output mode)."""
    if layer.paired:
        return None
    if isinstance(layer, TNEmbedding):
        return embedding_factors(layer)
    if isinstance(layer, TNConv2d):
        return conv_factors(layer)
    if isinstance(layer, TNLinear):
        return linear_factors(layer)
    return None


def _head(head: TiedTNLinear, form: str, source: nn.Module) -> nn.Module:
    """The tied ``head`` computing from ``source`` in ``form`` (its weight shared, its bias its own)."""
    if form == "dense":
        return _linear(source.weight, head.bias)
    first, second = source[0], source[1]
    if head.transposed:  # x table^T = x B E^T: B^T copied, E shared
        return nn.Sequential(_linear(second.weight.detach().T.clone(), None), _linear(first.weight, head.bias))
    return nn.Sequential(first, _linear(second.weight, head.bias))


# ------------------------------------------------------------------ a layer with what computes from it
@dataclass(frozen=True)
class Group:
    """A factorized layer (under its first name) and the tied heads computing from its cores:
    they are served in one form, so a tie stays a tie."""

    name: str
    layer: TNLayer
    heads: tuple[tuple[str, TiedTNLinear], ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return (self.name,) + tuple(name for name, _ in self.heads)

    def in_form(self, form: str) -> list[nn.Module] | None:
        """[the layer, then each head] in ``form`` (None: the layer has no such form)."""
        if form == "cores":
            return [self.layer] + [h for _, h in self.heads]
        made = dense_module(self.layer) if form == "dense" else factors(self.layer)
        if made is None:
            return None
        made.to(self.layer.cores[0].device).train(self.layer.training)  # to_dense builds on the CPU
        return [made] + [_head(h, form, made).train(h.training) for _, h in self.heads]

    def place(self, model: nn.Module, modules: list[nn.Module]) -> None:
        """``modules`` (:meth:`in_form`'s list: the layer, then each head) put in ``model`` under
        every name the layer and its heads have (an alias too)."""
        replace_module(model, self.name, modules[0])
        for (name, _), module in zip(self.heads, modules[1:]):
            replace_module(model, name, module)

    def params(self, form: str) -> int | None:
        """State elements of the group in ``form`` (a shared tensor once), or None."""
        if form == "dense":  # counted, not built: the dense table of an LLM is large
            biases = {id(h.bias): h.bias.numel() for _, h in self.heads if h.bias is not None}
            return self.layer.dense_param_count() + sum(biases.values())
        made = self.in_form(form)
        return None if made is None else count_state(nn.ModuleList(made))


def groups(model: nn.Module) -> list[Group]:
    """Every factorized layer of ``model`` with its tied heads (each head once)."""
    heads: dict[str, dict[int, tuple[str, TiedTNLinear]]] = {}
    for name, (source, module) in tied_layers(model).items():
        if isinstance(module, TiedTNLinear):
            heads.setdefault(source, {}).setdefault(id(module), (name, module))
    return [Group(name, layer, tuple(heads.get(name, {}).values())) for name, layer in tn_layers(model).items()]


def convert(model: nn.Module, forms: Mapping[str, str] | str) -> nn.Module:
    """``model`` with each factorized layer (by name) and its tied heads put in its form (a name
    not listed, or a layer without that form, keeps its cores). Done in place: ``load`` calls it
    on the model it has just built, and the cores are not needed after: each layer's cores (and
    the values its weight cache kept) are let go as soon as it is converted, so converting a
    model needs about one layer's worth of memory beside it, not a second model."""
    found = groups(model)
    found.reverse()
    while found:
        group = found.pop()  # the list no longer holds it: replaced, its cores can be freed
        form = forms if isinstance(forms, str) else forms.get(group.name, "cores")
        made = group.in_form(form) if form != "cores" else None
        if made is None:
            continue
        group.place(model, made)
        group.layer.drop_weight_cache()
        del group, made
    return model


def form_table(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{layer: {form: state elements}}`` of every form each factorized layer (with its tied heads) has."""
    out = {}
    for group in groups(model):
        out[group.name] = {form: n for form in FORMS if (n := group.params(form)) is not None}
    return out
