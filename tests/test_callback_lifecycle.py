"""When and onto what StochasticDepth puts its gates (issue 12, items 8, 12 and 13).

- blocks are numbered in the order the forward calls them, from the first training step on;
- a network built in ``configure_model`` gets gates before the strategy wraps it (1 and 2 processes);
- a second Trainer with a new callback takes over the gates of a module fitted before.
"""

from __future__ import annotations

import copy
import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.gates import existing_handle, inject_stochastic_depth, mask_generator
from lightning_sd.core.sensitivity import estimate_sensitivities, supervised_loss
from lightning_sd.core.survival import sensemode_rates, survival_rates
from lightning_sd.models import ResidualMLP
from lightning_sd.models.residual_mlp import ResidualMLPBlock
from tests.distributed import run_script, run_script_here
from tests.helpers import trainer_kwargs


def _loader(n=32, batch_size=8, out="class"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if out == "class" else torch.sin(x.sum(1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Module(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.losses.append(float(loss))
        return loss

    def test_step(self, batch, batch_idx):
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


# ---------------------------------------------------------------------------------------------- item 8
class ReversedMLP(nn.Module):
    """Defines blocks 0..3 and calls them 3, 2, 1, 0."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([ResidualMLPBlock(16) for _ in range(4)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in reversed(self.blocks):
            h = block(h)
        return self.head(h)


def _manual_loss(net: ReversedMLP, x, y, multipliers_by_position):
    """The loss with explicit multipliers, position k = k-th block called (independent of the gates)."""
    h = net.stem(x)
    for k, block in enumerate(reversed(net.blocks)):
        h = h + multipliers_by_position[k] * block.linear(block.act(h))
    return F.cross_entropy(net.head(h), y)


@pytest.mark.parametrize("drop", ["batch", "sample"])
def test_linear_rates_follow_the_call_order_from_the_first_step(tmp_path, drop):
    torch.manual_seed(0)
    module = Module(ReversedMLP())
    initial = copy.deepcopy(module.net)
    computed: list[set[int]] = []
    for i, block in enumerate(module.net.blocks):
        block.linear.register_forward_hook(lambda mod, inp, out, i=i: computed[-1].add(i))

    class NewStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            computed.append(set())

    sd = StochasticDepth(mode="linear", budget=0.75, seed=11, drop=drop)
    trainer = pl.Trainer(max_steps=3, callbacks=[NewStep(), sd], **trainer_kwargs(tmp_path, logger=False))
    with pytest.warns(UserWarning, match=r"another order than the modules are defined.*Call order: \['net.blocks.3', 'net.blocks.2'"):
        trainer.fit(module, _loader())
    p = survival_rates("linear", 4, 0.75)  # 0.9, 0.8, 0.7, 0.6 for the 1st, 2nd, 3rd, 4th block called
    assert [b.name for b in sd.handle.branches] == ["net.blocks.3", "net.blocks.2", "net.blocks.1", "net.blocks.0"]
    assert torch.equal(sd.survival, p.float())
    x, y = next(iter(_loader()))
    for step in range(3):
        if drop == "batch":
            u = torch.rand(4, generator=mask_generator(11, step, step, 0), dtype=torch.float64)
            kept = (u < p).tolist()
            # The k-th block called (module 3 - k) ran iff u_k < p_k: the first step included.
            assert computed[step] == {3 - k for k in range(4) if kept[k]}, step
        else:
            assert computed[step] == {0, 1, 2, 3}
    # The first step's loss is the loss with multipliers m_k = delta_k / p_k by call position.
    if drop == "batch":
        u = torch.rand(4, generator=mask_generator(11, 0, 0, 0), dtype=torch.float64)
        m = [(float(u[k] < p[k]) / float(p[k])) for k in range(4)]
    else:
        u = torch.rand(8, 4, generator=mask_generator(11, 0, 0, 1, 0), dtype=torch.float64)
        m = [((u[:, k] < p[k]).double() / p[k]).float().unsqueeze(1) for k in range(4)]
    with torch.no_grad():
        expected = float(_manual_loss(initial, x, y, m))
    assert module.losses[0] == pytest.approx(expected, rel=1e-6)


def test_measured_rates_stay_with_their_branch_when_renumbered(tmp_path):
    torch.manual_seed(0)
    module = Module(ReversedMLP())
    loader = _loader()
    # Independent: S of a plain copy, in definition order (blocks 0..3), on the first 2 batches.
    s_defined = estimate_sensitivities(copy.deepcopy(module.net).train(), list(loader)[:2], supervised_loss(F.cross_entropy))
    sd = StochasticDepth(mode="sensemode", budget=0.5, seed=0, sensitivity_batches=2)
    with pytest.warns(UserWarning, match="rates stay with their branch"):
        pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False)).fit(module, loader)
    # Block k is the k-th called (module 3 - k): its S and its rate are that module's.
    torch.testing.assert_close(sd.sensitivities, s_defined[[3, 2, 1, 0]], rtol=1e-5, atol=1e-7)
    expected = sensemode_rates(4, 0.5, s_defined, p_min=0.05)[[3, 2, 1, 0]]
    torch.testing.assert_close(sd.handle.survival_float64, expected, rtol=1e-6, atol=1e-9)
    assert [g.index for g in sd.handle.gates] == [0, 1, 2, 3]


def test_definition_order_model_is_not_renumbered(tmp_path):
    torch.manual_seed(0)
    sd = StochasticDepth(mode="linear", budget=0.75, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(max_steps=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False)).fit(Module(ResidualMLP(8, 16, 4, 3)), _loader())
    assert not [w for w in caught if "another order" in str(w.message)]
    assert [b.name for b in sd.handle.branches] == [f"net.blocks.{i}" for i in range(4)]


def test_resume_keeps_the_call_order_numbering(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    torch.manual_seed(0)
    first = StochasticDepth(mode="linear", budget=0.75, seed=1)
    with pytest.warns(UserWarning, match="another order"):
        pl.Trainer(max_epochs=1, callbacks=[first, ckpt], **trainer_kwargs(tmp_path, logger=False, enable_checkpointing=True)).fit(
            Module(ReversedMLP()), _loader()
        )
    resumed = StochasticDepth(mode="linear", budget=0.75, seed=1)
    names_at_setup = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            names_at_setup.append([b.name for b in resumed.handle.branches])

    torch.manual_seed(0)
    pl.Trainer(max_epochs=2, callbacks=[resumed, Spy()], **trainer_kwargs(tmp_path, logger=False)).fit(
        Module(ReversedMLP()), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    # Restored in call order before the first resumed step; rates as numbered.
    assert names_at_setup[0] == ["net.blocks.3", "net.blocks.2", "net.blocks.1", "net.blocks.0"]
    assert torch.equal(resumed.survival, survival_rates("linear", 4, 0.75).float())


# ---------------------------------------------------------------------------------------------- item 12
class LazyModule(Module):
    """The network is built in configure_model; nothing exists at setup."""

    def __init__(self):
        super().__init__(None)

    def configure_model(self):
        if self.net is not None:
            return
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = ResidualMLP(8, 16, 6, 3)


def test_network_built_in_configure_model_is_gated_before_training(tmp_path):
    def fit(module, callbacks):
        trainer = pl.Trainer(max_steps=4, callbacks=callbacks, **trainer_kwargs(tmp_path, logger=False))
        trainer.fit(module, _loader())
        return {k: v.clone() for k, v in module.state_dict().items()}

    lazy = LazyModule()
    sd = StochasticDepth(mode="linear", budget=0.6, seed=3)
    lazy_weights = fit(lazy, [sd])
    assert sd.num_blocks == 6 and existing_handle(lazy) is sd.handle
    assert "configure_model" not in lazy.__dict__  # the one-shot wrapper is gone
    eager = Module(None)
    LazyModule.configure_model(eager)  # the same network, built before setup
    eager_weights = fit(eager, [StochasticDepth(mode="linear", budget=0.6, seed=3)])
    plain = Module(None)
    LazyModule.configure_model(plain)
    plain_weights = fit(plain, [])
    assert all(torch.equal(lazy_weights[k], eager_weights[k]) for k in eager_weights)
    assert not all(torch.equal(lazy_weights[k], plain_weights[k]) for k in plain_weights)  # blocks were dropped


def test_gates_built_under_configure_models_init_contexts_live_on_cpu_in_float32(tmp_path):
    # FSDP builds the network under a meta/cuda default device, "*-true" precision under its default dtype
    # (Lightning's _call_configure_model); the gates' rates and masks must still be CPU float tensors.
    module = LazyModule()
    sd = StochasticDepth(mode="linear", budget=0.6, seed=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False))
    sd.setup(trainer, module, "fit")
    assert existing_handle(module) is None and "configure_model" in module.__dict__
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            module.configure_model()
    finally:
        torch.set_default_dtype(dtype)
    assert module.net.stem.weight.device.type == "meta"  # built where the strategy said
    handle = existing_handle(module)
    assert handle is sd.handle and handle.num_blocks == 6
    assert handle.survival.dtype == torch.float32 and handle.kept.device.type == "cpu"
    kept = handle.resample(0)
    u = torch.rand(6, generator=mask_generator(3, 0, 0, 0), dtype=torch.float64)
    assert kept.tolist() == (u < survival_rates("linear", 6, 0.6)).tolist()


@pytest.mark.slow
def test_configure_model_under_ddp_matches_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    common = ("--lazy", "--seed", "none", "--mode", "linear", "--budget", "0.6")
    run_script_here("fit_regression.py", "--out", str(single), "--devices", "1", "--batch-size", "16", *common)
    run_script("fit_regression.py", "--out", str(ddp), "--devices", "2", "--strategy", "ddp", "--batch-size", "8", *common)
    ranks = [json.load(open(ddp / f"masks_rank{r}.json")) for r in (0, 1)]
    ref = json.load(open(single / "masks_rank0.json"))
    assert [r["initial_seed"] for r in ranks] == [100, 101]  # the ranks' global RNGs differ ...
    assert ranks[0]["seed"] == ranks[1]["seed"] == ref["seed"] == 100  # ... the mask seed is rank 0's
    assert ranks[0]["wrapped"] == "DistributedDataParallel" and ranks[0]["gated_at_fit_start"]
    assert all(len(r["survival"]) == 8 and r["configure_model_restored"] for r in ranks)
    kept = [[rec["kept"] for rec in r["records"]] for r in (*ranks, ref)]
    assert kept[0] == kept[1] == kept[2]
    assert any(not all(k) for k in kept[2])  # blocks were skipped
    w, w_ref = torch.load(ddp / "weights.pt"), torch.load(single / "weights.pt")
    assert max(float((w[k] - w_ref[k]).abs().max()) for k in w_ref) < 1e-5


# ---------------------------------------------------------------------------------------------- item 13
def test_second_trainer_takes_over_the_gates(tmp_path):
    torch.manual_seed(0)
    module = Module(ResidualMLP(8, 16, 4, 3))
    first = StochasticDepth(mode="linear", budget=0.75, seed=1)
    pl.Trainer(max_steps=2, callbacks=[first], **trainer_kwargs(tmp_path, logger=False)).fit(module, _loader())
    gates = existing_handle(module)
    assert gates is first.handle

    samples = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            samples.append((trainer.global_step - 1, batch_idx, existing_handle(pl_module).drop_kind.masks.clone()))

    second = StochasticDepth(mode="uniform", budget=0.5, seed=7, drop="sample")
    trainer = pl.Trainer(max_steps=3, callbacks=[second, Recorder()], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, _loader())
    assert first.handle is None  # detached
    assert second.handle is gates and existing_handle(module) is gates  # the same gates, not injected twice
    assert gates.seed == 7 and gates.drop == "sample" and torch.equal(gates.survival, torch.full((4,), 0.5))
    p = torch.full((4,), 0.5, dtype=torch.float64)
    for step, batch_idx, mask in samples:  # the new callback's mask stream
        u = torch.rand(8, 4, generator=mask_generator(7, step, batch_idx, 1, 0), dtype=torch.float64)
        assert torch.equal(mask, ((u < p).double() / p).float())

    # test runs the deterministic network: "inverted" -> the plain network, bit for bit.
    test_x, test_y = next(iter(_loader(n=32, batch_size=32)))
    result = trainer.test(module, DataLoader(TensorDataset(test_x, test_y), batch_size=32), verbose=False)
    plain = ResidualMLP(8, 16, 4, 3)
    plain.load_state_dict(module.net.state_dict())
    with torch.no_grad():
        expected = float(F.cross_entropy(plain.eval()(test_x), test_y))
    assert result[0]["test_loss"] == expected

    # A third Trainer only tests, with "expected" scaling: branch l is multiplied by p_l.
    rates = [0.9, 0.3, 0.6, 0.5]
    third = StochasticDepth(mode="custom", survival=rates, scaling="expected", seed=0)
    result = pl.Trainer(callbacks=[third], **trainer_kwargs(tmp_path, logger=False)).test(
        module, DataLoader(TensorDataset(test_x, test_y), batch_size=32), verbose=False
    )
    assert second.handle is None and third.handle is gates
    with torch.no_grad():
        h = plain.stem(test_x)
        for p_l, block in zip(rates, plain.blocks):
            h = h + p_l * block.linear(block.act(h))
        expected = float(F.cross_entropy(plain.head(h), test_y))
    assert result[0]["test_loss"] == pytest.approx(expected, rel=1e-6)


def test_test_only_with_inverted_scaling_needs_no_gates(tmp_path):
    torch.manual_seed(0)
    module = Module(ResidualMLP(8, 16, 4, 3))
    x, y = next(iter(_loader(n=16, batch_size=16)))
    sd = StochasticDepth(mode="linear", budget=0.5)
    result = pl.Trainer(callbacks=[sd], **trainer_kwargs(tmp_path, logger=False)).test(
        module, DataLoader(TensorDataset(x, y), batch_size=16), verbose=False
    )
    assert existing_handle(module) is None and sd.handle is None
    with torch.no_grad():
        assert result[0]["test_loss"] == float(F.cross_entropy(module.net.eval()(x), y))


def test_takeover_of_gates_put_by_hand_stops_their_auto_resampling(tmp_path):
    torch.manual_seed(0)
    module = Module(ResidualMLP(8, 16, 4, 3))
    handle = inject_stochastic_depth(module.net, 0.5, seed=0)  # plain-PyTorch gates, auto_resample=True
    assert handle.auto_resample
    kept = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kept.append(handle.kept.tolist())

    sd = StochasticDepth(mode="uniform", budget=0.25, seed=5)
    pl.Trainer(max_steps=3, callbacks=[sd, Recorder()], **trainer_kwargs(tmp_path, logger=False)).fit(module, _loader())
    assert sd.handle is handle and not handle.auto_resample
    p = torch.full((4,), 0.25, dtype=torch.float64)
    for step in range(3):  # the callback's masks, not the forward hook's
        u = torch.rand(4, generator=mask_generator(5, step, step, 0), dtype=torch.float64)
        assert kept[step] == (u < p).tolist()


def test_takeover_with_its_own_blocks_reinjects_and_detaches(tmp_path):
    torch.manual_seed(0)
    module = Module(ResidualMLP(8, 16, 4, 3))
    first = StochasticDepth(mode="uniform", budget=0.5, seed=1)
    pl.Trainer(max_steps=1, callbacks=[first], **trainer_kwargs(tmp_path, logger=False)).fit(module, _loader())
    old = first.handle
    second = StochasticDepth(mode="uniform", budget=0.5, seed=2, blocks=["net.blocks.0", "net.blocks.2"])
    pl.Trainer(max_steps=1, callbacks=[second], **trainer_kwargs(tmp_path, logger=False)).fit(module, _loader())
    assert first.handle is None and old.removed
    assert [b.name for b in existing_handle(module).branches] == ["net.blocks.0", "net.blocks.2"]
    assert existing_handle(module) is second.handle and second.handle.seed == 2
