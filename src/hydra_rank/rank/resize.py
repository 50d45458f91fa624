"""Change a LoRA module's rank in place, keeping its update ΔW = s·B·A.

- Shrinking (k < r) re-factors: thin QR of B (d_out x r) and of Aᵀ (d_in x r) reduce B·A to an r x r core whose
  SVD gives B·A = L·diag(σ)·Rᵀ (orthonormal L, R), and A' = c·R[:, :k]ᵀ, B' = L[:, :k]·diag(σ[:k])/c keep the top k
  directions (c: the old rows' RMS norm, so the gradient reaching B keeps its magnitude). The Frobenius error² of ΔW
  is exactly s²·Σ_{i>k} σ_i².
- Growing (k > r) keeps A and B exactly and appends random A rows orthogonal to the existing ones (RMS norm c) with
  zero B columns: ΔW and the layer's output are unchanged, and the new directions start learning from the next step,
  as a fresh LoRA direction does. Random, not the strongest gradient directions the module does not cover yet (the
  choice before the tenth session): a row along such a direction hands its zero B column a large gradient that keeps
  its sign from step to step, Adam turns that into full-size steps in one direction, and the new direction changes
  the model faster than the run can absorb (text task, rank-2 budget, validation, seeds 0-2: 0.2074 / 0.2490 / 0.2026
  eval loss with random rows, 0.2739 / 0.3092 / 0.3341 with gradient rows; BENCHMARKS.md).
- Rank 0 is a module without adapter parameters (empty A and B: its update is zero); it keeps its LoRA wrapper during
  training so that its gradient is still sketched and it can grow again. `strip_empty` removes such wrappers before
  the adapter is saved, so the saved adapter is stock PEFT (which has no rank 0).

Under the fixed scale convention (`lora.py`) s = alpha/r0 at every rank, so a resize changes `r` and
`lora_alpha = s·r` but never `scaling`. Under the sqrt convention (rsLoRA) s changes with the rank; B is multiplied by
s_old/s_new so that ΔW is still exactly kept.

Optimizer state, handled explicitly:
- grown factors keep their Adam state: the old entries' moments are carried over (they are the same coordinates;
  when B is rescaled by c, its gradient is scaled by 1/c, and so are its moments: m/c, v/c²), the appended entries
  start with a zero first moment and the tensor's mean second moment;
- re-factored (shrunk) factors get fresh state: the change of basis mixes coordinates, and Adam's per-coordinate
  second moment has no exact image under it (a rotated first moment with a guessed second moment would hand the
  new coordinates a history they never had). The loop gives them a short learning-rate warm-up
  (`schedule.resize_warmup_steps`) so their first, moment-free Adam steps stay small.
Modules whose rank does not change keep their parameters and optimizer state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..utils import unwrap_optimizer
from .lora import ADAPTER, lora_layers, lora_patterns, module_scale, set_rank

if TYPE_CHECKING:
    from .budget import Allocation


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


def _new_directions(right: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random orthonormal d_in-vectors orthogonal to `right`'s columns."""
    d_in = right.shape[0]
    if right.shape[1] + count > d_in:
        raise ValueError(f"cannot grow to rank {right.shape[1] + count}: the input dimension is only {d_in}")
    chosen = right
    picked = []
    while len(picked) < count:
        vector = torch.randn(d_in, generator=generator, dtype=right.dtype).to(right)
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
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> ResizeResult:
    """Give one LoRA layer rank `new_rank` (new lora_A/lora_B modules of exactly that size).

    With `optimizer`, a grown layer's Adam state moves to its new parameters (see `carry_state`); a shrunk layer's
    old parameters leave the optimizer, and the loop's re-bind adds the new ones with fresh state and a warm-up.
    """
    old_rank = layer.r[ADAPTER]
    if new_rank < 0:
        raise ValueError(f"cannot resize {name} to rank {new_rank}")
    old_scale, new_scale = layer.scaling[ADAPTER], module_scale(layer, new_rank)
    rescale = old_scale / new_scale  # B's factor that keeps ΔW = s·B·A when the scale changes
    weight_a, weight_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    a, b = weight_a.double(), weight_b.double()
    # the RMS row norm new A rows get; a module grown from rank 0 has none, so it gets PEFT's initial one
    row_norm = (float(a.norm() / old_rank**0.5) if old_rank else 0.0) or (1.0 / (3 * a.shape[1])) ** 0.5
    if new_rank > old_rank:  # grow: keep A and B exactly, append orthogonal A rows and zero B columns
        row_space, _ = torch.linalg.qr(a.T)
        generator = generator or torch.Generator().manual_seed(0)
        extra = _new_directions(row_space, new_rank - old_rank, generator)
        new_a = torch.cat([a, row_norm * extra.T])
        new_b = torch.cat([b * rescale, torch.zeros(b.shape[0], new_rank - old_rank, dtype=b.dtype)], dim=1)
        dropped = 0.0
    else:  # shrink: re-factor and keep the top singular directions
        left, sigma, right = factorize(b, a)
        new_a = row_norm * right[:, :new_rank].T
        new_b = left[:, :new_rank] * sigma[:new_rank] * (rescale / row_norm)
        dropped = float(old_scale**2 * sigma[new_rank:].square().sum())

    layer.lora_A[ADAPTER] = _linear(new_a, weight_a)
    layer.lora_B[ADAPTER] = _linear(new_b, weight_b)
    if optimizer is not None:
        grown = new_rank > old_rank > 0  # from rank 0 there is no state to carry: fresh moments and the LR ramp
        carry_state(optimizer, weight_a, layer.lora_A[ADAPTER].weight, axis=0 if grown else None)
        carry_state(optimizer, weight_b, layer.lora_B[ADAPTER].weight, axis=1 if grown else None, factor=1 / rescale)
    set_rank(layer, new_rank)
    return ResizeResult(name, old_rank, new_rank, dropped)


def carry_state(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, axis: int | None, factor: float = 1.0
) -> None:
    """Hand `old`'s place in the optimizer to `new`.

    `axis` given (a grown factor: `new` is `old` with entries appended along `axis`): `new` takes `old`'s slot in
    its param group and its state, with the old entries' Adam moments kept (times `factor`, the ratio of new to old
    gradients when the factor was rescaled; squared for second moments); appended entries get a zero first
    moment and the tensor's mean second moment, so their first steps are ordinary-sized (neither the 3x jump of
    an unbiased fresh moment nor a frozen one). `axis` None (a re-factored factor): `old` simply leaves the optimizer.
    """
    base = unwrap_optimizer(optimizer)
    state = base.state.pop(old, None)
    for group in base.param_groups:
        for index, parameter in enumerate(group["params"]):
            if parameter is old:
                if axis is None:
                    del group["params"][index]
                else:
                    group["params"][index] = new
                break
    if axis is None or not state:
        return
    block = tuple(slice(0, size) for size in old.shape)
    carried = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            second = key.endswith("exp_avg_sq")
            value = value * (factor**2 if second else factor)
            grown = torch.full_like(new, float(value.mean()) if second else 0.0)
            grown[block] = value
            carried[key] = grown
        else:
            carried[key] = value
    base.state[new] = carried


def _linear(weight: torch.Tensor, like: nn.Parameter) -> nn.Linear:
    """A bias-free linear holding a copy of `weight` with the dtype, device and trainability of `like`. Built on the
    meta device and given its weight afterwards: nothing is initialised only to be overwritten, and an empty weight
    (rank 0) needs no special case."""
    module = nn.Linear(1, 1, bias=False, device="meta")
    module.out_features, module.in_features = weight.shape
    copy = weight.to(like.device, like.dtype, copy=True, memory_format=torch.contiguous_format)  # as if loaded
    module.weight = nn.Parameter(copy, requires_grad=like.requires_grad)
    return module


def apply_allocation(
    model: PeftModel,
    allocation: Allocation,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[ResizeResult]:
    """Resize every LoRA layer whose rank differs from `allocation`, and record the ranks in the PEFT config so the
    saved adapter reloads with exactly these shapes."""
    layers = lora_layers(model)
    results = []
    for name, rank in allocation.ranks.items():
        if layers[name].r[ADAPTER] != rank:
            results.append(resize_layer(layers[name], name, rank, generator, optimizer))
    config = model.peft_config[ADAPTER]
    config.rank_pattern, config.alpha_pattern = lora_patterns(
        allocation.ranks, config.lora_alpha, config.r, config.use_rslora
    )
    return results
