"""What a command works on, loaded from a configuration in one place: the model (by built-in name, local folder or
hub id), its processor, the chat encoder, the training and evaluation samples, and the adapter's target modules.

`train`, `validate`, `eval`, `allocate` and `export` all start here, so they read a configuration the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .builtin import resolve
from .data import ChatEncoder, load_samples
from .models.loading import load_pretrained
from .rank.budget import discover_targets

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .config import RunConfig
    from .data.sample import Sample
    from .rank.budget import Target


def load_model(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    """(model in eval mode, processor or tokenizer) for a built-in name (`builtin:tiny-vlm`, built into the cache on
    first use), a local directory or a hub id."""
    return load_pretrained(resolve(name_or_path), dtype, trust_remote_code)


@dataclass
class RunInputs:
    config: RunConfig
    model: PreTrainedModel
    processor: Any
    encoder: ChatEncoder
    train_samples: list[Sample]  # in the run's seeded order
    eval_samples: list[Sample]  # the fixed evaluation subset

    @cached_property
    def targets(self) -> list[Target]:
        """The adapter's target modules, found on first use: read it before adapters are attached to `model`."""
        adapter = self.config.adapter
        return discover_targets(self.model, adapter.target_modules, adapter.towers)


def load_inputs(config: RunConfig) -> RunInputs:
    """Load the configured model and data (the model stays on the CPU, in eval mode)."""
    model, processor = load_model(config.model.name_or_path, config.model.dtype, config.model.trust_remote_code)
    encoder = ChatEncoder(processor, config.data.system_prompt, config.data.max_length)
    train_samples, eval_samples = load_samples(config.data, config.train.seed)
    return RunInputs(config, model, processor, encoder, train_samples, eval_samples)
