"""Stochastic depth eager vs ``torch.compile`` (whole model): step time, compile time, graphs.

Configurations per model: no SD; batch drop at budgets 0.25, 0.5, 0.75, 1.0 (uniform rates,
inverted scaling; dropped blocks skipped; ``compile_route="cond"``); batch drop at 0.5 with
``compile_route="graph_break"``; sample drop and subset drop at budget 0.5; batch drop at
0.5, 0.75 and 1.0 with the model eager and each branch compiled as a region (``handle.compile``, "regional"
rows: the eager column is the same model without regions); batch drop at 0.5 and 0.75 with the model
compiled whole, route ``"graph_break"`` and each branch a compiled region ("graph_break + regional": no
``torch.cond``, whose backward recomputes the kept branches' forward); for timm
models, timm's own ``DropPath`` with drop probability 0.5 in every block (the same expected depth); and
the plain model on half the batch ("no SD, half batch": what subset drop at 0.5 runs its branches on;
its ideal column assumes a step cost linear in the batch).
One training step = resample, forward, backward, SGD step. The model is compiled whole with
``torch.compile(model, backend=...)`` (default inductor) after ``torch._dynamo.reset()``; graphs are
counted by Dynamo's ``CompileCounterWithBackend``.

Every configuration is compiled first (its warm-up steps), then timed: in each of ``--repeats``
repeats every configuration runs ``--steps`` eager and ``--steps`` compiled steps, in alternating
order, so that drift of a shared machine affects all alike. Columns: eager and compiled step time
(median over repeats of the mean over steps), compiled time / compiled no-SD time (median over
repeats of the ratio within a repeat), the ideal ratio
``(T_0 + f (T_plain - T_0)) / T_plain`` (``T_0``: compiled step with every block dropped, ``f``: the
fraction of branch compute that ran: the kept fraction for batch drop, the subset fraction for subset
drop, 1 otherwise), the compile time (the warm-up steps' time minus as many steady steps), the number
of graphs, the number of distinct kernels Inductor generated for the configuration (C++ sources on CPU,
Triton sources on CUDA, counted in its fresh cache directory: identical sources compile once, so this is
what the compile time grows with; "-" with ``--cache``), and the peak memory (median over ``--steps`` steps) of a compiled step above what was allocated before it (gradients set
to None first): activations, gradients and temporaries, not the parameters. On CUDA from the caching
allocator's statistics (``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step);
on CPU from the profiler's memory events (``profile_memory=True``: the running total of the CPU
allocator's allocations during the step; scratch memory that oneDNN allocates on its own is not in it).

Compile times are from a cold kernel cache for every configuration, as a user's first compile is:
each configuration's warm-up runs in ``torch._inductor.utils.fresh_cache()`` (an empty on-disk cache
and cleared in-memory caches), after a small compile at start-up has paid what a process pays once
(imports, compiler detection). Without this, a configuration reuses the kernels that an earlier one
generated (batch 1.0 compiles the plain model's graph again, and took a quarter of its time), and the
first configuration alone pays the start-up. ``--cache`` keeps all caches instead.

    python examples/benchmarks/bench_compile.py                       # CifarResNet-56 and vit_tiny, CPU
    python examples/benchmarks/bench_compile.py --models vit_tiny --configs "batch 0.5" "subset 0.5"
    python examples/benchmarks/bench_compile.py --device cuda --dtype bfloat16 --models resnet50 cifar110 vit_small
    python examples/benchmarks/bench_compile.py --models resnet50 --image-size 64 --batch-size 16   # ResNet-50 on a CPU
    python examples/benchmarks/bench_compile.py --models cifar56 --configs "batch 0.5" --phases     # where compile time goes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import compilation_time_metrics
from torch._inductor.utils import fresh_cache
from torch.profiler import ProfilerActivity, profile

from lightning_sd.core.gates import StochasticDepthHandle, existing_handle, inject_stochastic_depth
from lightning_sd.models import CifarResNet

BUDGETS = (0.25, 0.5, 0.75, 1.0)


def build(name: str, drop_path: float = 0.0, image_size: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and its input shape (without batch); ``image_size`` 0: each model's default (32, 224, 64)."""
    import timm
    import torchvision

    if name.startswith("cifar"):
        return CifarResNet(int(name[5:]), num_classes=10), (3, image_size or 32, image_size or 32)
    if name == "resnet50":
        return torchvision.models.resnet50(num_classes=100), (3, image_size or 224, image_size or 224)
    if name in ("vit_tiny", "vit_small"):
        size = image_size or 64
        model = timm.create_model(f"{name}_patch16_224", img_size=size, num_classes=10, drop_path_rate=drop_path)
        if drop_path:
            for module in model.modules():
                if type(module).__name__ == "DropPath":
                    module.drop_prob = drop_path  # the same rate in every block (not timm's linear ramp)
        return model, (3, size, size)
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


#: Compile phases printed with ``--phases``: the time Dynamo's ``dynamo_timed`` records under each key, summed
#: over the configuration's compiles (forward and backward).
PHASES = {
    "Dynamo tracing": "bytecode_tracing",
    "AOT joint graph": "aot_trace_joint_graph",
    "Inductor lowering": "GraphLowering.run",
    "Inductor code generation": "GraphLowering.codegen",
    "kernel compilation": "compile_file",
}


def count_kernels(cache_dir: str | None) -> int | None:
    """Distinct kernels Inductor generated into a fresh cache directory (None without one: ``--cache``).

    C++ kernels on CPU (one ``.cpp`` source each), Triton kernels on CUDA (one ``.py`` source each, told
    from the wrapper code by their ``@triton.jit`` and the wrapper's ``async_compile``). A kernel whose
    source another configuration, or another block, already generated is one file: identical sources share
    one compilation. The CPU count was checked against the cache's contents; the CUDA rule has not run on
    a GPU yet.
    """
    if cache_dir is None:
        return None
    count = 0
    for root, _, files in os.walk(cache_dir):
        for file in files:
            path = os.path.join(root, file)
            if file.endswith(".cpp"):
                count += 1
            elif file.endswith(".py"):
                with open(path, encoding="utf-8", errors="replace") as source:
                    text = source.read()
                count += "@triton.jit" in text and "async_compile" not in text
    return count


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def step_peak_mib(run: Run) -> float:
    """Peak memory of one step of ``run`` above what was allocated before it, in MiB (see the module docstring)."""
    run.opt.zero_grad(set_to_none=True)  # the step's own zero_grad frees nothing: the same baseline on both devices
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run.timed(1)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not events:
        return 0.0
    # "Total Allocated" counts what the CPU allocator handed out while a profiler records memory, across
    # profiling sessions: the step's baseline is the total before its first event
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - start) / 2**20


def configurations(name: str, timm_model: bool) -> list[tuple[str, dict[str, Any] | None, float]]:
    """(label, inject kwargs or None, DropPath rate)."""
    out: list[tuple[str, dict[str, Any] | None, float]] = [("no SD", None, 0.0)]
    out += [(f"batch {b}", {"survival": b, "drop": "batch"}, 0.0) for b in BUDGETS]
    out += [("sample 0.5", {"survival": 0.5, "drop": "sample"}, 0.0), ("subset 0.5", {"survival": 0.5, "drop": "subset"}, 0.0)]
    # Route 1 with the decision between compiled pieces instead of torch.cond
    out += [("batch 0.5, graph_break", {"survival": 0.5, "drop": "batch", "route": "graph_break"}, 0.0)]
    # Route 2: the model stays eager, each branch compiled as a region (handle.compile)
    out += [(f"batch {b}, regional", {"survival": b, "drop": "batch", "regional": True}, 0.0) for b in (0.5, 0.75, 1.0)]
    # Route 1 without torch.cond's recomputation: the model compiled whole, each gate a graph break, each
    # branch a compiled region (compile_route="graph_break" and handle.compile)
    out += [
        (f"batch {b}, graph_break + regional", {"survival": b, "drop": "batch", "route": "graph_break", "regional": True}, 0.0)
        for b in (0.5, 0.75)
    ]
    if timm_model:
        out.append(("timm DropPath 0.5", None, 0.5))
    # Reference for subset drop, whose branches all run on half the batch: the plain model on half the
    # batch (smaller matrix products run less efficiently per example than the ideal's linear scaling)
    out.append(("no SD, half batch", None, 0.0))
    out.append(("all dropped (T_0)", {"survival": 0.0, "drop": "batch", "scaling": "expected"}, 0.0))
    return out


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    timm_model = name.startswith("vit")
    shape = build(name, image_size=args.image_size)[1]
    x = torch.randn(args.batch_size, *shape, device=DEVICE)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch_size,), device=DEVICE)
    runs: list[tuple[str, dict[str, Any] | None, Run, Run, CompileCounterWithBackend, float, int | None]] = []
    torch._dynamo.reset()
    phases: dict[str, dict[str, float]] = {}
    cold = contextlib.nullcontext if args.cache else functools.partial(fresh_cache, delete=False)
    for label, inject, drop_path in configurations(name, timm_model):
        if args.configs and label not in args.configs and label != "no SD" and not label.startswith("all dropped"):
            continue
        torch.manual_seed(0)
        model, _ = build(name, drop_path, args.image_size)
        model = model.to(DEVICE, memory_format=layout).train()
        handle = None
        regional = False
        if inject is not None:
            kwargs = dict(inject)
            regional = bool(kwargs.pop("regional", False))
            route = kwargs.pop("route", "cond")
            handle = inject_stochastic_depth(model, kwargs.pop("survival"), auto_resample=False, seed=0, **kwargs)
            handle.compile_route = route
        xs, ys = (x[: len(x) // 2], y[: len(y) // 2]) if label.endswith("half batch") else (x, y)
        eager = Run(model, handle, xs, ys)
        eager.step()
        counter = CompileCounterWithBackend(args.backend)  # its own counter: graphs of this configuration
        compiled = Run(model, handle, xs, ys)
        if regional:
            copied = copy.deepcopy(model)  # a copy runs plain branches: the eager column stays eager
            copied_handle = existing_handle(copied)
            assert copied_handle is not None
            copied_handle.compile(backend=counter)  # the model itself stays eager, unless compiled whole too
            compiled = Run(copied, copied_handle, xs, ys)
            if copied_handle.compile_route == "graph_break":
                compiled.forward = torch.compile(copied, backend=counter)
        else:
            compiled.forward = torch.compile(model, backend=counter)
        compilation_time_metrics.clear()  # Dynamo's per-phase compile times, of this configuration only
        with cold():  # compiled from an empty kernel cache (see the module docstring)
            cache_dir = None if args.cache else os.environ["TORCHINDUCTOR_CACHE_DIR"]
            warm = compiled.timed(args.warmup) * args.warmup
        steady = compiled.timed(1)
        kernels = count_kernels(cache_dir)
        if args.phases:
            phases[label] = {phase: sum(compilation_time_metrics.get(key, [])) for phase, key in PHASES.items()}
        print(
            f"  {name} {label}: compiled in {max(warm - args.warmup * steady, 0.0):.1f} s, {counter.frame_count} graphs, "
            f"{kernels} kernels",
            flush=True,
        )
        runs.append((label, inject, eager, compiled, counter, max(warm - args.warmup * steady, 0.0), kernels))
    # Timing: every configuration in each repeat, in alternating order, so that drift of a shared
    # machine affects all of them alike.
    eager_times: dict[str, list[float]] = {r[0]: [] for r in runs}
    compiled_times: dict[str, list[float]] = {r[0]: [] for r in runs}
    ratios: dict[str, list[float]] = {r[0]: [] for r in runs}
    for repeat in range(args.repeats):
        order = runs if repeat % 2 == 0 else list(reversed(runs))
        this: dict[str, float] = {}
        for label, _, eager, compiled, _, _, _ in order:
            eager_times[label].append(eager.timed(args.steps))
            this[label] = compiled.timed(args.steps)
            compiled_times[label].append(this[label])
        for label in this:
            ratios[label].append(this[label] / this["no SD"])
    rows = []
    for label, inject, _, compiled, counter, compile_s, kernels in runs:
        kept = statistics.mean(compiled.fractions[args.warmup + 1 :]) if compiled.fractions else 1.0
        if inject is not None and inject["drop"] == "sample":
            kept = 1.0  # every branch computed
        peak = f"{statistics.median(step_peak_mib(compiled) for _ in range(args.steps)):.1f}"  # masks differ per step
        rows.append(
            {
                "model": name,
                "config": label,
                "eager": statistics.median(eager_times[label]),
                "compiled": statistics.median(compiled_times[label]),
                "ratio": statistics.median(ratios[label]),
                "compile_s": compile_s,
                "graphs": counter.frame_count,
                "kernels": "-" if kernels is None else kernels,
                "fraction": kept,
                "batch_fraction": len(compiled.x) / len(x),  # below 1 for "no SD, half batch"
                "peak": peak,
                "phases": phases.get(label),
            }
        )
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
    parser.add_argument("--configs", nargs="*", default=[], help='only these (e.g. "batch 0.5" "subset 0.5"); "no SD" and T_0 always run')
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", action="store_true", help="allow inductor's on-disk caches (compile times then depend on earlier runs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--image-size", type=int, default=0, help="input height and width (0: 32 for cifar, 224 for resnet50, 64 for ViTs)")
    parser.add_argument("--phases", action="store_true", help="also print where each configuration's compile time went (Dynamo's phase timers)")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format (4-D weights and images)")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    DTYPE = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    # One model copy per configuration: the same code objects are compiled once for each.
    torch._dynamo.config.recompile_limit = 64
    if not args.cache:  # compile times from scratch, not from an earlier run's on-disk caches
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    torch._dynamo.config.accumulated_recompile_limit = 4096
    # What a process pays once (imports, compiler detection), before any configuration is timed.
    start_up = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).to(DEVICE)
    torch.compile(start_up)(torch.randn(2, 4, device=DEVICE)).sum().backward()
    torch._dynamo.reset()
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    layout = ", channels_last" if args.channels_last else ""
    size = f", {args.image_size} x {args.image_size}" if args.image_size else ""
    print(f"\n{where}, {args.dtype}{layout}{size}, batch {args.batch_size}, backend {args.backend}, torch {torch.__version__}")
    print("| model | config | eager (ms) | compiled (ms) | / compiled no SD | ideal | compile (s) | graphs | kernels | peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        mine = [r for r in rows if r["model"] == name]
        plain = next(r for r in mine if r["config"] == "no SD")["compiled"]
        t0 = next(r for r in mine if r["config"].startswith("all dropped"))["compiled"]
        for r in mine:
            # a step linear in the batch for the half batch; else stem and head (T_0) plus the branches that ran
            ideal = r["batch_fraction"] if r["batch_fraction"] < 1 else (t0 + r["fraction"] * (plain - t0)) / plain
            print(f"| {name} | {r['config']} | {r['eager'] * 1e3:.1f} | {r['compiled'] * 1e3:.1f} | {r['ratio']:.3f} | "
                  f"{ideal:.3f} | {r['compile_s']:.1f} | {r['graphs']} | {r['kernels']} | {r['peak']} |")
    if args.phases:
        print("\nCompile time by phase (s; Dynamo's phase timers; phases overlap: kernels are compiled partly "
              "during code generation)")
        print("| model | config | " + " | ".join(PHASES) + " |")
        print("|---|---|" + "---|" * len(PHASES))
        for r in rows:
            print(f"| {r['model']} | {r['config']} | " + " | ".join(f"{r['phases'][phase]:.1f}" for phase in PHASES) + " |")


if __name__ == "__main__":
    main()
