"""Fit a small BatchNorm + dropout residual classifier with StochasticDepth, with or without every monitor.

Used by tests/test_watching.py in-process (single process) and as a script for 2-process DDP
(``python tests/scripts/fit_watched.py --out DIR --watch 1 --devices 2``; Lightning's launcher re-runs
this script for rank 1). Rank 0 writes ``weights.pt`` (every parameter and buffer), every rank writes
``batches_rank{r}.json`` (the dataset indices of each training batch) and ``rates.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_sd.callbacks import (  # noqa: E402
    LogGaussianMonitor,
    NormalityMonitor,
    RegularizationMonitor,
    StochasticDepth,
    SummaryPlots,
)
from lightning_sd.core.gates import existing_handle  # noqa: E402


class IndexedData(Dataset):
    """``(x, y, index)``: the index lets a test record which examples each training batch held."""

    def __init__(self, n: int = 96, features: int = 8, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, width))

    def forward(self, x):
        return x + self.f(x)


class WatchedModule(pl.LightningModule):
    """Residual MLP classifier with BatchNorm (running buffers) and dropout (global RNG) in every branch."""

    def __init__(self, features: int = 8, width: int = 16, depth: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class BatchRecorder(pl.Callback):
    """Attached to both runs: records the dataset indices of every training batch (reads the batch only)."""

    def __init__(self) -> None:
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch[2].tolist())


def monitors(out: str) -> list[pl.Callback]:
    return [
        RegularizationMonitor(probe_size=16),
        NormalityMonitor(num_inputs=8, num_masks=12, per_block=True, probe_at_start=True),
        LogGaussianMonitor(),
        SummaryPlots(out_dir=os.path.join(out, "plots")),
    ]


def fit(
    out: str,
    watch: bool,
    workers: int = 0,
    devices: int = 1,
    mode: str = "uniform",
    survival: list[float] | None = None,
    epochs: int = 2,
) -> dict:
    """One run; returns ``{"state": state_dict, "batches": [...], "rates": [...]}`` (rank 0's in DDP)."""
    pl.seed_everything(0, workers=True, verbose=False)
    module = WatchedModule()
    recorder = BatchRecorder()
    sd = StochasticDepth(mode=mode, budget=0.6, scaling="expected", seed=7, survival=survival, sensitivity_batches=2)
    callbacks: list[pl.Callback] = [recorder] + (monitors(out) if watch else []) + [sd]
    loader = DataLoader(
        IndexedData(), batch_size=16, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    handle = existing_handle(module)
    rates = [float(p) for p in handle._p]  # the float64 rates the masks are drawn with
    rank = trainer.global_rank
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"batches_rank{rank}.json"), "w") as f:
        json.dump({"batches": recorder.indices, "rates": rates}, f)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if trainer.is_global_zero:
        torch.save(state, os.path.join(out, "weights.pt"))
    return {"state": state, "batches": recorder.indices, "rates": rates}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--watch", type=int, nargs="+", default=[0], help="runs in sequence, in this process (and its DDP ranks): OUT/watch{w}")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for watch in args.watch:
        fit(os.path.join(args.out, f"watch{watch}"), bool(watch), workers=args.workers, devices=args.devices)


if __name__ == "__main__":
    main()
