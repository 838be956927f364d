"""Eager overhead of the gates and of the StochasticDepth callback, where it dominates: a tiny residual MLP.

ResidualMLP with 8 blocks of width 64, batch 32, one thread. Each row is one training step (forward,
backward, no optimizer) in microseconds. The configurations run in ``--repeats`` rounds of ``--steps``
steps each, in alternating order within a round, and every per-gate cost is the median over rounds
of a difference measured within the round (a shared machine drifts over seconds; paired differences
cancel most of it):

- ``plain``: the model without gates; ``no blocks``: stem and head only (the blocks removed);
- ``kept``: gates with every branch kept, ``scaling="expected"`` (no multiply) and ``"inverted"`` at
  p = 0.999 (a ``1/p`` multiply, fused into the add); per-gate cost = (row - plain) / 8;
- ``skipped``: every branch dropped (``scaling="expected"``, p = 0); per-gate cost =
  (row - no blocks) / 8, i.e. what a skipped gate costs beyond the stem and head. Its zero gradients come
  from a node in the autograd graph (the core default, needed under DDP); in ``zeros after backward``
  ``handle.fill_zero_gradients()`` gives them after the backward (timed in the step), as
  ``StochasticDepth`` does on one device;
- ``budget 0.5``: half the branches run (uniform rates, inverted).
- the mask draw: ``handle.resample(step)`` before each step, timed apart from the forward and backward
  (right after a backward any code runs several times slower than alone on this machine: caches).

Gradients are set to None before each step (outside the timed part), as ``optimizer.zero_grad()`` does
in a training loop: a backward then stores a branch's (zero) gradient instead of adding it to the last one.

Then Trainer fits of 4 epochs of ``--trainer-steps`` steps, plain vs ``StochasticDepth(budget=1.0)``
vs ``StochasticDepth(budget=0.5)``, in rounds: the callback + gates cost per step at budget 1.0 is the
median over rounds of the difference of the per-step times (each the median of the warm epochs 2-4);
the callback's own hooks (``on_train_batch_start``, which draws the masks and every 32 steps draws the next
32 steps' ahead, ``on_after_backward``, which gives the skipped blocks' zero gradients, and
``on_train_batch_end``) are also timed inside the fits, per step (mean over the warm epochs' steps, so that
the steps that draw ahead count, then median over rounds).

    python examples/benchmarks/bench_gate_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks import StochasticDepth
from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.models import ResidualMLP

WIDTH, DEPTH, BATCH = 64, 8, 32


def step_time(model: nn.Module, handle, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """Mean microseconds per forward + backward, and per ``handle.resample`` drawn before each (0 without a handle).

    The two are timed apart: right after a backward any code runs several times slower than alone
    (caches), and on this machine that penalty would otherwise be charged to the gates.
    """
    model.train()
    for s in range(3):  # warm-up
        if handle is not None:
            handle.resample(s)
        model(x).sum().backward()
        if handle is not None and not handle.zero_gradients_in_graph:
            handle.fill_zero_gradients()
    compute = draw = 0.0
    for s in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if handle is not None:
            handle.resample(s)
        drawn = time.perf_counter()
        model(x).sum().backward()
        if handle is not None and not handle.zero_gradients_in_graph:
            handle.fill_zero_gradients()  # what StochasticDepth's on_after_backward does on one device
        compute += time.perf_counter() - drawn
        draw += drawn - start
    return compute / steps * 1e6, draw / steps * 1e6


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualMLP(WIDTH, WIDTH, DEPTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _TimedStochasticDepth(StochasticDepth):
    """StochasticDepth that records the wall time of its per-step hooks (microseconds per step)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.hook_times: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._started = time.perf_counter() - start

    def on_after_backward(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super().on_after_backward(trainer, pl_module)  # the zero gradients of the skipped blocks (one device)
        self._started += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.current_epoch > 0:  # warm epochs
            self.hook_times.append((self._started + time.perf_counter() - start) * 1e6)


def trainer_step_time(steps: int, budget: float | None, epochs: int = 4) -> tuple[float, float]:
    """Microseconds per training step (optimizer step included), median over the epochs after the first,
    and the callback's hooks per step (mean over those epochs' steps; 0 without the callback)."""
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(steps * BATCH, WIDTH, generator=g), torch.randn(steps * BATCH, 1, generator=g)), batch_size=BATCH)
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            times.append((time.perf_counter() - self.start) / steps * 1e6)

    callbacks: list[pl.Callback] = [Clock()]
    sd = None if budget is None else _TimedStochasticDepth(budget=budget, seed=0)
    if sd is not None:
        callbacks.insert(0, sd)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(),  # the callback's rate tables go there, not into the working directory
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Module(), data)
    return statistics.median(times[1:]), 0.0 if sd is None else statistics.fmean(sd.hook_times)  # warm epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--trainer-steps", type=int, default=200)
    parser.add_argument("--trainer-repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(BATCH, WIDTH)
    base = ResidualMLP(WIDTH, WIDTH, DEPTH, 1)
    configs: dict[str, tuple[nn.Module, object]] = {"plain": (base, None)}
    stem_head = copy.deepcopy(base)
    stem_head.blocks = nn.Sequential()
    configs["no blocks"] = (stem_head, None)
    for name, rate, scaling in [("kept, expected (no multiply)", 1.0, "expected"), ("kept, inverted (1/p multiply)", 0.999, "inverted"),
                                ("skipped (p = 0)", 0.0, "expected"), ("skipped (p = 0), zeros after backward", 0.0, "expected"),
                                ("budget 0.5, inverted", 0.5, "inverted")]:
        model = copy.deepcopy(base)
        handle = inject_stochastic_depth(model, rate, scaling=scaling, auto_resample=False, seed=0)
        # the zero gradients of skipped blocks: a node in the graph (the default), or given after the
        # backward (handle.fill_zero_gradients, timed in the step), as StochasticDepth does on one device
        handle.zero_gradients_in_graph = "after backward" not in name
        configs[name] = (model, handle)
    results: dict[str, list[float]] = {k: [] for k in configs}
    draws: list[float] = []
    per_gate: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.repeats):
        names = list(configs) if r % 2 == 0 else list(reversed(configs))
        this: dict[str, float] = {}
        for name in names:
            model, handle = configs[name]
            this[name], draw = step_time(model, handle, x, args.steps)
            results[name].append(this[name])
            if name == "budget 0.5, inverted":
                draws.append(draw)
        for name in configs:
            if name.startswith("skipped"):
                per_gate[name].append((this[name] - this["no blocks"]) / DEPTH)
            elif name.startswith("kept"):
                per_gate[name].append((this[name] - this["plain"]) / DEPTH)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"ResidualMLP, {DEPTH} blocks, width {WIDTH}, batch {BATCH}, 1 thread; forward + backward (the mask draw timed apart), "
          f"median of {args.repeats} rounds x {args.steps} steps")
    print("| configuration | step (us) | per gate (us) |\n|---|---|---|")
    for name, t in med.items():
        if per_gate[name]:
            base = "no blocks" if name.startswith("skipped") else "plain"
            per = f"{statistics.median(per_gate[name]):.1f} (vs {base})"
        else:
            per = "-"
        print(f"| {name} | {t:.1f} | {per} |")
    print(f"| mask draw (handle.resample) per step, in the loop | {statistics.median(draws):.1f} | - |")
    print(f"budget 0.5 / plain (without the draw): {statistics.median(b / p for b, p in zip(results['budget 0.5, inverted'], results['plain'])):.3f}")
    budgets: list[float | None] = [None, 1.0, 0.5]
    steps_t: dict[float | None, list[float]] = {b: [] for b in budgets}
    hooks_t: dict[float | None, list[float]] = {b: [] for b in budgets}
    for r in range(args.trainer_repeats):
        for budget in budgets if r % 2 == 0 else reversed(budgets):
            step_us, hook_us = trainer_step_time(args.trainer_steps, budget)
            steps_t[budget].append(step_us)
            hooks_t[budget].append(hook_us)
    ratios = [s / p for s, p in zip(steps_t[1.0], steps_t[None])]
    diffs = [s - p for s, p in zip(steps_t[1.0], steps_t[None])]
    print(f"\nTrainer epochs of {args.trainer_steps} steps (median of epochs 2-4 per fit), median of {args.trainer_repeats} rounds")
    print("| | step (us) |\n|---|---|")
    print(f"| plain Trainer | {statistics.median(steps_t[None]):.1f} |")
    print(f"| StochasticDepth(budget=1.0) | {statistics.median(steps_t[1.0]):.1f} |")
    print(f"| callback + gates per step, budget 1.0 (vs plain) | {statistics.median(diffs):.1f} |")
    print(f"| callback hooks per step, budget 1.0 (timed in the fit) | {statistics.median(hooks_t[1.0]):.1f} |")
    print(f"| ratio, budget 1.0 / plain | {statistics.median(ratios):.3f} |")
    print(f"| StochasticDepth(budget=0.5) | {statistics.median(steps_t[0.5]):.1f} |")
    print(f"| callback hooks per step, budget 0.5 (timed in the fit) | {statistics.median(hooks_t[0.5]):.1f} |")
    print(f"| ratio, budget 0.5 / plain | {statistics.median(s / p for s, p in zip(steps_t[0.5], steps_t[None])):.3f} |")


if __name__ == "__main__":
    main()
