"""NormalityMonitor in a Trainer: single process, CSV output, errors, two-process DDP (TensorBoard: test_tensorboard.py).

The DDP test runs this file as a script (``python tests/test_normality_monitor.py OUT``) in a subprocess:
Lightning's DDP launcher re-runs that command for rank 1, so both ranks run only :func:`_ddp_main`,
and the results come back through JSON files written into OUT.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks.normality_monitor import NormalityMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.gates import existing_handle
from lightning_sd.core.normality import normality_pvalues
from lightning_sd.models import ResidualMLP
from tests.distributed import run_script


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regressor(pl.LightningModule):
    def __init__(self, depth: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualMLP(8, width=32, depth=depth, out_features=1, stable=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, torch.sin(x[:, :1]))


def _trainer(root, **kw) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_monitor_in_trainer_matches_core_and_writes_outputs(tmp_path) -> None:
    sd = StochasticDepth(mode="uniform", budget=0.7, scaling="expected", seed=1)
    monitor = NormalityMonitor(num_inputs=6, num_masks=40, per_block=True, probe_at_start=True, seed=5)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    model = Regressor()
    val = _data(20, seed=1)
    trainer = _trainer(tmp_path, callbacks=[sd, monitor], logger=logger)
    trainer.fit(model, DataLoader(_data(32, seed=0), batch_size=8), DataLoader(val, batch_size=4))

    # the probe: the first 6 validation examples (across batches of 4), fixed for the run
    torch.testing.assert_close(monitor._inputs, val.tensors[0][:6])
    # at start + after epochs 0 and 1
    assert [(h["epoch"], h["global_step"]) for h in monitor.history] == [(0, 0), (0, 2), (1, 4)]
    # the last probe equals the core function on the final weights with the same masks (seed) and rates
    ref = normality_pvalues(
        model, val.tensors[0][:6], torch.full((24,), 0.7), num_masks=40, per_block=True, scaling="expected", seed=monitor.probe_seed(1, 0)
    )
    torch.testing.assert_close(monitor.last_pvalues, ref.pvalues, rtol=1e-12, atol=0)
    torch.testing.assert_close(monitor.last_block_pvalues, ref.block_pvalues, rtol=1e-12, atol=0)
    last = monitor.history[-1]
    assert last["median_pvalue"] == pytest.approx(float(np.median(ref.pvalues.numpy())))
    assert last["frac_above_0.05"] == pytest.approx(float((ref.pvalues > 0.05).double().mean()))
    assert last["block_median"] == pytest.approx(ref.block_medians().tolist())
    # logged through Lightning (epoch-level); the TensorBoard histograms are tests/test_tensorboard.py's
    assert float(trainer.callback_metrics["normality/median_pvalue"]) == pytest.approx(last["median_pvalue"], rel=1e-6)
    assert float(trainer.callback_metrics["normality/block_median/024"]) == pytest.approx(last["block_median"][23], rel=1e-6)
    # CSV: one row per input per probe, output then 24 block p-values
    with open(monitor.csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["epoch", "global_step", "input", "pvalue"] and len(rows[0]) == 4 + 24
    assert len(rows) == 1 + 3 * 6
    np.testing.assert_allclose([float(r[3]) for r in rows[-6:]], ref.pvalues.numpy(), rtol=1e-12)
    # the probe left the gates of StochasticDepth and the module's training flag alone
    assert existing_handle(model) is sd.handle


def test_monitor_without_validation_uses_training_data_and_explicit_rates(tmp_path) -> None:
    monitor = NormalityMonitor(every_n_epochs=2, num_inputs=5, num_masks=30, survival=0.6, seed=0)
    model = Regressor(depth=10)
    train = _data(32, seed=0)
    trainer = _trainer(tmp_path, callbacks=[monitor], logger=False, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, DataLoader(train, batch_size=8))
    torch.testing.assert_close(monitor._inputs, train.tensors[0][:5])  # no shuffle: the first 5 examples
    assert [h["epoch"] for h in monitor.history] == [1]  # every 2nd epoch only
    ref = normality_pvalues(model, train.tensors[0][:5], 0.6, num_masks=30, scaling="expected", seed=monitor.probe_seed(1, 0))
    torch.testing.assert_close(monitor.last_pvalues, ref.pvalues, rtol=1e-12, atol=0)
    assert monitor.last_block_pvalues is None
    assert existing_handle(model) is None  # temporary gates were removed
    assert "normality/median_pvalue" in trainer.callback_metrics


def test_monitor_under_bf16_mixed_probes_in_fp32(tmp_path) -> None:
    # The probe is a forward the callback runs itself, outside autocast: fp32 samples, so the p-values equal
    # the fp32 core computation (bf16 outputs would tie and change Shapiro-Wilk's statistic).
    sd = StochasticDepth(mode="uniform", budget=0.7, scaling="expected", seed=1)
    monitor = NormalityMonitor(num_inputs=4, num_masks=30, seed=2)
    model = Regressor(depth=8)
    trainer = _trainer(tmp_path, callbacks=[sd, monitor], logger=False, max_epochs=1, precision="bf16-mixed", limit_val_batches=0)
    train = _data(16, seed=0)
    trainer.fit(model, DataLoader(train, batch_size=4))
    ref = normality_pvalues(model, train.tensors[0][:4], torch.full((8,), 0.7), num_masks=30, scaling="expected", seed=monitor.probe_seed(0, 0))
    torch.testing.assert_close(monitor.last_pvalues, ref.pvalues, rtol=1e-12, atol=0)


def test_monitor_errors(tmp_path) -> None:
    trainer = _trainer(tmp_path, callbacks=[NormalityMonitor(num_masks=10)], logger=False, max_epochs=1)
    with pytest.raises(ValueError, match="StochasticDepth callback"):
        trainer.fit(Regressor(depth=3), DataLoader(_data(16, 0), batch_size=8))
    with pytest.raises(ValueError, match="at least 3"):
        NormalityMonitor(num_masks=2)
    with pytest.raises(ValueError, match="at least 8"):
        NormalityMonitor(num_masks=5, test="dagostino")
    with pytest.raises(ValueError, match="every_n_epochs"):
        NormalityMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NormalityMonitor(survival=[0.5, 1.2])
    with pytest.raises(ValueError, match="unknown test"):
        NormalityMonitor(test="lilliefors")


def test_history_is_checkpointed() -> None:
    monitor = NormalityMonitor(survival=0.5)
    monitor.history = [{"epoch": 0, "median_pvalue": 0.4}]
    other = NormalityMonitor(survival=0.5)
    other.load_state_dict(monitor.state_dict())
    assert other.history == monitor.history


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_main(out: str) -> None:
    """Both ranks: StochasticDepth + NormalityMonitor over 2 processes (gloo), one epoch."""

    class Record(pl.Callback):
        """In each rank's process (ddp_fork runs only rank 0's code after ``fit``)."""

        def on_fit_end(self, trainer, pl_module):
            rank = trainer.global_rank
            probe = monitor._inputs
            local = normality_pvalues(
                pl_module, probe, sd.handle.survival, num_masks=30, per_block=True, scaling="expected", seed=monitor.probe_seed(0, rank)
            )
            record = {
                "rank": rank,
                "probe": probe.tolist(),
                "local": local.pvalues.tolist(),
                "local_blocks": local.block_pvalues.tolist(),
                "gathered": monitor.last_pvalues.tolist(),
                "gathered_blocks": monitor.last_block_pvalues.tolist(),
                "median": monitor.history[-1]["median_pvalue"],
                "logged_median": float(trainer.callback_metrics["normality/median_pvalue"]),
                "csv_exists": monitor.csv_path is not None and os.path.exists(monitor.csv_path),
            }
            with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                json.dump(record, f)

    sd = StochasticDepth(mode="uniform", budget=0.7, scaling="expected", seed=2)
    monitor = NormalityMonitor(num_inputs=4, num_masks=30, per_block=True, seed=3)
    model = Regressor(depth=12)
    trainer = _trainer(out, callbacks=[sd, monitor, Record()], strategy="ddp_fork", devices=2, max_epochs=1, logger=False)
    trainer.fit(model, DataLoader(_data(32, seed=0), batch_size=4), DataLoader(_data(16, seed=1), batch_size=4))


@pytest.mark.slow
def test_monitor_ddp_two_processes(tmp_path) -> None:
    run_script(Path(__file__).resolve(), str(tmp_path), timeout=300)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # each rank probes its own shard of the validation data (DistributedSampler: rank r gets r, r+2, ...)
    val = _data(16, seed=1).tensors[0]
    torch.testing.assert_close(torch.tensor(r0["probe"]), val[0:8:2])
    torch.testing.assert_close(torch.tensor(r1["probe"]), val[1:8:2])
    # the gathered p-values are rank 0's then rank 1's, identical on both ranks (float32 through gloo)
    expected = torch.tensor(r0["local"] + r1["local"], dtype=torch.float64)
    expected_blocks = torch.tensor(r0["local_blocks"] + r1["local_blocks"], dtype=torch.float64)
    for r in (r0, r1):
        torch.testing.assert_close(torch.tensor(r["gathered"], dtype=torch.float64), expected, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(torch.tensor(r["gathered_blocks"], dtype=torch.float64), expected_blocks, rtol=1e-6, atol=1e-12)
        assert r["median"] == pytest.approx(float(np.median(expected.numpy())), rel=1e-6)
        assert r["logged_median"] == pytest.approx(r["median"], rel=1e-6)
    assert r0["csv_exists"] and not r1["csv_exists"]  # files only on rank 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_main(sys.argv[1])
