import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hydra_rank.adapter import attach_lora
from hydra_rank.cache import package_dir
from hydra_rank.config import AdapterConfig
from hydra_rank.data.encode import IGNORE_INDEX
from hydra_rank.errors import ConfigError, ModelLoadError
from hydra_rank.inputs import load_model
from hydra_rank.loss import answer_loss
from hydra_rank.models.arch import decoder_layers, linear_targets
from hydra_rank.models.vision import (
    ONNX_PACKAGE,
    ONNX_RELATIVE_PATH,
    convert_onnx_vit,
    resize_position_embeddings,
)
from hydra_rank.rank.budget import Allocation, discover_targets

from .conftest import make_tiny_llava

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def vit():
    return convert_onnx_vit()


def test_converted_vit_matches_onnxruntime(vit):
    """The converted encoder reproduces the ONNX graph's own backbone output (its final layer norm)."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    graph = onnx.load(str(package_dir(ONNX_PACKAGE) / ONNX_RELATIVE_PATH))
    final_norm = [n for n in graph.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = session.run([final_norm], {"input_image": pixels})[0]
    with torch.no_grad():
        actual = vit(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert actual.shape == (2, 257, 384)
    assert np.abs(actual - expected).max() < 1e-4


def test_baked_position_table_changes_nothing_at_that_size(vit):
    resized = resize_position_embeddings(convert_onnx_vit(), 56)
    assert resized.embeddings.position_embeddings.shape == (1, 17, 384)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(resized(pixels).last_hidden_state, vit(pixels).last_hidden_state)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resize_position_embeddings(vit, 50)


def test_targets_are_language_model_linears_only(tokenizer):
    """DINOv2 also has q_proj/k_proj/v_proj/o_proj; none of them may be targeted."""
    model, _ = make_tiny_llava(tokenizer)
    targets = [name for name, _ in linear_targets(model)]
    assert len(targets) == 2 * 7
    assert all(t.startswith("model.language_model.layers.") for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == LLAMA_LINEARS
    vision_q = [n for n, _ in model.named_modules() if n.startswith("model.vision_tower") and n.endswith("q_proj")]
    assert vision_q and not set(vision_q) & set(targets)
    assert [name for name, _ in linear_targets(model, ["q_proj", "down_proj"])] == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.mlp.down_proj",
        "model.language_model.layers.1.self_attn.q_proj",
        "model.language_model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(ConfigError, match=r"\['qproj'\] are not linears"):
        linear_targets(model, ["qproj"])


def test_targets_are_the_same_after_peft_wraps_them(tokenizer):
    """Inside a LoRA layer the base linear and lora_A/lora_B are parts, not targets of their own."""
    model, _ = make_tiny_llava(tokenizer)
    before = discover_targets(model)
    wrapped = attach_lora(model, AdapterConfig(rank=2), Allocation.uniform(before, 2))
    assert discover_targets(wrapped.base_model.model) == before


def test_text_only_llama_is_supported_and_unknown_architectures_are_named():
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    )
    assert decoder_layers(llama)[0] == "model.layers"
    assert len(linear_targets(llama)) == 21
    with pytest.raises(ModelLoadError, match="model type None is not in"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_answer_loss_equals_full_cross_entropy(tokenizer):
    """Computing logits only where an answer token follows gives exactly the full-sequence masked loss."""
    model, _ = make_tiny_llava(tokenizer)
    language = model.model.language_model
    lm = LlamaForCausalLM(language.config)
    lm.model = language
    lm.lm_head = model.lm_head
    ids = torch.randint(0, 1000, (3, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 8:11] = ids[0, 8:11]
    labels[1, 5:7] = ids[1, 5:7]
    labels[2, 11:] = ids[2, 11:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, count = answer_loss(lm, batch)
    logits = lm(input_ids=ids).logits[:, :-1]
    expected = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert count == 6
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_loading_a_local_checkpoint_and_bad_names(tiny_llava_dir, tmp_path):
    model, processor = load_model(str(tiny_llava_dir))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert processor.tokenizer.chat_template
    with pytest.raises(ModelLoadError, match="unknown built-in model"):
        load_model("builtin:nope")
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_model(str(tmp_path / "nothing-here"))
