"""Per-block tables: one CSV file in the log directory and ``logger.log_table`` where a logger has it."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

__all__ = ["publish_table"]


def publish_table(
    trainer: pl.Trainer, path: str, rows: Sequence[dict[str, Any]], key: str, columns: Sequence[str] | None = None
) -> None:
    """Write ``rows`` to the CSV file ``path`` and to every logger with a ``log_table`` (W&B) under ``key``.

    Call it on rank zero only; it issues no collective. ``columns`` defaults to the first row's keys.
    """
    fields = list(columns) if columns is not None else list(rows[0])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for logger in trainer.loggers:
        log_table = getattr(logger, "log_table", None)
        if callable(log_table):
            log_table(key=key, columns=fields, data=[[r[c] for c in fields] for r in rows])
