"""Small LightningModules and data shared by the tests (module level so DDP subprocesses can import them)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.models import CifarResNet, ResidualMLP


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier around any backbone; SGD without momentum (deterministic updates)."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net if net is not None else CifarResNet(20, width=4)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RegressionModule(pl.LightningModule):
    """MSE regression with a residual MLP (no BatchNorm: DDP gives the same gradients as one process)."""

    def __init__(self, in_features: int = 8, width: int = 16, depth: int = 6, lr: float = 0.05) -> None:
        super().__init__()
        self.net = ResidualMLP(in_features, width, depth, 1, stable=True)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def image_loader(n: int = 32, batch_size: int = 8, size: int = 8, channels: int = 3, classes: int = 10, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def regression_data(n: int = 64, in_features: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True) / in_features**0.5)
    return TensorDataset(x, y)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=pl.loggers.CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        enable_checkpointing=False,
    )
    kwargs.update(overrides)
    return kwargs


class NestedResidualBlock(nn.Module):
    """timm EdgeNeXt's ``SplitTransposeBlock`` in small: the outer branch holds an inner residual with a layer
    scale attribute (and BatchNorm, optionally); one drop-path slot serves both adds, so both are found.

    ``x + out(relu(y + gamma * inner(y)))`` with ``y = fc(x)``: branch0 is the inner residual, branch1 the outer.
    """

    def __init__(self, width: int, batchnorm: bool = False) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.fc = nn.Linear(width, width)
        self.inner = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width) if batchnorm else nn.Identity())
        self.gamma_inner = nn.Parameter(torch.full((width,), 0.5))
        self.out = nn.Linear(width, width)
        self.drop_path = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        y = self.fc(x)
        y = y + self.drop_path(self.gamma_inner * self.inner(y))
        y = self.out(torch.relu(y))
        return shortcut + self.drop_path(y)
