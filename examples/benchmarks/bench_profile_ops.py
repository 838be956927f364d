"""Operators per training step, gated model at budget 1.0 vs the plain model (torch.profiler).

Builds the model of ``bench_speed.py`` twice from the same weights: plain, and with
``inject_stochastic_depth(..., drop="batch")`` at survival rate 1.0 (every block kept). Each model
runs one warm-up step, then ``--steps`` training steps (forward, cross-entropy, backward, SGD step)
under ``torch.profiler.profile`` (CPU activity). The table counts the profiler's operator events
(``aten::`` ops and the autograd/optimizer events it records) per step, and lists every operator
whose count differs between the two models. Mask sampling (``handle.resample``, what the callback
does once per step before the forward) is profiled separately.

    python examples/benchmarks/bench_profile_ops.py                  # CifarResNet-110, batch 8
    python examples/benchmarks/bench_profile_ops.py --models resnet50
"""

from __future__ import annotations

import argparse
import collections
import copy

import torch
from bench_speed import build  # same folder: the models of the speed table
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_sd.core.gates import inject_stochastic_depth


def count_ops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, before_step=None) -> collections.Counter:
    """Profiler events per name, summed over ``steps`` training steps (after one warm-up step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step(i: int) -> None:
        if before_step is not None:
            before_step(i)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(1 + i)
    return collections.Counter(e.name for e in prof.events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar110"])
    parser.add_argument("--batch-size", type=int, default=8, help="operator counts do not depend on it")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, batch {args.batch_size}, {args.steps} profiled steps per model, counts per step")
    for name in args.models:
        torch.manual_seed(0)
        base, shape, classes = build(name)
        x = torch.randn(args.batch_size, *shape)
        y = torch.randint(0, classes, (args.batch_size,))
        plain = copy.deepcopy(base)
        gated = copy.deepcopy(base)
        handle = inject_stochastic_depth(gated, 1.0, drop="batch", scaling="expected", auto_resample=False)
        handle.resample(0, batch_size=args.batch_size)  # every block kept at rate 1.0
        plain_ops = count_ops(plain, x, y, args.steps)
        gated_ops = count_ops(gated, x, y, args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                handle.resample(1 + i, batch_size=args.batch_size)
        resample_ops = collections.Counter(e.name for e in prof.events())
        assert bool(handle.kept.all()), "budget 1.0 keeps every block"

        def per_step(c: collections.Counter, prefix: str = "") -> float:
            return sum(v for k, v in c.items() if k.startswith(prefix)) / args.steps

        print(f"\n{name}: {handle.num_blocks} gated blocks, all kept (budget 1.0)")
        print("| model | profiler events per step | aten:: ops per step | distinct event names |")
        print("|---|---|---|---|")
        for label, c in (("plain", plain_ops), ("gated, budget 1.0", gated_ops), ("mask sampling (resample)", resample_ops)):
            print(f"| {label} | {per_step(c):.0f} | {per_step(c, 'aten::'):.0f} | {len(c)} |")
        diff = {k: (gated_ops[k] - plain_ops[k]) / args.steps for k in set(plain_ops) | set(gated_ops) if gated_ops[k] != plain_ops[k]}
        if diff:
            print("events whose count per step differs (gated - plain): " + ", ".join(f"{k} {v:+g}" for k, v in sorted(diff.items())))
        else:
            print("every event name occurs equally often in the gated and the plain step")


if __name__ == "__main__":
    main()
