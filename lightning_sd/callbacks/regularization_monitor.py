"""RegularizationMonitor: log SD's per-block regularization terms g_l and its explicit penalty R during training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_sd.callbacks.monitor import ProbeMonitor
from lightning_sd.callbacks.probe_data import probe_inputs
from lightning_sd.callbacks.probing import infer_regularization_loss, reduce_mean_over_ranks
from lightning_sd.core.discovery import find_residual_branches
from lightning_sd.core.gates import existing_handle
from lightning_sd.core.regularization import (
    REGULARIZATION_ESTIMATORS,
    REGULARIZATION_LOSSES,
    gate_variance,
    regularization_terms,
)
from lightning_sd.core.validation import SCALINGS, check_choice, check_unit_interval

__all__ = ["RegularizationMonitor"]


class RegularizationMonitor(ProbeMonitor):
    r"""Watch the explicit regularization of stochastic depth: ``g_l`` per block, the penalty ``R`` and its shares.

    Training with SD is training the average network plus the explicit penalty (Hayou & Ayed 2021,
    section 4.1, Eq. (4)/(6))

    ``R = 1/2 sum_l Var(m_l) g_l``,  ``g_l = mean_x zeta_l(x)^T H(x) zeta_l(x)`` (Eq. (5)),

    with ``zeta_l = d y_out / d m_l`` the "information discrepancy" of block l and ``H`` the Hessian of the
    loss w.r.t. the output (``diag(pi) - pi pi^T`` for cross-entropy, ``2 I`` for squared error).
    Every ``every_n_epochs`` training epochs the monitor computes ``g`` on a fixed probe batch
    (``probe_size`` examples of the validation data, else of the training data, taken once per process
    through :mod:`lightning_sd.callbacks.probe_data`: a fixed pseudo-random subset read by a private
    loader, so the run's data order, workers and random stream are untouched), averages it over
    processes, and logs:

    - ``reg/g/{l:03d}`` for every block, ``reg/penalty`` (R), ``reg/share/{l:03d}`` (``R_l / R``),
      ``reg/g_mean``;
    - a per-block table ``regularization_epoch{E}.csv`` in ``trainer.log_dir`` (block, name, g,
      survival, variance, penalty, share), and ``logger.log_table`` where a logger has it (W&B);
    - on a ``TensorBoardLogger``, instead of the per-block scalars: one histogram (``reg/g``,
      ``reg/share``) and one image of the profile over depth (``reg/g_by_block``,
      ``reg/share_by_block``) per probe, and the table as markdown text ``reg/blocks`` (see
      :func:`~lightning_sd.callbacks.output.log_per_block`).

    Rates come from the :class:`~lightning_sd.callbacks.StochasticDepth` callback in
    ``trainer.callbacks`` (its current rates and scaling, see :meth:`~ProbeMonitor.rates_in_force`);
    without one, from ``survival``; without both, only g is logged. ``history`` keeps every probe's
    :meth:`measure` result (in memory); :class:`~lightning_sd.SummaryPlots` draws from it. The probe runs
    in evaluation mode (BatchNorm running statistics: the network after
    training; ``StochasticDepth(mode="maxreg")`` measures the training-mode network instead, see
    :mod:`lightning_sd.callbacks.rate_measurement`) in fp32 (fp64 statistics), outside autocast, under
    ``isolate_rng``; module modes, buffers and parameter gradients are left as they were. Under DDP
    every process probes its own share of the data and the same reduction is called on every rank, so
    every logged value is the same on every rank.

    Args:
        every_n_epochs: probe after every n-th training epoch (>= 1).
        probe_size: examples in the probe batch per process (>= 1); g's relative Monte-Carlo error over
            inputs falls like ``1/sqrt(probe_size)``.
        loss: ``"cross_entropy"`` (logits), ``"mse"`` (the paper's ``||y - t||^2``) or ``"auto"`` (the
            module's ``regularization_loss`` attribute, else ``"mse"`` for one output coordinate per
            example and ``"cross_entropy"`` for more; see
            :func:`~lightning_sd.callbacks.probing.infer_regularization_loss`).
        estimator: ``"exact"`` (one backward per output coordinate), ``"sampled"`` (``num_samples``
            backwards, unbiased) or ``"auto"`` (exact when the output has <= ``num_samples`` coordinates).
        num_samples: probe vectors of the sampled estimator (>= 1).
        survival: rates p_l (one float or a sequence of length L) when no StochasticDepth callback is used.
        scaling: ``"inverted"`` or ``"expected"``, the convention of ``survival`` (ignored with a
            StochasticDepth callback, whose scaling is used).
        blocks: residual branches to probe on a model without gates (see ``find_residual_branches``).
        input_fn: ``batch -> inputs``; default ``batch[0]`` for ``(x, y)`` batches (see
            :func:`~lightning_sd.callbacks.probe_data.default_input_fn`).
        seed: seed of the sampled estimator's probe vectors.

    Example::

        trainer = Trainer(callbacks=[StochasticDepth(mode="uniform", budget=0.7),
                                     RegularizationMonitor(every_n_epochs=5, loss="cross_entropy")])
        trainer.fit(model, datamodule=dm)
        monitor.history[-1]["penalty"]  # R at the last probe
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        probe_size: int = 128,
        loss: Literal["auto", "cross_entropy", "mse"] = "auto",
        estimator: Literal["exact", "sampled", "auto"] = "auto",
        num_samples: int = 16,
        survival: float | Sequence[float] | None = None,
        scaling: str = "inverted",
        blocks: str | list[str] | None = None,
        input_fn: Callable[[Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, survival=survival, scaling=scaling)
        if int(probe_size) != probe_size or probe_size < 1:
            raise ValueError(f"probe_size must be a positive integer (examples per process), got {probe_size!r}")
        if loss != "auto" and loss not in REGULARIZATION_LOSSES:
            raise ValueError(
                f"unknown loss={loss!r}; choose 'auto' (inferred), 'cross_entropy' (classification logits) or 'mse' (squared error)"
            )
        if estimator not in REGULARIZATION_ESTIMATORS:
            raise ValueError(f"unknown estimator={estimator!r}; choose one of {', '.join(REGULARIZATION_ESTIMATORS)}")
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        check_choice("scaling", scaling, SCALINGS)
        if survival is not None:
            rates = torch.as_tensor(survival, dtype=torch.float64)
            check_unit_interval(rates)
            if scaling == "inverted" and bool((rates == 0).any()):
                raise ValueError("a survival rate of 0 with scaling='inverted' has infinite variance; use scaling='expected'")
        self.probe_size = int(probe_size)
        self.loss = loss
        self.estimator = estimator
        self.num_samples = int(num_samples)
        self.blocks = blocks
        self.input_fn = input_fn
        self.seed = int(seed)
        self.table_path: str | None = None
        self._probe: list[Tensor] | None = None
        self._loss: str | None = None

    # ------------------------------------------------------------------ probe data
    def _collect_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Tensor]:
        return probe_inputs(trainer, pl_module, max_examples=self.probe_size, source="val_or_train", input_fn=self.input_fn)

    # ------------------------------------------------------------------ rates
    def _rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule, num_blocks: int) -> tuple[Tensor | None, str]:
        """The rates in force as fp64, one per block (a single ``survival`` float is used for every block)."""
        survival, scaling = self.rates_in_force(trainer, pl_module)
        if survival is None:
            return None, scaling
        p = torch.as_tensor(survival, dtype=torch.float64).flatten()
        if p.numel() == 1:
            p = p.expand(num_blocks).clone()
        if p.numel() != num_blocks:
            raise ValueError(f"RegularizationMonitor(survival=...) has {p.numel()} rates but the model has {num_blocks} residual branches")
        return p, scaling

    # ------------------------------------------------------------------ measurement
    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Probe now: g (mean over the probe, all processes), rates, R and shares. Called by every rank."""
        if self._probe is None:
            self._probe = self._collect_probe(trainer, pl_module)
        if self._loss is None:
            example = self._probe[0] if self._probe else None
            self._loss = infer_regularization_loss(self.loss, pl_module, example, owner="RegularizationMonitor")
        handle = existing_handle(pl_module)
        names: list[str] | None = [b.name for b in handle.branches] if handle is not None else None
        blocks = None if handle is not None else self.blocks
        total: Tensor | None = None
        count = 0
        with isolate_rng():
            for i, x in enumerate(self._probe):
                g = regularization_terms(
                    pl_module, x, loss=self._loss, estimator=self.estimator, num_samples=self.num_samples, blocks=blocks, seed=self.seed + i
                )
                total = g * x.shape[0] if total is None else total + g * x.shape[0]
                count += x.shape[0]
        if total is None:
            # This process has no probe data: still take part in the reduction with zeros.
            num = handle.num_blocks if handle is not None else len(find_residual_branches(pl_module, self.blocks))
            total = torch.zeros(num, dtype=torch.float64)
        g = reduce_mean_over_ranks(trainer, pl_module, total, count)
        if names is None:
            names = [b.name for b in find_residual_branches(pl_module, self.blocks)]
        p, scaling = self._rates(trainer, pl_module, g.numel())
        result: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step, "names": names, "g": g, "loss": self._loss}
        if p is not None:
            var = gate_variance(p, scaling)
            terms = 0.5 * var * g
            penalty = float(terms.sum())
            share = terms / penalty if penalty > 0 else torch.zeros_like(terms)
            result.update(survival=p, scaling=scaling, variance=var, terms=terms, penalty=penalty, share=share)
        return result

    @override
    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, Any]) -> None:
        """Log ``reg/*``, write ``regularization_epoch{E}.csv`` and the TensorBoard histograms over depth."""
        g = record["g"]
        metrics = {"reg/g_mean": float(g.mean())}
        per_block = {"reg/g": g}
        if "penalty" in record:
            metrics["reg/penalty"] = record["penalty"]
            per_block["reg/share"] = record["share"]
        # identical on every rank after the reduction in measure()
        self.log_metrics(pl_module, metrics)
        self.log_per_block(trainer, pl_module, per_block)  # reg/g/001 ..; on TensorBoard a histogram and an image
        path = self.publish_table(trainer, f"regularization_epoch{trainer.current_epoch}.csv", self.table(record), key="reg/blocks")
        if trainer.is_global_zero:
            self.table_path = path

    # ------------------------------------------------------------------ tables
    @staticmethod
    def table(result: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per block of a :meth:`measure` result: block, name, g and, with rates, survival/variance/penalty/share."""
        rows = []
        for block, name in enumerate(result["names"]):
            row: dict[str, Any] = {"block": block + 1, "name": name, "g": float(result["g"][block])}
            if "penalty" in result:
                row.update(
                    survival=float(result["survival"][block]),
                    variance=float(result["variance"][block]),
                    penalty=float(result["terms"][block]),
                    share=float(result["share"][block]),
                )
            rows.append(row)
        return rows

