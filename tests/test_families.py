"""Every supported model family, end to end: a tiny randomly initialised checkpoint of each (its real model and
processor classes, the SmolLM2 tokenizer with the family's special tokens) is saved to a directory, trained with
dynamic HyDRA through `run`, exported, and its adapter reloaded with stock PEFT.

Stand-ins, where the real thing cannot be built here: Qwen2-VL's and Qwen2.5-VL's processors are built without their
video processor (`without_video_processor`; it needs torchvision), SmolVLM2's model is paired with the Idefics3
processor (its own needs num2words and torchvision), and MobileVLM — which transformers has no class for — is a LLaVA
checkpoint whose remote code swaps in a downsampling projector (loaded with `trust_remote_code`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel
from PIL import Image

from hydra_rank.builtin import smollm2_path
from hydra_rank.config import ScheduleConfig
from hydra_rank.data import ChatEncoder, Sample, collate, load_samples
from hydra_rank.data.records import load_json_samples
from hydra_rank.errors import ModelLoadError
from hydra_rank.export import export_run
from hydra_rank.inputs import load_model
from hydra_rank.models.arch import arch_spec, decoder_layers, vision_layers
from hydra_rank.models.loading import without_video_processor
from hydra_rank.rank.scheduler import decision_steps
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

from .conftest import write_colour_dataset, write_text_dataset
from .test_train import tiny_config

HIDDEN = 32


def family_tokenizer(*special: str, **named: str) -> tf.PreTrainedTokenizerBase:
    """A fresh SmolLM2 tokenizer (processors add tokens to the one they are given) with the family's special tokens;
    `named` ones also become attributes (`tokenizer.boi_token`), as in the family's own tokenizer."""
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_path(), extra_special_tokens=named)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)}, replace_extra_special_tokens=False)
    return tokenizer


def text_config(config_class: type, tokenizer, **overrides) -> dict:
    """A 2-layer, 32-wide decoder of the given family over the tokenizer's vocabulary."""
    values = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "tie_word_embeddings": True,
    }
    return config_class(**(values | overrides)).to_dict()


def tiny_vit(config_class: type, image_size: int, **overrides) -> dict:
    values = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 14,
    }
    return config_class(**(values | overrides)).to_dict()


def llava_next():
    tokenizer = family_tokenizer("<image>")
    config = tf.LlavaNextConfig(
        vision_config=tiny_vit(tf.CLIPVisionConfig, 28),
        text_config=text_config(tf.LlamaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    image_processor = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = tf.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return tf.LlavaNextForConditionalGeneration(config), processor


def idefics3_processor(tokenizer, image_size: int, image_seq_len: int) -> tf.Idefics3Processor:
    """Images split into 2x2 tiles plus a global view: 5 sub-images per image, with `pixel_attention_mask`."""
    image_processor = tf.Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=True
    )
    return tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len)


def idefics3_tokenizer():
    tiles = [f"<row_{row}_col_{col}>" for row in (1, 2) for col in (1, 2)]
    return family_tokenizer("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tiles)


def idefics3():
    tokenizer = idefics3_tokenizer()
    config = tf.Idefics3Config(
        vision_config=tiny_vit(tf.Idefics3VisionConfig, 56),
        text_config=text_config(tf.LlamaConfig, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=True,
    )
    return tf.Idefics3ForConditionalGeneration(config), idefics3_processor(tokenizer, 56, 4)


def smolvlm():
    tokenizer = idefics3_tokenizer()
    config = tf.SmolVLMConfig(
        vision_config=tiny_vit(tf.SmolVLMVisionConfig, 56),
        text_config=text_config(tf.LlamaConfig, tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=True,
    )
    return tf.SmolVLMForConditionalGeneration(config), idefics3_processor(tokenizer, 56, 4)


def qwen2_vl_family(config_class: type, text_class: type, processor_class: type, **vision):
    """56 px images: 4x4 patches of 14 px, merged 2x2 into 4 image tokens."""
    tokenizer = family_tokenizer("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad")}
    config = config_class(
        text_config=text_config(text_class, tokenizer, rope_parameters=rope),
        vision_config={"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, **vision},
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    image_processor = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = without_video_processor(processor_class)(image_processor=image_processor, tokenizer=tokenizer)
    return tf.AutoModelForImageTextToText.from_config(config), processor


def qwen2_vl():
    return qwen2_vl_family(
        tf.Qwen2VLConfig,
        tf.Qwen2VLTextConfig,
        tf.Qwen2VLProcessor,
        embed_dim=HIDDEN,
        hidden_size=HIDDEN,
        mlp_ratio=2,
    )


def qwen2_5_vl():
    return qwen2_vl_family(
        tf.Qwen2_5_VLConfig,
        tf.Qwen2_5_VLTextConfig,
        tf.Qwen2_5_VLProcessor,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        out_hidden_size=HIDDEN,
        window_size=28,
        fullatt_block_indexes=[1],
    )


def paligemma():
    tokenizer = family_tokenizer("<image>")
    image_processor = tf.SiglipImageProcessorPil(size={"height": 28, "width": 28}, image_seq_length=4)
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc>/<seg> tokens
    config = tf.PaliGemmaConfig(
        vision_config=tiny_vit(tf.SiglipVisionConfig, 28),
        text_config=text_config(tf.GemmaConfig, tokenizer, head_dim=8),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return tf.PaliGemmaForConditionalGeneration(config), processor


def gemma3():
    """56 px images: 4x4 patches pooled to 2x2 = 4 image tokens between <start_of_image> and <end_of_image>."""
    names = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = family_tokenizer(**names)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in names.items()}
    config = tf.Gemma3Config(
        vision_config=tiny_vit(tf.SiglipVisionConfig, 56),
        text_config=text_config(tf.Gemma3TextConfig, tokenizer, head_dim=8, sliding_window=16),
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)
    return tf.Gemma3ForConditionalGeneration(config), processor


# MobileVLM's lightweight downsample projector in a LLaVA checkpoint, shipped as remote code next to its weights.
MOBILEVLM_CODE = '''
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration


class MobileVLMStyleConfig(LlavaConfig):
    pass


class DownsampleProjector(nn.Module):
    """A per-token MLP, 2x2 average pooling over the patch grid (4x fewer image tokens), and a depthwise 3x3
    convolution added back as a positional encoding."""

    def __init__(self, config):
        super().__init__()
        vision, width = config.vision_config.hidden_size, config.text_config.hidden_size
        self.mlp = nn.Sequential(nn.Linear(vision, width), nn.GELU(), nn.Linear(width, width))
        self.position = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, features):
        batch, tokens, _ = features.shape
        side = int(tokens**0.5)
        grid = F.avg_pool2d(self.mlp(features).transpose(1, 2).reshape(batch, -1, side, side), 2)
        return (grid + self.position(grid)).flatten(2).transpose(1, 2)


class MobileVLMStyleForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MobileVLMStyleConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.multi_modal_projector = DownsampleProjector(config)
        self.post_init()
'''


def mobilevlm(directory: Path):
    """56 px images: 4x4 CLIP patches, pooled to 2x2 = 4 image tokens (the processor counts 28 px "patches")."""
    (directory / "modeling_mobilevlm.py").write_text(MOBILEVLM_CODE)
    module = "modeling_mobilevlm."
    config_class = tf.dynamic_module_utils.get_class_from_dynamic_module(module + "MobileVLMStyleConfig", directory)
    model_class = tf.dynamic_module_utils.get_class_from_dynamic_module(
        module + "MobileVLMStyleForConditionalGeneration", directory
    )
    tokenizer = family_tokenizer("<image>")
    config = config_class(
        vision_config=tiny_vit(tf.CLIPVisionConfig, 56),
        text_config=text_config(tf.LlamaConfig, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=4,
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    config.auto_map = {
        "AutoConfig": module + "MobileVLMStyleConfig",
        "AutoModelForImageTextToText": module + "MobileVLMStyleForConditionalGeneration",
    }
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=28,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model_class(config), processor


def causal_lm(config_class: type, model_class: type, **overrides) -> Callable:
    def build():
        tokenizer = family_tokenizer()
        return model_class(config_class(**text_config(config_class, tokenizer, **overrides))), tokenizer

    return build


VISION_FAMILIES: dict[str, Callable] = {
    "llava_next": llava_next,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "paligemma": paligemma,
    "gemma3": gemma3,
}
TEXT_FAMILIES: dict[str, Callable] = {
    "qwen2": causal_lm(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "gemma": causal_lm(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=8),
    "mistral": causal_lm(tf.MistralConfig, tf.MistralForCausalLM),
    "gemma2": causal_lm(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8),
    "gemma3_text": causal_lm(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=8),
}
FAMILIES = ["llava", "mobilevlm", *VISION_FAMILIES, *TEXT_FAMILIES]


def save_family(name: str, directory: Path, tiny_llava_dir: Path) -> Path:
    """The family's tiny checkpoint directory (LLaVA 1.5 is the shared `tiny_llava_dir`)."""
    if name == "llava":
        return tiny_llava_dir
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    if name == "mobilevlm":
        model, processor = mobilevlm(directory)
    else:
        model, processor = {**VISION_FAMILIES, **TEXT_FAMILIES}[name]()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads lose a lot waiting
    for each other (a run here took 2.6x as long with 2 threads as with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tiny_llava_dir, tmp_path_factory):
    """A dynamic HyDRA run with a decision at nearly every step, the budget asserted after each."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = save_family(name, root / f"{name}-model", tiny_llava_dir)  # remote code is cached by folder name
    text_only = name in TEXT_FAMILIES
    dataset = (write_text_dataset if text_only else write_colour_dataset)(root / "data", count=8)
    config = tiny_config(model_dir, dataset, root / "run", max_steps=6, debug_checks=True)
    config.model.trust_remote_code = name == "mobilevlm"
    config.adapter.method = "hydra"
    config.adapter.max_rank = 6
    config.eval.max_new_tokens = 2
    config.schedule = ScheduleConfig(
        warmup_fraction=0.1, interval_fraction=0.1, freeze_fraction=0.9, signal_steps=1, max_move_fraction=0.3
    )
    return name, config, run(config, show_progress=False)


def test_ranks_move_and_the_budget_holds(family_run):
    _, config, result = family_run
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    budget = result.metrics["budget_params"]
    assert [entry["step"] for entry in history] == decision_steps(6, config.schedule) == [1, 2, 3, 4, 5]
    assert sum(entry["resized_modules"] for entry in history) > 0
    assert len({tuple(entry["ranks"].values()) for entry in history}) > 1
    assert all(entry["used_params"] <= budget for entry in history)
    assert result.metrics["max_trainable_params"] <= budget
    assert all(record["trainable_params"] <= budget for record in read_jsonl(result.output_dir / "log.jsonl"))


def test_export_and_stock_peft_reload_give_the_trained_logits(family_run, tmp_path):
    _, config, result = family_run
    exported = export_run(result.output_dir, tmp_path / "export")
    assert exported["max_logit_diff"] < 1e-4 and exported["adapter_max_logit_diff"] < 1e-5
    portable = json.loads((Path(exported["adapter"]) / "adapter_config.json").read_text())
    trained = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert portable["alpha_pattern"] == {} and not portable["use_rslora"]
    assert trained["use_rslora"] or trained["alpha_pattern"]  # the run's own adapter needs a scale rule: folded now
    assert portable["rank_pattern"] == trained["rank_pattern"] and portable["lora_alpha"] == config.adapter.alpha
    assert "Scale convention" in (Path(exported["adapter"]) / "README.md").read_text()

    remote = config.model.trust_remote_code
    base, processor = load_model(config.model.name_or_path, trust_remote_code=remote)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    encoder = ChatEncoder(processor, config.data.system_prompt)
    _, samples = load_samples(config.data, seed=0)
    batch = collate([encoder.encode(s) for s in samples[:3]], encoder.pad_token_id)
    batch.pop("labels")
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)
        portable_model = PeftModel.from_pretrained(
            load_model(config.model.name_or_path, trust_remote_code=remote)[0], exported["adapter"]
        ).eval()
        torch.testing.assert_close(portable_model(**batch).logits, expected, rtol=0, atol=1e-5)
        merged, _ = load_model(exported["merged"], trust_remote_code=remote)
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)


def test_registry_names_every_part(family_run):
    """Decoder layers hold every target; the vision tower's layers and the projector are where the registry says."""
    name, _, result = family_run
    model = result.model.base_model.model
    path, layers = decoder_layers(model)
    assert len(layers) == 2
    ranks = json.loads((result.output_dir / "allocation.json").read_text())["ranks"]
    assert ranks and all(target.startswith(path + ".") for target in ranks)
    spec = arch_spec(model)
    if name in TEXT_FAMILIES:
        assert spec.vision_layers is None and spec.projector is None and vision_layers(model) is None
        return
    _, tower = vision_layers(model)
    assert isinstance(tower, torch.nn.ModuleList) and len(tower) == 2
    assert sum(p.numel() for p in model.get_submodule(spec.projector).parameters()) > 0


@pytest.mark.parametrize("name", ["llava_next", "idefics3"])
def test_images_of_different_sizes_batch_like_one_at_a_time(name, tmp_path):
    """Crops per image (LLaVA-NeXT) and tiles per image (Idefics3) vary with the image's shape: a batch pads them,
    and the model's logits for each row are those of the sample alone."""
    model, processor = VISION_FAMILIES[name]()
    encoder = ChatEncoder(processor)
    messages = ({"role": "user", "content": "<image>\nwhat colour?"}, {"role": "assistant", "content": "red"})
    items = []
    for index, size in enumerate([(32, 32), (64, 24)]):
        Image.new("RGB", size, "red").save(tmp_path / f"{index}.png")
        items.append(encoder.encode(Sample(messages, (tmp_path / f"{index}.png",))))
    batch = collate(items, encoder.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        together = model.eval()(**batch).logits
        for row, item in enumerate(items):
            alone = collate([item], encoder.pad_token_id)
            alone.pop("labels")
            width = len(item.input_ids)
            torch.testing.assert_close(together[row, :width], model(**alone).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "image_text", "key", "image_token"),
    [
        ("qwen2_vl", "<|vision_start|><|image_pad|>", "mm_token_type_ids", "<|image_pad|>"),
        ("gemma3", "<start_of_image><image_soft_token>", "token_type_ids", "<image_soft_token>"),
        ("paligemma", "<image><image>", "token_type_ids", None),
    ],
)
def test_prompts_spell_images_the_family_way_and_mark_tokens(name, image_text, key, image_token, colour_dataset):
    """`<image>` becomes what the family's processor expands; per-token outputs mark the image tokens (Qwen2-VL's
    M-RoPE, Gemma 3's bidirectional image attention) or PaliGemma's causal suffix (the answer), nothing else."""
    _, processor = VISION_FAMILIES[name]()
    encoder = ChatEncoder(processor, "Answer briefly.")
    item = encoder.encode(load_json_samples(colour_dataset[0])[0])
    assert image_text in encoder.tokenizer.decode(item.input_ids[: item.prompt_length])
    assert set(item.token_types) == {key} and len(item.token_types[key]) == len(item.input_ids)
    marked = [index for index, value in enumerate(item.token_types[key]) if value]
    if image_token is None:  # PaliGemma: the answer is the causal suffix
        assert marked == list(range(item.prompt_length, len(item.input_ids)))
    else:
        image_id = encoder.tokenizer.convert_tokens_to_ids(image_token)
        assert marked == [index for index, token in enumerate(item.input_ids) if token == image_id]
    batch = collate([item, item], encoder.pad_token_id, prompt_only=True)
    assert batch[key].shape == batch["input_ids"].shape


def test_an_unknown_vision_backbone_is_named(tokenizer):
    vision = tiny_vit(tf.ViTConfig, 28)
    text = text_config(tf.LlamaConfig, tokenizer)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text))
    with pytest.raises(ModelLoadError, match=r"'vit' backbone, which is not in .*VISION_BACKBONES"):
        vision_layers(model)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics3"])
def test_towers_share_one_budget_and_reload_with_stock_peft(name, tiny_llava_dir, tmp_path):
    """Vision-tower and projector targets join the hierarchy: one budget across towers, resized, reloaded by PEFT."""
    model_dir = save_family(name, tmp_path / f"{name}-model", tiny_llava_dir)
    config = tiny_config(model_dir, write_colour_dataset(tmp_path / "data", count=8), tmp_path / "run", max_steps=4)
    config.adapter.method = "hydra"
    config.adapter.towers = ["language", "vision", "projector"]
    config.adapter.max_rank = 6
    config.train.debug_checks = True
    config.schedule = ScheduleConfig(warmup_fraction=0.25, interval_fraction=0.25, freeze_fraction=0.9)
    result = run(config, show_progress=False)

    model = result.model.base_model.model
    spec = arch_spec(model)
    vision_path, _ = vision_layers(model)
    ranks = json.loads((result.output_dir / "allocation.json").read_text())["ranks"]
    prefixes = {"language": decoder_layers(model)[0], "vision": vision_path, "projector": spec.projector}
    by_tower = {
        tower: {n: r for n, r in ranks.items() if n.startswith(prefix + ".")} for tower, prefix in prefixes.items()
    }
    assert all(by_tower.values()) and sum(map(len, by_tower.values())) == len(ranks)
    costs = {n: m.in_features + m.out_features for n, m in model.named_modules() if n in ranks}
    budget = config.adapter.rank * sum(costs.values())  # uniform LoRA at r0 on all three towers
    assert result.metrics["budget_params"] == budget >= result.metrics["max_trainable_params"]
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert sum(entry["resized_modules"] for entry in history) > 0
    trained = {
        n.split(".lora_B")[0] for n, p in result.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0
    }
    assert any(n.startswith(f"base_model.model.{vision_path}") for n in trained)  # the vision adapters learned

    base, processor = load_model(str(model_dir))
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    encoder = ChatEncoder(processor, config.data.system_prompt)
    _, samples = load_samples(config.data, seed=0)
    batch = collate([encoder.encode(s) for s in samples[:2]], encoder.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, result.model.eval()(**batch).logits)


def test_a_text_only_model_has_no_vision_tower_to_adapt(tiny_llava_dir, tmp_path):
    from hydra_rank.errors import ConfigError
    from hydra_rank.rank.budget import discover_targets

    model, _ = TEXT_FAMILIES["qwen2"]()
    with pytest.raises(ConfigError, match=r"remove 'vision' from adapter\.towers"):
        discover_targets(model, towers=["language", "vision"])
