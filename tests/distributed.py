"""Run a test script in fresh processes (Lightning's DDP launcher re-runs the script for each rank)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).parent / "scripts"
# Set by an earlier Trainer or seed_everything in the same pytest session; inherited, they would make
# the child think it is a DDP rank, or change the seed of Lightning's DistributedSampler shuffle.
_LEAKED = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_RANK", "PL_GLOBAL_SEED")


def run_script(script: str | Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (a name under tests/scripts/ or a path) with ``args`` from the repo root; fail with its output."""
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    env = {k: v for k, v in os.environ.items() if k not in _LEAKED}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO)
    )
    if proc.returncode != 0:
        raise AssertionError(f"{path.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
