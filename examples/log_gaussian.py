"""The numbers behind Figs. 1-3 of Li, Nica & Roy (2021): simulation vs log-Gaussian vs infinite width.

Network of Eq. (1) at initialization, n = 100, alpha = lambda = 1/sqrt(2), d/n in {0.1, 0.5, 1},
vanilla and balanced. For each configuration the exact fast simulator draws ``--samples`` networks
and the table compares, for ``G`` (Eq. (6)) and the squared outputs (section 3):

* simulated (with its Monte-Carlo standard error where it is meaningful),
* the log-Gaussian prediction (Theorem 1 + Proposition 2 for vanilla, Theorem 4 for balanced),
* the Gaussian infinite-width prediction (``G = 0``).

The figure shows the density of ``ln ||z^out||^2`` with ``n_out = 10`` (the paper's Fig. 1): histogram
of the simulation, log-Gaussian density, infinite-width density.

Usage::

    python examples/log_gaussian.py --out log_gaussian.png
    python examples/log_gaussian.py --samples 2000 --out /tmp/lg.png   # quicker
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.integrate import trapezoid  # noqa: E402  (numpy's own is numpy >= 2 only)
from scipy.stats import chi2  # noqa: E402

from lightning_sd.theory import out_sq_moments, predict, predict_infinite_width, simulate  # noqa: E402


def _ln_chi2_pdf(y: np.ndarray, k: int) -> np.ndarray:
    """Density of ``ln X``, ``X ~ chi^2_k``."""
    return chi2.pdf(np.exp(y), k) * np.exp(y)


def _predicted_pdf(y: np.ndarray, mean_g: float, var_g: float, k: int) -> np.ndarray:
    """Density of ``G + ln chi^2_k`` with ``G ~ N(mean_g, var_g)`` (numerical convolution)."""
    sd = math.sqrt(var_g)
    g = np.linspace(mean_g - 8 * sd, mean_g + 8 * sd, 1601)
    w = np.exp(-0.5 * ((g - mean_g) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    dens = _ln_chi2_pdf(y[:, None] - g[None, :], k) * w[None, :]
    return trapezoid(dens, g, axis=1)


def run(n: int, ratios: list[float], samples: int, seed: int, alpha: float, lam: float, n_out: int):
    rows, curves = [], []
    inf_cache = {}
    for ratio in ratios:
        d = max(1, round(ratio * n))
        for balanced in (False, True):
            t0 = time.perf_counter()
            sim = simulate(n, d, alpha, lam, balanced=balanced, num_samples=samples, seed=seed + d + int(balanced))
            elapsed = time.perf_counter() - t0
            G = sim.G
            p = predict(n, d, alpha, lam, balanced=balanced)
            inf = inf_cache.setdefault(d, predict_infinite_width(d, alpha, lam))
            m = out_sq_moments(G, d, alpha, lam)
            se_mean = float(G.std()) / math.sqrt(samples)
            c = G - G.mean()
            se_var = math.sqrt(float((c**4).mean() - (c**2).mean() ** 2) / samples)
            eg = torch.exp(G + d * math.log(alpha**2 + lam**2))
            se_m1 = float(eg.std()) / math.sqrt(samples)
            start = min(10, d // 2)
            deep = sim.active_fraction[:, start:].mean(1)
            name = f"{'balanced' if balanced else 'vanilla'} d/n={d / n:g}"
            rows += [
                (name, "E[G]", f"{m['mean_G']:.3f} ± {se_mean:.3f}", f"{p.mean_G:.3f}", "0"),
                (name, "Var[G]", f"{m['var_G']:.3f} ± {se_var:.3f}", f"{p.var_G:.3f}", "0"),
                (name, "E[(z_i^out)^2]", f"{m['mean_out_sq']:.3f} ± {se_m1:.3f}", f"{p.mean_out_sq:.3f}",
                 f"{inf.mean_out_sq:.3f}"),
                (name, "Var[(z_i^out)^2]", f"{m['var_out_sq']:.3g}", f"{p.var_out_sq:.3g}", f"{inf.var_out_sq:.3g}"),
                (name, "Corr((z_i)^2,(z_j)^2)", f"{m['corr_out_sq']:.3f}", f"{p.corr_out_sq:.3f}", "0"),
                (name, "h_total", f"{sim.h_total:.3f}", f"{p.h_total:.3f}", "0"),
                (name, f"active fraction (l > {start})", f"{float(deep.mean()):.4f}", "-", "0.5"),
            ]
            gen = torch.Generator().manual_seed(seed + 7)
            ln_chi = torch.randn(samples, n_out, generator=gen, dtype=torch.float64).square().sum(1).log()
            ln_out = (G + ln_chi + d * math.log(alpha**2 + lam**2)).numpy()
            curves.append((name, d, balanced, ln_out, p, elapsed))
    return rows, curves


def plot(curves, n_out: int, out: str, alpha: float, lam: float) -> None:
    ds = sorted({c[1] for c in curves})
    fig, axes = plt.subplots(2, len(ds), figsize=(4.2 * len(ds), 6.4), squeeze=False)
    for name, d, balanced, ln_out, p, _ in curves:
        ax = axes[int(balanced), ds.index(d)]
        gain = d * math.log(alpha**2 + lam**2)
        lo, hi = np.quantile(ln_out, [0.001, 0.999])
        y = np.linspace(lo - 1, hi + 1, 400)
        ax.hist(ln_out, bins=80, density=True, color="0.75", label="simulation")
        ax.plot(y, _predicted_pdf(y - gain, p.mean_G, p.var_G, n_out), "C3", lw=2, label="log-Gaussian")
        ax.plot(y, _ln_chi2_pdf(y - gain, n_out), "C0--", lw=1.5, label="infinite width")
        ax.set_title(name)
        ax.set_xlabel(r"$\ln\|z^{out}\|^2$")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"n = {curves[0][4].n}, n_out = {n_out}, alpha = {alpha:.3g}, lambda = {lam:.3g}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="log_gaussian.png", help="PNG path of the figure")
    parser.add_argument("--n", type=int, default=100, help="width")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.5, 1.0], help="d/n values")
    parser.add_argument("--samples", type=int, default=10000, help="simulated networks per configuration")
    parser.add_argument("--n-out", type=int, default=10, help="output dimension of the figure")
    parser.add_argument("--alpha", type=float, default=2**-0.5)
    parser.add_argument("--lam", type=float, default=2**-0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.n < 1 or args.samples < 2 or args.n_out < 1 or any(r <= 0 for r in args.ratios):
        parser.error("need n >= 1, samples >= 2, n_out >= 1 and positive ratios")

    rows, curves = run(args.n, args.ratios, args.samples, args.seed, args.alpha, args.lam, args.n_out)
    print(f"# n = {args.n}, alpha = {args.alpha:.4g}, lambda = {args.lam:.4g}, {args.samples} simulated networks "
          "per configuration (fast exact simulator); ± = Monte-Carlo standard error")
    print("| configuration | quantity | simulated | log-Gaussian | infinite width |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    plot(curves, args.n_out, args.out, args.alpha, args.lam)
    total = sum(c[5] for c in curves)
    print(f"\nfigure: {args.out}  (simulation time {total:.1f} s)")


if __name__ == "__main__":
    main()
