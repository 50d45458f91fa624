"""Export a finished run: the stock PEFT adapter and a merged model (adapter folded into the base weights).

Both are written with nothing of ours inside: the adapter loads with `PeftModel.from_pretrained`, the merged model
with `AutoModelForImageTextToText`/`AutoModelForCausalLM.from_pretrained` and its processor with `AutoProcessor`.
The merge is checked on a few evaluation samples: the largest logit difference is returned (float rounding only).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel

from .config import load_config
from .data import collate
from .errors import ConfigError
from .inputs import load_inputs
from .utils import atomic_directory


def export_run(run_dir: Path, output_dir: Path) -> dict:
    """Write `output_dir/adapter` (PEFT) and `output_dir/merged` (full model + processor) from a run directory."""
    adapter = run_dir / "adapter"
    if not (run_dir / "config.yaml").is_file() or not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished run directory (needs config.yaml and adapter/)")
    inputs = load_inputs(load_config(run_dir / "config.yaml"))
    model = PeftModel.from_pretrained(inputs.model, adapter).eval()
    encoder, processor = inputs.encoder, inputs.processor
    probe = collate([encoder.encode(s) for s in inputs.eval_samples[:4]], encoder.pad_token_id)
    probe.pop("labels")
    with torch.no_grad():
        expected = model(**probe).logits

    with atomic_directory(output_dir / "adapter") as staging:
        shutil.copytree(adapter, staging, dirs_exist_ok=True)
    merged = model.merge_and_unload()
    with torch.no_grad():
        difference = float((merged(**probe).logits - expected).abs().max())
    with atomic_directory(output_dir / "merged") as staging:
        merged.save_pretrained(staging)
        processor.save_pretrained(staging)
    return {"adapter": str(output_dir / "adapter"), "merged": str(output_dir / "merged"), "max_logit_diff": difference}
