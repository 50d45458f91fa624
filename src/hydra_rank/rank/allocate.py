"""Hierarchical rank allocation under a parameter budget: coarse (how much each layer gets), then fine (how a
layer's share is split among its modules).

Each module m has a utility curve u_m(r), the predicted loss reduction of rank r (concave, from `signals.py` or the
performance model). Every decision is a greedy "best gain per parameter" choice among steps that still fit:

- fine (inside one layer): steps are "+granularity rank on module m", cost granularity·(d_in+d_out);
- coarse (across layers): a layer's steps are its own fine steps in the order the fine greedy takes them, so the
  coarse level decides how far down its list each layer gets, i.e. the layer's budget;
- coarse-only ablation: a layer's steps raise all its modules together (one rank per layer);
- fine-only ablation: each layer keeps uniform LoRA's share of the budget and only the fine step runs.

Everything starts at min_rank; ranks stay in {min_rank + k·granularity} ≤ max_rank; the greedy stops only when no step
fits, so the budget is used as fully as the step sizes allow. Ties go to the earlier module, so results are
deterministic. For concave utilities the hierarchical result equals the global greedy optimum of separable
allocation; the layer budgets it implies are reported as the coarse decision.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import groupby, pairwise

import numpy as np

from ..errors import ConfigError
from .budget import Allocation, Budget, Target

MODES = ("hierarchical", "coarse", "fine")


@dataclass(frozen=True)
class Step:
    cost: float
    gain: float
    changes: tuple[tuple[str, int], ...]  # (module name, new rank) applied when the step is taken


def greedy(items: list[list[Step]], budget: float) -> list[tuple[int, int]]:
    """Take steps, each item's in order, always the fitting next step with the best gain per parameter.

    Returns the (item, step) pairs in the order taken. An item whose next step no longer fits is closed (its later
    steps depend on that one).
    """
    heap = [(-item[0].gain / item[0].cost, index, 0) for index, item in enumerate(items) if item]
    heapq.heapify(heap)
    taken = []
    while heap:
        _, index, position = heapq.heappop(heap)
        step = items[index][position]
        if step.cost > budget:
            continue
        budget -= step.cost
        taken.append((index, position))
        if position + 1 < len(items[index]):
            following = items[index][position + 1]
            heapq.heappush(heap, (-following.gain / following.cost, index, position + 1))
    return taken


def _module_steps(target: Target, utility: np.ndarray, ranks: list[int]) -> list[Step]:
    """A module's steps up the rank lattice, never past its width (a rank above min(d_in, d_out) adds nothing)."""
    ranks = [r for r in ranks if r <= target.width] or ranks[:1]
    return [
        Step(target.cost * (high - low), float(utility[high] - utility[low]), ((target.name, high),))
        for low, high in pairwise(ranks)
    ]


def _layer_fine_order(layer: list[Target], utilities: dict[str, np.ndarray], ranks: list[int]) -> list[Step]:
    """A layer's module steps in the order the fine greedy takes them with unlimited budget."""
    items = [_module_steps(t, utilities[t.name], ranks) for t in layer]
    return [items[i][j] for i, j in greedy(items, float("inf"))]


def _layer_uniform_steps(layer: list[Target], utilities: dict[str, np.ndarray], ranks: list[int]) -> list[Step]:
    per_module = [_module_steps(t, utilities[t.name], ranks) for t in layer]
    return [
        Step(sum(s.cost for s in column), sum(s.gain for s in column), tuple(c for s in column for c in s.changes))
        for column in zip(*per_module, strict=False)  # to the narrowest module's width: ranks rise together
    ]


def allocate(
    targets: list[Target],
    utilities: dict[str, np.ndarray],
    budget: Budget,
    mode: str = "hierarchical",
) -> Allocation:
    """Ranks for `targets` maximising Σ u_m(r_m) greedily under `budget`, structured as `mode` says.

    `utilities[name][r]` must be defined for r = 0..budget.max_rank.
    """
    if mode not in MODES:
        raise ConfigError(f"allocation mode must be one of {MODES}, got {mode!r}")
    budget.check_feasible(targets)
    ranks = budget.ranks()
    layers = [list(group) for _, group in groupby(targets, key=lambda t: (t.tower, t.layer))]
    allocation = {t.name: budget.min_rank for t in targets}
    spare = budget.total - budget.min_rank * sum(t.cost for t in targets)

    def apply(items: list[list[Step]], limit: float) -> float:
        """Take the greedy's steps into `allocation`; return what is left of `limit`."""
        for index, position in greedy(items, limit):
            limit -= items[index][position].cost
            allocation.update(items[index][position].changes)
        return limit

    def module_steps(layer: list[Target]) -> list[list[Step]]:
        """Each module's remaining steps, from its current rank."""
        return [_module_steps(t, utilities[t.name], [r for r in ranks if r >= allocation[t.name]]) for t in layer]

    if mode == "fine":
        total_cost = sum(t.cost for t in targets)
        for layer in layers:
            layer_cost = sum(t.cost for t in layer)
            apply(module_steps(layer), budget.total * layer_cost / total_cost - budget.min_rank * layer_cost)
    elif mode == "coarse":
        apply([_layer_uniform_steps(layer, utilities, ranks) for layer in layers], spare)
    else:
        spare = apply([_layer_fine_order(layer, utilities, ranks) for layer in layers], spare)
        # A layer whose next step no longer fits is closed, but a cheaper module step elsewhere may still fit:
        # spend what is left module by module.
        apply(module_steps(targets), spare)

    costs = {t.name: t.cost for t in targets}
    layer_params = [sum(allocation[t.name] * t.cost for t in layer) for layer in layers]
    result = Allocation(
        ranks=allocation,
        budget=budget.total,
        info={
            "mode": mode,
            "used_params": sum(allocation[n] * costs[n] for n in allocation),
            "layer_params": layer_params,
            "predicted_gain": float(sum(utilities[n][r] for n, r in allocation.items())),
            "min_rank": budget.min_rank,
            "max_rank": budget.max_rank,
            "granularity": budget.granularity,
        },
    )
    result.check(targets, budget)
    return result


def move_towards(
    current: Allocation,
    target: Allocation,
    targets: list[Target],
    utilities: dict[str, np.ndarray],
    budget: Budget,
    max_params: float,
    margin: float = 0.0,
) -> Allocation:
    """Go part of the way from `current` to `target`, moving at most `max_params` parameters of budget.

    Rank increases towards the target are taken best gain per parameter first; each is paid for, when the budget
    has no room left, by the rank decreases towards the target that cost the least predicted gain per parameter. An
    exchange happens only if the increase's gain per parameter beats the decreases' loss per parameter by the factor
    (1 + `margin`): small predicted improvements are not worth disturbing two adapters. The budget holds after every
    single step, and ranks stay on the granularity lattice.
    """
    step = budget.granularity
    ranks = dict(current.ranks)

    def next_step(index: int, direction: int) -> tuple[float, int] | None:
        """(heap key, module) for the module's next step towards its target in `direction` (+1 grow, -1 shrink):
        grows are keyed by minus gain per parameter (best first), shrinks by loss per parameter (cheapest first)."""
        t = targets[index]
        rank, goal, u = ranks[t.name], target.ranks[t.name], utilities[t.name]
        if (goal - rank) * direction <= 0:
            return None
        change = (u[rank + step] - u[rank]) if direction > 0 else (u[rank] - u[rank - step])
        return (-change if direction > 0 else change) / (step * t.cost), index

    grows = [key for i in range(len(targets)) if (key := next_step(i, +1))]
    shrinks = [key for i in range(len(targets)) if (key := next_step(i, -1))]
    heapq.heapify(grows)
    heapq.heapify(shrinks)
    free = budget.total - current.params(targets)
    moved = 0
    while grows:
        negative_ratio, index = grows[0]
        cost = step * targets[index].cost
        if moved + cost > max_params:
            break
        funding, available, worst = [], free, 0.0
        while available < cost and shrinks:  # tentatively take the cheapest shrink steps
            ratio, shrink = heapq.heappop(shrinks)
            funding.append(shrink)
            worst = max(worst, ratio)
            available += step * targets[shrink].cost
            ranks[targets[shrink].name] -= step
            if (key := next_step(shrink, -1)) is not None:
                heapq.heappush(shrinks, key)
        if available < cost or -negative_ratio < (1 + margin) * worst:
            for shrink in funding:  # the exchange does not pay: undo it, and stop (the rest pays even less)
                ranks[targets[shrink].name] += step
            break
        heapq.heappop(grows)
        ranks[targets[index].name] += step
        if (key := next_step(index, +1)) is not None:
            heapq.heappush(grows, key)
        free = available - cost
        moved += cost
    result = Allocation(ranks, budget.total, dict(target.info))
    result.check(targets, budget)
    return result
