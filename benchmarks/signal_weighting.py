"""Does it matter whether HyDRA's gradient signals weigh every answer token or every question equally?

Training's loss is a mean over answer tokens, so on scenes a 20-token description weighs twenty times a one-token
count in every gradient the scheduler sketches. If that steered the allocation towards what descriptions need, a
per-question mean (each sample's token-mean, averaged over the batch) would allocate differently. This script measures
how differently: for each calibration seed it sketches the same batches under both weightings (on the pretrained
model, as the static allocation does), allocates the same budget with each, and reports the share of the budget that
changes hands between the two, next to the share that changes between two draws of calibration batches under the
same weighting (the noise floor of the comparison). Prints markdown and writes runs/signal-weighting.json.

    .venv/bin/python benchmarks/signal_weighting.py configs/scenes.yaml [--seeds 0,1,2] [--batches 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hydra_rank.config import load_config
from hydra_rank.inputs import load_inputs
from hydra_rank.loss import IGNORE_INDEX, answer_logits, answer_loss
from hydra_rank.methods import METHODS
from hydra_rank.rank.plan import calibrated_allocation, calibration_batches, make_budget, sample_batches

if TYPE_CHECKING:
    from hydra_rank.rank.budget import Allocation, Target


def question_mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy averaged over each sample's answer tokens, then over the samples: every question counts once."""
    logits, picked = answer_logits(model, batch)
    per_token = F.cross_entropy(logits.float().transpose(1, 2), picked, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (picked != IGNORE_INDEX).sum(dim=1)
    answered = counts > 0
    return (per_token.sum(dim=1)[answered] / counts[answered]).mean(), int(counts.sum())


WEIGHTINGS = {"token": answer_loss, "question": question_mean_loss}


def kind_means(allocation: Allocation, targets: list[Target]) -> dict[str, float]:
    ranks = defaultdict(list)
    for target in targets:
        ranks[target.kind].append(allocation.ranks[target.name])
    return {kind: round(statistics.fmean(values), 2) for kind, values in sorted(ranks.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", default="0,1,2", help="calibration draws (each a different set of batches)")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches per draw (HyDRA's default)")
    parser.add_argument("--output", type=Path, default=Path("runs/signal-weighting.json"))
    args = parser.parse_args()
    config = load_config(args.config)
    inputs = load_inputs(config)
    targets, method = inputs.targets, METHODS["hydra"]
    budget = make_budget(config.adapter, targets, method)
    device = torch.device("cpu")
    seeds = sorted({int(seed) for seed in args.seeds.split(",")})
    allocations: dict[tuple[str, int], Allocation] = {}
    for seed in seeds:
        make = sample_batches(inputs.train_samples, inputs.encoder, device)
        batches = calibration_batches(make, len(inputs.train_samples), config.train.batch_size, args.batches, seed)
        for weighting, loss_fn in WEIGHTINGS.items():
            allocations[weighting, seed], _ = calibrated_allocation(
                inputs.model, targets, budget, method.mode, batches, seed, False, loss_fn
            )

    def moved(a: Allocation, b: Allocation) -> float:
        return a.moved_params(b, targets) / budget.total

    across_weightings = [moved(allocations["token", s], allocations["question", s]) for s in seeds]
    pairs = list(itertools.combinations(seeds, 2))
    across_draws = {w: [moved(allocations[w, a], allocations[w, b]) for a, b in pairs] for w in WEIGHTINGS}
    result = {
        "config": str(args.config),
        "budget_params": budget.total,
        "calibration_batches": args.batches,
        "moved_share_token_vs_question": dict(zip(map(str, seeds), across_weightings, strict=True)),
        "moved_share_between_draws": across_draws,
        "kind_mean_ranks": {f"{w}-seed{s}": kind_means(a, targets) for (w, s), a in allocations.items()},
    }
    print(f"share of the budget ({budget.total:,} params) that moves between allocations\n")
    print("| comparison | per draw or pair | mean |\n|---|---|---|")
    print(
        f"| token vs question weighting, same batches | {', '.join(f'{m:.3f}' for m in across_weightings)} | "
        f"{statistics.fmean(across_weightings):.3f} |"
    )
    for weighting, values in across_draws.items():
        print(
            f"| {weighting} weighting, two draws of batches | {', '.join(f'{m:.3f}' for m in values)} | "
            f"{statistics.fmean(values):.3f} |"
        )
    print("\nmean rank per module kind\n")
    kinds = list(next(iter(result["kind_mean_ranks"].values())))
    print("| allocation | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for label, means in result["kind_mean_ranks"].items():
        print(f"| {label} | " + " | ".join(f"{means[k]:.1f}" for k in kinds) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
