"""Budget schedules: the expected fraction of blocks kept, ``b(t)``, as a function of the optimizer step.

Three schedules, each a pure function of the step ``t`` (optimizer steps done, 0-based):

- ``"constant"``: ``b(t) = budget`` (Hayou & Ayed 2021: a fixed budget).
- ``"warmup"``: ``b(t) = 1 - (1 - budget) * min(1, t / (warmup_fraction * T))``, a linear ramp of the
  drop rate from 0 to ``1 - budget`` over the first ``warmup_fraction`` of the ``T`` total steps, then
  constant (Composer's ``drop_warmup``). ``warmup_fraction = 0`` is the constant schedule.
- ``"pld"``: Progressive Layer Dropping (Zhang & He, NeurIPS 2020):
  ``b(t) = (1 - budget) * exp(-gamma * t) + budget``, from 1 at ``t = 0`` towards ``budget``; ``gamma``
  is per optimizer step (DeepSpeed's default 0.001).

Every schedule starts at or above ``budget`` and never goes below it, so a survival mode that is
feasible at ``budget`` (the linear mode needs ``budget >= (L - 1)/(2L)``) is feasible at every step.
The rates of step ``t`` are the mode's rates for ``b(t)``: ``sum_l p_l(t) = b(t) L``.

Example::

    >>> [round(scheduled_budget("warmup", 0.5, t, total_steps=100, warmup_fraction=0.1), 3) for t in (0, 5, 10, 50)]
    [1.0, 0.75, 0.5, 0.5]
    >>> round(scheduled_budget("pld", 0.5, 1000, pld_gamma=0.001), 4)
    0.6839
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import scipy.optimize

from lightning_sd.core.validation import check_budget, check_choice

__all__ = [
    "BUDGET_SCHEDULES",
    "BudgetSchedule",
    "budget_for_mean",
    "check_schedule",
    "mean_budget",
    "scheduled_budget",
]

BudgetSchedule = Literal["constant", "warmup", "pld"]
BUDGET_SCHEDULES: tuple[str, ...] = get_args(BudgetSchedule)

#: DeepSpeed's default ``gamma`` of Progressive Layer Dropping (per optimizer step).
DEFAULT_PLD_GAMMA = 0.001


def check_schedule(schedule: str, warmup_fraction: float, pld_gamma: float) -> tuple[float, float]:
    """Check a schedule's arguments; returns ``(warmup_fraction, pld_gamma)`` as floats.

    Raises:
        ValueError: an unknown schedule, ``warmup_fraction`` outside [0, 1] or ``pld_gamma`` not > 0.
    """
    check_choice("schedule", schedule, BUDGET_SCHEDULES)
    warmup_fraction = float(warmup_fraction)
    if math.isnan(warmup_fraction) or not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(
            f"warmup_fraction must be in [0, 1] (the fraction of the training steps over which the budget falls from 1), "
            f"got {warmup_fraction}; e.g. warmup_fraction=0.1"
        )
    pld_gamma = float(pld_gamma)
    if not math.isfinite(pld_gamma) or pld_gamma <= 0:
        raise ValueError(f"pld_gamma must be a finite number > 0 (decay per optimizer step), got {pld_gamma}; e.g. pld_gamma=0.001")
    return warmup_fraction, pld_gamma


def _check_step(step: int, name: str = "step") -> int:
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"{name} must be an integer >= 0 (optimizer steps), got {step!r}")
    return int(step)


def scheduled_budget(
    schedule: str,
    budget: float,
    step: int,
    *,
    total_steps: int | None = None,
    warmup_fraction: float = 0.1,
    pld_gamma: float = DEFAULT_PLD_GAMMA,
) -> float:
    """``b(t)``: the budget in force at optimizer step ``step`` (see the module docstring for the formulas).

    Args:
        schedule: ``"constant"``, ``"warmup"`` or ``"pld"``.
        budget: the budget the schedule ends at (``"warmup"``) or decays towards (``"pld"``), in (0, 1].
        step: optimizer steps done, ``t >= 0``.
        total_steps: ``T``, the run's total optimizer steps; ``"warmup"`` needs it (>= 1).
        warmup_fraction: ``"warmup"``: fraction of ``T`` over which the budget falls from 1, in [0, 1].
        pld_gamma: ``"pld"``: decay rate per optimizer step, > 0.

    Returns:
        ``b(t)`` in ``[budget, 1]``.
    """
    budget = check_budget(budget)
    warmup_fraction, pld_gamma = check_schedule(schedule, warmup_fraction, pld_gamma)
    t = _check_step(step)
    if schedule == "constant":
        return budget
    if schedule == "pld":
        return (1.0 - budget) * math.exp(-pld_gamma * t) + budget
    if total_steps is None:
        raise ValueError("schedule='warmup' needs total_steps (the run's number of optimizer steps)")
    total = _check_step(total_steps, "total_steps")
    ramp = warmup_fraction * total
    if ramp <= 0 or t >= ramp:
        return budget
    return 1.0 - (1.0 - budget) * (t / ramp)


def mean_budget(
    schedule: str,
    budget: float,
    total_steps: int,
    *,
    warmup_fraction: float = 0.1,
    pld_gamma: float = DEFAULT_PLD_GAMMA,
) -> float:
    """The mean of ``b(t)`` over the steps ``t = 0..T-1`` of a run: the fraction of block compute it keeps.

    Args:
        schedule: as in :func:`scheduled_budget`.
        budget: as in :func:`scheduled_budget`.
        total_steps: ``T >= 1``.
        warmup_fraction: as in :func:`scheduled_budget`.
        pld_gamma: as in :func:`scheduled_budget`.
    """
    total = _check_step(total_steps, "total_steps")
    if total < 1:
        raise ValueError("total_steps must be >= 1")
    values = [
        scheduled_budget(schedule, budget, t, total_steps=total, warmup_fraction=warmup_fraction, pld_gamma=pld_gamma)
        for t in range(total)
    ]
    return math.fsum(values) / total


def budget_for_mean(
    schedule: str,
    mean: float,
    total_steps: int,
    *,
    warmup_fraction: float = 0.1,
    pld_gamma: float = DEFAULT_PLD_GAMMA,
) -> float:
    """The ``budget`` argument whose schedule keeps ``mean`` of the blocks on average over ``T`` steps.

    ``mean_budget`` is continuous and increasing in ``budget`` (from ``mean_budget(budget -> 0)`` to 1),
    so Brent's method (:func:`scipy.optimize.brentq`) finds it. Used to compare schedules at the same mean compute.

    Raises:
        ValueError: ``mean`` is below what the schedule can reach (its start at 1 keeps more than ``mean``
            even with ``budget -> 0``).
    """
    mean = check_budget(mean)
    floor = mean_budget(schedule, 1e-9, total_steps, warmup_fraction=warmup_fraction, pld_gamma=pld_gamma)
    if mean < floor:
        raise ValueError(
            f"schedule={schedule!r} keeps at least {floor:.4f} of the blocks on average over {total_steps} steps "
            f"(it starts at 1); a mean budget of {mean} is out of reach. Raise the mean, shorten the warmup or raise pld_gamma."
        )
    def excess(budget: float) -> float:
        return mean_budget(schedule, budget, total_steps, warmup_fraction=warmup_fraction, pld_gamma=pld_gamma) - mean

    if excess(1e-9) >= 0.0:
        return 1e-9
    return float(scipy.optimize.brentq(excess, 1e-9, 1.0, xtol=1e-15))
