"""Dynamic HyDRA: decision timing, capped moves, the performance model, and whole runs with many decisions."""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

from hydra_rank.config import ScheduleConfig
from hydra_rank.errors import ConfigError
from hydra_rank.inputs import load_model
from hydra_rank.rank.allocate import allocate, move_towards
from hydra_rank.rank.budget import Allocation, Budget, discover_targets, uniform_budget
from hydra_rank.rank.explore import explore
from hydra_rank.rank.perf_model import PerfModel, spearman
from hydra_rank.rank.scheduler import decision_steps
from hydra_rank.train import run
from hydra_rank.utils import read_jsonl

from .test_allocate import concave_utilities, make_targets
from .test_train import tiny_config


def test_decision_steps():
    assert decision_steps(60, ScheduleConfig()) == [6, 12, 18, 24, 30, 36, 42]
    assert decision_steps(10, ScheduleConfig(warmup_fraction=0.1, interval_fraction=0.1, freeze_fraction=1.0)) == list(
        range(1, 10)
    )  # never on the last step


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.01, 1.0))
def test_capped_moves_go_towards_the_target_within_budget(seed, fraction):
    rng = np.random.default_rng(seed)
    targets = make_targets(3, [(8, 16), (16, 8), (8, 8)])
    budget = Budget(uniform_budget(targets, 4), min_rank=1, max_rank=12, granularity=int(rng.integers(1, 3)))
    start = allocate(targets, concave_utilities(targets, 12, rng), budget)
    utilities = concave_utilities(targets, 12, rng)
    target = allocate(targets, utilities, budget)
    cap = fraction * budget.total
    moved = move_towards(start, target, targets, utilities, budget, cap)
    assert moved.params(targets) <= budget.total
    assert moved.moved_params(start, targets) <= cap
    for t in targets:
        low, high = sorted((start.ranks[t.name], target.ranks[t.name]))
        assert low <= moved.ranks[t.name] <= high  # never past the target, never away from it
    if fraction == 1.0 or cap >= budget.total:
        assert moved.params(targets) >= start.params(targets) - max(t.cost for t in targets) * budget.granularity


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.01, 0.5), st.sampled_from([0, 1]))
def test_exploration_exchanges_rank_between_random_equal_cost_pairs(seed, share, min_rank):
    rng = np.random.default_rng(seed)
    targets = make_targets(4, [(8, 16), (16, 8), (8, 8)])  # q and k cost the same per rank: pairs may cross kinds
    budget = Budget(uniform_budget(targets, 4), min_rank=min_rank, max_rank=10)
    start = allocate(targets, concave_utilities(targets, 10, rng), budget)
    new, pairs = explore(start, targets, budget, share, torch.Generator().manual_seed(seed))
    assert new.params(targets) == start.params(targets)  # the budget holds exactly
    assert new.moved_params(start, targets) <= share * budget.total
    costs = {t.name: t.cost for t in targets}
    for giver, receiver, delta in pairs:
        assert costs[giver] == costs[receiver] and 1 <= delta <= max(
            1, min(start.ranks[giver], start.ranks[receiver]) // 2
        )
        assert new.ranks[giver] == start.ranks[giver] - delta >= 1
        assert new.ranks[receiver] == start.ranks[receiver] + delta <= budget.max_rank
    changed = {n for n in new.ranks if new.ranks[n] != start.ranks[n]}
    assert changed == {name for pair in pairs for name in pair[:2]} and len(changed) == 2 * len(pairs)
    again = explore(start, targets, budget, share, torch.Generator().manual_seed(seed))
    assert again[1] == pairs  # the generator decides everything


@pytest.mark.parametrize("seed", range(5))
def test_exploration_from_uniform_ranks_moves_about_its_share(seed):
    """From uniform rank 4 every pair fits the rank bounds, so only the share limits the exchanges: pairs of δ = 2
    are drawn until the next one would pass it."""
    targets = make_targets(8, [(8, 16), (16, 8), (8, 8)])
    budget = Budget(uniform_budget(targets, 4), min_rank=1, max_rank=16)
    start = Allocation.uniform(targets, 4)
    new, pairs = explore(start, targets, budget, 0.2, torch.Generator().manual_seed(seed))
    moved = new.moved_params(start, targets)
    assert pairs and all(delta == 2 for _, _, delta in pairs)
    assert 0.2 * budget.total - 2 * max(t.cost for t in targets) < moved <= 0.2 * budget.total


def test_perf_model_recovers_a_known_gain_law():
    """Realised gains generated as energy^0.5 * 3^[kind is v_proj]: the fit finds both effects and predicts
    better than the energy-only prior."""
    rng = np.random.default_rng(0)
    targets = make_targets(6, [(16, 16), (16, 16), (16, 16)])  # q, k, v
    model = PerfModel(targets, ridge=0.01)
    is_v = np.array([t.kind == "v_proj" for t in targets], dtype=float)
    for _ in range(3):
        energy, ranks = rng.lognormal(0, 2, len(targets)), rng.integers(1, 9, len(targets)).astype(float)
        x = model.features(energy, ranks)
        realised = energy**0.5 * 3**is_v * rng.lognormal(0, 0.05, len(targets))
        model.fit(x, realised)
    weights = model.describe()
    assert weights["log_energy"] == pytest.approx(0.5, abs=0.05)
    assert weights["kind:v_proj"] - weights["kind:q_proj"] == pytest.approx(np.log(3), abs=0.1)
    fitted, prior = model.predict(x), PerfModel(targets).predict(x)
    assert spearman(fitted, realised) > 0.98
    assert spearman(fitted, realised) > spearman(prior, realised) + 0.02
    assert np.abs(np.log(fitted / realised)).mean() < 0.2  # the intercept puts predictions in the right units


def test_perf_model_utilities_are_concave_and_start_at_zero():
    targets = make_targets(2, [(8, 8)])
    model = PerfModel(targets)
    curves = np.cumsum(np.abs(np.random.default_rng(1).normal(size=(2, 9))), axis=1)
    curves[:, 0] = 0
    utilities = model.utilities(curves)
    assert np.all(utilities[:, 0] == 0)
    increments = np.diff(utilities, axis=1)
    assert np.all(increments >= 0) and np.all(np.diff(increments, axis=1) <= 1e-12)
    assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def hydra_runs(tiny_llava_dir, tmp_path_factory):
    """The same many-decision run twice (for determinism), with the budget asserted after every step, both with
    randomised rank perturbation on top of the scheduler's moves (`schedule.explore`)."""
    from .conftest import write_colour_dataset

    root = tmp_path_factory.mktemp("hydra")
    dataset = write_colour_dataset(root / "data", count=16)
    results = []
    for name, margin, share in (("a", 0.2, 0.1), ("b", 0.2, 0.1), ("stubborn", 1e9, 0.0)):
        config = tiny_config(tiny_llava_dir, dataset, root / name, max_steps=12, grad_accum=2, debug_checks=True)
        config.adapter.method = "hydra"
        config.adapter.max_rank = 6
        config.schedule = ScheduleConfig(
            warmup_fraction=0.1,
            interval_fraction=0.1,
            freeze_fraction=0.9,
            signal_steps=1,
            max_move_fraction=0.3,
            margin=margin,
            explore=share,
        )
        results.append((config, run(config, show_progress=False)))
    return results


def test_first_allocation_comes_from_a_model_fitted_on_the_warmup(hydra_runs):
    """The warm-up's realised gains fit the performance model before the first allocation, so its predictions are
    in loss units from the start (the energy prior alone predicted gradient energy: orders of magnitude off)."""
    _, result = hydra_runs[0]
    first, second = read_jsonl(result.output_dir / "allocation_history.jsonl")[:2]
    assert first["fitted_on_warmup"] and first["perf_model"]["intercept"] != 0
    ratio = first["predicted_gain"] / first["realised_gain"]
    assert 0.1 < ratio < 10, ratio
    assert second["predicted_gain_previous"] == pytest.approx(first["predicted_gain"])


def test_margin_stops_exchanges_that_do_not_pay(hydra_runs):
    """With a prohibitive margin only the first (free) allocation happens: later decisions may spend spare budget
    but never take rank from one module to give it to another."""
    (_, moving), _, (_, stubborn) = hydra_runs
    for result, exchanges in ((moving, True), (stubborn, False)):
        history = read_jsonl(result.output_dir / "allocation_history.jsonl")
        shrinks = [
            any(rank < before["ranks"][n] for n, rank in _planned_ranks(now).items())
            for before, now in itertools.pairwise(history)
        ]
        assert any(shrinks) is exchanges


def _planned_ranks(entry: dict) -> dict[str, int]:
    """A decision's ranks as the scheduler planned them, before the exploration's exchanges."""
    ranks = dict(entry["ranks"])
    for giver, receiver, delta in entry.get("explored", []):
        ranks[giver] += delta
        ranks[receiver] -= delta
    return ranks


def test_budget_holds_at_every_step_across_many_decisions(hydra_runs):
    config, result = hydra_runs[0]
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == decision_steps(12, config.schedule) == list(range(1, 12))
    budget = result.metrics["budget_params"]
    assert all(entry["used_params"] <= budget for entry in history)
    log = read_jsonl(result.output_dir / "log.jsonl")
    assert all(record["trainable_params"] <= budget for record in log)
    assert result.metrics["max_trainable_params"] <= budget
    distinct = {tuple(entry["ranks"].values()) for entry in history}
    assert len(distinct) > 2  # ranks really moved
    cap = (0.3 + 0.1) * budget + 1  # the scheduler's moves, then the exploration's
    assert all(entry["moved_params"] <= cap for entry in history[1:])  # capped after the first
    assert sum(entry["resized_modules"] for entry in history) > 0
    later = [entry for entry in history if "spearman" in entry]
    assert len(later) == len(history) - 1 and all(-1 <= entry["spearman"] <= 1 for entry in later)
    assert result.metrics["decisions"] == 11 and result.metrics["scheduler_time_s"] > 0


def test_exploration_is_logged_as_pairs_the_rank_response_reads(hydra_runs):
    """Every decision but the last exchanges rank between pairs of modules on top of its plan (the run asserts the
    adapters' sizes and the budget after every step, exchanges included), and benchmarks/decision_churn.py turns
    them into (measured, measured later, predicted, log-rank shift) rows, one per pair."""
    _, result = hydra_runs[0]
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert all("explored" in entry for entry in history[:-1]) and "explored" not in history[-1]
    assert sum(len(entry["explored"]) for entry in history[:-1]) >= len(history) - 1  # (a draw may find no pair)
    assert "warmup_realised" in history[0]
    for entry in history[:-1]:
        for giver, receiver, delta in entry["explored"]:
            planned = entry["explored_planned_prediction"]
            assert planned[giver] > 0 and planned[receiver] > 0 and delta >= 1
    churn = _load_benchmark("decision_churn")
    rows = churn.perturbed_pairs(history)
    assert len(rows) == sum(len(entry["explored"]) for entry in history[:-1])
    assert np.all(rows[:, 3] > 0) and np.all(np.isfinite(rows[:, [0, 2, 3]]))
    # only the pairs of the last exchanging decision have no second interval after them
    assert np.isnan(rows[:, 1]).sum() == len(history[-2]["explored"]) < len(rows)
    response = churn.randomised_response(rows)
    assert response["low"] <= response["measured"] <= response["high"]


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decisions_are_deterministic_for_a_seed(hydra_runs):
    (_, first), (_, second), _ = hydra_runs
    histories = [read_jsonl(r.output_dir / "allocation_history.jsonl") for r in (first, second)]
    assert [h["ranks"] for h in histories[0]] == [h["ranks"] for h in histories[1]]
    losses = [[r["loss"] for r in read_jsonl(x.output_dir / "log.jsonl")] for x in (first, second)]
    assert losses[0] == losses[1]


def test_final_adapter_is_compact_and_reloads_with_stock_peft(hydra_runs):
    config, result = hydra_runs[0]
    final = Allocation.load(result.output_dir / "allocation.json")
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert final.ranks == history[-1]["ranks"]
    assert result.metrics["trainable_params"] == final.params(discover_targets(result.model.base_model.model))
    base, _ = load_model(config.model.name_or_path)
    reloaded = PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    assert (result.output_dir / "allocation_start.png").is_file()


def test_hydra_run_report_shows_the_allocation_story(hydra_runs):
    _, result = hydra_runs[0]
    page = (result.output_dir / "report.html").read_text()
    for png in ("allocation_start.png", "allocation.png", "rank_over_time.png", "predictions.png", "loss_curves.png"):
        assert png in page and (result.output_dir / png).stat().st_size > 5_000, png


def test_coherent_spectrum_run_keeps_the_budget_and_resumes_exactly(tiny_llava_dir, tmp_path):
    """`adapter.spectrum: coherent` drives both the calibrated start and every decision's sketch; a checkpoint taken
    while a sketch is open (step 5, before the decision at 6) carries its running sum, so the resumed run decides and
    trains exactly as the uninterrupted one."""
    from .conftest import write_colour_dataset

    dataset = write_colour_dataset(tmp_path / "data", count=16)
    config = tiny_config(tiny_llava_dir, dataset, tmp_path / "run", max_steps=8, debug_checks=True, checkpoint_every=5)
    config.adapter.method, config.adapter.max_rank, config.adapter.spectrum = "hydra", 6, "coherent"
    config.adapter.calibration_batches = 2
    config.schedule = ScheduleConfig(init="calibrated", warmup_fraction=0.25, interval_fraction=0.25, signal_steps=2)
    result = run(config, show_progress=False)
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert all(entry["used_params"] <= result.metrics["budget_params"] for entry in history)
    start = Allocation.load(result.output_dir / "allocation_start.json")
    assert start.info["signal"].startswith("coherent") and len(set(start.ranks.values())) > 1
    losses = [record["loss"] for record in read_jsonl(result.output_dir / "log.jsonl")]
    resumed = run(config, resume=True, show_progress=False)
    assert resumed.metrics["resumed_from_step"] == 5
    assert [record["loss"] for record in read_jsonl(resumed.output_dir / "log.jsonl")] == losses
    assert read_jsonl(resumed.output_dir / "allocation_history.jsonl")[-1]["ranks"] == history[-1]["ranks"]


def test_coherent_spectrum_refuses_decisions_one_step_apart(tiny_llava_dir, tmp_path):
    """A coherent spectrum needs two sketched steps per decision: a schedule that gives one is refused before any
    training, with what to change."""
    from .conftest import write_colour_dataset

    dataset = write_colour_dataset(tmp_path / "data", count=16)
    config = tiny_config(tiny_llava_dir, dataset, tmp_path / "run", max_steps=8)
    config.adapter.method, config.adapter.spectrum = "hydra", "coherent"
    config.schedule = ScheduleConfig(warmup_fraction=0.1, interval_fraction=0.1)
    with pytest.raises(ConfigError, match=r"sees only one: raise train.max_steps"):
        run(config, show_progress=False)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_held_out_signals_keep_the_budget_and_resume_exactly(tiny_llava_dir, tmp_path):
    """`schedule.attribution: probe` scores every interval on a fresh training batch at its end, `schedule.curves:
    held_out` every direction of the update (both on: one run tests both); a checkpoint taken inside an interval
    (step 5, decisions at 2, 4, 6) carries the interval's start factors, so the resumed run measures, decides and
    trains exactly as the uninterrupted one."""
    from .conftest import write_colour_dataset

    dataset = write_colour_dataset(tmp_path / "data", count=16)
    config = tiny_config(tiny_llava_dir, dataset, tmp_path / "run", max_steps=8, debug_checks=True, checkpoint_every=5)
    config.adapter.method, config.adapter.max_rank = "hydra", 6
    config.schedule = ScheduleConfig(
        warmup_fraction=0.25, interval_fraction=0.25, attribution="probe", curves="held_out"
    )
    result = run(config, show_progress=False)
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert all(entry["used_params"] <= result.metrics["budget_params"] for entry in history)
    assert history[0]["fitted_on_warmup"] and all("spearman" in entry for entry in history[1:])
    assert len({tuple(entry["ranks"].values()) for entry in history}) > 1  # the probe's gains moved rank
    assert result.metrics["attribution_time_s"] > 0
    assert result.metrics["sketch_time_s"] == 0  # held-out curves need no sketch
    losses = [record["loss"] for record in read_jsonl(result.output_dir / "log.jsonl")]
    resumed = run(config, resume=True, show_progress=False)
    assert resumed.metrics["resumed_from_step"] == 5
    assert [record["loss"] for record in read_jsonl(resumed.output_dir / "log.jsonl")] == losses
    again = read_jsonl(resumed.output_dir / "allocation_history.jsonl")
    assert again[-1]["ranks"] == history[-1]["ranks"]
    assert again[-1]["per_module"]["realised"] == history[-1]["per_module"]["realised"]


@pytest.mark.parametrize("curves", ["worth", "pooled_worth"])
def test_worth_curves_keep_the_budget_and_resume_exactly(tiny_llava_dir, tmp_path, curves):
    """`schedule.curves: worth` decides from each module's held-out worth and the rank it held on average so far (the
    step-weighted mean of its ranks since step 0), with no performance model to fit; a run resumed from a checkpoint
    between decisions (step 5, decisions at 2, 4, 6) carries those rank-steps and decides exactly as the
    uninterrupted one."""
    from .conftest import write_colour_dataset

    dataset = write_colour_dataset(tmp_path / "data", count=16)
    config = tiny_config(tiny_llava_dir, dataset, tmp_path / "run", max_steps=8, debug_checks=True, checkpoint_every=5)
    config.adapter.method, config.adapter.max_rank = "hydra", 6
    config.schedule = ScheduleConfig(warmup_fraction=0.25, interval_fraction=0.25, curves=curves)
    result = run(config, show_progress=False)
    history = read_jsonl(result.output_dir / "allocation_history.jsonl")
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert all(entry["used_params"] <= result.metrics["budget_params"] for entry in history)
    names, rank0 = list(history[0]["ranks"]), config.adapter.rank
    assert history[0]["mean_ranks"] == dict.fromkeys(names, rank0) and set(history[0]["worth"]) == set(names)
    for name in names:  # steps 1-2 at r0, 3-4 at the first decision's ranks
        expected = (2 * rank0 + 2 * history[0]["ranks"][name]) / 4
        assert history[1]["mean_ranks"][name] == pytest.approx(expected)
    assert history[0]["ranks"] != dict.fromkeys(names, rank0)  # the worth moved rank
    assert not any("spearman" in entry or "perf_model" in entry for entry in history)
    assert result.metrics["sketch_time_s"] == 0 and result.metrics["attribution_time_s"] > 0
    assert (result.output_dir / "rank_over_time.png").is_file()
    assert not (result.output_dir / "predictions.png").exists()  # no performance model: nothing predicted to plot
    losses = [record["loss"] for record in read_jsonl(result.output_dir / "log.jsonl")]
    resumed = run(config, resume=True, show_progress=False)
    assert resumed.metrics["resumed_from_step"] == 5
    assert [record["loss"] for record in read_jsonl(resumed.output_dir / "log.jsonl")] == losses
    again = read_jsonl(resumed.output_dir / "allocation_history.jsonl")
    assert again[-1]["ranks"] == history[-1]["ranks"] and again[-1]["mean_ranks"] == history[-1]["mean_ranks"]
