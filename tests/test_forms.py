"""Forms a slim model is served in: cores, two standard factors, dense; and form="auto"'s choice.

Every form computes what the cores compute (linear, conv, embedding; train and ring; pruned
ranks, biases, padding rows, tied heads), the factors are standard modules of the size the cut
says, the selection keeps the model within its size target (with a fake clock, so the rule is
tested, not the machine), and load / the CLI take the option.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import compressor
from compressor import forms, serving
from compressor.blueprint import Blueprint
from compressor.checkpoint import load, load_served, read_metadata, save
from compressor.conv_kernel import ServedConv2d
from compressor.cli import main
from compressor.errors import ConfigError
from compressor.layers import TiedTNLinear, TNConv2d, TNEmbedding, TNLayer, TNLinear
from compressor.plan import count_state
from compressor.serving import Option, select

TOL = 1e-5


def _pruned(layer: TNLayer, seed: int = 0) -> TNLayer:
    """Random cores and bias, then some slices of every gate closed and the rest scaled: a trained,
    pruned layer (ranks smaller than built, gate values folded into the cores)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in layer.cores:
            c.copy_(torch.randn(c.shape, generator=g) * 0.5)
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        for gate in layer.gates.values():
            mu = torch.rand(gate.mu.shape, generator=g) * 0.8 + 0.2
            mu[::3] = -1.0  # every third slice closed
            gate.mu.copy_(mu)
    built = list(layer.ranks)
    layer.prune_().eval()
    assert layer.ranks != built or layer.decomp == "tt"
    return layer


def _linear(decomp, bias=True):
    return _pruned(TNLinear(60, 24, (3, 4, 5), (4, 6), [4, 6, 6, 4, 3 if decomp == "tr" else 1], decomp, bias=bias))


def _conv(decomp, stride=1, c_in=6, c_out=8, k=3, merge=False):
    in_modes, out_modes = ((2, 3) if c_in == 6 else (c_in,)), (2, 4)
    n = (1 if merge else len(in_modes) + (k > 1)) + len(out_modes)
    ranks = [4] * (n - 1) + [3 if decomp == "tr" else 1]
    return _pruned(TNConv2d(c_in, c_out, k, in_modes, out_modes, ranks, decomp, stride=stride, padding=1,
                            merge_spatial=merge))


def _embedding(decomp, padding_idx=None, padding_row=0.0):
    layer = _pruned(TNEmbedding(30, 12, (5, 6), (3, 4), [4, 6, 4, 3 if decomp == "tr" else 1], decomp,
                                padding_idx=padding_idx))
    if padding_idx is not None:
        with torch.no_grad():
            layer.padding_row.fill_(padding_row)
    return layer


def _close(a, b):
    return float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def _standard(module):
    """Only torch's own modules (Sequential, Linear, Conv2d, Embedding) in the tree, or a served
    conv: an ``nn.Conv2d`` whose only change is which kernel runs a small call (conv_kernel.py)."""
    return all(type(m).__module__.startswith("torch.nn") or type(m) is ServedConv2d for m in module.modules())


# ------------------------------------------------------------------ one layer, each form
@pytest.mark.parametrize("decomp", ["tt", "tr"])
@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv", "conv-strided", "conv-1x1", "conv-merged",
                                  "embedding", "embedding-padding", "embedding-padding-row"])
def test_every_form_computes_what_the_cores_compute(kind, decomp):
    layer, x = {
        "linear": lambda: (_linear(decomp), torch.randn(5, 7, 60)),
        "linear-nobias": lambda: (_linear(decomp, bias=False), torch.randn(3, 60)),
        "conv": lambda: (_conv(decomp), torch.randn(2, 6, 9, 9)),
        "conv-strided": lambda: (_conv(decomp, stride=2), torch.randn(2, 6, 9, 9)),
        "conv-1x1": lambda: (_conv(decomp, k=1), torch.randn(2, 6, 5, 5)),
        "conv-merged": lambda: (_conv(decomp, merge=True), torch.randn(2, 6, 7, 7)),
        "embedding": lambda: (_embedding(decomp), torch.randint(0, 30, (4, 6))),
        "embedding-padding": lambda: (_embedding(decomp, 3), torch.tensor([[3, 1, 29], [0, 3, 2]])),
        "embedding-padding-row": lambda: (_embedding(decomp, 3, 0.7), torch.tensor([[3, 1, 29], [0, 3, 2]])),
    }[kind]()
    with torch.no_grad():
        want = layer(x)
        group = forms.Group("layer", layer)
        for form in ("factors", "dense"):
            served = group.in_form(form)[0]
            assert _standard(served), served
            assert _close(served(x), want), (form, float((served(x) - want).abs().max()))
    if kind == "embedding-padding-row":  # the stored padding row comes back exactly, through a rank of its own
        assert torch.equal(group.in_form("factors")[0](torch.tensor([3]))[0], torch.full((12,), 0.7))


@pytest.mark.parametrize("decomp", ["tt", "tr"])
def test_factors_are_two_linears_cut_between_inputs_and_outputs(decomp):
    layer = _linear(decomp)
    r = layer.ranks[2] * layer.ranks[-1]  # the bond after the 3 input cores, times the closing bond (1 for a train)
    first, second = forms.factors(layer)
    assert (type(first), type(second)) == (nn.Linear, nn.Linear) and first.bias is None
    assert first.weight.shape == (r, 60) and second.weight.shape == (24, r) and second.bias is layer.bias
    group = forms.Group("fc", layer)
    assert group.params("factors") == r * (60 + 24) + 24
    assert group.params("dense") == 60 * 24 + 24 and group.params("cores") == count_state(layer)
    assert forms.form_table(nn.Sequential(layer)) == {"0": {f: group.params(f) for f in forms.FORMS}}


def _kernels(sequential):
    return [(conv.kernel_size, conv.in_channels, conv.out_channels, conv.groups) for conv in sequential]


def test_a_conv_puts_its_window_where_its_factors_hold_least():
    # many input channels, few outputs, a wide bond after the window: 1x1 to r channels, then the k x k
    wide_in = _pruned(TNConv2d(64, 4, 3, (8, 8), (4,), [8, 2, 6, 1], "tt", padding=1))  # pruned: [5, 1, 4, 1]
    assert forms.conv_layout(wide_in) == "window_last"
    assert _kernels(forms.factors(wide_in)) == [((1, 1), 64, 1, 1), ((3, 3), 1, 4, 1)]
    assert forms.factors(wide_in)[1].padding == (1, 1)
    # few inputs, many outputs, a wide bond before the window: k x k to r channels, then 1x1
    wide_out = _pruned(TNConv2d(4, 64, 3, (4,), (8, 8), [6, 2, 8, 1], "tt", padding=1))  # pruned: [4, 1, 5, 1]
    assert forms.conv_layout(wide_out) == "window_first"
    assert _kernels(forms.factors(wide_out)) == [((3, 3), 4, 1, 1), ((1, 1), 1, 64, 1)]
    # narrow bonds on both sides of the window: 1x1 to r_a, the window core as a k x k conv r_a -> r_b, 1x1
    between = _pruned(TNConv2d(64, 64, 3, (8, 8), (8, 8), [8, 4, 4, 8, 1], "tt", padding=1))  # [5, 2, 2, 5, 1]
    assert forms.conv_layout(between) == "window_between"
    assert _kernels(forms.factors(between)) == [((1, 1), 64, 2, 1), ((3, 3), 2, 2, 1), ((1, 1), 2, 64, 1)]
    assert forms.Group("c", between).params("factors") == 64 * 2 + 2 * 9 * 2 + 2 * 64 + 64
    # strided: the window stays with the inputs, so no 1x1 conv runs on the unstrided input
    strided = _pruned(TNConv2d(64, 64, 3, (8, 8), (8, 8), [8, 4, 4, 8, 1], "tt", stride=2, padding=1))
    assert forms.conv_layout(strided) == "window_first" and forms.factors(strided)[0].stride == (2, 2)
    with torch.no_grad():
        for layer, x in ((wide_in, torch.randn(2, 64, 8, 8)), (wide_out, torch.randn(2, 4, 8, 8)),
                         (between, torch.randn(2, 64, 8, 8)), (strided, torch.randn(2, 64, 9, 9))):
            assert _close(forms.factors(layer)(x), layer(x))


@pytest.mark.parametrize("decomp", ["tt", "tr"])
def test_a_conv_window_between_computes_what_the_cores_compute(decomp):
    """A ring's closing bond runs through all three convs: the window core is applied to each of
    its slices alone (a grouped conv); a train's middle conv is the window core as it is."""
    layer = _pruned(TNConv2d(12, 10, 3, (3, 4), (2, 5), [5, 4, 6, 4, 3 if decomp == "tr" else 1], decomp,
                             padding=1, dilation=2))
    r0, r_a, r_b = layer.ranks[-1], layer.ranks[1], layer.ranks[2]
    assert forms.conv_layout(layer) == "window_between" and (r0 > 1) == (decomp == "tr")
    first, middle, last = forms.factors(layer)
    assert _kernels((first, middle, last)) == [((1, 1), 12, r0 * r_a, 1), ((3, 3), r0 * r_a, r0 * r_b, r0),
                                               ((1, 1), r0 * r_b, 10, 1)]
    assert middle.dilation == (2, 2) and middle.padding == (1, 1) and last.bias is layer.bias
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        assert _close(forms.factors(layer)(x), layer(x))


@pytest.mark.parametrize("decomp", ["tt", "tr"])
def test_a_tied_head_goes_with_its_embedding_and_stays_tied(decomp):
    table = _embedding(decomp, padding_idx=2, padding_row=0.3)
    head = TiedTNLinear(table, bias=True)
    with torch.no_grad():
        head.bias.normal_()
    group = forms.Group("embed", table, (("head", head),))
    h, idx = torch.randn(3, 5, 12), torch.randint(0, 30, (3, 5))
    with torch.no_grad():
        for form in ("factors", "dense"):
            emb, logits = group.in_form(form)
            assert _standard(emb) and _standard(logits)
            assert _close(emb(idx), table(idx)) and _close(logits(h), head(h))
            shared = (emb[0].weight, logits[1].weight) if form == "factors" else (emb.weight, logits.weight)
            assert shared[0] is shared[1]  # the V-row table is one Parameter: counted and saved once
            assert (logits[1] if form == "factors" else logits).bias is head.bias  # a bias held elsewhere stays held
    r = table.ranks[1] * table.ranks[-1] + 1  # + the padding row's own rank
    assert group.params("factors") == 30 * r + 12 * r + r * 12 + 30  # E once, B and its transposed copy, bias
    assert group.params("dense") == 30 * 12 + 30


# ------------------------------------------------------------------ choosing forms
def _opts(**layers):
    return {name: {f: Option(p, c if isinstance(c, tuple) else (c,)) for f, (p, c) in forms_.items()}
            for name, forms_ in layers.items()}


def test_select_takes_the_most_speed_per_parameter_that_fits():
    options = _opts(a={"cores": (100, 0.5), "factors": (200, 0.3), "dense": (1000, 0.1)},
                    b={"cores": (100, 0.5), "factors": (150, 0.2), "dense": (400, 0.15)})
    assert select(options, room=0) == {"a": "cores", "b": "cores"}  # nothing fits: cores
    assert select(options, room=60) == {"a": "cores", "b": "factors"}  # 0.3 per 50 beats 0.2 per 100
    assert select(options, room=150) == {"a": "factors", "b": "factors"}
    # b's dense is faster than its factors and fits: a form slower than dense is not kept
    assert select(options, room=400) == {"a": "factors", "b": "dense"}
    assert select(options, room=10 ** 6) == {"a": "dense", "b": "dense"}


def test_select_never_keeps_a_form_slower_than_a_dense_that_fits():
    options = _opts(a={"cores": (100, 0.9), "factors": (300, 0.8), "dense": (350, 0.1)})
    assert select(options, room=260) == {"a": "dense"}
    # every form slower than dense, dense too big: the fastest that fits
    assert select(options, room=200) == {"a": "factors"}
    # a form that is smaller and faster is always taken, even without room (it frees some)
    options = _opts(a={"cores": (100, 0.6), "factors": (80, 0.4)}, b={"cores": (100, 0.4), "dense": (110, 0.1)})
    assert select(options, room=-5) == {"a": "factors", "b": "dense"}  # a frees 20, b spends 10 of them
    # slower forms are never taken, however small; a gain within timing noise is no gain
    assert select(_opts(a={"cores": (100, 0.5), "factors": (10, 0.6)}), room=0) == {"a": "cores"}
    assert select(_opts(a={"cores": (100, 0.5), "dense": (110, 0.495)}), room=100) == {"a": "cores"}


def test_options_weigh_each_served_shape_alike():
    params = {"a": {"cores": 10, "dense": 20}, "b": {"cores": 10, "dense": 20}}
    seconds = {"a": {"cores": (1.0, 100.0), "dense": (0.5, 100.0)}, "b": {"cores": (1.0, 300.0), "dense": (1.0, 30.0)}}
    opts = serving.options(params, seconds)
    assert opts["a"]["cores"].cost == pytest.approx(0.5 + 0.25)
    assert opts["a"]["dense"].cost == pytest.approx(0.25 + 0.25)
    assert opts["b"]["dense"].cost == pytest.approx(0.5 + 30 / 400)


class Net(nn.Module):
    """Conv, conv, linear, linear: the layer kinds of LeNet-5, small."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc1 = nn.Linear(16 * 3 * 3, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _slim_net():
    """Net with every layer factorized (pruned ranks), its dense size, and an input."""
    net = Net()
    dense = count_state(net)
    net.conv1 = _pruned(TNConv2d.from_dense(net.conv1, "tr", 4, ((2, 3), (2, 4))), 1)
    net.conv2 = _pruned(TNConv2d.from_dense(net.conv2, "tt", 4, ((2, 4), (4, 4))), 2)
    net.fc1 = _pruned(TNLinear.from_dense(net.fc1, "tr", 5, ((4, 4, 9), (6, 8))), 3)
    net.fc2 = _pruned(TNLinear.from_dense(net.fc2, "tt", 5, ((6, 8), (10,))), 4)
    return net.eval(), dense, torch.randn(4, 6, 8, 8)


def fake_timer(seconds):
    """A clock that says each module kind takes ``seconds[kind]``: cores, factors (a Sequential) or dense."""
    def timer(module, x):
        kind = "cores" if isinstance(module, TNLayer) else "factors" if isinstance(module, nn.Sequential) else "dense"
        return seconds[kind] * x.shape[0]
    return timer


def fake_model_timer(seconds):
    """A whole model's time: its children's times by :func:`fake_timer`'s clock."""
    layer = fake_timer(seconds)
    return lambda model, x: sum(layer(child, x) for child in model.children())


def test_choose_keeps_the_model_within_its_target_and_converts_it():
    net, dense, x = _slim_net()
    size = count_state(net)
    table = forms.form_table(net)
    serve = serving.serving(net, example=x)
    assert serve.shapes == ((1, 6, 8, 8), (256, 6, 8, 8)) and not serve.tokens
    timer = fake_timer({"cores": 3.0, "factors": 2.0, "dense": 1.0})  # dense fastest, then factors
    # no room: all cores
    whole = fake_model_timer({"cores": 3.0, "factors": 2.0, "dense": 1.0})
    choice = serving.choose(net, "auto", budget=size, serve=serve, timer=timer, model_timer=whole)
    assert set(choice.forms().values()) == {"cores"} and choice.params == size
    # room for one layer's factors only (the cheapest: most speed per parameter): that layer alone moves
    extra = {name: {f: n - sizes["cores"] for f, n in sizes.items()} for name, sizes in table.items()}
    cheapest = min(extra, key=lambda n: extra[n]["factors"])
    room = extra[cheapest]["factors"]
    assert sorted(e["factors"] for e in extra.values())[1] > room
    choice = serving.choose(net, "auto", budget=size + room, serve=serve, timer=timer, model_timer=whole)
    assert choice.forms() == {n: "factors" if n == cheapest else "cores" for n in table}
    assert choice.params == size + room <= choice.budget
    moved = next(layer for layer in choice.layers if layer.name == cheapest)
    assert moved.speedup("cores") == (1.5, 1.5) and moved.speedup("dense") == (0.5, 0.5)
    # the whole dense size allows everything: all dense (fastest), and the converted model computes the same
    choice = serving.choose(net, "auto", budget=dense, serve=serve, timer=timer, model_timer=whole)
    assert set(choice.forms().values()) == {"dense"} and choice.params <= dense
    with torch.no_grad():
        want = net(x)
        converted = forms.convert(net, choice.forms())
        assert _close(converted(x), want) and count_state(converted) == choice.params
    assert not any(isinstance(m, TNLayer) for m in converted.modules())


def test_auto_keeps_the_cores_when_the_whole_model_is_slower_in_the_forms_picked():
    net, dense, x = _slim_net()
    serve = serving.serving(net, example=x)
    alone = fake_timer({"cores": 3.0, "factors": 2.0, "dense": 1.0})  # alone, every layer gains
    for whole_seconds, kept in (({"cores": 1.0, "factors": 2.0, "dense": 1.5}, True),  # in the model, it loses
                                ({"cores": 3.0, "factors": 2.0, "dense": 1.0}, False)):
        choice = serving.choose(net, "auto", budget=dense, serve=serve, timer=alone,
                                model_timer=fake_model_timer(whole_seconds))
        assert choice.kept_cores is kept and len(choice.in_model) == 2
        assert (set(choice.forms().values()) == {"cores"}) is kept and choice.params <= dense
        assert choice.in_model == ((1 / 1.5,) * 2 if kept else (3.0,) * 2)  # cores' time / the picked forms'
        assert all(isinstance(m, TNLayer) for m in net.children())  # checked in place, left in cores
        assert choice.to_dict()["kept_cores"] is kept


def test_select_trades_one_served_shape_for_another_only_for_a_clear_gain_in_sum():
    # 2 % slower at decode, 60 % faster at prefill: the shapes weigh alike, the move is taken
    trade = _opts(a={"cores": (100, (0.5, 0.5)), "factors": (100, (0.51, 0.2))})
    assert select(trade, room=0) == {"a": "factors"}
    # forms within timing noise of each other (a two-core train and its factors) stay as they are
    assert select(_opts(a={"cores": (100, (0.5, 0.5)), "factors": (100, (0.47, 0.46))}), room=0) == {"a": "cores"}
    assert select(_opts(a={"cores": (100, (0.5, 0.5)), "factors": (100, (0.8, 0.1))}), room=0) == {"a": "factors"}


def test_picks_hold_when_the_model_is_faster_in_sum_and_no_shape_loses_more_than_noise():
    assert serving.picks_hold(()) and serving.picks_hold((1.0 / 1.05, 2.0))  # 5 % slower at decode, 2x prefill
    assert not serving.picks_hold((1.0 / 1.2, 2.0))  # a shape 20 % slower: beyond noise
    assert not serving.picks_hold((0.99, 1.0)) and not serving.picks_hold((1.0, 1.0))  # no gain in sum


class LeNetConvs(nn.Module):
    """LeNet-5's second conv (20 -> 50, 5 x 5) as a 20x run leaves it, then a small head: its three-conv
    factors (1x1 20 -> 11, 5x5 11 -> 19, 1x1 19 -> 50) hold fewer parameters than its cores."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = TNConv2d(20, 50, 5, (4, 5), (5, 10), [4, 11, 19, 10, 1], "tt", gated=False)
        with torch.no_grad():
            for core in self.conv.cores:
                core.normal_(0, 0.3)
        self.fc = nn.Linear(50, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_auto_takes_factors_smaller_than_the_cores_with_no_room_to_spare():
    net, x = LeNetConvs().eval(), torch.randn(3, 20, 14, 14)
    size, table = count_state(net), forms.form_table(net)["conv"]
    assert table["factors"] == 20 * 11 + 11 * 25 * 19 + 19 * 50 + 50 < table["cores"]
    serve = serving.serving(net, example=x)
    fast_factors = {"cores": 2.0, "factors": 1.0, "dense": 0.5}
    choice = serving.choose(net, "auto", budget=size, serve=serve, timer=fake_timer(fast_factors),
                            model_timer=fake_model_timer(fast_factors))
    assert choice.forms() == {"conv": "factors"} and choice.params == size - (table["cores"] - table["factors"])
    # slower than the cores at every served shape: kept in cores, however much smaller
    slow_factors = {"cores": 1.0, "factors": 2.0, "dense": 0.5}
    choice = serving.choose(net, "auto", budget=size, serve=serve, timer=fake_timer(slow_factors),
                            model_timer=fake_model_timer(slow_factors))
    assert choice.forms() == {"conv": "cores"}
    with torch.no_grad():
        want = net(x)
        served = forms.convert(net, {"conv": "factors"})
        assert [type(m) for m in served.conv] == [ServedConv2d] * 3 and _close(served(x), want)


def test_measure_times_each_layer_at_the_shapes_it_is_given():
    net, _, x = _slim_net()
    seen = []

    def timer(module, inp):
        seen.append((type(module).__name__, tuple(inp.shape)))
        return 1e-3

    serve = serving.serving(net, shapes=[(2,), (5, 6, 8, 8)], example=x)
    assert serve.shapes == ((2, 6, 8, 8), (5, 6, 8, 8))
    seconds = serving.measure(net, serve, timer)
    assert set(seconds) == {"conv1", "conv2", "fc1", "fc2"} and seconds["fc1"]["cores"] == (1e-3, 1e-3)
    assert ("TNLinear", (2, 144)) in seen and ("Sequential", (5, 48)) in seen and ("ServedConv2d", (5, 8, 8, 8)) in seen


# ------------------------------------------------------------------ loading in a form
@pytest.fixture
def slim_file(tmp_path):
    net, dense, x = _slim_net()
    path = tmp_path / "slim.safetensors"
    save(net, path, blueprint=Blueprint("module", dense, target=1.5))
    return path, net, x


@pytest.mark.parametrize("form", ["factors", "dense", "auto"])
def test_load_serves_the_form_asked(slim_file, form):
    path, net, x = slim_file
    cores = load(path, base=Net)
    assert all(isinstance(getattr(cores, n), TNLayer) for n in ("conv1", "conv2", "fc1", "fc2"))
    served = compressor.load(path, base=Net, form=form, example=x)
    with torch.no_grad():
        assert torch.equal(cores(x), net(x)) and _close(served(x), net(x))
    if form != "auto":  # every layer in the form: standard modules only
        assert all(_standard(m) for m in served.children())
    meta = read_metadata(path)
    if form == "auto":  # never past the size target (1.5x of the dense size)
        assert count_state(served) <= meta["dense_params"] / 1.5
    assert "layers" in meta and set(meta["layers"]) == {"conv1", "conv2", "fc1", "fc2"}  # the file keeps the cores


def test_load_served_gives_the_choice_auto_made_beside_the_model(slim_file):
    path, net, x = slim_file
    model, choice = load_served(path, base=Net, form="auto", example=x)
    assert choice.asked == "auto" and {l.name for l in choice.layers} == {"conv1", "conv2", "fc1", "fc2"}
    assert choice.params == count_state(model) <= read_metadata(path)["dense_params"] / 1.5
    assert all(isinstance(getattr(model, n), TNLayer) == (f == "cores") for n, f in choice.forms().items())
    with torch.no_grad():
        assert _close(model(x), net(x))
    cores, none = load_served(path, base=Net)
    assert none is None and torch.equal(cores(x), net(x))


def test_a_torch_export_base_takes_the_forms_too(slim_file):
    path, net, x = slim_file
    program = torch.export.export(Net().eval(), (x,))
    with torch.no_grad():
        for form in ("factors", "dense"):
            served = load(path, base=program, form=form)
            assert _close(served(x), net(x)) and not any(isinstance(m, TNLayer) for m in served.modules())


def test_a_bad_form_is_one_error_before_anything_is_read(tmp_path):
    with pytest.raises(ConfigError, match="unknown form 'fast'"):
        compressor.load(tmp_path / "missing.safetensors", base=Net, form="fast")
    with pytest.raises(ConfigError, match="serve shape"):
        serving.parse_shape("8x0")
    net, _, _ = _slim_net()
    with pytest.raises(ConfigError, match="shapes the model serves"):
        serving.serving(net)


def test_factors_form_exports_and_matches_its_cores(slim_file):
    path, net, x = slim_file
    served = load(path, base=Net, form="factors")
    program = torch.export.export(served, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.conv2d.default", "aten.linear.default"} <= targets and not any("einsum" in t for t in targets)
    with torch.no_grad():
        assert _close(program.module()(x), net(x)) and _close(program.module()(x[:1]), net(x[:1]))


def test_factors_form_takes_other_tools_with_no_code_of_ours_between(slim_file):
    """The factors form is plain torch: torch's own int8 quantizer (``quantize_dynamic``, the
    fallback the issue names while torchao's int8 kernels are slower on this CPU) and
    ``torch.compile`` take it as it is, and it still computes what the cores compute."""
    path, net, x = slim_file
    served = load(path, base=Net, form="factors")
    with torch.no_grad():
        reference = net(x)
        compiled = torch.compile(served)
        assert _close(compiled(x), reference)
        quantized = torch.ao.quantization.quantize_dynamic(served, {nn.Linear}, dtype=torch.qint8)
        linears = [m for m in quantized.modules() if type(m).__name__ == "Linear"]
        assert linears and all(type(m).__module__.startswith("torch.ao.nn.quantized") for m in linears)
        error = float((quantized(x) - reference).abs().max())
        assert 0 < error <= 0.05 * float(reference.abs().max())  # int8 rounding: changed, but close


# ------------------------------------------------------------------ tied heads in a language model
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 30, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_a_tied_language_model_loads_in_each_form_with_its_tie(tmp_path):
    model = TiedLM()
    dense = count_state(model)
    model.embed = _embedding("tr")
    model.head = TiedTNLinear(model.embed)
    model.mix = _linear_like(model.mix)
    path = tmp_path / "lm.safetensors"
    save(model.eval(), path, blueprint=Blueprint("module", dense, target=1.2))
    ids = torch.randint(0, 30, (2, 7))
    serve = serving.serving(model)
    assert serve.tokens and serve.shapes == ((1, 1), (8, 128)) and serve.vocab == 30
    with torch.no_grad():
        want = model(ids)
        for form in ("factors", "dense", "auto"):
            served = load(path, base=TiedLM, form=form)
            assert _close(served(ids), want), form
            if form == "dense":
                assert served.head.weight is served.embed.weight
            if form == "factors":
                assert served.head[1].weight is served.embed[0].weight


def _linear_like(dense: nn.Linear) -> TNLinear:
    return _pruned(TNLinear.from_dense(dense, "tt", 3, ((3, 4), (3, 4))), 5)


# ------------------------------------------------------------------ the command line
def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory, trained_digits_net, digits):
    d = tmp_path_factory.mktemp("forms_cli")
    xtr, ytr, xte, yte = digits
    save_file({k: v.contiguous() for k, v in trained_digits_net.state_dict().items()}, str(d / "weights.safetensors"))
    save_file({"inputs": xtr.contiguous(), "labels": ytr.contiguous()}, str(d / "data.safetensors"))
    return d


def test_cli_run_says_the_forms_and_keeps_the_cores(digits_files, tmp_path, monkeypatch):
    from compressor import cli

    monkeypatch.setattr(cli.out_console, "_width", 200)
    out, report = tmp_path / "slim.safetensors", tmp_path / "report.json"
    r = _run([digits_files / "weights.safetensors", "--arch", "compressor.zoo:digits_net", "--target", "3x",
              "--data", digits_files / "data.safetensors", "--epochs", "1", "-o", out, "--report-json", report,
              "--form", "factors", "--serve-shape", "1", "--serve-shape", "32"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "served as factors" in r.stdout and "1x1x8x8 / 32x1x8x8" in r.stdout
    chosen = json.loads(report.read_text())["forms"]
    assert chosen["asked"] == "factors" and {l["form"] for l in chosen["layers"]} == {"factors"}
    assert all(len(l["speedup_vs_cores"]) == 2 for l in chosen["layers"])
    meta = read_metadata(out)
    assert set(meta["layers"]) == {l["name"] for l in chosen["layers"]}  # the file holds the cores
    r = _run(["eval", out, "--data", digits_files / "data.safetensors", "--arch", "compressor.zoo:digits_net",
              "--form", "dense"])
    assert r.exit_code == 0 and "evaluated as dense" in r.stdout, r.stderr
    r = _run(["inspect", out, "--forms", "--arch", "compressor.zoo:digits_net", "--serve-shape", "2x1x8x8"])
    assert r.exit_code == 0, r.stderr
    assert "as factors" in r.stdout and "served as auto" in r.stdout and "timed at 2x1x8x8" in r.stdout


def test_cli_bad_form_or_shape_is_one_error_line(digits_files, tmp_path):
    common = [digits_files / "weights.safetensors", "--arch", "compressor.zoo:digits_net", "--target", "3x",
              "--data", digits_files / "data.safetensors", "-o", tmp_path / "s.safetensors"]
    _one_error(_run(common + ["--form", "quick"]), "unknown form 'quick'")
    _one_error(_run(common + ["--serve-shape", "8xa"]), "serve shape")
    assert not (tmp_path / "s.safetensors").exists()
    _one_error(_run(["eval", tmp_path / "s.safetensors", "--data", "digits", "--form", "x"]), "unknown form 'x'")
    _one_error(_run(["inspect", tmp_path / "s.safetensors", "--form", "x"]), "unknown form 'x'")


# ------------------------------------------------------------------ Hugging Face folders (GPT-2's Conv1D, tied heads)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_slim_model_folder_loads_in_each_form(name, tmp_path):
    pytest.importorskip("transformers")
    from test_hf_pass import batch, logits, tiny

    from compressor.config import CompressConfig
    from compressor.plan import planned_starts
    from compressor.planner import plan
    from compressor.surgery import apply

    model = tiny(name)
    config = CompressConfig(target=1.1, rank=3, decomp="tr", min_params=0)
    the_plan = plan(model, config.plan_options(), example=batch())
    slim = apply(model, the_plan, planned_starts(the_plan, "tr"), sigma=0.5, seed=0).model
    for layer in slim.modules():
        if isinstance(layer, TNLayer):
            layer.prune_()
    folder = tmp_path / "slim"
    model.config.architectures = [type(model).__name__]  # what a folder's config names
    model.config.save_pretrained(folder)
    save(slim.eval(), folder / "model.slim.safetensors", blueprint=Blueprint("export", the_plan.dense_params,
                                                                            target=1.1))
    inputs = batch(2, 9)
    want = logits(slim, inputs)
    for form in ("factors", "dense", "auto"):
        served = compressor.load(folder, form=form)
        assert _close(logits(served, inputs), want), form
        if form == "factors":  # nothing of compressor's left in the module tree
            assert not any(type(m).__module__.startswith("compressor") for m in served.modules())
            head, table = served.lm_head, served.get_input_embeddings()
            assert head[1].weight is table[0].weight  # still tied


# ------------------------------------------------------------------ memory and budgets of a served model
def test_convert_lets_each_layers_cores_go_as_it_converts_it(monkeypatch):
    import gc
    import weakref

    net, _, x = _slim_net()
    with torch.no_grad():
        want = net(x)  # the layers' weight caches are filled: they go with their cores
    layers = {name: weakref.ref(m) for name, m in net.named_children()}
    alive = []
    real = forms.Group.in_form

    def spy(group, form):
        gc.collect()
        alive.append(sorted(n for n, ref in layers.items() if ref() is not None and n != group.name))
        return real(group, form)

    monkeypatch.setattr(forms.Group, "in_form", spy)
    converted = forms.convert(net, "factors")
    gc.collect()
    assert alive == [["conv2", "fc1", "fc2"], ["fc1", "fc2"], ["fc2"], []]  # only the layers not yet converted
    assert all(ref() is None for ref in layers.values())
    with torch.no_grad():
        assert _close(converted(x), want)


def test_an_int8_files_budget_is_the_element_ratio_its_run_aimed_at(tmp_path):
    from compressor.blueprint import ELEMENT_TARGET
    from compressor.checkpoint import read_blueprint, served_budget
    from compressor.quantize import quantize_model

    net, dense, _ = _slim_net()
    quantization = quantize_model(net, "int8")
    quantization.load_into(net)
    aimed = tmp_path / "aimed.safetensors"  # 4x in bytes, met by int8 weights at 1.25x in elements
    save(net, aimed, blueprint=Blueprint("module", dense, decomp="tt", target=4.0, extra={ELEMENT_TARGET: 1.25}),
         quantization=quantization)
    assert served_budget(read_metadata(aimed), read_blueprint(aimed)) == int(dense // 1.25)
    older = tmp_path / "older.safetensors"  # no record: the model may grow to its own stored size only
    save(net, older, blueprint=Blueprint("module", dense, decomp="tt", target=4.0), quantization=quantization)
    meta = read_metadata(older)
    assert served_budget(meta, read_blueprint(older)) == int(dense // meta["ratio"]) >= count_state(net) - 1
    plain = tmp_path / "plain.safetensors"  # float32: the target counts elements
    save(net, plain, blueprint=Blueprint("module", dense, decomp="tt", target=1.5))
    assert served_budget(read_metadata(plain), read_blueprint(plain)) == int(dense // 1.5)
