"""What each unit of rank holds in a trained adapter, scored on held-out questions (no training).

HyDRA's performance model learns from what modules realise per interval, and that does not follow rank
(`decision_churn.py`, "gain elasticity to rank"): it measures a module's *level*, how much its update is worth, and
assumes the worth of more rank from the gradient-energy curve. This script measures the worth of rank directly in
finished runs: every module's update ΔW = s·Σ σ_i u_i v_iᵀ is split into its singular directions, and each direction
is credited its share of the loss decrease on held-out questions (the run's validation split when it has one, else
its evaluation questions; the trapezoid from no update to ΔW,
`rank/probe.py:direction_values`). Per run it reports, across modules, how the level (all directions) and the
margin (the last direction: what the module's last unit of rank holds) are spread, and how well the one ranks the
other (Spearman). A low correlation says allocating by level gives rank to modules whose last unit is not the most
valuable. For an adapter whose ranks differ between modules it also reports the run-long response of a module's
worth to its rank: the slope of log level on log rank among modules of equal cost per rank. That slope means
something causal only where the ranks were assigned at random (`control-shuffled`: a calibrated allocation's ranks
shuffled among equal-cost modules), the counterpart, over a whole run, of `decision_churn.py`'s randomised
per-interval response.

    .venv/bin/python benchmarks/direction_values.py RUN_DIR [RUN_DIR ...] [--batches 4]

RUN_DIR is a finished `hydra-rank train` folder with config.yaml and adapter/. Prints markdown and writes
direction_values.json in --output-dir.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from hydra_rank.config import load_config
from hydra_rank.data import collate
from hydra_rank.inputs import load_inputs
from hydra_rank.loss import answer_loss
from hydra_rank.rank.lora import lora_layers
from hydra_rank.rank.perf_model import spearman
from hydra_rank.rank.probe import direction_values

if TYPE_CHECKING:
    from hydra_rank.rank.budget import Target


def load_run(run: Path) -> tuple[list[Target], nn.Module, list[str], list[dict[str, torch.Tensor]]]:
    """A finished run's targets, its model with the trained adapter (trainable, so gradients reach it), the adapted
    module names in target order, and its held-out questions in batches of `train.batch_size`: the validation split
    when it has one, never the split results are reported on."""
    config = load_config(run / "config.yaml")
    if config.data.validation_samples:
        config.data.eval_split = "validation"
    inputs = load_inputs(config)
    model = PeftModel.from_pretrained(inputs.model, run / "adapter", is_trainable=True)
    names = [t.name for t in inputs.targets if t.name in lora_layers(model)]
    items = [inputs.encoder.encode(sample) for sample in inputs.eval_samples]
    size, pad = config.train.batch_size, inputs.encoder.pad_token_id
    batches = [collate(items[start : start + size], pad) for start in range(0, len(items), size)]
    return inputs.targets, model, names, batches


def run_arguments(description: str, batches: int, output_dir: str) -> argparse.Namespace:
    """The command line of the scripts that score finished runs: run folders, held-out batches, output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (config.yaml, adapter/)")
    parser.add_argument("--batches", type=int, default=batches, help="held-out batches (of train.batch_size) to score")
    parser.add_argument("--output-dir", type=Path, default=Path(output_dir))
    return parser.parse_args()


def run_values(run: Path, batches: int) -> tuple[list[Target], dict[str, np.ndarray]]:
    """Every target module's direction values of the run's adapter, summed over `batches` evaluation batches."""
    targets, model, names, held_out = load_run(run)
    layers = lora_layers(model)
    totals: dict[str, np.ndarray] = {}
    for batch in held_out[:batches]:
        values = direction_values(model, [layers[n] for n in names], batch, answer_loss)
        for name, value in zip(names, values, strict=True):
            totals[name] = totals.get(name, 0.0) + value
    return targets, totals


def rank_response(targets: list[Target], values: dict[str, np.ndarray], draws: int = 2000) -> dict | None:
    """Slope of log level (floored at 1e-3 of the median, as the performance model floors gains) on log rank, both
    demeaned within groups of equal cost per rank, with a bootstrap 90 % interval over modules; None if every
    module has the same rank."""
    scored = [t for t in targets if t.name in values]
    ranks = np.array([len(values[t.name]) for t in scored], dtype=np.float64)
    level = np.array([values[t.name].sum() for t in scored])
    x = np.log(ranks)
    y = np.log(np.maximum(level, 1e-3 * float(np.median(np.abs(level)))))
    groups = np.unique([t.cost for t in scored], return_inverse=True)[1]
    for a in (x, y):
        a -= (np.bincount(groups, a) / np.bincount(groups))[groups]
    if not (x**2).sum() > 1e-12:
        return None
    picks = np.random.default_rng(0).integers(0, len(x), size=(draws, len(x)))
    low, high = np.quantile((x[picks] * y[picks]).sum(axis=1) / (x[picks] ** 2).sum(axis=1), [0.05, 0.95])
    return {"slope": float((x * y).sum() / (x**2).sum()), "low": float(low), "high": float(high)}


def summary(targets: list[Target], values: dict[str, np.ndarray]) -> dict:
    names = [t.name for t in targets if t.name in values]
    level = np.array([values[n].sum() for n in names])
    margin = np.array([values[n][-1] for n in names])
    first = np.array([values[n][0] for n in names])
    kinds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for target in targets:
        if target.name in values:
            kinds[target.kind].append((float(values[target.name].sum()), float(values[target.name][-1])))
    return {
        "modules": len(names),
        "level_sum": float(level.sum()),
        "margin_share": float(margin.sum() / level.sum()),
        "first_share": float(first.sum() / level.sum()),
        "negative_margins": int((margin < 0).sum()),
        "spearman_level_margin": spearman(level, margin),
        "rank_response": rank_response(targets, values),
        "by_kind": {
            k: {"level": float(np.mean([a for a, _ in v])), "margin": float(np.mean([b for _, b in v]))}
            for k, v in sorted(kinds.items())
        },
    }


def main() -> None:
    args = run_arguments(__doc__.split("\n\n")[0], 4, "runs/direction-values")
    torch.manual_seed(0)
    rows = {}
    for run in args.runs:
        targets, values = run_values(run, args.batches)
        rows[str(run)] = {**summary(targets, values), "values": {n: v.tolist() for n, v in values.items()}}
    print(
        "| run | modules | held-out loss decrease | first direction's share | last direction's share "
        "| last direction < 0 | Spearman(level, last) | level's response to rank [90 %] |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run, row in rows.items():
        response = row["rank_response"]
        slope = "— (one rank)" if response is None else "{slope:+.2f} [{low:+.2f}, {high:+.2f}]".format(**response)
        print(
            f"| {run} | {row['modules']} | {row['level_sum']:.4f} | {row['first_share']:.2f} | "
            f"{row['margin_share']:.2f} | {row['negative_margins']} | {row['spearman_level_margin']:+.2f} | {slope} |"
        )
    for run, row in rows.items():
        kinds = ", ".join(f"{k} {v['level']:.2e}/{v['margin']:.2e}" for k, v in row["by_kind"].items())
        print(f"{run}: mean level / last direction by kind: {kinds}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "direction_values.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
