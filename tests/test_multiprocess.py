"""Two processes (`accelerate launch`, CPU, gloo) train HyDRA together, through the CLI and through `HydraTrainer`:
same decisions, same adapter everywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from hydra_rank.config import ScheduleConfig
from hydra_rank.utils import read_jsonl

from .test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def launch_two(tiny_llava_dir, colour_dataset, tmp_path, *program: str) -> Path:
    """Train HyDRA on the tiny LLaVA in two CPU processes with `program` (given the config path); the run folder."""
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "run", max_steps=8, debug_checks=True)
    config.adapter.method = "hydra"
    config.adapter.max_rank = 6
    config.schedule = ScheduleConfig(warmup_fraction=0.2, interval_fraction=0.2, freeze_fraction=0.9)
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    accelerate = Path(sys.executable).parent / "accelerate"
    # accelerate's --cpu flag uses a single-process launcher; torchrun-style processes on the CPU (gloo) come from
    # the distributed launcher with ACCELERATE_USE_CPU set
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", *program, str(path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run"


def test_two_processes_agree_on_every_decision_and_on_the_adapter(tiny_llava_dir, colour_dataset, tmp_path):
    run_dir = launch_two(tiny_llava_dir, colour_dataset, tmp_path, "-m", "hydra_rank", "train")
    fingerprints = [json.loads((run_dir / f"process-{i}.json").read_text()) for i in (0, 1)]
    assert fingerprints[0] == fingerprints[1]  # same ranks, bit-identical trainable values
    history = read_jsonl(run_dir / "allocation_history.jsonl")
    assert len(history) >= 3 and history[-1]["ranks"] == fingerprints[0]["ranks"]
    assert any(entry["resized_modules"] for entry in history)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sum(tensor.numel() for tensor in saved.values()) == metrics["trainable_params"] <= metrics["budget_params"]
    assert len(read_jsonl(run_dir / "log.jsonl")) == 8  # one writer: the main process


def test_hydra_trainer_in_two_processes_resizes_identically(tiny_llava_dir, colour_dataset, tmp_path):
    """After each resize the DDP wrapper is rebuilt around the new adapters; a stale wrapper would all-reduce the
    old parameters only, and the processes' adapters would drift apart."""
    run_dir = launch_two(tiny_llava_dir, colour_dataset, tmp_path, str(ROOT / "tests" / "trainer_processes.py"))
    fingerprints = [json.loads((run_dir / f"process-{i}.json").read_text()) for i in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    history = read_jsonl(run_dir / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == [2, 4, 6]  # written once, by the main process
    assert any(entry["resized_modules"] for entry in history[1:])  # trained on after a resize, in sync
    assert history[-1]["ranks"] == fingerprints[0]["ranks"]
    assert all(entry["used_params"] <= entry["budget_params"] for entry in history)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert sum(tensor.numel() for tensor in saved.values()) == history[-1]["used_params"]
