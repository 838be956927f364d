"""Survival-rate modes and the budget solver (Hayou & Ayed 2021, sections 2, 4 and 5).

Every mode returns rates ``p`` (float64 tensor of length ``L``, forward order) with
``0 <= p_l <= 1`` and ``sum_l p_l = budget * L`` to 1e-6: the budget is the expected fraction of
blocks kept, ``Lbar / L``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import scipy.optimize
import torch
from torch import Tensor

from lightning_sd.core.validation import SURVIVAL_MODES, check_budget, check_unit_interval

__all__ = [
    "SURVIVAL_MODES",
    "depth_moments",
    "linear_min_budget",
    "maxreg_rates",
    "sensemode_rates",
    "survival_rates",
]

_BUDGET_TOL = 1e-6
#: Relative tolerance of the root solves: four machine epsilons (the smallest scipy.optimize.brentq accepts).
_RTOL = 4 * sys.float_info.epsilon


def _check_num_blocks(num_blocks: int) -> int:
    if int(num_blocks) != num_blocks or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    return int(num_blocks)


def linear_min_budget(num_blocks: int) -> float:
    """Smallest budget the linear mode can reach: ``(L - 1) / (2L)`` (then ``p_L = 0``)."""
    num_blocks = _check_num_blocks(num_blocks)
    return (num_blocks - 1) / (2 * num_blocks)


def _fit_budget(weights: Tensor, budget: float, p_min: float) -> Tensor:
    """``p = clip(p_min + alpha * w, p_min, 1)`` with ``alpha >= 0`` solving ``sum p = budget * L``.

    ``sum p`` is continuous and non-decreasing in alpha, so Brent's method (:func:`scipy.optimize.brentq`)
    finds alpha in a bracket; the residual is then removed exactly by spreading it over the unclipped entries.
    """
    num_blocks = weights.numel()
    target = budget * num_blocks
    if p_min * num_blocks > target + _BUDGET_TOL:
        raise ValueError(
            f"p_min={p_min} keeps {p_min * num_blocks:.3f} blocks on average, more than the budget "
            f"{budget} x {num_blocks} = {target:.3f}. Lower p_min below the budget ({budget})."
        )
    positive = weights > 0
    if budget >= 1.0:
        return torch.ones(num_blocks, dtype=torch.float64)
    if not bool(positive.any()):
        raise ValueError(
            "all weights are zero, so no survival rates proportional to them can meet the budget "
            f"{budget}; use mode='uniform' or measure on other data."
        )
    saturated = torch.where(positive, torch.ones_like(weights), torch.full_like(weights, p_min))
    if float(saturated.sum()) < target - _BUDGET_TOL:
        raise ValueError(
            f"only {int(positive.sum())} of {num_blocks} blocks have a non-zero weight; even keeping all "
            f"of them cannot reach the budget {budget} x {num_blocks} = {target:.3f}. Raise p_min or "
            "lower the budget."
        )
    if float(saturated.sum()) <= target:
        # The budget is exactly what keeping every weighted block allows (up to rounding): no finite
        # alpha reaches it from below, so return the limit alpha -> inf instead of searching for it.
        return saturated

    def total(alpha: float) -> float:
        return float(torch.clamp(p_min + alpha * weights, p_min, 1.0).sum())

    hi = 1.0
    while total(hi) < target:
        hi *= 2.0
    alpha = 0.0 if total(0.0) >= target else scipy.optimize.brentq(lambda a: total(a) - target, 0.0, hi, xtol=1e-15, rtol=_RTOL)
    p = torch.clamp(p_min + alpha * weights, p_min, 1.0)
    free = (p < 1.0) & positive
    residual = target - float(p.sum())
    if free.any() and abs(residual) > 0:
        p[free] += residual / int(free.sum())
    return p.clamp_(0.0, 1.0)


def sensemode_rates(num_blocks: int, budget: float, sensitivities: Sequence[float] | Tensor, p_min: float = 0.0) -> Tensor:
    """SenseMode (section 5): ``p_l = clip(p_min + alpha * |S_l|, p_min, 1)``, alpha solving the budget.

    Args:
        num_blocks: L.
        budget: expected fraction of blocks kept, in (0, 1].
        sensitivities: S, length L, finite.
        p_min: minimum survival rate in [0, budget]; 0 gives the paper's rule ``p ~ |S|``.
    """
    num_blocks = _check_num_blocks(num_blocks)
    budget = check_budget(budget)
    s = torch.as_tensor(sensitivities, dtype=torch.float64).flatten()
    if s.numel() != num_blocks:
        raise ValueError(f"sensitivities has {s.numel()} entries but the model has {num_blocks} blocks")
    if not bool(torch.isfinite(s).all()):
        bad = torch.nonzero(~torch.isfinite(s)).flatten().tolist()
        raise ValueError(
            f"sensitivities of blocks {bad} are NaN or infinite; the loss or its gradient diverged on the "
            "measurement batches. Check the loss on those batches or measure on other data."
        )
    if not (0.0 <= p_min <= 1.0):
        raise ValueError(f"p_min must be in [0, 1], got {p_min}")
    return _fit_budget(s.abs(), budget, float(p_min))


def maxreg_rates(num_blocks: int, budget: float, g: Sequence[float] | Tensor, p_min: float = 0.0) -> Tensor:
    """Lemma 2: rates maximizing the explicit penalty for fixed weights, ``p_l = clip(1/2 - C/g_l, p_min, 1)``.

    Maximizes ``sum_l p_l (1 - p_l) g_l`` (strictly concave in the blocks with ``g_l > 0``) under
    ``sum p = budget * L`` and ``p_min <= p <= 1``; the KKT conditions give the clipped form above.
    ``C`` has the sign of ``L - 2 Lbar`` (for ``p_min <= 1/2``): below a budget of 1/2 the rates rise
    with ``g_l`` towards 1/2, above it they fall with ``g_l`` towards 1/2. Blocks with ``g_l = 0`` do not
    enter the penalty: they get ``p_min`` when ``C > 0``, 1 when ``C < 0`` and share what the budget
    leaves when ``C = 0``; with every ``g_l = 0`` the rates are uniform.

    ``p_min = 0`` is Lemma 2 as stated; it can return rates of exactly 0 (at low budgets the blocks with
    the smallest ``g_l``), which ``scaling="inverted"`` cannot use (``m = delta / p``). A floor
    ``p_min > 0`` keeps every rate usable and is solved together with the budget (not clipped afterwards).

    Args:
        num_blocks: L.
        budget: in (0, 1].
        g: regularization terms g_l >= 0 (length L, see :func:`lightning_sd.regularization_terms`).
        p_min: smallest rate, in [0, budget].

    Returns:
        float64 tensor of length L with ``sum p = budget * L`` (to 1e-9 up to clipping round-off) and
        ``p_min <= p_l <= 1``.

    Example::

        >>> maxreg_rates(3, 0.3, [1.0, 2.0, 4.0])
        tensor([0.1571, 0.3286, 0.4143], dtype=torch.float64)
        >>> maxreg_rates(3, 0.3, [1.0, 2.0, 4.0], p_min=0.2)
        tensor([0.2000, 0.3000, 0.4000], dtype=torch.float64)
    """
    num_blocks = _check_num_blocks(num_blocks)
    budget = check_budget(budget)
    g = torch.as_tensor(g, dtype=torch.float64).flatten()
    if g.numel() != num_blocks:
        raise ValueError(f"g has {g.numel()} entries but the model has {num_blocks} blocks")
    if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise ValueError("g must be finite and non-negative (g_l is a quadratic form of a PSD Hessian)")
    p_min = float(p_min)
    if math.isnan(p_min) or not 0.0 <= p_min <= budget + _BUDGET_TOL:
        raise ValueError(
            f"p_min must be in [0, budget] = [0, {budget}] (a floor above the budget cannot meet it), got {p_min}"
        )
    if budget >= 1.0:
        return torch.ones(num_blocks, dtype=torch.float64)
    target = budget * num_blocks
    pos = g > 0
    n_zero = int((~pos).sum())
    half = max(0.5, p_min) * int(pos.sum())  # sum over positive-g blocks at C = 0
    p = torch.empty(num_blocks, dtype=torch.float64)
    if half + p_min * n_zero <= target <= half + n_zero:
        # C = 0: positive-g blocks at max(1/2, p_min), zero-g blocks share the remainder equally.
        p[pos] = max(0.5, p_min)
        if n_zero:
            p[~pos] = (target - half) / n_zero
        return p
    # C != 0: zero-g blocks at p_min (C > 0, target below half) or 1 (C < 0); solve over positive-g blocks.
    keep_zero = target > half
    p[~pos] = 1.0 if keep_zero else p_min
    gp = g[pos]
    inv = 1.0 / gp
    goal = target - n_zero * (1.0 if keep_zero else p_min)

    def rates(c: float) -> Tensor:
        return torch.clamp(0.5 - c * inv, p_min, 1.0)

    # total(c) is continuous and non-increasing in c: bracket the root, solve with Brent's method, then
    # solve the piecewise-linear equation exactly on the final active set (keeps the 1/2 - C/g_l form).
    lo, hi = (-1.0, 0.0) if keep_zero else (0.0, 1.0)
    if keep_zero:
        while float(rates(lo).sum()) < goal:
            lo *= 2.0
    else:
        while float(rates(hi).sum()) > goal:
            hi *= 2.0
    c = scipy.optimize.brentq(lambda c: float(rates(c).sum()) - goal, lo, hi, xtol=1e-15, rtol=_RTOL)
    q = rates(c)
    free = (q > p_min) & (q < 1)
    if bool(free.any()):
        fixed = float(q[~free].sum())
        c_exact = (0.5 * int(free.sum()) + fixed - goal) / float(inv[free].sum())
        q_exact = rates(c_exact)
        if abs(float(q_exact.sum()) - goal) <= abs(float(q.sum()) - goal):
            q = q_exact
    p[pos] = q
    return p


def survival_rates(
    mode: str,
    num_blocks: int,
    budget: float = 1.0,
    *,
    rates: Sequence[float] | Tensor | None = None,
    sensitivities: Sequence[float] | Tensor | None = None,
    g: Sequence[float] | Tensor | None = None,
    p_min: float = 0.0,
) -> Tensor:
    """Survival rates ``p_1..p_L`` for a compute budget.

    Modes (Hayou & Ayed 2021):

    - ``"uniform"``: ``p_l = budget``.
    - ``"linear"``: ``p_l = 1 - (l/L)(1 - p_L)`` with ``p_L = 1 - 2L(1 - budget)/(L + 1)`` so that
      ``sum p = budget * L`` exactly; infeasible below ``(L - 1) / (2L)``.
    - ``"custom"``: ``rates`` as given (checked, the budget is ignored).
    - ``"sensemode"``: from ``sensitivities`` (section 5), see :func:`sensemode_rates`.
    - ``"maxreg"``: from regularization terms ``g`` (Lemma 2, floor ``p_min``), see :func:`maxreg_rates`.

    Args:
        mode: one of ``"uniform"``, ``"linear"``, ``"custom"``, ``"sensemode"``, ``"maxreg"``.
        num_blocks: number of residual branches L >= 1.
        budget: expected fraction of blocks kept, in (0, 1].
        rates: explicit rates for ``"custom"``, length L, each in [0, 1].
        sensitivities: S_l for ``"sensemode"``.
        g: g_l for ``"maxreg"``.
        p_min: minimum rate for ``"sensemode"`` and ``"maxreg"``, in [0, budget].

    Returns:
        float64 tensor of length L.

    Example::

        >>> survival_rates("linear", 4, 0.75)
        tensor([0.9000, 0.8000, 0.7000, 0.6000], dtype=torch.float64)
    """
    if mode not in SURVIVAL_MODES:
        raise ValueError(f"unknown survival mode {mode!r}; choose one of {', '.join(SURVIVAL_MODES)}")
    num_blocks = _check_num_blocks(num_blocks)
    if mode == "custom":
        if rates is None:
            raise ValueError("mode='custom' needs rates=[p_1, ..., p_L]")
        p = torch.as_tensor(rates, dtype=torch.float64).flatten().clone()
        if p.numel() != num_blocks:
            raise ValueError(f"custom rates have {p.numel()} entries but the model has {num_blocks} residual blocks")
        check_unit_interval(p, "custom rates")
        return p
    budget = check_budget(budget)
    if mode == "uniform":
        return torch.full((num_blocks,), budget, dtype=torch.float64)
    if mode == "linear":
        p_last = 1.0 - 2.0 * num_blocks * (1.0 - budget) / (num_blocks + 1)
        if p_last < -_BUDGET_TOL:
            raise ValueError(
                f"budget {budget} is infeasible for the linear mode with {num_blocks} blocks (p_L would be "
                f"{p_last:.4f} < 0); the smallest feasible budget is (L - 1)/(2L) = "
                f"{linear_min_budget(num_blocks):.6f}. Raise the budget or use mode='uniform' or 'sensemode'."
            )
        p_last = max(p_last, 0.0)
        ls = torch.arange(1, num_blocks + 1, dtype=torch.float64)
        return 1.0 - ls / num_blocks * (1.0 - p_last)
    if mode == "sensemode":
        if sensitivities is None:
            raise ValueError("mode='sensemode' needs sensitivities=S (see lightning_sd.estimate_sensitivities)")
        return sensemode_rates(num_blocks, budget, sensitivities, p_min)
    if g is None:
        raise ValueError("mode='maxreg' needs g=[g_1, ..., g_L] (see lightning_sd.regularization_terms)")
    return maxreg_rates(num_blocks, budget, g, p_min)


def depth_moments(survival: Sequence[float] | Tensor) -> tuple[float, float]:
    """Lemma 1: mean ``sum p_l`` and variance ``sum p_l (1 - p_l)`` of the sampled depth ``L_delta``."""
    p = torch.as_tensor(survival, dtype=torch.float64)
    return float(p.sum()), float((p * (1 - p)).sum())


def __getattr__(name: str) -> Any:
    if name == "gradient_growth_theory":  # moved to core/gradient_growth.py (Proposition 1 is about gradients)
        import warnings

        from lightning_sd.core.gradient_growth import gradient_growth_theory

        warnings.warn(
            "lightning_sd.core.survival.gradient_growth_theory is deprecated; import it from lightning_sd (or "
            "lightning_sd.core.gradient_growth)",
            DeprecationWarning,
            stacklevel=2,
        )
        return gradient_growth_theory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
