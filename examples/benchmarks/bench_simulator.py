"""Fast (Eq. (14)-(16), O(d n) per network) vs dense (weight matrices, O(d n^2)) simulator of G.

Usage::

    python examples/benchmarks/bench_simulator.py                 # n = d = 100, 10^4 networks
    python examples/benchmarks/bench_simulator.py --n 50 --d 50 --samples 2000 --repeats-dense 5

Prints a table of median wall-clock seconds over repeats and the dense / fast ratio (goal: >= 20x),
plus the two sample means and variances of G as a sanity check (both samplers are exact).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lightning_sd.theory import simulate_G


def _time(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="width")
    parser.add_argument("--d", type=int, default=100, help="depth")
    parser.add_argument("--alpha", type=float, default=2**-0.5)
    parser.add_argument("--lam", type=float, default=2**-0.5)
    parser.add_argument("--samples", type=int, default=10000, help="networks per run")
    parser.add_argument("--balanced", action="store_true")
    parser.add_argument("--repeats-fast", type=int, default=7)
    parser.add_argument("--repeats-dense", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    common = dict(n=args.n, d=args.d, alpha=args.alpha, lam=args.lam, balanced=args.balanced,
                  num_samples=args.samples)
    simulate_G(**{**common, "num_samples": 64}, seed=0)  # warm-up
    t_fast, g_fast = _time(lambda: simulate_G(**common, seed=1, method="fast"), args.repeats_fast)
    t_dense, g_dense = _time(lambda: simulate_G(**common, seed=2, method="dense"), args.repeats_dense)
    m_fast, m_dense = statistics.median(t_fast), statistics.median(t_dense)
    ratio = m_dense / m_fast

    print(f"# simulate_G, n={args.n}, d={args.d}, {args.samples} networks, balanced={args.balanced}, float64, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    print("| method | repeats | median s | min s | us / network | mean G | var G |")
    print("|---|---|---|---|---|---|---|")
    for name, ts, g in (("fast (W x =d ‖x‖ g)", t_fast, g_fast), ("dense (weights)", t_dense, g_dense)):
        med = statistics.median(ts)
        print(f"| {name} | {len(ts)} | {med:.3f} | {min(ts):.3f} | {1e6 * med / args.samples:.1f} | "
              f"{g.mean().item():.3f} | {g.var().item():.3f} |")
    print(f"\ndense / fast (medians): {ratio:.1f}x  (goal >= 20x: {'met' if ratio >= 20 else 'NOT met'})")
    return {"fast_s": m_fast, "dense_s": m_dense, "ratio": ratio}


if __name__ == "__main__":
    main()
