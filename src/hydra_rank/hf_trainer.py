"""HyDRA inside Hugging Face `Trainer` and TRL's `SFTTrainer`: change the class, keep the rest of the script.

    trainer = HydraTrainer(model=base_model, args=args, train_dataset=data, data_collator=collate)  # was Trainer
    trainer.train()
    trainer.save_model()  # a stock PEFT adapter: rank_pattern/alpha_pattern hold the final ranks

    HydraSFTTrainer = with_hydra(trl.SFTTrainer)  # the same for any Trainer subclass

The trainer is given the *base* model. Once the parent constructor has prepared datasets and collator, the mixin
picks the targets, computes the starting allocation (calibrating on a few training batches when the method needs it)
and wraps the model with PEFT LoRA, exactly as `hydra-rank train` does. `HydraCallback` then drives the same
`HydraScheduler` the built-in loop uses: sketch hooks open before each decision, the optimizer's step hooks measure
what every module's update removed from the loss, and at a decision the adapters are resized, the optimizer is
re-bound (Adam state kept for surviving parameters, a new param group for new ones) and the learning-rate scheduler
is told about the new group: the Trainer's own schedule times the built-in loop's short ramp for fresh parameters.
With the same data order, schedule and seed, the decisions are the built-in loop's (tested).

Several processes (`accelerate launch`, DDP): every process makes the same decision from synchronized sketches and
resizes identically; the DDP wrapper, which registered the old parameters for its gradient all-reduce, is then
rebuilt (`loop.rewrap`) and becomes `model_wrapped`. The Trainer's epoch loop still holds the old wrapper in a local
variable, so `training_step` runs every later micro-batch through the current one (with its `no_sync` between
synchronized steps); clipping and zero_grad reach the same parameters through either wrapper.

Limits, each a clear error: learning-rate schedules built on `LambdaLR` (every `lr_scheduler_type` except
reduce_lr_on_plateau), LoRA-rank methods only (AdaLoRA and full fine-tuning are PEFT/Trainer features already), and
no resuming a Trainer checkpoint taken while ranks were still moving (its tensors have the shapes of that moment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from .adapter import Adapted, adapt
from .config import AdapterConfig, RunConfig, ScheduleConfig, TrainConfig, validate
from .errors import ConfigError, HydraError
from .loop import rebind_optimizer, rewrap
from .methods import METHODS
from .rank.budget import Target, discover_targets
from .rank.lora import strip_empty
from .rank.plan import calibration_batch_count, calibration_batches, probe_source
from .report import save_allocation
from .utils import unwrap_optimizer

if TYPE_CHECKING:
    from .rank.plan import BatchMaker
    from .rank.probe import ProbeSource
    from .rank.scheduler import HydraScheduler

TRAINER_METHODS = tuple(name for name, method in METHODS.items() if method.in_trainer)


@dataclass(frozen=True)
class RampedLambda:
    """A param group born at step `born`: the schedule's factor times a linear ramp over `steps` (picklable, so the
    Trainer can save its scheduler). LambdaLR evaluates factors at `epoch` = the number of steps taken."""

    shape: Any
    born: int
    steps: int

    def __call__(self, epoch: int) -> float:
        ramp = min(1.0, (epoch + 1 - self.born) / self.steps) if self.steps else 1.0
        return self.shape(epoch) * ramp


class HydraCallback(TrainerCallback):
    """Runs the HyDRA scheduler inside `Trainer.train` (added by `HydraTrainer`; see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        adapted: Adapted,
        targets: list[Target],
        history_dir: Path | None,
        trainer: Trainer,
        probe: ProbeSource | None = None,
    ) -> None:
        self.config, self.adapted, self.targets, self.history_dir = config, adapted, targets, history_dir
        self.probe = probe
        self.trainer = trainer  # whose DDP wrapper (`model_wrapped`) is rebuilt after a resize
        self.scheduler: HydraScheduler | None = None
        self.step_loss = 0.0
        self.shape: Any = None
        self.base_lr = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not self.config.adapter.spec.dynamic:
            return
        if state.global_step > 0:
            raise HydraError(
                f"resuming a Trainer checkpoint is not supported with method {self.config.adapter.method}: the "
                "adapter shapes changed after it was saved; start again, or use `hydra-rank train --resume`, which "
                "restores ranks exactly"
            )
        schedule = _unwrap_scheduler(lr_scheduler)
        if not isinstance(schedule, LambdaLR):
            raise ConfigError(
                f"HydraTrainer needs a LambdaLR-based learning-rate schedule to give resized parameters their ramp, "
                f"got {type(schedule).__name__}; use any lr_scheduler_type except reduce_lr_on_plateau"
            )
        self.shape, self.base_lr = schedule.lr_lambdas[0], schedule.base_lrs[0]
        history = None if self.history_dir is None else self.history_dir / "allocation_history.jsonl"
        self.scheduler = self.adapted.scheduler(model, self.targets, self.config, state.max_steps, history, self.probe)
        self.scheduler.bind(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_loss = 0.0
        if self.scheduler is not None:
            self.scheduler.step_begin(state.global_step + 1)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.scheduler is None:
            return
        if self.scheduler.step_end(state.global_step, {"loss": self.step_loss}):
            self._rebind(model, optimizer, _unwrap_scheduler(lr_scheduler), state.global_step)
            self.trainer.model_wrapped = rewrap(self.trainer.model_wrapped)

    def _rebind(self, model: torch.nn.Module, optimizer: Any, schedule: LambdaLR, step: int) -> None:
        """After a resize: the optimizer follows the new parameters, and the LR schedule gets a factor for every new
        param group (the Trainer's own shape times the resize ramp); surviving groups keep theirs."""
        groups = unwrap_optimizer(optimizer).param_groups
        known = {id(g): (fn, lr) for g, fn, lr in zip(groups, schedule.lr_lambdas, schedule.base_lrs, strict=True)}
        rebind_optimizer(optimizer, model, step)
        ramp = self.config.schedule.resize_warmup_steps
        pairs = [known.get(id(g), (RampedLambda(self.shape, step, ramp), self.base_lr)) for g in groups]
        schedule.lr_lambdas = [fn for fn, _ in pairs]
        schedule.base_lrs = [lr for _, lr in pairs]
        for group, (fn, lr) in zip(groups, pairs, strict=True):  # the scheduler already stepped for this step
            group.setdefault("initial_lr", lr)
            group["lr"] = lr * fn(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in groups]

    def on_train_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.close()
        if self.adapted.allocation is not None:
            strip_empty(self.adapted.model)  # so that trainer.save_model() writes a stock PEFT adapter
        if self.history_dir is not None and self.adapted.allocation is not None:
            final = self.scheduler.allocation if self.scheduler is not None else self.adapted.allocation
            save_allocation(final, self.targets, self.history_dir, f"{self.config.adapter.method} ranks (end)")


class HydraTrainerMixin:
    """Mixed in before a `Trainer` class (see `with_hydra`). Extra keyword arguments, all optional:
    `hydra_adapter` (AdapterConfig: method, rank r0 whose uniform-LoRA size is the budget, alpha, targets),
    `hydra_schedule` (ScheduleConfig: when decisions happen and how much may move), `hydra_debug_checks`
    (assert the budget after every step)."""

    def __init__(
        self,
        *args: Any,
        hydra_adapter: AdapterConfig | None = None,
        hydra_schedule: ScheduleConfig | None = None,
        hydra_debug_checks: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        training = self.args
        adapter = hydra_adapter or AdapterConfig()
        if not adapter.spec.in_trainer:
            raise ConfigError(
                f"HydraTrainer runs the LoRA-rank methods {TRAINER_METHODS}, got {adapter.method!r}; for AdaLoRA or "
                f"full fine-tuning use PEFT's AdaLoraConfig or a plain Trainer"
            )
        train = TrainConfig(
            seed=training.seed,
            batch_size=training.per_device_train_batch_size,
            output_dir=str(training.output_dir),
            debug_checks=hydra_debug_checks,
        )
        self.hydra_config = validate(
            RunConfig(adapter=adapter, schedule=hydra_schedule or ScheduleConfig(), train=train)
        )
        targets = discover_targets(self.model, adapter.target_modules, adapter.towers)
        batches = self._calibration_batches(calibration_batch_count(self.hydra_config))
        probe = self._probe_source() if self.hydra_config.schedule.needs_probe else None
        adapted = adapt(self.hydra_config, self.model, targets, batches, show_progress=False)
        self.model = self.model_wrapped = adapted.model
        history_dir = Path(training.output_dir) if self.is_world_process_zero() else None
        if history_dir is not None:
            history_dir.mkdir(parents=True, exist_ok=True)
        self.hydra = HydraCallback(self.hydra_config, adapted, targets, history_dir, self, probe)
        self.add_callback(self.hydra)

    def _batch_maker(self, needs: str) -> BatchMaker:
        """Training samples by index through this trainer's collator, on its device (the built-in loop's batches are
        drawn by the same seeded indices)."""
        if self.train_dataset is None or self.data_collator is None:
            raise ConfigError(
                f"method {self.hydra_config.adapter.method} {needs}: pass train_dataset (and data_collator) to the "
                "trainer"
            )

        def make(indices: list[int]) -> dict[str, torch.Tensor]:
            batch = self.data_collator([self.train_dataset[i] for i in indices])
            return {key: value.to(self.args.device) for key, value in batch.items()}

        return make

    def _calibration_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        if count == 0:
            return []
        make = self._batch_maker("calibrates on training batches")
        return calibration_batches(
            make, len(self.train_dataset), self.args.per_device_train_batch_size, count, self.args.seed
        )

    def _probe_source(self) -> ProbeSource:
        make = self._batch_maker("measures on probe batches (schedule.attribution probe / curves held_out)")
        return probe_source(make, len(self.train_dataset), self.args.per_device_train_batch_size, self.args.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(model, DistributedDataParallel) and model is not self.model_wrapped:  # rebuilt after a resize
            model = self.model_wrapped
            if not self.accelerator.sync_gradients:  # the Trainer put the old wrapper in no_sync
                with self.accelerator.no_sync(model):
                    return self._hydra_step(model, inputs, num_items_in_batch)
        return self._hydra_step(model, inputs, num_items_in_batch)

    def _hydra_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.hydra.step_loss += float(loss)  # what the Trainer reports for the step, kept in the allocation history
        return loss


def _unwrap_scheduler(lr_scheduler: Any) -> Any:
    """The torch LR scheduler inside Accelerate's `AcceleratedScheduler` (or `lr_scheduler` itself)."""
    return getattr(lr_scheduler, "scheduler", lr_scheduler)


def with_hydra(trainer_class: type[Trainer]) -> type[Trainer]:
    """`trainer_class` with HyDRA mixed in, e.g. `with_hydra(trl.SFTTrainer)`."""
    return type(f"Hydra{trainer_class.__name__}", (HydraTrainerMixin, trainer_class), {})


HydraTrainer = with_hydra(Trainer)
