"""The `eval` and `allocate` commands: a few lines each on top of `load_inputs` (the larger commands have modules of
their own: `train.py`, `validate.py`, `export.py`, `bench.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .evaluate import evaluate_configured
from .inputs import load_inputs
from .methods import DEFAULT_METHOD, METHODS
from .models.loading import load_adapter
from .rank.plan import calibrated_allocation, calibration_batches, make_budget, sample_batches
from .report import save_allocation

if TYPE_CHECKING:
    from .config import RunConfig
    from .rank.budget import Allocation, Target


def evaluate_saved(config: RunConfig, adapter: Path | None = None, show_progress: bool = True) -> dict:
    """Evaluate the configured model, with a saved PEFT adapter loaded on top when `adapter` is given."""
    inputs = load_inputs(config)
    model = inputs.model
    if adapter is not None:
        model = load_adapter(model, adapter)
    results = evaluate_configured(
        model, inputs.encoder, config, inputs.train_samples, inputs.eval_samples, show_progress
    )
    results.pop("predictions")
    adapter_name = str(adapter) if adapter else None
    return {"model": config.model.name_or_path, "adapter": adapter_name, **results, "provenance": inputs.provenance()}


def allocate_for_config(
    config: RunConfig, output_dir: Path, show_progress: bool = True
) -> tuple[Allocation, list[Target]]:
    """Calibrate on the configured model and data, allocate, save `allocation.json` and its heatmap. A method that
    does not calibrate (uniform LoRA, the prior control, AdaLoRA, full) gets HyDRA's allocation at its budget."""
    spec = config.adapter.spec
    method = spec if spec.calibrates(config.schedule.init, None) or spec.dynamic else METHODS[DEFAULT_METHOD]
    inputs = load_inputs(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, targets = config.train, inputs.targets
    count = config.adapter.calibration_batches
    make = sample_batches(inputs.train_samples, inputs.encoder, device)
    batches = calibration_batches(make, len(inputs.train_samples), t.batch_size, count, t.seed)
    budget = make_budget(config.adapter, targets, method)
    model = inputs.model.to(device)
    allocation, _ = calibrated_allocation(
        model, targets, budget, method.mode, batches, t.seed, show_progress, spectrum=config.adapter.spectrum
    )
    allocation.info["method"] = method.name
    save_allocation(allocation, targets, output_dir, f"{method.name} ranks (budget {allocation.budget:,} params)")
    return allocation, targets
