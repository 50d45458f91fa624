"""GGUF and ONNX export with llama.cpp's own converter: the files hold the merged model's weights, the ONNX vision
half gives PyTorch's image embeddings, and what cannot be converted fails with one clear error."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForImageTextToText

from hydra_rank.deploy import QUANTS, convert, quantize, to_gguf, vision_kind
from hydra_rank.errors import ConfigError
from hydra_rank.export import export_run
from hydra_rank.train import run

from .conftest import write_colour_dataset
from .test_train import tiny_config


@pytest.fixture(scope="module")
def vlm_run(tiny_llava_dir, tmp_path_factory):
    """A tiny LLaVA fine-tuned with per-module ranks (so the scale convention matters), two steps."""
    root = tmp_path_factory.mktemp("deploy")
    config = tiny_config(tiny_llava_dir, write_colour_dataset(root / "data"), root / "run", max_steps=2)
    config.adapter.method = "hydra-static"
    config.adapter.calibration_batches = 1
    return run(config, show_progress=False).output_dir


def tensor(reader: GGUFReader, name: str) -> np.ndarray:
    [found] = [t for t in reader.tensors if t.name == name]
    return dequantize(found.data, found.tensor_type).reshape(tuple(reversed(found.shape.tolist())))


@pytest.fixture(scope="module")
def exported(vlm_run, tmp_path_factory):
    return export_run(vlm_run, tmp_path_factory.mktemp("export") / "out", quant="q8_0")


def test_gguf_holds_the_merged_language_model(exported):
    merged = AutoModelForImageTextToText.from_pretrained(exported["merged"]).model.language_model
    reader = GGUFReader(exported["gguf"])
    fields = {field.name: field for field in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    down = merged.layers[0].mlp.down_proj.weight.detach().numpy()
    quantized = tensor(reader, "blk.0.ffn_down.weight")  # q8_0: one scale per 32 values
    assert quantized.shape == down.shape
    assert np.abs(quantized - down).max() <= np.abs(down).max() / 127 + 1e-6
    assert not np.array_equal(quantized, down)  # it really is quantized
    embeddings = tensor(reader, "token_embd.weight")  # llama.cpp keeps the embeddings at higher precision
    assert np.abs(embeddings - merged.embed_tokens.weight.detach().numpy()).max() < 1e-2


def test_the_vision_half_goes_to_onnx_with_pytorchs_embeddings(exported):
    """The tiny LLaVA's CLIP-style tower (like the built-in DINOv2) has no llama.cpp mmproj path here: ONNX."""
    assert "mmproj" not in exported and exported["onnx"].endswith("vision.onnx")
    assert exported["onnx_max_diff"] < 1e-4


def test_gguf_f16_holds_the_merged_weights_exactly(exported, tmp_path):
    f16 = convert(Path(exported["merged"]), tmp_path / "f16.gguf", "f16")
    assert f16.stat().st_size > Path(exported["gguf"]).stat().st_size  # q8_0 is smaller
    merged = AutoModelForImageTextToText.from_pretrained(exported["merged"]).model.language_model
    up = merged.layers[1].mlp.up_proj.weight.detach()
    np.testing.assert_array_equal(tensor(GGUFReader(f16), "blk.1.ffn_up.weight"), up.half().float().numpy())


def test_unsupported_quant_and_missing_quantizer_are_one_line_errors(vlm_run, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"--quant q3_k is not supported; choose one of f16, q8_0, q4_k_m"):
        export_run(vlm_run, tmp_path / "out", quant="q3_k")
    assert not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without `make deploy-tools`
    with pytest.raises(ConfigError, match=r"--quant q4_k_m needs llama.cpp's quantizer .* run `make deploy-tools`"):
        quantize(tmp_path / "model-f16.gguf", tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    assert QUANTS == ("f16", "q8_0", "q4_k_m")


def test_a_family_llama_cpp_cannot_convert_fails_with_the_converters_reason(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"], "model_type": "x"}))
    with pytest.raises(
        ConfigError, match=r"llama.cpp's converter .* cannot convert .*model: .*NoSuchModelForCausalLM"
    ):
        convert(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_a_run_without_an_adapter_cannot_be_exported(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="is not a finished run directory"):
        export_run(tmp_path / "run", tmp_path / "out", quant="f16")
    (tmp_path / "run" / "model").mkdir()  # what method full saves
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a full fine-tuning run: it has no adapter to export"):
        export_run(tmp_path / "run", tmp_path / "out", quant="f16")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gemma3_export(tmp_path_factory):
    """A tiny random Gemma 3 VLM, saved as hub checkpoints are, exported to GGUF + mmproj (f16)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from .test_families import gemma3

    torch.manual_seed(0)
    model, processor = gemma3()
    config = model.config
    # as in Gemma 3's checkpoints, queries scale by 1/sqrt(head_dim): llama.cpp assumes it (HF reads the scalar)
    config.text_config.query_pre_attn_scalar = config.text_config.head_dim
    model = type(model)(config).eval()
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)  # zeros at init
    # saved as hub checkpoints are (a model built from a config would drop SigLIP's `vision_model.` level)
    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    written = to_gguf(folder / "model", folder / "gguf", "f16", mmproj=vision_kind(folder / "model") == "mmproj")
    return model, processor, written


def test_a_gemma3_vlm_gets_a_gguf_and_an_mmproj_for_llama_cpps_runtime(gemma3_export):
    """Gemma 3's SigLIP tower is one llama.cpp's multimodal runtime runs: its weights go to mmproj-f16.gguf."""
    model, _, written = gemma3_export
    assert set(written) == {"gguf", "mmproj"}
    patch = model.model.vision_tower.embeddings.patch_embedding.weight.detach()
    np.testing.assert_array_equal(tensor(GGUFReader(written["mmproj"]), "v.patch_embd.weight"), patch.numpy())  # f32
    assert "v.patch_embd.weight" not in {t.name for t in GGUFReader(written["gguf"]).tensors}


def test_llama_cpp_runs_the_gguf_and_mmproj_with_pytorchs_logits(gemma3_export):
    """The export in llama.cpp's own runtime (image prepared by llama.cpp, embeddings placed between its markers,
    bidirectional attention over the image) predicts what the PyTorch model predicts, up to f16 weights."""
    pytest.importorskip("llama_cpp", reason="needs the compiled llama-cpp-python (make deploy-tools)")
    from hydra_rank.llama_runtime import multimodal_logits

    model, processor, written = gemma3_export
    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)  # the tower's size: no resize
    image_id = model.config.image_token_index
    ids, logits = multimodal_logits(written["gguf"], written["mmproj"], "Describe", image, image_id)
    assert ids.count(image_id) == 4  # 4x4 patches pooled to 2x2
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected = model(input_ids=tokens, pixel_values=pixels, token_type_ids=(tokens == image_id).long()).logits
    expected = expected[0, -1].numpy()
    assert np.abs(logits[: len(expected)] - expected).max() < 5e-3 * np.abs(expected).max() + 1e-3
