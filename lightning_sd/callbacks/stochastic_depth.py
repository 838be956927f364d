"""The StochasticDepth callback: inject gates at setup, draw masks per step, log and checkpoint rates."""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_sd._internals import attached_trainer, loggers_write_this_step
from lightning_sd.callbacks.output import log_epoch_metrics, log_per_block, publish_table
from lightning_sd.callbacks.rate_measurement import RATE_MEASUREMENTS, MeasurementSettings, RateMeasurement
from lightning_sd.callbacks.strategy_support import fills_zero_gradients_after_backward, skips_compute_under
from lightning_sd.core.budget_schedule import DEFAULT_PLD_GAMMA, BudgetSchedule, check_schedule, scheduled_budget
from lightning_sd.core.compilation import compiled_around_gates
from lightning_sd.core.discovery import find_residual_branches
from lightning_sd.core.gates import (
    StochasticDepthHandle,
    existing_handle,
    inject_stochastic_depth,
)
from lightning_sd.core.pruning import PRUNE_BY, PruneBy, check_keep
from lightning_sd.core.regularization import REGULARIZATION_ESTIMATORS
from lightning_sd.core.survival import depth_moments, maxreg_rates, sensemode_rates, survival_rates
from lightning_sd.core.validation import (
    DROP_KINDS,
    SCALINGS,
    SURVIVAL_MODES,
    DropKind,
    Scaling,
    SurvivalMode,
    check_budget,
    check_choice,
    check_inverted_rates,
    check_seed,
    check_unit_interval,
)

__all__ = ["MAX_MULTIPLIER", "StochasticDepth", "default_p_min"]

_MEASURED_MODES = tuple(RATE_MEASUREMENTS)  # ("sensemode", "maxreg")
_POSITIONAL_MODES = ("linear", "custom")  # rates belong to positions 1..L, not to particular branches
#: ``scaling="inverted"`` multiplies a kept branch by 1/p_l; above this factor the callback warns.
MAX_MULTIPLIER = 20.0
#: Batch drop: how many batches' masks the callback draws ahead at once (:meth:`StochasticDepthHandle.prefetch_masks`).
MASKS_DRAWN_AHEAD = 32
_ENDLESS_WARMUP = (
    "StochasticDepth(schedule='warmup') ramps over a fraction of the run's optimizer steps, but this Trainer's number "
    "of steps is unknown (max_epochs=-1 and max_steps=-1, or training data without a length). Set max_steps or "
    "max_epochs, or use schedule='pld' (which needs no end)."
)
# Which callback drives a handle (several Trainers may use one module); weak on both sides.
_OWNERS: weakref.WeakKeyDictionary[StochasticDepthHandle, weakref.ref[StochasticDepth]] = weakref.WeakKeyDictionary()


def default_p_min(mode: str, budget: float, scaling: str) -> float:
    """The floor ``p_min`` used when ``StochasticDepth(p_min=None)``.

    ``min(0.05, budget / 2)`` for the measured modes with ``scaling="inverted"``, else 0.

    Lemma 2 and SenseMode's ``p ~ |S|`` put rates at (or near) 0 for blocks with a small ``g_l``/``S_l``;
    ``"inverted"`` divides by p, so a rate of 0 cannot run and a rate of 0.001 multiplies a kept branch
    by 1000. A floor of 0.05 caps the multiplier at 20 (:data:`MAX_MULTIPLIER`); below a budget of 0.1
    the floor is half the budget, so the measured quantities still decide how the other half is spread
    (a floor equal to the budget would force uniform rates). ``"expected"`` multiplies by
    ``delta`` in {0, 1}: rate 0 is fine there and the floor is the paper's 0.
    """
    if mode in _MEASURED_MODES and scaling == "inverted":
        return min(0.05, float(budget) / 2.0)
    return 0.0


def _shared_batch_size(batch: Any) -> int | None:
    """The first dimension that every tensor of ``batch`` shares, or None (no tensor, or sizes that disagree).

    Lightning's ``extract_batch_size`` returns the first tensor's size and, where the sizes disagree (a
    detector's list of ``(3, H, W)`` images beside its targets), warns the user to pass ``batch_size=`` to
    their own ``self.log``, which would not silence it. Here an ambiguous batch gives None, and the gates
    draw their masks at their first call, where the batch size is known.
    """
    size = None
    stack = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.ndim == 0:
                continue
            if size is None:
                size = item.shape[0]
            elif item.shape[0] != size:
                return None
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in fields(item))
    return size


class StochasticDepth(Callback):
    r"""Stochastic depth for any residual model in a Lightning ``Trainer``, with rates chosen for a budget.

    At ``setup`` (before DDP/FSDP wrap the model) the callback finds every residual branch of the
    LightningModule (torchvision, timm, the package's models or your own, see
    :func:`~lightning_sd.find_residual_branches`) and puts a gate on it. A network built in
    ``configure_model`` (FSDP, ModelParallel) gets its gates right after that hook, still before the
    strategy wraps it. A module that already carries gates (a second ``Trainer`` on the same module, or
    gates put by :func:`~lightning_sd.inject_stochastic_depth`) is taken over: this callback's mode,
    rates, seed, drop and scaling replace the previous ones and the previous callback is detached
    (its ``handle`` becomes ``None``). ``validate``/``test``/``predict`` need no gates with
    ``scaling="inverted"`` (the plain network): on a module without gates the callback then does nothing.

    Each training step it draws the mask ``delta_l ~ Bernoulli(p_l)`` from its own generator seeded by
    ``(seed, global_step, batch_idx)``, never from the global RNG, so every rank draws the same
    batch mask and a resumed run continues the same mask stream. Validation, test and prediction
    run the deterministic network (``"inverted"``: the plain network; ``"expected"``: branch l
    scaled by p_l). Hayou & Ayed (2021), Eq. (1):
    ``y_l = y_{l-1} + delta_l f_l(y_{l-1})``, budget ``sum_l p_l = budget * L``.

    A block dropped for the whole batch (``drop="batch"``) is not computed, and its parameters get an
    exact zero gradient (momentum and weight decay act on them as with timm's ``DropPath``): under DDP
    from a node in the autograd graph (the reducer needs every gradient inside the backward), on one
    device with automatic optimization in ``on_after_backward`` (cheaper; before gradient clipping and
    the optimizer step).

    Blocks are numbered in the order the forward **calls** them: at the first training step the
    callback records the order in which the gates run; when it differs from the order the modules are
    defined in, the blocks are renumbered (a warning lists the call order), position-based rates
    (``"linear"``, ``"custom"``) follow the call order from that very first step on, and measured rates
    stay with the branch they were measured on.

    Args:
        mode: ``"uniform"`` (p_l = budget), ``"linear"`` (Huang et al., exact budget), ``"custom"``
            (``survival=[...]``), ``"sensemode"`` (from loss sensitivities) or ``"maxreg"`` (Lemma 2,
            from regularization terms); the last two measure at train start or after
            ``measure_after_steps`` steps.
        budget: expected fraction of blocks kept, in (0, 1]. 0.5 trains about twice as fast per
            block with ``drop="batch"``.
        drop: ``"batch"``: one draw per block per step, dropped blocks are not computed.
            ``"sample"``: per-example masks as timm's DropPath, nothing skipped. ``"subset"``: each block
            runs on ``max(1, round(p_l B))`` random examples (DINOv2), the others skip it.
        scaling: ``"inverted"`` (m = delta/p in training, plain network in evaluation) or
            ``"expected"`` (m = delta in training, m = p in evaluation).
        blocks: ``None`` (automatic), a regex over block/branch names, or a list of module names.
        strict: raise at setup (before the model is touched) instead of warning when discovery leaves
            drop-path slots or residual-looking modules of the model uncovered (see "How blocks are found").
        survival: explicit rates for ``mode="custom"`` (length L, each in [0, 1]).
        seed: base seed of the mask stream (int >= 0). ``None``: ``torch.initial_seed() % 2**31`` on
            rank 0, broadcast to every rank. That is the seed the global generator was last seeded with
            (``seed_everything(s)`` gives ``s``): reading it consumes nothing, so the callback leaves the
            global RNG stream (data shuffling, dropout, augmentation) exactly as it was, and two runs
            after ``seed_everything`` draw the same masks. Without any seeding it is the process's random
            start seed (different runs, different masks, as the unseeded global RNG).
        p_min: smallest rate of ``"sensemode"`` and ``"maxreg"``, in [0, budget], solved together with the
            budget. ``None``: :func:`default_p_min` (``min(0.05, budget / 2)`` with ``"inverted"``, 0 with
            ``"expected"``). Other modes take no floor.
        sensitivity_batches: training batches used to measure sensitivities (``"sensemode"``/``"maxreg"``).
        recompute_every_n_epochs: measure again every n epochs (``"sensemode"``/``"maxreg"``).
        measure_after_steps: measure after this many optimizer steps instead of at train start
            (``"sensemode"``/``"maxreg"``, int >= 0); until then the rates are uniform at the budget. For
            networks whose branches output zero at initialization (zero-initialised last BatchNorm of each
            block): every ``S_l`` and ``g_l`` is 0 there, and SenseMode cannot rank the blocks.
        sensitivity_loss: ``(pl_module, batch) -> loss`` used for sensitivities; default: the
            module's ``training_step`` output.
        regularization_loss: loss whose Hessian defines g_l for ``"maxreg"``: ``"cross_entropy"``, ``"mse"`` or
            ``"auto"`` (the module's ``regularization_loss`` attribute, else ``"mse"`` for one output per example
            and ``"cross_entropy"`` for more; :func:`~lightning_sd.callbacks.probing.infer_regularization_loss`).
        input_fn: ``batch -> model input`` for ``"maxreg"``'s g_l; ``None``:
            :func:`~lightning_sd.callbacks.probe_data.default_input_fn` (``batch[0]`` of tuples, known keys of dicts).
        regularization_estimator: how ``"maxreg"`` computes g_l on a model without BatchNorm: ``"exact"``,
            ``"sampled"`` or ``"auto"`` (see :func:`~lightning_sd.core.regularization.regularization_terms`).
        log_every_n_steps: how often the realized depth is logged (it is always accumulated): every
            ``log_every_n_steps``-th batch among the steps the Trainer's loggers write
            (``Trainer(log_every_n_steps=...)``); not at all without a logger.
        schedule: how the budget moves over the optimizer steps t (:mod:`lightning_sd.core.budget_schedule`):
            ``"constant"`` (``b(t) = budget``), ``"warmup"`` (``b`` falls linearly from 1 to ``budget`` over
            the first ``warmup_fraction`` of ``trainer.estimated_stepping_batches``, Composer's
            ``drop_warmup``) or ``"pld"`` (Progressive Layer Dropping, Zhang & He 2020:
            ``b(t) = (1 - budget) exp(-pld_gamma t) + budget``). At every step the rates are the mode's
            rates for ``b(t)`` (``sum_l p_l = b(t) L``), re-solved from the stored measurements for
            ``"sensemode"``/``"maxreg"``; ``"custom"`` rates are fixed and take no schedule. ``b(t)`` is
            logged per step as ``sd/budget``.
        warmup_fraction: ``schedule="warmup"``: fraction of the training steps the ramp lasts, in [0, 1].
        pld_gamma: ``schedule="pld"``: decay per optimizer step, > 0 (DeepSpeed's default 0.001).
        compile: compile each residual branch as its own region after injection
            (:meth:`~lightning_sd.core.gates.StochasticDepthHandle.compile`): ``True`` with
            ``torch.compile``'s defaults, or a dict of its keyword arguments (``{"mode": "max-autotune"}``).
            Identical blocks share one compiled graph, the skip decision stays eager, and neither the masks
            nor the rates recompile. A model compiled by the user (``torch.compile(model)``) needs nothing
            here: see :mod:`lightning_sd.core.compilation`. At train start the callback says, for a model
            compiled whole, what batch drop costs there (``torch.cond`` recomputes the kept blocks), and warns
            when ``compile=`` is given too: Dynamo then inlines the regions into the model's graph.

    With ``scaling="inverted"`` the callback warns whenever a rate gives a multiplier
    ``1/p_l > 20`` (:data:`MAX_MULTIPLIER`, ``p_l < 0.05``).

    Logged: ``sd/realized_depth`` and ``sd/budget`` (``b(t)`` of the schedule) on step; at every training
    epoch end ``sd/expected_depth``, ``sd/depth_mean``/``var`` with their ``_theory`` twins (Lemma 1), and per block
    ``sd/survival/<l>`` and, when measured, ``sd/sensitivity/<l>`` (l = 001 ..); a table
    ``sd_rates_epoch{E}.csv`` in the log directory whenever the rates change (:meth:`rate_table`). On a
    ``TensorBoardLogger`` the per-block values are one histogram (``sd/survival``, ``sd/sensitivity``)
    and one image (``sd/survival_by_block``, ...) per epoch instead of L scalar charts, and the table
    is markdown text ``sd/rates`` (:func:`~lightning_sd.callbacks.output.log_per_block`).

    The measured modes are measured by ``RATE_MEASUREMENTS[mode]`` of
    :mod:`lightning_sd.callbacks.rate_measurement`, chosen once here; the callback keeps what they found:
    :attr:`sensitivities` (``S_l``, ``"sensemode"``) or :attr:`regularization_terms` (``g_l``,
    ``"maxreg"``; ``g`` is its deprecated alias), both float32 in call order and checkpointed.

    Example::

        sd = StochasticDepth(mode="linear", budget=0.5)
        trainer = Trainer(callbacks=[sd])
        trainer.fit(model, datamodule=dm)
        sd.survival      # tensor of length L: p_1..p_L
        sd.rate_table()  # one row per block
    """

    def __init__(
        self,
        mode: SurvivalMode = "uniform",
        budget: float = 0.5,
        drop: DropKind = "batch",
        scaling: Scaling = "inverted",
        blocks: str | list[str] | None = None,
        strict: bool = False,
        survival: list[float] | None = None,
        seed: int | None = None,
        p_min: float | None = None,
        sensitivity_batches: int = 8,
        recompute_every_n_epochs: int | None = None,
        measure_after_steps: int = 0,
        sensitivity_loss: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        regularization_loss: Literal["auto", "cross_entropy", "mse"] = "auto",
        log_every_n_steps: int = 1,
        input_fn: Callable[[Any], Tensor] | None = None,
        regularization_estimator: Literal["auto", "exact", "sampled"] = "auto",
        schedule: BudgetSchedule = "constant",
        warmup_fraction: float = 0.1,
        pld_gamma: float = DEFAULT_PLD_GAMMA,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        check_choice("mode", mode, SURVIVAL_MODES)
        warmup_fraction, pld_gamma = check_schedule(schedule, warmup_fraction, pld_gamma)
        if mode == "custom" and schedule != "constant":
            raise ValueError(
                f"mode='custom' fixes every rate, so there is no budget for schedule={schedule!r} to move; use "
                "schedule='constant' with mode='custom', or a mode that solves rates for a budget "
                "('uniform', 'linear', 'sensemode', 'maxreg') with the schedule"
            )
        check_choice("drop", drop, DROP_KINDS)
        check_choice("scaling", scaling, SCALINGS)
        budget = float(budget) if mode == "custom" else check_budget(budget)
        if mode == "custom":
            if survival is None:
                raise ValueError("mode='custom' needs survival=[p_1, ..., p_L]")
            rates = torch.as_tensor(survival, dtype=torch.float64)
            check_unit_interval(rates, "custom survival rates")
            check_inverted_rates(rates, scaling)
        elif survival is not None:
            raise ValueError(f"survival= is only used with mode='custom' (got mode={mode!r}); drop it or set mode='custom'")
        if seed is not None:
            check_seed(seed)
        if p_min is None:
            p_min = default_p_min(mode, budget, scaling)
        elif mode not in _MEASURED_MODES:
            if p_min != 0:
                raise ValueError(
                    f"p_min is the floor of the measured modes 'sensemode' and 'maxreg'; mode={mode!r} takes none. "
                    "Drop p_min or use mode='sensemode'/'maxreg'."
                )
        elif math.isnan(p_min) or not 0.0 <= p_min <= budget:
            raise ValueError(
                f"p_min must be in [0, budget] = [0, {budget}], got {p_min}; the default p_min=None gives "
                f"{default_p_min(mode, budget, scaling)} here"
            )
        if sensitivity_batches < 1:
            raise ValueError(f"sensitivity_batches must be >= 1, got {sensitivity_batches}")
        if recompute_every_n_epochs is not None:
            if recompute_every_n_epochs < 1:
                raise ValueError(f"recompute_every_n_epochs must be >= 1 or None, got {recompute_every_n_epochs}")
            if mode not in _MEASURED_MODES:
                raise ValueError(
                    f"recompute_every_n_epochs only applies to measured modes {_MEASURED_MODES}, not mode={mode!r}"
                )
        if int(measure_after_steps) != measure_after_steps or measure_after_steps < 0:
            raise ValueError(f"measure_after_steps must be an integer >= 0, got {measure_after_steps!r}")
        if measure_after_steps > 0 and mode not in _MEASURED_MODES:
            raise ValueError(
                f"measure_after_steps only applies to measured modes {_MEASURED_MODES}, not mode={mode!r}; drop it"
            )
        if regularization_loss not in ("auto", "cross_entropy", "mse"):
            raise ValueError(f"regularization_loss must be 'auto', 'cross_entropy' or 'mse', got {regularization_loss!r}")
        if regularization_estimator not in REGULARIZATION_ESTIMATORS:
            raise ValueError(
                f"regularization_estimator must be one of {', '.join(REGULARIZATION_ESTIMATORS)}, got {regularization_estimator!r}"
            )
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if not isinstance(compile, (bool, dict)) or (isinstance(compile, dict) and not all(isinstance(k, str) for k in compile)):
            raise ValueError(
                f"compile must be True/False or a dict of torch.compile keyword arguments, got {compile!r}; "
                "e.g. compile=True or compile={'mode': 'max-autotune'}"
            )
        self.mode = mode
        self.budget = budget
        self.drop = drop
        self.scaling = scaling
        self.blocks = blocks
        self.strict = bool(strict)
        self.custom_survival = None if survival is None else [float(x) for x in survival]
        self.seed = None if seed is None else int(seed)
        self._seed_source = "argument" if seed is not None else None
        self.p_min = float(p_min)
        self.sensitivity_batches = int(sensitivity_batches)
        self.recompute_every_n_epochs = recompute_every_n_epochs
        self.measure_after_steps = int(measure_after_steps)
        self.sensitivity_loss = sensitivity_loss
        self.regularization_loss = regularization_loss
        self.regularization_loss_used: str | None = None  # what "auto" resolved to, set by the maxreg measurement
        self.input_fn = input_fn
        self.regularization_estimator = regularization_estimator
        self.log_every_n_steps = int(log_every_n_steps)
        self.schedule = schedule
        self.warmup_fraction = warmup_fraction
        self.pld_gamma = pld_gamma
        #: T of the schedule: the run's optimizer steps (``"warmup"``), set at train start or from a checkpoint.
        self.schedule_total_steps: int | None = None
        #: b(t) of the current training step (the budget the rates in force were solved for).
        self.current_budget: float = float(budget)
        self._solved_for: tuple[float, int | None] | None = None  # (b, measured at step) of the rates in force
        self.compile = compile if isinstance(compile, bool) else dict(compile)
        self.handle: StochasticDepthHandle | None = None
        self.table_path: str | None = None  # the last rate table written (rank 0)
        #: S_l of the last ``"sensemode"`` measurement (float32, CPU, call order), checkpointed.
        self.sensitivities: Tensor | None = None
        #: g_l of the last ``"maxreg"`` measurement (float32, CPU, call order), checkpointed as ``"g"``.
        self.regularization_terms: Tensor | None = None
        # The measurement of a measured mode, chosen once (RATE_MEASUREMENTS: name -> function).
        self._rate_measurement = RATE_MEASUREMENTS.get(mode)
        self._measured = False
        self._measured_at_step: int | None = None
        self._last_measured_epoch = -1
        self._pending_state: dict[str, Any] | None = None
        self._depth_sum = 0.0
        self._depth_sq_sum = 0.0
        self._depth_count = 0
        self._order_checked = False
        self._order_probe: _CallOrderProbe | None = None
        self._rates_changed = True
        self._drawn_ahead = range(0)  # the batch indices of this epoch whose masks were drawn ahead

    # ------------------------------------------------------------------ properties
    @property
    def survival(self) -> Tensor | None:
        """Survival rates p_1..p_L (float32, CPU, call order), available after ``setup``."""
        return None if self.handle is None else self.handle.survival

    @property
    def num_blocks(self) -> int:
        """L, after ``setup``."""
        return 0 if self.handle is None else self.handle.num_blocks

    @property
    def g(self) -> Tensor | None:
        """Deprecated alias of :attr:`regularization_terms` (the g_l measured by ``mode="maxreg"``)."""
        rank_zero_deprecation("StochasticDepth.g is deprecated; use StochasticDepth.regularization_terms (the same g_l)")
        return self.regularization_terms

    @g.setter
    def g(self, value: Tensor | None) -> None:
        rank_zero_deprecation("StochasticDepth.g is deprecated; use StochasticDepth.regularization_terms (the same g_l)")
        self.regularization_terms = value

    @property
    def measurement_settings(self) -> MeasurementSettings:
        """What the measured modes take from this callback's arguments (see :mod:`~lightning_sd.callbacks.rate_measurement`)."""
        return MeasurementSettings(
            budget=self.budget,
            p_min=self.p_min,
            num_batches=self.sensitivity_batches,
            sensitivity_loss=self.sensitivity_loss,
            regularization_loss=self.regularization_loss,
            input_fn=self.input_fn,
            estimator=self.regularization_estimator,
        )

    def _initial_rates(self, num_blocks: int) -> Tensor:
        return self._mode_rates(num_blocks, self.budget, measured=False)

    def _mode_rates(self, num_blocks: int, budget: float, measured: bool) -> Tensor:
        """This mode's rates for ``budget``; the measured modes from their stored measurement when ``measured``."""
        if self.mode == "custom":
            return survival_rates("custom", num_blocks, rates=self.custom_survival)
        if measured and self.mode == "sensemode" and self.sensitivities is not None:
            return sensemode_rates(num_blocks, budget, self.sensitivities, self.p_min)
        if measured and self.mode == "maxreg" and self.regularization_terms is not None:
            return maxreg_rates(num_blocks, budget, self.regularization_terms, self.p_min)
        if self.mode in _MEASURED_MODES:
            # Placeholder until the measurement; satisfies the budget already.
            return survival_rates("uniform", num_blocks, budget)
        return survival_rates(self.mode, num_blocks, budget)

    def effective_settings(self) -> dict[str, Any]:
        """What the run actually uses (after ``setup``): the values printed in the startup line.

        Keys: ``num_blocks``, ``mode`` (the configured mode), ``rates`` (where the rates in force come
        from: the mode, ``"uniform until measured"``, or ``"uniform (every measured S_l/g_l is 0)"`` when
        a measured mode found nothing to rank), ``budget``, ``drop``, ``scaling``, ``seed``,
        ``seed_source`` (``"argument"``, ``"checkpoint"`` or ``"torch.initial_seed()"``), ``p_min``,
        ``max_multiplier`` (``max 1/p_l`` with ``"inverted"``, else 1), ``schedule``, ``compile`` (the argument), and for the
        measured modes
        ``measure`` (when), ``measure_batches`` and ``measure_loss`` (what is differentiated).
        """
        rates: str = self.mode
        if self.mode in _MEASURED_MODES:
            measured = self.sensitivities if self.mode == "sensemode" else self.regularization_terms
            if not self._measured:
                rates = "uniform until measured"
            elif measured is not None and not bool(measured.any()):
                rates = f"uniform (every measured {'S_l' if self.mode == 'sensemode' else 'g_l'} is 0)"
        p = None if self.handle is None else self.handle.survival_float64
        out: dict[str, Any] = {
            "num_blocks": self.num_blocks,
            "mode": self.mode,
            "rates": rates,
            "budget": self.budget,
            "drop": self.drop,
            "scaling": self.scaling,
            "seed": self.seed,
            "seed_source": self._seed_source,
            "p_min": self.p_min,
            "max_multiplier": _max_multiplier(p, self.scaling),
            "schedule": self.schedule,
            "compile": self.compile,
        }
        if self.mode in _MEASURED_MODES:
            out["measure"] = (
                "at train start" if self.measure_after_steps == 0 else f"after {self.measure_after_steps} training steps"
            )
            out["measure_batches"] = self.sensitivity_batches
            if self.mode == "sensemode":
                out["measure_loss"] = "sensitivity_loss" if self.sensitivity_loss is not None else "training_step loss"
            else:
                loss = self.regularization_loss_used or self.regularization_loss
                out["measure_loss"] = f"{loss} Hessian"
        return out

    def _settings_line(self) -> str:
        s = self.effective_settings()
        line = (
            f"StochasticDepth: {s['num_blocks']} residual branches, mode={s['mode']}, rates={s['rates']}, "
            f"budget={s['budget']}, drop={s['drop']}, scaling={s['scaling']}, seed={s['seed']} "
            f"(from {s['seed_source']}), p_min={s['p_min']:g}, max multiplier 1/p={s['max_multiplier']:.3g}"
        )
        if "measure" in s:
            line += f", measured {s['measure']} on {s['measure_batches']} training batches ({s['measure_loss']})"
        if self.schedule == "warmup":
            line += f", schedule=warmup (budget from 1 to {self.budget} over the first {self.warmup_fraction:g} of the steps)"
        elif self.schedule == "pld":
            line += f", schedule=pld (b(t) = (1 - {self.budget}) exp(-{self.pld_gamma:g} t) + {self.budget})"
        if s["compile"] is not False:
            line += f", branches compiled as regions ({'torch.compile defaults' if s['compile'] is True else s['compile']})"
        return line

    # ------------------------------------------------------------------ attaching the gates
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.schedule == "warmup" and stage == "fit" and trainer.max_steps == -1 and trainer.max_epochs == -1:
            raise ValueError(_ENDLESS_WARMUP)  # before the model is touched
        existing = existing_handle(pl_module)
        if self.handle is not None and self.handle is existing:
            # Same gates (fit then test, or this callback in a new Trainer): follow this Trainer's strategy.
            self._follow_strategy(trainer, pl_module)
            return
        self.handle = None
        skips_compute_under(trainer.strategy)  # unsupported strategies fail here, before anything changes
        if self.seed is None:
            # Reads, never draws: the global RNG stream stays exactly as without the callback.
            self.seed = int(trainer.strategy.broadcast(torch.initial_seed() % 2**31, src=0))
            self._seed_source = "torch.initial_seed()"
        if existing is None and stage != "fit" and self.scaling == "inverted":
            return  # evaluation with "inverted" is the plain network: nothing to put in
        if existing is None and is_overridden("configure_model", pl_module) and not _has_branches(pl_module, self.blocks):
            self._attach_after_configure_model(trainer, pl_module)
            return
        self._attach(trainer, pl_module)

    def _attach_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The network is built in ``configure_model``: inject right after it, before the strategy wraps it.

        Lightning 2.6 ``Trainer._run``: setup hooks, ``configure_model`` (inside the strategy's
        init contexts), checkpoint restore, ``strategy.setup`` (DDP/FSDP/DeepSpeed wrapping). No callback
        hook runs between the last two, so the module's own ``configure_model`` is wrapped once.
        """
        original = pl_module.configure_model

        @functools.wraps(original)
        def configure_model_then_inject() -> None:
            try:
                original()
            finally:
                pl_module.__dict__.pop("configure_model", None)
            # configure_model runs under the strategy's init contexts (default device cuda/meta, default
            # dtype of "*-true" precision); the gates' masks and rates are CPU float tensors.
            dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
            try:
                with torch.device("cpu"):
                    self._attach(trainer, pl_module)
            finally:
                torch.set_default_dtype(dtype)

        pl_module.__dict__["configure_model"] = configure_model_then_inject

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _, message = skips_compute_under(trainer.strategy)
        assert self.seed is not None
        existing = existing_handle(pl_module)
        if existing is not None:
            owner_ref = _OWNERS.get(existing)
            owner = owner_ref() if owner_ref is not None else None
            if owner is not None and owner is not self:
                owner._detach()
            if self.blocks is not None:
                existing.remove()  # this callback chooses its own branches
                existing = None
        if existing is None:
            self.handle = inject_stochastic_depth(
                pl_module,
                self._initial_rates,
                drop=self.drop,
                scaling=self.scaling,
                blocks=self.blocks,
                strict=self.strict,
                seed=self.seed,
                auto_resample=False,
            )
        else:
            existing.reconfigure(self._initial_rates, drop=self.drop, scaling=self.scaling, seed=self.seed, auto_resample=False)
            self.handle = existing
        _OWNERS[self.handle] = weakref.ref(self)
        if self.compile is not False:
            self.handle.compile(**({} if self.compile is True else self.compile))
        self._follow_strategy(trainer, pl_module)
        # A schedule starting at budget 1 lowers the rates at its second step: a compiled model then
        # takes the torch.cond graph from the start instead of compiling a second variant.
        self.handle.specialize_full_depth = self.schedule == "constant" or self.budget == 1.0
        if message is not None and self.drop == "batch":
            rank_zero_warn(message)
        self._order_checked = False
        self._rates_changed = True
        self._drawn_ahead = range(0)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        rank_zero_info(self._settings_line())
        self._warn_large_multiplier()

    def _follow_strategy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the gates for this Trainer's strategy: rank, skipping or masking, where zero gradients come from.

        The zeros come in ``on_after_backward`` only on one device with automatic optimization: a manual
        ``training_step`` may call ``loss.backward()`` itself, which no hook follows.
        """
        assert self.handle is not None
        self.handle.set_rank(trainer.global_rank)
        self.handle.skip_compute = skips_compute_under(trainer.strategy)[0]
        self.handle.zero_gradients_in_graph = not (
            fills_zero_gradients_after_backward(trainer.strategy) and pl_module.automatic_optimization
        )

    def _detach(self) -> None:
        """Another StochasticDepth took over this callback's gates."""
        if self._order_probe is not None:
            self._order_probe.remove()
            self._order_probe = None
        self.handle = None

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule == "warmup" and self.schedule_total_steps is None:
            total = trainer.estimated_stepping_batches
            if math.isinf(total):  # e.g. an iterable dataset without a length and no max_steps
                raise ValueError(_ENDLESS_WARMUP)
            self.schedule_total_steps = int(total)
        if self.mode in _MEASURED_MODES and not self._measured and trainer.global_step >= self.measure_after_steps:
            self._measure(trainer, pl_module)
        self._say_how_compiled(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._depth_sum = self._depth_sq_sum = 0.0
        self._depth_count = 0
        n = self.recompute_every_n_epochs
        if (
            n is not None
            and self._measured
            and trainer.current_epoch > 0
            and trainer.current_epoch % n == 0
            and self._last_measured_epoch != trainer.current_epoch
        ):
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.handle is not None
        if self.mode in _MEASURED_MODES and not self._measured and trainer.global_step >= self.measure_after_steps:
            self._measure(trainer, pl_module)
        self._follow_schedule(trainer.global_step)
        # Per-example masks are drawn here when the batch size is known (None: at the gates' first call);
        # batch drop draws one flag per block, whatever the batch.
        batch_size = None if self.handle.drop_kind.skips_compute else _shared_batch_size(batch)
        # One mask per micro-batch: with gradient accumulation the micro-batches of an optimizer step
        # (same global_step, consecutive batch_idx) get independent masks, as separate steps would.
        self.handle._draw(trainer.global_step, batch_idx, batch_size=batch_size, device=pl_module.device)
        if batch_idx + 1 not in self._drawn_ahead:
            self._draw_ahead(trainer, pl_module, batch_idx)
        if not self._order_checked and self._order_probe is None:
            self._order_probe = _CallOrderProbe(self.handle, positional=self.mode in _POSITIONAL_MODES)

    def _draw_ahead(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """Draw the uniforms of the next :data:`MASKS_DRAWN_AHEAD` batches' masks in one loop (batch drop).

        Their keys follow Lightning's loop under automatic optimization, where an optimizer step ends each
        cycle of ``a = accumulate_grad_batches`` batches: batch ``batch_idx + j`` of this epoch trains at
        ``global_step + (batch_idx % a + j) // a``. A key that does not come costs its draw only; manual
        optimization, whose steps cannot be predicted, draws at each step.
        """
        assert self.handle is not None
        ahead = MASKS_DRAWN_AHEAD
        if math.isfinite(trainer.num_training_batches):
            ahead = min(ahead, int(trainer.num_training_batches) - batch_idx - 1)
        self._drawn_ahead = range(batch_idx + 1, batch_idx + 1 + ahead)
        if ahead <= 0 or not (pl_module.automatic_optimization and self.handle.drop_kind.skips_compute):
            return
        if min(self.handle._p) >= 1.0:
            return  # every rate 1: no draws to save (see BatchDrop._draw_step)
        accumulate = trainer.accumulate_grad_batches
        cycle = batch_idx % accumulate
        keys = [(trainer.global_step + (cycle + j) // accumulate, batch_idx + j) for j in range(1, ahead + 1)]
        self.handle.prefetch_masks(keys)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # On one device the skipped blocks' zero gradients come here, before clipping and the optimizer step.
        if self.handle is not None and not self.handle.zero_gradients_in_graph:
            self.handle.fill_zero_gradients()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.handle is not None:
            self.handle.zero_gradients_in_graph = True  # the gates outlive the fit: a plain loop gets the node

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.handle is not None
        if self._order_probe is not None:
            self._finish_order_check()
        writes = loggers_write_this_step(trainer)  # a self.log costs ~1 ms: only on the steps loggers write
        if writes:
            pl_module.log("sd/budget", self.current_budget, on_step=True, on_epoch=False, batch_size=1)
        depth = self.handle.realized_depth()
        if math.isnan(depth):
            return
        self._depth_sum += depth
        self._depth_sq_sum += depth * depth
        self._depth_count += 1
        if batch_idx % self.log_every_n_steps == 0 and writes:
            pl_module.log("sd/realized_depth", depth, on_step=True, on_epoch=False, batch_size=1)  # a step value: no weighting

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.handle is None:
            return
        self._log_rates(trainer, pl_module)
        if self._depth_count == 0 or self.drop != "batch":
            return
        mean = self._depth_sum / self._depth_count
        var = max(self._depth_sq_sum / self._depth_count - mean * mean, 0.0) * self._depth_count / max(self._depth_count - 1, 1)
        mean_theory, var_theory = depth_moments(self.handle.survival)
        # Lemma 1: E[L_delta] = sum p, Var[L_delta] = sum p (1 - p).
        log_epoch_metrics(
            pl_module,
            {
                "sd/depth_mean": mean,
                "sd/depth_var": var,
                "sd/depth_mean_theory": mean_theory,
                "sd/depth_var_theory": var_theory,
            },
        )

    # ------------------------------------------------------------------ budget schedule
    def budget_at(self, step: int) -> float:
        """``b(t)`` of this callback's schedule at optimizer step ``step`` (``"warmup"``: after train start)."""
        if self.schedule == "warmup" and self.schedule_total_steps is None:
            raise RuntimeError("schedule='warmup' knows its total steps from on_train_start on (trainer.estimated_stepping_batches)")
        return scheduled_budget(
            self.schedule,
            self.budget,
            step,
            total_steps=self.schedule_total_steps,
            warmup_fraction=self.warmup_fraction,
            pld_gamma=self.pld_gamma,
        )

    def rates_for_budget(self, budget: float) -> Tensor:
        """This mode's rates for ``budget`` (float64, call order), from the stored measurements where measured.

        ``"uniform"``/``"linear"``: the formula; ``"sensemode"``/``"maxreg"``: :func:`sensemode_rates` /
        :func:`maxreg_rates` of the stored ``S_l``/``g_l`` with this callback's ``p_min`` (uniform until measured).
        """
        assert self.handle is not None
        return self._mode_rates(self.handle.num_blocks, budget, measured=self._measured)

    def _follow_schedule(self, step: int) -> None:
        """Set the rates of step ``step``: the mode's rates for ``b(step)`` (re-solved when b or the measurement changed)."""
        assert self.handle is not None
        if self.schedule == "constant":
            self.current_budget = self.budget
            return
        budget = self.budget_at(step)
        self.current_budget = budget
        key = (budget, self._measured_at_step)
        if key == self._solved_for:
            return
        self.handle.set_survival(self.rates_for_budget(budget))
        self._solved_for = key

    # ------------------------------------------------------------------ depth on demand
    def prune(self, keep: float, by: PruneBy = "sensitivity") -> list[int]:
        """Run evaluation with ``round(keep * L)`` blocks; the others reduce to their shortcut. Returns the kept blocks.

        ``by``: ``"sensitivity"`` (largest ``|S_l|`` of the evaluation network, see
        :meth:`pruning_sensitivities`), ``"survival"`` (highest ``p_l``), ``"every_other"`` or ``"last"``
        (:mod:`lightning_sd.core.pruning`). Training is unchanged; :meth:`unprune` restores. After ``fit``,
        :func:`lightning_sd.export_pruned` turns the pruned module into a smaller plain one.

        Args:
            keep: fraction of the blocks kept, in (0, 1].
            by: how the kept blocks are chosen.
        """
        check_keep(keep)
        check_choice("by", by, PRUNE_BY)
        if self.handle is None:
            raise RuntimeError("StochasticDepth.prune needs the gates the callback puts in at setup (after fit starts)")
        sensitivities = self.pruning_sensitivities() if by == "sensitivity" else None
        return self.handle.prune(keep, by, sensitivities=sensitivities)

    def unprune(self) -> None:
        """Every block runs in evaluation again (undoes :meth:`prune`)."""
        if self.handle is not None:
            self.handle.unprune()

    def pruning_sensitivities(self, num_batches: int | None = None) -> Tensor:
        """``S_l`` for pruning by sensitivity (float32, call order).

        This run's SenseMode measurement when it was taken at the current step, else measured now on
        ``num_batches`` (default ``sensitivity_batches``) validation batches of the evaluation network
        (:func:`~lightning_sd.callbacks.depth_on_demand.evaluation_sensitivities_on_validation`).
        """
        if self.handle is None:
            raise RuntimeError("StochasticDepth has no gates yet: prune after setup (e.g. after fit)")
        pl_module = self.handle.model
        trainer = attached_trainer(pl_module)
        if trainer is None:
            raise RuntimeError(
                "by='sensitivity' measures S_l on the Trainer's validation data, but the module is not attached to a Trainer; "
                "use handle.prune(keep, by='sensitivity', sensitivities=S or batches=, loss_fn=) instead"
            )
        if self.mode == "sensemode" and self.sensitivities is not None and self._measured_at_step == trainer.global_step:
            return self.sensitivities
        from lightning_sd.callbacks.depth_on_demand import evaluation_sensitivities_on_validation

        batches = self.sensitivity_batches if num_batches is None else int(num_batches)
        return evaluation_sensitivities_on_validation(trainer, pl_module, batches, self.sensitivity_loss)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ call order
    def _finish_order_check(self) -> None:
        assert self.handle is not None and self._order_probe is not None
        probe, self._order_probe = self._order_probe, None
        probe.remove()
        order = probe.order()
        if order is None:  # no training-mode gate call in this step (e.g. all under override): try again
            return
        self._order_checked = True
        if order == list(range(self.handle.num_blocks)):
            return
        defined = [b.name for b in self.handle.branches]
        probe.finish_reorder()
        if self.sensitivities is not None:
            self.sensitivities = self.sensitivities[order].clone()
        if self.regularization_terms is not None:
            self.regularization_terms = self.regularization_terms[order].clone()
        self._rates_changed = True
        follow = (
            f"mode={self.mode!r} rates follow the call order (the first step already used them)"
            if self.mode in _POSITIONAL_MODES
            else "rates stay with their branch"
        )
        rank_zero_warn(
            "StochasticDepth: the forward calls the residual branches in another order than the modules are "
            f"defined; blocks are now numbered in call order ({follow}). Call order: "
            f"{[b.name for b in self.handle.branches]}; definition order: {defined}."
        )

    # ------------------------------------------------------------------ measured modes
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None and self._rate_measurement is not None
        result = self._rate_measurement(trainer, pl_module, self.measurement_settings)
        self._keep_measured(result)
        rates = torch.as_tensor(result.rates, dtype=torch.float64)
        if self.scaling == "inverted" and bool((rates == 0).any()):
            zero = torch.nonzero(rates == 0).flatten().tolist()
            raise ValueError(
                f"StochasticDepth(mode={self.mode!r}, p_min={self.p_min}) gave survival rate 0 to blocks {zero}, which "
                "scaling='inverted' cannot use (m = delta/p). Use the default p_min=None "
                f"(= {default_p_min(self.mode, self.budget, self.scaling)} here) or any p_min > 0, or scaling='expected'."
            )
        self.handle.set_survival(rates)
        self._measured = True
        self._measured_at_step = trainer.global_step
        self._last_measured_epoch = trainer.current_epoch
        self._rates_changed = True
        p = self.handle.survival_float64
        rank_zero_info(
            f"StochasticDepth: {self.mode} rates measured at step {trainer.global_step} (rates={self.effective_settings()['rates']}): "
            f"min {float(p.min()):.4f}, max {float(p.max()):.4f}, sum {float(p.sum()):.4f} = {self.budget} x {self.handle.num_blocks}"
        )
        self._warn_large_multiplier()

    def _keep_measured(self, result: RateMeasurement) -> None:
        """Store what a measurement found besides the rates (checkpointed, shown in :meth:`rate_table`)."""
        if result.sensitivities is not None:
            self.sensitivities = result.sensitivities
        if result.regularization_terms is not None:
            self.regularization_terms = result.regularization_terms
            self.regularization_loss_used = result.loss

    def _say_how_compiled(self, pl_module: pl.LightningModule) -> None:
        """At train start (after ``configure_model`` and the module's ``setup``): what a model compiled whole does with the gates.

        Route 1 (docs/compile.md): batch drop runs each branch in ``torch.cond``, whose backward recomputes a
        kept branch's forward, and ``compile=`` regions are inlined into the model's graph, not called.
        """
        handle = self.handle
        if handle is None:
            return
        if getattr(pl_module, "_compiler_ctx", None) is None and not compiled_around_gates(pl_module, handle):
            return
        if self.compile is not False and handle.compile_route == "cond":
            rank_zero_warn(
                "StochasticDepth: compile= compiles each residual branch as a region, but this model is compiled whole "
                "(torch.compile): Dynamo traces the gates into the model's graph and inlines the regions, so compile= "
                "changes nothing here (unless the model was compiled with dynamic=True, whose gates decide outside the "
                "graph and call the regions). For the regional route, leave the model uncompiled; to keep the whole "
                "compiled model, drop compile=. See docs/compile.md."
            )
        # _all_kept: every rate 1 and no schedule to lower them, the gates trace without torch.cond
        if self.drop == "batch" and handle.skip_compute and handle.compile_route == "cond" and not handle._all_kept:
            rank_zero_info(
                f"StochasticDepth: the model is compiled whole, so each batch-drop gate runs its branch in torch.cond, "
                f"whose backward recomputes a kept branch's forward (torch {torch.__version__}): at budget {self.budget} the "
                f"blocks cost about 4/3 x {self.budget} = {4 / 3 * self.budget:.2f} of their compute without stochastic depth "
                "(a block's backward taken as twice its forward), and they hold less activation memory (only their inputs are "
                "kept). Below budget 1 StochasticDepth(compile=True) on the uncompiled model was faster in docs/compile.md's "
                "measurements."
            )

    def _warn_large_multiplier(self) -> None:
        if self.handle is None:
            return
        m = _max_multiplier(self.handle.survival_float64, self.scaling)
        if m > MAX_MULTIPLIER:
            lowest = int(torch.argmin(self.handle.survival_float64))
            rank_zero_warn(
                f"StochasticDepth: with scaling='inverted' block {lowest + 1} ({self.handle.branches[lowest].name}) has rate "
                f"{1.0 / m:.4g}, so a kept branch is multiplied by 1/p = {m:.4g} (> {MAX_MULTIPLIER:g}); such rare, "
                "large multipliers make training noisy. Raise p_min (p_min=0.05 caps the multiplier at 20), "
                "raise the budget, or use scaling='expected'."
            )

    # ------------------------------------------------------------------ logging
    def _log_rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None
        p = self.handle.survival
        mean, var = depth_moments(p)
        log_epoch_metrics(pl_module, {"sd/expected_depth": mean})  # identical on every rank; sd/budget is logged per step
        per_block = {"sd/survival": p} if self.sensitivities is None else {"sd/survival": p, "sd/sensitivity": self.sensitivities}
        log_per_block(trainer, pl_module, per_block)  # scalars sd/survival/001 ..; on TensorBoard a histogram and an image
        if self._rates_changed:  # one table per change of the rates (or of their numbering)
            self._write_table(trainer)
            self._rates_changed = False

    def rate_table(self) -> list[dict[str, Any]]:
        """One row per block: ``block`` (1-based), ``name``, ``survival`` and, when measured, ``sensitivity``/``g``."""
        assert self.handle is not None
        rows = []
        p = self.handle.survival
        for block, branch in enumerate(self.handle.branches):
            row: dict[str, Any] = {"block": block + 1, "name": branch.name, "survival": float(p[block])}
            if self.sensitivities is not None:
                row["sensitivity"] = float(self.sensitivities[block])
            if self.regularization_terms is not None:
                row["g"] = float(self.regularization_terms[block])
            rows.append(row)
        return rows

    def _write_table(self, trainer: pl.Trainer) -> None:
        path = publish_table(trainer, f"sd_rates_epoch{trainer.current_epoch}.csv", self.rate_table(), key="sd/rates")
        if path is not None:  # rank 0
            self.table_path = path

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "mode": self.mode,
            "budget": self.budget,
            "seed": self.seed,
            "drop": self.drop,
            "scaling": self.scaling,
            "p_min": self.p_min,
            "measure_after_steps": self.measure_after_steps,
            "schedule": self.schedule,
            "warmup_fraction": self.warmup_fraction,
            "pld_gamma": self.pld_gamma,
            "schedule_total_steps": self.schedule_total_steps,
        }
        if self.handle is not None:
            # float64: masks compare u < p_l and scale by 1/p_l, so a float32 round trip would change them.
            state["survival"] = self.handle.survival_float64.tolist()
            state["branches"] = [b.name for b in self.handle.branches]  # call order once checked
            state["order_checked"] = self._order_checked
        if self.sensitivities is not None:
            state["sensitivities"] = self.sensitivities.tolist()
        if self.regularization_terms is not None:
            state["g"] = self.regularization_terms.tolist()  # key kept: older checkpoints load
        state["measured"] = self._measured
        state["measured_at_step"] = self._measured_at_step
        state["last_measured_epoch"] = self._last_measured_epoch
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
            self._seed_source = "checkpoint"
        if self.handle is None:
            self._pending_state = dict(state_dict)
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.handle is not None
        if state.get("schedule", "constant") != self.schedule:
            rank_zero_warn(
                f"StochasticDepth: checkpoint was trained with schedule={state.get('schedule', 'constant')!r}, this callback has "
                f"schedule={self.schedule!r}; the resumed run follows this callback's schedule"
            )
        for key in ("mode", "drop", "scaling"):
            if key in state and state[key] != getattr(self, key):
                rank_zero_warn(
                    f"StochasticDepth: checkpoint has {key}={state[key]!r}, this callback {key}={getattr(self, key)!r}; "
                    "keeping the checkpoint's rates"
                )
        names = [b.name for b in self.handle.branches]
        if "branches" in state and state["branches"] != names:
            if sorted(state["branches"]) != sorted(names) or len(set(names)) != len(names):
                raise RuntimeError(
                    "StochasticDepth: the checkpoint's residual branches differ from this model's "
                    f"({len(state['branches'])} vs {self.handle.num_blocks}); resume with the same model and blocks="
                )
            # The checkpoint numbers the blocks in call order (checked at its first step): same numbering here.
            self.handle.reorder([names.index(n) for n in state["branches"]])
        if state.get("order_checked"):
            self._order_checked = True
        if state.get("schedule_total_steps") is not None and self.schedule == state.get("schedule"):
            # The schedule continues over the steps it started with (a resumed run may estimate another T).
            self.schedule_total_steps = int(state["schedule_total_steps"])
        self._solved_for = None  # the next step re-solves its rates for b(t)
        if state.get("seed") is not None:
            self.seed = int(state["seed"])
            self.handle.seed = self.seed
        if "survival" in state:
            self.handle.set_survival(state["survival"])
        if state.get("sensitivities") is not None:
            self.sensitivities = torch.tensor(state["sensitivities"], dtype=torch.float32)
        if state.get("g") is not None:
            self.regularization_terms = torch.tensor(state["g"], dtype=torch.float32)
        self._measured = bool(state.get("measured", self._measured))
        self._measured_at_step = state.get("measured_at_step", self._measured_at_step)
        self._rates_changed = True
        self._last_measured_epoch = int(state.get("last_measured_epoch", self._last_measured_epoch))

    def remove(self) -> None:
        """Take the gates out of the model again (the plain model, same state_dict)."""
        if self._order_probe is not None:
            self._order_probe.remove()
            self._order_probe = None
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _max_multiplier(p: Tensor | None, scaling: str) -> float:
    """``max_l 1/p_l`` for ``"inverted"`` (inf for a rate 0), 1 for ``"expected"`` or before setup."""
    if p is None or scaling != "inverted" or p.numel() == 0:
        return 1.0
    low = float(p.min())
    return math.inf if low <= 0 else 1.0 / low


def _has_branches(pl_module: pl.LightningModule, blocks: Any) -> bool:
    """Whether discovery finds a residual branch now (quietly: the real injection reports)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(find_residual_branches(pl_module, blocks))
        except ValueError:  # e.g. blocks= names modules that configure_model has not built yet
            return False


class _CallOrderProbe:
    """Records the order in which the gates run during one training step (forward pre-hooks).

    With ``positional=True`` (rates that belong to positions: linear, custom) the gate that runs k-th
    uses, already in this step, the rate, batch mask and per-example masks drawn for block k, so that the
    very first step is the one a model defined in call order would take. :meth:`finish_reorder`
    then renumbers the handle so that block k is the k-th called gate.
    """

    def __init__(self, handle: StochasticDepthHandle, positional: bool) -> None:
        self.handle = handle
        self.positional = positional
        self.calls: list[int] = []
        self._seen: set[int] = set()
        self._p = list(handle._p)
        self._masks = handle.drop_kind.snapshot()  # the masks drawn for each position of this step
        self._hooks = [gate.register_forward_pre_hook(self._pre_hook) for gate in handle.gates]

    def _pre_hook(self, gate: nn.Module, args: tuple[Any, ...]) -> None:
        handle = self.handle
        if handle._override is not None or not gate.training:
            return
        index = int(gate.index)  # type: ignore[arg-type]
        if index in self._seen:
            return
        self._seen.add(index)
        k = len(self.calls)
        self.calls.append(index)
        if not self.positional or k == index:
            return
        handle._p[index] = self._p[k]
        handle._refresh_rates()
        first = args[0] if args and isinstance(args[0], Tensor) else None
        self._masks = handle.drop_kind.follow_call_order(self._masks, self.calls, first, handle._p, handle.scaling)
        handle._draws += 1  # other branches may be dropped now: the next skipped gate adds their zero gradients

    def order(self) -> list[int] | None:
        """Gate indices in call order (gates not called this step last, in definition order), or None."""
        if not self.calls:
            return None
        return self.calls + [i for i in range(self.handle.num_blocks) if i not in self._seen]

    def finish_reorder(self) -> None:
        order = self.order()
        assert order is not None
        handle = self.handle
        handle.reorder(order)
        if self.positional:
            # Position k keeps the rate and masks drawn for k (what its gate used in this step).
            handle.set_survival(torch.tensor(self._p, dtype=torch.float64))
            handle.drop_kind.restore(self._masks)
            handle._draws += 1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
