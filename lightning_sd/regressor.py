"""``SDRegressor``: squared-error regression with the SD paper's (Stable) residual MLP by default."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from typing_extensions import override

from lightning_sd._internals import called_by_fit_loop
from lightning_sd.optim import OptimizerName, SchedulerName, build_optimizer, check_optimizer_names, with_lr_schedule

__all__ = ["SDRegressor"]


class SDRegressor(LightningModule):
    """Regression with mean squared error, e.g. on :class:`~lightning_sd.data.ToyRegressionDataModule`.

    The default backbone is the paper's Vanilla ResNet :class:`~lightning_sd.models.ResidualMLP`
    (``y_l = y_{l-1} + s W_l relu(y_{l-1})``, He init), Stable (``s = 1/sqrt(depth)``) by default; the SD
    paper's toy experiments use width 128 and depth 100 on ``sin(beta^T x)`` with ``x in R^256``.

    Logs ``train/loss`` (every step), ``val/loss`` and ``test/loss`` (per epoch, averaged over examples).
    :meth:`training_step` returns the loss tensor (callbacks call it to compute sensitivities); called from
    anywhere but the fit loop it logs nothing.

    Args:
        backbone: an ``nn.Module`` mapping ``(B, in_features)`` to ``(B, out_features)``; ``None`` builds
            ``ResidualMLP(in_features, width, depth, out_features, stable, balanced)``.
        in_features: input dimension (256 for the toy regression), >= 1; ignored with a given backbone.
        width: hidden width N of the residual MLP, >= 1.
        depth: number of residual blocks L, >= 1.
        out_features: output dimension, >= 1.
        stable: scale every branch by ``1/sqrt(depth)`` (Stable ResNet, Eq. (3) of the paper).
        balanced: Balanced ReLUs (Li et al. 2021).
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"``.
        lr: learning rate, > 0.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (decoupled for AdamW), >= 0.
        nesterov: Nesterov momentum for SGD.
        scheduler: ``"none"`` (default), ``"cosine"`` or ``"multistep"`` over the whole run.

    Example::

        >>> model = SDRegressor(in_features=256, width=128, depth=100)
        >>> model(torch.randn(4, 256)).shape
        torch.Size([4, 1])
    """

    #: the loss whose Hessian defines g_l for ``StochasticDepth(mode="maxreg")`` and ``RegularizationMonitor``
    regularization_loss = "mse"

    def __init__(
        self,
        backbone: nn.Module | None = None,
        in_features: int = 256,
        width: int = 128,
        depth: int = 100,
        out_features: int = 1,
        stable: bool = True,
        balanced: bool = False,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        scheduler: SchedulerName = "none",
    ) -> None:
        super().__init__()
        check_optimizer_names(optimizer, scheduler)
        if backbone is None:
            from lightning_sd.models import ResidualMLP

            if min(in_features, width, depth, out_features) < 1:
                raise ValueError(
                    "SDRegressor: in_features, width, depth and out_features must be >= 1, got "
                    f"{in_features}, {width}, {depth}, {out_features}"
                )
            self.save_hyperparameters()
            self.backbone: nn.Module = ResidualMLP(in_features, width, depth, out_features, stable=stable, balanced=balanced)
        elif isinstance(backbone, nn.Module):
            self.save_hyperparameters(ignore=["backbone"])
            self.backbone = backbone
        else:
            raise TypeError(f"SDRegressor backbone must be an nn.Module or None (ResidualMLP), got {type(backbone).__name__}")

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Mean squared error; a 1-D target is treated as ``(B, 1)``."""
        if target.dim() == 1 and prediction.dim() == 2 and prediction.shape[1] == 1:
            target = target.unsqueeze(1)
        if prediction.shape != target.shape:
            raise ValueError(f"SDRegressor: prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        return F.mse_loss(prediction, target)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        if called_by_fit_loop(self):
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=x.shape[0])
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optim = build_optimizer(self.parameters(), hp["optimizer"], hp["lr"], hp["momentum"], hp["weight_decay"], hp["nesterov"])
        return with_lr_schedule(self, hp["scheduler"], optim)
