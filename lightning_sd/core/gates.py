"""Gates on residual branches: the multiplier ``m_l``, mask sampling and compute skipping.

:func:`inject_stochastic_depth` rewrites each block found by :mod:`lightning_sd.core.discovery` so
that ``shortcut + f_l(x)`` becomes ``gate_l(shortcut, inputs)``. The gate owns the branch's code:

- training, ``drop="batch"``: one Bernoulli(p_l) draw per block per step; a dropped branch is **not
  computed**, forward or backward (Huang et al. 2016); a kept one is scaled by ``1/p_l``
  (``scaling="inverted"``) or 1 (``"expected"``).
- training, ``drop="sample"``: a per-example mask as timm's ``DropPath``; every branch is computed.
- evaluation: ``shortcut + f_l(x)`` (``"inverted"``, the plain network) or ``shortcut + p_l f_l(x)``
  (``"expected"``, the paper's convention).
- :meth:`StochasticDepthHandle.override`: explicit multipliers ``m`` of shape ``(L,)`` or
  ``(B, L)``, differentiable, for sensitivities, regularization terms and normality probes.

Parameters of a skipped branch get an exact zero gradient (one autograd node per forward, whose backward
returns zeros for every dropped branch), so every parameter takes part in every backward: DDP with
``find_unused_parameters=False`` works, and single-process and multi-process runs update the same parameters.
Gates hold no state in ``state_dict``: an injected model saves and loads the plain model's keys. A
whole injected model pickles (``torch.save(model)``, multiprocessing spawn) and copies (``copy.deepcopy``,
EMA, SWA) into a model with its own live gates and handle (rates, drop, scaling, seed, position in the
mask stream); ``remove()`` on the copy restores the copy only.

Under ``torch.compile`` the gates read masks and rates as tensor data (no graph per mask pattern), and
:meth:`StochasticDepthHandle.compile` compiles each branch as a region: see
:mod:`lightning_sd.core.compilation`.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import Tensor, nn
from typing_extensions import override

from lightning_sd.core.compilation import (
    COMPILE_ROUTES,
    compile_branches,
    disable_with_reason,
    traced_gate_forward,
    traced_slot_forward,
    warn_untested_torch,
)
from lightning_sd.core.discovery import BlockPlan, ResidualBranch, lookup_attribute, select_branches
from lightning_sd.core.drop_kinds import DROP_KIND_CLASSES, DropKind, mask_generator
from lightning_sd.core.validation import (
    DROP_KINDS,
    SCALINGS,
    check_choice,
    check_inverted_rates,
    check_seed,
    resolve_survival,
)

__all__ = [
    "DROP_KINDS",
    "SCALINGS",
    "ResidualGate",
    "SlotGate",
    "StochasticDepthHandle",
    "existing_handle",
    "inject_stochastic_depth",
    "mask_generator",
    "probe_gates",
]

_GATE_PREFIX = "_sd_gate"


def _walk(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` through the ``_modules`` dicts (falls back to it for anything unusual)."""
    child = root._modules.get(path)  # a direct child, the usual case (a dotted path is never a key)
    if child is not None:
        return child
    module = root
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:
            return root.get_submodule(path)
        module = child
    return module


def _holds(tensors: Iterable[Tensor], tensor: Tensor) -> bool:
    """Whether ``tensor`` is one of ``tensors`` (identity).

    ``is``, not ``id()``: this runs while Dynamo traces a ``torch.cond`` branch, where the buffers are
    tensors made in the graph, and Dynamo before torch 2.14 breaks the graph (fatal inside ``torch.cond``)
    on ``id()`` of such a tensor.
    """
    return any(t is tensor for t in tensors)


def _parameter_at(block: nn.Module, name: str) -> Tensor:
    """The parameter ``name`` (``"gamma"``, ``"attn.scale"``) of ``block``, through the ``_modules`` and ``_parameters`` dicts.

    A fraction of the cost of ``get_parameter``, which also refuses what it finds inside the
    ``torch.func.functional_call`` of an enclosing gate's traced branch (a residual nested in another, timm
    EdgeNeXt), where parameters are plain tensors.
    """
    owner, _, attr = name.rpartition(".")
    found = (_walk(block, owner) if owner else block)._parameters.get(attr)
    return found if found is not None else block.get_parameter(name)


def _broadcast_over_batch(m: Tensor, like: Tensor) -> Tensor:
    return m.reshape((m.shape[0],) + (1,) * (like.ndim - 1))


class _GateBase(nn.Module):
    """Shared plumbing: index l, a reference to the handle (not a submodule), no state_dict entries."""

    handle: StochasticDepthHandle  # in __dict__, so nn.Module.__getattr__ never sees it
    #: Left out in evaluation (``handle.prune``, :mod:`lightning_sd.core.pruning`): the block returns its shortcut.
    pruned: bool = False

    def __init__(self, index: int, handle: StochasticDepthHandle) -> None:
        super().__init__()
        self.index = index
        self.__dict__["handle"] = handle  # plain reference: not a child module, not in state_dict

    @override
    def extra_repr(self) -> str:
        return f"index={self.index}, p={float(self.handle.survival[self.index]):.4f}"

    def _multiplier(self, branch_out: Tensor) -> Tensor | float | None:
        """``m_l`` for this call, or None when the branch is dropped for the whole batch."""
        handle, index = self.handle, self.index
        if handle._override is not None:
            m = handle._override
            if m.ndim == 1:
                return m[index]
            return _broadcast_over_batch(m[:, index], branch_out)
        if not self.training:
            if self.pruned:
                return 0.0
            return handle._p[index] if handle.scaling == "expected" else 1.0
        kind = handle.drop_kind
        if kind.dropped(index):
            return None
        return kind.multiplier(index, handle._p, handle.scaling, branch_out)


class ResidualGate(_GateBase):
    """Replaces ``shortcut + f_l(x)`` in a traced block; calls the branch only when it is kept.

    Args:
        index: block number l - 1 (forward order).
        handle: the :class:`StochasticDepthHandle` holding rates and masks.
        branch: the branch's code, bound to its block, taking the branch's external inputs.
        block: the module that owns the branch's submodules (for zero-gradient touches).
        weight_modules: names (relative to ``block``) of the branch's submodules.
        weight_attrs: names of parameters read directly by the branch (``get_attr``).
    """

    branch: Callable[..., Tensor]
    block: nn.Module
    runner: _BranchRunner
    #: Whether a convolution of the model is registered in or after this gate's block (set at injection;
    #: True for gates pickled before it existed): under ``torch.compile`` the gate's 4-D activations then
    #: cross ``torch.cond`` in channels_last (see :func:`lightning_sd.core.compilation._activation_layout`).
    precedes_convolution: bool = True

    def __init__(
        self,
        index: int,
        handle: StochasticDepthHandle,
        branch: Callable[..., Tensor],
        block: nn.Module,
        weight_modules: Sequence[str],
        weight_attrs: Sequence[str],
    ) -> None:
        super().__init__(index, handle)
        self.__dict__["branch"] = branch
        self.__dict__["block"] = block
        self.weight_modules = tuple(weight_modules)
        self.weight_attrs = tuple(weight_attrs)
        #: The gate whose branch computes this gate's residual (a residual nested in another), or None.
        #: In ``__dict__``: not a submodule.
        self.__dict__["enclosing"] = None
        #: Whether the branch's modules hold buffers (BatchNorm statistics): under ``torch.compile`` they
        #: cross ``torch.cond`` as inputs and outputs (see :mod:`lightning_sd.core.compilation`).
        self.holds_state = any(True for name in self.weight_modules for _ in block.get_submodule(name).buffers())
        #: The branch as a module whose tree holds the block (``torch.func.functional_call`` swaps its parameters and buffers).
        self.__dict__["runner"] = _BranchRunner(self)

    def branch_buffers(self) -> tuple[list[str], list[Tensor]]:
        """Names (as seen from :attr:`runner`) and tensors of the buffers of the branch's modules, looked up now."""
        names: list[str] = []
        tensors: list[Tensor] = []
        for name in self.weight_modules:
            for buffer_name, buffer in _walk(self.block, name).named_buffers():
                if not _holds(tensors, buffer):
                    names.append(f"block.{name}.{buffer_name}")
                    tensors.append(buffer)
        return names, tensors

    def branch_parameters(self) -> dict[str, Tensor]:
        """The branch's parameters by name as seen from :attr:`runner` (``block.conv1.weight``), looked up now."""
        params: dict[str, Tensor] = {}
        block = self.block
        for name in self.weight_modules:
            for param_name, param in _walk(block, name).named_parameters():
                if not _holds(params.values(), param):
                    params[f"block.{name}.{param_name}"] = param
        for name in self.weight_attrs:
            weight = _parameter_at(block, name)
            if not _holds(params.values(), weight):
                params[f"block.{name}"] = weight
        return params

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_compiled", None)  # compiled code neither pickles nor copies: copies run the plain branch
        state.pop("_direct", None)  # rebuilt at the first call
        return state

    def branch_target(self, compiled: bool = True) -> tuple[Callable[..., Tensor], tuple[Any, ...]]:
        """``(fn, args)`` with ``fn(*args, *inputs)`` the branch: its generated code and the block.

        Identical blocks share ``fn`` (one code object), so ``torch.compile`` compiles them once.
        With ``compiled=True`` and after :meth:`StochasticDepthHandle.compile`, ``fn`` is the compiled code.
        """
        regions = self.__dict__.get("_compiled")
        if compiled and regions is not None:
            return regions[0], regions[2]
        branch = self.branch
        if isinstance(branch, functools.partial) and isinstance(branch.func, _GeneratedFunction) and not branch.keywords:
            return branch.func._fn, tuple(branch.args)
        return branch, ()

    def set_compiled(self, plain: Callable[..., Tensor], region: Callable[..., Tensor], args: tuple[Any, ...]) -> None:
        """Run the branch through compiled code: ``plain(*args, *inputs)`` and ``region(shortcut, m, *args, *inputs)``."""
        self.__dict__["_compiled"] = (plain, region, tuple(args))
        self.__dict__.pop("_direct", None)

    def _call_branch(self, *inputs: Any) -> Tensor:
        regions = self.__dict__.get("_compiled")
        if regions is None:
            return self.branch(*inputs)
        return regions[0](*regions[2], *inputs)

    def _weights(self) -> list[Tensor]:
        """The branch's parameters, looked up now.

        Looked up at every call (modules and parameters may be replaced after injection: SyncBatchNorm,
        pruning, ``load_state_dict(assign=True)``), through the ``_modules`` dicts: a fraction of the cost
        of ``get_submodule(...).parameters()`` for the usual leaf modules.
        """
        block = self.block
        weights: list[Tensor] = []
        for name in self.weight_modules:
            module = _walk(block, name)
            if module._modules:
                weights.extend(module.parameters())
            else:
                weights += [w for w in module._parameters.values() if w is not None]
        if self.weight_attrs:
            weights += [_parameter_at(block, name) for name in self.weight_attrs]
        return weights

    def _skip(self, shortcut: Tensor) -> Tensor:
        # Never the shortcut itself: ``shortcut + f(x)`` is a new tensor, and an in-place op after the gate
        # (``out.mul_(2)``, ``ReLU(inplace=True)``) must not write into the block's input.
        handle = self.handle
        if not handle.zero_gradients_in_graph or not torch.is_grad_enabled() or handle._zero_touch == handle._draws:
            # Zero gradients given after the backward, or no graph, or the zero-gradient node of this step's
            # dropped branches is already in it (and its backward has not run yet): a copy.
            return shortcut.clone()
        weights = handle._dropped_weights()
        if not weights:
            return shortcut.clone()
        handle._zero_touch = handle._draws
        return _ZeroGradients.apply(handle, shortcut, *weights)

    @override
    def forward(self, shortcut: Tensor, *inputs: Any) -> Tensor:
        handle = self.handle
        if handle._override is None:
            if torch.compiler.is_compiling():
                traced = traced_gate_forward(self, shortcut, inputs)  # masks and rates as data, not guards
                if traced is not None:
                    return traced
            elif self.training and handle.drop_kind.skips_compute:
                # Eager batch drop, the common training call, in as few Python frames as possible: a gate
                # costs more than a small block otherwise. Same values as forward_outside_graph.
                index = self.index
                if not handle.drop_kind.kept[index]:  # type: ignore[attr-defined]
                    if handle.skip_compute:
                        return self._skip(shortcut)
                else:
                    branch = self.__dict__.get("_direct") or self._direct_branch()
                    if branch is not None:  # None with compiled regions: their add and scaling run inside
                        return _add_scaled(shortcut, branch(*inputs), handle._kept_scale[index])
        return self.forward_outside_graph(shortcut, *inputs)

    def _direct_branch(self) -> Callable[..., Tensor] | None:
        """The branch without the pickling wrapper (``partial(generated code, block)``), cached; None with regions."""
        if "_compiled" in self.__dict__:
            return None
        fn, args = self.branch_target(compiled=False)
        direct = functools.partial(fn, *args) if args else fn
        self.__dict__["_direct"] = direct
        return direct

    def forward_outside_graph(self, shortcut: Tensor, *inputs: Any) -> Tensor:
        """The eager gate: the decision in Python, the branch through :meth:`StochasticDepthHandle.compile`'s regions if any."""
        handle = self.handle
        if handle._override is not None:  # explicit multipliers (probes): every branch runs
            return self._combine(shortcut, self._call_branch(*inputs))
        if not self.training:
            if self.pruned:
                return shortcut.clone()  # pruned for inference: the branch is not called (a copy: see _skip)
            return _add_scaled(shortcut, self._call_branch(*inputs), handle._p[self.index] if handle.scaling == "expected" else 1.0)
        kind, index = handle.drop_kind, self.index
        if kind.dropped(index):
            if handle.skip_compute:
                return self._skip(shortcut)
            # Masking without skipping (FSDP, DeepSpeed): same value, every rank runs every block.
            return shortcut + self._call_branch(*inputs) * 0.0
        if shortcut.ndim > 0:
            rows = kind.rows(index, shortcut.shape[0], handle._p, shortcut.device)
            if rows is not None:  # the branch runs on these rows only (drop="subset")
                return self._on_rows(shortcut, inputs, rows)
        regions = self.__dict__.get("_compiled")
        if regions is not None and kind.skips_compute:
            # kept, with compiled regions: the add and the scaling run inside the compiled code
            return regions[1](shortcut, handle._train_multipliers[index], *regions[2], *inputs)
        out = self._call_branch(*inputs)
        return _add_scaled(shortcut, out, kind.multiplier(index, handle._p, handle.scaling, out))

    def _combine(self, shortcut: Tensor, out: Tensor) -> Tensor:
        m = self._multiplier(out)
        return _add_scaled(shortcut, out, 1.0 if m is None else m)  # None: a sample-dropped call never gets here

    def _on_rows(self, shortcut: Tensor, inputs: tuple[Any, ...], rows: Tensor) -> Tensor:
        handle, batch = self.handle, shortcut.shape[0]
        # batch-first tensor inputs are cut to the rows; anything else (a mask, a scalar) passes as is
        picked = [x.index_select(0, rows) if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == batch else x for x in inputs]
        out = self._call_branch(*picked)
        scale = handle.drop_kind.row_scale(self.index, batch, rows.numel(), handle._p, handle.scaling)
        return shortcut.index_add(0, rows, out.to(shortcut.dtype), alpha=scale)


def _add_scaled(shortcut: Tensor, out: Tensor, m: Tensor | float) -> Tensor:
    """``shortcut + m * out``; a float ``m`` is one fused op (``torch.add(..., alpha=m)``: one autograd node, not two)."""
    if isinstance(m, Tensor):
        return shortcut + out * m
    if m == 1.0:
        return shortcut + out
    return torch.add(shortcut, out, alpha=m)


class _BranchRunner(nn.Module):
    """A gate's branch as a module: ``runner(*inputs)`` is the branch, ``runner.block`` its block.

    Not part of the model's module tree (the gate keeps it in ``__dict__``): no ``state_dict`` entries.
    """

    def __init__(self, gate: ResidualGate) -> None:
        super().__init__()
        self.__dict__["gate"] = gate
        self._modules["block"] = gate.block

    @override
    def forward(self, *inputs: Any) -> Tensor:
        return self.__dict__["gate"]._call_branch(*inputs)


class SlotGate(_GateBase):
    """Stands in a drop-path slot of a block whose forward cannot be traced: multiplies, never skips."""

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.handle._override is None and torch.compiler.is_compiling():
            traced = traced_slot_forward(self, x)
            if traced is not None:
                return traced
        m = self._multiplier(x)
        if m is None:
            return x * 0.0
        if isinstance(m, float) and m == 1.0:
            return x
        return x * m


class _ZeroGradients(torch.autograd.Function):
    """``shortcut`` unchanged; in backward, exact zero gradients for the parameters of the dropped branches.

    Every parameter then takes part in every backward (DDP with ``find_unused_parameters=False``), at
    the cost of one autograd node per step: the first skipped gate of a forward applies it to the
    parameters of every branch dropped at this step (``handle._dropped_weights()``), the others copy
    their shortcut. Its backward re-arms the handle, so that another forward under the same masks
    (SAM, LBFGS closures) gets a node of its own.
    """

    @staticmethod
    def forward(ctx: Any, handle: StochasticDepthHandle, shortcut: Tensor, *weights: Tensor) -> Tensor:
        ctx.handle = handle
        ctx.weights = weights  # parameters: referenced, not saved (no version check, no copy)
        return shortcut.clone()  # a new tensor, as `shortcut + 0` was: later in-place ops (ReLU) stay legal

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        ctx.handle._zero_touch = None
        # zeros_like keeps each parameter's layout (channels_last): AccumulateGrad takes the tensor as is
        return (None, grad, *map(torch.zeros_like, ctx.weights))


class _GeneratedFunction:
    """A function torch.fx generated from a graph, kept with its source so that it pickles.

    Plain generated functions cannot be pickled (``torch.save(model)``, multiprocessing spawn, MLflow's
    ``log_model``): pickle looks them up by name in a module. This keeps the source and its globals, and
    pickles as the source plus the import block torch.fx writes for its own ``GraphModule`` pickles
    (:func:`_import_block`); unpickling compiles the source again.
    ``copy.deepcopy`` shares the compiled code (it holds no module or tensor).
    """

    __slots__ = ("src", "label", "_globals", "_fn")

    def __init__(self, src: str, globals_: dict[str, Any], label: str) -> None:
        self.src = src
        self.label = label
        self._globals = dict(globals_)
        filename = f"<lightning_sd {label}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        namespace = dict(self._globals)
        exec(compile(src, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - code generated by torch.fx
        self._fn = namespace["forward"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        try:
            imports = _import_block(self._globals)
        except Exception as err:  # an object the generated code calls has no importable name
            raise pickle.PicklingError(
                f"cannot pickle the stochastic-depth forward of {self.label}: {err}. Define the functions "
                "this block calls at module level, or call handle.remove() before pickling."
            ) from err
        return (_function_from_source, (imports, self.src, self.label))

    def __deepcopy__(self, memo: dict[int, Any]) -> _GeneratedFunction:
        return self


def _import_block(globals_: dict[str, Any]) -> str:
    """Source that rebuilds the globals of generated code: torch.fx's import statements, strings as literals.

    The string globals are forward-reference annotations (a block defined under ``from __future__ import
    annotations``); :func:`torch.fx.graph_module._format_import_block` of torch 2.14 writes them, that of
    torch 2.11 raises on them, so they are written here and the rest is left to torch.fx.
    """
    from torch.fx.graph_module import _format_import_statement
    from torch.package import sys_importer

    lines = {
        f"{name} = {obj!r}" if isinstance(obj, str) else _format_import_statement(name, obj, sys_importer)
        for name, obj in globals_.items()
    }
    return "\n".join(sorted(lines))


def _function_from_source(imports: str, src: str, label: str) -> _GeneratedFunction:
    """Unpickle a :class:`_GeneratedFunction`: run its import block, compile its source again."""
    namespace: dict[str, Any] = {}
    exec(compile(imports, f"<lightning_sd {label} imports>", "exec", dont_inherit=True), namespace)  # noqa: S102
    namespace.pop("__builtins__", None)
    return _GeneratedFunction(src, namespace, label)


#: Generated functions by source: identical blocks share one function (one code object), so that
#: ``torch.compile`` compiles a block type once instead of once per block.
_INTERNED: dict[str, list[_GeneratedFunction]] = {}


def _compile_graph(graph: fx.Graph, label: str) -> _GeneratedFunction:
    code = graph.python_code(root_module="self")
    same = _INTERNED.setdefault(code.src, [])
    for fn in same:
        if fn._globals.keys() == code.globals.keys() and all(fn._globals[k] is v for k, v in code.globals.items()):
            return fn
    fn = _GeneratedFunction(code.src, code.globals, label)
    same.append(fn)
    return fn


def _rewrite(plan: BlockPlan, gate_names: list[str]) -> tuple[_GeneratedFunction, list[_GeneratedFunction]]:
    """New forward of the block (adds replaced by gate calls) and one function per branch.

    A residual add inside another branch of the same forward (timm's edgenext: the attention residual
    inside the block's outer residual) becomes a gate call inside the outer branch's function.
    """
    assert plan.graph is not None
    skip = {n for a in plan.adds for n in a.nodes}
    by_add = {a.add: (i, a) for i, a in enumerate(plan.adds)}

    def gate_call(graph: fx.Graph, env: dict[fx.Node, fx.Node], node: fx.Node) -> fx.Node:
        i, a = by_add[node]
        return graph.call_module(gate_names[i], (env[a.shortcut], *[env[e] for e in a.externals]))

    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in plan.graph.nodes:
        if node in skip:
            continue
        env[node] = gate_call(new, env, node) if node in by_add else new.node_copy(node, env.__getitem__)
    forward = _compile_graph(new, f"{plan.name or 'root'}.forward")
    branches = []
    for i, a in enumerate(plan.adds):
        members = set(a.nodes)
        nested = {n for b in plan.adds if b is not a and b.add in members for n in b.nodes}
        branch_graph = fx.Graph()
        branch_env: dict[fx.Node, fx.Node] = {}
        for k, e in enumerate(a.externals):
            branch_env[e] = branch_graph.placeholder(f"input_{k}")
        for n in a.nodes:
            if n in nested:
                continue
            if n in by_add:
                branch_env[n] = gate_call(branch_graph, branch_env, n)
            else:
                branch_env[n] = branch_graph.node_copy(n, branch_env.__getitem__)
        branch_graph.output(branch_env[a.branch])
        branches.append(_compile_graph(branch_graph, f"{plan.name or 'root'}.branch{i}"))
    return forward, branches


def _enclosing_adds(plan: BlockPlan) -> list[int | None]:
    """For each residual add of ``plan``, the innermost other add whose branch computes it, or None."""
    members = [set(a.nodes) for a in plan.adds]
    enclosing: list[int | None] = []
    for a in plan.adds:
        outer = [j for j, m in enumerate(members) if a.add in m and plan.adds[j] is not a]
        enclosing.append(min(outer, key=lambda j: len(members[j])) if outer else None)
    return enclosing


class StochasticDepthHandle:
    """What :func:`inject_stochastic_depth` returns: gates in forward order, rates, masks, removal.

    Attributes:
        branches: the :class:`ResidualBranch` of each gate, forward order.
        gates: the gate modules, ``gates[l - 1]`` for block l.
        drop: the drop kind's name (``"batch"``, ``"sample"`` or ``"subset"``).
        scaling: ``"inverted"`` or ``"expected"``.
        seed: base seed of the mask stream.
    """

    def __init__(self, model: nn.Module, branches: list[ResidualBranch], survival: Tensor, drop: str, scaling: str, seed: int) -> None:
        self.model = model
        self.branches = branches
        self.gates: list[_GateBase] = []
        #: The masks of the current step and how they apply (``DROP_KIND_CLASSES[drop]``).
        self.drop_kind: DropKind = DROP_KIND_CLASSES[drop](len(branches))
        self.scaling = scaling
        self.seed = int(seed)
        self._p = [float(x) for x in survival]  # the rates: float64 values, read by every gate call
        self._key: tuple[int, ...] = (0, 0)
        self._rank = 0
        self._override: Tensor | None = None
        self._auto_step = 0
        #: Mask draws so far, and the draw whose dropped branches have a zero-gradient node waiting for
        #: its backward (None: none waiting); see ``_ZeroGradients``.
        self._draws = 0
        self._zero_touch: int | None = None
        self._undo: list[Callable[[], None]] = []
        self.removed = False
        #: Whether a compiled model has said that a gate's branch runs eagerly (once per handle).
        self._warned_eager_branch = False
        #: Set while Dynamo traces a skipping batch-drop gate on a torch older than the tested one; the
        #: next ``resample`` (eager) warns once (see :func:`lightning_sd.core.compilation.warn_untested_torch`).
        self._traced_on_untested_torch = False
        self._warned_untested_torch = False
        #: Dropped branches (batch drop, training) are skipped; False multiplies them by 0 instead.
        self.skip_compute = True
        #: How the parameters of skipped branches get their zero gradients: True, from a node in the
        #: autograd graph (``_ZeroGradients``: DDP's reducer, parameter hooks and ``torch.autograd.grad``
        #: see them); False, from :meth:`fill_zero_gradients`, which the training loop calls after each
        #: backward (cheaper: no graph edge per parameter). StochasticDepth sets False on one device with
        #: automatic optimization.
        self.zero_gradients_in_graph = True
        #: Draw new masks at every training-mode forward (set by ``inject_stochastic_depth(auto_resample=)``).
        self.auto_resample = False
        #: How a batch-drop gate traced by ``torch.compile`` decides: ``"cond"`` or ``"graph_break"``
        #: (see :mod:`lightning_sd.core.compilation`).
        self._compile_route = "cond"
        self._specialize_full_depth = True
        self._rates_key: tuple[Any, ...] | None = None
        self._train_multipliers: Tensor = torch.ones(len(branches))
        self._eval_multipliers: Tensor = torch.ones(len(branches))
        self._refresh_rates()

    def _refresh_rates(self, device: torch.device | str | None = None) -> None:
        """What the gates read of the rates, rebuilt when the rates, the scaling or the device change.

        ``_train_multipliers[l]``: ``1 / p_l`` (inverted) or 1, the multiplier of a kept branch;
        ``_eval_multipliers[l]``: ``p_l`` (expected) or 1. fp32, on ``device`` once one is given: data,
        not guards, for gates traced by ``torch.compile``. ``_kept_scale[l]``: the same ``m_l`` as a
        float, for the eager gates. ``_all_kept``: every rate is 1 and :attr:`specialize_full_depth`; a
        traced batch-drop gate then adds its branch without ``torch.cond`` (a Python bool: Dynamo guards
        on it, two graph variants at most).
        """
        if device is None:
            device = self._train_multipliers.device if self._rates_key is not None else torch.device("cpu")
        key = (tuple(self._p), self.scaling, self._specialize_full_depth, str(device))
        if key == self._rates_key:
            return
        self._all_kept = self._specialize_full_depth and all(p == 1.0 for p in self._p)
        p = torch.tensor(self._p, dtype=torch.float64)
        ones = torch.ones_like(p)
        train = 1.0 / p if self.scaling == "inverted" else ones
        evaluation = p if self.scaling == "expected" else ones
        self._kept_scale = train.tolist()  # float64 m_l, exactly the Python floats 1.0 / p
        self._train_multipliers = train.float().to(device)
        self._eval_multipliers = evaluation.float().to(device)
        self._rates_key = key

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Derived rate state is rebuilt, not trusted: handles pickled (inside a model) by an older
        # version lack some of it.
        state.setdefault("_specialize_full_depth", True)
        state.setdefault("_warned_eager_branch", False)
        state.setdefault("_traced_on_untested_torch", False)
        state.setdefault("_warned_untested_torch", False)
        state.setdefault("zero_gradients_in_graph", True)
        kind = state["drop_kind"]
        if not hasattr(kind, "enclosing"):  # pickled before nesting was recorded: every block at the top
            kind.enclosing = [None] * kind.num_blocks
        self.__dict__.update(state)
        self._rates_key = None
        self._refresh_rates(self._train_multipliers.device)

    @property
    def specialize_full_depth(self) -> bool:
        """While every rate is 1, let a model compiled whole add the branches without ``torch.cond``.

        Nothing can be dropped then, and ``shortcut + f_l(x)`` is as fast as the plain compiled model
        (``torch.cond``'s backward recomputes each kept branch's forward). Dynamo guards on it: the first
        time the rates fall below 1, the ``torch.cond`` variant is compiled once (two graph variants at
        most). Set False when the rates start at 1 and will fall (a budget warm-up): one graph from the
        first step. :class:`~lightning_sd.callbacks.StochasticDepth` sets it False for its ``"warmup"``
        and ``"pld"`` schedules below budget 1. Default True.
        """
        return self._specialize_full_depth

    @specialize_full_depth.setter
    def specialize_full_depth(self, value: bool) -> None:
        self._specialize_full_depth = bool(value)
        self._refresh_rates()

    @property
    def compile_route(self) -> str:
        """How a batch-drop gate traced by ``torch.compile`` decides: ``"cond"`` (default) or ``"graph_break"``.

        ``"cond"``: ``torch.cond`` on the mask, one graph for the whole model; buffers of the branch
        (BatchNorm statistics) are carried through the cond. ``"graph_break"``: the decision runs eagerly
        between compiled pieces (and the regions of :meth:`compile`); needed for branches that modify
        their inputs in place. See :mod:`lightning_sd.core.compilation`.
        """
        return self._compile_route

    @compile_route.setter
    def compile_route(self, route: str) -> None:
        check_choice("compile_route", route, COMPILE_ROUTES)
        self._compile_route = route

    def compile(self, **compile_kwargs: Any) -> int:
        """Compile each residual branch as its own region (``torch.compile(**compile_kwargs)``); the skip decision stays eager.

        PyTorch's regional-compilation recipe: identical blocks share one compiled graph, a dropped
        branch is not called, and neither the masks nor the rates cause a recompile (the multiplier
        ``m_l`` is a tensor input of the compiled region). Copies and unpickled models run the plain
        branches until ``compile`` is called on their handle. Drop-path slot gates stay eager.

        Args:
            **compile_kwargs: keyword arguments of :func:`torch.compile` (``backend``, ``mode``, ...).

        Returns:
            the number of distinct compiled branch functions (block types).

        Example::

            >>> handle = inject_stochastic_depth(model, 0.5)
            >>> handle.compile(mode="max-autotune-no-cudagraphs")
        """
        return compile_branches(self, **compile_kwargs)

    @property
    def num_blocks(self) -> int:
        """L, the number of gates."""
        return len(self.branches)

    @property
    def drop(self) -> str:
        """The drop kind's name: ``"batch"`` or ``"sample"``."""
        return self.drop_kind.name

    @property
    def survival(self) -> Tensor:
        """Current rates p_1..p_L (float32, CPU)."""
        return torch.tensor(self._p, dtype=torch.float32)

    @property
    def survival_float64(self) -> Tensor:
        """The rates exactly as masks are drawn from them (float64): what a checkpoint must keep."""
        return torch.tensor(self._p, dtype=torch.float64)

    def set_survival(self, survival: Sequence[float] | Tensor) -> None:
        """Set new rates (length L, in [0, 1]; no zero with ``scaling="inverted"``)."""
        p = resolve_survival(survival, self.num_blocks)
        check_inverted_rates(p, self.scaling)
        self._p = [float(x) for x in p]
        self._refresh_rates()

    @property
    def kept(self) -> Tensor:
        """Batch mask of the current step (bool, length L): which branches run. All True before a draw."""
        return self.drop_kind.kept_mask()

    def set_rank(self, rank: int) -> None:
        """Process rank, mixed into per-sample masks so that each rank masks its own examples differently."""
        self._rank = int(rank)

    def resample(
        self,
        step: int,
        micro_batch: int = 0,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw the masks for training step ``step`` (and micro-batch), from ``(seed, step, micro_batch)``.

        Batch drop: returns the kept mask (bool, length L), identical on every rank. Sample drop: the
        per-example multipliers (``delta`` or ``delta / p``, shape ``(batch_size, L)``, fp32) come from
        the same key and the rank; given ``batch_size`` (and ``device``) they are drawn here, outside
        the forward, so a ``torch.compile``-d model reads them as an input (no graph break, no
        recompile per step); otherwise at the first gate call.
        """
        self._draw(step, micro_batch, batch_size, device, warn_stacklevel=4)
        return self.kept

    def prefetch_masks(self, keys: Iterable[tuple[int, int]]) -> int:
        """Draw ahead what the masks of future steps need: ``keys = [(step, micro_batch), ...]`` (batch drop).

        A step's mask draw (``numpy.random.SeedSequence`` of its key, a seeded generator) costs tens of
        microseconds where it runs, between the steps of a training loop (cold caches), and a few in a
        loop of its own. A later :meth:`resample` of one of these keys takes what was drawn: the masks are
        those it would draw, as they depend on the key only (the rates of that step decide which blocks
        run). A key that never comes costs its draw; each call replaces what the last one drew ahead.
        :class:`~lightning_sd.callbacks.StochasticDepth` calls it every 32 steps with the keys the
        Trainer will use.

        Args:
            keys: ``(step, micro_batch)`` pairs, as :meth:`resample` will be called with.

        Returns:
            The number of keys drawn ahead; 0 for ``drop="sample"`` and ``"subset"``, whose masks need
            their step's batch size and device.

        Example::

            >>> handle.prefetch_masks([(s, 0) for s in range(step + 1, step + 33)])
        """
        pairs = [tuple(int(k) for k in key) for key in keys]
        wrong = [key for key in pairs if len(key) != 2]
        if wrong:
            raise ValueError(f"prefetch_masks takes (step, micro_batch) pairs, as resample is called with; got {wrong[0]!r}")
        return self.drop_kind.prefetch(self.seed, pairs)

    def _draw(
        self,
        step: int,
        micro_batch: int = 0,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        warn_stacklevel: int = 3,
    ) -> None:
        """:meth:`resample` without the copy of the mask it returns: what the training loops call at every step.

        ``warn_stacklevel``: where the untested-torch warning points (3: this method's caller).
        """
        self._key = (int(step), int(micro_batch))
        self._draws += 1
        if self._traced_on_untested_torch and not self._warned_untested_torch:
            warn_untested_torch(self, warn_stacklevel)
        self._refresh_rates(device)
        self.drop_kind.resample(
            seed=self.seed, key=self._key, rank=self._rank, rates=self._p, scaling=self.scaling, batch_size=batch_size, device=device
        )

    def prune(
        self,
        keep: float,
        by: str = "survival",
        *,
        sensitivities: Sequence[float] | Tensor | None = None,
        batches: Any = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> list[int]:
        """Keep ``round(keep * L)`` blocks in evaluation, the others return their shortcut; returns the kept blocks.

        ``by``: ``"sensitivity"`` (largest ``|S_l|``: ``sensitivities=`` or measured on ``batches`` with
        ``loss_fn``), ``"survival"`` (highest ``p_l``), ``"every_other"`` or ``"last"`` (the last blocks go).
        See :func:`lightning_sd.core.pruning.prune_blocks`; training is unchanged.
        """
        from lightning_sd.core.pruning import prune_blocks

        return prune_blocks(self, keep, by, sensitivities=sensitivities, batches=batches, loss_fn=loss_fn)

    def unprune(self) -> None:
        """Every block runs again in evaluation."""
        from lightning_sd.core.pruning import unprune_blocks

        unprune_blocks(self)

    @property
    def pruned(self) -> list[int]:
        """The blocks (0-based) left out in evaluation by :meth:`prune`."""
        return [i for i, gate in enumerate(self.gates) if gate.pruned]

    def _dropped_weights(self) -> list[Tensor]:
        """Parameters (requiring gradients) of the branches dropped for the whole batch at this step."""
        dropped = [self.gates[index] for index in self.drop_kind.dropped_blocks()]
        return [w for gate in dropped if isinstance(gate, ResidualGate) for w in gate._weights() if w.requires_grad]

    def fill_zero_gradients(self) -> int:
        """Give the parameters of the branches skipped at this step a zero gradient where they have none.

        With :attr:`zero_gradients_in_graph` False, call it after each backward (and before the optimizer
        step): a dropped branch's parameters then hold ``0`` instead of ``None``, as timm's ``DropPath``
        (multiplying by 0) would leave them, so that momentum and weight decay act on them as without
        skipping. A parameter that already has a gradient (accumulation, ``zero_grad(set_to_none=False)``)
        is left as is: adding 0 changes nothing. :class:`~lightning_sd.callbacks.StochasticDepth` calls it
        in ``on_after_backward`` on a single device with automatic optimization.

        Returns:
            The number of parameters that got a zero gradient.

        Example::

            >>> handle.zero_gradients_in_graph = False
            >>> loss.backward(); handle.fill_zero_gradients(); optimizer.step()
        """
        if not self.skip_compute or not self.drop_kind.skips_compute:
            return 0
        filled = 0
        for w in self._dropped_weights():
            if w.grad is None:
                w.grad = torch.zeros_like(w)
                filled += 1
        return filled

    def realized_depth(self) -> float:
        """Number of branches executed at the current step (batch drop) or their mean over examples (sample)."""
        return self.drop_kind.realized_depth()

    @contextlib.contextmanager
    def override(self, multipliers: Tensor) -> Iterator[None]:
        """Run the model with explicit multipliers ``m`` (shape ``(L,)`` or ``(B, L)``), in any mode.

        Every branch is computed; gradients flow to ``multipliers``. Used for sensitivities
        ``dLoss/dm_l`` (m = 1), regularization terms and Monte-Carlo masks.
        """
        if multipliers.ndim not in (1, 2) or multipliers.shape[-1] != self.num_blocks:
            raise ValueError(f"multipliers must have shape (L,) or (B, L) with L = {self.num_blocks}, got {tuple(multipliers.shape)}")
        previous = self._override
        self._override = multipliers
        try:
            yield
        finally:
            self._override = previous

    def reconfigure(
        self,
        survival: float | Sequence[float] | Tensor | Callable[[int], Tensor],
        *,
        drop: str | None = None,
        scaling: str | None = None,
        seed: int | None = None,
        auto_resample: bool | None = None,
    ) -> None:
        """Change rates, drop kind, scaling, seed and automatic resampling of live gates, all at once.

        Every argument is checked before anything changes (rates against the new scaling). The masks
        of the current step are reset (all branches kept until the next :meth:`resample`).
        """
        drop = self.drop if drop is None else drop
        scaling = self.scaling if scaling is None else scaling
        check_choice("drop", drop, DROP_KINDS)
        check_choice("scaling", scaling, SCALINGS)
        if seed is not None:
            check_seed(seed)
        p = resolve_survival(survival, self.num_blocks)
        check_inverted_rates(p, scaling)
        switched_to_subset = drop == "subset" and self.drop != "subset"
        self.drop_kind = DROP_KIND_CLASSES[drop](self.num_blocks)  # fresh masks: all kept until the next resample
        self._sync_nesting()
        self._draws += 1
        self.scaling = scaling
        if seed is not None:
            self.seed = int(seed)
        if auto_resample is not None:
            self.auto_resample = bool(auto_resample)
        self._p = [float(x) for x in p]
        self._refresh_rates()
        if switched_to_subset:
            _warn_if_branches_couple_examples(self)

    def reorder(self, order: Sequence[int]) -> None:
        """Renumber the blocks: new block ``l`` is old block ``order[l]`` (a permutation of 0..L-1).

        Rates, the current masks and the gates move with their branch; afterwards ``branches``,
        ``gates`` and ``survival`` list the blocks in the new order (e.g. the order of the forward's calls).
        """
        order = [int(i) for i in order]
        if sorted(order) != list(range(self.num_blocks)):
            raise ValueError(f"order must be a permutation of 0..{self.num_blocks - 1}, got {order}")
        self.branches = [self.branches[i] for i in order]
        self.gates = [self.gates[i] for i in order]
        for new, gate in enumerate(self.gates):
            gate.index = new
        self._p = [self._p[i] for i in order]
        self._refresh_rates()
        self.drop_kind.permute(order)
        self._sync_nesting()
        self._draws += 1

    def _sync_nesting(self) -> None:
        """Tell the drop kind which block's branch holds each nested block (after injection, reorder, reconfigure)."""
        position = {id(gate): i for i, gate in enumerate(self.gates)}
        outer = [gate.__dict__.get("enclosing") for gate in self.gates]
        self.drop_kind.enclosing = [None if o is None else position[id(o)] for o in outer]

    def _on_model_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the injected model: new masks (``auto_resample``), or a new zero-gradient node."""
        if not module.training or self._override is not None:
            return
        if self.auto_resample:
            _auto_resample(self, args)
        elif not torch.compiler.is_compiling():
            self._draws += 1  # another forward under the same masks: its skipped gates need their own zero-gradient node

    def remove(self) -> None:
        """Restore the original model: original forwards, drop-path slots, no gates."""
        if self.removed:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.removed = True
        self.model.__dict__.pop("_lightning_sd_handle", None)


_AUTO_RESAMPLE_REASON = (
    "lightning_sd: auto_resample=True draws the stochastic-depth masks in Python at every training forward "
    "(a graph break at the start of the model's forward). With torch.compile, draw them before the forward "
    "instead: inject_stochastic_depth(..., auto_resample=False) (or handle.auto_resample = False) and "
    "handle.resample(step, batch_size=..., device=...) before each step, as the StochasticDepth callback "
    "does; the model is then one graph (fullgraph=True works)"
)


@disable_with_reason(_AUTO_RESAMPLE_REASON)
def _auto_resample(handle: StochasticDepthHandle, args: tuple[Any, ...]) -> None:
    # Eager even inside a compiled model: one graph break, and the masks come from the same numpy stream
    # (traced, the draw would break the graph at every step of it).
    first = next((a for a in args if isinstance(a, Tensor)), None)
    batch = None if first is None or first.ndim == 0 else first.shape[0]
    handle._draw(handle._auto_step, batch_size=batch, device=None if first is None else first.device)
    handle._auto_step += 1


class _Undo:
    """One step of :meth:`StochasticDepthHandle.remove`, as data (not a closure).

    Data pickles, and ``copy.deepcopy`` re-targets it to the copied modules (a closure would undo the
    original model).
    """

    def __init__(
        self, kind: Literal["module", "attribute", "gate", "forward"], module: nn.Module, name: str, old: Any = None, had: bool = True
    ) -> None:
        self.kind, self.module, self.name, self.old, self.had = kind, module, name, old, had

    def __call__(self) -> None:
        if self.kind == "module":  # put the original submodule (drop-path slot) back, in the model's current mode
            current = self.module._modules.get(self.name)
            if isinstance(self.old, nn.Module):
                self.old.train(current.training if current is not None else self.module.training)
            self.module._modules[self.name] = self.old
        elif self.kind == "attribute":  # a ``None`` drop-path slot: back to a plain attribute
            self.module._modules.pop(self.name, None)
            self.module.__dict__[self.name] = self.old
        elif self.kind == "gate":  # take the gate out of its block
            self.module._modules.pop(self.name, None)
        elif self.had:  # "forward": the block's own instance forward, if it had one
            self.module.__dict__["forward"] = self.old
        else:
            self.module.__dict__.pop("forward", None)


def _set_module(root: nn.Module, qualname: str, new: nn.Module) -> Callable[[], None]:
    """Put ``new`` at ``qualname`` (a module or a ``None`` attribute); returns the undo."""
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if child in parent._modules:
        old = parent._modules[child]
        parent._modules[child] = new
        return _Undo("module", parent, child, old)
    old_attr = parent.__dict__.pop(child)  # a ``None`` slot attribute
    parent._modules[child] = new
    return _Undo("attribute", parent, child, old_attr)


def existing_handle(model: nn.Module) -> StochasticDepthHandle | None:
    """The live handle of an injected model, or None."""
    handle = model.__dict__.get("_lightning_sd_handle")
    if handle is not None and not handle.removed:
        return handle
    for module in model.modules():
        if isinstance(module, _GateBase) and not module.handle.removed:
            return module.handle
    return None


@contextlib.contextmanager
def probe_gates(model: nn.Module, blocks: str | Sequence[str] | None = None) -> Iterator[tuple[StochasticDepthHandle, bool]]:
    """The gates a probe runs through: the model's live handle, or temporary gates removed afterwards.

    Diagnostics (sensitivities, regularization terms, normality, gradient growth) accept a plain or an
    injected model; this yields ``(handle, temporary)``. Temporary gates have survival 1 and
    ``scaling="expected"`` (a plain forward) and never resample; probes drive them with
    :meth:`StochasticDepthHandle.override`.

    Raises:
        ValueError: ``blocks`` given for a model that already has gates (its gates decide the blocks).
    """
    handle = existing_handle(model)
    if handle is not None:
        if blocks is not None:
            raise ValueError(
                "the model already has stochastic-depth gates, so blocks= cannot choose other branches; "
                "drop blocks= (the existing gates are used) or call handle.remove() first."
            )
        yield handle, False
        return
    handle = inject_stochastic_depth(model, 1.0, scaling="expected", blocks=blocks, auto_resample=False)
    try:
        yield handle, True
    finally:
        handle.remove()


def inject_stochastic_depth(
    model: nn.Module,
    survival: float | Sequence[float] | Tensor | Callable[[int], Tensor],
    *,
    drop: str = "batch",
    scaling: str = "inverted",
    blocks: str | Sequence[str] | None = None,
    seed: int = 0,
    auto_resample: bool = True,
    strict: bool = False,
) -> StochasticDepthHandle:
    """Put a stochastic-depth gate on every residual branch of ``model``, in place.

    ``y_l = shortcut(y_{l-1}) + m_l f_l(y_{l-1})`` with ``m_l = delta_l`` (``"expected"``) or
    ``delta_l / p_l`` (``"inverted"``) in training, ``delta_l ~ Bernoulli(p_l)`` (Hayou et al. 2021, Eq. (1)).
    Injection is all-or-nothing: every check runs before the model is touched.

    Args:
        model: any residual model (torchvision, timm, the reference models, your own).
        survival: rates p_1..p_L: one float for all blocks, a sequence/tensor of length L, or a
            callable ``num_blocks -> rates`` (e.g. ``lambda L: survival_rates("linear", L, 0.5)``).
        drop: ``"batch"`` (one draw per block per step, dropped branches are skipped), ``"sample"``
            (per-example masks, nothing skipped) or ``"subset"`` (each branch runs on ``round(p_l B)``
            random examples); see :mod:`lightning_sd.core.drop_kinds`.
        scaling: ``"inverted"`` (training divides by p, evaluation runs the plain network) or
            ``"expected"`` (evaluation multiplies branch l by p_l).
        blocks: which branches, see :func:`~lightning_sd.find_residual_branches`.
        seed: base seed of the mask stream; masks of step s come from ``(seed, s, micro_batch)``.
        auto_resample: draw new masks at every training-mode forward of ``model`` (plain PyTorch
            loops). The Lightning callback turns this off and draws per step itself.
        strict: raise (instead of warning) when discovery leaves drop-path slots or residual-looking
            untraceable modules without a gate (see :func:`~lightning_sd.describe_branches`).

    Returns:
        a :class:`StochasticDepthHandle`.

    Example::

        >>> model = torchvision.models.resnet18()
        >>> handle = inject_stochastic_depth(model, lambda L: survival_rates("linear", L, 0.75))
        >>> handle.num_blocks
        8
        >>> handle.remove()  # the plain model again
    """
    check_choice("drop", drop, DROP_KINDS)
    check_choice("scaling", scaling, SCALINGS)
    if existing_handle(model) is not None:
        raise RuntimeError(
            f"{type(model).__name__} already has stochastic-depth gates; call handle.remove() first "
            "(or change the existing handle with set_survival / reconfigure)."
        )
    plans, branches = select_branches(model, blocks, strict)
    if not branches:
        raise ValueError(
            f"found no residual branch (a forward computing x + f(x)) in {type(model).__name__}. "
            "If your blocks use a form that cannot be traced, name them explicitly, e.g. "
            "blocks=['layer1.0', 'layer1.1'] or blocks=r'layer\\d\\.\\d+' (module names from model.named_modules())."
        )
    p = resolve_survival(survival, len(branches))
    check_inverted_rates(p, scaling)
    handle = StochasticDepthHandle(model, branches, p, drop, scaling, seed)
    handle.auto_resample = auto_resample

    # Build everything first (tracing and code generation can fail); mutate afterwards.
    index = 0
    actions: list[Callable[[], Callable[[], None]]] = []
    for plan in plans:
        prefix = f"{plan.name}." if plan.name else ""
        if plan.graph is None:
            for slot in plan.slot_names:
                gate: _GateBase = SlotGate(index, handle)
                gate.train(plan.module.training)
                handle.gates.append(gate)
                actions.append(functools.partial(_set_module, model, prefix + slot, gate))
                index += 1
            continue
        gate_names = [f"{_GATE_PREFIX}{i}" for i in range(len(plan.adds))]
        forward, branch_fns = _rewrite(plan, gate_names)
        block = plan.module
        # A ``None`` slot was traced as Identity: the rewritten forward calls it.
        neutral = list(dict.fromkeys([*plan.none_slots, *(s for a in plan.adds for s in a.slots)]))
        for slot in neutral:
            actions.append(functools.partial(_set_module, model, prefix + slot, nn.Identity()))
        plan_gates: list[ResidualGate] = []
        for gname, a, fn in zip(gate_names, plan.adds, branch_fns):
            mods = [str(n.target) for n in a.nodes if n.op == "call_module"]
            attrs = [
                str(n.target) for n in a.nodes if n.op == "get_attr" and isinstance(lookup_attribute(block, str(n.target)), nn.Parameter)
            ]
            gate = ResidualGate(index, handle, functools.partial(fn, block), block, list(dict.fromkeys(mods)), attrs)
            gate.train(block.training)
            plan_gates.append(gate)
            handle.gates.append(gate)
            actions.append(functools.partial(_add_gate, block, gname, gate))
            index += 1
        for gate, outer in zip(plan_gates, _enclosing_adds(plan)):
            gate.__dict__["enclosing"] = None if outer is None else plan_gates[outer]
        actions.append(functools.partial(_set_forward, block, functools.partial(forward, block)))

    _mark_gates_before_convolutions(model, handle.gates)
    handle._sync_nesting()
    done: list[Callable[[], None]] = []
    try:
        for act in actions:
            done.append(act())
        hook = model.register_forward_pre_hook(handle._on_model_forward)
        done.append(hook.remove)
    except BaseException:
        for undo in reversed(done):
            undo()
        raise
    handle._undo = done
    model.__dict__["_lightning_sd_handle"] = handle
    if drop == "subset":
        _warn_if_branches_couple_examples(handle)
    return handle


def _mark_gates_before_convolutions(model: nn.Module, gates: Sequence[_GateBase]) -> None:
    """Sets ``precedes_convolution`` of each residual gate: a convolution is registered in or after its block."""
    position: dict[int, int] = {}
    last = -1  # position of the last convolution
    for i, module in enumerate(model.modules()):
        position[id(module)] = i
        if isinstance(module, nn.modules.conv._ConvNd):
            last = i
    for gate in gates:
        if isinstance(gate, ResidualGate):
            gate.precedes_convolution = position[id(gate.block)] < last


def _warn_if_branches_couple_examples(handle: StochasticDepthHandle) -> None:
    """``drop="subset"`` runs a branch on part of the batch: BatchNorm there normalizes with the subset's statistics."""
    coupled = [
        branch.name
        for branch, gate in zip(handle.branches, handle.gates)
        if isinstance(gate, ResidualGate)
        and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            for name in gate.weight_modules
            for m in gate.block.get_submodule(name).modules()
        )
    ]
    if coupled:
        shown = ", ".join(coupled[:4]) + (f" and {len(coupled) - 4} more" if len(coupled) > 4 else "")
        warnings.warn(
            f"drop='subset': {len(coupled)} residual branch(es) contain BatchNorm ({shown}), which couples the examples "
            "of a batch: in training, each such branch normalizes with the statistics of its subset of round(p_l B) "
            "examples (and updates its running statistics from them), not of the whole batch. Use drop='batch' or "
            "drop='sample' to keep whole-batch statistics.",
            UserWarning,
            stacklevel=3,
        )


def _add_gate(block: nn.Module, name: str, gate: nn.Module) -> Callable[[], None]:
    block._modules[name] = gate
    return _Undo("gate", block, name)


def _set_forward(block: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    had = "forward" in block.__dict__
    old = block.__dict__.get("forward")
    block.__dict__["forward"] = forward
    return _Undo("forward", block, "forward", old, had)
