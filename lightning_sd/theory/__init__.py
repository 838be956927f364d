"""Log-Gaussian theory of ReLU ResNets at initialization (Li, Nica & Roy, NeurIPS 2021).

Torch, numpy and scipy only (never imports lightning):

* :func:`predict` -- Theorem 1 (vanilla, with Proposition 2) and Theorem 4 (balanced) for the law of
  ``G`` and the moments and correlations of the squared outputs (section 3);
* :func:`predict_infinite_width` -- the Gaussian infinite-width prediction (``G = 0``);
* :func:`simulate_G` / :func:`simulate` -- exact Monte-Carlo samples of ``G`` ("fast": O(d n) per
  network via ``W x =d ||x|| g``; "dense": explicit weight matrices, O(d n^2));
* :func:`hypoactivation_constant`, :func:`interlayer_covariance_total`, :func:`j2bar`,
  :func:`out_sq_moments` -- the pieces;
* :func:`probe_model` -- per-ReLU active fraction and ``h_l`` and ``ln ||y_out||^2`` of a real model.
"""

from lightning_sd.theory.predict import (
    Prediction,
    beta_c,
    hypoactivation_constant,
    interlayer_covariance_total,
    j2bar,
    out_sq_moments,
    predict,
    predict_infinite_width,
)
from lightning_sd.theory.probe import LayerActivation, ProbeResult, probe_model, residual_mlp_prediction
from lightning_sd.theory.simulate import SimulationResult, simulate, simulate_G

__all__ = [
    "LayerActivation",
    "Prediction",
    "ProbeResult",
    "SimulationResult",
    "beta_c",
    "hypoactivation_constant",
    "interlayer_covariance_total",
    "j2bar",
    "out_sq_moments",
    "predict",
    "predict_infinite_width",
    "probe_model",
    "residual_mlp_prediction",
    "simulate",
    "simulate_G",
]
