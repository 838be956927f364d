"""BalancedReLU / balance_relus (Li, Nica & Roy 2021, section 2.1)."""

from __future__ import annotations

import io
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.models.balanced import BalancedReLU, balance_relus
from lightning_sd.models.cifar_resnet import CifarResNet
from lightning_sd.models.residual_mlp import ResidualMLP


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: intra-op threads only contend on the shared 2-core test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _active_fractions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fraction of active units at the input of every ReLU / BalancedReLU, in forward order."""
    fracs: list[float] = []

    def hook(mod, inp, out):
        fracs.append(float((out > 0).double().mean()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.ReLU, BalancedReLU))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.tensor(fracs, dtype=torch.float64)


def test_balanced_relu_is_relu_of_signed_input():
    act = BalancedReLU(granularity="channel", seed=0)
    x = torch.randn(5, 6, 3, 3)
    y = act(x)
    s = act.signs.double()
    assert act.signs.shape == (6,) and act.signs.dtype == torch.int8
    assert set(act.signs.tolist()) == {-1, 1}
    expected = torch.where(s.view(1, 6, 1, 1) > 0, F.relu(x.double()), F.relu(-x.double()))
    assert torch.allclose(y.double(), expected)
    neuron = BalancedReLU(granularity="neuron", seed=0)
    neuron(x)
    assert neuron.signs.shape == (6, 3, 3)
    last = BalancedReLU(granularity="channel", seed=0, channel_dim=-1)
    last(torch.randn(2, 7, 5))
    assert last.signs.shape == (5,)
    eager = BalancedReLU(10, seed=3)
    assert eager.is_materialized and eager.signs.shape == (10,)
    assert list(eager.parameters()) == []  # frozen: no trainable parameter


def test_signs_are_seeded_and_uniform():
    a = BalancedReLU(4096, seed=7).signs
    b = BalancedReLU(4096, seed=7).signs
    c = BalancedReLU(4096, seed=8).signs
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.double().mean())) < 4 / math.sqrt(4096)  # P(+) = 1/2
    m1 = balance_relus(ResidualMLP(8, 16, 5, 2), seed=1, example_input=torch.randn(2, 8))
    m2 = balance_relus(ResidualMLP(8, 16, 5, 2), seed=1, example_input=torch.randn(2, 8))
    m3 = balance_relus(ResidualMLP(8, 16, 5, 2), seed=2, example_input=torch.randn(2, 8))
    s1 = torch.cat([m.signs for m in m1.modules() if isinstance(m, BalancedReLU)])
    s2 = torch.cat([m.signs for m in m2.modules() if isinstance(m, BalancedReLU)])
    s3 = torch.cat([m.signs for m in m3.modules() if isinstance(m, BalancedReLU)])
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    blocks = [m.signs for m in m1.modules() if isinstance(m, BalancedReLU)]
    assert not all(torch.equal(blocks[0], b) for b in blocks[1:])  # independent across layers
    torch.manual_seed(0)
    g1 = BalancedReLU().seed
    torch.manual_seed(0)
    assert BalancedReLU().seed == g1  # seed=None: controlled by torch.manual_seed


def test_deep_balanced_network_fires_half_its_relus_at_every_layer():
    """For every input, layer-l signs are independent of z^{l-1}: the active count is Binomial(n, 1/2).

    Averaged over independent initializations, each layer fires half its ReLUs. (The vanilla deficit,
    ~0.3% of the units at this width, needs the simulator's 10^4 networks to resolve: test_theory.py.)
    """
    width, depth, nets = 64, 32, 160
    bal = []
    x = torch.randn(1, 16)
    for seed in range(nets):
        torch.manual_seed(seed)
        model = ResidualMLP(16, width, depth, 1, balanced=True)
        bal.append(_active_fractions(model, x))
    bal_t = torch.stack(bal)  # (nets, depth)
    assert bal_t.shape == (nets, depth)
    se = 0.5 / math.sqrt(width * nets)  # exact binomial standard error per layer
    assert ((bal_t.mean(0) - 0.5).abs() < 4.5 * se).all()
    assert abs(float(bal_t.mean()) - 0.5) < 4 * se
    # given everything before layer l, the active count of layer l is Binomial(n, 1/2): independent
    # across layers and networks, variance 1/(4n) exactly
    assert float(bal_t.var()) == pytest.approx(1 / (4 * width), rel=0.1)


def test_signs_survive_state_dict_save_and_load():
    torch.manual_seed(0)
    src = CifarResNet(8, width=4, balanced=True)
    x = torch.randn(3, 3, 8, 8)
    src.eval()
    with torch.no_grad():
        y = src(x)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    torch.manual_seed(1)
    dst = CifarResNet(8, width=4, balanced=True)  # fresh: lazy signs, other seeds
    assert not any(m.is_materialized for m in dst.modules() if isinstance(m, BalancedReLU))
    dst.load_state_dict(state)
    dst.eval()
    for (name, a), (_, b) in zip(src.named_buffers(), dst.named_buffers()):
        assert torch.equal(a, b), name
    assert any(n.endswith("signs") for n, _ in dst.named_buffers())
    with torch.no_grad():
        assert torch.allclose(dst(x), y)
    # also into an already materialized model with other signs
    torch.manual_seed(2)
    other = balance_relus(CifarResNet(8, width=4), seed=99, example_input=x)
    other.load_state_dict(state)
    other.eval()
    with torch.no_grad():
        assert torch.allclose(other(x), y)


def test_balance_relus_validates_before_modifying():
    model = ResidualMLP(4, 8, 3, 1)
    with pytest.raises(ValueError, match="granularity"):
        balance_relus(model, granularity="layer")
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3  # untouched
    with pytest.raises(ValueError, match="batch"):
        balance_relus(model, channel_dim=0)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        balance_relus(nn.Linear(3, 3))
    with pytest.raises(ValueError):
        balance_relus(nn.ReLU())
    balance_relus(model)
    with pytest.raises(ValueError, match="already balanced"):
        balance_relus(model)
    with pytest.raises(ValueError, match="granularity"):
        BalancedReLU(granularity="layer")


def test_shared_relu_and_shape_errors():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    balance_relus(model, seed=0)
    assert model[1] is model[3] and isinstance(model[1], BalancedReLU)
    act = BalancedReLU(granularity="neuron", seed=0)
    act(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="shape"):
        act(torch.randn(2, 6))
    with pytest.raises(ValueError, match="batched"):
        act(torch.randn(5))


def test_example_input_materializes_and_restores_mode():
    model = ResidualMLP(4, 8, 3, 1)
    model.train()
    balance_relus(model, seed=0, example_input=torch.randn(2, 4))
    assert model.training
    assert all(m.is_materialized for m in model.modules() if isinstance(m, BalancedReLU))


class _Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_balanced_cifar_resnet_trains_with_lightning(tmp_path):
    torch.manual_seed(0)
    net = CifarResNet(8, num_classes=4, width=4, balanced=True)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen))
    net(data.tensors[0][:2])  # draw the signs so they can be compared after training
    signs0 = {n: b.clone() for n, b in net.named_buffers() if n.endswith("signs")}
    weights0 = net.fc.weight.detach().clone()
    module = _Classifier(net)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 4
    assert len(module.losses) == 4 and all(math.isfinite(v) for v in module.losses)
    assert not torch.equal(weights0, net.fc.weight.detach())  # it trained
    for name, s in net.named_buffers():
        if name.endswith("signs"):
            assert torch.equal(s, signs0[name]), name  # signs frozen
    assert len(signs0) == 1 + 2 * 3  # stem ReLU + two per block, n = 1
