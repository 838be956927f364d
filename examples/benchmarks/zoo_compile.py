"""Zoo models under ``torch.compile`` (Inductor by default) with stochastic depth: compiled vs eager.

Usage (from the repository root)::

    PYTHONPATH=$PWD python examples/benchmarks/zoo_compile.py                     # 32 models, batch drop
    PYTHONPATH=$PWD python examples/benchmarks/zoo_compile.py --models tv:swin_t timm:mixer_s16_224 \
        --drops batch sample subset
    PYTHONPATH=$PWD python examples/benchmarks/zoo_compile.py --dynamic   # torch.compile(..., dynamic=True)

For each model (timm or torchvision, random weights, 10 classes, every ``nn.Dropout`` and the zoo's own
drop-path modules at p = 0, so that the plain model is deterministic and the only randomness is the masks):

Weights and scales initialized to zero (timm ResNets' last BatchNorm of each block, MLP-Mixer's head)
are given values (normal with std 0.02, or 1 for 1-D scales): at zero they stop the gradients of
everything before them, and the comparison would be empty.

* **plain**: the model compiled whole (``torch.compile(model, backend=...)``) against an eager copy, for
  ``--steps`` training steps on one random batch (loss: sum of squared outputs). The worst relative
  difference of the outputs and of the parameter gradients, ``max |compiled - eager| / max |eager|``
  per tensor, maximum over tensors and steps: what compilation changes in the model without SD.
  Gradients whose largest entry is below 1e-6 of the model's largest gradient entry are left out: they
  vanish analytically (a bias before a normalization), and their relative difference is rounding noise.
* **SD** (each ``--drops`` kind): ``inject_stochastic_depth(model, 0.5)`` in both copies with the same
  seed, so both run the same masks (``resample`` before each step); the same differences, the number
  of compiled graphs after the first and after the last step, and the gates that decide outside the
  graph (``break``: route ``"graph_break"``, chosen or forced by ``dynamic=True``).
  ``crash``: the first line of the exception a compiled step raised.

``--dynamic`` compiles both with ``torch.compile(..., dynamic=True)`` (symbolic sizes from the first
step; Dynamo then traces float attributes as tensors, and every batch-drop gate decides outside the
graph: see ``docs/compile.md``).

In float64 (the default, ``--dtype``), compiled and eager differ by rounding only, around 1e-13; in
float32 a few activations near a ReLU's kink come out on the other side, and single gradients differ
by percents in the plain model already (timm ResNet-18: 3.9e-2 on one weight).

The verdict ``as plain`` means the SD run's worst gradient difference is at most 10 times the plain
model's, or below 1e-9 (float64; 1e-4 in float32), and its output difference likewise, and no graph was added after the first step.
Compiled numerics differ from eager by themselves (BatchNorm on 2 x 2 maps, reductions reordered): the
plain column is the reference, not zero.
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_sd import inject_stochastic_depth

#: (source:architecture, input size): the residual families of both zoos, at small inputs where they allow it
DEFAULT_MODELS = [
    "timm:resnet18 64",
    "timm:resnet50 64",
    "timm:convnext_atto 64",
    "timm:vit_tiny_patch16_224 224",
    "timm:efficientnet_b0 64",
    "timm:regnety_002 64",
    "timm:mobilenetv3_small_050 64",
    "timm:mixer_s16_224 224",
    "timm:levit_128s 224",
    "timm:swin_tiny_patch4_window7_224 224",
    "timm:poolformer_s12 64",
    "timm:poolformerv2_s12 64",
    "timm:caformer_s18 64",
    "timm:edgenext_xx_small 64",
    "timm:efficientformer_l1 224",
    "timm:efficientformerv2_s0 224",
    "timm:inception_next_atto 64",
    "timm:nextvit_small 64",
    "timm:mambaout_femto 64",
    "timm:starnet_s050 64",
    "timm:fastvit_t8 64",
    "timm:repvit_m0_9 64",
    "timm:efficientvit_b0 64",
    "timm:tiny_vit_5m_224 224",
    "timm:gcvit_xxtiny 224",
    "tv:resnet18 64",
    "tv:convnext_tiny 64",
    "tv:swin_t 64",
    "tv:efficientnet_b0 64",
    "tv:mobilenet_v3_small 64",
    "tv:regnet_y_400mf 64",
    "tv:vit_b_16 224",
]


def build(name: str) -> nn.Module:
    """A training-mode model from ``timm:<arch>`` or ``tv:<arch>``, its dropouts at p = 0."""
    source, arch = name.split(":")
    if source == "timm":
        import timm

        model = timm.create_model(arch, num_classes=10, pretrained=False)
    elif source == "tv":
        import torchvision

        model = torchvision.models.get_model(arch, num_classes=10)
    else:
        raise ValueError(f"unknown source in {name!r}: use timm:<arch> or tv:<arch>")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif type(module).__name__ == "DropPath":  # timm's own stochastic depth (swin: 0.1 by default)
            module.drop_prob = 0.0
        elif type(module).__name__ == "StochasticDepth":  # torchvision's (Swin, ConvNeXt, EfficientNet)
            module.p = 0.0
    with torch.no_grad():
        for name_, parameter in model.named_parameters():
            # Zero-initialized scales (timm's last BatchNorm of a block, MLP-Mixer's head) stop the
            # gradients of everything before them: nothing to compare there. Give them values.
            if name_.rsplit(".", 1)[-1] in ("weight", "gamma") and not parameter.any():
                parameter.normal_(0.0, 0.02) if parameter.ndim > 1 else parameter.fill_(1.0)
    return model.train()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def compare(
    model: nn.Module,
    reference: nn.Module,
    x: torch.Tensor,
    steps: int,
    backend: str,
    before_step: Callable[[int], None],
    dynamic: bool | None = None,
) -> dict[str, Any]:
    """Compile ``model``, run it and the eager ``reference`` for ``steps`` steps; worst differences and graph counts."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, dynamic=dynamic)
    out_diff = grad_diff = 0.0
    graphs = []
    for step in range(steps):
        before_step(step)
        out = compiled(x)
        out.square().sum().backward()
        want = reference(x)
        want.square().sum().backward()
        out_diff = max(out_diff, _relative(out.detach(), want.detach()))
        pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if q.grad is not None]
        largest = max((float(want.abs().max()) for _, want in pairs), default=0.0)
        for got, want in pairs:
            # Gradients that vanish analytically (a bias before a normalization) are rounding noise: left out
            if float(want.abs().max()) > 1e-6 * largest:
                grad_diff = max(grad_diff, _relative(got, want))
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        graphs.append(counter.frame_count)
    return {"out": out_diff, "grad": grad_diff, "graphs": graphs}


def _breaks(handle: Any, dynamic: bool | None = None) -> int:
    """Gates that decide outside the compiled graph under batch drop (see lightning_sd.core.compilation).

    ``dynamic=True``: as they decide under ``torch.compile(..., dynamic=True)``, which patches Dynamo's
    ``assume_static_by_default`` to False while it traces.
    """
    from lightning_sd.core.compilation import _decides_outside_graph
    from lightning_sd.core.gates import ResidualGate

    with torch._dynamo.config.patch(assume_static_by_default=not dynamic):
        return sum(_decides_outside_graph(g) for g in handle.gates if isinstance(g, ResidualGate))


def run_model(
    spec: str, drops: list[str], steps: int, backend: str, batch: int, dtype: torch.dtype, dynamic: bool | None = None
) -> list[dict[str, Any]]:
    name, size = spec.split()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, int(size), int(size), dtype=dtype)
    rows = []
    try:
        model = build(name).to(dtype)
        plain = compare(model, copy.deepcopy(model), x, steps, backend, lambda step: None, dynamic)
    except Exception as err:  # noqa: BLE001 - a table of what fails is the point
        return [{"model": name, "size": size, "drop": "-", "crash": f"plain: {type(err).__name__}: {_first_line(err)}"}]
    for drop in drops:
        row: dict[str, Any] = {"model": name, "size": size, "drop": drop, "plain": plain, "dtype": dtype}
        try:
            torch.manual_seed(0)
            model = build(name).to(dtype)
            reference = copy.deepcopy(model)
            handle = inject_stochastic_depth(model, 0.5, drop=drop, auto_resample=False, seed=5)
            ref_handle = inject_stochastic_depth(reference, 0.5, drop=drop, auto_resample=False, seed=5)
            row["gates"] = handle.num_blocks

            def before_step(step: int, handles: tuple[Any, Any] = (handle, ref_handle)) -> None:
                for h in handles:  # the same masks in both copies
                    h.resample(step, batch_size=batch)

            row["sd"] = compare(model, reference, x, steps, backend, before_step, dynamic)
            row["breaks"] = _breaks(handle, dynamic) if drop == "batch" else 0
        except Exception as err:  # noqa: BLE001
            row["crash"] = f"{type(err).__name__}: {_first_line(err)}"
        rows.append(row)
    return rows


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:160]


def verdict(row: dict[str, Any]) -> str:
    if "crash" in row:
        return "crash: " + row["crash"]
    plain, sd = row["plain"], row["sd"]
    floor = 1e-9 if row["dtype"] == torch.float64 else 1e-4
    close = all(sd[k] <= max(10 * plain[k], floor) for k in ("out", "grad"))
    stable = sd["graphs"][-1] == sd["graphs"][0]
    return "as plain" if close and stable else ("differs" if not close else "new graphs after step 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help='"source:arch" (input size from the default list, else --size)')
    parser.add_argument("--size", type=int, default=64, help="input size of models not in the default list")
    parser.add_argument("--drops", nargs="+", default=["batch"], choices=["batch", "sample", "subset"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="float64: rounding differences stay far below what a wrong gate changes")
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(..., dynamic=True): symbolic sizes from the first step")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="drop='subset'")  # BatchNorm on subsets: expected here, said once per model
    sizes = dict(spec.split() for spec in DEFAULT_MODELS)
    specs = DEFAULT_MODELS if args.models is None else [f"{m} {sizes.get(m, args.size)}" for m in args.models]
    print(
        f"torch {torch.__version__}, backend {args.backend}, {platform.machine()} CPU, {args.dtype}, batch {args.batch_size}, "
        f"{args.steps} steps, budget 0.5" + (", dynamic=True" if args.dynamic else "")
    )
    print("| model | input | drop | gates | breaks | plain: out / grad | SD: out / grad | graphs (step 1, last) | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        rows = run_model(spec, args.drops, args.steps, args.backend, args.batch_size, getattr(torch, args.dtype), args.dynamic or None)
        for row in rows:
            if "plain" not in row:
                print(f"| {row['model']} | {row['size']} | - | - | - | - | - | - | {verdict(row)} |", flush=True)
                continue
            plain = f"{row['plain']['out']:.1e} / {row['plain']['grad']:.1e}"
            sd = row.get("sd")
            sd_text = f"{sd['out']:.1e} / {sd['grad']:.1e}" if sd else "-"
            graphs = f"{sd['graphs'][0]}, {sd['graphs'][-1]}" if sd else "-"
            print(
                f"| {row['model']} | {row['size']} | {row['drop']} | {row.get('gates', '-')} | {row.get('breaks', '-')} "
                f"| {plain} | {sd_text} | {graphs} | {verdict(row)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
