"""Budget schedules (issue 15): b(t) follows its formula, the rates of every step sum to b(t) L, resume and DDP agree."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_sd.callbacks.stochastic_depth import StochasticDepth
from lightning_sd.core.budget_schedule import BUDGET_SCHEDULES, budget_for_mean, mean_budget, scheduled_budget
from lightning_sd.core.gates import existing_handle
from lightning_sd.core.survival import maxreg_rates, sensemode_rates, survival_rates
from tests.distributed import run_script, run_script_here
from tests.helpers import RegressionModule, regression_data, trainer_kwargs

L = 8  # RegressionModule(depth=8): 8 residual branches
BUDGET = 0.5
GAMMA = 0.15  # pld decay per step: visible over the 12-step runs below
WARMUP = 0.5


def expected_budget(schedule: str, t: int, total: int) -> float:
    """b(t) written out independently of core/budget_schedule.py."""
    if schedule == "constant":
        return BUDGET
    if schedule == "pld":
        return (1 - BUDGET) * math.exp(-GAMMA * t) + BUDGET
    ramp = WARMUP * total
    return BUDGET if t >= ramp else 1 - (1 - BUDGET) * t / ramp


# ------------------------------------------------------------------------------------------------ formulas
def test_scheduled_budget_follows_the_formulas() -> None:
    total = 40
    for t in range(60):
        assert scheduled_budget("constant", 0.3, t) == 0.3
        assert scheduled_budget("pld", 0.3, t, pld_gamma=0.05) == pytest.approx(0.7 * math.exp(-0.05 * t) + 0.3, abs=1e-15)
        ramp = 0.25 * total  # 10 steps
        want = 0.3 if t >= ramp else 1 - 0.7 * t / ramp
        assert scheduled_budget("warmup", 0.3, t, total_steps=total, warmup_fraction=0.25) == pytest.approx(want, abs=1e-15)
    assert scheduled_budget("warmup", 0.3, 0, total_steps=total) == 1.0
    assert scheduled_budget("warmup", 0.3, 0, total_steps=total, warmup_fraction=0.0) == 0.3  # no ramp: constant
    assert scheduled_budget("pld", 0.3, 0) == 1.0


def test_mean_budget_and_its_inverse() -> None:
    # warmup over 10 of 40 steps from 1 to 0.3: the mean is sum_t b(t) / 40 written out.
    want = (sum(1 - 0.7 * t / 10 for t in range(10)) + 30 * 0.3) / 40
    assert mean_budget("warmup", 0.3, 40, warmup_fraction=0.25) == pytest.approx(want, abs=1e-12)
    for schedule in BUDGET_SCHEDULES:
        b = budget_for_mean(schedule, 0.5, 200, warmup_fraction=0.1, pld_gamma=0.02)
        assert mean_budget(schedule, b, 200, warmup_fraction=0.1, pld_gamma=0.02) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError, match="out of reach"):
        budget_for_mean("pld", 0.05, 10, pld_gamma=0.001)  # 10 steps of a slow decay keep ~all blocks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="cosine"), "unknown schedule='cosine'"),
        (dict(schedule="warmup", warmup_fraction=1.5), "warmup_fraction must be in"),
        (dict(schedule="pld", pld_gamma=0.0), "pld_gamma must be"),
        (dict(schedule="pld", mode="custom", survival=[0.5] * L), "mode='custom' fixes every rate"),
    ],
)
def test_bad_schedule_arguments_are_refused_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        StochasticDepth(**kwargs)


def test_warmup_needs_a_run_with_an_end(tmp_path) -> None:
    sd = StochasticDepth(schedule="warmup", seed=0)
    trainer = pl.Trainer(max_epochs=-1, max_steps=-1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    module = RegressionModule(depth=L)
    with pytest.raises(ValueError, match="number of steps is unknown"):
        trainer.fit(module, DataLoader(regression_data(n=16), batch_size=8))
    assert existing_handle(module) is None  # refused at setup, before any gate is put in


# ------------------------------------------------------------------------------------------------ in a Trainer
class _RateLog(pl.Callback):
    """The rates in force at each training step, and the step's masks."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = existing_handle(pl_module)
        self.rows.append((trainer.global_step - 1, h.survival_float64.clone(), h.kept.clone()))


class _StopAfter(pl.Callback):
    """Stops the run after ``epochs`` epochs, as a killed job would: the Trainer still plans its full length."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit(root: Path, schedule: str, mode: str, epochs: int, ckpt_path=None, save=None, logger=False, stop_after=None):
    torch.manual_seed(0)
    module = RegressionModule(depth=L, lr=0.01)
    sd = StochasticDepth(
        mode=mode, budget=BUDGET, schedule=schedule, warmup_fraction=WARMUP, pld_gamma=GAMMA, seed=3, sensitivity_batches=2
    )
    log = _RateLog()
    kwargs = trainer_kwargs(root) if logger else trainer_kwargs(root, logger=False)
    stop = [] if stop_after is None else [_StopAfter(stop_after)]
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[sd, log, *stop], **kwargs)
    trainer.fit(module, DataLoader(regression_data(n=24), batch_size=8), ckpt_path=ckpt_path)  # 3 steps per epoch
    if save:
        trainer.save_checkpoint(save)
    return sd, log.rows, trainer, module


@pytest.mark.parametrize("schedule", BUDGET_SCHEDULES)
@pytest.mark.parametrize("mode", ["uniform", "linear", "sensemode", "maxreg"])
def test_rates_sum_to_the_scheduled_budget_at_every_step(tmp_path, schedule, mode) -> None:
    sd, rows, trainer, _ = _fit(tmp_path, schedule, mode, epochs=4, logger=True)
    total = 12
    assert [t for t, _, _ in rows] == list(range(total))
    for t, p, _ in rows:
        b = expected_budget(schedule, t, total)
        assert float(p.sum()) == pytest.approx(b * L, abs=1e-6), (t, b)
        assert bool((p >= 0).all()) and bool((p <= 1).all())
        # the mode's own rates for b(t): formula, or the stored measurement re-solved
        if mode == "sensemode":
            want = sensemode_rates(L, b, sd.sensitivities, sd.p_min)
        elif mode == "maxreg":
            want = maxreg_rates(L, b, sd.regularization_terms, sd.p_min)
        else:
            want = survival_rates(mode, L, b)
        torch.testing.assert_close(p, want, rtol=0, atol=1e-12)
    if schedule != "constant":
        assert rows[0][1].tolist() == [1.0] * L  # b(0) = 1: every block kept at the first step
        assert rows[0][2].all()
    # sd/budget is logged at every step with b(t)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["sd/budget"]) for r in csv.DictReader(f) if r.get("sd/budget")}
    assert sorted(logged) == list(range(total))
    for t, value in logged.items():
        assert value == pytest.approx(expected_budget(schedule, t, total), abs=1e-6)


@pytest.mark.parametrize(("schedule", "mode"), [("pld", "sensemode"), ("warmup", "linear"), ("warmup", "maxreg")])
def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path, schedule, mode) -> None:
    _, straight, _, module_a = _fit(tmp_path / "a", schedule, mode, epochs=4)
    ckpt = str(tmp_path / "half.ckpt")
    _, first, _, _ = _fit(tmp_path / "b", schedule, mode, epochs=4, save=ckpt, stop_after=2)  # killed inside the ramp
    torch.manual_seed(123)  # a different global RNG: nothing may depend on it
    sd, resumed, _, module_c = _fit(tmp_path / "c", schedule, mode, epochs=4, ckpt_path=ckpt)
    assert sd.schedule_total_steps == (12 if schedule == "warmup" else None)
    both = first + resumed
    assert [t for t, _, _ in both] == [t for t, _, _ in straight] == list(range(12))
    for (t, p, kept), (_, q, kept_q) in zip(straight, both):
        assert torch.equal(p, q), t
        assert torch.equal(kept, kept_q), t
    assert len({tuple(p.tolist()) for _, p, _ in straight}) > 3  # the rates really moved
    for k, v in module_a.state_dict().items():
        assert torch.equal(v, module_c.state_dict()[k]), k


def test_warmup_resumed_with_a_longer_run_keeps_its_ramp(tmp_path) -> None:
    """T comes from the checkpoint: a run resumed with more epochs continues the ramp it started."""
    ckpt = str(tmp_path / "half.ckpt")
    _fit(tmp_path / "b", "warmup", "uniform", epochs=1, save=ckpt)
    sd, rows, _, _ = _fit(tmp_path / "c", "warmup", "uniform", epochs=6, ckpt_path=ckpt)
    assert sd.schedule_total_steps == 3  # the 1-epoch run's 3 steps, not the 18 of the resumed one
    assert all(float(p.sum()) == pytest.approx(BUDGET * L, abs=1e-9) for _, p, _ in rows)


@pytest.mark.slow
def test_ddp_ranks_follow_the_same_schedule(tmp_path) -> None:
    """Two DDP ranks (sensemode + pld) draw the same masks and rates at every step, as one process does."""
    common = ["--mode", "sensemode", "--schedule", "pld", "--pld-gamma", "0.3", "--steps", "6"]
    single = tmp_path / "single"
    single.mkdir()
    run_script_here("fit_regression.py", "--out", str(single), "--devices", "1", "--batch-size", "16", *common)
    run_script("fit_regression.py", "--out", str(tmp_path), "--devices", "2", "--strategy", "ddp_fork", "--batch-size", "8", *common)
    ranks = [json.load(open(tmp_path / f"masks_rank{r}.json")) for r in (0, 1)]
    ref = json.load(open(single / "masks_rank0.json"))
    for key in ("kept", "rates"):
        assert [r[key] for r in ranks[0]["records"]] == [r[key] for r in ranks[1]["records"]]  # bit-equal across ranks
    assert [r["kept"] for r in ranks[0]["records"]] == [r["kept"] for r in ref["records"]]
    # the sensitivities are a mean over two ranks' halves of the batch: equal to the single process to fp32 rounding
    torch.testing.assert_close(
        torch.tensor([r["rates"] for r in ranks[0]["records"]]), torch.tensor([r["rates"] for r in ref["records"]]), rtol=0, atol=1e-5
    )
    assert not all(all(r["kept"]) for r in ranks[0]["records"])  # blocks were dropped
    for rec in ranks[0]["records"]:
        t = rec["step"] - 1  # recorded after the optimizer step
        assert sum(rec["rates"]) == pytest.approx(((1 - 0.5) * math.exp(-0.3 * t) + 0.5) * L, abs=1e-6)


class _GraphCounter:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("scaling", ["inverted", "expected"])
def test_rates_moving_every_step_do_not_recompile_sample_drop(scaling) -> None:
    """drop="sample" under torch.compile: a schedule's new rates each step reach the graph as mask inputs."""
    import torch._dynamo

    from lightning_sd.core.gates import inject_stochastic_depth
    from lightning_sd.models import ResidualMLP

    torch._dynamo.reset()
    model = ResidualMLP(8, 16, 6, 2).train()
    handle = inject_stochastic_depth(model, 1.0, drop="sample", scaling=scaling, auto_resample=False)
    counter = _GraphCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 8)
    sums = []
    for step in range(6):
        handle.set_survival(survival_rates("linear", 6, scheduled_budget("pld", 0.6, step, pld_gamma=0.3)))
        sums.append(float(handle.survival_float64.sum()))
        handle.resample(step, batch_size=4)
        torch.testing.assert_close(compiled(x), model(x))
    assert len(set(sums)) == 6 and counter.graphs == 1
