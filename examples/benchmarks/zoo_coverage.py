"""Zoo coverage: does residual discovery put gates exactly where timm and torchvision drop paths?

Usage (from the repository root; ``PYTHONPATH=$PWD`` picks this checkout's ``lightning_sd``)::

    # the whole zoo (every timm model twice, every torchvision model), 2 worker processes
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python examples/benchmarks/zoo_coverage.py --jobs 2
    # a few models or families, results to a file of your choice
    PYTHONPATH=$PWD python examples/benchmarks/zoo_coverage.py --models 'resnet18,convnext_*' --skip-torchvision
    PYTHONPATH=$PWD python examples/benchmarks/zoo_coverage.py --families byobnet,coat --out /tmp/zoo.json

Flags: ``--models`` (comma list of names or globs), ``--families`` (comma list: timm module names such
as ``byobnet``, torchvision module names such as ``resnet``), ``--limit N`` (first N models after
filtering), ``--skip-timm``, ``--skip-torchvision``, ``--out PATH`` (JSON with one record per model;
default ``lightning_logs/zoo/results.json``;
records are also appended to ``PATH`` with suffix ``.jsonl`` as they finish), ``--jobs N`` (worker
processes, default 1), ``--timeout S`` (seconds per model, default 300), ``--resume`` (keep the records of an
interrupted run found in the ``.jsonl`` and run the rest), ``--report PATH`` (print the
table of a saved ``--out`` JSON, or of its ``.jsonl`` while a sweep is still running, and exit).

What is measured, per model (nothing is downloaded: models are built on the meta device):

* timm: built with ``drop_path_rate=0.1`` given to EVERY block (timm's schedules start at rate 0, and a
  block at rate 0 gets ``nn.Identity``/``None`` instead of ``DropPath``; ``_EveryBlockRate`` makes the
  schedule constant), and again with ``drop_path_rate=0``. Models that refuse the argument are recorded
  as ``no drop_path_rate`` and built without it. torchvision: built with its defaults (its
  stochastic-depth models have rates > 0 by default), every model of ``torchvision.models.list_models()``:
  classifiers, detection, segmentation, video, optical flow and quantization (float, ``quantize=False``),
  with ``weights=None`` (and ``weights_backbone=None``).
* The oracle is the library itself: one training-mode forward pass (meta input of the model's
  default input size from its ``pretrained_cfg``, batch 2; torchvision video models a 16-frame clip,
  detectors their backbone alone, as their training forward wants targets, RAFT two images) with
  forward hooks records which drop-path modules are actually CALLED, and how often: timm ``DropPath``, torchvision ``StochasticDepth`` (and
  the ``nn.Identity`` torchvision's MaxViT puts in its first block's ``stochastic_depth`` slot); for
  torchvision models without stochastic depth, the residual blocks torchvision defines (ResNet
  BasicBlock/Bottleneck, RegNet ResBottleneckBlock, MobileNetV2/V3 InvertedResidual and MNASNet
  _InvertedResidual when their ``use_res_connect``/``apply_residual`` is set, ViT EncoderBlock: two;
  video ResNet BasicBlock/Bottleneck, RAFT ResidualBlock/BottleneckBlock; the quantizable subclasses).
  Slots a timm model keeps at rate 0 whatever ``drop_path_rate`` is (CaiT's class-attention blocks)
  are not drop paths: a gate there counts as extra. They are listed in ``zero_rate_slots``.
* A slot whose output does not flow into an add with the block's input (checked with a shallow
  ``torch.fx`` trace of the slot's parent, climbing to the grandparent when the slot's output is the
  parent's output), or that is applied to the block's input itself (ResNeSt drops the input that then
  feeds the downsample shortcut), is "not residual (timm quirk)": no gate is expected there, none must
  be put there. A block whose slot drops its input (ResNeSt) is a residual block all the same: one gate
  on the block is expected, as for torchvision's blocks.
  A parent whose forward cannot be traced counts the slot as residual.
* ``lightning_sd.find_residual_branches(model)``: a gate covers a slot when the slot is the gate's
  ``slot`` or one of its ``modules`` (for torchvision's blocks: the gate's ``block`` is the block).
  Exact = every residual slot covered by as many gates as it was called, and every gate covering
  exactly one slot. Misses = residual slots in no gate; extra = gates covering no residual slot; merged = gates
  covering several slots; split = slots covered by several gates. Warnings emitted by discovery are
  recorded, and its wall time.
* ``same@0``: whether the branch names at ``drop_path_rate=0`` equal those at 0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import multiprocessing as mp
import operator
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}

# torchvision residual blocks that carry no StochasticDepth: (module, class) -> residual count, or the
# name of the boolean attribute that says whether the block adds its input.
_TV_RESIDUAL_BLOCKS: dict[tuple[str, str], int | str] = {
    ("torchvision.models.resnet", "BasicBlock"): 1,
    ("torchvision.models.resnet", "Bottleneck"): 1,
    ("torchvision.models.regnet", "ResBottleneckBlock"): 1,
    ("torchvision.models.mobilenetv2", "InvertedResidual"): "use_res_connect",
    ("torchvision.models.mobilenetv3", "InvertedResidual"): "use_res_connect",
    ("torchvision.models.mnasnet", "_InvertedResidual"): "apply_residual",
    ("torchvision.models.vision_transformer", "EncoderBlock"): 2,
    ("torchvision.models.video.resnet", "BasicBlock"): 1,
    ("torchvision.models.video.resnet", "Bottleneck"): 1,
    ("torchvision.models.optical_flow.raft", "ResidualBlock"): 1,
    ("torchvision.models.optical_flow.raft", "BottleneckBlock"): 1,
}


def _tv_block_spec(m: nn.Module) -> int | str | None:
    """The residual spec of ``m``'s class or of a class it derives from (the quantizable blocks)."""
    for cls in type(m).__mro__:
        spec = _TV_RESIDUAL_BLOCKS.get((cls.__module__, cls.__qualname__))
        if spec is not None:
            return spec
    return None


# Attribute names under which the libraries keep a drop-path slot (an ``nn.Identity`` where the rate is 0).
_SLOT_ATTR = re.compile(r"drop_path|stochastic_d(epth|ropout)")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise ``_Timeout`` in the main thread after ``seconds`` (SIGALRM; no-op where unavailable)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise _Timeout(f"timeout after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _empty_init():
    """Build on the CPU but move every parameter and buffer to the meta device as it is registered.

    The fallback for builders that compute with tensors and read values back (``.item()``,
    ``.tolist()``; torchvision's RegNet) and so cannot run under ``torch.device("meta")``. Same idea
    as ``accelerate.init_empty_weights``.
    """
    reg_param, reg_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_param(self, name, param)
        if type(param) is nn.Parameter:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def register_buffer(self, name, tensor, persistent=True):
        reg_buffer(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_param, reg_buffer


def _build(fn, *args, **kwargs) -> tuple[nn.Module, str]:
    """``fn(*args, **kwargs)`` on the meta device, else with :func:`_empty_init` when the builder needs values."""
    try:
        with torch.device("meta"):
            return fn(*args, **kwargs), "meta"
    except _Timeout:
        raise
    except (NotImplementedError, RuntimeError) as err:
        if "meta" not in str(err):
            raise
    with _empty_init():
        return fn(*args, **kwargs), "empty_init"


class _EveryBlockRate(float):
    """A ``drop_path_rate`` that gives every block the same rate > 0, whatever timm's schedule.

    timm's schedules (``torch.linspace(0, rate, n)``, ``calculate_drop_path_rates``, ``rate * i / (n - 1)``)
    start at 0, and a block at rate 0 gets ``nn.Identity``/``None`` instead of ``DropPath``: the oracle
    would not see it. Products and quotients of this float are itself, and :func:`_every_block_rate`
    makes ``torch.linspace``/``numpy.linspace`` ending at it constant. Rates a model fixes to 0 (CaiT's
    class-attention blocks) stay 0: timm never drops those.
    """

    def __mul__(self, other):
        return self

    __rmul__ = __truediv__ = __rtruediv__ = __mul__

    def __reduce__(self):
        return (float, (float(self),))


@contextlib.contextmanager
def _every_block_rate():
    import numpy as np

    torch_linspace, np_linspace = torch.linspace, np.linspace

    def t_linspace(start, end, steps, *args, **kwargs):
        if isinstance(end, _EveryBlockRate):
            return torch.full((int(steps),), float(end), dtype=kwargs.get("dtype"), device=kwargs.get("device"))
        return torch_linspace(start, end, steps, *args, **kwargs)

    def n_linspace(start, stop, num=50, *args, **kwargs):
        if isinstance(stop, _EveryBlockRate):
            return np.full(int(num), float(stop))
        return np_linspace(start, stop, num, *args, **kwargs)

    torch.linspace, np.linspace = t_linspace, n_linspace
    try:
        yield
    finally:
        torch.linspace, np.linspace = torch_linspace, np_linspace


# ----------------------------------------------------------------------------------------- oracle


def _is_library_drop_path(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__name__ == "DropPath" and cls.__module__.startswith("timm.")) or (
        cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision.")
    )


def _zero_rate_slots(model: nn.Module) -> list[str]:
    """Slot attributes that hold ``nn.Identity`` or ``None`` (a block built at rate 0)."""
    found = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, child in m._modules.items():
            if _SLOT_ATTR.search(attr) and (child is None or type(child) is nn.Identity):
                found.append(prefix + attr)
        found += [prefix + k for k, v in vars(m).items() if v is None and _SLOT_ATTR.search(k)]
    return found


def _called_slots(
    model: nn.Module, x: torch.Tensor, identity_slots: bool, run: Callable[[nn.Module, torch.Tensor], Any] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Run one training-mode forward; return the called module slots and virtual slots, each name -> count.

    ``run(model, x)`` is the forward (default ``model(x)``): a detector's training forward wants targets,
    so its oracle runs the backbone, where its residual blocks are; RAFT takes two images.

    Module slots: library drop-path modules and, with ``identity_slots``, ``nn.Identity`` under a slot
    attribute; a module slot's count is how often it was called (torchvision's MaxViT calls one
    StochasticDepth for both residuals of a layer). Virtual slots: torchvision's residual blocks
    without stochastic depth, counted by their number of residuals.
    """
    slots, virtual = {}, {}
    for name, m in model.named_modules():
        if _is_library_drop_path(m) or (identity_slots and type(m) is nn.Identity and _SLOT_ATTR.search(name.rpartition(".")[2])):
            slots[name] = m
        else:
            spec = _tv_block_spec(m)
            if spec is not None:
                count = spec if isinstance(spec, int) else int(bool(getattr(m, spec)))
                if count:
                    virtual[name] = (m, count)
    called: dict[str, int] = {}
    handles = []

    def hook_for(qual: str):
        def hook(mod, args, out):
            called[qual] = called.get(qual, 0) + 1

        return hook

    for qual, m in [*slots.items(), *((q, m) for q, (m, _) in virtual.items())]:
        handles.append(m.register_forward_hook(hook_for(qual)))
    try:
        model.train()
        with torch.no_grad():
            if run is None:
                model(x)
            else:
                run(model, x)
    finally:
        for h in handles:
            h.remove()
    return {q: c for q, c in called.items() if q in slots}, {q: virtual[q][1] for q in called if q in virtual}


class _ShallowTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _closure(node: fx.Node, up: bool) -> set[fx.Node]:
    """Every node ``node`` depends on (``up``) or that depends on ``node``, not including it."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes if up else node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes if up else n.users)
    return seen


def _residual_verdict(model: nn.Module, slot: str, cache: dict, max_levels: int = 3) -> str:
    """``"residual"``, ``"not_residual"``, ``"input_dropped"`` or ``"untraceable"`` for the module slot ``slot``.

    At the slot's parent: a slot applied to the parent's input itself drops the shortcut, not a branch
    (timm's ResNeSt). Otherwise the slot's output, through any ops, must reach an add whose other operand does
    not depend on the slot and does depend on the parent's inputs. If instead it only reaches the
    parent's output, the same question is asked one level up (the slot ends a branch submodule).
    """
    parts = slot.split(".")
    for level in range(1, min(max_levels, len(parts)) + 1):
        parent_name = ".".join(parts[:-level])
        child_rel = ".".join(parts[-level:])
        parent = model.get_submodule(parent_name) if parent_name else model
        key = id(parent)
        if key not in cache:
            try:
                cache[key] = _ShallowTracer().trace(parent)
            except Exception:
                cache[key] = None
        graph = cache[key]
        if graph is None:
            return "untraceable"
        # Direct child call at this level: the first component of child_rel (or the full path if called so).
        first = child_rel.split(".")[0]
        nodes = [n for n in graph.nodes if n.op == "call_module" and (n.target == child_rel or n.target == first)]
        if not nodes:
            return "untraceable"
        if level == 1 and any(n.args and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder" for n in nodes):
            return "input_dropped"  # the drop path takes the block's input itself (resnest: the shortcut is dropped)
        reaches_output = False
        for node in nodes:
            desc = _closure(node, up=False)
            inside = desc | {node}
            for n in desc:
                if n.op == "output":
                    reaches_output = True
                if not _is_add(n):
                    continue
                operands = [a for a in list(n.args[:2]) + list(n.kwargs.values()) if isinstance(a, fx.Node)]
                if len(operands) < 2:
                    continue
                for a in operands:
                    if a in inside:
                        continue
                    anc = _closure(a, up=True) | {a}
                    if any(p.op == "placeholder" for p in anc) and not (anc & inside):
                        return "residual"
        if not reaches_output:
            return "not_residual"
    return "not_residual"


# ------------------------------------------------------------------------------------------- match


def _match(branches: list[Any], slots: dict[str, int], virtual: dict[str, int], quirk: set[str]) -> dict[str, Any]:
    gate_cover: list[set[str]] = []
    for b in branches:
        mods = set(b.modules) | ({b.slot} if b.slot else set())
        cover = {s for s in slots if s in mods}
        if not cover and b.block in virtual:
            count = virtual[b.block]
            cover = {f"{b.block}#{b.index_in_block if count > 1 else 0}"}
        gate_cover.append(cover)
    expected = {s: c for s, c in slots.items() if s not in quirk}
    expected.update({f"{v}#{k}": 1 for v, c in virtual.items() for k in range(c)})
    covered_by: dict[str, list[int]] = defaultdict(list)
    for i, cover in enumerate(gate_cover):
        for s in cover:
            covered_by[s].append(i)
    misses = [s for s, c in expected.items() if len(covered_by.get(s, [])) < c]
    extra = [b.name for b, cover in zip(branches, gate_cover) if not (cover - quirk)]
    quirk_gated = [s for s in quirk if covered_by.get(s)]
    merged = [b.name for b, cover in zip(branches, gate_cover) if len(cover - quirk) > 1]
    split = [s for s, c in expected.items() if len(covered_by.get(s, [])) > c]
    exact = not (misses or extra or merged or split or quirk_gated)
    return {
        "exact": exact,
        "expected": sum(expected.values()),
        "misses": misses,
        "extra_gates": extra,
        "merged_gates": merged,
        "split_slots": split,
        "quirk_gated": quirk_gated,
    }


def _discover(model: nn.Module) -> tuple[list[Any], list[str], float]:
    from lightning_sd import find_residual_branches

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        branches = find_residual_branches(model)
        dt = time.perf_counter() - t0
    return branches, [f"{w.category.__name__}: {w.message}" for w in caught], dt


def _input_size(model: nn.Module, default: tuple[int, ...] = (3, 224, 224)) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else default


def _short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


def _evaluate_model(
    model: nn.Module,
    input_size: tuple[int, ...],
    rec: dict[str, Any],
    identity_slots: bool,
    run: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> list[Any] | None:
    """Oracle + discovery on one built model; fills ``rec``; returns the branches (None on failure)."""
    try:
        branches, warns, dt = _discover(model)
    except _Timeout:
        raise
    except Exception as err:
        rec.update(status="discovery_failed", error=_short_error(err))
        return None
    rec.update(
        discovery_s=round(dt, 4),
        warnings=warns,
        gates=len(branches),
        branches=[{"name": b.name, "block": b.block, "slot": b.slot, "skippable": b.skippable, "modules": list(b.modules)} for b in branches],
    )
    x = torch.empty((2, *input_size), device="meta")
    try:
        slots, virtual = _called_slots(model, x, identity_slots, run)
    except _Timeout:
        raise
    except Exception as err:
        rec.update(status="forward_failed", error=_short_error(err))
        return branches
    cache: dict = {}
    verdicts = {s: _residual_verdict(model, s, cache) for s in slots}
    quirk = {s for s, v in verdicts.items() if v in ("not_residual", "input_dropped")}
    # A drop path on the block's input (ResNeSt) marks no branch, but its block is residual all the same:
    # one gate on the block is expected there, as for torchvision's blocks.
    for s, v in verdicts.items():
        if v == "input_dropped":
            virtual[s.rpartition(".")[0]] = 1
    rec.update(
        called_slots=slots,
        virtual_slots=virtual,
        not_residual=sorted(quirk),
        untraceable_parents=sorted(s for s, v in verdicts.items() if v == "untraceable"),
    )
    rec.update(_match(branches, slots, virtual, quirk))
    rec["status"] = "ok" if (slots or virtual) else "no_drop_path_called"
    return branches


def _timm_family(name: str) -> str:
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def evaluate_timm(name: str) -> dict[str, Any]:
    import timm

    rec: dict[str, Any] = {"source": "timm", "model": name, "family": _timm_family(name), "takes_drop_path_rate": True}
    try:
        with _every_block_rate():
            model, rec["built_on"] = _build(timm.create_model, name, pretrained=False, drop_path_rate=_EveryBlockRate(0.1))
    except _Timeout:
        raise
    except TypeError as err:
        if "drop_path_rate" not in str(err):
            rec.update(status="build_failed", error=_short_error(err))
            return rec
        rec.update(takes_drop_path_rate=False, note="no drop_path_rate")
        try:
            model, rec["built_on"] = _build(timm.create_model, name, pretrained=False)
        except _Timeout:
            raise
        except Exception as err2:
            rec.update(status="build_failed", error=_short_error(err2))
            return rec
    except Exception as err:
        rec.update(status="build_failed", error=_short_error(err))
        return rec
    size = _input_size(model)
    rec["input_size"] = list(size)
    rec["zero_rate_slots"] = _zero_rate_slots(model)
    branches = _evaluate_model(model, size, rec, identity_slots=False)
    del model
    if not rec["takes_drop_path_rate"] or branches is None:
        return rec
    try:
        model0, _ = _build(timm.create_model, name, pretrained=False, drop_path_rate=0.0)
        b0, _, dt0 = _discover(model0)
        names0 = [b.name for b in b0]
        rec["gates_at_0"] = len(b0)
        rec["discovery_s_at_0"] = round(dt0, 4)
        rec["same_at_0"] = names0 == [b.name for b in branches]
        if not rec["same_at_0"]:
            rec["branches_at_0"] = names0
    except _Timeout:
        raise
    except Exception as err:
        rec["same_at_0"] = None
        rec["error_at_0"] = _short_error(err)
    return rec


def _tv_family(name: str) -> str:
    """torchvision's module of the builder, below ``torchvision.models``: ``resnet``, ``video.resnet``, ``detection.ssd``."""
    import torchvision

    return torchvision.models.get_model_builder(name).__module__.removeprefix("torchvision.models.")


def _tv_oracle_input(name: str, family: str) -> tuple[tuple[int, ...], Callable[[nn.Module, torch.Tensor], Any] | None]:
    """Input size (without batch) and forward of the oracle's pass for a torchvision model."""
    if family.startswith("detection."):
        return (3, 320, 320), lambda m, x: m.backbone(x)  # SSD300's VGG extras need >= 300
    if family.startswith("optical_flow."):
        return (3, 128, 128), lambda m, x: m(x, x)
    if family == "video.resnet":
        return (3, 16, 112, 112), None
    if family.startswith("video."):
        return (3, 16, 224, 224), None
    return ((3, 299, 299) if "inception" in name else (3, 224, 224)), None


def evaluate_torchvision(name: str) -> dict[str, Any]:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    family = _tv_family(name)
    rec: dict[str, Any] = {"source": "torchvision", "model": name, "family": family}
    # no weights, and none for the backbone of detection and segmentation models either
    kwargs: dict[str, Any] = {"weights": None}
    if family.startswith(("detection.", "segmentation.")):
        kwargs["weights_backbone"] = None
    try:
        model, rec["built_on"] = _build(builder, **kwargs)
    except _Timeout:
        raise
    except Exception as err:
        rec.update(status="build_failed", error=_short_error(err))
        return rec
    size, run = _tv_oracle_input(name, family)
    rec["input_size"] = list(size)
    _evaluate_model(model, size, rec, identity_slots=True, run=run)
    return rec


def _run_one(task: tuple[str, str, float]) -> dict[str, Any]:
    source, name, timeout = task
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        with _time_limit(timeout):
            rec = evaluate_timm(name) if source == "timm" else evaluate_torchvision(name)
    except _Timeout as err:
        rec = {"source": source, "model": name, "status": "timeout", "error": str(err)}
    except BaseException as err:  # noqa: BLE001 - a sweep records every failure
        rec = {"source": source, "model": name, "status": "crashed", "error": _short_error(err), "traceback": traceback.format_exc()[-2000:]}
    rec.setdefault("family", "?")
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


# ------------------------------------------------------------------------------------------ report


def _fmt_t(values: list[float]) -> tuple[str, str]:
    if not values:
        return "-", "-"
    return f"{max(values):.2f}", f"{statistics.median(values):.3f}"


def _scored(r: dict[str, Any]) -> bool:
    """Whether a record has an oracle to compare with: a drop path was called, or it is torchvision
    (whose models without stochastic depth or residual blocks have no residual: no gate is right)."""
    return r.get("status") == "ok" or (r["source"] == "torchvision" and r.get("status") == "no_drop_path_called")


def _failed(r: dict[str, Any]) -> bool:
    return r.get("status") not in ("ok", "no_drop_path_called")


def _extra_on_zero_rate_slots(r: dict[str, Any]) -> int:
    """How many of a record's extra gates hold a slot the model keeps at rate 0 (CaiT class attention)."""
    zero = set(r.get("zero_rate_slots", []))
    branches = {b["name"]: b for b in r.get("branches", [])}
    return sum(bool(zero & ({*branches[e]["modules"], branches[e]["slot"]})) for e in r.get("extra_gates", []))


def summarize(records: list[dict[str, Any]]) -> str:
    """The per-family table, totals and the list of models that are not exact."""
    lines = []
    header = (
        f"{'family':<24}{'models':>7}{'dpr':>5}{'nodp':>5}{'exact':>6}{'miss':>5}{'extra':>6}{'merge':>6}{'quirk':>6}"
        f"{'warn':>5}{'diff0':>6}{'fail':>5}{'t_max':>7}{'t_med':>7}"
    )
    for source in ("timm", "torchvision"):
        recs = [r for r in records if r["source"] == source]
        if not recs:
            continue
        fams: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            fams[r.get("family", "?")].append(r)
        lines.append(f"\n== {source}: {len(recs)} models, {len(fams)} families ==")
        lines.append("models; dpr = took drop_path_rate; nodp = no drop path called (timm: not scored); exact; models with")
        lines.append("misses / extra gates / merged or split gates; quirk = a drop path that is not residual (timm quirk);")
        lines.append("warn = discovery warned; diff0 = other branches at drop_path_rate 0; fail = build/forward/discovery")
        lines.append("failed or timed out; t = discovery seconds at rate 0.1 (max, median)")
        lines.append(header)

        def row(label: str, rs: list[dict[str, Any]]) -> str:
            sc = [r for r in rs if _scored(r)]
            tmax, tmed = _fmt_t([r["discovery_s"] for r in rs if "discovery_s" in r])
            return (
                f"{label:<24}{len(rs):>7}{sum(bool(r.get('takes_drop_path_rate')) for r in rs):>5}"
                f"{sum(r.get('status') == 'no_drop_path_called' for r in rs):>5}"
                f"{sum(bool(r.get('exact')) for r in sc):>6}{sum(bool(r.get('misses')) for r in sc):>5}"
                f"{sum(bool(r.get('extra_gates')) for r in sc):>6}{sum(bool(r.get('merged_gates') or r.get('split_slots')) for r in sc):>6}"
                f"{sum(bool(r.get('not_residual')) for r in sc):>6}{sum(bool(r.get('warnings')) for r in rs):>5}"
                f"{sum(r.get('same_at_0') is False for r in rs):>6}{sum(_failed(r) for r in rs):>5}{tmax:>7}{tmed:>7}"
            )

        for fam in sorted(fams):
            lines.append(row(fam, fams[fam]))
        lines.append(row("TOTAL", recs))
        if source == "timm":
            dpr = [r for r in recs if r.get("takes_drop_path_rate")]
            scored = [r for r in dpr if r.get("status") != "no_drop_path_called"]  # failures count as not exact
            exact = sum(bool(r.get("exact")) for r in scored)
            pct = 100.0 * exact / len(scored) if scored else 0.0
            ok = [r for r in scored if r.get("status") == "ok"]
            lines.append(
                f"timm: {len(recs)} models, {len(dpr)} take drop_path_rate, {len(dpr) - len(scored)} of those call no drop path; "
                f"exact: {exact} of {len(scored)} ({pct:.1f}%; failures count as not exact: {sum(_failed(r) for r in scored)}); "
                f"{sum(bool(r.get('misses')) for r in ok)} with misses ({sum(len(r.get('misses', [])) for r in ok)} drop paths in no gate), "
                f"{sum(bool(r.get('extra_gates')) for r in ok)} with extra gates ({sum(len(r.get('extra_gates', [])) for r in ok)} gates), "
                f"{sum(bool(r.get('merged_gates') or r.get('split_slots')) for r in ok)} with merged/split gates; "
                f"{sum(bool(r.get('not_residual')) for r in ok)} with non-residual drop paths (timm quirk); "
                f"same branches at drop_path_rate 0 and 0.1: {sum(r.get('same_at_0') is True for r in dpr)} of {len(dpr)}; "
                f"discovery warned on {sum(bool(r.get('warnings')) for r in recs)}"
            )
            on_zero = [_extra_on_zero_rate_slots(r) for r in ok]
            fams = sorted({r["family"] for r, e in zip(ok, on_zero) if e})
            lines.append(
                f"extra gates on slots that timm keeps at rate 0 whatever drop_path_rate is (zero_rate_slots): "
                f"{sum(on_zero)} gates in {sum(map(bool, on_zero))} models ({', '.join(fams)}); "
                f"{sum(1 for r, e in zip(ok, on_zero) if e and e == len(r['extra_gates']))} models have no other extra gate"
            )
        else:
            lines.append(f"torchvision exact: {sum(bool(r.get('exact')) for r in recs if _scored(r))} of {len(recs)}")
        bad = defaultdict(list)
        for r in recs:
            if _scored(r) and not r.get("exact"):
                parts = [f"{k} {len(r.get(key, []))}" for k, key in (("miss", "misses"), ("extra", "extra_gates"), ("merged", "merged_gates"), ("split", "split_slots")) if r.get(key)]
                bad[r["family"]].append(f"{r['model']} ({', '.join(parts) or 'quirk gated'})")
            elif _failed(r):
                bad[r["family"]].append(f"{r['model']} [{r.get('status')}: {str(r.get('error', ''))[:80]}]")
        if bad:
            lines.append(f"not exact or failed, by family ({sum(map(len, bad.values()))} models):")
            lines += [f"  {fam}: " + "; ".join(names) for fam, names in sorted(bad.items())]
        statuses: dict[str, int] = defaultdict(int)
        for r in recs:
            statuses[r.get("status", "?")] += 1
        lines.append("status counts: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    return "\n".join(lines)


def _select_models(args: argparse.Namespace) -> list[tuple[str, str]]:
    tasks: list[tuple[str, str]] = []
    if not args.skip_timm:
        import timm

        tasks += [("timm", n) for n in timm.list_models()]
    if not args.skip_torchvision:
        import torchvision

        tasks += [("torchvision", n) for n in torchvision.models.list_models()]
    if args.models:
        pats = [p.strip() for p in args.models.split(",") if p.strip()]
        tasks = [t for t in tasks if any(fnmatch.fnmatchcase(t[1], p) for p in pats)]
    if args.families:
        fams = {f.strip() for f in args.families.split(",") if f.strip()}
        keep = []
        for source, name in tasks:
            if source == "timm":
                fam = _timm_family(name)
            else:
                fam = _tv_family(name)
            if fam in fams:
                keep.append((source, name))
        tasks = keep
    if args.limit:
        tasks = tasks[: args.limit]
    return tasks


def _default_out() -> Path:
    return Path("lightning_logs/zoo/results.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma list of model names or globs (both libraries)")
    parser.add_argument("--families", default=None, help="comma list of families (timm/torchvision module names)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N models after filtering")
    parser.add_argument("--skip-timm", action="store_true")
    parser.add_argument("--skip-torchvision", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON of per-model records (default: lightning_logs/zoo/results.json)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--resume", action="store_true", help="keep the records already in the --out .jsonl and run only the other models")
    parser.add_argument("--report", type=Path, default=None, help="only print the table of a saved --out JSON (or its .jsonl)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model before it is recorded as a timeout")
    args = parser.parse_args(argv)

    if args.report is not None:
        text = args.report.read_text()
        records = json.loads(text)["records"] if args.report.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        print(summarize(records))
        return 0
    out = args.out or _default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    tasks = [(s, n, args.timeout) for s, n in _select_models(args)]
    wanted = {(s, n) for s, n, _ in tasks}
    records: list[dict[str, Any]] = []
    if args.resume and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            if (rec["source"], rec["model"]) in wanted and not any((r["source"], r["model"]) == (rec["source"], rec["model"]) for r in records):
                records.append(rec)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = {(r["source"], r["model"]) for r in records}
    todo = [t for t in tasks if (t[0], t[1]) not in done]
    import lightning_sd

    print(f"lightning_sd from {lightning_sd.__file__}; {len(tasks)} models ({len(done)} kept from {jsonl}); jobs {args.jobs}; out {out}", flush=True)
    t0 = time.perf_counter()

    def consume(rec: dict[str, Any]) -> None:
        records.append(rec)
        with jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        flag = "exact" if rec.get("exact") else rec.get("status", "?")
        if rec.get("status") == "ok" and not rec.get("exact"):
            flag = f"miss {len(rec.get('misses', []))} extra {len(rec.get('extra_gates', []))} merged {len(rec.get('merged_gates', []))}"
        print(f"[{len(records)}/{len(tasks)}] {rec['source']}:{rec['model']} {flag} ({rec['wall_s']:.1f} s)", flush=True)

    if args.jobs <= 1:
        for task in todo:
            consume(_run_one(task))
    else:
        ctx = mp.get_context("fork")
        with ctx.Pool(args.jobs, maxtasksperchild=25) as pool:
            for rec in pool.imap_unordered(_run_one, todo, chunksize=1):
                consume(rec)
    wall = time.perf_counter() - t0
    order = {(s, n): i for i, (s, n, _) in enumerate(tasks)}
    records.sort(key=lambda r: order[(r["source"], r["model"])])
    out.write_text(json.dumps({"wall_s": round(wall, 1), "lightning_sd": lightning_sd.__file__, "records": records}, indent=1))
    print(summarize(records))
    print(f"\nsweep wall time: {wall:.0f} s ({len(todo)} models run, {len(done)} kept from an earlier run; jobs {args.jobs}); records in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
