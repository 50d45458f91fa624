"""`hydra-rank validate`: find every problem a long run would hit, before it starts.

Checks, in the order a run meets them: the configuration (done when it is loaded), the model (architecture in the
registry, target modules, chat template), the ranks against the modules' widths, the parameter budget against the
minimum ranks, a saved allocation (`adapter.allocation_path`) against the targets and budget, and every sample of both
datasets: readable images inside the image folder, placeholders matching images, and a token length within
`data.max_length`. The first problem raises its one clear `HydraError`; a clean config returns a summary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .inputs import load_inputs
from .rank.plan import make_budget, saved_allocation
from .utils import progress_bar

if TYPE_CHECKING:
    from .config import RunConfig


def validate_config(config: RunConfig, show_progress: bool = True) -> dict:
    inputs = load_inputs(config)
    targets = inputs.targets
    budget = make_budget(config.adapter, targets)
    budget.check_feasible(targets)
    if config.adapter.allocation_path:
        saved_allocation(config.adapter.allocation_path, targets, budget)
    train, held_out = inputs.train_samples, inputs.eval_samples
    longest = 0
    images = set()
    with progress_bar("validate samples", total=len(train) + len(held_out), enabled=show_progress) as advance:
        for sample in [*train, *held_out]:
            longest = max(longest, len(inputs.encoder.encode(sample).input_ids))
            images.update(sample.images)
            advance()
    return {
        "model": config.model.name_or_path,
        "architecture": inputs.model.config.model_type,
        "target_modules": len(targets),
        "budget_params": budget.total,
        "train_samples": len(train),
        "eval_samples": len(held_out),
        "images": len(images),
        "longest_sample_tokens": longest,
        "max_length": config.data.max_length,
    }
