"""The ``lightning-sd`` command: a :class:`~lightning.pytorch.cli.LightningCLI` over the package.

``lightning-sd fit`` with no model, data or config runs the embedded quickstart recipe (the SD paper's
toy regression with a Stable residual MLP and SenseMode stochastic depth at budget 0.5; the same text
as ``configs/quickstart.yaml``). Any LightningModule / LightningDataModule can be chosen in subclass
mode (``--model SDClassifier --data DigitsDataModule``, short names for the package's classes, import
paths for others) and callbacks come from YAML as ``class_path``/``init_args``::

    lightning-sd fit                                         # quickstart, ~2 minutes on a CPU
    lightning-sd fit --trainer.max_epochs 3                  # quickstart, shorter
    lightning-sd fit --config configs/cifar10_stable_resnet110.yaml --data.data_dir ~/data
    lightning-sd fit --model SDClassifier --model.in_channels 1 --data DigitsDataModule \\
        --trainer.callbacks+=StochasticDepth --trainer.callbacks.mode uniform --trainer.callbacks.budget 0.5
    lightning-sd fit --config configs/digits.yaml --print_config
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import yaml
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so that jsonargparse resolves the short names (``--model SDClassifier``, ``StochasticDepth``).
import lightning_sd.callbacks  # noqa: F401
from lightning_sd.classifier import SDClassifier  # noqa: F401
from lightning_sd.data import CIFARDataModule, DigitsDataModule, ToyRegressionDataModule  # noqa: F401
from lightning_sd.regressor import SDRegressor  # noqa: F401

__all__ = ["SDLightningCLI", "main", "QUICKSTART_YAML", "quickstart_config", "uses_quickstart"]

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

_CHOICE_FLAGS = ("--model", "--data", "--config", "-c")
_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quickstart_config() -> dict[str, Any]:
    """The quickstart recipe as a dict (parsed :data:`QUICKSTART_YAML`)."""
    return yaml.safe_load(QUICKSTART_YAML)


def uses_quickstart(args: Sequence[str]) -> bool:
    """Whether ``args`` (without the program name) run a subcommand with no model, data or config chosen."""
    if not args or args[0] not in _SUBCOMMANDS:
        return False
    return not any(a == flag or a.startswith(flag + "=") or a.startswith(flag + ".") for a in args for flag in _CHOICE_FLAGS)


class SDLightningCLI(LightningCLI):
    """LightningCLI in subclass mode for models and datamodules, with the quickstart as fallback defaults.

    Args:
        args: command-line arguments without the program name (``None``: ``sys.argv[1:]``).
        **kwargs: forwarded to :class:`~lightning.pytorch.cli.LightningCLI`.

    When :func:`uses_quickstart` holds for ``args``, the parser's defaults are :data:`QUICKSTART_YAML`
    (explicit ``--trainer.*`` / ``--seed_everything`` flags still override them). Once a model, data or
    config is given the quickstart is not used at all, so none of its model or data arguments leak into
    the chosen classes. After ``fit`` the log directory, metrics file and checkpoint are printed.
    """

    def __init__(self, args: Optional[list[str]] = None, **kwargs: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.quickstart = uses_quickstart(argv)
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self.quickstart:
            parser.set_defaults(quickstart_config())

    def before_fit(self) -> None:
        if self.quickstart and self.trainer.is_global_zero:
            print(
                "lightning-sd: no --config/--model/--data given: running the quickstart recipe "
                "(toy regression, Stable residual MLP, StochasticDepth mode=sensemode budget=0.5; "
                "see `lightning-sd fit --print_config`)",
                flush=True,
            )

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = []
        log_dir = trainer.log_dir
        if log_dir:
            lines.append(f"lightning-sd: logs in {os.path.abspath(log_dir)}")
            for name in ("metrics.csv", "config.yaml"):
                path = os.path.join(log_dir, name)
                if os.path.isfile(path):
                    lines.append(f"  {name}: {os.path.abspath(path)}")
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "")
        if best:
            lines.append(f"  checkpoint: {os.path.abspath(best)}")
        if lines:
            print("\n".join(lines), flush=True)


def main(args: Optional[list[str]] = None) -> None:
    """Console-script entry point of ``lightning-sd`` (``args``: the arguments after the program name)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["inspect"]:  # ``lightning-sd inspect timm:NAME``: see lightning_sd.inspection
        from lightning_sd.inspection import inspect_main

        raise SystemExit(inspect_main(argv[1:]))
    SDLightningCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
