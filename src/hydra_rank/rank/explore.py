"""Randomised rank perturbation (`schedule.explore`): rank changes that do not follow any measurement, so that a run
can measure how much what a module realises responds to its rank.

Why. Every rank the scheduler gives follows its own noisy measurements, so comparing what modules realise at the
ranks they were given mixes the response to rank with regression to the mean (BENCHMARKS.md, twenty-first session:
the within-module elasticity of realised gain to rank is about 0 in every low-budget cell, which either reading
explains). Moving a small share of the budget at random separates them: at a decision, after the scheduler's own
move, modules of equal cost per rank are paired at random and each pair exchanges δ ranks, one chosen by a coin
flip gaining what the other gives. The budget holds exactly, and since the sign is random, the difference between
the two modules' realised gains in the next interval (against the interval before) estimates the response without
that bias (`benchmarks/decision_churn.py`). An ablation and a measurement, not a method default (0).
"""

from __future__ import annotations

import torch

from .budget import Allocation, Budget, Target


def explore(
    allocation: Allocation, targets: list[Target], budget: Budget, share: float, generator: torch.Generator
) -> tuple[Allocation, list[tuple[str, str, int]]]:
    """Move at most `share` of the budget between random pairs of equal-cost modules; returns the new allocation and
    the exchanges as (giver, receiver, δ).

    Each pair exchanges δ = half the smaller of the two ranks (at least one granularity step), so the perturbation is
    large on the log scale the performance model works in, and neither module drops below one step (a module at rank
    0 realises nothing and could not be compared). Pairs that would leave the rank bounds are skipped."""
    step = budget.granularity
    floor = max(budget.min_rank, step)
    ranks = dict(allocation.ranks)
    waiting: dict[int, Target] = {}  # per cost per rank: a drawn module still without a partner
    pairs: list[tuple[str, str, int]] = []
    moved, limit = 0, share * budget.total
    for index in torch.randperm(len(targets), generator=generator).tolist():
        target = targets[index]
        giver = waiting.pop(target.cost, None)
        if giver is None:
            waiting[target.cost] = target
            continue
        delta = max(step, min(ranks[giver.name], ranks[target.name]) // 2 // step * step)
        if moved + delta * target.cost > limit:
            continue
        if min(ranks[giver.name] - delta, ranks[target.name]) < floor or ranks[target.name] + delta > budget.max_rank:
            continue
        ranks[giver.name] -= delta
        ranks[target.name] += delta
        pairs.append((giver.name, target.name, delta))
        moved += delta * target.cost
    return Allocation(ranks, budget.total, dict(allocation.info)), pairs
