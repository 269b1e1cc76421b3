from dataclasses import replace

import pytest
import torch

from compressor import compress
from compressor.errors import CompressorError
from compressor.config import CompressConfig
from compressor.data import TensorLoader
from compressor.gates import BernoulliGate
from compressor.planner import plan
from compressor.surgery import apply, tn_layers
from compressor.selectors import get_selector, selector_names
from compressor.tensornet import contract


@pytest.mark.parametrize("selector", ["uniform", "energy", "svd", "reinforce"])
def test_every_selector_reaches_the_target(trained_digits_net, digits, selector):
    xtr, ytr, xte, yte = digits
    with torch.no_grad():  # the dense accuracy, counted by hand
        dense = float((trained_digits_net(xte).argmax(1) == yte).float().mean())
    res = compress(trained_digits_net, TensorLoader(xtr, ytr, 64, shuffle=True), "tr", "6x",
                   eval_loader=TensorLoader(xte, yte, 512), rank_select=selector, epochs=2)
    assert res.report.ratio >= 6
    with torch.no_grad():  # the compressed model's accuracy, counted by hand as well
        own = float((res.model.eval()(xte).argmax(1) == yte).float().mean())
    assert res.report.accuracy == pytest.approx(own, abs=1e-6)
    # Margin measured over seeds 0, 1, 2 (compress seed and loader seed) for these four
    # selectors against a dense 97.8 %: the largest drop was 3.6 points (reinforce, seed 2),
    # the others 0.8 points or less; 6 points leaves 1.5x headroom. Random cores of matched
    # scale trained the same 2 epochs reach only 69.6-78.0 %, far below.
    assert res.report.accuracy >= dense - 0.06, (res.report.accuracy, dense)
    if selector == "uniform":
        ranks = res.report.layers[0].final_ranks
        assert len(set(r for r in ranks[1:-1])) <= 2  # one rank, capped only where a mode is small


def _build(config, model):
    """The run's model at step 0: planned, laid out and sized by the selector, gated or not."""
    selector = get_selector(config.rank_select)
    the_plan = plan(model, config.plan_options())
    options = config.selector_options()
    starts, _ = selector.prepare(the_plan, model, options)
    return apply(model, the_plan, starts, sigma=config.sigma, seed=config.seed, make_gate=selector.gate_factory(options)).model


def _relative_error(config, model):
    gm = _build(config, model)
    layer = tn_layers(gm)["fc1"].eval()
    w = model.fc1.weight.detach().T.reshape(layer.modes)
    with torch.no_grad():
        approx = contract(layer.effective_cores())
    size = sum(c.numel() for c in layer.cores)
    return float(torch.linalg.norm(approx - w) / torch.linalg.norm(w)), size


def test_energy_allocation_beats_uniform_rank_on_reconstruction(trained_digits_net):
    e_err, e_size = _relative_error(CompressConfig(target=6, rank_select="energy", decomp="tt"), trained_digits_net)
    u_err, u_size = _relative_error(CompressConfig(target=6, rank_select="uniform", decomp="tt"), trained_digits_net)
    assert e_size <= u_size * 1.1
    assert e_err < u_err


def test_svd_selector_is_a_two_factor_matrix_decomposition(trained_digits_net):
    layer = tn_layers(_build(CompressConfig(target=6, rank_select="svd"), trained_digits_net))["fc1"]
    assert layer.modes == (512, 96) and layer.decomp == "tt" and len(layer.cores) == 2
    r = layer.ranks[0]
    # a rank-r TT of a matrix is its truncated SVD: same error as torch's
    w = trained_digits_net.fc1.weight.detach().T.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = torch.linalg.norm(w - (u[:, :r] * s[:r]) @ vh[:r]) / torch.linalg.norm(w)
    with torch.no_grad():
        ours = torch.linalg.norm(contract(list(layer.eval().effective_cores())).double() - w) / torch.linalg.norm(w)
    assert abs(float(ours) - float(best)) < 1e-4


def test_reinforce_gates_are_bernoulli_and_learn(trained_digits_net):
    layer = tn_layers(_build(CompressConfig(target=6, rank_select="reinforce"), trained_digits_net))["fc1"].train()
    gate = next(iter(layer.gates.values()))
    assert isinstance(gate, BernoulliGate) and torch.allclose(gate.mu, torch.full_like(gate.mu, 0.55))
    z = gate()
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    gate.log_prob().backward()
    assert gate.mu.grad is not None and gate.mu.grad.abs().sum() > 0
    layer.eval()
    assert torch.equal(gate(), torch.ones_like(gate.mu))  # 0.55 rounds to open


def test_registry_names_every_selector_once_and_says_if_it_is_gated():
    assert selector_names()[0] == "l0"
    assert set(selector_names()) == {"l0", "uniform", "energy", "svd", "whitened-svd", "svd-llm", "reinforce", "pstrn",
                                     "mars"}
    assert get_selector("l0").gated and get_selector("reinforce").gate is BernoulliGate
    assert not any(get_selector(n).gated for n in ("uniform", "energy", "svd", "whitened-svd", "svd-llm"))
    assert get_selector("whitened-svd").calibrates and get_selector("svd-llm").calibrates
    assert not get_selector("svd").calibrates
    assert get_selector("pstrn").searches and not get_selector("pstrn").gated
    assert not any(get_selector(n).searches for n in selector_names() if n != "pstrn")
    with pytest.raises(CompressorError, match="unknown rank selector 'nope'; choose one of l0"):
        get_selector("nope")


@pytest.mark.parametrize("name", ["uniform", "energy", "svd"])
def test_baselines_build_ungated_layers_at_their_final_ranks(trained_digits_net, name):
    gm = _build(CompressConfig(target=6, rank_select=name), trained_digits_net)
    layers = tn_layers(gm)
    assert layers and all(not layer.gated for layer in layers.values())
    for layer in layers.values():  # the bonds the cores really have are the ranks the layer reports
        ranks = list(layer.ranks)
        assert [(c.shape[0], c.shape[-1]) for c in layer.cores] == [(ranks[i - 1], ranks[i]) for i in range(len(ranks))]
    if name == "uniform":  # one rank, capped only where a mode is small
        assert len(set(ranks[1:-1])) <= 2
    # The target is met by the model as built (parameters counted here), and not by a wide
    # margin: the selectors size the ranks to the target. Measured at step 0 on this net:
    # uniform 6.44x, energy 6.02-6.09x, svd 6.42x; 10 % above the target bounds them all.
    dense = sum(p.numel() for p in trained_digits_net.parameters())
    ratio = dense / sum(p.numel() for p in gm.parameters())
    assert 6.0 <= ratio <= 6.6, ratio


def test_a_new_selector_registers_itself_and_is_accepted_by_the_config(trained_digits_net):
    from compressor.selectors import L0Selector, Prepared, RankSelector

    class HalfRank(L0Selector, name="test-half"):
        help = "l0 gates from half the generous rank"

        def prepare(self, the_plan, module, options, whiten=None):
            starts, start = super().prepare(the_plan, module, options, whiten)
            halved = tuple(replace(st, ranks=max(1, st.ranks // 2) if isinstance(st.ranks, int)
                                   else tuple(max(1, r // 2) for r in st.ranks))  # a faithful start's bonds,
                           for st in starts.layers)                                # or one ladder rank
            return Prepared(replace(starts, layers=halved), start)

    try:
        assert "test-half" in selector_names()
        config = CompressConfig(target=6, rank_select="test-half")
        full = tn_layers(_build(CompressConfig(target=6), trained_digits_net))["fc1"].ranks
        half = tn_layers(_build(config, trained_digits_net))["fc1"].ranks
        assert max(half) < max(full)
    finally:
        del RankSelector.registry["test-half"]


class _PaddedLookup(torch.nn.Module):
    """An embedding with a padding row (kept exactly by its factorized form) and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(512, 48, padding_idx=0)
        self.head = torch.nn.Linear(48, 96)

    def forward(self, ids):
        return self.head(self.emb(ids))


@pytest.mark.parametrize("selector", ["uniform", "energy", "svd", "whitened-svd"])
def test_fixed_ranks_count_the_padding_row_and_meet_the_target(selector):
    """A plan that forgot the padding row the embedding keeps ended one row short of a target
    (SmolLM2 at 1.5x: 1.49999x), and the run called that a forced closing."""
    model = _PaddedLookup()
    ids = torch.randint(0, 512, (64, 12))
    res = compress(model, TensorLoader(ids, None, 16), "tt", "3x", rank_select=selector, epochs=0,
                   calibration_batches=2)
    report = res.report
    untouched = report.dense_params - sum(layer.params_before for layer in report.layers)
    assert report.params == untouched + sum(layer.params_after for layer in report.layers)
    assert report.ratio >= 3 and not report.forced
    emb = tn_layers(res.model)["emb"]
    assert torch.equal(emb.padding_row, model.emb.weight[0].detach())


def test_svd_llm_returns_its_embeddings_as_kept_dense_and_the_report_lists_them():
    from test_calibration import Lookup

    model = Lookup()
    config = CompressConfig(target=1.25, decomp="tt", rank_select="svd-llm", min_params=1)
    the_plan = plan(model, config.plan_options())
    starts, faithful = get_selector("svd-llm").prepare(the_plan, model, config.selector_options())
    assert faithful is None and [st.name for st in starts.layers] == ["fc1", "fc2"]
    assert [(s.name, s.reason) for s in starts.dense] == [("embed", "svd-llm leaves embeddings dense")]
    assert "embed" in {lp.name for lp in the_plan.layers}  # the planner's plan is left as it was
    assert [lp.name for lp in the_plan.leaving_dense(starts.dense).layers] == ["fc1", "fc2"]
    ids = torch.randint(0, 100, (40, 10), generator=torch.Generator().manual_seed(0))
    res = compress(model, [{"input_ids": ids[i:i + 10]} for i in range(0, 40, 10)], "tt", "1.25x",
                   rank_select="svd-llm", epochs=0, min_params=1)
    assert [layer.name for layer in res.report.layers] == ["fc1", "fc2"]
    assert res.report.skipped[-1] == {"name": "embed", "kind": "embedding", "reason": "svd-llm leaves embeddings dense"}


def test_selectors_read_typed_options_and_return_their_starts():
    import inspect

    from compressor.selectors import Prepared, RankSelector, SelectorOptions

    for selector in RankSelector.registry.values():
        for method in ("prepare", "gate_factory", "needs_calibration"):
            signature = inspect.signature(getattr(selector, method))
            assert signature.parameters["options"].annotation == "SelectorOptions", (selector.name, method)
            assert "Any" not in str(signature), (selector.name, method)
        assert inspect.signature(selector.prepare).return_annotation == "Prepared"
    assert set(SelectorOptions.__dataclass_fields__) >= {"target", "decomp", "rank", "start", "init"}
    assert Prepared._fields == ("starts", "faithful")


def test_reinforce_estimates_the_exact_gradient_of_the_expected_cost():
    """REINFORCE-ℓ0 on a layer small enough to enumerate every gate state: the gradients its
    surrogate gives, averaged over many draws, against the exact gradients of the expected cost
    E_z[J(z) + λ·size(z)] (gate means) and of E_z[J(z)] (weights)."""
    import math

    from torch import nn

    from compressor.controller import SizeMeter
    from compressor.gates import reinforce_surrogate
    from compressor.layers import TNLinear

    torch.manual_seed(0)
    model = nn.Sequential(TNLinear.from_dense(nn.Linear(4, 6), "tt", 3, gated=False)).train()
    layer = model[0].set_gates_(lambda size: BernoulliGate(size))
    gate = next(iter(layer.gates.values()))
    assert gate.mu.numel() == 3
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([0.3, 0.55, 0.8]))
    meter, lam, samples = SizeMeter(model, 4 * 6 + 6), 2.0, 4
    x, target = torch.randn(8, 4), torch.randn(8, 6)

    def task():
        return nn.functional.mse_loss(model(x), target)

    exact_mu, exact_cores = _exact_gradients(gate, layer, task, lambda: lam * meter.sampled_penalty("params"))
    # The baseline is the mean cost of the M samples, the sample's own included: the estimate
    # is the exact gradient scaled by (M - 1) / M (a smaller step, the same direction).
    scale = (samples - 1) / samples

    draws = 300
    per_draw = []
    for _ in range(draws):
        gate.mu.grad = None
        tasks, sizes, logps = [], [], []
        for _ in range(samples):  # what a training step does (Trainer._reinforce)
            tasks.append(task())
            sizes.append(meter.sampled_penalty("params"))
            logps.append(gate.log_prob())
        reinforce_surrogate(tasks, sizes, logps, lam).backward()  # the cores' gradients add up
        per_draw.append(gate.mu.grad.clone())
    estimate = torch.stack(per_draw).mean(0)
    spread = torch.stack(per_draw).std(0) / math.sqrt(draws)  # the standard error of the mean
    # Measured (seed 0): exact gradients 0.51-0.71 after the scale, the estimate within 0.02 of
    # them, standard errors 0.028-0.043. A flipped sign, a log-probability missing the closed
    # slices' term or a cost without λ·size lands 0.2-1.4 away.
    assert (estimate - scale * exact_mu).abs().max() < 4 * spread.max(), (estimate, scale * exact_mu, spread)
    # What the baseline buys: without it the same draws spread 4-5x wider (standard errors 0.14-0.19).
    assert spread.max() < 0.08, spread
    for got, want in zip(layer.cores, exact_cores):  # the weights' ordinary gradient, unscaled
        assert (got.grad / draws - want).abs().max() < 0.1 * want.abs().max(), (got.grad / draws, want)


def _exact_gradients(gate, layer, task, size_cost):
    """d/dmu E_z[J(z) + size_cost(z)] and d/dcores E_z[J(z)] over every state z of ``gate``
    (each weighted by its probability under the means)."""
    import itertools

    real_forward, p = gate.forward, gate.mu.clamp(0, 1)
    expected_cost = expected_task = 0.0
    for state in itertools.product([0.0, 1.0], repeat=gate.mu.numel()):
        z = torch.tensor(state)
        gate.last_z, gate.forward = z, (lambda z=z: z)
        prob = torch.prod(z * p + (1 - z) * (1 - p))
        j = task()
        expected_cost = expected_cost + prob * (float(j.detach()) + size_cost())
        expected_task = expected_task + prob.detach() * j
    gate.forward = real_forward
    return torch.autograd.grad(expected_cost, gate.mu)[0], torch.autograd.grad(expected_task, list(layer.cores))
