"""The trainable-parameter budget: a LoRA adapter of rank r on a d_in x d_out linear costs r * (d_in + d_out)."""

from __future__ import annotations

from torch import nn


def module_cost(model: nn.Module, name: str) -> int:
    """Parameters one unit of rank costs on the linear `name`: d_in + d_out."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return module.in_features + module.out_features


def uniform_budget(model: nn.Module, targets: list[str], rank: int) -> int:
    """Size of uniform LoRA at `rank` on `targets`: the budget every HyDRA allocation must fit in."""
    return rank * sum(module_cost(model, name) for name in targets)
