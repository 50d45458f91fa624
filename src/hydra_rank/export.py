"""Export a finished run: a portable PEFT adapter and a merged model (adapter folded into the base weights).

Both are written with nothing of ours inside: the adapter loads with `PeftModel.from_pretrained`, the merged model
with `AutoModelForImageTextToText`/`AutoModelForCausalLM.from_pretrained` and its processor with `AutoProcessor`.

The run's own adapter gives modules whose rank is not r0 their scale through `alpha_pattern` (or `use_rslora`).
Tools that read one global `lora_alpha` and scale every module by alpha/rank (llama.cpp's LoRA converter and
runtime) would apply it with the wrong scale, silently. The exported adapter is therefore *portable*: each module's
scale is folded into its B (`rank/lora.py: fold_scales`), so alpha/rank with one global alpha is exact for every
module, and its README says so. Both the portable adapter and the merge are checked against the run's adapter on a
few evaluation samples: the largest logit differences are returned (float rounding only; on an 8bit base, also the
activation quantization that LLM.int8 applies and a float merge does not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftType

from .config import load_config
from .data import collate
from .deploy import check_quant, to_gguf, vision_kind, vision_to_onnx
from .errors import ConfigError
from .inputs import RunInputs, load_inputs
from .models.loading import is_quantized, load_adapter, load_pretrained
from .rank.lora import ADAPTER, fold_scales
from .utils import atomic_directory, check_folder_target, write_json

SCALE_NOTE = """
## Scale convention (hydra-rank)

Modules of this adapter have different ranks (read them from the tensor shapes or `rank_pattern`). Every module's
update is `lora_alpha / r_module · B·A`, with the single global `lora_alpha` of adapter_config.json: no
`alpha_pattern`, no rsLoRA. hydra-rank folded each module's training scale into its B when exporting, so this is
exact, and tools that only read the global alpha (llama.cpp's LoRA converter and runtime) apply it correctly.
"""
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


def merge(inputs: RunInputs, adapter: Path) -> torch.nn.Module:
    """A run on a quantized base, merged: the adapter folded into the *dequantized* base weights, i.e. into exactly
    the weights it was trained against (merging into the quantized layers would re-quantize the sum and lose most of
    a small update; merging into the original float checkpoint would pair it with weights it never saw). The base is
    loaded afresh: PEFT's quantized LoRA layers merge only into quantized weights, so the run's own model cannot be
    dequantized in place."""
    m = inputs.config.model
    base, _ = load_pretrained(inputs.source, m.dtype, m.trust_remote_code, m.quantization)
    return load_adapter(base.dequantize(), adapter).merge_and_unload()


def export_run(run_dir: Path, output_dir: Path, overwrite: bool = False, quant: str | None = None) -> dict:
    """Write `output_dir/adapter` (PEFT) and `output_dir/merged` (full model + processor) from a run directory; with
    `quant`, also `output_dir/gguf` (`deploy.py`: the language model as GGUF, the vision half as mmproj or ONNX)."""
    if quant is not None:
        check_quant(quant)  # before the slow part
    adapter = run_dir / "adapter"
    if (run_dir / "model" / "config.json").is_file() and not adapter.is_dir():
        raise ConfigError(
            f"{run_dir} is a full fine-tuning run: it has no adapter to export, and {run_dir / 'model'} already is "
            "the merged model (load it with from_pretrained, or give that folder to llama.cpp's converter)"
        )
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

    def difference(candidate: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((candidate(**probe).logits - expected).abs().max())

    portable = model.peft_config[ADAPTER].peft_type == PeftType.LORA  # AdaLoRA keeps its own format
    if portable:
        fold_scales(model, inputs.config.adapter.alpha)  # modules at r0 under the fixed convention keep their B
    adapter_difference = difference(model)
    with atomic_directory(output_dir / "adapter") as staging:
        if portable:
            model.save_pretrained(staging)
            with (staging / "README.md").open("a", encoding="utf-8") as card:
                card.write(SCALE_NOTE)
        else:
            shutil.copytree(adapter, staging, dirs_exist_ok=True)
    merged = merge(inputs, output_dir / "adapter") if is_quantized(inputs.model) else model.merge_and_unload()
    merge_difference = difference(merged)
    with atomic_directory(output_dir / "merged") as staging:
        merged.save_pretrained(staging)
        processor.save_pretrained(staging)
    result = {
        "adapter": str(output_dir / "adapter"),
        "merged": str(output_dir / "merged"),
        "adapter_max_logit_diff": adapter_difference,
        "max_logit_diff": merge_difference,
    }
    if quant is not None:
        vision = vision_kind(output_dir / "merged")
        with atomic_directory(output_dir / "gguf") as staging:
            files = to_gguf(output_dir / "merged", staging, quant, mmproj=vision == "mmproj")
            if vision == "onnx":
                files["onnx"] = staging / "vision.onnx"
                result["onnx_max_diff"] = vision_to_onnx(merged, probe["pixel_values"], files["onnx"])
        result.update({kind: str(output_dir / "gguf" / path.name) for kind, path in files.items()})
    write_json(output_dir / MARKER, {"run": str(run_dir.resolve())})
    return result
