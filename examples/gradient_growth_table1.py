"""Reproduce Table 1 of Hayou & Ayed (2021): gradient-norm growth at initialization under stochastic depth.

Vanilla ResNet (``ResidualMLP``, He init, no branch scaling) with 50 blocks, budget 0.7; the average
growth rate per layer ``q_l^(1/(L - l))`` of ``q_l = E ||dLoss/dy_l||^2 / ||dLoss/dy_L||^2`` at
l = 0, 10, 20, 30, 40, measured over masks and re-initializations
(:func:`lightning_sd.core.gradient_growth.gradient_growth`), next to Proposition 1's
``prod_{k>l} (1 + p_k)``. The paper uses width 512 and 500 Monte-Carlo samples.

Usage::

    python examples/gradient_growth_table1.py                     # width 128, 16 inits x 32 masks
    python examples/gradient_growth_table1.py --width 512 --inits 50 --masks 10
"""

from __future__ import annotations

import argparse

import torch

from lightning_sd.core.gradient_growth import gradient_growth
from lightning_sd.core.survival import survival_rates
from lightning_sd.models import ResidualMLP

PAPER = {  # empirical (theory) of the paper's Table 1
    "none": ("2.001 (2)",) * 5,
    "uniform": ("1.705 (1.7)", "1.708 (1.7)", "1.707 (1.7)", "1.716 (1.7)", "1.739 (1.7)"),
    "linear": ("1.694 (1.691)", "1.633 (1.629)", "1.569 (1.573)", "1.555 (1.516)", "1.530 (1.459)"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--inits", type=int, default=16, help="weight re-initializations")
    parser.add_argument("--masks", type=int, default=32, help="masks per initialization")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [l for l in (0, 10, 20, 30, 40) if l < args.depth]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    print(f"Vanilla ResNet, L = {args.depth}, width {args.width}, budget {args.budget}, "
          f"{args.inits} inits x {args.masks} masks = {args.inits * args.masks} samples")
    print()
    print("| mode | " + " | ".join(f"l = {l}" for l in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for mode in ("none", "uniform", "linear"):
        survival = None if mode == "none" else survival_rates(mode, args.depth, args.budget)
        gg = gradient_growth(
            lambda: ResidualMLP(32, args.width, args.depth, 1), x, survival, num_masks=args.masks, num_inits=args.inits, seed=0
        )
        cells = [f"{float(gg.empirical_rate[l]):.3f} ({float(gg.theory_rate[l]):.3f})" for l in layers]
        print(f"| {mode} | " + " | ".join(cells) + " |")
        if args.depth == 50 and args.budget == 0.7:
            print(f"| {mode}, paper | " + " | ".join(PAPER[mode][: len(layers)]) + " |")


if __name__ == "__main__":
    main()
