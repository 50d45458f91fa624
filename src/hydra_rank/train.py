"""One fine-tuning run: load model and data, attach adapters, optimise, save the adapter, evaluate, write metrics.

Output directory layout:
    config.yaml        the resolved configuration (re-run with `hydra-rank train DIR/config.yaml`)
    log.jsonl          one line per optimizer step: step, loss, lr, tokens, step_time_s (+ eval_loss when measured)
    tensorboard/       the same scalars for TensorBoard
    allocation.json    the rank of every target module (uniform for lora), its budget and how it was chosen
    allocation.png     the same as a layer x module heatmap
    adapter/           the PEFT adapter (safetensors), loadable with `PeftModel.from_pretrained` (full: model/)
    allocation_start.* HyDRA: the starting ranks; allocation_history.jsonl: every decision
    report.html        table, loss curve and (HyDRA) allocation plots
    metrics.json       final numbers (see `run`)
    predictions.jsonl  every evaluation question with the model's answer
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from .adapter import (
    ADALORA_ORTH_WEIGHT,
    AdaLoraSchedule,
    adalora_effective_params,
    adalora_orthogonality,
    attach_adalora,
    attach_lora,
    language_model_parameters,
    trainable_parameters,
)
from .checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    restore_optimizer,
    restore_trainable,
    save_checkpoint,
    set_rng_state,
)
from .config import RunConfig
from .data import ChatEncoder, EncodedDataset, collate, load_samples
from .data.sampler import ResumableSampler
from .errors import ConfigError, HydraError
from .evaluate import evaluate_configured, mean_answer_loss
from .loop import NonFiniteLoss, WarmupCosine, batches_forever, optimize
from .loss import answer_loss
from .models.loading import load_model
from .rank.budget import Allocation, Budget, Target, discover_targets
from .rank.plan import calibration_batches, initial_allocation, make_budget, needs_calibration, save_allocation
from .rank.scheduler import HydraScheduler
from .report import write_report
from .utils import JsonlWriter, atomic_directory, atomic_write_text, console, peak_rss_mb, write_json


def prepare_output_dir(path: Path, overwrite: bool) -> Path:
    """Create the run directory; refuse to write into a previous run's results unless asked to replace them."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {path} already holds files; pick another train.output_dir or pass --overwrite"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "log.jsonl").unlink(missing_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output directory {path} is not writable ({error.strerror}); choose another") from None
    return path


@dataclass
class RunResult:
    """What a run produced: its metrics (also in `output_dir/metrics.json`) and the trained model (a PeftModel, or
    the base model itself for full fine-tuning)."""

    metrics: dict[str, Any]
    model: nn.Module
    output_dir: Path


class StepLogger:
    """Loop hook: each step's record to log.jsonl and TensorBoard, the eval loss every `train.eval_every` steps, and
    the trainable-parameter count (its maximum over the run is reported)."""

    def __init__(
        self, config: RunConfig, model: nn.Module, accelerator: Accelerator, log: JsonlWriter | None, eval_items, pad
    ):
        self.config, self.model, self.accelerator, self.log = config, model, accelerator, log
        self.eval_items, self.pad = eval_items, pad
        self.max_trainable = trainable_parameters(model)

    def step_begin(self, step: int) -> None:
        pass

    def step_end(self, step: int, record: dict[str, Any]) -> bool:
        t = self.config.train
        record["trainable_params"] = trainable_parameters(self.model)
        self.max_trainable = max(self.max_trainable, record["trainable_params"])
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            record["eval_loss"] = mean_answer_loss(self.model, self.eval_items, self.pad, self.config.eval.batch_size)
        if self.log is not None:  # the main process writes the log
            self.log.write({"step": step, **record})
        scalars = {f"train/{key}": value for key, value in record.items() if isinstance(value, (int, float))}
        self.accelerator.log(scalars, step=step)
        return False


@dataclass
class Adapted:
    """The model made trainable by the configured method, and what the run needs to know about it."""

    model: nn.Module
    budget: Budget
    allocation: Allocation | None  # None for methods that are not an allocation of LoRA ranks (adalora, full)
    spectra: dict | None = None
    hook: Any = None  # an extra loop hook (adalora's schedule)
    loss_fn: Callable = answer_loss


def adapt(
    config: RunConfig,
    model: nn.Module,
    targets: list[Target],
    batches: list,
    show_progress: bool,
    ranks: dict[str, int] | None = None,
) -> Adapted:
    """Apply `config.adapter.method` to `model`: LoRA of allocated ranks (lora, hydra*), AdaLoRA, or full FT.

    `ranks` (a resumed run's current ranks) replaces the starting allocation, so no calibration runs again."""
    method = config.adapter.method
    torch.manual_seed(config.train.seed)  # adapter initialisation depends on the seed alone, not on what loading drew
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in language_model_parameters(model):
            parameter.requires_grad_(True)
        return Adapted(model, make_budget(config.adapter, targets), None)
    if method == "adalora":
        adalora = attach_adalora(model, config.adapter, [t.name for t in targets], config.train.max_steps)
        schedule = AdaLoraSchedule(adalora)

        def loss_with_orthogonality(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
            loss, tokens = answer_loss(model, batch)
            return loss + ADALORA_ORTH_WEIGHT * adalora_orthogonality(model), tokens

        return Adapted(
            adalora, make_budget(config.adapter, targets), None, hook=schedule, loss_fn=loss_with_orthogonality
        )
    if ranks is not None:
        budget = make_budget(config.adapter, targets)
        allocation, spectra = Allocation(dict(ranks), budget.total, {"method": method, "resumed": True}), None
    else:
        allocation, budget, spectra = initial_allocation(config, model, targets, batches, show_progress)
    return Adapted(attach_lora(model, config.adapter, allocation), budget, allocation, spectra)


def _resumable(config: RunConfig, out: Path) -> dict[str, Any]:
    """The newest complete checkpoint of the run in `out`, after checking it was made by this very configuration."""
    if config.adapter.method == "adalora":
        raise ConfigError("--resume is not supported for adalora (PEFT keeps its importance scores internally)")
    saved = out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{out} holds no run to resume (no config.yaml); start it without --resume")
    if saved.read_text() != config.to_yaml():
        old, new = yaml.safe_load(saved.read_text()), config.to_dict()
        changed = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        raise ConfigError(
            f"the configuration differs from the run's {saved} in {changed}; resume with the same config"
        )
    return load_checkpoint(latest_checkpoint(out))


def run(config: RunConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train and evaluate as `config` says; writes everything listed in this module's docstring. With `resume`,
    continue from the newest complete checkpoint in the output directory, exactly as if never interrupted."""
    started = time.perf_counter()
    t, method = config.train, config.adapter.method
    out = Path(t.output_dir)
    state = _resumable(config, out) if resume else None
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(out))
    if state is None and accelerator.is_main_process:
        prepare_output_dir(out, overwrite)
        atomic_write_text(out / "config.yaml", config.to_yaml())
    accelerator.wait_for_everyone()
    set_seed(t.seed)
    accelerator.init_trackers("tensorboard")
    show = show_progress and accelerator.is_main_process

    model, processor = load_model(config.model.name_or_path, config.model.dtype, config.model.trust_remote_code)
    encoder = ChatEncoder(processor, config.data.system_prompt, config.data.max_length)
    train_samples, eval_samples = load_samples(config.data, t.seed)
    targets = discover_targets(model, config.adapter.target_modules, config.adapter.towers)
    model.to(accelerator.device)
    if state is None:
        calibration = config.adapter.calibration_batches if needs_calibration(config) else 0
        batches = calibration_batches(train_samples, encoder, t.batch_size, calibration, t.seed, accelerator.device)
        adapted = adapt(config, model, targets, batches, show)
    else:
        adapted = adapt(config, model, targets, [], show, ranks=state.get("ranks"))
    model, allocation = adapted.model, adapted.allocation
    if state is None:
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay
        )
        first_step, consumed, train_seconds = 1, 0, 0.0
        if accelerator.is_main_process and method == "hydra":
            save_allocation(allocation, targets, out, f"{method} ranks (start)", name="allocation_start")
    else:
        restore_trainable(model, state)
        optimizer = restore_optimizer(model, t.lr, t.weight_decay, state)
        first_step, consumed, train_seconds = state["step"] + 1, state["consumed_batches"], state["train_seconds"]
        _truncate_log(out / "log.jsonl", state["step"])

    sampler = ResumableSampler(len(train_samples), t.seed, start=consumed * t.batch_size * accelerator.num_processes)
    loader = DataLoader(
        EncodedDataset(train_samples, encoder),
        batch_size=t.batch_size,
        sampler=sampler,
        collate_fn=functools.partial(collate, pad_token_id=encoder.pad_token_id),
    )
    schedule = WarmupCosine(t.lr, t.warmup_steps, t.max_steps, resize_warmup_steps=config.schedule.resize_warmup_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hooks: list = []
    scheduler = None
    if method == "hydra":
        scheduler = HydraScheduler(
            accelerator.unwrap_model(model),
            targets,
            adapted.budget,
            allocation,
            config.schedule,
            t.max_steps,
            seed=t.seed,
            history_path=out / "allocation_history.jsonl" if accelerator.is_main_process else None,
            initial_spectra=adapted.spectra,
            debug_checks=t.debug_checks,
        )
        if state is not None:
            scheduler.load_state_dict(state["scheduler"])
        hooks.append(scheduler)
    if adapted.hook is not None:
        hooks.append(adapted.hook)
    for hook in hooks:
        hook.bind(optimizer)
    eval_items = [encoder.encode(s) for s in eval_samples] if t.eval_every else []
    log = JsonlWriter(out / "log.jsonl") if accelerator.is_main_process else None
    logger = StepLogger(config, accelerator.unwrap_model(model), accelerator, log, eval_items, encoder.pad_token_id)
    if state is not None:
        logger.max_trainable = state["max_trainable"]
    train_started = time.perf_counter()

    class Checkpointer:
        """Every `train.checkpoint_every` steps: everything needed to continue exactly (see checkpoint.py)."""

        def step_begin(self, step: int) -> None:
            pass

        def step_end(self, step: int, record: dict[str, Any]) -> bool:
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps and _finite(model):
                current = scheduler.allocation if scheduler is not None else allocation
                extra = {
                    "ranks": None if current is None else dict(current.ranks),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "consumed_batches": step * t.grad_accum,
                    "max_trainable": logger.max_trainable,
                    "train_seconds": train_seconds + time.perf_counter() - train_started,
                }
                if accelerator.is_main_process:
                    save_checkpoint(out, step, accelerator.unwrap_model(model), optimizer, extra, t.keep_checkpoints)
            return False

    if state is not None:
        set_rng_state(state["rng"])
    try:
        optimize(
            model,
            optimizer,
            schedule,
            batches_forever(loader),
            accelerator,
            steps=t.max_steps,
            grad_accum=t.grad_accum,
            max_grad_norm=t.max_grad_norm,
            hooks=(*hooks, logger, Checkpointer()),
            description=f"train ({method})",
            loss_fn=adapted.loss_fn,
            first_step=first_step,
        )
    except NonFiniteLoss as error:
        if log is not None:
            log.close()
        kept = complete_checkpoints(out)
        where = (
            f"the last good checkpoint is {kept[-1]} (continue with --resume after lowering train.lr)"
            if kept
            else ("no checkpoint was written (set train.checkpoint_every to keep one)")
        )
        raise HydraError(f"{error}; training stopped, {where}") from None
    train_time = train_seconds + time.perf_counter() - train_started
    if log is not None:
        log.close()
    final = scheduler.allocation if scheduler is not None else allocation
    if scheduler is not None:
        scheduler.close()

    model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if t.save:
            with atomic_directory(out / ("model" if method == "full" else "adapter")) as staging:
                model.save_pretrained(staging, safe_serialization=True)
        if final is not None:
            save_allocation(final, targets, out, f"{method} ranks (end)")
    results = evaluate_configured(model, encoder, config, train_samples, eval_samples, show)
    predictions = results.pop("predictions")
    if final is not None:
        used = final.params(targets)
    elif method == "adalora":
        used = adalora_effective_params(model, targets)
    else:
        used = trainable_parameters(model)
    metrics = {
        "method": method,
        "model": config.model.name_or_path,
        "seed": t.seed,
        "steps": t.max_steps,
        "resumed_from_step": first_step - 1 if state is not None else None,
        "target_modules": len(targets),
        "budget_params": adapted.budget.total,
        "used_params": used,
        "trainable_params": trainable_parameters(model),
        "max_trainable_params": logger.max_trainable,
        **({"rank_min": min(final.ranks.values()), "rank_max": max(final.ranks.values())} if final else {}),
        "calibration_time_s": allocation.info.get("calibration_seconds", 0.0) if allocation else 0.0,
        **(scheduler.summary() if scheduler is not None else {}),
        **results,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
    }
    if t.debug_checks and accelerator.num_processes > 1:
        write_json(out / f"process-{accelerator.process_index}.json", process_fingerprint(model, final))
    if accelerator.is_main_process:
        write_json(out / "metrics.json", metrics)
        lines = "".join(f"{json.dumps(p, sort_keys=True)}\n" for p in predictions)
        atomic_write_text(out / "predictions.jsonl", lines)
        accelerator.log({"eval/loss": metrics["eval_loss"], "eval/accuracy": metrics["eval_accuracy"]}, t.max_steps)
        write_report(out, {method: out}, title=f"hydra-rank run: {method}")
    accelerator.end_training()
    console.print(f"[bold]hydra-rank[/]: run written to {out}")
    return RunResult(metrics, model, out)


def process_fingerprint(model: nn.Module, allocation: Allocation | None) -> dict[str, Any]:
    """What this process holds at the end: its ranks and a hash of its trainable values (multi-process checks)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return {"ranks": None if allocation is None else allocation.ranks, "trainable_sha256": digest.hexdigest()}


def _finite(model: nn.Module) -> bool:
    """A checkpoint is only worth keeping if every trainable value is finite (a diverging step can leave inf
    parameters behind a still-finite loss; the next step's loss check then stops the run)."""
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (written after the checkpoint a resumed run continues from)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(kept))
