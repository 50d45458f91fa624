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


def linear_targets(model: nn.Module, module_names: list[str] | None = None) -> list[str]:
    """Full names of the `nn.Linear` modules inside every decoder layer, in layer order.

    `module_names` restricts them to those whose last name component is listed (e.g. `["q_proj", "v_proj"]`);
    `None` keeps every linear.
    """
    path, layers = decoder_layers(model)
    linears = [
        (f"{path}.{index}.{name}", name.rsplit(".", 1)[-1])
        for index, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    ]
    if module_names is None:
        return [full for full, _ in linears]
    available = {short for _, short in linears}
    missing = sorted(set(module_names) - available)
    if missing:
        raise ConfigError(
            f"adapter.target_modules: {missing} are not linears of the decoder layers; choose from {sorted(available)}"
        )
    return [full for full, short in linears if short in module_names]
