"""Allocations as stock PEFT LoRA: the per-module rank and scale patterns, and the LoRA layers by module name.

PEFT looks a module up in `rank_pattern`/`alpha_pattern` with `re.match(rf"(.*\\.)?({key})$", module_name)`: keys
are regular expressions matched as dotted suffixes. A plain full name would be a suffix pattern whose dots match any
character; we use `^` + the escaped full name, which can only ever match that one module (tested against every
module name).

Scale conventions, kept here and nowhere else. A module at rank r0 scales its update by alpha/r0, exactly as uniform
LoRA does; a module at another rank r gets
- sqrt (default): alpha/r0 · sqrt(r0/r), which is PEFT's rsLoRA rule `lora_alpha/sqrt(r)` with one global
  lora_alpha = alpha/sqrt(r0) (`use_rslora`, no `alpha_pattern`): one optimizer step moves a module's update by
  about the same amount whatever its rank, so a learning rate tuned for uniform LoRA stays safe for every module;
- fixed: alpha/r0 as well (alpha_m = alpha/r0 · r_m in `alpha_pattern`). A grown module's update then moves faster
  per step than uniform LoRA's (more directions, each at the same scale): at a learning rate near LoRA's best, HyDRA
  trained worse than LoRA between decisions and lost (BENCHMARKS.md, ablations).
Either way a resize keeps ΔW = s·B·A exactly (`resize.py` rescales B when s changes). The first attach
(`adapter.py`) and every resize write their patterns with `lora_patterns`.
"""

from __future__ import annotations

import math
import re

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

ADAPTER = "default"  # the PEFT adapter name hydra-rank trains


def pattern_key(module_name: str) -> str:
    """A PEFT `rank_pattern`/`alpha_pattern` key that matches exactly `module_name`."""
    return "^" + re.escape(module_name)


def lora_patterns(
    ranks: dict[str, int], alpha: float, r0: int, rslora: bool = False
) -> tuple[dict[str, int], dict[str, float]]:
    """(rank_pattern, alpha_pattern) giving every listed module its rank, and under the fixed convention the scale
    alpha/r0; under rsLoRA (`rslora`, the sqrt convention) the global alpha already gives every rank its scale."""
    scale = alpha / r0
    return (
        {pattern_key(name): rank for name, rank in ranks.items()},
        {} if rslora else {pattern_key(name): scale * rank for name, rank in ranks.items()},
    )


def module_scale(layer: LoraLayer, rank: int) -> float:
    """The scale PEFT's rule gives `layer` at `rank`: lora_alpha/sqrt(rank) under rsLoRA, else unchanged (the
    fixed convention keeps alpha/r0). Rank 0 has no update to scale: its current scale is kept."""
    if rank > 0 and layer.use_rslora.get(ADAPTER, False):
        return layer.lora_alpha[ADAPTER] / math.sqrt(rank)  # as PEFT computes it, to the last bit
    return layer.scaling[ADAPTER]


def set_rank(layer: LoraLayer, rank: int) -> None:
    """Record `layer`'s new rank with the scale `module_scale` gives it: under rsLoRA the global lora_alpha stays
    and the scale follows the rank; under the fixed convention the scale stays and lora_alpha = scale·rank follows."""
    scale = module_scale(layer, rank)
    layer.r[ADAPTER], layer.scaling[ADAPTER] = rank, scale
    if not layer.use_rslora.get(ADAPTER, False):
        layer.lora_alpha[ADAPTER] = scale * rank


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by full module name (as in `Target.name`)."""
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def strip_empty(model: PeftModel) -> list[str]:
    """Give every rank-0 module back its base layer and drop it from the PEFT config, so that the adapter saves as
    stock PEFT (which has no rank 0: such a module is simply not a target). Returns their names. Only for a model
    whose training is over: a stripped module can no longer grow."""
    root = model.base_model.model
    emptied = [name for name, layer in lora_layers(model).items() if layer.r[ADAPTER] == 0]
    for name in emptied:
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, root.get_submodule(name).get_base_layer())
    if emptied:
        config = model.peft_config[ADAPTER]
        keys = {pattern_key(name) for name in emptied}
        config.target_modules = type(config.target_modules)(n for n in config.target_modules if n not in emptied)
        config.rank_pattern = {k: v for k, v in config.rank_pattern.items() if k not in keys}
        config.alpha_pattern = {k: v for k, v in config.alpha_pattern.items() if k not in keys}
    return emptied


@torch.no_grad()
def fold_scales(model: PeftModel, alpha: float) -> None:
    """Make the adapter portable: give every module the scale alpha/r_m, the rule that stock PEFT and llama.cpp apply
    with one global `lora_alpha` and no `alpha_pattern`/`use_rslora` (llama.cpp's converter reads neither), and fold
    the difference into B, so every module's ΔW = s·B·A is unchanged (up to float rounding)."""
    for layer in lora_layers(model).values():
        rank = layer.r[ADAPTER]
        if rank == 0:
            continue
        portable = alpha / rank
        layer.lora_B[ADAPTER].weight.mul_(layer.scaling[ADAPTER] / portable)
        layer.scaling[ADAPTER], layer.lora_alpha[ADAPTER] = portable, alpha
        layer.use_rslora[ADAPTER] = False
    config = model.peft_config[ADAPTER]
    config.lora_alpha, config.alpha_pattern, config.use_rslora = alpha, {}, False
