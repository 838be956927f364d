"""Deprecated module: ``mode="maxreg"`` is measured by :mod:`lightning_sd.callbacks.rate_measurement`.

Where its names went:

- ``measure_maxreg(callback, trainer, pl_module)`` ->
  :func:`~lightning_sd.callbacks.rate_measurement.measure_maxreg_rates` ``(trainer, pl_module, settings)``,
  which returns a :class:`~lightning_sd.callbacks.rate_measurement.RateMeasurement` instead of writing
  the callback's attributes;
- ``infer_regularization_loss``, ``reduce_mean_over_ranks`` -> :mod:`lightning_sd.callbacks.probing`;
- ``default_input_fn`` -> :mod:`lightning_sd.callbacks.probe_data`.

Each still works from here, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor

__all__ = ["measure_maxreg"]  # the moved names stay importable (deprecated) through __getattr__

_MOVED = {
    "default_input_fn": "lightning_sd.callbacks.probe_data",
    "infer_regularization_loss": "lightning_sd.callbacks.probing",
    "reduce_mean_over_ranks": "lightning_sd.callbacks.probing",
    "warn_if_all_zero": "lightning_sd.callbacks.rate_measurement",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"{__name__}.{name} is deprecated; import it from {module}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), "_warn_if_all_zero" if name == "warn_if_all_zero" else name)


def measure_maxreg(
    callback: Any,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    input_fn: Callable[[Any], Tensor] | None = None,
    estimator: Literal["exact", "sampled", "auto"] | None = None,
    num_samples: int = 16,
) -> Tensor:
    """Deprecated: :func:`~lightning_sd.callbacks.rate_measurement.measure_maxreg_rates`.

    Measures with ``callback.measurement_settings`` (``input_fn``/``estimator``/``num_samples`` override
    them when given), sets ``callback.regularization_terms`` and ``callback.regularization_loss_used`` as
    before and returns the float64 rates.
    """
    from lightning_sd.callbacks.rate_measurement import measure_maxreg_rates

    warnings.warn(
        "measure_maxreg(callback, trainer, pl_module) is deprecated; use "
        "lightning_sd.callbacks.rate_measurement.measure_maxreg_rates(trainer, pl_module, settings)",
        DeprecationWarning,
        stacklevel=2,
    )
    overrides: dict[str, Any] = {"num_samples": num_samples}
    if input_fn is not None:
        overrides["input_fn"] = input_fn
    if estimator is not None:
        overrides["estimator"] = estimator
    settings = dataclasses.replace(callback.measurement_settings, **overrides)
    result = measure_maxreg_rates(trainer, pl_module, settings)
    callback._keep_measured(result)
    return result.rates
