"""Held-out measurements on a probe batch: what each module's last interval of training did to the loss on a batch
it did not train on (`IntervalProbe`, `schedule.attribution: probe`), what each singular direction of a module's
update is worth (`direction_values`, `schedule.curves: held_out`), and what its whole update is worth
(`update_inner`, `schedule.curves: worth`).

The optimizer-side attribution (`scheduler.py`) sums −⟨g_b, Δθ_b⟩ over the interval's steps, where g_b is the very
gradient the step Δθ_b was computed from: it is positive by construction and grows with the batch gradient's size,
noise included, so it credits modules whose gradients are large rather than modules whose updates generalise. A probe
batch the interval did not train on has no such bias. For module m the interval moved ΔW_m from its start to its end,
D_m = ΔW_m(end) − ΔW_m(start), and the probe loss changed by

    L(end) − L(start) ≈ ½ Σ_m ⟨G_m(start) + G_m(end), D_m⟩        (trapezoid rule; exact for a quadratic loss)

with G_m the probe gradient of module m's full weight at either end. The gain credited to m is −½⟨G_m(start) +
G_m(end), D_m⟩: one-sided at the end alone it would see the overshoot of the interval's last steps (the loss curving
up again along D_m) and charge it to every module. The estimate lives in ΔW space, so it does not care how the
adapter is factored, and the ranks are constant inside an interval (resizes happen at decisions only), so the start
factors fit the model as it is at the end.

Cost of a trapezoid: two forward/backward passes of the probe batch per decision, one at the end parameters and one
with the start factors swapped in (`update_inner`: one pass). No d_out x d_in matrix is formed: with inputs X
(tokens x d_in) and output gradients Δ, ⟨G, s·B·A⟩ = s·Σ_tokens (Δ B) ⊙ (X Aᵀ), computed in hooks from rank-sized
products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .lora import ADAPTER
from .resize import factorize

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

    from ..loss import LossFn
    from .budget import Target

# How a module's held-out worth at the end of a run grows with the rank it trained at: the slope of log worth on log
# rank among equal-cost modules whose ranks were assigned at random for the whole run (shuffled controls of the text
# r2, scenes r4 and easy-VQA r4 cells, three seeds each: 0.46 to 1.20, mean 0.76; BENCHMARKS.md, twenty-second and
# twenty-third sessions). Below 1, so the worth curves are concave, as the allocator needs.
RANK_ELASTICITY = 0.75

Factors = tuple[torch.Tensor, torch.Tensor, float]  # A (r x d_in), B (d_out x r), scale
ProbeSource = Callable[[int], dict[str, torch.Tensor]]  # the probe batch of the decision at a step


def factors(layer: LoraLayer) -> Factors:
    """A copy of `layer`'s adapter factors and scale (empty factors at rank 0)."""
    if layer.r[ADAPTER] == 0:
        empty = torch.zeros(0)
        return empty, empty, 0.0
    return (
        layer.lora_A[ADAPTER].weight.detach().clone(),
        layer.lora_B[ADAPTER].weight.detach().clone(),
        float(layer.scaling[ADAPTER]),
    )


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 activations would round the products away)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@contextlib.contextmanager
def swapped(layers: list[LoraLayer], chosen: list[Factors]) -> Iterator[None]:
    """Inside the block every layer holds its `chosen` factors (same shapes as its own); afterwards its own again,
    whatever happened inside. Rank-0 layers have nothing to swap."""
    own = [factors(layer) for layer in layers]
    _load(layers, chosen)
    try:
        yield
    finally:
        _load(layers, own)


@torch.no_grad()
def _load(layers: list[LoraLayer], chosen: list[Factors]) -> None:
    for layer, (a, b, _) in zip(layers, chosen, strict=True):
        if a.numel():
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)


def _inner(x: torch.Tensor, delta: torch.Tensor, f: Factors) -> torch.Tensor:
    """⟨Δᵀ X, s·B·A⟩ for one module's inputs X and output gradients Δ (tokens flattened)."""
    a, b, scale = f
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return scale * ((delta @ b.to(delta)).double() * (x @ a.to(x).T).double()).sum()


class IntervalProbe:
    """Per-module held-out gains of one interval: `start()` at its beginning, `gains(...)` at its end."""

    def __init__(self, layers: dict[str, LoraLayer], names: list[str]) -> None:
        self.layers, self.names = layers, names
        self.start_factors: dict[str, Factors] = {}

    def start(self) -> None:
        """Remember every module's factors: the interval starts here."""
        self.start_factors = {name: factors(self.layers[name]) for name in self.names}

    def gains(self, model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> np.ndarray:
        """−½⟨G(start) + G(end), D⟩ per module, G from `batch` (in module order). The model ends as it was."""
        end = {name: factors(self.layers[name]) for name in self.names}
        at_end = self._inner_products(model, batch, loss_fn, end)
        layers = [self.layers[name] for name in self.names]
        with swapped(layers, [self.start_factors[name] for name in self.names]):
            at_start = self._inner_products(model, batch, loss_fn, end)
        return -0.5 * (at_start + at_end)

    def state_dict(self) -> dict[str, list]:
        """The interval's start factors, for an exact resume (tensors and floats only)."""
        return {name: [a, b, scale] for name, (a, b, scale) in self.start_factors.items()}

    def load_state_dict(self, state: dict[str, list]) -> None:
        self.start_factors = {name: (a, b, float(scale)) for name, (a, b, scale) in state.items()}

    def _inner_products(
        self, model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn, end: dict[str, Factors]
    ) -> np.ndarray:
        """⟨G_m, D_m⟩ for every module m, G_m the probe gradient at the model's current parameters."""

        def measure(index: int, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            name = self.names[index]
            return _inner(x, delta, end[name]) - _inner(x, delta, self.start_factors[name])

        return probe_pass(model, batch, loss_fn, [self.layers[n] for n in self.names], measure)[:, 0].numpy()


Measure = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer index, inputs X, output grads Δ)


def probe_pass(
    model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn, layers: list[LoraLayer], measure: Measure
) -> torch.Tensor:
    """One forward/backward of `batch` in eval mode; row i is `measure(i, X_i, Δ_i)` of layer i (a scalar or a
    vector, zero-padded to the widest), with its inputs X_i and output gradients Δ_i, tokens flattened. The
    parameters' `.grad` are left untouched."""
    results: dict[int, torch.Tensor] = {}
    handles = []

    def watch(index: int):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = _wide(args[0].detach().reshape(-1, args[0].shape[-1]))

            def backward_hook(grad: torch.Tensor) -> None:
                value = measure(index, x, _wide(grad.reshape(-1, grad.shape[-1]))).double().cpu().reshape(-1)
                results[index] = value if index not in results else results[index] + value

            if output.requires_grad:  # a rank-0 module's output is the frozen base's alone
                output.register_hook(backward_hook)

        return forward_hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(watch(index)))
    was_training = model.training
    model.eval()  # no dropout, and no recomputation under gradient checkpointing (hooks would fire twice)
    try:
        loss, _ = loss_fn(model, batch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss, trainable, allow_unused=True)  # runs every hook
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    width = max([1, *(len(v) for v in results.values())])
    table = torch.zeros(len(layers), width, dtype=torch.float64)
    for index, value in results.items():
        table[index, : len(value)] = value
    return table


def direction_values(
    model: nn.Module, layers: list[LoraLayer], batch: dict[str, torch.Tensor], loss_fn: LossFn
) -> list[np.ndarray]:
    """What each singular direction of every module's update is worth on `batch`, largest direction first: ΔW =
    s·Σ_i σ_i u_i v_iᵀ, and direction i is credited −½⟨G(0) + G(ΔW), s·σ_i u_i v_iᵀ⟩, the trapezoid from no update
    (every B zeroed) to the current one. A module's values sum to its share of the batch's loss decrease since
    training began; the last one is what its last unit of rank holds."""
    current = [factors(layer) for layer in layers]
    bases = [factorize(b, a) if a.numel() else None for a, b, _ in current]

    def measure(index: int, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if bases[index] is None:
            return torch.zeros(1)
        left, sigma, right = (t.to(x) for t in bases[index])
        return current[index][2] * sigma * ((delta @ left) * (x @ right)).sum(0)

    at_end = probe_pass(model, batch, loss_fn, layers, measure)
    with swapped(layers, [(a, torch.zeros_like(b), scale) for a, b, scale in current]):  # no update: every B zero
        at_zero = probe_pass(model, batch, loss_fn, layers, measure)
    values = (-0.5 * (at_end + at_zero)).numpy()
    return [values[i, : layer.r[ADAPTER]] for i, layer in enumerate(layers)]


def update_inner(
    model: nn.Module, layers: list[LoraLayer], batch: dict[str, torch.Tensor], loss_fn: LossFn, at: float
) -> np.ndarray:
    """⟨G_m, ΔW_m⟩ for every module m: its whole update against the probe gradient of its full weight, measured with
    every module's update scaled by `at` (0: the base model, 1: as trained). One probe pass; the model ends as it
    was. `schedule.curves: worth` scores −⟨G_m(0), ΔW_m⟩, what m's update takes off the base model's loss to first
    order; `benchmarks/worth_estimators.py` compares it with the trapezoid of `direction_values`."""
    current = [factors(layer) for layer in layers]
    with swapped(layers, [(a, at * b, scale) for a, b, scale in current]):
        inner = probe_pass(model, batch, loss_fn, layers, lambda index, x, delta: _inner(x, delta, current[index]))
    return inner[:, 0].numpy()


def value_curves(values: list[np.ndarray], max_rank: int) -> np.ndarray:
    """u[m, r] for r = 0..max_rank: the held-out value of module m's first r directions (largest first, each at least
    a tiny positive amount), and beyond its rank its last direction's value shrinking by the pooled ratio of
    consecutive directions' values (median over modules, in [0.05, 1]): non-decreasing in r."""
    ratios = [v[i + 1] / v[i] for v in values for i in range(len(v) - 1) if v[i] > 0 and v[i + 1] > 0]
    decay = float(np.clip(np.median(ratios), 0.05, 1.0)) if ratios else 0.5
    positive = [np.maximum(v, 0.0) for v in values]
    floor = 1e-6 * max([float(v.max()) for v in positive if len(v)] + [1e-12])
    curves = np.zeros((len(values), max_rank + 1))
    for m, v in enumerate(positive):
        kept = np.maximum(v[:max_rank], floor)
        last = kept[-1] if len(kept) else floor
        extra = last * decay ** np.arange(1, max_rank - len(kept) + 1)
        curves[m, 1:] = np.cumsum(np.concatenate([kept, extra]))
    return curves


def worth_curves(
    worth: np.ndarray, mean_ranks: np.ndarray, max_rank: int, pool: list[Target] | None = None
) -> np.ndarray:
    """u[m, r] = c_m · r^β for r = 0..max_rank, β = RANK_ELASTICITY: module m's held-out worth had it trained at rank
    r, scaled from W_m, what its update is worth now (`update_inner` at the base), and r̄_m, the rank it has held on
    average so far: c_m = W_m / r̄_m^β (a module whose update does not help counts as a tiny positive worth).

    Why not the direction values themselves (`value_curves`): truncating a trained update to its first r directions
    says what those directions hold, not what a module trained at rank r would have learnt; in randomised runs worth
    grows with rank about three times as steeply (elasticity 0.76 against 0.25 for a rank-2 adapter's truncation).
    Why the average rank: worth accrues over the run, and a change of rank pays off over the rest of the run, not in
    the next interval (randomised exchanges: no response within an interval), so a module grown at the last decision
    still holds what its earlier, smaller rank learnt.

    With `pool` (the modules' targets, `schedule.curves: pooled_worth`) each c_m is replaced by the fit of
    log c_m ≈ a_layer + b_kind (least squares over all modules): a layer's level and a kind's level, each an average
    over many modules. One module's worth on one probe batch is noisy, and the allocation magnifies that noise, since
    the best ranks go as c_m^(1/(1−β)), the fourth power; in the randomised runs the layer-plus-kind fit repeats
    across seeds far better than single modules do (correlation 0.73-0.98 against 0.48-0.89)."""
    floor = 1e-6 * max(float(worth.max(initial=0.0)), 1e-12)
    coefficients = np.maximum(worth, floor) / np.maximum(mean_ranks, 1.0) ** RANK_ELASTICITY
    if pool is not None:
        coefficients = _layer_plus_kind(coefficients, pool)
    return coefficients[:, None] * np.arange(max_rank + 1, dtype=np.float64) ** RANK_ELASTICITY


def _layer_plus_kind(coefficients: np.ndarray, targets: list[Target]) -> np.ndarray:
    """exp of the least-squares fit of log coefficients on a level per layer (per tower) plus one per module kind."""
    layers = [(t.tower, t.layer) for t in targets]
    kinds = [t.kind for t in targets]
    columns = [[key == own for own in layers] for key in sorted(set(layers))]
    columns += [[kind == own for own in kinds] for kind in sorted(set(kinds))[1:]]  # the first kind: the baseline
    design = np.array(columns, dtype=np.float64).T
    solution, *_ = np.linalg.lstsq(design, np.log(coefficients), rcond=None)
    return np.exp(design @ solution)
