"""LogGaussianMonitor and the probe behind it (hypoactivation, ln ||y_out||^2 vs the log-Gaussian theory)."""

from __future__ import annotations

import csv
import math
import os

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks.log_gaussian import LogGaussianMonitor
from lightning_sd.models.balanced import BalancedReLU
from lightning_sd.models.cifar_resnet import CifarResNet
from lightning_sd.models.residual_mlp import ResidualMLP
from lightning_sd.theory import predict, probe_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: intra-op threads only contend on the shared 2-core test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



class _Regressor(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.mode_at_step: list[bool] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.mode_at_step.append(self.training)
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _TableLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, tuple[list, list]] = {}

    @property
    def name(self):
        return "tables"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns, data):
        self.tables[key] = (columns, data)


def _data(n_in: int, size: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(size, n_in, generator=gen), torch.randn(size, generator=gen))


def _direct_fractions(net: nn.Module, x: torch.Tensor) -> list[float]:
    out: list[float] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: out.append(float((o > 0).double().mean())))
        for m in net.modules()
        if isinstance(m, (nn.ReLU, BalancedReLU))
    ]
    with torch.no_grad():
        net.eval()
        net(x)
        net.train()
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("balanced", [False, True])
def test_monitor_logs_layers_output_and_prediction(tmp_path, balanced):
    torch.manual_seed(0)
    width, depth = 32, 12
    net = ResidualMLP(8, width, depth, 1, balanced=balanced)
    data = _data(8)
    module = _Regressor(net)
    monitor = LogGaussianMonitor()
    tables = _TableLogger()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, callbacks=[monitor],
        logger=[CSVLogger(tmp_path), tables], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    loader = DataLoader(data, batch_size=32)
    first = next(iter(loader))[0]
    expected_fracs = _direct_fractions(net, first)  # same weights as at on_train_start
    with torch.no_grad():  # ln ||y_out||^2 of the first batch, by a plain forward with the same weights
        expected_ln = net(first).double().square().sum(1).log()
    trainer.fit(module, loader)

    res = monitor.result
    assert res is not None and len(res.layers) == depth
    assert [s.active_fraction for s in res.layers] == pytest.approx(expected_fracs)
    assert all(s.balanced == balanced for s in res.layers)
    assert res.ln_out_sq.shape == (32,)  # the first training batch
    assert module.mode_at_step == [True, True]  # train mode restored after the eval-mode probe
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())

    m = trainer.callback_metrics
    assert m["log_gaussian/active_fraction_mean"] == pytest.approx(res.mean_active_fraction, abs=1e-6)
    assert m["log_gaussian/h_total"] == pytest.approx(res.h_total, abs=1e-5)
    assert "log_gaussian/active_fraction/net.blocks.0.act" in m
    assert "log_gaussian/h/net.blocks.11.act" in m
    p = predict(width, depth, 1.0, 1.0, balanced=balanced)
    assert m["log_gaussian/pred_mean_G"] == pytest.approx(p.mean_G, rel=1e-5)
    pm, psd = res.predicted_ln_out_sq()
    assert m["log_gaussian/pred_ln_out_sq_mean"] == pytest.approx(pm, rel=1e-5)
    assert m["log_gaussian/ln_out_sq_mean"] == pytest.approx(float(res.ln_out_sq.mean()), rel=1e-5)
    # predicted centre: ln(||x||^2/8) + 12 ln 2 + E[G] + E ln chi^2_1 (= digamma(1/2) + ln 2 = -1.27)
    r = (first.square().sum(1) / 8).log().mean().item()
    assert pm == pytest.approx(r + depth * math.log(2) + p.mean_G - 1.2704, abs=1e-3)
    # predicted spread: Var G + Var ln chi^2_1 (= trigamma(1/2) = pi^2/2) + the spread of ln(||x||^2/8)
    r_var = (first.double().square().sum(1) / 8).log().var(unbiased=False).item()
    assert psd == pytest.approx(math.sqrt(p.var_G + math.pi**2 / 2 + r_var), rel=1e-6)
    assert m["log_gaussian/pred_ln_out_sq_std"] == pytest.approx(psd, rel=1e-5)
    # the measured values are ln ||y_out||^2 of the first batch through the unmodified network
    assert res.ln_out_sq.double() == pytest.approx(expected_ln, rel=1e-5, abs=1e-5)
    assert m["log_gaussian/ln_out_sq_mean"] == pytest.approx(float(expected_ln.mean()), rel=1e-5, abs=1e-5)
    assert m["log_gaussian/ln_out_sq_std"] == pytest.approx(float(expected_ln.std()), rel=1e-5)
    assert m["log_gaussian/ln_out_sq_q50"] == pytest.approx(float(np.quantile(expected_ln.numpy(), 0.5)), rel=1e-5, abs=1e-5)

    layers_csv = os.path.join(trainer.log_dir, "log_gaussian_layers.csv")
    output_csv = os.path.join(trainer.log_dir, "log_gaussian_output.csv")
    with open(layers_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == depth and rows[0]["name"] == "net.blocks.0.act"
    assert float(rows[3]["active_fraction"]) == pytest.approx(expected_fracs[3])
    with open(output_csv) as f:
        out_rows = {r["statistic"]: r for r in csv.DictReader(f)}
    assert float(out_rows["ln_out_sq_mean"]["predicted"]) == pytest.approx(pm)
    cols, data_rows = tables.tables["log_gaussian/layers"]
    assert cols == ["layer", "name", "balanced", "active_fraction", "h"] and len(data_rows) == depth
    assert "log_gaussian/output" in tables.tables


def test_probe_centre_matches_theory_over_initializations():
    """Averaged over independent networks, the probe's mean ln||y_out||^2 is the log-Gaussian one.

    n = d = 32, alpha = lam = 1: E[G] = -beta/2 = -1.16 (balanced), -beta/2 + C d/n = -2.05 (vanilla);
    the Gaussian infinite-width limit (G = 0) misses the centre by that much and is rejected.
    """
    nets = 160
    for balanced in (True, False):
        diffs = []
        for seed in range(nets):
            torch.manual_seed(seed)
            net = ResidualMLP(8, 32, 32, 4, balanced=balanced)
            res = probe_model(net, torch.randn(16, 8))
            diffs.append(float(res.ln_out_sq.mean()) - res.predicted_ln_out_sq()[0])
        d = torch.tensor(diffs, dtype=torch.float64)
        err, se = float(d.mean()), float(d.std()) / math.sqrt(nets)  # se ~ 0.1 .. 0.15
        assert abs(err) < 4 * se + 0.1, (balanced, err, se)
        mean_G = res.prediction.mean_G
        assert mean_G < -1.0
        assert abs(err + mean_G) > 4 * se  # infinite-width centre (E[G] = 0): rejected


def test_probe_restores_modes_and_takes_no_grad():
    net = CifarResNet(8, num_classes=3, width=4)
    net.train()
    net.bn1.eval()  # a deliberately frozen submodule stays in eval
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    res = probe_model(net, x)
    assert net.training and not net.bn1.training and net.layer1.training
    assert x.grad is None and all(p.grad is None for p in net.parameters())
    assert len(res.layers) == 7  # stem ReLU + two in each of the 3 blocks (depth 8)
    assert res.prediction is None and res.predicted_ln_out_sq() is None
    assert all(0.0 <= s.active_fraction <= 1.0 and -0.5 <= s.h <= 0.5 for s in res.layers)


def test_shared_relu_calls_are_numbered():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    res = probe_model(net, torch.randn(8, 4))
    assert [s.name for s in res.layers] == ["1", "1#1"]


def test_monitor_explicit_probe_dict_batches_and_bad_input(tmp_path):
    with pytest.raises(ValueError):
        LogGaussianMonitor(num_probe=0)
    with pytest.raises(ValueError):
        LogGaussianMonitor(probe=torch.empty(0, 3))
    mon = LogGaussianMonitor(input_key="x")
    assert torch.equal(mon._extract({"x": torch.ones(2, 3), "y": torch.zeros(2)}), torch.ones(2, 3))
    with pytest.raises(KeyError):
        LogGaussianMonitor(input_key="inputs")._extract({"x": torch.ones(2)})
    torch.manual_seed(0)
    net = ResidualMLP(8, 16, 4, 1, balanced=True)
    probe = torch.randn(100, 8)
    monitor = LogGaussianMonitor(probe=probe, num_probe=50, log_per_layer=False, prefix="lg")
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, callbacks=[monitor], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Regressor(net), DataLoader(_data(8), batch_size=16))
    assert monitor.result.ln_out_sq.shape == (50,)
    assert "lg/active_fraction_mean" in trainer.callback_metrics
    assert not any(k.startswith("lg/active_fraction/") for k in trainer.callback_metrics)
    assert os.path.exists(os.path.join(tmp_path, "lg_layers.csv"))
