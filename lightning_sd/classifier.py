"""``SDClassifier``: an image-classification LightningModule whose backbone is named or given.

The backbone is a :class:`~lightning_sd.models.CifarResNet` (``"CifarResNet-110"``,
``"StableCifarResNet-56"``), any torchvision classification model, any timm model (all built
without pretrained weights) or an ``nn.Module`` instance. Stochastic depth itself is added by the
:class:`~lightning_sd.callbacks.StochasticDepth` callback, which finds the residual branches of
whatever backbone is here.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_sd._internals import called_by_fit_loop
from lightning_sd.optim import OptimizerName, SchedulerName, build_optimizer, check_optimizer_names, with_lr_schedule

__all__ = [
    "SDClassifier",
    "build_backbone",
    # defined in lightning_sd.optim and lightning_sd._internals; still importable from here
    "build_optimizer",
    "with_lr_schedule",
    "called_by_fit_loop",
    "OptimizerName",
    "SchedulerName",
]

_CIFAR_RESNET = re.compile(r"^(stable[-_]?)?cifar[-_]?resnet[-_]?(\d+)$", re.IGNORECASE)

BACKBONE_HELP = (
    "Name a backbone as 'CifarResNet-<depth>' with depth = 6n + 2 (CifarResNet-20, -32, -44, -56, -110; "
    "'StableCifarResNet-110' or stable=True scales branches by 1/sqrt(L)), as a torchvision classification "
    "model ('resnet18', 'torchvision:resnet50'; see torchvision.models.list_models(module=torchvision.models)), "
    "as a timm model ('timm:resnet18', 'vit_tiny_patch16_224'; see timm.list_models()), or pass an nn.Module "
    "instance (CLI: backbone: {class_path: ..., init_args: ...}). Unprefixed names are looked up in torchvision "
    "first, then timm. No pretrained weights are loaded."
)


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def build_backbone(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    stable: bool = False,
    balanced: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a randomly initialised classification backbone from its name.

    Args:
        name: ``"CifarResNet-<6n+2>"`` / ``"StableCifarResNet-<6n+2>"``, a torchvision classification
            model name (optionally ``"torchvision:"``-prefixed) or a timm model name (optionally
            ``"timm:"``-prefixed). Unprefixed names are tried in that order.
        num_classes: size of the classifier head, >= 1.
        in_channels: image channels (torchvision models accept only 3).
        stable: Stable ResNet branch scaling ``1/sqrt(L)`` (CifarResNet only).
        balanced: Balanced ReLUs of Li et al. (2021) (CifarResNet only).
        backbone_kwargs: extra keyword arguments of the constructor (``CifarResNet``,
            ``torchvision.models.get_model`` or ``timm.create_model``), e.g. ``{"width": 32}`` or, for a timm
            ViT on 32x32 images, ``{"img_size": 32, "patch_size": 4}``.

    Returns:
        The backbone, mapping ``(B, in_channels, H, W)`` images to ``(B, num_classes)`` logits.

    Raises:
        ValueError: unknown name (the message lists how to name a backbone and close matches), a
            CifarResNet depth that is not ``6n + 2``, or an option the chosen family does not support.

    Example::

        >>> build_backbone("CifarResNet-56", num_classes=100, stable=True).num_blocks
        27
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    extra = dict(backbone_kwargs or {})
    reserved = {"num_classes", "in_channels", "in_chans", "stable", "balanced", "weights", "pretrained", "depth"} & set(extra)
    if reserved:
        raise ValueError(
            f"backbone_kwargs may not set {sorted(reserved)}: use the num_classes/in_channels/stable/balanced "
            "arguments (and the name for the depth); pretrained weights are never loaded"
        )
    match = _CIFAR_RESNET.match(name.strip())
    if match:
        from lightning_sd.models import CifarResNet

        depth = int(match.group(2))
        try:
            return CifarResNet(
                depth,
                num_classes=num_classes,
                stable=stable or match.group(1) is not None,
                in_channels=in_channels,
                balanced=balanced,
                **extra,
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"backbone {name!r}: {err}") from err

    source, _, model_name = name.strip().rpartition(":")
    if source not in ("", "torchvision", "timm"):
        raise ValueError(f"backbone {name!r}: unknown prefix {source!r}:, use 'torchvision:' or 'timm:'. {BACKBONE_HELP}")
    if stable or balanced:
        raise ValueError(
            f"backbone {name!r}: stable=True and balanced=True apply to CifarResNet-* backbones only; "
            "for other models, build the scaled model yourself and pass it as an nn.Module instance"
        )

    if source in ("", "torchvision") and model_name in _torchvision_names():
        if in_channels != 3:
            raise ValueError(
                f"backbone {name!r}: torchvision models take 3-channel images, got in_channels={in_channels}; "
                f"use a timm model ('timm:{model_name}' accepts in_chans) or a CifarResNet"
            )
        import torchvision

        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes, **extra)
    if source in ("", "timm"):
        import timm

        if timm.is_model(model_name):
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **extra)

    known = [f"CifarResNet-{d}" for d in (20, 32, 44, 56, 110)]
    if source in ("", "torchvision"):
        known += _torchvision_names()
    if source in ("", "timm"):
        known += _timm_names()
    close = difflib.get_close_matches(model_name, list(dict.fromkeys(known)), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = {"": "torchvision or timm", "torchvision": "torchvision", "timm": "timm"}[source]
    raise ValueError(f"Unknown backbone {name!r}: not a CifarResNet and not a {where} model name.{hint} {BACKBONE_HELP}")


class SDClassifier(LightningModule):
    """Image classifier trained with cross-entropy; the backbone is named (CifarResNet, torchvision, timm) or given.

    Logs ``train/loss`` (every step), ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and
    ``test/acc`` (per epoch; accuracy is top-1 multiclass accuracy from torchmetrics).
    :meth:`training_step` returns the loss tensor, so callbacks can call it to compute gradients
    (SenseMode sensitivities, regularization terms); called from anywhere but the fit loop it logs
    nothing and leaves ``train/acc`` untouched.

    The defaults are the CIFAR recipe of He et al. (2016) and Huang et al. (2016) used by the SD paper:
    SGD with learning rate 0.1, momentum 0.9, weight decay 1e-4; here annealed with a cosine schedule over
    the whole run (``trainer.max_epochs`` or ``max_steps``), stepped every optimizer step.

    Args:
        backbone: a name understood by :func:`build_backbone` (``"CifarResNet-20"`` .. ``"CifarResNet-110"``,
            ``"StableCifarResNet-110"``, torchvision or timm model names) or an ``nn.Module`` mapping images
            to ``num_classes`` logits.
        num_classes: number of classes, >= 2 (10 for CIFAR-10 and digits, 100 for CIFAR-100).
        in_channels: image channels given to a named backbone (3 for CIFAR, 1 for digits).
        stable: scale the residual branches of a CifarResNet by ``1/sqrt(L)`` (Stable ResNet).
        balanced: use Balanced ReLUs (Li et al. 2021) in a CifarResNet.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: initial learning rate, > 0.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW), >= 0.
        nesterov: Nesterov momentum for SGD (Huang et al. 2016 used it).
        scheduler: ``"cosine"`` (to 0 over the run), ``"multistep"`` (x0.1 at 50% and 75% of the run, He et
            al. 2016) or ``"none"``.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        backbone_kwargs: extra constructor arguments of a named backbone (see :func:`build_backbone`).

    Example::

        >>> model = SDClassifier("StableCifarResNet-110", num_classes=100)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    #: the loss whose Hessian defines g_l for ``StochasticDepth(mode="maxreg")`` and ``RegularizationMonitor``
    regularization_loss = "cross_entropy"

    def __init__(
        self,
        backbone: str | nn.Module = "CifarResNet-20",
        num_classes: int = 10,
        in_channels: int = 3,
        stable: bool = False,
        balanced: bool = False,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        scheduler: SchedulerName = "cosine",
        label_smoothing: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SDClassifier needs num_classes >= 2, got {num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_optimizer_names(optimizer, scheduler)
        if isinstance(backbone, str):
            self.save_hyperparameters()
            self.backbone = build_backbone(
                backbone, num_classes, in_channels, stable=stable, balanced=balanced, backbone_kwargs=backbone_kwargs
            )
        elif isinstance(backbone, nn.Module):
            self.save_hyperparameters(ignore=["backbone"])
            self.backbone = backbone
        else:
            raise TypeError(f"backbone must be a name (str) or an nn.Module, got {type(backbone).__name__}. {BACKBONE_HELP}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    @override
    def setup(self, stage: str) -> None:
        """Check ``num_classes`` / ``in_channels`` against the datamodule's, when it declares them."""
        try:
            dm = self.trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        except RuntimeError:  # not attached to a Trainer
            return
        problems = []
        dm_classes = getattr(dm, "num_classes", None)
        if isinstance(dm_classes, int) and dm_classes != self.num_classes:
            problems.append(
                f"the datamodule has {dm_classes} classes but SDClassifier(num_classes={self.num_classes}); "
                f"pass num_classes={dm_classes} (CLI: --model.init_args.num_classes {dm_classes})"
            )
        dm_channels = getattr(dm, "in_channels", None)
        if isinstance(self.hparams.get("backbone"), str) and isinstance(dm_channels, int) and dm_channels != self.hparams["in_channels"]:
            problems.append(
                f"the datamodule's images have {dm_channels} channel(s) but the backbone was built for "
                f"in_channels={self.hparams['in_channels']}; pass in_channels={dm_channels} "
                f"(CLI: --model.init_args.in_channels {dm_channels})"
            )
        if problems:
            raise ValueError(f"SDClassifier does not match {type(dm).__name__}: " + "; ".join(problems))

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.backbone(x)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy (with the configured label smoothing)."""
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> Tensor:
        """Cross-entropy of the batch; logged (and ``train/acc`` updated) only when the fit loop calls it."""
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        if called_by_fit_loop(self):
            self.train_acc(logits.detach(), y)
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=x.shape[0])
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: Any, batch_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optim = build_optimizer(self.parameters(), hp["optimizer"], hp["lr"], hp["momentum"], hp["weight_decay"], hp["nesterov"])
        return with_lr_schedule(self, hp["scheduler"], optim)
