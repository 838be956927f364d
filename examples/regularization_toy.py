"""The explicit regularization of stochastic depth on the paper's toy regression (Hayou & Ayed 2021, 4.1).

(a) Second-order check, over training: a Stable ResidualMLP is trained with SD (uniform rates,
    ``scaling="expected"``, the paper's convention) on ``sin(beta^T x)``, ``x in R^256``. At a few epochs
    the script compares the Monte-Carlo gap ``E_delta[loss] - loss(average network)`` on held-out inputs
    with the explicit penalty ``R = 1/2 sum_l p_l (1 - p_l) g_l`` (Eq. (4)/(6), ``g_l`` at ``m = 1``,
    ``H = 2I``). The Monte-Carlo estimate uses the first-order term ``sum_l (delta_l - p_l) dloss/dm_l``
    (exactly zero mean) as a control variate, which removes most of its noise without bias.
(b) ``g_l`` across depth at initialization, averaged over weight draws (Fig. 3 / Theorem 1:
    ``E_W[g_l] = E_W[g_1]``, a flat profile) for a Vanilla and a Stable ResidualMLP.

Usage::

    python examples/regularization_toy.py                 # ~1-2 minutes on 2 CPU cores
    python examples/regularization_toy.py --epochs 30 --depth 50 --png reg_toy.png
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

from lightning_sd.core.gates import StochasticDepthHandle, inject_stochastic_depth, mask_generator
from lightning_sd.core.regularization import explicit_penalty, regularization_terms
from lightning_sd.data.toy_regression import make_toy_regression
from lightning_sd.models import ResidualMLP


def mc_gap(model: nn.Module, handle: StochasticDepthHandle, x: Tensor, t: Tensor, samples: int, seed: int) -> tuple[float, float, float]:
    """``E_delta[loss] - loss(average network)`` by Monte Carlo (control variate), its standard error, and the average loss.

    loss = ``||y - t||^2`` per example; the average network has ``m = E[m] = p`` ("expected") or 1 ("inverted").
    """
    model.eval()
    p = handle.survival.to(torch.float64)
    B, L = x.shape[0], handle.num_blocks
    mean_m = p if handle.scaling == "expected" else torch.ones(L, dtype=torch.float64)
    m0 = mean_m.expand(B, L).clone().requires_grad_(True)
    with handle.override(m0):
        base = ((model(x) - t) ** 2).sum(1)
    (sens,) = torch.autograd.grad(base.sum(), m0)
    gen = mask_generator(seed)
    gaps = []
    for _ in range(samples):
        delta = (torch.rand(B, L, generator=gen, dtype=torch.float64) < p).double()
        m = delta if handle.scaling == "expected" else delta / p
        with torch.no_grad(), handle.override(m):
            loss = ((model(x) - t) ** 2).sum(1)
        gaps.append(loss - base.detach() - ((m - mean_m) * sens).sum(1))
    gap = torch.cat(gaps)
    return float(gap.mean()), float(gap.std()) / math.sqrt(gap.numel()), float(base.detach().mean())


def part_a(args: argparse.Namespace) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(args.seed)
    beta = args.beta_scale * torch.randn(args.in_features, generator=gen)
    x_train, y_train = make_toy_regression(args.num_train, beta, generator=gen)
    x_eval, y_eval = make_toy_regression(args.num_eval, beta, generator=gen)
    x_eval, y_eval = x_eval.double(), y_eval.double()
    torch.manual_seed(args.seed)
    model = ResidualMLP(args.in_features, args.width, args.depth, 1, stable=True).double()
    handle = inject_stochastic_depth(model, args.survival, drop="batch", scaling=args.scaling, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows = []
    checkpoints = sorted({0, *range(args.every, args.epochs + 1, args.every), args.epochs})
    print(
        f"\n(a) Stable ResidualMLP({args.in_features}, width={args.width}, depth={args.depth}), SD p={args.survival} "
        f"(uniform, scaling={args.scaling}), {args.num_eval} held-out inputs, {args.samples} masks each"
    )
    print("| epoch | train loss (SD) | loss(average net) | E_delta[loss] - loss(avg) (MC +- s.e.) | R = 1/2 sum Var(m_l) g_l | R / MC gap |")
    print("|---|---|---|---|---|---|")
    for epoch in range(args.epochs + 1):
        if epoch > 0:
            model.train()
            perm = torch.randperm(args.num_train, generator=gen)
            total = 0.0
            for i in range(0, args.num_train, args.batch_size):
                idx = perm[i : i + args.batch_size]
                loss = ((model(x_train[idx].double()) - y_train[idx].double()) ** 2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            train_loss = total / args.num_train
        else:
            train_loss = float("nan")
        if epoch in checkpoints:
            g = regularization_terms(model, x_eval, loss="mse")
            R = explicit_penalty(g, handle.survival, handle.scaling)
            gap, se, avg = mc_gap(model, handle, x_eval, y_eval, args.samples, seed=epoch)
            rows.append({"epoch": epoch, "train": train_loss, "avg": avg, "gap": gap, "se": se, "R": R})
            print(f"| {epoch} | {train_loss:.4f} | {avg:.4f} | {gap:.5f} +- {se:.5f} | {R:.5f} | {R / gap:.3f} |", flush=True)
    handle.remove()
    return rows


def part_b(args: argparse.Namespace) -> dict[str, Tensor]:
    x = torch.randn(args.num_eval, args.in_features, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    profiles = {}
    for stable in (False, True):
        gs = []
        for s in range(args.draws):
            torch.manual_seed(1000 + s)
            model = ResidualMLP(args.in_features, args.width_b, args.depth_b, 1, stable=stable).double()
            gs.append(regularization_terms(model, x, loss="mse"))
        g = torch.stack(gs)
        # normalize each draw by its mean over blocks so that draws with a larger output scale do not dominate
        profiles["stable" if stable else "vanilla"] = (g / g.mean(1, keepdim=True)).mean(0)
    L = args.depth_b
    print(
        f"\n(b) g_l / mean_l g_l at initialization, averaged over {args.draws} weight draws "
        f"(ResidualMLP width={args.width_b}, depth={L}, He init; Theorem 1: flat)"
    )
    groups = [(a, min(a + max(L // 10, 1), L)) for a in range(0, L, max(L // 10, 1))]
    print("| blocks | " + " | ".join(profiles) + " |")
    print("|---|" + "---|" * len(profiles))
    for a, b in groups:
        print(f"| {a + 1}-{b} | " + " | ".join(f"{float(v[a:b].mean()):.3f}" for v in profiles.values()) + " |")
    for name, v in profiles.items():
        slope = float(torch.linalg.lstsq(torch.stack([torch.ones(L), torch.linspace(0, 1, L)], 1).double(), v.unsqueeze(1)).solution[1])
        print(f"{name}: coefficient of variation over blocks {float(v.std() / v.mean()):.3f}, fitted change first->last block {slope:+.3f}")
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-features", type=int, default=256)
    parser.add_argument("--width", type=int, default=64, help="hidden width of (a)")
    parser.add_argument("--width-b", type=int, default=128, help="hidden width of (b) (the paper's Fig. 3: 512)")
    parser.add_argument("--depth", type=int, default=20, help="blocks of the trained network (a)")
    parser.add_argument("--depth-b", type=int, default=50, help="blocks of the networks at initialization (b)")
    parser.add_argument("--survival", type=float, default=0.9, help="uniform survival rate (small variance: near 1)")
    parser.add_argument("--scaling", choices=["expected", "inverted"], default="expected")
    parser.add_argument("--beta-scale", type=float, default=1.0 / 16, help="1 is the paper's beta; 1/16 makes beta^T x ~ N(0, 1)")
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--num-eval", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200, help="Monte-Carlo masks per input")
    parser.add_argument("--draws", type=int, default=8, help="weight draws for (b)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default=None, help="write a two-panel figure here (needs matplotlib)")
    args = parser.parse_args()
    rows = part_a(args)
    profiles = part_b(args)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ep = [r["epoch"] for r in rows]
        ax1.errorbar(ep, [r["gap"] for r in rows], yerr=[2 * r["se"] for r in rows], marker="o", label="MC: E[loss] - loss(avg)")
        ax1.plot(ep, [r["R"] for r in rows], marker="s", label="R (second order)")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss gap")
        ax1.legend()
        for name, v in profiles.items():
            ax2.plot(range(1, v.numel() + 1), v.numpy(), label=name)
        ax2.axhline(1.0, color="grey", lw=0.5)
        ax2.set_xlabel("block l")
        ax2.set_ylabel("g_l / mean g (init)")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
