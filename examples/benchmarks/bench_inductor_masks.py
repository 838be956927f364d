"""What a compiled ReLU costs on this CPU when it saves its mask for the backward (Inductor's bool stores).

Not a benchmark of this package: a probe of the CPU code Inductor generates, which explains CPU step
times of compiled configurations (docs/compile.md). A graph whose output is ``relu(x + 1)`` of an input
that requires grad stores, next to the output, the bool mask ``out <= 0`` that the ReLU's backward reads;
without grad it stores the output only.

First table: per call, for activations of CifarResNet's three stage shapes (batch 32), the compiled ReLU
with grad and without, with Inductor's vectorized code (the default) and scalar code
(``cpp.simdlen = 1``); a compiled function that returns the mask alone (``(x + 1) <= 0``, no grad) and the
same comparison eagerly; and the eager ReLU with grad (``torch.relu`` saves its output, not a mask).
Median over ``--repeats`` rounds of ``--calls`` calls.

Second table: a compiled CifarResNet-20 training step (batch 32, forward and backward) without SD, with
subset drop at 0.5 and with batch drop at 0.5 (``torch.cond``), each compiled from an empty kernel cache:
the step time (median over ``--repeats`` rounds of 5 steps), and from a profile of 5 steps with
Inductor's kernel profiling (``cpp.enable_kernel_profile``) the time per step in its generated kernels,
in those of them that write a bool tensor, and in those that read one (a kernel's argument types are
read from Inductor's wrapper code in the cache). One thread throughout.

    python examples/benchmarks/bench_inductor_masks.py
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.utils import fresh_cache

from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.models import CifarResNet

SHAPES = ((32, 16, 32, 32), (32, 32, 16, 16), (32, 64, 8, 8))


def relu_of_shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x + 1.0)


def mask_of_shifted(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) <= 0


def per_call_ms(fn, x: torch.Tensor, calls: int, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(rounds)


def kernel_arguments(cache_dir: str) -> dict[str, list[list[str]]]:
    """Argument types of each generated C++ kernel, by name, from the wrapper code in Inductor's cache."""
    binding = re.compile(r"^(\w+) = async_compile\.cpp_pybinding\(\[([^\]]*)\]", re.MULTILINE)
    kernels: dict[str, list[list[str]]] = collections.defaultdict(list)
    for root, _, files in os.walk(cache_dir):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(root, file), encoding="utf-8", errors="replace") as source:
                    for name, types in binding.findall(source.read()):
                        kernels[name].append([t.strip().strip("'\"") for t in types.split(",")])
    return kernels


def model_row(label: str, drop: str | None, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = CifarResNet(20, num_classes=10).train()
    handle = inject_stochastic_depth(model, 0.5, drop=drop, auto_resample=False, seed=0) if drop else None
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    compiled = torch.compile(model)
    steps = [0]

    def step() -> None:
        if handle is not None:
            handle.resample(steps[0], batch_size=len(x))
        steps[0] += 1
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(compiled(x), y).backward()

    torch._dynamo.reset()
    inductor_config.cpp.enable_kernel_profile = True
    try:
        with fresh_cache(delete=False):
            cache_dir = os.environ["TORCHINDUCTOR_CACHE_DIR"]
            for _ in range(3):
                step()
            rounds = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(5):
                    step()
                rounds.append((time.perf_counter() - start) / 5 * 1e3)
            with torch.profiler.profile() as profile:
                for _ in range(5):
                    step()
            kernels = kernel_arguments(cache_dir)
    finally:
        inductor_config.cpp.enable_kernel_profile = False
    total = writes = reads = 0.0
    for event in profile.key_averages():
        name = re.sub(r"^graph_\d+_", "", event.key)
        if name not in kernels:
            continue
        ms = event.self_cpu_time_total / 5 / 1e3
        total += ms
        writes += ms * any("bool*" in types for types in kernels[name])
        reads += ms * any("const bool*" in types for types in kernels[name])
    return {"config": label, "step": statistics.median(rounds), "kernels": total, "writes bool": writes, "reads bool": reads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for shape in SHAPES:
        row = {"shape": "x".join(map(str, shape))}
        for code, simdlen in (("vectorized", None), ("scalar", 1)):
            inductor_config.cpp.simdlen = simdlen
            torch._dynamo.reset()  # compile again with this code generation
            compiled = torch.compile(relu_of_shifted)
            for grad in (True, False):
                x = torch.randn(shape, requires_grad=grad)
                row[f"ReLU {code}, grad={grad}"] = per_call_ms(compiled, x, args.calls, args.repeats)
        inductor_config.cpp.simdlen = None
        torch._dynamo.reset()
        x = torch.randn(shape)
        row["mask alone, compiled"] = per_call_ms(torch.compile(mask_of_shifted), x, args.calls, args.repeats)
        row["mask alone, eager"] = per_call_ms(mask_of_shifted, x, args.calls, args.repeats)
        row["eager ReLU, grad=True"] = per_call_ms(relu_of_shifted, torch.randn(shape, requires_grad=True), args.calls, args.repeats)
        rows.append(row)
    columns = [key for key in rows[0] if key != "shape"]
    print(f"torch {torch.__version__}, one thread; forward of relu(x + 1) (compiled: vectorized / scalar code) and of the mask (x + 1) <= 0, ms per call (median of {args.repeats} rounds)")
    print("| activation | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['shape']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print("\nCompiled CifarResNet-20 training step, batch 32, ms per step (kernel times from a profile of 5 steps)")
    print("| config | step | Inductor kernels | kernels writing a bool tensor | kernels reading one |")
    print("|---|---|---|---|---|")
    for label, drop in (("no SD", None), ("subset drop 0.5", "subset"), ("batch drop 0.5 (torch.cond)", "batch")):
        r = model_row(label, drop, args.repeats)
        print(f"| {r['config']} | {r['step']:.1f} | {r['kernels']:.1f} | {r['writes bool']:.1f} | {r['reads bool']:.1f} |")


if __name__ == "__main__":
    main()
