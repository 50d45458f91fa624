"""Attach LoRA adapters through PEFT to an explicit list of resolved module names.

Targets are full module names (e.g. `model.language_model.layers.3.mlp.up_proj`), not short names, so nothing in the
vision tower is touched by accident. PEFT treats each list entry as "equal to, or a dotted suffix of" a module name;
full names from the model itself therefore match exactly one module each.
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import AdapterConfig


def lora_config(config: AdapterConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
    )


def attach_lora(model: nn.Module, config: AdapterConfig, targets: list[str]) -> PeftModel:
    """Freeze the model and wrap it with trainable LoRA adapters on `targets`."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return get_peft_model(model, lora_config(config, targets))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
