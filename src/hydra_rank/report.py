"""Reports: a side-by-side result table (terminal and HTML) and loss curves, from finished run directories."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt
from rich.table import Table

from .utils import atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from .rank.budget import Allocation, Target

# (metrics key, column title, format)
COLUMNS = (
    ("method", "method", "{}"),
    ("eval_accuracy", "accuracy", "{:.3f}"),
    ("majority_accuracy", "majority", "{:.3f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("trainable_params", "params", "{:,}"),
    ("budget_params", "budget", "{:,}"),
    ("wall_time_s", "time (s)", "{:.0f}"),
    ("peak_rss_mb", "RSS (MiB)", "{:.0f}"),
)


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(metrics, per-step log) of a finished run."""
    return json.loads((run_dir / "metrics.json").read_text()), read_jsonl(run_dir / "log.jsonl")


def _cells(metrics: dict) -> list[str]:
    return [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in COLUMNS]


def results_table(rows: list[dict], title: str = "results") -> Table:
    table = Table(title=title)
    for _, name, _ in COLUMNS:
        table.add_column(name, justify="left" if name == "method" else "right")
    for metrics in rows:
        table.add_row(*_cells(metrics))
    return table


def plot_loss_curves(logs: dict[str, list[dict]], path: Path, smoothing: float = 0.8) -> None:
    """Training loss per step (raw, faint; exponentially smoothed, solid) and eval loss points, one colour per run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (name, records) in enumerate(logs.items()):
        colour = f"C{index}"
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        smooth, value = [], losses[0] if losses else 0.0
        for loss in losses:
            value = smoothing * value + (1 - smoothing) * loss
            smooth.append(value)
        ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth, color=colour, label=f"{name} (train, smoothed)")
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=colour, label=f"{name} (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rank_over_time(history: list[dict], path: Path) -> None:
    """Mean rank of each module kind (q_proj, ..., down_proj) at every HyDRA decision."""
    steps = [entry["step"] for entry in history]
    kinds = list(dict.fromkeys(name.rsplit(".", 1)[1] for name in history[0]["ranks"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in kinds:
        means = [np.mean([r for n, r in e["ranks"].items() if n.rsplit(".", 1)[1] == kind]) for e in history]
        ax.plot(steps, means, marker="o", label=kind)
    ax.set_xlabel("step of the decision")
    ax.set_ylabel("mean rank")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predictions(history: list[dict], path: Path) -> None:
    """Performance model: each interval's predicted vs realised loss reduction (left), and per module at the last
    scored decision (right, log-log, with the Spearman correlation)."""
    scored = [entry for entry in history if "per_module" in entry]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if scored:
        steps = [e["step"] for e in scored]
        left.plot(steps, [e["predicted_gain_previous"] for e in scored], "o-", label="predicted at previous decision")
        left.plot(steps, [e["realised_gain"] for e in scored], "s-", label="realised (first-order attribution)")
        last = scored[-1]
        predicted = np.asarray(last["per_module"]["predicted"])
        realised = np.maximum(np.asarray(last["per_module"]["realised"]), 1e-12)
        right.loglog(predicted, realised, ".", alpha=0.6)
        right.set_title(f"step {last['step']}: Spearman {last['spearman']:.2f}")
    left.set_xlabel("step of the decision")
    left.set_ylabel("loss reduction over the interval")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("predicted gain per module")
    right.set_ylabel("realised gain per module")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hydra_figures(run_dir: Path) -> list[tuple[str, Path]]:
    """(caption, PNG) for a HyDRA run's allocation, written next to its history; empty for other methods."""
    history_path = run_dir / "allocation_history.jsonl"
    if not history_path.is_file() or not read_jsonl(history_path):
        return []
    history = read_jsonl(history_path)
    plot_rank_over_time(history, run_dir / "rank_over_time.png")
    if any("per_module" in entry for entry in history):  # schedule.curves worth fits no performance model
        plot_predictions(history, run_dir / "predictions.png")
    figures = [
        ("ranks at the start (layer x module)", run_dir / "allocation_start.png"),
        ("ranks at the end", run_dir / "allocation.png"),
        ("mean rank per module kind over time", run_dir / "rank_over_time.png"),
        ("performance model: predicted vs realised", run_dir / "predictions.png"),
    ]
    return [(caption, png) for caption, png in figures if png.is_file()]


def _relative(path: Path, out_dir: Path) -> str:
    """A run's folder as seen from the report (which may be moved with it, e.g. by `train --overwrite`)."""
    relative = os.path.relpath(path, out_dir)
    return "this folder" if relative == "." else relative


def write_report(out_dir: Path, runs: dict[str, Path], title: str = "hydra-rank report") -> Path:
    """`out_dir/report.html`: the result table and loss curves of `runs` (name -> run directory), and for HyDRA
    runs their allocation at start and end, rank over time and the performance model's predictions."""
    loaded = {name: load_run(path) for name, path in runs.items()}
    plot_loss_curves({name: log for name, (_, log) in loaded.items()}, out_dir / "loss_curves.png")
    header = "".join(f"<th>{html.escape(name)}</th>" for _, name, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _cells(metrics)) + "</tr>"
        for metrics, _ in loaded.values()
    )
    sections = ""
    for name, run_dir in runs.items():
        figures = hydra_figures(run_dir)
        if figures:
            images = "".join(
                f'<figure><img src="{html.escape(os.path.relpath(png, out_dir))}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                for caption, png in figures
            )
            sections += f"<h2>{html.escape(name)}: rank allocation</h2>{images}"
    links = "".join(
        f"<li>{html.escape(name)}: <code>{html.escape(_relative(path, out_dir))}</code></li>"
        for name, path in runs.items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{max-width:36em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr>{header}</tr>{body}</table>
<h2>Loss curves</h2><img src="loss_curves.png" alt="loss curves">
{sections}
<h2>Runs</h2><ul>{links}</ul>
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path


def save_allocation(
    allocation: Allocation, targets: list[Target], directory: Path, title: str, name: str = "allocation"
) -> None:
    """`NAME.json` and its layer x module heatmap `NAME.png`."""
    atomic_write_text(directory / f"{name}.json", allocation.to_json())
    plot_allocation(allocation.ranks, targets, directory / f"{name}.png", title)


def plot_allocation(ranks: dict[str, int], targets: list[Target], path: Path, title: str = "rank allocation") -> None:
    """Layer x module-kind heatmap of ranks, each cell annotated with its rank."""
    kinds = list(dict.fromkeys(t.kind for t in targets))
    layers = list(dict.fromkeys((t.tower, t.layer) for t in targets))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for target in targets:
        grid[layers.index((target.tower, target.layer)), kinds.index(target.kind)] = ranks[target.name]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            colour = "white" if value < np.nanmax(grid) * 0.6 else "black"
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30)
    labels = [str(layer) if tower == "language" else f"{tower} {layer}" for tower, layer in layers]
    ax.set_yticks(range(len(layers)), labels, fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
