"""The benchmark matrix: cells judged by the rule their task's rank sensitivity calls for."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hydra_rank.cli import app
from hydra_rank.errors import ConfigError
from hydra_rank.matrix import build_matrix, load_rows, rank_sensitivity

ROOT = Path(__file__).resolve().parents[1]


def row(dataset: str, rank: int, method: str, seed: int, accuracy: float, loss: float, split: str = "test") -> dict:
    return {
        "dataset": dataset,
        "rank": rank,
        "method": method,
        "seed": seed,
        "split": split,
        "lr": 1e-3,
        "eval_accuracy": accuracy,
        "eval_loss": loss,
        "peak_rss_mb": 1000.0 + seed,
    }


def lora_at(dataset: str, rank: int, losses: list[float]) -> list[dict]:
    return [row(dataset, rank, "lora", seed, 0.5, loss) for seed, loss in enumerate(losses)]


def hydra_at(dataset: str, rank: int, deltas: list[tuple[float, float]], lora_losses: list[float]) -> list[dict]:
    """HyDRA rows at the given (accuracy, loss) differences from `lora_at`'s rows."""
    return [
        row(dataset, rank, "hydra", seed, 0.5 + d_acc, lora_losses[seed] + d_loss)
        for seed, (d_acc, d_loss) in enumerate(deltas)
    ]


# LoRA gains 0.1 from r2 to r8 on "sensitive" (seed std 0.01); 0.005 on "flat" (seed std 0.01)
SENSITIVE = {2: [0.50, 0.51, 0.52], 4: [0.45, 0.46, 0.47], 8: [0.40, 0.41, 0.42]}
FLAT = {2: [0.405, 0.415, 0.425], 4: [0.40, 0.41, 0.42], 8: [0.40, 0.41, 0.42]}


def test_sensitivity_compares_the_lowest_and_highest_budget_with_the_seed_spread():
    rows = [r for rank, losses in SENSITIVE.items() for r in lora_at("sensitive", rank, losses)]
    rows += [r for rank, losses in FLAT.items() for r in lora_at("flat", rank, losses)]
    rows += lora_at("one-budget", 4, [0.3, 0.3, 0.3])
    found = rank_sensitivity(rows, "lora")
    assert found["sensitive"].gain == pytest.approx(0.1) and found["sensitive"].sensitive is True
    assert found["flat"].gain == pytest.approx(0.005) and found["flat"].sensitive is False
    assert found["one-budget"].sensitive is None


@pytest.mark.parametrize(
    ("task", "deltas", "met"),
    [
        # sensitive: loss must be lower and accuracy not lower
        ("sensitive", [(0.0, -0.01)] * 3, True),
        ("sensitive", [(-0.01, -0.02)] * 3, False),  # lower loss, lower accuracy
        ("sensitive", [(0.02, 0.001)] * 3, False),  # higher accuracy, loss not lower
        # flat: not worse by more than one seed std (LoRA's: accuracy 0, loss 0.01)
        ("flat", [(0.0, 0.009)] * 3, True),
        ("flat", [(0.0, 0.011)] * 3, False),
        ("flat", [(-0.001, -0.05)] * 3, False),  # LoRA's accuracy does not vary, so any mean accuracy loss counts
    ],
)
def test_each_cell_is_judged_by_its_tasks_rule(task, deltas, met):
    table = SENSITIVE if task == "sensitive" else FLAT
    rows = [r for rank, losses in table.items() for r in lora_at(task, rank, losses)]
    rows += hydra_at(task, 4, deltas, table[4])
    cells, _ = build_matrix(rows, "hydra", "lora")
    cell = next(c for c in cells if c.rank == 4)
    assert cell.verdict.startswith("met") is met, cell.verdict
    assert cell.delta_loss == pytest.approx([d for _, d in deltas])
    assert cell.seeds == [0, 1, 2]


def test_unpaired_seeds_are_not_compared_and_few_seeds_are_said():
    rows = lora_at("t", 4, [0.4, 0.41]) + hydra_at("t", 4, [(0.0, -0.01)] * 3, [0.4, 0.41, 0.42])
    (cell,), _ = build_matrix(rows, "hydra", "lora")
    assert cell.seeds == [0, 1] and len(cell.delta_loss) == 2
    assert "2 seeds only" in cell.verdict


def write_results(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_load_keeps_test_rows_and_refuses_a_run_reported_twice(tmp_path):
    a = write_results(tmp_path / "a", [*lora_at("t", 4, [0.4]), row("t", 4, "lora", 0, 0.1, 9.0, "validation")])
    assert [r["eval_loss"] for r in load_rows([a])] == [0.4]
    b = write_results(tmp_path / "b", lora_at("t", 4, [0.5]))
    with pytest.raises(ConfigError, match="pass only one of them"):
        load_rows([a, b])
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows([tmp_path / "missing"])


def test_cli_writes_the_matrix_of_the_committed_scenes_cell(tmp_path):
    """The tuned scenes r4 cell (benchmarks/results): HyDRA's per-seed differences as BENCHMARKS.md reports them."""
    result = CliRunner().invoke(
        app, ["matrix", str(ROOT / "benchmarks/results/scenes-r4"), "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    matrix = json.loads((tmp_path / "matrix.json").read_text())
    (cell,) = matrix["cells"]
    assert (cell["dataset"], cell["rank"], cell["seeds"]) == ("scenes", 4, [0, 1, 2])
    assert cell["delta_loss"] == pytest.approx([-0.0215, -0.0190, -0.0165], abs=1e-4)
    assert cell["delta_accuracy"] == pytest.approx([0.0167, 0.0067, 0.0433], abs=1e-3)
    assert "| scenes | r4 |" in (tmp_path / "matrix.md").read_text()


def test_cli_says_what_is_missing(tmp_path):
    result = CliRunner().invoke(app, ["matrix", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
