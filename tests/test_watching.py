"""Watching never changes the run (issue 12, DESIGN.md "Observing never perturbs").

A run with every monitor (RegularizationMonitor, NormalityMonitor, LogGaussianMonitor) and SummaryPlots
attached must end with weights and buffers bit-identical to the run without them, with a shuffled loader,
with persistent workers, in one process and under 2-process DDP; a measured mode (sensemode, maxreg)
must draw the same training batches as the run given the same rates as mode="custom".
"""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from lightning_sd.callbacks.probe_data import default_input_fn, probe_loader, resolve_input_fn
from lightning_sd.core.probing import restored_state
from tests.distributed import run_script
from tests.scripts.fit_watched import IndexedData, fit


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters/buffers differ: {differ}"


def test_the_scenario_is_sensitive_to_a_probe_that_is_not_isolated(tmp_path) -> None:
    """Control: one extra draw from the global RNG (what an un-isolated DataLoader iter() does) changes the weights."""

    class Perturb(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            torch.empty(()).random_()  # DataLoader.__iter__ draws its base seed exactly like this

    import tests.scripts.fit_watched as script

    base = fit(str(tmp_path / "base"), watch=False)
    original = script.monitors
    script.monitors = lambda out: [Perturb()]
    try:
        perturbed = fit(str(tmp_path / "perturbed"), watch=True)
    finally:
        script.monitors = original
    assert perturbed["batches"][:6] == base["batches"][:6]  # epoch 0 is before the draw
    assert perturbed["batches"][6:] != base["batches"][6:]  # the next epoch's shuffle moved
    assert any(not torch.equal(base["state"][k], perturbed["state"][k]) for k in base["state"])


@pytest.mark.parametrize("workers", [0, 2])
def test_monitors_leave_the_run_bit_identical(tmp_path, workers) -> None:
    """Shuffled loader (and persistent workers): every monitor + SummaryPlots, same weights, buffers and batches."""
    without = fit(str(tmp_path / "without"), watch=False, workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched = fit(str(tmp_path / "with"), watch=True, workers=workers)
    assert watched["batches"] == without["batches"]
    assert len(without["batches"]) == 12  # 2 epochs x 6 batches of 16
    _assert_same_state(watched["state"], without["state"])
    # the monitors did run and wrote their figures
    assert sorted(p.name for p in (tmp_path / "with" / "plots").iterdir()) == [
        "normality_pvalues.png", "regularization.png", "sd_rates.png",
    ]


@pytest.mark.slow
def test_monitors_leave_the_run_bit_identical_ddp(tmp_path) -> None:
    """The same under 2-process DDP (gloo), shuffled, 2 persistent workers per rank: rank 0's weights and
    every rank's batches are unchanged by watching."""
    workers = 2
    runs = {}
    # Both runs in the same DDP processes, one after the other (each seeds itself): one launch, not two.
    run_script("fit_watched.py", "--out", str(tmp_path), "--watch", "0", "1", "--workers", str(workers), "--devices", "2")
    for watch in (0, 1):
        out = tmp_path / f"watch{watch}"
        batches = [json.loads((out / f"batches_rank{r}.json").read_text())["batches"] for r in (0, 1)]
        runs[watch] = (torch.load(out / "weights.pt"), batches)
    assert runs[1][1] == runs[0][1]
    # the two ranks read disjoint halves of every epoch (DistributedSampler), 2 epochs x 3 batches of 16 each
    for epoch in range(2):
        seen = [i for r in (0, 1) for b in runs[0][1][r][3 * epoch : 3 * epoch + 3] for i in b]
        assert sorted(seen) == list(range(96))
    _assert_same_state(runs[1][0], runs[0][0])


@pytest.mark.parametrize("mode", ["sensemode", "maxreg"])
def test_measured_mode_draws_the_same_batches_as_custom_rates(tmp_path, mode) -> None:
    """A measured mode, then mode="custom" with the rates it measured: same batches, same weights and buffers."""
    measured = fit(str(tmp_path / mode), watch=False, mode=mode)
    assert len(set(measured["rates"])) > 1  # really measured (not the uniform placeholder)
    assert sum(measured["rates"]) == pytest.approx(0.6 * 4, abs=1e-6)
    custom = fit(str(tmp_path / "custom"), watch=False, mode="custom", survival=measured["rates"])
    assert custom["rates"] == measured["rates"]
    assert measured["batches"] == custom["batches"]
    _assert_same_state(measured["state"], custom["state"])


# ------------------------------------------------------------------------------------------ the helpers
def test_probe_loader_is_private_and_follows_the_loader_order() -> None:
    data = IndexedData(n=10)
    shuffled = DataLoader(data, batch_size=4, shuffle=True, num_workers=0)
    sequential = DataLoader(data, batch_size=4)
    state = torch.get_rng_state()
    a = probe_loader(shuffled)
    assert a is not shuffled and a.num_workers == 0 and a.batch_size == 4
    # a shuffled loader: torch.randperm of a generator seeded 0 (seed + epoch), the same every time
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(a.sampler) == expected and list(probe_loader(shuffled).sampler) == expected
    assert list(probe_loader(shuffled, epoch=1).sampler) == torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    # a sequential one: dataset order
    assert isinstance(sequential.sampler, SequentialSampler)
    assert list(probe_loader(sequential).sampler) == list(range(10))
    # sharded as the loader is: rank 1 of 3 of a non-shuffling DistributedSampler takes 1, 4, 7, then pads
    sharded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=3, rank=1, shuffle=False))
    assert list(probe_loader(sharded).sampler) == [1, 4, 7, 0]
    # rank 0 of 2 of a shuffling one: every other example of the seeded permutation
    shuffled_shard = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=5))
    assert list(probe_loader(shuffled_shard).sampler) == expected[0::2]
    assert torch.equal(torch.get_rng_state(), state)  # building it draws nothing


def test_one_input_convention_and_the_deprecated_input_key() -> None:
    x = torch.ones(2, 3)
    assert default_input_fn(x) is x
    assert default_input_fn((x, torch.zeros(2))) is x
    assert default_input_fn({"label": torch.zeros(2), "pixel_values": x}) is x
    with pytest.raises(TypeError, match="input_fn"):
        default_input_fn({"features": x})
    assert resolve_input_fn("M", None, None) is None
    with pytest.warns(DeprecationWarning, match="input_fn"):
        fn = resolve_input_fn("M", None, "features")
    assert fn({"features": x}) is x
    with pytest.raises(KeyError):
        fn({"other": x})
    with pytest.raises(ValueError, match="not both"):
        resolve_input_fn("M", default_input_fn, 0)


def test_restored_state_puts_back_every_mode_and_buffer() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Sequential(torch.nn.Dropout()))
    net.train()
    net[2].eval()  # a mixed-mode model: only restoring the root flag would lose this
    before = {k: v.clone() for k, v in net.state_dict().items()}
    buffer = net[1].running_mean
    with restored_state(net, "train"):
        assert all(m.training for m in net.modules())
        net(torch.randn(8, 4) * 5 + 3)  # updates the running statistics
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    assert [m.training for m in net.modules()] == [True, True, True, False, False]
    _assert_same_state(dict(net.state_dict()), before)
    assert net[1].running_mean is buffer  # restored in place


def test_probe_batches_of_several_loaders_and_an_iterable_dataset(tmp_path) -> None:
    """A dict of loaders is combined as the fit loop combines it; an IterableDataset is read again from its start."""
    from torch import nn
    from torch.utils.data import IterableDataset, TensorDataset

    from lightning_sd.callbacks.probe_data import probe_batches

    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(20):
                yield torch.tensor([float(i)])

    seen: dict = {}

    class Grab(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["combined"] = probe_batches(trainer, pl_module, 2, combined=True)
            seen["first"] = probe_batches(trainer, pl_module, 3)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("trained", []).append(batch)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch["b"]).sum() + self.lin(batch["a"][0].float().unsqueeze(1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    loaders = {
        "a": DataLoader(TensorDataset(torch.arange(8)), batch_size=4),
        "b": DataLoader(Stream(), batch_size=5),
    }
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Grab()], default_root_dir=str(tmp_path))
    trainer.fit(Module(), loaders)
    combined = seen["combined"]
    assert len(combined) == 2
    for k, batch in enumerate(combined):
        assert torch.equal(batch["a"][0], torch.arange(4 * k, 4 * k + 4))
        assert torch.equal(batch["b"], torch.arange(5 * k, 5 * k + 5, dtype=torch.float32).unsqueeze(1))
    # without combined=True the first loader is read; it has 2 batches only
    assert [b[0].tolist() for b in seen["first"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # the fit loop saw the same combined batches (the probe did not consume its iterators)
    assert [t["a"][0].tolist() for t in seen["trained"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [t["b"][:, 0].tolist() for t in seen["trained"]] == [[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0]]


def test_balance_relus_example_input_restores_every_submodule_mode() -> None:
    """balance_relus(example_input=...) ran its pass in eval mode and restored only the root's flag."""
    from lightning_sd.models import balance_relus

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Dropout())
    net.train()
    net[3].eval()  # a frozen dropout inside a training model
    running = net[1].running_mean.clone()
    balance_relus(net, seed=0, example_input=torch.randn(6, 4) + 2)
    assert [m.training for m in net.modules()] == [True, True, True, True, False]
    assert torch.equal(net[1].running_mean, running)  # the pass ran in eval mode: statistics untouched
    assert net[2].signs.numel() == 4  # and drew the signs
