#!/usr/bin/env bash
# Regenerates the figures of the documentation pages, from the repository root: bash docs/figures/make.sh
# Both come from the package's own code: examples/log_gaussian.py (the paper's Fig. 1) and the SummaryPlots
# callback at the end of the quickstart run (`lightning-sd fit` with its defaults, 20 epochs; its logs go to
# lightning_logs/quickstart/version_N as usual). About 3 minutes on one CPU thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
python examples/log_gaussian.py --out docs/figures/log_gaussian.png
lightning-sd fit --trainer.enable_progress_bar false \
    --trainer.callbacks+=lightning_sd.callbacks.summary_plots.SummaryPlots \
    --trainer.callbacks.init_args.out_dir docs/figures
# accuracy vs depth of the digits model trained with SD (DepthOnDemand + SummaryPlots of the recipe)
logs=$(mktemp -d)
lightning-sd fit --config configs/digits_depth_on_demand.yaml --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir "$logs"
cp "$logs"/digits_depth_on_demand/version_0/depth_on_demand.png docs/figures/depth_on_demand.png
