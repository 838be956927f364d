"""Depth on demand, core (issue 15): handle.prune / unprune and export_pruned."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_sd.core.gates import existing_handle, inject_stochastic_depth
from lightning_sd.core.pruning import PRUNE_BY, blocks_to_keep, export_pruned, num_kept
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.models import CifarResNet, ResidualMLP

L = 8


def mlp(seed: int = 0) -> ResidualMLP:
    torch.manual_seed(seed)
    return ResidualMLP(6, width=12, depth=L, out_features=3, stable=True)


def mlp_forward(model: ResidualMLP, x: torch.Tensor, kept: list[int], scale: list[float] | None = None) -> torch.Tensor:
    """The MLP written out: y_l = y_{l-1} + c_l s W_l relu(y_{l-1}) for the kept blocks only."""
    y = x @ model.stem.weight.T
    for i, block in enumerate(model.blocks):
        if i in kept:
            c = 1.0 if scale is None else scale[i]
            y = y + c * (block.branch_scale * (torch.relu(y) @ block.linear.weight.T))
    return y @ model.head.weight.T


# ------------------------------------------------------------------------------------------------ choosing
def test_blocks_to_keep_by_each_rule() -> None:
    s = [0.1, -0.9, 0.3, 0.0, 0.5, -0.2, 0.3, 0.05]
    assert blocks_to_keep(0.5, "sensitivity", L, sensitivities=s) == [1, 2, 4, 6]  # |S|: .9 .5 .3 .3 (tie: earlier)
    p = [0.9, 0.2, 0.8, 0.8, 0.3, 0.7, 0.1, 0.6]
    assert blocks_to_keep(0.25, "survival", L, survival=p) == [0, 2]  # 0.8 twice: the earlier wins
    assert blocks_to_keep(0.5, "every_other", L) == [0, 2, 4, 6]
    assert blocks_to_keep(0.75, "every_other", L) == [0, 1, 2, 4, 5, 6]
    assert blocks_to_keep(0.5, "last", L) == [0, 1, 2, 3]
    assert blocks_to_keep(1.0, "last", L) == list(range(L))
    assert [num_kept(k, 9) for k in (1.0, 0.75, 0.5, 0.25, 0.01)] == [9, 7, 5, 2, 1]  # round half up, at least 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: blocks_to_keep(0.0, "last", L), "keep must be"),
        (lambda: blocks_to_keep(1.5, "last", L), "keep must be"),
        (lambda: blocks_to_keep(0.5, "random", L), "unknown by='random'"),
        (lambda: blocks_to_keep(0.5, "sensitivity", L), "needs sensitivities"),
        (lambda: blocks_to_keep(0.5, "sensitivity", L, sensitivities=[1.0] * 3), "3 entries"),
        (lambda: blocks_to_keep(0.5, "sensitivity", L, sensitivities=[math.nan] * L), "finite"),
    ],
)
def test_bad_pruning_arguments(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_prune_by_sensitivity_without_sensitivities_or_data_is_refused() -> None:
    handle = inject_stochastic_depth(mlp(), 0.5)
    with pytest.raises(ValueError, match="by='sensitivity' needs sensitivities"):
        handle.prune(0.5, by="sensitivity")
    assert handle.pruned == []


# ------------------------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("by", PRUNE_BY)
def test_prune_skips_exactly_the_chosen_blocks(by) -> None:
    model = mlp()
    handle = inject_stochastic_depth(model, [0.9, 0.5, 0.8, 0.6, 0.7, 0.55, 0.95, 0.52], scaling="expected")
    s = torch.linspace(-1, 1, L) ** 3
    kept = handle.prune(0.5, by=by, sensitivities=s)
    assert kept == blocks_to_keep(0.5, by, L, survival=handle.survival_float64, sensitivities=s)
    assert handle.pruned == [i for i in range(L) if i not in kept]
    called: list[int] = []
    hooks = [b.linear.register_forward_hook(lambda m, a, o, i=i: called.append(i)) for i, b in enumerate(model.blocks)]
    x = torch.randn(5, 6)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert called == kept  # exactly the kept branches ran, in order
    torch.testing.assert_close(out, mlp_forward(model, x, kept, handle.survival.tolist()), rtol=1e-6, atol=1e-6)
    # training is unchanged by pruning: every branch runs when the step's mask keeps it
    called.clear()
    model.train()
    handle.reconfigure(1.0, scaling="expected")
    model(x)
    assert called == list(range(L))
    for h in hooks:
        h.remove()


def test_prune_on_a_cnn_hooks_and_shortcut() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20, width=4).eval()
    handle = inject_stochastic_depth(model, 0.5)
    kept = handle.prune(0.5, by="every_other")
    called: list[int] = []
    for i, b in enumerate(handle.branches):
        model.get_submodule(b.modules[0]).register_forward_hook(lambda m, a, o, i=i: called.append(i))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert called == kept == [0, 1, 3, 5, 7]


def test_unprune_restores_bit_equal_outputs_and_override_ignores_pruning() -> None:
    model = mlp()
    handle = inject_stochastic_depth(model, 0.5)
    model.eval()
    x = torch.randn(7, 6)
    full = model(x)
    handle.prune(0.25, by="last")
    assert not torch.equal(model(x), full)
    # probes (override) run every block whatever the pruning: sensitivities are those of the full network
    batches = [(x, torch.randint(0, 3, (7,)))]
    s_pruned = estimate_sensitivities(model, batches, supervised_loss(F.cross_entropy))
    handle.unprune()
    assert handle.pruned == []
    assert torch.equal(model(x), full)
    assert torch.equal(s_pruned, estimate_sensitivities(model, batches, supervised_loss(F.cross_entropy)))


def test_prune_by_sensitivity_measures_the_evaluation_network() -> None:
    model = mlp()
    handle = inject_stochastic_depth(model, 0.5)
    model.train()
    torch.manual_seed(1)
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    loss = supervised_loss(F.cross_entropy)
    kept = handle.prune(0.5, by="sensitivity", batches=batches, loss_fn=loss)
    assert model.training  # the mode is restored
    reference = copy.deepcopy(model).eval()
    s = estimate_sensitivities(reference, batches, loss)
    assert kept == blocks_to_keep(0.5, "sensitivity", L, sensitivities=s)


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("scaling", ["inverted", "expected"])
def test_export_pruned_runs_as_the_pruned_gated_model_and_round_trips(scaling) -> None:
    model = mlp()
    handle = inject_stochastic_depth(model, [0.9, 0.5, 0.8, 0.6, 0.7, 0.55, 0.95, 0.52], scaling=scaling)
    kept = handle.prune(0.5, by="survival")
    assert kept == [0, 2, 4, 6]
    model.eval()
    x = torch.randn(9, 6)
    want = model(x)
    keys = list(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())

    small = export_pruned(model)
    assert existing_handle(small) is None and existing_handle(model) is handle
    assert handle.pruned == [1, 3, 5, 7] and list(model.state_dict()) == keys  # the original is as it was
    assert torch.equal(model(x), want)
    assert torch.equal(small(x), want)
    small.train()
    assert torch.equal(small(x), want)  # no randomness left: training mode runs the same network
    # the pruned branches' weights are gone, nothing else
    pruned_keys = {f"blocks.{i}.linear.weight" for i in (1, 3, 5, 7)}
    assert set(small.state_dict()) == set(keys) - pruned_keys
    assert sum(p.numel() for p in small.parameters()) == n_params - 4 * 12 * 12
    # state_dict round trip into the export of another model of the same architecture and pruning
    other = mlp(seed=5)
    inject_stochastic_depth(other, [0.9, 0.5, 0.8, 0.6, 0.7, 0.55, 0.95, 0.52], scaling=scaling).prune(0.5, by="survival")
    other_small = export_pruned(other)
    assert not torch.equal(other_small(x), want)
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    other_small.load_state_dict(torch.load(buf))
    assert torch.equal(other_small(x), want)
    # a whole-module pickle works too
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), want)
    # and the written-out network agrees
    scale = handle.survival.tolist() if scaling == "expected" else None
    torch.testing.assert_close(want, mlp_forward(model, x, kept, scale), rtol=1e-6, atol=1e-6)


def test_export_pruned_cnn_with_batchnorm_and_projection_shortcuts() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20, width=4)
    handle = inject_stochastic_depth(model, 0.5)
    x = torch.randn(4, 3, 8, 8)
    model.train()
    model(x)  # move the BatchNorm statistics away from their initial values
    model.eval()
    handle.prune(0.5, by="every_other")
    want = model(x)
    small = export_pruned(model)
    assert torch.equal(small(x), want)
    assert handle.pruned == [2, 4, 6, 8]  # layer1.2, layer2.1, layer3.0 (projection shortcut), layer3.2
    for name in ("layer1.2", "layer2.1", "layer3.0", "layer3.2"):
        assert not any(k.startswith(name + ".conv") or k.startswith(name + ".bn") for k in small.state_dict()), name
    assert "layer1.1.conv1.weight" in small.state_dict()


def test_export_pruned_needs_gates() -> None:
    with pytest.raises(ValueError, match="no stochastic-depth gates"):
        export_pruned(mlp())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)),  # 2 branches per block
        ("convnext_atto", {}),
        ("resnet18", {}),  # projection shortcuts
    ],
)
def test_export_pruned_timm_models_round_trip(name, kwargs) -> None:
    timm = pytest.importorskip("timm")

    def build(seed: int):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
        handle = inject_stochastic_depth(model, 0.5)
        handle.prune(0.5, by="every_other")
        return model, handle

    model, handle = build(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        small = export_pruned(model)
        assert torch.equal(small(x), want)
    gone = {m for i in handle.pruned for m in handle.branches[i].modules}
    assert gone and not any(k.startswith(m + ".") for m in gone for k in small.state_dict())  # their weights left
    other = export_pruned(build(1)[0])
    with torch.no_grad():
        assert not torch.equal(other(x), want)  # other weights
        other.load_state_dict(small.state_dict())
        assert torch.equal(other(x), want)
