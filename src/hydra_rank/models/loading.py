"""Load a model and its processor from a local directory or a hub id (built-in names: `inputs.load_model`).

Image-text-to-text checkpoints (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL, PaliGemma, Gemma 3, ...: transformers'
own table, or a remote-code checkpoint's `auto_map`) load with their processor; anything else loads as a causal LM
with its tokenizer. Remote code runs only when the user asked for it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import PeftModel
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from ..errors import ModelLoadError
from ..utils import one_line
from .arch import ARCHITECTURES


def load_pretrained(
    source: str, dtype: str = "float32", trust_remote_code: bool = False, quantization: str = "none"
) -> tuple[PreTrainedModel, Any]:
    """(model in eval mode, processor or tokenizer) from a directory or hub id; with `quantization` (8bit | 4bit)
    the language model's linears are loaded quantized by bitsandbytes, on this process's device."""
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        hint = "" if Path(source).exists() else " (no such local directory; a hub id needs network access)"
        raise ModelLoadError(f"cannot load model {source!r}{hint}: {error}") from None
    weights: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if quantization != "none":
        weights.update(
            quantization_config=bitsandbytes_config(config, quantization, weights["dtype"]),
            device_map={"": PartialState().device},  # bitsandbytes quantizes as the weights reach their device
        )
    try:
        if is_image_text_to_text(config):
            model = AutoModelForImageTextToText.from_pretrained(source, **weights, **kwargs)
            processor = load_processor(source, config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **weights, **kwargs)
            processor = AutoTokenizer.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"the weights of {source!r} are a pickle that safe loading refuses (it could run code); convert them "
            "to safetensors"
        ) from None
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ModelLoadError(
            f"cannot load the weights or processor of {source!r} ({_reason(error)}); the folder needs the model's "
            "weights (safetensors, complete), its config and its processor or tokenizer files"
        ) from None
    return model.eval(), processor


def bitsandbytes_config(config: PreTrainedConfig, quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes settings for a quantized base (QLoRA's recipe for 4bit: NF4, double quantization, compute in the
    adapters' dtype). Only the language model is quantized: it holds nearly all the weights, while the vision tower
    and projector are small and feed every token of the image, and the output head is often tied to the embeddings."""
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; say how to get it before it does)
    except ImportError:
        raise ModelLoadError(
            f"model.quantization {quantization} needs bitsandbytes: pip install 'hydra-rank[quant]'"
        ) from None
    spec = ARCHITECTURES.get(config.model_type)
    kept = ["lm_head"] + ([path for path in (spec.vision_layers, spec.projector) if path] if spec else [])
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=kept,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model`'s base weights were loaded quantized (by `load_pretrained`)."""
    return getattr(model, "hf_quantizer", None) is not None


def _reason(error: Exception) -> str:
    """An exception as a short one-line reason."""
    return f"{type(error).__name__}: {one_line(str(error), 300)}"


def load_adapter(model: PreTrainedModel, path: Path) -> PeftModel:
    """A saved PEFT adapter on top of `model`, or one clear error: not an adapter folder, an adapter_config.json that
    is not PEFT's, truncated weights, or an adapter made for another base model (names or shapes do not match)."""
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{config} is not valid JSON ({_reason(error)})") from None
    if not isinstance(settings, dict) or "peft_type" not in settings:
        raise ModelLoadError(f"{config} is not a PEFT adapter config (no peft_type)")
    try:
        return PeftModel.from_pretrained(model, path)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"the adapter weights in {path} are a pickle that safe loading refuses") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(
            f"cannot load the adapter in {path} ({_reason(error)}); it must be a complete PEFT adapter saved for "
            "this base model"
        ) from None


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
