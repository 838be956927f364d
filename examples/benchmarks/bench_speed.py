"""Training-step time with stochastic depth: batch drop (skips compute) vs per-sample drop vs no SD.

For each model and budget b (uniform rates), one training step = resample masks, forward, backward,
SGD step. The "ideal" ratio is ``(stem_head + f * blocks) / full`` where ``stem_head`` is the step time
with every block dropped (p = 0), ``blocks = full - stem_head`` and ``f`` the fraction of blocks that
ran in the timed steps (a binomial draw around the budget b; the table shows the ideal at b too). Every step time is the
median over ``--repeats`` repeats of the mean over ``--steps`` steps; configurations are interleaved
within each repeat (in alternating order), and every ratio is the median over repeats of the ratio to
the no-SD time of the same repeat, so that drift of a shared machine cancels.

On CUDA, steps are timed with the host clock after ``torch.cuda.synchronize()`` (before and after
the timed steps, not between them: the host's launch work overlaps the device's, as in training), and
``--dtype bfloat16`` runs forward and loss under ``torch.autocast`` (bf16 mixed precision, fp32
parameters and optimizer), what Lightning's ``precision="bf16-mixed"`` does.

    python examples/benchmarks/bench_speed.py                    # CifarResNet-110 and resnet50 (64 x 64)
    python examples/benchmarks/bench_speed.py --models cifar110 --batch-size 32 --steps 3
    python examples/benchmarks/bench_speed.py --device cuda --dtype bfloat16 --models resnet50 cifar110 vit_small --image-size 224
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn

from lightning_sd.core.gates import StochasticDepthHandle, inject_stochastic_depth
from lightning_sd.models import CifarResNet

BUDGETS = (0.25, 0.5, 0.75, 1.0)


DEVICE = torch.device("cpu")
DTYPE = torch.float32


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, image_size: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
    """The model, its input shape (without batch) and its number of classes.

    ``image_size`` applies to resnet50 (default 64) and vit_small (default 224); CifarResNets take 32 x 32.
    """
    if name.startswith("cifar"):
        return CifarResNet(int(name[5:]), num_classes=10), (3, 32, 32), 10
    if name == "resnet50":
        size = image_size or 64
        return torchvision.models.resnet50(num_classes=100), (3, size, size), 100
    if name == "vit_small":
        import timm

        size = image_size or 224
        return timm.create_model("vit_small_patch16_224", img_size=size, num_classes=100), (3, size, size), 100
    raise ValueError(f"unknown model {name!r}; choose cifar<depth>, resnet50 or vit_small")


def time_steps(
    model: nn.Module, handle: StochasticDepthHandle | None, x: torch.Tensor, y: torch.Tensor, steps: int, step0: int
) -> tuple[float, float]:
    """Mean seconds per training step, and the fraction of blocks executed in the timed steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    executed = 0.0

    def one(step: int) -> float:
        kept = 1.0
        if handle is not None:
            kept = float(handle.resample(step, batch_size=x.shape[0], device=x.device).float().mean()) if handle.drop == "batch" else 1.0
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return kept

    one(step0)  # warm-up
    sync()
    start = time.perf_counter()
    for s in range(steps):
        executed += one(step0 + 1 + s)
    sync()
    return (time.perf_counter() - start) / steps, executed / steps


def bench(name: str, batch_size: int, steps: int, repeats: int, image_size: int = 0) -> list[dict]:
    torch.manual_seed(0)
    base, shape, classes = build(name, image_size)
    base = base.to(DEVICE)
    x = torch.randn(batch_size, *shape, device=DEVICE)
    y = torch.randint(0, classes, (batch_size,), device=DEVICE)
    plain = copy.deepcopy(base)
    batch_model = copy.deepcopy(base)
    batch_handle = inject_stochastic_depth(batch_model, 1.0, drop="batch", scaling="expected", auto_resample=False)
    sample_model = copy.deepcopy(base)
    sample_handle = inject_stochastic_depth(sample_model, 1.0, drop="sample", auto_resample=False)
    L = batch_handle.num_blocks
    configs: list[tuple[str, float | None]] = [("none", None), ("stem_head", 0.0)]
    configs += [("batch", b) for b in BUDGETS] + [("sample", b) for b in BUDGETS]
    times: dict[tuple[str, float | None], list[float]] = {c: [] for c in configs}
    executed: dict[tuple[str, float | None], list[float]] = {c: [] for c in configs}
    for r in range(repeats):
        # Alternate the order of the configurations between repeats so that drift of a shared machine
        # does not favour the ones measured first.
        for kind, b in configs if r % 2 == 0 else configs[::-1]:
            if kind == "none":
                t, f = time_steps(plain, None, x, y, steps, 0)
            elif kind in ("batch", "stem_head"):
                batch_handle.set_survival([b] * L)
                t, f = time_steps(batch_model, batch_handle, x, y, steps, 1000 * r)
            else:
                sample_handle.set_survival([b] * L)
                t, f = time_steps(sample_model, sample_handle, x, y, steps, 1000 * r)
            times[(kind, b)].append(t)
            executed[(kind, b)].append(f)
    med = {c: statistics.median(v) for c, v in times.items()}
    full, stem_head = med[("none", None)], med[("stem_head", 0.0)]
    # Ratios are medians over repeats of (config / no SD) within the same repeat: a slow drift of a
    # shared machine cancels in each pair.
    none = times[("none", None)]
    paired = {c: statistics.median(t / n for t, n in zip(v, none)) for c, v in times.items()}
    rows = [dict(model=name, config="no SD", budget=1.0, executed=1.0, ms=1000 * full, ratio=1.0, ideal=1.0, ideal_b=1.0)]
    rows.append(
        dict(model=name, config="all dropped (stem+head)", budget=0.0, executed=0.0, ms=1000 * stem_head,
             ratio=paired[("stem_head", 0.0)], ideal=paired[("stem_head", 0.0)], ideal_b=paired[("stem_head", 0.0)])
    )
    for kind in ("batch", "sample"):
        for b in BUDGETS:
            t = med[(kind, b)]
            f = statistics.mean(executed[(kind, b)]) if kind == "batch" else 1.0
            # Ideal: stem and head at full cost, blocks in proportion to what ran (f, the executed fraction
            # of the timed steps, a binomial draw around the budget) or to the budget itself (ideal_b).
            head = paired[("stem_head", 0.0)]
            ideal = head + f * (1.0 - head) if kind == "batch" else 1.0
            ideal_b = head + b * (1.0 - head) if kind == "batch" else 1.0
            rows.append(
                dict(model=name, config=f"{kind} drop", budget=b, executed=f, ms=1000 * t,
                     ratio=paired[(kind, b)], ideal=ideal, ideal_b=ideal_b)
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar110", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast (mixed precision)")
    parser.add_argument("--image-size", type=int, default=0, help="input size of resnet50 and vit_small (0: 64 and 224)")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {args.threads} threads"
    size = f", resnet50/vit_small at {args.image_size} x {args.image_size}" if args.image_size else ""
    print(f"torch {torch.__version__}, {where}, {args.dtype}{size}, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats (median)")
    print("| model | config | budget | executed | step ms | ratio to no SD | ideal (executed) | ratio / ideal | ideal (budget) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for r in bench(name, args.batch_size, args.steps, args.repeats, args.image_size):
            print(
                f"| {r['model']} | {r['config']} | {r['budget']:.2f} | {r['executed']:.3f} | {r['ms']:.1f} | "
                f"{r['ratio']:.3f} | {r['ideal']:.3f} | {r['ratio'] / r['ideal']:.3f} | {r['ideal_b']:.3f} |"
            )


if __name__ == "__main__":
    main()
