"""The digits recipe (configs/digits_depth_on_demand.yaml) as Python objects, for the issue-15 benchmarks.

``bench_depth_on_demand.py`` and ``bench_schedules.py`` import this file from the same folder. The model,
data and trainer settings are read from the YAML recipe, so the benchmarks train what the recipe trains;
only the StochasticDepth callback is built by each benchmark.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.classifier import SDClassifier
from lightning_sd.data import DigitsDataModule

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "digits_depth_on_demand.yaml"


def recipe() -> dict[str, Any]:
    """The YAML recipe as a dict."""
    with open(RECIPE) as f:
        return yaml.safe_load(f)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (training batches only: validation runs after the epoch's last batch)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self._last = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(self._last - self._start)


@dataclass
class Run:
    """One trained recipe: the module, its trainer and data, the epoch times."""

    model: SDClassifier
    trainer: pl.Trainer
    data: DigitsDataModule
    timer: EpochTimer

    def test_accuracy(self) -> float:
        """Test accuracy (%) of the module as it is now (gates, rates and pruning included)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (out,) = self.trainer.test(self.model, datamodule=self.data, verbose=False)
        return 100.0 * float(out["test/acc"])


def fit(sd: StochasticDepth, seed: int, epochs: int | None = None, extra: Sequence[pl.Callback] = ()) -> Run:
    """Train the recipe's model with ``sd`` after ``seed_everything(seed)`` (the data split keeps the recipe's seed)."""
    cfg = recipe()
    pl.seed_everything(seed, verbose=False)
    model = SDClassifier(**cfg["model"]["init_args"])
    data = DigitsDataModule(**cfg["data"]["init_args"])  # the split's seed stays the recipe's
    timer = EpochTimer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_epochs=epochs or cfg["trainer"]["max_epochs"],
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tempfile.mkdtemp(),
            callbacks=[sd, timer, *extra],
        )
        trainer.fit(model, datamodule=data)
    return Run(model, trainer, data, timer)


def mean_spread(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± sample std`` (``±`` omitted for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pasted into docs/schedules-and-depth-on-demand.md)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
