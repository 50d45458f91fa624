"""From a configuration to the allocation a run starts with: uniform LoRA, a saved allocation, or calibration +
hierarchical allocation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import AdapterConfig, RunConfig
from ..data import ChatEncoder, Sample, collate, load_samples
from ..errors import ConfigError
from ..utils import atomic_write_text
from .allocate import allocate
from .budget import Allocation, Budget, Target, discover_targets, uniform_budget
from .signals import SKETCH_OVERSAMPLING, ModuleSpectrum, gradient_spectra

MODES = {
    "hydra": "hierarchical",
    "hydra-static": "hierarchical",
    "hydra-coarse": "coarse",
    "hydra-fine": "fine",
    "control-shuffled": "hierarchical",
}
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


def make_budget(config: AdapterConfig, targets: list[Target]) -> Budget:
    """The run's budget: uniform LoRA's size at r0 (or `budget_params`), with the configured bounds; uniform LoRA
    itself only ever has rank r0."""
    if config.method == "lora":
        return Budget(uniform_budget(targets, config.rank), config.rank, config.rank)
    total = config.budget_params if config.budget_params is not None else uniform_budget(targets, config.rank)
    return Budget(total, config.min_rank, config.upper_rank, config.rank_granularity)


def calibrated_allocation(
    model: nn.Module,
    targets: list[Target],
    budget: Budget,
    mode: str,
    batches: list[dict[str, torch.Tensor]],
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[Allocation, dict[str, ModuleSpectrum]]:
    """Gradient spectra on `batches`, then the allocation that maximises the captured energy under `budget`."""
    budget.check_feasible(targets)
    spectra, seconds = gradient_spectra(
        model, targets, batches, budget.max_rank + SKETCH_OVERSAMPLING, seed=seed, show_progress=show_progress
    )
    utilities = {name: spectrum.utility(budget.max_rank) for name, spectrum in spectra.items()}
    allocation = allocate(targets, utilities, budget, mode)
    allocation.info["calibration_seconds"] = round(seconds, 2)
    allocation.info["calibration_batches"] = len(batches)
    allocation.info["signal"] = "stacked calibration-gradient spectrum (output side)"
    return allocation, spectra


def needs_calibration(config: RunConfig) -> bool:
    adapter = config.adapter
    if adapter.method in ("lora", "adalora", "full", "control-prior") or adapter.allocation_path:
        return False
    return adapter.method != "hydra" or config.schedule.init == "calibrated"


def initial_allocation(
    config: RunConfig,
    model: nn.Module,
    targets: list[Target],
    batches: list[dict[str, torch.Tensor]],
    show_progress: bool = True,
) -> tuple[Allocation, Budget, dict[str, ModuleSpectrum] | None]:
    """The allocation a run starts from, the budget it lives in, and the calibration spectra when it has them."""
    adapter = config.adapter
    if adapter.method == "lora":
        return Allocation.uniform(targets, adapter.rank), make_budget(adapter, targets), None
    budget = make_budget(adapter, targets)
    budget.check_feasible(targets)
    if adapter.allocation_path:
        allocation = Allocation.load(adapter.allocation_path)
        try:
            allocation.check(targets, budget)
        except ValueError as error:
            raise ConfigError(
                f"adapter.allocation_path {adapter.allocation_path} does not fit this run: {error}"
            ) from None
        return allocation, budget, None
    if adapter.method == "control-prior":
        return type_prior(targets, budget), budget, None
    if not needs_calibration(config):  # hydra with a uniform warm-up: the first decision allocates
        rank = max(budget.min_rank, min(adapter.rank, budget.total // sum(t.cost for t in targets)))
        return Allocation({t.name: rank for t in targets}, budget.total, {"method": "uniform warm-up"}), budget, None
    allocation, spectra = calibrated_allocation(
        model, targets, budget, MODES[adapter.method], batches, config.train.seed, show_progress
    )
    allocation.info["method"] = adapter.method
    if adapter.method == "control-shuffled":
        allocation = shuffled(allocation, targets, config.train.seed)
    return allocation, budget, spectra


def calibration_batches(
    samples: list[Sample], encoder: ChatEncoder, batch_size: int, count: int, seed: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """`count` training batches drawn with their own seed, for the gradient statistics behind the allocation."""
    batches = []
    for indices in calibration_indices(len(samples), batch_size, count, seed):
        batch = collate([encoder.encode(samples[i]) for i in indices], encoder.pad_token_id)
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def calibration_indices(size: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """Which samples form the calibration batches: a seeded draw independent of the training order, shared by the
    built-in loop and the Trainer integration so both start from the same allocation."""
    chosen = random.Random(seed + 1).sample(range(size), min(size, batch_size * count))
    return [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]


def save_allocation(
    allocation: Allocation, targets: list[Target], directory: Path, title: str, name: str = "allocation"
) -> None:
    """`NAME.json` and its layer x module heatmap `NAME.png`."""
    from ..report import plot_allocation

    atomic_write_text(directory / f"{name}.json", allocation.to_json())
    plot_allocation(allocation.ranks, targets, directory / f"{name}.png", title)


def allocate_for_config(config: RunConfig, output_dir: Path, show_progress: bool = True) -> tuple[Allocation, list]:
    """What `hydra-rank allocate` does: calibrate on the configured model and data, allocate, save. A `lora` config
    gets the full hierarchical allocation at its budget."""
    from ..models.loading import load_model

    method = config.adapter.method if config.adapter.method in MODES else "hydra"
    model, processor = load_model(config.model.name_or_path, config.model.dtype, config.model.trust_remote_code)
    encoder = ChatEncoder(processor, config.data.system_prompt, config.data.max_length)
    train_samples, _ = load_samples(config.data, config.train.seed)
    targets = discover_targets(model, config.adapter.target_modules, config.adapter.towers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = calibration_batches(
        train_samples, encoder, config.train.batch_size, config.adapter.calibration_batches, config.train.seed, device
    )
    allocation, _ = calibrated_allocation(
        model.to(device),
        targets,
        make_budget(config.adapter, targets),
        MODES[method],
        batches,
        config.train.seed,
        show_progress,
    )
    allocation.info["method"] = method
    save_allocation(allocation, targets, output_dir, f"{method} ranks (budget {allocation.budget:,} params)")
    return allocation, targets
