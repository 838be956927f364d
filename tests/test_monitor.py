"""ProbeMonitor (the monitors' base class), the StochasticDepth lookup, the output helpers and the rank helpers."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_sd.callbacks.log_gaussian import LogGaussianMonitor
from lightning_sd.callbacks.monitor import ProbeMonitor, active_stochastic_depth, stochastic_depth_callbacks
from lightning_sd.callbacks.normality_monitor import NormalityMonitor
from lightning_sd.callbacks.probing import gather_over_ranks, mean_over_ranks
from lightning_sd.callbacks.regularization_monitor import RegularizationMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from tests.helpers import RegressionModule, regression_data, trainer_kwargs


class DepthMonitor(ProbeMonitor):
    """The smallest monitor: the expected depth under the rates in force, and one value that is not finite."""

    def measure(self, trainer, pl_module):
        survival, scaling = self.rates_in_force(trainer, pl_module)
        return {"expected_depth": float(torch.as_tensor(survival).sum()), "scaling": scaling}

    def publish(self, trainer, pl_module, record):
        self.log_metrics(pl_module, {"depth/expected": record["expected_depth"], "depth/nan": float("nan")})
        self.path = self.publish_table(trainer, "depth.csv", [{"epoch": record["epoch"], "depth": record["expected_depth"]}], key="depth")


def _fit(tmp_path: Path, callbacks: list, max_epochs: int = 3, depth: int = 6) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=2, callbacks=callbacks, **trainer_kwargs(tmp_path))
    trainer.fit(RegressionModule(depth=depth), DataLoader(regression_data(32), batch_size=8))
    return trainer


def test_cadence_history_rates_and_output(tmp_path: Path) -> None:
    sd = StochasticDepth(mode="linear", budget=0.5, scaling="expected", seed=0)
    monitor = DepthMonitor(every_n_epochs=2, at_train_start=True)
    trainer = _fit(tmp_path, [monitor, sd], max_epochs=4)
    # at start, then after epochs 1 and 3 (every 2nd)
    assert [(r["epoch"], r["global_step"]) for r in monitor.history] == [(0, 0), (1, 4), (3, 8)]
    # the rates of the StochasticDepth callback that drives the gates, with its scaling
    assert all(r["scaling"] == "expected" and r["expected_depth"] == pytest.approx(0.5 * 6, abs=1e-5) for r in monitor.history)
    assert float(trainer.callback_metrics["depth/expected"]) == pytest.approx(3.0, abs=1e-5)
    assert "depth/nan" not in trainer.callback_metrics  # non-finite values are not logged
    assert Path(monitor.path) == Path(trainer.log_dir) / "depth.csv"
    assert list(csv.DictReader(open(monitor.path))) == [{"epoch": "3", "depth": str(monitor.history[-1]["expected_depth"])}]


def test_rates_without_stochastic_depth(tmp_path: Path) -> None:
    monitor = DepthMonitor(every_n_epochs=1, survival=[0.25] * 6)
    _fit(tmp_path, [monitor], max_epochs=1)
    assert monitor.history[0]["expected_depth"] == pytest.approx(1.5) and monitor.history[0]["scaling"] == "expected"
    with pytest.raises(ValueError, match="every_n_epochs"):
        DepthMonitor(every_n_epochs=0)


def test_the_active_stochastic_depth_is_the_one_holding_the_gates(tmp_path: Path) -> None:
    module = RegressionModule(depth=4)
    first = StochasticDepth(mode="uniform", budget=0.5, seed=0)
    second = StochasticDepth(mode="linear", budget=0.7, seed=0)
    loader = DataLoader(regression_data(16), batch_size=8)
    pl.Trainer(max_steps=1, callbacks=[first], **trainer_kwargs(tmp_path)).fit(module, loader)
    assert active_stochastic_depth([first]) is first
    pl.Trainer(max_steps=1, callbacks=[second], **trainer_kwargs(tmp_path)).fit(module, loader)  # takes the gates over
    assert first.handle is None
    assert stochastic_depth_callbacks([first, second, object()]) == [first, second]
    assert active_stochastic_depth([first, second]) is second
    second.remove()
    assert active_stochastic_depth([first, second]) is None


def test_monitors_share_the_base(tmp_path: Path) -> None:
    normality = NormalityMonitor(every_n_epochs=1, num_inputs=4, num_masks=10, probe_at_start=True)
    regularization = RegularizationMonitor(every_n_epochs=2, probe_size=8, loss="mse")
    log_gaussian = LogGaussianMonitor(num_probe=8)
    sd = StochasticDepth(mode="uniform", budget=0.7, scaling="expected", seed=0)
    _fit(tmp_path, [normality, regularization, log_gaussian, sd], max_epochs=2)
    assert all(isinstance(m, ProbeMonitor) for m in (normality, regularization, log_gaussian))
    assert [r["epoch"] for r in normality.history] == [0, 0, 1]
    assert [r["epoch"] for r in regularization.history] == [1]
    assert len(log_gaussian.history) == 1 and log_gaussian.result is log_gaussian.history[0]["result"]
    # NormalityMonitor: p-values of every probe in memory, summaries only in the checkpoint
    assert normality.last_pvalues is normality.history[-1]["pvalues"] and normality.last_pvalues.shape == (4,)
    saved = normality.state_dict()["history"]
    assert [set(r) & {"pvalues", "block_pvalues"} for r in saved] == [set(), set(), set()]
    assert saved[-1]["median_pvalue"] == normality.history[-1]["median_pvalue"]
    restored = NormalityMonitor(survival=0.5)
    restored.load_state_dict(normality.state_dict())
    assert restored.last_pvalues is None and len(restored.history) == 3


def test_summary_plots_draw_the_pvalues_from_history_not_from_the_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary_plots = pytest.importorskip("lightning_sd.callbacks.summary_plots")
    normality = NormalityMonitor(every_n_epochs=1, num_inputs=6, num_masks=10, probe_at_start=True)
    sd = StochasticDepth(mode="uniform", budget=0.7, scaling="expected", seed=0)
    _fit(tmp_path, [normality, sd], max_epochs=2)
    os.remove(normality.csv_path)  # the figure does not need the file
    drawn = {}
    save = summary_plots._save

    def capture(fig, path, dpi):
        drawn[Path(path).name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(summary_plots, "_save", capture)
    paths = summary_plots.SummaryPlots().write([normality, sd], str(tmp_path / "plots"))
    assert set(paths) == {"rates", "normality"}
    hist_ax = drawn["normality_pvalues.png"].axes[0]
    assert len(hist_ax.patches) == 3  # one histogram per probe: start, epoch 0, epoch 1


def test_rank_helpers_with_one_process_and_with_a_fake_two_rank_strategy() -> None:
    single = SimpleNamespace(world_size=1)
    values = torch.tensor([[0.1], [0.2]])
    assert gather_over_ranks(single, values) is values
    assert mean_over_ranks(single, {"a": 1.0}) == {"a": 1.0}

    other_rank = {"a": 3.0, "b": float("nan")}

    def reduce(t, reduce_op):
        assert reduce_op == "mean"
        return (t + torch.tensor(list(other_rank.values()), dtype=t.dtype)) / 2

    two = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce))
    out = mean_over_ranks(two, {"a": 1.0, "b": 2.0})
    assert list(out) == ["a", "b"] and out["a"] == 2.0 and out["b"] != out["b"]  # NaN on one rank: NaN on all
