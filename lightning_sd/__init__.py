"""lightning_sd: principled, measurable, fast stochastic depth for PyTorch Lightning.

Add one callback to a Trainer (:class:`StochasticDepth`), or use the torch-only core
(:func:`inject_stochastic_depth`, :func:`survival_rates`, ...) from a plain PyTorch loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time they load on first use (__getattr__)
    from lightning_sd.callbacks import (
        DepthOnDemand,
        LogGaussianMonitor,
        NormalityMonitor,
        ProbeMonitor,
        RegularizationMonitor,
        StochasticDepth,
        SummaryPlots,
        default_p_min,
        probe_batches,
        probe_inputs,
    )
    from lightning_sd.classifier import SDClassifier, build_backbone
    from lightning_sd.core import (
        DiscoveryReport,
        GradientGrowth,
        NormalityResult,
        ResidualBranch,
        StochasticDepthHandle,
        blocks_to_keep,
        budget_for_mean,
        depth_moments,
        describe_branches,
        estimate_sensitivities,
        explicit_penalty,
        export_pruned,
        find_residual_branches,
        gradient_growth,
        gradient_growth_theory,
        inject_stochastic_depth,
        linear_min_budget,
        maxreg_rates,
        mean_budget,
        normality_pvalues,
        regularization_terms,
        restored_state,
        scheduled_budget,
        sensemode_rates,
        survival_rates,
    )
    from lightning_sd.data import CIFARDataModule, DigitsDataModule, ToyRegressionDataModule
    from lightning_sd.models import BalancedReLU, CifarResNet, ResidualMLP, balance_relus
    from lightning_sd.regressor import SDRegressor

# Lazy exports (PEP 562): `import lightning_sd` (and so the `lightning-sd` command's `--help`) does not
# import torch or lightning; each name below imports its submodule the first time it is used.
_SOURCES = {
    "lightning_sd.callbacks": (
        "DepthOnDemand",
        "LogGaussianMonitor",
        "NormalityMonitor",
        "ProbeMonitor",
        "RegularizationMonitor",
        "StochasticDepth",
        "SummaryPlots",
        "default_p_min",
        "probe_batches",
        "probe_inputs",
    ),
    "lightning_sd.classifier": ("SDClassifier", "build_backbone"),
    "lightning_sd.core": (
        "DiscoveryReport",
        "GradientGrowth",
        "NormalityResult",
        "ResidualBranch",
        "StochasticDepthHandle",
        "blocks_to_keep",
        "budget_for_mean",
        "depth_moments",
        "describe_branches",
        "estimate_sensitivities",
        "explicit_penalty",
        "export_pruned",
        "find_residual_branches",
        "gradient_growth",
        "gradient_growth_theory",
        "inject_stochastic_depth",
        "linear_min_budget",
        "maxreg_rates",
        "mean_budget",
        "normality_pvalues",
        "regularization_terms",
        "restored_state",
        "scheduled_budget",
        "sensemode_rates",
        "survival_rates",
    ),
    "lightning_sd.data": ("CIFARDataModule", "DigitsDataModule", "ToyRegressionDataModule"),
    "lightning_sd.models": ("BalancedReLU", "CifarResNet", "ResidualMLP", "balance_relus"),
    "lightning_sd.regressor": ("SDRegressor",),
}
_SOURCE_OF = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _SOURCE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_sd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = sorted(_SOURCE_OF)
