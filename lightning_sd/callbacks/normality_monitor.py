"""NormalityMonitor: is the noise stochastic depth injects Gaussian? (Hayou & Ayed 2021, Theorem 2, Fig. 5)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_sd.callbacks.monitor import ProbeMonitor, stochastic_depth_callbacks
from lightning_sd.callbacks.probe_data import probe_inputs, resolve_input_fn
from lightning_sd.callbacks.probing import gather_over_ranks
from lightning_sd.core.normality import NORMALITY_TESTS, check_normality_test, normality_pvalues, summarize
from lightning_sd.core.validation import check_unit_interval

__all__ = ["NormalityMonitor"]


class NormalityMonitor(ProbeMonitor):
    r"""Log the distribution of normality-test p-values of the model's output under stochastic-depth masks.

    Every ``every_n_epochs`` training epochs (and at the start of training with ``probe_at_start``),
    the callback takes fixed probe inputs (``num_inputs`` examples of the validation data, or of the
    training data when there is no validation, read once through :mod:`lightning_sd.callbacks.probe_data`:
    a fixed pseudo-random subset from a private loader, so the run's data order, workers and random
    stream are untouched; the probe itself runs under ``isolate_rng``), draws ``num_masks`` masks
    ``delta ~ Bernoulli(p)`` per input with the rates of the :class:`~lightning_sd.StochasticDepth`
    callback, records one fixed output neuron for each mask and runs a normality test per input
    (:func:`~lightning_sd.core.normality.normality_pvalues`; model in eval mode, no grad, masked passes
    batched). Theorem 2: in a deep Stable ResNet, ``y(x; delta) = y(x; p) + gamma(x)`` with
    ``gamma(x) -> N(0, alpha v(x))``, so the p-values should look uniform on [0, 1] (median about 0.5,
    about 95% above 0.05) at every epoch (Fig. 5 left) and from about 20 blocks on (Fig. 5 right).

    Logged (``on_epoch``, under ``prefix``): ``median_pvalue``, ``frac_above_<alpha>``, ``q25_pvalue``,
    ``q75_pvalue``; with ``per_block`` per block l ``block_median/<l>`` and ``block_frac_above/<l>``
    (1-based, zero-padded). On a ``TensorBoardLogger``: a histogram of the p-values ``<prefix>/pvalues``
    (20 bins on [0, 1]) and, with ``per_block``, ``<prefix>/block_pvalues`` (all inputs and blocks) and
    one histogram and one image per probe of ``block_median`` and ``block_frac_above`` over depth in
    place of their per-block scalars (:func:`~lightning_sd.callbacks.output.log_per_block`). All p-values go to
    ``<log_dir>/<prefix>_pvalues.csv`` (rank zero, one row per probe input per probe: epoch, step,
    input, output p-value, then block p-values). ``self.history`` keeps one record per probe: the
    summaries (checkpointed) and, in memory only, the p-values of all ranks (``"pvalues"``,
    ``"block_pvalues"``), which :class:`~lightning_sd.SummaryPlots` draws; ``self.last_pvalues`` /
    ``self.last_block_pvalues`` are the last probe's.

    Distributed: every rank probes its own inputs (its shard of the data, as the distributed sampler
    gives it) with its own masks; all ranks all-gather the p-values (every rank calls the same
    collectives), so the logged summaries are identical on all ranks and cover ``world_size x
    num_inputs`` inputs (they are then logged with ``sync_dist=True``, the package's one policy, see
    :func:`~lightning_sd.callbacks.output.log_epoch_metrics`). The probe runs without autocast (statistics in fp32/fp64); a model in
    ``"bf16-true"``/``"16-true"`` precision is probed in its own dtype.

    Args:
        every_n_epochs: probe after every n-th training epoch (>= 1).
        num_inputs: probe inputs per rank (>= 1; fewer if the data is smaller, then equalized over ranks).
        num_masks: masks per input M (paper: 200); shapiro needs M >= 3, dagostino M >= 8.
        test: ``"shapiro"`` (:func:`scipy.stats.shapiro`) or ``"dagostino"`` (:func:`scipy.stats.normaltest`).
        per_block: also test one neuron of every block's output y_l (Fig. 5 right); L more metrics.
        survival: rates to use when there is no StochasticDepth callback (float or length-L list in
            [0, 1]); the model then gets temporary gates with ``"expected"`` scaling (the paper's
            m = delta). With a StochasticDepth callback its current rates and scaling are used.
        neuron: index into the flattened per-example output.
        block_neuron: index into each flattened block output (default ``neuron``).
        alpha: significance level of the ``frac_above`` metrics, in (0, 1).
        seed: seed of the masks; the probe of epoch e on rank r uses :meth:`probe_seed` ``(e, r)``.
        input_fn: ``batch -> input tensor``; default
            :func:`~lightning_sd.callbacks.probe_data.default_input_fn` (``batch[0]`` of tuples, the keys
            ``"x"``, ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"`` of dicts).
        input_key: deprecated (``DeprecationWarning``): ``input_fn=lambda batch: batch[input_key]``.
        probe: explicit probe inputs (batch first) instead of data from the dataloaders.
        probe_at_start: also probe at ``on_train_start`` (the network at initialization or on resume).
        chunk_size: (input, mask) rows per forward pass, bounds memory.
        prefix: metric-key and file-name prefix.

    Example::

        trainer = Trainer(callbacks=[StochasticDepth("uniform", 0.7, scaling="expected"),
                                     NormalityMonitor(every_n_epochs=5, per_block=True)])
        trainer.fit(SDRegressor(depth=100, width=128), datamodule=ToyRegressionDataModule())
        monitor.history[-1]["median_pvalue"]  # > 0.05 when SD acts as Gaussian noise
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_inputs: int = 64,
        num_masks: int = 200,
        test: str = "shapiro",
        per_block: bool = False,
        survival: float | Sequence[float] | None = None,
        neuron: int = 0,
        block_neuron: int | None = None,
        alpha: float = 0.05,
        seed: int = 0,
        input_fn: Callable[[Any], Tensor] | None = None,
        input_key: int | str | None = None,
        probe: Tensor | None = None,
        probe_at_start: bool = False,
        chunk_size: int = 4096,
        prefix: str = "normality",
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, at_train_start=probe_at_start, survival=survival)
        if int(num_inputs) != num_inputs or num_inputs < 1:
            raise ValueError(f"num_inputs must be an integer >= 1, got {num_inputs!r}")
        if test not in NORMALITY_TESTS:
            raise ValueError(f"unknown test={test!r}; choose 'shapiro' or 'dagostino'")
        check_normality_test(test, num_masks)
        if survival is not None:
            check_unit_interval(torch.as_tensor(survival, dtype=torch.float64))
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if probe is not None and (not isinstance(probe, Tensor) or probe.ndim < 1 or probe.shape[0] < 1):
            raise ValueError("probe must be a non-empty batch-first tensor")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        self.num_inputs = int(num_inputs)
        self.num_masks = int(num_masks)
        self.test = test
        self.per_block = bool(per_block)
        self.neuron = int(neuron)
        self.block_neuron = block_neuron
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.input_fn = resolve_input_fn("NormalityMonitor", input_fn, input_key)
        self.probe = probe
        self.chunk_size = int(chunk_size)
        self.prefix = prefix
        self.csv_path: str | None = None
        self._inputs: Tensor | None = None

    @property
    def probe_at_start(self) -> bool:
        """Whether the network is also probed at ``on_train_start`` (:attr:`~ProbeMonitor.at_train_start`)."""
        return self.at_train_start

    @property
    def last_pvalues(self) -> Tensor | None:
        """The output p-values of the last probe, all ranks (``None`` before the first probe of this process)."""
        return self.history[-1].get("pvalues") if self.history else None

    @property
    def last_block_pvalues(self) -> Tensor | None:
        """The block p-values ``(inputs, L)`` of the last probe with ``per_block=True``, else ``None``."""
        return self.history[-1].get("block_pvalues") if self.history else None

    # ------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        found = stochastic_depth_callbacks(trainer.callbacks)  # type: ignore[attr-defined]
        if len(found) > 1:
            raise ValueError("NormalityMonitor: found several StochasticDepth callbacks; use one")
        if not found and self.survival is None:
            raise ValueError(
                "NormalityMonitor needs survival rates: add a StochasticDepth callback to the Trainer "
                "(Trainer(callbacks=[StochasticDepth(...), NormalityMonitor()])) or pass survival= (e.g. 0.7)"
            )

    # ------------------------------------------------------------------------------------ probe inputs
    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        if self.probe is not None:
            return self.probe[: self.num_inputs]
        parts = probe_inputs(trainer, pl_module, max_examples=self.num_inputs, source="val_or_train", input_fn=self.input_fn)
        if not parts:
            raise RuntimeError("NormalityMonitor: the dataloader yielded no examples; pass probe=")
        return torch.cat([x.cpu() for x in parts])

    def _probe_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        if self._inputs is None:
            x = self._collect(trainer, pl_module)
            # every rank must probe the same number of inputs for the all-gather
            n = torch.tensor([x.shape[0]], dtype=torch.float64, device=trainer.strategy.root_device)
            counts = trainer.strategy.all_gather(n)
            self._inputs = x[: int(counts.min())]
        return self._inputs

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe_inputs(trainer, pl_module)  # fix the probe now: the same inputs at every epoch

    # ------------------------------------------------------------------------------------ probe
    def probe_seed(self, epoch: int, rank: int) -> int:
        """Mask seed of the probe at ``epoch`` on ``rank``: from ``(seed, epoch, rank)`` (independent per rank)."""
        return int(np.random.SeedSequence([self.seed, int(epoch), int(rank)]).generate_state(1)[0])

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Probe now: p-values of all ranks (all-gathered) and their summaries. Every rank calls it."""
        x = self._probe_inputs(trainer, pl_module).to(pl_module.device)
        survival, scaling = self.rates_in_force(trainer, pl_module)
        if survival is None:
            raise RuntimeError("NormalityMonitor: the StochasticDepth callback has no gates on the model (not set up?)")
        with isolate_rng():
            res = normality_pvalues(
                pl_module,
                x,
                survival,
                num_masks=self.num_masks,
                test=self.test,
                neuron=self.neuron,
                per_block=self.per_block,
                block_neuron=self.block_neuron,
                scaling=scaling,
                seed=self.probe_seed(trainer.current_epoch, trainer.global_rank),
                chunk_size=self.chunk_size,
            )
        pvalues = gather_over_ranks(trainer, res.pvalues)
        blocks = gather_over_ranks(trainer, res.block_pvalues) if res.block_pvalues is not None else None
        s = summarize(pvalues, self.alpha)
        record: dict[str, Any] = {
            "median_pvalue": s["median"],
            f"frac_above_{self.alpha:g}": s["frac_above"],
            "q25_pvalue": s["q25"],
            "q75_pvalue": s["q75"],
        }
        if blocks is not None:
            per_block = [summarize(blocks[:, block], self.alpha) for block in range(blocks.shape[1])]
            record["block_median"] = [b["median"] for b in per_block]
            record["block_frac_above"] = [b["frac_above"] for b in per_block]
        record["pvalues"] = pvalues
        record["block_pvalues"] = blocks
        return record

    @override
    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: dict[str, Any]) -> None:
        """Log the summaries, the p-value histogram (TensorBoard) and append the p-values to the CSV file."""
        metrics = {key: record[key] for key in ("median_pvalue", f"frac_above_{self.alpha:g}", "q25_pvalue", "q75_pvalue")}
        # computed from the all-gathered p-values: identical on every rank
        self.log_metrics(pl_module, {f"{self.prefix}/{name}": value for name, value in metrics.items()})
        pvalues, blocks = record["pvalues"], record["block_pvalues"]
        if "block_median" in record:
            per_block = {f"{self.prefix}/{name}": record[name] for name in ("block_median", "block_frac_above")}
            self.log_per_block(trainer, pl_module, per_block, width=max(3, len(str(len(record["block_median"])))))
        log_dir = self.log_dir(trainer)  # every rank reads it
        if not trainer.is_global_zero:
            return
        bins = np.linspace(0.0, 1.0, 21)
        self.log_histogram(trainer, f"{self.prefix}/pvalues", pvalues, bins=bins)
        if blocks is not None:
            self.log_histogram(trainer, f"{self.prefix}/block_pvalues", blocks, bins=bins)
        self._append_csv(trainer, log_dir, pvalues, blocks)

    def _append_csv(self, trainer: pl.Trainer, log_dir: str, pvalues: Tensor, blocks: Tensor | None) -> None:
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, f"{self.prefix}_pvalues.csv")
        fields = ["epoch", "global_step", "input", "pvalue"]
        if blocks is not None:
            fields += [f"block_{block + 1}" for block in range(blocks.shape[1])]
        new = not os.path.exists(path) or self.csv_path != path
        with open(path, "w" if new else "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(fields)
            for i in range(pvalues.shape[0]):
                row = [trainer.current_epoch, trainer.global_step, i, float(pvalues[i])]
                if blocks is not None:
                    row += [float(v) for v in blocks[i]]
                writer.writerow(row)
        self.csv_path = path

    # ------------------------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        # the summaries only: the p-values (world_size x num_inputs per probe) stay in memory
        return {"history": [{k: v for k, v in record.items() if k not in _IN_MEMORY_ONLY} for record in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


_IN_MEMORY_ONLY = ("pvalues", "block_pvalues")
