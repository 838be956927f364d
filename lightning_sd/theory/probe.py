"""Measure hypoactivation and the output scale of a real model on probe inputs (torch only).

The measurement behind :class:`~lightning_sd.callbacks.log_gaussian.LogGaussianMonitor`, usable from a
plain PyTorch loop. For every call of an ``nn.ReLU`` or :class:`~lightning_sd.models.balanced.BalancedReLU`
module it records, averaged over the probe inputs,

* the fraction of active units (output ``> 0``), 1/2 for a balanced network;
* ``h_l = ||phi(zhat)||^2 - 1/2`` with ``zhat = z / ||z||`` the pre-activation of one input (all its
  positions and channels), the paper's average hypoactivation (Eq. (2)), averaged over inputs
  instead of over weights;

and ``ln ||y_out||^2`` per input. For a :class:`~lightning_sd.models.residual_mlp.ResidualMLP`, which is
the paper's Eq. (1) with ``alpha = 1``, ``lam = branch_scale``, ``n = width``, ``d = depth`` at
initialization, :func:`residual_mlp_prediction` gives the log-Gaussian law of ``ln ||y_out||^2``.

Caveat: the theory describes the law over random *weights* for a fixed input. A probe measures one
network over many inputs; the inputs share the weights, so the empirical spread of ``ln ||y_out||^2``
over a batch is typically narrower than the predicted spread, while its centre should be close
(check over several seeds, as in the tests). After training the prediction does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_sd.core.probing import restored_state
from lightning_sd.models.balanced import BalancedReLU
from lightning_sd.models.residual_mlp import ResidualMLP, ResidualMLPBlock
from lightning_sd.theory.predict import Prediction, predict

__all__ = ["LayerActivation", "ProbeResult", "probe_model", "residual_mlp_prediction"]


@dataclass(frozen=True)
class LayerActivation:
    """Statistics of one ReLU call over the probe inputs.

    Attributes:
        index: 1-based position in forward order.
        name: qualified module name (``#k`` appended for the k-th reuse of the same module).
        active_fraction: fraction of active units, in [0, 1].
        h: ``mean over inputs of ||phi(zhat)||^2 - 1/2``, in [-1/2, 1/2].
        balanced: the module is a :class:`BalancedReLU`.
    """

    index: int
    name: str
    active_fraction: float
    h: float
    balanced: bool


@dataclass
class ProbeResult:
    """Result of :func:`probe_model`.

    Attributes:
        layers: one :class:`LayerActivation` per ReLU call, in forward order.
        ln_out_sq: ``(B,)`` float64, ``ln ||y_out||^2`` per probe input.
        input_log_ratio: ``(B,)`` float64 ``ln(||x||^2 / n_in)`` of the inputs of the ResidualMLP, or ``None``.
        prediction: the log-Gaussian :class:`~lightning_sd.theory.Prediction` when the model is a ResidualMLP.
        n_out: output dimension used by the prediction.
    """

    layers: list[LayerActivation]
    ln_out_sq: Tensor
    input_log_ratio: Tensor | None = None
    prediction: Prediction | None = None
    n_out: int | None = None

    @property
    def h_total(self) -> float:
        """Sum of ``h_l`` over the ReLU calls."""
        return float(sum(layer.h for layer in self.layers))

    @property
    def mean_active_fraction(self) -> float:
        """Active fraction averaged over the ReLU calls (nan when there is none)."""
        if not self.layers:
            return float("nan")
        return float(sum(layer.active_fraction for layer in self.layers) / len(self.layers))

    def predicted_ln_out_sq(self) -> tuple[float, float] | None:
        """Predicted mean and standard deviation of ``ln ||y_out||^2`` over the probe inputs.

        Each input ``x`` contributes ``ln(||x||^2/n_in) + d ln(alpha^2 + lam^2) + G + ln chi^2_{n_out}``
        (Theorem 1, Eq. (6)); the spread of the input norms over the batch is added to the variance.
        """
        if self.prediction is None or self.input_log_ratio is None or self.n_out is None:
            return None
        r = self.input_log_ratio
        mean, var = self.prediction.ln_out_sq_moments(self.n_out, float(r.mean()))
        if r.numel() > 1:
            var += float(r.var(unbiased=False))
        return mean, math.sqrt(var)

    def predicted_samples(self, num_samples: int = 20000, seed: int = 0) -> Tensor | None:
        """Samples of the predicted ``ln ||y_out||^2`` (Gaussian ``G``, exact ``ln chi^2_{n_out}``, probe norms)."""
        p = self.prediction
        if p is None or self.input_log_ratio is None or self.n_out is None:
            return None
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        g = p.mean_G + p.std_G * torch.randn(num_samples, generator=gen, dtype=f64)
        chi2 = torch.randn(num_samples, self.n_out, generator=gen, dtype=f64).square().sum(1)
        idx = torch.randint(0, self.input_log_ratio.numel(), (num_samples,), generator=gen)
        gain = p.d * math.log(p.alpha**2 + p.lam**2)
        return self.input_log_ratio[idx] + gain + g + chi2.log()


def residual_mlp_prediction(model: nn.Module, C: float | None = None) -> tuple[Prediction, int] | None:
    """Log-Gaussian prediction for a :class:`ResidualMLP` at initialization, or ``None`` if not applicable.

    ``ResidualMLP`` is Eq. (1) with ``alpha = 1``, ``lam = branch_scale`` (1, or ``1/sqrt(depth)`` when
    stable), ``n = width``, ``d = depth``; balanced when its block activations are
    :class:`BalancedReLU`. Returns ``(prediction, n_out)``; ``None`` when the blocks do not share one
    branch scale or mix activations.
    """
    if not isinstance(model, ResidualMLP):
        return None
    blocks: list[ResidualMLPBlock] = list(model.blocks)  # type: ignore[arg-type]  # ModuleList of ResidualMLPBlock
    scales = {float(b.branch_scale) for b in blocks}
    kinds = {type(b.act) for b in blocks}
    if len(scales) != 1 or len(kinds) != 1 or not kinds <= {nn.ReLU, BalancedReLU}:
        return None
    lam = scales.pop()
    if lam <= 0:
        return None
    balanced = kinds == {BalancedReLU}
    n, d = model.stem.out_features, len(blocks)
    return predict(n, d, 1.0, lam, balanced=balanced, C=C), model.head.out_features


def _find_residual_mlp(model: nn.Module) -> tuple[str, ResidualMLP] | None:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualMLP)]
    return found[0] if len(found) == 1 else None


def probe_model(
    model: nn.Module,
    x: Tensor,
    forward=None,
    with_prediction: bool = True,
) -> ProbeResult:
    """Run ``model`` on ``x`` (eval mode, no grad, modes restored) and measure activations and output scale.

    Args:
        model: any module with ``nn.ReLU`` / :class:`BalancedReLU` submodules (``F.relu`` calls are invisible).
        x: probe inputs, batch first.
        forward: optional ``callable(model, x) -> output``; default ``model(x)``. A tuple/list output
            uses its first element.
        with_prediction: add the log-Gaussian prediction when ``model`` contains exactly one
            :class:`ResidualMLP` (its output is then taken as ``y_out``).

    Returns:
        A :class:`ProbeResult`.

    Example::

        >>> res = probe_model(ResidualMLP(32, 128, 64, 10), torch.randn(256, 32))
        >>> res.mean_active_fraction, res.h_total, res.predicted_ln_out_sq()
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a non-empty batch-first tensor")
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.ReLU, BalancedReLU)) and id(m) not in names:
            names[id(m)] = name or type(m).__name__
    calls: dict[int, int] = {}
    pending: dict[int, Tensor] = {}
    stats: list[LayerActivation] = []

    def pre_hook(mod, inputs):
        z = inputs[0].detach()
        pending[id(mod)] = z.reshape(z.shape[0], -1).double().square().sum(1)

    def post_hook(mod, inputs, out):
        sq_in = pending.pop(id(mod))
        o = out.detach().reshape(out.shape[0], -1).double()
        sq_out = o.square().sum(1)
        ok = sq_in > 0
        h = float((sq_out[ok] / sq_in[ok]).mean()) - 0.5 if bool(ok.any()) else float("nan")
        k = calls.get(id(mod), 0)
        calls[id(mod)] = k + 1
        name = names[id(mod)] + (f"#{k}" if k else "")
        stats.append(
            LayerActivation(len(stats) + 1, name, float((o > 0).double().mean()), h, isinstance(mod, BalancedReLU))
        )

    target = _find_residual_mlp(model) if with_prediction else None
    captured: dict[str, Tensor] = {}

    def mlp_hook(mod, inputs, out):
        captured["x"] = inputs[0].detach()
        captured["y"] = out.detach()

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, (nn.ReLU, BalancedReLU)):
                handles.append(m.register_forward_pre_hook(pre_hook))
                handles.append(m.register_forward_hook(post_hook))
        if target is not None:
            handles.append(target[1].register_forward_hook(mlp_hook))
        with restored_state(model, "eval"), torch.no_grad():
            out = forward(model, x) if forward is not None else model(x)
    finally:
        for h in handles:
            h.remove()
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"model output must be a tensor (or a tuple starting with one), got {type(out).__name__}")
    y = captured.get("y", out)
    ln_out_sq = y.reshape(y.shape[0], -1).double().square().sum(1).log().cpu()
    result = ProbeResult(layers=stats, ln_out_sq=ln_out_sq)
    if target is not None and "x" in captured:
        pred = residual_mlp_prediction(target[1])
        if pred is not None:
            xin = captured["x"].reshape(captured["x"].shape[0], -1).double()
            result.input_log_ratio = (xin.square().sum(1) / xin.shape[1]).log().cpu()
            result.prediction, result.n_out = pred
    return result
