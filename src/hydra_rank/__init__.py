"""hydra-rank: HyDRA (hierarchical and dynamic rank adaptation) for fine-tuning vision-language models with LoRA.

    from hydra_rank import load_config, run
    result = run(load_config("configs/tiny-lora.yaml", ["train.max_steps=20"]))
    result.metrics["eval_accuracy"], result.model  # the trained PeftModel

Names are imported lazily so that `hydra-rank --help` does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# bitsandbytes (the quant extra; PEFT imports it whenever it is installed) warns on every import on CPUs with
# AVX512-BF16 that it could not download an optional 4-bit matmul kernel from the Hugging Face hub; its own CPU kernel,
# which it then uses, is what hydra-rank runs and measures. Only that logger is quietened, and only below errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "RunConfig": "hydra_rank.config",
    "load_config": "hydra_rank.config",
    "run": "hydra_rank.train",
    "RunResult": "hydra_rank.train",
    "load_model": "hydra_rank.inputs",
    "evaluate_saved": "hydra_rank.commands",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hydra_rank' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
