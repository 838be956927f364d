"""normality_pvalues: Theorem 2 / Fig. 5 of Hayou & Ayed (2021), batched masks, scipy tests, restoration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_sd.core.gates import existing_handle, inject_stochastic_depth
from lightning_sd.core.normality import masked_samples, normality_pvalues, normality_test, sample_multipliers
from lightning_sd.models import CifarResNet, ResidualMLP


@pytest.fixture(autouse=True)
def _one_thread():
    # Small matmuls on a shared 2-core machine: OpenMP spin-waits make 2 threads ~50x slower than 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _manual_mlp(model: ResidualMLP, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent forward of the ResidualMLP with per-example multipliers m (B, L): output and all y_l."""
    y = x @ model.stem.weight.T
    ys = []
    for l, block in enumerate(model.blocks):
        y = y + m[:, l : l + 1] * block.branch_scale * (torch.relu(y) @ block.linear.weight.T)
        ys.append(y)
    return y @ model.head.weight.T, torch.stack(ys, dim=1)


# ----------------------------------------------------------------------------- the paper's claim (Fig. 5)


def test_deep_stable_resnet_output_is_gaussian_shallow_is_not() -> None:
    # Fig. 5: Stable Vanilla ResNet, width 128, depth 100, uniform mode with budget 0.7, 256-dim standard
    # Gaussian inputs (the toy regression's), 200 masks per input, the single output neuron.
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    deep = ResidualMLP(256, width=128, depth=100, out_features=1, stable=True)
    res = normality_pvalues(deep, x, 0.7, num_masks=200, per_block=True, seed=1)
    assert res.pvalues.shape == (16,) and res.block_pvalues.shape == (16, 100)
    # Under exact normality p ~ U(0, 1): median 0.5, and the median of 16 uniforms is below 0.05 with
    # probability ~1e-15. The sum over 100 blocks of eta_l mu_l (Theorem 2) is close to Gaussian.
    assert res.median() > 0.05
    assert res.fraction_above(0.05) >= 0.75

    # Depth 2: the output takes at most 2^2 = 4 values over the masks, a lattice Shapiro-Wilk rejects.
    shallow = ResidualMLP(256, width=128, depth=2, out_features=1, stable=True)
    res2 = normality_pvalues(shallow, x, 0.7, num_masks=200, seed=1)
    assert res2.median() < 0.01

    # Fig. 5 right: per-block p-values rise with depth. Block l's neuron takes at most 2^l values, so the
    # first blocks are far from Gaussian; beyond ~20 blocks the p-values look uniform.
    med = res.block_medians().numpy()
    assert np.all(med[:3] < 1e-3)
    early, middle, late = med[:5].mean(), med[5:20].mean(), med[20:].mean()
    assert early < middle < late
    assert np.median(med[50:]) > 0.05
    rho = stats.spearmanr(np.arange(20), med[:20]).statistic
    assert rho > 0.8


# ----------------------------------------------------------------------------- batched == looped


def test_batched_samples_equal_independent_forward_and_loop() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(8, width=16, depth=6, out_features=3).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    masks = sample_multipliers(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), 5, 11, scaling="inverted", seed=3)
    out, blocks = masked_samples(model, x, masks, neuron=2, per_block=True, block_neuron=4, chunk_size=7)
    assert out.shape == (5, 11) and blocks.shape == (5, 11, 6)

    # Independent computation: the hand-written network on each (input, mask) pair.
    for i in range(5):
        ref_out, ref_ys = _manual_mlp(model, x[i : i + 1].expand(11, 8), masks[i])
        torch.testing.assert_close(out[i], ref_out[:, 2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(blocks[i], ref_ys[:, :, 4], rtol=1e-12, atol=1e-12)

    # A loop of forward calls, one per (input, mask), with a (L,) override: same samples. In float64
    # the only difference is the summation order of batched matmuls, ~1e-16 relative.
    handle = inject_stochastic_depth(model, 0.5, auto_resample=False)
    loop = torch.empty(5, 11, dtype=torch.float64)
    with torch.no_grad():
        for i in range(5):
            for j in range(11):
                with handle.override(masks[i, j]):
                    loop[i, j] = model(x[i : i + 1])[0, 2]
    torch.testing.assert_close(out, loop, rtol=1e-12, atol=1e-12)
    # the live handle is used (not replaced) and survives
    out_injected, _ = masked_samples(model, x, masks, neuron=2)
    torch.testing.assert_close(out_injected, loop, rtol=1e-12, atol=1e-12)
    assert existing_handle(model) is handle


def test_batched_equals_loop_on_cifar_resnet_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = CifarResNet(depth=20, num_classes=10, in_channels=3, width=4).double()
    # give BatchNorm non-trivial running statistics, then put the model in training mode
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8, dtype=torch.float64))
    bn_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    masks = sample_multipliers(torch.full((9,), 0.6), 3, 6, scaling="expected", seed=0)
    out, blocks = masked_samples(model, x, masks, neuron=7, per_block=True, chunk_size=5)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # eval mode: running statistics untouched
        torch.testing.assert_close(v, bn_state[k], rtol=0, atol=0)
    assert existing_handle(model) is None  # temporary gates removed

    model.eval()
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False)
    with torch.no_grad():
        for i in range(3):
            for j in range(6):
                with handle.override(masks[i, j]):
                    ref = model(x[i : i + 1])
                torch.testing.assert_close(out[i, j], ref[0, 7], rtol=1e-10, atol=1e-12)
    handle.remove()
    assert torch.isfinite(blocks).all()


def test_chunk_size_does_not_change_samples() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(8, width=16, depth=5, out_features=1).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    masks = sample_multipliers(0.5 * torch.ones(5), 4, 9, seed=0)
    a, _ = masked_samples(model, x, masks, chunk_size=1)
    b, _ = masked_samples(model, x, masks, chunk_size=10_000)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- masks and tests


def test_sample_multipliers_conventions_and_frequencies() -> None:
    p = torch.tensor([0.2, 0.5, 0.9])
    m = sample_multipliers(p, 40, 500, scaling="inverted", seed=5)
    assert m.shape == (40, 500, 3) and m.dtype == torch.float64
    for l in range(3):
        values = set(torch.unique(m[..., l]).tolist())
        assert values <= {0.0, 1.0 / float(p[l])}
        kept = int((m[..., l] > 0).sum())
        # 20000 Bernoulli(p) draws: two-sided binomial test, fails with probability 1e-4 if correct
        assert stats.binomtest(kept, 20_000, float(p[l])).pvalue > 1e-4
    e = sample_multipliers(p, 40, 500, scaling="expected", seed=5)
    torch.testing.assert_close(e, (m > 0).double())  # same deltas, unscaled
    assert not torch.equal(e, sample_multipliers(p, 40, 500, scaling="expected", seed=6))
    state = torch.get_rng_state()
    sample_multipliers(p, 2, 3, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


def test_pvalues_are_scipy_on_the_same_samples() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(8, width=16, depth=12, out_features=2, stable=True).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    p = torch.linspace(0.9, 0.5, 12)
    masks = sample_multipliers(p, 6, 60, scaling="expected", seed=4)
    out, blocks = masked_samples(model, x, masks, neuron=1, per_block=True)
    for test, fn in (("shapiro", stats.shapiro), ("dagostino", stats.normaltest)):
        res = normality_pvalues(model, x, p, num_masks=60, test=test, neuron=1, per_block=True, seed=4)
        ref = np.array([fn(out[i].numpy()).pvalue for i in range(6)])
        np.testing.assert_allclose(res.pvalues.numpy(), ref, rtol=1e-10)
        ref_blocks = np.array([[fn(blocks[i, :, l].numpy()).pvalue for l in range(12)] for i in range(6)])
        np.testing.assert_allclose(res.block_pvalues.numpy(), ref_blocks, rtol=1e-10)
        assert res.median() == pytest.approx(float(np.median(ref)))
        assert res.fraction_above(0.05) == pytest.approx(float((ref > 0.05).mean()))


def test_normality_test_known_values_and_point_mass() -> None:
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((3, 300))
    expo = rng.exponential(size=(3, 300))
    p = normality_test(torch.from_numpy(np.concatenate([gauss, expo])))
    np.testing.assert_allclose(p[:3].numpy(), [stats.shapiro(g).pvalue for g in gauss], rtol=1e-10)
    assert (p[3:] < 1e-6).all()  # exponential samples of 300: Shapiro-Wilk rejects decisively
    const = normality_test(torch.ones(2, 50))
    assert torch.isnan(const).all()


def test_all_rates_one_gives_nan_not_a_crash() -> None:
    model = ResidualMLP(4, width=8, depth=3, out_features=1)
    res = normality_pvalues(model, torch.randn(3, 4), 1.0, num_masks=10)
    assert torch.isnan(res.pvalues).all()
    assert np.isnan(res.median())


# ----------------------------------------------------------------------------- handles, modes, errors


def test_injected_model_uses_its_rates_and_scaling_and_keeps_state() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(8, width=16, depth=4, out_features=1).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    handle = inject_stochastic_depth(model, [0.9, 0.7, 0.5, 0.3], scaling="inverted")
    model.train()
    res = normality_pvalues(model, x, num_masks=30, seed=2)
    assert model.training and existing_handle(model) is handle
    torch.testing.assert_close(handle.survival, torch.tensor([0.9, 0.7, 0.5, 0.3]))
    # same as passing the rates and scaling explicitly (same masks from the same seed)
    handle.remove()
    ref = normality_pvalues(model, x, [0.9, 0.7, 0.5, 0.3], num_masks=30, seed=2, scaling="inverted")
    torch.testing.assert_close(res.pvalues, ref.pvalues)
    assert existing_handle(model) is None


def test_errors_are_raised_before_anything_runs() -> None:
    model = ResidualMLP(4, width=8, depth=3, out_features=1)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="at least 3"):
        normality_pvalues(model, x, 0.5, num_masks=2)
    with pytest.raises(ValueError, match="at least 8"):
        normality_pvalues(model, x, 0.5, num_masks=7, test="dagostino")
    with pytest.warns(UserWarning, match="N > 20"):
        normality_pvalues(model, x, 0.5, num_masks=15, test="dagostino")
    with pytest.raises(ValueError, match="unknown test"):
        normality_pvalues(model, x, 0.5, test="ks")
    with pytest.raises(ValueError, match="survival=None"):
        normality_pvalues(model, x)
    with pytest.raises(ValueError, match="3 residual branches"):
        normality_pvalues(model, x, [0.5, 0.5])
    with pytest.raises(ValueError, match="divides by zero"):
        normality_pvalues(model, x, [0.5, 0.0, 0.5], scaling="inverted")
    with pytest.raises(IndexError, match="neuron=5"):
        normality_pvalues(model, x, 0.5, neuron=5, num_masks=5)
    assert existing_handle(model) is None and model.training
    with pytest.warns(UserWarning, match="5000"):
        normality_pvalues(model, x[:1], 0.5, num_masks=5001)


def test_block_output_of_drop_path_slot_blocks() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, embed_dim=16, num_heads=2, num_classes=3, drop_path_rate=0.1)
    res = normality_pvalues(model, torch.randn(2, 3, 16, 16), 0.5, num_masks=20, per_block=True, block_neuron=3)
    assert res.block_pvalues.shape == (2, 4)
    assert existing_handle(model) is None
