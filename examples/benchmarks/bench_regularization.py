"""Cost of one RegularizationMonitor call (``regularization_terms``) relative to one training step.

For CIFAR ResNets of increasing depth (default 110, the paper's network) and a probe batch of 128
examples, times:

- one training step (forward, cross-entropy, backward, SGD step) on the probe batch, the reference;
- one forward+backward pass (no optimizer step), the unit of the "passes" column;
- ``regularization_terms(..., estimator="exact")`` (1 forward + o = 10 backwards w.r.t. the gates) and
  ``estimator="sampled"`` (1 forward + ``num_samples`` backwards, whatever L and o).

The goal is that the sampled estimator costs at most ``num_samples + 1`` forward+backward passes
whatever the depth: its backwards run w.r.t. the gate multipliers only (no weight gradients), so each
is cheaper than a training backward.

Usage::

    python examples/benchmarks/bench_regularization.py                       # ResNet-110, 32x32, CPU
    python examples/benchmarks/bench_regularization.py --depths 20 56 110 --size 16 --repeats 2
    python examples/benchmarks/bench_regularization.py --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_sd.core.regularization import regularization_terms
from lightning_sd.models import CifarResNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Minimum time of each function over ``repeats`` interleaved rounds (after one warm-up call of the first).

    The minimum, not the median: on a shared machine other processes only ever add time, and
    interleaving exposes every function to the same background load.
    """
    # CPU: process time (CPU seconds of this process, all its threads), which other processes on a shared
    # machine do not inflate; with --threads 1 it equals wall time on an idle machine. CUDA: wall time.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for i, (name, fn) in enumerate(fns.items()):
            if round_ == 0 and i > 0:
                break  # the first function's warm-up call warms the kernels for all of them
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            if round_ > 0:
                best[name] = min(best[name], clock() - start)
    return best


def bench(depth: int, batch: int, size: int, num_samples: int, repeats: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = CifarResNet(depth, num_classes=10).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def fwd_bwd() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    t = _time(
        {
            "step": train_step,
            "pass": fwd_bwd,
            "exact": lambda: regularization_terms(model, x, loss="cross_entropy", estimator="exact"),
            "sampled": lambda: regularization_terms(model, x, loss="cross_entropy", estimator="sampled", num_samples=num_samples),
        },
        device,
        repeats,
    )
    step, pass_, exact, sampled = t["step"], t["pass"], t["exact"], t["sampled"]
    return {"depth": depth, "L": model.num_blocks, "step": step, "pass": pass_, "exact": exact, "sampled": sampled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[110])
    parser.add_argument("--batch", type=int, default=128, help="probe examples")
    parser.add_argument("--size", type=int, default=32, help="image side (32 = CIFAR)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock_name = "wall" if device.type == "cuda" else "CPU process"
    print(
        f"device={device} threads={torch.get_num_threads()} probe={args.batch}x3x{args.size}x{args.size} "
        f"num_samples={args.num_samples} repeats={args.repeats} (minimum over interleaved rounds of {clock_name} seconds)"
    )
    header = "| model | L | train step (s) | fwd+bwd (s) | exact (s) | exact / step | exact passes | sampled (s) | sampled / step | sampled passes | goal (<= passes) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for depth in args.depths:
        r = bench(depth, args.batch, args.size, args.num_samples, args.repeats, device)
        goal = args.num_samples + 1
        print(
            f"| CifarResNet-{r['depth']} | {r['L']} | {r['step']:.3f} | {r['pass']:.3f} | {r['exact']:.3f} | "
            f"{r['exact'] / r['step']:.1f}x | {r['exact'] / r['pass']:.1f} | {r['sampled']:.3f} | "
            f"{r['sampled'] / r['step']:.1f}x | {r['sampled'] / r['pass']:.1f} | {goal} ({'met' if r['sampled'] / r['pass'] <= goal else 'missed'}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
