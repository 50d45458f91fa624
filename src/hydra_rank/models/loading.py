"""Load a model and its processor from a local directory or a hub id (built-in names: `inputs.load_model`).

Image-text-to-text checkpoints (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL, PaliGemma, Gemma 3, ...: transformers'
own table, or a remote-code checkpoint's `auto_map`) load with their processor; anything else loads as a causal LM
with its tokenizer. Remote code runs only when the user asked for it.
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
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from ..errors import ModelLoadError


def load_pretrained(
    source: str, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    """(model in eval mode, processor or tokenizer) from a directory or hub id."""
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        hint = "" if Path(source).exists() else " (no such local directory; a hub id needs network access)"
        raise ModelLoadError(f"cannot load model {source!r}{hint}: {error}") from None
    try:
        if is_image_text_to_text(config):
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
            processor = load_processor(source, config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
            processor = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"cannot load the weights or processor of {source!r} ({type(error).__name__}: {error}); the folder"
            " needs the model's weights (safetensors), its config and its processor or tokenizer files"
        ) from None
    return model.eval(), processor


def is_image_text_to_text(config: PreTrainedConfig) -> bool:
    """Whether a checkpoint loads as an image-text-to-text model: transformers maps its config type to one, or its
    remote code (`auto_map`) provides one. This decides first: Gemma 3's config is in the causal-LM table as well."""
    auto_map = getattr(config, "auto_map", None) or {}
    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING or "AutoModelForImageTextToText" in auto_map


def without_video_processor(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor, under the same name (what it saves loads as the original).

    transformers builds a VLM processor's video processor even for image-only use, and that needs torchvision
    (huggingface/transformers#48558); hydra-rank feeds images only, so CPU installs without torchvision use this.
    `ProcessorMixin` pairs the positional parts with `get_attributes()` in order; these processors (Qwen2-VL,
    Qwen2.5-VL, SmolVLM) pass the video processor last, so without its attribute it is simply left unpaired.
    """
    attributes = [name for name in processor_class.get_attributes() if name != "video_processor"]
    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(lambda cls: attributes)})


def load_processor(source: str, config: PreTrainedConfig, **kwargs: Any) -> ProcessorMixin:
    """`AutoProcessor`; if that fails for a processor with a video processor (which needs torchvision, and which a
    checkpoint saved without it lacks), the same processor without one. Other failures are raised as they are."""
    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except (ImportError, OSError):
        processor_class = PROCESSOR_MAPPING.get(type(config), None)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise
        return without_video_processor(processor_class).from_pretrained(source, **kwargs)
