"""Lemma 2 (max regularization) rates and their measurement at fit start (StochasticDepth mode="maxreg")."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.regularization import regularization_terms
from lightning_sd.core.survival import maxreg_rates, survival_rates
from lightning_sd.models import ResidualMLP


def _penalty(p: np.ndarray, g: np.ndarray) -> float:
    return float(0.5 * np.sum(p * (1 - p) * g))


def _scipy_max(g: np.ndarray, budget: float) -> np.ndarray:
    """Independent solution: maximize sum p(1-p) g under sum p = budget L, 0 <= p <= 1 (SLSQP)."""
    L = g.size
    res = minimize(
        lambda p: -np.sum(p * (1 - p) * g),
        np.full(L, budget),
        jac=lambda p: -(1 - 2 * p) * g,
        bounds=[(0.0, 1.0)] * L,
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - budget * L, "jac": lambda p: np.ones(L)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_maxreg_maximizes_penalty_under_budget(budget: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.lognormal(0.0, 1.0, size=12)
    p = maxreg_rates(12, budget, g).numpy()
    assert abs(p.sum() - budget * 12) < 1e-6
    assert (p >= 0).all() and (p <= 1).all()
    best = _scipy_max(g, budget)
    # The objective is strictly concave: the maximizer is unique, so the rates themselves must agree.
    np.testing.assert_allclose(p, best, atol=1e-5)
    assert _penalty(p, g) >= _penalty(best, g) - 1e-9
    # Lemma 2's form: p_l = 1/2 - C/g_l on the unclipped blocks, one C, sign of L - 2 Lbar.
    free = (p > 1e-9) & (p < 1 - 1e-9)
    c = (0.5 - p[free]) * g[free]
    np.testing.assert_allclose(c, c.mean(), rtol=1e-9, atol=1e-12)
    assert np.sign(c.mean()) == np.sign(12 - 2 * budget * 12) or budget == 0.5
    # Clipped blocks are where the formula leaves [0, 1].
    assert (0.5 - c.mean() / g[p <= 1e-9] <= 1e-9).all()
    assert (0.5 - c.mean() / g[p >= 1 - 1e-9] >= 1 - 1e-9).all()


def test_maxreg_equal_g_is_uniform_and_budget_half_is_global_max() -> None:
    torch.testing.assert_close(maxreg_rates(7, 0.6, torch.full((7,), 3.0)), torch.full((7,), 0.6, dtype=torch.float64))
    torch.testing.assert_close(maxreg_rates(5, 0.5, [1.0, 2.0, 3.0, 4.0, 5.0]), torch.full((5,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(survival_rates("maxreg", 3, 1.0, g=[1.0, 2.0, 3.0]), torch.ones(3, dtype=torch.float64))


def test_maxreg_larger_g_gets_rate_nearer_half() -> None:
    g = torch.tensor([0.5, 1.0, 2.0, 8.0], dtype=torch.float64)
    low = maxreg_rates(4, 0.15, g)
    high = maxreg_rates(4, 0.9, g)
    assert bool((low[1:] >= low[:-1]).all())  # below 1/2: rates rise with g
    assert bool((high[1:] <= high[:-1]).all())  # above 1/2: rates fall with g
    assert float(low[0]) == 0.0 and float(high[0]) == 1.0  # the smallest g is clipped at both ends


@pytest.mark.parametrize(
    ("g", "budget", "expected"),
    [
        # C = 0 region: positive-g blocks sit at the global maximum 1/2, zero-g blocks share the rest.
        ([0.0, 0.0, 1.0], 0.5, [0.5, 0.5, 0.5]),
        ([0.0, 0.0, 1.0], 0.7, [0.8, 0.8, 0.5]),
        ([0.0, 2.0, 2.0, 0.0], 0.375, [0.25, 0.5, 0.5, 0.25]),
        # C > 0: zero-g blocks are dropped; C < 0: they are always kept.
        ([0.0, 1.0, 1.0], 0.2, [0.0, 0.3, 0.3]),
        ([0.0, 1.0, 1.0], 0.9, [1.0, 0.85, 0.85]),
        # every g zero: R does not depend on p, rates are uniform.
        ([0.0, 0.0], 0.3, [0.3, 0.3]),
    ],
)
def test_maxreg_zero_regularization_terms(g: list[float], budget: float, expected: list[float]) -> None:
    p = maxreg_rates(len(g), budget, g)
    assert abs(float(p.sum()) - budget * len(g)) < 1e-6
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0.0)


def test_maxreg_extreme_scales() -> None:
    g = torch.tensor([1e-12, 1e-6, 1.0, 1e6], dtype=torch.float64)
    for budget in (0.05, 0.5, 0.99):
        p = maxreg_rates(4, budget, g)
        assert abs(float(p.sum()) - budget * 4) < 1e-6
        assert bool(torch.isfinite(p).all())


def test_maxreg_bad_input() -> None:
    with pytest.raises(ValueError, match="entries but the model has"):
        maxreg_rates(3, 0.5, [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        maxreg_rates(2, 0.5, [1.0, -2.0])
    with pytest.raises(ValueError, match="finite"):
        maxreg_rates(2, 0.5, [1.0, float("nan")])
    with pytest.raises(ValueError, match="budget"):
        maxreg_rates(2, 0.0, [1.0, 2.0])
    with pytest.raises(ValueError, match="needs g="):
        survival_rates("maxreg", 2, 0.5)


class _MLPModule(pl.LightningModule):
    """A ResidualMLP (input 8, width 16) trained with ``loss(output, target)``."""

    def __init__(self, depth: int, out_features: int, loss) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualMLP(8, width=16, depth=depth, out_features=out_features)
        self.loss = loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_stochastic_depth_maxreg_mode_end_to_end(tmp_path) -> None:
    """StochasticDepth(mode="maxreg") measures g at fit start (RATE_MEASUREMENTS["maxreg"] = measure_maxreg_rates)."""

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    model = _MLPModule(depth=6, out_features=3, loss=nn.functional.cross_entropy)
    expected_g = regularization_terms(model, data.tensors[0][:20], loss="cross_entropy")  # 2 batches of 10
    sd = StochasticDepth(mode="maxreg", budget=0.3, sensitivity_batches=2, regularization_loss="cross_entropy", seed=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False, callbacks=[sd],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, DataLoader(data, batch_size=10))
    torch.testing.assert_close(sd.regularization_terms, expected_g.float(), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(sd.survival.double(), maxreg_rates(6, 0.3, sd.regularization_terms.double()), rtol=1e-6, atol=1e-6)
    assert abs(float(sd.survival.double().sum()) - 0.3 * 6) < 1e-5
    assert sd.state_dict()["g"] == pytest.approx(sd.regularization_terms.tolist())

    # the checkpoint format is unchanged (g_l under "g"): a state saved by the callback restores g_l without measuring
    state = sd.state_dict()
    restored = StochasticDepth(mode="maxreg", budget=0.3, sensitivity_batches=2, regularization_loss="cross_entropy", seed=0)
    restored.load_state_dict(state)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, callbacks=[restored],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(_MLPModule(depth=6, out_features=3, loss=nn.functional.cross_entropy), DataLoader(data, batch_size=10))
    torch.testing.assert_close(restored.regularization_terms, sd.regularization_terms, rtol=0, atol=0)
    torch.testing.assert_close(restored.survival, sd.survival, rtol=0, atol=0)


def test_renamed_and_moved_names_still_work_with_a_deprecation_warning(tmp_path) -> None:
    """StochasticDepth.g, maxreg_measurement.* and rate_measurement.measure_sensitivities are deprecated aliases."""
    import lightning_sd.callbacks.maxreg_measurement as maxreg_measurement
    from lightning_sd.callbacks import probe_data, probing, rate_measurement

    sd = StochasticDepth(mode="maxreg", budget=0.3)
    terms = torch.tensor([0.5, 2.0])
    with pytest.warns(DeprecationWarning, match="regularization_terms"):
        sd.g = terms
    assert sd.regularization_terms is terms
    with pytest.warns(DeprecationWarning, match="regularization_terms"):
        assert sd.g is terms
    for name, module in [
        ("infer_regularization_loss", probing),
        ("reduce_mean_over_ranks", probing),
        ("default_input_fn", probe_data),
    ]:
        with pytest.warns(DeprecationWarning, match=module.__name__):
            assert getattr(maxreg_measurement, name) is getattr(module, name)

    class Old(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            new = rate_measurement.measure_maxreg_rates(trainer, pl_module, sd.measurement_settings)
            with pytest.warns(DeprecationWarning, match="measure_maxreg_rates"):
                self.rates = maxreg_measurement.measure_maxreg(sd, trainer, pl_module)
            with pytest.warns(DeprecationWarning, match="measure_sensemode_rates"):
                s = rate_measurement.measure_sensitivities(sd, trainer, pl_module)
            sensemode = rate_measurement.measure_sensemode_rates(trainer, pl_module, sd.measurement_settings)
            torch.testing.assert_close(self.rates, new.rates, rtol=0, atol=0)
            torch.testing.assert_close(sd.regularization_terms, new.regularization_terms, rtol=0, atol=0)
            torch.testing.assert_close(s, sensemode.sensitivities, rtol=0, atol=0)
            assert sd.regularization_loss_used == new.loss == "mse" and sensemode.loss == "training_step"

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 8, generator=g), torch.randn(20, 1, generator=g))
    sd = StochasticDepth(mode="uniform", budget=0.5, sensitivity_batches=2, seed=0)
    old = Old()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, callbacks=[sd, old],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(_MLPModule(depth=4, out_features=1, loss=nn.functional.mse_loss), DataLoader(data, batch_size=10))
    assert old.rates.dtype == torch.float64 and abs(float(old.rates.sum()) - 0.5 * 4) < 1e-6
