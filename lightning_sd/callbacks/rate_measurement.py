"""The measured survival modes: one function per mode, chosen by name from :data:`RATE_MEASUREMENTS`.

:class:`~lightning_sd.callbacks.stochastic_depth.StochasticDepth` with ``mode="sensemode"`` or
``mode="maxreg"`` picks its function from the registry once, at construction, calls it at
``on_train_start`` (or after ``measure_after_steps`` steps, and every ``recompute_every_n_epochs``
epochs) as ``measure(trainer, pl_module, settings)`` with its :class:`MeasurementSettings`, and stores
the :class:`RateMeasurement` it returns (rates, and the sensitivities or regularization terms behind
them). A new measured mode is one such function and one line in :data:`RATE_MEASUREMENTS` (its rate
rule belongs in :func:`lightning_sd.core.survival.survival_rates`). The math lives in core:
:func:`~lightning_sd.core.sensitivity.estimate_sensitivities` and
:func:`~lightning_sd.core.regularization.regularization_terms`; this module finds the batches, the loss,
the precision context and the ranks.

Choices both modes share, for the record:

- **Batches**: ``settings.num_batches`` batches (StochasticDepth's ``sensitivity_batches``) of the
  private probe loader of :mod:`lightning_sd.callbacks.probe_data` (the training loader's order without
  its randomness: dataset order for a sequential loader, else a fixed permutation, another one at each
  re-measurement epoch; several training dataloaders combined as the fit loop combines them), moved to
  the device through the LightningModule's batch-transfer hooks. The fit loop's iterator, sampler and
  workers are not touched and no global random number is consumed, so the run sees the same data
  order as without the measurement.
- **Network**: training mode, i.e. the network the training step sees (BatchNorm normalizes with batch
  statistics; at initialization its running statistics are not yet meaningful, so evaluation mode would
  measure a different, unnormalized function). Both modes describe ``Loss_train(m)`` around ``m = 1``,
  the function SD perturbs in training: ``S_l`` is its first derivative, ``g_l`` the Gauss-Newton part of
  its second (Hayou & Ayed 2021, Eq. (4)-(5)). ``RegularizationMonitor`` keeps watching the evaluation
  network by default. Module modes and every buffer (BatchNorm running statistics) are restored
  (:func:`lightning_sd.core.probing.restored_state`), the global RNG too, so the measurement leaves no
  trace in the model.
- **DDP**: each rank measures on its own batches and the result is averaged over ranks (every rank
  calls the same reduction), so all ranks compute the same rates.

SenseMode (:func:`measure_sensemode_rates`):

- **Loss**: the module's ``training_step`` output (a tensor, or a dict with ``"loss"``), with
  ``self.log``/``self.log_dict`` turned into no-ops during the measurement and torchmetrics states
  restored afterwards; ``settings.sensitivity_loss(pl_module, batch)`` replaces it. All branches are
  computed with ``m = 1`` (``handle.override``), whatever the current rates.
- **Precision**: under mixed precision (``"16-mixed"``, ``"bf16-mixed"``) the forward runs with autocast
  turned off, in the parameters' float32: ``S_l`` is a sum over every activation of the branch, and
  bf16 rounding moves it by several % of the largest ``S`` (7% on a CifarResNet-20), enough to reorder
  close blocks. Other precision plugins (true half, double) keep their ``train_step_context()``. The
  multipliers, their gradient and the returned sensitivities are float32.
- The forward bypasses the DDP wrapper and the backward is taken w.r.t. the multipliers only, so no
  gradient bucket is touched; ``S`` is averaged with ``trainer.strategy.reduce(..., reduce_op="mean")``.

Max regularization (:func:`measure_maxreg_rates`, Lemma 2):

- ``g_l`` is the example-weighted mean over the probe inputs of all ranks
  (:func:`~lightning_sd.callbacks.probing.reduce_mean_over_ranks`); the inputs are picked out of a batch by
  ``settings.input_fn`` (default :func:`lightning_sd.callbacks.probe_data.default_input_fn`: ``batch[0]``
  of tuples, known keys of dicts, a bare tensor).
- **Loss** whose Hessian H defines g (``settings.regularization_loss``), decided once per measurement by
  :func:`~lightning_sd.callbacks.probing.infer_regularization_loss`: ``"cross_entropy"`` or ``"mse"`` as
  given; with ``"auto"`` the LightningModule's ``regularization_loss`` attribute (``SDClassifier``
  declares ``"cross_entropy"``, ``SDRegressor`` ``"mse"``), else from the output: one coordinate per
  example -> ``"mse"`` (the softmax of a single logit is constant, so cross-entropy would give H = 0),
  more -> ``"cross_entropy"`` (announced on rank 0).
- When every measured g_l is 0 (all branches output zero, e.g. zero-initialised last BatchNorm, or a loss
  that does not fit the output) Lemma 2 has no information and gives uniform rates: a warning says so.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_sd._internals import metric_states_restored
from lightning_sd.callbacks.probe_data import probe_batches, probe_inputs
from lightning_sd.callbacks.probing import infer_regularization_loss, reduce_mean_over_ranks
from lightning_sd.core.gates import existing_handle
from lightning_sd.core.probing import restored_state
from lightning_sd.core.regularization import regularization_terms
from lightning_sd.core.sensitivity import estimate_sensitivities
from lightning_sd.core.survival import survival_rates

__all__ = [
    "RATE_MEASUREMENTS",
    "MeasurementSettings",
    "RateMeasurement",
    "measurement_context",
    "measurement_loss",
    "measure_maxreg_rates",
    "measure_rates",
    "measure_sensemode_rates",
    "measure_sensitivities",
    "sensitivities_over_ranks",
    "silenced_training_step",
]


@dataclass(frozen=True)
class MeasurementSettings:
    """What a measured mode takes from :class:`~lightning_sd.callbacks.StochasticDepth`'s arguments.

    Args:
        budget: expected fraction of blocks kept, in (0, 1]; the rates sum to ``budget * L``.
        p_min: smallest rate, in [0, budget], solved together with the budget.
        num_batches: probe batches per rank (StochasticDepth's ``sensitivity_batches``), >= 1.
        sensitivity_loss: SenseMode: ``(pl_module, batch) -> scalar loss``; ``None``: ``training_step``.
        regularization_loss: maxreg: ``"auto"``, ``"cross_entropy"`` or ``"mse"``.
        input_fn: maxreg: ``batch -> model input``; ``None``: :func:`~lightning_sd.callbacks.probe_data.default_input_fn`.
        estimator: maxreg: ``"exact"``, ``"sampled"`` or ``"auto"`` (exact up to ``num_samples`` outputs).
        num_samples: maxreg: probe vectors of the sampled estimator, >= 1.

    Example::

        settings = MeasurementSettings(budget=0.5, num_batches=4)
        result = RATE_MEASUREMENTS["sensemode"](trainer, pl_module, settings)
    """

    budget: float
    p_min: float = 0.0
    num_batches: int = 8
    sensitivity_loss: Callable[[pl.LightningModule, Any], Tensor] | None = None
    regularization_loss: Literal["auto", "cross_entropy", "mse"] = "auto"
    input_fn: Callable[[Any], Tensor] | None = None
    estimator: Literal["exact", "sampled", "auto"] = "auto"
    num_samples: int = 16


@dataclass(frozen=True)
class RateMeasurement:
    """What one measurement found; identical on every rank.

    Attributes:
        rates: survival rates p_1..p_L, float64 on CPU, ``sum = budget * L``.
        loss: what the measurement differentiated: ``"training_step"`` or ``"sensitivity_loss"``
            (SenseMode), ``"cross_entropy"`` or ``"mse"`` (maxreg: the loss whose Hessian defines g_l).
        sensitivities: SenseMode's ``S_l = dLoss/dm_l`` at ``m = 1`` (float32, CPU), else ``None``.
        regularization_terms: maxreg's ``g_l`` (float32, CPU), else ``None``.
    """

    rates: Tensor
    loss: str
    sensitivities: Tensor | None = None
    regularization_terms: Tensor | None = None


# ---------------------------------------------------------------------------------------------- SenseMode
def measure_sensemode_rates(trainer: pl.Trainer, pl_module: pl.LightningModule, settings: MeasurementSettings) -> RateMeasurement:
    """SenseMode: measure ``S`` and return ``p_l = clip(p_min + alpha |S_l|, p_min, 1)`` with ``sum_l p_l = budget * L``.

    Hayou & Ayed (2021), section 5. See the module docstring for the batches, loss, precision and DDP.

    Args:
        trainer: the running trainer (``trainer.train_dataloader`` must exist: call from
            ``on_train_start`` or later; it is only read, never iterated).
        pl_module: the LightningModule that carries the gates.
        settings: ``budget``, ``p_min``, ``num_batches`` and ``sensitivity_loss`` are used.

    Raises:
        ValueError: every ``S_l`` is 0 (branches that output zero), with what to do about it.
    """
    sensitivities = _probe_sensitivities(trainer, pl_module, settings.num_batches, settings.sensitivity_loss)
    try:
        rates = survival_rates("sensemode", sensitivities.numel(), settings.budget, sensitivities=sensitivities, p_min=settings.p_min)
    except ValueError as err:
        if not bool(sensitivities.any()):
            raise ValueError(
                f"StochasticDepth(mode='sensemode'): every sensitivity S_l is 0 at step {trainer.global_step}, so "
                "SenseMode cannot rank the blocks. The branches output zero (typically a zero-initialised last "
                "BatchNorm in each block). Measure once they have trained, e.g. measure_after_steps=100 "
                "(uniform rates until then), or use mode='uniform'."
            ) from err
        raise
    loss = "sensitivity_loss" if settings.sensitivity_loss is not None else "training_step"
    return RateMeasurement(rates=rates, loss=loss, sensitivities=sensitivities)


def _probe_sensitivities(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    num_batches: int,
    sensitivity_loss: Callable[[pl.LightningModule, Any], Tensor] | None,
) -> Tensor:
    """``S_l = dLoss/dm_l`` at ``m = 1`` on ``num_batches`` probe batches, averaged over ranks (float32, CPU)."""
    handle = existing_handle(pl_module)
    if handle is None:
        raise RuntimeError(
            "measure_sensitivities needs a LightningModule with stochastic-depth gates; StochasticDepth "
            "injects them in setup(), so call it from on_train_start or later"
        )
    loss_of = measurement_loss(sensitivity_loss, pl_module)
    batches = probe_batches(trainer, pl_module, int(num_batches), combined=True, epoch=trainer.current_epoch)
    if not batches:
        raise RuntimeError(
            "the training dataloader yielded no batch to measure sensitivities on; check the training data "
            "(limit_train_batches, dataset size) or use a mode that needs no measurement"
        )
    return sensitivities_over_ranks(trainer, pl_module, batches, loss_of, "train")


def sensitivities_over_ranks(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], loss_of: Any, mode: Literal["train", "eval"]
) -> Tensor:
    """``S_l = dLoss/dm_l`` at ``m = 1`` of the ``mode`` network on ``batches``, averaged over ranks (float32, CPU).

    Leaves no trace: the global RNG, every module's mode and buffers and the torchmetrics states are
    restored. ``loss_of`` is :func:`measurement_loss`'s. Every rank calls it (one all-reduce).
    """
    with isolate_rng(), restored_state(pl_module, mode), metric_states_restored(pl_module):
        sensitivities = estimate_sensitivities(
            pl_module,
            list(enumerate(batches)),
            loss_of,
            method="gradient",
            autocast=measurement_context(trainer),
            restore_buffers=False,  # restored_state above restores every buffer
            fork_rng=False,  # isolate_rng above covers torch, numpy and python RNGs
        )
    device = trainer.strategy.root_device
    reduced = trainer.strategy.reduce(sensitivities.to(device), reduce_op="mean")
    return torch.as_tensor(reduced).detach().to(device="cpu", dtype=torch.float32)


def measurement_context(trainer: pl.Trainer) -> Any:
    """The context the measurement's forward runs in: no autocast under mixed precision (see the module docstring)."""
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        device_type = trainer.strategy.root_device.type
        return lambda: torch.autocast(device_type, enabled=False)
    return getattr(plugin, "train_step_context", None) or plugin.forward_context


def measurement_loss(custom: Callable[[pl.LightningModule, Any], Tensor] | None, pl_module: pl.LightningModule) -> Any:
    """``loss_fn(model, (batch_idx, batch))`` for the core estimators: ``custom(module, batch)`` or the module's training_step loss.

    Shared by the measured modes and :class:`~lightning_sd.callbacks.depth_on_demand.DepthOnDemand`; it checks the
    module (manual optimization needs ``custom``) before anything runs.
    """
    if custom is not None:

        def custom_loss(model: nn.Module, item: tuple[int, Any]) -> Tensor:
            return _as_loss(custom(pl_module, item[1]), "sensitivity_loss", pl_module)

        return custom_loss
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            f"{type(pl_module).__name__} uses manual optimization: its training_step steps the optimizer itself, so "
            "SenseMode cannot call it to measure sensitivities. Pass StochasticDepth(sensitivity_loss=lambda "
            "module, batch: <scalar loss>) instead."
        )

    def step_loss(model: nn.Module, item: tuple[int, Any]) -> Tensor:
        batch_idx, batch = item
        with silenced_training_step(pl_module):
            out = pl_module.training_step(batch, batch_idx)
        return _as_loss(out, "training_step", pl_module)

    return step_loss


def _as_loss(out: Any, source: str, pl_module: pl.LightningModule) -> Tensor:
    if isinstance(out, dict):
        if "loss" not in out:
            raise RuntimeError(
                f"{type(pl_module).__name__}.{source} returned a dict without a 'loss' key (keys: {sorted(out)}); "
                "SenseMode differentiates that loss. Return {'loss': loss, ...} or pass StochasticDepth(sensitivity_loss=...)."
            )
        out = out["loss"]
    if not isinstance(out, Tensor) or out.numel() != 1:
        what = "None" if out is None else (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__)
        raise RuntimeError(
            f"{type(pl_module).__name__}.{source} returned {what}, but SenseMode needs the scalar training loss to "
            "differentiate. Return the loss (or {'loss': loss}) from training_step, or pass "
            "StochasticDepth(sensitivity_loss=lambda module, batch: <scalar loss>)."
        )
    return out.reshape(())


@contextlib.contextmanager
def silenced_training_step(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` are no-ops inside: a callback can call ``training_step`` from any hook."""

    def no_log(*args: Any, **kwargs: Any) -> None:
        return None

    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    pl_module.__dict__["log"] = no_log
    pl_module.__dict__["log_dict"] = no_log
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                pl_module.__dict__[name] = saved[name]
            else:
                pl_module.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------------- maxreg
def measure_maxreg_rates(trainer: pl.Trainer, pl_module: pl.LightningModule, settings: MeasurementSettings) -> RateMeasurement:
    """Lemma 2: measure ``g_l`` on training probe batches and return the max-regularization rates.

    ``g = mean over the probe examples of zeta_l^T H zeta_l`` (Hayou & Ayed 2021, Eq. (5)) on the
    training-mode network, over ``settings.num_batches`` probe batches per rank, averaged over all ranks
    (weighted by examples), then ``p_l = clip(1/2 - C/g_l, p_min, 1)`` with ``sum p = budget * L``.
    With BatchNorm in the model g is exact (one forward-mode pass per block and batch); without,
    ``settings.estimator`` decides (see :func:`~lightning_sd.core.regularization.regularization_terms`).

    Args:
        trainer: the running ``Trainer`` (at ``on_train_start`` or later).
        pl_module: the LightningModule carrying the gates.
        settings: ``budget``, ``p_min``, ``num_batches``, ``regularization_loss``, ``input_fn``,
            ``estimator`` and ``num_samples`` are used.

    Example::

        trainer = Trainer(callbacks=[StochasticDepth(mode="maxreg", budget=0.3)])  # loss inferred
        trainer.fit(model, datamodule=dm)  # rates measured at on_train_start by measure_maxreg_rates
    """
    handle = existing_handle(pl_module)
    if handle is None:
        raise RuntimeError("measure_maxreg_rates needs the StochasticDepth callback's gates; it runs after the callback's setup")
    inputs = probe_inputs(
        trainer, pl_module, num_batches=int(settings.num_batches), input_fn=settings.input_fn, epoch=trainer.current_epoch
    )
    loss = infer_regularization_loss(settings.regularization_loss, pl_module, inputs[0] if inputs else None)
    total = torch.zeros(handle.num_blocks, dtype=torch.float64)
    count = 0
    for x in inputs:
        g = regularization_terms(
            pl_module, x, loss=loss, estimator=settings.estimator, num_samples=settings.num_samples, seed=count, mode="train"
        )
        total += g * x.shape[0]
        count += x.shape[0]
    g = reduce_mean_over_ranks(trainer, pl_module, total, count)
    _warn_if_all_zero(g, loss, "StochasticDepth(mode='maxreg')")
    rates = survival_rates("maxreg", handle.num_blocks, settings.budget, g=g, p_min=settings.p_min)
    return RateMeasurement(rates=rates, loss=loss, regularization_terms=g.to(torch.float32))


def _warn_if_all_zero(g: Tensor, loss: str, owner: str) -> None:
    """Warn (rank 0) that every g_l is 0: Lemma 2 has no information, and say what to do."""
    if g.numel() and bool((g == 0).all()):
        rank_zero_warn(
            f"{owner}: every measured regularization term g_l is 0 (loss={loss!r}), so Lemma 2 has nothing to rank the "
            "blocks by and gives uniform rates. Either the loss does not fit the output (cross_entropy on a single "
            "output coordinate has H = 0: use 'mse' for a regression) or every residual branch outputs zero at this "
            "point (zero-initialised last BatchNorm): measure after some training steps, or use mode='uniform'/'linear'."
        )


#: Measured survival mode -> its measurement ``(trainer, pl_module, settings) -> RateMeasurement``.
RATE_MEASUREMENTS: dict[str, Callable[[pl.Trainer, pl.LightningModule, MeasurementSettings], RateMeasurement]] = {
    "sensemode": measure_sensemode_rates,
    "maxreg": measure_maxreg_rates,
}


# ---------------------------------------------------------------------------------------------- deprecated
def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def measure_rates(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
    """Deprecated: ``RATE_MEASUREMENTS[mode](trainer, pl_module, callback.measurement_settings)``.

    Measures for ``callback.mode``, stores the sensitivities or regularization terms on the callback (as
    before) and returns the float64 rates.
    """
    _deprecated("measure_rates(callback, trainer, pl_module)", "RATE_MEASUREMENTS[mode](trainer, pl_module, settings)")
    if callback.mode not in RATE_MEASUREMENTS:
        raise ValueError(f"measure_rates handles the measured modes {tuple(RATE_MEASUREMENTS)}, not mode={callback.mode!r}")
    result = RATE_MEASUREMENTS[callback.mode](trainer, pl_module, callback.measurement_settings)
    callback._keep_measured(result)
    return result.rates


def measure_sensitivities(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
    """Deprecated: ``measure_sensemode_rates(trainer, pl_module, settings).sensitivities`` (float32, CPU)."""
    _deprecated("measure_sensitivities(callback, trainer, pl_module)", "measure_sensemode_rates(trainer, pl_module, settings)")
    return _probe_sensitivities(trainer, pl_module, int(callback.sensitivity_batches), callback.sensitivity_loss)
