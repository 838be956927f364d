"""The ``lightning-sd`` LightningCLI: YAML recipes parse, quickstart and digits fit, bad values are refused."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sd.callbacks import StochasticDepth
from lightning_sd.classifier import SDClassifier
from lightning_sd.cli import QUICKSTART_YAML, SDLightningCLI, main, quickstart_config, uses_quickstart
from lightning_sd.data import CIFARDataModule, DigitsDataModule, ToyRegressionDataModule
from lightning_sd.regressor import SDRegressor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when both ``args`` and ``sys.argv[1:]`` (here pytest's) are given."""
    monkeypatch.setattr(sys, "argv", ["lightning-sd"])


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads make these tests ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _print_config(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_recipe_set_and_quickstart_file_match_the_embedded_default() -> None:
    assert RECIPES == [
        "cifar100_stable_resnet56.yaml",
        "cifar10_stable_resnet110.yaml",
        "digits.yaml",
        "digits_depth_on_demand.yaml",
        "quickstart.yaml",
        "timm_cifar.yaml",
    ]
    assert (CONFIGS / "quickstart.yaml").read_text() == QUICKSTART_YAML
    for name in RECIPES:
        first = (CONFIGS / name).read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{name} needs a top comment saying what it reproduces"


# (recipe, model class, backbone or depth, data class, SD mode, SD budget)
EXPECTED = {
    "quickstart.yaml": (SDRegressor, 100, ToyRegressionDataModule, "sensemode", 0.5),
    "digits.yaml": (SDClassifier, "CifarResNet-20", DigitsDataModule, "uniform", 0.5),
    "digits_depth_on_demand.yaml": (SDClassifier, "CifarResNet-20", DigitsDataModule, "uniform", 0.5),
    "cifar10_stable_resnet110.yaml": (SDClassifier, "CifarResNet-110", CIFARDataModule, "sensemode", 0.3),
    "cifar100_stable_resnet56.yaml": (SDClassifier, "CifarResNet-56", CIFARDataModule, "sensemode", 0.4),
    "timm_cifar.yaml": (SDClassifier, "timm:vit_tiny_patch16_224", CIFARDataModule, "linear", 0.9),
}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_parses_with_print_config(capsys: pytest.CaptureFixture, name: str) -> None:
    cfg = _print_config(capsys, "--config", str(CONFIGS / name))
    model_cls, arch, data_cls, mode, budget = EXPECTED[name]
    assert cfg["model"]["class_path"] == f"{model_cls.__module__}.{model_cls.__name__}"
    assert cfg["data"]["class_path"].endswith(data_cls.__name__)
    init = cfg["model"]["init_args"]
    assert (init["depth"] if model_cls is SDRegressor else init["backbone"]) == arch
    (sd,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("StochasticDepth")]
    assert (sd["init_args"]["mode"], sd["init_args"]["budget"]) == (mode, budget)
    if "cifar100" in name:
        assert init["num_classes"] == 100 and cfg["data"]["init_args"]["num_classes"] == 100
    if name.startswith("cifar"):
        assert init["stable"] is True and (init["lr"], init["momentum"], init["weight_decay"]) == (0.1, 0.9, 1e-4)


def test_no_choice_means_quickstart(capsys: pytest.CaptureFixture) -> None:
    assert uses_quickstart(["fit"]) and uses_quickstart(["fit", "--trainer.max_steps", "3"])
    for args in (["fit", "--config", "x.yaml"], ["fit", "-c", "x.yaml"], ["fit", "--model", "SDClassifier"],
                 ["fit", "--data=DigitsDataModule"], ["fit", "--model.class_path", "SDClassifier"], ["--help"], []):
        assert not uses_quickstart(args), args
    cfg = _print_config(capsys)
    assert cfg["model"]["class_path"] in ("lightning_sd.SDRegressor", "lightning_sd.regressor.SDRegressor")
    assert cfg["model"]["init_args"]["width"] == 128 and cfg["model"]["init_args"]["stable"] is True
    assert cfg["data"]["init_args"]["in_features"] == 256
    assert cfg["trainer"]["max_epochs"] == quickstart_config()["trainer"]["max_epochs"] == 20


def test_subclass_mode_selection_does_not_inherit_quickstart_arguments(capsys: pytest.CaptureFixture) -> None:
    cfg = _print_config(capsys, "--model", "SDClassifier", "--model.in_channels", "1", "--data", "DigitsDataModule")
    assert cfg["model"]["class_path"] in ("lightning_sd.SDClassifier", "lightning_sd.classifier.SDClassifier")
    init = cfg["model"]["init_args"]
    # SDClassifier's own defaults, not the quickstart regressor's Adam / lr 1e-3 / stable
    assert (init["optimizer"], init["lr"], init["stable"], init["in_channels"]) == ("sgd", 0.1, False, 1)
    assert cfg["data"]["class_path"] in ("lightning_sd.DigitsDataModule", "lightning_sd.data.DigitsDataModule")
    assert cfg["trainer"]["callbacks"] is None and cfg["trainer"]["max_epochs"] is None


def test_quickstart_fits_a_few_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = SDLightningCLI(
        args=["fit", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
              "--trainer.log_every_n_steps", "1",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path), *QUIET]
    )
    assert cli.quickstart
    assert isinstance(cli.model, SDRegressor) and len(cli.model.backbone.blocks) == 100
    assert cli.trainer.global_step == 3
    (sd,) = [c for c in cli.trainer.callbacks if isinstance(c, StochasticDepth)]
    assert (sd.mode, sd.num_blocks, sd.scaling) == ("sensemode", 100, "expected")
    assert cli.trainer.callbacks.index(sd) > max(
        i for i, c in enumerate(cli.trainer.callbacks) if type(c).__name__ in ("RegularizationMonitor", "NormalityMonitor")
    )  # SD is the last of the recipe's callbacks, so --trainer.callbacks.init_args.* reach it
    assert float(sd.survival.sum()) == pytest.approx(50.0, abs=1e-4)  # budget 0.5 of 100 blocks
    out = capsys.readouterr().out
    assert "running the quickstart recipe" in out
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.parent == tmp_path / "quickstart"
    assert f"lightning-sd: logs in {log_dir}" in out
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(r["train/loss"]) for r in rows) == 3 and sum(bool(r["val/loss"]) for r in rows) == 1
    # the SenseMode rates are also written as a table, one row per block
    with open(log_dir / "sd_rates_epoch0.csv") as f:
        assert len(list(csv.DictReader(f))) == 100
    assert (log_dir / "config.yaml").is_file()


def test_digits_recipe_fits_a_few_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = SDLightningCLI(
        args=["fit", "--config", str(CONFIGS / "digits.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2", "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.default_root_dir", str(tmp_path), *QUIET]
    )
    assert not cli.quickstart
    assert isinstance(cli.model, SDClassifier) and isinstance(cli.datamodule, DigitsDataModule)
    assert cli.model.backbone.conv1.in_channels == 1 and cli.model.backbone.num_blocks == 9
    assert cli.trainer.global_step == 4
    (sd,) = [c for c in cli.trainer.callbacks if isinstance(c, StochasticDepth)]
    assert sd.num_blocks == 9 and float(sd.survival.sum()) == pytest.approx(4.5, abs=1e-5)
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc"]) <= 1.0
    assert "lightning-sd: logs in" in capsys.readouterr().out


def test_digits_depth_on_demand_recipe_fits_and_evaluates_each_depth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = SDLightningCLI(
        args=["fit", "--config", str(CONFIGS / "digits_depth_on_demand.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--trainer.logger.init_args.save_dir",
              str(tmp_path), "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.init_args.schedule", "pld", *QUIET]
    )
    (sd,) = [c for c in cli.trainer.callbacks if isinstance(c, StochasticDepth)]
    assert sd.schedule == "pld"  # the last callback takes the --trainer.callbacks.init_args flags
    (dod,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "DepthOnDemand"]
    assert [(r["keep"], r["blocks"]) for r in dod.results] == [(1.0, 9), (0.75, 7), (0.5, 5), (0.25, 2)]
    assert all(0.0 <= r["val/acc"] <= 1.0 for r in dod.results)
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "depth_on_demand_step3.csv").is_file() and (log_dir / "depth_on_demand.png").is_file()
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("depth/val/acc@0.5")]
    assert len(rows) == 1 and float(rows[0]["depth/val/acc@0.5"]) == pytest.approx(dod.results[2]["val/acc"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trainer.max_epochs", "abc"], "max_epochs"),
        (["--config", str(CONFIGS / "cifar10_stable_resnet110.yaml"), "--data.init_args.num_classes", "12"], "num_classes"),
        (["--model", "SDClassifier", "--model.optimizer", "rmsprop"], "optimizer"),
        (["--model", "NoSuchModel"], "NoSuchModel"),
        (["--trainer.no_such_flag", "1"], "no_such_flag"),
    ],
)
def test_bad_cli_values_are_jsonargparse_errors(capsys: pytest.CaptureFixture, args: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err


def test_console_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_sd.cli", "fit", "--print_config"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["model"]["class_path"] in ("lightning_sd.SDRegressor", "lightning_sd.regressor.SDRegressor")


@pytest.mark.parametrize("name", ["cifar10_stable_resnet110.yaml", "cifar100_stable_resnet56.yaml", "timm_cifar.yaml"])
def test_cifar_recipes_run_on_a_generated_dataset(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    from tests.test_data import write_fake_cifar

    num_classes = 100 if "cifar100" in name else 10
    write_fake_cifar(tmp_path / "data", num_classes, per_batch=4, num_test=8)
    cli = SDLightningCLI(
        args=["fit", "--config", str(CONFIGS / name), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
              "--trainer.limit_val_batches", "2", "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
              "--trainer.callbacks.init_args.sensitivity_batches", "1",
              "--data.init_args.data_dir", str(tmp_path / "data"), "--data.init_args.verify_checksums", "false",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4", "--data.init_args.num_val", "8", *QUIET]
    )
    assert cli.trainer.global_step == 2
    assert len(cli.datamodule.train_set) == 12 and len(cli.datamodule.val_set) == 8
    (sd,) = [c for c in cli.trainer.callbacks if isinstance(c, StochasticDepth)]
    assert sd.num_blocks == {"cifar10_stable_resnet110.yaml": 54, "cifar100_stable_resnet56.yaml": 27, "timm_cifar.yaml": 24}[name]
    assert "val/acc" in cli.trainer.callback_metrics
