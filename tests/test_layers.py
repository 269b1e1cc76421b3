import pytest
import torch
from torch import nn

from compressor.errors import CompressorError, ConfigError, TensorizationError
from compressor.layers import TNConv2d, TNEmbedding, TNLayer, TNLinear

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
    cls = {nn.Linear: TNLinear, nn.Conv2d: TNConv2d, nn.Embedding: TNEmbedding}[type(module)]
    return cls.from_dense(module, decomp, rank, **kw)


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
