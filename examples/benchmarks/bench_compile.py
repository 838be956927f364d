"""Stochastic depth eager vs ``torch.compile`` (whole model): step time, compile time, graphs.

Configurations per model: no SD; batch drop at budgets 0.25, 0.5, 0.75, 1.0 (uniform rates,
inverted scaling; dropped blocks skipped); sample drop and subset drop at budget 0.5; and, for timm
models, timm's own ``DropPath`` with drop probability 0.5 in every block (the same expected depth).
One training step = resample, forward, backward, SGD step. The model is compiled whole with
``torch.compile(model, backend=...)`` (default inductor) after ``torch._dynamo.reset()``; graphs are
counted by Dynamo's ``CompileCounterWithBackend``.

Columns: eager and compiled step time (median over ``--repeats`` of the mean over ``--steps`` steps,
after the warm-up), compiled time / compiled no-SD time, the ideal ratio
``(T_0 + f (T_plain - T_0)) / T_plain`` (``T_0``: compiled step with every block dropped, ``f``: the
fraction of branch compute that ran: the kept fraction for batch drop, the subset fraction for subset
drop, 1 otherwise), the compile time (the warm-up steps' time minus as many steady steps), the number
of graphs, and the peak memory (CUDA only: ``torch.cuda.max_memory_allocated``; "-" on CPU).

    python examples/benchmarks/bench_compile.py                       # CifarResNet-56 and vit_tiny, CPU
    python examples/benchmarks/bench_compile.py --models vit_tiny --steps 3 --repeats 3
    python examples/benchmarks/bench_compile.py --device cuda --dtype bfloat16 --models resnet50 cifar110 vit_small
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_sd.core.gates import StochasticDepthHandle, inject_stochastic_depth
from lightning_sd.models import CifarResNet

BUDGETS = (0.25, 0.5, 0.75, 1.0)


def build(name: str, drop_path: float = 0.0) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and its input shape (without batch)."""
    import timm
    import torchvision

    if name.startswith("cifar"):
        return CifarResNet(int(name[5:]), num_classes=10), (3, 32, 32)
    if name == "resnet50":
        return torchvision.models.resnet50(num_classes=100), (3, 224, 224)
    if name in ("vit_tiny", "vit_small"):
        model = timm.create_model(f"{name}_patch16_224", img_size=64, num_classes=10, drop_path_rate=drop_path)
        if drop_path:
            for module in model.modules():
                if type(module).__name__ == "DropPath":
                    module.drop_prob = drop_path  # the same rate in every block (not timm's linear ramp)
        return model, (3, 64, 64)
    raise ValueError(f"unknown model {name!r}; choose cifar<depth>, resnet50, vit_tiny or vit_small")


class Run:
    """One configuration: a model, its handle (or None), and how a step draws masks."""

    def __init__(self, model: nn.Module, handle: StochasticDepthHandle | None, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.handle, self.x, self.y = model, handle, x, y
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.step_index = 0
        self.fractions: list[float] = []

    def step(self) -> None:
        h = self.handle
        if h is not None:
            h.resample(self.step_index, batch_size=self.x.shape[0], device=self.x.device)
        self.step_index += 1
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            loss = nn.functional.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()
        if h is not None:
            self.fractions.append(h.realized_depth() / h.num_blocks)

    def timed(self, steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return (time.perf_counter() - start) / steps


DTYPE = torch.float32
DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def configurations(name: str, timm_model: bool) -> list[tuple[str, dict[str, Any] | None, float]]:
    """(label, inject kwargs or None, DropPath rate)."""
    out: list[tuple[str, dict[str, Any] | None, float]] = [("no SD", None, 0.0)]
    out += [(f"batch {b}", {"survival": b, "drop": "batch"}, 0.0) for b in BUDGETS]
    out += [("sample 0.5", {"survival": 0.5, "drop": "sample"}, 0.0), ("subset 0.5", {"survival": 0.5, "drop": "subset"}, 0.0)]
    if timm_model:
        out.append(("timm DropPath 0.5", None, 0.5))
    out.append(("all dropped (T_0)", {"survival": 0.0, "drop": "batch", "scaling": "expected"}, 0.0))
    return out


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    timm_model = name.startswith("vit")
    shape = build(name)[1]
    x = torch.randn(args.batch_size, *shape, device=DEVICE)
    y = torch.randint(0, 10, (args.batch_size,), device=DEVICE)
    rows = []
    for label, inject, drop_path in configurations(name, timm_model):
        torch.manual_seed(0)
        model, _ = build(name, drop_path)
        model = model.to(DEVICE).train()
        handle = None
        if inject is not None:
            kwargs = dict(inject)
            handle = inject_stochastic_depth(model, kwargs.pop("survival"), auto_resample=False, seed=0, **kwargs)
        eager = Run(model, handle, x, y)
        eager.step()
        eager_times = [eager.timed(args.steps) for _ in range(args.repeats)]
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(args.backend)
        compiled = Run(model, handle, x, y)
        compiled.forward = torch.compile(model, backend=counter)
        warm = compiled.timed(args.warmup) * args.warmup
        times = [compiled.timed(args.steps) for _ in range(args.repeats)]
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            compiled.timed(1)
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
        else:
            peak = "-"
        step = statistics.median(times)
        kept = statistics.mean(compiled.fractions[args.warmup:]) if compiled.fractions else 1.0
        if inject is not None and inject["drop"] == "sample":
            kept = 1.0  # every branch computed
        rows.append(
            {
                "model": name,
                "config": label,
                "eager": statistics.median(eager_times),
                "compiled": step,
                "compile_s": max(warm - args.warmup * step, 0.0),
                "graphs": counter.frame_count,
                "fraction": kept,
                "peak": peak,
            }
        )
        print(f"  {name} {label}: eager {rows[-1]['eager'] * 1e3:.1f} ms, compiled {step * 1e3:.1f} ms, "
              f"compile {rows[-1]['compile_s']:.1f} s, graphs {counter.frame_count}", flush=True)
    return rows


def main() -> None:
    global DTYPE, DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar56", "vit_tiny"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="compiled steps before timing (compilation happens here)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    DTYPE = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}, {args.dtype}, batch {args.batch_size}, backend {args.backend}, torch {torch.__version__}")
    print("| model | config | eager (ms) | compiled (ms) | / compiled no SD | ideal | compile (s) | graphs | peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        mine = [r for r in rows if r["model"] == name]
        plain = next(r for r in mine if r["config"] == "no SD")["compiled"]
        t0 = next(r for r in mine if r["config"].startswith("all dropped"))["compiled"]
        for r in mine:
            ideal = (t0 + r["fraction"] * (plain - t0)) / plain
            print(f"| {name} | {r['config']} | {r['eager'] * 1e3:.1f} | {r['compiled'] * 1e3:.1f} | {r['compiled'] / plain:.3f} | "
                  f"{ideal:.3f} | {r['compile_s']:.1f} | {r['graphs']} | {r['peak']} |")


if __name__ == "__main__":
    main()
