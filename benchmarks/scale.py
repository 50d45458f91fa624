"""What HyDRA's own machinery costs as a model grows, measured on this CPU and extrapolated (docs/scale.md).

Three costs come on top of uniform LoRA:
- signals: before each decision, `signal_steps` training steps feed every target's (inputs, output gradients) into a
  streaming sketch of k = max_rank + 8 columns (`rank/signals.py`): time O(tokens·(d_in+d_out)·k) per module and
  step, memory min(signal_steps, MERGE_EVERY - 1)·k·d_out floats per module held while a sketch is open;
- decisions: the performance model, the hierarchical allocation and the capped move, over all targets;
- resizes: re-factoring B·A (QR + a small SVD) of each module whose rank changes, O((d_in+d_out)·r²);
plus the attribution, a copy of every adapter parameter per optimizer step.

Each cost is timed with the real functions on random data, at several sizes, and fitted with the model above (one
coefficient per cost, least squares); the fit then predicts a 2B- and an 8B-parameter language model (shapes below)
at the settings of the table (the default rank ceiling, `config.default_max_rank`). Memory is counted, not fitted.
Prints markdown and writes runs/scale.json. `--measured scale.json` refits and extrapolates the timings stored in an
earlier output instead of timing again (e.g. after a change of the defaults the table assumes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--measured benchmarks/results/scale/scale.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hydra_rank.config import default_max_rank
from hydra_rank.rank.allocate import allocate, move_towards
from hydra_rank.rank.budget import Budget, Target, uniform_budget
from hydra_rank.rank.lora import lora_layers
from hydra_rank.rank.perf_model import PerfModel
from hydra_rank.rank.resize import resize_layer
from hydra_rank.rank.signals import SKETCH_OVERSAMPLING, StackedGradientSketch

ROOT = Path(__file__).resolve().parents[1]
# Language models to extrapolate to (hidden, intermediate, key/value width, layers): a 2B VLM's (Qwen2-VL-2B's
# Qwen2-1.5B) and an 8B one's (Llama-3-8B-like), and the built-in VLM's SmolLM2-135M for reference.
MODELS = {
    "SmolLM2-135M (built-in)": (576, 1536, 192, 30),
    "2B VLM (Qwen2-1.5B LM)": (1536, 8960, 256, 28),
    "8B VLM (Llama-3-8B LM)": (4096, 14336, 1024, 32),
}
TOKENS = 16 * 512  # tokens per optimizer step in the extrapolation (batch 16 x 512)
SIGNAL_STEPS, DECISIONS = 3, 7  # the schedule's defaults: 7 decisions, each sketching 3 steps


def shapes(hidden: int, intermediate: int, kv: int) -> list[tuple[str, int, int]]:
    """(kind, d_in, d_out) of one decoder layer's seven targets."""
    return [
        ("q_proj", hidden, hidden),
        ("k_proj", hidden, kv),
        ("v_proj", hidden, kv),
        ("o_proj", hidden, hidden),
        ("gate_proj", hidden, intermediate),
        ("up_proj", hidden, intermediate),
        ("down_proj", intermediate, hidden),
    ]


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def sketch_seconds(d_in: int, d_out: int, tokens: int, k: int) -> float:
    """One batch fed into a module's sketch, the periodic merge included (averaged over a merge cycle)."""
    x, g = torch.randn(tokens, d_in), torch.randn(tokens, d_out)

    def cycle() -> None:
        sketch = StackedGradientSketch(d_in, k, seed=0)
        for _ in range(StackedGradientSketch.MERGE_EVERY):
            sketch.update(x, g)

    return timed(cycle, 1) / StackedGradientSketch.MERGE_EVERY


def resize_seconds(d_in: int, d_out: int, rank: int) -> float:
    """Grow a LoRA layer from `rank` to 2·`rank` and shrink it back (both directions of a move)."""
    model = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)), LoraConfig(r=rank, target_modules=["0"]))
    layer = lora_layers(model)["0"]
    nn.init.normal_(layer.lora_B["default"].weight)

    def both() -> None:
        resize_layer(layer, "0", 2 * rank)
        resize_layer(layer, "0", rank)

    return timed(both) / 2


def decision_seconds(layers: int, r0: int) -> float:
    """Performance-model fit + prediction, allocation and capped move for `layers` layers of 7 targets."""
    targets = [
        Target(f"l{i}.{kind}", i, kind, d_in, d_out)
        for i in range(layers)
        for kind, d_in, d_out in shapes(64, 172, 32)
    ]
    budget = Budget(uniform_budget(targets, r0), max_rank=8 * r0)
    rng = np.random.default_rng(0)
    curves = np.cumsum(np.sort(rng.random((len(targets), budget.max_rank + 1)), axis=1)[:, ::-1], axis=1)
    curves[:, 0] = 0.0
    model = PerfModel(targets)
    ranks = np.full(len(targets), float(r0))
    start = allocate(targets, {t.name: c for t, c in zip(targets, curves, strict=True)}, budget)

    def decide() -> None:
        features = model.features(curves[:, r0], ranks)
        model.fit(features, rng.random(len(targets)), active=np.ones(len(targets), dtype=bool))
        utilities = dict(zip([t.name for t in targets], model.utilities(curves), strict=True))
        target = allocate(targets, utilities, budget)
        move_towards(start, target, targets, utilities, budget, 0.15 * budget.total, 0.2)

    return timed(decide)


def fit(terms: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients c of seconds ≈ terms @ c (least squares on relative error: every size counts)."""
    scaled = terms / seconds[:, None]
    coefficients, *_ = np.linalg.lstsq(scaled, np.ones(len(seconds)), rcond=None)
    return np.clip(coefficients, 0.0, None)


def misfit(terms: np.ndarray, coefficients: np.ndarray, seconds: np.ndarray) -> float:
    """The worst relative error of the fitted model over the measured sizes."""
    return float(np.max(np.abs(terms @ coefficients / seconds - 1)))


def sketch_terms(d_in, d_out, tokens, k) -> np.ndarray:
    """Products with the tokens (O(tokens·d·k)), the merges' QR/SVD (O(d·k²)) and a fixed per-call overhead."""
    return np.stack([tokens * (d_in + d_out) * k, (d_in + d_out) * k**2, np.ones_like(k)], axis=-1)


def resize_terms(d_in, d_out, rank) -> np.ndarray:
    """Re-factoring (O(d·r²)), writing the new factors (O(d·r)) and a fixed overhead (new modules, optimizer)."""
    return np.stack([(d_in + d_out) * rank**2, (d_in + d_out) * rank, np.ones_like(rank)], axis=-1)


def decision_terms(targets, lattice) -> np.ndarray:
    """Utility curves over the rank lattice of every target, and a fixed overhead."""
    return np.stack([targets * lattice, np.ones_like(targets)], axis=-1)


def measure() -> dict[str, list]:
    """Time every cost at the grid of sizes the fit uses (decisions at a lattice of 8·r0 ranks)."""
    torch.manual_seed(0)
    rows: dict[str, list] = {"sketch": [], "resize": [], "decision": []}
    for hidden in (256, 512, 1024):
        layer = shapes(hidden, int(8 * hidden / 3), hidden // 4)
        for _, d_in, d_out in (layer[0], layer[1], layer[6]):  # square, narrow output, wide input
            for k in (24, 72):
                rows["sketch"].append((d_in, d_out, 1024, k, sketch_seconds(d_in, d_out, 1024, k)))
            for rank in (4, 16, 64):
                rows["resize"].append((d_in, d_out, rank, resize_seconds(d_in, d_out, rank)))
    for layers in (8, 16, 32):
        for r0 in (4, 16):
            rows["decision"].append((layers, r0, decision_seconds(layers, r0)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", type=Path, help="an earlier runs/scale.json whose timings to refit")
    args = parser.parse_args()
    rows = json.loads(args.measured.read_text())["measured"] if args.measured else measure()
    sketch, resize, decision = (np.array(rows[key], dtype=np.float64) for key in ("sketch", "resize", "decision"))
    terms = {
        "sketch": sketch_terms(*sketch[:, :4].T),
        "resize": resize_terms(*resize[:, :3].T),
        "decision": decision_terms(decision[:, 0] * 7, decision[:, 1] * 8),
    }
    measured = {"sketch": sketch[:, 4], "resize": resize[:, 3], "decision": decision[:, 2]}
    coefficients = {key: fit(terms[key], measured[key]) for key in terms}
    quality = {key: misfit(terms[key], coefficients[key], measured[key]) for key in terms}
    print("| cost | model (seconds) | worst relative misfit over the measured sizes |\n|---|---|---|")
    c = coefficients
    print(
        f"| sketch, per module and step | {c['sketch'][0]:.3g}·tokens·(d_in+d_out)·k + "
        f"{c['sketch'][1]:.3g}·(d_in+d_out)·k² + {c['sketch'][2]:.3g} | {quality['sketch']:.0%} |"
    )
    print(
        f"| resize, per module | {c['resize'][0]:.3g}·(d_in+d_out)·r² + {c['resize'][1]:.3g}·(d_in+d_out)·r + "
        f"{c['resize'][2]:.3g} | {quality['resize']:.0%} |"
    )
    print(
        f"| decision, whole model | {c['decision'][0]:.3g}·targets·max_rank + {c['decision'][1]:.3g} "
        f"| {quality['decision']:.0%} |"
    )

    predictions = []
    print(
        "\n| language model | r0 | targets | adapter params | sketch memory (MiB) | signal seconds per decision "
        "| decision seconds | resize seconds (15 % of the budget moved) | attribution copy (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (hidden, intermediate, kv, layers) in MODELS.items():
        layer = shapes(hidden, intermediate, kv)
        per_layer_cost = sum(d_in + d_out for _, d_in, d_out in layer)
        per_layer_outputs = sum(d_out for _, _, d_out in layer)  # the sketch keeps the output side only
        for r0 in (16, 64):
            k = default_max_rank(r0) + SKETCH_OVERSAMPLING
            adapter = r0 * per_layer_cost * layers
            parts = min(SIGNAL_STEPS, StackedGradientSketch.MERGE_EVERY - 1)  # factors held between sketched steps
            sketch_mib = parts * k * per_layer_outputs * layers * 4 / 2**20
            per_module = [sketch_terms(d_in, d_out, TOKENS, np.float64(k)) @ c["sketch"] for _, d_in, d_out in layer]
            signal_s = SIGNAL_STEPS * layers * sum(per_module)
            decide_s = float(decision_terms(np.float64(7 * layers), np.float64(default_max_rank(r0))) @ c["decision"])
            moved = [resize_terms(d_in, d_out, np.float64(2 * r0)) @ c["resize"] for _, d_in, d_out in layer]
            resize_s = 0.15 * layers * sum(moved)  # about 15 % of the modules change rank per decision
            row = {
                "model": name,
                "r0": r0,
                "targets": 7 * layers,
                "adapter_params": adapter,
                "sketch_mib": sketch_mib,
                "signal_s_per_decision": signal_s,
                "decision_s": decide_s,
                "resize_s": resize_s,
                "attribution_mib": adapter * 4 / 2**20,
            }
            predictions.append(row)
            print(
                f"| {name} | {r0} | {7 * layers} | {adapter / 1e6:.1f} M | {sketch_mib:.0f} | {signal_s:.1f} "
                f"| {decide_s:.2f} | {resize_s:.1f} | {row['attribution_mib']:.0f} |"
            )
    out = ROOT / "runs" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "threads": torch.get_num_threads(),
        "tokens_per_step": TOKENS,
        "measured": rows,
        "coefficients": {key: value.tolist() for key, value in coefficients.items()},
        "misfit": quality,
        "predictions": predictions,
    }
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
