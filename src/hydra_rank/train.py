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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from .adapter import Adapted, adapt, trainable_parameters
from .checkpoint import (
    complete_checkpoints,
    load_latest,
    restore_optimizer,
    restore_trainable,
    save_checkpoint,
    set_rng_state,
)
from .config import load_yaml
from .data import EncodedDataset, collate
from .data.sampler import ResumableSampler
from .errors import ConfigError, HydraError
from .evaluate import evaluate_configured, mean_answer_loss
from .inputs import RunInputs, load_inputs
from .loop import NonFiniteLoss, StepHooks, WarmupCosine, batches_forever, optimize
from .rank.lora import strip_empty
from .rank.plan import calibration_batch_count, calibration_batches, probe_source, sample_batches
from .report import save_allocation, write_report
from .shard import check_launcher, local_frozen_params, shard_frozen_base
from .utils import (
    JsonlWriter,
    atomic_directory,
    atomic_write_text,
    console,
    peak_rss_mb,
    replace_directory,
    write_json,
)

if TYPE_CHECKING:
    from .config import RunConfig
    from .rank.budget import Allocation
    from .rank.scheduler import HydraScheduler


@dataclass
class RunResult:
    """What a run produced: its metrics (also in `output_dir/metrics.json`) and the trained model (a PeftModel, or
    the base model itself for full fine-tuning)."""

    metrics: dict[str, Any]
    model: nn.Module
    output_dir: Path


def run(config: RunConfig, *, overwrite: bool = False, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Train and evaluate as `config` says; writes everything listed in this module's docstring. With `resume`,
    continue from the newest complete checkpoint in the output directory, exactly as if never interrupted. With
    `overwrite`, a previous run in the output directory is replaced only once the new one is complete: the new run is
    built beside it, and a run that fails leaves the old one as it was."""
    started = time.perf_counter()
    accelerator, state, work = open_run(config, overwrite, resume)
    destination = Path(config.train.output_dir)
    try:
        session = set_up(config, accelerator, state, show_progress and accelerator.is_main_process, work)
        hooks = step_hooks(session)
        train_seconds = train_steps(session, hooks)
        result = finish(session, hooks, train_seconds, started)
    except BaseException:
        if work != destination and accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)  # the half-built replacement; the old run stays intact
        raise
    accelerator.wait_for_everyone()
    if work != destination and accelerator.is_main_process:
        replace_directory(work, destination)
    accelerator.end_training()
    console.print(f"[bold]hydra-rank[/]: run written to {destination}")
    return RunResult(result.metrics, result.model, destination)


# ---- stage 1: start or resume --------------------------------------------------------------------------------------
def open_run(config: RunConfig, overwrite: bool, resume: bool) -> tuple[Accelerator, dict[str, Any] | None, Path]:
    """The run's Accelerator, the checkpoint state to continue from when resuming, and the folder the run writes
    to: the output directory, or with `overwrite` of a previous run a hidden sibling that replaces it at the end. A
    fresh run's folder starts clean, holding its config.yaml."""
    out = Path(config.train.output_dir)
    state = resumable_state(config, out) if resume else None
    work = out
    if state is None and overwrite and out.is_dir() and any(out.iterdir()):
        work = out.with_name(f".{out.name}.overwrite")  # the same name in every process
    precision = config.train.mixed_precision
    state_now = AcceleratorState._shared_state
    if state_now and state_now.get("_mixed_precision", precision) != precision:
        # Accelerate keeps one precision per process; a later run in the same process (a notebook, the Python API)
        # may ask for another. Only the precision part is reset: the processes and their group stay as they are.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(work), mixed_precision=precision)
    if accelerator.is_main_process:
        if state is None:
            if work != out:
                shutil.rmtree(work, ignore_errors=True)  # what a killed earlier attempt left
            prepare_output_dir(work, overwrite)
            atomic_write_text(work / "config.yaml", config.to_yaml())
        else:  # resumable_state found it equal but for where the run lives: a moved run records its new place
            atomic_write_text(out / "config.yaml", config.to_yaml())
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)
    accelerator.init_trackers("tensorboard")
    return accelerator, state, work


def prepare_output_dir(path: Path, overwrite: bool) -> Path:
    """Create the run directory; refuse to write into a previous run's results unless asked to replace them."""
    if path.is_file():
        raise ConfigError(f"train.output_dir {path} is a file; choose a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {path} already holds files; pick another train.output_dir or pass --overwrite"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output directory {path} is not writable ({error.strerror}); choose another") from None
    return path


MOVABLE = ("train", "output_dir")


def resumable_state(config: RunConfig, out: Path) -> dict[str, Any]:
    """The newest complete checkpoint of the run in `out`, after checking it was made by this very configuration."""
    blocker = config.adapter.spec.resume_blocker
    if blocker:
        raise ConfigError(f"--resume is not supported for {config.adapter.method} ({blocker})")
    saved = out / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{out} holds no run to resume (no config.yaml); start it without --resume")
    old, new = load_yaml(saved.read_text(encoding="utf-8")), config.to_dict()
    changed = [
        f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k] and (s, k) != MOVABLE
    ]  # a run folder that was moved or copied resumes where it is now
    if changed:
        raise ConfigError(
            f"the configuration differs from the run's {saved} in {changed}; resume with the same config"
        )
    return load_latest(out)


@dataclass(frozen=True)
class Progress:
    """Where the optimisation (re)starts: a fresh run at step 1, a resumed one after its checkpoint's step."""

    resumed_from: int | None = None  # the checkpoint's step
    consumed_batches: int = 0  # per process
    train_seconds: float = 0.0
    max_trainable: int | None = None
    rng: dict[str, Any] | None = None  # the RNG states to continue with
    scheduler: dict[str, Any] | None = None  # the HyDRA scheduler's state

    @property
    def first_step(self) -> int:
        return (self.resumed_from or 0) + 1

    @classmethod
    def of(cls, state: dict[str, Any] | None) -> Progress:
        if state is None:
            return cls()
        keys = ("step", "consumed_batches", "train_seconds", "max_trainable", "rng", "scheduler")
        return cls(*(state[key] for key in keys))


# ---- stage 2: model, adapters, optimizer and data ------------------------------------------------------------------
@dataclass
class Session:
    """Everything a run set up, handed from stage to stage."""

    config: RunConfig
    accelerator: Accelerator
    inputs: RunInputs
    adapted: Adapted
    model: nn.Module  # as prepared by Accelerate
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    progress: Progress
    show: bool

    out: Path  # where the run writes: the output directory, or its replacement being built (`run`)

    @property
    def method(self) -> str:
        return self.config.adapter.method


def set_up(
    config: RunConfig, accelerator: Accelerator, state: dict[str, Any] | None, show: bool, out: Path
) -> Session:
    """Load model and data, make the method's parameters trainable (a resumed run: at its saved ranks and values),
    build the optimizer and the data stream, and let Accelerate prepare them."""
    t = config.train
    check_launcher(accelerator)
    inputs = load_inputs(config)
    inputs.model.to(accelerator.device)
    if t.gradient_checkpointing:  # non-reentrant: the backward runs the recomputed forward once, hooks included
        inputs.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if state is None:
        adapted, optimizer = _fresh_start(config, inputs, accelerator, show, out)
    else:
        adapted, optimizer = _resumed_start(config, inputs, state, show, out)
    progress = Progress.of(state)
    start = progress.consumed_batches * t.batch_size * accelerator.num_processes
    loader = _loader(inputs, t.batch_size, t.seed, start)
    if t.sharding == "fsdp" and accelerator.num_processes > 1:
        shard_frozen_base(adapted.model)  # not prepared (no DDP wrapper): the loop averages adapter gradients
        prepared = adapted.model
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        prepared, optimizer, loader = accelerator.prepare(adapted.model, optimizer, loader)
    return Session(config, accelerator, inputs, adapted, prepared, optimizer, loader, progress, show, out)


def _fresh_start(
    config: RunConfig, inputs: RunInputs, accelerator: Accelerator, show: bool, out: Path
) -> tuple[Adapted, torch.optim.Optimizer]:
    """Calibrate if the method needs it, adapt, and a new AdamW; a dynamic method's starting ranks are saved."""
    t = config.train
    count = calibration_batch_count(config)
    make = sample_batches(inputs.train_samples, inputs.encoder, accelerator.device)
    batches = calibration_batches(make, len(inputs.train_samples), t.batch_size, count, t.seed)
    adapted = adapt(config, inputs.model, inputs.targets, batches, show)
    trainable = [p for p in adapted.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    if accelerator.is_main_process and config.adapter.spec.dynamic:
        title = f"{config.adapter.method} ranks (start)"
        save_allocation(adapted.allocation, inputs.targets, out, title, name="allocation_start")
    return adapted, optimizer


def _resumed_start(
    config: RunConfig, inputs: RunInputs, state: dict[str, Any], show: bool, out: Path
) -> tuple[Adapted, torch.optim.Optimizer]:
    """Adapt at the checkpoint's ranks, restore its trainable values and optimizer, and cut the log back to it."""
    t = config.train
    adapted = adapt(config, inputs.model, inputs.targets, [], show, ranks=state.get("ranks"))
    restore_trainable(adapted.model, state)
    optimizer = restore_optimizer(adapted.model, t.lr, t.weight_decay, state)
    _truncate_log(out / "log.jsonl", state["step"])
    return adapted, optimizer


def _loader(inputs: RunInputs, batch_size: int, seed: int, start: int) -> DataLoader:
    """Training batches in the seeded order of `data/sampler.py`, from sample `start` on (a resumed run)."""
    return DataLoader(
        EncodedDataset(inputs.train_samples, inputs.encoder),
        batch_size=batch_size,
        sampler=ResumableSampler(len(inputs.train_samples), seed, start=start),
        collate_fn=functools.partial(collate, pad_token_id=inputs.encoder.pad_token_id),
    )


# ---- stage 3: what runs at every step ------------------------------------------------------------------------------
@dataclass
class Hooks:
    """The loop hooks of a run, in the order they are called."""

    scheduler: HydraScheduler | None  # dynamic methods
    logger: StepLogger
    checkpointer: Checkpointer
    extra: StepHooks | None = None  # the method's own (AdaLoRA's schedule)

    def all(self) -> tuple[StepHooks, ...]:
        return tuple(h for h in (self.scheduler, self.extra, self.logger, self.checkpointer) if h is not None)


def current_allocation(scheduler: HydraScheduler | None, adapted: Adapted) -> Allocation | None:
    """The ranks the adapters have now: the scheduler's for a dynamic method, else the starting ones."""
    return scheduler.allocation if scheduler is not None else adapted.allocation


def step_hooks(session: Session) -> Hooks:
    """The HyDRA scheduler (dynamic methods), the method's own hook, the step logger and the checkpointer, bound to
    the optimizer; a resumed run's scheduler continues from its saved state."""
    config, accelerator = session.config, session.accelerator
    scheduler = _scheduler(session) if config.adapter.spec.dynamic else None
    if scheduler is not None and session.progress.scheduler is not None:
        scheduler.load_state_dict(session.progress.scheduler)
    extra = session.adapted.hook
    for hook in (scheduler, extra):
        if hook is not None:
            hook.bind(session.optimizer)
    eval_items = (
        [session.inputs.encoder.encode(s) for s in session.inputs.eval_samples] if config.train.eval_every else []
    )
    log = JsonlWriter(session.out / "log.jsonl") if accelerator.is_main_process else None
    logger = StepLogger(
        config,
        accelerator.unwrap_model(session.model),
        accelerator,
        log,
        eval_items,
        session.inputs.encoder.pad_token_id,
    )
    if session.progress.max_trainable is not None:
        logger.max_trainable = session.progress.max_trainable
    return Hooks(scheduler, logger, Checkpointer(session, logger, scheduler), extra)


def _scheduler(session: Session) -> HydraScheduler:
    history = session.out / "allocation_history.jsonl" if session.accelerator.is_main_process else None
    model = session.accelerator.unwrap_model(session.model)
    config, inputs = session.config, session.inputs
    make = sample_batches(inputs.train_samples, inputs.encoder, session.accelerator.device)
    probe = probe_source(make, len(inputs.train_samples), config.train.batch_size, config.train.seed)
    return session.adapted.scheduler(model, inputs.targets, config, config.train.max_steps, history, probe)


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

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class Checkpointer:
    """Loop hook: every `train.checkpoint_every` steps, everything needed to continue exactly (see checkpoint.py).
    It also keeps the run's training clock, which a resumed run continues."""

    def __init__(self, session: Session, logger: StepLogger, scheduler: HydraScheduler | None) -> None:
        self.session, self.logger, self.scheduler = session, logger, scheduler
        self.model = session.accelerator.unwrap_model(session.model)
        self.started = time.perf_counter()

    def train_seconds(self) -> float:
        return self.session.progress.train_seconds + time.perf_counter() - self.started

    def step_begin(self, step: int) -> None:
        pass

    def step_end(self, step: int, record: dict[str, Any]) -> bool:
        t, session = self.session.config.train, self.session
        if not (t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps and _finite(self.model)):
            return False
        current = current_allocation(self.scheduler, session.adapted)
        extra = {
            "ranks": None if current is None else dict(current.ranks),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "consumed_batches": step * t.grad_accum,
            "max_trainable": self.logger.max_trainable,
            "train_seconds": self.train_seconds(),
        }
        if session.accelerator.is_main_process:
            save_checkpoint(session.out, step, self.model, session.optimizer, extra, t.keep_checkpoints)
        return False


# ---- stage 4: optimise ---------------------------------------------------------------------------------------------
def train_steps(session: Session, hooks: Hooks) -> float:
    """Run the optimizer steps (a resumed run: the remaining ones, with its RNG state); return the training seconds.
    A non-finite loss ends the run with one error naming the checkpoint to resume from."""
    t = session.config.train
    if session.progress.rng is not None:
        set_rng_state(session.progress.rng)
    try:
        optimize(
            session.model,
            session.optimizer,
            WarmupCosine(
                t.lr, t.warmup_steps, t.max_steps, resize_warmup_steps=session.config.schedule.resize_warmup_steps
            ),
            batches_forever(session.loader),
            session.accelerator,
            steps=t.max_steps,
            grad_accum=t.grad_accum,
            max_grad_norm=t.max_grad_norm,
            hooks=hooks.all(),
            description=f"train ({session.method})",
            loss_fn=session.adapted.loss_fn,
            first_step=session.progress.first_step,
        )
    except NonFiniteLoss as error:
        hooks.logger.close()
        kept = complete_checkpoints(session.out)
        where = (
            f"the last good checkpoint is {kept[-1]} (continue with --resume after lowering train.lr)"
            if kept
            else "no checkpoint was written (set train.checkpoint_every to keep one)"
        )
        raise HydraError(f"{error}; training stopped, {where}") from None
    seconds = hooks.checkpointer.train_seconds()
    hooks.logger.close()
    if hooks.scheduler is not None:
        hooks.scheduler.close()
    return seconds


# ---- stage 5: save, evaluate, write outputs ------------------------------------------------------------------------
def finish(session: Session, hooks: Hooks, train_seconds: float, started: float) -> RunResult:
    """Save the trained weights and final allocation, evaluate, and write metrics, predictions and the report."""
    config, accelerator = session.config, session.accelerator
    model = accelerator.unwrap_model(session.model)
    final = current_allocation(hooks.scheduler, session.adapted)
    targets = session.inputs.targets
    if accelerator.is_main_process:
        if config.train.save:
            if final is not None:
                strip_empty(model)  # rank-0 modules are not targets in a stock PEFT adapter
            with atomic_directory(session.out / config.adapter.spec.output) as staging:
                model.save_pretrained(staging, safe_serialization=True)
        if final is not None:
            save_allocation(final, targets, session.out, f"{session.method} ranks (end)")
    inputs = session.inputs
    results = evaluate_configured(
        model, inputs.encoder, config, inputs.train_samples, inputs.eval_samples, session.show
    )
    predictions = results.pop("predictions")
    metrics = run_metrics(session, hooks, model, final, results)
    metrics["train_time_s"] = round(train_seconds, 2)
    metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    metrics["threads"] = torch.get_num_threads()
    write_outputs(session, model, final, metrics, predictions)
    return RunResult(metrics, model, session.out)


def run_metrics(
    session: Session, hooks: Hooks, model: nn.Module, final: Allocation | None, results: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json's content, except the timings and memory measured last."""
    config, adapted, targets = session.config, session.adapted, session.inputs.targets
    start = adapted.allocation
    used = final.params(targets) if final is not None else adapted.used_params(model)
    return {
        "method": session.method,
        "model": config.model.name_or_path,
        "seed": config.train.seed,
        "steps": config.train.max_steps,
        "resumed_from_step": session.progress.resumed_from,
        "target_modules": len(targets),
        "budget_params": adapted.budget.total,
        "used_params": used,
        "trainable_params": trainable_parameters(model),
        "max_trainable_params": hooks.logger.max_trainable,
        **({"rank_min": min(final.ranks.values()), "rank_max": max(final.ranks.values())} if final else {}),
        "calibration_time_s": start.info.get("calibration_seconds", 0.0) if start else 0.0,
        **(hooks.scheduler.summary() if hooks.scheduler is not None else {}),
        **results,
        "provenance": session.inputs.provenance(),
    }


def write_outputs(
    session: Session, model: nn.Module, final: Allocation | None, metrics: dict[str, Any], predictions: list[dict]
) -> None:
    """metrics.json, predictions.jsonl, the final TensorBoard scalars and report.html (main process), and under
    `train.debug_checks` with several processes each process's fingerprint."""
    accelerator, out, method = session.accelerator, session.out, session.method
    if session.config.train.debug_checks and accelerator.num_processes > 1:
        write_json(out / f"process-{accelerator.process_index}.json", process_fingerprint(model, final))
    if accelerator.is_main_process:
        write_json(out / "metrics.json", metrics)
        lines = "".join(f"{json.dumps(p, sort_keys=True)}\n" for p in predictions)
        atomic_write_text(out / "predictions.jsonl", lines)
        scalars = {"eval/loss": metrics["eval_loss"], "eval/accuracy": metrics["eval_accuracy"]}
        accelerator.log(scalars, session.config.train.max_steps)
        write_report(out, {method: out}, title=f"hydra-rank run: {method}")


def process_fingerprint(model: nn.Module, allocation: Allocation | None) -> dict[str, Any]:
    """What this process holds at the end: its ranks, a hash of its trainable values and how many frozen weights it
    keeps (its shards, for a sharded base): multi-process checks."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return {
        "ranks": None if allocation is None else allocation.ranks,
        "trainable_sha256": digest.hexdigest(),
        "local_frozen_params": local_frozen_params(model),
    }


def _finite(model: nn.Module) -> bool:
    """A checkpoint is only worth keeping if every trainable value is finite (a diverging step can leave inf
    parameters behind a still-finite loss; the next step's loss check then stops the run)."""
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (written after the checkpoint a resumed run continues from)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(kept))
