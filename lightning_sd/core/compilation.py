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
  (:func:`torch.func.functional_call`), the live buffers take them after the cond. The gate chooses the
  layouts of what crosses the cond (parameters flattened, the activations of convolutional branches in
  channels_last), where torch 2.14's cond and Inductor's layout optimization disagreed (see
  :func:`_cond_gate`). A residual inside another's branch (timm EdgeNeXt) is a cond inside that
  branch's. In torch 2.14 the backward of ``torch.cond`` recomputes the kept branch's forward
  (``CondAutogradOp`` saves only the inputs), so a kept block costs about one more forward than in the
  plain compiled model. A branch that modifies its inputs in place cannot be traced by ``torch.cond``:
  use ``"graph_break"``. Under ``torch.compile(..., dynamic=True)`` Dynamo traces Python
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
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_sd.core.gates import ResidualGate, SlotGate, StochasticDepthHandle

__all__ = [
    "COMPILE_ROUTES",
    "OLDEST_COMPILE_TORCH",
    "TESTED_TORCH",
    "CompileRoute",
    "compile_branches",
    "compiled_around_gates",
    "traced_gate_forward",
    "traced_slot_forward",
    "warn_untested_torch",
]

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


class _InputLayoutGradient(torch.autograd.Function):
    """Identity (a view) whose backward gives the gradient its input's layout: for the cond's two branches.

    The backward of ``torch.cond`` returns the gradients of the cond's inputs from both branches and
    requires them in one stride order. For activations that cross in channels_last into a branch without
    convolutions (PoolFormer's pooling and GroupNorm), the kept branch computed its input's gradient in
    one layout and the dropped branch passed the output's gradient through in another: "The sorted order
    of strides of the two branches' output doesn't match". Both branches pin it to the input's layout.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.stride = x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        from torch._inductor import inductor_prims

        return inductor_prims.force_stride_order(grad, ctx.stride)


_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
#: The oldest torch (major, minor) on which skipping batch drop under ``torch.compile`` is tested (CI).
TESTED_TORCH = (2, 14)
#: Whether this torch is older. On torch 2.11 Inductor gave a ConvNeXt with skipping batch-drop gates zero
#: gradients upstream of the gates (both routes), where the plain compiled ConvNeXt and ``aot_eager`` were right.
UNTESTED_TORCH = _TORCH < TESTED_TORCH
#: The oldest torch on which the other compiled gates (sample and subset drop, evaluation) passed the tests.
OLDEST_COMPILE_TORCH = (2, 11)
#: Whether this torch is older still. On torch 2.4.1 sample and subset drop compiled a new graph at every
#: step, and Dynamo raised on batch drop; the eager gates pass every test there.
OLD_COMPILE_TORCH = _TORCH < OLDEST_COMPILE_TORCH


def warn_untested_torch(handle: StochasticDepthHandle, stacklevel: int = 3) -> None:
    """Say once per handle that a compiled model runs its gates on a torch older than the tested one.

    ``stacklevel`` as for :func:`warnings.warn`, counted from this function.
    """
    handle._warned_untested_torch = True
    if OLD_COMPILE_TORCH:
        message = (
            f"lightning_sd: a compiled model runs its stochastic-depth gates on torch {torch.__version__}; compiled "
            f"gates are tested on torch >= {OLDEST_COMPILE_TORCH[0]}.{OLDEST_COMPILE_TORCH[1]} only (drop='batch': "
            f">= {TESTED_TORCH[0]}.{TESTED_TORCH[1]}); on torch 2.4.1 sample and subset drop compiled a new graph "
            "at every step (then run eagerly past the recompile limit). Upgrade torch, or train without "
            "torch.compile (the eager gates are tested on this torch). Shown once per model."
        )
    else:
        message = (
            f"lightning_sd: a compiled model skips dropped blocks (drop='batch') on torch {torch.__version__}; this is "
            f"tested on torch >= {TESTED_TORCH[0]}.{TESTED_TORCH[1]} only, and on torch 2.11 Inductor gave some models "
            "(timm ConvNeXt) zero gradients upstream of the gates. Upgrade torch, or check a few steps' gradients "
            "against the uncompiled model, or use drop='subset' or drop='sample' (no torch.cond). Shown once per model."
        )
    warnings.warn(message, stacklevel=stacklevel)


def _batch_mask(handle: StochasticDepthHandle, index: int) -> tuple[Tensor, Tensor]:
    """``(kept_l, m_l)`` as tensors: the kept flag (bool, 0-dim) and the multiplier of a kept branch."""
    kind: Any = handle.drop_kind
    return kind.kept_tensor[index], handle._train_multipliers[index]


def traced_gate_forward(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...]) -> Tensor | None:
    """The gate's output while Dynamo traces it, or None when the eager code traces without guards."""
    handle = gate.handle
    if OLD_COMPILE_TORCH:
        handle._traced_on_untested_torch = True  # a side effect Dynamo replays; resample warns (eager)
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
    if UNTESTED_TORCH and handle.skip_compute:
        handle._traced_on_untested_torch = True  # a side effect Dynamo replays; resample warns (eager)
    reason = _outside_graph_reason(gate) if handle.skip_compute else None
    if reason is not None:
        # Before reading the gate's index or masks: the frames Dynamo compiles around this break must not
        # depend on the index (one graph per gate otherwise).
        return _decide_between_regions(gate, shortcut, inputs, reason)
    kept, m = _batch_mask(handle, gate.index)
    if not handle.skip_compute:  # masking instead of skipping (FSDP, DeepSpeed): the mask as data
        return shortcut + gate._call_branch(*inputs) * (m * kept).to(shortcut.dtype)
    return _cond_gate(gate, kept, m, shortcut, inputs)


def _decides_outside_graph(gate: ResidualGate) -> bool:
    """Whether a traced batch-drop gate takes the ``"graph_break"`` route (see the module docstring)."""
    return _outside_graph_reason(gate) is not None


def _outside_graph_reason(gate: ResidualGate) -> str | None:
    """Why a traced batch-drop gate takes the ``"graph_break"`` route, or None when it keeps its ``torch.cond``.

    Chosen by the handle (``compile_route``), or forced by ``dynamic=True``. Never reads the masks.
    """
    if gate.handle.compile_route == "graph_break":
        return _CHOSEN_ROUTE
    if _floats_traced_as_tensors():
        return _DYNAMIC_FLOATS
    return None


# Why a traced gate decides outside the graph: said by the warning of an eager branch and, all together, at
# the graph break (what torch.compile(fullgraph=True) raises with).
_CHOSEN_ROUTE = "its handle's compile_route is 'graph_break'"
_DYNAMIC_FLOATS = (
    "the model is compiled with dynamic=True, which traces the branch's float attributes as tensors "
    "(torch._dynamo.config.specialize_float = True keeps torch.cond)"
)


def _floats_traced_as_tensors() -> bool:
    """Whether Dynamo traces Python floats as tensors: ``torch.compile(..., dynamic=True)`` unless ``specialize_float``.

    A branch then reads its modules' float attributes (BatchNorm's momentum and eps, LayerNorm's eps)
    with ``.item()``, which ``torch.cond`` refuses (torch 2.14: ``UncapturedHigherOrderOpError`` on
    ``aten._local_scalar_dense``). Read at trace time: Dynamo folds its own config into the graph.
    """
    config = torch._dynamo.config
    return not (getattr(config, "specialize_float", True) or config.assume_static_by_default)


def _activation_layout(gate: ResidualGate, shortcut: Tensor, inputs: tuple[Any, ...]) -> str:
    """How a gate's activations cross its ``torch.cond``: ``"flat"``, ``"channels_last"`` or ``"as_traced"`` (see :func:`_cond_gate`)."""
    activations = [shortcut, *(x for x in inputs if isinstance(x, Tensor))]
    if any(t.ndim > 1 and 1 in t.shape for t in activations):
        return "flat"
    if all(t.ndim == 4 for t in activations) and gate.precedes_convolution:
        # Inductor lays out channels_last every 4-D tensor that feeds a convolution, directly or through
        # other ops, up to the model's last convolution (GraphLowering.find_nodes_prefer_channels_last): the
        # residual stream of a block before a convolution, whether its branch has one (ResNet) or not
        # (PoolFormer's pooling branches).
        return "channels_last"
    return "as_traced"


def _has_convolution(gate: ResidualGate) -> bool:
    """Whether the gate's branch holds a convolution."""
    modules = (module for name in gate.weight_modules for module in gate.block.get_submodule(name).modules())
    return any(isinstance(module, nn.modules.conv._ConvNd) for module in modules)


def _cond_gate(gate: ResidualGate, kept: Tensor, m: Tensor, shortcut: Tensor, inputs: tuple[Any, ...]) -> Tensor:
    """``torch.cond(kept, shortcut + m f(x), shortcut)`` for a traced batch-drop gate, within torch 2.14's limits.

    - ``torch.cond`` refuses a branch that mutates state, so the buffers of the branch's modules
      (BatchNorm statistics) enter the cond as inputs (copies: cond keeps its inputs for the backward)
      and leave it as outputs: the kept branch runs on fresh copies through
      :func:`torch.func.functional_call` (BatchNorm updates those), the dropped branch returns them
      unchanged; the live buffers take the outputs afterwards, in the main graph. Integer buffers
      (``num_batches_tracked``) cross the cond as float64 (exact below 2**53).
    - The parameters cross it **flattened** (``reshape(-1)``: views) and the branch runs on views of them
      with their shapes back, through ``functional_call``. ``torch.cond`` compares the stride order of its
      two branches' outputs (in its backward: the gradients of its inputs) and rejected strides that
      differ only on a dimension of size 1, though they describe the same memory ("The sorted order of
      strides of the two branches' output doesn't match": depthwise weights ``(C, 1, k, k)``, 1 x 1
      convolution weights). A one-dimensional dense tensor has one layout.
    - Inductor compiles the cond's subgraphs for the layouts their inputs had when traced, but its layout
      optimization (on by default; always taken for convolutions on CPU) lays the 4-D tensors next to
      convolutions out channels_last in the main graph and passed them as they were: the first compiled
      forward failed (``assert_size_stride``; a block input also read by a convolution in the shortcut, a
      BatchNorm output in EfficientNet, and, once those blocks kept their cond, the blocks after them).
      The 4-D activations of a block registered before a convolution of the model (in its branch or
      after it: Inductor's rule reaches every tensor that feeds a convolution, PoolFormer's pooling
      branches included) therefore cross the cond in channels_last, the layout Inductor gives them (a
      copy only where it did not: another backend, or no layout optimization), and its output leaves in
      channels_last; activations with a dimension of size 1 cross flattened (the stride order again); the
      others as they are (:func:`_activation_layout`).
    - ``m_l`` crosses as an operand, so that alike blocks trace to one branch graph and Inductor compiles
      their kernels once (indexed inside the branch, the block's index was a constant of its kernels).
    - The output leaves through :class:`_FixedLayoutGradient` (a copy, and its gradient in the traced layout).
    """
    names, live = gate.branch_buffers() if gate.holds_state else ([], [])
    params = gate.branch_parameters()
    layout = _activation_layout(gate, shortcut, inputs)
    # A convolution's backward gives its input's gradient in channels_last already; pinning it there too
    # costs copies (CifarResNet-56 at budget 0.5: 0.682 of the compiled plain step against 0.648).
    pin_gradients = layout == "channels_last" and not _has_convolution(gate)
    flatten = layout == "flat"
    # The branches close over sizes and dtypes, never over the branch's tensors (torch.cond would lift those as
    # extra operands, aliasing their flattened views), and over tuples, not torch.Size: sizes (symbolic under
    # dynamic shapes) are lifted one by one. The one tensor they close over is the handle's multipliers.
    dtype, shape = shortcut.dtype, tuple(shortcut.shape)
    shapes = [tuple(x.shape) if isinstance(x, Tensor) and flatten else None for x in inputs]
    param_shapes = [(name, tuple(p.shape)) for name, p in params.items()]
    buffer_types = [(name, tuple(b.shape), b.dtype) for name, b in zip(names, live)]
    carried = [b.to(torch.float64) if not b.is_floating_point() else b.clone() for b in live]
    counts = (len(inputs), len(params))

    def run(s: Tensor, m: Tensor, *args: Any) -> tuple[Tensor, ...]:
        xs = [x.view(size) if size is not None else x for x, size in zip(args[: counts[0]], shapes)]
        if pin_gradients:
            s = _InputLayoutGradient.apply(s)
            xs = [_InputLayoutGradient.apply(x) if isinstance(x, Tensor) else x for x in xs]
        ws = args[counts[0] : counts[0] + counts[1]]
        cs = args[counts[0] + counts[1] :]
        state = {name: w.view(size) for (name, size), w in zip(param_shapes, ws)}
        fresh = {name: c.view(size).to(kind, copy=True) for (name, size, kind), c in zip(buffer_types, cs)}
        out = torch.func.functional_call(gate.runner, {**state, **fresh}, tuple(xs), strict=False)
        new = ((s.view(shape) if flatten else s) + out * m).to(dtype)
        if layout == "channels_last":  # the two branches' outputs in one layout
            new = new.contiguous(memory_format=torch.channels_last)
        return (new.reshape(-1) if flatten else new, *(f.to(c.dtype).reshape(-1) for f, c in zip(fresh.values(), cs)))

    def skip(s: Tensor, m: Tensor, *args: Any) -> tuple[Tensor, ...]:
        if pin_gradients:
            s = _InputLayoutGradient.apply(s)
        return (s.clone(), *(c.clone() for c in args[counts[0] + counts[1] :]))  # outputs may not alias inputs

    def crossing(x: Tensor) -> Tensor:
        if flatten:
            return x.reshape(-1)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    # The shortcut is often an input too: it crosses once (two views of it would be aliased inputs, which
    # cond refuses), and its crossing is traced once. Matched with ``is``, not ``id()``: Dynamo before
    # torch 2.14 breaks the graph on ``id()`` of a tensor made inside it (the block's shortcut).
    crossed: list[tuple[Tensor, Tensor]] = []

    def crossed_once(x: Tensor) -> Tensor:
        for original, done in crossed:
            if original is x:
                return done
        crossed.append((x, crossing(x)))
        return crossed[-1][1]

    activations = [crossed_once(x) if isinstance(x, Tensor) else x for x in (shortcut, *inputs)]
    # m_l as a copy, not the view ``_train_multipliers[l]``: a gate nested in this branch (timm EdgeNeXt)
    # reads the multipliers, which torch.cond lifts as an input, and a view of them beside it would alias it.
    operands = (
        activations[0],
        m.clone(),
        *activations[1:],
        *(p.reshape(-1) for p in params.values()),
        *(c.reshape(-1) for c in carried),
    )
    result = torch.cond(kept, run, skip, operands)
    for buffer, new in zip(live, result[1:]):
        buffer.copy_(new.detach().view(buffer.shape))
    return _FixedLayoutGradient.apply(result[0].view(shape) if flatten else result[0])


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
    + ", or because ".join((_CHOSEN_ROUTE, _DYNAMIC_FLOATS))
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


def compiled_around_gates(root: nn.Module, handle: StochasticDepthHandle) -> bool:
    """Whether ``torch.compile`` wraps a module of ``root`` that holds a gated block: route 1, the model compiled whole.

    True when ``root`` or one of its submodules holding a block of ``handle`` is an ``OptimizedModule``
    (``torch.compile(module)``) or was compiled in place (``module.compile()``). Dynamo then traces those
    gates: a batch-drop gate runs its branch in ``torch.cond`` (route ``"cond"``), and the regions of
    :func:`compile_branches` are inlined into the model's graph instead of called, except where a gate
    decides outside the graph (route ``"graph_break"``). A model whose ``forward`` method alone was
    replaced by a compiled function is not seen.

    Example::

        >>> compiled_around_gates(model, handle)   # False
        >>> model.compile(); compiled_around_gates(model, handle)   # True
    """
    blocks = {id(gate.block) for gate in handle.gates}
    for module in root.modules():
        compiled = isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
        if compiled or getattr(module, "_compiled_call_impl", None) is not None:
            if any(id(inner) in blocks for inner in module.modules()):
                return True
    return False
