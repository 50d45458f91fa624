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

import re

from peft import LoraConfig, PeftModel, get_peft_model
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
