"""What a command works on, loaded from a configuration in one place: the model (by built-in name, local folder or
hub id), its processor, the chat encoder, the training and evaluation samples, and the adapter's target modules.

`train`, `validate`, `eval`, `allocate` and `export` all start here, so they read a configuration the same way, and
results record where they came from the same way (`RunInputs.provenance`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .builtin import resolve
from .cache import BUILD_FILE, file_sha256
from .data import ChatEncoder, load_samples
from .models.loading import load_pretrained
from .provenance import environment
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
    source: str  # the directory (a built-in model's cache entry) or hub id the model was loaded from
    model: PreTrainedModel
    processor: Any
    encoder: ChatEncoder
    train_samples: list[Sample]  # in the run's seeded order
    eval_samples: list[Sample]  # the fixed evaluation subset
    # git state, versions and machine when the inputs were loaded: the code a run imported, even if the checkout
    # moves to another commit before the run ends and writes its metrics
    environment: dict[str, Any] = field(default_factory=environment)

    @cached_property
    def targets(self) -> list[Target]:
        """The adapter's target modules, found on first use: read it before adapters are attached to `model`."""
        adapter = self.config.adapter
        return discover_targets(self.model, adapter.target_modules, adapter.towers)

    def provenance(self) -> dict[str, Any]:
        """Where a result on these inputs comes from: git state, library versions, machine, and the base model."""
        return {**self.environment, "base_model": model_identity(self.config.model.name_or_path, self.source)}


def model_identity(name: str, source: str) -> dict[str, Any]:
    """The base model's name, where it was loaded from and its weight files' sha256 (a built-in model's from its
    cache entry's build.json; a local folder's computed once per file version; a hub id has none here)."""
    folder = Path(source)
    if not folder.is_dir():
        return {"name": name, "source": source, "weights_sha256": None}
    build = folder / BUILD_FILE
    if build.is_file():
        files = json.loads(build.read_text())["files"]
        weights = {f: digest for f, digest in files.items() if f.endswith(".safetensors")}
    else:
        weights = {str(f.relative_to(folder)): file_sha256(f) for f in sorted(folder.glob("*.safetensors"))}
    return {"name": name, "source": folder.name if build.is_file() else str(folder), "weights_sha256": weights}


def load_inputs(config: RunConfig) -> RunInputs:
    """Load the configured model and data (the model stays on the CPU, in eval mode)."""
    source = resolve(config.model.name_or_path)
    m = config.model
    model, processor = load_pretrained(source, m.dtype, m.trust_remote_code, m.quantization)
    encoder = ChatEncoder(processor, config.data.system_prompt, config.data.max_length)
    train_samples, eval_samples = load_samples(config.data, config.train.seed)
    return RunInputs(config, source, model, processor, encoder, train_samples, eval_samples)
