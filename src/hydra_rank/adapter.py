"""Attach LoRA adapters through PEFT, one rank per module, as a stock PEFT configuration.

Targets are full module names (e.g. `model.language_model.layers.3.mlp.up_proj`), never short names, so nothing in
the vision tower is touched by accident. Per-module ranks go into PEFT's own `rank_pattern`/`alpha_pattern`, so the
saved adapter loads with `PeftModel.from_pretrained` and nothing of ours.

PEFT looks a module up in those patterns with `re.match(rf"(.*\\.)?({key})$", module_name)`: keys are regular
expressions matched as dotted suffixes. A plain full name would be a suffix pattern whose dots match any character; we
use `^` + the escaped full name, which can only ever match that one module (tested against every module name).

Scale convention: every module's update is scaled by alpha/r0 whatever its rank (alpha_m = alpha/r0 · r_m). A module
keeping rank r0 behaves exactly as in uniform LoRA, and when HyDRA changes a rank the existing directions keep their
scale, so ΔW is unchanged by a resize.
"""

from __future__ import annotations

import math
import re

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import AdapterConfig
from .rank.budget import Allocation


def pattern_key(module_name: str) -> str:
    """A PEFT `rank_pattern`/`alpha_pattern` key that matches exactly `module_name`."""
    return "^" + re.escape(module_name)


def lora_config(config: AdapterConfig, allocation: Allocation) -> LoraConfig:
    """Uniform LoRA at r0 is a plain config; any other allocation lists every module in the patterns."""
    scale = config.alpha / config.rank
    ranks = allocation.ranks
    patterns = {} if all(rank == config.rank for rank in ranks.values()) else ranks
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        rank_pattern={pattern_key(name): rank for name, rank in patterns.items()},
        alpha_pattern={pattern_key(name): scale * rank for name, rank in patterns.items()},
        lora_dropout=config.dropout,
        target_modules=list(ranks),
        bias="none",
    )


def attach_lora(model: nn.Module, config: AdapterConfig, allocation: Allocation) -> PeftModel:
    """Freeze the model and wrap it with trainable LoRA adapters of the allocated ranks."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return get_peft_model(model, lora_config(config, allocation))


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


def adalora_orthogonality(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's regulariser: mean ‖PPᵀ − I‖_F over its P (lora_A) and Q (lora_B) factors. PEFT adds it only when the
    model computes the loss from labels; our loss is computed outside the model, so we add it ourselves."""
    terms = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = parameter @ parameter.T if "lora_A" in name else parameter.T @ parameter
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


def adalora_effective_params(model: PeftModel, targets: list) -> int:
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
        getattr(optimizer, "optimizer", optimizer).register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.global_step += 1
        self.model.base_model.update_and_allocate(self.global_step)

    def step_begin(self, step: int) -> None:
        pass

    def step_end(self, step: int, record: dict) -> bool:
        return False


def language_model_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything full fine-tuning trains: the language model (embeddings, decoder layers, norm) and its output head
    (tied to the embeddings in SmolLM2). The vision tower and projector stay frozen."""
    from .models.arch import decoder_layers

    path, _ = decoder_layers(model)
    language = model.get_submodule(path.rsplit(".", 1)[0])
    head = model.get_output_embeddings()
    return list(dict.fromkeys([*language.parameters(), *(head.parameters() if head is not None else [])]))
