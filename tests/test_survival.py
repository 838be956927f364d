import math

import pytest
import torch

from lightning_sd.core.gradient_growth import gradient_growth_theory
from lightning_sd.core.survival import (
    depth_moments,
    linear_min_budget,
    survival_rates,
)


@pytest.mark.parametrize("L", [1, 3, 9, 54, 100])
@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9, 1.0])
def test_uniform_and_linear_meet_budget(L, budget):
    for mode in ("uniform", "linear"):
        p = survival_rates(mode, L, budget)
        assert p.shape == (L,)
        assert abs(float(p.sum()) - budget * L) < 1e-6
        assert bool((p >= 0).all()) and bool((p <= 1).all())


def test_linear_matches_design_formula():
    L, b = 54, 0.6
    p = survival_rates("linear", L, b)
    p_last = 1 - 2 * L * (1 - b) / (L + 1)
    expected = [1 - (l / L) * (1 - p_last) for l in range(1, L + 1)]
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert bool((p[1:] < p[:-1]).all())  # decreasing with depth


def test_linear_infeasible_budget_names_the_minimum():
    L = 50
    low = linear_min_budget(L)
    assert low == pytest.approx((L - 1) / (2 * L))
    survival_rates("linear", L, low + 1e-9)  # feasible just above
    with pytest.raises(ValueError, match=f"{low:.6f}"):
        survival_rates("linear", L, 0.4)


def test_custom_rates_checked():
    assert survival_rates("custom", 3, rates=[0.1, 0.5, 1.0]).tolist() == [0.1, 0.5, 1.0]
    with pytest.raises(ValueError, match="3 residual blocks"):
        survival_rates("custom", 3, rates=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        survival_rates("custom", 2, rates=[0.5, 1.5])


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, float("nan")])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        survival_rates("uniform", 4, budget)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown survival mode"):
        survival_rates("exponential", 4, 0.5)


def test_lemma1_moments():
    p = torch.tensor([0.2, 0.5, 0.9])
    mean, var = depth_moments(p)
    assert mean == pytest.approx(1.6)
    assert var == pytest.approx(0.2 * 0.8 + 0.25 + 0.9 * 0.1)


def test_prop1_growth_matches_design_table1_theory():
    # DESIGN.md: exact-budget linear mode, L=50, budget 0.7 -> 1.691, 1.636, 1.579, 1.522, 1.464.
    L = 50
    q = gradient_growth_theory(survival_rates("linear", L, 0.7))
    rates = [q[l] ** (1 / (L - l)) for l in (0, 10, 20, 30, 40)]
    assert [round(float(r), 3) for r in rates] == pytest.approx([1.691, 1.636, 1.579, 1.522, 1.464], abs=1.5e-3)
    q_uniform = gradient_growth_theory(survival_rates("uniform", L, 0.7))
    assert float(q_uniform[0]) ** (1 / L) == pytest.approx(1.7)
    q_none = gradient_growth_theory(None, L)
    assert float(q_none[10]) == pytest.approx(2.0 ** 40)
    assert math.isclose(float(q_none[L]), 1.0)


def test_gradient_growth_theory_moved_with_a_deprecated_alias():
    import lightning_sd.core.survival as survival_module

    with pytest.warns(DeprecationWarning, match="gradient_growth_theory is deprecated"):
        alias = survival_module.gradient_growth_theory
    assert alias is gradient_growth_theory
    assert torch.equal(alias(None, 3), torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64))
