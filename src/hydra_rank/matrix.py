"""The benchmark matrix: one line per (task, budget) cell, gathered from the folders of several `bench` runs.

A single cell cannot say whether a difference between allocations means anything: on a task where uniform LoRA gains
nothing from rank 2 to rank 8, no allocation of a rank-4 budget can gain either, and any difference is seed noise. So
the matrix first reads uniform LoRA's own rank sensitivity per task from the same runs (mean test eval loss at its
lowest and highest budget, against its seed-to-seed spread), then judges each cell by the rule that fits it:

- capacity-sensitive task (LoRA's low-to-high-budget gain in eval loss larger than its largest seed std there): the
  method's mean paired eval loss must be lower than LoRA's, and its mean paired accuracy not lower;
- otherwise: the method may not be worse than LoRA by more than one of LoRA's seed stds (in that cell) on either
  metric;
- a task whose sensitivity is not measured yet (LoRA at one budget only) is judged by the stricter first rule.

Only test-split rows count. Outputs matrix.md and matrix.json.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError
from .utils import atomic_write_text, write_json


@dataclass
class Stats:
    mean: float
    std: float  # 0 with one seed

    def text(self, fmt: str) -> str:
        return fmt.format(self.mean) + (f" ± {fmt.replace('+', '').format(self.std)}" if self.std else "")


def stats(values: list[float]) -> Stats:
    return Stats(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Sensitivity:
    """Uniform LoRA's eval-loss gain from the task's lowest to its highest measured budget, against its seed spread."""

    ranks: list[int]
    gain: float | None  # mean eval loss at the lowest rank minus at the highest; None with one rank
    spread: float | None  # the largest seed std of eval loss over those two cells

    @property
    def sensitive(self) -> bool | None:
        return None if self.gain is None else self.gain > self.spread


@dataclass
class Cell:
    dataset: str
    rank: int
    seeds: list[int]  # seeds both methods ran (the paired ones)
    lr: dict[str, float]  # per method
    accuracy: dict[str, Stats]
    eval_loss: dict[str, Stats]
    delta_accuracy: list[float]  # method minus reference, per paired seed
    delta_loss: list[float]
    rss_ratio: Stats | None  # method's peak RSS over the reference's, per paired seed
    verdict: str


def load_rows(folders: list[Path]) -> list[dict]:
    """Test-split rows of every folder's results.json; the same run reported by two folders is an error."""
    rows: dict[tuple, tuple[dict, Path]] = {}
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: pass folders written by `hydra-rank bench`")
        try:
            found = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); re-run the bench to rewrite it") from err
        for row in found:
            if row.get("split", "test") != "test":
                continue
            key = (row["dataset"], row["rank"], row["method"], row["seed"])
            if key in rows:
                raise ConfigError(
                    f"{row['method']} seed {row['seed']} on {row['dataset']} at rank {row['rank']} is in both "
                    f"{rows[key][1]} and {path}: pass only one of them (they may be different variants)"
                )
            rows[key] = (row, path)
    return [row for row, _ in rows.values()]


def rank_sensitivity(rows: list[dict], reference: str) -> dict[str, Sensitivity]:
    """Per task, the reference method's gain from its lowest to its highest budget (see the module docstring)."""
    result = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        by_rank: dict[int, list[float]] = {}
        for r in rows:
            if r["dataset"] == dataset and r["method"] == reference:
                by_rank.setdefault(r["rank"], []).append(r["eval_loss"])
        ranks = sorted(by_rank)
        if len(ranks) < 2:
            result[dataset] = Sensitivity(ranks, None, None)
            continue
        low, high = stats(by_rank[ranks[0]]), stats(by_rank[ranks[-1]])
        result[dataset] = Sensitivity(ranks, low.mean - high.mean, max(low.std, high.std))
    return result


def judge(cell_rows: list[dict], method: str, reference: str, sensitive: bool | None) -> Cell:
    """One cell's figures, and whether `method` meets the rule for it."""
    by = {(r["method"], r["seed"]): r for r in cell_rows}
    seeds = sorted(s for (m, s) in by if m == method and (reference, s) in by)
    runs: dict[str, list[dict]] = {}
    for r in sorted(cell_rows, key=lambda r: r["method"]):
        runs.setdefault(r["method"], []).append(r)
    pairs = [(by[(method, s)], by[(reference, s)]) for s in seeds]
    delta_acc = [a["eval_accuracy"] - b["eval_accuracy"] for a, b in pairs]
    delta_loss = [a["eval_loss"] - b["eval_loss"] for a, b in pairs]
    accuracy = {m: stats([r["eval_accuracy"] for r in rs]) for m, rs in runs.items()}
    eval_loss = {m: stats([r["eval_loss"] for r in rs]) for m, rs in runs.items()}
    ratios = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs if a.get("peak_rss_mb") and b.get("peak_rss_mb")]
    if not pairs:
        verdict = "no paired seeds"
    elif sensitive is False:
        ok = (
            statistics.fmean(delta_acc) >= -accuracy[reference].std
            and statistics.fmean(delta_loss) <= eval_loss[reference].std
        )
        verdict = "met (within one seed std)" if ok else "NOT met (worse by more than one seed std)"
    else:
        ok = statistics.fmean(delta_loss) < 0 and statistics.fmean(delta_acc) >= 0
        verdict = "met (loss lower, accuracy not lower)" if ok else "NOT met (loss not lower or accuracy lower)"
    if pairs and len(pairs) < 3:
        verdict += f", {len(pairs)} seed{'s' if len(pairs) > 1 else ''} only"
    first = cell_rows[0]
    return Cell(
        dataset=first["dataset"],
        rank=first["rank"],
        seeds=seeds,
        lr={m: rs[0]["lr"] for m, rs in runs.items()},
        accuracy=accuracy,
        eval_loss=eval_loss,
        delta_accuracy=delta_acc,
        delta_loss=delta_loss,
        rss_ratio=stats(ratios) if ratios else None,
        verdict=verdict,
    )


def build_matrix(rows: list[dict], method: str, reference: str) -> tuple[list[Cell], dict[str, Sensitivity]]:
    sensitivity = rank_sensitivity(rows, reference)
    keys = sorted({(r["dataset"], r["rank"]) for r in rows})
    cells = [
        judge([r for r in rows if (r["dataset"], r["rank"]) == key], method, reference, sensitivity[key[0]].sensitive)
        for key in keys
    ]
    return cells, sensitivity


def _per_seed(values: list[float], fmt: str) -> str:
    return ", ".join(fmt.format(v) for v in values) or "—"


def _lr(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def matrix_markdown(cells: list[Cell], sensitivity: dict[str, Sensitivity], method: str, reference: str) -> str:
    """The two tables: uniform LoRA's rank sensitivity per task, then one line per cell."""
    lines = [
        f"Rank sensitivity of {reference} (test eval loss, mean over seeds; gain = lowest minus highest budget):",
        "",
        "| task | budgets measured | gain | largest seed std | capacity-sensitive |",
        "|---|---|---|---|---|",
    ]
    for dataset, s in sensitivity.items():
        sensitive = {None: "not measured (judged as sensitive)", True: "yes", False: "no"}[s.sensitive]
        gain = "—" if s.gain is None else f"{s.gain:+.4f}"
        spread = "—" if s.spread is None else f"{s.spread:.4f}"
        lines.append(f"| {dataset} | {', '.join(f'r{r}' for r in s.ranks)} | {gain} | {spread} | {sensitive} |")
    lines += [
        "",
        f"| task | budget | {reference} (lr): accuracy / eval loss | {method} (lr): accuracy / eval loss "
        f"| Δ accuracy per seed | Δ eval loss per seed | peak RSS {method}/{reference} | other methods | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def score(cell: Cell, m: str) -> str:
        if m not in cell.accuracy:
            return "—"
        return f"({_lr(cell.lr[m])}) {cell.accuracy[m].text('{:.3f}')} / {cell.eval_loss[m].text('{:.4f}')}"

    for cell in cells:
        others = "; ".join(f"{m} {score(cell, m)}" for m in cell.accuracy if m not in (method, reference)) or "—"
        rss = cell.rss_ratio.text("{:.2f}") + "x" if cell.rss_ratio else "—"
        lines.append(
            f"| {cell.dataset} | r{cell.rank} | {score(cell, reference)} | {score(cell, method)} "
            f"| {_per_seed(cell.delta_accuracy, '{:+.3f}')} | {_per_seed(cell.delta_loss, '{:+.4f}')} | {rss} "
            f"| {others} | {cell.verdict} |"
        )
    return "\n".join(lines) + "\n"


def write_matrix(folders: list[Path], output_dir: Path, method: str, reference: str) -> str:
    """Read the folders, write matrix.md / matrix.json into `output_dir`, return the markdown."""
    rows = load_rows(folders)
    if not any(r["method"] == reference for r in rows):
        raise ConfigError(f"no test-split row of the reference method {reference!r} in {', '.join(map(str, folders))}")
    cells, sensitivity = build_matrix(rows, method, reference)
    text = matrix_markdown(cells, sensitivity, method, reference)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "matrix.md", text)
    write_json(
        output_dir / "matrix.json",
        {
            "method": method,
            "reference": reference,
            "folders": [str(f) for f in folders],
            "sensitivity": {d: {**asdict(s), "sensitive": s.sensitive} for d, s in sensitivity.items()},
            "cells": [asdict(c) for c in cells],
        },
    )
    return text
