"""Thin Lightning callbacks over lightning_sd.core."""

from lightning_sd.callbacks.depth_on_demand import DepthOnDemand
from lightning_sd.callbacks.log_gaussian import LogGaussianMonitor
from lightning_sd.callbacks.monitor import ProbeMonitor
from lightning_sd.callbacks.normality_monitor import NormalityMonitor
from lightning_sd.callbacks.probe_data import probe_batches, probe_inputs
from lightning_sd.callbacks.regularization_monitor import RegularizationMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth, default_p_min
from lightning_sd.callbacks.summary_plots import SummaryPlots

__all__ = [
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
]
