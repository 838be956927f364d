"""``ProbeMonitor``: the base class of the package's monitors, and how callbacks find the StochasticDepth callback.

:class:`~lightning_sd.RegularizationMonitor`, :class:`~lightning_sd.NormalityMonitor` and
:class:`~lightning_sd.LogGaussianMonitor` subclass :class:`ProbeMonitor`; :class:`SummaryPlots` reads
the :attr:`ProbeMonitor.history` they keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_sd.callbacks import output
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.gates import existing_handle

__all__ = ["ProbeMonitor", "active_stochastic_depth", "stochastic_depth_callbacks"]


def stochastic_depth_callbacks(callbacks: Iterable[Callback]) -> list[StochasticDepth]:
    """The :class:`~lightning_sd.StochasticDepth` callbacks among ``callbacks`` (e.g. ``trainer.callbacks``), in order."""
    return [cb for cb in callbacks if isinstance(cb, StochasticDepth)]


def active_stochastic_depth(callbacks: Iterable[Callback]) -> StochasticDepth | None:
    """The :class:`~lightning_sd.StochasticDepth` callback whose gates are on a model now, or ``None``.

    A StochasticDepth has gates from its ``setup`` on (``handle``); one that attaches to a module with
    gates takes them over and detaches the previous owner (whose ``handle`` becomes ``None``), and
    ``remove()`` takes them out. So among ``callbacks`` at most one drives gates at a time: that one
    holds the rates and scaling in force (measured ones once a measured mode has measured).
    """
    for cb in stochastic_depth_callbacks(callbacks):
        if cb.handle is not None and not cb.handle.removed:
            return cb
    return None


class ProbeMonitor(Callback):
    r"""Base class of the monitors: probe the model on a cadence, keep what was measured, publish it.

    A monitor runs the model outside the training step on probe data (read only through
    :mod:`lightning_sd.callbacks.probe_data`, so the run's data order and random stream are untouched),
    and logs and writes what it found. This class holds what every monitor does the same way:

    - **Cadence**: a probe after every ``every_n_epochs``-th training epoch (``on_train_epoch_end``) and,
      with ``at_train_start``, one at ``on_train_start``. Each probe is :meth:`observe`:
      :meth:`measure` (every rank), append the record to :attr:`history`, :meth:`publish`.
    - **Rates**: :meth:`rates_in_force` reads the survival rates and scaling of the
      :class:`~lightning_sd.StochasticDepth` callback that drives the model's gates
      (:func:`active_stochastic_depth`), else the monitor's own ``survival``/``scaling``.
    - **Output**: :meth:`log_dir` (read on every rank: ``trainer.log_dir`` is a collective under DDP),
      :meth:`publish_table` (CSV in the log directory plus ``logger.log_table``, text on TensorBoard),
      :meth:`log_metrics` (the package's one ``sync_dist`` policy, see
      :func:`lightning_sd.callbacks.output.log_epoch_metrics`: values made identical on every rank by
      the monitor, then logged with ``sync_dist=True``), :meth:`log_per_block` (one scalar per block,
      on TensorBoard a histogram and an image instead) and :meth:`log_histogram` (TensorBoard).
    - **History**: :attr:`history` keeps one dict per probe, in memory, with ``"epoch"`` and
      ``"global_step"`` and what :meth:`measure` returned; :class:`~lightning_sd.SummaryPlots` draws from it.

    A subclass fills :meth:`measure` and :meth:`publish`, and :meth:`prepare` when it must fix its probe
    data at ``on_train_start`` (the pattern of Lightning's ``BaseFinetuning``).

    Args:
        every_n_epochs: probe after every n-th training epoch (integer >= 1), or ``None`` for never.
        at_train_start: also probe at ``on_train_start``.
        survival: rates to probe with when no StochasticDepth callback drives gates (one float or a
            sequence of length L in [0, 1]); ``None``: none.
        scaling: convention of ``survival`` (``"inverted"`` or ``"expected"``); ``None``: the scaling of
            gates already on the model, else ``"expected"`` (the paper's m = delta).

    Example::

        class DepthMonitor(ProbeMonitor):
            def measure(self, trainer, pl_module):
                p, scaling = self.rates_in_force(trainer, pl_module)
                return {"expected_depth": float(p.sum())}

            def publish(self, trainer, pl_module, record):
                self.log_metrics(pl_module, {"depth/expected": record["expected_depth"]})

        trainer = Trainer(callbacks=[StochasticDepth(budget=0.5), DepthMonitor(every_n_epochs=2)])
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        at_train_start: bool = False,
        survival: float | Sequence[float] | None = None,
        scaling: str | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and (int(every_n_epochs) != every_n_epochs or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = None if every_n_epochs is None else int(every_n_epochs)
        self.at_train_start = bool(at_train_start)
        self.survival = survival
        self.scaling = scaling
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ what a subclass fills
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at ``on_train_start`` before any probe (every rank), e.g. to fix the probe data."""

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Probe now and return what was measured. Every rank calls it: collectives go here."""
        raise NotImplementedError

    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, Any]) -> None:
        """Log and write a record of :meth:`measure` (every rank calls it; only rank 0 writes files)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ cadence
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer, pl_module)
        if self.at_train_start:
            self.observe(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.observe(trainer, pl_module)

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """One probe: :meth:`measure`, keep the record in :attr:`history`, :meth:`publish`. Every rank calls it."""
        record = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, **self.measure(trainer, pl_module)}
        self.history.append(record)
        self.publish(trainer, pl_module, record)
        return record

    # ------------------------------------------------------------------ rates
    def rates_in_force(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Tensor | float | Sequence[float] | None, str]:
        """``(survival, scaling)`` to probe with.

        The :class:`~lightning_sd.StochasticDepth` callback driving the model's gates gives its current
        rates (float32, CPU, call order) and scaling; without one, the monitor's ``survival`` (as given)
        with ``scaling`` (else the scaling of gates on the model, else ``"expected"``); without both,
        ``(None, scaling)``.
        """
        sd = active_stochastic_depth(trainer.callbacks)  # type: ignore[attr-defined]
        if sd is not None:
            assert sd.handle is not None
            return sd.handle.survival, sd.handle.scaling
        handle = existing_handle(pl_module)
        scaling = self.scaling or (handle.scaling if handle is not None else "expected")
        return self.survival, scaling

    # ------------------------------------------------------------------ output
    @staticmethod
    def log_dir(trainer: pl.Trainer) -> str:
        """The run's log directory; every rank must call it (see :func:`lightning_sd.callbacks.output.log_dir`)."""
        return output.log_dir(trainer)

    @staticmethod
    def publish_table(
        trainer: pl.Trainer, filename: str, rows: Sequence[Mapping[str, Any]], key: str, columns: Sequence[str] | None = None
    ) -> str | None:
        """``<log dir>/<filename>`` as CSV and ``logger.log_table(key=...)``; every rank calls, rank 0 writes and gets the path."""
        return output.publish_table(trainer, filename, rows, key, columns)

    @staticmethod
    def log_metrics(pl_module: pl.LightningModule, metrics: Mapping[str, Any]) -> None:
        """Log epoch-level values that are identical on every rank (see :func:`~lightning_sd.callbacks.output.log_epoch_metrics`)."""
        output.log_epoch_metrics(pl_module, metrics)

    #: Per-block values (identical on every rank): scalars ``<name>/<l>``, on TensorBoard a histogram and an
    #: image; every rank calls it (:func:`lightning_sd.callbacks.output.log_per_block`).
    log_per_block = staticmethod(output.log_per_block)
    #: A histogram on every TensorBoardLogger; rank 0 writes (:func:`lightning_sd.callbacks.output.log_histogram`).
    log_histogram = staticmethod(output.log_histogram)
