"""Lightning plumbing for ``StochasticDepth(mode="maxreg")``: measure g_l at fit start, return Lemma 2's rates.

``measure_maxreg`` is called by :func:`lightning_sd.callbacks.rate_measurement.measure_rates` at
``on_train_start`` (and every ``recompute_every_n_epochs``). It reads ``callback.sensitivity_batches``
batches of the private probe loader of :mod:`lightning_sd.callbacks.probe_data` (the run's data order,
workers and random stream are untouched), computes
:func:`~lightning_sd.core.regularization.regularization_terms` on their inputs, averages over batches and
ranks, and solves Lemma 2 for the budget.

**Network.** g_l is measured on the *training-mode* network (``regularization_terms(mode="train")``:
BatchNorm with batch statistics, one gate per block shared by the batch), the same network whose loss
SenseMode differentiates. Both measured modes describe the function SD perturbs during training,
``Loss_train(m)`` around ``m = 1``: S_l is its first derivative and g_l the Gauss-Newton part of its
second derivative (Hayou & Ayed 2021, Eq. (4)-(5): the penalty is the second-order term of the loss of
the network being trained). At initialization BatchNorm's running statistics are still (0, 1), so the
evaluation network is a different, unnormalized function; measuring g there would rank blocks of a
network nobody trains. ``RegularizationMonitor`` keeps watching the evaluation network by default.

**Loss** (``regularization_loss``, whose Hessian H defines g), decided once per measurement:

1. ``callback.regularization_loss`` when it is ``"cross_entropy"`` or ``"mse"``;
2. with ``"auto"`` (the default): the LightningModule's ``regularization_loss`` attribute when it is
   one of those (``SDClassifier`` declares ``"cross_entropy"``, ``SDRegressor`` ``"mse"``; declare it on
   your own module);
3. else the output: one coordinate per example (shape ``(B,)`` or ``(B, 1)``) -> ``"mse"`` (the softmax
   of a single logit is constant, so cross-entropy would give H = 0 and g = 0 for every block); more
   coordinates -> ``"cross_entropy"`` (logits). Rule 3 is announced on rank 0.

When every measured g_l is 0 (all branches output zero, e.g. zero-initialised last BatchNorm, or a loss
that does not fit the output) Lemma 2 has no information and gives uniform rates: a warning says so.

Input convention: :func:`lightning_sd.callbacks.probe_data.default_input_fn` (``batch[0]`` of tuples,
known keys of dicts, a bare tensor); anything else needs ``input_fn(batch) -> Tensor``, given as the
``input_fn`` argument or as an ``input_fn`` attribute of the callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_sd.callbacks.probe_data import default_input_fn, probe_inputs
from lightning_sd.core.probing import restored_state
from lightning_sd.core.regularization import REGULARIZATION_LOSSES, regularization_terms
from lightning_sd.core.survival import survival_rates

__all__ = ["default_input_fn", "infer_regularization_loss", "measure_maxreg", "reduce_mean_over_ranks"]


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


def warn_if_all_zero(g: Tensor, loss: str, owner: str) -> None:
    """Warn (rank 0) that every g_l is 0: Lemma 2 has no information, and say what to do."""
    if g.numel() and bool((g == 0).all()):
        rank_zero_warn(
            f"{owner}: every measured regularization term g_l is 0 (loss={loss!r}), so Lemma 2 has nothing to rank the "
            "blocks by and gives uniform rates. Either the loss does not fit the output (cross_entropy on a single "
            "output coordinate has H = 0: use 'mse' for a regression) or every residual branch outputs zero at this "
            "point (zero-initialised last BatchNorm): measure after some training steps, or use mode='uniform'/'linear'."
        )


def reduce_mean_over_ranks(trainer: pl.Trainer, pl_module: pl.LightningModule, total: Tensor, count: float) -> Tensor:
    """``sum_ranks total / sum_ranks count`` as an fp64 CPU tensor; every rank calls the same two reductions."""
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


def measure_maxreg(
    callback: Any,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    input_fn: Callable[[Any], Tensor] | None = None,
    estimator: Literal["exact", "sampled", "auto"] | None = None,
    num_samples: int = 16,
) -> Tensor:
    """Measure ``g_l`` on training probe batches and return Lemma 2's max-regularization rates.

    ``g = mean over the probe examples of zeta_l^T H zeta_l`` (Hayou & Ayed 2021, Eq. (5)) on the
    training-mode network (see the module docstring for why), with the loss of
    :func:`infer_regularization_loss` ``(callback.regularization_loss, ...)``, over
    ``callback.sensitivity_batches`` probe batches per rank, averaged over all ranks (weighted by
    examples), then ``p_l = clip(1/2 - C/g_l, p_min, 1)`` with ``sum p = budget * L`` (Lemma 2 with the
    callback's floor ``p_min``).
    Sets ``callback.g`` (fp32 CPU) and ``callback.regularization_loss_used``. Every rank gets
    identical rates. With BatchNorm in the model g is exact (one forward-mode pass per block and
    batch); without, ``estimator`` decides (see :func:`~lightning_sd.core.regularization.regularization_terms`).

    Args:
        callback: the :class:`~lightning_sd.callbacks.StochasticDepth` instance (its ``handle``,
            ``budget``, ``sensitivity_batches``, ``regularization_loss``; optional attributes ``input_fn``
            and ``regularization_estimator``).
        trainer: the running ``Trainer`` (at ``on_train_start`` or later).
        pl_module: the LightningModule carrying the gates.
        input_fn: ``batch -> inputs``; default :func:`~lightning_sd.callbacks.probe_data.default_input_fn`.
        estimator: ``"exact"``, ``"sampled"`` or ``"auto"`` (default: the callback's
            ``regularization_estimator`` or ``"auto"``: exact up to ``num_samples`` outputs).
        num_samples: probe vectors of the sampled estimator.

    Returns:
        float64 CPU tensor of rates, length L.

    Example::

        trainer = Trainer(callbacks=[StochasticDepth(mode="maxreg", budget=0.5)])  # loss inferred
        trainer.fit(model, datamodule=dm)  # rates measured at on_train_start via measure_maxreg
    """
    handle = callback.handle
    if handle is None:
        raise RuntimeError("measure_maxreg needs the StochasticDepth callback's gates; it runs after the callback's setup")
    fn = input_fn or getattr(callback, "input_fn", None)
    est = estimator or getattr(callback, "regularization_estimator", None) or "auto"
    inputs = probe_inputs(trainer, pl_module, num_batches=int(callback.sensitivity_batches), input_fn=fn, epoch=trainer.current_epoch)
    requested = getattr(callback, "regularization_loss", "auto")
    loss = infer_regularization_loss(requested, pl_module, inputs[0] if inputs else None)
    total = torch.zeros(handle.num_blocks, dtype=torch.float64)
    count = 0
    for x in inputs:
        g = regularization_terms(pl_module, x, loss=loss, estimator=est, num_samples=num_samples, seed=count, mode="train")
        total += g * x.shape[0]
        count += x.shape[0]
    g = reduce_mean_over_ranks(trainer, pl_module, total, count)
    callback.g = g.to(torch.float32)
    callback.regularization_loss_used = loss
    warn_if_all_zero(g, loss, "StochasticDepth(mode='maxreg')")
    return survival_rates("maxreg", handle.num_blocks, callback.budget, g=g, p_min=callback.p_min)
