"""What the held-out worth of a module's update is made of, in finished runs (no training).

`schedule.curves: worth` scores each module m by what its whole update ΔW_m is worth on a probe batch. The exact
share of the loss change along the straight path from the base model (t = 0) to the trained one (t = 1) is
−∫₀¹ ⟨G_m(t), ΔW_m⟩ dt, G_m(t) the probe gradient of m's full weight with every update scaled by t. The twenty-third
session estimated it with the trapezoid, −½⟨G_m(0) + G_m(1), ΔW_m⟩ (`rank/probe.py:direction_values`, summed over
directions): two probe passes per decision. This script measures, per held-out batch, the three one-pass terms
(base t = 0, midpoint t = ½, end t = 1) against the trapezoid: how well each ranks the modules as it does (Spearman,
over modules) and their sums, beside the loss actually lost along the path (losses at t = 0, ¼, ½, ¾, 1). Where the
path is far from quadratic the one-pass terms differ from the trapezoid, and the table shows which of them carries
its ranking.

    .venv/bin/python benchmarks/worth_estimators.py RUN_DIR [RUN_DIR ...] [--batches 3]

RUN_DIR is a finished `hydra-rank train` folder with config.yaml and adapter/. Prints markdown and writes
worth_estimators.json in --output-dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from direction_values import load_run, run_arguments

from hydra_rank.loss import answer_loss
from hydra_rank.rank.lora import lora_layers
from hydra_rank.rank.perf_model import spearman
from hydra_rank.rank.probe import factors, swapped, update_inner

TERMS = {"base": 0.0, "midpoint": 0.5, "end": 1.0}


def path_losses(model: torch.nn.Module, layers: list, batch: dict[str, torch.Tensor]) -> list[float]:
    """The batch's loss with every update scaled by t = 0, ¼, ½, ¾, 1."""
    current = [factors(layer) for layer in layers]
    losses = []
    model.eval()
    with torch.no_grad():
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            with swapped(layers, [(a, t * b, scale) for a, b, scale in current]):
                losses.append(float(answer_loss(model, batch)[0]))
    return losses


def measure(run: Path, batches: int) -> list[dict]:
    """Per held-out batch: each term's worth per module, and the loss along the path."""
    _, model, names, held_out = load_run(run)
    layers = [lora_layers(model)[n] for n in names]
    rows = []
    for batch in held_out[:batches]:
        worth = {term: -update_inner(model, layers, batch, answer_loss, at) for term, at in TERMS.items()}
        worth["trapezoid"] = 0.5 * (worth["base"] + worth["end"])
        rows.append({"losses": path_losses(model, layers, batch), **{k: v.tolist() for k, v in worth.items()}})
    return rows


def main() -> None:
    args = run_arguments(__doc__.split("\n\n")[0], 3, "runs/worth-estimators")
    torch.manual_seed(0)
    results = {str(run): measure(run, args.batches) for run in args.runs}
    print(
        "| run | batch | loss t=0 / ½ / 1 | loss lost | trapezoid sum | base ½·sum (Spearman) "
        "| midpoint sum (Spearman) | end sum (Spearman) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run, rows in results.items():
        for index, row in enumerate(rows):
            trapezoid = np.array(row["trapezoid"])
            cells = []
            for term, factor in (("base", 0.5), ("midpoint", 1.0), ("end", 1.0)):
                value = np.array(row[term])
                cells.append(f"{factor * value.sum():.3f} ({spearman(trapezoid, value):+.3f})")
            losses = row["losses"]
            print(
                f"| {run} | {index} | {losses[0]:.3f} / {losses[2]:.3f} / {losses[4]:.3f} | "
                f"{losses[0] - losses[4]:.3f} | {trapezoid.sum():.3f} | {' | '.join(cells)} |"
            )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "worth_estimators.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
