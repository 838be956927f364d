"""Resume, gradient accumulation, mixed precision and torch.compile with StochasticDepth."""

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo
from torch.utils.data import DataLoader

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.gates import existing_handle, inject_stochastic_depth, mask_generator
from lightning_sd.models import ResidualMLP
from tests.helpers import ClassifierModule, RegressionModule, image_loader, regression_data, trainer_kwargs


class _MaskLog(pl.Callback):
    def __init__(self):
        self.kept = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = existing_handle(pl_module)
        sample = getattr(h.drop_kind, "masks", None)
        sample = None if sample is None else sample.clone()
        self.kept.append((trainer.global_step, h.kept.clone(), sample))


def _fit(tmp_path, module, epochs, drop, loader, ckpt_path=None, save=None):
    cb = StochasticDepth(mode="linear", budget=0.6, drop=drop, seed=5)
    log = _MaskLog()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb, log], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return cb, log.kept


def _same_masks(a, b):
    return len(a) == len(b) and all(
        sa == sb and torch.equal(ka, kb) and ((xa is None and xb is None) or torch.equal(xa, xb))
        for (sa, ka, xa), (sb, kb, xb) in zip(a, b)
    )


@pytest.mark.parametrize("drop", ["batch", "sample"])
@pytest.mark.parametrize("model", ["mlp", "cifar"])
def test_resume_continues_masks_and_weights(tmp_path, drop, model):
    def make():
        return RegressionModule(depth=8, lr=0.01) if model == "mlp" else ClassifierModule()

    def loader():
        if model == "mlp":
            return DataLoader(regression_data(n=24), batch_size=4)
        return image_loader(n=24, batch_size=4)

    torch.manual_seed(0)
    straight = make()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    _, masks_straight = _fit(tmp_path / "a", straight, 4, drop, loader())

    first = make()
    first.load_state_dict(init)
    ckpt = str(tmp_path / "half.ckpt")
    _, masks_first = _fit(tmp_path / "b", first, 2, drop, loader(), save=ckpt)
    resumed = make()
    torch.manual_seed(123)  # the global RNG differs: masks must not depend on it
    cb, masks_resumed = _fit(tmp_path / "c", resumed, 4, drop, loader(), ckpt_path=ckpt)
    assert cb.seed == 5
    assert len(masks_straight) == 24
    assert _same_masks(masks_straight, masks_first + masks_resumed)
    for k, v in straight.state_dict().items():
        if model == "mlp":
            assert torch.equal(v, resumed.state_dict()[k]), k
        else:
            # oneDNN's convolution backward is not bitwise reproducible on CPU between runs (the
            # gradients can differ in the last bit), so the CNN's weights are compared to float32
            # rounding; masks above and the MLP's weights are compared bit for bit.
            torch.testing.assert_close(v, resumed.state_dict()[k], rtol=0, atol=1e-5, msg=k)


def test_checkpoint_state_restores_rates_and_seed(tmp_path):
    module = ClassifierModule()
    ckpt = str(tmp_path / "c.ckpt")
    cb = StochasticDepth(mode="custom", survival=[0.9, 0.8, 0.7, 0.6, 0.5, 0.6, 0.7, 0.8, 0.9], seed=42)
    trainer = pl.Trainer(max_steps=2, callbacks=[cb], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, image_loader(n=8, batch_size=4))
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (sd_state,) = [v for k, v in state.items() if k.startswith("StochasticDepth")]
    assert sd_state["seed"] == 42 and sd_state["mode"] == "custom"
    assert sd_state["survival"] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_gradient_accumulation_draws_one_mask_per_micro_batch(tmp_path):
    records = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records.append((trainer.global_step, batch_idx, existing_handle(pl_module).kept.clone()))

    cb = StochasticDepth(mode="uniform", budget=0.5, seed=9)
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[cb, Recorder()], **trainer_kwargs(tmp_path))
    trainer.fit(ClassifierModule(), image_loader(n=24, batch_size=4))
    assert len(records) == 6  # 3 optimizer steps x 2 micro-batches
    # records are taken after the batch: the optimizer step of an odd batch_idx has already advanced global_step
    for (step, batch_idx, kept) in records:
        mask_step = step - 1 if batch_idx % 2 == 1 else step
        g = mask_generator(9, mask_step, batch_idx, 0)
        expected = torch.rand(cb.num_blocks, generator=g, dtype=torch.float64) < 0.5
        assert torch.equal(kept, expected)
    assert not torch.equal(records[0][2], records[1][2])  # two micro-batches of one step differ


class _LossLog(pl.Callback):
    """Per-step training loss and the mask the step used."""

    def __init__(self):
        self.loss, self.kept = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss.append(float(outputs["loss"]))
        self.kept.append(existing_handle(pl_module).kept.clone())


def _fit_precision(tmp_path, precision, mode, drop):
    torch.manual_seed(0)
    net = None  # ClassifierModule's BatchNorm CNN
    module = ClassifierModule(net, lr=0.01)
    kwargs = dict(mode=mode, budget=0.7, drop=drop, seed=0, sensitivity_batches=2)
    if mode == "custom":
        kwargs.pop("budget")
        kwargs["survival"] = [0.9] * 9
    cb = StochasticDepth(**kwargs)
    log = _LossLog()
    trainer = pl.Trainer(max_steps=3, precision=precision, callbacks=[cb, log], **trainer_kwargs(tmp_path / precision))
    trainer.fit(module, image_loader(n=16, batch_size=4))
    return module, cb, log


@pytest.mark.parametrize("mode", ["uniform", "linear", "custom", "sensemode", "maxreg"])
@pytest.mark.parametrize("drop", ["batch", "sample"])
def test_bf16_mixed_every_mode_and_drop(tmp_path, mode, drop):
    """bf16-mixed trains like 32-true from the same initialization: same rates and masks, close losses.

    Tolerances: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%); rounded at each of the ~20
    layers, the first loss (same weights in both runs) moves by at most 0.8% here, so 2% is asserted.
    Later losses also carry two updates computed from bf16 gradients (measured up to 2.2% at lr 0.01):
    5% is asserted.
    """
    _, cb32, log32 = _fit_precision(tmp_path, "32-true", mode, drop)
    module, cb, log = _fit_precision(tmp_path, "bf16-mixed", mode, drop)
    assert cb.survival.dtype == torch.float32
    if mode != "custom":
        assert float(cb.survival.sum()) == pytest.approx(0.7 * 9, abs=1e-4)
    # uniform/linear/custom do not depend on the weights; sensemode's S_l and maxreg's g_l are measured
    # with autocast off, so bf16-mixed gets the float32 rates (bf16 would move S_1 of this BatchNorm CNN
    # from 0.111 to 0.029: a sum ~60x smaller than the sum of its terms' magnitudes)
    torch.testing.assert_close(cb.survival, cb32.survival, rtol=0, atol=1e-6)
    if mode == "sensemode":
        torch.testing.assert_close(cb.sensitivities, cb32.sensitivities, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(log.kept, log32.kept))  # masks from (seed, step), not precision
    assert len(log.loss) == len(log32.loss) == 3
    assert log.loss[0] == pytest.approx(log32.loss[0], rel=0.02)
    assert log.loss == pytest.approx(log32.loss, rel=0.05)
    assert log.loss != log32.loss  # bf16 autocast really ran
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


def test_16_mixed_on_cpu(tmp_path):
    cb = StochasticDepth(mode="uniform", budget=0.5, seed=0)
    module = ClassifierModule()
    # Lightning's own answer on CPU: fp16 AMP is unsupported there, it switches to bf16-mixed and says so.
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = pl.Trainer(max_steps=2, precision="16-mixed", callbacks=[cb], **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader(n=8, batch_size=4))
    assert trainer.global_step == 2
    assert cb.survival.dtype == torch.float32


class _GraphCounter:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, inputs):
        self.graphs += 1
        return gm.forward


def test_sample_drop_compiles_once_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 6, 2).train()
    handle = inject_stochastic_depth(model, 0.6, drop="sample", auto_resample=False)
    counter = _GraphCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 8)
    outputs = []
    for step in range(4):
        handle.resample(step, batch_size=4)
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
        outputs.append(out)
    assert counter.graphs == 1  # new masks every step, no recompilation
    assert not torch.equal(outputs[0], outputs[1])
    handle.resample(9, batch_size=4)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
