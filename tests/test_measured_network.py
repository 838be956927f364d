"""The measured modes measure one network, with a loss that fits it (issue 12, items 5 and 6).

SenseMode's S_l and maxreg's g_l are both taken on the training-mode network (BatchNorm batch statistics,
one gate per block for the batch): checked against finite differences of that network in float64, on a
BatchNorm model at initialization where the evaluation network (running statistics 0 and 1) is another
function. maxreg infers its loss: a regression gets "mse" and non-zero g; "cross_entropy" on one output
gives g = 0 everywhere and a warning.
"""

from __future__ import annotations

import copy
import csv
import glob
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd import SDClassifier, SDRegressor, StochasticDepth
from lightning_sd.callbacks.probing import infer_regularization_loss
from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.core.regularization import regularization_terms
from lightning_sd.data import ToyRegressionDataModule
from tests.distributed import REPO


class BNBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.f(x)


class BNClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(6, 12)
        self.blocks = nn.Sequential(*[BNBlock(12) for _ in range(4)])
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g) * 2 + 1  # not standardized: batch statistics differ from (0, 1)
    return TensorDataset(x, torch.randint(0, 3, (64,), generator=g))


def _fit(module: pl.LightningModule, sd: StochasticDepth, tmp_path, loader=None, datamodule=None) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, callbacks=[sd],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, datamodule=datamodule)


def _finite_differences(module: nn.Module, batches, eps: float = 1e-6):
    """Independent float64 reference on the training network, one multiplier per block for the batch:
    zeta_l = (y(1 + eps e_l) - y(1 - eps e_l)) / 2 eps, g_l = mean_x zeta^T (diag(pi) - pi pi^T) zeta,
    S_l = (CE(1 + eps e_l) - CE(1 - eps e_l)) / 2 eps averaged over batches."""
    net = copy.deepcopy(module).double().train()
    handle = inject_stochastic_depth(net, 1.0, scaling="expected", auto_resample=False)
    L = handle.num_blocks
    g_sum, count, s_sum = torch.zeros(L, dtype=torch.float64), 0, torch.zeros(L, dtype=torch.float64)
    with torch.no_grad():
        for x, y in batches:
            x = x.double()
            with handle.override(torch.ones(L, dtype=torch.float64)):
                pi = torch.softmax(net(x), dim=1)
            for l in range(L):
                e = torch.zeros(L, dtype=torch.float64)
                e[l] = eps
                with handle.override(1 + e):
                    up = net(x)
                with handle.override(1 - e):
                    down = net(x)
                zeta = (up - down) / (2 * eps)
                quad = (pi * zeta.square()).sum(1) - (pi * zeta).sum(1).square()
                g_sum[l] += quad.sum()
                s_sum[l] += (nn.functional.cross_entropy(up, y) - nn.functional.cross_entropy(down, y)) / (2 * eps)
            count += x.shape[0]
    return g_sum / count, s_sum / len(batches)


def test_maxreg_and_sensemode_measure_the_same_training_network(tmp_path) -> None:
    data = _data()
    module = BNClassifier()
    reference = copy.deepcopy(module)
    batches = [data[0:16], data[16:32]]  # a sequential loader: the probe reads the first two batches
    g_ref, s_ref = _finite_differences(reference, batches)

    maxreg = StochasticDepth(mode="maxreg", budget=0.6, scaling="expected", sensitivity_batches=2, seed=0)
    _fit(module, maxreg, tmp_path / "maxreg", DataLoader(data, batch_size=16))
    sense = StochasticDepth(mode="sensemode", budget=0.6, scaling="expected", sensitivity_batches=2, seed=0)
    _fit(copy.deepcopy(reference), sense, tmp_path / "sense", DataLoader(data, batch_size=16))

    assert maxreg.regularization_loss_used == "cross_entropy"  # inferred from the 3 logits
    torch.testing.assert_close(maxreg.regularization_terms.double(), g_ref, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(sense.sensitivities.double(), s_ref, rtol=2e-4, atol=1e-6)
    # the test discriminates: the evaluation network (running statistics 0 and 1 at initialization) is another function
    g_eval = regularization_terms(reference, torch.cat([b[0] for b in batches]), loss="cross_entropy", mode="eval")
    assert float(((g_eval - g_ref).abs() / g_ref).max()) > 0.5


def test_training_mode_terms_without_batchnorm_use_per_example_gates() -> None:
    """No BatchNorm: the examples are independent, so mode="train" equals mode="eval" (dropout off here)."""
    from lightning_sd.models import ResidualMLP

    torch.manual_seed(0)
    net = ResidualMLP(8, 16, 5, 4)
    x = torch.randn(20, 8)
    train = regularization_terms(net, x, loss="cross_entropy", mode="train")
    torch.testing.assert_close(train, regularization_terms(net, x, loss="cross_entropy", mode="eval"), rtol=1e-12, atol=0.0)
    assert net.training  # mode restored


def test_inferred_loss_rules() -> None:
    assert infer_regularization_loss("mse", SDClassifier("CifarResNet-8", num_classes=3, in_channels=1)) == "mse"
    assert infer_regularization_loss("auto", SDRegressor(in_features=4, width=4, depth=2)) == "mse"
    assert infer_regularization_loss("auto", SDClassifier("CifarResNet-8", num_classes=3, in_channels=1)) == "cross_entropy"
    undeclared = BNClassifier()
    assert infer_regularization_loss("auto", undeclared, torch.randn(5, 6)) == "cross_entropy"  # 3 logits
    undeclared.head = nn.Linear(12, 1)
    assert infer_regularization_loss("auto", undeclared, torch.randn(5, 6)) == "mse"  # one output per example
    with pytest.raises(ValueError, match="without probe data"):
        infer_regularization_loss("auto", undeclared)
    with pytest.raises(ValueError, match="'auto', 'cross_entropy' or 'mse'"):
        infer_regularization_loss("hinge", undeclared)
    with pytest.raises(ValueError, match="'auto', 'cross_entropy' or 'mse'"):
        StochasticDepth(mode="maxreg", regularization_loss="hinge")


def _toy() -> ToyRegressionDataModule:
    return ToyRegressionDataModule(in_features=8, num_train=64, num_val=16, num_test=16, batch_size=16, seed=0)


def test_maxreg_on_a_regression_infers_mse_and_measures_nonzero_g(tmp_path) -> None:
    torch.manual_seed(0)
    module = SDRegressor(in_features=8, width=16, depth=6)
    reference = copy.deepcopy(module)
    dm = _toy()
    # budget 0.3: at 0.5 Lemma 2's rates are 1/2 for every block whatever g (C = 0)
    sd = StochasticDepth(mode="maxreg", budget=0.3, scaling="expected", sensitivity_batches=2, seed=0)
    _fit(module, sd, tmp_path, datamodule=dm)
    assert sd.regularization_loss_used == "mse"
    # the probe: the training loader shuffles, so the probe reads torch.randperm(n) of a generator seeded 0
    train = dm.train_dataloader().dataset
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32]
    x = torch.stack([train[int(i)][0] for i in order])
    expected = regularization_terms(reference, x, loss="mse", mode="train")
    assert bool((expected > 0).all())
    torch.testing.assert_close(sd.regularization_terms.double(), expected, rtol=1e-5, atol=0.0)
    assert float(sd.survival.max() - sd.survival.min()) > 0.01  # Lemma 2 ranks the blocks: not the uniform fallback


def test_maxreg_warns_when_every_g_is_zero(tmp_path) -> None:
    torch.manual_seed(0)
    sd = StochasticDepth(mode="maxreg", budget=0.3, scaling="expected", regularization_loss="cross_entropy", sensitivity_batches=1, seed=0)
    with pytest.warns(UserWarning, match="every measured regularization term g_l is 0"):
        _fit(SDRegressor(in_features=8, width=16, depth=6), sd, tmp_path, datamodule=_toy())
    assert float(sd.regularization_terms.abs().max()) == 0.0
    assert sd.survival.tolist() == pytest.approx([0.3] * 6)  # the uniform fallback the warning announces


def test_quickstart_cli_with_maxreg_measures_nonzero_g(tmp_path) -> None:
    """`lightning-sd fit --trainer.callbacks.init_args.mode maxreg` (the quickstart, one step): g > 0 for all 100 blocks.

    Budget 0.3: at the quickstart's 0.5 Lemma 2 gives p_l = 1/2 for every block whatever g."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_sd.cli", "fit", "--trainer.callbacks.init_args.mode", "maxreg",
         "--trainer.callbacks.init_args.budget", "0.3",
         "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp_path)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    tables = glob.glob(str(tmp_path / "**" / "sd_rates_epoch0.csv"), recursive=True)
    assert len(tables) == 1, proc.stderr[-2000:]
    with open(tables[0]) as f:
        rows = list(csv.DictReader(f))
    g = [float(r["g"]) for r in rows]
    assert len(g) == 100 and min(g) > 0
    p = [float(r["survival"]) for r in rows]
    assert sum(p) == pytest.approx(30.0, abs=1e-3) and max(p) - min(p) > 0.01  # Lemma 2, not the uniform fallback
