"""`hydra-rank validate`: find every problem a long run would hit, before it starts.

Checks, in the order a run meets them: the configuration (done when it is loaded), the model (architecture in the
registry, target modules, chat template), the parameter budget against the minimum ranks, and every sample of both
datasets: readable images inside the image folder, placeholders matching images, and a token length within
`data.max_length`. The first problem raises its one clear `HydraError`; a clean config returns a summary.
"""

from __future__ import annotations

from .config import RunConfig
from .data import ChatEncoder, load_samples
from .models.loading import load_model
from .rank.budget import discover_targets
from .rank.plan import make_budget
from .utils import progress_bar


def validate_config(config: RunConfig, show_progress: bool = True) -> dict:
    model, processor = load_model(config.model.name_or_path, config.model.dtype, config.model.trust_remote_code)
    encoder = ChatEncoder(processor, config.data.system_prompt, config.data.max_length)
    targets = discover_targets(model, config.adapter.target_modules, config.adapter.towers)
    budget = make_budget(config.adapter, targets)
    budget.check_feasible(targets)
    train, held_out = load_samples(config.data, config.train.seed)
    longest = 0
    images = set()
    with progress_bar("validate samples", total=len(train) + len(held_out), enabled=show_progress) as advance:
        for sample in [*train, *held_out]:
            longest = max(longest, len(encoder.encode(sample).input_ids))
            images.update(sample.images)
            advance()
    return {
        "model": config.model.name_or_path,
        "architecture": model.config.model_type,
        "target_modules": len(targets),
        "budget_params": budget.total,
        "train_samples": len(train),
        "eval_samples": len(held_out),
        "images": len(images),
        "longest_sample_tokens": longest,
        "max_length": config.data.max_length,
    }
