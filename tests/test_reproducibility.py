"""StochasticDepth leaves the run reproducible, and its measured modes train at every budget.

Issue 12, items 1, 3, 6 and 7: the default seed is read from ``torch.initial_seed()`` without consuming
the global RNG; maxreg and sensemode honour a floor ``p_min`` (default ``min(0.05, budget/2)`` with
``scaling="inverted"``); the startup line shows the settings in force; ``measure_after_steps`` measures
once the branches are no longer zero, and large ``1/p`` multipliers are reported.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.optimize import minimize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks.stochastic_depth import MAX_MULTIPLIER, StochasticDepth, default_p_min
from lightning_sd.core.gates import mask_generator
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.core.survival import maxreg_rates
from lightning_sd.models import CifarResNet, ResidualMLP
from tests.helpers import ClassifierModule, trainer_kwargs


class DropoutClassifier(ClassifierModule):
    """A classifier whose training step draws from the global RNG (dropout on the logits)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(F.dropout(self(x), 0.2, training=True), y)


def shuffled_loader(n: int = 32, batch_size: int = 8, features: int = 8, classes: int = 3, image: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, 8, 8, generator=g) if image else torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)  # shuffles from the global RNG


class RngAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = torch.get_rng_state().clone()


def _fit(tmp_path, callbacks, steps=6, budget_model=None):
    pl.seed_everything(1234)
    module = budget_model() if budget_model else DropoutClassifier(ResidualMLP(8, 16, 6, 3))
    spy = RngAtTrainStart()
    trainer = pl.Trainer(max_steps=steps, callbacks=[*callbacks, spy], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, shuffled_loader())
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, spy.state


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- item 1
def test_default_seed_is_read_not_drawn(tmp_path):
    without, rng_without = _fit(tmp_path, [])
    sd = StochasticDepth()  # defaults: seed=None
    with_cb, rng_with = _fit(tmp_path, [sd])
    # seed_everything(1234) seeded the global generator with 1234; the callback read it.
    assert sd.seed == 1234 and sd.effective_settings()["seed_source"] == "torch.initial_seed()"
    # The global RNG at train start is exactly what it is without the callback: nothing drawn, nothing reseeded.
    assert torch.equal(rng_with, rng_without)
    # Budget 0.5 really dropped blocks, so the weights differ from the plain run ...
    assert not _equal(with_cb, without)
    # ... but a second run after the same seed_everything is bit-identical (shuffling and dropout included).
    again, _ = _fit(tmp_path, [StochasticDepth()])
    assert _equal(again, with_cb)


def test_budget_one_is_the_plain_run_bit_for_bit(tmp_path):
    # Budget 1: every block kept, m = 1/1. With a shuffled loader and dropout drawing from the global RNG,
    # the run can only match the plain run if the callback consumes none of it.
    without, _ = _fit(tmp_path, [])
    with_cb, _ = _fit(tmp_path, [StochasticDepth(budget=1.0)])
    assert _equal(with_cb, without)


def test_setup_leaves_the_global_rng_where_it_was(tmp_path):
    # The old default (torch.seed()) reseeded the global RNG with a random seed at setup.
    pl.seed_everything(7)
    before = torch.get_rng_state().clone()
    sd = StochasticDepth(budget=0.5)
    state_at_setup = []

    class Spy(pl.Callback):
        def setup(self, trainer, pl_module, stage):  # runs after StochasticDepth.setup (callback order)
            state_at_setup.append(torch.get_rng_state().clone())

    trainer = pl.Trainer(max_steps=1, callbacks=[sd, Spy()], **trainer_kwargs(tmp_path, logger=False))
    module = ClassifierModule(ResidualMLP(8, 16, 4, 3))
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    after_init = torch.get_rng_state().clone()  # module and data drew from the RNG, nothing else may
    trainer.fit(module, loader)
    assert not torch.equal(before, after_init)
    assert torch.equal(state_at_setup[0], after_init)
    assert sd.seed == 7


# ---------------------------------------------------------------------------------------------- item 3
def _scipy_max(g: np.ndarray, budget: float, p_min: float) -> np.ndarray:
    """Independent solution: maximize sum p(1-p) g under sum p = budget L, p_min <= p <= 1 (SLSQP)."""
    L = g.size
    res = minimize(
        lambda p: -np.sum(p * (1 - p) * g),
        np.full(L, budget),
        jac=lambda p: -(1 - 2 * p) * g,
        bounds=[(p_min, 1.0)] * L,
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - budget * L, "jac": lambda p: np.ones(L)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("p_min", [0.02, 0.05])
def test_maxreg_floor_maximizes_penalty(budget, p_min):
    rng = np.random.default_rng(3)
    g = rng.lognormal(0.0, 1.5, size=12)
    g[[1, 7]] = 0.0  # blocks that do not enter the penalty
    p = maxreg_rates(12, budget, g, p_min=p_min).numpy()
    assert abs(p.sum() - budget * 12) < 1e-6
    assert (p >= p_min - 1e-12).all() and (p <= 1).all()
    best = _scipy_max(g, budget, p_min)
    assert 0.5 * np.sum(p * (1 - p) * g) >= 0.5 * np.sum(best * (1 - best) * g) - 1e-7
    pos = g > 0
    np.testing.assert_allclose(p[pos], best[pos], atol=1e-5)  # unique maximizer on the g > 0 blocks


def test_maxreg_floor_above_budget_is_refused():
    with pytest.raises(ValueError, match=r"p_min must be in \[0, budget\]"):
        maxreg_rates(4, 0.1, [1.0, 2.0, 3.0, 4.0], p_min=0.2)


class _Module(pl.LightningModule):
    def __init__(self, net, loss=F.cross_entropy):
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _Classifier(net):
    return _Module(net)


def _Regression(net):
    return _Module(net, F.mse_loss)


@pytest.mark.parametrize("model", ["mlp", "resnet20"])
@pytest.mark.parametrize("mode", ["maxreg", "sensemode"])
def test_measured_modes_train_with_defaults_at_every_budget(tmp_path, mode, model):
    for budget in (0.1, 0.3, 0.5, 0.9):
        torch.manual_seed(0)
        net = ResidualMLP(8, 16, 12, 3) if model == "mlp" else CifarResNet(20, num_classes=3, width=4)
        sd = StochasticDepth(mode=mode, budget=budget, sensitivity_batches=2)  # every other argument default
        trainer = pl.Trainer(max_steps=2, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
        trainer.fit(_Classifier(net), shuffled_loader(n=16, image=model == "resnet20"))
        assert trainer.global_step == 2
        p = sd.handle.survival_float64
        L = 12 if model == "mlp" else 9
        p_min = min(0.05, budget / 2)
        assert sd.p_min == p_min == default_p_min(mode, budget, "inverted")
        assert abs(float(p.sum()) - budget * L) < 1e-6, (budget, p)
        assert float(p.min()) >= p_min - 1e-12 and float(p.max()) <= 1.0
        if mode == "maxreg":
            g = sd.regularization_terms.double().numpy()
            best = _scipy_max(g, budget, p_min)
            np.testing.assert_allclose(p.numpy()[g > 0], best[g > 0], atol=1e-4)
        else:
            # p = clip(p_min + alpha |S|, p_min, 1): one alpha over the unclipped blocks.
            s = sd.sensitivities.double().abs()
            free = (p > p_min + 1e-9) & (p < 1 - 1e-9)
            alpha = (p[free] - p_min) / s[free]
            torch.testing.assert_close(alpha, alpha.mean().expand_as(alpha), rtol=1e-4, atol=0)
            assert bool((p[s == 0] == p_min).all())


def test_maxreg_without_floor_names_the_fix_before_any_step(tmp_path):
    # The reproduced crash: ResidualMLP(8, 16, 12, 3) at budget 0.1, Lemma 2 clips blocks to 0.
    torch.manual_seed(0)
    module = _Classifier(ResidualMLP(8, 16, 12, 3))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    sd = StochasticDepth(mode="maxreg", budget=0.1, p_min=0.0, sensitivity_batches=2)
    trainer = pl.Trainer(max_steps=2, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match=r"gave survival rate 0 to blocks .* p_min=None \(= 0.05 here\)"):
        trainer.fit(module, shuffled_loader(n=16))
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="maxreg", budget=0.1, p_min=0.2), r"p_min must be in \[0, budget\] = \[0, 0.1\].*gives 0.05"),
        (dict(mode="linear", p_min=0.1), "p_min is the floor of the measured modes"),
        (dict(mode="uniform", measure_after_steps=3), "measure_after_steps only applies"),
        (dict(mode="sensemode", measure_after_steps=-1), "measure_after_steps must be an integer >= 0"),
    ],
)
def test_bad_floor_or_measure_step_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StochasticDepth(**kwargs)


def test_default_floor_per_scaling():
    assert StochasticDepth(mode="maxreg", budget=0.5).p_min == 0.05
    assert StochasticDepth(mode="sensemode", budget=0.04).p_min == 0.02
    assert StochasticDepth(mode="sensemode", budget=0.5, scaling="expected").p_min == 0.0  # the paper's rule
    assert StochasticDepth(mode="linear", budget=0.5).p_min == 0.0


# ---------------------------------------------------------------------------------------------- item 6
def _regression_loader(n=32, batch_size=8):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=batch_size)


def test_startup_line_prints_the_settings_in_force(tmp_path, caplog):
    torch.manual_seed(77)
    sd = StochasticDepth(mode="maxreg", budget=0.3, sensitivity_batches=2, measure_after_steps=3, regularization_loss="mse")
    trainer = pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    with caplog.at_level(logging.INFO):
        trainer.fit(_Regression(ResidualMLP(8, 16, 5, 1, stable=True)), _regression_loader())
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("StochasticDepth: 5 residual"))
    assert (
        "mode=maxreg, rates=uniform until measured, budget=0.3, drop=batch, scaling=inverted, "
        "seed=77 (from torch.initial_seed()), p_min=0.05, max multiplier 1/p=3.33, "
        "measured after 3 training steps on 2 training batches (mse Hessian)"
    ) in line
    assert torch.equal(sd.survival, torch.full((5,), 0.3))  # one step < 3: not measured yet


def test_measured_mode_that_finds_nothing_reports_uniform(tmp_path):
    # Cross-entropy on a single output: the softmax Hessian of one logit is 0, so every g_l = 0.
    torch.manual_seed(0)
    sd = StochasticDepth(mode="maxreg", budget=0.5, sensitivity_batches=2, seed=0, regularization_loss="cross_entropy")
    trainer = pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(_Regression(ResidualMLP(8, 16, 4, 1, stable=True)), _regression_loader())
    assert float(sd.regularization_terms.abs().max()) == 0.0
    settings = sd.effective_settings()
    assert settings["mode"] == "maxreg" and settings["rates"] == "uniform (every measured g_l is 0)"
    assert torch.equal(sd.survival, torch.full((4,), 0.5))


# ---------------------------------------------------------------------------------------------- item 7
def test_large_inverted_multiplier_warns_with_threshold(tmp_path):
    assert MAX_MULTIPLIER == 20.0
    module = ClassifierModule(ResidualMLP(8, 16, 4, 3))
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    sd = StochasticDepth(mode="custom", survival=[0.9, 0.02, 0.5, 0.5], seed=0)
    with pytest.warns(UserWarning, match=r"block 2 \(net.blocks.1\) has rate 0.02, so a kept branch is multiplied by 1/p = 50 \(> 20\)"):
        pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False)).fit(module, loader)
    # 1/0.05 = 20 is not above the threshold; "expected" never divides.
    for kwargs in (dict(survival=[0.9, 0.05, 0.5, 0.5]), dict(survival=[0.9, 0.02, 0.5, 0.5], scaling="expected")):
        sd = StochasticDepth(mode="custom", seed=0, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False)).fit(
                ClassifierModule(ResidualMLP(8, 16, 4, 3)), loader
            )
        assert not [w for w in caught if "multiplied by 1/p" in str(w.message)]


def _zero_init_resnet() -> CifarResNet:
    net = CifarResNet(8, num_classes=4, in_channels=1, width=4)  # 3 blocks
    for m in net.modules():
        if hasattr(m, "bn2"):
            nn.init.zeros_(m.bn2.weight)  # the FAQ's (docs/faq.md) zero-initialised last BatchNorm
    return net


def _image_loader(n=32, batch_size=8):
    g = torch.Generator().manual_seed(4)
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)), batch_size=batch_size)


def test_zero_initialised_branches_need_measure_after_steps(tmp_path):
    torch.manual_seed(0)
    sd = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=3)
    trainer = pl.Trainer(max_steps=3, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match=r"every sensitivity S_l is 0 at step 0.*measure_after_steps=100"):
        trainer.fit(_Classifier(_zero_init_resnet()), _image_loader())
    assert trainer.global_step == 0


def test_measure_after_steps_measures_the_trained_weights(tmp_path):
    torch.manual_seed(0)
    module = _Classifier(_zero_init_resnet())
    loader = _image_loader()
    snapshot = {}
    kept = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # before StochasticDepth's hook
            if trainer.global_step == 2:
                snapshot["net"] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kept.append(sd.handle.kept.tolist())

    sd = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=3, measure_after_steps=2)
    trainer = pl.Trainer(max_steps=4, callbacks=[Spy(), sd], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, loader)
    # Steps 0 and 1 ran with the budget's uniform rates: masks u < 0.5 from (seed, step, batch_idx).
    for step in (0, 1):
        u = torch.rand(3, generator=mask_generator(3, step, step, 0), dtype=torch.float64)
        assert kept[step] == (u < 0.5).tolist()
    assert sd._measured_at_step == 2
    # S measured on the weights after two SGD steps, the first two batches, training mode.
    reference = _zero_init_resnet()
    reference.load_state_dict(snapshot["net"])
    batches = list(loader)[:2]
    s = estimate_sensitivities(reference.train(), batches, supervised_loss(F.cross_entropy))
    assert float(s.abs().min()) > 0  # no longer zero
    torch.testing.assert_close(sd.sensitivities, s, rtol=1e-4, atol=1e-7)
    p = sd.handle.survival_float64
    assert abs(float(p.sum()) - 1.5) < 1e-6 and float(p.min()) >= 0.05 - 1e-12


def test_resume_before_the_measurement_measures_at_the_same_step(tmp_path):
    def run(max_epochs, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        module = _Classifier(_zero_init_resnet())
        sd = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=3, measure_after_steps=3)
        callbacks = [sd] + ([checkpoint] if checkpoint else [])
        trainer = pl.Trainer(
            max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs(tmp_path, logger=False, enable_checkpointing=checkpoint is not None)
        )
        trainer.fit(module, _image_loader(n=16), ckpt_path=ckpt_path)  # 2 steps per epoch
        return sd, {k: v.clone() for k, v in module.state_dict().items()}

    full, full_weights = run(3)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first, _ = run(1, checkpoint=ckpt)
    assert not first._measured  # stopped at step 2 < 3
    resumed, resumed_weights = run(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert full._measured_at_step == resumed._measured_at_step == 3
    assert torch.equal(resumed.survival, full.survival)
    assert all(torch.equal(resumed_weights[k], full_weights[k]) for k in full_weights)
