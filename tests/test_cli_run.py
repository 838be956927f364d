"""``lightning-sd`` as a user runs it: DDP, flags on top of the quickstart, refused values, help, threads, output."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sd.cli import QUICKSTART_YAML, cpu_num_threads, main, top_level_help, uses_quickstart
from lightning_sd.lightning_cli import NO_LOGGER_DIR, SDLightningCLI
from tests.distributed import _LEAKED

REPO = Path(__file__).resolve().parents[1]
# the quickstart made tiny: 4 blocks of width 16, 2 training batches per epoch, 3 steps
TINY = ["--model.depth", "4", "--model.width", "16", "--data.num_train", "256", "--data.num_val", "128",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _clean_process(monkeypatch: pytest.MonkeyPatch):
    """No pytest argv for LightningCLI; torch's thread count restored after each test (the CLI sets it)."""
    monkeypatch.setattr(sys, "argv", ["lightning-sd"])
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKED}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _metric_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _printed_metrics(out: str) -> dict[str, float]:
    block = out.split("lightning-sd: final metrics", 1)[1].splitlines()[1:]
    return {m.group(1): float(m.group(2)) for line in block if (m := re.fullmatch(r"  (\S+)\s+(\S+)", line))}


@pytest.mark.slow
def test_ddp_fit_on_cpu_exits_0_and_logs_once(tmp_path: Path) -> None:
    """Issue 12 item 4: ranks != 0 returned before rank 0's ``trainer.log_dir`` broadcast (exit 1)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_sd.cli", "fit", *TINY, "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    versions = sorted(p.name for p in (tmp_path / "logs" / "quickstart").iterdir())
    assert versions == ["version_0"]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.csv")] == [Path("logs/quickstart/version_0/metrics.csv")]
    rows = _metric_rows(tmp_path / "logs" / "quickstart" / "version_0" / "metrics.csv")
    # rank 0 writes every step once: 3 training losses at steps 0, 1, 2
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [0, 1, 2]
    assert proc.stdout.count("lightning-sd: logs in") == 1 and proc.stdout.count("running the quickstart recipe") == 1
    printed = _printed_metrics(proc.stdout)
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert printed["val/loss"] == pytest.approx(val[-1], rel=1e-5)


def test_model_and_data_flags_apply_on_top_of_the_quickstart(capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--model.lr", "0.01", "--model.init_args.width", "32", "--data.num_train", "512"]
    assert uses_quickstart(args)
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    assert info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    quick = yaml.safe_load(QUICKSTART_YAML)
    model, data = cfg["model"], cfg["data"]
    assert model["class_path"].endswith("SDRegressor") and data["class_path"].endswith("ToyRegressionDataModule")
    assert (model["init_args"]["lr"], model["init_args"]["width"], data["init_args"]["num_train"]) == (0.01, 32, 512)
    # everything else is the quickstart's, not the classes' own defaults
    for key in ("depth", "stable", "optimizer", "in_features"):
        assert model["init_args"][key] == quick["model"]["init_args"][key], key
    for key in ("beta_scale", "batch_size", "num_val"):
        assert data["init_args"][key] == quick["data"]["init_args"][key], key
    assert [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]] == [
        "RegularizationMonitor", "NormalityMonitor", "StochasticDepth"]
    # choosing a class still leaves the quickstart out
    for chooser in (["--model", "SDClassifier"], ["--data=DigitsDataModule"], ["--model.class_path", "SDClassifier"], ["-c", "x.yaml"]):
        assert not uses_quickstart(["fit", *chooser, "--model.lr", "0.1"]), chooser


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.callbacks.init_args.budget", "1.5"], "StochasticDepth: budget must be in (0, 1]"),
        (["--trainer.callbacks.init_args.mode", "custom"], "StochasticDepth: mode='custom' needs survival="),
        (["--num_threads", "0"], "num_threads"),
    ],
)
def test_a_refused_value_is_one_message_and_exit_code_2(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, *TINY])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1


def test_top_level_help_names_the_quickstart_and_imports_neither_torch_nor_lightning(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == top_level_help() and "quickstart" in out
    assert all(f"    {name}" in out for name in ("fit", "validate", "test", "predict"))
    probe = (
        "import sys\nfrom lightning_sd.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    print(e.code, sorted(m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr
    # a subcommand's help is LightningCLI's full parser
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0 and "--trainer.max_epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("accelerator", "flag", "env", "gpu", "expected"),
    [
        ("cpu", None, {}, False, 1),
        ("cpu", None, {}, True, 1),  # asked for the CPU on a GPU machine
        ("auto", None, {}, False, 1),
        (None, None, {}, False, 1),
        ("auto", None, {}, True, None),  # auto picks the GPU: torch's default
        ("gpu", None, {}, True, None),
        ({"class_path": "lightning.pytorch.accelerators.CPUAccelerator"}, None, {}, False, 1),
        ({"class_path": "lightning.pytorch.accelerators.CUDAAccelerator"}, None, {}, True, None),
        ("cpu", None, {"OMP_NUM_THREADS": "3"}, False, None),  # the user's OMP_NUM_THREADS, which torch reads
        ("cpu", None, {"OMP_NUM_THREADS": ""}, False, 1),  # empty: not set
        ("cpu", 4, {"OMP_NUM_THREADS": "3"}, False, 4),  # the flag wins
        ("gpu", 2, {}, True, 2),
    ],
)
def test_cpu_num_threads_decision(accelerator, flag, env, gpu, expected) -> None:
    threads, reason = cpu_num_threads(accelerator, flag, env, gpu)
    assert threads == expected and reason


def _tiny_fit(tmp_path: Path, *extra: str) -> SDLightningCLI:
    return SDLightningCLI(args=["fit", *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
                                "--trainer.default_root_dir", str(tmp_path), *extra])


def test_fit_sets_one_thread_on_cpu_and_prints_the_banner_and_final_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    cli = _tiny_fit(tmp_path)
    assert torch.get_num_threads() == 1 and cli.num_threads == 1
    out = capsys.readouterr().out
    assert "lightning-sd: torch threads: 1 (CPU run default" in out
    assert "StochasticDepth mode=sensemode budget=0.5" in out
    printed = _printed_metrics(out)
    rows = _metric_rows(Path(cli.trainer.log_dir) / "metrics.csv")
    assert printed["train/loss"] == pytest.approx([float(r["train/loss"]) for r in rows if r["train/loss"]][-1], rel=1e-5)
    assert printed["val/loss"] == pytest.approx([float(r["val/loss"]) for r in rows if r["val/loss"]][-1], rel=1e-5)
    assert printed["sd/budget"] == 0.5
    # per-block values (sd/survival/001, ...) are counted, not listed
    assert not any(k.rsplit("/", 1)[-1].isdigit() for k in printed)
    per_block = [k for k in cli.trainer.callback_metrics if k.rsplit("/", 1)[-1].isdigit()]
    assert len(per_block) % 4 == 0 and f"(and {len(per_block)} per-block values" in out  # 4 blocks per series
    torch.set_num_threads(1)
    cli = _tiny_fit(tmp_path, "--num_threads", "2")
    assert torch.get_num_threads() == 2 and cli.threads_reason == "--num_threads"
    assert "lightning-sd: torch threads: 2 (--num_threads)" in capsys.readouterr().out


def test_fit_summary_finds_metrics_csv_behind_a_tensorboard_logger(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # trainer.log_dir is the first logger's (TensorBoard's); metrics.csv is in the CSVLogger's directory
    loggers = json.dumps([
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}},
    ])
    cli = SDLightningCLI(args=["fit", *TINY, "--trainer.logger", loggers, "--trainer.default_root_dir", str(tmp_path)])
    csv_dir = Path(cli.trainer.loggers[1].log_dir)
    assert Path(cli.trainer.log_dir) != csv_dir
    out = capsys.readouterr().out
    assert f"  metrics.csv: {(csv_dir / 'metrics.csv').resolve()}" in out
    assert f"lightning-sd: logs in {Path(cli.trainer.log_dir).resolve()}" in out


def test_no_logger_writes_nothing_into_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = SDLightningCLI(args=["fit", *TINY, "--trainer.logger", "false"])
    assert cli.trainer.logger is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs"]
    out_dir = tmp_path / NO_LOGGER_DIR
    assert Path(cli.trainer.default_root_dir).resolve() == out_dir.resolve()
    assert len(_metric_rows(out_dir / "sd_rates_epoch0.csv")) == 4  # one row per block of the tiny model
    assert (out_dir / "config.yaml").is_file()
