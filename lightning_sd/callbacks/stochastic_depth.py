"""The StochasticDepth callback: inject gates at setup, draw masks per step, log and checkpoint rates."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from lightning_sd.callbacks.strategy_support import skips_compute_under
from lightning_sd.callbacks.tables import publish_table
from lightning_sd.core.gates import (
    DROP_KINDS,
    SCALINGS,
    StochasticDepthHandle,
    inject_stochastic_depth,
)
from lightning_sd.core.survival import SURVIVAL_MODES, depth_moments, survival_rates

__all__ = ["StochasticDepth"]

_MEASURED_MODES = ("sensemode", "maxreg")


class StochasticDepth(Callback):
    r"""Stochastic depth for any residual model in a Lightning ``Trainer``, with rates chosen for a budget.

    At ``setup`` (before DDP/FSDP wrap the model) the callback finds every residual branch of the
    LightningModule (torchvision, timm, the package's models or your own, see
    :func:`~lightning_sd.find_residual_branches`) and puts a gate on it. Each training step it draws
    the mask ``delta_l ~ Bernoulli(p_l)`` from its own generator seeded by
    ``(seed, global_step, batch_idx)``, never from the global RNG, so every rank draws the same
    batch mask and a resumed run continues the same mask stream. Validation, test and prediction
    run the deterministic network (``"inverted"``: the plain network; ``"expected"``: branch l
    scaled by p_l). Hayou & Ayed (2021), Eq. (1):
    ``y_l = y_{l-1} + delta_l f_l(y_{l-1})``, budget ``sum_l p_l = budget * L``.

    Args:
        mode: ``"uniform"`` (p_l = budget), ``"linear"`` (Huang et al., exact budget), ``"custom"``
            (``survival=[...]``), ``"sensemode"`` (from loss sensitivities measured at fit start) or
            ``"maxreg"`` (Lemma 2, from regularization terms measured at fit start).
        budget: expected fraction of blocks kept, in (0, 1]. 0.5 trains about twice as fast per
            block with ``drop="batch"``.
        drop: ``"batch"``: one draw per block per step, dropped blocks are not computed.
            ``"sample"``: per-example masks as timm's DropPath, nothing skipped.
        scaling: ``"inverted"`` (m = delta/p in training, plain network in evaluation) or
            ``"expected"`` (m = delta in training, m = p in evaluation).
        blocks: ``None`` (automatic), a regex over block/branch names, or a list of module names.
        survival: explicit rates for ``mode="custom"`` (length L, each in [0, 1]).
        seed: base seed of the mask stream (int >= 0). ``None``: drawn on rank 0 and broadcast.
        p_min: minimum rate of ``"sensemode"``, in [0, budget].
        sensitivity_batches: training batches used to measure sensitivities (``"sensemode"``/``"maxreg"``).
        recompute_every_n_epochs: measure again every n epochs (``"sensemode"``/``"maxreg"``).
        sensitivity_loss: ``(pl_module, batch) -> loss`` used for sensitivities; default: the
            module's ``training_step`` output.
        regularization_loss: loss whose Hessian defines g_l for ``"maxreg"``: ``"cross_entropy"``, ``"mse"`` or
            ``"auto"`` (the module's ``regularization_loss`` attribute, else ``"mse"`` for one output per example
            and ``"cross_entropy"`` for more; :func:`~lightning_sd.callbacks.maxreg_measurement.infer_regularization_loss`).
        log_every_n_steps: how often the realized depth is logged (it is always accumulated).

    Example::

        trainer = Trainer(callbacks=[StochasticDepth(mode="linear", budget=0.5)])
        trainer.fit(model, datamodule=dm)
        callback.survival  # tensor of length L
    """

    def __init__(
        self,
        mode: Literal["uniform", "linear", "custom", "sensemode", "maxreg"] = "uniform",
        budget: float = 0.5,
        drop: Literal["batch", "sample"] = "batch",
        scaling: Literal["inverted", "expected"] = "inverted",
        blocks: str | list[str] | None = None,
        survival: list[float] | None = None,
        seed: int | None = None,
        p_min: float = 0.0,
        sensitivity_batches: int = 8,
        recompute_every_n_epochs: int | None = None,
        sensitivity_loss: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        regularization_loss: Literal["auto", "cross_entropy", "mse"] = "auto",
        log_every_n_steps: int = 1,
    ) -> None:
        if mode not in SURVIVAL_MODES:
            raise ValueError(f"unknown mode={mode!r}; choose one of {', '.join(SURVIVAL_MODES)}")
        if drop not in DROP_KINDS:
            raise ValueError(f"unknown drop={drop!r}; choose 'batch' (skip dropped blocks) or 'sample' (per-example masks)")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling={scaling!r}; choose 'inverted' (timm/torchvision) or 'expected' (Huang et al.)")
        budget = float(budget)
        if mode != "custom" and (math.isnan(budget) or not 0.0 < budget <= 1.0):
            raise ValueError(
                f"budget must be in (0, 1] (the expected fraction of blocks kept), got {budget}; e.g. budget=0.5"
            )
        if mode == "custom":
            if survival is None:
                raise ValueError("mode='custom' needs survival=[p_1, ..., p_L]")
            rates = torch.as_tensor(survival, dtype=torch.float64)
            if not bool(torch.isfinite(rates).all()) or bool((rates < 0).any()) or bool((rates > 1).any()):
                raise ValueError(f"custom survival rates must lie in [0, 1], got {list(survival)}")
            if scaling == "inverted" and bool((rates == 0).any()):
                raise ValueError("a survival rate of 0 with scaling='inverted' divides by zero; use scaling='expected'")
        elif survival is not None:
            raise ValueError(f"survival= is only used with mode='custom' (got mode={mode!r}); drop it or set mode='custom'")
        if seed is not None and (int(seed) != seed or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        if not 0.0 <= p_min <= 1.0 or (mode == "sensemode" and p_min > budget):
            raise ValueError(f"p_min must be in [0, budget] = [0, {budget}], got {p_min}")
        if sensitivity_batches < 1:
            raise ValueError(f"sensitivity_batches must be >= 1, got {sensitivity_batches}")
        if recompute_every_n_epochs is not None:
            if recompute_every_n_epochs < 1:
                raise ValueError(f"recompute_every_n_epochs must be >= 1 or None, got {recompute_every_n_epochs}")
            if mode not in _MEASURED_MODES:
                raise ValueError(
                    f"recompute_every_n_epochs only applies to measured modes {_MEASURED_MODES}, not mode={mode!r}"
                )
        if regularization_loss not in ("auto", "cross_entropy", "mse"):
            raise ValueError(f"regularization_loss must be 'auto', 'cross_entropy' or 'mse', got {regularization_loss!r}")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.mode = mode
        self.budget = budget
        self.drop = drop
        self.scaling = scaling
        self.blocks = blocks
        self.custom_survival = None if survival is None else [float(x) for x in survival]
        self.seed = None if seed is None else int(seed)
        self.p_min = float(p_min)
        self.sensitivity_batches = int(sensitivity_batches)
        self.recompute_every_n_epochs = recompute_every_n_epochs
        self.sensitivity_loss = sensitivity_loss
        self.regularization_loss = regularization_loss
        self.log_every_n_steps = int(log_every_n_steps)
        self.handle: StochasticDepthHandle | None = None
        self.sensitivities: Tensor | None = None
        self.g: Tensor | None = None
        self._measured = False
        self._last_measured_epoch = -1
        self._pending_state: dict[str, Any] | None = None
        self._depth_sum = 0.0
        self._depth_sq_sum = 0.0
        self._depth_count = 0

    # ------------------------------------------------------------------ properties
    @property
    def survival(self) -> Tensor | None:
        """Survival rates p_1..p_L (float32, CPU), available after ``setup``."""
        return None if self.handle is None else self.handle.survival

    @property
    def num_blocks(self) -> int:
        """L, after ``setup``."""
        return 0 if self.handle is None else self.handle.num_blocks

    def _initial_rates(self, num_blocks: int) -> Tensor:
        if self.mode == "custom":
            return survival_rates("custom", num_blocks, rates=self.custom_survival)
        if self.mode in _MEASURED_MODES:
            # Placeholder until the measurement at fit start; satisfies the budget already.
            return survival_rates("uniform", num_blocks, self.budget)
        return survival_rates(self.mode, num_blocks, self.budget)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.handle is not None and not self.handle.removed:
            return
        skip, message = skips_compute_under(trainer.strategy)
        if self.seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed() % 2**63)).item())
            self.seed = int(trainer.strategy.broadcast(seed, src=0))
        self.handle = inject_stochastic_depth(
            pl_module,
            self._initial_rates,
            drop=self.drop,
            scaling=self.scaling,
            blocks=self.blocks,
            seed=self.seed,
            auto_resample=False,
        )
        self.handle.set_rank(trainer.global_rank)
        self.handle.skip_compute = skip
        if message is not None and self.drop == "batch":
            rank_zero_warn(message)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        rank_zero_info(
            f"StochasticDepth: {self.handle.num_blocks} residual branches, mode={self.mode}, budget={self.budget}, "
            f"drop={self.drop}, scaling={self.scaling}, seed={self.seed}"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode in _MEASURED_MODES and not self._measured:
            self._measure(trainer, pl_module)
        self._log_rates(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._depth_sum = self._depth_sq_sum = 0.0
        self._depth_count = 0
        n = self.recompute_every_n_epochs
        if n is not None and trainer.current_epoch > 0 and trainer.current_epoch % n == 0 and self._last_measured_epoch != trainer.current_epoch:
            self._measure(trainer, pl_module)
            self._log_rates(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.handle is not None
        try:
            batch_size: int | None = extract_batch_size(batch)
        except Exception:  # no tensor to read it from: the gates draw at their first call
            batch_size = None
        # One mask per micro-batch: with gradient accumulation the micro-batches of an optimizer step
        # (same global_step, consecutive batch_idx) get independent masks, as separate steps would.
        self.handle.resample(trainer.global_step, batch_idx, batch_size=batch_size, device=pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.handle is not None
        depth = self.handle.realized_depth()
        if math.isnan(depth):
            return
        self._depth_sum += depth
        self._depth_sq_sum += depth * depth
        self._depth_count += 1
        if batch_idx % self.log_every_n_steps == 0:
            pl_module.log("sd/realized_depth", depth, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.handle is None or self._depth_count == 0 or self.drop != "batch":
            return
        mean = self._depth_sum / self._depth_count
        var = max(self._depth_sq_sum / self._depth_count - mean * mean, 0.0) * self._depth_count / max(self._depth_count - 1, 1)
        mean_theory, var_theory = depth_moments(self.handle.survival)
        # Lemma 1: E[L_delta] = sum p, Var[L_delta] = sum p (1 - p).
        pl_module.log_dict(
            {
                "sd/depth_mean": mean,
                "sd/depth_var": var,
                "sd/depth_mean_theory": mean_theory,
                "sd/depth_var_theory": var_theory,
            },
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )

    # ------------------------------------------------------------------ measured modes
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_sd.callbacks.rate_measurement import measure_rates

        assert self.handle is not None
        result = measure_rates(self, trainer, pl_module)
        self.handle.set_survival(result)
        self._measured = True
        self._last_measured_epoch = trainer.current_epoch

    # ------------------------------------------------------------------ logging
    def _log_rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None
        p = self.handle.survival
        mean, var = depth_moments(p)
        metrics = {"sd/expected_depth": mean, "sd/budget": mean / self.handle.num_blocks}
        for l, branch in enumerate(self.handle.branches):
            metrics[f"sd/survival/{l + 1:03d}"] = float(p[l])
            if self.sensitivities is not None:
                metrics[f"sd/sensitivity/{l + 1:03d}"] = float(self.sensitivities[l])
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)  # same on every rank
        self._write_table(trainer)

    def rate_table(self) -> list[dict[str, Any]]:
        """One row per block: ``block`` (1-based), ``name``, ``survival`` and, when measured, ``sensitivity``/``g``."""
        assert self.handle is not None
        rows = []
        p = self.handle.survival
        for l, branch in enumerate(self.handle.branches):
            row: dict[str, Any] = {"block": l + 1, "name": branch.name, "survival": float(p[l])}
            if self.sensitivities is not None:
                row["sensitivity"] = float(self.sensitivities[l])
            if self.g is not None:
                row["g"] = float(self.g[l])
            rows.append(row)
        return rows

    def _write_table(self, trainer: pl.Trainer) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must read it, before the rank-0 check.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        path = os.path.join(log_dir, f"sd_rates_epoch{trainer.current_epoch}.csv")
        publish_table(trainer, path, self.rate_table(), key="sd/rates")
        self.table_path = path

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"mode": self.mode, "budget": self.budget, "seed": self.seed, "drop": self.drop, "scaling": self.scaling}
        if self.handle is not None:
            # float64: masks compare u < p_l and scale by 1/p_l, so a float32 round trip would change them.
            state["survival"] = self.handle.survival_float64.tolist()
            state["branches"] = [b.name for b in self.handle.branches]
        if self.sensitivities is not None:
            state["sensitivities"] = self.sensitivities.tolist()
        if self.g is not None:
            state["g"] = self.g.tolist()
        state["measured"] = self._measured
        state["last_measured_epoch"] = self._last_measured_epoch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.handle is None:
            self._pending_state = dict(state_dict)
            self.seed = state_dict.get("seed", self.seed)
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.handle is not None
        for key in ("mode", "drop", "scaling"):
            if key in state and state[key] != getattr(self, key):
                rank_zero_warn(f"StochasticDepth: checkpoint has {key}={state[key]!r}, this callback {key}={getattr(self, key)!r}; keeping the checkpoint's rates")
        if "branches" in state and state["branches"] != [b.name for b in self.handle.branches]:
            raise RuntimeError(
                "StochasticDepth: the checkpoint's residual branches differ from this model's "
                f"({len(state['branches'])} vs {self.handle.num_blocks}); resume with the same model and blocks="
            )
        if state.get("seed") is not None:
            self.seed = int(state["seed"])
            self.handle.seed = self.seed
        if "survival" in state:
            self.handle.set_survival(state["survival"])
        if state.get("sensitivities") is not None:
            self.sensitivities = torch.tensor(state["sensitivities"], dtype=torch.float32)
        if state.get("g") is not None:
            self.g = torch.tensor(state["g"], dtype=torch.float32)
        self._measured = bool(state.get("measured", self._measured))
        self._last_measured_epoch = int(state.get("last_measured_epoch", self._last_measured_epoch))

    def remove(self) -> None:
        """Take the gates out of the model again (the plain model, same state_dict)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
