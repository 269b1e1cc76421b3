import copy
import json
import math

import pytest
import torch
from torch import nn

from compressor.errors import CompressorError, ConfigError, TensorizationError
from compressor.gated_cores import GatedCores
from compressor import layers
from compressor.layers import (TiedTNLinear, TNConv1D, TNConv2d, TNEmbedding, TNLayer, TNLinear, aten_layers,
                               fitted_cores, layer_class, layer_class_for, layer_kinds)

DECOMPS = ["tt", "tr"]
FULL = 10_000  # larger than any useful bond: capped to the exact (full) rank


def _dense_layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(60, 24).double(), lambda: torch.randn(5, 60, dtype=torch.float64)),
        "conv": (nn.Conv2d(6, 20, 3, stride=2, padding=1).double(), lambda: torch.randn(2, 6, 9, 9, dtype=torch.float64)),
        "conv_dilated": (nn.Conv2d(4, 12, (3, 2), padding=(2, 1), dilation=2, bias=False).double(),
                         lambda: torch.randn(2, 4, 8, 8, dtype=torch.float64)),
        "embedding": (nn.Embedding(120, 16, padding_idx=5).double(),
                      lambda: torch.tensor([[5, 0, 119, 7], [3, 5, 64, 1]])),
    }


def _tn(module, decomp, rank=FULL, **kw):
    return layer_class_for(module).from_dense(module, decomp, rank, **kw)


@pytest.mark.parametrize("decomp", DECOMPS)
@pytest.mark.parametrize("name", ["linear", "conv", "conv_dilated", "embedding"])
def test_full_rank_layer_equals_dense(decomp, name):
    dense, make_x = _dense_layers()[name]
    layer = _tn(dense, decomp).eval()
    x = make_x()
    with torch.no_grad():
        assert (layer(x) - dense(x)).abs().max() < 1e-10
        rel = torch.linalg.norm(layer.to_dense().weight - dense.weight) / torch.linalg.norm(dense.weight)
    assert rel < 1e-5


def test_embedding_padding_idx_is_zero_and_gets_no_gradient():
    emb = nn.Embedding(50, 8, padding_idx=2)
    layer = TNEmbedding.from_dense(emb, "tr", 4)
    out = layer(torch.tensor([2, 2]))
    assert torch.equal(out, torch.zeros(2, 8))
    out.sum().backward()
    assert all(c.grad is None or c.grad.abs().max() == 0 for c in layer.cores)


def test_embedding_builds_only_requested_rows_and_pads_prime_vocab():
    emb = nn.Embedding(1009, 16)  # prime vocabulary: padded to a rounder size
    layer = TNEmbedding.from_dense(emb, "tt", FULL).eval()
    assert layer.num_embeddings == 1009 and layer.param_count() < 1009 * 16 * 4
    idx = torch.tensor([0, 1008, 17])
    with torch.no_grad():
        assert (layer(idx) - emb(idx)).abs().max() < 1e-5


@pytest.mark.parametrize("decomp", DECOMPS)
def test_gated_eval_equals_ungated_exactly(decomp):
    dense = nn.Linear(60, 24)
    gated = TNLinear.from_dense(dense, decomp, 6, gated=True).eval()
    plain = TNLinear.from_dense(dense, decomp, 6, gated=False).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gates" not in k})
    x = torch.randn(9, 60)
    assert torch.equal(gated(x), plain(x))


def _close_some(layer):
    removed = {}
    for key, gate in layer.gates.items():
        with torch.no_grad():
            gate.mu[::2] = -0.3  # closed
            gate.mu[1::3] = 0.6  # partly open: the value must be folded into the cores
        removed[int(key)] = int((gate.mu <= 0).sum())
    return removed


@pytest.mark.parametrize("decomp", DECOMPS)
@pytest.mark.parametrize("name", ["linear", "conv", "embedding"])
def test_prune_drops_exactly_closed_slices_and_keeps_outputs(decomp, name):
    dense, make_x = _dense_layers()[name]
    dense = dense.float()
    x = make_x().float() if name != "embedding" else make_x()
    layer = _tn(dense, decomp, 6).eval()
    removed = _close_some(layer)
    ranks = layer.ranks
    with torch.no_grad():
        before = layer(x)
    expected_ranks = [r - removed.get(k, 0) for k, r in enumerate(ranks)]
    modes = layer.modes
    expected_params = sum(expected_ranks[k - 1] * modes[k] * expected_ranks[k] for k in range(len(modes)))
    expected_params += layer.bias.numel() if getattr(layer, "bias", None) is not None else 0
    assert layer.live_param_count() == expected_params
    layer.prune_()
    assert layer.gates is None and layer.ranks == expected_ranks
    assert layer.param_count() == expected_params
    with torch.no_grad():
        assert (layer(x) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("decomp", DECOMPS)
def test_gradients_reach_cores_and_gates(decomp):
    torch.manual_seed(0)
    layer = TNConv2d.from_dense(nn.Conv2d(4, 6, 3), decomp, 3).train()
    loss = layer(torch.randn(2, 4, 6, 6)).pow(2).sum() + layer.gate_penalty()
    loss.backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    assert all(g.mu.grad is not None and g.mu.grad.abs().sum() > 0 for g in layer.gates.values())


def test_expected_param_count_matches_independent_formula():
    import math

    layer = TNLinear.from_dense(nn.Linear(60, 24), "tr", 4)
    with torch.no_grad():
        for g in layer.gates.values():
            g.mu.copy_(torch.linspace(-1, 1.5, g.mu.numel()))
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))
    e = [sum(phi(float(m) / 0.5) for m in layer.gates[str(k)].mu) for k in range(len(layer.modes))]
    ref = sum(e[k - 1] * layer.modes[k] * e[k] for k in range(len(layer.modes)))
    assert abs(float(layer.expected_param_count().detach()) - ref) < 1e-3


def test_spec_round_trip_rebuilds_same_structure():
    for layer in [TNLinear.from_dense(nn.Linear(60, 24), "tr", 4),
                  TNConv2d.from_dense(nn.Conv2d(6, 20, 3, stride=2, padding=1), "tt", 4),
                  TNEmbedding.from_dense(nn.Embedding(120, 16, padding_idx=5), "tr", 3)]:
        layer.prune_()
        rebuilt = TNLayer.from_spec(layer.spec())
        rebuilt.load_state_dict(layer.state_dict())
        assert rebuilt.spec() == layer.spec()


def test_state_dict_keys_are_the_layers_own():
    """The gates and cores live on the layer (GatedCores is its base, not a submodule), so a
    checkpoint's keys name them directly: the layer's own tensors, then cores, then gates."""
    tt = TNLinear.from_dense(nn.Linear(60, 24), "tt", 4)  # modes (6, 10, 4, 6); TT's closing bond has no gate
    assert list(tt.state_dict()) == ["bias", "cores.0", "cores.1", "cores.2", "cores.3",
                                     "gates.0.mu", "gates.1.mu", "gates.2.mu"]
    emb = TNEmbedding.from_dense(nn.Embedding(120, 16, padding_idx=5), "tr", 3)  # modes (4, 5, 6, 4, 4)
    assert isinstance(emb, GatedCores)
    cores = [f"cores.{k}" for k in range(5)]
    assert list(emb.state_dict()) == ["padding_row", *cores, *(f"gates.{k}.mu" for k in range(5))]
    assert list(emb.prune_().state_dict()) == ["padding_row", *cores]


@pytest.mark.parametrize("decomp", DECOMPS)
def test_from_dense_starts_from_the_fitted_cores(decomp):
    dense = nn.Linear(60, 24).double()
    layer = TNLinear.from_dense(dense, decomp, 5, generator=torch.Generator().manual_seed(3))
    tz = (layer.in_modes, layer.out_modes)
    cores = fitted_cores(TNLinear.weight_tensor(dense.weight, tz), layer.modes, decomp, layer.ranks, tz,
                         torch.Generator().manual_seed(3))
    assert all(torch.equal(c, p) for c, p in zip(cores, layer.cores))
    whiten = torch.linalg.cholesky(torch.eye(60, dtype=torch.float64) + 0.1)
    with pytest.raises(ConfigError, match="whole input in one core"):
        fitted_cores(TNLinear.weight_tensor(dense.weight, tz), layer.modes, decomp, layer.ranks, tz, None, whiten)


def test_bad_arguments_raise_compressor_errors():
    lin = nn.Linear(20, 10)
    with pytest.raises(ConfigError, match="positive"):
        TNLinear.from_dense(lin, "tr", 0)
    with pytest.raises(ConfigError, match="unknown decomposition"):
        TNLinear.from_dense(lin, "cp", 3)
    with pytest.raises(TensorizationError, match="multiplies to"):
        TNLinear.from_dense(lin, "tr", 3, tensorization=((4, 4), (2, 5)))
    with pytest.raises(ConfigError, match="groups=2"):
        TNConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), "tr", 3)
    for exc in (ConfigError, TensorizationError):
        assert issubclass(exc, CompressorError)


# ------------------------------------------------------------------ the kind registry
REGISTERED = [("linear", nn.Linear(4, 6), TNLinear, torch.ops.aten.linear.default),
              ("conv2d", nn.Conv2d(2, 4, 3), TNConv2d, torch.ops.aten.conv2d.default),
              ("embedding", nn.Embedding(10, 4), TNEmbedding, torch.ops.aten.embedding.default)]


def test_registry_maps_every_dense_type_to_its_class_and_back():
    assert set(layer_kinds()) == {kind for kind, *_ in REGISTERED} | {"conv1d"}
    for kind, dense, cls, op in REGISTERED:
        assert layer_class_for(dense) is cls and cls.replaces is type(dense)
        assert layer_class(kind) is cls and cls.kind == kind
        assert aten_layers()[op] is cls and cls.aten is op
    assert layer_class_for(nn.ReLU()) is None
    assert TNConv1D.replaces_path == "transformers.pytorch_utils.Conv1D" and TNConv1D.replaces is None


def test_a_subclass_is_replaced_unless_it_computes_something_else():
    class Plain(nn.Linear):  # same forward: the same computation
        pass

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert layer_class_for(Plain(4, 4)) is TNLinear and TNLinear.support_reason(Plain(4, 4)) is None
    assert layer_class_for(Scaled(4, 4)) is TNLinear
    assert TNLinear.support_reason(Scaled(4, 4)) == "subclass Scaled of Linear overrides forward"
    assert "grouped" in TNConv2d.support_reason(nn.Conv2d(4, 4, 3, groups=2))
    for bad in ("lstm", None, 3):
        with pytest.raises(ConfigError, match="unknown factorized layer kind"):
            layer_class(bad)
    with pytest.raises(ConfigError, match="unknown factorized layer kind 'lstm'"):
        TNLayer.from_spec({"kind": "lstm"})
    with pytest.raises(ConfigError, match="does not describe a TNConv2d"):
        TNConv2d.from_spec(TNLinear.from_dense(nn.Linear(60, 24), "tr", 3).spec())


def test_subclass_without_kind_registers_nothing_and_a_taken_kind_is_refused():
    class Variant(TNLinear):
        pass

    assert Variant.kind == "linear" and layer_class("linear") is TNLinear
    with pytest.raises(ConfigError, match="already registered"):
        class Clash(TNLinear, kind="linear"):
            pass
    with pytest.raises(ConfigError, match="already registered"):
        class Clash2(TNLinear, kind="linear2", replaces=nn.Linear):
            pass
    assert layer_class("linear") is TNLinear and "linear2" not in layer_kinds()


def test_unsupported_reason_is_the_one_check_of_from_dense():
    grouped, circular = nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding_mode="circular")
    assert TNConv2d.unsupported_reason(grouped) == "grouped convolution (groups=2) is not supported"
    assert "padding_mode='circular'" in TNConv2d.unsupported_reason(circular)
    assert TNConv2d.unsupported_reason(nn.Conv2d(4, 4, 3)) is None
    assert "max_norm" in TNEmbedding.unsupported_reason(nn.Embedding(10, 4, max_norm=1.0))
    assert TNLinear.unsupported_reason(nn.Linear(4, 4)) is None
    for module in (grouped, circular):
        with pytest.raises(ConfigError, match=TNConv2d.unsupported_reason(module).split(" ")[0]):
            TNConv2d.from_dense(module, "tr", 3)


def test_tensorization_defaults_and_overrides():
    assert TNLinear.tensorization((24, 60)) == ((6, 10), (4, 6))
    assert TNLinear.tensorization((24, 60), ((3, 20), (24,))) == ((3, 20), (24,))
    with pytest.raises(TensorizationError, match="input channels"):
        TNConv2d.tensorization((20, 6, 3, 3), ((4,), (4, 5)))
    vocab, dim = TNEmbedding.tensorization((1009, 16))  # prime vocabulary: padded
    assert math.prod(vocab) >= 1009 and math.prod(dim) == 16
    with pytest.raises(TensorizationError, match="at least 100"):
        TNEmbedding.tensorization((100, 12), ((5, 5), (3, 4)))
    assert TNConv2d.core_modes((20, 6, 3, 3), ((6,), (4, 5))) == (6, 9, 4, 5)
    assert TNConv2d.core_modes((20, 6, 3, 3), ((6,), (4, 5)), merge_spatial=True) == (54, 4, 5)
    assert TNConv2d.core_modes((20, 6, 1, 1), ((6,), (4, 5))) == (6, 4, 5)  # a 1x1 kernel has no spatial core


SPEC_CASES = {
    "linear": lambda: TNLinear.from_dense(nn.Linear(60, 24), "tr", 4),
    "linear_no_bias": lambda: TNLinear.from_dense(nn.Linear(60, 24, bias=False), "tt", 3),
    "conv": lambda: TNConv2d.from_dense(nn.Conv2d(6, 20, 3, stride=2, padding=1), "tt", 4),
    "conv_merged": lambda: TNConv2d.from_dense(nn.Conv2d(6, 20, 3, padding=1), "tt", 5, merge_spatial=True),
    "conv_merged_tr": lambda: TNConv2d.from_dense(nn.Conv2d(4, 12, (3, 2), padding="same", bias=False), "tr", 3,
                                                  merge_spatial=True),
    "embedding": lambda: TNEmbedding.from_dense(nn.Embedding(120, 16, padding_idx=5), "tr", 3),
    "embedding_padded": lambda: TNEmbedding.from_dense(nn.Embedding(1009, 16), "tt", 4),
}


@pytest.mark.parametrize("name", sorted(SPEC_CASES))
def test_spec_round_trip_and_size_from_spec(name):
    layer = SPEC_CASES[name]()
    for stage in ("gated", "pruned"):
        if stage == "pruned":
            _close_some(layer)
            layer.prune_()
        spec = layer.spec()
        rebuilt = TNLayer.from_spec(json.loads(json.dumps(spec)))  # through JSON, as in a checkpoint
        assert type(rebuilt) is type(layer) and not rebuilt.gated
        assert rebuilt.spec() == spec and type(layer).from_spec(spec).spec() == spec
        modes, params = TNLayer.spec_size(spec)
        assert modes == layer.modes == rebuilt.modes
        assert params == layer.param_count() == rebuilt.param_count()


def test_format_version_1_specs_load_and_are_written_unchanged():
    """Specs exactly as version-1 checkpoints hold them (key order included)."""
    v1 = [
        {"kind": "conv2d", "decomp": "tt", "in_channels": 6, "out_channels": 20, "kernel_size": [3, 3],
         "in_modes": [6], "out_modes": [4, 5], "ranks": [5, 5, 1], "stride": [1, 1], "dilation": [1, 1],
         "padding": [1, 1], "bias": True, "sigma": 0.5, "merge_spatial": True},
        {"kind": "linear", "decomp": "tr", "in_features": 60, "out_features": 24, "in_modes": [6, 10],
         "out_modes": [4, 6], "ranks": [4, 4, 4, 4], "bias": False, "sigma": 0.5},
        {"kind": "embedding", "decomp": "tr", "num_embeddings": 1009, "embedding_dim": 16,
         "vocab_modes": [2, 2, 11, 23], "dim_modes": [4, 4], "ranks": [2, 3, 3, 3, 3, 3], "padding_idx": 3,
         "sigma": 0.5},
    ]
    made = [SPEC_CASES["conv_merged"](), TNLinear.from_dense(nn.Linear(60, 24, bias=False), "tr", 4),
            TNEmbedding.from_dense(nn.Embedding(1009, 16, padding_idx=3), "tr", 3)]
    for spec, layer in zip(v1, made):
        assert json.dumps(layer.spec()) == json.dumps(spec)
        assert json.dumps(TNLayer.from_spec(spec).spec()) == json.dumps(spec)
    conv = SPEC_CASES["conv"]().spec()
    old = {k: v for k, v in conv.items() if k not in ("sigma", "merge_spatial")}  # written before those keys
    assert TNLayer.from_spec(old).sigma == 0.5 and not TNLayer.from_spec(old).merge_spatial
    with pytest.raises(ConfigError, match="lacks ranks"):
        TNLayer.from_spec({k: v for k, v in v1[1].items() if k != "ranks"})


def test_inspect_reports_merge_spatial_conv_checkpoint(tmp_path):
    """The svd layout gives convs one merged (C_in*kh*kw) mode; inspect must size them right."""
    from click.testing import CliRunner

    import compressor
    from compressor.cli import main
    from compressor.data import TensorLoader
    from compressor.surgery import tn_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(32, 5)).eval()
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,))
    res = compressor.compress(model, TensorLoader(x, y, 32), "tt", "2x", rank_select="svd", epochs=1)
    layers = tn_layers(res.model)
    assert any(getattr(layer, "merge_spatial", False) for layer in layers.values())
    path = compressor.save(res.model, tmp_path / "slim.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes else "")
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    for name, layer in layers.items():
        cells = [c.strip() for c in rows[name].split("│")]
        assert cells[4] == "(" + ",".join(map(str, layer.modes)) + ")"
        assert cells[6] == f"{layer.param_count():,}"


# ------------------------------------------------------------------ tied layers and GPT-2's Conv1D
@pytest.mark.parametrize("decomp", DECOMPS)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_a_head_tied_to_an_embedding_computes_x_times_the_table(decomp, padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(103, 24, padding_idx=padding_idx)  # 103 is prime: the vocabulary is padded to split
    with torch.no_grad():
        emb.weight[3] = torch.linspace(-1, 1, 24)
    head = nn.Linear(24, 103)
    head.weight = emb.weight
    layer = TNEmbedding.from_dense(emb, decomp, FULL, gated=False)
    assert math.prod(layer.vocab_modes) > 103
    tied = TiedTNLinear.from_dense(head, layer)
    assert tied.bias is head.bias and [p for p in tied.parameters()] == [head.bias]
    x = torch.randn(4, 5, 24)
    with torch.no_grad():
        assert (tied(x) - head(x)).abs().max() < 1e-4
        assert (tied.weight - emb.weight).abs().max() < 1e-5
    low = TNEmbedding.from_dense(emb, decomp, 3, gated=False)  # any rank: the head reads the table the embedding holds
    with torch.no_grad():
        table = low(torch.arange(103))
        assert (TiedTNLinear(low)(x) - x @ table.T).abs().max() < 1e-4


def test_a_linear_tied_to_a_linear_shares_its_cores_with_a_bias_of_its_own():
    torch.manual_seed(0)
    a, b = nn.Linear(24, 36), nn.Linear(24, 36)
    b.weight = a.weight
    layer = TNLinear.from_dense(a, "tr", FULL, gated=False)
    tied = TiedTNLinear.from_dense(b, layer)
    x = torch.randn(7, 24)
    with torch.no_grad():
        assert (tied(x) - b(x)).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="cannot share"):
        TiedTNLinear.from_dense(nn.Linear(36, 24), layer)
    with pytest.raises(ConfigError, match="shares the cores of an embedding or a Linear"):
        TiedTNLinear(TNConv2d.from_dense(nn.Conv2d(4, 6, 3), "tr", 4))


def test_in_training_the_tied_layer_uses_the_gate_sample_of_the_same_step():
    torch.manual_seed(0)
    layer = TNEmbedding.from_dense(nn.Embedding(60, 24), "tr", 6)  # gated
    tied = TiedTNLinear(layer)
    layer.train()
    with torch.no_grad():
        for gate in layer.gates.values():
            gate.mu.fill_(0.5)  # noise then changes every sample
    x = torch.randn(3, 24)
    layer(torch.arange(5))
    _, sampled = layer.__dict__["_sample"]
    expected = x @ layer.dense_weight(sampled).T
    assert (tied(x) - expected).abs().max() < 1e-5  # the embedding's sample, not a fresh one
    assert "_sample" not in layer.__dict__  # used once
    assert (tied(x) - expected).abs().max() > 1e-3  # no embedding forward since: a new sample
    layer(torch.arange(5))
    stale = x @ layer.dense_weight(layer.__dict__["_sample"][1]).T
    copy_of = copy.deepcopy(nn.ModuleDict({"emb": layer, "head": tied}))  # a pending sample is not copied
    assert copy_of["head"].source is copy_of["emb"] and "_sample" not in copy_of["emb"].__dict__
    with torch.no_grad():
        layer.cores[0].add_(0.0)  # an optimizer step in between: that sample is not reused
    assert (tied(x) - stale).abs().max() > 1e-3


def test_conv1d_is_a_linear_stored_transposed():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv = pytorch_utils.Conv1D(36, 24)  # nf=out, nx=in: weight (24, 36)
    assert layer_class_for(conv) is TNConv1D and TNConv1D.support_reason(conv) is None
    assert tuple(TNConv1D.dense_view(conv).weight.shape) == (36, 24)
    layer = TNConv1D.from_dense(conv, "tt", FULL, gated=False)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert (layer(x) - conv(x)).abs().max() < 1e-5
        assert (layer.weight - conv.weight).abs().max() < 1e-5
    back = TNLayer.from_spec(json.loads(json.dumps(layer.spec())))
    assert type(back) is TNConv1D and back.spec() == layer.spec()
    dense = layer.to_dense()
    assert type(dense) is pytorch_utils.Conv1D and (dense(x) - conv(x)).abs().max() < 1e-5


# ------------------------------------------------------------------ evaluation without grad (weight_cache.py)
def _served(layer, x):
    with torch.no_grad():
        return layer(x)


def _computed(layer, x):
    with torch.enable_grad():
        return layer(x).detach()


@pytest.mark.parametrize("decomp", DECOMPS)
@pytest.mark.parametrize("rank", [2, FULL])  # the two matrices at the cut, or the dense weight when smaller
def test_served_layers_compute_what_the_cores_do(decomp, rank):
    torch.manual_seed(0)
    for name, (dense, make_x) in _dense_layers().items():
        layer = _tn(dense, decomp, rank).eval()
        if layer.gates is not None:
            _close_some(layer)  # gate values folded into what is kept
        x = make_x()
        assert torch.allclose(_served(layer, x), _computed(layer, x), rtol=1e-9, atol=1e-9), name
        assert len(layer.__dict__["_frozen"]) == 1
    layer = _tn(nn.Linear(60, 24).double(), decomp, rank, gated=False).eval()
    mats = layer.serving_matrices()
    assert len(mats) == (2 if rank == 2 else 1)
    assert sum(m.numel() for m in mats) <= 60 * 24


def test_kept_matrices_are_laid_out_along_their_longer_side():
    """A batch-1 product streams a weight fastest along its long side (gemv_layout): the wide
    second factor is the transposed view of an (r x out) matrix, the first factor (r x in) is
    contiguous; either way F.linear computes the same numbers."""
    torch.manual_seed(0)
    for in_f, out_f in ((60, 24), (24, 60)):
        layer = TNLinear.from_dense(nn.Linear(in_f, out_f).double(), "tt", 3, ((in_f,), (out_f,)), gated=False).eval()
        first, second = layer.serving_matrices()
        assert first.shape == (3, in_f) and first.is_contiguous()
        assert second.shape == (out_f, 3) and second.stride() == (1, out_f)  # memory runs along out
        x = torch.randn(1, in_f, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-10)
    wide = torch.randn(50, 7)
    assert layers.gemv_layout(wide).stride() == (1, 50) and torch.equal(layers.gemv_layout(wide), wide)
    assert layers.gemv_layout(wide.T).is_contiguous()


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_a_served_tied_head_computes_what_its_cores_do(padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(103, 24, padding_idx=padding_idx)
    for rank in (2, FULL):
        source = TNEmbedding.from_dense(emb, "tr", rank, gated=False).eval()
        tied = TiedTNLinear(source, bias=True).eval()
        x = torch.randn(4, 5, 24)
        assert torch.allclose(_served(tied, x), _computed(tied, x), atol=1e-5)
    linear = TNLinear.from_dense(nn.Linear(24, 36), "tr", 3, gated=False).eval()
    tied = TiedTNLinear(linear).eval()
    x = torch.randn(7, 24)
    assert torch.allclose(_served(tied, x), _computed(tied, x), atol=1e-5)


def _changes():
    """Ways a layer's weights change after it was served once; each must be seen."""
    def step(layer):
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        with torch.enable_grad():
            layer.train()
            layer(torch.randn(3, 60)).square().sum().backward()
            layer.eval()
        opt.step()

    def load(layer):
        state = {k: v + 0.1 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)

    def copy_in_place(layer):
        with torch.no_grad():
            layer.cores[1].mul_(1.5)

    def assign_data(layer):
        layer.cores[0].data = layer.cores[0].data * 2

    def gate(layer):
        with torch.no_grad():
            layer.gates["0"].mu[0] = -1.0

    def through_data_then_eval(layer):
        layer.cores[2].data.mul_(3.0)  # invisible to version counters: eval() drops what is kept
        layer.eval()

    def prune(layer):
        with torch.no_grad():
            layer.gates["1"].mu[::2] = -1.0
        layer.prune_()

    return [step, load, copy_in_place, assign_data, gate, through_data_then_eval, prune]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_what_a_served_layer_keeps_is_made_again_when_its_weights_change(change, kind):
    torch.manual_seed(0)
    dense = {"linear": nn.Linear(60, 24), "conv": nn.Conv2d(60, 24, 1), "embedding": nn.Embedding(60, 24)}[kind]
    layer = _tn(dense, "tr", 4).eval()  # gated
    x = {"linear": torch.randn(5, 60), "conv": torch.randn(2, 60, 3, 3),
         "embedding": torch.tensor([[1, 59, 7]])}[kind]
    before = _served(layer, x)
    if kind == "linear" or change.__name__ != "step":
        change(layer)
    else:
        with torch.no_grad():
            layer.cores[0].add_(1.0)
    after = _served(layer, x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, _computed(layer, x), atol=1e-5)


def test_nothing_is_kept_in_training_with_grad_or_while_exporting():
    torch.manual_seed(0)
    layer = TNLinear.from_dense(nn.Linear(60, 24), "tr", 4, gated=False)
    x = torch.randn(5, 60)
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)  # grad on: autograd must reach the cores
    assert len(layer.__dict__.get("_frozen", ())) == 0
    program = torch.export.export(layer, (torch.randn(4, 60),), dynamic_shapes=({0: torch.export.Dim("b")},))
    assert len(layer.__dict__.get("_frozen", ())) == 0
    assert torch.allclose(program.module()(x), _computed(layer, x), atol=1e-5)
    with torch.inference_mode():
        layer(x)
    assert len(layer.__dict__["_frozen"]) == 1
    layer.train()
    assert len(layer.__dict__["_frozen"]) == 0
    layer.eval()
    layer.weight_cache = False
    with torch.no_grad():
        layer(x)
    assert len(layer.__dict__["_frozen"]) == 0
    copied = copy.deepcopy(layer)
    assert "_frozen" not in copied.__dict__ or len(copied.__dict__["_frozen"]) == 0
