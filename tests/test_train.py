"""A whole training run on a tiny random LLaVA and a generated LLaVA-JSON dataset: outputs, reload, refusals."""

import json
import math

import numpy as np
import pytest
import torch
from peft import PeftModel

from hydra_rank.config import ScheduleConfig, from_dict
from hydra_rank.data import ChatEncoder, collate, load_samples
from hydra_rank.errors import ConfigError
from hydra_rank.inputs import load_model
from hydra_rank.rank.budget import Allocation, discover_targets
from hydra_rank.rank.lora import lora_layers
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl


def tiny_config(model_dir, dataset, output_dir, **train):
    train_path, eval_path = dataset
    return from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"dataset": "llava-json", "train_path": str(train_path), "eval_path": str(eval_path)},
            "adapter": {"method": "lora", "rank": 2, "alpha": 4},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_steps": 2, "output_dir": str(output_dir)}
            | train,
            "eval": {"batch_size": 4, "max_new_tokens": 3},
        }
    )


@pytest.fixture(scope="module")
def finished(tiny_llava_dir, tmp_path_factory):
    from .conftest import write_colour_dataset

    root = tmp_path_factory.mktemp("run")
    config = tiny_config(tiny_llava_dir, write_colour_dataset(root / "data"), root / "out", eval_every=2, grad_accum=2)
    return config, run(config, show_progress=False)


def test_run_writes_every_output(finished):
    config, result = finished
    out = result.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    for key in ("method", "trainable_params", "budget_params", "eval_accuracy", "eval_loss", "wall_time_s"):
        assert key in metrics, key
    assert metrics["peak_rss_mb"] > 100
    assert 0 <= metrics["eval_accuracy"] <= 1 and math.isfinite(metrics["eval_loss"])
    # uniform LoRA at rank r uses exactly the budget r * sum(d_in + d_out): 2 layers x (q,k,v,o,gate,up,down)
    per_layer = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64)
    assert metrics["budget_params"] == metrics["trainable_params"] == 2 * 2 * per_layer
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens"} <= set(log[0]) and "eval_loss" in log[1] and "eval_loss" not in log[3]
    assert log[0]["lr"] < log[1]["lr"]  # warm-up
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == metrics["eval_samples"] == 6
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "config.yaml").read_text() == config.to_yaml()


def test_saved_adapter_reloads_with_stock_peft_to_identical_logits(finished):
    config, result = finished
    base, processor = load_model(config.model.name_or_path)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    encoder = ChatEncoder(processor, config.data.system_prompt)
    _, samples = load_samples(config.data, seed=0)
    batch = collate([encoder.encode(s) for s in samples[:3]], encoder.pad_token_id)
    batch.pop("labels")
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        actual = reloaded(**batch).logits
    assert torch.equal(actual, expected)
    trained_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in trained_b)  # B starts at zero: training really changed the adapter


def test_refuses_to_overwrite_a_previous_run(finished):
    config, _ = finished
    with pytest.raises(ConfigError, match="already holds files"):
        run(config, show_progress=False)


def test_output_dir_that_is_a_file_is_a_clear_error(tiny_llava_dir, colour_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        run(tiny_config(tiny_llava_dir, colour_dataset, blocker / "out"), show_progress=False)


def test_same_seed_same_run(tiny_llava_dir, colour_dataset, tmp_path):
    first = run(tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "a", max_steps=2), show_progress=False)
    second = run(tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "b", max_steps=2), show_progress=False)
    losses = [[r["loss"] for r in read_jsonl(result.output_dir / "log.jsonl")] for result in (first, second)]
    assert losses[0] == losses[1]
    assert first.metrics["eval_loss"] == second.metrics["eval_loss"]


@pytest.mark.parametrize("method", ["hydra-static", "hydra-coarse", "hydra-fine"])
def test_hydra_methods_train_within_budget_and_reload(method, tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=2)
    config.adapter.method = method
    config.adapter.calibration_batches = 2
    result = run(config, show_progress=False)
    allocation = Allocation.load(result.output_dir / "allocation.json")
    metrics = result.metrics
    assert (
        metrics["trainable_params"]
        == metrics["used_params"]
        == allocation.params(
            [t for t in discover_targets(result.model.base_model.model) if t.name in allocation.ranks]
        )
    )
    assert metrics["used_params"] <= metrics["budget_params"] == 2 * 2 * 512
    assert allocation.info["mode"] == {"hydra-static": "hierarchical", "hydra-coarse": "coarse"}.get(method, "fine")
    assert allocation.info["calibration_seconds"] > 0 and metrics["calibration_time_s"] > 0
    assert (result.output_dir / "allocation.png").stat().st_size > 5_000

    base, _ = load_model(config.model.name_or_path)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=1)
    config.adapter.method = "rslora"
    result = run(config, show_progress=False)
    scales = [layer.scaling["default"] for layer in lora_layers(result.model).values()]
    assert scales == pytest.approx([config.adapter.alpha / math.sqrt(config.adapter.rank)] * len(scales))
    assert result.metrics["trainable_params"] == result.metrics["budget_params"]
    saved = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True


def test_eva_redistributes_ranks_from_activations_and_reloads(tiny_llava_dir, colour_dataset, tmp_path):
    """PEFT EVA as a peer: A starts from the inputs' top singular vectors, ranks move between modules (r0 per module
    on average, at most rho·r0), every module keeps the scale alpha/r0, and the adapter reloads in stock PEFT."""
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=2)
    config.adapter.method = "eva"
    config.adapter.calibration_batches = 2
    result = run(config, show_progress=False)
    ranks = Allocation.load(result.output_dir / "allocation.json").ranks
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 2 * config.adapter.rank
    assert sum(ranks.values()) == config.adapter.rank * len(ranks)  # EVA's budget is counted in ranks
    scales = [layer.scaling["default"] for layer in lora_layers(result.model).values()]
    assert scales == pytest.approx([config.adapter.alpha / config.adapter.rank] * len(scales))
    base, _ = load_model(config.model.name_or_path)
    assert result.metrics["trainable_params"] == sum(ranks[t.name] * t.cost for t in discover_targets(base))
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


def test_metrics_record_their_provenance(finished, tiny_llava_dir):
    _, result = finished
    provenance = json.loads((result.output_dir / "metrics.json").read_text())["provenance"]
    assert {"git", "versions", "machine", "base_model"} <= set(provenance)
    assert provenance["versions"]["torch"] == torch.__version__
    weights = provenance["base_model"]["weights_sha256"]
    assert list(weights) == ["model.safetensors"] and len(weights["model.safetensors"]) == 64
    assert provenance["base_model"]["source"] == str(tiny_llava_dir)


def test_saved_allocation_is_reused_and_checked(tiny_llava_dir, colour_dataset, tmp_path):
    from hydra_rank.commands import allocate_for_config

    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=1)
    config.adapter.calibration_batches = 1
    allocation, _ = allocate_for_config(config, tmp_path / "alloc", show_progress=False)
    assert allocation.info["method"] == "hydra" and len(set(allocation.ranks.values())) > 1  # a lora config: HyDRA's
    config.adapter.method = "hydra-static"
    config.adapter.allocation_path = str(tmp_path / "alloc" / "allocation.json")
    result = run(config, show_progress=False)
    assert Allocation.load(result.output_dir / "allocation.json").ranks == allocation.ranks
    assert result.metrics["calibration_time_s"] == allocation.info["calibration_seconds"]

    config.adapter.rank = 1  # a smaller budget: the saved allocation no longer fits
    config.train.output_dir = str(tmp_path / "out2")
    with pytest.raises(ConfigError, match="does not fit this run"):
        run(config, show_progress=False)


def test_adalora_baseline_prunes_towards_the_budget(tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=10)
    config.adapter.method = "adalora"
    result = run(config, show_progress=False)
    metrics = result.metrics
    init = 3  # ceil(1.5 x rank 2)
    assert metrics["trainable_params"] == metrics["max_trainable_params"] == init * (2 * 512 + 2 * 7)
    assert metrics["used_params"] < metrics["trainable_params"]  # singular values were masked
    assert metrics["used_params"] <= 1.1 * metrics["budget_params"]
    config_dict = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert config_dict["peft_type"] == "ADALORA" and config_dict["rank_pattern"]


def test_full_fine_tuning_trains_the_language_model_only(tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=2, lr=1e-4)
    config.adapter.method = "full"
    result = run(config, show_progress=False)
    model = result.model
    language = sum(p.numel() for p in model.model.language_model.parameters())
    assert result.metrics["trainable_params"] == language  # the head is tied to the embeddings
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert (result.output_dir / "model" / "model.safetensors").is_file()


def dynamic_config(model_dir, dataset, output_dir, **train):
    """HyDRA deciding at steps 1-5 of 6, with the budget checked after every step."""
    config = tiny_config(model_dir, dataset, output_dir, max_steps=6, debug_checks=True, **train)
    config.adapter.method, config.adapter.max_rank = "hydra", 6
    config.schedule = ScheduleConfig(
        warmup_fraction=0.2, interval_fraction=0.2, freeze_fraction=0.9, signal_steps=1, max_move_fraction=0.3
    )
    return config


def test_gradient_checkpointing_gives_the_same_decisions(tiny_llava_dir, tmp_path):
    """The recomputed forward must not feed the gradient sketches a second time: same spectra, same ranks."""
    from .conftest import write_colour_dataset

    dataset = write_colour_dataset(tmp_path / "data")
    histories, losses = [], []
    for checkpointing in (False, True):
        config = dynamic_config(tiny_llava_dir, dataset, tmp_path / f"run-{checkpointing}")
        config.train.gradient_checkpointing = checkpointing
        result = run(config, show_progress=False)
        histories.append([e["ranks"] for e in read_jsonl(result.output_dir / "allocation_history.jsonl")])
        losses.append([r["loss"] for r in read_jsonl(result.output_dir / "log.jsonl")])
    assert len(histories[0]) == 5 and len({tuple(h.values()) for h in histories[0]}) > 1  # ranks really moved
    assert histories[0] == histories[1]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_bf16_mixed_precision_trains_hydra_within_the_budget(tiny_llava_dir, tmp_path):
    from .conftest import write_colour_dataset

    dataset = write_colour_dataset(tmp_path / "data")
    losses = {}
    for precision in ("bf16", "no"):  # one process, two precisions: the second run must not inherit the first's
        config = dynamic_config(tiny_llava_dir, dataset, tmp_path / f"run-{precision}")
        config.train.mixed_precision = precision
        result = run(config, show_progress=False)
        history = read_jsonl(result.output_dir / "allocation_history.jsonl")
        assert len(history) == 5 and all(e["used_params"] <= e["budget_params"] for e in history)
        losses[precision] = [r["loss"] for r in read_jsonl(result.output_dir / "log.jsonl")]
        assert next(p for p in result.model.parameters() if p.requires_grad).dtype == torch.float32  # autocast only
    assert all(np.isfinite(losses["bf16"]))
    assert losses["bf16"][0] != losses["no"][0]  # the forward really ran in bf16
    np.testing.assert_allclose(losses["bf16"][0], losses["no"][0], rtol=0.05)
