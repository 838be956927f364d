"""SummaryPlots: PNG figures from the state of StochasticDepth / RegularizationMonitor / NormalityMonitor."""

from __future__ import annotations

import builtins
import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_sd.callbacks import summary_plots as summary_plots_module
from lightning_sd.callbacks.normality_monitor import NormalityMonitor
from lightning_sd.callbacks.regularization_monitor import RegularizationMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.callbacks.summary_plots import SummaryPlots
from tests.helpers import RegressionModule, regression_data

matplotlib_image = pytest.importorskip("matplotlib.image")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
        logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(regression_data(64), batch_size=16), DataLoader(regression_data(32, seed=1), batch_size=16)


def _check_png(path: str | Path) -> tuple[int, ...]:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, f"{path} missing or empty"
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib_image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    # a real figure, not a blank canvas: several distinct pixel values
    assert float(image[..., :3].std()) > 0.01
    return image.shape


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The matplotlib Figure behind every PNG written, keyed "folder/file" (read back before it is saved)."""
    figures: dict = {}
    save = summary_plots_module._save

    def capture(fig, path, dpi):
        figures[f"{Path(path).parent.name}/{Path(path).name}"] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(summary_plots_module, "_save", capture)
    return figures


def _bar_heights(ax) -> np.ndarray:
    return np.array([patch.get_height() for patch in ax.patches])


def _bar_centres(ax) -> np.ndarray:
    return np.array([patch.get_x() + patch.get_width() / 2 for patch in ax.patches])


def _csv_probes(path: str) -> list[tuple[int, np.ndarray]]:
    """(global step, output p-values) per probe, in file order, read from the monitor's CSV."""
    groups: dict[tuple[int, int], list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            groups.setdefault((int(row["epoch"]), int(row["global_step"])), []).append(float(row["pvalue"]))
    return [(step, np.array(values)) for (_, step), values in groups.items()]


def test_all_monitors_produce_all_figures(tmp_path: Path, drawn: dict) -> None:
    torch.manual_seed(0)
    model = RegressionModule(in_features=8, width=16, depth=12)
    sd = StochasticDepth(mode="sensemode", budget=0.5, scaling="expected", seed=0, sensitivity_batches=2)
    reg = RegularizationMonitor(every_n_epochs=1, loss="mse", probe_size=16)
    normality = NormalityMonitor(every_n_epochs=1, num_inputs=12, num_masks=20, per_block=True, probe_at_start=True)
    plots = SummaryPlots(out_dir=str(tmp_path / "plots"))
    trainer = _trainer(tmp_path, [reg, normality, plots, sd])
    train, val = _loaders()
    trainer.fit(model, train, val)

    assert set(plots.paths) == {"rates", "regularization", "normality"}
    for key, name in [("rates", "sd_rates.png"), ("regularization", "regularization.png"), ("normality", "normality_pvalues.png")]:
        assert plots.paths[key] == str(tmp_path / "plots" / name)
        _check_png(plots.paths[key])
    # the rates figure has two extra panels (sensitivities and g_l): taller than a one-panel figure
    assert sd.sensitivities is not None and len(reg.history) == 2
    height_three_panels = _check_png(plots.paths["rates"])[0]

    only_sd = StochasticDepth(mode="uniform", budget=0.5, seed=0)
    lone = SummaryPlots(out_dir=str(tmp_path / "plain"))
    _trainer(tmp_path, [lone, only_sd], max_epochs=1).fit(RegressionModule(depth=12), *_loaders())
    assert _check_png(lone.paths["rates"])[0] < height_three_panels
    (lone_ax,) = drawn["plain/sd_rates.png"].axes  # one panel, uniform p_l = 0.5
    np.testing.assert_allclose(_bar_heights(lone_ax), np.full(12, 0.5), rtol=1e-6)
    # the p-value histograms come from the monitor's CSV: three probes (start, epoch 0, epoch 1)
    probes = _csv_probes(normality.csv_path)
    assert len(probes) == 3

    # What was drawn, read back from the figures' artists, against the callbacks' state.
    L = 12
    p = sd.survival.double().numpy()
    rates_ax, sens_ax, g_ax = drawn["plots/sd_rates.png"].axes
    np.testing.assert_allclose(_bar_centres(rates_ax), np.arange(1, L + 1))
    np.testing.assert_allclose(_bar_heights(rates_ax), p, rtol=1e-6)
    (budget_line,) = rates_ax.lines
    np.testing.assert_allclose(budget_line.get_ydata(), [0.5, 0.5], atol=1e-6)  # mean p = the budget
    np.testing.assert_allclose(_bar_heights(sens_ax), sd.sensitivities.double().numpy(), rtol=1e-6)
    g_last = np.asarray(reg.history[-1]["g"], dtype=np.float64)
    np.testing.assert_allclose(_bar_heights(g_ax), g_last, rtol=1e-6)

    g_ax2, penalty_ax, share_ax = drawn["plots/regularization.png"].axes
    assert len(g_ax2.lines) == 2  # one curve per probe
    for line, record in zip(g_ax2.lines, reg.history):
        np.testing.assert_allclose(line.get_xdata(), np.arange(1, L + 1))
        np.testing.assert_allclose(line.get_ydata(), np.asarray(record["g"], dtype=np.float64), rtol=1e-6)
    # R = 1/2 sum_l p_l (1 - p_l) g_l ("expected" scaling) and each block's share, recomputed here
    terms = [p * (1 - p) * np.asarray(r["g"], dtype=np.float64) for r in reg.history]
    (penalty_line,) = penalty_ax.lines
    np.testing.assert_allclose(penalty_line.get_xdata(), [0, 1])
    np.testing.assert_allclose(penalty_line.get_ydata(), [0.5 * t.sum() for t in terms], rtol=1e-5)
    np.testing.assert_allclose(_bar_heights(share_ax), terms[-1] / terms[-1].sum(), rtol=1e-5, atol=1e-9)

    hist_ax, depth_ax, summary_ax = drawn["plots/normality_pvalues.png"].axes
    assert len(hist_ax.patches) == 3  # one step histogram per probe
    for polygon, (_, pvalues) in zip(hist_ax.patches, probes):
        density, _ = np.histogram(pvalues[np.isfinite(pvalues)], bins=20, range=(0.0, 1.0), density=True)
        heights = polygon.get_xy()[1:41:2, 1]  # step outline: (edge_i, h_i), (edge_i+1, h_i), ...
        np.testing.assert_allclose(heights, density, rtol=1e-9)
    median_line, frac_line = summary_ax.lines
    np.testing.assert_array_equal(median_line.get_xdata(), [step for step, _ in probes])
    np.testing.assert_allclose(median_line.get_ydata(), [np.nanmedian(v) for _, v in probes], rtol=1e-6)
    np.testing.assert_allclose(frac_line.get_ydata(), [np.mean(v[np.isfinite(v)] > 0.05) for _, v in probes], rtol=1e-6)
    assert depth_ax.get_xlim()[1] >= L  # one box per block at the last probe


def test_only_stochastic_depth_gives_only_the_rates_plot_in_the_log_dir(tmp_path: Path, drawn: dict) -> None:
    sd = StochasticDepth(mode="linear", budget=0.7, seed=0)
    plots = SummaryPlots()
    trainer = _trainer(tmp_path, [plots, sd], max_epochs=1)
    trainer.fit(RegressionModule(depth=6), *_loaders())
    log_dir = Path(trainer.log_dir)
    assert list(plots.paths) == ["rates"]
    assert Path(plots.paths["rates"]) == log_dir / "sd_rates.png"
    _check_png(log_dir / "sd_rates.png")
    pngs = sorted(p.name for p in log_dir.glob("*.png"))
    assert pngs == ["sd_rates.png"]
    (ax,) = drawn[f"{log_dir.name}/sd_rates.png"].axes
    L, b = 6, 0.7  # linear rule with the exact budget: p_l = 1 - (l/L)(1 - p_L), p_L = 1 - 2L(1 - b)/(L + 1)
    p_last = 1 - 2 * L * (1 - b) / (L + 1)
    np.testing.assert_allclose(_bar_heights(ax), [1 - (l / L) * (1 - p_last) for l in range(1, L + 1)], rtol=1e-6)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [b, b], rtol=1e-6)


def test_nothing_to_plot_writes_nothing_and_warns(tmp_path: Path) -> None:
    plots = SummaryPlots(out_dir=str(tmp_path / "plots"))
    with pytest.warns(UserWarning, match="nothing to plot"):
        _trainer(tmp_path, [plots], max_epochs=1).fit(RegressionModule(depth=4), *_loaders())
    assert plots.paths == {}
    assert not (tmp_path / "plots").exists()


def test_write_works_without_a_trainer_after_fit(tmp_path: Path) -> None:
    sd = StochasticDepth(mode="uniform", budget=0.5, seed=0)
    _trainer(tmp_path, [sd], max_epochs=1).fit(RegressionModule(depth=5), *_loaders())
    paths = SummaryPlots(prefix="run1_").write([sd], str(tmp_path / "later"))
    assert paths == {"rates": os.path.join(str(tmp_path / "later"), "run1_sd_rates.png")}
    _check_png(paths["rates"])


def test_missing_matplotlib_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        SummaryPlots()


def test_bad_dpi_is_refused() -> None:
    with pytest.raises(ValueError, match="dpi"):
        SummaryPlots(dpi=0)
