"""From a configuration to the allocation a run starts with: uniform LoRA, a saved allocation, or calibration +
hierarchical allocation."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from .allocate import allocate
from .budget import Allocation, Budget, Target, uniform_budget
from .signals import gradient_spectra

MODES = {"hydra-static": "hierarchical", "hydra-coarse": "coarse", "hydra-fine": "fine"}
SKETCH_OVERSAMPLING = 8  # extra sketch columns beyond max_rank: keeps the top max_rank singular values accurate


def make_budget(config: AdapterConfig, targets: list[Target]) -> Budget:
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
) -> Allocation:
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
    return allocation


def initial_allocation(
    config: AdapterConfig,
    model: nn.Module,
    targets: list[Target],
    batches: list[dict[str, torch.Tensor]],
    seed: int = 0,
    show_progress: bool = True,
) -> Allocation:
    """The allocation a run of `config.method` starts from."""
    if config.method == "lora":
        return Allocation.uniform(targets, config.rank)
    budget = make_budget(config, targets)
    if config.allocation_path:
        allocation = Allocation.load(config.allocation_path)
        try:
            allocation.check(targets, budget)
        except ValueError as error:
            raise ConfigError(
                f"adapter.allocation_path {config.allocation_path} does not fit this run: {error}"
            ) from None
        return allocation
    allocation = calibrated_allocation(model, targets, budget, MODES[config.method], batches, seed, show_progress)
    allocation.info["method"] = config.method
    return allocation
