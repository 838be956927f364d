"""Hand-written residual forms: each is found correctly, or refused/warned with a message naming the fix."""

import copy
import warnings

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from lightning_sd.core.discovery import describe_branches, find_residual_branches
from lightning_sd.core.gates import inject_stochastic_depth


def _drop_only(model, handle, index, x):
    """Eval output with branch ``index`` multiplied by 0 and every other branch by 1."""
    m = torch.ones(handle.num_blocks)
    m[index] = 0.0
    with handle.override(m):
        return model(x)


class TwoBranches(nn.Module):
    """``x + f(x) + g(x)``: two branches on one identity."""

    def __init__(self, w=6):
        super().__init__()
        self.f = nn.Linear(w, w)
        self.g = nn.Linear(w, w)

    def forward(self, x):
        return x + torch.tanh(self.f(x)) + torch.sin(self.g(x))


def test_sum_of_two_branches_gets_one_gate_each_and_keeps_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(TwoBranches()).eval()
    branches = find_residual_branches(model)
    assert [(b.name, b.modules) for b in branches] == [("0.branch0", ("0.f",)), ("0.branch1", ("0.g",))]
    assert [b.shortcut for b in branches] == ["identity", "residual"]
    x = torch.randn(5, 6)
    blk = model[0]
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    # Dropping f leaves x + g(x); dropping g leaves x + f(x): the identity survives either way.
    torch.testing.assert_close(_drop_only(model, handle, 0, x), x + torch.sin(blk.g(x)))
    torch.testing.assert_close(_drop_only(model, handle, 1, x), x + torch.tanh(blk.f(x)))
    with handle.override(torch.zeros(2)):
        torch.testing.assert_close(model(x), x)


class AlphaAdd(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.f = nn.Linear(w, w)

    def forward(self, x):
        return torch.add(x, self.f(x), alpha=0.5)


def test_torch_add_with_alpha_is_found_and_the_branch_carries_alpha():
    torch.manual_seed(1)
    model = nn.Sequential(AlphaAdd(), AlphaAdd()).eval()
    ref = copy.deepcopy(model)
    assert [b.name for b in find_residual_branches(model)] == ["0", "1"]
    x = torch.randn(4, 6)
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    h0 = ref[0](x)
    # Dropping block 1 leaves h0 (block 1 is x + 0.5 f(x) with its branch removed).
    torch.testing.assert_close(_drop_only(model, handle, 1, x), h0)
    torch.testing.assert_close(_drop_only(model, handle, 0, x), ref[1](x))


class InPlaceGain(nn.Module):
    """dm_nfnet's form: the branch is scaled in place after the slot, then added to a projection."""

    def __init__(self, w=6, slot=True):
        super().__init__()
        self.downsample = nn.Linear(w, w)
        self.conv1 = nn.Linear(w, w)
        self.conv2 = nn.Linear(w, w)
        self.drop_path = DropPath(0.1) if slot else nn.Identity()
        self.skipinit_gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        shortcut = self.downsample(x)
        out = self.conv2(torch.relu(self.conv1(x)))
        out = self.drop_path(out)
        out.mul_(self.skipinit_gain)
        return out + shortcut


@pytest.mark.parametrize("slot", [True, False])
def test_in_place_scaling_stays_on_the_branch(slot):
    torch.manual_seed(2)
    model = nn.Sequential(InPlaceGain(slot=slot)).eval()
    branches = find_residual_branches(model)
    assert len(branches) == 1
    assert branches[0].modules == ("0.conv1", "0.conv2", "0.drop_path")
    assert branches[0].shortcut == "projection"
    x = torch.randn(3, 6)
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    # The dropped block is its projection shortcut alone.
    with torch.no_grad():
        torch.testing.assert_close(_drop_only(model, handle, 0, x), model[0].downsample(x))


class Traceable(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.fc = nn.Linear(w, w)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Untraceable(Traceable):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x + torch.relu(self.fc(x))
        return x + torch.relu(self.fc(x))


def test_one_untraceable_block_of_two_is_not_silent():
    model = nn.Sequential(Traceable(), Untraceable())
    with pytest.warns(UserWarning, match=r"(?s)1 residual-looking.*\b1: Untraceable\.forward cannot be traced.*blocks="):
        branches = find_residual_branches(model)
    assert [b.name for b in branches] == ["0"]
    with pytest.raises(ValueError, match=r"(?s)cannot be traced.*blocks="):
        find_residual_branches(model, strict=True)
    with pytest.raises(ValueError, match="cannot be traced"):
        inject_stochastic_depth(model, 0.5, strict=True)
    report = describe_branches(model, file=None)
    assert [u.where for u in report.uncovered] == ["1"]


def test_callback_strict_refuses_at_setup_before_touching_the_model(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sd.callbacks import StochasticDepth
    from lightning_sd.core.gates import existing_handle
    from tests.helpers import RegressionModule, trainer_kwargs

    module = RegressionModule(in_features=6)
    module.net = nn.Sequential(Traceable(), Untraceable(), nn.Linear(6, 1))
    forwards = [type(m).forward for m in module.modules()]
    loader = DataLoader(TensorDataset(torch.randn(8, 6), torch.randn(8, 1)), batch_size=4)
    trainer = pl.Trainer(max_steps=1, callbacks=[StochasticDepth(strict=True, seed=0)], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match=r"(?s)net\.1: Untraceable\.forward cannot be traced.*blocks="):
        trainer.fit(module, loader)
    assert existing_handle(module) is None and trainer.global_step == 0
    assert [type(m).forward for m in module.modules()] == forwards and all("forward" not in vars(m) for m in module.modules())
    # strict=False (the default) trains with the traceable block gated and says what it left out
    sd = StochasticDepth(seed=0)
    with pytest.warns(UserWarning, match="Untraceable.forward cannot be traced"):
        pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False)).fit(module, loader)
    assert [b.name for b in sd.handle.branches] == ["net.0"]


def test_untraceable_block_with_a_slot_is_gated_through_the_slot_without_warning():
    class SlotUntraceable(Untraceable):
        def __init__(self):
            super().__init__()
            self.drop_path = nn.Identity()  # what timm builds at drop_path_rate=0

        def forward(self, x):
            if x.sum() > 0:
                return x + self.drop_path(torch.relu(self.fc(x)))
            return x + self.drop_path(torch.relu(self.fc(x)))

    torch.manual_seed(3)
    model = nn.Sequential(SlotUntraceable(), SlotUntraceable()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        branches = find_residual_branches(model, strict=True)
    assert [(b.name, b.slot, b.skippable, b.shortcut) for b in branches] == [
        ("0", "0.drop_path", False, "slot"),
        ("1", "1.drop_path", False, "slot"),
    ]
    x = torch.rand(2, 6) + 0.1
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    h0 = x + torch.relu(model[0].fc(x))
    torch.testing.assert_close(_drop_only(model, handle, 1, x), h0)
    handle.remove()
    assert type(model[0].drop_path) is nn.Identity


class SliceResidual(nn.Module):
    """rexnet's form: the shortcut is added to the first C channels of the branch output."""

    def __init__(self, cin=4, cout=6, slot=None):
        super().__init__()
        self.cin = cin
        self.conv = nn.Linear(cin, cout)
        if slot is not None:
            self.drop_path = slot

    def forward(self, x):
        out = self.conv(x)
        if getattr(self, "drop_path", None) is not None:
            out = self.drop_path(out)
        return torch.cat([out[:, : self.cin] + x, out[:, self.cin :]], dim=1)


def test_slice_residual_without_slot_is_reported_with_the_fix():
    model = nn.Sequential(SliceResidual())
    with pytest.warns(UserWarning, match=r"(?s)also used outside the add.*DropPath"):
        assert find_residual_branches(model) == []


@pytest.mark.parametrize("slot", [DropPath(0.2), nn.Identity()])
def test_slice_residual_with_slot_is_gated_through_the_slot(slot):
    torch.manual_seed(4)
    model = nn.Sequential(SliceResidual(slot=slot)).eval()
    branches = find_residual_branches(model, strict=True)
    assert [(b.slot, b.skippable) for b in branches] == [("0.drop_path", False)]
    x = torch.randn(3, 4)
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    dropped = _drop_only(model, handle, 0, x)
    torch.testing.assert_close(dropped, torch.cat([x, torch.zeros(3, 2)], dim=1))


class ShortcutArgument(nn.Module):
    """dla's form: the shortcut comes in as a forward argument that defaults to None."""

    def __init__(self, w=6):
        super().__init__()
        self.fc = nn.Linear(w, w)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return shortcut + self.fc(x)


def test_shortcut_passed_as_an_optional_argument_is_reported():
    model = nn.Sequential(ShortcutArgument())
    with pytest.warns(UserWarning, match=r"(?s)forward argument 'shortcut' \(default None\).*blocks="):
        assert find_residual_branches(model) == []


class PosEmbed(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, w))
        self.blocks = nn.Sequential(Traceable(), Traceable())

    def forward(self, x):
        return self.blocks(x + self.pos)


def test_parameter_operand_is_not_a_residual():
    report = describe_branches(PosEmbed(), file=None)
    assert [b.name for b in report.branches] == ["blocks.0", "blocks.1"]
    assert any(p.where.startswith("<root>") and "position embedding" in p.reason for p in report.passed_over)


class RepSum(nn.Module):
    """Re-parameterisation: two parallel convs summed, no identity path."""

    def __init__(self, c=4):
        super().__init__()
        self.conv_kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.conv_1x1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.conv_1x1(x) + self.conv_kxk(x))


def test_parallel_weighted_sum_is_not_a_residual():
    report = describe_branches(nn.Sequential(RepSum(), RepSum()), file=None)
    assert report.branches == []
    assert [p.reason.split(" (")[0] for p in report.passed_over] == ["sum of parallel weighted paths without an identity path"] * 2


class Attention(nn.Module):
    """Attention that adds a relative-position term computed from its input (an add inside the mixer)."""

    def __init__(self, w=6):
        super().__init__()
        self.qkv = nn.Linear(w, w)
        self.pos = nn.Linear(w, w)

    def forward(self, x):
        return self.qkv(x) + self.pos(x)


class SlotBlock(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.norm = nn.LayerNorm(w)
        self.attn = Attention(w)
        self.cpe = Traceable(w)  # conv position encoding: a residual add without a slot
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = self.cpe(x)
        return x + self.drop_path(self.attn(self.norm(x)))


def test_slots_are_the_complete_list_and_outer_residual_wins():
    model = nn.Sequential(SlotBlock(), SlotBlock())
    report = describe_branches(model, file=None)
    assert [(b.name, b.modules, b.slot) for b in report.branches] == [
        (f"{i}", (f"{i}.norm", f"{i}.attn", f"{i}.drop_path"), f"{i}.drop_path") for i in (0, 1)
    ]
    assert report.slot_mode and report.uncovered == []
    passed = {p.where: p.reason for p in report.passed_over}
    assert any(w.startswith("0.cpe") and r.startswith("residual add without a drop-path slot") for w, r in passed.items())
    # blocks= names the passed-over position encodings.
    assert [b.name for b in find_residual_branches(model, blocks=r"\d\.cpe")] == ["0.cpe", "1.cpe"]
    assert [b.name for b in find_residual_branches(model, blocks=["1.cpe"])] == ["1.cpe"]
