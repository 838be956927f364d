"""Batched Monte-Carlo masks vs a loop of forward calls for the normality probe (Theorem 2, Fig. 5).

For each of ``--inputs`` probe inputs, ``--masks`` (200, the paper's) masked forward passes, recording one
output neuron and one neuron of every block's output:

- **batched**: :func:`lightning_sd.core.normality.masked_samples`, all (input, mask) pairs as one
  replicated batch with per-example gates ``handle.override(m)``, ``m`` of shape ``(rows, L)``,
  chunked to ``--chunk-size`` rows;
- **loop**: one forward call per (input, mask) with a ``(L,)`` override, block outputs from the same
  forward hooks (what one writes without per-example gates).

Both produce the same samples (checked here to 1e-4 relative in float32; the test suite checks 1e-12 in
float64). Goal: batched at least 5x faster on CPU. Timings are medians over ``--repeats`` interleaved
repeats after one warm-up; the Shapiro-Wilk step (scipy, identical for both) is timed separately.

Models: the paper's Stable Vanilla ResNet (``ResidualMLP``, width 128, depth 100, 256-dim inputs) and
a CIFAR ResNet-20 (width 8, 8x8 inputs, BatchNorm in eval mode).

Usage::

    python examples/benchmarks/bench_normality.py                  # 1 thread, 8 inputs x 200 masks
    python examples/benchmarks/bench_normality.py --threads 2 --inputs 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_sd.core.discovery import find_residual_branches
from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.core.normality import _block_output_modules, masked_samples, normality_test, sample_multipliers
from lightning_sd.models import CifarResNet, ResidualMLP


def median_times(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function, repeats interleaved so load changes hit all alike."""
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


def loop_samples(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, neuron: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one forward call per (input, mask)."""
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    n, m, num_blocks = masks.shape
    out = torch.empty(n, m, dtype=torch.float64)
    blocks = torch.empty(n, m, num_blocks, dtype=torch.float64)
    captured: list[torch.Tensor] = [torch.empty(0)] * num_blocks
    hooks = []
    for l, module in enumerate(_block_output_modules(handle, model)):
        hooks.append(module.register_forward_hook(lambda _m, _a, o, l=l: captured.__setitem__(l, o.reshape(o.shape[0], -1)[:, neuron])))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(n):
                for j in range(m):
                    with handle.override(masks[i, j].float()):
                        y = model(x[i : i + 1])
                    out[i, j] = float(y.reshape(1, -1)[0, neuron])
                    for l in range(num_blocks):
                        blocks[i, j, l] = float(captured[l][0])
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
        model.train(was_training)
    return out, blocks


def bench(name: str, model: nn.Module, x: torch.Tensor, num_masks: int, chunk_size: int, repeats: int) -> dict[str, float | str]:
    num_blocks = len(find_residual_branches(model))
    masks = sample_multipliers(torch.full((num_blocks,), 0.7), x.shape[0], num_masks, scaling="expected", seed=0)
    batched_out, batched_blocks = masked_samples(model, x, masks, per_block=True, chunk_size=chunk_size)
    ref_out, ref_blocks = loop_samples(model, x, masks)
    torch.testing.assert_close(batched_out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched_blocks, ref_blocks, rtol=1e-4, atol=1e-5)
    t_batched, t_loop, t_test = median_times(
        [
            lambda: masked_samples(model, x, masks, per_block=True, chunk_size=chunk_size),
            lambda: loop_samples(model, x, masks),
            lambda: (normality_test(batched_out), normality_test(batched_blocks.transpose(1, 2))),
        ],
        repeats,
    )
    return {"model": name, "L": num_blocks, "passes": x.shape[0] * num_masks, "batched": t_batched, "loop": t_loop, "speedup": t_loop / t_batched, "shapiro": t_test}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=8, help="probe inputs")
    parser.add_argument("--masks", type=int, default=200, help="masks per input (paper: 200)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="rows per batched forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [
        bench("ResidualMLP(256, 128, depth 100, stable)", ResidualMLP(256, 128, 100, 1, stable=True), torch.randn(args.inputs, 256), args.masks, args.chunk_size, args.repeats),
        bench("CifarResNet-20 (width 8, 8x8)", CifarResNet(20, 10, width=8), torch.randn(args.inputs, 3, 8, 8), args.masks, args.chunk_size, args.repeats),
    ]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"{args.inputs} inputs x {args.masks} masks, per_block=True; median of {args.repeats}")
    print()
    print("| model | blocks | masked passes | batched (s) | loop of forwards (s) | speed-up | Shapiro-Wilk, all p-values (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['L']} | {r['passes']} | {r['batched']:.3f} | {r['loop']:.3f} | {r['speedup']:.1f}x | {r['shapiro']:.3f} |")


if __name__ == "__main__":
    main()
