"""Depth on demand on digits: test accuracy when a trained network is pruned at inference, several seeds.

For each seed, the digits recipe (configs/digits_depth_on_demand.yaml: Stable CifarResNet-20, 9 blocks,
15 epochs) is trained twice:

- **SD**: stochastic depth at budget 0.5 (the recipe: uniform rates, ``scaling="expected"``);
- **no SD**: the same network and seed with budget 1.0 (every block kept at every step: plain training;
  the gates only serve pruning afterwards).

Each trained model is then pruned to ``--keeps`` of its blocks (``round(keep * 9)``: 9, 7, 5, 2 blocks) by
``sensitivity`` (largest ``|S_l|`` of the evaluation network on 8 validation batches, measured once per
model), ``every_other`` (fairseq's LayerDrop rule) and ``last`` (the last blocks removed), and its test
accuracy is measured (270 test images; the split is the recipe's, fixed across seeds). The table gives
mean ± sample standard deviation over seeds; the comparisons are paired differences per seed.

Issue 15's expectation: SD at budget 0.5 pruned to half its blocks by sensitivity loses at most 1 point
against the full model, and beats (a) every-other pruning of the same model and (b) the no-SD network
pruned by sensitivity. The script prints what it measures.

Usage::

    python examples/benchmarks/bench_depth_on_demand.py                  # seeds 0 1 2
    python examples/benchmarks/bench_depth_on_demand.py --seeds 0 1 2 3 4 --epochs 15
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from digits_recipe import fit, markdown_table, mean_spread  # same folder

from lightning_sd.callbacks.stochastic_depth import StochasticDepth

RULES = ("sensitivity", "every_other", "last")


def evaluate(run, keeps: list[float]) -> dict[tuple[str, float], float]:
    """Test accuracy (%) for each (rule, keep); the sensitivities are measured once."""
    sd = next(c for c in run.trainer.callbacks if isinstance(c, StochasticDepth))
    s = sd.pruning_sensitivities()
    out: dict[tuple[str, float], float] = {}
    for rule in RULES:
        for keep in keeps:
            sd.handle.prune(keep, rule, sensitivities=s)
            out[(rule, keep)] = run.test_accuracy()
    sd.unprune()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's 15")
    parser.add_argument("--budget", type=float, default=0.5, help="SD training budget")
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keeps = args.keeps
    results: dict[str, list[dict[tuple[str, float], float]]] = {"SD": [], "no SD": []}
    start = time.perf_counter()
    for seed in args.seeds:
        for name, budget in (("SD", args.budget), ("no SD", 1.0)):
            sd = StochasticDepth(mode="uniform", budget=budget, drop="batch", scaling="expected", seed=seed)
            run = fit(sd, seed, args.epochs)
            results[name].append(evaluate(run, keeps))
            acc = results[name][-1]
            print(
                f"seed {seed} {name:6s}: full {acc[('sensitivity', 1.0)]:.2f}%, half by sensitivity "
                f"{acc[('sensitivity', 0.5)]:.2f}%, every_other {acc[('every_other', 0.5)]:.2f}%",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    blocks = [max(1, min(9, int(k * 9 + 0.5))) for k in keeps]
    header = ["model", "pruned by"] + [f"keep {k:g} ({b} blocks)" for k, b in zip(keeps, blocks)]
    rows = []
    for name in results:
        for rule in RULES:
            rows.append([name, rule] + [mean_spread([r[(rule, k)] for r in results[name]]) for k in keeps])
    print()
    print(f"Test accuracy (%), mean ± std over seeds {args.seeds}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {elapsed / 60:.1f} min in all")
    print(markdown_table(header, rows))
    half = 0.5 if 0.5 in keeps else keeps[len(keeps) // 2]
    sd_runs, plain_runs = results["SD"], results["no SD"]
    comparisons = [
        ("SD, sensitivity-pruned minus SD full", [r[("sensitivity", half)] - r[("sensitivity", 1.0)] for r in sd_runs]),
        ("SD: sensitivity minus every_other", [r[("sensitivity", half)] - r[("every_other", half)] for r in sd_runs]),
        ("SD minus no SD, both sensitivity-pruned", [a[("sensitivity", half)] - b[("sensitivity", half)] for a, b in zip(sd_runs, plain_runs)]),
    ]
    print()
    print(f"Paired differences at keep {half:g}, in accuracy points (per seed; mean ± std)")
    print(markdown_table(
        ["comparison", "per seed", "mean ± std"],
        [[label, " ".join(f"{d:+.2f}" for d in diffs), mean_spread(diffs)] for label, diffs in comparisons],
    ))


if __name__ == "__main__":
    main()
