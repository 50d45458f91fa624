"""Allocations as stock PEFT LoRA: the per-module rank and scale patterns, and the LoRA layers by module name.

PEFT looks a module up in `rank_pattern`/`alpha_pattern` with `re.match(rf"(.*\\.)?({key})$", module_name)`: keys
are regular expressions matched as dotted suffixes. A plain full name would be a suffix pattern whose dots match any
character; we use `^` + the escaped full name, which can only ever match that one module (tested against every
module name).

Scale convention, kept here and nowhere else: every module's update is scaled by alpha/r0 whatever its rank
(alpha_m = alpha/r0 · r_m). A module keeping rank r0 behaves exactly as in uniform LoRA, and when HyDRA changes a
rank the existing directions keep their scale, so ΔW is unchanged by a resize. The first attach (`adapter.py`) and
every resize (`resize.py`) write their patterns with `lora_patterns`.
"""

from __future__ import annotations

import re

from peft import PeftModel
from peft.tuners.lora import LoraLayer

ADAPTER = "default"  # the PEFT adapter name hydra-rank trains


def pattern_key(module_name: str) -> str:
    """A PEFT `rank_pattern`/`alpha_pattern` key that matches exactly `module_name`."""
    return "^" + re.escape(module_name)


def lora_patterns(ranks: dict[str, int], alpha: float, r0: int) -> tuple[dict[str, int], dict[str, float]]:
    """(rank_pattern, alpha_pattern) giving every listed module its rank and the scale alpha/r0."""
    scale = alpha / r0
    return (
        {pattern_key(name): rank for name, rank in ranks.items()},
        {pattern_key(name): scale * rank for name, rank in ranks.items()},
    )


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by full module name (as in `Target.name`)."""
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}
