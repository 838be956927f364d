"""What the callbacks' probes share beyond their data: the loss behind g_l, and results combined over ranks.

Probes read their data through :mod:`lightning_sd.callbacks.probe_data` (the only way); what they
compute from it is combined here so that every rank ends with the same numbers (the package's logging
policy, :func:`~lightning_sd.callbacks.output.log_epoch_metrics`, relies on it):

- :func:`reduce_mean_over_ranks`: an example-weighted mean of per-rank sums (``g_l`` of the
  RegularizationMonitor and of ``StochasticDepth(mode="maxreg")``);
- :func:`gather_over_ranks`: every rank's rows, concatenated in rank order (NormalityMonitor's p-values);
- :func:`mean_over_ranks`: the mean over ranks of per-rank scalars (LogGaussianMonitor's statistics);
- :func:`infer_regularization_loss`: the loss whose Hessian defines ``g_l``.

Every rank must call each of the first three, with tensors of the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_sd.core.probing import restored_state
from lightning_sd.core.regularization import REGULARIZATION_LOSSES

__all__ = ["gather_over_ranks", "infer_regularization_loss", "mean_over_ranks", "reduce_mean_over_ranks"]


def infer_regularization_loss(
    requested: str, pl_module: torch.nn.Module, example_input: Tensor | None = None, owner: str = "StochasticDepth"
) -> Literal["cross_entropy", "mse"]:
    """The loss whose Hessian defines g_l: ``requested``, else the module's declaration, else from the output.

    Args:
        requested: ``"cross_entropy"``, ``"mse"`` (returned as is) or ``"auto"``.
        pl_module: the module; its ``regularization_loss`` attribute is read with ``"auto"``.
        example_input: a probe batch; with ``"auto"`` and no declaration, the module's output on it decides
            (one coordinate per example -> ``"mse"``, else ``"cross_entropy"``). The forward runs in
            evaluation mode, without gradients, the global RNG and every buffer restored.
        owner: the callback named in the messages.

    Returns:
        ``"cross_entropy"`` or ``"mse"``.

    Example::

        infer_regularization_loss("auto", SDRegressor())  # "mse": SDRegressor declares it
    """
    if requested in REGULARIZATION_LOSSES:
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"{owner}: regularization loss must be 'auto', 'cross_entropy' or 'mse', got {requested!r}")
    declared = getattr(pl_module, "regularization_loss", None)
    if isinstance(declared, str) and declared in REGULARIZATION_LOSSES:
        return declared  # type: ignore[return-value]
    if example_input is None:
        raise ValueError(
            f"{owner}: cannot infer the regularization loss of {type(pl_module).__name__} without probe data; "
            "pass 'cross_entropy' or 'mse' explicitly"
        )
    with isolate_rng(), restored_state(pl_module, "eval"), torch.no_grad():
        out = pl_module(example_input)
    if not isinstance(out, Tensor) or out.ndim == 0:
        raise TypeError(
            f"{owner}: {type(pl_module).__name__}'s forward returned {type(out).__name__}, not a (B, ...) tensor; "
            "g_l needs the output y_out. Pass the loss explicitly and make forward return the logits/predictions."
        )
    coords = out[0].numel() if out.ndim > 1 else 1
    loss: Literal["cross_entropy", "mse"] = "mse" if coords == 1 else "cross_entropy"
    rank_zero_info(
        f"{owner}: regularization loss inferred as {loss!r} from {type(pl_module).__name__}'s output of shape "
        f"{tuple(out.shape)} (one coordinate per example -> 'mse', several -> 'cross_entropy' logits); set it "
        f"explicitly, or give the module a regularization_loss attribute, if that is wrong"
    )
    return loss


def reduce_mean_over_ranks(trainer: pl.Trainer, pl_module: pl.LightningModule, total: Tensor, count: float) -> Tensor:
    """``sum_ranks total / sum_ranks count`` as an fp64 CPU tensor; every rank calls the same reduction.

    Args:
        trainer: the running trainer (its strategy reduces).
        pl_module: the module (its device carries the reduction).
        total: this rank's sum over its examples (any shape).
        count: this rank's number of examples (0 on a rank without data).

    Raises:
        RuntimeError: no rank had an example.
    """
    device = pl_module.device
    packed = torch.cat([total.to(torch.float64).flatten(), torch.tensor([float(count)], dtype=torch.float64)]).to(device)
    packed = trainer.strategy.reduce(packed, reduce_op="sum")
    packed = packed.detach().to("cpu", torch.float64)
    n = float(packed[-1])
    if n <= 0:
        raise RuntimeError(
            "no probe inputs on any rank: the dataloader yielded no batch. Check that the training set is not "
            "empty (or give the probe data explicitly)."
        )
    return packed[:-1].reshape(total.shape) / n


def gather_over_ranks(trainer: pl.Trainer, values: Tensor) -> Tensor:
    """Every rank's ``values`` (rows first, same shape on every rank) concatenated in rank order, as fp64 on CPU.

    With one process ``values`` is returned as it is.
    """
    if trainer.world_size <= 1:
        return values
    device = trainer.strategy.root_device
    gathered = trainer.strategy.all_gather(values.to(device=device, dtype=torch.float32))
    return gathered.reshape(-1, *values.shape[1:]).double().cpu()


def mean_over_ranks(trainer: pl.Trainer, values: Mapping[str, float]) -> dict[str, float]:
    """The mean over ranks of each per-rank scalar (one all-reduce for the whole mapping, same keys on every rank).

    With one process the values are returned unchanged. A value that is NaN on any rank is NaN on all.
    """
    if trainer.world_size <= 1:
        return dict(values)
    keys = list(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=trainer.strategy.root_device)
    reduced = trainer.strategy.reduce(packed, reduce_op="mean").detach().to("cpu", torch.float64)
    return {k: float(v) for k, v in zip(keys, reduced.tolist())}
