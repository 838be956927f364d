"""The Budget hypothesis (Hayou & Ayed 2021, section 5, Table 2): uniform vs linear vs SenseMode at fixed budgets.

For every budget ``Lbar / L`` (default 0.1, 0.2, ..., 0.9), every mode and every seed, trains a fresh
model with Lightning and the :class:`~lightning_sd.callbacks.stochastic_depth.StochasticDepth`
callback and records the test error. Prints the paper's Table 2 layout: rows are budgets, columns
are modes, cells are ``mean +- std`` over seeds (test error in %, or test MSE for regression), ``-``
where the linear mode is infeasible (``budget < (L - 1) / (2L)``).

The paper's claim: SenseMode (``p_l ~ |S_l|``, S measured at initialization) beats uniform below
budget 0.5, uniform wins above. Its CIFAR runs use a Stable ResNet-110 for hundreds of epochs; the
default here is a CPU-sized stand-in: a Stable residual MLP (32 blocks) on scikit-learn's 8x8 digits.

Usage::

    python examples/budget_hypothesis.py                                  # digits, 3 seeds, ~10 CPU minutes
    python examples/budget_hypothesis.py --data toy --depth 50 --epochs 20 # the paper's sin(beta^T x) task
    python examples/budget_hypothesis.py --model resnet --depth 32 --width 8 --image-size 8
    python examples/budget_hypothesis.py --budgets 0.1 0.5 0.9 --seeds 0 1 --csv results.csv
    python examples/budget_hypothesis.py --data cifar10 --data-dir data --depth 110 --width 16 \
        --batch-size 128 --epochs 160 --accelerator gpu --seeds 0 1 2 3   # the paper's Table 2 setting
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch import nn

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.classifier import SDClassifier
from lightning_sd.core.discovery import find_residual_branches
from lightning_sd.core.survival import linear_min_budget
from lightning_sd.data.cifar import CIFARDataModule
from lightning_sd.data.digits import DigitsDataModule
from lightning_sd.data.toy_regression import ToyRegressionDataModule
from lightning_sd.models import CifarResNet, ResidualMLP
from lightning_sd.regressor import SDRegressor

#: Table 2 of the paper (Stable ResNet-110, test error %, mean +- std over 4 runs): budget -> (uniform, SenseMode, linear).
PAPER_TABLE2 = {
    "CIFAR-10": {
        0.1: ("17.2 ± 0.3", "15.4 ± 0.4", "–"),
        0.2: ("10.3 ± 0.4", "9.3 ± 0.5", "–"),
        0.3: ("7.7 ± 0.2", "7.0 ± 0.3", "–"),
    },
    "CIFAR-100": {
        0.1: ("55.2 ± 0.4", "51.3 ± 0.6", "–"),
        0.2: ("38.3 ± 0.3", "36.4 ± 0.4", "–"),
        0.3: ("31.4 ± 0.2", "30.1 ± 0.5", "–"),
    },
}


def build(args: argparse.Namespace, seed: int) -> tuple[LightningModule, LightningDataModule, str]:
    """Model, data and the name of the test metric (``"error %"`` or ``"MSE"``)."""
    if args.data == "toy":
        dm: LightningDataModule = ToyRegressionDataModule(
            in_features=args.in_features, num_train=args.num_train, batch_size=args.batch_size, seed=seed, beta_scale=args.in_features**-0.5
        )
        module: LightningModule = SDRegressor(
            in_features=args.in_features, width=args.width, depth=args.depth, stable=True, lr=args.lr, scheduler="cosine"
        )
        return module, dm, "MSE"
    if args.data in ("cifar10", "cifar100"):
        num_classes = 10 if args.data == "cifar10" else 100
        dm = CIFARDataModule(data_dir=args.data_dir, num_classes=num_classes, batch_size=args.batch_size, seed=seed)
        backbone = CifarResNet(args.depth, num_classes=num_classes, stable=True, in_channels=3, width=args.width)
        module = SDClassifier(backbone, num_classes=num_classes)  # the paper's SGD recipe (lr 0.1, momentum 0.9, wd 1e-4)
        return module, dm, "error %"
    dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, seed=seed)
    if args.model == "mlp":
        backbone: nn.Module = nn.Sequential(
            nn.Flatten(), ResidualMLP(args.image_size**2, args.width, args.depth, 10, stable=True)
        )
    else:
        backbone = CifarResNet(args.depth, num_classes=10, stable=True, in_channels=1, width=args.width)
    module = SDClassifier(backbone, num_classes=10, optimizer="adam", lr=args.lr, weight_decay=0.0, scheduler="cosine")
    return module, dm, "error %"


def run_one(args: argparse.Namespace, mode: str, budget: float, seed: int) -> dict[str, Any]:
    seed_everything(seed, workers=True)
    module, dm, metric = build(args, seed)
    callback = StochasticDepth(
        mode=mode,
        budget=budget,
        drop=args.drop,
        scaling=args.scaling,
        seed=seed,
        p_min=args.p_min,
        sensitivity_batches=args.sensitivity_batches,
    )
    with tempfile.TemporaryDirectory(prefix="budget_hypothesis_") as run_dir:
        trainer = Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[callback],
            default_root_dir=run_dir,  # the callback's rate tables (81 runs): not into the working directory
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        result = trainer.test(module, datamodule=dm, verbose=False)[0]
    value = 100.0 * (1.0 - result["test/acc"]) if metric == "error %" else result["test/loss"]
    p = callback.survival
    return {
        "mode": mode,
        "budget": budget,
        "seed": seed,
        "metric": metric,
        "value": value,
        "seconds": time.perf_counter() - start,
        "num_blocks": callback.num_blocks,
        "p_min": float(p.min()),
        "p_max": float(p.max()),
    }


def table(rows: list[dict[str, Any]], budgets: list[float], modes: list[str], metric: str) -> str:
    names = {"uniform": "Uniform", "sensemode": "SenseMode", "linear": "Linear"}
    lines = ["| Lbar/L | " + " | ".join(f"{names.get(m, m)} ({metric})" for m in modes) + " |"]
    lines.append("|---" * (len(modes) + 1) + "|")
    for b in budgets:
        cells = []
        for m in modes:
            vals = [r["value"] for r in rows if r["mode"] == m and r["budget"] == b]
            if not vals:
                cells.append("–")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}")
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(rows: list[dict[str, Any]], budgets: list[float], mode: str = "sensemode", base: str = "uniform") -> str:
    """Mean over seeds of ``mode`` minus ``base`` for the same seed (same split, initialization and masks), per budget."""
    parts = []
    for b in budgets:
        ours = {r["seed"]: r["value"] for r in rows if r["mode"] == mode and r["budget"] == b}
        theirs = {r["seed"]: r["value"] for r in rows if r["mode"] == base and r["budget"] == b}
        diffs = [ours[s] - theirs[s] for s in ours if s in theirs]
        if diffs:
            parts.append(f"{b:g}: {round(statistics.mean(diffs), 2) + 0.0:.2f}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Uniform vs linear vs SenseMode survival rates over budgets (paper's Table 2).")
    parser.add_argument(
        "--data",
        choices=["digits", "toy", "cifar10", "cifar100"],
        default="digits",
        help="sklearn digits, sin(beta^T x), or CIFAR (extracted in --data-dir; Stable CifarResNet --depth, paper's SGD recipe)",
    )
    parser.add_argument("--data-dir", default="data", help="directory holding the extracted CIFAR dataset (no download)")
    parser.add_argument("--accelerator", default="cpu", help="Trainer accelerator ('gpu' for the CIFAR runs)")
    parser.add_argument("--model", choices=["mlp", "resnet"], default="mlp", help="digits backbone: Stable ResidualMLP or Stable CifarResNet")
    parser.add_argument("--depth", type=int, default=32, help="residual blocks of the MLP, or CifarResNet depth 6n+2")
    parser.add_argument("--width", type=int, default=64, help="MLP width, or CifarResNet first-stage channels")
    parser.add_argument("--image-size", type=int, default=8, help="digits image side (8 = native)")
    parser.add_argument("--in-features", type=int, default=64, help="toy regression input dimension (paper: 256)")
    parser.add_argument("--num-train", type=int, default=2048, help="toy regression training pairs")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--modes", nargs="+", default=["uniform", "sensemode", "linear"], choices=["uniform", "sensemode", "linear"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for digits/toy (cosine-annealed); CIFAR uses the paper's SGD recipe")
    parser.add_argument("--drop", choices=["batch", "sample"], default="batch")
    parser.add_argument("--scaling", choices=["expected", "inverted"], default="expected", help="'expected' is the paper's convention")
    parser.add_argument("--p-min", type=float, default=0.0, help="SenseMode minimum rate (paper: 0, p ~ |S|)")
    parser.add_argument("--sensitivity-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--csv", default=None, help="write one row per run to this CSV file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    num_blocks = len(find_residual_branches(build(args, args.seeds[0])[0]))
    for budget in args.budgets:
        for mode in args.modes:
            if mode == "linear" and budget < linear_min_budget(num_blocks) - 1e-12:
                continue  # infeasible: p_L would be negative ("-" in the paper's table)
            for seed in args.seeds:
                row = run_one(args, mode, budget, seed)
                rows.append(row)
                print(
                    f"budget {budget:g} {mode:9s} seed {seed}: {row['metric']} {row['value']:.3f} "
                    f"(p in [{row['p_min']:.3f}, {row['p_max']:.3f}], {row['seconds']:.1f} s)",
                    flush=True,
                )
    metric = rows[0]["metric"] if rows else "error %"
    mlp = args.data == "toy" or (args.data == "digits" and args.model == "mlp")
    what = f"{args.data}, " + (f"Stable ResidualMLP depth {args.depth} width {args.width}" if mlp else f"Stable CifarResNet-{args.depth} width {args.width}")
    print(
        f"\nTest {metric} ({what}, L = {num_blocks} blocks, {args.epochs} epochs, drop={args.drop}, scaling={args.scaling}; "
        f"mean ± std over seeds {args.seeds}; '–': linear infeasible below (L-1)/(2L) = {linear_min_budget(num_blocks):.3f})\n"
    )
    print(table(rows, args.budgets, args.modes, metric))
    if "sensemode" in args.modes and "uniform" in args.modes:
        print(f"\nPaired by seed, SenseMode minus uniform ({metric}): {paired_differences(rows, args.budgets)}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
