"""Injected models pickle (``torch.save(model)``, multiprocessing spawn) and copy (deepcopy, EMA, SWA) with live gates."""

from __future__ import annotations

import copy
import io
import multiprocessing as mp
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from lightning_sd.callbacks import StochasticDepth
from lightning_sd.core.gates import _GateBase, existing_handle, inject_stochastic_depth
from lightning_sd.models import CifarResNet, ResidualMLP
from tests.helpers import RegressionModule, regression_data, trainer_kwargs

# (name, constructor, input shape, injection arguments)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (4, 3, 32, 32),
                 dict(survival=[0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5], drop="batch", scaling="inverted", seed=7)),
    "cifar_resnet20": (lambda: CifarResNet(20, width=4), (4, 3, 8, 8),
                       dict(survival=0.5, drop="sample", scaling="expected", seed=11)),
}


def _plain(name: str, state: dict) -> nn.Module:
    model = MODELS[name][0]()
    model.load_state_dict(state)
    return model


def _gate_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _GateBase)]


def _train_outputs(model: nn.Module, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Outputs of ``steps`` training-mode forwards (each draws the next mask of the auto-resample stream)."""
    model.train()
    with torch.no_grad():
        return [model(x) for _ in range(steps)]


def _check_round_trip(name: str, original: nn.Module, loaded: nn.Module) -> None:
    h, hl = existing_handle(original), existing_handle(loaded)
    assert hl is not None and hl is not h and hl.model is loaded
    # handle included: rates, drop, scaling, seed, the position in the mask stream
    assert hl._p == h._p and torch.equal(hl.survival, h.survival)
    assert (hl.drop, hl.scaling, hl.seed, hl._auto_step, hl.num_blocks) == (h.drop, h.scaling, h.seed, h._auto_step, h.num_blocks)
    assert [b.name for b in hl.branches] == [b.name for b in h.branches]
    # every gate of the loaded model is one of its own modules and talks to the loaded handle
    assert _gate_names(loaded) == _gate_names(original) and len(_gate_names(loaded)) == h.num_blocks
    assert all(g.handle is hl for g in hl.gates)
    loaded_modules = {id(m) for m in loaded.modules()}
    assert all(id(g) in loaded_modules for g in hl.gates)
    assert all(id(g.block) in loaded_modules for g in hl.gates if hasattr(g, "block"))
    assert set(loaded.state_dict()) == set(original.state_dict())

    x = torch.randn(MODELS[name][1], generator=torch.Generator().manual_seed(1))
    original.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    # the mask stream continues where the original is: the next training steps draw the same masks
    masks_before = h._auto_step
    out_o = _train_outputs(original, x, 3)
    out_l = _train_outputs(loaded, x, 3)
    assert h._auto_step == hl._auto_step == masks_before + 3
    for a, b in zip(out_o, out_l):
        assert torch.equal(a, b)
    # the gates are live: the training outputs are not the plain network's (blocks dropped / masked)
    plain = _plain(name, original.state_dict()).train()
    with torch.no_grad():
        assert not torch.equal(plain(x), out_l[-1])
    # same explicit mask on both -> same training output
    m = torch.tensor([1.0, 0.0] * (h.num_blocks // 2) + [1.0] * (h.num_blocks % 2))
    with torch.no_grad(), h.override(m), hl.override(m):
        assert torch.equal(original(x), loaded(x))

    # remove() on the loaded copy gives the plain model back and leaves the original gated
    hl.remove()
    assert existing_handle(loaded) is None and _gate_names(loaded) == []
    assert not any("forward" in mod.__dict__ for mod in loaded.modules())
    assert len(loaded._forward_pre_hooks) == 0
    assert existing_handle(original) is h and len(_gate_names(original)) == h.num_blocks
    plain = _plain(name, loaded.state_dict())
    for mode in (True, False):
        loaded.train(mode)
        plain.train(mode)
        with torch.no_grad():
            assert torch.equal(loaded(x), plain(x))


def _inject(name: str) -> nn.Module:
    torch.manual_seed(0)
    build, shape, kwargs = MODELS[name]
    model = build()
    kwargs = dict(kwargs)
    inject_stochastic_depth(model, kwargs.pop("survival"), **kwargs)
    _train_outputs(model, torch.randn(shape), 2)  # advance the mask stream: the copy must continue it
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_save_load_round_trips_an_injected_model(name: str) -> None:
    model = _inject(name)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _check_round_trip(name, model, loaded)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pickle_dumps_loads_round_trips_an_injected_model(name: str) -> None:
    model = _inject(name)
    _check_round_trip(name, model, pickle.loads(pickle.dumps(model)))


def test_the_import_block_rebuilds_string_annotation_globals_and_imports() -> None:
    """Generated code of a block defined under ``from __future__ import annotations`` has string globals
    (its annotations); the import block writes them as literals, on every torch (torch 2.11's fx raised)."""
    from lightning_sd.core.gates import _import_block

    namespace: dict = {}
    exec(_import_block({"Tensor": "Tensor", "typing_Optional": "Optional[Tensor]", "torch": torch}), namespace)  # noqa: S102
    assert namespace["Tensor"] == "Tensor"
    assert namespace["typing_Optional"] == "Optional[Tensor]"
    assert namespace["torch"] is torch
    # CifarResNet's module uses ``from __future__ import annotations``: its blocks' generated forwards hold such strings
    model = CifarResNet(8, width=2)
    inject_stochastic_depth(model, 0.5)
    generated = model.layer1[0].__dict__["forward"].func
    assert any(isinstance(v, str) for v in generated._globals.values())
    copied = pickle.loads(pickle.dumps(generated))
    assert copied.src == generated.src and copied._globals.keys() == generated._globals.keys()


def _run_in_child(model: nn.Module, x: torch.Tensor) -> tuple[list[float], int, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rates, seed, eval output, plain train-mode output after remove(), two gated training outputs."""
    torch.set_num_threads(1)  # as the parent (conftest): a spawned child starts with torch's default, whose conv sums round differently
    handle = existing_handle(model)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    train_out = _train_outputs(model, x, 2)
    handle.remove()
    model.train()
    with torch.no_grad():
        plain_out = model(x)
    return handle._p, handle.seed, eval_out, plain_out, train_out


def test_an_injected_model_crosses_a_spawned_process() -> None:
    """multiprocessing spawn pickles the model into a fresh interpreter, which runs it through its gates."""
    name = "resnet18"
    model = _inject(name)
    x = torch.randn(MODELS[name][1], generator=torch.Generator().manual_seed(2))
    # expectations first, on a copy: the child shares the tensors' memory (torch moves them to shared
    # memory when it pickles them for a process), so its BatchNorm updates reach this process's buffers
    expected = _run_in_child(copy.deepcopy(model), x)
    plain = _plain(name, model.state_dict()).eval()  # before the child updates the shared BatchNorm buffers
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_run_in_child, (model, x))
    h = existing_handle(model)
    assert got[:2] == expected[:2] == (h._p, h.seed)
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    assert len(got[4]) == 2 and all(torch.equal(a, b) for a, b in zip(got[4], expected[4]))
    # and the child's outputs are those of the gated model: its evaluation equals the plain network
    # (scaling="inverted"), its training steps do not
    with torch.no_grad():
        assert torch.equal(got[2], plain(x)) and not torch.equal(got[4][0], got[3])


def test_deepcopy_is_independent_and_its_remove_touches_only_the_copy() -> None:
    model = _inject("resnet18")
    h = existing_handle(model)
    twin = copy.deepcopy(model)
    ht = existing_handle(twin)
    assert ht is not h and ht.model is twin and all(g.handle is ht for g in ht.gates)
    ht.set_survival([1.0] * h.num_blocks)  # rates of the copy are its own
    assert h._p == MODELS["resnet18"][2]["survival"]
    ht.remove()
    assert existing_handle(twin) is None and _gate_names(twin) == []
    assert existing_handle(model) is h and len(_gate_names(model)) == 8
    assert "forward" in model.layer1[0].__dict__ and len(model._forward_pre_hooks) == 1


def test_copies_made_after_training_steps_run_their_own_branches() -> None:
    """An eager gate caches a direct call of its branch (bound to its block) at its first training call:
    a deep copy or an unpickled model made afterwards must call its own blocks, not the original's."""
    torch.manual_seed(0)
    plain = ResidualMLP(8, 16, 4, 2)
    model = copy.deepcopy(plain)
    handle = inject_stochastic_depth(model, 1.0, scaling="inverted", auto_resample=False)
    handle.resample(0)
    x = torch.randn(5, 8)
    torch.testing.assert_close(model.train()(x), plain(x), rtol=0, atol=0)  # every branch kept, m = 1
    reference = copy.deepcopy(plain)
    with torch.no_grad():
        for w in reference.parameters():
            w.mul_(2)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            for w in twin.parameters():
                w.mul_(2)
        torch.testing.assert_close(twin.train()(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # the original is untouched


def test_a_handle_pickled_without_the_derived_rate_state_rebuilds_it() -> None:
    """Handles pickled by an older version lack the rate state derived later (the eager m_l floats, the
    all-kept flag of compiled models): unpickling rebuilds it from the rates and the scaling."""
    model = ResidualMLP(8, 16, 4, 2)
    handle = inject_stochastic_depth(model, [1.0, 0.8, 0.5, 0.25], scaling="inverted", auto_resample=False)
    state = dict(handle.__dict__)
    for derived in ("_kept_scale", "_all_kept", "_specialize_full_depth", "_rates_key"):
        del state[derived]
    old = handle.__class__.__new__(handle.__class__)
    old.__setstate__(state)
    assert old._kept_scale == [1.0, 1.25, 2.0, 4.0]
    assert old._all_kept is False and old.specialize_full_depth is True
    handle.set_survival(torch.ones(4))
    state = dict(handle.__dict__)
    del state["_all_kept"], state["_kept_scale"]
    old.__setstate__(state)
    assert old._all_kept is True and old._kept_scale == [1.0] * 4


def test_timm_model_ema_v3_averages_an_injected_model() -> None:
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = CifarResNet(20, width=4)
    inject_stochastic_depth(model, 0.5, seed=3)
    ema = ModelEmaV3(model, decay=0.9)
    he = existing_handle(ema.module)
    assert he is not None and he is not existing_handle(model) and he.model is ema.module
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    decays = []
    for step in range(4):
        model.train()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, step=step)
        d = 0.0 if step < 2 else 0.9  # timm: no averaging for the first update_after_step + 1 steps, then decay
        decays.append(d)
        for k, v in model.state_dict().items():  # independent EMA of every float entry: e <- d e + (1 - d) w
            expected[k] = d * expected[k] + (1 - d) * v.detach() if v.is_floating_point() else v.detach().clone()
    assert decays == [ema.get_decay(s) for s in range(4)]
    ema_state = ema.module.state_dict()
    assert set(ema_state) == set(expected)
    for k in expected:
        torch.testing.assert_close(ema_state[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
    # the EMA copy runs through its own gates: eval equals the plain network with the EMA weights
    plain = CifarResNet(20, width=4)
    plain.load_state_dict(ema_state)
    ema.module.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(ema.module(x), plain(x))


class _RecordWeights(pl.Callback):
    def __init__(self) -> None:
        self.at_epoch_end: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_epoch_end.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def test_lightning_swa_averages_a_model_trained_with_stochastic_depth(tmp_path) -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    pl.seed_everything(0)
    module = RegressionModule(depth=6, lr=0.01)
    loader = DataLoader(regression_data(64), batch_size=16)
    sd = StochasticDepth(mode="uniform", budget=0.5, scaling="expected", seed=0)
    record = _RecordWeights()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, logger=False), callbacks=[sd, record, swa]).fit(module, loader)
    # swa_epoch_start=2 is 1-based: SWA averages the weights at the start of epochs 1, 2, 3 (0-based; the
    # ends of epochs 0, 1, 2), then transfers the average into the module
    assert len(record.at_epoch_end) == 4
    for k, v in module.named_parameters():
        mean = sum(record.at_epoch_end[e][k] for e in range(3)) / 3
        assert bool(torch.isfinite(mean).all()) and not torch.equal(record.at_epoch_end[0][k], record.at_epoch_end[2][k])
        torch.testing.assert_close(v.detach(), mean, rtol=1e-5, atol=1e-7)
    h = existing_handle(module.net)
    assert h is not None and h.num_blocks == 6 and all(g.handle is h for g in h.gates)
    # evaluation through the gates (scaling="expected": branch l times p_l = 0.5) equals the plain network
    # with the averaged weights and every branch scaled by 0.5
    x = regression_data(8, seed=5).tensors[0]
    plain = RegressionModule(depth=6)
    plain.load_state_dict(module.state_dict())
    for block in plain.net.blocks:
        block.branch_scale *= 0.5
    module.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), plain(x), rtol=1e-6, atol=1e-7)


class _RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))


class _ValidatedRegression(RegressionModule):
    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.val_losses: list[float] = []

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.val_losses.append(float(loss))
        return loss


def test_lightning_ema_weight_averaging_leaves_the_stochastic_depth_run_unchanged(tmp_path) -> None:
    """Lightning's ``EMAWeightAveraging`` copies the gated model (its own live gates) and swaps the averaged
    weights in for validation: the training losses of every step are those of the run without it, and the
    validation (through the gates, evaluation mode) sees other weights than the training model's."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("EMAWeightAveraging is in Lightning >= 2.6")

    def fit(ema: bool) -> tuple[list[float], _ValidatedRegression]:
        pl.seed_everything(0)
        module = _ValidatedRegression(depth=6, lr=0.01)
        record = _RecordLosses()
        sd = StochasticDepth(mode="sensemode", budget=0.5, seed=0, sensitivity_batches=2)
        extra = [callbacks.EMAWeightAveraging(decay=0.9)] if ema else []
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=False), callbacks=[sd, record, *extra])
        trainer.fit(module, DataLoader(regression_data(64), batch_size=16), DataLoader(regression_data(32, seed=3), batch_size=16))
        return record.losses, module

    plain_losses, plain_module = fit(ema=False)
    ema_losses, module = fit(ema=True)
    assert len(plain_losses) == 12
    assert ema_losses == plain_losses
    # validation ran (sanity check + 3 epochs, 2 batches each) and saw the averaged weights with EMA
    assert len(module.val_losses) == len(plain_module.val_losses) == 8
    assert module.val_losses[:2] == plain_module.val_losses[:2]  # the sanity check, before any update
    assert module.val_losses[2:] != plain_module.val_losses[2:]
    h = existing_handle(module.net)
    assert h is not None and all(g.handle is h for g in h.gates)
