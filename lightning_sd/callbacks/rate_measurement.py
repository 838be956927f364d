"""Lightning plumbing of the measured survival modes: SenseMode sensitivities at fit start.

:func:`measure_rates` is what :class:`~lightning_sd.callbacks.stochastic_depth.StochasticDepth`
calls from ``on_train_start`` (and every ``recompute_every_n_epochs`` epochs) for
``mode="sensemode"`` and ``mode="maxreg"``. The math lives in
:func:`lightning_sd.core.sensitivity.estimate_sensitivities`; this module finds the batches, the
loss, the precision context and the ranks.

Choices, for the record:

- **Batches**: ``sensitivity_batches`` batches of the private probe loader of
  :mod:`lightning_sd.callbacks.probe_data` (the training loader's order without its randomness:
  dataset order for a sequential loader, else a fixed permutation, another one at each
  re-measurement epoch; several training dataloaders combined as the fit loop combines them), moved to the device through the LightningModule's batch-transfer hooks. The fit
  loop's iterator, sampler and workers are not touched and no global random number is consumed, so
  the run sees the same data order as without the measurement.
- **Loss**: the module's ``training_step`` output (a tensor, or a dict with ``"loss"``), with
  ``self.log``/``self.log_dict`` turned into no-ops during the measurement and torchmetrics states
  restored afterwards; ``callback.sensitivity_loss(pl_module, batch)`` replaces it.
- **Mode**: training mode, i.e. the loss exactly as the training step sees it (BatchNorm normalizes
  with batch statistics; at initialization its running statistics are not yet meaningful, so
  evaluation mode would measure a different network). ``mode="maxreg"`` measures its ``g_l`` on the
  same training-mode network (:mod:`lightning_sd.callbacks.maxreg_measurement`). Module modes and
  every buffer (BatchNorm running statistics) are restored (:func:`lightning_sd.core.probing.restored_state`),
  the global RNG too (dropout inside the measurement does not shift the run's random stream), so
  the measurement leaves no trace in the model. All branches are computed with ``m = 1``
  (``handle.override``), whatever the current rates.
- **Precision**: under mixed precision (``"16-mixed"``, ``"bf16-mixed"``) the forward runs with autocast
  turned off, in the parameters' float32: ``S_l`` is a sum over every activation of the branch, and
  bf16 rounding moves it by several % of the largest ``S`` (7% on a CifarResNet-20), enough to reorder
  close blocks. Other precision plugins (true half, double) keep their ``train_step_context()``. The
  multipliers, their gradient and the returned sensitivities are float32.
- **DDP**: each rank measures on its own batches and ``S`` is averaged over ranks with
  ``trainer.strategy.reduce(..., reduce_op="mean")`` (every rank calls it), so all ranks compute
  the same rates. The forward bypasses the DDP wrapper and the backward is taken w.r.t. the
  multipliers only, so no gradient bucket is touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_sd._internals import metric_states_restored
from lightning_sd.callbacks.probe_data import probe_batches
from lightning_sd.core.gates import existing_handle
from lightning_sd.core.probing import restored_state
from lightning_sd.core.sensitivity import estimate_sensitivities
from lightning_sd.core.survival import survival_rates

__all__ = ["measure_rates", "measure_sensitivities", "silenced_training_step"]


def measure_rates(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
    """Survival rates for a measured mode of ``callback`` (a :class:`StochasticDepth`), on every rank.

    ``mode="sensemode"``: measures ``S`` (:func:`measure_sensitivities`), stores it in
    ``callback.sensitivities`` and returns ``survival_rates("sensemode", L, callback.budget,
    sensitivities=S, p_min=callback.p_min)``: ``p_l = clip(p_min + alpha |S_l|, p_min, 1)`` with
    ``sum_l p_l = budget * L`` (Hayou & Ayed 2021, section 5).
    ``mode="maxreg"``: delegates to :func:`lightning_sd.callbacks.maxreg_measurement.measure_maxreg`.

    Args:
        callback: the :class:`~lightning_sd.callbacks.stochastic_depth.StochasticDepth` instance
            (after ``setup``: its ``handle`` carries the gates).
        trainer: the running trainer (``trainer.train_dataloader`` must exist: call from
            ``on_train_start`` or later; it is only read, never iterated).
        pl_module: the LightningModule that carries the gates.

    Returns:
        float64 rates of length L, identical on every rank.
    """
    if callback.mode == "maxreg":
        from lightning_sd.callbacks.maxreg_measurement import measure_maxreg

        return measure_maxreg(callback, trainer, pl_module)
    if callback.mode != "sensemode":
        raise ValueError(f"measure_rates handles the measured modes 'sensemode' and 'maxreg', not mode={callback.mode!r}")
    sensitivities = measure_sensitivities(callback, trainer, pl_module)
    callback.sensitivities = sensitivities
    return survival_rates("sensemode", sensitivities.numel(), callback.budget, sensitivities=sensitivities, p_min=callback.p_min)


def measure_sensitivities(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
    """``S_l = dLoss/dm_l`` at ``m = 1`` on ``callback.sensitivity_batches`` probe batches, averaged over ranks.

    Uses ``callback.sensitivity_loss`` (``(pl_module, batch) -> loss``) if set, else the module's
    ``training_step``. See the module docstring for the batches, mode, precision and DDP choices.

    Returns:
        float32 CPU tensor of length L.
    """
    handle = existing_handle(pl_module)
    if handle is None:
        raise RuntimeError(
            "measure_sensitivities needs a LightningModule with stochastic-depth gates; StochasticDepth "
            "injects them in setup(), so call it from on_train_start or later"
        )
    loss_of = _loss_function(callback, pl_module)
    num = int(callback.sensitivity_batches)
    batches = probe_batches(trainer, pl_module, num, combined=True, epoch=trainer.current_epoch)
    with isolate_rng(), restored_state(pl_module, "train"), metric_states_restored(pl_module):
        if not batches:
            raise RuntimeError(
                "the training dataloader yielded no batch to measure sensitivities on; check the training data "
                "(limit_train_batches, dataset size) or use a mode that needs no measurement"
            )
        sensitivities = estimate_sensitivities(
            pl_module,
            list(enumerate(batches)),
            loss_of,
            method="gradient",
            autocast=_step_context(trainer),
            restore_buffers=False,  # restored_state above restores every buffer
            fork_rng=False,  # isolate_rng above covers torch, numpy and python RNGs
        )
    device = trainer.strategy.root_device
    reduced = trainer.strategy.reduce(sensitivities.to(device), reduce_op="mean")
    return torch.as_tensor(reduced).detach().to(device="cpu", dtype=torch.float32)


def _step_context(trainer: pl.Trainer) -> Any:
    """The context the measurement's forward runs in: no autocast under mixed precision (see the module docstring)."""
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        device_type = trainer.strategy.root_device.type
        return lambda: torch.autocast(device_type, enabled=False)
    return getattr(plugin, "train_step_context", None) or plugin.forward_context


def _loss_function(callback: Any, pl_module: pl.LightningModule) -> Any:
    """``loss_fn(model, (batch_idx, batch))`` for the core estimator; checks before anything runs."""
    custom = callback.sensitivity_loss
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
