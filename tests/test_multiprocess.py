"""Two processes (`accelerate launch`, CPU, gloo) train HyDRA together, through the CLI (DDP, and with the frozen base
sharded by FSDP2) and through `HydraTrainer`: same decisions, same adapter everywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydra_rank.config import ScheduleConfig
from hydra_rank.utils import read_jsonl

from .conftest import write_colour_dataset
from .test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def launch_two(tiny_llava_dir, dataset, folder: Path, *program: str, **train) -> Path:
    """Train HyDRA on the tiny LLaVA in two CPU processes with `program` (given the config path; `train` overrides
    train.* keys); the run folder."""
    config = tiny_config(tiny_llava_dir, dataset, folder / "run", max_steps=8, debug_checks=True, **train)
    config.adapter.method = "hydra"
    config.adapter.max_rank = 6
    config.schedule = ScheduleConfig(warmup_fraction=0.2, interval_fraction=0.2, freeze_fraction=0.9)
    path = folder / "config.yaml"
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
    return folder / "run"


def fingerprints(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"process-{i}.json").read_text()) for i in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tiny_llava_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    return launch_two(tiny_llava_dir, write_colour_dataset(folder / "data"), folder, "-m", "hydra_rank", "train")


def test_two_processes_agree_on_every_decision_and_on_the_adapter(ddp_run):
    prints = fingerprints(ddp_run)
    assert prints[0] == prints[1]  # same ranks, bit-identical trainable values
    history = read_jsonl(ddp_run / "allocation_history.jsonl")
    assert len(history) >= 3 and history[-1]["ranks"] == prints[0]["ranks"]
    assert any(entry["resized_modules"] for entry in history)
    saved = load_file(ddp_run / "adapter" / "adapter_model.safetensors")
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert sum(tensor.numel() for tensor in saved.values()) == metrics["trainable_params"] <= metrics["budget_params"]
    assert len(read_jsonl(ddp_run / "log.jsonl")) == 8  # one writer: the main process


def test_a_sharded_base_trains_like_ddp_holding_half_the_frozen_weights(ddp_run, tiny_llava_dir, tmp_path):
    """train.sharding fsdp: each process keeps half of the frozen weights, the adapters are resized in every process
    alike, and the decisions, losses and final adapter are DDP's (the same arithmetic, sharded storage)."""
    sharded = launch_two(
        tiny_llava_dir, write_colour_dataset(tmp_path / "data"), tmp_path, "-m", "hydra_rank", "train", sharding="fsdp"
    )
    ddp, fsdp = fingerprints(ddp_run), fingerprints(sharded)
    assert fsdp[0]["ranks"] == fsdp[1]["ranks"] and fsdp[0]["trainable_sha256"] == fsdp[1]["trainable_sha256"]
    assert fsdp[0]["local_frozen_params"] + fsdp[1]["local_frozen_params"] == ddp[0]["local_frozen_params"]
    assert max(p["local_frozen_params"] for p in fsdp) < 0.51 * ddp[0]["local_frozen_params"]
    histories = [read_jsonl(run / "allocation_history.jsonl") for run in (ddp_run, sharded)]
    assert [e["ranks"] for e in histories[1]] == [e["ranks"] for e in histories[0]]
    assert any(entry["resized_modules"] for entry in histories[1][1:])
    losses = [[r["loss"] for r in read_jsonl(run / "log.jsonl")] for run in (ddp_run, sharded)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (ddp_run, sharded)]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, atol=1e-5, rtol=1e-3, msg=key)


def test_hydra_trainer_in_two_processes_resizes_identically(tiny_llava_dir, colour_dataset, tmp_path):
    """After each resize the DDP wrapper is rebuilt around the new adapters; a stale wrapper would all-reduce the
    old parameters only, and the processes' adapters would drift apart."""
    run_dir = launch_two(tiny_llava_dir, colour_dataset, tmp_path, str(ROOT / "tests" / "trainer_processes.py"))
    prints = fingerprints(run_dir)
    assert prints[0] == prints[1]
    history = read_jsonl(run_dir / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == [2, 4, 6]  # written once, by the main process
    assert any(entry["resized_modules"] for entry in history[1:])  # trained on after a resize, in sync
    assert history[-1]["ranks"] == prints[0]["ranks"]
    assert all(entry["used_params"] <= entry["budget_params"] for entry in history)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert sum(tensor.numel() for tensor in saved.values()) == history[-1]["used_params"]
