r"""The ``lightning-sd`` command: a :class:`~lightning.pytorch.cli.LightningCLI` over the package.

``lightning-sd fit`` with no model, data or config runs the embedded quickstart recipe (the SD paper's
toy regression with a Stable residual MLP and SenseMode stochastic depth at budget 0.5; the same text
as ``configs/quickstart.yaml``); ``--model.*`` / ``--data.*`` / ``--trainer.*`` flags change it. Any
LightningModule / LightningDataModule can be chosen in subclass mode (``--model SDClassifier --data
DigitsDataModule``, short names for the package's classes, import paths for others) and callbacks come
from YAML as ``class_path``/``init_args``::

    lightning-sd fit                                         # quickstart, ~2 minutes on a CPU
    lightning-sd fit --trainer.max_epochs 3 --model.lr 0.003 # quickstart, shorter, another learning rate
    lightning-sd fit --config configs/cifar10_stable_resnet110.yaml --data.data_dir ~/data
    lightning-sd fit --model SDClassifier --model.in_channels 1 --data DigitsDataModule \
        --trainer.callbacks+=StochasticDepth --trainer.callbacks.mode uniform --trainer.callbacks.budget 0.5
    lightning-sd fit --config configs/digits.yaml --print_config

This module imports neither torch nor lightning: ``lightning-sd --help`` answers at once, and
:class:`~lightning_sd.lightning_cli.SDLightningCLI` (the LightningCLI subclass) is imported only to run a
subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sd.lightning_cli import SDLightningCLI

__all__ = [
    "QUICKSTART_YAML",
    "SDLightningCLI",
    "cpu_num_threads",
    "main",
    "quickstart_config",
    "top_level_help",
    "uses_quickstart",
]

#: The recipe ``lightning-sd fit`` runs when no ``--config``, ``--model`` or ``--data`` is given.
#: ``configs/quickstart.yaml`` holds the same text (a test keeps them identical).
QUICKSTART_YAML = """\
# Quickstart: the SD paper's toy regression (Hayou & Ayed 2021, section 6) with stochastic depth.
# y = sin(beta^T x), x in R^256; a Stable Vanilla ResNet (residual MLP, width 128, 100 blocks, branches
# scaled by 1/sqrt(L)) trained with Adam; SenseMode survival rates p_l proportional to |S_l| (the loss
# sensitivities, measured on 8 batches at the start of training) for a training budget of 0.5, with the
# paper's scaling (m_l = delta_l in training, p_l at evaluation). Every 2 epochs the monitors log the
# explicit regularization g_l and penalty R (reg/*) and Shapiro-Wilk p-values of the output over 200
# masks per input (normality/*). About two minutes on a CPU; `lightning-sd fit` runs this recipe when
# no --config/--model/--data is given.
#
# Variables (StochasticDepth is the last callback, so these flags reach it):
#   --trainer.callbacks.init_args.mode    uniform | linear | sensemode | maxreg
#   --trainer.callbacks.init_args.budget  expected fraction of the 100 blocks kept, (0, 1]
# beta_scale 0.0625 = 1/sqrt(256) makes beta^T x ~ N(0, 1) so the target can be learned and val/loss
# moves; set data.init_args.beta_scale: 1.0 for the paper's exact beta ~ N(0, I), whose target is close
# to noise of variance 0.5 on unseen inputs.
seed_everything: 0
trainer:
  max_epochs: 20
  accelerator: cpu
  devices: 1
  log_every_n_steps: 10
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: lightning_logs
      name: quickstart
  callbacks:
    - class_path: lightning_sd.callbacks.regularization_monitor.RegularizationMonitor
      init_args:
        every_n_epochs: 2
        loss: mse
        probe_size: 128
    - class_path: lightning_sd.callbacks.normality_monitor.NormalityMonitor
      init_args:
        every_n_epochs: 2
        num_inputs: 64
        num_masks: 200
    - class_path: lightning_sd.callbacks.StochasticDepth
      init_args:
        mode: sensemode
        budget: 0.5
        drop: batch
        scaling: expected
        seed: 0
        sensitivity_batches: 8
model:
  class_path: lightning_sd.regressor.SDRegressor
  init_args:
    in_features: 256
    width: 128
    depth: 100
    stable: true
    optimizer: adam
    lr: 0.001
data:
  class_path: lightning_sd.data.ToyRegressionDataModule
  init_args:
    in_features: 256
    num_train: 8192
    num_val: 1024
    num_test: 1024
    batch_size: 128
    beta_scale: 0.0625
    seed: 0
"""

# Flags that choose a model/data class or a config file: any of them means "not the quickstart".
# ``--model.lr`` and other ``--model.*`` / ``--data.*`` arguments change the quickstart's classes instead.
_CHOICE_FLAGS = ("--model", "--data", "--config", "-c", "--model.class_path", "--data.class_path")
_SUBCOMMANDS = {
    "fit": "train (and validate) a model: `lightning-sd fit` alone runs the quickstart recipe",
    "validate": "one evaluation epoch over the validation set",
    "test": "one evaluation epoch over the test set",
    "predict": "run inference on the predict set",
}


def quickstart_config() -> dict[str, Any]:
    """The quickstart recipe as a dict (parsed :data:`QUICKSTART_YAML`)."""
    import yaml

    return yaml.safe_load(QUICKSTART_YAML)


def uses_quickstart(args: Sequence[str]) -> bool:
    """Whether ``args`` (without the program name) run a subcommand with no model class, data class or config chosen.

    ``--model SDClassifier``, ``--data=...``, ``--model.class_path ...``, ``--config``/``-c`` choose; other
    ``--model.*`` / ``--data.*`` flags (``--model.lr 0.01``) apply on top of the quickstart.
    """
    if not args or args[0] not in _SUBCOMMANDS:
        return False
    return not any(a == flag or a.startswith(flag + "=") for a in args for flag in _CHOICE_FLAGS)


def cpu_num_threads(
    accelerator: Any, num_threads: int | None, environ: Mapping[str, str], gpu_available: bool
) -> tuple[int | None, str]:
    """How many torch intra-op threads a ``lightning-sd`` run uses, and why (for the startup banner).

    Args:
        accelerator: the Trainer's ``accelerator`` argument (``"cpu"``, ``"auto"``, ``"gpu"``, ...; a
            ``class_path`` dict/namespace for an Accelerator object).
        num_threads: the ``--num_threads`` flag (``None``: not given).
        environ: the process environment (``os.environ``).
        gpu_available: whether an accelerator other than the CPU would be chosen by ``"auto"``.

    Returns:
        ``(threads, reason)``: the number to pass to ``torch.set_num_threads`` (``None``: leave torch's
        default) and a phrase saying why. ``--num_threads`` wins; then ``OMP_NUM_THREADS`` (torch already
        honours it); a CPU run without either gets 1 thread: on a small or shared CPU, torch's default of
        one thread per core fights other processes (the digits recipe took 2 min 43 s with the default
        and 12 s with one thread on a shared 2-core machine; docs/cli.md, "Command line").
    """
    if num_threads is not None:
        return int(num_threads), "--num_threads"
    if environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    name = accelerator
    if isinstance(accelerator, Mapping) or hasattr(accelerator, "class_path"):
        path = accelerator["class_path"] if isinstance(accelerator, Mapping) else accelerator.class_path
        name = "cpu" if str(path).rsplit(".", 1)[-1] == "CPUAccelerator" else "other"
    cpu = name == "cpu" or (name in (None, "auto") and not gpu_available)
    if not cpu:
        return None, "not a CPU run"
    return 1, "CPU run default; --num_threads N or OMP_NUM_THREADS=N to change"


def top_level_help() -> str:
    """The text of ``lightning-sd --help`` (built without importing torch or lightning)."""
    parser = argparse.ArgumentParser(
        prog="lightning-sd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Stochastic depth for PyTorch Lightning: a LightningCLI over lightning_sd.\n\n"
            "  lightning-sd fit                          run the quickstart recipe: the SD paper's toy\n"
            "                                            regression, Stable residual MLP (100 blocks),\n"
            "                                            SenseMode rates at budget 0.5, ~1-2 min on a CPU\n"
            "  lightning-sd fit --trainer.max_epochs 3   the quickstart, shorter (any --model.*, --data.*,\n"
            "                                            --trainer.* flag changes it)\n"
            "  lightning-sd fit --print_config           show the quickstart's full config\n"
            "  lightning-sd fit --config configs/digits.yaml\n"
            "  lightning-sd fit --model SDClassifier --data DigitsDataModule ..."
        ),
        epilog=(
            "All options of a subcommand: lightning-sd fit --help (slower: it imports lightning).\n"
            "CPU runs use 1 torch thread unless --num_threads N or OMP_NUM_THREADS is given."
        ),
    )
    commands = {**_SUBCOMMANDS, "inspect": "what stochastic depth would gate in a model: lightning-sd inspect timm:resnet50"}
    sub = parser.add_subparsers(title="subcommands", metavar="{" + ",".join(commands) + "}")
    for name, text in commands.items():
        sub.add_parser(name, help=text)
    return parser.format_help()


def __getattr__(name: str) -> Any:
    if name == "SDLightningCLI":  # lazy: importing it imports lightning
        from lightning_sd.lightning_cli import SDLightningCLI

        return SDLightningCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point of ``lightning-sd`` (``args``: the arguments after the program name)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["inspect"]:  # ``lightning-sd inspect timm:NAME``: see lightning_sd.inspection
        from lightning_sd.inspection import inspect_main

        raise SystemExit(inspect_main(argv[1:]))
    if argv in ([], ["-h"], ["--help"]):  # answered without importing torch or lightning
        print(top_level_help(), end="", file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    from lightning_sd.lightning_cli import SDLightningCLI

    SDLightningCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
