"""TensorBoard output of StochasticDepth and the monitors, read back from the event files with tensorboard's reader.

Per-block values are one histogram and one image per epoch on a ``TensorBoardLogger`` (no per-block
scalar tags there), tables are markdown text, and the CSV logger's ``metrics.csv`` and the CSV tables
of a run with ``[TensorBoardLogger, CSVLogger]`` are byte-identical to those of the same run with the
CSV logger alone (and the trajectory is the same).

The DDP test runs this file as a script (``python tests/test_tensorboard.py OUT``) in a subprocess:
Lightning's DDP launcher re-runs that command for rank 1, so both ranks run only :func:`_ddp_main`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra installs tensorboard
from tensorboard.util import tensor_util
from torch.utils.data import DataLoader

from lightning_sd.callbacks import tensorboard_output
from lightning_sd.callbacks.log_gaussian import LogGaussianMonitor
from lightning_sd.callbacks.normality_monitor import NormalityMonitor
from lightning_sd.callbacks.regularization_monitor import RegularizationMonitor
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from tests.distributed import run_script
from tests.helpers import RegressionModule, regression_data, trainer_kwargs

DEPTH = 6  # blocks of the RegressionModule's ResidualMLP
BUDGET = 0.7
INPUTS = 4  # NormalityMonitor probe inputs


def _fit(root: Path, with_tensorboard: bool, mode: str = "linear"):
    """Two epochs of two steps with StochasticDepth + RegularizationMonitor + NormalityMonitor + LogGaussianMonitor."""
    loggers: list = [pl.loggers.CSVLogger(str(root), name="csv")]
    if with_tensorboard:
        loggers.insert(0, pl.loggers.TensorBoardLogger(str(root), name="tb", default_hp_metric=False))
    pl.seed_everything(0)
    model = RegressionModule(depth=DEPTH)
    sd = StochasticDepth(mode=mode, budget=BUDGET, scaling="expected", seed=1, sensitivity_batches=2)
    reg = RegularizationMonitor(probe_size=8, loss="mse", estimator="exact")
    normality = NormalityMonitor(num_inputs=INPUTS, num_masks=12, per_block=True, probe_at_start=True, seed=3)
    trainer = pl.Trainer(
        **trainer_kwargs(root, logger=loggers),
        callbacks=[sd, reg, normality, LogGaussianMonitor(num_probe=8)],
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    data = regression_data(64)
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True), DataLoader(regression_data(16, seed=1), batch_size=8))
    return trainer, model, sd, reg


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _text(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """The text events of ``tag`` (torch's SummaryWriter stores ``add_text(tag)`` as ``<tag>/text_summary``)."""
    (name,) = [t for t in acc.Tags()["tensors"] if t in (tag, f"{tag}/text_summary")]
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(name)]


def _markdown_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert set(lines[1]) <= {"|", "-"}  # the header separator
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]


def _image_size(num_blocks: int) -> tuple[int, int]:
    """(width, height) of the profile image: matplotlib's figure size, else the torch bar image's formula."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return num_blocks * max(1, 480 // num_blocks), 120
    return 640, 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    with_tb = _fit(root / "with_tb", with_tensorboard=True)
    csv_only = _fit(root / "csv_only", with_tensorboard=False)
    return with_tb, csv_only


def test_per_block_histograms_images_and_text(runs) -> None:
    (trainer, _, sd, reg), _ = runs
    tb_logger, csv_logger = trainer.loggers
    assert isinstance(tb_logger, pl.loggers.TensorBoardLogger) and trainer.log_dir == tb_logger.log_dir
    acc = _events(tb_logger.log_dir)
    tags = acc.Tags()
    epoch_ends = [2, 4]  # global_step after each of the two epochs of two steps

    # survival: one histogram per epoch over the L rates, num = L, sum = budget * L (linear mode)
    survival = acc.Histograms("sd/survival")
    assert [h.step for h in survival] == epoch_ends
    for h in survival:
        assert h.histogram_value.num == DEPTH
        assert h.histogram_value.sum == pytest.approx(BUDGET * DEPTH, abs=1e-6)
        assert h.histogram_value.max == pytest.approx(float(sd.survival.max()), abs=1e-7)
    assert "sd/sensitivity" not in tags["histograms"]  # linear mode measures no sensitivities

    # g: num = L and sum = sum of g_l as the regularization table of that epoch has it; shares sum to 1
    log_dir = Path(tb_logger.log_dir)
    g_hist = acc.Histograms("reg/g")
    assert [h.step for h in g_hist] == epoch_ends
    for epoch, h in enumerate(g_hist):
        table = _csv(log_dir / f"regularization_epoch{epoch}.csv")
        assert len(table) == DEPTH and h.histogram_value.num == DEPTH
        assert h.histogram_value.sum == pytest.approx(sum(float(r["g"]) for r in table), rel=1e-9)
    assert [h.histogram_value.sum for h in acc.Histograms("reg/share")] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert float(reg.history[-1]["g"].sum()) == pytest.approx(g_hist[-1].histogram_value.sum, rel=1e-9)

    # normality: p-value histograms at the start probe and after each epoch, the p-values of the CSV file
    pvalues = _csv(log_dir / "normality_pvalues.csv")
    hist = acc.Histograms("normality/pvalues")
    assert [h.step for h in hist] == [0, *epoch_ends]
    for h in hist:
        values = [float(r["pvalue"]) for r in pvalues if int(r["global_step"]) == h.step]
        assert h.histogram_value.num == len(values) == INPUTS
        assert h.histogram_value.sum == pytest.approx(sum(values), rel=1e-9)
        assert h.histogram_value.min >= 0.0 and h.histogram_value.max <= 1.0
    blocks = acc.Histograms("normality/block_pvalues")
    assert [h.step for h in blocks] == [0, *epoch_ends]
    for h in blocks:  # all inputs x blocks; NaN p-values (a block output constant over the masks) left out
        values = np.array([float(r[f"block_{b}"]) for r in pvalues if int(r["global_step"]) == h.step for b in range(1, DEPTH + 1)])
        assert values.size == INPUTS * DEPTH
        assert h.histogram_value.num == np.isfinite(values).sum() > 0
        assert h.histogram_value.sum == pytest.approx(values[np.isfinite(values)].sum(), rel=1e-9)
    medians = acc.Histograms("normality/block_median")
    assert [h.step for h in medians] == [0, *epoch_ends] and all(h.histogram_value.num == DEPTH for h in medians)

    # one profile image per per-block quantity and epoch, of the renderer's size
    width, height = _image_size(DEPTH)
    for tag, steps in [
        ("sd/survival_by_block", epoch_ends),
        ("reg/g_by_block", epoch_ends),
        ("reg/share_by_block", epoch_ends),
        ("normality/block_median_by_block", [0, *epoch_ends]),
        ("normality/block_frac_above_by_block", [0, *epoch_ends]),
    ]:
        images = acc.Images(tag)
        assert [i.step for i in images] == steps, tag
        assert all((i.width, i.height) == (width, height) for i in images), tag

    # LogGaussianMonitor (probes at train start): h and the active fraction per ReLU layer, the layers table
    layers = _csv(log_dir / "log_gaussian_layers.csv")
    assert len(layers) == DEPTH  # one ReLU per block
    for tag, column in (("log_gaussian/h", "h"), ("log_gaussian/active_fraction", "active_fraction")):
        (h,) = acc.Histograms(tag)
        assert h.step == 0 and h.histogram_value.num == len(layers)
        assert h.histogram_value.sum == pytest.approx(sum(float(r[column]) for r in layers), rel=1e-9)
    assert [i.step for i in acc.Images("log_gaussian/h_by_block")] == [0]
    assert _markdown_rows(_text(acc, "log_gaussian/layers")[0][1])[0] == ["layer", "name", "balanced", "active_fraction", "h"]

    # the rate table as markdown text: the rows of sd_rates_epoch0.csv (written once: linear rates never change)
    (step, text), *more = _text(acc, "sd/rates")
    assert step == 2 and not more
    rows = _markdown_rows(text)
    table = _csv(log_dir / "sd_rates_epoch0.csv")
    assert rows[0] == ["block", "name", "survival"] and len(rows) == 1 + DEPTH
    for md, row in zip(rows[1:], table):
        assert md[:2] == [row["block"], row["name"]]
        assert float(md[2]) == pytest.approx(float(row["survival"]), rel=1e-5)
    reg_text = _text(acc, "reg/blocks")
    assert [s for s, _ in reg_text] == epoch_ends
    reg_rows = _markdown_rows(reg_text[-1][1])
    assert reg_rows[0] == list(_csv(log_dir / "regularization_epoch1.csv")[0])
    assert len(reg_rows) == 1 + DEPTH

    # no per-block scalar tag reached TensorBoard; the other scalars did
    scalars = tags["scalars"]
    assert not [t for t in scalars if re.search(r"/\d+$", t)]
    assert {"sd/expected_depth", "sd/budget", "reg/g_mean", "reg/penalty", "normality/median_pvalue", "train_loss"} <= set(scalars)
    # ... while callback_metrics (checkpoint monitoring, the CLI summary) still have them
    assert float(trainer.callback_metrics[f"sd/survival/{DEPTH:03d}"]) == pytest.approx(float(sd.survival[-1]))
    assert float(trainer.callback_metrics[f"log_gaussian/h/{layers[0]['name']}"]) == pytest.approx(float(layers[0]["h"]), rel=1e-6)
    hidden = {"sd/survival/001", "reg/g/006", "normality/block_median/003", f"log_gaussian/active_fraction/{layers[-1]['name']}"}
    assert tensorboard_output.hidden_scalars(tb_logger) >= hidden
    assert tensorboard_output.hidden_scalars(csv_logger) == frozenset()


def test_csv_output_unchanged_by_tensorboard(runs) -> None:
    (trainer, model, _, _), (trainer_csv, model_csv, _, _) = runs
    # the same trajectory: logging to TensorBoard drew nothing from the global RNG
    for (name, a), (_, b) in zip(model.state_dict().items(), model_csv.state_dict().items()):
        assert torch.equal(a, b), name
    # metrics.csv: byte-identical, per-block columns included
    metrics = Path(trainer.loggers[1].log_dir) / "metrics.csv"
    reference = Path(trainer_csv.loggers[0].log_dir) / "metrics.csv"
    assert metrics.read_bytes() == reference.read_bytes()
    header = next(csv.reader(io.StringIO(reference.read_text())))
    assert {f"sd/survival/{b:03d}" for b in range(1, DEPTH + 1)} <= set(header) and "reg/g/001" in header
    assert len([c for c in header if c.startswith("log_gaussian/h/")]) == DEPTH
    # the CSV tables in the log directory (the first logger's): the same files with the same bytes
    tables = sorted(p.name for p in Path(trainer_csv.log_dir).glob("*.csv") if p.name != "metrics.csv")
    assert tables == [
        "log_gaussian_layers.csv",
        "log_gaussian_output.csv",
        "normality_pvalues.csv",
        "regularization_epoch0.csv",
        "regularization_epoch1.csv",
        "sd_rates_epoch0.csv",
    ]
    assert sorted(p.name for p in Path(trainer.log_dir).glob("*.csv")) == tables
    for name in tables:
        assert (Path(trainer.log_dir) / name).read_bytes() == (Path(trainer_csv.log_dir) / name).read_bytes(), name


def test_sensemode_sensitivity_histogram(tmp_path) -> None:
    trainer, _, sd, _ = _fit(tmp_path, with_tensorboard=True, mode="sensemode")
    acc = _events(trainer.loggers[0].log_dir)
    table = _csv(Path(trainer.log_dir) / "sd_rates_epoch0.csv")
    for tag, column in (("sd/sensitivity", "sensitivity"), ("sd/survival", "survival")):
        hist = acc.Histograms(tag)
        assert [h.step for h in hist] == [2, 4]
        assert all(h.histogram_value.num == DEPTH for h in hist)
        assert hist[0].histogram_value.sum == pytest.approx(sum(float(r[column]) for r in table), rel=1e-6)
    assert acc.Histograms("sd/survival")[0].histogram_value.sum == pytest.approx(BUDGET * DEPTH, abs=1e-5)
    assert float(sd.sensitivities.double().sum()) == pytest.approx(acc.Histograms("sd/sensitivity")[0].histogram_value.sum, rel=1e-6)
    assert [i.step for i in acc.Images("sd/sensitivity_by_block")] == [2, 4]


def test_bar_image_heights() -> None:
    values = [1.0, 3.0, -2.0, float("nan")]
    image = tensorboard_output.bar_image(values)
    # top 3, bottom -2: span 5; H = 120, each block 480 // 4 = 120 columns; baseline row round(120 * 3 / 5) = 72
    assert image.shape == (120, 480, 3) and image.dtype == np.uint8
    filled = (image != 255).any(axis=2)
    for block, (first_row, rows) in enumerate([(72 - 24, 24), (0, 72), (72, 48), (None, 0)]):
        column = filled[:, block * 120 : (block + 1) * 120]
        assert (column == column[:, :1]).all()  # every column of a block is the same
        where = np.flatnonzero(column[:, 0])
        assert where.size == rows
        if rows:
            assert where[0] == first_row and where[-1] == first_row + rows - 1
    assert tensorboard_output.bar_image(np.ones(600)).shape == (120, 600, 3)
    with pytest.raises(ValueError, match="at least one value"):
        tensorboard_output.bar_image([])


def test_markdown_table() -> None:
    text = tensorboard_output.markdown_table([{"block": 1, "name": "a|b", "p": 1 / 3}], ["block", "name", "p"])
    assert text.splitlines() == ["| block | name | p |", "|---|---|---|", "| 1 | a\\|b | 0.333333 |"]


def test_hidden_scalars_survive_pickling(tmp_path) -> None:
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    tensorboard_output.hide_scalars(logger, ["x/001"])
    tensorboard_output.hide_scalars(logger, ["x/002"])
    copy = pickle.loads(pickle.dumps(logger))
    assert tensorboard_output.hidden_scalars(copy) == {"x/001", "x/002"}
    copy.log_metrics({"x/001": 1.0, "x/002": 2.0, "y": 3.0}, step=0)
    copy.finalize("success")
    assert _events(copy.log_dir).Tags()["scalars"] == ["y"]


def test_log_per_block_bad_arguments() -> None:
    from lightning_sd.callbacks.output import log_per_block

    with pytest.raises(ValueError, match="2 labels for values of lengths"):
        log_per_block(None, None, {"x": [1.0, 2.0, 3.0]}, labels=["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        log_per_block(None, None, {"x": [1.0]}, width=0)  # type: ignore[arg-type]


def _ddp_main(out: str) -> None:
    """Both ranks: one epoch over 2 processes (gloo) with a TensorBoardLogger and a CSVLogger."""
    loggers = [pl.loggers.TensorBoardLogger(out, name="tb", default_hp_metric=False), pl.loggers.CSVLogger(out, name="csv")]
    sd = StochasticDepth(mode="linear", budget=BUDGET, scaling="expected", seed=1)
    reg = RegularizationMonitor(probe_size=4, loss="mse", estimator="exact")
    normality = NormalityMonitor(num_inputs=INPUTS, num_masks=12, per_block=True, seed=3)
    trainer = pl.Trainer(
        **trainer_kwargs(out, logger=loggers, strategy="ddp", devices=2),
        callbacks=[sd, reg, normality],
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    torch.manual_seed(0)
    model = RegressionModule(depth=DEPTH)
    trainer.fit(model, DataLoader(regression_data(64), batch_size=8), DataLoader(regression_data(16, seed=1), batch_size=4))
    record = {
        "rank": trainer.global_rank,
        "log_dir": trainer.loggers[0].log_dir,
        "csv_dir": trainer.loggers[1].log_dir,
        "hidden": sorted(tensorboard_output.hidden_scalars(trainer.loggers[0])),
        "survival": [float(trainer.callback_metrics[f"sd/survival/{b:03d}"]) for b in range(1, DEPTH + 1)],
        "g": [float(trainer.callback_metrics[f"reg/g/{b:03d}"]) for b in range(1, DEPTH + 1)],
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


@pytest.mark.slow
def test_ddp_rank_zero_writes_tensorboard(tmp_path) -> None:
    run_script(Path(__file__).resolve(), str(tmp_path), timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # both ranks logged the same per-block values and keep them out of their TensorBoardLogger
    assert r0["survival"] == r1["survival"] and r0["g"] == r1["g"]
    assert r0["hidden"] == r1["hidden"] and "reg/g/001" in r0["hidden"]
    # one event file, rank 0's, with the histograms of the values both ranks logged
    files = sorted(p for p in tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent == Path(r0["log_dir"])
    acc = _events(r0["log_dir"])
    (survival,) = acc.Histograms("sd/survival")
    assert survival.histogram_value.num == DEPTH and survival.histogram_value.sum == pytest.approx(BUDGET * DEPTH, abs=1e-6)
    (g,) = acc.Histograms("reg/g")
    assert g.histogram_value.sum == pytest.approx(sum(r0["g"]), rel=1e-6)
    # the p-values of both ranks (all-gathered), as rank 0's CSV file has them
    pvalues = _csv(Path(r0["log_dir"]) / "normality_pvalues.csv")
    (hist,) = acc.Histograms("normality/pvalues")
    assert hist.histogram_value.num == len(pvalues) == 2 * INPUTS
    assert not [t for t in acc.Tags()["scalars"] if re.search(r"/\d+$", t)]
    header = (Path(r0["csv_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"sd/survival/{b:03d}" for b in range(1, DEPTH + 1)} <= set(header)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_main(sys.argv[1])
