"""Reference residual models: CIFAR ResNet-(6n+2), the paper's residual MLP, Balanced ReLUs."""

from lightning_sd.models.balanced import BalancedReLU, balance_relus
from lightning_sd.models.cifar_resnet import CifarBasicBlock, CifarResNet, PadShortcut
from lightning_sd.models.residual_mlp import ResidualMLP, ResidualMLPBlock

__all__ = ["BalancedReLU", "CifarBasicBlock", "CifarResNet", "PadShortcut", "ResidualMLP", "ResidualMLPBlock", "balance_relus"]
