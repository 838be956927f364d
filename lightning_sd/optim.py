"""Optimizers and learning-rate schedules of the package's LightningModules (``SDClassifier``, ``SDRegressor``).

The names a module accepts are listed once here: :data:`OptimizerName` / :data:`SchedulerName` are the
``Literal`` types LightningCLI reads (``--model.optimizer adamw``), and :data:`OPTIMIZERS` /
:data:`SCHEDULERS` are the same names as tuples, for checks and messages.

Example::

    def configure_optimizers(self):
        optim = build_optimizer(self.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
        return with_lr_schedule(self, "cosine", optim)
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "OptimizerName",
    "SchedulerName",
    "build_optimizer",
    "check_optimizer_names",
    "with_lr_schedule",
]

OptimizerName = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["cosine", "multistep", "none"]
#: The optimizer names :func:`build_optimizer` accepts.
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
#: The schedule names :func:`with_lr_schedule` accepts.
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)


def _one_of(names: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def _check_name(kind: str, value: str, names: tuple[str, ...]) -> None:
    if value not in names:
        raise ValueError(f"{kind} must be {_one_of(names)}, got {value!r}")


def check_optimizer_names(optimizer: str, scheduler: str) -> None:
    """Raise ``ValueError`` at construction time for an optimizer or schedule name this module does not know.

    Args:
        optimizer: one of :data:`OPTIMIZERS`.
        scheduler: one of :data:`SCHEDULERS`.
    """
    _check_name("optimizer", optimizer, OPTIMIZERS)
    _check_name("scheduler", scheduler, SCHEDULERS)


def build_optimizer(
    params: Any,
    optimizer: OptimizerName = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (with ``momentum``, optional Nesterov), Adam or AdamW (decoupled ``weight_decay``).

    Args:
        params: the parameters (or parameter groups) to optimize.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate, > 0.
        momentum: SGD momentum in [0, 1) (ignored by Adam/AdamW).
        weight_decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW), >= 0.
        nesterov: Nesterov momentum for SGD (needs ``momentum > 0``).
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    _check_name("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def with_lr_schedule(module: LightningModule, scheduler: SchedulerName, optim: torch.optim.Optimizer) -> Any:
    """What ``configure_optimizers`` returns: ``optim`` with a per-step schedule over the whole run.

    The run length is ``trainer.estimated_stepping_batches``; without a Trainer or with an unbounded
    run the learning rate stays constant (with a warning).

    Args:
        module: the LightningModule (its ``trainer`` gives the run length).
        scheduler: ``"cosine"`` (to 0 over the run), ``"multistep"`` (x0.1 at 50% and 75% of the run) or
            ``"none"``.
        optim: the optimizer to schedule.
    """
    _check_name("scheduler", scheduler, SCHEDULERS)
    if scheduler == "none":
        return optim
    try:
        total = module.trainer.estimated_stepping_batches
    except RuntimeError:  # not attached to a Trainer
        total = math.inf
    if not math.isfinite(total) or total < 1:
        rank_zero_warn(
            f"scheduler={scheduler!r} needs a finite run length (set trainer max_epochs or max_steps); "
            "training with a constant learning rate"
        )
        return optim
    total = int(total)
    if scheduler == "cosine":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(optim, milestones=[total // 2, (3 * total) // 4], gamma=0.1)
    return {"optimizer": optim, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
