"""Held-out attribution (`rank/probe.py`): the trapezoid over one probe batch against the probe loss it explains."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hydra_rank.rank.lora import ADAPTER, lora_layers
from hydra_rank.rank.probe import (
    RANK_ELASTICITY,
    IntervalProbe,
    direction_values,
    update_inner,
    value_curves,
    worth_curves,
)


def causal_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, int(batch["input_ids"].numel())


@pytest.fixture
def lora_llama(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    language = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).model.language_model
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj"])
    peft = get_peft_model(_CausalLM(language), config).double()  # float64: the loss change is far above rounding
    for layer in lora_layers(peft).values():  # a nonzero start, as after some training
        torch.nn.init.normal_(layer.lora_B[ADAPTER].weight, std=0.05)
    return peft


class _CausalLM(torch.nn.Module):
    """A decoder stack with a tied head: enough of a language model for a loss."""

    def __init__(self, language):
        super().__init__()
        self.language = language

    def forward(self, input_ids, labels):
        hidden = self.language(input_ids=input_ids).last_hidden_state
        logits = hidden @ self.language.embed_tokens.weight.T
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return type("Out", (), {"loss": loss})


def _move(model, names, size, seed):
    generator = torch.Generator().manual_seed(seed)
    layers = lora_layers(model)
    with torch.no_grad():
        for name in names:
            for weight in (layers[name].lora_A[ADAPTER].weight, layers[name].lora_B[ADAPTER].weight):
                weight.add_(size * torch.randn(weight.shape, generator=generator))


def test_trapezoid_explains_the_probe_loss_change_and_credits_only_modules_that_moved(lora_llama):
    model, batch = lora_llama, {"input_ids": torch.randint(0, 500, (3, 9), generator=torch.Generator().manual_seed(1))}
    layers = lora_layers(model)
    names = sorted(layers)
    probe = IntervalProbe(layers, names)
    probe.start()
    with torch.no_grad():
        before = float(causal_loss(model, batch)[0])
    moved = names[::2]
    _move(model, moved, 0.01, seed=2)
    end = {name: layers[name].lora_B[ADAPTER].weight.clone() for name in names}
    with torch.no_grad():
        after = float(causal_loss(model, batch)[0])
    gains = probe.gains(model, batch, causal_loss)
    assert gains.sum() == pytest.approx(before - after, rel=0.01)  # off by 0.2 %: the loss is nearly quadratic here
    assert all(gains[i] == 0 for i, name in enumerate(names) if name not in moved)
    assert any(gains[i] != 0 for i, name in enumerate(names) if name in moved)
    assert all(torch.equal(layers[n].lora_B[ADAPTER].weight, end[n]) for n in names)  # the model ends as it was
    assert all(p.grad is None for p in model.parameters())  # and no gradient is left behind


def test_direction_values_add_up_to_the_loss_change_since_no_update(lora_llama):
    """Every direction's value, over all modules, sums to L(no update) − L(now) on the batch (the trapezoid from
    zero); a module's directions come largest first, one value per unit of its rank; the model ends as it was."""
    model, batch = lora_llama, {"input_ids": torch.randint(0, 500, (3, 9), generator=torch.Generator().manual_seed(1))}
    layers = list(lora_layers(model).values())
    now = [layer.lora_B[ADAPTER].weight.clone() for layer in layers]
    with torch.no_grad():
        with_update = float(causal_loss(model, batch)[0])
        for layer in layers:
            layer.lora_B[ADAPTER].weight.zero_()
        without = float(causal_loss(model, batch)[0])
        for layer, b in zip(layers, now, strict=True):
            layer.lora_B[ADAPTER].weight.copy_(b)
    values = direction_values(model, layers, batch, causal_loss)
    assert [len(v) for v in values] == [3] * len(layers)
    assert sum(float(v.sum()) for v in values) == pytest.approx(without - with_update, rel=0.02)
    assert all(torch.equal(layer.lora_B[ADAPTER].weight, b) for layer, b in zip(layers, now, strict=True))


def test_update_inner_is_the_loss_slope_along_each_update_and_its_ends_make_the_trapezoid(lora_llama):
    """⟨G_m(t), ΔW_m⟩ is the derivative of the batch loss as module m's update alone grows past t·ΔW_m (every other
    update at t·ΔW too), checked by central differences at t = 0, ½ and 1; half the sum of the two ends is the
    trapezoid, which `direction_values` splits by direction. The model ends as it was."""
    import numpy as np

    model, batch = lora_llama, {"input_ids": torch.randint(0, 500, (3, 9), generator=torch.Generator().manual_seed(1))}
    layers = list(lora_layers(model).values())
    now = [layer.lora_B[ADAPTER].weight.clone() for layer in layers]

    def loss_at(scales):
        with torch.no_grad():
            for layer, b, scale in zip(layers, now, scales, strict=True):
                layer.lora_B[ADAPTER].weight.copy_(float(scale) * b)
            loss = float(causal_loss(model.eval(), batch)[0])
            for layer, b in zip(layers, now, strict=True):
                layer.lora_B[ADAPTER].weight.copy_(b)
        return loss

    ends = {}
    for at in (0.0, 0.5, 1.0):
        ends[at] = update_inner(model, layers, batch, causal_loss, at)
        for m, step in enumerate(np.eye(len(layers)) * 0.01):  # the loss is float32-accurate inside: a wide step
            slope = (loss_at(at + step) - loss_at(at - step)) / 0.02
            assert ends[at][m] == pytest.approx(slope, rel=0.02)
    trapezoid = [float(v.sum()) for v in direction_values(model, layers, batch, causal_loss)]
    assert -0.5 * (ends[0.0] + ends[1.0]) == pytest.approx(trapezoid, rel=1e-9)
    assert all(torch.equal(layer.lora_B[ADAPTER].weight, b) for layer, b in zip(layers, now, strict=True))


def test_value_curves_keep_measured_directions_and_extrapolate_by_the_pooled_decay():
    """Up to a module's rank its curve adds its measured directions (a harmful one counts as nothing), beyond it the
    last value shrinks by the median ratio of consecutive values; every curve starts at 0 and never decreases."""
    import numpy as np

    curves = value_curves([np.array([0.4, 0.2]), np.array([0.3, -0.1]), np.array([0.5, 0.4]), np.array([0.1])], 4)
    decay = np.median([0.5, 0.8])
    assert curves[0] == pytest.approx([0, 0.4, 0.6, 0.6 + 0.2 * decay, 0.6 + 0.2 * decay + 0.2 * decay**2])
    assert curves[1, 1] == pytest.approx(0.3) and curves[1, 4] == pytest.approx(0.3, abs=1e-5)
    assert curves[3, 2] == pytest.approx(0.1 + 0.1 * decay)
    assert np.all(curves[:, 0] == 0) and np.all(np.diff(curves, axis=1) > 0)


def test_worth_curves_scale_what_a_module_holds_by_the_measured_response():
    """At the rank a module held on average its curve is what its update is worth now; doubling the rank multiplies it
    by 2^β; a module whose update hurts counts as a tiny positive worth; every curve starts at 0, rises, is concave."""
    import numpy as np

    curves = worth_curves(np.array([0.4, -0.1, 0.8]), np.array([2.0, 2.0, 3.0]), 8)
    assert curves[0, 2] == pytest.approx(0.4) and curves[2, 3] == pytest.approx(0.8)
    assert curves[0, 4] / curves[0, 2] == pytest.approx(2**RANK_ELASTICITY)
    assert curves[1, 8] < 1e-5 * curves[0, 1]
    increments = np.diff(curves, axis=1)
    assert np.all(curves[:, 0] == 0) and np.all(increments > 0) and np.all(np.diff(increments, axis=1) <= 0)
    assert 0 < RANK_ELASTICITY < 1  # concave curves: the allocator's greedy is optimal only for those


def test_pooled_worth_keeps_a_layer_times_kind_pattern_and_averages_away_what_is_not():
    """Worth that is exactly a layer level times a kind level comes back unchanged from the layer-plus-kind fit (in
    log space); a single module's deviation from the pattern is mostly averaged away."""
    import numpy as np

    from hydra_rank.rank.budget import Target

    targets = [Target(f"l{layer}.{kind}", layer, kind, 8, 8) for layer in range(4) for kind in ("q", "v", "up")]
    layer_level, kind_level = np.array([1.0, 2.0, 0.5, 4.0]), {"q": 1.0, "v": 3.0, "up": 0.2}
    worth = np.array([layer_level[t.layer] * kind_level[t.kind] for t in targets])
    ranks = np.full(len(targets), 2.0)
    pooled = worth_curves(worth, ranks, 4, pool=targets)
    assert pooled == pytest.approx(worth_curves(worth, ranks, 4), rel=1e-9)
    noisy = worth.copy()
    noisy[0] *= 16  # one module 16x off the pattern
    pooled = worth_curves(noisy, ranks, 4, pool=targets)
    assert 1 < pooled[0, 2] / worth[0] < 4 and pooled[0, 2] * 4 < worth_curves(noisy, ranks, 4)[0, 2]
