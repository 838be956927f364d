"""What logging costs StochasticDepth at ResNet-1202 depth (600 blocks): CSV only vs TensorBoard + CSV.

A residual MLP with ``--blocks`` tiny blocks (width ``--width``) trains in a Lightning ``Trainer`` with
``StochasticDepth(mode="linear", budget=0.5, scaling="expected")`` and ``log_every_n_steps=1`` (every step's values are flushed to the
loggers, Lightning's worst case; its default is every 50 steps), once with ``[CSVLogger]`` and once with
``[TensorBoardLogger, CSVLogger]``. Timed inside that run (``time.perf_counter`` around the methods):

- **per step**: the callback's ``on_train_batch_end`` (realized depth, one ``self.log``) plus the
  trainer's dispatch of that step's values to the loggers (``_LoggerConnector.log_metrics``);
- **per epoch**: the callback's ``on_train_epoch_end`` (600 per-block scalars through ``self.log``, on
  TensorBoard a histogram and a profile image, the rate table when the rates changed) plus the
  dispatch of the epoch's values to the loggers;
- the whole training step (``on_train_batch_start`` to ``on_train_batch_end``), for scale.

Medians over all steps (epochs) of ``--repeats`` runs per configuration, the configurations interleaved
so load changes hit both alike; the first epoch of each run (warm-up: imports, first CSV header, the
rate table) is left out of the per-epoch median and reported separately. A second table times the
TensorBoard pieces alone on a ``SummaryWriter`` (600 values): histogram, profile image (matplotlib if
installed, and the torch fallback), the 600-row markdown table as text.

Usage::

    python examples/benchmarks/bench_logging.py                 # 600 blocks, 3 epochs x 20 steps, 3 repeats
    python examples/benchmarks/bench_logging.py --blocks 100 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd import ResidualMLP, StochasticDepth
from lightning_sd.callbacks import tensorboard_output
from lightning_sd.core.survival import survival_rates


class Regressor(pl.LightningModule):
    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.net = ResidualMLP(width, width, blocks, 1, stable=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StepTimer(pl.Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end`` (put first: it sees the whole step)."""

    def __init__(self, samples: list[float]) -> None:
        self.samples = samples
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples.append(time.perf_counter() - self._start)


def timed(obj: Any, name: str, record: Callable[[float, tuple, dict], None]) -> None:
    """Replace ``obj.name`` by a wrapper that passes its wall time (and arguments) to ``record``."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        record(time.perf_counter() - start, args, kwargs)
        return result

    setattr(obj, name, wrapper)


def run(with_tensorboard: bool, args: argparse.Namespace, root: str) -> dict[str, list[float]]:
    """One training run; returns the timed samples (seconds) by kind."""
    samples: dict[str, list[float]] = defaultdict(list)
    loggers: list[pl.loggers.Logger] = [pl.loggers.CSVLogger(root, name="csv")]
    if with_tensorboard:
        loggers.insert(0, pl.loggers.TensorBoardLogger(root, name="tb", default_hp_metric=False))
    pl.seed_everything(0, verbose=False)
    model = Regressor(args.blocks, args.width)
    sd = StochasticDepth(mode="linear", budget=0.5, scaling="expected", seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=loggers,
        callbacks=[StepTimer(samples["step"]), sd],
        max_epochs=args.epochs,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    hook: dict[str, float] = {}
    timed(sd, "on_train_batch_end", lambda t, a, k: hook.__setitem__("step", t))
    timed(sd, "on_train_epoch_end", lambda t, a, k: hook.__setitem__("epoch", t))

    def dispatch(t: float, a: tuple, k: dict) -> None:
        metrics = k.get("metrics", a[0] if a else {})
        if "sd/expected_depth" in metrics:  # the epoch's values
            samples["epoch_callback"].append(hook.pop("epoch"))
            samples["epoch_loggers"].append(t)
        elif "sd/realized_depth" in metrics:  # a step's values
            samples["step_callback"].append(hook.pop("step"))
            samples["step_loggers"].append(t)

    timed(trainer._logger_connector, "log_metrics", dispatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch * args.steps, args.width, generator=g)
    data = TensorDataset(x, torch.sin(x[:, :1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-workers hint of the DataLoader
        trainer.fit(model, DataLoader(data, batch_size=args.batch))
    assert len(samples["epoch_loggers"]) == args.epochs and len(samples["step_loggers"]) == args.epochs * args.steps
    return samples


def writer_pieces(blocks: int, repeats: int, root: str) -> list[tuple[str, float]]:
    """Median time of each TensorBoard piece for ``blocks`` values, on a SummaryWriter of its own."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(root)
    values = survival_rates("linear", blocks, 0.5)
    rows = [{"block": b + 1, "name": f"net.blocks.{b}.branch", "survival": float(v)} for b, v in enumerate(values)]
    pieces: list[tuple[str, Callable[[], object]]] = [
        ("histogram of the values", lambda: tensorboard_output.add_values_histogram(writer, "h", values, 0)),
        ("profile image, torch (bar_image)", lambda: tensorboard_output.bar_image(values)),
        ("add_image of it", lambda: writer.add_image("i", tensorboard_output.bar_image(values), 0, dataformats="HWC")),
        ("rate table as markdown text", lambda: tensorboard_output.add_table(writer, "t", rows, ["block", "name", "survival"], 0)),
    ]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pieces.insert(1, ("profile image, matplotlib (profile_image)", lambda: tensorboard_output.profile_image(values, "t", "p")))
        pieces.append(("add_per_block (histogram + image)", lambda: tensorboard_output.add_per_block(writer, "p", values, 0)))
    out = []
    for name, fn in pieces:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out.append((name, statistics.median(times)))
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=600, help="residual blocks L (ResNet-1202 has 600)")
    parser.add_argument("--width", type=int, default=16, help="width of each block")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = {"CSV only": False, "TensorBoard + CSV": True}
    results: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in configs}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for name, with_tb in configs.items():
                samples = run(with_tb, args, f"{root}/{repeat}/{'tb' if with_tb else 'csv'}")
                r = results[name]
                for kind in ("step", "step_callback", "step_loggers"):
                    r[kind] += samples[kind]
                r["step_total"] += [a + b for a, b in zip(samples["step_callback"], samples["step_loggers"])]
                epochs = [a + b for a, b in zip(samples["epoch_callback"], samples["epoch_loggers"])]
                r["first_epoch"].append(epochs[0])
                r["epoch_total"] += epochs[1:]
                r["epoch_callback"] += samples["epoch_callback"][1:]
                r["epoch_loggers"] += samples["epoch_loggers"][1:]
        pieces = writer_pieces(args.blocks, max(args.repeats, 5), f"{root}/pieces")

    def ms(name: str, kind: str, digits: int = 2) -> str:
        return f"{1e3 * statistics.median(results[name][kind]):.{digits}f}"

    print(
        f"# StochasticDepth logging cost, {args.blocks} blocks (width {args.width}, batch {args.batch}), "
        f"{args.repeats} runs x {args.epochs} epochs x {args.steps} steps per configuration, log_every_n_steps=1"
    )
    print(f"# torch {torch.__version__}, lightning {pl.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print("# callback: StochasticDepth's hook; loggers: Lightning's dispatch of the logged values to the loggers (their log_metrics + save)")
    print()
    print(
        "| loggers | training step (ms) | per step: callback | loggers | total (ms) | share of the step "
        "| per epoch: callback | loggers | total (ms) | first epoch total (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        share = statistics.median(r["step_total"]) / statistics.median(r["step"])
        print(
            f"| {name} | {ms(name, 'step')} | {ms(name, 'step_callback', 3)} | {ms(name, 'step_loggers', 3)} | {ms(name, 'step_total', 3)} "
            f"| {100 * share:.2f}% | {ms(name, 'epoch_callback', 1)} | {ms(name, 'epoch_loggers', 1)} | {ms(name, 'epoch_total', 1)} "
            f"| {ms(name, 'first_epoch', 1)} |"
        )
    print()
    print(f"| TensorBoard piece, {args.blocks} values | median (ms) |")
    print("|---|---:|")
    for name, t in pieces:
        print(f"| {name} | {1e3 * t:.2f} |")


if __name__ == "__main__":
    main()
