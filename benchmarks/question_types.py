"""Accuracy by question type (scenes, text task), per run and paired against a reference method, from predictions.

Exact-match accuracy on scenes mixes five question types with very different answers: a one-token count, a yes/no, a
short phrase ("a red circle", "top left") and a whole description of 5-30 tokens. Eval loss is a mean over answer
tokens, so descriptions weigh far more in it than counts do, while accuracy counts every question once. Where a
method's eval loss and accuracy disagree, this table shows which questions moved. On the text task the types are its
four operations (reverse, add, sort digits, spell backwards).

Each run folder's predictions.jsonl names the test record it scored (`source`: path to test.jsonl and line); the
question is read from there, or from `--data` (the task's test.jsonl, e.g. written by `hydra-rank make-scenes`) when
the recorded path is not on this machine. Prints markdown and writes runs/question-types.json.

    .venv/bin/python benchmarks/question_types.py benchmarks/results/scenes-r4 [--reference lora]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from functools import cache
from pathlib import Path

# question prefix -> type: the templates of hydra_rank.data.scenes.questions, then of hydra_rank.data.text_tasks._task
TYPES = {
    "Describe": "describe",
    "How many": "count",
    "What is at": "what-is-at",
    "Where is": "where-is",
    "Is the": "left-of",
    "Reverse the word": "reverse",
    "Add:": "add",
    "Sort the digits": "sort-digits",
    "Spell the word backwards": "spell-backwards",
}


def question_type(question: str) -> str:
    text = question.replace("<image>", "").strip()
    for prefix, kind in TYPES.items():
        if text.startswith(prefix):
            return kind
    raise ValueError(f"not a scenes or text-task question: {question!r}")


@cache
def read_questions(path: Path) -> list[str]:
    """The human turn of every record of a LLaVA JSONL file, by line (1-based, as `source` counts); read once per
    file, however many runs scored it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["conversations"][0]["value"] for line in lines]


def run_counts(run_dir: Path, data: Path | None) -> tuple[Counter, Counter]:
    """(correct, total) per question type of one run."""
    correct, total = Counter(), Counter()
    for line in (run_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        path, number = record["source"].rsplit(":", 1)
        path = data or Path(path)
        if not path.is_file():
            raise SystemExit(f"{run_dir}: the test file {path} is not here; pass --data PATH/test.jsonl")
        kind = question_type(read_questions(path)[int(number) - 1])
        total[kind] += 1
        correct[kind] += bool(record["correct"])
    return correct, total


def print_tables(rows: list[dict], kinds: list[str], reference: str) -> None:
    """Per run: correct answers by type and the difference from the reference's run on the same seed; then the
    mean of those differences per (cell, method)."""
    sizes = ", ".join(f"{k} {rows[0]['total'][k]}" for k in kinds)
    print(f"Correct answers by question type (of {sizes}):\n")
    print(f"| cell | method | seed | {' | '.join(kinds)} | all | Δ vs {reference} per type |")
    print("|---|---|---|" + "---|" * (len(kinds) + 2))
    by = {(r["cell"], r["method"], r["seed"]): r for r in rows}
    for r in rows:
        ref = by.get((r["cell"], reference, r["seed"]))
        delta = "—" if ref in (None, r) else ", ".join(f"{r['correct'][k] - ref['correct'][k]:+d}" for k in kinds)
        counts = " | ".join(str(r["correct"][k]) for k in kinds)
        print(f"| {r['cell']} | {r['method']} | {r['seed']} | {counts} | {sum(r['correct'].values())} | {delta} |")
    print("\nMean paired difference against the reference, per type (seeds where both ran):\n")
    print(f"| cell | method | {' | '.join(kinds)} |")
    print("|---|---|" + "---|" * len(kinds))
    for cell, method in dict.fromkeys((r["cell"], r["method"]) for r in rows):
        pairs = [
            (r, by[(cell, reference, r["seed"])])
            for r in rows
            if (r["cell"], r["method"]) == (cell, method) and (cell, reference, r["seed"]) in by
        ]
        if method != reference and pairs:
            means = [statistics.fmean(a["correct"][k] - b["correct"][k] for a, b in pairs) for k in kinds]
            print(f"| {cell} | {method} | {' | '.join(f'{m:+.1f}' for m in means)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "cells",
        nargs="+",
        type=Path,
        help="bench folders: runs/<method>-seed<k>/ (committed) or <method>-seed<k>/ (a bench's own output)",
    )
    parser.add_argument("--reference", default="lora")
    parser.add_argument("--data", type=Path, help="the task's test.jsonl, if the recorded path is not here")
    parser.add_argument("--output", type=Path, default=Path("runs/question-types.json"))
    args = parser.parse_args()

    rows = []
    for cell in args.cells:
        for predictions in sorted(
            [*cell.glob("runs/*-seed*/predictions.jsonl"), *cell.glob("*-seed*/predictions.jsonl")]
        ):
            method, seed = predictions.parent.name.rsplit("-seed", 1)
            correct, total = run_counts(predictions.parent, args.data)
            rows.append({"cell": cell.name, "method": method, "seed": int(seed), "correct": correct, "total": total})
    if not rows:
        raise SystemExit("no [runs/]<method>-seed<k>/predictions.jsonl under the given folders")
    kinds = [k for k in TYPES.values() if any(r["total"][k] for r in rows)]
    print_tables(rows, kinds, args.reference)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1, default=dict) + "\n")
    print(f"\nrows in {args.output}")


if __name__ == "__main__":
    main()
