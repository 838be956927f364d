"""Thin Lightning callbacks over lightning_sd.core."""

from lightning_sd.callbacks.log_gaussian import LogGaussianMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth

__all__ = ["LogGaussianMonitor", "StochasticDepth"]
