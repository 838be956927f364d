"""Every place the package reads or writes a private attribute of Lightning or torchmetrics, one function each.

Each function says why no public API does the job and which version it was checked against
(lightning 2.6.6, torchmetrics 1.9.0). When one of them breaks after an upgrade, this file is the only
one to fix. Nothing here is public API of lightning_sd.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

__all__ = [
    "attached_trainer",
    "called_by_fit_loop",
    "fit_loop_combine_mode",
    "load_validation_data",
    "loggers_write_this_step",
    "metric_states_restored",
]


def called_by_fit_loop(module: Any) -> bool:
    """Whether ``module.training_step`` is running as the Trainer's own training step.

    Callbacks that call ``training_step`` themselves (SenseMode sensitivities) do so from other hooks,
    where ``self.log(on_step=True)`` is refused and metric updates would mix their batches into the
    training accuracy: the package's modules log only when this is true.

    Private attribute: ``LightningModule._current_fx_name``, the hook the Trainer is running (set by
    ``Trainer._call_lightning_module_hook``). Lightning has no public "which hook is running" query
    (checked against lightning 2.6.6).
    """
    return module._trainer is not None and getattr(module, "_current_fx_name", None) == "training_step"


def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` is attached to, or None.

    Private attribute: ``LightningModule._trainer``. The public ``module.trainer`` raises when no Trainer is
    attached, and the caller wants to say what to do instead (checked against lightning 2.6.6).
    """
    return getattr(module, "_trainer", None)


def load_validation_data(trainer: Any) -> None:
    """Load the validation dataloaders of a fit whose validation loop has not run yet.

    Lightning has no public call for it; the fit loop's validation loop loads them with
    ``trainer.fit_loop.epoch_loop.val_loop.setup_data()`` before its first run (checked against lightning 2.6.6).
    """
    trainer.fit_loop.epoch_loop.val_loop.setup_data()


def loggers_write_this_step(trainer: Any) -> bool:
    """Whether a step-level ``self.log`` now reaches a logger (each call costs about a millisecond on CPU).

    Lightning writes step metrics only at every ``Trainer(log_every_n_steps)``-th step, and nowhere
    without loggers. Private attribute: ``trainer._logger_connector.should_update_logs`` (evaluated again
    after ``on_train_batch_end`` with the same step count); no public query exists (checked against
    lightning 2.6.6).
    """
    if not trainer.loggers:
        return False
    return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))


def fit_loop_combine_mode(trainer: Any) -> str:
    """The mode in which the fit loop combines several training dataloaders.

    ``"max_size_cycle"`` unless the user passed a ``CombinedLoader`` with another mode.

    Private attributes: ``trainer.fit_loop._combined_loader`` (``trainer.train_dataloader`` returns only
    its ``iterables``) and ``CombinedLoader._mode`` (no public getter). Checked against lightning 2.6.6,
    where the fit loop wraps a plain collection as ``CombinedLoader(loaders, "max_size_cycle")``.
    """
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return str(combined._mode) if combined is not None else "max_size_cycle"


@contextlib.contextmanager
def metric_states_restored(module: nn.Module) -> Iterator[None]:
    """Torchmetrics updated inside the block (e.g. a training accuracy in ``training_step``) get their states back.

    The states themselves go through public API (``Metric.metric_state``, ``setattr``). The update counter
    and the cached result have no public setter: ``Metric._update_count`` and ``Metric._computed`` are
    written back directly (checked against torchmetrics 1.9.0; ``reset()`` would zero them instead).
    """
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a Lightning dependency
        yield
        return
    saved = [(m, _copy_states(m.metric_state), m.update_count, m._computed) for m in module.modules() if isinstance(m, Metric)]
    try:
        yield
    finally:
        for metric, states, count, computed in saved:
            for attr, value in states.items():
                setattr(metric, attr, value)
            metric._update_count = count
            metric._computed = computed


def _copy_states(states: dict[str, Any]) -> dict[str, Any]:
    """Detached copies of metric states (tensors, or lists of tensors and other items)."""

    def one(value: Any) -> Any:
        return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)

    return {attr: one(v) if isinstance(v, Tensor) else [one(x) for x in v] for attr, v in states.items()}
