"""Depth on demand in a Trainer (issue 15): StochasticDepth.prune and the DepthOnDemand callback."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_sd.callbacks.depth_on_demand import DepthOnDemand
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.pruning import blocks_to_keep
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.models import ResidualMLP
from tests.helpers import ClassifierModule, RegressionModule, trainer_kwargs

L = 8


class MLPClassifier(ClassifierModule):
    """ClassifierModule on a residual MLP (bit-reproducible on CPU), logging a loss and a torchmetric."""

    def __init__(self) -> None:
        super().__init__(net=ResidualMLP(6, width=16, depth=L, out_features=3, stable=True), lr=0.05)
        self.val_acc = MulticlassAccuracy(num_classes=3, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, on_epoch=True)
        self.log("val_worst", F.cross_entropy(logits, y), reduce_fx="max")
        self.log("val_seen", float(len(y)), reduce_fx=torch.sum)
        self.log("train_like", 0.0, on_step=True, on_epoch=False)  # per-step only: no epoch value


def loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=10, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _fit(tmp_path: Path, *extra: pl.Callback, epochs: int = 2, logger: bool = False):
    torch.manual_seed(0)
    module = MLPClassifier()
    sd = StochasticDepth(mode="linear", budget=0.6, seed=1)
    kwargs = trainer_kwargs(tmp_path) if logger else trainer_kwargs(tmp_path, logger=False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[sd, *extra], **kwargs)
    trainer.fit(module, loader(40, 0, shuffle=True), loader(25, 1))
    return module, sd, trainer


def _validate(module: pl.LightningModule, tmp_path: Path) -> dict[str, float]:
    """An independent Lightning validation run of the module as it is (gates and pruning included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / "validate", logger=False))
        (out,) = trainer.validate(module, loader(25, 1), verbose=False)
    return out


@pytest.mark.parametrize("by", ["sensitivity", "survival", "every_other", "last"])
def test_each_depth_matches_a_lightning_validation_of_the_pruned_network(tmp_path, by) -> None:
    dod = DepthOnDemand(keeps=(1.0, 0.5, 0.25), by=by)
    module, sd, _ = _fit(tmp_path, dod)
    assert [r["keep"] for r in dod.results] == [1.0, 0.5, 0.25]
    assert [r["blocks"] for r in dod.results] == [8, 4, 2]
    handle = sd.handle
    assert handle is not None and handle.pruned == []  # restored after the evaluation
    for row in dod.results:
        kept = [int(i) - 1 for i in row["kept"].split()]
        handle.unprune()
        for i, gate in enumerate(handle.gates):
            gate.pruned = i not in kept
        ref = _validate(module, tmp_path)
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
        assert row["val_acc"] == pytest.approx(ref["val_acc"], abs=1e-7)
        assert row["val_worst"] == pytest.approx(ref["val_worst"], rel=1e-6)
        assert row["val_seen"] == ref["val_seen"] == 25
        assert "train_like" not in row and set(row) == {"keep", "blocks", "kept"} | set(ref)
    handle.unprune()
    assert dod.results[0]["val_loss"] != dod.results[2]["val_loss"]
    if by == "last":
        assert dod.results[1]["kept"] == "1 2 3 4"
    if by == "survival":  # linear rates fall with depth: the first blocks have the highest rates
        assert dod.results[2]["kept"] == "1 2"


def test_sensitivity_pruning_uses_the_evaluation_networks_sensitivities_on_validation_data(tmp_path) -> None:
    module, sd, _ = _fit(tmp_path)
    val = [(x, y) for x, y in loader(25, 1)][:3]
    s = estimate_sensitivities(module.eval(), val, supervised_loss(F.cross_entropy))
    module.train()
    torch.testing.assert_close(sd.pruning_sensitivities(num_batches=3), s)
    kept = sd.prune(0.5, by="sensitivity")
    assert kept == blocks_to_keep(0.5, "sensitivity", L, sensitivities=sd.pruning_sensitivities())
    assert sd.handle is not None and sd.handle.pruned == [i for i in range(L) if i not in kept]
    sd.unprune()
    assert sd.handle.pruned == []


def test_watching_depths_every_epoch_leaves_the_run_bit_identical(tmp_path) -> None:
    plain, sd_a, _ = _fit(tmp_path / "a", epochs=3)
    dod = DepthOnDemand(keeps=(0.75, 0.5), by="sensitivity", every_n_epochs=1)
    watched, sd_b, _ = _fit(tmp_path / "b", dod, epochs=3)
    assert [(e, s) for e, s, _ in dod.history] == [(0, 4), (1, 8), (2, 12)]  # no second pass at fit end
    for k, v in plain.state_dict().items():
        assert torch.equal(v, watched.state_dict()[k]), k


def test_metrics_are_logged_and_the_table_written(tmp_path) -> None:
    dod = DepthOnDemand(keeps=(1.0, 0.5), by="every_other", every_n_epochs=2)
    _, _, trainer = _fit(tmp_path, dod, epochs=3, logger=True)
    assert trainer.callback_metrics["depth/val_loss@0.5"] == pytest.approx(dod.history[0][2][1]["val_loss"])  # epoch 1
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("depth/val_acc@0.5")]
    # epoch 1 through self.log, fit end (step 12) through logger.log_metrics
    assert len(rows) == 2 and float(rows[-1]["depth/val_acc@0.5"]) == pytest.approx(dod.results[1]["val_acc"])
    assert dod.table_path is not None and dod.table_path.endswith("depth_on_demand_step12.csv")
    with open(dod.table_path) as f:
        table = list(csv.DictReader(f))
    assert [r["keep"] for r in table] == ["1.0", "0.5"] and table[1]["kept"] == "1 3 5 7"
    assert float(table[0]["val_loss"]) == pytest.approx(dod.results[0]["val_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(keeps=(1.0, 0.0)), "keep must be"),
        (dict(keeps=()), "at least one"),
        (dict(keeps=(0.5, 0.5)), "repeated"),
        (dict(by="random"), "unknown by='random'"),
        (dict(every_n_epochs=0), "every_n_epochs"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DepthOnDemand(**kwargs)


def test_reductions_are_lightnings() -> None:
    from lightning_sd.callbacks.depth_on_demand import _reduction

    assert [_reduction(f) for f in ("mean", "sum", "max", "min", torch.mean, torch.sum, torch.max, torch.min)] == [
        "mean", "sum", "max", "min", "mean", "sum", "max", "min"
    ]
    with pytest.raises(ValueError, match="reduce_fx=<built-in method median"):  # Lightning refuses it too
        _reduction(torch.median)


def test_validation_that_never_ran_is_loaded_at_fit_end_and_no_validation_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    dod = DepthOnDemand(keeps=(1.0, 0.5), by="survival")
    trainer = pl.Trainer(max_epochs=1, check_val_every_n_epoch=5, callbacks=[StochasticDepth(seed=0), dod],
                         **trainer_kwargs(tmp_path, logger=False))
    module = MLPClassifier()
    trainer.fit(module, loader(40, 0), loader(25, 1))
    assert [r["blocks"] for r in dod.results] == [8, 4] and dod.results[0]["val_seen"] == 25
    assert dod.results[0]["val_loss"] == pytest.approx(_validate(module, tmp_path)["val_loss"], rel=1e-6)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, callbacks=[StochasticDepth(), DepthOnDemand()],
                         **trainer_kwargs(tmp_path, logger=False))
    module = MLPClassifier()
    with pytest.raises(ValueError, match="limit_val_batches=0"):
        trainer.fit(module, loader(40, 0), loader(25, 1))
    assert module.global_step == 0


def test_needs_stochastic_depth_and_a_validation_step(tmp_path) -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=[DepthOnDemand()], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match="has none"):
        trainer.fit(MLPClassifier(), loader(20, 0), loader(10, 1))
    module = RegressionModule(depth=4)
    trainer = pl.Trainer(max_steps=1, callbacks=[StochasticDepth(), DepthOnDemand()], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match="does not define"):
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 8), torch.randn(8, 1)), batch_size=4))
    assert module.global_step == 0  # refused at setup, before any training step


def test_summary_plots_draws_each_metric_against_depth(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from lightning_sd.callbacks import summary_plots as summary_plots_module
    from lightning_sd.callbacks.summary_plots import SummaryPlots

    figures: dict = {}
    save = summary_plots_module._save

    def capture(fig, path, dpi):
        figures[Path(path).name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(summary_plots_module, "_save", capture)
    dod = DepthOnDemand(keeps=(1.0, 0.25, 0.5), by="last")
    plots = SummaryPlots(out_dir=str(tmp_path / "plots"))
    _fit(tmp_path, dod, plots, epochs=1)
    assert Path(plots.paths["depth_on_demand"]).is_file()
    axes = figures["depth_on_demand.png"].axes
    assert sorted(ax.get_ylabel() for ax in axes) == ["val_acc", "val_loss", "val_seen", "val_worst"]
    rows = sorted(dod.results, key=lambda r: r["keep"])
    for ax in axes:
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [0.25, 0.5, 1.0]
        assert list(line.get_ydata()) == pytest.approx([r[ax.get_ylabel()] for r in rows])


@pytest.mark.slow
def test_ddp_ranks_evaluate_the_same_depths_as_one_process(tmp_path) -> None:
    """Two DDP ranks, each with half the validation data: same kept blocks and metrics on both, as one process."""
    import json

    from tests.distributed import run_script, run_script_here

    single = tmp_path / "single"
    single.mkdir()
    run_script_here("fit_regression.py", "--out", str(single), "--devices", "1", "--batch-size", "16", "--depth-on-demand")
    run_script("fit_regression.py", "--out", str(tmp_path), "--devices", "2", "--strategy", "ddp_fork", "--batch-size", "8", "--depth-on-demand")
    ranks = [json.load(open(tmp_path / f"depth_rank{r}.json")) for r in (0, 1)]
    ref = json.load(open(single / "depth_rank0.json"))
    assert ranks[0] == ranks[1]  # identical on every rank
    assert [r["kept"] for r in ranks[0]] == [r["kept"] for r in ref]
    assert [r["val_loss"] for r in ranks[0]] == pytest.approx([r["val_loss"] for r in ref], rel=1e-5)
    assert len({r["val_loss"] for r in ref}) == 3  # the depths differ
