"""The LightningCLI behind ``lightning-sd`` (imported by :func:`lightning_sd.cli.main` to run a subcommand)."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning import LightningDataModule, LightningModule
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

# Imported so that jsonargparse resolves the short names (``--model SDClassifier``, ``StochasticDepth``).
from lightning_sd.callbacks import (
    StochasticDepth,  # noqa: F401
    output,
)
from lightning_sd.callbacks.monitor import stochastic_depth_callbacks
from lightning_sd.classifier import SDClassifier  # noqa: F401
from lightning_sd.cli import cpu_num_threads, quickstart_config, uses_quickstart
from lightning_sd.data import CIFARDataModule, DigitsDataModule, ToyRegressionDataModule  # noqa: F401
from lightning_sd.regressor import SDRegressor  # noqa: F401

__all__ = ["NO_LOGGER_DIR", "SDLightningCLI"]

#: Where a run with ``--trainer.logger false`` and no ``--trainer.default_root_dir`` writes its files
#: (config, checkpoints, the callbacks' tables): Lightning's default would be the working directory.
NO_LOGGER_DIR = os.path.join("lightning_logs", "no_logger")


def _instantiation_error(err: BaseException) -> str:
    """One line for a class that refused its configured arguments: the innermost error, with its class."""
    inner, seen = err, {id(err)}
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        inner = nxt
        seen.add(id(inner))
    tb = inner.__traceback__
    owner = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__init__" and "self" in tb.tb_frame.f_locals:
            owner = f"{type(tb.tb_frame.f_locals['self']).__name__}: "
        tb = tb.tb_next
    return f"{owner}{inner}"


class SDLightningCLI(LightningCLI):
    """LightningCLI in subclass mode for models and datamodules, with the quickstart as fallback defaults.

    Args:
        args: command-line arguments without the program name (``None``: ``sys.argv[1:]``).
        **kwargs: forwarded to :class:`~lightning.pytorch.cli.LightningCLI`.

    When :func:`~lightning_sd.cli.uses_quickstart` holds for ``args`` (no model class, data class or
    config chosen), the parser's defaults are :data:`~lightning_sd.cli.QUICKSTART_YAML`: ``--trainer.*``,
    ``--model.*``, ``--data.*`` and ``--seed_everything`` flags change it. Once a model class, data class
    or config is chosen the quickstart is not used at all, so none of its arguments leak into the chosen
    classes. On top of LightningCLI:

    - ``--num_threads N`` (default: 1 on CPU runs unless ``OMP_NUM_THREADS`` is set, see
      :func:`~lightning_sd.cli.cpu_num_threads`), stated in the startup banner;
    - a class that refuses its configured value (``--trainer.callbacks.init_args.budget 1.5``) is a
      parser error: one message naming the class, exit code 2;
    - ``--trainer.logger false`` without ``--trainer.default_root_dir`` writes under
      :data:`NO_LOGGER_DIR`, not into the working directory;
    - after ``fit`` (rank 0): the log directory, metrics file, checkpoint and the final logged metrics.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.quickstart = uses_quickstart(argv)
        self.num_threads: int | None = None
        self.threads_reason = ""
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "lightning-sd"})
        super().__init__(args=args, **kwargs)
        _destroy_process_group()

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--num_threads",
            type=PositiveInt | None,
            default=None,
            help="torch intra-op threads (torch.set_num_threads). Default: 1 for CPU runs unless OMP_NUM_THREADS "
            "is set (on small or shared CPUs more threads are several times slower), torch's default otherwise.",
        )
        if self.quickstart:
            parser.set_defaults(quickstart_config())

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    @override
    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        trainer = config.trainer
        gpu = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
        self.num_threads, self.threads_reason = cpu_num_threads(trainer.accelerator, config.get("num_threads"), os.environ, gpu)
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        if trainer.logger is False and trainer.default_root_dir is None:
            trainer.default_root_dir = NO_LOGGER_DIR

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            self.parser.error(_instantiation_error(err))

    def _banner(self) -> None:
        if not self.trainer.is_global_zero:
            return
        lines = []
        if self.quickstart and self.subcommand == "fit":
            sd = next(iter(stochastic_depth_callbacks(self.trainer.callbacks)), None)  # type: ignore[attr-defined]
            settings = f", StochasticDepth mode={sd.mode} budget={sd.budget:g}" if sd is not None else ""
            lines.append(
                "lightning-sd: no --config/--model/--data class given: running the quickstart recipe "
                f"(toy regression, Stable residual MLP{settings}; see `lightning-sd fit --print_config`)"
            )
        lines.append(f"lightning-sd: torch threads: {torch.get_num_threads()} ({self.threads_reason})")
        print("\n".join(lines), flush=True)

    def before_fit(self) -> None:
        """Print the startup banner (LightningCLI calls ``before_<subcommand>``)."""
        self._banner()

    def before_validate(self) -> None:
        """Print the startup banner (LightningCLI calls ``before_<subcommand>``)."""
        self._banner()

    def before_test(self) -> None:
        """Print the startup banner (LightningCLI calls ``before_<subcommand>``)."""
        self._banner()

    def before_predict(self) -> None:
        """Print the startup banner (LightningCLI calls ``before_<subcommand>``)."""
        self._banner()

    def after_fit(self) -> None:
        """On rank 0: print where the logs, config and checkpoint went, and the final logged metrics."""
        trainer = self.trainer
        log_dir = output.log_dir(trainer)  # a collective under DDP: every rank reads it, before the rank check
        if not trainer.is_global_zero:
            return
        lines = []
        if log_dir:
            lines.append(f"lightning-sd: logs in {os.path.abspath(log_dir)}")
            # metrics.csv lies in the CSVLogger's directory, which is not trainer.log_dir when another logger
            # comes first (e.g. [TensorBoardLogger, CSVLogger]); each logger's log_dir is local (no collective)
            directories = [log_dir] + [str(d) for d in (getattr(lg, "log_dir", None) for lg in trainer.loggers[1:]) if d]
            for name in ("metrics.csv", "config.yaml"):
                for directory in dict.fromkeys(directories):
                    path = os.path.join(directory, name)
                    if os.path.isfile(path):
                        lines.append(f"  {name}: {os.path.abspath(path)}")
                        break
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "")
        if best:
            lines.append(f"  checkpoint: {os.path.abspath(best)}")
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
        per_block = [k for k in metrics if k.rsplit("/", 1)[-1].isdigit()]  # sd/survival/001, reg/g/001, ...
        summary = {k: v for k, v in metrics.items() if k not in per_block}
        if summary:
            width = max(map(len, summary))
            lines.append(f"lightning-sd: final metrics (step {trainer.global_step}):")
            lines += [f"  {k:<{width}}  {v:.6g}" for k, v in summary.items()]
            if per_block:
                lines.append(f"  (and {len(per_block)} per-block values, e.g. {per_block[0]}: see the logger)")
        print("\n".join(lines), flush=True)


def _destroy_process_group() -> None:
    """End the DDP process group that the run left open (Lightning keeps it for a later ``trainer.test``).

    Left to interpreter exit, gloo's threads are torn down in static destructors, and the process
    sometimes aborts after a successful run ("terminate called without an active exception", exit -6).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
