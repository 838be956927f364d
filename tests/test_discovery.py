import pytest
import timm
import torch
import torchvision
from torch import nn

from lightning_sd.core.discovery import find_residual_branches
from lightning_sd.models import CifarResNet, ResidualMLP


class UserBlock(nn.Module):
    """A home-made pre-norm residual block: no registration, found by tracing."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        h = torch.tanh(self.fc(self.norm(x)))
        return x + h


class UserNet(nn.Module):
    def __init__(self, width=8, depth=3):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.body = nn.ModuleList([UserBlock(width) for _ in range(depth)])
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        x = self.inp(x)
        for block in self.body:
            x = block(x)
        return self.out(x)


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: torchvision.models.resnet18(), 8),
        (lambda: torchvision.models.resnet50(), 16),
        (lambda: torchvision.models.convnext_tiny(), 18),
        (lambda: timm.create_model("resnet18"), 8),
        (lambda: timm.create_model("vit_tiny_patch16_224"), 24),
        (lambda: timm.create_model("convnext_atto"), 12),
        (lambda: CifarResNet(110), 54),
        (lambda: ResidualMLP(8, 16, 7, 1), 7),
        (lambda: UserNet(depth=3), 3),
    ],
)
def test_branch_counts(factory, expected):
    assert len(find_residual_branches(factory())) == expected


def test_efficientnet_counts_its_residual_mbconv_blocks():
    model = torchvision.models.efficientnet_b0()
    residual = [n for n, m in model.named_modules() if type(m).__name__ == "MBConv" and m.use_res_connect]
    branches = find_residual_branches(model)
    assert [b.block for b in branches] == residual
    assert len(residual) == 9
    assert all(b.slot == f"{b.block}.stochastic_depth" for b in branches)


def test_forward_order_and_names():
    branches = find_residual_branches(timm.create_model("vit_tiny_patch16_224"))
    assert [b.name for b in branches[:4]] == ["blocks.0.branch0", "blocks.0.branch1", "blocks.1.branch0", "blocks.1.branch1"]
    assert branches[0].modules == ("blocks.0.norm1", "blocks.0.attn", "blocks.0.ls1", "blocks.0.drop_path1")
    cifar = find_residual_branches(CifarResNet(20))
    assert [b.name for b in cifar] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    # The option-A shortcut (no weights) is never taken as the branch.
    assert all("shortcut" not in m for b in cifar for m in b.modules)


def test_downsample_shortcut_is_not_the_branch():
    branches = find_residual_branches(torchvision.models.resnet18())
    first_down = next(b for b in branches if b.block == "layer2.0")
    assert "layer2.0.conv1" in first_down.modules
    assert not any("downsample" in m for m in first_down.modules)


def test_blocks_regex_and_list():
    model = CifarResNet(20)
    assert [b.name for b in find_residual_branches(model, blocks=r"layer3\..*")] == ["layer3.0", "layer3.1", "layer3.2"]
    assert [b.name for b in find_residual_branches(model, blocks=["layer1.2", "layer2.0"])] == ["layer1.2", "layer2.0"]
    vit = timm.create_model("vit_tiny_patch16_224", depth=2)
    assert [b.name for b in find_residual_branches(vit, blocks=["blocks.1.branch1"])] == ["blocks.1.branch1"]
    assert [b.name for b in find_residual_branches(vit, blocks=r".*branch0")] == ["blocks.0.branch0", "blocks.1.branch0"]


def test_blocks_naming_nothing_raises():
    model = CifarResNet(20)
    with pytest.raises(ValueError, match="matches no residual branch"):
        find_residual_branches(model, blocks=r"encoder\..*")
    with pytest.raises(ValueError, match="not a module"):
        find_residual_branches(model, blocks=["layer9.0"])
    with pytest.raises(ValueError, match="computes no residual add"):
        find_residual_branches(model, blocks=["layer1.0.conv1"])
    with pytest.raises(ValueError, match="names nothing"):
        find_residual_branches(model, blocks=[])


def test_untraceable_block_with_slot_falls_back_to_slot():
    from timm.layers import DropPath

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop_path = DropPath(0.1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return x + self.drop_path(self.fc(x))
            return x + self.drop_path(self.fc(x))

    model = nn.Sequential(Untraceable(), Untraceable())
    branches = find_residual_branches(model)
    assert [(b.name, b.slot, b.skippable) for b in branches] == [("0", "0.drop_path", False), ("1", "1.drop_path", False)]


class _CountingBlock(nn.Module):
    """A residual block whose forward keeps state: a buffer updated in place and two Python attributes."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.seen.add_(1)
        self.calls += 1
        self.last_input = x
        return x + torch.relu(self.fc(x))


def test_discovery_leaves_the_blocks_state_as_it_was():
    """Discovery traces each block's forward: what that forward changes (a buffer, Python attributes) is put
    back, so that a probe of the model's structure does not change its state (nor leave an fx Proxy in it)."""
    from lightning_sd import inject_stochastic_depth

    model = nn.Sequential(_CountingBlock(4), _CountingBlock(4))
    model[0].calls = 5
    handle = inject_stochastic_depth(model, 0.5)
    assert handle.num_blocks == 2
    for block in model:
        assert float(block.seen) == 0.0 and "last_input" not in block.__dict__
    assert [model[0].calls, model[1].calls] == [5, 0]
    x = torch.randn(3, 4)
    handle.remove()
    model(x)
    assert [model[0].calls, model[1].calls] == [6, 1] and model[1].last_input is not None
