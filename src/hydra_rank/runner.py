"""Run training jobs one after another, each in its own process.

A separate process per run keeps the reported peak memory and wall time of each method its own (a second run in the
same process would inherit the first one's peak RSS and warm caches), and a crash in one run cannot corrupt another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HydraError
from .utils import atomic_write_text

if TYPE_CHECKING:
    from .config import RunConfig


def run_isolated(config: RunConfig, config_path: Path, threads: int | None = None) -> dict:
    """Write `config` to `config_path`, train it in a child process (with `threads` intra-op threads, unless the
    environment already sets OMP_NUM_THREADS), and return its metrics."""
    atomic_write_text(config_path, config.to_yaml())
    command = [sys.executable, "-m", "hydra_rank", "train", str(config_path), "--overwrite"]
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    completed = subprocess.run(command, check=False, stdout=subprocess.DEVNULL, env=env)  # ours shows all runs
    if completed.returncode != 0:
        raise HydraError(
            f"training run {config_path} failed with exit status {completed.returncode}; its output is above"
        )
    return json.loads((Path(config.train.output_dir) / "metrics.json").read_text())
