"""Export a finished run: the stock PEFT adapter and a merged model (adapter folded into the base weights).

Both are written with nothing of ours inside: the adapter loads with `PeftModel.from_pretrained`, the merged model
with `AutoModelForImageTextToText`/`AutoModelForCausalLM.from_pretrained` and its processor with `AutoProcessor`.
The merge is checked on a few evaluation samples: the largest logit difference is returned (float rounding only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import load_config
from .data import collate
from .errors import ConfigError
from .inputs import load_inputs
from .models.loading import load_adapter
from .utils import atomic_directory, check_folder_target, write_json

MARKER = "export.json"  # what an export folder was exported from: a later export of the same run may replace it


def check_export_target(run_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """An export may replace a previous export of the same run; a run folder (whose adapter/ it would replace) never;
    anything else that holds files only with `overwrite`."""
    if (output_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{output_dir} is a run folder: exporting there would replace its adapter/; choose another --output-dir"
        )
    marker = output_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("run") == str(run_dir.resolve()):
        return
    check_folder_target(output_dir, overwrite, "export")


def export_run(run_dir: Path, output_dir: Path, overwrite: bool = False) -> dict:
    """Write `output_dir/adapter` (PEFT) and `output_dir/merged` (full model + processor) from a run directory."""
    adapter = run_dir / "adapter"
    if not (run_dir / "config.yaml").is_file() or not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished run directory (needs config.yaml and adapter/)")
    check_export_target(run_dir, output_dir, overwrite)
    inputs = load_inputs(load_config(run_dir / "config.yaml"))
    model = load_adapter(inputs.model, adapter).eval()
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
    write_json(output_dir / MARKER, {"run": str(run_dir.resolve())})
    return {"adapter": str(output_dir / "adapter"), "merged": str(output_dir / "merged"), "max_logit_diff": difference}
