"""The benchmark harness: learning rates chosen on the validation split, paired runs, reuse of finished runs."""

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from hydra_rank.bench import (
    ADDED_KEYS,
    MAX_EXTENSIONS,
    best_lrs,
    finished_metrics,
    initial_grids,
    method_config,
    next_rate,
    run_all,
    run_bench,
    sweep_configs,
    sweep_table,
    what_matters,
    with_old_behaviour,
    with_resolved_ceiling,
)
from hydra_rank.config import DataConfig, from_dict, load_config
from hydra_rank.data import load_samples, split_validation
from hydra_rank.errors import ConfigError, DataError

from .test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_validation_split_is_held_out_of_training_and_fixed():
    plain = DataConfig(train_samples=None, eval_samples=None)
    held = DataConfig(train_samples=None, eval_samples=None, validation_samples=50, eval_split="validation")
    train, test = load_samples(plain, seed=0)
    kept, validation = load_samples(held, seed=0)
    assert len(validation) == 50 and len(kept) == len(train) - 50
    assert Counter(map(repr, validation)) + Counter(map(repr, kept)) == Counter(map(repr, train))  # never trained on
    assert validation == load_samples(held, seed=1)[1]  # the same split for every training seed
    assert load_samples(DataConfig(eval_samples=None, validation_samples=50), seed=0)[1] == test  # test still test


def test_validation_split_of_zero_leaves_training_untouched():
    samples = list(range(10))
    assert split_validation(samples, 0) == (samples, [])
    kept, validation = split_validation(samples, 3)
    assert kept == sorted(kept) and len(validation) == 3  # the rest keep their order
    with pytest.raises(DataError, match="more than half"):
        split_validation(samples, 6)


def test_validation_eval_needs_held_out_samples():
    with pytest.raises(ConfigError, match="validation_samples"):
        from_dict({"data": {"eval_split": "validation"}})


def test_best_lr_is_the_lowest_validation_loss():
    sweep = [
        {"method": "lora", "lr": 1e-3, "eval_loss": 0.5},
        {"method": "lora", "lr": 2e-3, "eval_loss": 0.4},
        {"method": "hydra", "lr": 1e-3, "eval_loss": 0.3},
        {"method": "hydra", "lr": 2e-3, "eval_loss": 0.3},  # a tie goes to the smaller rate
    ]
    assert best_lrs(sweep) == {"lora": 2e-3, "hydra": 1e-3}


def test_a_best_rate_on_the_edge_grows_the_grid_past_it():
    grid = [1e-3, 2e-3, 4e-3]
    assert next_rate(grid, 4e-3) == 8e-3 and next_rate(grid, 1e-3) == 5e-4
    assert next_rate(grid, 2e-3) is None  # bracketed: the optimum is inside the grid
    assert next_rate([1e-3], 1e-3) is None  # one rate asked for: nothing to judge an edge from


def test_sweep_chooses_on_validation_and_reports_on_test(tiny_llava_dir, colour_dataset, tmp_path):
    base = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "unused", max_steps=2)
    with pytest.raises(ConfigError, match="validation_samples"):
        run_bench(base, ["lora"], [0], tmp_path / "bench", lrs=[1e-3])
    data = base.to_dict()
    data["data"]["validation_samples"] = 3
    base = from_dict(data)
    result = run_bench(base, ["lora"], [0], tmp_path / "bench", lrs=[1e-4, 3e-2], jobs=2)
    rates = [r["lr"] for r in result.sweep]
    assert rates[:2] == [1e-4, 3e-2] and {r["split"] for r in result.sweep} == {"validation"}
    # the grid grows past an edge while the best rate so far sits on it, at most MAX_EXTENSIONS times
    counts = range(2, len(rates) + 1)
    expected = [next_rate(rates[:count], best_lrs(result.sweep[:count])["lora"]) for count in counts]
    assert rates[2:] == expected[:-1] and (expected[-1] is None or len(rates) == 2 + MAX_EXTENSIONS)
    assert len(rates) > 2  # 1e-4 barely moves in two steps, so 3e-2 wins on the edge and the grid grows
    chosen = best_lrs(result.sweep)["lora"]
    [row] = result.rows
    assert (row["method"], row["seed"], row["lr"], row["split"]) == ("lora", 0, chosen, "test")
    assert (row["dataset"], row["rank"]) == ("llava-json", 2) and row["peak_rss_mb"] > 0
    assert "Learning-rate sweep" in result.table and "**" in result.table
    saved = json.loads((tmp_path / "bench" / "sweep.json").read_text())
    assert [r["lr"] for r in saved] == rates
    metrics = tmp_path / "bench" / "lora-seed0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    again = run_bench(base, ["lora"], [0], tmp_path / "bench", lrs=[1e-4, 3e-2])
    assert metrics.stat().st_mtime_ns == stamp and again.rows == result.rows  # finished runs are reused
    recorded = json.loads(metrics.read_text())
    recorded["provenance"]["base_model"]["weights_sha256"] = {"model.safetensors": "0" * 64}  # another machine's
    metrics.write_text(json.dumps(recorded))
    stamp = metrics.stat().st_mtime_ns
    run_bench(base, ["lora"], [0], tmp_path / "bench", lrs=[1e-4, 3e-2])
    assert metrics.stat().st_mtime_ns != stamp  # same configuration, other base weights: trained again
    stamp = metrics.stat().st_mtime_ns
    config = load_config(metrics.parent / "config.yaml")  # the finished run's own config: reusable as it is
    [fresh] = run_all([config], tmp_path / "bench", "demo.json", jobs=1, reuse=False)  # the demo always trains
    assert metrics.stat().st_mtime_ns != stamp and fresh["eval_loss"] > 0


def test_reuse_ignores_only_what_cannot_change_the_result():
    lora, hydra = (from_dict({"adapter": {"method": m}}).to_dict() for m in ("lora", "hydra"))
    for config in (lora, hydra):
        changed = {**config, "schedule": {**config["schedule"], "signal_steps": 7}}
        assert (what_matters(changed) == what_matters(config)) is (config is lora)  # only hydra reads its schedule
        other_lr = {**config, "train": {**config["train"], "lr": 1.0}}
        assert what_matters(other_lr) != what_matters(config)
        scaled = {**config, "adapter": {**config["adapter"], "rank_scale": "fixed"}}
        assert (what_matters(scaled) == what_matters(config)) is (config is lora)  # uniform LoRA has only rank r0


def test_runs_recorded_before_a_key_existed_compare_at_its_old_behaviour():
    """A LoRA run recorded before any of the added keys existed (rank_scale, quantization, checkpointing, precision,
    sharding) is still reusable; a HyDRA run recorded then (fixed scale) is not the sqrt default's run."""
    for method, reusable in (("lora", True), ("hydra", False)):
        current = from_dict({"adapter": {"method": method}}).to_dict()
        old = {section: dict(values) for section, values in current.items()}
        for section, key in ADDED_KEYS:
            del old[section][key]
        assert (what_matters(with_old_behaviour(old)) == what_matters(current)) is reusable
        fixed = {**current, "adapter": {**current["adapter"], "rank_scale": "fixed"}}
        assert what_matters(with_old_behaviour(old)) == what_matters(with_resolved_ceiling(from_dict(fixed)).to_dict())


def test_full_fine_tuning_sweeps_a_lower_grid(tmp_path):
    base = from_dict({"data": {"validation_samples": 10}})
    configs = sweep_configs(base, initial_grids(["lora", "full"], [1e-3, 2e-3]), 0, tmp_path)
    assert [(c.adapter.method, c.train.lr, c.data.eval_split) for c in configs] == [
        ("lora", 1e-3, "validation"),
        ("lora", 2e-3, "validation"),
        ("full", pytest.approx(1e-5), "validation"),
        ("full", pytest.approx(2e-5), "validation"),
    ]
    rows = [
        {"method": c.adapter.method, "lr": c.train.lr, "seed": 0, "eval_accuracy": 0.5, "eval_loss": loss}
        for c, loss in zip(configs, [0.4, 0.3, 0.2, 0.5], strict=True)
    ]
    table = sweep_table(rows, best_lrs(rows))
    assert "**0.002: 0.500 / 0.3000**" in table and "**1e-05: 0.500 / 0.2000**" in table


def test_a_run_recorded_by_an_older_commit_stays_reusable():
    """A real finished run (the tuned cell's LoRA seed 0, recorded before several keys existed) compares equal to
    the configuration it would be re-run with today: every key added since is in ADDED_KEYS at its old value."""
    recorded = yaml.safe_load((ROOT / "benchmarks/results/scenes-r4/runs/lora-seed0/config.yaml").read_text())
    assert what_matters(with_old_behaviour(recorded)) == what_matters(from_dict(recorded).to_dict())


@pytest.mark.parametrize(("rank", "reused"), [(4, True), (8, False)])
def test_a_run_without_a_recorded_ceiling_had_the_old_one(tmp_path, rank, reused):
    """Before 566aaf3 `adapter.max_rank: null` meant 8·r0 at every budget; it now means 32 at r0 = 8 (unchanged at
    r0 ≤ 4). A finished HyDRA run that recorded only `null` is reused where the ceiling is the same and trained again
    where it changed; a run bench wrote since records its ceiling and is reused."""
    base = from_dict({"adapter": {"method": "hydra", "rank": rank}})
    config = method_config(base, "hydra", 0, tmp_path / "hydra-seed0")
    assert config.adapter.max_rank == (32 if rank == 8 else 8 * rank)  # what the run records: today's ceiling
    assert method_config(base, "lora", 0, tmp_path / "lora-seed0").adapter.max_rank is None  # LoRA has no ceiling
    run_dir = tmp_path / "hydra-seed0"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"eval_loss": 0.5}))

    def record(max_rank: int | None) -> None:
        recorded = config.to_dict()
        recorded["adapter"]["max_rank"] = max_rank
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))

    record(None)  # as runs before this change recorded it
    assert (finished_metrics(config) is not None) is reused
    record(config.adapter.max_rank)  # as bench records it now
    assert finished_metrics(config) == {"eval_loss": 0.5}
    record(8 * rank)  # an old run that set the old ceiling explicitly
    assert (finished_metrics(config) is not None) is reused
