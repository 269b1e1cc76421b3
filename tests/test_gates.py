import math

import pytest
import torch

from compressor.gates import L0Gate


def test_eval_and_training_values():
    torch.manual_seed(0)
    g = L0Gate(6, sigma=0.5)
    with torch.no_grad():
        g.mu.copy_(torch.tensor([-1.0, 0.0, 0.3, 0.9, 1.0, 2.0]))
    g.eval()
    assert torch.equal(g(), torch.tensor([0.0, 0.0, 0.3, 0.9, 1.0, 1.0]))
    g.train()
    zs = torch.stack([g() for _ in range(4000)])
    assert zs.min() >= 0 and zs.max() <= 1
    # E[clamp(mu+eps)] for mu=0.3, sigma=0.5 is between 0 and 1 and noisy
    assert zs[:, 2].std() > 0.1
    # mean of the unclamped part matches mu where clamping is rare... check P(z>0) = Phi(mu/sigma)
    p_open = (zs > 0).float().mean(0)
    expected = torch.tensor([0.5 * (1 + math.erf(m / 0.5 / math.sqrt(2))) for m in [-1, 0, 0.3, 0.9, 1, 2]])
    assert torch.allclose(p_open, expected, atol=0.03)


def test_penalty_matches_normal_cdf_and_has_gradient():
    g = L0Gate(4, sigma=0.7)
    with torch.no_grad():
        g.mu.copy_(torch.tensor([-0.5, 0.0, 0.4, 1.5]))
    ref = sum(0.5 * (1 + math.erf(m / 0.7 / math.sqrt(2))) for m in [-0.5, 0.0, 0.4, 1.5])
    p = g.penalty()
    assert abs(p.detach().item() - ref) < 1e-6
    p.backward()
    assert g.mu.grad is not None and (g.mu.grad > 0).all()


def test_close_reopen_and_open_count():
    g = L0Gate(5, sigma=0.5)
    g.close(1)
    g.close(3)
    assert g.open_count() == 3 and g.open_mask().tolist() == [True, False, True, False, True]
    g.reopen(3)
    assert g.open_count() == 4 and float(g.eval_value()[3]) == pytest.approx(g.reopen_value)


def test_starts_fully_open():
    g = L0Gate(8).eval()
    assert torch.equal(g(), torch.ones(8))


def test_start_margin_is_zero_for_shallow_models_two_sigmas_for_deep_stacks_and_explicit_wins():
    from compressor.gates import DEEP_STACK, start_margin

    assert start_margin(None, 4) == 0.0
    assert start_margin(None, DEEP_STACK) == 0.0
    assert start_margin(None, DEEP_STACK + 1) == 2.0
    assert start_margin(0.0, 200) == 0.0 and start_margin(1.5, 3) == 1.5


def test_a_start_margin_keeps_training_samples_at_one_and_eval_unchanged():
    torch.manual_seed(0)
    plain, high = L0Gate(2000, sigma=0.5), L0Gate(2000, sigma=0.5, mu_init=2.0)
    assert torch.equal(plain.eval()(), high.eval()())  # both exactly 1: the start is the same model
    dimmed = lambda g: float((g.train()() < 1).float().mean())  # noqa: E731
    assert dimmed(plain) == pytest.approx(0.5, abs=0.04)
    assert dimmed(high) == pytest.approx(1 - 0.5 * (1 + math.erf(2 / math.sqrt(2))), abs=0.01)  # P(eps < -2 sigma)
    assert high.ceiling == 2.0 and plain.ceiling == 1.5
