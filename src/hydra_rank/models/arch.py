"""Where the language model's decoder layers live, per architecture.

HyDRA adapts the linears of the language model's decoder layers. Finding them by module-name guesses is fragile:
transformers' DINOv2 also calls its attention linears `q_proj/k_proj/v_proj/o_proj`, so a plain `target_modules`
list would put adapters into the vision tower as well. Each architecture therefore names the path of its decoder
layer list here, and targets are the full, resolved module names below it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one model family: the dotted path (from the top-level model) of its decoder `ModuleList`."""

    decoder_layers: str


ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": ArchSpec(decoder_layers="model.language_model.layers"),
    "llama": ArchSpec(decoder_layers="model.layers"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"model type {model_type!r} is not in hydra_rank.models.arch.ARCHITECTURES (known: "
            f"{', '.join(sorted(ARCHITECTURES))}); add an ArchSpec naming the path of its decoder layer list"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `ModuleList` of the language model's decoder layers."""
    path = arch_spec(model).decoder_layers
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise ModelLoadError(f"{path} in {type(model).__name__} is {type(layers).__name__}, not a ModuleList")
    return path, layers


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
