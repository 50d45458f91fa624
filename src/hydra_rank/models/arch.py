"""Where each architecture keeps its parts, and how its prompts spell an image: the one place for per-family facts.

HyDRA adapts the linears of the language model's decoder layers. Finding them by module-name guesses is fragile:
transformers' DINOv2 also calls its attention linears `q_proj/k_proj/v_proj/o_proj`, so a plain `target_modules`
list would put adapters into the vision tower as well. Each architecture therefore names the path of its decoder
layer list here, and targets are the full, resolved module names below it. The vision tower's layers and the
projector are named as well, so that they too can be found without guessing. The chat encoder only has a
processor, not a model; `processor_spec` finds its family's entry for the prompt-side facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from ..errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one model family. Paths are dotted, from the top-level model."""

    decoder_layers: str  # the language model's decoder `ModuleList`
    # The vision tower's layer `ModuleList`, or the tower itself where it is whatever backbone `vision_config` names
    # (LLaVA, PaliGemma, Gemma 3); `VISION_BACKBONES` then gives the layers by the backbone's model type.
    vision_layers: str | None = None
    projector: str | None = None  # maps vision features into the language model's embedding space
    # How a prompt spells one image where that is more than the processor's own `image_token` (which the processor
    # expands into the right number of image tokens): Qwen2-VL was trained with vision start/end markers around it.
    image_text: str | None = None
    # `token_type_ids` mark a bidirectional prefix (0) and a causal suffix (1), as in PaliGemma. Everything from the
    # first answer on is suffix: were an answer in the prefix, each answer token could see the ones it must predict.
    prefix_lm: bool = False


_LLAVA = ArchSpec("model.language_model.layers", "model.vision_tower", "model.multi_modal_projector")
_IDEFICS3 = ArchSpec("model.text_model.layers", "model.vision_model.encoder.layers", "model.connector")
_QWEN2_VL = ArchSpec(
    "model.language_model.layers",
    "model.visual.blocks",
    "model.visual.merger",  # the 2x2 patch merger + MLP at the end of the vision tower
    image_text="<|vision_start|><|image_pad|><|vision_end|>",
)
_TEXT_ONLY = ArchSpec("model.layers")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": _LLAVA,  # LLaVA 1.5, and LLaVA checkpoints with their own (e.g. MobileVLM's downsampling) projector
    "llava_next": _LLAVA,
    "idefics3": _IDEFICS3,  # Idefics3 and SmolVLM (v1)
    "smolvlm": _IDEFICS3,  # SmolVLM2
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "paligemma": ArchSpec(
        "model.language_model.layers", "model.vision_tower", "model.multi_modal_projector", prefix_lm=True
    ),
    "gemma3": _LLAVA,
    "llama": _TEXT_ONLY,
    "mistral": _TEXT_ONLY,
    "qwen2": _TEXT_ONLY,
    "gemma": _TEXT_ONLY,
    "gemma2": _TEXT_ONLY,
    "gemma3_text": _TEXT_ONLY,
}

# Where the vision backbones a `vision_config` may name keep their layer list (relative to the backbone).
VISION_BACKBONES: dict[str, str] = {
    "clip_vision_model": "encoder.layers",
    "siglip_vision_model": "encoder.layers",
    "dinov2": "encoder.layer",
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"model type {model_type!r} is not in hydra_rank.models.arch.ARCHITECTURES (known: "
            f"{', '.join(sorted(ARCHITECTURES))}); add an ArchSpec naming the path of its decoder layer list (and,"
            " for a vision-language model, of its vision tower's layers and its projector)"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `ModuleList` of the language model's decoder layers."""
    path = arch_spec(model).decoder_layers
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise ModelLoadError(f"{path} in {type(model).__name__} is {type(layers).__name__}, not a ModuleList")
    return path, layers


def vision_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The dotted path and the `ModuleList` of the vision tower's layers; `None` for a text-only model."""
    path = arch_spec(model).vision_layers
    if path is None:
        return None
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        backbone = getattr(getattr(layers, "config", None), "model_type", None)
        if backbone not in VISION_BACKBONES:
            raise ModelLoadError(
                f"the vision tower {path} of {type(model).__name__} is a {backbone!r} backbone, which is not in "
                "hydra_rank.models.arch.VISION_BACKBONES; add the path of its layer list there"
            )
        path = f"{path}.{VISION_BACKBONES[backbone]}"
        layers = model.get_submodule(path)
    return path, layers


def processor_spec(processor: Any) -> ArchSpec | None:
    """The entry of the family whose processor class this is (by transformers' model type -> processor table), or
    `None` for a bare tokenizer or a processor of no registered family (the encoder then uses its defaults)."""
    name = type(processor).__name__
    for model_type, spec in ARCHITECTURES.items():
        if PROCESSOR_MAPPING_NAMES.get(model_type) == name:
            return spec
    return None


def _layer_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, linear) pairs inside one decoder layer. A PEFT-wrapped linear counts once, under its own name, by its
    `base_layer` (its inner `lora_A`/`lora_B` linears are adapter parts, not targets)."""
    found: list[tuple[str, nn.Linear]] = []
    wrapped: list[str] = []
    for name, module in layer.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear):
            wrapped.append(name)
            found.append((name, base))
        elif isinstance(module, nn.Linear):
            found.append((name, module))
    return found


def tower_linears(model: nn.Module, tower: str) -> list[tuple[str, int, nn.Linear]]:
    """(full name, layer index, linear) of every linear of the vision tower's layers or of the projector (one
    "layer"), for LoRA targets outside the language model."""
    spec = arch_spec(model)
    if tower == "vision":
        found = vision_layers(model)
        groups = [] if found is None else [(f"{found[0]}.{index}", layer) for index, layer in enumerate(found[1])]
    else:
        groups = [] if spec.projector is None else [(spec.projector, model.get_submodule(spec.projector))]
    linears = [
        (f"{path}.{name}", index, linear)
        for index, (path, module) in enumerate(groups)
        for name, linear in _layer_linears(module)
    ]
    if not linears:
        raise ConfigError(
            f"adapter.towers includes {tower!r}, but {type(model).__name__} has no linear layers there (a text-only "
            f"model has no vision tower or projector); remove {tower!r} from adapter.towers"
        )
    return linears


def linear_targets(model: nn.Module, module_names: list[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """(full name, linear) of every linear inside every decoder layer, in layer order.

    `module_names` restricts them to those whose last name component is listed (e.g. `["q_proj", "v_proj"]`);
    `None` keeps every linear.
    """
    path, layers = decoder_layers(model)
    linears = [
        (f"{path}.{index}.{name}", linear)
        for index, layer in enumerate(layers)
        for name, linear in _layer_linears(layer)
    ]
    if module_names is None:
        return linears
    available = {name.rsplit(".", 1)[-1] for name, _ in linears}
    missing = sorted(set(module_names) - available)
    if missing:
        raise ConfigError(
            f"adapter.target_modules: {missing} are not linears of the decoder layers; choose from {sorted(available)}"
        )
    return [(name, linear) for name, linear in linears if name.rsplit(".", 1)[-1] in module_names]
