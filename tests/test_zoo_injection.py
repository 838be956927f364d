"""Injection on real timm and torchvision models: train a step, evaluate, remove.

For a sample of small random-init zoo models across families (CPU, small inputs), checked against the
untouched model (a deepcopy taken before injection) and against the handle's own mask:

* eval output after one SGD step is bit-equal to the plain model loaded with the same weights;
* the branches that executed in the training forward (a forward hook on one module per gate) are
  exactly the gates the batch mask kept (``handle.kept``), and a skipped branch's parameters get no
  gradient;
* ``state_dict`` keys and values are unchanged by injection;
* after ``handle.remove()`` the model has its original module types and computes the plain model's
  output again, in eval and (with the model's own drop paths off) in training mode.

The whole-zoo coverage of discovery (every timm and torchvision model, on the meta device) is
``examples/benchmarks/zoo_coverage.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_sd

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

# (library, name, build kwargs, input side or shape without the batch). timm models get drop_path_rate=0.1 so that their drop-path
# slots exist. Sides are the smallest the model accepts, to keep the file to about a minute on 1 thread.
_DISCOVERY_RIGHT_TODAY = [
    ("timm", "resnet18", {}, 32),
    ("timm", "resnet10t", {}, 32),
    ("timm", "test_resnet", {}, 32),
    ("timm", "convnext_atto", {}, 32),
    ("timm", "test_convnext", {}, 32),
    ("timm", "vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("timm", "deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("timm", "test_vit", {"img_size": 32}, 32),
    ("timm", "swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64),
    ("timm", "efficientnet_b0", {}, 32),
    ("timm", "mobilenetv2_050", {}, 32),
    ("timm", "mobilenetv3_small_050", {}, 32),
    ("timm", "regnetx_002", {}, 32),
    ("timm", "regnety_002", {}, 32),
    ("timm", "poolformer_s12", {}, 32),
    ("timm", "nf_resnet26", {}, 32),
    ("timm", "test_nfnet", {}, 32),
    ("timm", "levit_128s", {"img_size": 64}, 64),
    ("timm", "mixer_s32_224", {"img_size": 64}, 64),
    ("timm", "pvt_v2_b0", {}, 64),
    ("timm", "test_byobnet", {}, 32),
    ("timm", "mobilevitv2_050", {}, 64),
    ("timm", "cs3darknet_focus_s", {}, 32),
    ("timm", "convnextv2_atto", {}, 32),
    ("torchvision", "resnet18", {}, 32),
    ("torchvision", "resnext50_32x4d", {}, 32),
    ("torchvision", "convnext_tiny", {}, 32),
    ("torchvision", "efficientnet_b0", {}, 32),
    ("torchvision", "efficientnet_v2_s", {}, 32),
    ("torchvision", "swin_t", {}, 64),
    ("torchvision", "swin_v2_t", {}, 64),
    ("torchvision", "maxvit_t", {}, 224),
    ("torchvision", "regnet_x_400mf", {}, 32),
    ("torchvision", "regnet_y_400mf", {}, 32),
    ("torchvision", "mobilenet_v2", {}, 32),
    ("torchvision", "mobilenet_v3_small", {}, 32),
    ("torchvision", "mnasnet0_5", {}, 32),
    ("torchvision", "vit_b_32", {"image_size": 32}, 32),
    ("torchvision", "quantized_resnet18", {}, 32),  # the residual add is FloatFunctional.add_relu
    ("torchvision", "quantized_mobilenet_v3_large", {}, 32),
    ("torchvision", "r3d_18", {}, (3, 4, 32, 32)),  # video: 3-D convolutions, clips of 4 frames
    ("torchvision", "swin3d_t", {}, (3, 4, 64, 64)),  # video: StochasticDepth slots
]

# Families whose discovery was wrong before issue 11 (gates on the wrong adds, missed drop paths); injection
# must stay clean with the gates they get now (where the gates are is checked in test_discovery_zoo.py).
_FAMILIES_BEING_FIXED = [
    ("timm", "coat_lite_tiny", {"img_size": 32}, 32),  # coat: gates were inside the shared conv position encoding
    ("timm", "gcresnet50t", {}, 32),  # byobnet gc*: gate inside the global-context module
    ("timm", "dm_nfnet_f0", {}, 32),  # nfnet: in-place mul_ moves the gate to the shortcut
    ("timm", "rexnet_100", {}, 32),  # rexnet: slice residual, gated at its drop-path slots only
    ("timm", "edgenext_xx_small", {}, 64),  # edgenext: nested residuals
    ("timm", "tiny_vit_5m_224", {}, 224),  # tiny_vit: branches depend on drop_path_rate
    ("timm", "xcit_nano_12_p16_224", {"img_size": 32}, 32),  # xcit: root position-embedding add gated
    ("timm", "repvgg_a0", {}, 32),  # repvgg: re-parameterisation sum gated
]

_MODELS = _DISCOVERY_RIGHT_TODAY + _FAMILIES_BEING_FIXED


def _build(library: str, name: str, kwargs: dict) -> nn.Module:
    if library == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=0.1, **kwargs)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def _probe_module(model: nn.Module, branch: lightning_sd.ResidualBranch, others: set[str], shared: set[int]) -> str | None:
    """A module run only by ``branch``, or None.

    Not a drop-path slot (injection replaces those), not in another branch, and registered under one
    name only (CoaT hands one position-encoding module to several blocks).
    """
    for name in branch.modules:
        module = model.get_submodule(name)
        if name == branch.slot or name in others or id(module) in shared:
            continue
        if lightning_sd.core.discovery.is_drop_path_slot(module):
            continue
        return name
    return None


@pytest.mark.parametrize(("library", "name", "kwargs", "side"), _MODELS, ids=[m.id if hasattr(m, "marks") else f"{m[0]}:{m[1]}" for m in _MODELS])
def test_inject_train_step_eval_remove(library: str, name: str, kwargs: dict, side: int | tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = _build(library, name, kwargs)
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    types = [(n, type(m)) for n, m in model.named_modules()]
    x = torch.randn(4, 3, side, side) if isinstance(side, int) else torch.randn(4, *side)
    target = torch.tensor([1, 7, 0, 3])

    handle = lightning_sd.inject_stochastic_depth(model, 0.5, drop="batch", seed=3)
    assert list(model.state_dict()) == keys
    # nor their values: tracing runs parts of a forward (timm's BatchNormAct2d counts a batch there)
    after = model.state_dict()
    assert [k for k, v in plain.state_dict().items() if not torch.equal(v, after[k])] == []
    branches = handle.branches
    assert len(branches) > 0

    # One hook per gate whose branch owns a module of its own: count its calls in the training forward.
    probes: dict[int, str] = {}
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    shared = {k for k, v in seen.items() if v > 1}
    for i, b in enumerate(branches):
        others = {m for j, o in enumerate(branches) if j != i for m in o.modules}
        probe = _probe_module(model, b, others, shared) if b.skippable else None
        if probe is not None:
            probes[i] = probe
    # Slot-only branches (the add cannot take a gate, e.g. rexnet's slice residual) are observed at their
    # gated slot: a dropped branch's slot output is exactly zero, a kept one's is not.
    slot_probes = {i: b.slot for i, b in enumerate(branches) if not b.skippable and b.slot is not None}
    assert probes or slot_probes, f"no branch of {name} can be observed"
    calls = dict.fromkeys(probes, 0)
    nonzero: dict[int, bool] = {}
    hooks = [
        model.get_submodule(mod).register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, mod in probes.items()
    ] + [
        model.get_submodule(slot).register_forward_hook(lambda _m, _a, out, i=i: nonzero.__setitem__(i, bool(out.ne(0).any())))
        for i, slot in slot_probes.items()
    ]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(model(x), target)
    for h in hooks:
        h.remove()
    kept = handle.kept
    executed = torch.tensor([calls[i] > 0 for i in probes], dtype=torch.bool)
    assert torch.equal(executed, kept[list(probes)]), f"executed {executed.tolist()} vs mask {kept[list(probes)].tolist()}"
    assert sorted(nonzero) == sorted(slot_probes)
    passed = torch.tensor([nonzero[i] for i in slot_probes], dtype=torch.bool)
    assert torch.equal(passed, kept[list(slot_probes)]), f"slot outputs {passed.tolist()} vs mask {kept[list(slot_probes)].tolist()}"
    loss.backward()
    for i, mod in probes.items():
        grads = [p.grad for p in model.get_submodule(mod).parameters()]
        if not kept[i]:
            assert all(g is None or not g.any() for g in grads), f"skipped branch {branches[i].name} got a gradient"
    opt.step()

    # Same weights in the plain model: the eval forward must be bit-equal.
    assert list(model.state_dict()) == keys
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))

    handle.remove()
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert list(model.state_dict()) == keys
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        # Training mode too (BatchNorm on batch statistics), with the models' own drop paths and dropout off.
        model.train()
        plain.train()
        for m in (*model.modules(), *plain.modules()):
            if lightning_sd.core.discovery.is_drop_path_slot(m) or isinstance(m, nn.Dropout):
                m.eval()
        assert torch.equal(model(x), plain(x))


def test_remove_restores_slots_in_the_models_current_mode() -> None:
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1)
    handle = lightning_sd.inject_stochastic_depth(model, 0.5)
    model.eval()
    handle.remove()
    slots = [n for n, m in model.named_modules() if lightning_sd.core.discovery.is_drop_path_slot(m)]
    assert len(slots) == 7  # resnet18: 8 blocks, the first at rate 0 has no DropPath
    assert [n for n, m in model.named_modules() if m.training] == []
    # and the other way: injected in eval mode, switched to training, removed
    model.eval()
    handle = lightning_sd.inject_stochastic_depth(model, 0.5)
    model.train()
    handle.remove()
    assert [n for n, m in model.named_modules() if not m.training] == []
