"""Checkpoints that let a run continue exactly where it stopped, written so that a crash never costs the last one.

`DIR/checkpoints/step-N/` holds one `state.pt`: the values of every trainable parameter (by name), the optimizer
state with its param groups (by parameter name, so they can be rebuilt), HyDRA's ranks and scheduler state
(performance model, accumulated attributions, pending predictions, sketches in progress), the RNG states, and the
position in the data stream. It is written with `torch.save` and read with `torch.load(weights_only=True)`: tensors
and plain containers only, never arbitrary pickled objects. Each checkpoint is written into a temporary directory,
marked complete last, and renamed into place; only complete checkpoints are ever loaded, and the newest
`train.keep_checkpoints` are kept.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .utils import atomic_directory, console, one_line, unwrap_optimizer

STATE = "state.pt"
COMPLETE = "COMPLETE"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write `run_dir/checkpoints/step-{step}` atomically and prune all but the newest `keep` complete ones."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    base = unwrap_optimizer(optimizer)
    state = {
        "step": step,
        "trainable": {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": base.state_dict(),
        "param_groups": [[names[id(p)] for p in group["params"]] for group in base.param_groups],
        "rng": rng_state(),
        **extra,
    }
    path = checkpoints_dir(run_dir) / f"step-{step}"
    with atomic_directory(path) as staging:
        torch.save(state, staging / STATE)
        (staging / COMPLETE).write_text(f"{step}\n")
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (directories being written, or half-deleted, are skipped)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir)
    if not found:
        raise ConfigError(
            f"no complete checkpoint in {checkpoints_dir(run_dir)}; start the run without --resume "
            "(and set train.checkpoint_every to write checkpoints)"
        )
    return found[-1]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint's state; an unreadable or unsafe file is one clear `ConfigError`."""
    try:
        return torch.load(path / STATE, weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{path / STATE} is not a safe checkpoint (it holds pickled objects, which are never loaded)"
        ) from None
    except Exception as error:  # truncated, empty or garbled: torch raises whatever its reader met
        reason = one_line(str(error), 200) or type(error).__name__
        raise ConfigError(f"{path / STATE} cannot be read ({reason})") from None


def load_latest(run_dir: Path) -> dict[str, Any]:
    """The newest complete checkpoint that loads. One that is corrupt or partial (e.g. the disk filled up while it
    was written) is skipped, with a message saying so, for the next older one."""
    found = complete_checkpoints(run_dir)
    if not found:
        latest_checkpoint(run_dir)  # the clear error for "none at all"
    problems = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except ConfigError as error:
            problems.append(str(error))
            console.print(f"[yellow]warning:[/] {error}; trying the previous checkpoint")
            continue
        if problems:
            console.print(f"resuming from {path.name}, the newest checkpoint that loads")
        return state
    raise ConfigError(f"no checkpoint in {checkpoints_dir(run_dir)} can be read: {'; '.join(problems)}")


def restore_trainable(model: nn.Module, state: dict[str, Any]) -> None:
    """Copy the saved values into the model's trainable parameters (names and shapes must match exactly)."""
    live = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(live) != set(saved) or any(live[n].shape != saved[n].shape for n in live):
        raise ConfigError("the checkpoint's trainable parameters do not match this model and configuration")
    with torch.no_grad():
        for name, parameter in live.items():
            parameter.copy_(saved[name])


def restore_optimizer(
    model: nn.Module, lr: float, weight_decay: float, state: dict[str, Any]
) -> torch.optim.Optimizer:
    """An AdamW with the saved param groups (same parameters, same order) and state."""
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [parameters[name] for name in group]} for group in state["param_groups"]],
        lr=lr,
        weight_decay=weight_decay,
    )
    optimizer.load_state_dict(state["optimizer"])
    return optimizer
