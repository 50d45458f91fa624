"""From a configuration to the budget and the allocation a LoRA method starts with (`methods.Start`): uniform
rank r0, a saved allocation, calibration + the allocation solver, or one of the benchmark controls."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..data.encode import collate
from ..errors import ConfigError
from ..loss import answer_loss
from ..methods import Method, Start
from .allocate import allocate
from .budget import Allocation, Budget, Target, uniform_budget
from .signals import SKETCH_OVERSAMPLING, ModuleSpectrum, gradient_spectra

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import AdapterConfig, RunConfig
    from ..data.encode import ChatEncoder
    from ..data.sample import Sample
    from ..loss import LossFn
    from .probe import ProbeSource

    Batch = dict[str, torch.Tensor]
    BatchMaker = Callable[[list[int]], Batch]  # training samples by index -> one batch on the run's device

ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def shuffled(allocation: Allocation, targets: list[Target], seed: int) -> Allocation:
    """Control: the same ranks, permuted among modules of equal cost (so the budget is exactly the same). If this
    does as well as the allocation itself, what helped was unevenness, not where the rank went."""
    ranks = dict(allocation.ranks)
    rng = random.Random(seed)
    for cost in sorted({t.cost for t in targets}):
        names = [t.name for t in targets if t.cost == cost]
        values = [ranks[name] for name in names]
        rng.shuffle(values)
        ranks.update(zip(names, values, strict=True))
    return Allocation(ranks, allocation.budget, {**allocation.info, "control": "shuffled among equal-cost modules"})


def type_prior(targets: list[Target], budget: Budget) -> Allocation:
    """Control: a fixed prior with no measurement, attention low and MLP high (MLP modules value a unit of rank per
    parameter twice as much), allocated under the same budget and bounds."""
    utilities = {
        t.name: (1.0 if t.kind in ATTENTION_KINDS else 2.0) * t.cost * np.sqrt(np.arange(budget.max_rank + 1))
        for t in targets
    }
    allocation = allocate(targets, utilities, budget, "hierarchical")
    allocation.info["control"] = "type prior: attention low, MLP high"
    return allocation


def make_budget(config: AdapterConfig, targets: list[Target], method: Method | None = None) -> Budget:
    """The budget of `method` (default: the configured one): uniform LoRA's size at r0 (or `budget_params`), with
    the configured bounds, the upper one never above the widest module's width (no module could use more); a method
    that does not allocate ranks is pinned to rank r0."""
    widest = max(targets, key=lambda t: t.width)
    if config.rank > widest.width:
        raise ConfigError(
            f"adapter.rank {config.rank} is above the width of every target module (the widest, {widest.name}, has "
            f"min(d_in, d_out) = {widest.width}, and a LoRA rank above it adds nothing); lower adapter.rank"
        )
    if not (method or config.spec).allocates:
        return Budget(uniform_budget(targets, config.rank), config.rank, config.rank)
    total = config.budget_params if config.budget_params is not None else uniform_budget(targets, config.rank)
    upper = max(config.min_rank, min(config.upper_rank, widest.width))
    return Budget(total, config.min_rank, upper, config.rank_granularity)


def calibrated_allocation(
    model: nn.Module,
    targets: list[Target],
    budget: Budget,
    mode: str,
    batches: list[dict[str, torch.Tensor]],
    seed: int = 0,
    show_progress: bool = True,
    loss_fn: LossFn = answer_loss,
    spectrum: str = "stacked",
) -> tuple[Allocation, dict[str, ModuleSpectrum]]:
    """Gradient spectra (`spectrum`: stacked or coherent) of `loss_fn` on `batches`, then the allocation that
    maximises the captured energy under `budget`."""
    budget.check_feasible(targets)
    spectra, seconds = gradient_spectra(
        model, targets, batches, budget.max_rank + SKETCH_OVERSAMPLING, seed, show_progress, loss_fn, spectrum
    )
    utilities = {name: spectrum.utility(budget.max_rank) for name, spectrum in spectra.items()}
    allocation = allocate(targets, utilities, budget, mode)
    allocation.info["calibration_seconds"] = round(seconds, 2)
    allocation.info["calibration_batches"] = len(batches)
    allocation.info["signal"] = f"{spectrum} calibration-gradient spectrum (output side)"
    return allocation, spectra


def calibration_batch_count(config: RunConfig) -> int:
    """How many calibration batches the run's start needs (0: it does not calibrate)."""
    adapter = config.adapter
    return adapter.calibration_batches if adapter.spec.calibrates(config.schedule.init, adapter.allocation_path) else 0


def initial_allocation(
    config: RunConfig,
    model: nn.Module,
    targets: list[Target],
    budget: Budget,
    batches: list[dict[str, torch.Tensor]],
    show_progress: bool = True,
) -> tuple[Allocation, dict[str, ModuleSpectrum] | None]:
    """The allocation a LoRA method starts from, and the calibration spectra when it has them."""
    adapter, start = config.adapter, config.adapter.spec.start
    if start in (Start.UNIFORM, Start.EVA):  # EVA redistributes the uniform ranks itself (`adapter.py`)
        return Allocation.uniform(targets, adapter.rank), None
    budget.check_feasible(targets)
    if adapter.allocation_path:
        return saved_allocation(adapter.allocation_path, targets, budget), None
    if start is Start.PRIOR:
        return type_prior(targets, budget), None
    if not calibration_batch_count(config):  # a uniform warm-up: the first decision allocates
        rank = max(budget.min_rank, min(adapter.rank, budget.total // sum(t.cost for t in targets)))
        return Allocation({t.name: rank for t in targets}, budget.total, {"method": "uniform warm-up"}), None
    allocation, spectra = calibrated_allocation(
        model, targets, budget, adapter.spec.mode, batches, config.train.seed, show_progress, spectrum=adapter.spectrum
    )
    allocation.info["method"] = adapter.method
    if start is Start.SHUFFLED:
        allocation = shuffled(allocation, targets, config.train.seed)
    return allocation, spectra


def saved_allocation(path: str, targets: list[Target], budget: Budget) -> Allocation:
    """An allocation.json (from `hydra-rank allocate`), checked against this run's targets and budget."""
    allocation = Allocation.load(path)
    try:
        allocation.check(targets, budget)
    except ValueError as error:
        raise ConfigError(f"adapter.allocation_path {path} does not fit this run: {error}") from None
    return allocation


def sample_batches(samples: list[Sample], encoder: ChatEncoder, device: torch.device) -> BatchMaker:
    """The built-in loop's batch maker: training samples by index, encoded and collated on `device`."""

    def make(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([encoder.encode(samples[i]) for i in indices], encoder.pad_token_id)
        return {key: value.to(device) for key, value in batch.items()}

    return make


def calibration_batches(make: BatchMaker, size: int, batch_size: int, count: int, seed: int) -> list[Batch]:
    """`count` batches of a `size`-sample training set drawn with their own seed, for the gradient statistics behind
    the allocation."""
    return [make(indices) for indices in calibration_indices(size, batch_size, count, seed)]


def probe_source(make: BatchMaker, size: int, batch_size: int, seed: int) -> ProbeSource:
    """The probe batches of `schedule.attribution` probe: at each decision `batch_size` training samples drawn
    afresh, seeded by the run's seed and the step (a resumed run draws the same ones), independent of the training
    order. An interval of a few steps trains on a small share of a dataset, so the probe is, all but a few samples,
    data the interval did not train on."""
    return lambda step: make(calibration_indices(size, batch_size, 1, seed * 100_003 + step)[0])


def calibration_indices(size: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """Which samples form the calibration batches: a seeded draw independent of the training order, shared by the
    built-in loop and the Trainer integration so both start from the same allocation."""
    chosen = random.Random(seed + 1).sample(range(size), min(size, batch_size * count))
    return [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
