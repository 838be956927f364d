"""SenseMode rates p_l = clip(p_min + alpha |S_l|, p_min, 1) with sum_l p_l = budget * L (paper section 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from lightning_sd.core.survival import sensemode_rates, survival_rates


def _reference(S: np.ndarray, budget: float, p_min: float) -> np.ndarray:
    """Independent solve: alpha by Brent's method on the continuous, increasing budget function."""
    w = np.abs(S)
    target = budget * len(S)

    def excess(alpha: float) -> float:
        return float(np.clip(p_min + alpha * w, p_min, 1.0).sum() - target)

    hi = 1.0
    while excess(hi) < 0:
        hi *= 2.0
    alpha = brentq(excess, 0.0, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
    return np.clip(p_min + alpha * w, p_min, 1.0)


CASES = [(L, budget, p_min, seed) for L in (5, 54) for budget in (0.1, 0.3, 0.5, 0.9) for p_min in (0.0, 0.05) for seed in (0, 1)]


@pytest.mark.parametrize("L,budget,p_min,seed", CASES)
def test_budget_bounds_monotone_and_reference(L, budget, p_min, seed):
    rng = np.random.default_rng(seed)
    # Heavy-tailed magnitudes and both signs, as measured sensitivities are.
    S = rng.standard_normal(L) * np.exp(rng.standard_normal(L))
    p = sensemode_rates(L, budget, torch.tensor(S), p_min=p_min)
    assert p.dtype == torch.float64 and p.shape == (L,)
    assert abs(float(p.sum()) - budget * L) <= 1e-6
    assert float(p.min()) >= p_min - 1e-12 and float(p.max()) <= 1.0
    order = np.argsort(np.abs(S), kind="stable")
    assert bool((np.diff(p.numpy()[order]) >= -1e-12).all()), "p must be non-decreasing in |S|"
    np.testing.assert_allclose(p.numpy(), _reference(S, budget, p_min), rtol=0, atol=1e-9)


def test_proportional_rule_without_clipping():
    # p_min = 0 and no rate reaching 1: the paper's rule p_l = |S_l| * budget * L / sum |S|.
    S = torch.tensor([0.3, -0.1, 0.2, -0.4, 0.25, 0.15], dtype=torch.float64)
    p = sensemode_rates(6, 0.2, S)
    torch.testing.assert_close(p, S.abs() * 0.2 * 6 / S.abs().sum(), rtol=1e-12, atol=1e-12)


def test_clipping_saturates_the_most_sensitive_blocks():
    # Hand solution: S = [10, 1, 1, 1], budget 0.5 -> target 2: block 1 at 1, the rest share 1 -> 1/3 each.
    p = sensemode_rates(4, 0.5, [10.0, 1.0, -1.0, 1.0])
    torch.testing.assert_close(p, torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64), rtol=0, atol=1e-12)


def test_sign_does_not_matter_and_equal_sensitivities_give_uniform():
    S = torch.tensor([0.5, -2.0, 1.0, -0.25])
    torch.testing.assert_close(sensemode_rates(4, 0.4, S), sensemode_rates(4, 0.4, -S), rtol=0, atol=0)
    torch.testing.assert_close(sensemode_rates(7, 0.3, [-2.0] * 7), torch.full((7,), 0.3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_p_min_floor_and_p_min_equal_budget():
    S = [1e-6, 5.0, 0.0, 2.0, 3.0]
    p = sensemode_rates(5, 0.5, S, p_min=0.2)
    assert float(p.min()) >= 0.2 and p[2] == 0.2 and abs(float(p.sum()) - 2.5) <= 1e-6
    # p_min = budget leaves no room: every block at p_min.
    torch.testing.assert_close(sensemode_rates(5, 0.3, S, p_min=0.3), torch.full((5,), 0.3, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("p_min", [0.0, 0.2])
def test_budget_one_gives_all_ones(p_min):
    torch.testing.assert_close(sensemode_rates(6, 1.0, [0.1, 0.0, -3.0, 2.0, 0.0, 1.0], p_min=p_min), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("L,k,p_min", [(3, 1, 0.15), (4, 2, 0.05), (4, 2, 0.3), (10, 7, 0.1)])
def test_budget_exactly_at_saturation_is_finite(L, k, p_min):
    # Regression: budget = (k + p_min (L - k)) / L is what keeping all k weighted blocks gives; a rounding
    # excess of one ulp made the bisection's upper bound overflow to inf and returned NaN rates.
    budget = (k + p_min * (L - k)) / L
    p = sensemode_rates(L, budget, [1.0] * k + [0.0] * (L - k), p_min=p_min)
    torch.testing.assert_close(p, torch.tensor([1.0] * k + [p_min] * (L - k), dtype=torch.float64), rtol=0, atol=1e-12)


def test_zero_sensitivities_get_p_min():
    p = sensemode_rates(4, 0.25, [0.0, 2.0, 0.0, 2.0])
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_survival_rates_dispatches_to_sensemode():
    S = [0.2, 0.9, 0.4]
    torch.testing.assert_close(survival_rates("sensemode", 3, 0.5, sensitivities=S, p_min=0.1), sensemode_rates(3, 0.5, S, 0.1))
    with pytest.raises(ValueError, match="needs sensitivities"):
        survival_rates("sensemode", 3, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sensitivities_name_the_blocks(bad):
    with pytest.raises(ValueError, match=r"blocks \[1\] are NaN or infinite"):
        sensemode_rates(3, 0.5, [0.1, bad, 0.2])


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="all weights are zero"):
        sensemode_rates(3, 0.5, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="p_min=0.6"):
        sensemode_rates(3, 0.5, [1.0, 2.0, 3.0], p_min=0.6)
    with pytest.raises(ValueError, match="cannot reach the budget"):
        sensemode_rates(4, 0.75, [1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="3 entries but the model has 4"):
        sensemode_rates(4, 0.5, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="budget must be in"):
        sensemode_rates(3, 0.0, [1.0, 2.0, 3.0])
