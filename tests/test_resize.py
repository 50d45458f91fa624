"""Resizing LoRA modules in place: exactness of grow and shrink, scale, PEFT round trip, training afterwards."""

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import LlavaForConditionalGeneration

from hydra_rank.adapter import attach_lora
from hydra_rank.config import RANK_SCALES, AdapterConfig
from hydra_rank.loop import rebind_optimizer
from hydra_rank.rank.budget import Allocation, discover_targets
from hydra_rank.rank.lora import ADAPTER, fold_scales, lora_layers
from hydra_rank.rank.resize import apply_allocation, factorize, resize_layer

from .conftest import make_tiny_llava


def delta_w(layer) -> torch.Tensor:
    return layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight


def expected_scale(rank_scale: str, rank: int) -> float:
    """alpha/r0 = 2 at r0 = 4 under both conventions; sqrt: times sqrt(r0/rank)."""
    return 2.0 if rank_scale == "fixed" else 2.0 * math.sqrt(4 / rank)


@pytest.fixture(params=RANK_SCALES)
def rank_scale(request) -> str:
    return request.param


@pytest.fixture
def adapted(tokenizer, tmp_path, rank_scale):
    model, _ = make_tiny_llava(tokenizer)
    model.save_pretrained(tmp_path / "base")  # the clean base, for reload checks
    targets = discover_targets(model)
    config = AdapterConfig(rank=4, alpha=8.0, rank_scale=rank_scale)
    peft_model = attach_lora(model, config, Allocation.uniform(targets, 4))
    assert all(layer.scaling[ADAPTER] == 2.0 for layer in lora_layers(peft_model).values())  # uniform LoRA's
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.3)  # as if trained
    return peft_model, targets


def test_factorize_reproduces_the_product():
    b, a = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    left, sigma, right = factorize(b, a)
    torch.testing.assert_close(left @ torch.diag(sigma) @ right.T, b @ a)
    torch.testing.assert_close(left.T @ left, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(right.T @ right, torch.eye(3, dtype=torch.float64))


def test_grow_keeps_outputs_and_adds_orthogonal_random_directions(adapted, rank_scale):
    model, targets = adapted
    name = targets[4].name  # a gate_proj: 32 -> 64
    layer = lora_layers(model)[name]
    x = torch.randn(3, 32)
    before_out, before_w = layer(x), delta_w(layer)
    old_rows = layer.lora_A[ADAPTER].weight.detach().clone()
    result = resize_layer(layer, name, 7, generator=torch.Generator().manual_seed(5))
    assert (result.old_rank, result.new_rank, result.dropped_energy) == (4, 7, 0.0)
    assert layer.lora_A[ADAPTER].weight.shape == (7, 32) and layer.lora_B[ADAPTER].weight.shape == (64, 7)
    torch.testing.assert_close(delta_w(layer), before_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer(x), before_out, atol=1e-5, rtol=1e-5)
    assert torch.all(layer.lora_B[ADAPTER].weight[:, 4:] == 0)
    assert torch.equal(layer.lora_A[ADAPTER].weight[:4], old_rows)  # growing keeps A (and B, up to the scale)
    new_rows = layer.lora_A[ADAPTER].weight[4:].detach()
    assert (new_rows @ old_rows.T).abs().max() < 1e-5  # orthogonal to what A already covered
    assert (new_rows @ new_rows.T - torch.diag(new_rows.norm(dim=1) ** 2)).abs().max() < 1e-5  # and to each other
    rms = float(old_rows.norm() / 2)
    torch.testing.assert_close(new_rows.norm(dim=1), torch.full((3,), rms), rtol=1e-5, atol=0)  # old rows' RMS norm
    assert layer.scaling[ADAPTER] == pytest.approx(expected_scale(rank_scale, 7))
    assert layer.lora_alpha[ADAPTER] == pytest.approx(14.0 if rank_scale == "fixed" else 4.0)
    assert layer.lora_A[ADAPTER].weight.requires_grad and layer.lora_B[ADAPTER].weight.requires_grad


def test_shrink_error_is_exactly_the_dropped_energy(adapted, rank_scale):
    model, targets = adapted
    name = targets[0].name
    layer = lora_layers(model)[name]
    before = delta_w(layer).detach().double()
    singular = torch.linalg.svdvals(before)
    result = resize_layer(layer, name, 2)
    assert layer.scaling[ADAPTER] == pytest.approx(expected_scale(rank_scale, 2))
    after = delta_w(layer).detach().double()
    error = float((before - after).square().sum())
    assert result.dropped_energy == pytest.approx(float(singular[2:].square().sum()), rel=1e-6)
    assert error == pytest.approx(result.dropped_energy, rel=1e-4)
    torch.testing.assert_close(torch.linalg.svdvals(after)[:2], singular[:2], rtol=1e-5, atol=1e-7)


def test_resizing_an_untrained_adapter_keeps_it_trainable(tokenizer):
    """B = 0 at the start: re-factoring must not zero A too, or the module could never learn."""
    model, _ = make_tiny_llava(tokenizer)
    targets = discover_targets(model)
    peft_model = attach_lora(model, AdapterConfig(rank=4), Allocation.uniform(targets, 4))
    layer = lora_layers(peft_model)[targets[0].name]
    rms = float(layer.lora_A[ADAPTER].weight.detach().square().mean(dim=1).sum().sqrt() / 2)
    resize_layer(layer, targets[0].name, 6)
    grown = layer.lora_A[ADAPTER].weight.detach().norm(dim=1)
    torch.testing.assert_close(grown[4:], torch.full((2,), rms * 32**0.5), rtol=1e-5, atol=0)
    resize_layer(layer, targets[0].name, 2)
    rows = layer.lora_A[ADAPTER].weight.detach().norm(dim=1)
    assert torch.all(rows > 0.5 * rms * 32**0.5)


def test_optimizer_state_is_carried_when_growing_and_reset_when_shrinking(adapted, rank_scale):
    model, targets = adapted
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    grow, shrink = lora_layers(model)[targets[0].name], lora_layers(model)[targets[1].name]
    old_a, old_shrink_a = grow.lora_A[ADAPTER].weight, shrink.lora_A[ADAPTER].weight
    old_state = {k: v.clone() for k, v in optimizer.state[old_a].items()}
    old_b_state = {k: v.clone() for k, v in optimizer.state[grow.lora_B[ADAPTER].weight].items()}
    slot = next(i for i, p in enumerate(optimizer.param_groups[0]["params"]) if p is old_a)
    resize_layer(grow, targets[0].name, 6, optimizer=optimizer)
    resize_layer(shrink, targets[1].name, 2, optimizer=optimizer)
    new_a = grow.lora_A[ADAPTER].weight
    assert optimizer.param_groups[0]["params"][slot] is new_a
    state = optimizer.state[new_a]
    assert torch.equal(state["exp_avg"][:4], old_state["exp_avg"]) and torch.all(state["exp_avg"][4:] == 0)
    assert torch.equal(state["exp_avg_sq"][:4], old_state["exp_avg_sq"])
    torch.testing.assert_close(state["exp_avg_sq"][4:], torch.full((2, 32), float(old_state["exp_avg_sq"].mean())))
    assert torch.equal(state["step"], old_state["step"])
    # B was multiplied by s_old/s_new to keep ΔW, so its gradients, and moments, scale by the inverse
    ratio = expected_scale(rank_scale, 6) / expected_scale(rank_scale, 4)
    b_state = optimizer.state[grow.lora_B[ADAPTER].weight]
    torch.testing.assert_close(b_state["exp_avg"][:, :4], old_b_state["exp_avg"] * ratio)
    torch.testing.assert_close(b_state["exp_avg_sq"][:, :4], old_b_state["exp_avg_sq"] * ratio**2)
    live = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(old_shrink_a) not in live and old_shrink_a not in optimizer.state
    rebind_optimizer(optimizer, model, step=3)
    assert optimizer.param_groups[-1]["born"] == 3
    assert {id(p) for p in optimizer.param_groups[-1]["params"]} == {
        id(shrink.lora_A[ADAPTER].weight),
        id(shrink.lora_B[ADAPTER].weight),
    }


def test_resized_adapter_saves_and_reloads_with_stock_peft(adapted, tmp_path):
    model, targets = adapted
    ranks = {t.name: 1 + (i * 5) % 8 for i, t in enumerate(targets)}
    results = apply_allocation(model, Allocation(ranks, budget=10**9))
    assert {r.name for r in results} == {n for n, r in ranks.items() if r != 4}
    assert {n: layer.r[ADAPTER] for n, layer in lora_layers(model).items()} == ranks
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        r * t.cost for r, t in zip(ranks.values(), targets, strict=True)
    )
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_training_continues_after_a_resize(adapted):
    model, targets = adapted
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 6))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    step()
    apply_allocation(model, Allocation({t.name: 2 if i % 2 else 6 for i, t in enumerate(targets)}, budget=10**9))
    rebind_optimizer(optimizer, model, step=1)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    losses = [step() for _ in range(15)]
    assert losses[-1] < losses[0]
    grown = lora_layers(model)[targets[0].name].lora_B[ADAPTER].weight
    assert grown[:, 4:].abs().sum() > 0  # the new directions learned


def test_a_static_allocation_attaches_at_the_conventions_scale_and_reloads(tokenizer, tmp_path, rank_scale):
    model, _ = make_tiny_llava(tokenizer)
    model.save_pretrained(tmp_path / "base")
    targets = discover_targets(model)
    ranks = {t.name: 1 + (i * 3) % 8 for i, t in enumerate(targets)}
    config = AdapterConfig(method="hydra-static", rank=4, alpha=8.0, rank_scale=rank_scale)
    peft_model = attach_lora(model, config, Allocation(ranks, budget=10**9))
    for name, layer in lora_layers(peft_model).items():
        assert layer.scaling[ADAPTER] == pytest.approx(expected_scale(rank_scale, ranks[name]))
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    assert {n: layer.scaling[ADAPTER] for n, layer in lora_layers(saved).items()} == {
        n: layer.scaling[ADAPTER] for n, layer in lora_layers(peft_model).items()
    }


def test_uniform_lora_ignores_the_convention(tokenizer):
    """rank_scale is a rule for ranks other than r0: uniform LoRA (which never allocates) is plain PEFT LoRA."""
    model, _ = make_tiny_llava(tokenizer)
    targets = discover_targets(model)
    peft_model = attach_lora(model, AdapterConfig(method="lora", rank_scale="sqrt"), Allocation.uniform(targets, 4))
    config = peft_model.peft_config[ADAPTER]
    assert not config.use_rslora and config.lora_alpha == 8.0


def test_folded_scales_keep_every_update_without_scale_patterns(adapted, rank_scale, tmp_path):
    """The portable adapter: alpha/r_m with one global alpha (what llama.cpp applies), same ΔW, same ranks."""
    model, targets = adapted
    ranks = {t.name: 1 + (i * 5) % 8 for i, t in enumerate(targets)}
    apply_allocation(model, Allocation(ranks, budget=10**9))
    before = {name: delta_w(layer).detach().clone() for name, layer in lora_layers(model).items()}
    fold_scales(model, alpha=8.0)
    for name, layer in lora_layers(model).items():
        assert layer.r[ADAPTER] == ranks[name] and layer.scaling[ADAPTER] == 8.0 / ranks[name]
        torch.testing.assert_close(delta_w(layer), before[name], rtol=1e-5, atol=1e-7)
    model.save_pretrained(tmp_path / "portable")
    saved = json.loads((tmp_path / "portable" / "adapter_config.json").read_text())
    assert saved["alpha_pattern"] == {} and saved["use_rslora"] is False and saved["lora_alpha"] == 8.0
    reloaded = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "portable"
    )
    assert {n: layer.scaling[ADAPTER] for n, layer in lora_layers(reloaded).items()} == {
        n: 8.0 / r for n, r in ranks.items()
    }
