"""Rank 0 (`adapter.min_rank: 0`): a module may lose its adapter entirely, its parameters spent elsewhere, and grow
one again; the saved adapter is stock PEFT (the module is simply not a target)."""

import json

import pytest
import torch
from peft import PeftModel

from hydra_rank.config import ScheduleConfig
from hydra_rank.inputs import load_model
from hydra_rank.rank.budget import Allocation
from hydra_rank.rank.lora import ADAPTER, lora_layers
from hydra_rank.rank.resize import resize_layer
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

from .test_resize import adapted, delta_w, rank_scale  # noqa: F401 - the fixtures are used by name
from .test_train import tiny_config


def test_a_module_shrinks_to_nothing_and_grows_back(adapted):  # noqa: F811
    model, targets = adapted
    target = targets[0]
    layer = lora_layers(model)[target.name]
    x = torch.randn(3, target.d_in)
    result = resize_layer(layer, target.name, 0)
    assert result.dropped_energy > 0 and layer.r[ADAPTER] == 0
    assert layer.lora_A[ADAPTER].weight.shape == (0, target.d_in) and layer.lora_A[ADAPTER].weight.requires_grad
    assert not delta_w(layer).any() and delta_w(layer).shape == (target.d_out, target.d_in)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.get_base_layer()(x))  # no adapter left: the base layer's output
    resize_layer(layer, target.name, 3)
    a = layer.lora_A[ADAPTER].weight
    assert a.shape == (3, target.d_in) and torch.allclose(a @ a.T, a.norm(dim=1).mean() ** 2 * torch.eye(3))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.get_base_layer()(x))  # B starts at zero: nothing changes yet


@pytest.fixture(scope="module")
def zero_run(tiny_llava_dir, tmp_path_factory):
    from .conftest import write_colour_dataset

    root = tmp_path_factory.mktemp("zero")
    dataset = write_colour_dataset(root / "data", count=16)
    config = tiny_config(
        tiny_llava_dir, dataset, root / "run", max_steps=12, grad_accum=2, debug_checks=True, checkpoint_every=4
    )
    config.adapter.method = "hydra"
    config.adapter.rank, config.adapter.alpha = 1, 2.0
    config.adapter.min_rank, config.adapter.max_rank = 0, 4
    config.schedule = ScheduleConfig(warmup_fraction=0.1, interval_fraction=0.1, freeze_fraction=0.9, signal_steps=1)
    return config, run(config, show_progress=False)


def test_budget_holds_with_modules_at_rank_zero(zero_run):
    _, result = zero_run
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert any(0 in entry["ranks"].values() for entry in history)  # modules really lost their adapter
    assert all(entry["used_params"] <= entry["budget_params"] for entry in history)  # debug_checks held every step
    assert result.metrics["rank_min"] == min(history[-1]["ranks"].values())


def test_saved_adapter_leaves_out_rank_zero_modules_and_reloads_with_stock_peft(zero_run):
    config, result = zero_run
    final = Allocation.load(result.output_dir / "allocation.json")
    saved = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    dropped = {name for name, rank in final.ranks.items() if rank == 0}
    assert set(saved["target_modules"]) == set(final.ranks) - dropped
    assert all(rank > 0 for rank in saved["rank_pattern"].values())
    base, _ = load_model(config.model.name_or_path)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    assert set(lora_layers(reloaded)) == set(final.ranks) - dropped
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


def test_resume_with_rank_zero_modules_matches_the_uninterrupted_run(zero_run, tmp_path):
    config, result = zero_run
    losses = [record["loss"] for record in read_jsonl(result.output_dir / "log.jsonl")]
    resumed = run(config, resume=True, show_progress=False)  # from the newest checkpoint (step 8)
    assert resumed.metrics["resumed_from_step"] == 8
    assert [record["loss"] for record in read_jsonl(resumed.output_dir / "log.jsonl")] == losses
