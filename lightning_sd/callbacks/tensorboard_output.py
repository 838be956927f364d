"""What the callbacks write to a ``TensorBoardLogger``: per-block profiles as histograms and images, tables as text.

A per-block quantity (survival rate p_l, sensitivity S_l, regularization term g_l, a normality median
per block, ...) is one scalar tag per block for the CSV logger (``sd/survival/001 .. L``), which is what
a spreadsheet wants and what TensorBoard cannot show: 600 blocks are 600 charts. On a
:class:`~lightning.pytorch.loggers.TensorBoardLogger` the same quantity becomes, per logging step,

- one histogram ``<name>`` of its L values (``num = L``, ``sum = sum_l v_l``: how the values spread), and
- one image ``<name>_by_block``: the profile over depth, a bar per block (x = block 1..L, y = value),

and the per-block scalars are kept out of that logger (:func:`hide_scalars`) while every other logger
and ``trainer.callback_metrics`` still get them. Tables become markdown text (:func:`markdown_table`).

These functions write to one logger and do nothing else; :mod:`lightning_sd.callbacks.output` decides
who gets what (the dispatch over ``trainer.loggers``, rank 0 only). No function here draws from a
random generator, so logging never changes the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

__all__ = [
    "IMAGE_DPI",
    "IMAGE_SIZE_INCHES",
    "add_per_block",
    "add_table",
    "add_values_histogram",
    "bar_image",
    "hide_scalars",
    "hidden_scalars",
    "is_tensorboard",
    "markdown_table",
    "profile_image",
]

IMAGE_SIZE_INCHES = (6.4, 2.4)
"""Size of the matplotlib profile images in inches (width, height); at :data:`IMAGE_DPI` 640 x 240 pixels."""
IMAGE_DPI = 100
"""Resolution of the matplotlib profile images (dots per inch)."""
_BAR_HEIGHT = 120  # rows of the torch-drawn bar image
_BAR_MIN_WIDTH = 480  # the torch-drawn image is at least this wide (a block is max(1, 480 // L) columns)
_BACKGROUND = (255, 255, 255)
_BAR_COLOR = (31, 119, 180)  # matplotlib's first colour ("C0"), so both renderers look alike


def is_tensorboard(logger: Logger) -> TypeGuard[TensorBoardLogger]:
    """Whether ``logger`` is Lightning's :class:`~lightning.pytorch.loggers.TensorBoardLogger` (or a subclass)."""
    return isinstance(logger, TensorBoardLogger)


# ---------------------------------------------------------------------------------- scalars
class _LogMetricsWithout:
    """``logger.log_metrics`` without the keys in :attr:`keys`: installed on a TensorBoardLogger by :func:`hide_scalars`.

    It calls the logger's own ``log_metrics`` (the class's, or an earlier instance-level one) with the
    other keys, so step, prefix and rank-zero handling are the logger's. Picklable (the trainer's loggers
    travel to spawned processes).
    """

    def __init__(self, logger: Logger, inner: Callable[..., None] | None) -> None:
        self.logger = logger
        self.inner = inner
        self.keys: set[str] = set()

    def __call__(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        kept = {key: value for key, value in metrics.items() if key not in self.keys}
        if not kept:
            return
        if self.inner is not None:
            self.inner(metrics=kept, step=step)
        else:
            type(self.logger).log_metrics(self.logger, metrics=kept, step=step)


def hide_scalars(logger: Logger, keys: Sequence[str]) -> None:
    """Keep the scalars ``keys`` out of ``logger`` from now on (every other logger still gets them).

    ``self.log`` sends a value to every logger of the trainer; Lightning has no per-logger filter. This
    wraps the instance's ``log_metrics`` once (later calls add keys), so ``trainer.callback_metrics``,
    checkpoint monitoring and the CSV logger are unchanged. Call it on every rank before the values are
    flushed (epoch-end values are flushed after all ``on_train_epoch_end`` hooks); it is local (no
    collective).

    Args:
        logger: the logger, typically a :class:`~lightning.pytorch.loggers.TensorBoardLogger`.
        keys: metric names as logged with ``self.log`` (before the logger's own ``prefix``).
    """
    wrapper = logger.__dict__.get("log_metrics")
    if not isinstance(wrapper, _LogMetricsWithout):
        wrapper = _LogMetricsWithout(logger, inner=wrapper)
        logger.__dict__["log_metrics"] = wrapper
    wrapper.keys.update(keys)


def hidden_scalars(logger: Logger) -> frozenset[str]:
    """The metric names :func:`hide_scalars` keeps out of ``logger`` (empty when none)."""
    wrapper = logger.__dict__.get("log_metrics")
    return frozenset(wrapper.keys) if isinstance(wrapper, _LogMetricsWithout) else frozenset()


# ---------------------------------------------------------------------------------- histograms
def add_values_histogram(writer: Any, tag: str, values: Tensor | np.ndarray | Sequence[float], step: int, bins: Any = "tensorflow") -> bool:
    """Write a TensorBoard histogram of the finite entries of ``values`` (float64) under ``tag``.

    The histogram's ``num`` is the number of finite values and ``sum`` their sum. Returns ``False`` (and
    writes nothing) when no value is finite.

    Args:
        writer: a ``SummaryWriter`` (``TensorBoardLogger.experiment``).
        tag: the histogram's name, e.g. ``"sd/survival"``.
        values: the values (any shape, flattened).
        step: the x position (the trainer's ``global_step``).
        bins: as ``SummaryWriter.add_histogram`` takes them (``"tensorflow"`` or bin edges).
    """
    v = _as_float64(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return False
    writer.add_histogram(tag, v, global_step=step, bins=bins)
    return True


# ---------------------------------------------------------------------------------- images
def bar_image(values: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """Bar chart of ``values`` over blocks drawn with torch only: an ``(H, W, 3)`` uint8 array (HWC, RGB).

    Block l (1-based) is the columns ``[(l-1) c, l c)`` with ``c = max(1, 480 // L)``, so
    ``W = L c`` and ``H = 120``. The value axis spans ``[min(0, min v), max(0, max v)]``; the baseline
    ``v = 0`` is at row ``z = round(H * top / span)`` and block l's bar is ``round(H |v_l| / span)`` rows
    above it (positive values) or below it (negative values). Non-finite values get no bar. Used when
    matplotlib is not installed.
    """
    v = torch.as_tensor(_as_float64(values), dtype=torch.float64)
    num_blocks = v.numel()
    if num_blocks == 0:
        raise ValueError("bar_image needs at least one value")
    finite = torch.isfinite(v)
    v = torch.where(finite, v, torch.zeros_like(v))
    top, bottom = max(float(v.max()), 0.0), min(float(v.min()), 0.0)
    span = top - bottom if top > bottom else 1.0
    height = _BAR_HEIGHT
    zero_row = round(height * top / span)
    bar = torch.round(height * v.abs() / span).to(torch.int64)
    rows = torch.arange(height).unsqueeze(1)  # (H, 1)
    above = (rows >= zero_row - bar) & (rows < zero_row) & (v > 0)
    below = (rows >= zero_row) & (rows < zero_row + bar) & (v < 0)
    filled = above | below  # (H, L)
    columns = max(1, _BAR_MIN_WIDTH // num_blocks)
    filled = filled.repeat_interleave(columns, dim=1)  # (H, L c)
    image = torch.empty(height, filled.shape[1], 3, dtype=torch.uint8)
    image[:] = torch.tensor(_BACKGROUND, dtype=torch.uint8)
    image[filled] = torch.tensor(_BAR_COLOR, dtype=torch.uint8)
    return image.numpy()


def profile_image(values: Tensor | np.ndarray | Sequence[float], title: str, ylabel: str, xlabel: str = "block") -> np.ndarray:
    """The profile of ``values`` over depth as an ``(H, W, 3)`` uint8 image (HWC, RGB).

    With matplotlib: a step plot (one filled step per block, x = block 1..L, axes labelled ``xlabel`` and
    ``ylabel``, ``title`` on top) of :data:`IMAGE_SIZE_INCHES` at :data:`IMAGE_DPI` (640 x 240 pixels),
    drawn on the Agg canvas without ``pyplot`` (the global backend is left alone); non-finite values
    are drawn as 0 and counted in the title. Without matplotlib: :func:`bar_image`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return bar_image(values)
    v = _as_float64(values)
    bad = int((~np.isfinite(v)).sum())
    v = np.where(np.isfinite(v), v, 0.0)
    num_blocks = v.size
    fig = Figure(figsize=IMAGE_SIZE_INCHES, dpi=IMAGE_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.stairs(v, np.arange(num_blocks + 1, dtype=np.float64) + 0.5, fill=True, color="C0")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlim(0.5, num_blocks + 0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f" ({bad} non-finite shown as 0)" if bad else ""), fontsize=9)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def add_per_block(writer: Any, name: str, values: Tensor | np.ndarray | Sequence[float], step: int, axis: str = "block") -> None:
    """Write one per-block quantity to a ``SummaryWriter``: histogram ``name`` and image ``<name>_by_block``.

    Args:
        writer: a ``SummaryWriter`` (``TensorBoardLogger.experiment``).
        name: the quantity's key, e.g. ``"sd/survival"`` (its CSV scalars are ``sd/survival/001 ..``).
        values: one value per block, block 1 first.
        step: the x position (the trainer's ``global_step``).
        axis: what one value belongs to (``"block"``, ``"layer"``): the image's x-axis label.
    """
    add_values_histogram(writer, name, values, step)
    image = profile_image(values, f"{name} by {axis} (step {step})", name.rsplit("/", 1)[-1], xlabel=axis)
    writer.add_image(f"{name}_by_block", image, global_step=step, dataformats="HWC")


# ---------------------------------------------------------------------------------- tables
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a markdown table (TensorBoard's text dashboard renders it): a header, then one line per row.

    Floats are written with 6 significant digits (``f"{v:.6g}"``; the CSV file keeps every digit), other
    values with ``str``; a ``|`` inside a cell is escaped.
    """

    def cell(value: Any) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def add_table(writer: Any, key: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], step: int) -> None:
    """Write ``rows`` as a markdown table to the text dashboard of a ``SummaryWriter`` under ``key``."""
    writer.add_text(key, markdown_table(rows, columns), global_step=step)


def _as_float64(values: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)
