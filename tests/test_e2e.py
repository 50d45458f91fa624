"""End to end on the real shipped weights: the built-in tiny VLM, easy-VQA, a short LoRA run, a stock-PEFT reload.

The first test run builds the built-in VLM into the cache (a few minutes on 2 CPU cores); later runs reuse it.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from hydra_rank import builtin
from hydra_rank.builtin import tiny_vlm_path
from hydra_rank.config import DEFAULT_SYSTEM_PROMPT, from_dict
from hydra_rank.data import ChatEncoder, collate, easy_vqa
from hydra_rank.data.sample import Sample
from hydra_rank.evaluate import generate_answers, mean_answer_loss
from hydra_rank.inputs import model_identity
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built():
    path = tiny_vlm_path()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()  # stock transformers, no code of ours
    return path, model, AutoProcessor.from_pretrained(path)


def test_builtin_vlm_is_a_plain_llava_checkpoint(built):
    path, model, processor = built
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.vision_config.model_type == "dinov2" and model.config.text_config.model_type == "llama"
    assert 150e6 < sum(p.numel() for p in model.parameters()) < 160e6
    stage1 = json.loads((path / "hydra_rank_recipe.json").read_text())["stage1"]
    assert stage1["projector"] == "shipped"  # trained for these source weights: the same VLM on every CPU
    assert stage1["caption_loss_after"] < stage1["caption_loss_before"] / 3


def test_stage1_writes_a_projector_only_its_own_recipe_and_sources_use(built, tmp_path, monkeypatch):
    """`prepare --retrain-projector`: stage 1 trains the projector and writes it with what it was trained for; a
    build takes it only for that recipe and the source weights installed here."""
    recipe = builtin.TinyVLMRecipe(projector_steps=3, warmup_steps=1)
    path = tmp_path / "projector.safetensors"
    stats = builtin.write_projector(path, recipe)
    assert stats["caption_loss_after"] < stats["caption_loss_before"]

    weights, recorded = builtin.shipped_projector(recipe, path)
    assert recorded == stats
    fresh, _ = builtin.assemble(recipe)
    initial = fresh.model.multi_modal_projector.state_dict()
    assert set(weights) == set(initial) and all(weights[k].shape == initial[k].shape for k in initial)
    assert not torch.equal(weights["linear_2.weight"], initial["linear_2.weight"])  # trained, not the initialisation

    assert builtin.shipped_projector(builtin.TinyVLMRecipe(), path) == ({}, {"reason": "another stage-1 recipe"})
    monkeypatch.setattr(builtin, "source_weights", lambda: {"gguf_sha256": "other", "onnx_sha256": "other"})
    assert builtin.shipped_projector(recipe, path)[0] == {}


def test_assembly_does_not_depend_on_what_the_cache_held(built, monkeypatch):
    """Building a missing part (it initialises a model, drawing random numbers) must not shift the projector's
    initialisation: the VLM has to be the same whether or not the cache already held its language model."""
    recipe = builtin.TinyVLMRecipe()
    first, _ = builtin.assemble(recipe)
    cached_language = builtin.smollm2_path

    def building_language() -> Path:
        torch.randn(10_000)  # what building it would draw
        return cached_language()

    monkeypatch.setattr(builtin, "smollm2_path", building_language)
    second, _ = builtin.assemble(recipe)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


def test_generation_returns_answers_in_the_items_order(built):
    """Generation batches prompts sorted by length; every answer must still land at its own item's index. One item
    per batch, so the order is the only thing that differs between the two calls."""
    _, model, processor = built
    encoder = ChatEncoder(processor, DEFAULT_SYSTEM_PROMPT)
    samples = easy_vqa.questions("test")[:3] + easy_vqa.captions("test")[:3]
    items = [encoder.encode(sample) for sample in samples]
    lengths = [item.prompt_length for item in items]
    assert lengths != sorted(lengths)  # the sort permutes them
    answers = generate_answers(model, encoder, items, batch_size=1, max_new_tokens=8, show_progress=False)
    backwards = generate_answers(model, encoder, items[::-1], batch_size=1, max_new_tokens=8, show_progress=False)
    assert len(set(answers)) > 2  # otherwise the order could not show
    assert backwards == answers[::-1]


def test_projector_carries_image_content(built):
    """Stage 1 taught the projector to describe images: captions cost less with their own image than with another's."""
    _, model, processor = built
    encoder = ChatEncoder(processor, DEFAULT_SYSTEM_PROMPT)
    captions = easy_vqa.captions("test")[:32]
    shuffled = [Sample(c.messages, captions[(i + 7) % 32].images) for i, c in enumerate(captions)]
    own = mean_answer_loss(model, [encoder.encode(s) for s in captions], encoder.pad_token_id)
    other = mean_answer_loss(model, [encoder.encode(s) for s in shuffled], encoder.pad_token_id)
    assert own < 0.6 * other


def test_lora_on_easy_vqa_learns_and_reloads_with_stock_peft(built, tmp_path, reference):
    path, base, processor = built
    config = from_dict(
        {
            "data": {"eval_samples": 32},
            "adapter": {"method": "lora"},
            "train": {"max_steps": 8, "batch_size": 8, "warmup_steps": 2, "output_dir": str(tmp_path / "run")},
        }
    )
    encoder = ChatEncoder(processor, config.data.system_prompt)
    held_out = [encoder.encode(s) for s in easy_vqa.questions("test")[:32]]
    before = mean_answer_loss(base, held_out, encoder.pad_token_id)

    result = run(config, show_progress=False)
    losses = [r["loss"] for r in read_jsonl(result.output_dir / "log.jsonl")]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2, losses
    assert result.metrics["eval_loss"] < 0.5 * before
    assert result.metrics["trainable_params"] == result.metrics["budget_params"] == 4 * 30 * 10_176
    weights = model_identity("builtin:tiny-vlm", str(path))["weights_sha256"]["model.safetensors"][:12]
    reference.check("lora_easy_vqa_8_steps", {"losses": losses, "eval_loss": result.metrics["eval_loss"]}, weights)

    fresh_base = AutoModelForImageTextToText.from_pretrained(path)  # PEFT injects into the model it is given
    reloaded = PeftModel.from_pretrained(fresh_base, result.output_dir / "adapter").eval()
    batch = collate(held_out[:4], encoder.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, result.model.eval()(**batch).logits)


def test_text_only_smollm2_trains_on_text_tasks(tmp_path, reference):
    """The same pipeline with a plain causal LM and its tokenizer (no images, no processor)."""
    config = from_dict(
        {
            "model": {"name_or_path": "builtin:smollm2"},
            "data": {"dataset": "text-tasks", "eval_samples": 16},
            "adapter": {"method": "hydra", "rank": 2, "alpha": 4.0},
            "schedule": {"warmup_fraction": 0.25, "interval_fraction": 0.25, "freeze_fraction": 0.75},
            "train": {"max_steps": 4, "batch_size": 4, "output_dir": str(tmp_path / "run"), "debug_checks": True},
            "eval": {"max_new_tokens": 12},
        }
    )
    result = run(config, show_progress=False)
    assert result.metrics["decisions"] == 3 and result.metrics["used_params"] <= result.metrics["budget_params"]
    assert type(result.model.base_model.model).__name__ == "LlamaForCausalLM"
    losses = [r["loss"] for r in read_jsonl(result.output_dir / "log.jsonl")]
    reference.check("hydra_text_tasks_4_steps", {"losses": losses, "eval_loss": result.metrics["eval_loss"]})


def test_demo_runs_both_methods_on_its_task(tmp_path, monkeypatch):
    """`hydra-rank demo`, shortened (2 steps, 4 questions): both methods train on the demo's task at its settings and
    the same budget, and the table and report come out."""
    from typer.testing import CliRunner

    from hydra_rank import cli

    monkeypatch.setitem(cli.DEMO_SETTINGS, "data.eval_samples", 4)
    result = CliRunner().invoke(cli.app, ["demo", "--output-dir", str(tmp_path), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in rows] == ["lora", "hydra"]
    for row in rows:
        assert (row["dataset"], row["rank"], row["lr"], row["seed"]) == ("scenes", 4, 4e-3, 0)
        assert row["max_trainable_params"] <= row["budget_params"] == rows[0]["budget_params"]
    config = yaml.safe_load((tmp_path / "hydra" / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 2 and config["data"]["validation_samples"] == 300
    assert "hydra" in result.output and (tmp_path / "report.html").is_file()
