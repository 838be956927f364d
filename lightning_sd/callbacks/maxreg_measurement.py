"""Lightning plumbing for ``StochasticDepth(mode="maxreg")``: measure g_l at fit start, return Lemma 2's rates.

``measure_maxreg`` is called by :func:`lightning_sd.callbacks.rate_measurement.measure_rates` at
``on_train_start`` (and every ``recompute_every_n_epochs``). It reads the first
``callback.sensitivity_batches`` batches of a *fresh* iterator of the training dataloader (the epoch's
own iterator is not consumed and the global RNG is restored afterwards, so the run sees the same data
order as without the measurement), computes :func:`~lightning_sd.core.regularization.regularization_terms`
on their inputs, averages over batches and ranks, and solves Lemma 2 for the budget.

Input convention: a batch is ``(x, y, ...)`` (list/tuple: ``x = batch[0]``), a dict (the first of the keys
``"x"``, ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"`` that is present) or a bare
tensor (the inputs themselves). Anything else needs ``input_fn(batch) -> Tensor``, given as the
``input_fn`` argument or as an ``input_fn`` attribute of the callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_sd.core.regularization import regularization_terms
from lightning_sd.core.survival import survival_rates

__all__ = ["default_input_fn", "measure_maxreg", "probe_inputs", "reduce_mean_over_ranks"]

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")


def default_input_fn(batch: Any) -> Tensor:
    """The model inputs of a batch: ``batch[0]`` of a tuple/list, a known key of a dict, or the tensor itself."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(
        f"cannot find the model inputs in a batch of type {type(batch).__name__}; the convention is (x, y) "
        f"tuples (x = batch[0]), dicts with one of the keys {_INPUT_KEYS}, or a bare tensor. "
        "Pass input_fn=lambda batch: ... returning the tensor the model takes."
    )


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def probe_inputs(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loader: Any,
    num_batches: int,
    input_fn: Callable[[Any], Tensor] | None = None,
    max_examples: int | None = None,
) -> Iterator[Tensor]:
    """Model inputs of the first ``num_batches`` batches of a fresh iterator of ``loader``, on the module's device.

    The global RNG (a shuffling sampler draws from it) is restored afterwards. Stops early once
    ``max_examples`` inputs have been yielded (the last batch is cut to fit).
    """
    fn = input_fn or default_input_fn
    loader = _first_loader(loader)
    if loader is None:
        return
    seen = 0
    with isolate_rng():
        iterator = iter(loader)
        for _ in range(num_batches):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            x = fn(batch)
            if not isinstance(x, Tensor):
                raise TypeError(f"input_fn returned {type(x).__name__}; it must return the model's input tensor")
            if max_examples is not None:
                x = x[: max_examples - seen]
                seen += x.shape[0]
            yield x
            if max_examples is not None and seen >= max_examples:
                break
        del iterator


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
    estimator: str | None = None,
    num_samples: int = 16,
) -> Tensor:
    """Measure ``g_l`` on the first training batches and return Lemma 2's max-regularization rates.

    ``g = mean over the probe examples of zeta_l^T H zeta_l`` (Hayou & Ayed 2021, Eq. (5)) with the loss
    ``callback.regularization_loss`` (``"cross_entropy"`` or ``"mse"``), over
    ``callback.sensitivity_batches`` training batches per rank, averaged over all ranks (weighted by
    examples), then ``p_l = clip(1/2 - C/g_l, p_min, 1)`` with ``sum p = budget * L`` (Lemma 2 with the
    callback's floor ``p_min``).
    Sets ``callback.g`` (fp32 CPU). Every rank gets identical rates.

    Args:
        callback: the :class:`~lightning_sd.callbacks.StochasticDepth` instance (its ``handle``,
            ``budget``, ``sensitivity_batches``, ``regularization_loss``; optional attributes
            ``input_fn`` and ``regularization_estimator``).
        trainer: the running ``Trainer`` (at ``on_train_start`` or later).
        pl_module: the LightningModule carrying the gates.
        input_fn: ``batch -> inputs``; default :func:`default_input_fn` (``batch[0]`` of ``(x, y)``).
        estimator: ``"exact"``, ``"sampled"`` or ``"auto"`` (default: the callback's
            ``regularization_estimator`` or ``"auto"``: exact up to ``num_samples`` outputs).
        num_samples: probe vectors of the sampled estimator.

    Returns:
        float64 CPU tensor of rates, length L.

    Example::

        trainer = Trainer(callbacks=[StochasticDepth(mode="maxreg", budget=0.5, regularization_loss="mse")])
        trainer.fit(model, datamodule=dm)  # rates measured at on_train_start via measure_maxreg
    """
    handle = callback.handle
    if handle is None:
        raise RuntimeError("measure_maxreg needs the StochasticDepth callback's gates; it runs after the callback's setup")
    loader = trainer.train_dataloader
    if _first_loader(loader) is None:
        raise RuntimeError(
            "mode='maxreg' measures g_l on training batches, but the trainer has no train dataloader yet; "
            "the measurement runs at on_train_start."
        )
    fn = input_fn or getattr(callback, "input_fn", None)
    est = estimator or getattr(callback, "regularization_estimator", None) or "auto"
    total = torch.zeros(handle.num_blocks, dtype=torch.float64)
    count = 0
    for x in probe_inputs(trainer, pl_module, loader, int(callback.sensitivity_batches), fn):
        g = regularization_terms(pl_module, x, loss=callback.regularization_loss, estimator=est, num_samples=num_samples, seed=count)
        total += g * x.shape[0]
        count += x.shape[0]
    g = reduce_mean_over_ranks(trainer, pl_module, total, count)
    callback.g = g.to(torch.float32)
    return survival_rates("maxreg", handle.num_blocks, callback.budget, g=g, p_min=callback.p_min)
