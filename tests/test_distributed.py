"""Stochastic depth under DDP (two real processes over gloo) and the strategy decision."""

import json
from unittest import mock

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)

from lightning_sd.callbacks.strategy_support import fills_zero_gradients_after_backward, skips_compute_under
from lightning_sd.core.gates import mask_generator
from tests.distributed import run_script, run_script_here


def load(path):
    return torch.load(path / "weights.pt"), json.load(open(path / "masks_rank0.json"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_script_here("fit_regression.py", "--out", str(out), "--devices", "1", "--batch-size", "16")
    return load(out)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_find_unused_parameters_true", "ddp_spawn", "ddp_fork", "ddp_static_graph"])
def test_ddp_batch_drop_equals_single_process(tmp_path, single_run, strategy):
    run_script("fit_regression.py", "--out", str(tmp_path), "--devices", "2", "--strategy", strategy, "--batch-size", "8")
    weights, masks = load(tmp_path)
    ref_weights, ref_masks = single_run
    rank1 = json.load(open(tmp_path / "masks_rank1.json"))
    # Same mask on every rank at every step, and the same as the single-process run.
    assert [r["kept"] for r in masks["records"]] == [r["kept"] for r in rank1["records"]]
    assert [r["kept"] for r in masks["records"]] == [r["kept"] for r in ref_masks["records"]]
    assert any(not all(r["kept"]) for r in masks["records"])  # some blocks were really skipped
    diff = max(float((weights[k] - ref_weights[k]).abs().max()) for k in weights)
    assert diff < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("route", ["--compile", "--sd-compile"])
def test_ddp_compiled_batch_drop_equals_single_process(tmp_path, single_run, route):
    """Under DDP, where Dynamo compiles through its DDPOptimizer, the same masks and weights as the eager
    single-process run: the user compiles the network (route "cond"), or StochasticDepth(compile=...)
    compiles each branch as a region."""
    run_script("fit_regression.py", "--out", str(tmp_path), "--devices", "2", "--strategy", "ddp_fork", "--batch-size", "8",
               route, "aot_eager")
    weights, masks = load(tmp_path)
    ref_weights, ref_masks = single_run
    assert masks["wrapped"] == "DistributedDataParallel"
    whole = route == "--compile"
    assert (masks["net_type"] == "OptimizedModule") == whole and (masks["compiled_regions"] == 8) == (not whole)
    assert ref_masks["net_type"] != "OptimizedModule" and ref_masks["compiled_regions"] == 0
    assert [r["kept"] for r in masks["records"]] == [r["kept"] for r in ref_masks["records"]]
    assert any(not all(r["kept"]) for r in masks["records"])
    weights = {k.replace("_orig_mod.", ""): v for k, v in weights.items()}
    assert weights.keys() == ref_weights.keys()
    assert max(float((weights[k] - ref_weights[k]).abs().max()) for k in weights) < 1e-5


@pytest.mark.slow
def test_ddp_sample_drop_masks_differ_per_rank_reproducibly(tmp_path):
    run_script("fit_regression.py", "--out", str(tmp_path), "--devices", "2", "--strategy", "ddp_fork", "--drop", "sample", "--steps", "3")
    ranks = [json.load(open(tmp_path / f"masks_rank{r}.json")) for r in (0, 1)]
    seed = ranks[0]["seed"]
    p = torch.tensor(ranks[0]["survival"], dtype=torch.float64)
    for rank, data in enumerate(ranks):
        for rec in data["records"]:
            # recorded after the optimizer step: the mask was drawn at global_step - 1
            g = mask_generator(seed, rec["step"] - 1, rec["batch_idx"], 1, rank)
            u = torch.rand(8, len(p), generator=g, dtype=torch.float64)
            expected = ((u < p).double() / p).float()
            assert torch.equal(torch.tensor(rec["sample"]), expected)
    assert ranks[0]["records"][0]["sample"] != ranks[1]["records"][0]["sample"]


def test_strategy_decision():
    assert skips_compute_under(SingleDeviceStrategy("cpu")) == (True, None)
    assert skips_compute_under(DDPStrategy()) == (True, None)
    assert skips_compute_under(DDPStrategy(find_unused_parameters=True))[0] is True
    skip, message = skips_compute_under(FSDPStrategy())
    assert skip is False and "masked" in message and "FSDPStrategy" in message
    # Strategies whose constructors need their packages (deepspeed, torch_xla) are checked by type.
    for cls in (DeepSpeedStrategy, ModelParallelStrategy, XLAStrategy):
        skip, message = skips_compute_under(cls.__new__(cls))
        assert skip is False and cls.__name__ in message
    custom = mock.Mock(spec=Strategy)  # a Strategy that is none of the known families
    with pytest.raises(RuntimeError, match="does not support the strategy Mock"):
        skips_compute_under(custom)
    # zero gradients after the backward on one device only: DDP's reducer needs them inside it
    assert fills_zero_gradients_after_backward(SingleDeviceStrategy("cpu")) is True
    assert fills_zero_gradients_after_backward(DDPStrategy()) is False
    assert fills_zero_gradients_after_backward(FSDPStrategy()) is False


@pytest.mark.slow
def test_ddp_subset_drop_equals_one_process_replaying_both_ranks(tmp_path):
    """drop="subset" under 2-process DDP: rank r runs each branch on its own subset, keyed by r.

    Independent computation in this process: for each step, each rank's shard of the batch through the
    model with that rank's subsets (handle.set_rank), gradients averaged over the two ranks (DDP's
    all-reduce), one SGD step.
    """
    from torch import nn
    from torch.utils.data import DistributedSampler

    from lightning_sd.core.gates import inject_stochastic_depth
    from tests.helpers import RegressionModule, regression_data

    steps, batch = 6, 8
    run_script("fit_regression.py", "--out", str(tmp_path), "--devices", "2", "--strategy", "ddp_fork", "--drop", "subset",
               "--batch-size", str(batch), "--steps", str(steps))
    weights = torch.load(tmp_path / "weights.pt")
    torch.manual_seed(0)
    module = RegressionModule(in_features=8, width=16, depth=8, lr=0.01)
    handle = inject_stochastic_depth(module, 0.5, drop="subset", seed=1234, auto_resample=False)
    data = regression_data(n=128, in_features=8)
    shards = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    params = list(module.parameters())
    for step in range(steps):
        total = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            idx = shards[rank][step * batch : (step + 1) * batch]
            x, y = data[idx]
            handle.set_rank(rank)
            handle.resample(step, step, batch_size=batch)
            grads = torch.autograd.grad(nn.functional.mse_loss(module.train()(x), y), params)
            total = [t + g / 2 for t, g in zip(total, grads)]
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= 0.01 * g
    ref = module.state_dict()
    assert set(weights) == set(ref)
    diff = max(float((weights[k] - ref[k]).abs().max()) for k in ref)
    assert diff < 1e-5
    start = RegressionModule(in_features=8, width=16, depth=8)
    assert max(float((weights[k] - start.state_dict()[k]).abs().max()) for k in ref) > 1e-4  # it trained
