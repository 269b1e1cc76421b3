"""conv_kernel: a served conv's small call runs on torch's direct kernel, equal to F.conv2d, and
every call it must not take (grad, tracing, groups, ...) still goes to F.conv2d."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import forms
from compressor.conv_kernel import (DIRECT_MAX_MACS, DIRECT_MAX_MACS_POINTWISE, ServedConv2d, conv2d, conv_macs,
                                    uses_direct_kernel)
from compressor.layers import TNConv2d

TOL = 1e-5


@pytest.fixture
def direct_calls(monkeypatch):
    """How many times the direct kernel ran (its binding wrapped with a counter)."""
    calls = []
    kernel = torch._C._nn.thnn_conv2d

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch._C._nn, "thnn_conv2d", counted)
    return calls


def _close(a, b):
    return float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def test_macs_count_every_output_pixel_of_every_channel():
    # LeNet-5's second conv at batch 1: 50 channels x 8 x 8 pixels x 20 x 5 x 5
    assert conv_macs((1, 20, 12, 12), (50, 20, 5, 5), (1, 1), (0, 0)) == 1_600_000
    # stride 2, padding 1 on 9 x 8: output 5 x 4
    assert conv_macs((3, 4, 9, 8), (6, 4, 3, 3), (2, 2), (1, 1)) == 3 * 6 * 5 * 4 * 4 * 9


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (2, 0))])
@pytest.mark.parametrize("batch", [1, 64])  # 5 x 5 window: batch 1 under the threshold, 64 over it
def test_conv2d_equals_f_conv2d_on_both_sides_of_the_threshold(bias, stride, padding, batch, direct_calls):
    torch.manual_seed(0)
    x, w = torch.randn(batch, 20, 12, 12), torch.randn(50, 20, 5, 5)
    b = torch.randn(50) if bias else None
    with torch.no_grad():
        want = F.conv2d(x, w, b, stride, padding)
        small = uses_direct_kernel(x, w, b, stride, padding)
        assert _close(conv2d(x, w, b, stride, padding), want)
    assert small == (batch == 1) and len(direct_calls) == int(small)


def test_the_thresholds_are_inclusive_and_pointwise_convs_have_their_own():
    window = torch.zeros(1, 1, 5, 5)  # 25 MACs per output pixel
    assert DIRECT_MAX_MACS == 25 * 400 * 400  # the shapes below sit exactly on it
    pointwise = torch.zeros(1000, 1000, 1, 1)  # 10^6 MACs per output pixel
    assert DIRECT_MAX_MACS_POINTWISE == 10**6 * 850
    with torch.no_grad():
        assert uses_direct_kernel(torch.zeros(1, 1, 404, 404), window, None)
        assert not uses_direct_kernel(torch.zeros(1, 1, 404, 405), window, None)
        assert uses_direct_kernel(torch.zeros(1, 1000, 1, 5), pointwise, None)  # past the window's threshold
        assert uses_direct_kernel(torch.zeros(1, 1000, 1, 850), pointwise, None)
        assert not uses_direct_kernel(torch.zeros(1, 1000, 1, 851), pointwise, None)


def test_calls_the_direct_kernel_must_not_take_go_to_f_conv2d(monkeypatch):
    x, w, b = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)
    with torch.no_grad():
        assert uses_direct_kernel(x, w, b, 1, 1)
        assert not uses_direct_kernel(x, w, b, 1, 1, dilation=2)
        assert not uses_direct_kernel(x, torch.randn(6, 2, 3, 3), b, 1, 1, groups=2)
        assert not uses_direct_kernel(x, w, b, 1, "same")
        assert not uses_direct_kernel(x.double(), w.double(), b.double())
        assert not uses_direct_kernel(x[0], w, b)  # unbatched
        assert not uses_direct_kernel(x.to("meta"), w.to("meta"), b.to("meta"))
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert not uses_direct_kernel(x, w, b)
        with monkeypatch.context() as m:
            m.setattr(torch.jit, "is_tracing", lambda: True)
            assert not uses_direct_kernel(x, w, b)
    assert not uses_direct_kernel(x, w, b)  # grad enabled
    with torch.inference_mode():
        assert uses_direct_kernel(x, w, b)


def test_training_and_grad_run_f_conv2d_and_still_differentiate(direct_calls):
    conv = ServedConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    conv(x).sum().backward()  # training
    conv.eval()
    conv(x).sum().backward()  # evaluation, grad on
    assert not direct_calls and x.grad is not None and conv.weight.grad is not None
    with torch.no_grad():
        y = conv(x)
    assert len(direct_calls) == 1 and _close(y, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_a_padding_mode_other_than_zeros_keeps_torchs_own_path(direct_calls):
    conv = ServedConv2d(4, 6, 3, padding=1, padding_mode="reflect").eval()
    plain = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").eval()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(conv(x), plain(x)) and not direct_calls


def _lenet_conv2():
    """LeNet-5's second conv as a 20x TR run leaves it (three-conv factors), behind a kept dense conv."""
    torch.manual_seed(0)
    layer = TNConv2d(20, 50, 5, (4, 5), (5, 10), [4, 11, 19, 10, 1], "tr", gated=False)
    with torch.no_grad():
        for core in layer.cores:
            core.normal_(0, 0.3)
    return nn.Sequential(nn.Conv2d(1, 20, 5, padding=2), nn.MaxPool2d(2), layer).eval()


@pytest.mark.parametrize("form", ["cores", "factors", "dense"])
@pytest.mark.parametrize("batch", [1, 256])
def test_a_served_conv_model_computes_what_its_cores_compute(form, batch, direct_calls):
    net, x = _lenet_conv2(), torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        want = net[2](F.max_pool2d(F.conv2d(x, net[0].weight, net[0].bias, padding=2), 2))
        kept = net[0]
        served = forms.convert(net, form)
        assert served[0] is kept and type(served[0]) is nn.Conv2d  # the user's dense conv stays as it was
        direct_calls.clear()
        got = served(x)
    assert _close(got, want)
    if form == "factors":
        assert [type(m) for m in served[2]] == [ServedConv2d] * 3
    # batch 1: every factorized conv call is small; batch 256: only the 1 x 1 factor convs are
    direct = {"cores": (1, 0), "factors": (3, 2), "dense": (1, 0)}[form]
    assert len(direct_calls) == direct[batch != 1]


def test_torch_export_of_the_factors_form_traces_the_standard_conv():
    net = forms.convert(_lenet_conv2(), "factors")
    x = torch.randn(2, 1, 28, 28)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.conv2d.default") == 4 and not any("thnn" in t or "slow_conv" in t for t in targets)
    x1 = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert _close(program.module()(x1), net(x1))


def test_torch_compile_of_the_factors_form_matches_eager():
    net = forms.convert(_lenet_conv2(), "factors")
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert _close(torch.compile(net)(x), net(x))


def test_torchscript_and_jit_trace_of_the_factors_form_hold_torchs_conv(direct_calls):
    net = forms.convert(_lenet_conv2(), "factors")
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        want = net(x)
        scripted, traced = torch.jit.script(net), torch.jit.trace(net, x)  # tracing checks against eager
        direct_calls.clear()
        assert _close(scripted(x), want) and _close(traced(x), want)
    assert not direct_calls  # neither holds the direct kernel
    assert sum(n.kind() == "aten::_convolution" for n in traced.inlined_graph.nodes()) == 4
