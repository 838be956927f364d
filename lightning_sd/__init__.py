"""lightning_sd: principled, measurable, fast stochastic depth for PyTorch Lightning."""

from lightning_sd.callbacks import LogGaussianMonitor, StochasticDepth
from lightning_sd.core import (
    ResidualBranch,
    StochasticDepthHandle,
    depth_moments,
    find_residual_branches,
    gradient_growth_theory,
    inject_stochastic_depth,
    linear_min_budget,
    maxreg_rates,
    sensemode_rates,
    survival_rates,
)
from lightning_sd.models import BalancedReLU, balance_relus

__version__ = "0.1.0"

__all__ = [
    "BalancedReLU",
    "LogGaussianMonitor",
    "ResidualBranch",
    "StochasticDepth",
    "StochasticDepthHandle",
    "balance_relus",
    "depth_moments",
    "find_residual_branches",
    "gradient_growth_theory",
    "inject_stochastic_depth",
    "linear_min_budget",
    "maxreg_rates",
    "sensemode_rates",
    "survival_rates",
]
