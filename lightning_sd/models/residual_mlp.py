"""The SD paper's Vanilla ResNet (section 2): ``y_l = y_{l-1} + W_l relu(y_{l-1})``, He init."""

from __future__ import annotations

import math

from torch import Tensor, nn
from typing_extensions import override

__all__ = ["ResidualMLP", "ResidualMLPBlock"]


class ResidualMLPBlock(nn.Module):
    """``y + scale * W relu(y)`` with ``W_ij ~ N(0, 2/width)`` (He init), no bias.

    Args:
        width: features of the block input and output.
        branch_scale: multiplier of the branch; ``1/sqrt(L)`` gives the Stable ResNet (Eq. (3)).
    """

    def __init__(self, width: int, branch_scale: float = 1.0) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.linear.weight, std=math.sqrt(2.0 / width))
        self.branch_scale = float(branch_scale)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch_scale * self.linear(self.act(x))


class ResidualMLP(nn.Module):
    """Fully connected residual network of the SD paper (Eq. (1) with ``Psi_l(x, W) = W relu(x)``).

    ``y_0 = W_0 x``, ``y_l = y_{l-1} + s W_l relu(y_{l-1})`` for ``l = 1..depth``, output ``W_out y_L``,
    with ``s = 1/sqrt(depth)`` when ``stable=True`` (Stable ResNet) and ``s = 1`` otherwise.

    Args:
        in_features: input dimension (256 for the paper's toy regression).
        width: hidden width N.
        depth: number of residual blocks L.
        out_features: output dimension o.
        stable: scale branches by ``1/sqrt(depth)``.
        balanced: replace the ReLUs by :class:`~lightning_sd.models.BalancedReLU` (Li et al. 2021).

    Example::

        >>> model = ResidualMLP(256, width=128, depth=100, out_features=1, stable=True)
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        stable: bool = False,
        balanced: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ResidualMLP needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        scale = 1.0 / math.sqrt(depth) if stable else 1.0
        self.stem = nn.Linear(in_features, width, bias=False)
        nn.init.normal_(self.stem.weight, std=math.sqrt(1.0 / in_features))
        self.blocks = nn.Sequential(*[ResidualMLPBlock(width, scale) for _ in range(depth)])
        self.head = nn.Linear(width, out_features, bias=False)
        nn.init.normal_(self.head.weight, std=math.sqrt(1.0 / width))
        if balanced:
            from lightning_sd.models.balanced import balance_relus

            balance_relus(self)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))
