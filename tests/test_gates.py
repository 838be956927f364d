import copy

import pytest
import scipy.stats
import timm
import torch
import torchvision
from torch import nn

from lightning_sd.core.gates import existing_handle, inject_stochastic_depth, mask_generator
from lightning_sd.core.pruning import export_pruned
from lightning_sd.core.survival import survival_rates
from lightning_sd.models import CifarResNet, ResidualMLP
from tests.helpers import NestedResidualBlock


def manual_mlp(model: ResidualMLP, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Independent forward of the residual MLP with multipliers m (shape (L,) or (B, L))."""
    y = model.stem(x)
    for l, block in enumerate(model.blocks):
        ml = m[l] if m.ndim == 1 else m[:, l : l + 1]
        y = y + ml * block.branch_scale * torch.relu(y) @ block.linear.weight.T
    return model.head(y)


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        [("forward" in m.__dict__) for m in model.modules()],
    )


def assert_unchanged(model, snap):
    state, modules, forwards = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [("forward" in m.__dict__) for m in model.modules()] == forwards
    assert existing_handle(model) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_training_output_and_gradients_match_manual_batch_drop():
    torch.manual_seed(0)
    model = ResidualMLP(6, 10, 5, 3, stable=True)
    ref = copy.deepcopy(model)
    p = torch.tensor([0.9, 0.5, 0.7, 0.6, 0.8], dtype=torch.float64)
    handle = inject_stochastic_depth(model, p, drop="batch", scaling="inverted", auto_resample=False)
    x = torch.randn(4, 6)
    kept = handle.resample(step=3)
    out = model(x)
    out.square().sum().backward()
    m = kept.double() / p
    expected = manual_mlp(ref, x, m.float())
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Skipped branches get an exact zero gradient, so DDP sees every parameter used.
    for l, k in enumerate(kept.tolist()):
        if not k:
            assert torch.count_nonzero(model.blocks[l].linear.weight.grad) == 0


def test_sample_drop_matches_manual_per_example_masks():
    torch.manual_seed(1)
    model = ResidualMLP(6, 10, 4, 2)
    ref = copy.deepcopy(model)
    handle = inject_stochastic_depth(model, 0.6, drop="sample", scaling="expected", auto_resample=False)
    handle.resample(step=0)
    x = torch.randn(64, 6)
    out = model(x)
    masks = handle.drop_kind.masks.float()
    assert masks.shape == (64, 4)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out, manual_mlp(ref, x, masks))


def test_sample_drop_realized_depth_is_read_from_the_cpu_draw():
    # Masks drawn for a device are described by the CPU draw: realized_depth never reads the device
    # tensor (no device sync per step). A meta device has no values to read, so any read would fail.
    handle = inject_stochastic_depth(ResidualMLP(6, 10, 5, 2), 0.6, drop="sample", seed=4, auto_resample=False)
    handle.resample(3, batch_size=16)
    expected = float((handle.drop_kind.masks > 0).sum(dim=1).double().mean())
    assert 0 < expected < 5
    handle.resample(3, batch_size=16, device="meta")
    assert handle.drop_kind.masks.device.type == "meta"
    assert handle.realized_depth() == expected
    handle.resample(3, batch_size=16)
    handle.drop_kind.permute([4, 3, 2, 1, 0])  # renumbered masks: computed from them
    assert handle.realized_depth() == expected


@pytest.mark.parametrize("drop", ["batch", "sample"])
def test_realized_depth_counts_a_nested_residual_only_where_its_enclosing_branch_runs(drop):
    """timm EdgeNeXt's form: the inner residual (branch0) runs only where the outer branch (branch1) does.
    Batch drop: the realized depth is what the branches' modules saw (forward hooks); sample drop: an example
    runs the inner branch where its masks keep both."""
    torch.manual_seed(0)
    model = nn.Sequential(NestedResidualBlock(4), NestedResidualBlock(4)).train()
    handle = inject_stochastic_depth(model, 0.5, drop=drop, seed=1, auto_resample=False)
    assert handle.drop_kind.enclosing == [1, None, 3, None]
    seen = [0]
    for block in model:  # inner: the inner branch's module; out: the outer branch's
        for module in (block.inner, block.out):
            module.register_forward_hook(lambda _m, args, _out: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    ran, kept_flags, realized = 0.0, 0.0, 0.0
    x = torch.randn(8, 4)
    for step in range(40):
        handle.resample(step, batch_size=8)
        if drop == "batch":
            seen[0] = 0
            model(x)
            ran += seen[0] / 8
            kept_flags += float(handle.kept.sum())
        else:
            kept = handle.drop_kind.masks > 0
            for inner, outer in [(0, 1), (2, 3)]:
                ran += float((kept[:, inner] & kept[:, outer]).double().mean() + kept[:, outer].double().mean())
            kept_flags += float(kept.sum(dim=1).double().mean())
        realized += handle.realized_depth()
    assert realized == pytest.approx(ran)
    assert realized < kept_flags  # some inner gates were kept inside dropped outer branches


def test_batch_drop_does_not_call_dropped_modules():
    model = CifarResNet(20, width=4)
    calls = {}
    for name, mod in model.named_modules():
        if name.endswith(".conv1") or name.endswith(".conv2"):
            mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    handle = inject_stochastic_depth(model, 0.5, auto_resample=False)
    model.train()
    x = torch.randn(2, 3, 8, 8)
    total_kept = 0
    for step in range(10):
        calls.clear()
        kept = handle.resample(step)
        model(x).sum().backward()
        total_kept += int(kept.sum())
        for l, branch in enumerate(handle.branches):
            n = calls.get(f"{branch.block}.conv1", 0)
            assert n == int(kept[l]), (step, branch.name)
    assert 0 < total_kept < 90


def test_executed_fraction_matches_budget_binomial():
    model = ResidualMLP(4, 8, 20, 1)
    handle = inject_stochastic_depth(model, lambda L: survival_rates("linear", L, 0.6), auto_resample=False)
    executed = 0
    steps = 500
    per_block = torch.zeros(20)
    for step in range(steps):
        kept = handle.resample(step)
        executed += int(kept.sum())
        per_block += kept.float()
    n = steps * 20
    assert scipy.stats.binomtest(executed, n, 0.6).pvalue > 1e-3
    # Per-block frequencies follow the linear profile (each a binomial with its own p_l).
    p = handle.survival
    pvals = [scipy.stats.binomtest(int(per_block[l]), steps, float(p[l])).pvalue for l in range(20)]
    assert min(pvals) > 1e-4


def test_masks_are_seeded_and_leave_global_rng_alone():
    model = ResidualMLP(4, 8, 30, 1)
    h = inject_stochastic_depth(model, 0.5, seed=7, auto_resample=False)
    state = torch.get_rng_state()
    a = h.resample(5, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, h.resample(5, 1))
    assert not torch.equal(a, h.resample(6, 1))
    other = ResidualMLP(4, 8, 30, 1)
    assert torch.equal(inject_stochastic_depth(other, 0.5, seed=7, auto_resample=False).resample(5, 1), a)


def test_full_depth_steps_keep_every_branch_and_leave_the_stream_alone():
    # Rates of 1 keep every branch without a draw; the masks of the steps with rates below 1 are those
    # drawn from their own keys (u < p with u from mask_generator(seed, step, micro_batch, 0)).
    model = ResidualMLP(4, 8, 6, 1)
    h = inject_stochastic_depth(model, 0.4, seed=11, auto_resample=False)
    h.resample(0)
    h.set_survival([1.0] * 6)
    assert h.resample(1).tolist() == [True] * 6
    assert h.realized_depth() == 6
    h.set_survival([0.4] * 6)
    for step in (2, 3):
        u = torch.rand(6, generator=mask_generator(11, step, 0, 0), dtype=torch.float64)
        assert h.resample(step).tolist() == (u < 0.4).tolist()
    assert not all(h.kept.tolist())  # the seed draws at least one drop at step 3
    h.set_survival([1.0] * 6)
    assert h.resample(4).tolist() == [True] * 6


def test_masks_drawn_ahead_are_the_masks_drawn_at_their_step():
    # prefetch_masks draws the uniforms of future keys; resample of such a key uses them with the rates
    # of its own step. Each mask equals u < p with u from mask_generator(seed, step, micro_batch, 0).
    model = ResidualMLP(4, 8, 6, 1)
    h = inject_stochastic_depth(model, 0.5, seed=11, auto_resample=False)
    assert h.prefetch_masks([(step, step % 3) for step in range(10)]) == 10
    for step, rate in [(0, 0.5), (1, 0.3), (4, 0.8), (12, 0.5), (3, 0.5)]:  # 12: not drawn ahead; 3: after 4
        h.set_survival([rate] * 6)
        u = torch.rand(6, generator=mask_generator(11, step, step % 3, 0), dtype=torch.float64)
        assert h.resample(step, step % 3).tolist() == (u < rate).tolist()
    assert h.prefetch_masks([(20, 0), (21, 0)]) == 2  # replaces what was drawn ahead before
    assert list(h.drop_kind._ahead) == [(11, 20, 0), (11, 21, 0)]
    older = copy.copy(h.drop_kind.__dict__)  # a batch drop pickled before draws ahead existed
    del older["_ahead"]
    kind = type(h.drop_kind).__new__(type(h.drop_kind))
    kind.__setstate__(older)
    kind.resample(seed=11, key=(7, 1), rank=0, rates=[0.5] * 6, scaling="inverted")
    assert kind.kept == (torch.rand(6, generator=mask_generator(11, 7, 1, 0), dtype=torch.float64) < 0.5).tolist()
    sample = inject_stochastic_depth(ResidualMLP(4, 8, 6, 1), 0.5, drop="sample", auto_resample=False)
    assert sample.prefetch_masks([(0, 0)]) == 0  # per-example masks need the step's batch size
    with pytest.raises(ValueError, match=r"\(step, micro_batch\) pairs.*\(1, 2, 3\)"):
        h.prefetch_masks([(0, 0), (1, 2, 3)])


def test_auto_resample_draws_a_new_mask_per_training_forward():
    model = ResidualMLP(4, 8, 30, 1)
    h = inject_stochastic_depth(model, 0.5, seed=3)
    model.train()
    seen = set()
    for _ in range(5):
        model(torch.randn(2, 4))
        seen.add(tuple(h.kept.tolist()))
    assert len(seen) > 1


def test_auto_resample_can_be_turned_on_after_injection():
    model = ResidualMLP(4, 8, 30, 1).train()
    h = inject_stochastic_depth(model, 0.5, seed=3, auto_resample=False)
    model(torch.randn(2, 4))
    assert h.kept.all()  # no draw yet: every branch kept
    h.reconfigure(0.5, auto_resample=True)
    seen = set()
    for _ in range(5):
        model(torch.randn(2, 4))
        seen.add(tuple(h.kept.tolist()))
    assert len(seen) == 5 and h._auto_step == 5


@pytest.mark.parametrize(
    "factory",
    [
        lambda: torchvision.models.resnet18(num_classes=5),
        lambda: timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=5, img_size=32, patch_size=8),
        lambda: CifarResNet(20, width=4),
    ],
)
def test_eval_inverted_equals_plain_model(factory):
    model = factory().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    inject_stochastic_depth(model, 0.5)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_eval_expected_equals_p_scaled_network():
    model = ResidualMLP(6, 12, 6, 2).eval()
    ref = copy.deepcopy(model)
    p = survival_rates("linear", 6, 0.7)
    inject_stochastic_depth(model, p, scaling="expected")
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), manual_mlp(ref, x, p.float()))


def test_state_dict_of_trained_injected_model_loads_strict_into_plain_model():
    torch.manual_seed(0)
    model = CifarResNet(20, width=4)
    keys = list(model.state_dict())
    inject_stochastic_depth(model, 0.6)
    assert list(model.state_dict()) == keys
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,))).backward()
        opt.step()
    fresh = CifarResNet(20, width=4)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval(), fresh.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_remove_restores_the_model():
    model = timm.create_model("convnext_atto", drop_path_rate=0.2, num_classes=3)
    snap = snapshot(model)
    slots = sum(type(m).__name__ == "DropPath" for m in model.modules())
    assert slots == 11  # timm's linspace(0, 0.2) leaves the first block's slot an Identity
    h = inject_stochastic_depth(model, 0.5)
    assert sum(type(m).__name__ == "DropPath" for m in model.modules()) == 0  # slots taken over
    h.remove()
    assert_unchanged(model, snap)
    assert sum(type(m).__name__ == "DropPath" for m in model.modules()) == slots


def test_override_gives_gradients_wrt_multipliers():
    model = ResidualMLP(5, 8, 4, 1).eval()
    ref = copy.deepcopy(model)
    h = inject_stochastic_depth(model, 0.5)
    x = torch.randn(3, 5)
    m = torch.ones(3, 4, requires_grad=True)
    with h.override(m):
        out = model(x).sum()
    (grad,) = torch.autograd.grad(out, m)
    m2 = torch.ones(3, 4, requires_grad=True)
    (grad_ref,) = torch.autograd.grad(manual_mlp(ref, x, m2).sum(), m2)
    torch.testing.assert_close(grad, grad_ref)


# ----------------------------------------------------------------------------- bad input


def no_branch_model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(survival=1.5), ValueError, r"\[0, 1\]"),
        (dict(survival=[0.5] * 3), ValueError, "3 rates but the model has 9"),
        (dict(survival=0.5, drop="layer"), ValueError, "unknown drop"),
        (dict(survival=0.5, scaling="none"), ValueError, "unknown scaling"),
        (dict(survival=[0.0] + [0.5] * 8), ValueError, "scaling='expected'"),
        (dict(survival=0.5, blocks=r"nothing\..*"), ValueError, "matches no residual branch"),
        (dict(survival=0.5, blocks=["fc"]), ValueError, "computes no residual add"),
        (dict(survival=lambda L: survival_rates("linear", L, 0.3)), ValueError, "smallest feasible budget"),
    ],
)
def test_bad_input_leaves_model_unchanged(kwargs, error, match):
    model = CifarResNet(20, width=4)
    snap = snapshot(model)
    survival = kwargs.pop("survival")
    with pytest.raises(error, match=match):
        inject_stochastic_depth(model, survival, **kwargs)
    assert_unchanged(model, snap)


def test_no_residual_branch_message_shows_blocks():
    model = no_branch_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"found no residual branch.*blocks=\["):
        inject_stochastic_depth(model, 0.5)
    assert_unchanged(model, snap)


def test_injecting_twice_raises_and_keeps_first_injection():
    model = CifarResNet(20, width=4)
    h = inject_stochastic_depth(model, 0.5)
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(RuntimeError, match="already has stochastic-depth gates"):
        inject_stochastic_depth(model, 0.7)
    assert [n for n, _ in model.named_modules()] == modules
    assert torch.allclose(h.survival, torch.full((9,), 0.5))


def test_masking_without_skipping_equals_skipping():
    """The FSDP/DeepSpeed fallback (dropped branches multiplied by 0) gives the same values and gradients."""
    torch.manual_seed(0)
    skipping = ResidualMLP(6, 10, 8, 2)
    masking = copy.deepcopy(skipping)
    h1 = inject_stochastic_depth(skipping, 0.5, auto_resample=False)
    h2 = inject_stochastic_depth(masking, 0.5, auto_resample=False)
    h2.skip_compute = False
    calls = []
    masking.blocks[0].linear.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(5, 6)
    for step in range(6):
        k1, k2 = h1.resample(step), h2.resample(step)
        assert torch.equal(k1, k2)
        calls.clear()
        out1, out2 = skipping(x), masking(x)
        assert calls == [1]  # computed even when dropped
        torch.testing.assert_close(out1, out2)
        out1.sum().backward()
        out2.sum().backward()
    for (name, a), b in zip(skipping.named_parameters(), masking.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def _zero_gradient_nodes(out: torch.Tensor) -> int:
    """Nodes of the autograd graph of ``out`` that are the dropped branches' zero-gradient node."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_ZeroGradientsBackward"
        stack.extend(n for n, _ in node.next_functions)
    return count


def test_dropped_branches_share_one_zero_gradient_node_per_forward():
    """Every dropped branch's parameters get exact zero gradients, through one autograd node per forward,
    also when one step runs several forwards under the same masks (SAM, LBFGS closures, a discarded forward)."""
    torch.manual_seed(0)
    model = ResidualMLP(6, 12, 8, 2)
    handle = inject_stochastic_depth(model, 0.5, auto_resample=False, seed=1)
    kept = handle.resample(3).tolist()
    dropped = [i for i, k in enumerate(kept) if not k]
    assert 2 <= len(dropped) <= 6
    x = torch.randn(5, 6)

    def check_grads():
        for i, block in enumerate(model.blocks):
            grad = block.linear.weight.grad
            assert grad is not None
            assert (float(grad.abs().max()) == 0.0) == (i in dropped)
        model.zero_grad(set_to_none=True)

    out = model(x)
    assert _zero_gradient_nodes(out) == 1  # not one per dropped branch
    out.sum().backward()
    check_grads()
    out = model(x)  # SAM's second forward under the same masks: a node of its own
    assert _zero_gradient_nodes(out) == 1
    out.square().sum().backward()
    check_grads()
    model(x)  # a forward whose graph is discarded, then the one that is backwarded
    model(x).sum().backward()
    check_grads()
    # the blocks called directly (not through the model): the node waits for its backward, then re-arms
    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
    assert _zero_gradient_nodes(h) == 1
    model.head(h).sum().backward()
    check_grads()
    with torch.no_grad():  # no graph, no node
        assert model(x).grad_fn is None


def test_zero_gradients_after_backward_equal_the_graph_node_and_leave_existing_gradients():
    """``zero_gradients_in_graph=False``: no node in the graph, the dropped parameters have no gradient after
    the backward, and ``fill_zero_gradients`` gives them exact zeros; every gradient then equals the one the
    node gives. An existing gradient (accumulation) is left as it is."""
    torch.manual_seed(0)
    node_model = ResidualMLP(6, 12, 8, 2)
    fill_model = copy.deepcopy(node_model)
    node = inject_stochastic_depth(node_model, 0.5, auto_resample=False, seed=1)
    fill = inject_stochastic_depth(fill_model, 0.5, auto_resample=False, seed=1)
    fill.zero_gradients_in_graph = False
    x = torch.randn(5, 6)
    kept = node.resample(3).tolist()
    assert fill.resample(3).tolist() == kept
    dropped = [i for i, k in enumerate(kept) if not k]
    assert 2 <= len(dropped) <= 6
    node_model(x).sum().backward()
    out = fill_model(x)
    assert _zero_gradient_nodes(out) == 0
    out.sum().backward()
    assert [b.linear.weight.grad is None for b in fill_model.blocks] == [not k for k in kept]
    assert fill.fill_zero_gradients() == len(dropped)
    for a, b in zip(node_model.parameters(), fill_model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert all(float(fill_model.blocks[i].linear.weight.grad.abs().max()) == 0.0 for i in dropped)
    # a second micro-batch under new masks: the block dropped now but kept before keeps its gradient
    before = {i: b.linear.weight.grad.clone() for i, b in enumerate(fill_model.blocks)}
    kept2 = fill.resample(4).tolist()
    fill_model(x).sum().backward()
    assert fill.fill_zero_gradients() == 0  # every parameter already has a gradient
    for i, b in enumerate(fill_model.blocks):
        if not kept2[i]:
            assert torch.equal(b.linear.weight.grad, before[i])
    fill.skip_compute = False  # masking (FSDP): nothing is skipped, nothing to fill
    fill_model.zero_grad(set_to_none=True)
    fill_model(x).sum().backward()
    assert fill.fill_zero_gradients() == 0


class _InPlaceAfterAdd(nn.Module):
    """``out = x + f(x)`` followed by an in-place op on ``out``: legal, since the add made a new tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.linear(x)
        out.mul_(2.0)
        return out


class _KeepsInputs(nn.Module):
    """Reads each block's input again after the block ran (as U-Net skips or DenseNet features do)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_InPlaceAfterAdd(), _InPlaceAfterAdd()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) + x
        return x


def test_a_skipped_or_pruned_block_never_returns_its_input_itself():
    """A skipped branch leaves ``x + 0``, a new tensor: an in-place op after the gate must not write into
    the block's input, with or without autograd, trainable or frozen, in training or pruned evaluation."""
    torch.manual_seed(0)
    model = _KeepsInputs()
    handle = inject_stochastic_depth(model, [0.0, 1.0], drop="batch", scaling="expected", auto_resample=False, seed=0)
    handle.resample(0)
    assert handle.kept.tolist() == [False, True]
    x = torch.randn(3, 4)

    def expected() -> torch.Tensor:  # block 0 dropped: 2 x + x; block 1 kept
        h = 3.0 * x
        b = model.blocks[1]
        return 2.0 * (h + b.linear(h)) + h

    with torch.no_grad():
        want = expected()
    out = model(x.clone())
    assert torch.equal(out.detach(), want)  # the graph case (zero-gradient node and copies)
    with torch.no_grad():
        assert torch.equal(model(x.clone()), want)
    for p in model.parameters():
        p.requires_grad_(False)
    assert torch.equal(model(x.clone()), want)  # frozen: no dropped weight to touch
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    handle.prune(0.5, by="last")  # block 1 pruned, block 0 kept (scaling "expected" with p_0 = 0: 0 x f)
    h = 2.0 * x + x
    with torch.no_grad():
        assert torch.equal(model(x.clone()), 2.0 * h + h)
        exported = export_pruned(model)
        assert torch.equal(exported(x.clone()), 2.0 * h + h)


def test_dropped_channels_last_parameters_get_zero_gradients_in_their_layout():
    model = CifarResNet(depth=8, num_classes=3).to(memory_format=torch.channels_last)
    handle = inject_stochastic_depth(model, 1e-9, scaling="expected", auto_resample=False, seed=0)
    assert not any(handle.resample(0).tolist())
    model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    convs = [m for gate in handle.gates for m in gate.block.modules() if isinstance(m, nn.Conv2d) and m.weight.ndim == 4]
    assert len(convs) >= 2 * handle.num_blocks
    for conv in convs:
        grad = conv.weight.grad
        assert grad is not None and float(grad.abs().max()) == 0.0
        assert grad.stride() == conv.weight.stride() != torch.empty(conv.weight.shape).stride()


class _Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint`` (activations recomputed in the backward)."""

    def __init__(self, block: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("drop", ["batch", "sample", "subset"])
def test_activation_checkpointed_blocks_follow_the_plain_run(drop, use_reentrant):
    """Blocks under ``torch.utils.checkpoint`` (their gates run again in the backward's recomputation):
    the same outputs and gradients as without checkpointing, and exact zero gradients for dropped branches."""
    torch.manual_seed(0)
    model = ResidualMLP(6, 12, 8, 2)
    ref = copy.deepcopy(model)
    handle = inject_stochastic_depth(model, 0.5, drop=drop, auto_resample=False, seed=4)
    ref_handle = inject_stochastic_depth(ref, 0.5, drop=drop, auto_resample=False, seed=4)
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = _Checkpointed(block, use_reentrant)
    x = torch.randn(6, 6, requires_grad=use_reentrant)  # reentrant checkpoints need an input that requires grad
    for step in range(4):
        handle.resample(step, batch_size=6)
        ref_handle.resample(step, batch_size=6)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        out, expected = model(x), ref(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.square().sum().backward()
        expected.square().sum().backward()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            assert a.grad is not None, name
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
        if drop == "batch":
            kept = handle.drop_kind.kept_mask().tolist()
            assert not all(kept) and any(kept)
            for i, k in enumerate(kept):
                assert (torch.count_nonzero(model.blocks[i].block.linear.weight.grad) > 0) == k


def test_timm_gradient_checkpointing_follows_the_plain_run():
    """timm's own ``set_grad_checkpointing`` on a ViT with batch drop: as the same model without it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5)
    ref = copy.deepcopy(model)
    handle = inject_stochastic_depth(model, 0.5, auto_resample=False, seed=2)
    ref_handle = inject_stochastic_depth(ref, 0.5, auto_resample=False, seed=2)
    model.set_grad_checkpointing(True)
    x = torch.randn(3, 3, 32, 32)
    patterns = set()
    for step in range(4):
        patterns.add(tuple(handle.resample(step).tolist()))
        ref_handle.resample(step)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        out, expected = model(x), ref(x)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        out.square().sum().backward()
        expected.square().sum().backward()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert len(patterns) > 1
