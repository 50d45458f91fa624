"""The optimisation loop shared by projector pre-training and adapter fine-tuning.

Deliberately explicit: gradient accumulation is a plain inner loop (with DDP's `no_sync` on all but the last
micro-batch), and the learning rate is set by us before every optimizer step rather than by a wrapped scheduler
(Accelerate's wrapper steps once per process). Hooks see the start and end of every step; when one reports that the
trainable parameters changed (HyDRA resized adapters), the optimizer is re-bound to the new parameters in place.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .loss import answer_loss
from .utils import progress_bar, unwrap_optimizer


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite: continuing would only destroy the weights."""


class StepHooks(Protocol):
    def step_begin(self, step: int) -> None: ...

    def step_end(self, step: int, record: dict[str, Any]) -> bool:
        """Called after the optimizer step; return True if the trainable parameters changed."""
        ...


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to `lr`, then cosine decay to `floor`·lr; steps are 1-based.

    Parameters added to the optimizer at step b (a param group with `born=b`) get an extra linear ramp over
    `resize_warmup_steps`, so their first Adam steps, taken with fresh moments, stay small.
    """

    lr: float
    warmup_steps: int
    total_steps: int
    floor: float = 0.0
    resize_warmup_steps: int = 0

    def factor(self, step: int) -> float:
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        progress = (step - 1 - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's learning rate for `step`; return the base rate."""
        rate = self.lr * self.factor(step)
        for group in optimizer.param_groups:
            age = step - group.get("born", 0)
            ramp = min(1.0, age / self.resize_warmup_steps) if group.get("born") and self.resize_warmup_steps else 1.0
            group["lr"] = rate * ramp
        return rate


def rebind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, step: int) -> None:
    """Point the optimizer at the model's current trainable parameters: drop the state of parameters that are gone,
    keep the state of those that stayed, and add new ones as a param group born at `step` (fresh Adam moments)."""
    base = unwrap_optimizer(optimizer)
    live = [p for p in model.parameters() if p.requires_grad]
    live_ids = {id(p) for p in live}
    known: set[int] = set()
    for group in base.param_groups:
        for parameter in group["params"]:
            if id(parameter) not in live_ids:
                base.state.pop(parameter, None)
        group["params"] = [p for p in group["params"] if id(p) in live_ids]
        known.update(id(p) for p in group["params"])
    base.param_groups[:] = [group for group in base.param_groups if group["params"]]
    new = [p for p in live if id(p) not in known]
    if new:
        base.add_param_group({"params": new, "born": step})


def rewrap(model: nn.Module) -> nn.Module:
    """After adapters changed shape, a DistributedDataParallel wrapper must be rebuilt: it registered the old
    parameters for gradient all-reduce. Every process resized identically, so the new wrapper starts in sync."""
    if isinstance(model, DistributedDataParallel):
        inner = model.module
        device_ids = None if inner.device.type == "cpu" else [inner.device.index]
        return DistributedDataParallel(inner, device_ids=device_ids)
    return model


@torch.no_grad()
def average_gradients(model: nn.Module) -> None:
    """Average the trainable parameters' gradients over all processes in one flat all-reduce: what DDP does for a
    model it wraps, for one it does not (a sharded base, `shard.py`, whose adapters are plain replicated tensors)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


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
    schedule: WarmupCosine,
    batches: Iterator[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    *,
    steps: int,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    hooks: tuple[StepHooks, ...] = (),
    description: str = "train",
    first_step: int = 1,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]] = answer_loss,
) -> None:
    """Run optimizer steps `first_step..steps`; each averages `grad_accum` micro-batches.

    The record passed to `hooks[i].step_end` holds the step's mean loss, learning rate, answer-token count and
    seconds (forward, backward and optimizer step); hooks may add to it (later hooks see the additions).
    """
    model.train()
    with progress_bar(description, total=steps - first_step + 1, enabled=accelerator.is_main_process) as advance:
        for step in range(first_step, steps + 1):
            started = time.perf_counter()
            for hook in hooks:
                hook.step_begin(step)
            lr = schedule.apply(optimizer, step)
            total_loss, total_tokens = 0.0, 0
            for micro in range(grad_accum):
                batch = next(batches)
                sync = micro == grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss, tokens = loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"the training loss became {loss.item()} at step {step}")
                    accelerator.backward(loss / grad_accum)
                total_loss += loss.item()
                total_tokens += tokens
            if accelerator.num_processes > 1 and not isinstance(model, DistributedDataParallel):
                average_gradients(model)
            if max_grad_norm:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record: dict[str, Any] = {
                "loss": total_loss / grad_accum,
                "lr": lr,
                "tokens": total_tokens,
                "step_time_s": time.perf_counter() - started,
            }
            for hook in hooks:
                if hook.step_end(step, record):  # re-bind at once, so later hooks (a checkpoint) see the new state
                    rebind_optimizer(optimizer, model, step)
                    model = rewrap(model)
            advance(loss=record["loss"])
