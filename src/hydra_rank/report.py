"""Reports: a side-by-side result table (terminal and HTML) and loss curves, from finished run directories."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt
from rich.table import Table

from .utils import atomic_write_text, read_jsonl

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


def write_report(out_dir: Path, runs: dict[str, Path], title: str = "hydra-rank report") -> Path:
    """`out_dir/report.html` with the result table and loss curves of `runs` (name -> run directory)."""
    loaded = {name: load_run(path) for name, path in runs.items()}
    plot_loss_curves({name: log for name, (_, log) in loaded.items()}, out_dir / "loss_curves.png")
    header = "".join(f"<th>{html.escape(name)}</th>" for _, name, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _cells(metrics)) + "</tr>"
        for metrics, _ in loaded.values()
    )
    links = "".join(
        f"<li>{html.escape(name)}: <code>{html.escape(str(path))}</code></li>" for name, path in runs.items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr>{header}</tr>{body}</table>
<h2>Loss curves</h2><img src="loss_curves.png" alt="loss curves">
<h2>Runs</h2><ul>{links}</ul>
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path


def plot_allocation(ranks: dict[str, int], targets: list, path: Path, title: str = "rank allocation") -> None:
    """Layer x module-kind heatmap of ranks, each cell annotated with its rank."""
    kinds = list(dict.fromkeys(t.kind for t in targets))
    layers = sorted({t.layer for t in targets})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for target in targets:
        grid[layers.index(target.layer), kinds.index(target.kind)] = ranks[target.name]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            colour = "white" if value < np.nanmax(grid) * 0.6 else "black"
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
