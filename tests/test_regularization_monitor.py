"""RegularizationMonitor in a Trainer (single process, bf16-mixed, two-process DDP) and maxreg under DDP.

The DDP test runs this file as a script (``python tests/test_regularization_monitor.py OUT``) in a
subprocess: Lightning's DDP launcher re-runs that command for rank 1, so both ranks run only
:func:`_ddp_main`, and the results come back through JSON files written into OUT.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_sd.callbacks.rate_measurement import measure_maxreg_rates
from lightning_sd.callbacks.regularization_monitor import RegularizationMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.gates import existing_handle
from lightning_sd.core.regularization import explicit_penalty, regularization_terms
from lightning_sd.core.survival import survival_rates
from lightning_sd.models import CifarResNet, ResidualMLP
from tests.distributed import run_script


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = CifarResNet(20, num_classes=5, width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualMLP(8, width=16, depth=6, out_features=2, stable=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).sum(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02)


def _images(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _regression(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, torch.stack([torch.sin(x[:, 0]), torch.cos(x[:, 1])], dim=1))


def _trainer(root: str, **kw) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(root),
        log_every_n_steps=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_monitor_with_stochastic_depth(tmp_path) -> None:
    sd = StochasticDepth(mode="linear", budget=0.7, scaling="expected", seed=1)
    monitor = RegularizationMonitor(every_n_epochs=1, probe_size=12, loss="cross_entropy", estimator="exact")
    model = Classifier()
    val = _images(16, seed=1)
    trainer = _trainer(str(tmp_path), callbacks=[sd, monitor])
    trainer.fit(model, DataLoader(_images(), batch_size=8), DataLoader(val, batch_size=8))

    assert [h["epoch"] for h in monitor.history] == [0, 1]
    last = monitor.history[-1]
    L = sd.handle.num_blocks
    assert L == 9 and last["g"].shape == (L,)
    # The probe is the first 12 validation examples (two batches of 8, the second cut to 4).
    probe = val.tensors[0][:12]
    expected_g = regularization_terms(model, probe, loss="cross_entropy")  # weights unchanged since the last epoch end
    torch.testing.assert_close(last["g"], expected_g, rtol=1e-5, atol=0.0)
    p = survival_rates("linear", L, 0.7)
    torch.testing.assert_close(last["survival"], p, rtol=1e-6, atol=1e-7)
    R = explicit_penalty(expected_g, p, "expected")
    assert last["penalty"] == pytest.approx(R, rel=1e-5)
    assert float(last["share"].sum()) == pytest.approx(1.0, abs=1e-9)

    metrics = trainer.callback_metrics
    assert float(metrics["reg/penalty"]) == pytest.approx(R, rel=1e-5)
    assert float(metrics["reg/g/003"]) == pytest.approx(float(expected_g[2]), rel=1e-5)
    assert float(metrics["reg/share/009"]) == pytest.approx(float(last["share"][8]), rel=1e-5)

    with open(monitor.table_path) as f:
        rows = list(csv.DictReader(f))
    assert Path(monitor.table_path).name == "regularization_epoch1.csv"
    assert [r["name"] for r in rows] == [b.name for b in sd.handle.branches]
    assert sum(float(r["share"]) for r in rows) == pytest.approx(1.0, abs=1e-6)
    assert float(rows[4]["penalty"]) == pytest.approx(0.5 * float(p[4] * (1 - p[4])) * float(expected_g[4]), rel=1e-5)
    # scalars reached the logger
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        header = f.readline()
    assert "reg/penalty" in header and "reg/g/001" in header


def test_monitor_without_sd_callback_survival_or_g_only(tmp_path) -> None:
    data = _regression()
    monitor = RegularizationMonitor(probe_size=20, loss="mse", estimator="exact", survival=0.8, scaling="inverted")
    model = Regressor()
    trainer = _trainer(str(tmp_path / "a"), callbacks=[monitor], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, DataLoader(data, batch_size=16))
    assert existing_handle(model) is None  # the monitor's temporary gates are gone
    g = regularization_terms(model, data.tensors[0][:20], loss="mse")  # no validation data: training data
    torch.testing.assert_close(monitor.history[0]["g"], g, rtol=1e-5, atol=0.0)
    assert monitor.history[0]["penalty"] == pytest.approx(0.5 * (0.2 / 0.8) * float(g.sum()), rel=1e-5)

    only_g = RegularizationMonitor(probe_size=8, loss="mse", estimator="sampled", num_samples=4)
    trainer = _trainer(str(tmp_path / "b"), callbacks=[only_g], max_epochs=1, limit_val_batches=0)
    trainer.fit(Regressor(), DataLoader(data, batch_size=16))
    assert "penalty" not in only_g.history[0] and "reg/penalty" not in trainer.callback_metrics
    assert "reg/g/006" in trainer.callback_metrics


def test_monitor_bf16_mixed_is_fp32(tmp_path) -> None:
    sd = StochasticDepth(mode="uniform", budget=0.8, seed=0)
    monitor = RegularizationMonitor(probe_size=8, loss="cross_entropy", estimator="exact")
    model = Classifier()
    val = _images(8, seed=2)
    trainer = _trainer(str(tmp_path), callbacks=[sd, monitor], precision="bf16-mixed", max_epochs=1)
    trainer.fit(model, DataLoader(_images(), batch_size=8), DataLoader(val, batch_size=8))
    g = monitor.history[0]["g"]
    # The probe runs outside autocast: equal to the fp32 computation, not to a bf16 one (~1e-2 off).
    torch.testing.assert_close(g, regularization_terms(model, val.tensors[0], loss="cross_entropy"), rtol=1e-5, atol=0.0)
    assert monitor.history[0]["penalty"] == pytest.approx(explicit_penalty(g, torch.full((9,), 0.8), "inverted"), rel=1e-6)


def test_measure_maxreg_single_process(tmp_path) -> None:
    """measure_maxreg_rates on the first training batches: g = example-weighted mean, rates = Lemma 2 for the budget."""

    class Measure(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.result = measure_maxreg_rates(trainer, pl_module, sd.measurement_settings)
            self.rates = self.result.rates

    sd = StochasticDepth(mode="uniform", budget=0.4, sensitivity_batches=2, regularization_loss="mse", seed=0)
    measure = Measure()
    data = _regression(40)
    model = Regressor()
    trainer = _trainer(str(tmp_path), callbacks=[sd, measure], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    expected_g = regularization_terms(model, data.tensors[0][:32], loss="mse")  # batches of 16: the first two
    torch.manual_seed(5)
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=False))
    g = measure.result.regularization_terms
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, expected_g.float(), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(measure.rates, survival_rates("maxreg", 6, 0.4, g=g.double()), rtol=1e-6, atol=1e-9)
    assert abs(float(measure.rates.sum()) - 0.4 * 6) < 1e-6


def test_measure_maxreg_leaves_data_order_and_rng(tmp_path) -> None:
    """The fresh iterator does not consume the epoch's batches nor move the global RNG (shuffled loader)."""
    seen: list[torch.Tensor] = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            if self.measure:
                measure_maxreg_rates(trainer, pl_module, sd.measurement_settings)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0][0].clone())

    data = _regression(48)
    orders = []
    for measure in (False, True):
        seen.clear()
        sd = StochasticDepth(mode="uniform", budget=0.5, sensitivity_batches=2, regularization_loss="mse", seed=0)
        rec = Record()
        rec.measure = measure
        torch.manual_seed(11)
        trainer = _trainer(str(tmp_path / str(measure)), callbacks=[sd, rec], max_epochs=1, limit_train_batches=3, limit_val_batches=0)
        trainer.fit(Regressor(), DataLoader(data, batch_size=16, shuffle=True))
        orders.append(torch.stack(seen))
    assert torch.equal(orders[0], orders[1])


def test_monitor_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every_n_epochs"):
        RegularizationMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="probe_size"):
        RegularizationMonitor(probe_size=0)
    with pytest.raises(ValueError, match="unknown loss"):
        RegularizationMonitor(loss="hinge")
    with pytest.raises(ValueError, match="unknown estimator"):
        RegularizationMonitor(estimator="fast")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RegularizationMonitor(survival=[0.5, 1.5])
    with pytest.raises(ValueError, match="infinite variance"):
        RegularizationMonitor(survival=0.0, scaling="inverted")


# ---------------------------------------------------------------------------------------------- DDP
class _StochasticDepthNoTable(StochasticDepth):
    """StochasticDepth without its CSV rate table: its ``_write_table`` reads ``trainer.log_dir`` (a broadcast
    under DDP) on rank 0 only and deadlocks two processes (reported); the table is not under test here."""

    def _write_table(self, trainer: pl.Trainer) -> None:
        return None


def _ddp_main(out: str) -> None:
    """Both ranks: StochasticDepth + a maxreg measurement at train start + the monitor, 2 processes (gloo)."""

    class Measure(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.result = measure_maxreg_rates(trainer, pl_module, sd.measurement_settings)
            self.rates = self.result.rates

    class Record(pl.Callback):
        """In each rank's process (ddp_fork runs only rank 0's code after ``fit``)."""

        def on_fit_end(self, trainer, pl_module):
            rank = trainer.global_rank
            # This rank's probe (the monitor's, unchanged weights) computed locally, for the check of the reduction.
            probe = torch.cat(monitor._probe)
            local = regularization_terms(pl_module, probe, loss="mse")
            record = {
                "rank": rank,
                "rates": measure.rates.tolist(),
                "g_sd": measure.result.regularization_terms.tolist(),
                "g_monitor": monitor.history[0]["g"].tolist(),
                "penalty": monitor.history[0]["penalty"],
                "local_g": local.tolist(),
                "local_n": probe.shape[0],
                "probe_first": probe[0].tolist(),
            }
            with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                json.dump(record, f)

    sd = _StochasticDepthNoTable(mode="uniform", budget=0.6, sensitivity_batches=1, regularization_loss="mse", seed=3)
    measure = Measure()
    monitor = RegularizationMonitor(probe_size=10, loss="mse", estimator="exact")
    data = _regression(64)
    model = Regressor()
    trainer = _trainer(
        out, callbacks=[sd, measure, monitor, Record()], strategy="ddp_fork", devices=2, max_epochs=1, limit_train_batches=2,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))


@pytest.mark.slow
def test_monitor_and_maxreg_ddp_two_processes(tmp_path) -> None:
    run_script(Path(__file__).resolve(), str(tmp_path), timeout=300)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["probe_first"] != r1["probe_first"]  # each rank probes its own shard (DistributedSampler)
    g0, g1 = torch.tensor(r0["local_g"], dtype=torch.float64), torch.tensor(r1["local_g"], dtype=torch.float64)
    n0, n1 = r0["local_n"], r1["local_n"]
    expected = (g0 * n0 + g1 * n1) / (n0 + n1)
    for r in (r0, r1):  # identical on both ranks and equal to the example-weighted mean over ranks
        torch.testing.assert_close(torch.tensor(r["g_monitor"], dtype=torch.float64), expected, rtol=1e-5, atol=0.0)
        assert r["penalty"] == pytest.approx(explicit_penalty(expected, torch.full((6,), 0.6), "inverted"), rel=1e-5)
    # maxreg: same g and rates on both ranks, meeting the budget (measured before any step: initial weights)
    assert r0["rates"] == r1["rates"] and r0["g_sd"] == r1["g_sd"]
    assert abs(sum(r0["rates"]) - 0.6 * 6) < 1e-6
    torch.testing.assert_close(
        torch.tensor(r0["rates"], dtype=torch.float64), survival_rates("maxreg", 6, 0.6, g=torch.tensor(r0["g_sd"], dtype=torch.float64))
    )
    # the measured g is the mean of the two ranks' first batches at initialization
    model = Regressor()
    data = _regression(64)
    # Lightning gives each rank a DistributedSampler(shuffle=True, seed=0) over the training set.
    shards = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert r0["probe_first"] == data.tensors[0][shards[0][0]].tolist()
    assert r1["probe_first"] == data.tensors[0][shards[1][0]].tolist()
    first = data.tensors[0][shards[0][:8] + shards[1][:8]]  # sensitivity_batches=1 batch of 8 per rank
    torch.testing.assert_close(
        torch.tensor(r0["g_sd"]), regularization_terms(model, first, loss="mse").float(), rtol=1e-4, atol=0.0
    )


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where it is instead of timing out silently
    torch.set_num_threads(1)
    _ddp_main(sys.argv[1])
