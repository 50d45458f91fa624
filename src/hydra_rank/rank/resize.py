"""Change a LoRA module's rank in place, keeping its update ΔW = s·B·A.

Re-factoring: thin QR of B (d_out x r) and of Aᵀ (d_in x r) reduces B·A to an r x r core whose SVD gives
B·A = L·diag(σ)·Rᵀ with orthonormal L (d_out x r) and R (d_in x r). The new factors are

    A' = c·R[:, :k]ᵀ            (rows orthonormal, rescaled to the old rows' RMS norm c)
    B' = L[:, :k]·diag(σ[:k])/c

- shrinking (k < r) keeps the top k directions; the Frobenius error² of ΔW is exactly s²·Σ_{i>k} σ_i²;
- growing (k > r) keeps ΔW exactly and appends new A rows orthogonal to the existing ones (the top gradient input
  directions not yet covered, when given, else random) with zero B columns, so the output is unchanged and the new
  directions start learning from the next step.

A' keeps the old row scale so that the gradient reaching B keeps its magnitude. The scale s = alpha/r0 is the same
for every module (see `adapter.py`), so a resize changes `r` and `lora_alpha = s·r` but never `scaling`.

Optimizer state: the resized A and B are new parameters, and their Adam moments are reset rather than rotated. Adam's
second moment is per coordinate; after the change of basis above there is no exact way to carry it over, and an
approximate rotation would hand the new directions moments they never had. Instead the loop gives new parameters a
short learning-rate warm-up (`schedule.resize_warmup_steps`), so their first, moment-free Adam steps stay small.
Modules whose rank does not change keep their parameters and optimizer state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..adapter import pattern_key
from .budget import Allocation

ADAPTER = "default"


@dataclass(frozen=True)
class ResizeResult:
    name: str
    old_rank: int
    new_rank: int
    dropped_energy: float  # ‖ΔW_old − ΔW_new‖²_F (0 when growing)


def factorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B·A = left·diag(sigma)·rightᵀ with orthonormal columns in `left` (d_out x r) and `right` (d_in x r)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, sigma, q_a @ vh.T


def _new_directions(
    right: torch.Tensor, count: int, candidates: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """`count` orthonormal d_in-vectors orthogonal to `right`'s columns: the given candidates first (in order),
    then random ones."""
    d_in = right.shape[0]
    if right.shape[1] + count > d_in:
        raise ValueError(f"cannot grow to rank {right.shape[1] + count}: the input dimension is only {d_in}")
    chosen = right
    picked = []
    pool = [] if candidates is None else [candidates[:, i] for i in range(candidates.shape[1])]
    while len(picked) < count:
        vector = pool.pop(0) if pool else torch.randn(d_in, generator=generator, dtype=right.dtype)
        vector = vector.to(right)
        for _ in range(2):  # twice: classical Gram-Schmidt is only stable when repeated
            vector = vector - chosen @ (chosen.T @ vector)
        norm = vector.norm()
        if norm > 1e-6 * max(1.0, float(vector.abs().max())):
            vector = vector / norm
            chosen = torch.cat([chosen, vector[:, None]], dim=1)
            picked.append(vector)
    return torch.stack(picked, dim=1)


@torch.no_grad()
def resize_layer(
    layer: LoraLayer,
    name: str,
    new_rank: int,
    directions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ResizeResult:
    """Give one LoRA layer rank `new_rank` (new lora_A/lora_B modules of exactly that size)."""
    lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    old_rank = layer.r[ADAPTER]
    if new_rank < 1:
        raise ValueError(f"cannot resize {name} to rank {new_rank}")
    weight_a, weight_b = lora_a.weight, lora_b.weight
    a, b = weight_a.double(), weight_b.double()
    left, sigma, right = factorize(b, a)
    scale = float(a.norm() / old_rank**0.5) or (1.0 / (3 * a.shape[1])) ** 0.5
    keep = min(old_rank, new_rank)
    new_a = scale * right[:, :keep].T
    new_b = left[:, :keep] * sigma[:keep] / scale
    if new_rank > old_rank:
        generator = generator or torch.Generator().manual_seed(0)
        extra = _new_directions(
            right, new_rank - old_rank, None if directions is None else directions.double(), generator
        )
        new_a = torch.cat([new_a, scale * extra.T])
        new_b = torch.cat([new_b, torch.zeros(b.shape[0], new_rank - old_rank, dtype=b.dtype)], dim=1)
    dropped = float(layer.scaling[ADAPTER] ** 2 * sigma[keep:].square().sum())

    layer.lora_A[ADAPTER] = _linear(new_a, weight_a)
    layer.lora_B[ADAPTER] = _linear(new_b, weight_b)
    scaling = layer.scaling[ADAPTER]
    layer.r[ADAPTER] = new_rank
    layer.lora_alpha[ADAPTER] = scaling * new_rank
    return ResizeResult(name, old_rank, new_rank, dropped)


def _linear(weight: torch.Tensor, like: nn.Parameter) -> nn.Linear:
    """A bias-free linear holding `weight` with the dtype, device and trainability of `like`."""
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=like.device, dtype=like.dtype)
    module.weight.data.copy_(weight.to(like.dtype))
    module.weight.requires_grad_(like.requires_grad)
    return module


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by full module name (as in `Target.name`)."""
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def apply_allocation(
    model: PeftModel,
    allocation: Allocation,
    directions: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[ResizeResult]:
    """Resize every LoRA layer whose rank differs from `allocation`, and record the ranks in the PEFT config so the
    saved adapter reloads with exactly these shapes."""
    layers = lora_layers(model)
    results = []
    for name, rank in allocation.ranks.items():
        if layers[name].r[ADAPTER] != rank:
            results.append(resize_layer(layers[name], name, rank, (directions or {}).get(name), generator))
    config = model.peft_config[ADAPTER]
    scale = config.lora_alpha / config.r
    config.rank_pattern = {pattern_key(name): rank for name, rank in allocation.ranks.items()}
    config.alpha_pattern = {pattern_key(name): scale * rank for name, rank in allocation.ranks.items()}
    return results
