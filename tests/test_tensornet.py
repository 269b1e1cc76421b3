import math

import numpy as np
import pytest
import torch

from compressor import tensornet as tn
from compressor.contraction import Contraction
from compressor.errors import CompressorError, ConfigError, TensorizationError


@pytest.mark.parametrize("n,expected", [(1250, (5, 5, 5, 10)), (320, (5, 8, 8)), (20, (4, 5)), (50, (5, 10)), (10, (10,))])
def test_factorize_matches_paper_tensorizations(n, expected):
    assert tn.factorize(n) == expected


def test_factorize_balanced_and_exact():
    for n in [64, 96, 256, 784, 1000, 4096, 3072]:
        f = tn.factorize(n)
        assert math.prod(f) == n
        assert max(f) / min(f) <= 4


def test_factorize_large_prime_has_reason():
    with pytest.raises(TensorizationError, match="prime factor 1009"):
        tn.factorize(1009)


def test_check_modes_product_mismatch():
    with pytest.raises(TensorizationError, match="multiplies to 24, not 20"):
        tn.check_modes((4, 6), 20)


def test_resolve_ranks_validation():
    with pytest.raises(ConfigError):
        tn.resolve_ranks(0, (4, 5), "tr")
    with pytest.raises(ConfigError):
        tn.resolve_ranks(3, (4, 5), "cp")
    assert tn.resolve_ranks(100, (4, 5, 6), "tt") == [4, 6, 1]
    assert tn.resolve_ranks(3, (4, 5, 6), "tr") == [3, 3, 3]


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("decomp", ["tt", "tr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_reconstruction(decomp, dtype):
    torch.manual_seed(0)
    w = torch.randn(4, 5, 6, 3, dtype=dtype)
    ranks = tn.resolve_ranks(1000, w.shape, decomp)
    cores = tn.decompose(w, decomp, ranks)
    assert all(c.dtype == dtype for c in cores)
    err = _rel(tn.contract(cores), w)
    assert err < (1e-5 if dtype == torch.float64 else 1e-4), err
    if dtype == torch.float64:
        assert err < 1e-12


def test_reduced_rank_tt_error_equals_tensorly_tt_svd():
    from tensorly.decomposition import tensor_train
    from tensorly import tt_to_tensor

    torch.manual_seed(1)
    w = torch.randn(5, 6, 4, 7, dtype=torch.float64)
    ranks = [3, 5, 2, 1]
    cores = tn.decompose(w, "tt", ranks)
    ours = _rel(tn.contract(cores), w)
    ref = tt_to_tensor(tensor_train(w.numpy(), rank=[1] + ranks))
    theirs = float(np.linalg.norm(ref - w.numpy()) / np.linalg.norm(w.numpy()))
    assert 0.1 < ours < 1.0  # truncation really happened
    assert abs(ours - theirs) < 1e-6


def test_tr_init_equals_tt_svd_and_param_count():
    torch.manual_seed(2)
    w = torch.randn(5, 6, 4, dtype=torch.float64)
    tt = tn.contract(tn.decompose(w, "tt", [3, 2, 1]))
    tr_cores = tn.decompose(w, "tr", [3, 2, 4])
    assert [tuple(c.shape) for c in tr_cores] == [(4, 5, 3), (3, 6, 2), (2, 4, 4)]
    assert torch.allclose(tn.contract(tr_cores), tt, atol=1e-12)
    assert tn.param_count((5, 6, 4), [3, 2, 4]) == sum(c.numel() for c in tr_cores)


def test_contract_matches_naive_trace():
    torch.manual_seed(3)
    cores = [torch.randn(3, 4, 2), torch.randn(2, 5, 4), torch.randn(4, 3, 3)]
    naive = torch.einsum("aib,bjc,cka->ijk", *cores)
    assert torch.allclose(tn.contract(cores), naive, atol=1e-5)


def test_contraction_path_executor_matches_einsum():
    torch.manual_seed(4)
    eq = "Zab,xay,ybx->Z"
    ops = [torch.randn(7, 4, 5), torch.randn(3, 4, 2), torch.randn(2, 5, 3)]
    c = Contraction(eq)
    assert torch.allclose(c(*ops), torch.einsum(eq, *ops), atol=1e-5)


def test_errors_share_one_base_and_are_one_line():
    for exc in (ConfigError, TensorizationError):
        assert issubclass(exc, CompressorError)
    e = TensorizationError("two\nlines")
    assert "\n" not in str(e)


# --------------------------------------------------------------------------- truncation paths
def _decaying_tensor(modes, seed, rate=3.0):
    """A tensor whose unfoldings all have decaying spectra (a random TT with scaled slices)."""
    g = torch.Generator().manual_seed(seed)
    ranks = [1] + [min(math.prod(modes[: k + 1]), math.prod(modes[k + 1:])) for k in range(len(modes) - 1)] + [1]
    cores = []
    for k, n in enumerate(modes):
        c = torch.randn(ranks[k], n, ranks[k + 1], generator=g, dtype=torch.float64)
        cores.append(c * torch.exp(-torch.arange(ranks[k + 1], dtype=torch.float64) / rate))
    return tn.contract(cores)


def _spectra(w, modes):
    total = float((w ** 2).sum())
    return [tn.squared_singular_values(w.reshape(math.prod(modes[: k + 1]), -1)) / total
            for k in range(len(modes) - 1)]


def test_squared_singular_values_equal_the_svd_on_either_side():
    torch.manual_seed(5)
    for shape in ((7, 300), (300, 7), (40, 40)):
        m = torch.randn(shape, dtype=torch.float64)
        assert torch.allclose(tn.squared_singular_values(m), torch.linalg.svdvals(m) ** 2, atol=1e-9)


def test_clip_tt_ranks_caps_each_bond_by_what_its_left_side_can_fill():
    assert tn.clip_tt_ranks((4, 8, 8, 4), [9, 40, 3]) == [4, 32, 3, 1]
    assert tn.clip_tt_ranks((2, 3), [0]) == [1, 1]


@pytest.mark.parametrize("modes", [(6, 8, 5, 7), (30, 40), (4, 4, 4, 4, 4)])
def test_truncation_path_bound_holds_for_tt_svd_and_sizes_fall(modes):
    w = _decaying_tensor(modes, seed=len(modes))
    path = tn.TruncationPath(modes, _spectra(w, modes))
    assert np.all(np.diff(path.sizes) <= 0) and np.all(np.diff(path.lost) >= 0)
    assert path.ranks(len(path.removed)) == [1] * (len(modes) - 1) + [1]
    for eps in (1e-4, 0.01, 0.05, 0.2):
        step = path.within_error(eps)
        ranks = path.ranks(step)
        actual = _rel(tn.contract(tn.decompose(w, "tt", ranks)), w)
        assert path.error(step) <= eps and actual <= path.error(step) + 1e-9
        assert path.sizes[step] == tn.param_count(modes, ranks)
        if step + 1 < len(path.sizes):
            assert path.error(step + 1) > eps  # the last step within the budget
    cap = int(path.sizes[0]) // 3
    step = path.within_size(cap)
    assert path.sizes[step] <= cap < path.sizes[step - 1]
    assert path.within_size(0) is None


def test_truncation_path_finds_the_exact_rank_of_a_low_rank_matrix():
    torch.manual_seed(6)
    w = torch.randn(60, 4, dtype=torch.float64) @ torch.randn(4, 50, dtype=torch.float64)
    path = tn.TruncationPath((60, 50), _spectra(w, (60, 50)))
    assert path.start == [4]  # numerically zero values are not counted as rank
    step = path.within_error(1e-8)
    assert path.ranks(step) == [4, 1] and path.sizes[step] == 4 * 110


def test_balance_bond_equalises_each_slice_and_keeps_the_product():
    from compressor.tensornet import balance_bond

    torch.manual_seed(0)
    left = torch.randn(1, 12, 5, dtype=torch.float64) * 1e-3
    right = torch.randn(5, 7, 1, dtype=torch.float64) * torch.logspace(0, 3, 5, dtype=torch.float64)[:, None, None]
    gate = torch.rand(5, dtype=torch.float64)
    a, b = balance_bond(left, right)
    product = lambda l, r: torch.einsum("anj,j,jmb->nm", l, gate, r)  # noqa: E731
    assert torch.allclose(product(a, b), product(left, right), rtol=1e-12, atol=1e-15)
    assert torch.allclose(a.norm(dim=(0, 1)), b.norm(dim=(1, 2)), rtol=1e-12)


@pytest.mark.parametrize("shape", [(30, 80), (80, 30), (6, 5, 8, 7)])
def test_tt_svd_cores_equal_tensorly_up_to_sign(shape):
    """The Gram-matrix route gives tensorly's TT-SVD cores (orthonormal left cores, the
    scale on the last), slice by slice up to a sign, on wide and tall unfoldings alike."""
    from tensorly import backend_context
    from tensorly.decomposition import tensor_train

    torch.manual_seed(4)
    w = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -3, shape[-1], dtype=torch.float64)
    ranks = [min(5, *shape)] * (len(shape) - 1) + [1]
    ours = tn.tt_svd(w, ranks)
    with backend_context("numpy"):
        theirs = [torch.from_numpy(c) for c in tensor_train(w.numpy(), rank=[1] + ranks).factors]
    sign = torch.ones(1, dtype=torch.float64)
    for a, b in zip(ours, theirs):
        a = sign[:, None, None] * a  # undo the previous bond's sign flips on this core's left
        flip = torch.sign((a * b).sum(dim=(0, 1)))
        assert torch.allclose(a * flip[None, None, :], b, atol=1e-9)
        sign = flip
    for core in ours[:-1]:
        m = core.reshape(-1, core.shape[-1])
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1], dtype=torch.float64), atol=1e-9)


def test_tt_svd_keeps_asked_bonds_of_a_low_rank_tensor():
    """A bond larger than the tensor's rank is kept at its size; the extra slices add nothing."""
    torch.manual_seed(5)
    w = torch.randn(12, 2, dtype=torch.float64) @ torch.randn(2, 15, dtype=torch.float64)
    cores = tn.tt_svd(w.reshape(3, 4, 15), [3, 10, 1])
    assert [tuple(c.shape) for c in cores] == [(1, 3, 3), (3, 4, 10), (10, 15, 1)]
    assert _rel(tn.contract(cores), w.reshape(3, 4, 15)) < 1e-12


# --------------------------------------------------------------------------- the planned contraction
def _network(n_in, n_out, decomp, ranks_seed, batch):
    g = torch.Generator().manual_seed(ranks_seed)
    modes = [int(m) for m in torch.randint(2, 6, (n_in + n_out,), generator=g)]
    ranks = [int(r) for r in torch.randint(1, 7, (n_in + n_out,), generator=g)]  # unequal, as pruning leaves them
    if decomp == "tt":
        ranks[-1] = 1
    cores = [torch.randn(s, generator=g, dtype=torch.float64) for s in tn.core_shapes(modes, ranks)]
    x = torch.randn((batch,) + tuple(modes[:n_in]), generator=g, dtype=torch.float64)
    return x, cores


@pytest.mark.parametrize("decomp", ["tt", "tr"])
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (1, 3), (2, 2), (3, 1), (3, 3), (4, 4)])
@pytest.mark.parametrize("batch", [1, 3, 300])
def test_planned_contraction_equals_one_einsum_of_the_whole_network(decomp, n_in, n_out, batch):
    from compressor.layers import linear_contraction

    for seed in range(3):
        x, cores = _network(n_in, n_out, decomp, 10 * n_in + n_out + seed, batch)
        c = linear_contraction(n_in, n_out)
        expected = torch.einsum(c.equation, x, *cores)
        got = c(x, *cores)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max())
        steps, _ = c.plan([x.shape] + [k.shape for k in cores])
        assert all(s.einsum is None for s in steps)  # every step a matmul: no einsum parsed per call


def test_one_plan_serves_every_batch_of_its_class_and_gradients_match_einsum():
    from compressor.layers import linear_contraction

    c = linear_contraction(2, 2)
    for batch in (5, 6, 7, 8):
        x, cores = _network(2, 2, "tr", 0, batch)
        c(x, *cores)
    assert len(c._plans) == 1  # 5..8 share the class 8, and no plan holds the batch size itself
    x, cores = _network(2, 2, "tr", 1, 1)
    cores = [k.requires_grad_() for k in cores]
    eq = c.equation
    grads = torch.autograd.grad(c(x, *cores).square().sum(), cores)
    expected = torch.autograd.grad(torch.einsum(eq, x, *cores).square().sum(), cores)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(grads, expected))


def test_a_step_matmul_cannot_do_runs_as_einsum():
    torch.manual_seed(5)
    eq = "Zab,bc,cZd->Zad"  # Z shared and kept: a batched product
    ops = [torch.randn(4, 3, 5), torch.randn(5, 2), torch.randn(2, 4, 6)]
    c = Contraction(eq)
    assert torch.allclose(c(*ops), torch.einsum(eq, *ops), atol=1e-5)
    assert Contraction("ab,bc->ac", batch="a").plan([(3, 4), (4, 5)])[0][0].einsum is None
    with pytest.raises(ValueError, match="batch letter"):
        Contraction("ab,bc->ac", batch="b")
