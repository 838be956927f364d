"""What stochastic depth does under each Lightning strategy (the decision, kept apart so it is testable).

- Single device and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_find_unused_parameters_true``):
  batch drop skips dropped blocks. Every rank draws the same mask (same seed, same step), and a
  skipped block's parameters get an exact zero gradient, so DDP's reducer sees every parameter
  used at every step (``find_unused_parameters=False`` works; gradients are all-reduced as usual).
- FSDP, ModelParallel (FSDP2/TP), DeepSpeed, XLA: sharded parameters exist only inside their unit's
  forward and collectives are issued per unit, and XLA compiles a graph per mask pattern; batch drop
  therefore multiplies dropped branches by 0 instead of skipping them (same values and gradients,
  no speed-up), and says so once.
- Any other strategy: a clear error at ``setup``.

On a single device (with automatic optimization) the skipped blocks' zero gradients are given after
each backward (``StochasticDepthHandle.fill_zero_gradients``) instead of by a node in the autograd
graph: the same values, without an autograd edge per parameter. Under DDP the node stays: the reducer
waits for every parameter's gradient during the backward.
"""

from __future__ import annotations

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)

__all__ = ["fills_zero_gradients_after_backward", "skips_compute_under"]

_MASKING = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy, XLAStrategy)
_SKIPPING = (DDPStrategy, SingleDeviceStrategy)


def skips_compute_under(strategy: Strategy) -> tuple[bool, str | None]:
    """Whether batch drop may skip dropped blocks under ``strategy``, and a message when it may not.

    Raises:
        RuntimeError: for a strategy the package has not been built for.
    """
    if isinstance(strategy, _MASKING):
        return False, (
            f"StochasticDepth: under {type(strategy).__name__} dropped blocks are masked (multiplied by 0) "
            "instead of skipped, so that every rank runs the same sharded collectives; results are the same, "
            "there is no speed-up. Use strategy='ddp' for compute skipping."
        )
    if isinstance(strategy, _SKIPPING):
        return True, None
    raise RuntimeError(
        f"StochasticDepth does not support the strategy {type(strategy).__name__}: supported are single-device, "
        "DDP (ddp, ddp_spawn, ddp_fork, ddp_find_unused_parameters_true), FSDP, ModelParallel, DeepSpeed and XLA. "
        "Use one of them, or subclass DDPStrategy for a custom data-parallel strategy."
    )


def fills_zero_gradients_after_backward(strategy: Strategy) -> bool:
    """Whether skipped blocks may get their zero gradients after the backward (one device) rather than in it.

    Under DDP (and any strategy that is not single-device) every parameter's gradient must arrive during
    the backward, where the reducer's hooks see it: the zero-gradient node stays in the graph.
    """
    return isinstance(strategy, SingleDeviceStrategy)
