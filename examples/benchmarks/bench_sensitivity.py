"""Cost of SenseMode's sensitivity measurement on CifarResNet-110 (54 residual blocks).

Times, in one run and on the same random CIFAR-sized batches:

- one training step (forward, backward, SGD step with momentum) of the model, all blocks on;
- ``estimate_sensitivities(..., method="gradient")`` over ``--batches`` batches: one forward and one
  backward per batch, taken w.r.t. the 54 gate multipliers only;
- ``estimate_sensitivities(..., method="exact")`` (``L + 1 = 55`` forwards per batch), timed on
  ``--exact-batches`` batches and reported per batch (it scales linearly in the number of batches).

Goals: the gradient estimate costs at most 1.5x the ``--batches`` training steps it replaces and is
at least 20x faster than the exact leave-one-out differences. Every figure is the median over
``--repeats`` repeats (after one warm-up); ratios are taken between figures of the same run. The
model is injected once beforehand (survival 1), as the StochasticDepth callback has it.

Usage::

    python examples/benchmarks/bench_sensitivity.py                 # ResNet-110, batch 32, 32x32, 1 thread
    python examples/benchmarks/bench_sensitivity.py --threads 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.models import CifarResNet


def median_times(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function; repeats are interleaved (round r runs every function once),
    so a change of load on a shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=110, help="CifarResNet depth 6n+2 (110 -> 54 blocks)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (16 in the paper)")
    parser.add_argument("--stable", action="store_true", help="Stable ResNet: branches scaled by 1/sqrt(L) (the paper's Table 2 model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches of the sensitivity estimate (the callback's sensitivity_batches)")
    parser.add_argument("--exact-batches", type=int, default=1, help="batches the exact method is timed on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = CifarResNet(args.depth, num_classes=10, width=args.width, stable=args.stable).to(device).train()
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    num_blocks = handle.num_blocks
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=g).to(device),
        )
        for _ in range(max(args.batches, args.exact_batches))
    ]
    loss_fn = supervised_loss(F.cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def train_step() -> None:
        x, y = batches[0]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sync()

    def gradient() -> torch.Tensor:
        s = estimate_sensitivities(model, batches[: args.batches], loss_fn)
        sync()
        return s

    def exact() -> torch.Tensor:
        s = estimate_sensitivities(model, batches[: args.exact_batches], loss_fn, method="exact")
        sync()
        return s

    t_step, t_grad, t_exact = median_times([train_step, gradient, exact], args.repeats)
    model.load_state_dict(initial)  # agreement check on the initial weights, as at fit start
    optimizer.zero_grad(set_to_none=True)
    t_grad_per_batch = t_grad / args.batches
    t_exact_per_batch = t_exact / args.exact_batches

    s_grad = estimate_sensitivities(model, batches[: args.exact_batches], loss_fn)
    s_exact = exact()
    rho = spearmanr(s_grad.numpy(), s_exact.numpy()).statistic

    print(
        f"{'Stable ' if args.stable else ''}CifarResNet-{args.depth} (L = {num_blocks} blocks, width {args.width}), batch {args.batch_size} at "
        f"{args.image_size}x{args.image_size}, device {device} ({platform.processor() or platform.machine()}), "
        f"{args.threads} thread(s), torch {torch.__version__}; medians of {args.repeats} repeats\n"
    )
    rows = [
        ("training step (fwd + bwd + SGD)", 1, t_step, "1.00 x step"),
        (f"{args.batches} training steps", args.batches, args.batches * t_step, f"{args.batches:.2f} x step"),
        (
            "estimate_sensitivities, gradient",
            args.batches,
            t_grad,
            f"{t_grad / (args.batches * t_step):.2f} x {args.batches} steps (goal <= 1.5)",
        ),
        (
            "estimate_sensitivities, exact (L+1 fwd/batch)",
            args.batches,
            t_exact_per_batch * args.batches,
            f"{t_exact_per_batch / t_grad_per_batch:.1f} x gradient (goal >= 20; timed on {args.exact_batches} batch(es))",
        ),
    ]
    print("| operation | batches | median time (s) | ratio |")
    print("|---|---:|---:|---|")
    for name, n, t, ratio in rows:
        print(f"| {name} | {n} | {t:.3f} | {ratio} |")
    print(
        f"\nSpearman rank correlation of gradient vs exact sensitivities on {args.exact_batches} batch(es): {rho:.3f} "
        f"({'Stable ' if args.stable else ''}CifarResNet-{args.depth} at initialization)"
    )
    handle.remove()


if __name__ == "__main__":
    main()
