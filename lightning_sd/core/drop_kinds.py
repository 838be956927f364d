"""Drop kinds: how the masks delta_l of one training step are drawn and applied.

A drop kind owns the masks of the current step and answers two questions for the gates:
:meth:`DropKind.dropped` (is branch l dropped for the whole batch, so that its compute can be skipped?)
and :meth:`DropKind.multiplier` (the training-mode ``m_l`` of a branch that runs). The
:class:`~lightning_sd.core.gates.StochasticDepthHandle` holds the rates (the one source of truth) and
picks the kind once, by name, from :data:`DROP_KIND_CLASSES`. A new kind is one subclass here and one
registry line (and its name in :data:`~lightning_sd.core.validation.DropKind`).

Masks come from ``mask_generator(seed, step, micro_batch, stream, ...)`` only, never from the global
random generator (Hayou et al. 2021, Eq. (1): ``delta_l ~ Bernoulli(p_l)``; ``m_l = delta_l / p_l``
with ``scaling="inverted"``, ``m_l = delta_l`` with ``"expected"``).

Example::

    >>> kind = DROP_KIND_CLASSES["batch"](num_blocks=3)
    >>> kind.resample(seed=0, key=(0, 0), rank=0, rates=[1.0, 1.0, 1.0], scaling="inverted")
    >>> kind.kept_mask().tolist()
    [True, True, True]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["DROP_KIND_CLASSES", "BatchDrop", "DropKind", "SampleDrop", "SubsetDrop", "mask_generator"]


def mask_generator(*key: int, generator: torch.Generator | None = None) -> torch.Generator:
    """A CPU generator seeded from integers ``key`` (e.g. ``(seed, step, micro_batch)``), independent of global RNG.

    The seed is the first 64-bit word of ``numpy.random.SeedSequence(key)``'s state (its two first
    32-bit words, low word first), without the sign bit. ``generator``: re-seed this one instead of a new one.
    """
    low, high = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2).tolist()
    g = torch.Generator() if generator is None else generator
    g.manual_seed((low | (high << 32)) & 0x7FFFFFFFFFFFFFFF)
    return g


class DropKind:
    """Masks of the current step for one drop kind; subclasses fill in the hooks.

    Args:
        num_blocks: L, the number of gates.
    """

    #: The name users pass as ``drop=``.
    name: ClassVar[str]
    #: Whether a branch can be dropped for the whole batch (its compute is then skipped).
    skips_compute: ClassVar[bool]

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = int(num_blocks)
        self._key: tuple[int, tuple[int, ...], int] = (0, (0, 0), 0)  # seed, (step, micro_batch), rank
        #: For each block, the block whose branch computes its residual (timm EdgeNeXt: the attention
        #: residual inside the block's outer one), or None; set by the handle from the traced forwards.
        self.enclosing: list[int | None] = [None] * self.num_blocks
        self.reset()

    def reset(self) -> None:
        """Forget the current masks: every branch kept until the next :meth:`resample`."""
        raise NotImplementedError

    def resample(
        self,
        *,
        seed: int,
        key: tuple[int, ...],
        rank: int,
        rates: Sequence[float],
        scaling: str,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Draw the masks of step ``key = (step, micro_batch)`` from ``(seed, *key)`` (and ``rank`` if per-example)."""
        self._key = (int(seed), tuple(int(k) for k in key), int(rank))
        self._draw_step(rates, scaling, batch_size, device)

    def _draw_step(self, rates: Sequence[float], scaling: str, batch_size: int | None, device: torch.device | str | None) -> None:
        """Draw this step's masks from ``self._key = (seed, (step, micro_batch), rank)``."""
        raise NotImplementedError

    def prefetch(self, seed: int, keys: Sequence[tuple[int, ...]]) -> int:
        """Draw now what the masks of the future steps ``keys = [(step, micro_batch), ...]`` need, if the kind can.

        A later :meth:`resample` of one of these keys uses it: the same masks as drawn then, at a fraction
        of the cost (one warm loop instead of one cold draw between each two steps of a training loop).
        Returns how many keys were drawn ahead; 0 for per-example kinds, whose masks need the batch size
        and device of their step.
        """
        return 0

    def dropped(self, index: int) -> bool:
        """Whether branch ``index`` is dropped for the whole batch at this step (training mode)."""
        return False

    def dropped_blocks(self) -> list[int]:
        """The branches dropped for the whole batch at this step, in increasing order (training mode): :meth:`dropped`'s."""
        return [index for index in range(self.num_blocks) if self.dropped(index)]

    def rows(self, index: int, batch: int, rates: Sequence[float], device: torch.device) -> Tensor | None:
        """Rows of the batch on which branch ``index`` runs at this step, or None for all of them.

        A kind that answers with rows makes the gate run the branch on those rows only and index-add its
        output, times :meth:`row_scale`, to the shortcut (the other rows skip the branch's compute).
        """
        return None

    def row_scale(self, index: int, batch: int, rows: int, rates: Sequence[float], scaling: str) -> float:
        """Multiplier of the branch output on the rows that run it (see :meth:`rows`)."""
        return 1.0

    def multiplier(self, index: int, rates: Sequence[float], scaling: str, like: Tensor) -> Tensor | float:
        """Training-mode ``m_l`` of branch ``index`` that runs (current ``rates``): a float, or a tensor broadcastable to ``like``."""
        raise NotImplementedError

    def kept_mask(self) -> Tensor:
        """Whole-batch mask of the current step (bool, length L). All True for per-example kinds."""
        return torch.ones(self.num_blocks, dtype=torch.bool)

    def realized_depth(self) -> float:
        """Branches executed at this step (per-example kinds: their mean over examples; NaN before a draw)."""
        raise NotImplementedError

    def _runs(self, kept: Tensor) -> Tensor:
        """Which blocks run, from which are kept (bool, ``(..., L)``): a nested block runs where its enclosing ones do."""
        if all(outer is None for outer in self.enclosing):
            return kept
        runs = kept.clone()
        for index, outer in enumerate(self.enclosing):
            while outer is not None:
                runs[..., index] &= kept[..., outer]
                outer = self.enclosing[outer]
        return runs

    def permute(self, order: Sequence[int]) -> None:
        """Renumber the blocks (new block ``l`` is old block ``order[l]``); the masks move with their branch."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A copy of the current masks (for :meth:`restore` and :meth:`follow_call_order`)."""
        raise NotImplementedError

    def restore(self, snapshot: Any) -> None:
        """Put back masks taken with :meth:`snapshot`."""
        raise NotImplementedError

    def follow_call_order(self, snapshot: Any, calls: Sequence[int], like: Tensor | None, rates: Sequence[float], scaling: str) -> Any:
        """Let block ``calls[j]`` use the snapshot's masks of block ``j`` (blocks run in another order than defined).

        Returns the snapshot, drawn now if it was taken before the masks existed (per-example masks are
        drawn at the first gate call when the batch size was not known at :meth:`resample`).
        """
        raise NotImplementedError


class BatchDrop(DropKind):
    """One Bernoulli(p_l) draw per block per step, shared by the whole batch and by every DDP rank.

    A dropped branch is not computed (the speed of stochastic depth); a kept one is multiplied by
    ``1 / p_l`` (inverted) or 1 (expected).
    """

    name = "batch"
    skips_compute = True

    def reset(self) -> None:  # noqa: D102
        self._set_kept([True] * self.num_blocks)
        self._generator: torch.Generator | None = None  # re-seeded at each draw
        self._rates: list[float] | None = None
        self._rates_tensor = torch.ones(0, dtype=torch.float64)
        self._keeps_all = False
        #: Uniforms drawn ahead by :meth:`prefetch`, by ``(seed, step, micro_batch)``.
        self._ahead: dict[tuple[int, ...], Tensor] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_ahead", {})  # pickled (inside a model) before draws ahead existed
        self.__dict__.update(state)

    def _set_kept(self, kept: list[bool]) -> None:
        self.kept = kept
        #: The same mask as a bool tensor (CPU): what a gate traced by ``torch.compile`` reads, as data.
        self.kept_tensor = torch.tensor(kept, dtype=torch.bool)

    def _draw_step(self, rates: Sequence[float], scaling: str, batch_size: int | None, device: torch.device | str | None) -> None:
        if self._rates != rates:  # the rates as a tensor, rebuilt when they change
            self._rates = list(rates)
            self._rates_tensor = torch.tensor(self._rates, dtype=torch.float64)
            self._keeps_all = all(p >= 1.0 for p in self._rates)
        if self._keeps_all:
            # u < 1 for every u in [0, 1): the draw would keep every branch. Not drawing leaves the other
            # steps' masks unchanged (each step's generator is seeded from its own key).
            if not all(self.kept):
                self._set_kept([True] * self.num_blocks)
            return
        seed, key, _ = self._key
        u = self._ahead.pop((seed, *key), None)
        if u is None:
            u = self._uniforms(seed, *key)
        kept = u < self._rates_tensor
        self.kept = kept.tolist()
        self.kept_tensor = kept

    def _uniforms(self, seed: int, *key: int) -> Tensor:
        """The L uniforms of step ``key = (step, micro_batch)``: block l is kept where ``u_l < p_l``."""
        self._generator = mask_generator(seed, *key, 0, generator=self._generator)
        return torch.rand(self.num_blocks, generator=self._generator, dtype=torch.float64)

    def prefetch(self, seed: int, keys: Sequence[tuple[int, ...]]) -> int:  # noqa: D102
        # The uniforms, not the masks: the rates may change before those steps (a budget schedule).
        ahead = {}
        for step_key in keys:
            key = (int(seed), *(int(k) for k in step_key))
            u = self._ahead.get(key)
            ahead[key] = self._uniforms(*key) if u is None else u
        self._ahead = ahead  # what was drawn ahead for other keys (a prediction that missed) goes
        return len(ahead)

    def dropped(self, index: int) -> bool:  # noqa: D102
        return not self.kept[index]

    def multiplier(self, index: int, rates: Sequence[float], scaling: str, like: Tensor) -> Tensor | float:  # noqa: D102
        return 1.0 / rates[index] if scaling == "inverted" else 1.0

    def kept_mask(self) -> Tensor:  # noqa: D102
        return self.kept_tensor.clone()

    def realized_depth(self) -> float:  # noqa: D102
        if all(outer is None for outer in self.enclosing):
            return float(sum(self.kept))
        return float(self._runs(torch.tensor(self.kept)).sum())

    def permute(self, order: Sequence[int]) -> None:  # noqa: D102
        self._set_kept([self.kept[i] for i in order])

    def snapshot(self) -> list[bool]:  # noqa: D102
        return list(self.kept)

    def restore(self, snapshot: Any) -> None:  # noqa: D102
        self._set_kept(list(snapshot))

    def follow_call_order(  # noqa: D102
        self, snapshot: Any, calls: Sequence[int], like: Tensor | None, rates: Sequence[float], scaling: str
    ) -> Any:
        kept = list(self.kept)
        for j, i in enumerate(calls):
            kept[i] = snapshot[j]
        self._set_kept(kept)
        return snapshot


class SampleDrop(DropKind):
    """A per-example mask, as timm's ``DropPath``: every branch is computed and multiplied per example.

    The ``(batch, L)`` multipliers (``delta / p`` or ``delta``, fp32) come from ``(seed, step,
    micro_batch, rank)``: each rank masks its own examples differently. Drawn in :meth:`resample` when
    the batch size is known (outside the forward, so a compiled model reads them as an input), else at
    the first gate call.
    """

    name = "sample"
    skips_compute = False
    _kept_count: tuple[Tensor, float] | None = None  # for instances pickled before it existed

    def reset(self) -> None:  # noqa: D102
        self.masks: Tensor | None = None
        # The (device) masks of the last draw and their mean number of kept branches per example, computed
        # on the CPU draw: realized_depth reads it instead of the device tensor (no device sync per step).
        self._kept_count: tuple[Tensor, float] | None = None

    def _set_drawn(self, drawn: Tensor, device: torch.device | str) -> Tensor:
        masks = self.masks = drawn.to(device)
        self._kept_count = (masks, float(self._runs(drawn > 0).sum(dim=1).double().mean()))
        return masks

    def _draw_step(self, rates: Sequence[float], scaling: str, batch_size: int | None, device: torch.device | str | None) -> None:
        self.masks = None
        if batch_size is not None:
            self._set_drawn(self.draw(int(batch_size), rates, scaling), device or "cpu")

    def draw(self, batch: int, rates: Sequence[float], scaling: str) -> Tensor:
        """The ``(batch, L)`` multipliers of the current step's key with ``rates``."""
        seed, key, rank = self._key
        g = mask_generator(seed, *key, 1, rank)
        u = torch.rand(batch, self.num_blocks, generator=g, dtype=torch.float64)
        p = torch.tensor(list(rates), dtype=torch.float64)
        delta = (u < p).double()
        return (delta / p.clamp_min(1e-12) if scaling == "inverted" else delta).float()

    def multiplier(self, index: int, rates: Sequence[float], scaling: str, like: Tensor) -> Tensor | float:  # noqa: D102
        batch = like.shape[0]
        masks = self.masks
        if masks is None or masks.shape[0] != batch:
            masks = self._set_drawn(self.draw(batch, rates, scaling), like.device)
        m = masks[:, index].to(device=like.device, dtype=like.dtype, non_blocking=True)
        return m.reshape((m.shape[0],) + (1,) * (like.ndim - 1))

    def realized_depth(self) -> float:  # noqa: D102
        if self.masks is None:
            return float("nan")
        if self._kept_count is not None and self._kept_count[0] is self.masks:
            return self._kept_count[1]  # from the CPU draw
        return float(self._runs(self.masks > 0).sum(dim=1).double().mean().cpu())  # masks renumbered or restored since

    def permute(self, order: Sequence[int]) -> None:  # noqa: D102
        if self.masks is not None:
            self.masks = self.masks[:, list(order)].clone()

    def snapshot(self) -> Tensor | None:  # noqa: D102
        return None if self.masks is None else self.masks.clone()

    def restore(self, snapshot: Any) -> None:  # noqa: D102
        if snapshot is not None:
            self.masks = snapshot

    def follow_call_order(  # noqa: D102
        self, snapshot: Any, calls: Sequence[int], like: Tensor | None, rates: Sequence[float], scaling: str
    ) -> Any:
        if snapshot is None:
            if self.masks is None and like is not None:
                self.masks = self.draw(int(like.shape[0]), rates, scaling).to(like.device)
            snapshot = None if self.masks is None else self.masks.clone()
        if snapshot is not None:
            masks = snapshot.clone()  # a new tensor: earlier gates' autograd graphs keep theirs
            for j, i in enumerate(calls):
                masks[:, i] = snapshot[:, j]
            self.masks = masks
        return snapshot


class SubsetDrop(DropKind):
    """DINOv2's efficient per-example stochastic depth (Oquab et al. 2023, ``drop_add_residual_stochastic_depth``).

    At each step, block l runs its branch on a random subset of ``max(1, round(p_l B))`` of the B
    examples; the branch output, times ``B / |subset|`` (``scaling="inverted"``) or 1 (``"expected"``), is
    index-added to the shortcut. The other examples skip the branch's compute, every parameter gets a
    gradient every step, and the subset size is fixed per block (static shapes). A branch that couples
    examples (BatchNorm in training mode) computes its statistics on the subset. A block whose residual
    lies inside another's branch (timm EdgeNeXt) sees that branch's k rows and runs on ``round(p_l k)`` of
    them (an example runs it with probability about ``p_outer p_l``). The subsets come from
    ``(seed, step, micro_batch, rank, block)``; they are drawn in :meth:`resample` when the batch size is
    known (outside the forward, so that a compiled model reads them as inputs: one graph), else at the
    first gate call.
    """

    name = "subset"
    skips_compute = False

    def reset(self) -> None:  # noqa: D102
        self.source = list(range(self.num_blocks))  # block l uses the subset drawn for position source[l]
        self.sizes: dict[int, int] = {}  # block -> subset size used at this step (for realized_depth)
        self.batch = 0
        # block -> (position, batch, rate, rows): drawn at resample when the batch size is known
        self._drawn: dict[int, tuple[int, int, float, Tensor]] = {}

    def _draw_step(self, rates: Sequence[float], scaling: str, batch_size: int | None, device: torch.device | str | None) -> None:
        self.sizes = {}
        self.batch = 0
        self._drawn = {}
        if batch_size is not None and batch_size > 0:
            # Outside the forward: a compiled model reads the rows as inputs (no graph break, no recompile).
            for index in range(self.num_blocks):
                position, rate = self.source[index], float(rates[index])
                batch = self._batch_of(index, rates, int(batch_size))
                rows = self._draw_rows(position, self.subset_size(rate, batch), batch).to(device or "cpu")
                self._drawn[index] = (position, batch, rate, rows)

    def _batch_of(self, index: int, rates: Sequence[float], batch_size: int) -> int:
        """Examples block ``index`` sees: the batch, or the subset of the block whose branch holds it."""
        outer = self.enclosing[index]
        if outer is None:
            return batch_size
        return self.subset_size(float(rates[outer]), self._batch_of(outer, rates, batch_size))

    def subset_size(self, rate: float, batch: int) -> int:
        """``max(1, round(rate * batch))``, at most ``batch``."""
        return min(batch, max(1, round(rate * batch)))

    def _draw_rows(self, position: int, size: int, batch: int) -> Tensor:
        seed, key, rank = self._key
        g = mask_generator(seed, *key, 2, rank, position)
        return torch.randperm(batch, generator=g)[:size].sort().values

    def rows(self, index: int, batch: int, rates: Sequence[float], device: torch.device) -> Tensor:  # noqa: D102
        drawn = self._drawn.get(index)
        if drawn is not None and drawn[1] == batch and (torch.compiler.is_compiling() or drawn[::2] == (self.source[index], rates[index])):
            # Traced by torch.compile: the rows drawn at resample, without reading the rates (a rate read
            # here would become a guard, and the model would recompile when the rates change).
            rows = drawn[3]
        else:
            rows = self._draw_rows(self.source[index], self.subset_size(rates[index], batch), batch)
        self.sizes[index] = rows.shape[0]
        if self.enclosing[index] is None:  # a nested block sees its enclosing branch's subset, not the batch
            self.batch = batch
        return rows.to(device)

    def row_scale(self, index: int, batch: int, rows: int, rates: Sequence[float], scaling: str) -> float:  # noqa: D102
        return batch / rows if scaling == "inverted" else 1.0

    def multiplier(self, index: int, rates: Sequence[float], scaling: str, like: Tensor) -> Tensor | float:  # noqa: D102
        # A gate that cannot run the branch on part of the batch (a drop-path slot) multiplies instead:
        # the subset's rows by the scale, the others by 0 (the same value, without the saving).
        batch = like.shape[0]
        rows = self.rows(index, batch, rates, like.device)
        m = torch.zeros(batch, dtype=like.dtype, device=like.device)
        m[rows] = self.row_scale(index, batch, rows.numel(), rates, scaling)
        return m.reshape((batch,) + (1,) * (like.ndim - 1))

    def realized_depth(self) -> float:  # noqa: D102
        if not self.batch:
            return float("nan")
        return float(sum(self.sizes.values())) / self.batch

    def permute(self, order: Sequence[int]) -> None:  # noqa: D102
        self.source = [self.source[i] for i in order]

    def snapshot(self) -> list[int]:  # noqa: D102
        return list(self.source)

    def restore(self, snapshot: Any) -> None:  # noqa: D102
        self.source = list(snapshot)

    def follow_call_order(  # noqa: D102
        self, snapshot: Any, calls: Sequence[int], like: Tensor | None, rates: Sequence[float], scaling: str
    ) -> Any:
        for j, i in enumerate(calls):
            self.source[i] = snapshot[j]
        return snapshot


#: ``drop=`` name -> drop kind; the handle picks one at injection (and at ``reconfigure``).
DROP_KIND_CLASSES: dict[str, type[DropKind]] = {"batch": BatchDrop, "sample": SampleDrop, "subset": SubsetDrop}
