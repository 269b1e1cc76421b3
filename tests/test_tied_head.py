"""A tied embedding is also its LM head: an activations start weighs its rows by token counts
and its columns by what the head sees (the final hidden states), and folds both back."""

import pytest
import torch
from torch import nn

from compressor import compress
from compressor.calibration import input_grams, start_factors, whitening
from compressor.config import CompressConfig
from compressor.errors import ConfigError
from compressor.planner import plan
from compressor.surgery import apply, tn_layers
from compressor.layers import TNEmbedding
from compressor.refit import refit_layers
from compressor.selectors import get_selector
from test_calibration import _anisotropic, _zipf_ids

VOCAB, DIM = 60, 24
MATRIX = ((VOCAB,), (DIM,))


class TiedLM(nn.Module):
    """Embedding, a fixed body that scales hidden directions 100x apart, and a head sharing the
    embedding's weight: the shape of a causal LM's ends."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("body", _anisotropic(DIM, DIM, seed=4) * 4)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids) @ self.body)


def _calibrated(model: TiedLM, ids: torch.Tensor):
    the_plan = plan(model, CompressConfig(min_params=1).plan_options())
    loader = [{"input_ids": ids[i:i + 20]} for i in range(0, len(ids), 20)]
    return the_plan, input_grams(model, the_plan, loader, len(loader))


def _start(model: TiedLM, rank: int, factor=None, head=None) -> TNEmbedding:
    return TNEmbedding.from_dense(model.embed, "tt", rank=[rank, 1], tensorization=MATRIX, gated=False,
                                  whiten=factor, whiten_out=head)


def test_calibration_observes_the_tied_head_and_factors_its_gram_matrix():
    model = TiedLM()
    ids = _zipf_ids(800, VOCAB, seed=5)
    the_plan, grams = _calibrated(model, ids)
    assert [lp.name for lp in the_plan.layers] == ["embed"] and the_plan.layers[0].tied == ("head",)
    hidden = (model.embed(ids) @ model.body).detach().reshape(-1, DIM).double()
    assert torch.allclose(grams["head"], hidden.T @ hidden, rtol=1e-5)
    factors = start_factors(model, the_plan, grams)
    assert set(factors.inputs) == {"embed"} and set(factors.heads) == {"embed"}
    assert torch.allclose(factors.heads["embed"], whitening(grams["head"]))


def test_the_two_sided_start_is_the_weighted_truncation_folded_back_and_fits_the_head_better():
    model = TiedLM()
    ids = _zipf_ids(800, VOCAB, seed=5)
    the_plan, grams = _calibrated(model, ids)
    factors = start_factors(model, the_plan, grams)
    counts, head = factors.inputs["embed"], factors.heads["embed"]
    e = model.embed.weight.detach().double()
    with torch.no_grad():
        dense_logits = model(ids)
    for rank in (4, 8):
        both = _start(model, rank, counts, head)
        u, s, vh = torch.linalg.svd(counts[:, None] * e @ head, full_matrices=False)
        reference = torch.linalg.solve_triangular(head, (u[:, :rank] * s[:rank]) @ vh[:rank], upper=False,
                                                  left=False) / counts[:, None]
        with torch.no_grad():
            rows = both(torch.arange(VOCAB)).double()
        assert torch.allclose(rows, reference, atol=1e-4 * float(e.abs().max()))

        def head_error(layer):  # the logits of the tied head with this layer's table, on the text
            with torch.no_grad():
                table = layer(torch.arange(VOCAB))
                logits = (model.embed(ids) @ model.body) @ table.T
            return float((logits - dense_logits).norm() / dense_logits.norm())
        assert head_error(both) < 0.7 * head_error(_start(model, rank, counts))


def test_an_activations_start_and_its_refit_fit_a_tied_embedding_to_both_sides():
    model = TiedLM()
    ids = _zipf_ids(800, VOCAB, seed=6)
    config = CompressConfig(target=1.5, init="activations", start_error=0.05, min_params=1, decomp="tt")
    the_plan, grams = _calibrated(model, ids)
    starts, start = get_selector("l0").prepare(the_plan, model, config.selector_options(),
                                               start_factors(model, the_plan, grams))
    st = starts.of("embed")
    assert start.layers[0].head_weighted and st.whiten_out is not None and st.layout.tensorization == MATRIX
    applied = apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed)
    layer = tn_layers(applied.model)["embed"]
    expected = _start(model, layer.ranks[0], st.whiten, st.whiten_out)
    with torch.no_grad():
        assert torch.allclose(layer(torch.arange(VOCAB)), expected(torch.arange(VOCAB)), atol=1e-5)
        for core in layer.cores:
            core.mul_(0.5)  # what a gate phase might leave; the refit starts again from both factors
    assert refit_layers(applied.model, model, the_plan, starts, applied.sites, config.seed) == 1
    with torch.no_grad():
        assert torch.allclose(layer(torch.arange(VOCAB)), expected(torch.arange(VOCAB)), atol=1e-5)


def test_a_head_factor_needs_the_whole_output_in_one_core():
    model = TiedLM()
    factor = torch.ones(VOCAB, dtype=torch.float64)
    with pytest.raises(ConfigError, match="the whole output in one core"):
        TNEmbedding.from_dense(model.embed, "tt", rank=[4, 4, 1], tensorization=((VOCAB,), (4, 6)), gated=False,
                               whiten=factor, whiten_out=torch.eye(DIM, dtype=torch.float64))


def test_a_run_reports_the_tied_embedding_weighted_by_its_head():
    model = TiedLM()
    ids = _zipf_ids(800, VOCAB, seed=7)
    loader = [{"input_ids": ids[i:i + 20]} for i in range(0, len(ids), 20)]
    result = compress(model, loader, "tt", "1.5x", init="activations", min_params=1, epochs=1,
                      calibration_batches=4)
    assert result.report.start["head_weighted"] == 1 and result.report.ratio >= 1.5
    assert torch.equal(result.model.head.weight, result.model.embed.weight)  # still one table, read both ways
