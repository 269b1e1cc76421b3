"""Which CPU kernel runs a small served convolution: torch's direct one or oneDNN's.

On a CPU ``F.conv2d`` goes to oneDNN (mkldnn), which pays a large fixed cost per call before any
arithmetic (primitive lookup, memory descriptors, reorders to its blocked layout). A small conv is
mostly that cost: at batch 1 (2 threads), LeNet-5's second conv (20 -> 50, 5 x 5, on its 14 x 14
input) takes 147 us through oneDNN and 67 us through torch's direct kernel (``thnn_conv2d``:
im2col, then one GEMM per sample), and the 5 x 5 conv of its 20x slim ``factors`` form (11 -> 19)
104 us against 30 us. With more work the arithmetic dominates and oneDNN's inner loops win: at
batch 256 the direct kernel takes 2.1x oneDNN's time on the dense conv and 1.4x on the 5 x 5
factor. A ``1 x 1`` conv is one plain GEMM, and there the direct kernel won at every size
measured (the factors' two ``1 x 1`` convs at batch 256: 0.65x and 0.69x). So a served conv takes
the direct kernel when the call is small, oneDNN otherwise.

"Small" is decided from the call's shape alone, by its multiply-accumulates (:func:`conv_macs`)
against :data:`DIRECT_MAX_MACS`, or :data:`DIRECT_MAX_MACS_POINTWISE` for a ``1 x 1`` conv (which
oneDNN ran slower than the direct GEMM at every size measured), never by timing at run time: the
same input shape always takes the same kernel, so a served model's outputs are reproducible (the
two kernels agree only to float round-off). Both thresholds come from ``benchmarks/conv_kernels.py``,
which times the two kernels interleaved on LeNet-5's convs and a few CIFAR- and ResNet-sized ones
over batch sizes 1-256 at 1 and 2 threads (the figures are in the thresholds' comments). The
direct kernel is called through ``torch._C._nn.thnn_conv2d``, whose binding costs what
``F.conv2d``'s does (``torch.ops.aten._slow_conv2d_forward`` adds ~5 us of Python dispatch).

Everything else goes to ``F.conv2d`` as before: grad enabled (training, or a forward autograd
may differentiate), ``torch.compile`` / ``torch.export`` / ``torch.jit`` tracing (a graph must
hold the standard ``aten.conv2d``), a tensor subclass (fake tensors, fx proxies, quantized
weights), a device other than the CPU, a dtype other than float32 (the threshold was measured
in float32), an unbatched input, groups, dilation, or padding given as a string. The direct
kernel has none of groups or dilation.

:class:`ServedConv2d` is an ``nn.Conv2d`` that runs its convolution through :func:`conv2d`: the
convs ``forms`` makes for a factorized layer's served forms. It stays an ``nn.Conv2d`` (its
``isinstance``, state-dict keys and ``torch.export`` graph are a standard conv's). A conv the
user's model keeps dense is never swapped for one: it is what the dense model runs too.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The most multiply-accumulates a conv call with a ``k x k`` window (k > 1) may take and still go
#: to the direct kernel. ``benchmarks/conv_kernels.py`` (results/conv_kernels.json; torch 2.13, 2
#: CPU cores, 1 and 2 threads, batch 1-256): up to 4.2 MMAC the direct kernel won or tied on every
#: shape (LeNet-5's 5 x 5 convs at batch 1: 0.29-0.60x oneDNN's time; 3 x 3 convs at batch 1, which
#: torch already sends to the direct kernel: 0.94-1.00x); from 4.7 MMAC on it lost on some 3 x 3
#: shapes (1.02-1.32x) while still winning on LeNet-5's 5 x 5 (0.58-0.99x up to 40 MMAC); past
#: 40 MMAC it lost on every one (1.03-4.6x).
DIRECT_MAX_MACS = 4_000_000
#: The same for a ``1 x 1`` conv: the direct kernel won or tied (0.13-1.05x, the ties at batch 1,
#: where torch itself already takes it) on every ``1 x 1`` shape measured, up to the largest, 822
#: MMAC (a 256 -> 64 on 14 x 14 at batch 256: 0.41x); beyond what was measured, oneDNN.
DIRECT_MAX_MACS_POINTWISE = 850_000_000


def conv_macs(input_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
              padding: Sequence[int]) -> int:
    """Multiply-accumulates of a (groups 1, dilation 1) conv of a ``(N, C_in, H, W)`` input."""
    n, _, h, w = input_shape
    c_out, c_in, kh, kw = weight_shape
    h_out = (h + 2 * padding[0] - kh) // stride[0] + 1
    w_out = (w + 2 * padding[1] - kw) // stride[1] + 1
    return n * c_out * max(h_out, 0) * max(w_out, 0) * c_in * kh * kw


def _plain_cpu_float(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu"
                         and t.dtype == torch.float32)


def _ints(v: object) -> tuple[int, int] | None:
    """``v`` as an (h, w) pair of ints, or None (a string padding such as ``"same"``)."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (v[0], v[1])
    return None


def uses_direct_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0,
                       dilation=1, groups: int = 1) -> bool:
    """Whether :func:`conv2d` runs this call on the direct kernel (the module docstring says when)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if type(x) is not torch.Tensor or not (_plain_cpu_float(x) and _plain_cpu_float(weight) and _plain_cpu_float(bias)):
        return False
    stride, padding = _ints(stride), _ints(padding)
    if groups != 1 or _ints(dilation) != (1, 1) or stride is None or padding is None or x.dim() != 4:
        return False
    pointwise = weight.shape[2] == weight.shape[3] == 1
    return conv_macs(x.shape, weight.shape, stride, padding) <= (DIRECT_MAX_MACS_POINTWISE if pointwise
                                                                 else DIRECT_MAX_MACS)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``, on the direct kernel when
    :func:`uses_direct_kernel` says so (equal to float round-off)."""
    if uses_direct_kernel(x, weight, bias, stride, padding, dilation, groups):
        return torch._C._nn.thnn_conv2d(x, weight, weight.shape[2:], bias, _ints(stride), _ints(padding))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class ServedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose convolution, in evaluation, runs through :func:`conv2d`. TorchScript
    compiles only ``nn.Conv2d``'s own path (it cannot compile :func:`conv2d`'s checks), as does a
    module in training or with a padding mode other than zeros."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.training and self.padding_mode == "zeros":
            return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self._conv_forward(input, self.weight, self.bias)
