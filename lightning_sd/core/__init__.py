"""Torch-only core of lightning_sd: usable from a plain PyTorch loop, never imports lightning."""

from lightning_sd.core.discovery import ResidualBranch, find_residual_branches
from lightning_sd.core.gates import StochasticDepthHandle, inject_stochastic_depth, mask_generator
from lightning_sd.core.survival import (
    depth_moments,
    gradient_growth_theory,
    linear_min_budget,
    maxreg_rates,
    sensemode_rates,
    survival_rates,
)

__all__ = [
    "ResidualBranch",
    "StochasticDepthHandle",
    "depth_moments",
    "find_residual_branches",
    "gradient_growth_theory",
    "inject_stochastic_depth",
    "linear_min_budget",
    "mask_generator",
    "maxreg_rates",
    "sensemode_rates",
    "survival_rates",
]
