"""lightning_sd: principled, measurable, fast stochastic depth for PyTorch Lightning.

Add one callback to a Trainer (:class:`StochasticDepth`), or use the torch-only core
(:func:`inject_stochastic_depth`, :func:`survival_rates`, ...) from a plain PyTorch loop.
"""

from lightning_sd.callbacks import (
    LogGaussianMonitor,
    NormalityMonitor,
    RegularizationMonitor,
    StochasticDepth,
    SummaryPlots,
)
from lightning_sd.classifier import SDClassifier, build_backbone
from lightning_sd.core import (
    DiscoveryReport,
    GradientGrowth,
    NormalityResult,
    ResidualBranch,
    StochasticDepthHandle,
    depth_moments,
    describe_branches,
    estimate_sensitivities,
    explicit_penalty,
    find_residual_branches,
    gradient_growth,
    gradient_growth_theory,
    inject_stochastic_depth,
    linear_min_budget,
    maxreg_rates,
    normality_pvalues,
    regularization_terms,
    sensemode_rates,
    survival_rates,
)
from lightning_sd.data import CIFARDataModule, DigitsDataModule, ToyRegressionDataModule
from lightning_sd.models import BalancedReLU, CifarResNet, ResidualMLP, balance_relus
from lightning_sd.regressor import SDRegressor

__version__ = "0.1.0"

__all__ = [
    "BalancedReLU",
    "CIFARDataModule",
    "CifarResNet",
    "DigitsDataModule",
    "DiscoveryReport",
    "GradientGrowth",
    "LogGaussianMonitor",
    "NormalityMonitor",
    "NormalityResult",
    "RegularizationMonitor",
    "ResidualBranch",
    "ResidualMLP",
    "SDClassifier",
    "SDRegressor",
    "StochasticDepth",
    "StochasticDepthHandle",
    "SummaryPlots",
    "ToyRegressionDataModule",
    "balance_relus",
    "build_backbone",
    "depth_moments",
    "describe_branches",
    "estimate_sensitivities",
    "explicit_penalty",
    "find_residual_branches",
    "gradient_growth",
    "gradient_growth_theory",
    "inject_stochastic_depth",
    "linear_min_budget",
    "maxreg_rates",
    "normality_pvalues",
    "regularization_terms",
    "sensemode_rates",
    "survival_rates",
]
