"""One place for the argument checks that core and callbacks share.

The choices are ``Literal`` types, defined once: callbacks annotate their arguments with them (LightningCLI
validates a ``Literal`` from the command line and YAML) and the tuples of names come from
``typing.get_args``. Every check raises ``ValueError`` with a message that names the problem and the fix,
before anything is modified.

Example::

    >>> check_choice("scaling", "inverted", SCALINGS)
    >>> resolve_survival(0.5, 3).tolist()
    [0.5, 0.5, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "DROP_KINDS",
    "SCALINGS",
    "SURVIVAL_MODES",
    "DropKind",
    "Scaling",
    "SurvivalMode",
    "check_budget",
    "check_choice",
    "check_inverted_rates",
    "check_seed",
    "check_unit_interval",
    "resolve_survival",
]

SurvivalMode = Literal["uniform", "linear", "custom", "sensemode", "maxreg"]
DropKind = Literal["batch", "sample", "subset"]
Scaling = Literal["inverted", "expected"]

SURVIVAL_MODES: tuple[str, ...] = get_args(SurvivalMode)
DROP_KINDS: tuple[str, ...] = get_args(DropKind)
SCALINGS: tuple[str, ...] = get_args(Scaling)

_HINTS = {
    "drop": "choose 'batch' (skip dropped blocks), 'sample' (per-example masks) or 'subset' (each block runs on part of the batch)",
    "scaling": "choose 'inverted' (timm/torchvision) or 'expected' (Huang et al.)",
}


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices`` (``name`` is the argument's name in the message)."""
    if value not in choices:
        hint = _HINTS.get(name, f"choose one of {', '.join(choices)}")
        raise ValueError(f"unknown {name}={value!r}; {hint}")


def check_budget(budget: float) -> float:
    """The budget (expected fraction of blocks kept) as a float in (0, 1], or a ``ValueError``."""
    budget = float(budget)
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (the expected fraction of blocks kept), got {budget}; e.g. budget=0.5")
    return budget


def check_seed(seed: Any) -> int:
    """A mask-stream seed as a non-negative int, or a ``ValueError``."""
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_unit_interval(rates: Tensor, what: str = "survival rates") -> None:
    """Raise unless every rate is finite and in [0, 1] (``what`` names them in the message)."""
    if not bool(torch.isfinite(rates).all()) or bool((rates < 0).any()) or bool((rates > 1).any()):
        raise ValueError(f"{what} must lie in [0, 1], got {rates.flatten().tolist()}")


def check_inverted_rates(rates: Tensor, scaling: str) -> None:
    """Refuse a zero rate with ``scaling="inverted"`` (``m = delta / p`` would divide by zero)."""
    if scaling == "inverted" and bool((rates == 0).any()):
        zero = torch.nonzero(rates == 0).flatten().tolist()
        raise ValueError(
            f"survival rate 0 for blocks {zero} with scaling='inverted' would divide by zero (m = delta/p). "
            "Use scaling='expected' (m = delta), rates > 0 (for mode='sensemode'/'maxreg': p_min > 0), "
            "or leave those blocks out with blocks=."
        )


def resolve_survival(survival: float | Sequence[float] | Tensor | Callable[[int], Any], num_blocks: int) -> Tensor:
    """Rates ``p_1..p_L`` as a float64 tensor from a number, a sequence, a tensor or ``L -> rates``.

    Args:
        survival: one rate for every block, L rates, or a function of L returning them.
        num_blocks: L.

    Raises:
        ValueError: the wrong number of rates, or a rate outside [0, 1].
    """
    if callable(survival) and not isinstance(survival, Tensor):
        survival = survival(num_blocks)
    if isinstance(survival, (int, float)) and not isinstance(survival, bool):
        p = torch.full((num_blocks,), float(survival), dtype=torch.float64)
    else:
        p = torch.as_tensor(survival, dtype=torch.float64).flatten().clone()
    if p.numel() != num_blocks:
        raise ValueError(f"survival has {p.numel()} rates but the model has {num_blocks} residual branches")
    check_unit_interval(p)
    return p
