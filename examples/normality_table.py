"""Normality p-values of the SD noise at initialization (Hayou & Ayed 2021, Theorem 2 and Fig. 5).

For ``--inputs`` standard-Gaussian 256-dim inputs, ``--masks`` masks at uniform survival rate ``--rate``
(``scaling="expected"``, the paper's) give that many values of one output neuron (and of one neuron
of every block's output); the table gives the median p-value over inputs, the fraction above 0.05
and the block-wise median p-value at a few depths, for a deep Stable ResidualMLP (Shapiro-Wilk and
D'Agostino-Pearson) and a 2-block one (at most 4 distinct output values: far from Gaussian).

    python examples/normality_table.py
"""

from __future__ import annotations

import argparse

import torch

from lightning_sd.core.normality import normality_pvalues
from lightning_sd.models import ResidualMLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--masks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0.7)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs; masks use seed + 1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    depths = [l for l in (1, 5, 10, 20, 50, 100) if l <= args.depth]

    torch.manual_seed(args.seed)
    deep = ResidualMLP(256, width=args.width, depth=args.depth, out_features=1, stable=True)
    shallow = ResidualMLP(256, width=args.width, depth=2, out_features=1, stable=True)
    x = torch.randn(args.inputs, 256)
    print(
        f"{args.inputs} standard-Gaussian 256-dim inputs, {args.masks} masks, uniform {args.rate:g} "
        f"(scaling=expected), at initialization (seed {args.seed})\n"
    )
    print(f"| network | median p-value (output) | fraction > 0.05 | block-wise median p-value at l = {', '.join(map(str, depths))} |")
    print("|---|---|---|---|")
    for label, model, test, per_block in (
        (f"Stable ResidualMLP, width {args.width}, depth {args.depth} (Shapiro)", deep, "shapiro", True),
        ("same, D'Agostino-Pearson", deep, "dagostino", False),
        (f"Stable ResidualMLP, width {args.width}, depth 2 (Shapiro)", shallow, "shapiro", False),
    ):
        res = normality_pvalues(model, x, args.rate, num_masks=args.masks, test=test, per_block=per_block, seed=args.seed + 1)
        blocks = ""
        if per_block:
            med = res.block_medians()
            blocks = ", ".join(f"{float(med[l - 1]):.3f}" for l in depths)
        print(f"| {label} | {res.median():.3g} | {res.fraction_above(0.05):.2f} | {blocks} |")


if __name__ == "__main__":
    main()
