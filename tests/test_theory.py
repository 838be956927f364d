"""Log-Gaussian theory (Li, Nica & Roy 2021): simulators against each other and against Theorems 1 and 4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid  # numpy's own is numpy >= 2 only
from scipy.stats import ks_2samp

from lightning_sd.theory import (
    beta_c,
    hypoactivation_constant,
    interlayer_covariance_total,
    j2bar,
    out_sq_moments,
    predict,
    predict_infinite_width,
    simulate,
    simulate_G,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: intra-op threads only contend on the shared 2-core test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


A = L = 2**-0.5  # the paper's alpha = lambda = 1/sqrt(2)


def _se_mean(x: torch.Tensor) -> float:
    return float(x.std()) / math.sqrt(x.numel())


def _se_var(x: torch.Tensor) -> float:
    c = x - x.mean()
    m2, m4 = float(c.pow(2).mean()), float(c.pow(4).mean())
    return math.sqrt((m4 - m2 * m2) / x.numel())


def _simulate_one_thread(**kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return simulate(**kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vanilla_100():
    return _simulate_one_thread(n=100, d=100, alpha=A, lam=L, balanced=False, num_samples=10000, seed=0)


@pytest.fixture(scope="module")
def balanced_100():
    return _simulate_one_thread(n=100, d=100, alpha=A, lam=L, balanced=True, num_samples=10000, seed=1)


# ----------------------------------------------------------------------------------------- simulators


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize(("n", "d", "alpha", "lam"), [(4, 4, A, L), (6, 5, 1.0, 0.7)])
def test_fast_and_dense_agree_in_distribution(n, d, alpha, lam, balanced):
    fast = simulate_G(n, d, alpha, lam, balanced, num_samples=4000, seed=11)
    dense = simulate_G(n, d, alpha, lam, balanced, num_samples=4000, seed=12, method="dense")
    assert ks_2samp(fast.numpy(), dense.numpy()).pvalue > 1e-3
    # the same KS test has power: a network two units wider, or with the other activation, is rejected
    wider = simulate_G(n + 2, d, alpha, lam, balanced, num_samples=4000, seed=13, method="dense")
    assert ks_2samp(fast.numpy(), wider.numpy()).pvalue < 1e-6
    other = simulate_G(n, d, alpha, lam, not balanced, num_samples=4000, seed=14, method="dense")
    assert ks_2samp(fast.numpy(), other.numpy()).pvalue < 1e-6


def test_fast_and_dense_activation_statistics_agree():
    fast = simulate(6, 6, A, L, False, num_samples=3000, seed=3)
    dense = simulate(6, 6, A, L, False, num_samples=3000, seed=4, method="dense")
    last_f, last_d = fast.relu_energy[:, -1].numpy(), dense.relu_energy[:, -1].numpy()
    assert ks_2samp(last_f, last_d).pvalue > 1e-3


def test_simulator_is_seeded_float64_and_batched():
    a = simulate_G(10, 7, A, L, num_samples=300, seed=5, chunk_size=64)
    b = simulate_G(10, 7, A, L, num_samples=300, seed=5, chunk_size=64)
    c = simulate_G(10, 7, A, L, num_samples=300, seed=6, chunk_size=64)
    assert a.dtype == torch.float64 and a.shape == (300,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(0)
    g1 = simulate_G(5, 3, A, L, num_samples=10)
    torch.manual_seed(0)
    g2 = simulate_G(5, 3, A, L, num_samples=10)
    assert torch.equal(g1, g2)  # seed=None follows the global torch RNG


def test_simulator_does_not_overflow_when_the_norm_grows():
    g = simulate_G(16, 2000, 1.0, 1.0, num_samples=50, seed=0)  # ||z||^2 ~ 2^2000, beyond float64
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"d": 0},
        {"n": 2.5},
        {"lam": 0.0},
        {"alpha": float("nan")},
        {"num_samples": 0},
        {"method": "sparse"},
    ],
)
def test_simulator_rejects_bad_input(kwargs):
    args = {"n": 4, "d": 4, "alpha": A, "lam": L, "num_samples": 8, "method": "fast"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        simulate_G(**args)


# ------------------------------------------------------------------------------- formulas (section 2)


def test_beta_c_and_j2bar_values():
    beta, c = beta_c(100, 100, A, L)
    assert beta == pytest.approx(0.02 + 9 / 4)  # 2/n + (d/n)(5/4 + 4/4) / 1
    assert c == pytest.approx(0.5)
    assert j2bar(0.0) == pytest.approx(3.0)  # Var(2||phi(u)||^2) = 3/n
    assert j2bar(math.pi) == pytest.approx(0.0)
    assert j2bar(math.pi / 2) == pytest.approx(0.5)
    assert interlayer_covariance_total(100, 1, A, L) == 0.0
    # alpha = 0 (fully connected): theta_k = pi/2, independent layers, no correction
    assert interlayer_covariance_total(100, 50, 0.0, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_j2bar_gives_the_covariance_of_conjecture_5():
    """Eq. (13): Cov(2||phi(u)||^2, 2||phi(cos t u + sin t g/sqrt n)||^2) = (J2bar(t) - J2bar(pi - t)) / n."""
    n, m = 400, 20000
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(m, n, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    for k in (1, 2, 4):
        t = math.acos(2 ** (-k / 2))
        v = math.cos(t) * u + math.sin(t) * g / math.sqrt(n)
        v = v / v.norm(dim=1, keepdim=True)
        a1 = 2 * u.clamp_min(0).square().sum(1)
        a2 = 2 * v.clamp_min(0).square().sum(1)
        prod = (a1 - a1.mean()) * (a2 - a2.mean())
        cov, se = float(prod.mean()), _se_mean(prod)  # se ~ 5e-5, theory ~ 1.6e-3 .. 4.9e-3
        theory = float(j2bar(t) - j2bar(math.pi - t)) / n
        assert abs(cov - theory) < 4 * se + 0.01 * theory


def test_output_moment_formulas():
    inf = predict_infinite_width(100, A, L)
    assert (inf.mean_out_sq, inf.var_out_sq, inf.corr_out_sq) == pytest.approx((1.0, 2.0, 0.0))
    p = predict(100, 100, A, L, balanced=True)
    assert p.mean_out_sq == pytest.approx(1.0)  # section 3.1: beta cancels
    assert p.var_out_sq == pytest.approx(3 * math.exp(p.beta) - 1)
    s2 = p.var_G
    assert p.corr_out_sq == pytest.approx((math.exp(s2) - 1) / (3 * math.exp(s2) - 1))
    assert predict(10, 1000, A, L, balanced=True).corr_out_sq == pytest.approx(1 / 3, abs=1e-6)
    v = predict(100, 100, A, L, C=-1.0)
    assert v.h_total == pytest.approx(-1.0) and v.C_stderr == 0.0
    assert v.mean_out_sq == pytest.approx(math.exp(2 * v.c * v.h_total + 0.5 * v.c**2 * v.I_total))


def test_predict_rejects_bad_input():
    for bad in ({"n": 0}, {"d": -1}, {"lam": -1.0}):
        args = {"n": 10, "d": 10, "alpha": A, "lam": L, "balanced": True}
        args.update(bad)
        with pytest.raises(ValueError):
            predict(**args)


# ------------------------------------------------------------------------- simulation vs Theorems 1, 4


def test_balanced_simulation_matches_theorem_4(balanced_100):
    G = balanced_100.G
    p = predict(100, 100, A, L, balanced=True)
    assert p.mean_G == pytest.approx(-1.135) and p.var_G == pytest.approx(2.27)
    # within 4 Monte-Carlo standard errors (~0.015 for the mean, ~0.035 for the variance)
    assert abs(float(G.mean()) - p.mean_G) < 4 * _se_mean(G)
    assert abs(float(G.var()) - p.var_G) < 4 * _se_var(G)
    # exact for Balanced ResNets: E||z^l||^2 = (alpha^2 + lam^2) E||z^{l-1}||^2, so E[e^G] = 1
    eg = torch.exp(G)
    assert abs(float(eg.mean()) - 1.0) < 4 * _se_mean(eg)
    # no hypoactivation: half the ReLUs fire, h_l = 0
    frac = balanced_100.active_fraction.mean(1)  # per network, iid
    assert abs(float(frac.mean()) - 0.5) < 4 * _se_mean(frac)
    per_net_h = balanced_100.relu_energy.mean(1) - 0.5
    assert abs(float(per_net_h.mean())) < 4 * _se_mean(per_net_h)


def test_vanilla_is_hypoactivated_and_more_variable(vanilla_100, balanced_100):
    frac = vanilla_100.active_fraction[:, 10:].mean(1)  # past the first layers (zhat^0 is uniform)
    assert float(frac.mean()) < 0.5 - 5 * _se_mean(frac)
    h = vanilla_100.hypoactivation
    assert (h[10:] < 0).all()
    assert vanilla_100.h_total < -0.5  # O(d/n) = O(1) in total
    assert float(vanilla_100.G.var()) > 2.0 * float(balanced_100.G.var())  # ~5.7 vs ~2.3
    assert float(vanilla_100.G.mean()) < float(balanced_100.G.mean()) - 0.5


def test_vanilla_theorem_1_within_10_percent(vanilla_100):
    p = predict(100, 100, A, L)
    G = vanilla_100.G
    assert p.mean_G == pytest.approx(float(G.mean()), rel=0.10)
    assert p.var_G == pytest.approx(float(G.var()), rel=0.10)
    # the ingredients of Proposition 2 against the simulated network
    assert p.h_total == pytest.approx(vanilla_100.h_total, rel=0.10)
    cov = torch.cov((2 * vanilla_100.relu_energy).T)
    i_sim = float(cov.sum() - cov.diag().sum())
    assert p.I_total == pytest.approx(i_sim, rel=0.15)
    assert p.C_stderr < 0.1 * abs(p.C)


def test_hypoactivation_constant_is_cached_and_exact_at_alpha_zero():
    assert hypoactivation_constant(0.0, 1.0) == (0.0, 0.0)
    c1 = hypoactivation_constant(A, L)
    c2 = hypoactivation_constant(1.0, 1.0)  # same alpha/lam: same zhat dynamics, same constant
    assert c1 == c2
    assert -1.2 < c1[0] < -0.6
    # the stored offline estimate agrees with a fresh simulation within their Monte-Carlo errors
    fresh, se = hypoactivation_constant(A, L, use_table=False, seed=3, max_elements=2 * 10**7)
    assert 0 < se < 0.1
    assert abs(fresh - c1[0]) < 4 * math.hypot(se, c1[1])
    again = hypoactivation_constant(A, L, use_table=False, seed=3, max_elements=2 * 10**7)
    assert again == (fresh, se)  # cached


def test_out_sq_moments_match_prediction_balanced(balanced_100):
    m = out_sq_moments(balanced_100.G, 100, A, L)
    p = predict(100, 100, A, L, balanced=True)
    assert m["mean_out_sq"] == pytest.approx(p.mean_out_sq, rel=0.1)
    assert m["corr_out_sq"] == pytest.approx(p.corr_out_sq, rel=0.2)
    assert np.isfinite(m["var_out_sq"])


@pytest.mark.parametrize("balanced", [False, True])
def test_pdf_G_is_the_density_of_the_predicted_G(balanced: bool) -> None:
    """Prediction.pdf_G integrates (trapezoid rule) to 1 with the predicted mean and variance of G."""
    p = predict(100, 100, 2**-0.5, 2**-0.5, balanced=balanced)
    g = np.linspace(p.mean_G - 12 * p.std_G, p.mean_G + 12 * p.std_G, 20001)
    density = p.pdf_G(g)
    assert density.shape == g.shape
    assert trapezoid(density, g) == pytest.approx(1.0, abs=1e-9)
    assert trapezoid(g * density, g) == pytest.approx(p.mean_G, abs=1e-8)
    assert trapezoid((g - p.mean_G) ** 2 * density, g) == pytest.approx(p.var_G, rel=1e-7)
    assert float(p.pdf_G(p.mean_G)) == pytest.approx(1 / math.sqrt(2 * math.pi * p.var_G), rel=1e-12)
    with pytest.raises(ValueError, match="point mass"):
        predict_infinite_width(100, 2**-0.5, 2**-0.5).pdf_G(0.0)
