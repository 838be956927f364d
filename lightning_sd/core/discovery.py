"""Find the residual branches of a model, in forward order, without knowing its classes.

A residual branch is the part of a block whose output is added to the shortcut,
``y = shortcut(x) + f(x)`` (docs/discovery.md). Every module with
children is traced one level deep with ``torch.fx`` (its children are leaves) and its ``add`` nodes
are classified by these rules, in order:

1. **Drop-path slots decide.** A library stochastic-depth slot (timm ``DropPath``, torchvision
   ``StochasticDepth``, or an attribute named ``drop_path*``/``stochastic_depth`` that is
   ``Identity`` or ``None``) marks the branch: the add that consumes the slot's output is the residual
   add and the operand holding the slot is the branch, whatever ``drop_path_rate`` the model was built
   with. In a model that carries such slots they are the complete list: residual adds without a slot
   (conv position encodings, class-attention blocks, adds inside attention or re-parameterised convs)
   are passed over and reported, unless ``blocks=`` names them. A model whose slots all mark nothing
   (timm's ResNeSt drops the block input) is read by rule 2, its slots reported.
2. **Without slots** (torchvision ResNet/RegNet/MobileNet/ViT, user models) the shortcut must be the
   block input or a thin transform of it (identity, pooling, slicing, padding, or one 1x1
   projection/normalisation), and the branch is the weighted path added to it.
3. **Not residual**: an add whose other operand is not computed from the block input (a position
   embedding or a bias parameter), and a sum of parallel weighted paths with no identity path
   (re-parameterisation, NAS cells).
4. ``x + f(x) + g(x)`` is two branches on one identity; ``torch.add(x, f(x), alpha=a)`` is the branch
   ``a f(x)``; in-place updates (``out.mul_(gain)``) are followed.

A block whose forward cannot be traced but carries slots is gated through its slots (the gate
multiplies the slot's input; no compute skipping), and so is a slot whose branch shares code with the
shortcut (slice residuals ``cat([x[:, :C] + shortcut, x[:, C:]])``) or holds several dropped paths
(timm's parallel blocks). Whatever stays uncertain (slots called on something that is not added to a
shortcut, untraceable modules that look residual) is reported in one warning naming the ``blocks=``
fix; ``strict=True`` raises instead. :func:`describe_branches` prints the whole picture.

The analysis of a block is cached per class and configuration, so a model made of repeated blocks is
traced once per kind of block.
"""

from __future__ import annotations

import inspect
import operator
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import torch
import torch.fx as fx
from torch import nn
from typing_extensions import override

__all__ = [
    "DiscoveryReport",
    "ResidualBranch",
    "describe_branches",
    "find_residual_branches",
    "is_drop_path_slot",
]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
_META_METHODS = {"size", "dim", "numel", "get_device", "type_as"}
#: Attribute names that hold a drop-path slot in timm and torchvision blocks.
SLOT_NAME = re.compile(r"(?:\w*_)?drop_path\d*|stochastic_depth")


def is_drop_path_slot(module: nn.Module | None, name: str | None = None) -> bool:
    """Whether ``module`` (held under attribute ``name``) is a library stochastic-depth slot.

    True for timm ``DropPath`` and torchvision ``StochasticDepth``, and, when ``name`` is given, for
    an ``nn.Identity`` held as ``drop_path*``/``stochastic_depth`` (what timm builds when the block's
    rate is 0).
    """
    if module is None:
        return False
    cls = type(module)
    if (cls.__name__ == "DropPath" and cls.__module__.startswith("timm.")) or (
        cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision.")
    ):
        return True
    return name is not None and type(module) is nn.Identity and SLOT_NAME.fullmatch(name.rsplit(".", 1)[-1]) is not None


def _slot_attrs(module: nn.Module) -> tuple[list[str], list[str]]:
    """Direct slot children of ``module`` (module slots, ``None`` slots), by attribute name."""
    slots, nones = [], []
    for n, child in module._modules.items():
        if child is None:
            if SLOT_NAME.fullmatch(n):
                nones.append(n)
        elif is_drop_path_slot(child, n):
            slots.append(n)
    for n, v in module.__dict__.items():
        if v is None and n not in module._modules and SLOT_NAME.fullmatch(n):
            nones.append(n)
    return slots, nones


@dataclass(frozen=True)
class ResidualBranch:
    """One residual branch ``f_l`` (one "block" for stochastic depth).

    Attributes:
        name: unique name, the block's module name, with ``.branch{i}`` appended when the block's
            forward holds several residual adds (a transformer block: ``blocks.0.branch0`` is the
            attention branch, ``blocks.0.branch1`` the MLP branch).
        block: qualified name of the module whose forward computes the residual add (``""`` = root).
        index_in_block: position of this add among the block's residual adds.
        modules: qualified names of the submodules computed only for this branch.
        skippable: whether a dropped branch skips its compute (False: the gate stands in the slot).
        slot: qualified name of the library drop-path slot of the branch, if any.
        shortcut: what the branch is added to: ``"identity"`` (the block input, possibly pooled,
            sliced or reshaped), ``"projection"`` (a downsample/1x1 projection of it), ``"residual"``
            (the output of an earlier residual add of the same block), ``"transform"`` (another
            transform of the input, accepted because a drop-path slot marks the branch) or
            ``"slot"`` (gated through the slot only).
    """

    name: str
    block: str
    index_in_block: int
    modules: tuple[str, ...]
    skippable: bool = True
    slot: str | None = None
    shortcut: str = "identity"


@dataclass
class _AddPlan:
    add: fx.Node
    shortcut: fx.Node
    branch: fx.Node
    nodes: list[fx.Node]  # exclusive branch nodes, graph order (nested gated adds included)
    externals: list[fx.Node]  # nodes outside the branch that it reads, graph order
    slots: tuple[str, ...] = ()  # slot attributes (relative) neutralised while gated
    kind: str = "identity"
    slot: str | None = None  # the slot of this branch (relative)


@dataclass
class BlockPlan:
    name: str
    module: nn.Module
    graph: fx.Graph | None  # None: gated through its slots only
    adds: list[_AddPlan] = field(default_factory=list)
    slot_names: list[str] = field(default_factory=list)  # slot-only gates (relative names)
    none_slots: list[str] = field(default_factory=list)  # None slot attributes that get a module while gated


@dataclass(frozen=True)
class PassedOver:
    """A residual-looking add (or slot) that got no gate, and why."""

    where: str
    reason: str
    cls: str = ""  # class of the module (for grouping repeated blocks in the printout)
    node: str = ""  # the add's node name in that class's forward, if an add


@dataclass
class DiscoveryReport:
    """What :func:`describe_branches` found: gated branches and what was passed over.

    Attributes:
        branches: the :class:`ResidualBranch` list that :func:`find_residual_branches` returns.
        classes: class name of each branch's block.
        passed_over: adds and slots that look residual but got no gate, with the reason.
        uncovered: drop-path slots called in a forward on something that is not added to a shortcut,
            or untraceable modules that look residual: what the discovery warning lists.
        slot_mode: True when the model carries drop-path slots (they are then the complete list).
    """

    model: str
    branches: list[ResidualBranch]
    classes: list[str]
    passed_over: list[PassedOver]
    uncovered: list[PassedOver]
    slot_mode: bool

    def __str__(self) -> str:
        lines = [
            f"{self.model}: {len(self.branches)} residual branches "
            f"({sum(b.skippable for b in self.branches)} skippable, {sum(not b.skippable for b in self.branches)} slot-only); "
            + ("drop-path slots mark the branches" if self.slot_mode else "no drop-path slots: found by structure")
        ]
        if self.branches:
            rows = [("#", "branch", "class", "shortcut", "mode", "modules")]
            for i, (b, c) in enumerate(zip(self.branches, self.classes)):
                prefix = f"{b.block}." if b.block else ""
                mods = [m[len(prefix):] if m.startswith(prefix) else m for m in b.modules]
                shown = ", ".join(mods) if mods else (b.slot or "")
                if len(shown) > 70:
                    shown = shown[:67] + "..."
                rows.append((str(i + 1), b.name, c, b.shortcut, "skip" if b.skippable else "slot", shown))
            widths = [max(len(r[k]) for r in rows) for k in range(5)]
            for r in rows:
                lines.append("  " + "  ".join(r[k].ljust(widths[k]) for k in range(5)) + "  " + r[5])
        for title, items in (("passed over", self.passed_over), ("not covered", self.uncovered)):
            if not items:
                continue
            lines.append(f"{title} ({len(items)}):")
            groups: dict[tuple[str, str, str], list[str]] = {}
            for p in items:
                key = (p.cls, p.node, p.reason) if p.cls else (p.where, "", p.reason)
                groups.setdefault(key, []).append(p.where.split(" (")[0])
            for (cls, node, reason), wheres in groups.items():
                if len(wheres) == 1:
                    where = next(p.where for p in items if p.where.split(" (")[0] == wheres[0])
                    lines.append(f"  {where}: {reason}")
                else:
                    lines.append(f"  {cls} add '{node}' in {len(wheres)} modules ({wheres[0]}, ..., {wheres[-1]}): {reason}")
        return "\n".join(lines)


class _ShallowTracer(fx.Tracer):
    """Traces one module's own forward; every child module is a leaf call."""

    @override
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return True


# ----------------------------------------------------------------------------------------- graph


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_meta(node: fx.Node) -> bool:
    """Nodes that read only shapes/dtypes: no data flows through them."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
        return True
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_meta(node.args[0])
    return False


_MISSING = object()


def _trace(module: nn.Module, none_slots: Sequence[str]) -> fx.Graph:
    """The shallow graph of ``module``, with ``None`` slots traced as ``Identity``, normalised."""
    saved = {n: module.__dict__.pop(n, None) for n in none_slots if n not in module._modules}
    added = [n for n in none_slots if n not in module._modules or module._modules[n] is None]
    for n in added:
        module._modules[n] = nn.Identity()
    # fx runs the forward with proxies for inputs and parameters, but buffers read as attributes are
    # real tensors: an in-place update of one (timm's BatchNormAct2d: num_batches_tracked.add_(1)) would
    # really happen. Discovery must not change the model: the buffers are put back as they were.
    # (Inference tensors cannot be updated in place outside inference mode: nothing to put back.)
    buffers = [(b, b._version, b.clone()) for b in module.buffers() if not b.is_inference()]
    # Likewise the block's own Python attributes: a forward that counts its calls or keeps its last input
    # (``self.calls += 1``, ``self.last = x``) would keep what the trace set, an fx Proxy among them.
    # Shallow: an attribute's object mutated in place (a list appended to) is not put back.
    attrs = {k: v for k, v in module.__dict__.items() if not k.startswith("_")}
    try:
        graph = _ShallowTracer().trace(module)
    finally:
        with torch.no_grad():
            for buffer, version, value in buffers:
                if buffer._version != version:
                    buffer.copy_(value)
        for k in [k for k in module.__dict__ if not k.startswith("_") and k not in attrs]:
            del module.__dict__[k]
        for k, v in attrs.items():
            if module.__dict__.get(k, _MISSING) is not v:
                module.__dict__[k] = v
        for n in added:
            del module._modules[n]
        for n, v in saved.items():
            module.__dict__[n] = v
        for n in none_slots:
            if n not in module._modules and n not in module.__dict__:
                module.__dict__[n] = None
    _normalise(graph)
    return graph


def _normalise(graph: fx.Graph) -> None:
    """Unused shape reads removed, in-place updates followed, ``alpha`` folded into the operand."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and node.op == "call_function" and node.target in (getattr, operator.getitem):
                graph.erase_node(node)
                changed = True
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        # ``out.mul_(g)`` returns ``out``: later readers of ``out`` read the updated value.
        if (
            node.op == "call_method"
            and isinstance(node.target, str)
            and node.target.endswith("_")
            and not node.target.endswith("__")
            and node.args
            and isinstance(node.args[0], fx.Node)
        ):
            target = node.args[0]
            for user in list(target.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(target, node)
        # ``torch.add(a, b, alpha=k)`` is ``a + k * b``.
        if _is_add(node) and "alpha" in node.kwargs and len(node.args) >= 2:
            alpha = node.kwargs["alpha"]
            with graph.inserting_before(node):
                scaled = graph.call_function(operator.mul, (node.args[1], alpha))
            node.args = (node.args[0], scaled, *node.args[2:])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
    graph.lint()


def _data_ancestors(node: fx.Node, cache: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """Ancestors through which data flows (shape reads do not carry data)."""
    if node in cache:
        return cache[node]
    result: set[fx.Node] = set()
    stack = [] if _is_meta(node) else list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in result:
            continue
        result.add(n)
        if not _is_meta(n):
            stack.extend(n.all_input_nodes)
    cache[node] = frozenset(result)
    return cache[node]


def _exclusive_nodes(root: fx.Node, add: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes computed only to produce ``root`` (including it): all their users are inside the set."""
    if any(u is not add for u in root.users):
        return set()
    anc: set[fx.Node] = set()
    stack = list(root.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in anc:
            anc.add(n)
            stack.extend(n.all_input_nodes)
    members = {root}
    for n in sorted(anc, key=order.__getitem__, reverse=True):
        if n.op in ("placeholder", "output"):
            continue
        if n.users and all(u in members for u in n.users):
            members.add(n)
    return members


# ------------------------------------------------------------------------------ block analysis

_PROJ_LEAVES = (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.pooling._AvgPoolNd,
                nn.modules.pooling._MaxPoolNd, nn.Identity, nn.modules.instancenorm._InstanceNorm)


def _child_info(child: nn.Module) -> tuple[bool, bool, int]:
    """(has weights, is a 1x1 projection/normalisation, number of conv/linear layers) of a child."""
    has_w = next(child.parameters(), None) is not None
    proj, layers = True, 0
    for m in child.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            layers += 1
            if any(k != 1 for k in m.kernel_size) or m.groups != 1:
                proj = False
        elif isinstance(m, nn.Linear):
            layers += 1
        elif next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None:
            if not isinstance(m, _PROJ_LEAVES):
                proj = False
                layers += 1
    return has_w, proj and has_w, layers


@dataclass
class _Analysis:
    """Result of analysing one block's graph (names relative to the block): shared by same-kind blocks."""

    graph: fx.Graph | None
    adds: list[_AddPlan]
    slot_only: list[str]  # relative slot names gated through the slot
    passed: list[tuple[str, str]]  # (relative where, reason)
    uncovered: list[tuple[str, str]]
    unclaimed: tuple[str, ...]  # relative nested slots left for an ancestor (Sequential owners only)
    untraceable: bool = False
    slots_called: bool = False


def _simple(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) or x is None for x in v)


def _signature(module: nn.Module, slot_mode: bool, child_unclaimed: dict[str, tuple[str, ...]]) -> tuple[Any, ...] | None:
    try:
        attrs = tuple(sorted((k, v) for k, v in module.__dict__.items() if not k.startswith("_") and k != "training" and _simple(v)))
        hash(attrs)
    except TypeError:
        return None
    children = tuple((n, type(c), None if c is None else _child_info(c)) for n, c in module._modules.items())
    params = tuple((n, p is None) for n, p in module._parameters.items())
    buffers = tuple(module._buffers)
    return (type(module), slot_mode, attrs, children, params, buffers, tuple(sorted(child_unclaimed.items())))


def lookup_attribute(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _BlockAnalyser:
    """Classifies the adds of one traced block."""

    def __init__(self, module: nn.Module, graph: fx.Graph, slot_mode: bool, child_unclaimed: dict[str, tuple[str, ...]]):
        self.module = module
        self.graph = graph
        self.slot_mode = slot_mode
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.placeholders = {n for n in self.nodes if n.op == "placeholder"}
        # Forward arguments that default to None: the trace assumed they are passed.
        self.optional = {n for n in self.placeholders if n.args and n.args[0] is None}
        self.uncovered: list[tuple[str, str]] = []
        self.cache: dict[fx.Node, frozenset[fx.Node]] = {}
        self.direct_slots, nones = _slot_attrs(module)
        self.none_slots = set(nones)
        self.direct_slots_all = set(self.direct_slots) | self.none_slots
        self.child_unclaimed = child_unclaimed
        self.child_info: dict[str, tuple[bool, bool, int]] = {}
        self.ident: dict[fx.Node, bool] = {}
        self.accepted_adds: set[fx.Node] = set()

    # -- node properties
    def info(self, target: str) -> tuple[bool, bool, int]:
        if target not in self.child_info:
            if target in self.none_slots:  # traced as Identity
                self.child_info[target] = (False, False, 0)
            else:
                self.child_info[target] = _child_info(self.module.get_submodule(target))
        return self.child_info[target]

    def weighted(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return self.info(str(n.target))[0]
        if n.op == "get_attr":
            return isinstance(lookup_attribute(self.module, str(n.target)), nn.Parameter)
        return False

    def slots_of(self, n: fx.Node) -> list[str]:
        """Slots (relative names) a call node runs: itself, or unclaimed slots nested in a Sequential child."""
        if n.op != "call_module":
            return []
        t = str(n.target)
        if t in self.direct_slots_all:
            return [t]
        if "." in t and is_drop_path_slot(self.module.get_submodule(t), t):  # ``self.attns[0].drop_path(x)``
            return [t]
        return [f"{t}.{s}" for s in self.child_unclaimed.get(t, ())]

    def _compute_ident(self) -> None:
        """Which nodes are the block input (or an earlier residual output) through weight-free transforms."""
        ident: dict[fx.Node, bool] = {}
        for n in self.nodes:
            if n.op == "placeholder" or n in self.accepted_adds:
                res = True
            elif n.op in ("get_attr", "output") or self.weighted(n) or _is_meta(n):
                res = False
            else:
                data = [a for a in n.all_input_nodes if not _is_meta(a)]
                res = (
                    bool(data)
                    and any(ident.get(a, False) for a in data)
                    and all(ident.get(a, False) or (a.op == "get_attr" and not self.weighted(a)) for a in data)
                )
            ident[n] = res
        self.ident = ident

    def is_ident(self, n: fx.Node) -> bool:
        """The block input (or an earlier residual output), through weight-free transforms only."""
        return self.ident.get(n, False)

    def drops_input(self, n: fx.Node) -> bool:
        """Whether slot call ``n`` is applied to the block input itself: then it marks no residual.

        ResNeSt applies ``x = drop_path(x)`` before the downsample: it drops the input, not a branch.
        """
        data = [a for a in n.args[:1] if isinstance(a, fx.Node)]
        return bool(data) and self.is_ident(data[0])

    def is_proj(self, root: fx.Node, excl: set[fx.Node]) -> bool:
        """One projection (a single conv/linear layer, with its norm and pooling) of the block input."""
        calls = [n for n in excl if self.weighted(n)]
        if len(calls) != 1 or calls[0].op != "call_module" or self.info(str(calls[0].target))[2] > 1:
            return False
        data = [a for a in calls[0].all_input_nodes if not _is_meta(a)]
        return bool(data) and all(self.is_ident(a) for a in data)

    def thin_sources(self, node: fx.Node) -> set[fx.Node]:
        """Nodes that ``node`` is computed from through weight-free operations (itself included)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or _is_meta(n):
                continue
            seen.add(n)
            if not self.weighted(n) and n not in self.accepted_adds:
                stack.extend(n.all_input_nodes)
        return seen

    def reads_input(self, excl: set[fx.Node]) -> bool:
        """The branch is computed from the block input (not from an intermediate shared with other paths)."""
        return any(self.is_ident(i) for n in excl for i in n.all_input_nodes if i not in excl and not _is_meta(i))

    def depth(self, excl: set[fx.Node]) -> int:
        total = 0
        for n in excl:
            if n.op == "call_module" and self.weighted(n):
                total += max(1, self.info(str(n.target))[2])
            elif n.op == "get_attr" and self.weighted(n):
                total += 1
        return total

    def from_input(self, n: fx.Node) -> bool:
        return n.op == "placeholder" or bool(self.placeholders & _data_ancestors(n, self.cache))

    # -- the rules
    def run(self, explicit: bool = False) -> _Analysis:
        self._compute_ident()
        adds: list[_AddPlan] = []
        passed: list[tuple[str, str]] = []
        claimed_nodes: set[fx.Node] = set()  # slot calls inside accepted branches
        slot_only: list[str] = []
        multi = False
        for node in self.nodes:
            if not _is_add(node):
                continue
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) != 2 or operands[0] is operands[1]:
                continue
            a, b = operands
            where = node.name
            if not (self.from_input(a) and self.from_input(b)):
                if self.from_input(a) or self.from_input(b):
                    passed.append((where, "one operand is not computed from the block input (a position embedding or bias)"))
                continue
            excl = {a: _exclusive_nodes(a, node, self.order), b: _exclusive_nodes(b, node, self.order)}
            slot_calls = {
                o: [n for n in excl[o] if self.slots_of(n) and n not in claimed_nodes and not self.drops_input(n)] for o in (a, b)
            }
            plan: _AddPlan | None = None
            if self.slot_mode and (slot_calls[a] or slot_calls[b]):
                if slot_calls[a] and slot_calls[b]:
                    passed.append((where, "both operands carry a drop-path slot (not a residual add)"))
                    continue
                br, sc = (a, b) if slot_calls[a] else (b, a)
                names = [s for n in slot_calls[br] for s in self.slots_of(n)]
                if len(names) > 1:
                    multi = True
                    slot_only.extend(s for s in names if s not in slot_only)
                    claimed_nodes.update(slot_calls[br])
                    continue
                kind = self._shortcut_kind(sc, excl[sc])
                plan = self._plan(node, sc, br, excl[br], kind, names[0])
            elif self.slot_mode and not explicit:
                reason = self._structural_reason(a, b, excl)
                if reason is None:
                    passed.append((where, _NO_SLOT + " (the model's slots are the complete list; name the block in blocks= to gate it)"))
                elif reason:
                    passed.append((where, reason))
                continue
            else:
                reason = self._structural_reason(a, b, excl)
                if reason is not None:
                    if reason.startswith("!"):
                        self.uncovered.append(("@" + where, reason[1:]))
                    elif reason:
                        passed.append((where, reason))
                    continue
                sc, br, kind = self._structural_choice
                plan = self._plan(node, sc, br, excl[br], kind, None)
            if plan is None:
                continue
            optional = [n.target for n in self.optional if n in self.thin_sources(plan.shortcut)]
            if optional and not explicit:
                self.uncovered.append(("@" + where, (
                    f"the shortcut is the forward argument '{optional[0]}' (default None): the block adds a tensor "
                    "its caller passes, and the traced form would fail when it is left out; not gated"
                )))
                continue
            adds.append(plan)
            self.accepted_adds.add(node)
            self._compute_ident()
            claimed_nodes.update(n for n in plan.nodes if self.slots_of(n))
        if self.slot_mode:
            # Slots consumed by no add: slice residuals (branch code shared with the shortcut), or
            # timm applying DropPath to something that is not added to a shortcut.
            for n in self.nodes:
                if n.op != "call_module" or not self.slots_of(n) or n in claimed_nodes or self.drops_input(n):
                    continue
                if self._feeds_residual(n, claimed_nodes):
                    multi = True
                    slot_only.extend(s for s in self.slots_of(n) if s not in slot_only)
        if multi:
            # Slot-only gates for the whole block (the slots of its accepted adds too, in graph order).
            calls = [n for n in self.nodes if n.op == "call_module" and self.slots_of(n)]
            keep = set(slot_only) | {p.slot for p in adds if p.slot}
            slot_only = list(dict.fromkeys(s for n in calls for s in self.slots_of(n) if s in keep))
            adds = []
        if not self.slot_mode and not explicit:
            # Within one forward, an add nested inside another add's branch belongs to the outer one.
            inner = {p.add for p in adds for q in adds if p is not q and p.add in q.nodes}
            adds = [p for p in adds if p.add not in inner]
        return _Analysis(self.graph, adds, slot_only, passed, list(self.uncovered), ())

    _structural_choice: tuple[fx.Node, fx.Node, str]

    def _shortcut_kind(self, sc: fx.Node, excl: set[fx.Node]) -> str:
        if sc in self.accepted_adds:
            return "residual"
        if self.is_ident(sc):
            return "residual" if any(n in self.accepted_adds for n in _data_ancestors(sc, self.cache)) else "identity"
        if self.is_proj(sc, excl):
            return "projection"
        return "transform"

    def _structural_reason(self, a: fx.Node, b: fx.Node, excl: dict[fx.Node, set[fx.Node]]) -> str | None:
        """None: residual (``self._structural_choice`` set); "": not residual, not worth reporting; else why not."""
        ia, ib = self.is_ident(a), self.is_ident(b)
        wa = any(self.weighted(n) for n in excl[a])
        wb = any(self.weighted(n) for n in excl[b])
        if ia and ib:
            return ""
        if ia or ib:
            sc, br = (a, b) if ia else (b, a)
            if not (wb if ia else wa):
                anc = _data_ancestors(br, self.cache)
                sliced = br.op in ("call_function", "call_method") and (
                    br.target in (operator.getitem, "narrow", torch.narrow) or br.target == "__getitem__"
                )
                if sliced and any(self.weighted(n) for n in anc - _data_ancestors(sc, self.cache)):
                    return (
                        "!the branch's output is also used outside the add (a slice residual x[:, :C] + shortcut "
                        "or a dual-path block), so the add cannot take a gate; put a timm DropPath or torchvision "
                        "StochasticDepth on the branch output and it is gated through that slot"
                    )
                return ""
            if not self.reads_input(excl[br]):
                return "the branch is computed from an intermediate shared with other paths, not from the block input"
            after_residual = sc in self.accepted_adds or any(n in self.accepted_adds for n in _data_ancestors(sc, self.cache))
            kind = "residual" if after_residual else "identity"
            self._structural_choice = (sc, br, kind)
            return None
        pa, pb = self.is_proj(a, excl[a]), self.is_proj(b, excl[b])
        if pa != pb:
            sc, br = (a, b) if pa else (b, a)
            entries = {n for n in excl[br] if self.weighted(n) and any(self.is_ident(i) for i in n.all_input_nodes)}
            if self.depth(excl[br]) >= 2 and len(entries) == 1:
                self._structural_choice = (sc, br, "projection")
                return None
        if not (wa or wb):
            return ""
        return "sum of parallel weighted paths without an identity path (re-parameterisation or NAS cell)"

    def _plan(self, add: fx.Node, sc: fx.Node, br: fx.Node, excl: set[fx.Node], kind: str, slot: str | None) -> _AddPlan | None:
        if not excl:
            return None
        if not any(self.weighted(n) for n in excl) and not any(self.slots_of(n) for n in excl):
            return None
        branch_nodes = sorted(excl, key=self.order.__getitem__)
        externals: list[fx.Node] = []
        for n in branch_nodes:
            for inp in n.all_input_nodes:
                if inp not in excl and inp not in externals:
                    externals.append(inp)
        externals.sort(key=self.order.__getitem__)
        slots = tuple(dict.fromkeys(s for n in branch_nodes for s in self.slots_of(n)))
        return _AddPlan(add, sc, br, branch_nodes, externals, slots, kind, slot)

    def _feeds_residual(self, slot_node: fx.Node, claimed: set[fx.Node]) -> bool:
        """The slot's output reaches one operand of an add whose other operand comes from the input alone."""
        for node in self.nodes:
            if not _is_add(node) or self.order[node] < self.order[slot_node]:
                continue
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) != 2:
                continue
            a, b = operands
            in_a = a is slot_node or slot_node in _data_ancestors(a, self.cache)
            in_b = b is slot_node or slot_node in _data_ancestors(b, self.cache)
            if in_a != in_b:
                other = b if in_a else a
                if self.from_input(other):
                    return True
        return False


def _looks_residual_source(module: nn.Module) -> bool:
    """For an untraceable module: does its forward's source add its input (or a shortcut) to something?"""
    try:
        src = inspect.getsource(type(module).forward)
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (OSError, TypeError, ValueError):
        return False
    names = [p for p in params[:1]] + ["shortcut", "identity", "residual", "skip"]
    for p in names:
        if re.search(rf"(\b{p}\b\s*\+(?!\+))|(\+\s*\b{p}\b)|(\b{p}\b\s*\+=)|(\+=\s*\b{p}\b)|add\(\s*{p}\b", src):
            return True
    return False


_CACHE: dict[tuple[Any, ...], _Analysis] = {}
_NO_SLOT = "residual add without a drop-path slot"


def _model_has_slots(model: nn.Module) -> bool:
    for module in model.modules():
        slots, nones = _slot_attrs(module)
        if slots or nones:
            return True
    return False


@dataclass
class _ModelAnalysis:
    plans: list[BlockPlan]
    passed: list[PassedOver]
    uncovered: list[PassedOver]
    slot_mode: bool
    candidates: list[str]  # modules with slot-less residual adds passed over in slot mode (regex blocks= may name them)
    slots_called: bool = False  # some traced forward calls a drop-path slot


def _analyse_module(module: nn.Module, slot_mode: bool, unclaimed: dict[str, tuple[str, ...]], explicit: bool) -> _Analysis:
    key = _signature(module, slot_mode, unclaimed)
    if key is not None:
        key = key + (explicit,)
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    slots, nones = _slot_attrs(module)
    try:
        graph = _trace(module, nones)
    except Exception:  # untraceable forward: only its drop-path slots can be taken over
        result = _Analysis(None, [], slots + nones, [], [], (), untraceable=True)
    else:
        result = _BlockAnalyser(module, graph, slot_mode, unclaimed).run(explicit)
        if slot_mode:
            used = {str(n.target) for n in graph.nodes if n.op == "call_module"}
            result.slots_called = bool(used & set(slots + nones)) or bool(result.slot_only)
            covered = set(result.slot_only) | {s for p in result.adds for s in p.slots}
            left = [s for s in slots + nones if s in used and s not in covered]
            if type(module).forward is nn.Sequential.forward:
                nested = tuple(left) + tuple(
                    f"{k}.{s}" for k, v in unclaimed.items() for s in v if f"{k}.{s}" not in covered
                )
                result = _Analysis(result.graph, result.adds, result.slot_only, result.passed, result.uncovered, nested,
                                   slots_called=result.slots_called)
            else:
                reason = "drop-path slot applied to something that is not added to a shortcut: left alone"
                result = _Analysis(
                    result.graph, result.adds, result.slot_only, result.passed, result.uncovered + [(s, reason) for s in left], (),
                    slots_called=result.slots_called,
                )
    if key is not None:
        _CACHE[key] = result
        if len(_CACHE) > 4096:
            _CACHE.pop(next(iter(_CACHE)))
    return result


def _analyse(model: nn.Module, names: Sequence[str] | None = None) -> _ModelAnalysis:
    """Plans for every module of ``model`` (or only ``names``) that computes residual adds."""
    if _model_has_slots(model):
        result = _analyse_mode(model, names, True)
        # Slots that no forward calls (timm's ConvBnAct without skip in an otherwise slot-less model)
        # do not make the slots the complete list.
        if result.plans or result.uncovered or result.slots_called:
            if not result.plans and names is None:
                # Every slot is applied to something that is not a branch (timm ResNeSt drops the block
                # input): they mark nothing, and the blocks are found by structure. The slots stay named.
                structural = _analyse_mode(model, None, False, slot_classes_are_blocks=True)
                if structural.plans:
                    gated = [p.name for p in structural.plans]
                    structural.uncovered = [_note_gated_block(item, gated) for item in result.uncovered] + structural.uncovered
                    return structural
            return result if names is not None else _without_fixed_zero_slots(model, result)
    return _analyse_mode(model, names, False)


_FIXED_ZERO = (
    "timm keeps this drop-path slot at rate 0 whatever drop_path_rate is (class attention, position encoding, "
    "hybrid backbone): timm never drops it; name the block in blocks= to gate it anyway"
)


def _without_fixed_zero_slots(model: nn.Module, result: _ModelAnalysis) -> _ModelAnalysis:
    """Pass over the branches whose slot timm never drops (see :mod:`lightning_sd.core.timm_placement`)."""
    from lightning_sd.core.timm_placement import timm_fixed_zero_slots

    fixed = timm_fixed_zero_slots(model)
    if not fixed:
        return result
    plans: list[BlockPlan] = []
    for plan in result.plans:
        prefix = f"{plan.name}." if plan.name else ""
        label = f"{plan.name or '<root>'} ({type(plan.module).__name__}"
        if plan.graph is None:
            keep = [s for s in plan.slot_names if prefix + s not in fixed]
            for s in plan.slot_names:
                if prefix + s in fixed:
                    result.passed.append(PassedOver(f"{label}, slot '{s}')", _FIXED_ZERO, type(plan.module).__name__, s))
            if keep:
                plans.append(BlockPlan(plan.name, plan.module, None, slot_names=keep,
                                        none_slots=[s for s in plan.none_slots if s in keep]))
        else:
            keep_adds = [a for a in plan.adds if a.slot is None or prefix + a.slot not in fixed]
            for a in plan.adds:
                if a not in keep_adds:
                    result.passed.append(PassedOver(f"{label}, add '{a.add.name}')", _FIXED_ZERO, type(plan.module).__name__, a.add.name))
            if keep_adds:
                plans.append(BlockPlan(plan.name, plan.module, plan.graph, keep_adds, none_slots=plan.none_slots))
        if plan.name not in {p.name for p in plans} and plan.name not in result.candidates:
            result.candidates.append(plan.name)  # a regex blocks= may still name it
    result.plans = plans
    return result


def _analyse_mode(
    model: nn.Module, names: Sequence[str] | None, slot_mode: bool, slot_classes_are_blocks: bool = False
) -> _ModelAnalysis:
    """Plans in one mode (by drop-path slots, or by structure).

    ``slot_classes_are_blocks``: in the structural reading of a model whose slots mark nothing, a class
    that carries a drop-path slot is a residual block class by its author's word, so its projection
    shortcuts are trusted even where no instance adds the identity (timm resnest14d).
    """
    wanted = None if names is None else set(names)
    modules = list(model.named_modules(remove_duplicate=False))
    seen: set[int] = set()
    ordered = []
    for name, module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        ordered.append((name, module))
    results: dict[str, _Analysis] = {}
    unclaimed_of: dict[str, tuple[str, ...]] = {}
    for name, module in reversed(ordered):  # children before parents
        if next(iter(module.children()), None) is None and (wanted is None or name not in wanted):
            continue
        prefix = f"{name}." if name else ""
        child_unclaimed = {k[len(prefix):]: v for k, v in unclaimed_of.items() if k.startswith(prefix) and k != name}
        explicit = wanted is not None and name in wanted
        analysis = _analyse_module(module, slot_mode, child_unclaimed, explicit)
        results[name] = analysis
        if analysis.unclaimed:
            unclaimed_of[name] = analysis.unclaimed
    plans: list[BlockPlan] = []
    passed: list[PassedOver] = []
    uncovered: list[PassedOver] = []
    candidates: list[str] = []
    called = any(r.slots_called for r in results.values())
    for name, module in ordered:
        res = results.get(name)
        if res is None:
            continue
        prefix = f"{name}." if name else ""
        label = name or "<root>"
        _, nones = _slot_attrs(module)
        if res.untraceable:
            if res.slot_only:
                none_slots = [s for s in nones if s in res.slot_only]
                plans.append(BlockPlan(name, module, None, slot_names=list(res.slot_only), none_slots=none_slots))
            continue
        for where, reason in res.passed:
            passed.append(PassedOver(f"{label} ({type(module).__name__}, add '{where}')", reason, type(module).__name__, where))
            if reason.startswith(_NO_SLOT) and name not in candidates:
                candidates.append(name)
        for where, reason in res.uncovered:
            if where.startswith("@"):  # an add node
                cls = type(module).__name__
                uncovered.append(PassedOver(f"{label} ({cls}, add '{where[1:]}')", reason, cls, where[1:]))
            else:  # a slot
                uncovered.append(PassedOver(prefix + where, reason))
        if res.slot_only:
            plans.append(BlockPlan(name, module, None, slot_names=list(res.slot_only),
                                    none_slots=[s for s in nones if s in res.slot_only]))
        elif res.adds:
            plans.append(BlockPlan(name, module, res.graph, list(res.adds), none_slots=list(nones)))
    if wanted is not None:
        return _ModelAnalysis([p for p in plans if p.name in wanted], passed, uncovered, slot_mode, candidates, called)
    # Structural mode: a block whose branch contains another found block is an outer wrapper; the
    # innermost blocks win. (With slots, each slot names its own branch and nesting is the model's.)
    if not slot_mode:
        names_found = [p.name for p in plans]
        kept = []
        for plan in plans:
            inner = False
            for add in plan.adds:
                for mod in _branch_modules(plan.name, add):
                    if any(b == mod or b.startswith(mod + ".") for b in names_found if b != plan.name):
                        inner = True
            if inner:
                reason = "its branch contains residual blocks found inside it (the inner blocks are gated)"
                passed.append(PassedOver(plan.name or "<root>", reason))
            else:
                kept.append(plan)
        plans = kept
    gated = {p.name for p in plans}
    # A projection shortcut (downsample) is trusted in a class whose other instances add the identity
    # (ResNet, RegNet, SENet); alone it is a sum of two weighted paths (a NAS cell, a re-parameterised conv).
    if not slot_mode:
        with_identity = {type(p.module) for p in plans if any(a.kind != "projection" for a in p.adds)}
        if slot_classes_are_blocks:
            with_identity |= {type(p.module) for p in plans if any(_slot_attrs(p.module))}
        kept = []
        for plan in plans:
            if type(plan.module) in with_identity or (wanted is not None and plan.name in wanted):
                kept.append(plan)
                continue
            adds = [a for a in plan.adds if a.kind != "projection"]
            for a in plan.adds:
                if a.kind == "projection":
                    passed.append(PassedOver(
                        f"{plan.name or '<root>'} ({type(plan.module).__name__}, add '{a.add.name}')",
                        cls=type(plan.module).__name__,
                        node=a.add.name,
                        reason="projection shortcut in a class that never adds its input unchanged: a sum of two weighted "
                        "paths (NAS cell or re-parameterised conv); name it in blocks= if it is a residual block",
                    ))
            if adds:
                kept.append(BlockPlan(plan.name, plan.module, plan.graph, adds, none_slots=plan.none_slots))
        plans = kept
        gated = {p.name for p in plans}
    # Untraceable modules that look residual and are covered by no gate.
    if not slot_mode:
        for name, module in ordered:
            res = results.get(name)
            if res is None or not res.untraceable or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                continue
            if any(g == name or g.startswith(f"{name}.") or not name or name.startswith(f"{g}.") or not g for g in gated):
                continue
            if _looks_residual_source(module):
                uncovered.append(PassedOver(
                    name, f"{type(module).__name__}.forward cannot be traced by torch.fx and seems to add its input"
                ))
    return _ModelAnalysis(plans, passed, uncovered, slot_mode, candidates, called)


def _branch_modules(block_name: str, plan: _AddPlan) -> tuple[str, ...]:
    prefix = f"{block_name}." if block_name else ""
    return tuple(dict.fromkeys(prefix + str(n.target) for n in plan.nodes if n.op == "call_module"))


def _branches_of(plan: BlockPlan) -> list[ResidualBranch]:
    prefix = f"{plan.name}." if plan.name else ""
    base = plan.name if plan.name else "<root>"
    if plan.graph is None:
        multi = len(plan.slot_names) > 1
        return [
            ResidualBranch(
                name=f"{base}.branch{i}" if multi else base,
                block=plan.name,
                index_in_block=i,
                modules=(),
                skippable=False,
                slot=prefix + slot,
                shortcut="slot",
            )
            for i, slot in enumerate(plan.slot_names)
        ]
    multi = len(plan.adds) > 1
    return [
        ResidualBranch(
            name=f"{base}.branch{i}" if multi else base,
            block=plan.name,
            index_in_block=i,
            modules=_branch_modules(plan.name, add),
            skippable=True,
            slot=prefix + add.slot if add.slot else None,
            shortcut=add.kind,
        )
        for i, add in enumerate(plan.adds)
    ]


_GATED_BY_STRUCTURE = "; the block holding it is gated by structure"


def _note_gated_block(item: PassedOver, gated: Sequence[str]) -> PassedOver:
    """``item`` (a slot), saying so where the block that holds it got a gate by structure (ResNeSt)."""
    if any(item.where.startswith(f"{name}.") for name in gated):
        return replace(item, reason=item.reason + _GATED_BY_STRUCTURE)
    return item


def _fix_hint(items: Sequence[PassedOver]) -> str:
    if all(item.reason.endswith(_GATED_BY_STRUCTURE) for item in items):
        return (
            "Their blocks are gated (describe_branches(model) lists them); the slots themselves keep the rate "
            "the model was built with (build it with drop_path_rate=0 to leave only the gates). strict=True turns "
            "this warning into an error."
        )
    return (
        "If these are residual branches you want gated, name their blocks explicitly, e.g. "
        "blocks=['<module name>'] or a regex over module names (see describe_branches(model)); "
        "strict=True turns this warning into an error."
    )


def _report_uncovered(model: nn.Module, analysis: _ModelAnalysis, strict: bool) -> None:
    if not analysis.uncovered:
        return
    shown = analysis.uncovered[:20]
    more = len(analysis.uncovered) - len(shown)
    msg = (
        f"stochastic-depth discovery in {type(model).__name__} left {len(analysis.uncovered)} residual-looking "
        f"place(s) without a gate:\n" + "\n".join(f"  {p.where}: {p.reason}" for p in shown)
        + (f"\n  ... and {more} more" if more > 0 else "")
        + "\n" + _fix_hint(analysis.uncovered)
    )
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)


def select_branches(
    model: nn.Module, blocks: str | Sequence[str] | None, strict: bool = False
) -> tuple[list[BlockPlan], list[ResidualBranch]]:
    """Plans and branches for ``blocks`` (None: automatic; str: regex; list: module or branch names)."""
    if blocks is None:
        analysis = _analyse(model)
        _report_uncovered(model, analysis, strict)
        return analysis.plans, [b for p in analysis.plans for b in _branches_of(p)]
    if isinstance(blocks, str):
        try:
            pattern = re.compile(blocks)
        except re.error as err:
            raise ValueError(f"blocks={blocks!r} is not a valid regular expression: {err}") from None
        analysis = _analyse(model)
        plans = analysis.plans
        # Blocks passed over automatically (slot-less residual adds) can be named by the pattern too.
        extra = [n for n in analysis.candidates if pattern.fullmatch(n) and n not in {p.name for p in plans}]
        if extra:
            order = {n: i for i, (n, _) in enumerate(model.named_modules())}
            plans = sorted(plans + _analyse(model, extra).plans, key=lambda p: order[p.name])
        selected_plans, branches = [], []
        for plan in plans:
            chosen = [b for b in _branches_of(plan) if pattern.fullmatch(b.name) or pattern.fullmatch(b.block)]
            if chosen:
                selected_plans.append(_restrict(plan, chosen))
                branches.extend(chosen)
        if not branches:
            found = ", ".join(b.name for p in analysis.plans for b in _branches_of(p)[:1])
            raise ValueError(
                f"blocks={blocks!r} matches no residual branch (the pattern must match a whole block or branch "
                f"name). Branches found automatically: {found[:500] or 'none'}."
            )
        return selected_plans, branches
    names = list(blocks)
    if not names:
        raise ValueError("blocks=[] names nothing; pass module names such as ['layer1.0'] or a regex, or None")
    modules = dict(model.named_modules())
    block_names, branch_names = [], []
    for n in names:
        if n in modules:
            block_names.append(n)
        elif re.fullmatch(r".+\.branch\d+", n) and n.rsplit(".", 1)[0] in modules:
            block_names.append(n.rsplit(".", 1)[0])
            branch_names.append(n)
        else:
            raise ValueError(
                f"blocks names {n!r}, which is not a module of {type(model).__name__}. Use qualified module "
                "names from model.named_modules() (e.g. 'layer1.0'), or 'block.branchK' for one branch."
            )
    plan_of = {p.name: p for p in _analyse(model, block_names).plans}
    selected_plans, branches = [], []
    for bname in dict.fromkeys(block_names):
        if bname not in plan_of:
            raise ValueError(
                f"blocks names {bname!r} ({type(modules[bname]).__name__}), but its forward computes no residual "
                "add x + f(x) that could be traced. Name the module whose forward adds the branch to the shortcut."
            )
        plan = plan_of[bname]
        all_b = _branches_of(plan)
        wanted = [b for b in all_b if b.name in branch_names] or (
            all_b if not any(x.rsplit(".", 1)[0] == bname for x in branch_names) else []
        )
        missing = [x for x in branch_names if x.rsplit(".", 1)[0] == bname and x not in {b.name for b in all_b}]
        if missing:
            raise ValueError(f"blocks names {missing}, but {bname!r} has branches {[b.name for b in all_b]}")
        selected_plans.append(_restrict(plan, wanted))
        branches.extend(wanted)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    selected_plans.sort(key=lambda p: order[p.name])
    branches = [b for p in selected_plans for b in branches if b.block == p.name]
    return selected_plans, branches


def _restrict(plan: BlockPlan, chosen: list[ResidualBranch]) -> BlockPlan:
    idx = {b.index_in_block for b in chosen}
    if plan.graph is None:
        slots = [s for i, s in enumerate(plan.slot_names) if i in idx]
        return BlockPlan(plan.name, plan.module, None, slot_names=slots, none_slots=[s for s in plan.none_slots if s in slots])
    return BlockPlan(plan.name, plan.module, plan.graph, [a for i, a in enumerate(plan.adds) if i in idx], none_slots=plan.none_slots)


def find_residual_branches(
    model: nn.Module, blocks: str | Sequence[str] | None = None, *, strict: bool = False
) -> list[ResidualBranch]:
    r"""The residual branches of ``model`` in forward order (module definition order, then graph order).

    Args:
        model: any ``nn.Module``: torchvision, timm, the package's reference models or your own.
        blocks: ``None`` finds every residual branch automatically (the rules in the module
            docstring); a string is a regular expression that must match a whole block name
            (``r"layer[34]\..*"``) or branch name; a list names modules (``["layer1.0", "layer1.1"]``)
            whose forward computes ``x + f(x)``, or single branches (``"blocks.0.branch1"``). Named
            blocks are gated even where the automatic rules pass them over.
        strict: raise instead of warning when discovery leaves drop-path slots or residual-looking
            untraceable modules without a gate.

    Returns:
        list of :class:`ResidualBranch`, one per gate that :func:`inject_stochastic_depth` would add.

    Raises:
        ValueError: ``strict=True`` and something residual-looking stays uncovered; or ``blocks``
            names nothing.

    Example::

        >>> import torchvision
        >>> len(find_residual_branches(torchvision.models.resnet18()))
        8
    """
    _, branches = select_branches(model, blocks, strict)
    return branches


def describe_branches(
    model: nn.Module, blocks: str | Sequence[str] | None = None, *, file: TextIO | None = sys.stdout
) -> DiscoveryReport:
    """Print and return what stochastic depth would gate in ``model``, and what it passes over.

    One row per branch: block, class, shortcut kind (identity / projection / residual / transform /
    slot), ``skip`` (a dropped branch is not computed) or ``slot`` (the gate multiplies the slot's
    input), and the branch's modules; then the adds passed over and why, and anything left uncovered
    (what :func:`find_residual_branches` warns about).

    Args:
        model: any ``nn.Module`` (build it on ``torch.device("meta")`` to inspect without weights).
        blocks: as in :func:`find_residual_branches`.
        file: where to print (``None``: do not print).

    Returns:
        a :class:`DiscoveryReport` (``str(report)`` is the printed table).

    Example::

        >>> report = describe_branches(torchvision.models.resnet18(), file=None)
        >>> len(report.branches), report.branches[2].shortcut
        (8, 'projection')
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans, branches = select_branches(model, blocks)
    analysis = _analyse(model)
    modules = dict(model.named_modules())
    report = DiscoveryReport(
        model=type(model).__name__,
        branches=branches,
        classes=[type(modules[b.block]).__name__ for b in branches],
        passed_over=analysis.passed,
        uncovered=analysis.uncovered,
        slot_mode=analysis.slot_mode,
    )
    del plans
    if file is not None:
        print(report, file=file)
    return report
