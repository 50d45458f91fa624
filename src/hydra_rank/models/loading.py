"""Load a model and its processor from a built-in name, a local directory, or a hub id.

Multimodal checkpoints (a config with a `vision_config`) load as image-text-to-text models with their processor;
anything else loads as a causal LM with its tokenizer. Remote code runs only when the user asked for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)

from ..errors import ModelLoadError
from .tiny_vlm import SMOLLM2, TINY_VLM, smollm2_path, tiny_vlm_path

BUILTINS = {TINY_VLM: tiny_vlm_path, SMOLLM2: smollm2_path}


def resolve(name_or_path: str) -> str:
    """The directory or hub id behind a model name; built-in names are built into the cache on first use."""
    if name_or_path.startswith("builtin:"):
        if name_or_path not in BUILTINS:
            raise ModelLoadError(f"unknown built-in model {name_or_path!r}; choose from {sorted(BUILTINS)}")
        return str(BUILTINS[name_or_path]())
    return name_or_path


def load_model(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    """(model in eval mode, processor or tokenizer)."""
    source = resolve(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        hint = "" if Path(source).exists() else " (no such local directory; a hub id needs network access)"
        raise ModelLoadError(f"cannot load model {name_or_path!r}{hint}: {error}") from None
    if hasattr(config, "vision_config"):
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
        processor = AutoTokenizer.from_pretrained(source, **kwargs)
    return model.eval(), processor
