"""Exact resume and crash-safe checkpoints: SIGKILL after a checkpoint, SIGKILL in the middle of writing one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hydra_rank.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint
from hydra_rank.config import ScheduleConfig
from hydra_rank.errors import ConfigError
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

from .test_train import tiny_config

STEPS = 12


def hydra_config(model_dir, dataset, output_dir):
    config = tiny_config(model_dir, dataset, output_dir, max_steps=STEPS, grad_accum=2, checkpoint_every=4)
    config.adapter.method = "hydra"
    config.adapter.max_rank = 6
    config.schedule = ScheduleConfig(warmup_fraction=0.1, interval_fraction=0.1, freeze_fraction=0.9, signal_steps=2)
    return config


@pytest.fixture(scope="module")
def uninterrupted(tiny_llava_dir, tmp_path_factory):
    from .conftest import write_colour_dataset

    root = tmp_path_factory.mktemp("resume")
    dataset = write_colour_dataset(root / "data", count=16)
    result = run(hydra_config(tiny_llava_dir, dataset, root / "reference"), show_progress=False)
    return root, dataset, result


def start(config_path: Path, environment: dict | None = None, patch: str = "") -> subprocess.Popen:
    """`hydra-rank train CONFIG` in a child process (optionally with a patch executed before the CLI)."""
    code = f"{patch}\nfrom hydra_rank.cli import app\napp(['train', {str(config_path)!r}], prog_name='hydra-rank')"
    env = {**os.environ, **(environment or {})}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"child exited early: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_jsonl(run_dir / "log.jsonl")]


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(uninterrupted, tiny_llava_dir):
    root, dataset, reference = uninterrupted
    config = hydra_config(tiny_llava_dir, dataset, root / "killed")
    path = root / "killed.yaml"
    path.write_text(config.to_yaml())
    child = start(path)
    wait_for(lambda: (root / "killed" / "checkpoints" / "step-8" / "COMPLETE").is_file(), child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert latest_checkpoint(root / "killed").name == "step-8"
    assert not (root / "killed" / "metrics.json").exists()

    resumed = run(config, resume=True, show_progress=False)
    assert resumed.metrics["resumed_from_step"] == 8
    assert losses(root / "killed") == losses(reference.output_dir)  # every step, bit for bit
    history = [e["ranks"] for e in read_jsonl(root / "killed" / "allocation_history.jsonl")]
    reference_history = [e["ranks"] for e in read_jsonl(reference.output_dir / "allocation_history.jsonl")]
    assert history[-1] == reference_history[-1]
    assert resumed.metrics["eval_loss"] == reference.metrics["eval_loss"]
    assert [p.name for p in complete_checkpoints(root / "killed")] == ["step-4", "step-8"]  # keep 2 newest


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(uninterrupted, tiny_llava_dir):
    root, dataset, reference = uninterrupted
    config = hydra_config(tiny_llava_dir, dataset, root / "torn")
    path = root / "torn.yaml"
    path.write_text(config.to_yaml())
    # the child dies (SIGKILL, no clean-up) halfway through writing the step-8 checkpoint
    patch = (
        "import os, signal, torch, hydra_rank.checkpoint as c\n"
        "real = torch.save\n"
        "def dying(obj, f):\n"
        "    if obj['step'] == 8:\n"
        "        open(f, 'wb').write(b'half a checkpoint')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(obj, f)\n"
        "c.torch.save = dying"
    )
    child = start(path, patch=patch)
    child.wait(timeout=240)
    assert child.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (root / "torn" / "checkpoints").iterdir()]
    assert "step-4" in leftovers and any(name.startswith(".step-8.tmp-") for name in leftovers)
    assert latest_checkpoint(root / "torn").name == "step-4"
    assert load_checkpoint(latest_checkpoint(root / "torn"))["step"] == 4
    run(config, resume=True, show_progress=False)
    assert losses(root / "torn") == losses(reference.output_dir)


def test_resume_refuses_a_changed_config_or_a_run_without_checkpoints(uninterrupted, tiny_llava_dir, tmp_path):
    root, dataset, _ = uninterrupted
    config = hydra_config(tiny_llava_dir, dataset, root / "reference")
    config.train.lr = 0.5
    with pytest.raises(ConfigError, match=r"differs .* in \['train.lr'\]"):
        run(config, resume=True, show_progress=False)
    fresh = hydra_config(tiny_llava_dir, dataset, tmp_path / "nothing")
    with pytest.raises(ConfigError, match="no run to resume"):
        run(fresh, resume=True, show_progress=False)


def test_checkpoint_files_are_plain_tensors(uninterrupted):
    """Loaded with weights_only=True: no pickled code can ride along."""
    _, _, reference = uninterrupted
    state = load_checkpoint(latest_checkpoint(reference.output_dir))
    assert state["step"] == 8 and state["scheduler"]["decisions_made"] > 0
    assert json.loads(state["scheduler"]["allocation_info"])["mode"] == "hierarchical"


class NotATensor:
    """Something `weights_only` loading refuses: a pickled object of an arbitrary class."""


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "cannot be read"),  # truncated
        (lambda f: f.write_bytes(b""), "cannot be read"),  # zero bytes (a full disk)
        (lambda f: torch.save({"step": 8, "payload": NotATensor()}, f), "not a safe checkpoint"),  # a pickle
    ],
    ids=["truncated", "empty", "pickle"],
)
def test_resume_falls_back_past_a_damaged_newest_checkpoint(uninterrupted, tiny_llava_dir, damage, said, capsys):
    root, dataset, reference = uninterrupted
    copy = root / f"damaged-{len(list(root.glob('damaged-*')))}"
    shutil.copytree(reference.output_dir, copy)
    for produced in ("metrics.json", "adapter"):
        shutil.rmtree(copy / produced) if (copy / produced).is_dir() else (copy / produced).unlink()
    damage(copy / "checkpoints" / "step-8" / "state.pt")
    config = hydra_config(tiny_llava_dir, dataset, copy)
    resumed = run(config, resume=True, show_progress=False)
    assert resumed.metrics["resumed_from_step"] == 4
    assert said in " ".join(capsys.readouterr().err.split())
    assert losses(copy) == losses(reference.output_dir)  # from step 4, still exactly the uninterrupted run


def test_resume_with_no_readable_checkpoint_is_one_clear_error(uninterrupted, tiny_llava_dir, tmp_path):
    _, dataset, reference = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(reference.output_dir, copy)
    for state in (copy / "checkpoints").glob("step-*/state.pt"):
        state.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no checkpoint in .* can be read"):
        run(hydra_config(tiny_llava_dir, dataset, copy), resume=True, show_progress=False)
