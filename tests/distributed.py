"""Run a test script in fresh processes (Lightning's DDP launcher re-runs the script for each rank).

Tests of a feature under DDP (not of the launcher) pass ``--strategy ddp_fork``: the second rank is a fork
of the first, not a fresh interpreter that imports torch and Lightning again (~10 s here). Every launcher
(ddp, ddp_spawn, ddp_fork, ...) is checked against one process in ``test_distributed.py``. A test whose
ranks must start from different global RNGs (the callback's default seed), build rank-dependent data
before ``fit``, or record results after ``fit`` (a fork launcher runs that code on rank 0 only; record in
``on_fit_end`` instead) keeps ``ddp``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).parent / "scripts"
# Set by an earlier Trainer or seed_everything in the same pytest session; inherited, they would make
# the child think it is a DDP rank, or change the seed of Lightning's DistributedSampler shuffle.
_LEAKED = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_RANK", "PL_GLOBAL_SEED")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LEAKED}


def run_script(script: str | Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (a name under tests/scripts/ or a path) with ``args`` from the repo root; fail with its output."""
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    env = _clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
    )
    if proc.returncode != 0:
        raise AssertionError(f"{path.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_script_here(script: str, *args: str) -> None:
    """Run a one-process ``script`` in this pytest process, as ``run_script`` would in a fresh one.

    Saves the ~10 s a fresh interpreter spends importing torch and Lightning. Only for single-process
    runs: a DDP launcher must re-run the script, never the pytest session. The leaked rank variables are
    hidden, and ``sys.argv`` and the global RNG are restored afterwards.
    """
    with mock.patch.dict(os.environ, _clean_env(), clear=True), mock.patch.object(sys, "argv", [str(SCRIPTS / script), *args]):
        with torch.random.fork_rng():
            runpy.run_path(str(SCRIPTS / script), run_name="__main__")
