"""The optimisation loop shared by projector pre-training and adapter fine-tuning.

Deliberately explicit: gradient accumulation is a plain inner loop (with DDP's `no_sync` on all but the last
micro-batch), and the learning-rate schedule is stepped once per optimizer step by us rather than wrapped by
Accelerate, whose scheduler wrapper steps once per process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .loss import answer_loss
from .utils import progress_bar

StepHook = Callable[[int, dict[str, float]], None]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float = 0.0
) -> LambdaLR:
    """Linear warm-up to the base rate, then cosine decay to `floor` x base rate at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def batches_forever(loader: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Cycle a data loader epoch after epoch (a shuffling sampler draws a new order each epoch)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def optimize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LambdaLR,
    batches: Iterator[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    *,
    steps: int,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    on_step: StepHook | None = None,
    description: str = "train",
    first_step: int = 1,
) -> None:
    """Run optimizer steps `first_step..steps`; each averages `grad_accum` micro-batches.

    After every step `on_step(step, record)` receives the step's mean loss, learning rate, answer-token count and
    seconds, and may do anything (log, evaluate, resize adapters).
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with progress_bar(description, total=steps - first_step + 1, enabled=accelerator.is_main_process) as advance:
        for step in range(first_step, steps + 1):
            started = time.perf_counter()
            total_loss, total_tokens = 0.0, 0
            for micro in range(grad_accum):
                batch = next(batches)
                sync = micro == grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss, tokens = answer_loss(model, batch)
                    accelerator.backward(loss / grad_accum)
                total_loss += loss.item()
                total_tokens += tokens
            if max_grad_norm:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record: dict[str, Any] = {
                "loss": total_loss / grad_accum,
                "lr": lr,
                "tokens": total_tokens,
                "step_time_s": time.perf_counter() - started,
            }
            if on_step is not None:
                on_step(step, record)
            advance(loss=record["loss"])
