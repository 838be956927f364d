"""Slots timm keeps at rate 0 whatever drop_path_rate is get no gate; the schedule's rate-0 slots do."""

import warnings

import pytest
import torch
from torch import nn

from lightning_sd.core.discovery import describe_branches, find_residual_branches
from lightning_sd.core.timm_placement import timm_fixed_zero_slots

timm = pytest.importorskip("timm")


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _branches(model: nn.Module) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [b.name for b in find_residual_branches(model)]


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_cait_class_attention_blocks_are_passed_over_at_any_rate(rate: float) -> None:
    model = _meta("cait_xxs24_224", drop_path_rate=rate)
    # 24 LayerScaleBlocks x (attention, MLP); the 2 class-attention blocks are never dropped by timm.
    assert sorted(timm_fixed_zero_slots(model)) == ["blocks_token_only.0.drop_path", "blocks_token_only.1.drop_path"]
    names = _branches(model)
    assert len(names) == 48 and not any(n.startswith("blocks_token_only") for n in names)
    assert names[:2] == ["blocks.0.branch0", "blocks.0.branch1"]
    report = describe_branches(model, file=None)
    fixed = [p for p in report.passed_over if "timm keeps this drop-path slot at rate 0" in p.reason]
    assert sorted({p.where.split(" ")[0] for p in fixed}) == ["blocks_token_only.0", "blocks_token_only.1"]
    assert len(fixed) == 4  # two adds per class-attention block


def test_schedule_rate_zero_slots_stay_branches() -> None:
    # timm's linear schedule gives the first block rate 0 (an Identity slot): still a branch
    model = _meta("resnet18", drop_path_rate=0.1)
    assert model.layer1[0].drop_path is None and model.layer1[1].drop_path is not None
    assert timm_fixed_zero_slots(model) == frozenset()
    assert len(_branches(model)) == 8


def test_a_timm_model_inside_a_wrapper_is_found_with_its_prefix() -> None:
    wrapper = nn.Module()
    wrapper.net = _meta("xcit_nano_12_p16_224", drop_path_rate=0.1)
    fixed = timm_fixed_zero_slots(wrapper)
    assert fixed and all(s.startswith("net.cls_attn_blocks.") for s in fixed)
    names = _branches(wrapper)  # 12 XCA blocks x (attention, local patch interaction, MLP)
    assert len(names) == 36 and not any("cls_attn" in n for n in names)


def test_changed_structure_is_not_answered_and_every_slot_stays_a_branch() -> None:
    model = _meta("cait_xxs24_224", drop_path_rate=0.1)
    del model.blocks[23]  # no longer the architecture timm builds: the reference cannot vouch for it
    assert timm_fixed_zero_slots(model) == frozenset()
    assert len(_branches(model)) == 2 * 23 + 4


def test_a_non_timm_model_has_no_fixed_zero_slot() -> None:
    from lightning_sd.models import ResidualMLP

    assert timm_fixed_zero_slots(ResidualMLP(4, 8, 3, 1)) == frozenset()


def test_resnest_input_drop_is_not_a_gate_and_is_reported() -> None:
    # ResNeSt applies DropPath to the block input before the downsample: it drops no branch. The slot is
    # left alone and named; the blocks that hold the slots are gated by structure (projection shortcuts)
    model = _meta("resnest14d", drop_path_rate=0.1)
    with pytest.warns(UserWarning, match=r"(?s)layer1\.0\.drop_path: drop-path slot applied to something that is "
                      r"not added to a shortcut: left alone; the block holding it is gated by structure.*drop_path_rate=0"):
        branches = find_residual_branches(model)
    assert [b.name for b in branches] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert all(b.slot is None and not any(m.endswith("drop_path") for m in b.modules) for b in branches)
    # a regex names the blocks the slots do not mark, and gates them by structure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named = find_residual_branches(model, r"layer\d\.\d+")
    assert [b.name for b in named] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
