"""A start fitted to activations (--init activations): input statistics from a calibration
pass, the whitened truncation folded back exactly, and what it buys on anisotropic inputs."""

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compressor import compress
from compressor.calibration import input_grams, whitening
from compressor.cli import main
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.errors import ConfigError, TargetError
from compressor.plan import StartFactors
from compressor.planner import plan
from compressor.surgery import apply, tn_layers
from compressor.layers import TNLinear
from compressor.selectors import get_selector


def _anisotropic(n: int, dim: int, seed: int, live: int | None = None) -> torch.Tensor:
    """Inputs whose directions differ in scale by 100x (or: ``live`` directions at 1, the rest
    at 1e-3), mixed over all channels, as transformer activations are."""
    g = torch.Generator().manual_seed(seed)
    mix, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    scales = torch.logspace(0, -2, dim) if live is None else (torch.arange(dim) < live) + 1e-3
    return (torch.randn(n, dim, generator=g) * scales) @ mix.T


class TwoLayers(nn.Module):
    def __init__(self, dim: int = 48, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _output_error(layer: nn.Module, dense: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x) - dense(x)).norm() / (dense(x) - dense.bias).norm())


def test_whitening_factors_the_gram_matrix_and_survives_a_dead_channel():
    x = _anisotropic(500, 16, seed=1).double()
    gram = x.T @ x
    factor = whitening(gram)
    assert torch.allclose(factor @ factor.T, gram, rtol=0, atol=1e-5 * float(gram.diagonal().mean()))
    assert torch.equal(factor, torch.tril(factor))
    x[:, 3] = 0  # a channel that never fires: G is singular, a ridge makes it positive definite
    dead = whitening(x.T @ x)
    assert torch.isfinite(dead).all() and float(dead[3, 3]) > 0


def test_input_grams_are_the_inputs_gram_matrices_with_padding_left_out():
    model = TwoLayers(dim=8, hidden=6)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    class Keyword(nn.Module):  # a dict batch: inputs by keyword, an attention_mask beside them
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs, attention_mask=None):
            return self.inner(inputs)

    wrapped = Keyword()
    the_plan = plan(wrapped, CompressConfig(min_params=1).plan_options())
    grams = input_grams(wrapped, the_plan, [{"inputs": x, "attention_mask": mask}], batches=1)
    real = x[mask.bool()].double()
    assert torch.allclose(grams["inner.fc1"], real.T @ real, atol=1e-10)
    hidden = torch.tanh(model.fc1(real.float())).double()
    assert torch.allclose(grams["inner.fc2"], hidden.T @ hidden, atol=1e-5)


@pytest.mark.parametrize("decomp", ["tt", "tr"])
def test_the_whitening_folds_back_exactly_at_full_rank(decomp):
    torch.manual_seed(0)
    dense = nn.Linear(24, 20)
    x = _anisotropic(400, 24, seed=2)
    factor = whitening(x.double().T @ x.double())
    layer = TNLinear.from_dense(dense, decomp, rank=[20, 5, 1 if decomp == "tt" else 2],
                                tensorization=((24,), (4, 5)), gated=False, whiten=factor)
    with torch.no_grad():
        assert torch.allclose(layer.dense_weight(), dense.weight, atol=1e-5)


def test_a_whitened_truncation_has_the_least_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    dense = nn.Linear(32, 32)
    x = _anisotropic(1000, 32, seed=3)
    factor = whitening(x.double().T @ x.double())
    for rank in (2, 4, 8):
        white = TNLinear.from_dense(dense, "tt", rank=[rank, 1], tensorization=((32,), (32,)), gated=False,
                                    whiten=factor)
        plain = TNLinear.from_dense(dense, "tt", rank=[rank, 1], tensorization=((32,), (32,)), gated=False)
        # The Eckart-Young bound of the whitened weight is the output error the layer achieves.
        s = torch.linalg.svdvals(factor.T @ dense.weight.detach().T.double())
        bound = math.sqrt(float((s[rank:] ** 2).sum() / (s ** 2).sum()))
        assert _output_error(white, dense, x) == pytest.approx(bound, rel=1e-3)
        assert _output_error(white, dense, x) < 0.9 * _output_error(plain, dense, x)


def test_a_whitened_multi_mode_input_is_refused_with_one_line():
    dense = nn.Linear(24, 20)
    with pytest.raises(ConfigError, match="whole input in one core"):
        TNLinear.from_dense(dense, "tt", rank=4, tensorization=((4, 6), (20,)), gated=False,
                            whiten=torch.eye(24, dtype=torch.float64))


def _start(model: nn.Module, x: torch.Tensor, config: CompressConfig):
    the_plan = plan(model, config.plan_options())
    loader = TensorLoader(x, None, 100)
    whiten = None
    if config.init == "activations":
        grams = input_grams(model, the_plan, loader, config.calibration_batches)
        whiten = StartFactors({n: whitening(g) for n, g in grams.items()})
    options = config.selector_options()
    starts, start = get_selector("l0").prepare(the_plan, model, options, whiten)
    gm = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed,
               make_gate=get_selector("l0").gate_factory(options)).model.eval()
    return the_plan, start, gm


def test_an_activations_start_keeps_each_layer_output_within_its_recorded_error():
    model = TwoLayers()
    x = _anisotropic(800, 48, seed=4, live=8)
    config = CompressConfig(target=2, init="activations", start_error=0.05, min_params=1)
    the_plan, start, gm = _start(model, x, config)
    layers = tn_layers(gm)
    assert {s.name for s in start.layers if s.whitened} == {"fc1", "fc2"}
    st = next(s for s in start.layers if s.name == "fc1")
    assert st.layout.modes[0] == 48  # the whole input in the first core, where the whitening folds back
    assert _output_error(layers["fc1"], model.fc1, x) <= st.error + 1e-4
    assert st.faithful and st.params < st.dense  # the inputs live in few directions: a small start suffices
    plain_plan, plain, _ = _start(model, x, CompressConfig(target=2, start="faithful", start_error=0.05,
                                                            min_params=1))
    assert next(s for s in plain.layers if s.name == "fc1").params > st.params


def test_compress_with_an_activations_start_reports_it_and_meets_the_target():
    model = TwoLayers()
    x = _anisotropic(600, 48, seed=5, live=8)
    with torch.no_grad():
        y = model(x).argmax(-1)
    loader = TensorLoader(x, y, 50, shuffle=True)
    result = compress(model, loader, "tr", "3x", init="activations", calibration_batches=4, epochs=2,
                      min_params=1, eval_loader=TensorLoader(x, y, 200))
    rep = result.report
    assert rep.start["chosen"] == "faithful" and rep.start["whitened"] == 2
    assert 3.0 <= rep.ratio <= 3.15
    assert rep.start["accuracy"] >= 0.9  # the start reproduces what the layers do on these inputs


@pytest.mark.parametrize("options, message", [
    ({"start": "ladder"}, "cannot be combined"),
    ({"rank": 8}, "cannot be combined"),
    ({"rank_select": "energy"}, "chooses its ranks itself"),
])
def test_activations_with_options_it_cannot_honour_is_one_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        CompressConfig(init="activations", **options)


def test_the_cli_takes_init_and_refuses_a_contradiction_with_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "m.pt2"), "--target", "2x", "--data", "digits",
                                       "--init", "activations", "--start", "ladder"])
    assert result.exit_code == 2
    assert "cannot be combined" in result.output and "Traceback" not in result.output


def _fidelity(model: nn.Module, slim: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((slim(x) - model(x)).norm() / model(x).norm())


def test_whitened_svd_fits_outputs_better_than_svd_at_the_same_ratio_without_fine_tuning():
    model = TwoLayers()
    x = _anisotropic(600, 48, seed=6, live=12)
    loader = TensorLoader(x, None, 100)
    results = {name: compress(model, loader, "tt", "2x", rank_select=name, epochs=0, min_params=1)
               for name in ("svd", "whitened-svd")}
    for name, res in results.items():
        assert 2.0 <= res.report.ratio <= 2.1, (name, res.report.ratio)
        assert res.history.steps == 0
    white, plain = (_fidelity(model, results[n].model, x) for n in ("whitened-svd", "svd"))
    assert white < 0.5 * plain, (white, plain)
    layer = tn_layers(results["whitened-svd"].model)["fc1"]
    assert layer.modes == (48, 64) and layer.ranks[-1] == 1  # two factors: input core x output core


class Lookup(nn.Module):
    """A large embedding before two Linear layers: the shape of a language model's budget."""

    def __init__(self, vocab: int = 100, dim: int = 32, hidden: int = 128):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, input_ids):
        return self.fc2(torch.tanh(self.fc1(self.embed(input_ids))))


def test_svd_llm_keeps_one_share_in_every_layer_and_the_embedding_dense():
    from compressor.selectors import same_ratio_ranks

    model = Lookup()
    ids = torch.randint(0, 100, (40, 10), generator=torch.Generator().manual_seed(0))
    loader = [{"input_ids": ids[i:i + 10]} for i in range(0, 40, 10)]
    res = compress(model, loader, "tt", "1.25x", rank_select="svd-llm", epochs=0, min_params=1)
    assert 1.25 <= res.report.ratio <= 1.3, res.report.ratio
    layers = tn_layers(res.model)
    assert set(layers) == {"fc1", "fc2"} and isinstance(res.model.embed, nn.Embedding)  # untouched
    assert torch.equal(res.model.embed.weight, model.embed.weight)
    shares = {name: layer.ranks[0] * sum(layer.modes) / math.prod(layer.modes) for name, layer in layers.items()}
    assert abs(shares["fc1"] - shares["fc2"]) < 0.05, shares  # one share, up to rounding a rank down
    # the share is the largest that meets the target: one more rank everywhere would miss it
    the_plan = plan(model, CompressConfig(min_params=1, rank_select="svd-llm").plan_options())
    from compressor.plan import Skipped, plan_params
    from compressor.selectors import svd_layout
    the_plan = the_plan.leaving_dense([Skipped("embed", "embedding", "dense")])  # as the selector leaves it
    ranks = same_ratio_ranks(the_plan, 1.25)
    assert "embed" not in ranks and [ranks["fc1"], ranks["fc2"]] == [layers["fc1"].ranks[0], layers["fc2"].ranks[0]]
    bigger = {n: [r + 1, 1] for n, r in ranks.items()}
    assert the_plan.dense_params / plan_params(the_plan, bigger, "tt", svd_layout(the_plan)) < 1.25


def test_svd_llm_says_when_the_embedding_alone_is_too_big_for_the_target():
    model = Lookup(vocab=2000)
    ids = torch.randint(0, 2000, (20, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TargetError, match="cannot reach 3x, even at rank 1 with the embeddings dense"):
        compress(model, [{"input_ids": ids}], "tt", "3x", rank_select="svd-llm", epochs=0, min_params=1)


class Tokens(nn.Module):
    """An embedding read by token ids, with an attention mask beside them (a dict batch)."""

    def __init__(self, vocab: int = 60, dim: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def _zipf_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Token ids with a Zipf-like law over the first half of the vocabulary; the rest never occurs."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab // 2 + 1).double()
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g).reshape(-1, 10)


def test_an_embedding_is_calibrated_by_token_counts_with_padding_left_out():
    model = Tokens()
    ids = _zipf_ids(200, 60, seed=1)
    mask = torch.ones_like(ids)
    mask[:5, 6:] = 0
    the_plan = plan(model, CompressConfig(min_params=1).plan_options())
    grams = input_grams(model, the_plan, [{"input_ids": ids, "attention_mask": mask}], batches=1)
    assert torch.equal(grams["embed"], torch.bincount(ids[mask.bool()], minlength=60).double())
    factor = whitening(grams["embed"])
    assert factor.dim() == 1 and bool((factor > 0).all())  # unseen tokens keep a small positive weight
    assert torch.allclose(factor[ids[0, 0]] ** 2, grams["embed"][ids[0, 0]], rtol=1e-4)


def test_token_counts_cover_more_batches_than_the_activations_and_stop_each_forward_at_the_embedding():
    model = Tokens()
    ids = _zipf_ids(400, 60, seed=4)
    loader = [{"input_ids": ids[i:i + 4]} for i in range(0, 40, 4)]  # 10 batches
    heads_run = []
    model.head.register_forward_pre_hook(lambda mod, args: heads_run.append(1))
    the_plan = plan(model, CompressConfig(min_params=1).plan_options())
    grams = input_grams(model, the_plan, loader, batches=2, count_batches=6)
    assert torch.equal(grams["embed"], torch.bincount(ids[:24].reshape(-1), minlength=60).double())
    x = model.embed(ids[:8]).detach().reshape(-1, 24)
    assert torch.allclose(grams["head"], (x.T @ x).double(), rtol=1e-4, atol=1e-4)  # activations: the first 2 only
    assert len(heads_run) == 2  # the 4 counting batches stopped before the head


def test_counting_stops_at_the_activations_batches_when_an_embedding_is_not_reached():
    class Skips(Tokens):  # the embedding runs only on the first two calls
        calls = 0

        def forward(self, input_ids, attention_mask=None):
            self.calls += 1
            x = self.embed(input_ids) if self.calls <= 2 else torch.zeros(*input_ids.shape, 24)
            return self.head(x)

    model = Skips()
    ids = _zipf_ids(400, 60, seed=5)
    loader = [{"input_ids": ids[i:i + 4]} for i in range(0, 40, 4)]
    the_plan = plan(model, CompressConfig(min_params=1).plan_options())
    model.calls = 0  # planning traced the forward once
    grams = input_grams(model, the_plan, loader, batches=2, count_batches=6)
    assert torch.equal(grams["embed"], torch.bincount(ids[:8].reshape(-1), minlength=60).double())
    assert model.calls == 3  # one whole forward found the embedding unreached, then counting stopped


def test_a_count_weighted_embedding_start_fits_the_rows_the_text_looks_up_and_projects_the_rest():
    from compressor.layers import TNEmbedding

    model = Tokens(vocab=60, dim=24)
    ids = _zipf_ids(2000, 60, seed=2)
    counts = torch.bincount(ids.reshape(-1), minlength=60).double()
    factor = whitening(counts)
    e = model.embed.weight.detach().double()
    for rank in (3, 6):
        white = TNEmbedding.from_dense(model.embed, "tt", rank=[rank, 1], tensorization=((60,), (24,)), gated=False,
                                       whiten=factor)
        plain = TNEmbedding.from_dense(model.embed, "tt", rank=[rank, 1], tensorization=((60,), (24,)), gated=False)

        def looked_up_error(layer):  # the error of what the text actually reads, token by token
            with torch.no_grad():
                return float((layer(ids) - model.embed(ids)).norm() / model.embed(ids).norm())
        assert looked_up_error(white) < 0.9 * looked_up_error(plain)
        # every row (seen or not) is its own projection on the kept directions: nothing is dropped
        with torch.no_grad():
            rows = white(torch.arange(60)).double()
        _, _, vh = torch.linalg.svd(factor[:, None] * e, full_matrices=False)
        projection = e @ vh[:rank].T @ vh[:rank]
        assert torch.allclose(rows, projection, atol=1e-4)


def test_an_activations_start_weighs_the_embedding_by_counts_on_a_real_batch():
    model = Tokens(vocab=60, dim=24)
    ids = _zipf_ids(400, 60, seed=3)
    config = CompressConfig(target=1.5, init="activations", start_error=0.05, min_params=1)
    the_plan = plan(model, config.plan_options())
    loader = [{"input_ids": ids[i:i + 10]} for i in range(0, 40, 10)]
    grams = input_grams(model, the_plan, loader, 4)
    whiten = StartFactors({n: whitening(g) for n, g in grams.items()})
    _, start = get_selector("l0").prepare(the_plan, model, config.selector_options(), whiten)
    assert {s.name for s in start.layers if s.whitened} == {"embed", "head"}
    emb = next(s for s in start.layers if s.name == "embed")
    assert emb.layout.modes[0] == 60  # the whole vocabulary in one core, where the counts fold back
