"""A bitsandbytes-quantized base (model.quantization): HyDRA's sketches, attribution and resizes over quantized
layers, the adapter's reload onto a fresh quantized base, and the export's merge into the dequantized weights.

bitsandbytes runs these on CPU; its CPU kernels pack 64-wide blocks, so the tiny LLaVA here is 64 wide.
"""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
import pytest
import torch

from hydra_rank.config import load_config
from hydra_rank.data import collate
from hydra_rank.errors import ConfigError, ModelLoadError
from hydra_rank.export import export_run
from hydra_rank.inputs import load_inputs
from hydra_rank.models.loading import load_adapter, load_pretrained
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

from .conftest import make_tiny_llava, write_colour_dataset
from .test_train import dynamic_config

QUANTIZED = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}


@pytest.fixture(scope="module")
def llava64_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llava-64")
    model, processor = make_tiny_llava(tokenizer, hidden=64)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_hydra_resizes_over_a_quantized_base_and_exports_a_float_merge(llava64_dir, tmp_path, quantization):
    config = dynamic_config(llava64_dir, write_colour_dataset(tmp_path / "data"), tmp_path / "run")
    config.model.quantization = quantization
    result = run(config, show_progress=False)
    root = result.model.base_model.model
    kinds = {name: type(module) for name, module in root.named_modules()}
    language = [kind for name, kind in kinds.items() if name.startswith("model.language_model.") and "proj" in name]
    assert QUANTIZED[quantization] in language  # the language model's linears are quantized...
    assert not any(  # ...the vision tower, projector and head are not
        kind in QUANTIZED.values() for name, kind in kinds.items() if not name.startswith("model.language_model.")
    )
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert len(history) == 5 and len({tuple(entry["ranks"].values()) for entry in history}) > 1  # ranks moved
    assert all(entry["used_params"] <= entry["budget_params"] for entry in history)

    # the saved adapter on a freshly loaded quantized base is the trained model
    inputs = load_inputs(load_config(result.output_dir / "config.yaml"))
    assert inputs.config.model.quantization == quantization
    reloaded = load_adapter(inputs.model, result.output_dir / "adapter").eval()
    probe = collate([inputs.encoder.encode(s) for s in inputs.eval_samples[:4]], inputs.encoder.pad_token_id)
    probe.pop("labels")
    with torch.no_grad():
        assert float((reloaded(**probe).logits - result.model.eval()(**probe).logits).abs().max()) < 1e-5

    exported = export_run(result.output_dir, tmp_path / "export")
    # folding the scales into B changes float rounding only, but bitsandbytes' CPU kernels round activations to 16
    # bits, which can turn a 1e-7 difference in an earlier layer into a 1e-4 one (seen with two threads)
    assert exported["adapter_max_logit_diff"] < 2e-3
    # the merge is plain float linears: only the quantized kernels' 16-bit arithmetic separates it from the run
    assert exported["max_logit_diff"] < 2e-2
    merged_config = json.loads((tmp_path / "export" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config


def test_full_fine_tuning_of_a_quantized_base_is_refused_at_start(llava64_dir):
    with pytest.raises(ConfigError, match=r"full fine-tuning needs model\.quantization none"):
        load_config(None, [f"model.name_or_path={llava64_dir}", "model.quantization=4bit", "adapter.method=full"])
    with pytest.raises(ConfigError, match=r"model\.quantization must be one of"):
        load_config(None, ["model.quantization=3bit"])


def test_a_missing_bitsandbytes_is_one_clear_error(llava64_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ModelLoadError, match=r"needs bitsandbytes: pip install 'hydra-rank\[quant\]'"):
        load_pretrained(str(llava64_dir), quantization="8bit")
