"""Budget and hierarchical allocation: properties over random shapes/budgets/bounds, and response to signals."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_rank.errors import ConfigError
from hydra_rank.rank.allocate import MODES, Step, allocate, greedy
from hydra_rank.rank.budget import Allocation, Budget, Target, uniform_budget

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_targets(layers: int, shapes: list[tuple[int, int]]) -> list[Target]:
    return [
        Target(f"model.layers.{layer}.{KINDS[i]}", layer, KINDS[i], d_in, d_out)
        for layer in range(layers)
        for i, (d_in, d_out) in enumerate(shapes)
    ]


def concave_utilities(targets: list[Target], max_rank: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """u(r) = Σ_{i≤r} σ_i² with random decaying spectra: concave, increasing, u(0) = 0."""
    utilities = {}
    for target in targets:
        sigma = np.sort(rng.exponential(rng.uniform(0.1, 10), max_rank))[::-1]
        utilities[target.name] = np.concatenate([[0.0], np.cumsum(sigma**2)])
    return utilities


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 5))
    shapes = draw(st.lists(st.tuples(st.integers(2, 64), st.integers(2, 64)), min_size=1, max_size=len(KINDS)))
    targets = make_targets(layers, shapes)
    min_rank = draw(st.integers(0, 3))
    granularity = draw(st.integers(1, 4))
    max_rank = min_rank + granularity * draw(st.integers(0, 6))
    floor = min_rank * sum(t.cost for t in targets)
    total = draw(st.integers(floor, floor + max_rank * sum(t.cost for t in targets)))
    seed = draw(st.integers(0, 2**16))
    return targets, Budget(total, min_rank, max_rank, granularity), seed


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(MODES))
def test_budget_never_exceeded_and_bounds_hold(problem, mode):
    targets, budget, seed = problem
    utilities = concave_utilities(targets, budget.max_rank, np.random.default_rng(seed))
    allocation = allocate(targets, utilities, budget, mode)
    used = allocation.params(targets)
    assert used <= budget.total
    assert used == allocation.info["used_params"]
    allowed = set(budget.ranks())
    assert all(rank in allowed for rank in allocation.ranks.values())
    assert list(allocation.ranks) == [t.name for t in targets]
    assert all(allocation.ranks[t.name] <= max(t.width, budget.min_rank) for t in targets)
    if mode == "coarse":  # coarse-only keeps every module of a layer at the same rank
        for layer in {t.layer for t in targets}:
            assert len({allocation.ranks[t.name] for t in targets if t.layer == layer}) == 1
    if mode == "hierarchical":  # uses as much budget as the step sizes allow: no single further step fits
        leftover = budget.total - used
        growable = [
            t for t in targets if allocation.ranks[t.name] + budget.granularity <= min(budget.max_rank, t.width)
        ]
        assert all(budget.granularity * t.cost > leftover for t in growable)
    assert allocation == allocate(targets, utilities, budget, mode)  # deterministic


@settings(max_examples=60, deadline=None)
@given(problems())
def test_hierarchical_is_optimal_for_concave_utilities(problem):
    """With concave utilities and unit steps, greedy-by-ratio on separable utilities reaches the optimum when the
    budget is spent exactly; compare against exhaustive search on small instances."""
    targets, budget, seed = problem
    if len(targets) > 4 or len(budget.ranks()) > 4:
        return
    utilities = concave_utilities(targets, budget.max_rank, np.random.default_rng(seed))
    allocation = allocate(targets, utilities, budget, "hierarchical")
    best = 0.0
    for choice in np.ndindex(*(len(budget.ranks()),) * len(targets)):
        ranks = [budget.ranks()[i] for i in choice]
        if sum(r * t.cost for r, t in zip(ranks, targets, strict=True)) <= budget.total:
            best = max(best, sum(utilities[t.name][r] for r, t in zip(ranks, targets, strict=True)))
    assert allocation.info["predicted_gain"] <= best + 1e-9
    # greedy is within the largest single step's gain of the optimum (standard knapsack bound)
    largest_step = max(utilities[t.name][budget.max_rank] for t in targets)
    assert allocation.info["predicted_gain"] >= best - largest_step - 1e-9


def test_a_module_with_all_the_gradient_energy_gets_more_rank():
    targets = make_targets(3, [(16, 16), (16, 32), (32, 16)])
    budget = Budget(uniform_budget(targets, 4), min_rank=1, max_rank=16)
    flat = {t.name: np.linspace(0, 1, 17) for t in targets}
    hot = targets[4].name
    peaked = dict(flat) | {hot: np.linspace(0, 1000, 17)}
    assert allocate(targets, peaked, budget, "hierarchical").ranks[hot] == 16
    fine = allocate(targets, peaked, budget, "fine").ranks  # capped by its layer's uniform share
    assert fine[hot] == 1 + (4 * 128 - 128) // 48 and all(fine[t.name] == 1 for t in targets[3:6] if t.name != hot)
    # coarse-only: the whole layer holding the hot module rises together
    coarse = allocate(targets, peaked, budget, "coarse").ranks
    assert coarse[hot] > 4 and coarse[hot] == coarse[targets[3].name]
    assert coarse[targets[0].name] < 4


def test_fine_only_keeps_each_layers_uniform_share():
    targets = make_targets(2, [(16, 16), (16, 48)])
    budget = Budget(uniform_budget(targets, 4), min_rank=1, max_rank=16)
    rng = np.random.default_rng(0)
    utilities = concave_utilities(targets, 16, rng)
    utilities[targets[0].name] = utilities[targets[0].name] * 1000  # layer 0 is far more useful...
    allocation = allocate(targets, utilities, budget, "fine")
    shares = allocation.info["layer_params"]
    assert shares == [4 * (32 + 64)] * 2  # ...but fine-only does not move budget between layers
    assert allocate(targets, utilities, budget, "hierarchical").info["layer_params"][0] > shares[0]


def test_uniform_signals_reproduce_uniform_lora():
    targets = make_targets(4, [(8, 8), (8, 8)])
    budget = Budget(uniform_budget(targets, 4), min_rank=1, max_rank=8)
    utilities = {t.name: np.sqrt(np.arange(9.0)) for t in targets}  # identical concave curves
    assert set(allocate(targets, utilities, budget).ranks.values()) == {4}


def test_budget_too_small_for_min_ranks_is_a_clear_error():
    targets = make_targets(2, [(8, 8)])
    with pytest.raises(ConfigError, match="below the 64 that min_rank=2"):
        allocate(targets, {t.name: np.zeros(5) for t in targets}, Budget(40, min_rank=2, max_rank=4))
    with pytest.raises(ConfigError, match="min_rank must be at least 0"):
        Budget(100, min_rank=-1)


def test_greedy_closes_an_item_whose_next_step_does_not_fit():
    items = [[Step(5, 50, ()), Step(1, 40, ())], [Step(2, 4, ())]]
    assert greedy(items, 4) == [(1, 0)]  # item 0's first step never fits, so its cheap second step is unreachable
    assert greedy(items, 7) == [(0, 0), (0, 1)]  # best ratio first: 50/5, then 40/1; 4/2 no longer fits


def test_allocation_json_round_trip(tmp_path):
    targets = make_targets(2, [(8, 8)])
    allocation = allocate(targets, {t.name: np.sqrt(np.arange(9.0)) for t in targets}, Budget(64, 1, 8))
    path = tmp_path / "allocation.json"
    path.write_text(allocation.to_json())
    assert Allocation.load(path) == allocation
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="cannot read allocation"):
        Allocation.load(path)


def test_controls_keep_the_budget():
    from hydra_rank.rank.plan import shuffled, type_prior

    targets = make_targets(4, [(16, 16), (16, 8), (16, 8), (16, 16), (16, 48), (16, 48), (48, 16)])
    budget = Budget(uniform_budget(targets, 4), min_rank=1, max_rank=16)
    allocation = allocate(targets, concave_utilities(targets, 16, np.random.default_rng(3)), budget)
    mixed = shuffled(allocation, targets, seed=0)
    assert mixed.params(targets) == allocation.params(targets) and mixed.ranks != allocation.ranks
    for cost in {t.cost for t in targets}:
        same = [t.name for t in targets if t.cost == cost]
        assert sorted(mixed.ranks[n] for n in same) == sorted(allocation.ranks[n] for n in same)
    prior = type_prior(targets, budget)
    assert prior.params(targets) <= budget.total
    attention = np.mean([prior.ranks[t.name] for t in targets if t.kind in ("q_proj", "k_proj", "v_proj", "o_proj")])
    mlp = np.mean([prior.ranks[t.name] for t in targets if t.kind in ("gate_proj", "up_proj", "down_proj")])
    assert mlp > 2 * attention
