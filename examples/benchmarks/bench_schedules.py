"""Budget schedules on digits: constant vs warmup vs pld at the same mean budget, several seeds.

The digits recipe (configs/digits_depth_on_demand.yaml: Stable CifarResNet-20, 9 blocks, 15 epochs, uniform
rates, ``drop="batch"``) is trained with each schedule of ``StochasticDepth(schedule=...)``. The schedules
are compared at the same mean budget over the run's T optimizer steps (``--mean``, default 0.5): the
``budget`` argument of ``"warmup"`` and ``"pld"`` is solved with :func:`lightning_sd.budget_for_mean` so
that ``mean_t b(t)`` equals ``--mean`` (they start at 1, so they end below it).

Per run: the budget argument, the mean scheduled budget and the fraction of blocks really executed
(realized masks), the median wall time of a training epoch (epochs 2..E, training batches only), and the
final test accuracy. Mean ± sample standard deviation over seeds.

Usage::

    python examples/benchmarks/bench_schedules.py                       # seeds 0 1 2, mean budget 0.5
    python examples/benchmarks/bench_schedules.py --pld-gamma 0.05 --warmup-fraction 0.2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from digits_recipe import fit, markdown_table, mean_spread, recipe  # same folder

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.budget_schedule import BUDGET_SCHEDULES, budget_for_mean
from lightning_sd.data import DigitsDataModule


class StepLog(pl.Callback):
    """b(t) and the fraction of blocks executed at every training step."""

    def __init__(self, sd: StochasticDepth) -> None:
        self.sd = sd
        self.budgets: list[float] = []
        self.executed: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.sd.handle is not None
        self.budgets.append(self.sd.current_budget)
        self.executed.append(float(self.sd.handle.kept.float().mean()))


def steps_per_run(epochs: int) -> int:
    cfg = recipe()
    data = DigitsDataModule(**cfg["data"]["init_args"])
    data.setup("fit")
    return epochs * len(data.train_dataloader())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's 15")
    parser.add_argument("--mean", type=float, default=0.5, help="mean budget over the run, the same for every schedule")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--pld-gamma", type=float, default=0.02, help="per optimizer step (DeepSpeed's 0.001 is for 100k-step runs)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or recipe()["trainer"]["max_epochs"]
    total = steps_per_run(epochs)
    budgets = {
        s: budget_for_mean(s, args.mean, total, warmup_fraction=args.warmup_fraction, pld_gamma=args.pld_gamma) for s in BUDGET_SCHEDULES
    }
    print(f"T = {total} optimizer steps; budget argument for a mean of {args.mean}: "
          + ", ".join(f"{s} {b:.4f}" for s, b in budgets.items()), flush=True)
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in BUDGET_SCHEDULES}
    start = time.perf_counter()
    for seed in args.seeds:
        for schedule in BUDGET_SCHEDULES:  # interleaved: a change of load on the shared machine hits every schedule
            sd = StochasticDepth(
                mode="uniform", budget=budgets[schedule], drop="batch", scaling="expected", seed=seed,
                schedule=schedule, warmup_fraction=args.warmup_fraction, pld_gamma=args.pld_gamma,
            )
            log = StepLog(sd)
            run = fit(sd, seed, epochs, extra=[log])
            row = {
                "mean_b": statistics.fmean(log.budgets),
                "executed": statistics.fmean(log.executed),
                "epoch_s": statistics.median(run.timer.times[1:] or run.timer.times),
                "train_s": sum(run.timer.times),
                "acc": run.test_accuracy(),
            }
            rows[schedule].append(row)
            print(f"seed {seed} {schedule:8s}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    elapsed = time.perf_counter() - start
    print()
    print(f"Digits recipe, {epochs} epochs (T = {total} steps), mean budget {args.mean}, warmup_fraction {args.warmup_fraction}, "
          f"pld_gamma {args.pld_gamma}; mean ± std over seeds {args.seeds}; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s), {elapsed / 60:.1f} min in all")
    header = ["schedule", "budget arg", "mean b(t)", "blocks executed", "s / epoch (median)", "train s", "test acc (%)"]
    table = []
    for schedule in BUDGET_SCHEDULES:
        r = rows[schedule]
        table.append([
            schedule,
            f"{budgets[schedule]:.4f}",
            mean_spread([x["mean_b"] for x in r], 4),
            mean_spread([x["executed"] for x in r], 4),
            mean_spread([x["epoch_s"] for x in r], 3),
            mean_spread([x["train_s"] for x in r], 1),
            mean_spread([x["acc"] for x in r]),
        ])
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
