"""SummaryPlots: PNG figures of the survival rates, sensitivities, g_l and normality p-values at the end of fit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sd.callbacks.output import log_dir_without_broadcast

__all__ = ["SummaryPlots"]

_MISSING_MATPLOTLIB = (
    "SummaryPlots draws its figures with matplotlib, which is not installed: `pip install matplotlib` "
    "(or `pip install lightning_sd[dev]`)"
)

#: Above this many blocks the x axis shows block numbers only, not branch names.
_MAX_NAMED_BLOCKS = 24


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised with matplotlib hidden
        raise ImportError(_MISSING_MATPLOTLIB) from err


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib Figure on the Agg canvas (no pyplot: the user's backend and global state are untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str, dpi: int) -> str:
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _block_axis(ax: Any, names: Sequence[str] | None, num_blocks: int) -> None:
    """Block numbers 1..L on the x axis; branch names as tick labels when there are few blocks."""
    ax.set_xlim(0.4, num_blocks + 0.6)
    if names is not None and len(names) == num_blocks and num_blocks <= _MAX_NAMED_BLOCKS:
        ax.set_xticks(np.arange(1, num_blocks + 1))
        ax.set_xticklabels([f"{block}: {name}" for block, name in enumerate(names, start=1)], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("block l")


class SummaryPlots(Callback):
    r"""Write summary figures of stochastic depth as PNG files when ``fit`` ends.

    The callback reads the state that the other callbacks of the ``Trainer`` hold at the end of
    training, so it measures nothing itself and runs no collective: it works on rank zero only and
    the other ranks return at once. Figures (each written only when its data exist):

    - ``sd_rates.png`` from :class:`~lightning_sd.StochasticDepth`: survival rates ``p_l`` per block
      with the budget line ``mean_l p_l``; with a measured mode also the sensitivities ``S_l``
      (``"sensemode"``) and the regularization terms ``g_l`` (``"maxreg"``, else the last probe of a
      :class:`~lightning_sd.RegularizationMonitor`) as extra panels.
    - ``regularization.png`` from a :class:`~lightning_sd.RegularizationMonitor`: ``g_l`` over depth
      at every probe, the penalty ``R`` per probe epoch, and each block's share ``R_l / R`` at the
      last probe (when rates are known).
    - ``<prefix>_pvalues.png`` from each :class:`~lightning_sd.NormalityMonitor`: the histogram of the
      output's normality-test p-values at every probe (uniform on [0, 1] when SD acts as Gaussian
      noise, Hayou & Ayed 2021 Fig. 5 left), the p-values per depth at the last probe when the
      monitor runs with ``per_block=True`` (Fig. 5 right), and the median p-value and fraction above
      ``alpha`` per probe. Everything comes from the monitor's in-memory ``history``.

    Figures are drawn on matplotlib's Agg canvas without ``pyplot`` (no window, the global backend is
    left alone). matplotlib is an optional dependency (the ``dev`` extra): it is imported when the
    callback is created, and a missing install raises an ``ImportError`` that says ``pip install
    matplotlib``.

    Args:
        out_dir: folder for the PNG files; ``None``: the log directory of the first logger (as
            ``trainer.log_dir``, without its broadcast), else ``trainer.default_root_dir``.
        dpi: resolution of the PNG files (>= 10).
        prefix: file-name prefix added to every figure (``""``: none).

    After ``fit``, :attr:`paths` maps each figure (``"rates"``, ``"regularization"``, the monitor's
    prefix for p-values) to the file written.

    Example::

        from lightning_sd import StochasticDepth, RegularizationMonitor, NormalityMonitor
        from lightning_sd.callbacks.summary_plots import SummaryPlots

        trainer = Trainer(callbacks=[RegularizationMonitor(loss="mse"), NormalityMonitor(),
                                     SummaryPlots(out_dir="plots"),
                                     StochasticDepth(mode="sensemode", budget=0.5)])
        trainer.fit(model, datamodule=dm)
        plots.paths["rates"]  # 'plots/sd_rates.png'

    In a YAML recipe (StochasticDepth stays the last callback)::

        trainer:
          callbacks:
            - class_path: lightning_sd.callbacks.summary_plots.SummaryPlots
              init_args:
                out_dir: null
            - class_path: lightning_sd.callbacks.StochasticDepth
              init_args: {mode: uniform, budget: 0.5}
    """

    def __init__(self, out_dir: str | None = None, dpi: int = 110, prefix: str = "") -> None:
        _require_matplotlib()
        if int(dpi) != dpi or dpi < 10:
            raise ValueError(f"dpi must be an integer >= 10, got {dpi!r}")
        self.out_dir = out_dir
        self.dpi = int(dpi)
        self.prefix = prefix
        self.paths: dict[str, str] = {}

    # ------------------------------------------------------------------ hook
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # trainer.log_dir broadcasts from rank 0, a collective this rank-0-only hook must not call.
        out_dir = self.out_dir or log_dir_without_broadcast(trainer)
        self.paths = self.write(trainer.callbacks, out_dir)  # type: ignore[attr-defined]
        if self.paths:
            rank_zero_info("SummaryPlots: wrote " + ", ".join(self.paths.values()))
        else:
            rank_zero_warn(
                "SummaryPlots: nothing to plot (no StochasticDepth, RegularizationMonitor or NormalityMonitor with data "
                "in trainer.callbacks)"
            )

    # ------------------------------------------------------------------ figures
    def write(self, callbacks: Sequence[Callback], out_dir: str) -> dict[str, str]:
        """Draw every figure whose data the ``callbacks`` hold into ``out_dir``; returns ``{figure: path}``.

        Usable without a Trainer, e.g. ``SummaryPlots().write(trainer.callbacks, "plots")`` after a fit.
        """
        _require_matplotlib()
        from lightning_sd.callbacks.depth_on_demand import DepthOnDemand
        from lightning_sd.callbacks.monitor import active_stochastic_depth
        from lightning_sd.callbacks.normality_monitor import NormalityMonitor
        from lightning_sd.callbacks.regularization_monitor import RegularizationMonitor

        sd = active_stochastic_depth(callbacks)
        reg = next((c for c in callbacks if isinstance(c, RegularizationMonitor) and c.history), None)
        normality = [c for c in callbacks if isinstance(c, NormalityMonitor) and c.history]
        depth = next((c for c in callbacks if isinstance(c, DepthOnDemand) and c.results), None)
        paths: dict[str, str] = {}
        if sd is None and reg is None and not normality and depth is None:
            return paths
        os.makedirs(out_dir, exist_ok=True)
        if sd is not None:
            paths["rates"] = self._plot_rates(sd, reg, os.path.join(out_dir, f"{self.prefix}sd_rates.png"))
        if reg is not None:
            paths["regularization"] = self._plot_regularization(reg, os.path.join(out_dir, f"{self.prefix}regularization.png"))
        if depth is not None:
            paths["depth_on_demand"] = self._plot_depth(depth, os.path.join(out_dir, f"{self.prefix}depth_on_demand.png"))
        for monitor in normality:
            key = monitor.prefix if monitor.prefix not in paths else f"{monitor.prefix}_{len(paths)}"
            paths[key] = self._plot_pvalues(monitor, os.path.join(out_dir, f"{self.prefix}{key}_pvalues.png"))
        return paths

    def _plot_rates(self, sd: Any, reg: Any, path: str) -> str:
        p = _as_array(sd.survival)
        num_blocks = p.size
        names = [b.name for b in sd.handle.branches]
        blocks = np.arange(1, num_blocks + 1)
        panels: list[tuple[str, np.ndarray, str]] = []
        if sd.sensitivities is not None:
            panels.append(("sensitivity", _as_array(sd.sensitivities), "sensitivity $S_l$ (dLoss/dm_l at m = 1)"))
        g_title = ""
        g = None
        if sd.regularization_terms is not None:
            g, g_title = _as_array(sd.regularization_terms), "regularization term $g_l$ (measured for maxreg)"
        elif reg is not None and len(reg.history[-1]["g"]) == num_blocks:
            g = _as_array(reg.history[-1]["g"])
            g_title = f"regularization term $g_l$ (RegularizationMonitor, epoch {reg.history[-1]['epoch']})"
        if g is not None:
            panels.append(("g", g, g_title))
        height = 2.6 * (1 + len(panels)) + (1.2 if num_blocks <= _MAX_NAMED_BLOCKS else 0.0)
        fig, axes = _figure(1 + len(panels), 1, width=max(6.0, min(14.0, 0.12 * num_blocks + 5.0)), height=height)
        ax = axes[0, 0]
        ax.bar(blocks, p, width=0.8, color="tab:blue")
        mean = float(p.mean()) if num_blocks else float("nan")
        ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1)
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel("survival rate $p_l$")
        ax.set_title(
            f"StochasticDepth mode={sd.mode}, budget={sd.budget:g}, drop={sd.drop}, scaling={sd.scaling}\n"
            f"dashed: mean p = {mean:.3f}, expected depth {p.sum():.2f} of {num_blocks} blocks",
            fontsize=9,
        )
        for i, (kind, values, title) in enumerate(panels, start=1):
            axi = axes[i, 0]
            colors = np.where(values >= 0, "tab:green", "tab:purple") if kind == "sensitivity" else "tab:orange"
            axi.bar(blocks, values, width=0.8, color=colors)
            if kind == "sensitivity":
                axi.axhline(0.0, color="black", linewidth=0.6)
            axi.set_ylabel(kind if kind == "sensitivity" else "$g_l$")
            axi.set_title(title, fontsize=9)
            axi.sharex(ax)
        for i in range(len(panels) + 1):
            _block_axis(axes[i, 0], names if i == len(panels) else None, num_blocks)
            if i < len(panels):
                axes[i, 0].tick_params(labelbottom=False)
                axes[i, 0].set_xlabel("")
        return _save(fig, path, self.dpi)

    def _plot_depth(self, depth: Any, path: str) -> str:
        """Each metric :class:`~lightning_sd.callbacks.depth_on_demand.DepthOnDemand` measured against the fraction of blocks kept."""
        rows = sorted(depth.results, key=lambda r: r["keep"])
        names = [k for k in rows[0] if k not in ("keep", "blocks", "kept")][:4]
        fig, axes = _figure(1, max(1, len(names)), width=4.2 * max(1, len(names)), height=3.4)
        keeps = np.array([r["keep"] for r in rows])
        for i, name in enumerate(names):
            ax = axes[0, i]
            ax.plot(keeps, [float(r[name]) for r in rows], marker="o", color="tab:blue")
            for r in rows:
                ax.annotate(str(r["blocks"]), (r["keep"], float(r[name])), fontsize=7, textcoords="offset points", xytext=(3, 3))
            ax.set_xlabel("fraction of blocks kept (labels: blocks)")
            ax.set_ylabel(name)
            ax.set_title(f"{name} vs depth (by={depth.by})", fontsize=9)
        return _save(fig, path, self.dpi)

    def _plot_regularization(self, reg: Any, path: str) -> str:
        history = reg.history
        last = history[-1]
        has_rates = "penalty" in last
        ncols = 3 if has_rates else 1
        fig, axes = _figure(1, ncols, width=5.0 * ncols, height=3.8)
        ax = axes[0, 0]
        cmap = _cmap("viridis")
        for i, record in enumerate(history):
            g = _as_array(record["g"])
            color = cmap(i / max(len(history) - 1, 1))
            ax.plot(np.arange(1, g.size + 1), g, marker="o", markersize=2, linewidth=1, color=color, label=f"epoch {record['epoch']}")
        ax.set_xlabel("block l")
        ax.set_ylabel("$g_l$")
        ax.set_yscale("symlog", linthresh=_linthresh(np.concatenate([_as_array(r["g"]) for r in history])))
        ax.set_title(f"regularization terms g_l (loss={last.get('loss') or reg.loss})", fontsize=9)
        if len(history) <= 8:
            ax.legend(fontsize=7)
        if has_rates:
            epochs = [r["epoch"] for r in history if "penalty" in r]
            penalties = [r["penalty"] for r in history if "penalty" in r]
            axes[0, 1].plot(epochs, penalties, marker="o", color="tab:red")
            axes[0, 1].set_xlabel("epoch")
            axes[0, 1].xaxis.set_major_locator(_integer_locator())
            axes[0, 1].set_ylabel("R = 1/2 sum_l Var(m_l) g_l")
            axes[0, 1].set_title("explicit penalty R per probe", fontsize=9)
            share = _as_array(last["share"])
            axes[0, 2].bar(np.arange(1, share.size + 1), share, width=0.8, color="tab:orange")
            axes[0, 2].set_xlabel("block l")
            axes[0, 2].set_ylabel("$R_l / R$")
            axes[0, 2].set_title(f"share of the penalty per block (epoch {last['epoch']})", fontsize=9)
        return _save(fig, path, self.dpi)

    def _plot_pvalues(self, monitor: Any, path: str) -> str:
        probes = _probes(monitor)
        history = monitor.history
        last_blocks = probes[-1][2] if probes else None
        panels = ["hist"] + (["depth"] if last_blocks is not None and last_blocks.size else []) + (["summary"] if history else [])
        fig, axes = _figure(1, len(panels), width=5.0 * len(panels), height=3.8)
        bins = np.linspace(0.0, 1.0, 21)
        cmap = _cmap("viridis")
        for ax, panel in zip(axes[0], panels):
            if panel == "hist":
                for i, (label, pvalues, _) in enumerate(probes):
                    finite = pvalues[np.isfinite(pvalues)]
                    if finite.size:
                        color = cmap(i / max(len(probes) - 1, 1))
                        ax.hist(finite, bins=bins, density=True, histtype="step", linewidth=1.4, color=color, label=label)
                ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="uniform (Gaussian output)")
                ax.set_xlim(0.0, 1.0)
                ax.set_xlabel(f"{monitor.test} p-value of the output")
                ax.set_ylabel("density over probe inputs")
                ax.set_title(f"p-values per probe ({monitor.num_masks} masks per input)", fontsize=9)
                if len(probes) <= 8:
                    ax.legend(fontsize=7)
            elif panel == "depth":
                assert last_blocks is not None
                columns = [col[np.isfinite(col)] for col in last_blocks.T]
                positions = np.arange(1, len(columns) + 1)
                keep = [i for i, c in enumerate(columns) if c.size]
                if keep:
                    ax.boxplot([columns[i] for i in keep], positions=positions[keep], widths=0.6, showfliers=False)
                step = max(1, len(columns) // 12)
                ax.set_xticks(positions[::step])
                ax.set_xticklabels([str(int(x)) for x in positions[::step]])
                ax.axhline(monitor.alpha, color="tab:red", linestyle="--", linewidth=1, label=f"alpha = {monitor.alpha:g}")
                ax.set_ylim(0.0, 1.0)
                ax.set_xlabel("depth: output of block l")
                ax.set_ylabel("p-value")
                ax.set_title(f"p-values per depth ({probes[-1][0]})", fontsize=9)
                ax.legend(fontsize=7)
            else:
                # x = training step: a probe at the start and one after epoch 0 share the epoch
                epochs = [r["global_step"] for r in history]
                frac_key = next((k for k in history[-1] if k.startswith("frac_above_")), None)
                ax.plot(epochs, [r["median_pvalue"] for r in history], marker="o", label="median p-value")
                ax.fill_between(epochs, [r["q25_pvalue"] for r in history], [r["q75_pvalue"] for r in history], alpha=0.2, label="25-75%")
                if frac_key is not None:
                    ax.plot(epochs, [r[frac_key] for r in history], marker="s", label=frac_key.replace("_", " "))
                ax.set_ylim(0.0, 1.02)
                ax.set_xlabel("training step of the probe")
                ax.xaxis.set_major_locator(_integer_locator())
                ax.set_title("summary per probe", fontsize=9)
                ax.legend(fontsize=7)
        return _save(fig, path, self.dpi)


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _linthresh(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    positive = finite[finite > 0]
    return float(positive.min()) if positive.size else 1.0


def _probes(monitor: Any) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """``(label, output p-values, block p-values or None)`` per probe of a NormalityMonitor, from its history.

    Records restored from a checkpoint carry the summaries only (the p-values stay in memory): they
    appear in the summary panel, not in the histograms.
    """
    return [
        (
            f"epoch {record['epoch']} (step {record['global_step']})",
            _as_array(record["pvalues"]).reshape(-1),
            None if record.get("block_pvalues") is None else _as_array(record["block_pvalues"]),
        )
        for record in monitor.history
        if record.get("pvalues") is not None
    ]
