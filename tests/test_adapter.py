"""Heterogeneous ranks as a stock PEFT adapter: exact pattern keys, constant scale, save/reload, merge."""

import re

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from transformers import LlavaForConditionalGeneration

from hydra_rank.adapter import attach_lora, lora_config, trainable_parameters
from hydra_rank.config import AdapterConfig
from hydra_rank.rank.budget import Allocation, discover_targets
from hydra_rank.rank.lora import pattern_key

from .conftest import make_tiny_llava


def uneven(targets, rank=4):
    return Allocation({t.name: 1 + i % 6 for i, t in enumerate(targets)}, budget=10**9, info={})


def test_every_pattern_key_hits_exactly_its_own_module(tokenizer):
    """PEFT matches keys as regex suffixes; a near-miss must not match (layers.1 vs layers.11, vision q_proj)."""
    model, _ = make_tiny_llava(tokenizer)
    names = [name for name, _ in model.named_modules()]
    names += ["model.language_model.layers.11.self_attn.q_proj", "xmodel.language_model.layers.1.self_attn.q_proj"]
    for target in discover_targets(model):
        key = pattern_key(target.name)
        matches = [name for name in names if re.match(rf"(.*\.)?({key})$", name)]
        assert matches == [target.name]
        assert get_pattern_key([key], target.name) == key  # PEFT's own lookup agrees


def test_ranks_and_scale_follow_the_allocation(tokenizer):
    model, _ = make_tiny_llava(tokenizer)
    targets = discover_targets(model)
    allocation = uneven(targets)
    config = AdapterConfig(rank=4, alpha=8.0)  # the default rank_scale: sqrt
    peft_model = attach_lora(model, config, allocation)
    layers = {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(allocation.ranks)  # nothing in the vision tower
    for name, layer in layers.items():
        rank = allocation.ranks[name]
        assert layer.r["default"] == rank
        assert layer.scaling["default"] == pytest.approx(2.0 * (4 / rank) ** 0.5)  # alpha/r0 · sqrt(r0/r)
        assert layer.lora_A["default"].weight.shape[0] == allocation.ranks[name]  # physically that size
    assert trainable_parameters(peft_model) == allocation.params(targets)


def test_uniform_allocation_is_plain_lora(tokenizer):
    model, _ = make_tiny_llava(tokenizer)
    config = lora_config(AdapterConfig(rank=4), Allocation.uniform(discover_targets(model), 4))
    assert config.r == 4 and config.rank_pattern == {} and config.alpha_pattern == {}


def test_save_reload_with_stock_peft_and_merge(tokenizer, tmp_path):
    model, _ = make_tiny_llava(tokenizer)
    model.save_pretrained(tmp_path / "base")
    targets = discover_targets(model)
    peft_model = attach_lora(model, AdapterConfig(rank=4, alpha=8.0), uneven(targets))
    torch.manual_seed(0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # a trained-looking adapter, so the check is not trivially zero
    peft_model.save_pretrained(tmp_path / "adapter")

    ids = torch.randint(0, 1000, (2, 9))
    fresh = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert not torch.equal(
            LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")(input_ids=ids).logits, expected
        )
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
