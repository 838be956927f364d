"""Torch-only core of lightning_sd: usable from a plain PyTorch loop, never imports lightning."""

from lightning_sd.core.budget_schedule import budget_for_mean, mean_budget, scheduled_budget
from lightning_sd.core.discovery import DiscoveryReport, ResidualBranch, describe_branches, find_residual_branches
from lightning_sd.core.gates import StochasticDepthHandle, existing_handle, inject_stochastic_depth, mask_generator
from lightning_sd.core.gradient_growth import GradientGrowth, gradient_growth, gradient_growth_rates, gradient_growth_theory
from lightning_sd.core.normality import (
    NORMALITY_TESTS,
    NormalityResult,
    masked_samples,
    normality_pvalues,
    normality_test,
    sample_multipliers,
)
from lightning_sd.core.probing import restored_state
from lightning_sd.core.pruning import blocks_to_keep, export_pruned
from lightning_sd.core.regularization import explicit_penalty, gate_variance, penalty_terms, regularization_terms
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.core.survival import (
    depth_moments,
    linear_min_budget,
    maxreg_rates,
    sensemode_rates,
    survival_rates,
)

__all__ = [
    "NORMALITY_TESTS",
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
    "existing_handle",
    "explicit_penalty",
    "export_pruned",
    "find_residual_branches",
    "gate_variance",
    "gradient_growth",
    "gradient_growth_rates",
    "gradient_growth_theory",
    "inject_stochastic_depth",
    "linear_min_budget",
    "mask_generator",
    "masked_samples",
    "maxreg_rates",
    "mean_budget",
    "normality_pvalues",
    "normality_test",
    "penalty_terms",
    "regularization_terms",
    "restored_state",
    "sample_multipliers",
    "scheduled_budget",
    "sensemode_rates",
    "supervised_loss",
    "survival_rates",
]
