"""What a compiled ReLU costs on this CPU when it saves its mask for the backward (Inductor's bool stores).

Not a benchmark of this package: a probe of the CPU code Inductor generates, which explains the CPU step
times of routes made of many small graphs (``compile_route="graph_break"``, see docs/compile.md). A graph
whose output is ``relu(x + 1)`` of an input that requires grad stores, next to the output, the bool mask
``out <= 0`` that the ReLU's backward reads; without grad it stores the output only. The script times,
per call, for activations of CifarResNet's three stage shapes (batch 32): the compiled ReLU with grad and
without, with Inductor's vectorized code (the default) and scalar code (``cpp.simdlen = 1``); a compiled
function that returns the mask alone (``(x + 1) <= 0``, no grad) and the same comparison eagerly; and
the eager ReLU with grad (``torch.relu`` saves its output, not a mask). Median over ``--repeats`` rounds
of ``--calls`` calls, one thread.

    python examples/benchmarks/bench_inductor_masks.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor_config

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


if __name__ == "__main__":
    main()
