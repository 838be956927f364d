"""Find the residual branches of a model, in forward order, without knowing its classes.

A residual branch is the part of a block whose output is added to the shortcut,
``y = shortcut(x) + f(x)`` (DESIGN.md). Every module with children is traced one level deep with
``torch.fx`` (its children are leaves), and each ``add`` whose two operands both depend on the
module's inputs, one of them through weights (the branch) and the other not, or through fewer
weights (the shortcut), is a residual branch. This finds torchvision's BasicBlock/Bottleneck and the
blocks that carry ``torchvision.ops.StochasticDepth`` (ConvNeXt, EfficientNet, Swin, MaxViT, MViT),
timm's blocks with ``drop_path`` slots (also when the slot is ``Identity``), the package's reference
models and user-written blocks, with no registry. A transformer block holds two branches.

A block whose forward cannot be traced but which carries a drop-path slot (timm ``DropPath`` or
torchvision ``StochasticDepth``) is still found: its slot becomes the gate, without compute skipping.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

__all__ = ["ResidualBranch", "find_residual_branches", "is_drop_path_slot"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def is_drop_path_slot(module: nn.Module) -> bool:
    """Whether ``module`` is a library stochastic-depth layer (timm ``DropPath``, torchvision ``StochasticDepth``)."""
    cls = type(module)
    return (cls.__name__ == "DropPath" and cls.__module__.startswith("timm.")) or (
        cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision.")
    )


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
        skippable: whether a dropped branch skips its compute (False for the drop-path-slot fallback).
        slot: qualified name of the library drop-path slot inside the branch, if any.
    """

    name: str
    block: str
    index_in_block: int
    modules: tuple[str, ...]
    skippable: bool = True
    slot: str | None = None


@dataclass
class _AddPlan:
    add: fx.Node
    shortcut: fx.Node
    branch: fx.Node
    nodes: list[fx.Node]  # exclusive branch nodes, graph order
    externals: list[fx.Node]  # nodes outside the branch that it reads, graph order


@dataclass
class _BlockPlan:
    name: str
    module: nn.Module
    graph: fx.Graph | None  # None: slot fallback
    adds: list[_AddPlan] = field(default_factory=list)
    slot_names: list[str] = field(default_factory=list)  # fallback only


class _ShallowTracer(fx.Tracer):
    """Traces one module's own forward; every child module is a leaf call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return True


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return "alpha" not in node.kwargs
    return node.op == "call_method" and node.target in _ADD_METHODS and "alpha" not in node.kwargs


def _ancestors(node: fx.Node, cache: dict[fx.Node, frozenset[fx.Node]]) -> frozenset[fx.Node]:
    if node in cache:
        return cache[node]
    result: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in result:
            continue
        result.add(n)
        stack.extend(n.all_input_nodes)
    cache[node] = frozenset(result)
    return cache[node]


def _exclusive_nodes(root: fx.Node, add: fx.Node, order: dict[fx.Node, int], anc: frozenset[fx.Node]) -> set[fx.Node]:
    """Nodes computed only to produce ``root`` (including it): all their users are inside the set."""
    if any(u is not add for u in root.users):
        return set()
    members = {root}
    for n in sorted(anc, key=order.__getitem__, reverse=True):
        if n.op in ("placeholder", "output"):
            continue
        if n.users and all(u in members for u in n.users):
            members.add(n)
    return members


def _weight_count(nodes: set[fx.Node], module: nn.Module) -> int:
    count = 0
    for n in nodes:
        if n.op == "call_module":
            count += sum(p.numel() for p in module.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            obj = module
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, nn.Parameter):
                count += obj.numel()
    return count


def _has_slot(nodes: set[fx.Node], module: nn.Module) -> bool:
    return any(n.op == "call_module" and is_drop_path_slot(module.get_submodule(n.target)) for n in nodes)


def _trace(module: nn.Module) -> fx.Graph:
    graph = _ShallowTracer().trace(module)
    # Unused shape reads (``B, C, H, W = x.shape`` with some names unused) would otherwise make the
    # node they read from look shared between the branch and nothing.
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and node.op == "call_function" and node.target in (getattr, operator.getitem):
                graph.erase_node(node)
                changed = True
    return graph


def _plan_block(name: str, module: nn.Module, graph: fx.Graph) -> list[_AddPlan]:
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        return []
    main_input = placeholders[0]
    cache: dict[fx.Node, frozenset[fx.Node]] = {}
    plans: list[_AddPlan] = []
    for node in nodes:
        if not _is_add(node):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2 or operands[0] is operands[1]:
            continue
        a, b = operands
        anc_a, anc_b = _ancestors(a, cache) | {a}, _ancestors(b, cache) | {b}
        # Both the branch and the shortcut are computed from the block's main input.
        if main_input not in anc_a or main_input not in anc_b:
            continue
        excl_a = _exclusive_nodes(a, node, order, anc_a)
        excl_b = _exclusive_nodes(b, node, order, anc_b)
        slot_a, slot_b = _has_slot(excl_a, module), _has_slot(excl_b, module)
        w_a, w_b = _weight_count(excl_a, module), _weight_count(excl_b, module)
        if slot_a != slot_b:
            branch, shortcut, excl = (a, b, excl_a) if slot_a else (b, a, excl_b)
        elif w_a == w_b:
            continue
        else:
            branch, shortcut, excl = (a, b, excl_a) if w_a > w_b else (b, a, excl_b)
        if not excl or (_weight_count(excl, module) == 0 and not _has_slot(excl, module)):
            continue
        branch_nodes = sorted(excl, key=order.__getitem__)
        externals: list[fx.Node] = []
        for n in branch_nodes:
            for inp in n.all_input_nodes:
                if inp not in excl and inp not in externals:
                    externals.append(inp)
        externals.sort(key=order.__getitem__)
        plans.append(_AddPlan(node, shortcut, branch, branch_nodes, externals))
    # A residual add inside another add's branch is nested: the outer branch wins.
    inner = {p.add for p in plans for q in plans if p is not q and p.add in q.nodes}
    return [p for p in plans if p.add not in inner]


def _branch_modules(block_name: str, plan: _AddPlan) -> tuple[str, ...]:
    prefix = f"{block_name}." if block_name else ""
    return tuple(prefix + str(n.target) for n in plan.nodes if n.op == "call_module")


def _slot_children(module: nn.Module) -> list[str]:
    return [n for n, child in module.named_children() if is_drop_path_slot(child)]


def _analyse(model: nn.Module, names: Sequence[str] | None = None) -> list[_BlockPlan]:
    """Plans for every module of ``model`` (or only ``names``) that computes residual adds."""
    plans: list[_BlockPlan] = []
    wanted = None if names is None else set(names)
    for name, module in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if wanted is None and next(iter(module.children()), None) is None:
            continue
        try:
            graph = _trace(module)
        except Exception:  # untraceable forward: only its drop-path slots can be taken over
            slots = _slot_children(module)
            if slots:
                plans.append(_BlockPlan(name, module, None, slot_names=slots))
            continue
        adds = _plan_block(name, module, graph)
        if adds:
            plans.append(_BlockPlan(name, module, graph, adds))
    # Outer blocks whose branch contains another found block are dropped: innermost blocks win.
    block_names = [p.name for p in plans]
    kept = []
    for plan in plans:
        contains_inner = False
        for add in plan.adds:
            for mod in _branch_modules(plan.name, add):
                if any(b == mod or b.startswith(mod + ".") for b in block_names if b != plan.name):
                    contains_inner = True
        if not contains_inner or wanted is not None:
            kept.append(plan)
    return kept


def _branches_of(plan: _BlockPlan) -> list[ResidualBranch]:
    if plan.graph is None:
        prefix = f"{plan.name}." if plan.name else ""
        multi = len(plan.slot_names) > 1
        return [
            ResidualBranch(
                name=f"{plan.name}.branch{i}" if multi else plan.name,
                block=plan.name,
                index_in_block=i,
                modules=(),
                skippable=False,
                slot=prefix + slot,
            )
            for i, slot in enumerate(plan.slot_names)
        ]
    out = []
    multi = len(plan.adds) > 1
    for i, add in enumerate(plan.adds):
        slot = next(
            (m for m, n in zip(_branch_modules(plan.name, add), [n for n in add.nodes if n.op == "call_module"])
             if is_drop_path_slot(plan.module.get_submodule(n.target))),
            None,
        )
        base = plan.name if plan.name else "<root>"
        out.append(
            ResidualBranch(
                name=f"{base}.branch{i}" if multi else base,
                block=plan.name,
                index_in_block=i,
                modules=_branch_modules(plan.name, add),
                skippable=True,
                slot=slot,
            )
        )
    return out


def _select(model: nn.Module, blocks: str | Sequence[str] | None) -> tuple[list[_BlockPlan], list[ResidualBranch]]:
    """Plans and branches for ``blocks`` (None: automatic; str: regex; list: module or branch names)."""
    if blocks is None:
        plans = _analyse(model)
        return plans, [b for p in plans for b in _branches_of(p)]
    if isinstance(blocks, str):
        try:
            pattern = re.compile(blocks)
        except re.error as err:
            raise ValueError(f"blocks={blocks!r} is not a valid regular expression: {err}") from None
        plans = _analyse(model)
        selected_plans, branches = [], []
        for plan in plans:
            chosen = [b for b in _branches_of(plan) if pattern.fullmatch(b.name) or pattern.fullmatch(b.block)]
            if chosen:
                selected_plans.append(_restrict(plan, chosen))
                branches.extend(chosen)
        if not branches:
            found = ", ".join(b.name for p in plans for b in _branches_of(p)[:1])
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
    plans = {p.name: p for p in _analyse(model, block_names)}
    selected_plans, branches = [], []
    for bname in dict.fromkeys(block_names):
        if bname not in plans:
            raise ValueError(
                f"blocks names {bname!r} ({type(modules[bname]).__name__}), but its forward computes no residual "
                "add x + f(x) that could be traced. Name the module whose forward adds the branch to the shortcut."
            )
        plan = plans[bname]
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
    paired = sorted(zip(selected_plans, [None] * len(selected_plans)), key=lambda t: order[t[0].name])
    selected_plans = [p for p, _ in paired]
    branches = [b for p in selected_plans for b in branches if b.block == p.name]
    return selected_plans, branches


def _restrict(plan: _BlockPlan, chosen: list[ResidualBranch]) -> _BlockPlan:
    idx = {b.index_in_block for b in chosen}
    if plan.graph is None:
        return _BlockPlan(plan.name, plan.module, None, slot_names=[s for i, s in enumerate(plan.slot_names) if i in idx])
    return _BlockPlan(plan.name, plan.module, plan.graph, [a for i, a in enumerate(plan.adds) if i in idx])


def find_residual_branches(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[ResidualBranch]:
    """The residual branches of ``model`` in forward order (module definition order, then graph order).

    Args:
        model: any ``nn.Module``: torchvision, timm, the package's reference models or your own.
        blocks: ``None`` finds every residual branch automatically; a string is a regular expression
            that must match a whole block name (``r"layer[34]\\..*"``) or branch name; a list names
            modules (``["layer1.0", "layer1.1"]``) whose forward computes ``x + f(x)``, or single
            branches (``"blocks.0.branch1"``).

    Returns:
        list of :class:`ResidualBranch`, one per gate that :func:`inject_stochastic_depth` would add.

    Example::

        >>> import torchvision
        >>> len(find_residual_branches(torchvision.models.resnet18()))
        8
    """
    _, branches = _select(model, blocks)
    return branches
