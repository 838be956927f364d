"""SDClassifier / SDRegressor: backbones by name and instance, short fits, optimizer and schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from lightning_sd.classifier import SDClassifier, build_backbone, build_optimizer
from lightning_sd.data import DigitsDataModule, ToyRegressionDataModule
from lightning_sd.models import CifarResNet, ResidualMLP
from lightning_sd.regressor import SDRegressor


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads make these tests ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(("name", "blocks"), [("CifarResNet-20", 9), ("cifar_resnet32", 15), ("CifarResNet-110", 54)])
def test_cifar_resnet_by_name(name: str, blocks: int) -> None:
    net = build_backbone(name, num_classes=100, in_channels=1)
    assert isinstance(net, CifarResNet)
    assert net.num_blocks == blocks
    assert net.layer1[0].branch_scale == 1.0
    if blocks < 54:  # the 110-layer forward pass is slow on a shared CPU
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 100)


def test_stable_cifar_resnet_by_prefix_or_flag() -> None:
    by_name = build_backbone("StableCifarResNet-56")
    by_flag = build_backbone("CifarResNet-56", stable=True)
    for net in (by_name, by_flag):
        assert net.num_blocks == 27
        assert net.layer3[-1].branch_scale == pytest.approx(1 / math.sqrt(27))
    model = SDClassifier("CifarResNet-44", num_classes=10, stable=True)
    assert model.backbone.layer2[0].branch_scale == pytest.approx(1 / math.sqrt(21))
    assert model.hparams.backbone == "CifarResNet-44" and model.hparams.stable is True


def test_torchvision_backbone_by_name() -> None:
    import torchvision

    for name in ("resnet18", "torchvision:resnet18"):
        net = build_backbone(name, num_classes=7)
        assert type(net) is torchvision.models.ResNet
        assert net.fc.out_features == 7
    assert build_backbone("resnet18", num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="torchvision models take 3-channel images"):
        build_backbone("resnet18", in_channels=1)


def test_timm_backbone_by_name() -> None:
    import timm

    net = build_backbone("timm:resnet18", num_classes=5, in_channels=1)
    assert type(net) is timm.models.resnet.ResNet
    assert net.conv1.in_channels == 1 and net.fc.out_features == 5
    # a name only timm knows needs no prefix
    only_timm = build_backbone("resnet10t", num_classes=3)
    assert type(only_timm) is timm.models.resnet.ResNet
    assert only_timm(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_backbone_kwargs_reach_the_constructor() -> None:
    vit = SDClassifier("timm:vit_tiny_patch16_224", num_classes=10, backbone_kwargs={"img_size": 32, "patch_size": 4})
    assert vit.backbone.patch_embed.num_patches == 64  # (32 / 4) ** 2
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert vit.hparams.backbone_kwargs == {"img_size": 32, "patch_size": 4}
    assert build_backbone("CifarResNet-20", backbone_kwargs={"width": 8}).fc.in_features == 32
    with pytest.raises(ValueError, match="backbone_kwargs may not set \\['depth'\\]"):
        build_backbone("CifarResNet-20", backbone_kwargs={"depth": 56})
    with pytest.raises(ValueError, match="unexpected keyword argument 'foo'"):
        build_backbone("CifarResNet-20", backbone_kwargs={"foo": 1})


def test_backbone_instance_is_used_as_is() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model = SDClassifier(net, num_classes=10, lr=0.05)
    assert model.backbone is net
    assert "backbone" not in model.hparams and model.hparams.lr == 0.05
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_bad_backbone_name_lists_how_to_name_one() -> None:
    with pytest.raises(ValueError) as info:
        SDClassifier("resnet1888")
    message = str(info.value)
    assert "Unknown backbone 'resnet1888'" in message
    assert "Did you mean 'resnet18'" in message
    for hint in ("CifarResNet-<depth>", "torchvision", "timm", "nn.Module"):
        assert hint in message
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_backbone("CifarResNet-21")
    with pytest.raises(ValueError, match="unknown prefix 'hub'"):
        build_backbone("hub:resnet18")
    with pytest.raises(ValueError, match="not a timm model name"):
        build_backbone("timm:no_such_net")
    with pytest.raises(ValueError, match="CifarResNet-\\* backbones only"):
        build_backbone("resnet18", stable=True)
    with pytest.raises(TypeError, match="backbone must be a name"):
        SDClassifier(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- optimizers


def test_optimizer_defaults_are_the_paper_cifar_recipe() -> None:
    model = SDClassifier("CifarResNet-20")
    optim = model.configure_optimizers()  # no trainer: constant lr, with a warning
    assert isinstance(optim, torch.optim.SGD)
    group = optim.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-4, False)
    adamw = build_optimizer(model.parameters(), "adamw", lr=3e-4, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        build_optimizer(model.parameters(), "sgd", momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="optimizer must be"):
        SDClassifier("CifarResNet-20", optimizer="rmsprop")  # type: ignore[arg-type]


@pytest.mark.parametrize(("scheduler", "final_lr"), [("cosine", 0.0), ("multistep", 0.1 * 0.1 * 0.1), ("none", 0.1)])
def test_schedules_span_the_run(tmp_path: Path, scheduler: str, final_lr: float) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model = SDClassifier(net, scheduler=scheduler)  # type: ignore[arg-type]
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 4
    # cosine reaches 0 at the last step; multistep divides by 10 at steps 2 and 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(final_lr, abs=1e-12)


# ----------------------------------------------------------------------------- short fits


def test_classifier_fits_digits_with_cifar_resnet20(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SDClassifier("CifarResNet-20", num_classes=10, in_channels=1)
    before = model.backbone.fc.weight.detach().clone()
    dm = DigitsDataModule(batch_size=32)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert not torch.equal(before, model.backbone.fc.weight)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert math.isfinite(float(metrics["val/loss"]))
    (results,) = trainer.test(model, dm, verbose=False)
    assert set(results) == {"test/loss", "test/acc"}
    # the test accuracy is exactly the fraction of correct argmax predictions on those 2 batches
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(dm.test_dataloader()):
        if i == 2:
            break
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    assert results["test/acc"] == pytest.approx(correct / total, abs=1e-6)
    # predictions are the argmax classes of the test split
    preds = torch.cat(trainer.predict(model, dm))
    assert preds.shape == (270,) and preds.dtype == torch.long
    # a checkpoint rebuilds the named backbone from its hyperparameters
    path = tmp_path / "digits.ckpt"
    trainer.save_checkpoint(path)
    restored = SDClassifier.load_from_checkpoint(path)
    restored.eval()
    assert restored.hparams.backbone == "CifarResNet-20" and restored.hparams.in_channels == 1
    x = dm.test_set.tensors[0][:5]
    torch.testing.assert_close(restored(x), model(x))


def test_mismatched_datamodule_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in_channels=1 \\(CLI: --model.init_args.in_channels 1\\)"):
        _trainer(tmp_path, max_steps=1).fit(SDClassifier("CifarResNet-20"), DigitsDataModule())
    with pytest.raises(ValueError, match="has 10 classes but SDClassifier\\(num_classes=100\\)"):
        _trainer(tmp_path, max_steps=1).fit(SDClassifier("CifarResNet-20", num_classes=100, in_channels=1), DigitsDataModule())


class _CallsTrainingStep(Callback):
    """Calls ``training_step`` from hooks where logging on_step is refused, as SenseMode does."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batch = next(iter(trainer.train_dataloader))
        with torch.enable_grad():
            loss = pl_module.training_step(batch, 0)
        self.losses.append(loss)


def test_training_step_returns_loss_and_can_be_called_by_callbacks(tmp_path: Path) -> None:
    model = SDClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    loss = model.training_step((x, y), 0)
    assert loss.shape == () and loss.requires_grad
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y))
    assert model.train_acc.update_count == 0  # outside the fit loop: metric untouched
    probe = _CallsTrainingStep()
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[probe])
    trainer.fit(model, DigitsDataModule(batch_size=8))
    assert len(probe.losses) == 1 and probe.losses[0].requires_grad
    assert trainer.global_step == 2 and "train/loss" in trainer.callback_metrics


def test_regressor_defaults_and_instance() -> None:
    model = SDRegressor()
    assert isinstance(model.backbone, ResidualMLP)
    assert len(model.backbone.blocks) == 100
    assert model.backbone.blocks[0].branch_scale == pytest.approx(0.1)  # stable: 1/sqrt(100)
    assert model(torch.randn(3, 256)).shape == (3, 1)
    net = nn.Linear(8, 1)
    assert SDRegressor(net).backbone is net
    with pytest.raises(ValueError, match="prediction shape"):
        model.loss(torch.zeros(3, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="must be >= 1"):
        SDRegressor(depth=0)


def test_regressor_fits_toy_regression(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = ToyRegressionDataModule(in_features=32, num_train=64, num_val=64, num_test=64, batch_size=64, beta_scale=32**-0.5)
    model = SDRegressor(in_features=32, width=32, depth=10, lr=1e-2)
    dm.setup()
    x, y = dm.train_set.tensors
    with torch.no_grad():
        initial = float(nn.functional.mse_loss(model(x), y))
    trainer = _trainer(tmp_path, max_steps=30, limit_val_batches=1)
    trainer.fit(model, dm)
    assert trainer.global_step == 30
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    assert final < 0.5 * initial  # 30 full-batch Adam steps overfit 64 points
    assert "train/loss" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    (results,) = trainer.test(model, dm, verbose=False)
    with torch.no_grad():
        xt, yt = dm.test_set.tensors
        assert results["test/loss"] == pytest.approx(float(nn.functional.mse_loss(model(xt), yt)), rel=1e-5)
