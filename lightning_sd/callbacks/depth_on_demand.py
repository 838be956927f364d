"""Depth on demand: evaluate a network trained with stochastic depth at several depths.

:class:`DepthOnDemand` prunes the network of the run's :class:`~lightning_sd.StochasticDepth` to each
fraction in ``keeps`` (:mod:`lightning_sd.core.pruning`), runs the module's ``validation_step`` over the
validation data, and logs what it logged as ``depth/<metric>@<keep>``. The helpers it uses are public:

- :func:`evaluation_sensitivities_on_validation`: SenseMode's ``S_l`` of the evaluation network on a few
  validation batches (``by="sensitivity"``);
- :func:`validation_metrics`: one pass of ``validation_step`` over the validation data, its logged epoch
  values reduced as Lightning reduces them (batch-size weighted means; torchmetrics ``compute()``).

Both observe only: module modes, buffers, torchmetrics states and the global RNG are restored, and the
trainer's dataloader iterators and workers are not touched (private loaders, see
:func:`~lightning_sd.callbacks.probe_data.probe_loader`). A run with the callback ends bit-identical to
the run without it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_sd._internals import load_validation_data, metric_states_restored
from lightning_sd.callbacks.output import log_epoch_metrics, publish_table
from lightning_sd.callbacks.probe_data import probe_batches, probe_loader
from lightning_sd.callbacks.rate_measurement import measurement_loss, sensitivities_over_ranks
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.probing import restored_state
from lightning_sd.core.pruning import PRUNE_BY, PruneBy, check_keep
from lightning_sd.core.validation import check_choice

__all__ = ["DepthOnDemand", "evaluation_sensitivities_on_validation", "validation_metrics"]


def evaluation_sensitivities_on_validation(
    trainer: pl.Trainer, pl_module: pl.LightningModule, num_batches: int, sensitivity_loss: Any = None
) -> Tensor:
    """``S_l = dLoss/dm_l`` at ``m = 1`` of the evaluation network (eval mode) on ``num_batches`` validation batches.

    The loss is the module's ``training_step`` loss (logging silenced) or ``sensitivity_loss(module, batch)``,
    on the first validation dataloader (the training data when there is none), averaged over ranks.
    Returns float32 on CPU, length L, call order.
    """
    loss_of = measurement_loss(sensitivity_loss, pl_module)
    batches = probe_batches(trainer, pl_module, int(num_batches), source="val_or_train")
    if not batches:
        raise RuntimeError("the validation data yielded no batch to measure sensitivities on")
    return sensitivities_over_ranks(trainer, pl_module, batches, loss_of, "eval")


_REDUCTIONS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reduction(reduce_fx: Any) -> str:
    """Lightning's ``reduce_fx`` (a name or ``torch.mean``/``sum``/``max``/``min``) as one of mean, sum, max, min."""
    name = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", repr(reduce_fx))
    if name not in _REDUCTIONS:
        raise ValueError(
            f"DepthOnDemand reduces the values validation_step logs as Lightning does for reduce_fx in "
            f"{sorted(_REDUCTIONS)}; got reduce_fx={reduce_fx!r}. Log that value with one of those, or log a torchmetric."
        )
    return _REDUCTIONS[name]


class _LogRecorder:
    """Stands in for ``LightningModule.log`` during :func:`validation_metrics`: keeps the epoch-level values."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}  # mean: sum of value * weight; sum: sum; max/min: the extreme
        self.weights: dict[str, float] = {}
        self.reductions: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.batch: Any = None
        self.suffix = ""

    def __call__(
        self,
        name: str,
        value: Any,
        *args: Any,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if on_epoch is False:  # a per-step value: Lightning keeps no epoch value for it either
            return
        name += self.suffix
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics is a Lightning dependency
            Metric = ()  # type: ignore[assignment,misc]  # noqa: N806
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        how = self.reductions.setdefault(name, _reduction(reduce_fx))
        number = float(value)
        if how == "mean":
            weight = float(batch_size) if batch_size is not None else float(extract_batch_size(self.batch))
            self.values[name] = self.values.get(name, 0.0) + number * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight
        elif how == "sum":
            self.values[name] = self.values.get(name, 0.0) + number
        else:
            pick = max if how == "max" else min
            self.values[name] = pick(self.values.get(name, number), number)

    def reduced(self, strategy: Any) -> dict[str, float]:
        """The epoch values over this rank's batches and every rank's (the same on every rank)."""
        out: dict[str, float] = {}
        device = strategy.root_device
        for how in ("mean", "sum", "max", "min"):
            keys = sorted(k for k, v in self.reductions.items() if v == how)
            if not keys:
                continue
            rows = [[self.values[k], self.weights.get(k, 1.0)] for k in keys]
            packed = torch.tensor(rows, dtype=torch.float64, device=device)
            op: Any = "sum" if how in ("mean", "sum") else getattr(torch.distributed.ReduceOp, how.upper())
            totals = torch.as_tensor(strategy.reduce(packed, reduce_op=op)).tolist()
            for k, (value, weight) in zip(keys, totals):
                out[k] = (value / weight if weight > 0 else math.nan) if how == "mean" else value
        return out


@contextlib.contextmanager
def _recording_log(pl_module: pl.LightningModule) -> Iterator[_LogRecorder]:
    recorder = _LogRecorder()
    saved = pl_module.__dict__.get("log")
    pl_module.__dict__["log"] = recorder
    try:
        yield recorder
    finally:
        if saved is None:
            pl_module.__dict__.pop("log", None)
        else:
            pl_module.__dict__["log"] = saved


def _reset_metrics(pl_module: pl.LightningModule) -> None:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a Lightning dependency
        return
    for module in pl_module.modules():
        if isinstance(module, Metric):
            module.reset()


def _validation_loaders(trainer: pl.Trainer) -> list[Any]:
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is None:
        raise RuntimeError(
            "DepthOnDemand evaluates on the validation data, but this run has none (no val_dataloader, or "
            "limit_val_batches=0). Give the Trainer validation data."
        )
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def validation_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """One pass of ``validation_step`` over the validation data; the epoch values it logs, reduced.

    Scalars are reduced with their ``reduce_fx`` over batches and ranks as Lightning reduces them (``"mean"``,
    the default, weighted by ``batch_size`` or the batch's size; ``"sum"``, ``"max"``, ``"min"``); values
    logged with ``on_epoch=False`` are left out; logged torchmetrics are reset, updated by the pass and
    ``compute()``-d (then put back as they were). ``limit_val_batches`` is honoured. Several validation
    dataloaders get Lightning's ``/dataloader_idx_i`` suffix.
    """
    loaders = _validation_loaders(trainer)
    limits = list(getattr(trainer, "num_val_batches", []) or [])
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolate_rng())
        stack.enter_context(restored_state(pl_module, "eval"))
        stack.enter_context(metric_states_restored(pl_module))
        stack.enter_context(torch.no_grad())
        recorder = stack.enter_context(_recording_log(pl_module))
        _reset_metrics(pl_module)  # the pass's own accumulation (states are put back on exit)
        for idx, loader in enumerate(loaders):
            limit = limits[idx] if idx < len(limits) else math.inf
            recorder.suffix = f"/dataloader_idx_{idx}" if len(loaders) > 1 else ""
            for batch_idx, batch in enumerate(probe_loader(loader)):
                if batch_idx >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                recorder.batch = batch
                with trainer.precision_plugin.val_step_context():
                    if len(loaders) > 1:
                        pl_module.validation_step(batch, batch_idx, idx)
                    else:
                        pl_module.validation_step(batch, batch_idx)
        out = recorder.reduced(trainer.strategy)
        for name, metric in recorder.metrics.items():
            out[name] = float(metric.compute())  # syncs across ranks itself
    return out


class DepthOnDemand(Callback):
    r"""Evaluate the trained network at several depths: prune to each ``keep`` fraction, run validation, log.

    At the end of ``fit`` (and every ``every_n_epochs`` epochs if asked) the callback prunes the network of
    the run's :class:`~lightning_sd.StochasticDepth` to ``round(keep * L)`` blocks for each ``keep``
    (:meth:`StochasticDepth.prune <lightning_sd.StochasticDepth.prune>`: the left-out blocks reduce to their
    shortcut), runs ``validation_step`` over the validation data (:func:`validation_metrics`), and records
    every epoch-level value the module logs there as ``depth/<metric>@<keep>`` (e.g. ``depth/val/acc@0.5``).
    Afterwards the network is as before (unpruned, or as the user had pruned it). Huang et al. (2016) and
    fairseq's LayerDrop (Fan et al. 2019) show that a network trained with stochastic depth degrades
    gracefully when blocks are removed at inference; SenseMode's ``S_l`` (Hayou & Ayed 2021, section 5:
    the first-order loss change when block l is removed) says which ones to remove.

    ``by="sensitivity"`` measures ``S_l`` once per evaluation, on ``sensitivity_batches`` validation batches
    of the evaluation network (:func:`evaluation_sensitivities_on_validation`), and keeps the blocks with
    the largest ``|S_l|``.

    Outputs: :attr:`results` (one row per keep: ``keep``, ``blocks`` kept, ``kept`` (1-based list),
    the metrics), a CSV table ``depth_on_demand_stepS.csv`` (S: the global step) in the log directory (and ``logger.log_table``
    where the logger has one), the metrics in every logger (at fit end, where ``self.log`` is not allowed,
    through ``logger.log_metrics`` at the last step; every n epochs through ``self.log`` at epoch end),
    and, with :class:`~lightning_sd.callbacks.summary_plots.SummaryPlots` placed after this callback, the
    figure ``depth_on_demand.png`` (each metric against the fraction of blocks kept).

    Args:
        keeps: fractions of the blocks to keep, each in (0, 1]; 1.0 is the full network.
        by: ``"sensitivity"``, ``"survival"`` (highest ``p_l``), ``"every_other"`` or ``"last"`` (see
            :mod:`lightning_sd.core.pruning`).
        every_n_epochs: also evaluate at the end of every n-th training epoch (int >= 1); ``None``: at fit end only.
        sensitivity_batches: validation batches for ``by="sensitivity"`` (int >= 1); ``None``: the
            ``StochasticDepth``'s ``sensitivity_batches``.

    Example::

        sd = StochasticDepth(mode="sensemode", budget=0.5)
        dod = DepthOnDemand(keeps=(1.0, 0.5), by="sensitivity")
        Trainer(callbacks=[sd, dod]).fit(model, datamodule=dm)
        dod.results  # [{'keep': 1.0, 'blocks': 9, ..., 'val/acc': 0.98}, {'keep': 0.5, 'blocks': 5, ...}]
    """

    def __init__(
        self,
        keeps: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
        by: PruneBy = "sensitivity",
        every_n_epochs: int | None = None,
        sensitivity_batches: int | None = None,
    ) -> None:
        keeps = [check_keep(k) for k in keeps]
        if not keeps:
            raise ValueError("keeps must name at least one fraction of blocks to keep, e.g. keeps=(1.0, 0.5)")
        if len(set(keeps)) != len(keeps):
            raise ValueError(f"keeps has repeated fractions: {keeps}")
        check_choice("by", by, PRUNE_BY)
        if every_n_epochs is not None and (isinstance(every_n_epochs, bool) or int(every_n_epochs) != every_n_epochs or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be an integer >= 1 or None, got {every_n_epochs!r}")
        if sensitivity_batches is not None and (int(sensitivity_batches) != sensitivity_batches or sensitivity_batches < 1):
            raise ValueError(f"sensitivity_batches must be an integer >= 1 or None, got {sensitivity_batches!r}")
        self.keeps = tuple(keeps)
        self.by = by
        self.every_n_epochs = None if every_n_epochs is None else int(every_n_epochs)
        self.sensitivity_batches = None if sensitivity_batches is None else int(sensitivity_batches)
        #: Rows of the last evaluation: ``keep``, ``blocks``, ``kept`` (1-based, space separated) and the metrics.
        self.results: list[dict[str, Any]] = []
        #: Every evaluation: ``(epoch, global_step, rows)``.
        self.history: list[tuple[int, int, list[dict[str, Any]]]] = []
        #: The last CSV table written (rank 0).
        self.table_path: str | None = None
        self._sd: StochasticDepth | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = [cb for cb in trainer.callbacks if isinstance(cb, StochasticDepth)]  # type: ignore[attr-defined]
        if not found:
            raise ValueError(
                "DepthOnDemand prunes the blocks of the run's StochasticDepth callback, and this Trainer has none; "
                "add StochasticDepth(...) to the Trainer's callbacks"
            )
        if not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"DepthOnDemand evaluates each depth with validation_step, which {type(pl_module).__name__} does not "
                "define; define validation_step (logging the metrics to compare) and give the Trainer validation data"
            )
        if trainer.limit_val_batches == 0:
            raise ValueError(
                "DepthOnDemand evaluates each depth on the validation data, but limit_val_batches=0 turns it off; "
                "give the Trainer validation batches (limit_val_batches > 0)"
            )
        self._sd = found[-1]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n is None or (trainer.current_epoch + 1) % n != 0 or trainer.sanity_checking:
            return
        if getattr(trainer, "val_dataloaders", None) is None:
            return  # validation has not run yet (check_val_every_n_epoch > 1): evaluate at a later epoch
        self.evaluate(trainer, pl_module)
        log_epoch_metrics(pl_module, self.metrics())

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history and self.history[-1][1] == trainer.global_step:
            return  # already evaluated at this step (the last epoch's end)
        if getattr(trainer, "val_dataloaders", None) is None:
            # Validation never ran (check_val_every_n_epoch larger than the run): load the validation data now.
            load_validation_data(trainer)
        self.evaluate(trainer, pl_module)
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)  # rank 0 only (loggers are rank_zero_only)

    def metrics(self) -> dict[str, float]:
        """The last evaluation as ``{"depth/<metric>@<keep>": value}``."""
        out: dict[str, float] = {}
        for row in self.results:
            for name, value in row.items():
                if name not in ("keep", "blocks", "kept"):
                    out[f"depth/{name}@{row['keep']:g}"] = float(value)
        return out

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """Prune to each keep, validate, restore; returns (and stores in :attr:`results`) one row per keep."""
        sd = self._sd
        if sd is None or sd.handle is None:
            raise RuntimeError("DepthOnDemand runs inside a fit with a StochasticDepth callback that has put its gates in")
        handle = sd.handle
        previous = handle.pruned
        sensitivities = None
        if self.by == "sensitivity":
            sensitivities = sd.pruning_sensitivities(num_batches=self.sensitivity_batches)
        rows: list[dict[str, Any]] = []
        try:
            for keep in self.keeps:
                kept = handle.prune(keep, self.by, sensitivities=sensitivities)
                metrics = validation_metrics(trainer, pl_module)
                rows.append({"keep": keep, "blocks": len(kept), "kept": " ".join(str(i + 1) for i in kept), **metrics})
        finally:
            handle.unprune()
            for index in previous:
                handle.gates[index].pruned = True
        self.results = rows
        self.history.append((trainer.current_epoch, trainer.global_step, rows))
        path = publish_table(trainer, f"depth_on_demand_step{trainer.global_step}.csv", rows, key="depth/table")
        if path is not None:
            self.table_path = path
        return rows
