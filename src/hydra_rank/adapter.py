"""What a method trains, made trainable (`methods.Trainable`): LoRA of allocated ranks, PEFT AdaLoRA, or the
language model itself. `adapt` is the one entry point, used by the built-in loop and by `HydraTrainer` alike.

LoRA goes through PEFT as a stock configuration: targets are full module names (e.g.
`model.language_model.layers.3.mlp.up_proj`), never short names, so nothing in the vision tower is touched by
accident, and per-module ranks go into PEFT's own `rank_pattern`/`alpha_pattern` (`rank/lora.py`, which also holds
the scale convention), so the saved adapter loads with `PeftModel.from_pretrained` and nothing of ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from peft import AdaLoraConfig, EvaConfig, LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights
from torch import nn

from .loss import answer_loss
from .methods import Start, Trainable
from .models.arch import decoder_layers
from .rank.budget import Allocation, Budget, Target
from .rank.lora import ADAPTER, lora_layers, lora_patterns
from .rank.plan import initial_allocation, make_budget
from .rank.resize import apply_allocation
from .rank.scheduler import HydraScheduler
from .utils import unwrap_optimizer

if TYPE_CHECKING:
    from pathlib import Path

    from .config import AdapterConfig, RunConfig
    from .rank.probe import ProbeSource
    from .rank.signals import ModuleSpectrum


@dataclass
class Adapted:
    """The model made trainable by the configured method, and what a run needs to know about it."""

    model: nn.Module
    budget: Budget
    allocation: Allocation | None  # None for methods that are not an allocation of LoRA ranks (adalora, full)
    spectra: dict[str, ModuleSpectrum] | None = None  # calibration spectra, when the start was calibrated
    hook: Any = None  # an extra loop hook (AdaLoRA's schedule)
    loss_fn: Callable = answer_loss
    used_params: Callable[[nn.Module], int] | None = None  # parameters in use when there is no allocation to count

    def scheduler(
        self,
        model: PeftModel,
        targets: list[Target],
        config: RunConfig,
        total_steps: int,
        history: Path | None,
        probe: ProbeSource | None = None,
    ) -> HydraScheduler:
        """The HyDRA scheduler that moves this adapter's ranks during a run of `config` (the training loop's and the
        HF Trainer callback's; `model` is the PEFT model itself, unwrapped from any DDP/FSDP wrapper). `probe` gives
        the probe batch of a decision (`ScheduleConfig.needs_probe`)."""
        return HydraScheduler(
            model,
            targets,
            self.budget,
            self.allocation,
            config.schedule,
            total_steps,
            mode=config.adapter.spec.mode,
            spectrum=config.adapter.spectrum,
            seed=config.train.seed,
            history_path=history,
            initial_spectra=self.spectra,
            debug_checks=config.train.debug_checks,
            probe=None if probe is None else (probe, self.loss_fn),
        )


def adapt(
    config: RunConfig,
    model: nn.Module,
    targets: list[Target],
    batches: list[dict[str, torch.Tensor]],
    show_progress: bool,
    ranks: dict[str, int] | None = None,
) -> Adapted:
    """Make `model` trainable as `config.adapter.method` says. `batches` are the calibration batches (empty when the
    method does not calibrate); `ranks` (a resumed run's current ranks) replace the starting allocation."""
    torch.manual_seed(config.train.seed)  # adapter initialisation depends on the seed alone, not on what loading drew
    budget = make_budget(config.adapter, targets)
    trainable = config.adapter.spec.trainable
    if trainable is Trainable.FULL:
        train_language_model(model)
        return Adapted(model, budget, None, used_params=trainable_parameters)
    if trainable is Trainable.ADALORA:
        adalora = attach_adalora(model, config.adapter, [t.name for t in targets], config.train.max_steps)
        used = partial(adalora_effective_params, targets=targets)
        return Adapted(
            adalora, budget, None, hook=AdaLoraSchedule(adalora), loss_fn=loss_with_orthogonality, used_params=used
        )
    if ranks is not None:
        allocation = Allocation(dict(ranks), budget.total, {"method": config.adapter.method, "resumed": True})
        return Adapted(attach_lora(model, config.adapter, allocation), budget, allocation)
    allocation, spectra = initial_allocation(config, model, targets, budget, batches, show_progress)
    if config.adapter.spec.start is Start.EVA:
        lora = attach_eva(model, config.adapter, allocation, batches)
        return Adapted(
            lora, budget, Allocation(eva_ranks(lora, targets), budget.total, {"method": config.adapter.method})
        )
    return Adapted(attach_lora(model, config.adapter, allocation), budget, allocation, spectra)


def lora_config(config: AdapterConfig, allocation: Allocation, **extra: Any) -> LoraConfig:
    """Uniform LoRA at r0 is a plain config; any other allocation lists every module in the patterns. A module at
    rank 0 has no adapter at all (EVA or a static allocation dropped it), except under a dynamic method, where it is
    created at rank 1 and emptied by `attach_lora` so that it can grow again."""
    keep = config.spec.dynamic
    ranks = {name: max(rank, 1) for name, rank in allocation.ranks.items() if rank > 0 or keep}
    uniform = all(rank == config.rank for rank in ranks.values())
    # the sqrt convention (`rank/lora.py`) is rsLoRA with the global alpha that gives rank r0 the scale alpha/r0
    rank_stable = config.spec.allocates and config.rank_scale == "sqrt"
    alpha = config.alpha / config.rank**0.5 if rank_stable else config.alpha
    rslora = config.spec.rslora or rank_stable
    rank_pattern, alpha_pattern = lora_patterns({} if uniform else ranks, alpha, config.rank, rslora)
    return LoraConfig(
        r=config.rank,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=config.dropout,
        target_modules=list(ranks),
        bias="none",
        use_rslora=rslora,
        **extra,
    )


def attach_lora(
    model: nn.Module, config: AdapterConfig, allocation: Allocation, low_cpu_mem_usage: bool = False, **extra: Any
) -> PeftModel:
    """Freeze the model and wrap it with trainable LoRA adapters of the allocated ranks."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lora = get_peft_model(model, lora_config(config, allocation, **extra), low_cpu_mem_usage=low_cpu_mem_usage)
    if config.spec.dynamic and 0 in allocation.ranks.values():
        apply_allocation(lora, allocation)  # the rank-0 placeholders lose their parameters
    return lora


EVA_RHO = 2.0  # PEFT's default: a module may end with up to 2·r0


def attach_eva(
    model: nn.Module, config: AdapterConfig, allocation: Allocation, batches: list[dict[str, torch.Tensor]]
) -> PeftModel:
    """PEFT EVA, the closest static peer of HyDRA's calibrated start: each module's A starts as the top right-singular
    vectors of its inputs on the calibration batches, and ranks move to the modules whose inputs those directions
    explain best (a total of r0 per module; PEFT rescales alpha so every module keeps the scale alpha/r0, our
    convention). Every non-padding token counts, not only answer tokens: the adapters act on all of them, and short
    answers alone would give too few rows for a stable SVD."""
    eva = EvaConfig(rho=EVA_RHO, use_label_mask=False)
    lora = attach_lora(model, config, allocation, True, init_lora_weights="eva", eva_config=eva)  # A made by EVA
    initialize_lora_eva_weights(lora, dataloader=batches, show_progress_bar=False)
    return lora


def eva_ranks(model: PeftModel, targets: list[Target]) -> dict[str, int]:
    """Every target's rank after EVA (0 where it removed the adapter)."""
    layers = lora_layers(model)
    return {t.name: layers[t.name].r[ADAPTER] if t.name in layers else 0 for t in targets}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attach_adalora(model: nn.Module, config: AdapterConfig, targets: list[str], total_steps: int) -> PeftModel:
    """PEFT AdaLoRA on the same targets, for comparison: final rank budget = `config.rank` per module on average
    (so its final size matches uniform LoRA's to within AdaLoRA's rank-based accounting), starting from 1.5x that
    rank as in the AdaLoRA paper; pruning runs between 10 % and 70 % of training, like HyDRA's decision window."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adalora = AdaLoraConfig(
        target_r=config.rank,
        init_r=math.ceil(1.5 * config.rank),
        tinit=max(1, round(0.1 * total_steps)),
        tfinal=max(1, round(0.3 * total_steps)),
        deltaT=1,
        total_step=total_steps,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        orth_reg_weight=ADALORA_ORTH_WEIGHT,
    )
    return get_peft_model(model, adalora)


ADALORA_ORTH_WEIGHT = 0.5  # PEFT's default


def loss_with_orthogonality(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The answer loss plus AdaLoRA's orthogonality regulariser, at PEFT's default weight."""
    loss, tokens = answer_loss(model, batch)
    return loss + ADALORA_ORTH_WEIGHT * adalora_orthogonality(model), tokens


def adalora_orthogonality(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's regulariser: mean ‖PPᵀ − I‖_F over its P (lora_A) and Q (lora_B) factors. PEFT adds it only when the
    model computes the loss from labels; our loss is computed outside the model, so we add it ourselves."""
    terms = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = parameter @ parameter.T if "lora_A" in name else parameter.T @ parameter
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


def adalora_effective_params(model: PeftModel, targets: list[Target]) -> int:
    """Parameters AdaLoRA actually uses: per module, (kept singular values) x (d_in + d_out + 1)."""
    pattern = model.peft_config["default"].rank_pattern or {}  # "<module name>.lora_E" -> kept-or-not per rank
    init_r = model.peft_config["default"].init_r
    total = 0
    for target in targets:
        mask = pattern.get(f"{target.name}.lora_E")
        kept = init_r if mask is None else sum(bool(x) for x in mask)
        total += kept * (target.d_in + target.d_out + 1)
    return total


class AdaLoraSchedule:
    """Loop hook for AdaLoRA: `update_and_allocate` after every optimizer step, while gradients still exist."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.global_step = 0

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        unwrap_optimizer(optimizer).register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.global_step += 1
        self.model.base_model.update_and_allocate(self.global_step)

    def step_begin(self, step: int) -> None:
        pass

    def step_end(self, step: int, record: dict) -> bool:
        return False


def train_language_model(model: nn.Module) -> None:
    """Full fine-tuning: only the language model's parameters train."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in language_model_parameters(model):
        parameter.requires_grad_(True)


def language_model_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything full fine-tuning trains: the language model (embeddings, decoder layers, norm) and its output head
    (tied to the embeddings in SmolLM2). The vision tower and projector stay frozen."""
    path, _ = decoder_layers(model)
    language = model.get_submodule(path.rsplit(".", 1)[0])
    head = model.get_output_embeddings()
    return list(dict.fromkeys([*language.parameters(), *(head.parameters() if head is not None else [])]))
