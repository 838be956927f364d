"""Depth on demand: run a network trained with stochastic depth with only some of its blocks.

A network trained with SD keeps working when blocks are left out at inference (Huang et al. 2016;
fairseq's LayerDrop, Fan et al. 2019, keeps every other layer). Which blocks to leave out is what
SenseMode's sensitivities ``S_l`` measure (Hayou & Ayed 2021, section 5: ``S_l`` is the first-order
loss increase when block ``l`` is removed).

- :func:`blocks_to_keep`: which ``round(keep * L)`` blocks to keep, ``by`` one of

  - ``"sensitivity"``: the largest ``|S_l|`` (the blocks whose removal changes the loss most);
  - ``"survival"``: the highest survival rates ``p_l`` (what the training budget kept most often);
  - ``"every_other"``: evenly spaced blocks, ``floor(i L / k)`` for ``i < k`` (LayerDrop's every other
    layer at ``keep = 0.5``);
  - ``"last"``: the first ``k`` blocks: the last ``L - k`` are removed (a shallower network).

- :func:`prune_blocks` (``handle.prune``): marks the other gates pruned. In evaluation mode (and outside
  :meth:`~lightning_sd.core.gates.StochasticDepthHandle.override`) a pruned block returns its shortcut and
  its branch is not called; training is unchanged. :func:`unprune_blocks` (``handle.unprune()``) restores.
- :func:`export_pruned`: a copy of a pruned gated model as a model without gates, whose pruned branches
  are gone (their parameters too) and whose kept branches are added to their shortcut as in evaluation
  (times ``p_l`` with ``scaling="expected"``). The original model is left as it was.

Example::

    >>> model = ResidualMLP(8, width=16, depth=8, out_features=1)
    >>> handle = inject_stochastic_depth(model, 0.5)
    >>> handle.prune(0.5, by="every_other")   # kept blocks, 0-based
    [0, 2, 4, 6]
    >>> small = export_pruned(model.eval())   # plain nn.Module, 4 blocks' parameters fewer
    >>> handle.unprune()
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_sd.core.validation import check_choice

if TYPE_CHECKING:
    from lightning_sd.core.gates import StochasticDepthHandle

__all__ = [
    "PRUNE_BY",
    "KeptBranch",
    "PruneBy",
    "PrunedBranch",
    "SlotScale",
    "blocks_to_keep",
    "check_keep",
    "evaluation_sensitivities",
    "export_pruned",
    "num_kept",
    "prune_blocks",
    "unprune_blocks",
]

PruneBy = Literal["sensitivity", "survival", "every_other", "last"]
PRUNE_BY: tuple[str, ...] = get_args(PruneBy)


def check_keep(keep: float) -> float:
    """The kept fraction as a float in (0, 1], or a ``ValueError``."""
    if isinstance(keep, bool):
        raise ValueError(f"keep must be a fraction of the blocks in (0, 1], got {keep!r}")
    keep = float(keep)
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be the fraction of blocks to keep, in (0, 1], got {keep}; e.g. keep=0.5 keeps half")
    return keep


def num_kept(keep: float, num_blocks: int) -> int:
    """``k = round(keep * L)`` (halves up), at least 1: how many blocks ``keep`` keeps."""
    keep = check_keep(keep)
    return max(1, min(int(num_blocks), math.floor(keep * num_blocks + 0.5)))


def blocks_to_keep(
    keep: float,
    by: str,
    num_blocks: int,
    *,
    survival: Sequence[float] | Tensor | None = None,
    sensitivities: Sequence[float] | Tensor | None = None,
) -> list[int]:
    """The 0-based blocks to keep (sorted): ``num_kept(keep, L)`` of them, chosen ``by`` (module docstring).

    Args:
        keep: fraction of the blocks kept, in (0, 1].
        by: ``"sensitivity"``, ``"survival"``, ``"every_other"`` or ``"last"``.
        num_blocks: L.
        survival: ``p_l`` (length L), for ``by="survival"``.
        sensitivities: ``S_l`` (length L, finite), for ``by="sensitivity"``.

    Ties (equal ``|S_l|`` or ``p_l``) keep the earlier block.
    """
    check_choice("by", by, PRUNE_BY)
    if int(num_blocks) != num_blocks or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    num_blocks = int(num_blocks)
    k = num_kept(keep, num_blocks)
    if by == "last":
        return list(range(k))
    if by == "every_other":
        return sorted({(i * num_blocks) // k for i in range(k)})
    values = survival if by == "survival" else sensitivities
    what = "survival" if by == "survival" else "sensitivities"
    if values is None:
        raise ValueError(f"by={by!r} needs {what}= (length {num_blocks})")
    score = torch.as_tensor(values, dtype=torch.float64).flatten()
    if score.numel() != num_blocks:
        raise ValueError(f"{what} has {score.numel()} entries but the model has {num_blocks} blocks")
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"{what} must be finite to rank the blocks, got {score.tolist()}")
    score = score.abs()
    # stable: sort by (-score, index)
    order = sorted(range(num_blocks), key=lambda i: (-float(score[i]), i))
    return sorted(order[:k])


def prune_blocks(
    handle: StochasticDepthHandle,
    keep: float,
    by: str = "survival",
    *,
    sensitivities: Sequence[float] | Tensor | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
) -> list[int]:
    """Keep ``num_kept(keep, L)`` blocks chosen ``by``; the others reduce to their shortcut in evaluation.

    ``by="sensitivity"`` takes ``sensitivities`` when given; otherwise it measures ``S_l`` on ``batches``
    with ``loss_fn`` (the evaluation network: the model in eval mode, see
    :func:`~lightning_sd.core.sensitivity.estimate_sensitivities`). A previous pruning is replaced.

    Returns:
        the kept blocks (0-based, sorted).
    """
    check_choice("by", by, PRUNE_BY)
    check_keep(keep)
    if by == "sensitivity" and sensitivities is None:
        if batches is None or loss_fn is None:
            raise ValueError(
                "by='sensitivity' needs sensitivities=S (e.g. from estimate_sensitivities) or batches= and loss_fn= to "
                "measure them on; or choose by='survival', 'every_other' or 'last'"
            )
        sensitivities = evaluation_sensitivities(handle.model, batches, loss_fn)
    kept = blocks_to_keep(keep, by, handle.num_blocks, survival=handle.survival_float64, sensitivities=sensitivities)
    chosen = set(kept)
    for index, gate in enumerate(handle.gates):
        gate.pruned = index not in chosen
    return kept


def unprune_blocks(handle: StochasticDepthHandle) -> None:
    """Every block runs again in evaluation (undoes :func:`prune_blocks`)."""
    for gate in handle.gates:
        gate.pruned = False


def evaluation_sensitivities(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> Tensor:
    """``S_l = dLoss/dm_l`` at ``m = 1`` of the evaluation network (eval mode), averaged over ``batches``.

    Modes, buffers and the global RNG are restored afterwards.
    """
    from lightning_sd.core.probing import restored_state
    from lightning_sd.core.sensitivity import estimate_sensitivities

    with restored_state(model, "eval"):
        return estimate_sensitivities(model, batches, loss_fn)


# ---------------------------------------------------------------------------------------------- export
class KeptBranch(nn.Module):
    """``shortcut + scale * f(*inputs)``: a kept branch of an exported model (no state, no randomness).

    ``scale`` is 1 (``scaling="inverted"``) or the block's ``p_l`` (``"expected"``), as in evaluation.
    """

    branch: Callable[..., Tensor]

    def __init__(self, branch: Callable[..., Tensor], scale: float) -> None:
        super().__init__()
        self.__dict__["branch"] = branch  # the block's code, bound to the block: not a child module
        self.scale = float(scale)

    @override
    def forward(self, shortcut: Tensor, *inputs: Any) -> Tensor:
        out = self.branch(*inputs)
        if self.scale == 1.0:
            return shortcut + out
        return torch.add(shortcut, out, alpha=self.scale)  # as the gate computes it: the same bits

    @override
    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


class PrunedBranch(nn.Module):
    """A removed branch of an exported model: the block returns (a copy of) its shortcut."""

    @override
    def forward(self, shortcut: Tensor, *inputs: Any) -> Tensor:
        # A copy, as ``shortcut + f(x)`` is a new tensor: an in-place op after it must not change the block's input.
        return shortcut.clone()


class SlotScale(nn.Module):
    """A drop-path slot of an untraceable block in an exported model: ``x * scale`` (0 for a pruned branch).

    Such a block's branch is computed even when pruned (its forward cannot be rewritten); the output is the
    shortcut's as in the gated model.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x if self.scale == 1.0 else x * self.scale

    @override
    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent._modules.items():
        if module is child:
            return name
    raise RuntimeError(f"gate not found in its block {type(parent).__name__}")  # pragma: no cover - gates live in their block


def _drop_module(root: nn.Module, qualname: str) -> None:
    parent_name, _, child = qualname.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:  # a parent already dropped
        return
    parent._modules.pop(child, None)


def _retire(handle: StochasticDepthHandle) -> None:
    """The copy's handle no longer has gates to drive (they were replaced): mark it removed."""
    handle.gates = []
    handle._undo = []
    handle.removed = True


def export_pruned(model: nn.Module) -> nn.Module:
    """A copy of a gated (and possibly pruned) model as a model without gates, pruned branches removed.

    The copy computes what the gated model computes in evaluation: a kept branch is added to its shortcut
    (times ``p_l`` with ``scaling="expected"``), a pruned one is left out and the submodules only it used
    (``ResidualBranch.modules``) are deleted, so its parameters are gone from ``state_dict``. The copy has
    no stochastic-depth gates or handle and no randomness (training mode runs the same network); it
    saves, loads and pickles as an ordinary ``nn.Module``. ``model`` is not changed.

    Branches gated through a drop-path slot of an untraceable block (``ResidualBranch.skippable`` False)
    keep their parameters and are multiplied by 0 when pruned.

    Args:
        model: a model carrying gates (:func:`~lightning_sd.core.gates.inject_stochastic_depth` or the
            ``StochasticDepth`` callback), pruned with ``handle.prune`` or not.

    Returns:
        the exported copy, in the mode ``model`` was in.

    Example::

        handle.prune(0.5, by="sensitivity", sensitivities=S)
        small = export_pruned(model)
        torch.save(small.state_dict(), "small.pt")
    """
    from lightning_sd.core.gates import ResidualGate, SlotGate, existing_handle

    handle = existing_handle(model)
    if handle is None:
        raise ValueError(
            f"{type(model).__name__} has no stochastic-depth gates to export; inject them first "
            "(inject_stochastic_depth or the StochasticDepth callback) and prune with handle.prune(keep, by=...)"
        )
    exported = copy.deepcopy(model)  # its own gates and handle (see core/gates.py); the original stays as it is
    found = existing_handle(exported)
    if found is None or found is handle:  # pragma: no cover - deepcopy gives the copy its own handle (core/gates.py)
        raise RuntimeError("copying the model did not give the copy its own stochastic-depth handle")
    twin: StochasticDepthHandle = found
    p = twin.survival_float64.tolist()
    pruned_modules: list[str] = []
    for index, gate in enumerate(twin.gates):
        scale = p[index] if twin.scaling == "expected" else 1.0
        branch = twin.branches[index]
        if isinstance(gate, ResidualGate):
            block = gate.block
            name = _child_name(block, gate)
            if gate.pruned:
                block._modules[name] = PrunedBranch()
                pruned_modules.extend(branch.modules)
            else:
                block._modules[name] = KeptBranch(gate.branch, scale).train(gate.training)
        else:
            assert isinstance(gate, SlotGate)
            assert branch.slot is not None
            parent_name, _, child = branch.slot.rpartition(".")
            parent = exported.get_submodule(parent_name) if parent_name else exported
            parent._modules[child] = SlotScale(0.0 if gate.pruned else scale).train(gate.training)
    # Submodules only pruned branches used, outermost first (a nested one goes with its parent).
    kept_modules = {m for i, g in enumerate(twin.gates) if not g.pruned for m in twin.branches[i].modules}
    for qualname in sorted(set(pruned_modules) - kept_modules, key=lambda n: n.count(".")):
        _drop_module(exported, qualname)
    # No handle: the resampling hook and the handle reference go (the generated block forwards stay).
    for key, hook in list(exported._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is twin:
            del exported._forward_pre_hooks[key]
    exported.__dict__.pop("_lightning_sd_handle", None)
    _retire(twin)
    return exported
