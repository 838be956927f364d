"""Deprecated: the table helpers live in :mod:`lightning_sd.callbacks.output` now."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_sd.callbacks.output import write_table

__all__ = ["publish_table"]


def publish_table(
    trainer: pl.Trainer, path: str, rows: Sequence[dict[str, Any]], key: str, columns: Sequence[str] | None = None
) -> None:
    """Deprecated alias of :func:`lightning_sd.callbacks.output.write_table` (rank zero only, no collective).

    :func:`lightning_sd.callbacks.output.publish_table` is the rank-safe replacement: every rank calls it
    with a file name, it finds the log directory and rank 0 writes.
    """
    warnings.warn(
        "lightning_sd.callbacks.tables.publish_table is deprecated; use lightning_sd.callbacks.output.publish_table "
        "(every rank, a file name in the log directory) or output.write_table (an explicit path, this rank only)",
        DeprecationWarning,
        stacklevel=2,
    )
    write_table(trainer, path, rows, key, columns)
