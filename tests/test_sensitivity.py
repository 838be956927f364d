"""estimate_sensitivities: gradient S_l = dLoss/dm_l at m = 1 vs leave-one-out Loss(1) - Loss(1_l)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lightning_sd.core.gates import existing_handle, inject_stochastic_depth
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.models import CifarResNet, ResidualMLP


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only add contention (100x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MSE = supervised_loss(F.mse_loss)
CE = supervised_loss(F.cross_entropy)


def _toy_batches(num: int, batch: int = 64, dim: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The paper's toy regression sin(beta^T x) (beta scaled so the target is not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(dim, generator=g) / math.sqrt(dim)
    out = []
    for _ in range(num):
        x = torch.randn(batch, dim, generator=g)
        out.append((x, torch.sin(x @ beta).unsqueeze(1)))
    return out


def _manual_loss(model: ResidualMLP, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ResidualMLP forward written out by hand with explicit multipliers (no gates involved)."""
    h = model.stem(x)
    for l, block in enumerate(model.blocks):
        h = h + m[l] * block.branch_scale * block.linear(torch.relu(h))
    return F.mse_loss(model.head(h), y)


def test_gradient_matches_hand_written_derivative():
    model = ResidualMLP(16, width=24, depth=6, out_features=1, stable=True)
    batches = _toy_batches(3)
    S = estimate_sensitivities(model, batches, MSE)
    expected = torch.zeros(6, dtype=torch.float64)
    for x, y in batches:
        m = torch.ones(6, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(_manual_loss(model.double(), x.double(), y.double(), m), m)
        expected += g
    model.float()
    assert S.dtype == torch.float32 and S.shape == (6,)
    # float32 forward vs float64 reference: relative error ~1e-6 on O(0.1) values.
    torch.testing.assert_close(S.double(), expected / 3, rtol=1e-4, atol=1e-6)


def test_exact_matches_hand_written_leave_one_out():
    model = ResidualMLP(16, width=24, depth=5, out_features=1, stable=False)
    batches = _toy_batches(2)
    S = estimate_sensitivities(model, batches, MSE, method="exact")
    expected = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for x, y in batches:
            full = _manual_loss(model, x, y, torch.ones(5))
            for l in range(5):
                m = torch.ones(5)
                m[l] = 0.0
                expected[l] += float(full - _manual_loss(model, x, y, m))
    torch.testing.assert_close(S.double(), expected / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [16, 32])
def test_gradient_ranks_blocks_like_leave_one_out_on_stable_mlp(depth):
    # The paper's approximation S_l = L(1) - L(1_l) ~ dL/d delta_l: on a Stable ResNet (branches
    # scaled by 1/sqrt(L)) removing one block is a small perturbation, so the ranking must agree
    # and both must be in the same units with the same sign convention: the least-squares slope of
    # exact on gradient is ~1 (the offset is the second-order term -H_ll/2, common to all blocks).
    torch.manual_seed(depth)
    model = ResidualMLP(16, width=32, depth=depth, out_features=1, stable=True)
    batches = _toy_batches(4, batch=128, seed=depth)
    grad = estimate_sensitivities(model, batches, MSE)
    exact = estimate_sensitivities(model, batches, MSE, method="exact")
    assert spearmanr(grad.numpy(), exact.numpy()).statistic >= 0.9
    slope = float(((grad - grad.mean()) * (exact - exact.mean())).sum() / ((grad - grad.mean()) ** 2).sum())
    assert 0.7 < slope < 1.5, slope


def test_cifar_resnet20_sensitivities_finite_and_side_effect_free():
    model = CifarResNet(20, num_classes=10, width=4)
    model.train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    S = estimate_sensitivities(model, batches, CE)
    assert S.shape == (9,) and bool(torch.isfinite(S).all()) and bool((S != 0).any())
    # BatchNorm running stats (train mode) restored, no parameter gradients, gates removed, RNG untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert existing_handle(model) is None
    assert not any("_sd_gate" in name for name, _ in model.named_modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_buffers_change_without_restore():
    # The control for the test above: train-mode forwards do update BatchNorm statistics.
    model = CifarResNet(8, num_classes=10, width=4)
    before = model.layer1[0].bn1.running_mean.clone()
    batches = [(torch.randn(8, 3, 8, 8) + 3.0, torch.randint(0, 10, (8,)))]
    estimate_sensitivities(model, batches, CE, restore_buffers=False)
    assert not torch.equal(before, model.layer1[0].bn1.running_mean)


def test_injected_model_uses_its_gates_with_all_blocks_on():
    torch.manual_seed(3)
    model = ResidualMLP(16, width=24, depth=6, out_features=1, stable=True)
    batches = _toy_batches(2)
    plain = estimate_sensitivities(model, batches, MSE)
    handle = inject_stochastic_depth(model, 0.3, drop="batch", scaling="inverted", seed=5)
    model.train()
    injected = estimate_sensitivities(model, batches, MSE)
    # Same values: inside the measurement every branch runs with m = 1, whatever p and the masks.
    torch.testing.assert_close(injected, plain, rtol=0, atol=0)
    assert existing_handle(model) is handle  # not removed
    with pytest.raises(ValueError, match="already has stochastic-depth gates"):
        estimate_sensitivities(model, batches, MSE, blocks=["blocks.0"])
    handle.remove()


def test_batches_are_averaged_and_num_batches_limits():
    model = ResidualMLP(16, width=24, depth=4, out_features=1)
    batches = _toy_batches(3)
    per = [estimate_sensitivities(model, [b], MSE) for b in batches]
    torch.testing.assert_close(estimate_sensitivities(model, batches, MSE), torch.stack(per).mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        estimate_sensitivities(model, iter(batches), MSE, num_batches=2), torch.stack(per[:2]).mean(0), rtol=1e-6, atol=1e-7
    )


def test_blocks_subset_of_plain_model():
    model = ResidualMLP(16, width=24, depth=6, out_features=1, stable=True)
    batches = _toy_batches(1)
    full = estimate_sensitivities(model, batches, MSE)
    sub = estimate_sensitivities(model, batches, MSE, blocks=["blocks.1", "blocks.4"])
    torch.testing.assert_close(sub, full[[1, 4]], rtol=1e-5, atol=1e-7)


def test_autocast_bf16_close_to_fp32():
    model = ResidualMLP(16, width=32, depth=8, out_features=1, stable=True)
    batches = _toy_batches(2)
    ref = estimate_sensitivities(model, batches, MSE)
    bf16 = estimate_sensitivities(model, batches, MSE, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32
    # bf16 has an 8-bit mantissa (relative rounding 2^-8 ~ 0.4% per op, a few % after 8 blocks).
    torch.testing.assert_close(bf16, ref, rtol=0.1, atol=0.05 * float(ref.abs().max()))


def test_dict_loss_and_errors():
    model = ResidualMLP(16, width=8, depth=3, out_features=1)
    batches = _toy_batches(1)
    as_dict = estimate_sensitivities(model, batches, lambda m, b: {"loss": MSE(m, b)})
    torch.testing.assert_close(as_dict, estimate_sensitivities(model, batches, MSE))
    with pytest.raises(ValueError, match="unknown method"):
        estimate_sensitivities(model, batches, MSE, method="taylor")
    with pytest.raises(ValueError, match="yielded no batch"):
        estimate_sensitivities(model, [], MSE)
    with pytest.raises(ValueError, match="scalar loss"):
        estimate_sensitivities(model, batches, lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(RuntimeError, match="does not depend on the block multipliers"):
        estimate_sensitivities(model, batches, lambda m, b: b[1].sum())
    with pytest.raises(ValueError, match="num_batches"):
        estimate_sensitivities(model, batches, MSE, num_batches=0)
    assert existing_handle(model) is None  # temporary gates removed after the errors too
