"""Stochastic depth under ``torch.compile``: the number of compiled graphs does not depend on the masks.

An eager gate decides in Python whether its branch runs (``if kept``). Traced by Dynamo, that
decision would become a guard: one graph per mask pattern, then the recompile limit and an eager
fallback (pytorch#95425). While Dynamo traces a gate (``torch.compiler.is_compiling()``), the gate
calls :func:`traced_gate_forward` instead, which reads the masks and rates as **tensor data** that the
handle refreshes outside the forward (at ``resample``, ``set_survival``, ``reconfigure``):

- ``drop="batch"``, route ``"cond"`` (the default, :attr:`StochasticDepthHandle.compile_route`):
  ``torch.cond(kept_l, shortcut + m_l f_l(x), shortcut)``. One graph for any mask stream and any rates;
  ``torch.cond`` runs one branch, so a dropped branch is still not computed, and its backward gives the
  branch's parameters exact zero gradients (DDP with ``find_unused_parameters=False`` keeps working).
  ``torch.cond`` refuses branches that mutate state, so the buffers of a branch's modules (BatchNorm's
  running statistics) cross the cond as inputs and outputs: the kept branch updates copies
  (:func:`torch.func.functional_call`), the live buffers take them after the cond. In torch 2.14 the
  backward of ``torch.cond`` recomputes the kept branch's forward (``CondAutogradOp`` saves only the
  inputs), so a kept block costs about one more forward than in the plain compiled model. A branch
  that modifies its inputs in place cannot be traced by ``torch.cond``: use ``"graph_break"``.
  A branch added to a projection of the block input (a convolution in the shortcut: torchvision
  ResNets' ``downsample``) takes the ``"graph_break"`` route instead: with Inductor's layout
  optimization (always on for convolutions on CPU, torch 2.14), the block input, read by both that
  convolution and the cond, reaches the cond's subgraph in another layout than it expects, and the
  compiled forward fails (``assert_size_stride``). The same mismatch in the backward (the gradient of
  the cond's output, where the next block reads it transposed) is mended in place: see
  :class:`_FixedLayoutGradient`. Under ``torch.compile(..., dynamic=True)`` Dynamo traces Python
  floats as tensors (BatchNorm's momentum and eps, LayerNorm's eps), whose ``.item()`` inside a
  branch ``torch.cond`` refuses: every gate then takes ``"graph_break"``, unless
  ``torch._dynamo.config.specialize_float`` is set (see :func:`_floats_traced_as_tensors`).
- ``drop="batch"``, route ``"graph_break"``: the gate is a graph break; the decision runs eagerly
  *between* the compiled pieces of the model, and the branch runs through the regions compiled by
  :meth:`~lightning_sd.core.gates.StochasticDepthHandle.compile` (eagerly without them). The number of
  graphs depends on the block types and stage shapes, never on the masks or the depth: the sizes of
  a gate's output other than the batch are marked static (see :func:`_decide_between_regions`).
- ``drop="batch"`` where compute is not skipped (FSDP, DeepSpeed): ``shortcut + (kept_l m_l) f_l(x)``.
- ``drop="batch"`` with every rate at 1 (budget 1, the start of a budget warm-up): ``shortcut + f_l(x)``,
  no ``torch.cond``, as fast as the plain compiled model. Dynamo guards on "every rate is 1": the first
  change of rates below 1 compiles the cond variant once; going back and forth reuses both graphs.
  ``handle.specialize_full_depth = False`` turns this off (rates that start at 1 and fall: one graph).
- evaluation with ``scaling="expected"``: ``shortcut + p_l f_l(x)`` with ``p_l`` as data.
- ``drop="sample"`` and ``drop="subset"`` need nothing here: their masks and rows are drawn at
  ``resample`` (outside the forward) when the batch size is known, and read as inputs.

:func:`compile_branches` is the other route users take (``StochasticDepthHandle.compile``,
``StochasticDepth(compile=...)``): each branch compiled as its own region, the decision eager.

Example::

    >>> handle = inject_stochastic_depth(model, 0.5)
    >>> compiled = torch.compile(model)        # route 1: the user compiles the whole model
    >>> handle.compile(mode="max-autotune")    # route 2: the package compiles each branch
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_sd.core.gates import ResidualGate, SlotGate, StochasticDepthHandle

__all__ = ["COMPILE_ROUTES", "CompileRoute", "compile_branches", "traced_gate_forward", "traced_slot_forward"]

CompileRoute = Literal["cond", "graph_break"]
#: How a batch-drop gate traced by ``torch.compile`` decides (see the module docstring).
COMPILE_ROUTES: tuple[str, ...] = get_args(CompileRoute)


class _FixedLayoutGradient(torch.autograd.Function):
    """Identity whose backward gives the gradient the layout it was traced with, for the cond's backward (Inductor).

    The backward of ``torch.cond`` is a second cond whose subgraphs Inductor compiles for the strides the
    gradient of the cond's output had when it was traced, and checks (``assert_size_stride``); but it
    lays the gradient it passes out as suits the kernel that computes it (torch 2.14). Where the next
    block reads the gate's output transposed or permuted (MLP-Mixer's token mixing, torchvision's Swin),
    the two differ and the first backward failed. Inductor's ``force_stride_order`` (what its own
    lowerings use to require a layout) gives the gradient the traced layout: nothing when it has it
    already, a copy otherwise. Other backends run it as a copy where the strides differ.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()  # not a view: in-place ops on the gate's output (ReLU(inplace=True)) stay legal

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        from torch._inductor import inductor_prims

        return inductor_prims.force_stride_order(grad, grad.stride())


def _batch_mask(handle: StochasticDepthHandle, index: int) -> tuple[Tensor, Tensor]:
    """``(kept_l, m_l)`` as tensors: the kept flag (bool, 0-dim) and the multiplier of a kept branch."""
    kind: Any = handle.drop_kind
    return kind.kept_tensor[index], handle._train_multipliers[index]


def traced_gate_forward(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...]) -> Tensor | None:
    """The gate's output while Dynamo traces it, or None when the eager code traces without guards."""
    handle = gate.handle
    if not gate.training:
        if gate.pruned or handle.scaling != "expected":  # pruned (handle.prune): the eager code returns the shortcut
            return None
        return shortcut + gate._call_branch(*inputs) * handle._eval_multipliers[gate.index]
    if handle.drop != "batch":
        return None  # per-example kinds read tensors drawn at resample
    if handle._all_kept:
        # Every rate is 1: every branch runs, m_l = 1, as the eager gate computes it. No cond: its
        # backward would recompute each branch's forward.
        return shortcut + gate._call_branch(*inputs)
    reason = _outside_graph_reason(gate, shortcut, inputs) if handle.skip_compute else None
    if reason is not None:
        # Before reading the gate's index or masks: the frames Dynamo compiles around this break must not
        # depend on the index (one graph per gate otherwise). The test above reads only the block's structure.
        return _decide_between_regions(gate, shortcut, inputs, reason)
    kept, m = _batch_mask(handle, gate.index)
    if not handle.skip_compute:  # masking instead of skipping (FSDP, DeepSpeed): the mask as data
        return shortcut + gate._call_branch(*inputs) * (m * kept).to(shortcut.dtype)
    if gate.holds_state:
        return _cond_with_buffers(gate, kept, m, shortcut, inputs)
    dtype = shortcut.dtype

    def run(s: Tensor, *args: Any) -> Tensor:
        return (s + gate._call_branch(*args) * m).to(dtype)

    def skip(s: Tensor, *args: Any) -> Tensor:
        return s.clone()  # cond's outputs may not alias its inputs

    return _FixedLayoutGradient.apply(torch.cond(kept, run, skip, (shortcut, *inputs)))


def _decides_outside_graph(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...]) -> bool:
    """Whether a traced batch-drop gate takes the ``"graph_break"`` route (see the module docstring)."""
    return _outside_graph_reason(gate, shortcut, inputs) is not None


def _outside_graph_reason(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...]) -> str | None:
    """Why a traced batch-drop gate takes the ``"graph_break"`` route, or None when it keeps its ``torch.cond``.

    Chosen by the handle (``compile_route``), or forced by a projection shortcut, by ``dynamic=True`` or
    by a branch ``torch.cond`` cannot take. Reads the block's structure and the tensors' shapes, never the masks.
    """
    if gate.handle.compile_route == "graph_break":
        return _CHOSEN_ROUTE
    if gate.projection_shortcut:
        return _PROJECTION_SHORTCUT
    if _floats_traced_as_tensors():
        return _DYNAMIC_FLOATS
    if not _cond_accepts(gate, shortcut, inputs):
        return _COND_REFUSES_BRANCH
    return None


# Why a traced gate decides outside the graph: said by the warning of an eager branch and, all together, at
# the graph break (what torch.compile(fullgraph=True) raises with).
_CHOSEN_ROUTE = "its handle's compile_route is 'graph_break'"
_PROJECTION_SHORTCUT = (
    "its branch is added to a projection of the block input (a convolution in the shortcut, which Inductor's "
    "layout optimization breaks torch.cond with)"
)
_DYNAMIC_FLOATS = (
    "the model is compiled with dynamic=True, which traces the branch's float attributes as tensors "
    "(torch._dynamo.config.specialize_float = True keeps torch.cond)"
)
_COND_REFUSES_BRANCH = (
    "torch.cond cannot take its branch (a tensor with a dimension of size 1 among several, e.g. depthwise "
    "convolution weights (C, 1, k, k))"
)


def _floats_traced_as_tensors() -> bool:
    """Whether Dynamo traces Python floats as tensors: ``torch.compile(..., dynamic=True)`` unless ``specialize_float``.

    A branch then reads its modules' float attributes (BatchNorm's momentum and eps, LayerNorm's eps)
    with ``.item()``, which ``torch.cond`` refuses (torch 2.14: ``UncapturedHigherOrderOpError`` on
    ``aten._local_scalar_dense``). Read at trace time: Dynamo folds its own config into the graph.
    """
    config = torch._dynamo.config
    return not (getattr(config, "specialize_float", True) or config.assume_static_by_default)


def _cond_accepts(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...]) -> bool:
    """Whether ``torch.cond`` can take this branch: no tensor with a dimension of size 1 (several dims).

    torch 2.14's cond compares the stride order of the two branches' outputs and gradients, and
    rejects tensors whose strides differ only on a dimension of size 1 ("The sorted order of strides
    of the two branches' output doesn't match"): depthwise convolution weights ``(C, 1, k, k)``
    (ConvNeXt), activations at 1 x 1 resolution. Such a gate takes the ``"graph_break"`` route.
    """
    tensors = [shortcut, *(x for x in inputs if isinstance(x, Tensor)), *gate._weights()]
    return not any(t.ndim > 1 and 1 in t.shape for t in tensors)


def _cond_with_buffers(gate: ResidualGate, kept: Tensor, m: Tensor, shortcut: Tensor, inputs: tuple[Any, ...]) -> Tensor:
    """``torch.cond`` for a branch whose modules hold buffers (BatchNorm statistics), functionalized.

    ``torch.cond`` refuses a branch that mutates state. The buffers enter the cond as inputs (copies:
    cond keeps its inputs for the backward) and leave it as outputs: the kept branch runs on fresh
    copies through :func:`torch.func.functional_call` (BatchNorm updates those), the dropped branch
    returns them unchanged; the live buffers take the outputs afterwards, in the main graph. Integer
    buffers (``num_batches_tracked``) cross the cond as float64 (exact below 2**53).
    """
    names, live = gate.branch_buffers()
    dtype, count = shortcut.dtype, len(inputs)
    carried = tuple(b.to(torch.float64) if not b.is_floating_point() else b.clone() for b in live)

    def run(s: Tensor, *args: Any) -> tuple[Tensor, ...]:
        fresh = {
            name: c.to(b.dtype) if not b.is_floating_point() else c.clone() for name, c, b in zip(names, args[count:], live)
        }
        out = torch.func.functional_call(gate.runner, fresh, tuple(args[:count]), strict=False)
        return ((s + out * m).to(dtype), *(f.to(c.dtype) for f, c in zip(fresh.values(), args[count:])))

    def skip(s: Tensor, *args: Any) -> tuple[Tensor, ...]:
        return (s.clone(), *(c.clone() for c in args[count:]))  # cond's outputs may not alias its inputs

    result = torch.cond(kept, run, skip, (shortcut, *inputs, *carried))
    for buffer, new in zip(live, result[1:]):
        buffer.copy_(new.detach())
    return _FixedLayoutGradient.apply(result[0])


def traced_slot_forward(gate: SlotGate, x: Tensor) -> Tensor | None:
    """A drop-path slot gate while Dynamo traces it (it multiplies, never skips), or None for the eager code."""
    handle, index = gate.handle, gate.index
    if not gate.training:
        return x * handle._eval_multipliers[index] if handle.scaling == "expected" and not gate.pruned else None
    if handle.drop != "batch":
        return None
    kept, m = _batch_mask(handle, index)
    return x * (m * kept).to(x.dtype)


# What Dynamo prints at this graph break (torch.compile(fullgraph=True) raises there); torch >= 2.7 takes a reason
_GRAPH_BREAK_REASON = (
    "lightning_sd: this batch-drop gate decides outside the compiled graph, because "
    + ", or because ".join((_CHOSEN_ROUTE, _PROJECTION_SHORTCUT, _COND_REFUSES_BRANCH, _DYNAMIC_FLOATS))
    + ". With fullgraph=True, use drop='sample' or drop='subset' (traced as data), or compile without fullgraph"
)


def disable_with_reason(reason: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``torch.compiler.disable`` that prints ``reason`` at the graph break (torch >= 2.7; plain disable before)."""
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return functools.partial(torch.compiler.disable, reason=reason)
    return torch.compiler.disable


@disable_with_reason(_GRAPH_BREAK_REASON)
def _decide_between_regions(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...], reason: str) -> Tensor:
    # Runs eagerly: a graph break in the traced model, the decision outside any graph. The branch runs
    # through the compiled regions of handle.compile() when there are, else eagerly.
    if "_compiled" not in gate.__dict__:
        _warn_eager_branch(gate, reason)
    out = gate.forward_outside_graph(shortcut, *inputs)
    # The code after this break (the rest of the block, the stage, the next blocks) is compiled as frames
    # of their own, whose code objects recur at every stage: at the second stage's shapes Dynamo would
    # recompile them with symbolic sizes (automatic dynamic shapes), and Inductor fails on some of those
    # graphs (timm ConvNeXt, torch 2.14: "cannot determine truth value of Relational", also without
    # stochastic depth under dynamic=True). Sizes other than the batch stay static: one graph per stage shape.
    if out.ndim > 1:
        torch._dynamo.mark_static(out, list(range(1, out.ndim)))
    return out


def _warn_eager_branch(gate: ResidualGate, reason: str) -> None:
    """Say once per handle that a compiled model runs a gate's branch eagerly: a slow path nobody asked for."""
    handle = gate.handle
    if handle._warned_eager_branch:
        return
    handle._warned_eager_branch = True
    warnings.warn(
        f"lightning_sd: in this compiled model, the gate of {handle.branches[gate.index].name!r} decides outside the "
        f"compiled graph because {reason}, and its branch runs eagerly (not compiled); other gates may do the same. "
        "To compile those branches too, call handle.compile(**torch_compile_kwargs) (StochasticDepth(compile=True) "
        "in a Trainer): each branch becomes a compiled region. Shown once per model.",
        stacklevel=2,
    )


def _region_source(name: str) -> str:
    return f"def {name}(shortcut, m, *inputs):\n    return shortcut + branch(*inputs) * m\n"


def compile_branches(handle: StochasticDepthHandle, **compile_kwargs: Any) -> int:
    """Compile each residual branch of ``handle`` as its own region; the skip decision stays eager.

    Identical blocks (same generated branch code) share one compiled function, so Dynamo compiles
    one graph per block type; a kept branch runs ``shortcut + f_l(x) * m_l`` in one compiled region
    with ``m_l`` as a tensor input (no recompile when the rates change), a dropped branch is not
    called at all. Drop-path slot gates (blocks whose forward cannot be traced) are left eager.

    Args:
        handle: the live handle of an injected model.
        **compile_kwargs: passed to :func:`torch.compile` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        the number of distinct compiled branch functions (block types).
    """
    from lightning_sd.core.gates import ResidualGate

    shared: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
    for gate in handle.gates:
        if not isinstance(gate, ResidualGate):
            continue
        fn, args = gate.branch_target(compiled=False)
        if id(fn) not in shared:
            namespace: dict[str, Any] = {"branch": fn}
            name = f"sd_region_{len(shared)}"
            # A code object of its own per block type: Dynamo caches per code object, so block types do
            # not count against each other's recompile limit.
            exec(compile(_region_source(name), f"<lightning_sd {name}>", "exec"), namespace)  # noqa: S102
            shared[id(fn)] = (torch.compile(fn, **compile_kwargs), torch.compile(namespace[name], **compile_kwargs))
        plain, region = shared[id(fn)]
        gate.set_compiled(plain, region, args)
    return len(shared)
