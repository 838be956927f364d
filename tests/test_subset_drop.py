"""drop="subset" (DINOv2's per-example stochastic depth): each block runs its branch on round(p B) rows."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks import StochasticDepth
from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.models.residual_mlp import ResidualMLP, ResidualMLPBlock
from tests.helpers import NestedResidualBlock, RegressionModule, trainer_kwargs


def _one_block(width: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(ResidualMLPBlock(width, branch_scale=0.7))


@pytest.mark.parametrize(("rate", "batch", "size"), [(0.5, 10, 5), (0.25, 10, 2), (0.01, 10, 1), (1.0, 7, 7)])
@pytest.mark.parametrize("scaling", ["inverted", "expected"])
def test_the_branch_runs_on_round_pB_rows_and_is_scaled(rate: float, batch: int, size: int, scaling: str) -> None:
    model = _one_block()
    plain = copy.deepcopy(model)
    handle = inject_stochastic_depth(model, rate, drop="subset", scaling=scaling, seed=3)
    seen: list[int] = []
    model[0].linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    x = torch.randn(batch, 6, requires_grad=True)
    handle.resample(step=1)
    y = model.train()(x)
    assert seen == [size]  # the branch saw only the subset's rows
    changed = torch.nonzero((y - x).abs().sum(dim=1) > 0).flatten()
    assert changed.numel() == size  # the other rows are the shortcut, exactly
    assert torch.equal(y[~torch.isin(torch.arange(batch), changed)], x[~torch.isin(torch.arange(batch), changed)])
    # independent computation on the changed rows: x + scale * 0.7 W relu(x)
    block = plain[0]
    scale = batch / size if scaling == "inverted" else 1.0
    expected = x[changed] + scale * block.branch_scale * block.linear(block.act(x[changed]))
    torch.testing.assert_close(y[changed], expected, rtol=1e-6, atol=1e-6)
    # gradient of the weight: only the subset's rows contribute, with the scale
    (y.sum()).backward()
    ref = plain[0].linear.weight.detach().clone().requires_grad_(True)
    manual = (scale * block.branch_scale * (block.act(x[changed].detach()) @ ref.T)).sum()
    (grad,) = torch.autograd.grad(manual, ref)
    torch.testing.assert_close(model[0].linear.weight.grad, grad, rtol=1e-6, atol=1e-6)
    assert handle.realized_depth() == pytest.approx(size / batch)


@pytest.mark.parametrize("drawn_at_resample", [True, False])
def test_a_residual_inside_a_branch_runs_on_a_subset_of_its_enclosing_subset(drawn_at_resample: bool) -> None:
    """timm EdgeNeXt's form (an inner residual inside the outer branch): the inner block sees the outer subset's
    rows only, and runs on round(p k) of those k. Values and gradients against a hand computation of the DINOv2
    rule applied twice; the realized depth counts the inner rows against the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(NestedResidualBlock(6))
    plain = copy.deepcopy(model)[0]
    handle = inject_stochastic_depth(model, [0.5, 0.75], drop="subset", scaling="inverted", seed=3)  # inner 0.5, outer 0.75
    assert handle.drop_kind.enclosing == [1, None]
    x = torch.randn(8, 6)
    handle.resample(step=2, batch_size=8 if drawn_at_resample else None)
    seen: list[int] = []
    model[0].inner.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    y = model.train()(x)
    outer_rows = handle.drop_kind.rows(1, 8, handle._p, x.device)  # the rows this step drew, as the gates read them
    inner_rows = handle.drop_kind.rows(0, 6, handle._p, x.device)
    assert outer_rows.numel() == 6 and inner_rows.numel() == 3 and seen == [3]  # round(0.75 * 8), round(0.5 * 6)
    assert int(inner_rows.max()) < 6  # rows of the outer subset, not of the batch
    # the DINOv2 rule by hand, on a copy of the block's parameters
    params = {n: p.detach().clone().requires_grad_(True) for n, p in plain.named_parameters()}
    fc, inner, out = (lambda t, k=k: torch.nn.functional.linear(t, params[f"{k}.weight"], params[f"{k}.bias"]) for k in ("fc", "inner.0", "out"))
    h = fc(x[outer_rows])
    h = h.index_add(0, inner_rows, params["gamma_inner"] * inner(h[inner_rows]), alpha=6 / 3)
    expected = x.index_add(0, outer_rows, out(torch.relu(h)), alpha=8 / 6)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    expected.square().sum().backward()
    for name, param in model[0].named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-6, atol=1e-6, msg=name)
    assert handle.realized_depth() == pytest.approx((6 + 3) / 8)


def test_eval_is_the_plain_or_p_scaled_network() -> None:
    model, x = _one_block(), torch.randn(5, 6)
    plain = copy.deepcopy(model).eval()
    handle = inject_stochastic_depth(model, 0.4, drop="subset", scaling="inverted", seed=0)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(x))
    handle.reconfigure(0.4, scaling="expected")
    block = plain[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), x + 0.4 * block.branch_scale * block.linear(block.act(x)))


def test_subsets_differ_between_blocks_and_steps_and_repeat_for_the_same_key() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(4, 8, 4, 1)
    handle = inject_stochastic_depth(model, 0.5, drop="subset", seed=11)
    kind = handle.drop_kind
    handle.resample(step=0)
    first = [kind.rows(i, 16, handle._p, torch.device("cpu")).tolist() for i in range(4)]
    assert all(len(r) == 8 for r in first) and len({tuple(r) for r in first}) == 4
    handle.resample(step=1)
    assert [kind.rows(i, 16, handle._p, torch.device("cpu")).tolist() for i in range(4)] != first
    handle.resample(step=0)
    assert [kind.rows(i, 16, handle._p, torch.device("cpu")).tolist() for i in range(4)] == first


def test_the_callback_trains_with_subset_drop(tmp_path) -> None:
    torch.manual_seed(0)
    module = RegressionModule(in_features=8, width=16, depth=6)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(32, 8), torch.randn(32, 1)), batch_size=8)
    sd = StochasticDepth(mode="linear", budget=0.6, drop="subset", seed=0)
    trainer = pl.Trainer(max_steps=4, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, loader)
    assert trainer.global_step == 4 and sd.handle.drop == "subset"
    # every block's weights moved (every parameter gets a gradient every step)
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert all(any(k.startswith(f"net.blocks.{i}.") for k in changed) for i in range(6))
    # realized depth of the last step: sum over blocks of max(1, round(p_l B)) / B
    sizes = [min(8, max(1, round(float(p) * 8))) for p in sd.handle.survival_float64]
    assert sd.handle.realized_depth() == pytest.approx(sum(sizes) / 8)


def test_branches_with_batchnorm_are_named_in_one_warning() -> None:
    from lightning_sd.models.cifar_resnet import CifarResNet

    with pytest.warns(UserWarning, match=r"3 residual branch\(es\) contain BatchNorm \(layer1\.0.*subset") as record:
        handle = inject_stochastic_depth(CifarResNet(8, width=4), 0.5, drop="subset")
    assert len([r for r in record if "BatchNorm" in str(r.message)]) == 1
    with pytest.warns(UserWarning, match="contain BatchNorm"):
        handle.reconfigure(0.5, drop="batch")
        handle.reconfigure(0.5, drop="subset")  # switching to subset warns again
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_stochastic_depth(ResidualMLP(4, 8, 3, 1), 0.5, drop="subset")  # no BatchNorm: silent
