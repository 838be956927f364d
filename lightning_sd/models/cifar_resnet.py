"""CIFAR ResNet of He et al. (2016), the network of Huang et al. (2016) and of the SD paper's Table 2.

Depth 6n + 2: a 3x3 stem convolution, three stages of n BasicBlocks (16, 32, 64 channels, stride 1,
2, 2), global average pooling and a linear classifier. Shortcuts are the parameter-free "option A"
of the paper (stride-2 subsampling with zero-padded channels), as in Huang et al.'s reference code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["CifarResNet", "CifarBasicBlock", "PadShortcut"]


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` and zero-padding of the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.extra = out_channels - in_channels

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        return x


class CifarBasicBlock(nn.Module):
    """``relu(shortcut(x) + scale * bn2(conv2(relu(bn1(conv1(x))))))``.

    Args:
        in_channels: channels of the block input.
        out_channels: channels of the block output.
        stride: stride of the first convolution (1 or 2).
        branch_scale: multiplier of the residual branch; ``1/sqrt(L)`` gives the Stable ResNet.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, branch_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.branch_scale = float(branch_scale)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.branch_scale != 1.0:
            out = out * self.branch_scale
        return self.relu2(self.shortcut(x) + out)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016 (20, 32, 44, 56, 110, ...), with L = 3n residual blocks.

    Args:
        depth: number of weighted layers, ``6n + 2`` with ``n >= 1`` (20 -> 9 blocks, 110 -> 54 blocks).
        num_classes: output classes.
        stable: scale every residual branch by ``1/sqrt(L)`` (the paper's Stable ResNet, Eq. (3)).
        in_channels: input image channels (3 for CIFAR, 1 for grey-scale data such as digits).
        width: channels of the first stage (16 in the paper); the stages use width, 2 width, 4 width.
        balanced: replace every ReLU by a :class:`~lightning_sd.models.BalancedReLU` (Li et al. 2021).

    Example::

        >>> model = CifarResNet(110, num_classes=10, stable=True)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        stable: bool = False,
        in_channels: int = 3,
        width: int = 16,
        balanced: bool = False,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_blocks = 3 * n
        scale = 1.0 / math.sqrt(self.num_blocks) if stable else 1.0
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = [width, 2 * width, 4 * width]
        stages = []
        prev = width
        for i, ch in enumerate(channels):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(prev, ch, stride, branch_scale=scale))
                prev = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if balanced:
            from lightning_sd.models.balanced import balance_relus

            balance_relus(self)

    @override
    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
