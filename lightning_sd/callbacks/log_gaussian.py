"""LogGaussianMonitor: hypoactivation and output-scale diagnostics at the start of training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_sd.callbacks.monitor import ProbeMonitor
from lightning_sd.callbacks.probe_data import default_input_fn, probe_inputs, resolve_input_fn
from lightning_sd.callbacks.probing import mean_over_ranks
from lightning_sd.theory.probe import ProbeResult, probe_model

__all__ = ["LogGaussianMonitor"]

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class LogGaussianMonitor(ProbeMonitor):
    r"""Log hypoactivation and the distribution of ``ln ||y_out||^2`` of the model when training starts.

    At ``on_train_start`` the callback runs the LightningModule once on probe inputs (one training
    batch read through :mod:`lightning_sd.callbacks.probe_data`, a private loader that leaves the run's
    data order, workers and random stream alone; or ``probe``), in eval mode, without gradients and
    under ``isolate_rng``, restoring every submodule's mode and buffers afterwards. For every
    ``nn.ReLU`` / :class:`~lightning_sd.models.BalancedReLU` call it measures the fraction of active
    units and the average hypoactivation of Li, Nica & Roy (2021), Eq. (2),
    ``h_l = ||phi(z_l / ||z_l||)||^2 - 1/2`` (averaged over the probe inputs): vanilla ReLU ResNets
    fire slightly fewer than half their units (``h_l < 0``, ``O(1/n)`` per layer, ``O(d/n)`` in total),
    balanced ones exactly half on average. It also records ``ln ||y_out||^2`` per input and,
    when the module contains one :class:`~lightning_sd.models.ResidualMLP` (the paper's Eq. (1) with
    ``alpha = 1``, ``lam = branch_scale``), the log-Gaussian prediction beside it (Theorem 1 / 4):
    ``ln ||y_out||^2 = ln(||x||^2/n_in) + d ln(1 + lam^2) + G + ln chi^2_{n_out}``, ``G ~ N(mean_G, var_G)``.

    Logged (``on_epoch``, keys under ``prefix``): ``active_fraction_mean``, ``h_total``,
    ``ln_out_sq_mean``, ``ln_out_sq_std``, ``ln_out_sq_q05 .. q95``, with ``pred_`` twins when there
    is a prediction, and per layer ``active_fraction/<name>`` and ``h/<name>`` (``log_per_layer``; on a
    ``TensorBoardLogger`` one histogram and one image over the layers per probe instead, see
    :func:`~lightning_sd.callbacks.output.log_per_block`).
    Two tables go to ``trainer.log_dir`` (CSV, rank zero) and to every logger with a ``log_table``
    method (e.g. ``WandbLogger``): ``<prefix>_layers.csv`` (layer, name, balanced, active_fraction, h)
    and ``<prefix>_output.csv`` (statistic, empirical, predicted). The measurements stay in
    ``self.result`` (a :class:`~lightning_sd.theory.ProbeResult`, also ``history[-1]["result"]``).

    Distributed: each rank probes its own batch; the logged values are the mean over ranks of the
    per-rank statistics (computed by the monitor, so every rank logs the same values, see
    :func:`~lightning_sd.callbacks.output.log_epoch_metrics`); the tables hold rank 0's probe.

    The theory is a statement over random weights at initialization for one input: a probe over one
    network's batch shares the weights, so its spread is typically narrower than predicted; the
    centre should agree. It does not apply to a trained or resumed model, to ``"expected"``-scaling
    stochastic depth (the eval network scales branches by ``p_l``), or to ``F.relu`` calls (not seen).

    Args:
        probe: explicit probe inputs (batch first); default: one training batch of the probe loader.
        num_probe: use at most this many probe inputs (``None``: all of the batch), ``>= 1``.
        input_fn: ``batch -> input tensor``; default
            :func:`~lightning_sd.callbacks.probe_data.default_input_fn` (``batch[0]`` of tuples, the keys
            ``"x"``, ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"`` of dicts).
        input_key: deprecated (``DeprecationWarning``): ``input_fn=lambda batch: batch[input_key]``.
        forward: optional ``callable(pl_module, x) -> output``; default ``pl_module(x)``.
        log_per_layer: log the two per-layer scalars of every ReLU call (``2 x`` number of ReLUs keys).
        prefix: metric key and file-name prefix.

    Example::

        trainer = Trainer(callbacks=[LogGaussianMonitor()], max_epochs=10)
        trainer.fit(model, datamodule=dm)
        monitor.result.mean_active_fraction, monitor.result.predicted_ln_out_sq()
    """

    def __init__(
        self,
        probe: Tensor | None = None,
        num_probe: int | None = None,
        input_fn: Callable[[Any], Tensor] | None = None,
        input_key: int | str | None = None,
        forward: Callable[[pl.LightningModule, Tensor], Any] | None = None,
        log_per_layer: bool = True,
        prefix: str = "log_gaussian",
    ) -> None:
        super().__init__(every_n_epochs=None, at_train_start=True)
        if probe is not None and (not isinstance(probe, Tensor) or probe.dim() < 1 or probe.shape[0] < 1):
            raise ValueError("probe must be a non-empty batch-first tensor")
        if num_probe is not None and (not isinstance(num_probe, int) or num_probe < 1):
            raise ValueError(f"num_probe must be an integer >= 1, got {num_probe!r}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        self.probe = probe
        self.num_probe = num_probe
        self.input_fn = resolve_input_fn("LogGaussianMonitor", input_fn, input_key)
        self.forward = forward
        self.log_per_layer = log_per_layer
        self.prefix = prefix
        self.layer_rows: list[dict[str, Any]] = []
        self.output_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------ probe inputs
    def _extract(self, batch: Any) -> Tensor:
        return (self.input_fn or default_input_fn)(batch)

    def _probe_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        if self.probe is not None:
            x = self.probe
        else:
            batches = probe_inputs(trainer, pl_module, num_batches=1, input_fn=self.input_fn)
            if not batches:
                raise RuntimeError("LogGaussianMonitor: the training dataloader yielded no batch; pass probe=...")
            x = batches[0]
        if self.num_probe is not None:
            x = x[: self.num_probe]
        return x

    @property
    def result(self) -> ProbeResult | None:
        """The last probe's measurements (``None`` before ``on_train_start``)."""
        return self.history[-1]["result"] if self.history else None

    # ------------------------------------------------------------------------------------------ probe
    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the module once on the probe inputs: ``{"result": ProbeResult}`` (this rank's probe)."""
        x = self._probe_inputs(trainer, pl_module).to(pl_module.device)
        precision = trainer.precision_plugin
        x = precision.convert_input(x)
        with isolate_rng(), precision.forward_context():
            result = probe_model(pl_module, x, forward=self.forward)
        return {"result": result}

    @override
    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, Any]) -> None:
        """Log the statistics (mean over ranks) and write the layer and output tables (rank 0's probe)."""
        result: ProbeResult = record["result"]
        metrics: dict[str, float] = {}
        if not result.layers:
            rank_zero_warn("LogGaussianMonitor: no nn.ReLU / BalancedReLU module was called by the probe")
        else:
            metrics["active_fraction_mean"] = result.mean_active_fraction
            metrics["h_total"] = result.h_total
        per_layer = ("active_fraction", "h") if self.log_per_layer else ()
        for layer in result.layers:  # a layer called twice: its last call, as one metric key holds one value
            for quantity in per_layer:
                metrics[f"{quantity}/{layer.name}"] = getattr(layer, quantity)
        empirical = self._summary(result.ln_out_sq)
        pred_samples = result.predicted_samples()
        predicted = self._summary(pred_samples) if pred_samples is not None else None
        moments = result.predicted_ln_out_sq()
        if predicted is not None and moments is not None:
            predicted["mean"], predicted["std"] = moments  # exact moments instead of the Monte-Carlo ones
        for key, value in empirical.items():
            metrics[f"ln_out_sq_{key}"] = value
            if predicted is not None:
                metrics[f"pred_ln_out_sq_{key}"] = predicted[key]
        if result.prediction is not None:
            metrics["pred_mean_G"] = result.prediction.mean_G
            metrics["pred_var_G"] = result.prediction.var_G
            metrics["pred_h_total"] = result.prediction.h_total
        averaged = mean_over_ranks(trainer, metrics)  # every rank logs the same values (and the same keys)
        names = list(dict.fromkeys(layer.name for layer in result.layers)) if per_layer else []
        layer_keys = {f"{quantity}/{name}" for quantity in per_layer for name in names}
        self.log_metrics(pl_module, {f"{self.prefix}/{key}": value for key, value in averaged.items() if key not in layer_keys})
        if names:  # per layer: scalars <prefix>/h/<layer name>; on TensorBoard a histogram and an image
            values = {f"{self.prefix}/{quantity}": [averaged[f"{quantity}/{name}"] for name in names] for quantity in per_layer}
            self.log_per_block(trainer, pl_module, values, labels=names, axis="layer")
        self.layer_rows = [
            {"layer": s.index, "name": s.name, "balanced": s.balanced, "active_fraction": s.active_fraction, "h": s.h}
            for s in result.layers
        ]
        self.output_rows = [
            {"statistic": f"ln_out_sq_{k}", "empirical": v, "predicted": (predicted[k] if predicted is not None else float("nan"))}
            for k, v in empirical.items()
        ]
        for suffix, rows, fields in (
            ("layers", self.layer_rows, ["layer", "name", "balanced", "active_fraction", "h"]),
            ("output", self.output_rows, ["statistic", "empirical", "predicted"]),
        ):
            self.publish_table(trainer, f"{self.prefix}_{suffix}.csv", rows, key=f"{self.prefix}/{suffix}", columns=fields)

    @staticmethod
    def _summary(values: Tensor) -> dict[str, float]:
        v = values.double()
        out = {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0}
        qs = torch.quantile(v, torch.tensor(_QUANTILES, dtype=torch.float64))
        for q, val in zip(_QUANTILES, qs.tolist()):
            out[f"q{round(q * 100):02d}"] = val
        return out
