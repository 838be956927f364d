"""An ordinary Lightning training script, with stochastic depth added by one line.

Everything below is a plain Lightning script: a LightningModule with its own small residual CNN,
scikit-learn's 8x8 digits through ``DigitsDataModule``, SGD with a cosine schedule, ``Trainer.fit``
and ``Trainer.test``. The only stochastic-depth line is the ``callbacks=[StochasticDepth(...)]``
argument of the Trainer: the callback finds the residual branches of ``ResidualBlock`` by itself
(``forward`` computes ``relu(x + branch(x))``), so the model code is not touched.

    OMP_NUM_THREADS=1 python examples/existing_script.py                   # ~30 s on one CPU core
    OMP_NUM_THREADS=1 python examples/existing_script.py --no-sd           # the same script without SD
    OMP_NUM_THREADS=1 python examples/existing_script.py --mode uniform --budget 0.7 --max-epochs 20

At the end the script prints the test accuracy (and the survival rates the callback used).
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sd import StochasticDepth
from lightning_sd.data import DigitsDataModule


class ResidualBlock(nn.Module):
    """``relu(x + f(x))`` with ``f`` = conv-BN-ReLU-conv-BN, channels and resolution unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        # Each block starts as the identity (torchvision's zero_init_residual, Goyal et al. 2017): stable
        # training at lr 0.1, with or without stochastic depth.
        nn.init.zeros_(self.branch[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.branch(x))


class SmallResNet(nn.Module):
    """Stem, then three stages of ``blocks_per_stage`` residual blocks (widths w, 2w, 4w); a strided conv between stages."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for i, w in enumerate(widths):
            if i > 0:  # downsample: not a residual block, always computed
                layers += [nn.Conv2d(widths[i - 1], w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            layers += [ResidualBlock(w) for _ in range(blocks_per_stage)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy classification, SGD + momentum with cosine annealing over the whole run."""

    def __init__(self, width: int = 16, blocks_per_stage: int = 3, lr: float = 0.1, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallResNet(1, 10, width, blocks_per_stage)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", on_step=stage == "train", on_epoch=True)
        self.log(f"{stage}/acc", acc, prog_bar=stage != "train", on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's usual return shape
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(steps), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--blocks-per-stage", type=int, default=3, help="residual blocks per stage (3 stages)")
    parser.add_argument("--mode", default="linear", choices=["uniform", "linear", "sensemode", "maxreg"], help="StochasticDepth mode")
    parser.add_argument("--budget", type=float, default=0.5, help="expected fraction of residual blocks kept, (0, 1]")
    parser.add_argument("--no-sd", action="store_true", help="train without stochastic depth (the baseline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs/existing_script", help="Trainer default_root_dir (StochasticDepth's rate table)")
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction or number of training batches (smoke tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a small model: one thread is fastest and leaves the other cores free
    pl.seed_everything(args.seed)
    datamodule = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    model = DigitsClassifier(width=args.width, blocks_per_stage=args.blocks_per_stage, lr=args.lr)

    # ---- the one stochastic-depth line -----------------------------------------------------------
    callbacks = [] if args.no_sd else [StochasticDepth(mode=args.mode, budget=args.budget, seed=args.seed)]
    # ---------------------------------------------------------------------------------------------------

    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        default_root_dir=args.log_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=args.limit_train_batches,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    (result,) = trainer.test(model, datamodule=datamodule, verbose=False)
    acc = float(result["test/acc"])
    if callbacks:
        sd = callbacks[0]
        rates = ", ".join(f"{p:.2f}" for p in sd.survival.tolist())
        print(f"stochastic depth: mode={args.mode}, budget={args.budget}, {sd.num_blocks} blocks, survival rates [{rates}]")
    else:
        print("stochastic depth: off")
    print(f"training time: {seconds:.1f} s for {args.max_epochs} epochs")
    print(f"test accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
