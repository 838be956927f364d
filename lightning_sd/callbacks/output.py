"""Where the callbacks put what they measure: one log directory, one table format, one logging policy.

- :func:`log_dir`: the run's log directory, read on every rank (``trainer.log_dir`` is a collective
  under DDP); :func:`log_dir_without_broadcast` gives the same answer for code that runs on rank 0 only.
- :func:`publish_table`: a per-block (or per-layer) table as a CSV file in the log directory, as
  ``logger.log_table`` for the loggers that have one (W&B) and as markdown text on TensorBoard.
- :func:`log_epoch_metrics`: epoch-level scalars, logged under the package's one ``sync_dist`` policy.
- :func:`log_per_block`: a per-block quantity: one scalar per block for every logger but TensorBoard
  (and ``trainer.callback_metrics``), one histogram and one image per call on TensorBoard.
- :func:`log_histogram`: a histogram of values (e.g. p-values) on TensorBoard.

This module is the one place that decides which logger gets what; the TensorBoard writing itself is
in :mod:`lightning_sd.callbacks.tensorboard_output`.

Example::

    @override
    def on_train_epoch_end(self, trainer, pl_module):
        rows = [{"block": 1, "g": 0.3}, {"block": 2, "g": 0.1}]
        log_epoch_metrics(pl_module, {"reg/g_mean": 0.2})                  # every rank
        log_per_block(trainer, pl_module, {"reg/g": [0.3, 0.1]})          # every rank; rank 0 writes TensorBoard
        publish_table(trainer, "regularization_epoch0.csv", rows, key="reg/blocks")  # every rank; rank 0 writes
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor

from lightning_sd.callbacks import tensorboard_output

__all__ = [
    "log_dir",
    "log_dir_without_broadcast",
    "log_epoch_metrics",
    "log_histogram",
    "log_per_block",
    "publish_table",
    "write_csv",
    "write_table",
]


def log_dir(trainer: pl.Trainer) -> str:
    """The run's log directory: ``trainer.log_dir`` (the first logger's), else ``trainer.default_root_dir``.

    Every rank must call it: under DDP ``trainer.log_dir`` broadcasts rank 0's answer, so a call on rank 0
    alone waits forever for the others. Call it before any ``if trainer.is_global_zero`` branch.
    """
    return trainer.log_dir or trainer.default_root_dir


def log_dir_without_broadcast(trainer: pl.Trainer) -> str:
    """The directory :func:`log_dir` returns, computed locally (no collective), for hooks that run on rank 0 only.

    It repeats ``Trainer.log_dir`` of lightning 2.6 without its broadcast: the first logger's ``log_dir``
    for TensorBoard and CSV loggers, its ``save_dir`` for others, else ``trainer.default_root_dir``.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        path = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if path:
            return str(path)
    return str(trainer.default_root_dir)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) to the CSV file ``path`` with the header ``columns``, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def publish_table(
    trainer: pl.Trainer, filename: str, rows: Sequence[Mapping[str, Any]], key: str, columns: Sequence[str] | None = None
) -> str | None:
    """Write ``rows`` to ``<log dir>/<filename>`` (CSV), to every logger with a ``log_table`` method and to TensorBoard.

    Every rank calls it (it reads :func:`log_dir`); rank 0 writes. A ``TensorBoardLogger`` gets the
    table as markdown text under ``key`` at the trainer's ``global_step``
    (:func:`~lightning_sd.callbacks.tensorboard_output.markdown_table`).

    Args:
        trainer: the running trainer.
        filename: file name inside the log directory, e.g. ``"sd_rates_epoch3.csv"``.
        rows: one dict per row, all with the same keys.
        key: the table's name for ``logger.log_table`` and TensorBoard's text (e.g. ``"reg/blocks"``).
        columns: the columns, in order; default: the first row's keys.

    Returns:
        The CSV path on rank 0, ``None`` on the other ranks.
    """
    directory = log_dir(trainer)
    if not trainer.is_global_zero:
        return None
    path = os.path.join(directory, filename)
    write_table(trainer, path, rows, key, columns)
    return path


def write_table(
    trainer: pl.Trainer, path: str, rows: Sequence[Mapping[str, Any]], key: str, columns: Sequence[str] | None = None
) -> None:
    """:func:`publish_table` to an explicit ``path``, on the calling rank only (no collective)."""
    fields = list(columns) if columns is not None else list(rows[0])
    write_csv(path, rows, fields)
    for logger in trainer.loggers:
        if tensorboard_output.is_tensorboard(logger):
            tensorboard_output.add_table(logger.experiment, key, rows, fields, trainer.global_step)
            continue
        log_table = getattr(logger, "log_table", None)
        if callable(log_table):
            log_table(key=key, columns=fields, data=[[r[c] for c in fields] for r in rows])


def log_epoch_metrics(pl_module: pl.LightningModule, metrics: Mapping[str, Any]) -> None:
    """Log epoch-level scalars the package's one way: finite values only, ``on_epoch``, ``sync_dist=True``.

    The policy, for every callback of the package (StochasticDepth and the monitors):

    - A value is made **identical on every rank before it is logged**: a monitor reduces or gathers its
      own data across ranks (weighted by examples where it averages), StochasticDepth's rates and depth
      counts follow from the same seed on every rank. Then every rank's ``callback_metrics`` agree, and a
      ``ModelCheckpoint``/``EarlyStopping`` that monitors one of them takes the same decision everywhere.
      A mean over ranks of per-rank statistics (what ``sync_dist`` alone would give) is not the statistic
      over all ranks' examples (a median, a quantile, a fraction), so the reduction is the monitor's job.
    - It is then logged with ``sync_dist=True``. For identical values the mean over ranks is the value
      itself, at the cost of one small all-reduce per key per probe; it is what Lightning asks of
      epoch-level values under DDP (with ``sync_dist=False`` it warns once per key, and a ``warnings``
      filter around ``self.log`` cannot catch that warning: it is raised later, when the epoch's metrics
      are reduced); and a value some future code forgets to reduce is still averaged, not left to differ.
    - Non-finite values are not logged (they would poison checkpoint monitoring and loggers); the values
      being identical, every rank leaves out the same keys and the all-reduces stay in lockstep.

    Args:
        pl_module: the LightningModule whose ``log`` is used (from an epoch-level hook or ``on_train_start``).
        metrics: ``{key: value}`` with float (or one-element tensor) values.
    """
    for name, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            pl_module.log(name, number, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)


def log_per_block(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    quantities: Mapping[str, Tensor | Sequence[float]],
    width: int = 3,
    labels: Sequence[str] | None = None,
    axis: str = "block",
) -> None:
    """Log per-block quantities: scalars ``<name>/<l>`` for the loggers, a histogram and an image on TensorBoard.

    For every ``name, values`` of ``quantities`` (``values[l - 1]`` belongs to block l):

    - the scalars ``f"{name}/{l:0{width}d}"`` (``sd/survival/001``, ...) are logged on every rank with
      :func:`log_epoch_metrics` (the package's one ``sync_dist`` policy, finite values only): they reach
      ``trainer.callback_metrics`` and every logger except a ``TensorBoardLogger``, which
      :func:`~lightning_sd.callbacks.tensorboard_output.hide_scalars` spares L charts;
    - on rank 0, every ``TensorBoardLogger`` gets the histogram ``name`` of the L values (``num = L``,
      ``sum = sum_l values[l - 1]``; non-finite values left out of it) and the image ``<name>_by_block``
      (the profile over depth), at the trainer's ``global_step``
      (:func:`~lightning_sd.callbacks.tensorboard_output.add_per_block`).

    Every rank calls it, with values identical on every rank (as for :func:`log_epoch_metrics`); only
    the all-reduces of ``self.log`` are collective.

    Args:
        trainer: the running trainer.
        pl_module: the LightningModule whose ``log`` is used (from an epoch-level hook or ``on_train_start``).
        quantities: ``{name: values}``, one float per block, block 1 first.
        width: digits of the zero-padded block number in the scalar names (>= 1).
        labels: names of the entries used in the scalar names instead of the numbers
            (``f"{name}/{labels[l - 1]}"``, e.g. layer names), one per value.
        axis: what one entry is, the x-axis label of the images (``"block"``, ``"layer"``).

    Example::

        log_per_block(trainer, pl_module, {"sd/survival": [1.0, 0.9, 0.8]})
        # CSV: sd/survival/001, sd/survival/002, sd/survival/003
        # TensorBoard: histogram sd/survival (num 3, sum 2.7), image sd/survival_by_block
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"log_per_block: width must be an integer >= 1 (digits of the block number), got {width!r}")
    lists = {name: _as_list(values) for name, values in quantities.items()}
    if labels is not None and any(len(values) != len(labels) for values in lists.values()):
        lengths = {name: len(values) for name, values in lists.items()}
        raise ValueError(f"log_per_block: {len(labels)} labels for values of lengths {lengths}; give one label per value")
    names = list(labels) if labels is not None else [f"{block + 1:0{width}d}" for block in range(max(map(len, lists.values()), default=0))]
    scalars = {f"{name}/{names[block]}": value for name, values in lists.items() for block, value in enumerate(values)}
    tensorboards = [logger for logger in trainer.loggers if tensorboard_output.is_tensorboard(logger)]
    for logger in tensorboards:  # every rank, before the epoch's values are flushed; local
        tensorboard_output.hide_scalars(logger, list(scalars))
    log_epoch_metrics(pl_module, scalars)
    if not trainer.is_global_zero:
        return
    for logger in tensorboards:
        for name, values in lists.items():
            if values:
                tensorboard_output.add_per_block(logger.experiment, name, values, trainer.global_step, axis=axis)


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor | np.ndarray | Sequence[float], bins: Any = "tensorflow") -> None:
    """A histogram of the finite ``values`` under ``tag`` on every ``TensorBoardLogger``, at the trainer's ``global_step``.

    Call it from any rank: rank 0 writes, the others return (no collective). Other loggers get nothing
    (they have no histogram type; the values are in the callers' CSV files).

    Args:
        trainer: the running trainer.
        tag: the histogram's name, e.g. ``"normality/pvalues"``.
        values: the values (any shape, flattened; non-finite ones left out).
        bins: ``"tensorflow"`` or bin edges (e.g. ``numpy.linspace(0, 1, 21)`` for p-values).
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if tensorboard_output.is_tensorboard(logger):
            tensorboard_output.add_values_histogram(logger.experiment, tag, values, trainer.global_step, bins=bins)


def _as_list(values: Tensor | Sequence[float]) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().cpu().reshape(-1).tolist()]
    return [float(v) for v in values]
