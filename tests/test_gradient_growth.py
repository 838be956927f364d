"""gradient_growth: Proposition 1 and Table 1 of Hayou & Ayed (2021)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sd.core.gates import existing_handle, inject_stochastic_depth
from lightning_sd.core.gradient_growth import gradient_growth, gradient_growth_rates, gradient_growth_theory
from lightning_sd.core.normality import sample_multipliers
from lightning_sd.core.survival import survival_rates
from lightning_sd.models import ResidualMLP


@pytest.fixture(autouse=True)
def _one_thread():
    # Small matmuls on a shared 2-core machine: OpenMP spin-waits make 2 threads ~50x slower than 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Table 1 of the paper (Vanilla ResNet, L = 50, budget 0.7): the theory column of the average growth rate
# per layer q_l^(1/(L - l)) at l = 0, 10, 20, 30, 40. Linear: the exact-budget linear mode (DESIGN.md).
TABLE1_L = (0, 10, 20, 30, 40)
TABLE1 = {
    "none": (2.0, 2.0, 2.0, 2.0, 2.0),
    "uniform": (1.7, 1.7, 1.7, 1.7, 1.7),
    "linear": (1.691, 1.636, 1.579, 1.522, 1.464),
}


def _vanilla() -> ResidualMLP:
    return ResidualMLP(32, width=128, depth=50, out_features=1)  # He init, no branch scaling


@pytest.mark.parametrize("mode", ["none", "uniform", "linear"])
def test_table1_growth_rates(mode: str) -> None:
    survival = None if mode == "none" else survival_rates(mode, 50, 0.7)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    gg = gradient_growth(_vanilla, x, survival, num_masks=32, num_inits=16, seed=0)
    assert gg.num_samples == 512  # the paper uses 500 Monte-Carlo samples of (W, delta)
    idx = list(TABLE1_L)
    # The theory column: Proposition 1 computed independently from the rates.
    torch.testing.assert_close(gg.theory_rate[idx], torch.tensor(TABLE1[mode], dtype=torch.float64), rtol=0, atol=1e-3)
    # Tolerance 3%: at width 128 instead of the paper's 512, each layer's factor deviates from 1 + p_k by
    # O(1/width) (finite width, and backward weights equal the forward ones rather than being independent
    # as Assumption 1 has it): about +1% measured. The Monte-Carlo error of the mean of the heavy-tailed
    # ratio over 16 inits x 32 masks is below 1% per layer (log q_40 has sd ~0.35 over weights, so the
    # per-layer rate's standard error is ~0.35 / sqrt(16) / 10 ~ 0.9%; smaller at l < 40).
    rel = gg.empirical_rate[idx] / torch.tensor(TABLE1[mode], dtype=torch.float64) - 1
    assert rel.abs().max() < 0.03, rel
    # q is decreasing in l and q_L = 1
    assert gg.empirical[-1] == 1.0 and bool((gg.empirical[:-1] > gg.empirical[1:]).all())


def test_single_mask_ratio_equals_autograd_of_a_hand_written_network() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(6, width=10, depth=5, out_features=2).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    p = torch.tensor([0.9, 0.5, 0.7, 0.4, 0.6])
    for scaling in ("expected", "inverted"):
        loss_fn = lambda out: (out**2).sum()  # noqa: E731
        gg = gradient_growth(model, x, p, num_masks=1, scaling=scaling, loss_fn=loss_fn, seed=3)
        m = sample_multipliers(p, 1, 1, scaling=scaling, seed=3 * 1000)[0, 0]
        # independent computation: the network written out, gradients by autograd
        y = (x @ model.stem.weight.T).detach().requires_grad_(True)
        ys = [y]
        for l, block in enumerate(model.blocks):
            y = y + m[l] * (torch.relu(y) @ block.linear.weight.T)
            y.retain_grad()
            ys.append(y)
        ((y @ model.head.weight.T) ** 2).sum().backward()
        norms = torch.stack([t.grad.pow(2).sum() for t in ys])
        torch.testing.assert_close(gg.empirical, norms / norms[-1], rtol=1e-10, atol=0)
        second = p.double() if scaling == "expected" else 1 / p.double()
        theory = torch.cat([torch.flip(torch.cumprod(torch.flip(1 + second, [0]), 0), [0]), torch.ones(1, dtype=torch.float64)])
        torch.testing.assert_close(gg.theory, theory)
        # relative_error(): Table 1's comparison, per-layer rates q_l^(1/(L-l)) measured over theory, minus 1
        span = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
        expected_rel = (norms[:-1] / norms[-1]) ** (1 / span) / theory[:-1] ** (1 / span) - 1
        torch.testing.assert_close(gg.relative_error(), expected_rel, rtol=1e-10, atol=1e-12)
    assert existing_handle(model) is None and model.training


def test_rates_helper_and_theory_without_sd() -> None:
    q = gradient_growth_theory(None, num_blocks=4)
    torch.testing.assert_close(gradient_growth_rates(q), torch.full((4,), 2.0, dtype=torch.float64))
    rates = gradient_growth_rates(torch.tensor([27.0, 9.0, 3.0, 1.0]))
    torch.testing.assert_close(rates, torch.full((3,), 3.0, dtype=torch.float64))


def test_injected_model_and_restored_modes() -> None:
    torch.manual_seed(0)
    model = ResidualMLP(6, width=16, depth=4, out_features=1)
    handle = inject_stochastic_depth(model, 0.5, scaling="inverted")
    model.train()
    gg = gradient_growth(model, torch.randn(4, 6), 0.5, num_masks=20, chunk_size=3)
    assert existing_handle(model) is handle and model.training
    torch.testing.assert_close(handle.survival, torch.full((4,), 0.5))
    assert gg.empirical.shape == (5,) and gg.empirical_rate.shape == (4,)
    assert math.isclose(float(gg.theory[0]), 1.5**4)
    # chunking does not change the estimate
    gg2 = gradient_growth(model, torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), 0.5, num_masks=20, chunk_size=20)
    gg3 = gradient_growth(model, torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), 0.5, num_masks=20, chunk_size=7)
    torch.testing.assert_close(gg2.empirical, gg3.empirical, rtol=1e-5, atol=0)


def test_factory_leaves_global_rng_alone_and_errors() -> None:
    state = torch.get_rng_state()
    gradient_growth(lambda: ResidualMLP(4, 8, 3, 1), torch.randn(2, 4, generator=torch.Generator()), 0.5, num_masks=4, num_inits=2)
    assert torch.equal(state, torch.get_rng_state())
    model = ResidualMLP(4, 8, 3, 1)
    with pytest.raises(ValueError, match="factory"):
        gradient_growth(model, torch.randn(2, 4), 0.5, num_inits=2)
    with pytest.raises(ValueError, match="unknown scaling"):
        gradient_growth(model, torch.randn(2, 4), 0.5, scaling="none")
    with pytest.raises(ValueError, match="divides by zero"):
        gradient_growth(model, torch.randn(2, 4), [0.5, 0.0, 0.5], scaling="inverted")
    with pytest.raises(ValueError, match="num_masks"):
        gradient_growth(model, torch.randn(2, 4), 0.5, num_masks=0)
    assert existing_handle(model) is None
