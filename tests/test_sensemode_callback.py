"""StochasticDepth(mode="sensemode") in a Trainer: measurement at fit start, resume, DDP, precision.

The DDP test runs this file as a script (``python tests/test_sensemode_callback.py OUT_DIR``) in a
subprocess: Lightning's DDP launcher re-runs the script for rank 1, both ranks write their results
to OUT_DIR and the test compares them.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError

import lightning_sd.callbacks.rate_measurement as rate_measurement
from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.core.survival import sensemode_rates
from lightning_sd.models import CifarResNet, ResidualMLP
from tests.distributed import run_script

IN_FEATURES, DEPTH = 8, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regressor(LightningModule):
    """Stable ResidualMLP on (x, y) batches; logs on_step in training_step and updates a torchmetric there."""

    def __init__(self, depth: int = DEPTH, loss_returns: str = "tensor", manual: bool = False) -> None:
        super().__init__()
        self.net = ResidualMLP(IN_FEATURES, 16, depth, 1, stable=True)
        self.train_mse = MeanSquaredError()
        self.loss_returns = loss_returns
        self.automatic_optimization = not manual
        self.first_inputs: list[torch.Tensor] = []
        self.metric_updates_at_first_step: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        self.train_mse(pred.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log_dict({"train/mse": self.train_mse}, on_step=False, on_epoch=True)
        if self.loss_returns == "dict":
            return {"loss": loss, "pred": pred.detach()}
        if self.loss_returns == "none":
            return None
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.first_inputs.append(batch[0][0].clone())
        if self.metric_updates_at_first_step is None:
            self.metric_updates_at_first_step = self.train_mse._update_count

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ConvClassifier(LightningModule):
    """CifarResNet-8 (BatchNorm) on 8x8 images; snapshots buffers before and after the measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.net = CifarResNet(8, num_classes=4, in_channels=1, width=4)
        self.buffers_at_fit_start: dict[str, torch.Tensor] = {}
        self.buffers_after_measurement: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def on_fit_start(self):
        self.buffers_at_fit_start = {k: v.clone() for k, v in self.net.named_buffers()}

    def on_train_start(self):  # runs after the callbacks' on_train_start, i.e. after the measurement
        self.buffers_after_measurement = {k: v.clone() for k, v in self.net.named_buffers()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def regression_loader(seed: int, num: int = 64, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(IN_FEATURES, generator=torch.Generator().manual_seed(99)) / IN_FEATURES**0.5
    x = torch.randn(num, IN_FEATURES, generator=g) * (1.0 + seed)
    return DataLoader(TensorDataset(x, torch.sin(x @ beta).unsqueeze(1) + 0.1 * seed), batch_size=batch, shuffle=False)


def make_trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def _reference_sensitivities(module: Regressor, loader: DataLoader, k: int) -> torch.Tensor:
    return estimate_sensitivities(copy.deepcopy(module.net).train(), list(loader)[:k], supervised_loss(F.mse_loss))


def test_sensemode_end_to_end(tmp_path):
    seed_everything(0)
    module = Regressor()
    loader = regression_loader(0)
    expected_s = _reference_sensitivities(module, loader, 3)
    callback = StochasticDepth(mode="sensemode", budget=0.4, sensitivity_batches=3, seed=1)
    trainer = make_trainer(tmp_path, callbacks=[callback])
    trainer.fit(module, loader)

    # S = dLoss/dm at m = 1 on the first 3 batches with the initial weights, as the core estimator gives it.
    assert callback.sensitivities.dtype == torch.float32
    torch.testing.assert_close(callback.sensitivities, expected_s, rtol=1e-5, atol=1e-7)
    # The default floor with scaling="inverted": p_min = min(0.05, budget / 2) = 0.05.
    expected_p = sensemode_rates(DEPTH, 0.4, expected_s, p_min=0.05).float()
    assert float(callback.survival.min()) >= 0.05 - 1e-7
    torch.testing.assert_close(callback.survival, expected_p, rtol=1e-5, atol=1e-6)
    assert abs(float(callback.survival.double().sum()) - 0.4 * DEPTH) < 1e-5
    # The measurement consumed no training batch (4 steps, the first on the loader's first batch), its
    # self.log calls were silenced (else on_step logging from on_train_start raises) and the training
    # metric did not see the measurement batches.
    assert len(module.first_inputs) == 4
    assert torch.equal(module.first_inputs[0], loader.dataset.tensors[0][0])
    assert module.metric_updates_at_first_step == 0
    assert trainer.callback_metrics["sd/sensitivity/001"].item() == pytest.approx(float(expected_s[0]), rel=1e-5)
    assert trainer.callback_metrics["sd/survival/008"].item() == pytest.approx(float(expected_p[7]), rel=1e-5)


def test_batchnorm_buffers_untouched_by_measurement(tmp_path):
    seed_everything(0)
    module = ConvClassifier()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g) + 2.0, torch.randint(0, 4, (32,), generator=g))
    callback = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=0)
    make_trainer(tmp_path, callbacks=[callback], max_steps=1).fit(module, DataLoader(data, batch_size=8))
    assert torch.isfinite(callback.sensitivities).all() and callback.sensitivities.shape == (3,)
    for name, before in module.buffers_at_fit_start.items():
        assert torch.equal(module.buffers_after_measurement[name], before), name


def test_dict_output_custom_loss_and_errors(tmp_path):
    seed_everything(0)
    base = Regressor(loss_returns="dict")
    loader = regression_loader(0)
    expected_s = _reference_sensitivities(base, loader, 2)
    cb = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=0)
    make_trainer(tmp_path, callbacks=[cb], max_steps=1).fit(copy.deepcopy(base), loader)
    torch.testing.assert_close(cb.sensitivities, expected_s, rtol=1e-5, atol=1e-7)

    # sensitivity_loss replaces training_step: twice the loss gives exactly twice the sensitivities.
    doubled = StochasticDepth(
        mode="sensemode",
        budget=0.5,
        sensitivity_batches=2,
        seed=0,
        sensitivity_loss=lambda module, batch: 2.0 * F.mse_loss(module(batch[0]), batch[1]),
    )
    make_trainer(tmp_path, callbacks=[doubled], max_steps=1).fit(copy.deepcopy(base), loader)
    torch.testing.assert_close(doubled.sensitivities, 2.0 * expected_s, rtol=1e-5, atol=1e-7)

    with pytest.raises(RuntimeError, match="returned None, but SenseMode needs the scalar training loss"):
        cb = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=1, seed=0)
        make_trainer(tmp_path, callbacks=[cb], max_steps=1).fit(Regressor(loss_returns="none"), loader)
    with pytest.raises(RuntimeError, match="manual optimization"):
        cb = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=1, seed=0)
        make_trainer(tmp_path, callbacks=[cb], max_steps=1).fit(Regressor(manual=True), loader)


def test_bf16_mixed_measures_in_fp32(tmp_path):
    seed_everything(0)
    module = Regressor()
    loader = regression_loader(0)
    expected_s = _reference_sensitivities(module, loader, 2)
    with torch.autocast("cpu", torch.bfloat16):  # the control: measured under bf16 autocast they differ
        bf16_s = _reference_sensitivities(module, loader, 2)
    cb = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=0)
    make_trainer(tmp_path, callbacks=[cb], max_steps=1, precision="bf16-mixed").fit(module, loader)
    assert cb.sensitivities.dtype == torch.float32
    # autocast off during the measurement: the float32 sensitivities, not bf16-rounded ones
    torch.testing.assert_close(cb.sensitivities, expected_s, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(bf16_s, expected_s, rtol=1e-3, atol=0)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_resume_keeps_stored_rates_on_other_data(tmp_path, monkeypatch):
    counter = _Counter(rate_measurement.RATE_MEASUREMENTS["sensemode"])
    monkeypatch.setitem(rate_measurement.RATE_MEASUREMENTS, "sensemode", counter)
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = StochasticDepth(mode="sensemode", budget=0.3, sensitivity_batches=2, seed=0)
    make_trainer(tmp_path, callbacks=[first, ckpt], enable_checkpointing=True).fit(Regressor(), regression_loader(0))
    assert counter.calls == 1
    stored_p, stored_s = first.survival.clone(), first.sensitivities.clone()

    other = regression_loader(3)  # different inputs and targets
    fresh = StochasticDepth(mode="sensemode", budget=0.3, sensitivity_batches=2, seed=0)
    make_trainer(tmp_path, callbacks=[fresh], max_steps=1).fit(Regressor(), other)
    assert counter.calls == 2
    assert not torch.allclose(fresh.survival, stored_p, atol=1e-3)  # the control: other data -> other rates

    resumed = StochasticDepth(mode="sensemode", budget=0.3, sensitivity_batches=2, seed=0)
    trainer = make_trainer(tmp_path, callbacks=[resumed], max_epochs=2)
    trainer.fit(Regressor(), other, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert counter.calls == 2  # not measured again
    assert trainer.current_epoch == 2
    torch.testing.assert_close(resumed.survival, stored_p, rtol=0, atol=0)
    torch.testing.assert_close(resumed.sensitivities, stored_s, rtol=0, atol=0)


def test_recompute_every_epoch(tmp_path, monkeypatch):
    counter = _Counter(rate_measurement.RATE_MEASUREMENTS["sensemode"])
    monkeypatch.setitem(rate_measurement.RATE_MEASUREMENTS, "sensemode", counter)
    seed_everything(0)
    cb = StochasticDepth(mode="sensemode", budget=0.5, sensitivity_batches=2, seed=0, recompute_every_n_epochs=1)
    seen = []
    module = Regressor()
    original = counter.fn

    def recording(trainer, pl_module, settings):
        out = original(trainer, pl_module, settings)
        seen.append(out.sensitivities.clone())
        return out

    counter.fn = recording
    make_trainer(tmp_path, callbacks=[cb], max_epochs=3).fit(module, regression_loader(0))
    assert counter.calls == 3
    assert not torch.allclose(seen[0], seen[1])  # the weights moved: new sensitivities


def test_maxreg_is_delegated(monkeypatch):
    assert rate_measurement.RATE_MEASUREMENTS["maxreg"] is rate_measurement.measure_maxreg_rates
    sentinel = torch.tensor([0.25, 0.75], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0])

    def fake(trainer, module, settings):
        return rate_measurement.RateMeasurement(rates=sentinel, loss="mse", regularization_terms=g)

    monkeypatch.setitem(rate_measurement.RATE_MEASUREMENTS, "maxreg", fake)
    cb = StochasticDepth(mode="maxreg", budget=0.5)
    # the deprecated entry point still measures through the registry and stores g on the callback
    with pytest.warns(DeprecationWarning, match="measure_rates"):
        assert rate_measurement.measure_rates(cb, None, None) is sentinel
    assert cb.regularization_terms is g and cb.regularization_loss_used == "mse"


# ---------------------------------------------------------------------------------------------- DDP
DDP_BATCHES = 2


def _ddp_main(out_dir: str) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    module = Regressor()
    initial = copy.deepcopy(module.net)
    cb = StochasticDepth(mode="sensemode", budget=0.3, sensitivity_batches=DDP_BATCHES, seed=0)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        use_distributed_sampler=False,
        default_root_dir=out_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[cb],
    )
    rank = trainer.global_rank
    loader = regression_loader(seed=rank, num=32, batch=8)  # each rank its own data
    trainer.fit(module, loader)
    local = estimate_sensitivities(initial.train(), list(loader)[:DDP_BATCHES], supervised_loss(F.mse_loss))
    torch.save(
        {"survival": cb.survival, "sensitivities": cb.sensitivities, "local": local},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_ddp_two_processes_identical_rates(tmp_path):
    run_script(Path(__file__).resolve(), str(tmp_path), timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(r0["local"], r1["local"], atol=1e-4)  # each rank saw different data
    torch.testing.assert_close(r0["sensitivities"], (r0["local"] + r1["local"]) / 2, rtol=1e-5, atol=1e-7)
    assert torch.equal(r0["sensitivities"], r1["sensitivities"])
    assert torch.equal(r0["survival"], r1["survival"])
    torch.testing.assert_close(r0["survival"], sensemode_rates(DEPTH, 0.3, r0["sensitivities"], p_min=0.05).float(), rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
