"""Benchmark harness: every method on the same base model, data order, steps, learning-rate schedule and budget.

Each (method, seed) run trains in its own process (`runner.py`) one after another, so wall time and peak memory are
each run's own. A run whose directory already holds metrics for the identical configuration is reused, so an
interrupted benchmark continues where it stopped. Outputs in the benchmark directory:

    results.json         per method and seed: accuracy, eval loss, trainable params (end and max), wall time,
                         peak RSS, time spent in calibration / allocation / resizing, threads, and provenance (git
                         commit and dirty flag, library versions, machine, the base model's cache key and sha256)
    results.md           mean ± std per method, and per-seed differences against the reference method
    accuracy_vs_time.png, loss_curves.png
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, from_dict
from .methods import REFERENCE_METHOD
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


def method_config(base: RunConfig, method: str, seed: int, run_dir: Path) -> RunConfig:
    """`base` with one method and seed; everything else (data order per seed, steps, schedule, budget) shared."""
    data = base.to_dict()
    data["adapter"]["method"] = method
    data["train"]["seed"] = seed
    data["train"]["output_dir"] = str(run_dir)
    return from_dict(data)


def run_bench(
    base: RunConfig, methods: list[str], seeds: list[int], output_dir: Path, reference: str = REFERENCE_METHOD
) -> BenchResult:
    rows = []
    for seed in seeds:
        for method in methods:
            run_dir = output_dir / f"{method}-seed{seed}"
            config = method_config(base, method, seed, run_dir)
            config_path = output_dir / "configs" / f"{method}-seed{seed}.yaml"
            previous = run_dir / "config.yaml"
            if (
                (run_dir / "metrics.json").is_file()
                and previous.is_file()
                and previous.read_text() == config.to_yaml()
            ):
                metrics = json.loads((run_dir / "metrics.json").read_text())
            else:
                metrics = run_isolated(config, config_path)
            rows.append({"method": method, "seed": seed, "run_dir": str(run_dir), **{k: metrics.get(k) for k in KEYS}})
            write_json(output_dir / "results.json", rows)  # after every run: partial results survive a crash
    table = markdown_table(rows, methods, reference if reference in methods else methods[0])
    atomic_write_text(output_dir / "results.md", table)
    plot_accuracy_vs_time(rows, output_dir / "accuracy_vs_time.png")
    mean_curves = {m: _mean_log([Path(r["run_dir"]) for r in rows if r["method"] == m]) for m in methods}
    plot_loss_curves(mean_curves, output_dir / "loss_curves.png")
    return BenchResult(rows, table)


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
        f"| method | accuracy | eval loss | Δ accuracy vs {reference} | Δ eval loss vs {reference} | trainable params "
        "(end / max) | wall time (s) | peak RSS (MiB) | allocation time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = [by[(method, s)] for s in seeds if (method, s) in by]
        paired = [(by[(method, s)], by[(reference, s)]) for s in seeds if (method, s) in by and (reference, s) in by]
        delta_acc = [a["eval_accuracy"] - b["eval_accuracy"] for a, b in paired]
        delta_loss = [a["eval_loss"] - b["eval_loss"] for a, b in paired]
        alloc = [(r.get("calibration_time_s") or 0) + (r.get("scheduler_time_s") or 0) for r in runs]
        lines.append(
            f"| {method} | {_mean_std([r['eval_accuracy'] for r in runs], '{:.3f}')} "
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
