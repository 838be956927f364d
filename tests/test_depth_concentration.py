"""Lemma 1 of Hayou & Ayed (2021): the sampled depth L_delta = sum_l delta_l under StochasticDepth.

E[L_delta] = sum p_l, Var[L_delta] = sum p_l (1 - p_l) (a Poisson-binomial law), and the Bennett-type
concentration bound |L_delta - L_p| <= v_p u^{-1}(log(2/beta) / v_p) with probability >= 1 - beta.
"""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy import optimize, stats
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.core.survival import depth_moments, survival_rates
from lightning_sd.models import ResidualMLP

L = 20
STEPS = 150


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualMLP(4, width=4, depth=L, out_features=1, stable=True)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _poisson_binomial_pmf(p: np.ndarray) -> np.ndarray:
    """pmf of sum of independent Bernoulli(p_l), by convolution (independent of the package)."""
    pmf = np.array([1.0])
    for q in p:
        pmf = np.convolve(pmf, [1.0 - q, q])
    return pmf


def _central_moment4(p: np.ndarray) -> float:
    """4th central moment of a Poisson-binomial: sum of Bernoulli 4th cumulants + 3 (sum of variances)^2."""
    v = p * (1 - p)
    return float((v * (1 - 6 * v)).sum() + 3 * v.sum() ** 2)


def _lemma1_bound(p: np.ndarray, beta: float) -> float:
    """v_p u^{-1}(log(2/beta) / v_p) with u(t) = (1 + t) log(1 + t) - t."""
    v = float((p * (1 - p)).sum())
    target = math.log(2 / beta) / v
    t = optimize.brentq(lambda t: (1 + t) * math.log1p(t) - t - target, 0.0, 1e6)
    return v * t


def test_logged_depth_moments_in_trainer(tmp_path) -> None:
    sd = StochasticDepth(mode="linear", budget=0.6, drop="batch", seed=7)
    data = TensorDataset(torch.randn(STEPS, 4), torch.randn(STEPS, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        callbacks=[sd],
        logger=CSVLogger(str(tmp_path), name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=1))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sd/depth_mean")]
    assert len(rows) == 2

    p = survival_rates("linear", L, 0.6)
    mean_theory, var_theory = depth_moments(p)
    assert mean_theory == pytest.approx(0.6 * L, abs=1e-9)
    # an independent replay of the callback's mask stream: masks of step s, batch b come from (seed, s, b)
    replay = inject_stochastic_depth(ResidualMLP(4, 4, L, 1), p, seed=7, auto_resample=False)
    pn = p.numpy()
    for epoch, row in enumerate(rows):
        assert float(row["sd/depth_mean_theory"]) == pytest.approx(mean_theory, rel=1e-6)
        assert float(row["sd/depth_var_theory"]) == pytest.approx(var_theory, rel=1e-6)
        depths = np.array([float(replay.resample(epoch * STEPS + b, b).sum()) for b in range(STEPS)])
        assert float(row["sd/depth_mean"]) == pytest.approx(depths.mean(), rel=1e-6)
        assert float(row["sd/depth_var"]) == pytest.approx(depths.var(ddof=1), rel=1e-6)
        # Lemma 1 moments within 4 standard errors of the sample mean and the sample variance
        # (Var(s^2) ~ (mu4 - sigma^4)/n): each check fails with probability ~6e-5 when the law is right.
        se_mean = math.sqrt(var_theory / STEPS)
        se_var = math.sqrt((_central_moment4(pn) - var_theory**2) / STEPS)
        assert abs(float(row["sd/depth_mean"]) - mean_theory) < 4 * se_mean
        assert abs(float(row["sd/depth_var"]) - var_theory) < 4 * se_var


@pytest.mark.parametrize("mode", ["uniform", "linear"])
def test_mask_stream_is_poisson_binomial_and_concentrates(mode: str) -> None:
    p = survival_rates(mode, L, 0.6)
    handle = inject_stochastic_depth(ResidualMLP(4, 4, L, 1), p, seed=11, auto_resample=False)
    n = 10_000
    depths = np.array([int(handle.resample(s, 0).sum()) for s in range(n)])
    pn = p.numpy()
    mean_theory, var_theory = depth_moments(p)
    assert abs(depths.mean() - mean_theory) < 4 * math.sqrt(var_theory / n)
    assert abs(depths.var(ddof=1) - var_theory) < 4 * math.sqrt((_central_moment4(pn) - var_theory**2) / n)
    # full law: chi-square goodness of fit to the Poisson-binomial pmf (bins with expected count >= 5)
    pmf = _poisson_binomial_pmf(pn)
    observed = np.bincount(depths, minlength=L + 1).astype(float)
    expected = pmf * n
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp *= obs.sum() / exp.sum()
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # Lemma 1: P(|L_delta - L_p| > bound(beta)) <= beta (Bennett's inequality is conservative)
    for beta in (0.05, 0.3):
        outside = float((np.abs(depths - mean_theory) > _lemma1_bound(pn, beta)).mean())
        assert outside <= beta
    handle.remove()


def test_uniform_mode_maximizes_variance_and_bound() -> None:
    uniform = survival_rates("uniform", L, 0.7).numpy()
    linear = survival_rates("linear", L, 0.7).numpy()
    rng = np.random.default_rng(0)
    others = [linear]
    for _ in range(5):  # random feasible modes with the same budget
        w = rng.uniform(0.2, 1.0, L)
        others.append(survival_rates("sensemode", L, 0.7, sensitivities=w).numpy())
    for q in others:
        assert abs(q.sum() - uniform.sum()) < 1e-6
        assert (q * (1 - q)).sum() <= (uniform * (1 - uniform)).sum() + 1e-12
        assert _lemma1_bound(q, 0.05) <= _lemma1_bound(uniform, 0.05) + 1e-9
