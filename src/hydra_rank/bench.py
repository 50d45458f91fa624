"""Benchmark harness: every method on the same base model, data order, steps, learning-rate schedule and budget.

Each (method, seed) run trains in its own process (`runner.py`) one after another, so wall time and peak memory are
each run's own. A run whose directory already holds metrics for the same configuration (every key that can change
its result: `what_matters`) and the same base weights (`same_base_model`) is reused, so an interrupted benchmark
continues where it stopped.

Learning rates are tuned, never guessed per method: with `lrs`, every method first trains once (on the first seed)
at each learning rate, scored on the validation split (`data.validation_samples` training samples held out), and
its lowest validation eval loss picks its learning rate for the reported runs, which are scored on the test split;
a method whose best rate lies on the grid's edge also trains at the next rate past it.
Eval loss, not accuracy, picks: it is what every method minimises and it is far less noisy on a few hundred
questions than exact match. Outputs in the benchmark directory:

    sweep/               the sweep's runs; sweep.json: one row per (method, learning rate) with its validation scores
    results.json         per method and seed: dataset, rank (r0 of the budget), lr, accuracy, eval loss, trainable
                         params (end and max), wall time, peak RSS, time spent in calibration / allocation /
                         resizing, threads, and provenance (git commit and dirty flag, library versions, machine, the
                         base model's cache key and sha256)
    results.md           mean ± std per method, and per-seed differences against the reference method; the sweep
    accuracy_vs_time.png, loss_curves.png
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .builtin import resolve
from .config import RunConfig, from_dict, load_yaml
from .errors import ConfigError
from .inputs import model_identity
from .methods import REFERENCE_METHOD, get_method
from .report import plot_loss_curves
from .runner import run_isolated
from .utils import atomic_write_text, read_jsonl, write_json

KEYS = (
    "eval_accuracy",
    "eval_loss",
    "majority_accuracy",
    "trainable_params",
    "max_trainable_params",
    "budget_params",
    "wall_time_s",
    "train_time_s",
    "peak_rss_mb",
    "calibration_time_s",
    "scheduler_time_s",
    "mean_spearman",
    "threads",
    "provenance",
)


@dataclass
class BenchResult:
    rows: list[dict]  # one per (method, seed)
    table: str  # markdown
    sweep: list[dict]  # one per (method, learning rate); empty without a sweep


def method_config(
    base: RunConfig, method: str, seed: int, run_dir: Path, lr: float | None = None, split: str | None = None
) -> RunConfig:
    """`base` with one method, seed, learning rate and eval split; everything else (data order per seed, steps,
    schedule, budget) shared."""
    data = base.to_dict()
    data["adapter"]["method"] = method
    data["train"]["seed"] = seed
    data["train"]["output_dir"] = str(run_dir)
    if lr is not None:
        data["train"]["lr"] = lr
    if split is not None:
        data["data"]["eval_split"] = split
    return with_resolved_ceiling(from_dict(data))


def with_resolved_ceiling(config: RunConfig) -> RunConfig:
    """`config` with, for a method that allocates ranks, `adapter.max_rank: null` replaced by the ceiling it stands
    for today (`upper_rank`). Bench runs record this value: the default has changed before (566aaf3), and a finished
    run that says only `null` cannot show which ceiling it had (`with_old_behaviour`)."""
    adapter = config.adapter
    if not adapter.spec.allocates or adapter.max_rank is not None:
        return config
    return replace(config, adapter=replace(adapter, max_rank=adapter.upper_rank))


ALLOCATION_KEYS = ("rank_scale", "spectrum", "max_rank")  # adapter keys read only by methods that allocate ranks


def what_matters(config: dict) -> dict:
    """The part of a config (as a dict) that can change a run's result: the scheduler's keys only matter to a
    dynamic method and the scale convention of ranks other than r0 only to a method that allocates ranks, so a
    finished LoRA run stays reusable when only HyDRA's keys (or their defaults) change."""
    method = get_method(config["adapter"]["method"])
    relevant = {key: value for key, value in config.items() if key != "schedule"}
    if method.dynamic:
        relevant["schedule"] = config["schedule"]
    if not method.allocates:
        relevant["adapter"] = {key: value for key, value in config["adapter"].items() if key not in ALLOCATION_KEYS}
    return relevant


# Keys added to the configuration after runs were recorded, with the value that reproduces what a run without the key
# did. A finished run whose config.yaml lacks one is compared as if it had that value, so adding a key (whatever its
# new default) neither discards finished runs it cannot change nor reuses runs it would change.
ADDED_KEYS = {
    ("model", "quantization"): "none",
    ("adapter", "rank_scale"): "fixed",
    ("adapter", "spectrum"): "stacked",
    ("train", "gradient_checkpointing"): False,
    ("train", "mixed_precision"): "no",
    ("train", "sharding"): "none",
}


def old_default_max_rank(rank: int) -> int:
    """The ceiling `adapter.max_rank: null` stood for before 566aaf3 (8·r0 at every budget)."""
    return 8 * rank


def with_old_behaviour(config: dict) -> dict:
    """`config` (a finished run's, as a dict) with every key of `ADDED_KEYS` it lacks, at its old behaviour, and a
    `null` rank ceiling read as the 8·r0 it meant when runs recorded it so: since bench writes each run's ceiling
    (`method_config`), only runs from before that record `null`. (Runs recorded between 566aaf3 and that change had
    the new ceiling under `null`; for r0 ≥ 5 they are retrained rather than reused: the safe side.)"""
    filled = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(filled.get(section), dict):
            filled[section].setdefault(key, value)
    adapter = filled.get("adapter")
    if isinstance(adapter, dict) and adapter.get("max_rank") is None and "rank" in adapter:
        adapter["max_rank"] = old_default_max_rank(adapter["rank"])
    return filled


def same_base_model(metrics: dict, config: RunConfig) -> bool:
    """Whether a finished run (its metrics) trained on the weights `config`'s base model has here. The same name can
    stand for other weights: a built-in VLM whose projector was trained on its machine (every build before the
    projector shipped, and any build for another recipe or other source wheels) differs between CPU families, so a
    run copied from another machine may not match. A run that recorded no weights (a hub id) is taken as matching:
    there is nothing to compare."""
    recorded = metrics.get("provenance", {}).get("base_model", {}).get("weights_sha256")
    if recorded is None:
        return True
    name = config.model.name_or_path
    return recorded == model_identity(name, resolve(name))["weights_sha256"]


def finished_metrics(config: RunConfig) -> dict | None:
    """The metrics of the run in `config`'s output folder when it finished with the same configuration (in every key
    that can change its result) on the same base weights; None when it has to train."""
    run_dir = Path(config.train.output_dir)
    previous = run_dir / "config.yaml"
    if not ((run_dir / "metrics.json").is_file() and previous.is_file()):
        return None
    finished = with_old_behaviour(load_yaml(previous.read_text(encoding="utf-8")))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    same = what_matters(finished) == what_matters(with_resolved_ceiling(config).to_dict())
    return metrics if same and same_base_model(metrics, config) else None


def run_or_reuse(config: RunConfig, config_path: Path, threads: int | None = None, reuse: bool = True) -> dict:
    """The run's metrics: its finished run's (`finished_metrics`) where `reuse` allows it, else trained."""
    metrics = finished_metrics(config) if reuse else None
    return metrics if metrics is not None else run_isolated(config, config_path, threads)


def _row(config: RunConfig, metrics: dict) -> dict:
    return {
        "method": config.adapter.method,
        "seed": config.train.seed,
        "dataset": config.data.dataset,
        "rank": config.adapter.rank,
        "lr": config.train.lr,
        "split": config.data.eval_split,
        "run_dir": config.train.output_dir,
        **{k: metrics.get(k) for k in KEYS},
    }


def run_all(configs: list[RunConfig], output_dir: Path, results: str, jobs: int, reuse: bool = True) -> list[dict]:
    """Train (or reuse) every config, `jobs` at a time, each in its own process; rows in the configs' order.
    `results` (a JSON file in `output_dir`) is rewritten as runs finish, so partial results survive a crash.
    Parallel runs share the cores (one thread each on two cores by default), so their wall times are comparable with
    each other, not with a run that had the machine alone."""
    rows: list[dict | None] = [None] * len(configs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    lock = threading.Lock()

    def one(index: int) -> None:
        config = configs[index]
        config_path = output_dir / "configs" / f"{Path(config.train.output_dir).name}.yaml"
        rows[index] = _row(config, run_or_reuse(config, config_path, threads, reuse))
        with lock:
            write_json(output_dir / results, [row for row in rows if row is not None])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, index) for index in range(len(configs))]:
            future.result()  # the first failure stops the benchmark with its error
    return [row for row in rows if row is not None]


# How many times a method's grid may grow past its edge (see `sweep_lrs`).
MAX_EXTENSIONS = 2


def sweep_lrs(
    base: RunConfig, methods: list[str], lrs: list[float], seed: int, output_dir: Path, jobs: int = 1
) -> list[dict]:
    """Every method at every learning rate on `seed` (times the method's `lr_scale`: full fine-tuning moves every
    weight, so its grid sits lower), scored on the validation split.

    A best rate on the grid's edge says the optimum may lie beyond it, so that method's grid grows by one rate past
    the edge (`next_rate`) and the sweep continues, up to `MAX_EXTENSIONS` times per method. The same rule for every
    method: no method is compared at a rate it was never allowed to look past."""
    if base.data.validation_samples < 1:
        raise ConfigError(
            "bench --lrs chooses learning rates on a validation split: set data.validation_samples (e.g. 300) in "
            "the config or with --set"
        )
    grids = initial_grids(methods, lrs)
    while True:
        rows = run_all(sweep_configs(base, grids, seed, output_dir), output_dir, "sweep.json", jobs)
        chosen = best_lrs(rows)
        grown = {
            method: rate
            for method, grid in grids.items()
            if len(grid) - len(lrs) < MAX_EXTENSIONS and (rate := next_rate(grid, chosen[method])) is not None
        }
        if not grown:
            return rows
        for method, rate in grown.items():
            grids[method].append(rate)


def initial_grids(methods: list[str], lrs: list[float]) -> dict[str, list[float]]:
    """Per method, the grid times its `lr_scale`."""
    return {method: [rate * get_method(method).lr_scale for rate in lrs] for method in methods}


def next_rate(grid: list[float], best: float) -> float | None:
    """The rate past the grid's edge when `best` sits on it (twice the largest, half the smallest), else None. A
    single rate has no edge to judge from: the user asked for exactly that rate."""
    if len(grid) < 2:
        return None
    if best == max(grid):
        return best * 2
    if best == min(grid):
        return best / 2
    return None


def sweep_configs(base: RunConfig, grids: dict[str, list[float]], seed: int, output_dir: Path) -> list[RunConfig]:
    """The sweep's runs: each method at each rate of its grid, on the validation split."""
    return [
        method_config(base, method, seed, output_dir / "sweep" / f"{method}-lr{lr:g}", lr, "validation")
        for method, grid in grids.items()
        for lr in grid
    ]


def best_lrs(sweep: list[dict]) -> dict[str, float]:
    """Per method, the learning rate with the lowest validation eval loss (ties: the smaller rate)."""
    best: dict[str, dict] = {}
    for row in sweep:
        current = best.get(row["method"])
        if current is None or (row["eval_loss"], row["lr"]) < (current["eval_loss"], current["lr"]):
            best[row["method"]] = row
    return {method: row["lr"] for method, row in best.items()}


def run_bench(
    base: RunConfig,
    methods: list[str],
    seeds: list[int],
    output_dir: Path,
    reference: str = REFERENCE_METHOD,
    lrs: list[float] | None = None,
    jobs: int = 1,
) -> BenchResult:
    """Sweep learning rates (with `lrs`), then train every method on every seed at its chosen rate."""
    sweep = sweep_lrs(base, methods, lrs, seeds[0], output_dir, jobs) if lrs else []
    chosen = best_lrs(sweep)
    configs = [
        method_config(base, method, seed, output_dir / f"{method}-seed{seed}", chosen.get(method))
        for seed in seeds
        for method in methods
    ]
    rows = run_all(configs, output_dir, "results.json", jobs)
    table = markdown_table(rows, methods, reference if reference in methods else methods[0])
    if sweep:
        table += "\n" + sweep_table(sweep, chosen)
    atomic_write_text(output_dir / "results.md", table)
    plot_accuracy_vs_time(rows, output_dir / "accuracy_vs_time.png")
    mean_curves = {m: _mean_log([Path(r["run_dir"]) for r in rows if r["method"] == m]) for m in methods}
    plot_loss_curves(mean_curves, output_dir / "loss_curves.png")
    return BenchResult(rows, table, sweep)


def _mean_log(run_dirs: list[Path]) -> list[dict]:
    """Per-step training loss averaged over seeds."""
    logs = [read_jsonl(d / "log.jsonl") for d in run_dirs]
    steps = min(len(log) for log in logs)
    return [{"step": i + 1, "loss": statistics.fmean(log[i]["loss"] for log in logs)} for i in range(steps)]


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def markdown_table(rows: list[dict], methods: list[str], reference: str) -> str:
    """Mean ± std over seeds, and the per-seed paired difference against `reference` (same seeds)."""
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"| method | lr | accuracy | eval loss | Δ accuracy vs {reference} | Δ eval loss vs {reference} "
        "| trainable params (end / max) | wall time (s) | peak RSS (MiB) | allocation time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = [by[(method, s)] for s in seeds if (method, s) in by]
        paired = [(by[(method, s)], by[(reference, s)]) for s in seeds if (method, s) in by and (reference, s) in by]
        delta_acc = [a["eval_accuracy"] - b["eval_accuracy"] for a, b in paired]
        delta_loss = [a["eval_loss"] - b["eval_loss"] for a, b in paired]
        alloc = [(r.get("calibration_time_s") or 0) + (r.get("scheduler_time_s") or 0) for r in runs]
        lines.append(
            f"| {method} | {'/'.join(f'{lr:g}' for lr in dict.fromkeys(r.get('lr') or 0 for r in runs))} "
            f"| {_mean_std([r['eval_accuracy'] for r in runs], '{:.3f}')} "
            f"| {_mean_std([r['eval_loss'] for r in runs], '{:.4f}')} "
            f"| {'—' if method == reference else _mean_std(delta_acc, '{:+.3f}')} "
            f"| {'—' if method == reference else _mean_std(delta_loss, '{:+.4f}')} "
            f"| {runs[0]['trainable_params']:,} / {max(r['max_trainable_params'] or 0 for r in runs):,} "
            f"| {_mean_std([r['wall_time_s'] for r in runs], '{:.0f}')} "
            f"| {_mean_std([r['peak_rss_mb'] for r in runs], '{:.0f}')} "
            f"| {_mean_std(alloc, '{:.1f}')} |"
        )
    lines.append("")
    lines.append(f"Seeds: {', '.join(map(str, seeds))}; budget {rows[0]['budget_params']:,} parameters.")
    lines += [f"Measured with {text}" for text in dict.fromkeys(describe_provenance(r) for r in rows)]
    return "\n".join(lines) + "\n"


def sweep_table(sweep: list[dict], chosen: dict[str, float]) -> str:
    """The learning-rate sweep: per method, validation accuracy / eval loss at each of its rates, the chosen one in
    bold."""
    runs = {
        m: sorted((r for r in sweep if r["method"] == m), key=lambda r: r["lr"])
        for m in dict.fromkeys(r["method"] for r in sweep)
    }
    width = max(len(rows) for rows in runs.values())
    lines = [
        f"Learning-rate sweep (seed {sweep[0]['seed']}, validation split; lr: accuracy / eval loss; **chosen**):",
        "",
        "| method | " + " | ".join(f"rate {index + 1}" for index in range(width)) + " |",
        "|---|" + "---|" * width,
    ]
    for method, rows in runs.items():
        cells = [f"{r['lr']:g}: {r['eval_accuracy']:.3f} / {r['eval_loss']:.4f}" for r in rows]
        cells = [f"**{cell}**" if chosen.get(method) == r["lr"] else cell for cell, r in zip(cells, rows, strict=True)]
        lines.append(f"| {method} | " + " | ".join(cells + ["—"] * (width - len(cells))) + " |")
    return "\n".join(lines) + "\n"


def describe_provenance(row: dict) -> str:
    """One line: commit (dirty or not), libraries, base model, threads, machine (older rows may lack some)."""
    source = row.get("provenance") or {}
    git, libraries = source.get("git") or {}, source.get("versions") or {}
    base, machine = source.get("base_model") or {}, source.get("machine") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty tree)" if git.get("dirty") else "")
    versions = ", ".join(
        f"{name} {libraries[name]}" for name in ("torch", "transformers", "peft", "accelerate") if name in libraries
    )
    weights = ", ".join(f"{name} {digest[:12]}" for name, digest in (base.get("weights_sha256") or {}).items())
    return (
        f"commit {commit}; {versions or 'versions unknown'}; base model {base.get('source', 'unknown')}"
        f"{f' ({weights})' if weights else ''}; {row.get('threads')} thread(s); {machine.get('cpu', 'unknown CPU')}, "
        f"{machine.get('cores', '?')} cores."
    )


def plot_accuracy_vs_time(rows: list[dict], path: Path) -> None:
    from .report import plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        runs = [r for r in rows if r["method"] == method]
        ax.scatter([r["wall_time_s"] for r in runs], [r["eval_accuracy"] for r in runs], color=f"C{index}", alpha=0.4)
        ax.scatter(
            statistics.fmean(r["wall_time_s"] for r in runs),
            statistics.fmean(r["eval_accuracy"] for r in runs),
            color=f"C{index}",
            marker="*",
            s=150,
            label=method,
        )
    ax.set_xlabel("wall time per run (s)")
    ax.set_ylabel("exact-match accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
