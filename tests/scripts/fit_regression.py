"""Fit RegressionModule with StochasticDepth under a given strategy; rank 0 saves weights and masks.

Run as a script (``python tests/scripts/fit_regression.py --out DIR ...``) so that Lightning's DDP
launcher re-runs this script, not the pytest session, for the other ranks.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_sd.callbacks.depth_on_demand import DepthOnDemand  # noqa: E402
from lightning_sd.callbacks.stochastic_depth import StochasticDepth  # noqa: E402
from lightning_sd.core.gates import existing_handle  # noqa: E402
from tests.helpers import RegressionModule, regression_data  # noqa: E402


class MaskRecorder(pl.Callback):
    """Records each step's masks; at the end of training (inside every worker, ddp_spawn included)
    writes them per rank, and rank 0 writes the weights."""

    def __init__(self, out):
        self.out = out
        self.records = []

    def on_fit_start(self, trainer, pl_module):
        # After strategy.setup: the model is wrapped (DDP) and must already carry the gates.
        self.wrapped = type(trainer.strategy.model).__name__
        self.gated_at_fit_start = existing_handle(pl_module) is not None

    def on_train_end(self, trainer, pl_module):
        h = existing_handle(pl_module)
        info = {
            "records": self.records,
            "survival": h.survival.tolist(),
            "seed": h.seed,
            "initial_seed": torch.initial_seed(),
            "wrapped": self.wrapped,
            "gated_at_fit_start": self.gated_at_fit_start,
            "configure_model_restored": "configure_model" not in pl_module.__dict__,
            "net_type": type(pl_module.net).__name__,  # OptimizedModule when the network was compiled whole
            "compiled_regions": sum("_compiled" in gate.__dict__ for gate in h.gates),  # StochasticDepth(compile=...)
        }
        with open(os.path.join(self.out, f"masks_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(info, f)
        if trainer.is_global_zero:
            weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
            torch.save(weights, os.path.join(self.out, "weights.pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = existing_handle(pl_module)
        masks = getattr(h.drop_kind, "masks", None)  # per-example masks (drop="sample"), else None
        masks = None if masks is None else masks.tolist()
        self.records.append(
            {
                "step": trainer.global_step,
                "batch_idx": batch_idx,
                "kept": h.kept.tolist(),
                "rates": h.survival_float64.tolist(),
                "sample": masks,
                "x_sum": float(batch[0].sum()),
                "n": int(batch[0].shape[0]),
            }
        )


class ShardedRegression(RegressionModule):
    batch_size = 8

    def train_dataloader(self):
        # Rank r of N takes examples r, r + N, ...: the union of one step's per-rank batches is the
        # single-process batch of N x batch_size examples, so both runs see the same global batches.
        data = regression_data(n=128, in_features=8)
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class ValidatedRegression(ShardedRegression):
    """With validation data sharded as the training data, and a validation loss (for DepthOnDemand)."""

    def val_dataloader(self):
        data = regression_data(n=32, in_features=8, seed=1)
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)


class DepthRecorder(pl.Callback):
    """After DepthOnDemand's fit-end evaluation, each rank writes its rows."""

    def __init__(self, out, dod):
        self.out, self.dod = out, dod

    def on_fit_end(self, trainer, pl_module):
        with open(os.path.join(self.out, f"depth_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.dod.results, f)


class LazyShardedRegression(ShardedRegression):
    """The network does not exist until ``configure_model`` (Lightning's pattern for FSDP/ModelParallel)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kwargs = kwargs
        self.net = None

    def configure_model(self):
        if self.net is not None:
            return
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same initial weights as the eager module built under manual_seed(0)
            self.net = RegressionModule(**self.kwargs).net


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="a strategy name, or ddp_static_graph for DDPStrategy(static_graph=True)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--drop", default="batch")
    parser.add_argument("--mode", default="uniform")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--schedule", default="constant", help="StochasticDepth(schedule=...)")
    parser.add_argument("--pld-gamma", type=float, default=0.001)
    parser.add_argument("--depth-on-demand", action="store_true", help="validation data and DepthOnDemand(by='sensitivity')")
    parser.add_argument("--lazy", action="store_true", help="build the network in configure_model")
    parser.add_argument("--compile", default="", help="torch.compile the network with this backend, as a user would")
    parser.add_argument("--sd-compile", default="", help="StochasticDepth(compile={'backend': ...}): each branch a compiled region")
    parser.add_argument("--seed", default="1234", help="mask seed, or 'none': the callback's default, with the "
                        "global RNG seeded 100 + rank before fit (rank 0's must win)")
    args = parser.parse_args()

    torch.manual_seed(0)
    kwargs = dict(in_features=8, width=16, depth=8, lr=0.01)
    module_class = LazyShardedRegression if args.lazy else ValidatedRegression if args.depth_on_demand else ShardedRegression
    module = module_class(**kwargs)
    if args.compile:
        module.net = torch.compile(module.net, backend=args.compile)
    recorder = MaskRecorder(args.out)
    extra = []
    if args.depth_on_demand:
        dod = DepthOnDemand(keeps=(1.0, 0.5, 0.25), by="sensitivity", sensitivity_batches=2)
        extra = [dod, DepthRecorder(args.out, dod)]
    seed = None if args.seed == "none" else int(args.seed)
    sd = StochasticDepth(mode=args.mode, budget=args.budget, drop=args.drop, seed=seed, sensitivity_batches=2,
                        schedule=args.schedule, pld_gamma=args.pld_gamma,
                        compile={"backend": args.sd_compile} if args.sd_compile else False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=DDPStrategy(static_graph=True) if args.strategy == "ddp_static_graph" else args.strategy,
        max_steps=args.steps,
        callbacks=[sd, recorder, *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        use_distributed_sampler=False,
    )
    module.batch_size = args.batch_size
    if seed is None:
        torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", 0)))  # ranks differ; the mask seed must not
    trainer.fit(module)


if __name__ == "__main__":
    main()
