"""Amulet's math: Eq. 6 against a numerical optimizer of Eq. 5, the two-coefficient form, T = 0, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from personalign.config import config_from_mapping
from personalign.methods.amulet import (
    AmuletConfig,
    AmuletMethod,
    amulet_coefficients,
    amulet_iterates,
    amulet_realign,
)
from tests.numerics import EPS32, reduction_atol


def _eq5_maximizer(lp1: np.ndarray, lpb: np.ndarray, lps: list[np.ndarray], alpha: float, lam: float,
                   eta: float) -> np.ndarray:
    """argmax over the simplex of Σ_{i≤t} [⟨u_i, π⟩ − λ KL(π‖π_1)] − (1/η) KL(π‖π_t), by L-BFGS.

    ``lps`` = [log π_1, ..., log π_t]; u_i = α (log π_i − log π_base). The simplex is parametrized
    by π = softmax(θ) (unconstrained, float64, analytic gradient).
    """
    t = len(lps)
    u_sum = sum(alpha * (lp - lpb) for lp in lps)
    lpt = lps[-1]

    def neg_objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logp = theta - np.logaddexp.reduce(theta)
        p = np.exp(logp)
        f = p @ u_sum - t * lam * (p @ (logp - lp1)) - (p @ (logp - lpt)) / eta
        g_p = u_sum - t * lam * (logp - lp1 + 1) - (logp - lpt + 1) / eta  # ∂f/∂π
        g_theta = p * (g_p - p @ g_p)  # chain rule through softmax
        return -f, -g_theta

    res = minimize(neg_objective, x0=lpt.copy(), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 5000})
    logp = res.x - np.logaddexp.reduce(res.x)
    return np.exp(logp)


@pytest.mark.parametrize("seed", range(6))
def test_each_iterate_is_the_maximizer_of_eq5(seed):
    """Eq. 6 == argmax of Eq. 5, iterate by iterate, to 1e-5.

    Derivation: ∂/∂π(a) of Σu_i(a)π(a) − tλ Σπ log(π/π_1) − (1/η) Σπ log(π/π_t) − μ(Σπ − 1) = 0
    ⇒ (tλ + 1/η) log π(a) = Σ_i u_i(a) + tλ log π_1(a) + (1/η) log π_t(a) + const
    ⇒ π_{t+1} ∝ exp((η Σ_i u_i + λη t log π_1 + log π_t) / (λη t + 1)).
    """
    rng = np.random.default_rng(seed)
    V = int(rng.integers(3, 9))
    lp1 = torch.log_softmax(torch.tensor(rng.normal(0, 2, (1, V))), -1).float()
    lpb = torch.log_softmax(torch.tensor(rng.normal(0, 2, (1, V))), -1).float()
    alpha, lam, eta = (float(x) for x in rng.uniform(0.2, 3.0, 3))
    iterates = amulet_iterates(lp1, lpb, 6, alpha, lam, eta)
    lps = [it[0].double().numpy() for it in iterates]
    for t in range(1, len(lps)):
        want = _eq5_maximizer(lps[0], lpb[0].double().numpy(), lps[:t], alpha, lam, eta)
        got = np.exp(lps[t])
        assert np.abs(got - want).max() < 1e-5, (t, got, want)


def test_coefficient_form_equals_literal_loop():
    """log_softmax(c log π_1 + d log π_base) == the T vocabulary-wide Eq. 6 updates, per-row params."""
    g = torch.Generator().manual_seed(0)
    B, V = 6, 300
    lp1 = torch.log_softmax(3 * torch.randn(B, V, generator=g), -1)
    lpb = torch.log_softmax(3 * torch.randn(B, V, generator=g), -1)
    it = torch.tensor([0, 1, 7, 60, 100, 25])
    alpha = torch.tensor([2.0, 0.5, 1.0, 2.0, 3.0, 0.1])
    lam = torch.tensor([2.0, 1.0, 0.3, 2.0, 4.0, 5.0])
    eta = torch.tensor([10.0, 2.0, 1.0, 10.0, 20.0, 0.5])
    literal = amulet_iterates(lp1, lpb, it, alpha, lam, eta)[-1]
    c, d = amulet_coefficients(it, alpha, lam, eta)
    fast = amulet_realign(lp1, lpb, c, d)
    assert (literal.exp() - fast.exp()).abs().max() < 1e-5
    assert (literal - fast).abs().max() < 1e-3  # log space, where probabilities are ~1e-30
    torch.testing.assert_close(c + d, torch.ones(B, dtype=torch.float64))


def test_first_iterate_golden():
    """t = 1: log π_2 = ((ηα + λη + 1) log π_1 − ηα log π_base) / (λη + 1) + const (Eq. 6, Σu = u_1)."""
    c, d = amulet_coefficients(torch.tensor([1]), 2.0, 3.0, 0.5)
    eta_alpha, lam_eta = 0.5 * 2.0, 3.0 * 0.5
    assert float(c) == pytest.approx((eta_alpha + lam_eta + 1) / (lam_eta + 1))
    assert float(d) == pytest.approx(-eta_alpha / (lam_eta + 1))


def test_effective_ratio_converges_to_the_fixed_point_when_alpha_below_lam():
    """Fixed point of Eq. 5: log π* = log π_1 + (α/λ)(log π* − log π_base) + const
    ⇒ log π* = (1 + r*) log π_1 − r* log π_base with r* = α / (λ − α)."""
    c, d = amulet_coefficients(torch.tensor([5000, 5000]), torch.tensor([1.0, 0.5]), torch.tensor([2.0, 2.0]), 10.0)
    torch.testing.assert_close(-d, torch.tensor([1.0, 0.5 / 1.5], dtype=torch.float64), atol=0.02, rtol=0)


def test_zero_iterations_is_preference_prompting():
    g = torch.Generator().manual_seed(1)
    lp1 = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    lpb = torch.log_softmax(torch.randn(3, 50, generator=g), -1)
    assert torch.equal(amulet_iterates(lp1, lpb, 0, 2.0, 2.0, 10.0)[-1], lp1)
    c, d = amulet_coefficients(torch.zeros(3, dtype=torch.long), 2.0, 2.0, 10.0)
    assert c.tolist() == [1.0] * 3 and d.tolist() == [0.0] * 3
    # c = 1, d = 0: lp1 renormalized, i.e. minus its log-sum-exp (≈ 0), one float32 reduction over V
    # probabilities; log-probs as large as 8 are also rounded once more (ulp 1e-6)
    torch.testing.assert_close(amulet_realign(lp1, lpb, c, d), lp1, atol=reduction_atol(lp1.shape[-1], 1.0) +
                               8 * EPS32, rtol=0)


def test_rows_do_not_depend_on_batch_neighbours():
    g = torch.Generator().manual_seed(2)
    lp1 = torch.log_softmax(2 * torch.randn(4, 40, generator=g), -1)
    lpb = torch.log_softmax(2 * torch.randn(4, 40, generator=g), -1)
    it, alpha = torch.tensor([3, 0, 60, 11]), torch.tensor([2.0, 1.0, 0.5, 4.0])
    batch = amulet_iterates(lp1, lpb, it, alpha, 2.0, 10.0)[-1]
    for b in range(4):
        alone = amulet_iterates(lp1[b : b + 1], lpb[b : b + 1], int(it[b]), float(alpha[b]), 2.0, 10.0)[-1]
        torch.testing.assert_close(batch[b : b + 1], alone, atol=0, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    iterations=st.integers(0, 80),
    alpha=st.floats(0.01, 10.0),
    lam=st.floats(0.01, 10.0),
    eta=st.floats(0.01, 50.0),
    scale=st.floats(0.1, 30.0),
)
def test_output_is_a_normalized_distribution(seed, iterations, alpha, lam, eta, scale):
    """Both forms: finite where π_1 > 0, −inf exactly where π_1 = 0, probabilities sum to 1."""
    try:
        AmuletConfig(iterations=iterations, alpha=alpha, lam=lam, eta=eta)
    except ValueError:
        assume(False)  # a diverging setting the config rejects (see test_diverging_settings_are_rejected)
    g = torch.Generator().manual_seed(seed)
    lp1 = torch.log_softmax(scale * torch.randn(2, 64, generator=g), -1)
    lp1[:, :3] = float("-inf")
    lp1 = torch.log_softmax(lp1, -1)
    lpb = torch.log_softmax(scale * torch.randn(2, 64, generator=g), -1)
    c, d = amulet_coefficients(iterations, alpha, lam, eta)
    for out in (amulet_iterates(lp1, lpb, iterations, alpha, lam, eta)[-1], amulet_realign(lp1, lpb, c, d)):
        assert not torch.isnan(out).any()
        assert torch.equal(torch.isinf(out), torch.isinf(lp1))
        # a float32 sum of 64 probabilities, each off by its log-prob's rounding
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(2), atol=2 * reduction_atol(64, 1.0), rtol=0)


def test_base_minus_inf_is_floored_not_nan():
    lp1 = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]]), -1)
    lpb = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    c, d = amulet_coefficients(60, 2.0, 2.0, 10.0)
    for out in (amulet_iterates(lp1, lpb, 60, 2.0, 2.0, 10.0)[-1], amulet_realign(lp1, lpb, c, d)):
        assert torch.isfinite(out).all()
        assert float(out.exp().sum()) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "params, field",
    [
        ({"iterations": -1}, "iterations"),
        ({"iterations": 1.5}, "iterations"),
        ({"iterations": True}, "iterations"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -2.0}, "alpha"),
        ({"lam": 0}, "lam"),
        ({"eta": -1e-3}, "eta"),
        ({"alpha": float("nan")}, "alpha"),
        ({"lam": float("inf")}, "lam"),
        ({"eta": float("-inf")}, "eta"),
        ({"iterations": 10**9}, "iterations"),
    ],
)
def test_bad_config_raises_naming_the_field(params, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        AmuletConfig(**params)


def test_diverging_settings_are_rejected():
    """α > λ: c_t grows geometrically; α = 10, λ = 0.01, T = 20 gives an effective ratio ~1e36."""
    with pytest.raises(ValueError, match="diverge"):
        AmuletConfig(iterations=20, alpha=10.0, lam=0.01, eta=15.0)
    AmuletConfig(iterations=60, alpha=3.0, lam=2.0, eta=10.0)  # ratio ~23: fine


@pytest.mark.parametrize("key, text", [("alpha", "nan"), ("eta", "inf"), ("iterations", "-3"), ("lam", "0")])
def test_bad_cli_strings_raise(key, text):
    with pytest.raises(ValueError, match=f"`{key}`"):
        config_from_mapping(AmuletConfig, {key: text})


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: iterations, alpha, lam, eta"):
        AmuletMethod.from_params({"lambda": 2})


def test_defaults_and_string_coercion():
    c = AmuletConfig()
    assert (c.iterations, c.alpha, c.lam, c.eta) == (60, 2.0, 2.0, 10.0)
    cfg = config_from_mapping(AmuletConfig, {"iterations": "5", "alpha": "1.5"})
    assert cfg.iterations == 5 and math.isclose(cfg.alpha, 1.5)
