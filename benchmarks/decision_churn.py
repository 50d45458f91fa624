"""How HyDRA's decisions move rank, read from finished runs' `allocation_history.jsonl` (no training).

Two questions about the scheduler that BENCHMARKS.md asks of the cells where HyDRA loses: (1) does a decision take
rank from modules that were doing little and give it to modules that were doing much? For every module moved at a
decision, the percentile (among all modules, 0 = least, 1 = most) of the loss decrease it realised in the interval
before, per unit of the rank it had; shrunk modules well below 0.5 and grown ones well above say the decision
follows realised value. (2) How often is a move undone: of the modules moved at one decision, the share moved the
other way at the next one. (3) Does a module realise more when it holds more rank? The within-module elasticity of
the realised gain with respect to rank: log gain regressed on log rank over all intervals after the first
allocation, with a fixed effect per module (its level) and per interval (gains shrink as training goes on), so only
a module's own rank changes count. The performance model assumes a response near its energy weight times the slope
of the module's energy curve; about 0 says a module's gain in the next interval does not follow its rank. (4) The
same response without the selection bias of (3), from runs with `schedule.explore` (rank/explore.py): every
randomly perturbed pair's log realised gain difference (receiver minus giver, the interval after the decision minus
the one before) over its log rank difference from the perturbation alone; the coin that picks the receiver makes
every other term average out. Beside it, the same over the interval after that (whatever the next decision did with
the pair), and the response the performance model predicted for the same perturbations.

    .venv/bin/python benchmarks/decision_churn.py benchmarks/results/text-tasks-r2 benchmarks/results/scenes-r4 ...

Prints a table and writes decision_churn.json in --output-dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from hydra_rank.utils import read_jsonl


def churn(entries: list[dict]) -> dict[str, list[float] | int]:
    """Realised-value percentiles of shrunk and grown modules, and move/reversal counts, over one run's decisions."""
    names = list(entries[0]["ranks"])
    shrunk: list[float] = []
    grown: list[float] = []
    directions = []
    for previous, current in itertools.pairwise(entries):
        before = np.array([previous["ranks"][name] for name in names])
        after = np.array([current["ranks"][name] for name in names])
        directions.append(np.sign(after - before))
        per_rank = np.array(current["per_module"]["realised"]) / np.maximum(before, 1)
        percentile = per_rank.argsort().argsort() / (len(names) - 1)
        shrunk += percentile[after < before].tolist()
        grown += percentile[after > before].tolist()
    moved = sum(int((d != 0).sum()) for d in directions[:-1])
    reversed_ = sum(int((a * b < 0).sum()) for a, b in itertools.pairwise(directions))
    return {"shrunk": shrunk, "grown": grown, "moved": moved, "reversed": reversed_}


def _log_gains(realised: list[float]) -> np.ndarray:
    """Log realised gains, floored as the performance model floors them."""
    values = np.asarray(realised)
    return np.log(np.maximum(values, max(1e-12, 1e-3 * float(np.median(np.abs(values))))))


def rank_response(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(log rank, log realised gain) per interval x module, both with module and interval means removed (two-way
    fixed effects); NaN where a module had rank 0. Gains are floored as the performance model floors them."""
    names = list(entries[0]["ranks"])
    logs, gains = [], []
    for previous, current in itertools.pairwise(entries):
        ranks = np.array([previous["ranks"][name] for name in names], dtype=np.float64)
        logs.append(np.where(ranks > 0, np.log(np.maximum(ranks, 1)), np.nan))
        gains.append(np.where(ranks > 0, _log_gains(current["per_module"]["realised"]), np.nan))
    x, y = np.array(logs), np.array(gains)
    for _ in range(100):  # alternating projections converge to the two-way demeaned values
        for a in (x, y):
            a -= np.nanmean(a, axis=1, keepdims=True)
            a -= np.nanmean(a, axis=0, keepdims=True)
    return x, y


def perturbed_pairs(entries: list[dict]) -> np.ndarray:
    """Rows (measured log-gain difference over the next interval, the same over the one after it, the difference
    the performance model predicted for the next interval, log-rank difference from the perturbation) for every pair
    `schedule.explore` perturbed, receiver minus giver, each against the interval before the decision. The second
    interval counts whatever the next decision did with the pair (intent to treat); NaN where there is none."""
    first = entries[0].get("warmup_realised") or entries[0].get("per_module", {}).get("realised")
    gains = [None if first is None else _log_gains(first)]
    gains += [_log_gains(entry["per_module"]["realised"]) for entry in entries[1:]]  # gains[k]: before decision k
    rows = []
    for index, entry in enumerate(entries[:-1]):
        if not entry.get("explored") or gains[index] is None:
            continue
        names = list(entry["ranks"])
        before, after = gains[index], gains[index + 1]
        later = gains[index + 2] if index + 2 < len(gains) else np.full(len(names), np.nan)
        predicted = np.log(np.maximum(entries[index + 1]["per_module"]["predicted"], 1e-30))
        planned = entry["explored_planned_prediction"]
        for giver, receiver, delta in entry["explored"]:
            g, r = names.index(giver), names.index(receiver)
            rank_g, rank_r = entry["ranks"][giver], entry["ranks"][receiver]
            baseline = before[r] - before[g]
            model = (predicted[r] - np.log(planned[receiver])) - (predicted[g] - np.log(planned[giver]))
            shift = np.log(rank_r / (rank_r - delta)) - np.log(rank_g / (rank_g + delta))
            rows.append((after[r] - after[g] - baseline, later[r] - later[g] - baseline, model, shift))
    return np.array(rows).reshape(-1, 4)


def randomised_response(rows: np.ndarray, draws: int = 2000) -> dict[str, float] | None:
    """Measured (next interval, with a bootstrap 90 % interval over pairs; and the interval after) and predicted
    elasticity, each Σ log-gain differences / Σ log-rank differences; None without perturbed pairs."""
    if not len(rows):
        return None
    measured, later, predicted, shift = rows.T
    picks = np.random.default_rng(0).integers(0, len(rows), size=(draws, len(rows)))
    low, high = np.quantile(measured[picks].sum(axis=1) / shift[picks].sum(axis=1), [0.05, 0.95])
    known = np.isfinite(later)
    return {
        "measured": float(measured.sum() / shift.sum()),
        "low": float(low),
        "high": float(high),
        "second_interval": float(later[known].sum() / shift[known].sum()) if known.any() else float("nan"),
        "predicted": float(predicted.sum() / shift.sum()),
        "pairs": len(rows),
    }


def elasticity(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The pooled least-squares slope of demeaned log gain on demeaned log rank."""
    x = np.concatenate([p[0].ravel() for p in pairs])
    y = np.concatenate([p[1].ravel() for p in pairs])
    keep = np.isfinite(x) & np.isfinite(y)
    return float((x[keep] * y[keep]).sum() / (x[keep] ** 2).sum())


def cell_row(cell: Path) -> dict:
    """One benchmark cell (committed: runs/hydra-seed<k>/; a bench's own output: hydra-seed<k>/): every HyDRA test
    seed's history pooled."""
    pattern = "hydra-seed*/allocation_history.jsonl"
    found = sorted([*cell.glob(f"runs/{pattern}"), *cell.glob(pattern)])
    runs = [path for path in found if (path.parent / "metrics.json").is_file()]  # finished runs only
    if not runs:
        raise SystemExit(f"{cell}: no finished [runs/]{pattern} (is it a bench folder?)")
    histories = [read_jsonl(path) for path in runs]
    parts = [churn(history) for history in histories]
    responses = [rank_response(history) for history in histories]
    shrunk = [p for part in parts for p in part["shrunk"]]
    grown = [p for part in parts for p in part["grown"]]
    moved = sum(part["moved"] for part in parts)
    reversed_ = sum(part["reversed"] for part in parts)
    return {
        "cell": cell.name,
        "seeds": len(runs),
        "shrunk_percentile": float(np.mean(shrunk)),
        "shrunk_moves": len(shrunk),
        "grown_percentile": float(np.mean(grown)),
        "grown_moves": len(grown),
        "reversal_share": reversed_ / max(moved, 1),
        "rank_elasticity": elasticity(responses),
        "rank_elasticity_per_seed": [elasticity([response]) for response in responses],
        "randomised": randomised_response(np.concatenate([perturbed_pairs(history) for history in histories])),
        "randomised_per_seed": [randomised_response(perturbed_pairs(history)) for history in histories],
    }


def _randomised_cell(row: dict) -> str:
    pooled = row["randomised"]
    if pooled is None:
        return "— (no schedule.explore)"
    seeds = ", ".join(f"{r['measured']:+.2f}" if r else "—" for r in row["randomised_per_seed"])
    return (
        f"{pooled['measured']:+.2f} [{pooled['low']:+.2f}, {pooled['high']:+.2f}] ({seeds}), "
        f"{pooled['second_interval']:+.2f}, {pooled['predicted']:+.2f}, {pooled['pairs']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "cells", nargs="+", type=Path, help="bench folders (benchmarks/results/<cell> or runs/bench/<cell>)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/decision-churn"))
    args = parser.parse_args()
    rows = [cell_row(cell) for cell in args.cells]
    print(
        "| cell | seeds | shrunk: realised percentile (moves) | grown: realised percentile (moves) | undone next "
        "| gain elasticity to rank (per seed) "
        "| randomised: measured [90 %] (per seed), interval after, predicted, pairs |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        seeds = ", ".join(f"{e:+.2f}" for e in row["rank_elasticity_per_seed"])
        print(
            f"| {row['cell']} | {row['seeds']} | {row['shrunk_percentile']:.2f} ({row['shrunk_moves']}) | "
            f"{row['grown_percentile']:.2f} ({row['grown_moves']}) | {row['reversal_share']:.2f} "
            f"| {row['rank_elasticity']:+.2f} ({seeds}) | {_randomised_cell(row)} |"
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "decision_churn.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
