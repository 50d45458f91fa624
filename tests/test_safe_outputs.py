"""No command destroys or silently replaces files it did not create: each case hashes every file before and after.

The reproductions of the data-loss report: make-scenes into a folder that holds files (or onto a file, or the
current folder), export into another run's folder, eval of another adapter (or of the base model) into a run's
eval.json, eval --output naming a folder.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hydra_rank.cli import app

from .test_train import tiny_config

runner = CliRunner()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (a file: itself), by relative path."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_clear_line(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3, result.output
    text = " ".join(result.output.split())
    for phrase in phrases:
        assert phrase in text, text


@pytest.fixture(scope="module")
def two_runs(tiny_llava_dir, tmp_path_factory):
    from .conftest import write_colour_dataset

    root = tmp_path_factory.mktemp("runs")
    dataset = write_colour_dataset(root / "data")
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        config = tiny_config(tiny_llava_dir, dataset, root / name, max_steps=1, seed=seed)
        path = root / f"{name}.yaml"
        path.write_text(config.to_yaml())
        assert runner.invoke(app, ["train", str(path)]).exit_code == 0
        paths.append(root / name)
    return paths


def test_make_scenes_refuses_a_folder_that_holds_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    before = snapshot(folder)
    one_clear_line(runner.invoke(app, ["make-scenes", str(folder)]), "already holds files", "--overwrite")
    assert snapshot(folder) == before


def test_make_scenes_refuses_a_file_and_the_current_folder(tmp_path, monkeypatch):
    file = tmp_path / "data.txt"
    file.write_text("mine")
    one_clear_line(runner.invoke(app, ["make-scenes", str(file)]), "is a file")
    assert file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["data.txt"]
    monkeypatch.chdir(tmp_path)
    one_clear_line(runner.invoke(app, ["make-scenes", ".", "--overwrite"]), "current folder")
    assert file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_make_scenes_overwrite_replaces_only_when_asked(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    result = runner.invoke(app, ["make-scenes", str(folder), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (folder / "old.txt").exists() and (folder / "train.jsonl").is_file()


def test_export_never_replaces_another_runs_adapter(two_runs):
    run_a, run_b = two_runs
    before = snapshot(run_b)
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["export", str(run_a), "--output-dir", str(run_b), *extra])
        one_clear_line(result, "is a run folder", "--output-dir")
    assert snapshot(run_b) == before


def test_export_replaces_its_own_previous_export_but_not_foreign_files(two_runs, tmp_path):
    run_a, run_b = two_runs
    for _ in range(2):  # exporting the same run again is fine
        assert runner.invoke(app, ["export", str(run_a), "--output-dir", str(tmp_path / "ex")]).exit_code == 0
    exported = snapshot(tmp_path / "ex")
    one_clear_line(runner.invoke(app, ["export", str(run_b), "--output-dir", str(tmp_path / "ex")]), "--overwrite")
    assert snapshot(tmp_path / "ex") == exported


def test_eval_of_another_adapter_or_the_base_never_lands_in_a_runs_eval_json(two_runs, tmp_path):
    run_a, run_b = two_runs
    assert runner.invoke(app, ["eval", str(run_a)]).exit_code == 0  # its own adapter: writes run_a/eval.json
    before = snapshot(run_a)
    result = runner.invoke(app, ["eval", str(run_a), "--adapter", str(run_b / "adapter")])
    one_clear_line(result, "is not its adapter", "--output")
    config = run_a / "config.yaml"  # a config whose output_dir is run_a: the base model would land there
    one_clear_line(runner.invoke(app, ["eval", str(config)]), "the base model is not its adapter")
    assert snapshot(run_a) == before
    elsewhere = tmp_path / "b-on-a.json"
    result = runner.invoke(app, ["eval", str(run_a), "--adapter", str(run_b / "adapter"), "--output", str(elsewhere)])
    assert result.exit_code == 0 and elsewhere.is_file() and snapshot(run_a) == before


def test_eval_output_that_is_a_folder(two_runs, tmp_path):
    run_a, _ = two_runs
    one_clear_line(runner.invoke(app, ["eval", str(run_a), "--output", str(tmp_path)]), "is a folder")
    assert os.listdir(tmp_path) == []


def write_config(tmp_path: Path, name: str, config) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(config.to_yaml())
    return path


def test_a_failed_overwrite_leaves_the_old_run_intact(tiny_llava_dir, colour_dataset, tmp_path):
    from .conftest import write_colour_dataset

    out = tmp_path / "run"
    good = write_config(tmp_path, "good", tiny_config(tiny_llava_dir, colour_dataset, out, max_steps=2))
    assert runner.invoke(app, ["train", str(good)]).exit_code == 0
    assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
    before = snapshot(out)
    broken = write_colour_dataset(tmp_path / "broken")
    for png in (tmp_path / "broken" / "images").glob("*.png"):
        png.write_bytes(png.read_bytes()[:40])  # found only when a batch needs it
    bad = write_config(tmp_path, "bad", tiny_config(tiny_llava_dir, broken, out, max_steps=2))
    one_clear_line(runner.invoke(app, ["train", str(bad), "--overwrite"]), "images")
    assert snapshot(out) == before  # config, log, adapter, metrics and eval.json all still the old run's
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no half-built run left


def test_a_successful_overwrite_replaces_the_whole_run(tiny_llava_dir, colour_dataset, tmp_path):
    out = tmp_path / "run"
    first = write_config(tmp_path, "first", tiny_config(tiny_llava_dir, colour_dataset, out, max_steps=2))
    assert runner.invoke(app, ["train", str(first)]).exit_code == 0
    assert runner.invoke(app, ["eval", str(out)]).exit_code == 0
    old_metrics = (out / "metrics.json").read_text()
    second = write_config(tmp_path, "second", tiny_config(tiny_llava_dir, colour_dataset, out, max_steps=3))
    one_clear_line(runner.invoke(app, ["train", str(second)]), "--overwrite")  # not without asking
    assert (out / "metrics.json").read_text() == old_metrics
    assert runner.invoke(app, ["train", str(second), "--overwrite"]).exit_code == 0
    assert not (out / "eval.json").exists()  # the old run's derived file went with it
    assert (out / "config.yaml").read_text() == second.read_text()
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_a_moved_run_resumes_where_it_is(tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "run", max_steps=5, checkpoint_every=2)
    assert runner.invoke(app, ["train", str(write_config(tmp_path, "c", config))]).exit_code == 0
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    shutil.rmtree(moved / "checkpoints" / "step-4")  # as if killed after step 2's checkpoint
    result = runner.invoke(app, ["train", str(moved / "config.yaml"), "--resume"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 5
    assert f"output_dir: {moved}" in (moved / "config.yaml").read_text()
    assert not (tmp_path / "run").exists()


def truncate_weights(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])


def garble_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text("{ not json")


def foreign_rank_pattern(adapter: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 7}  # not the shapes its weights have
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (truncate_weights, "cannot load the adapter"),
        (garble_config, "is not valid JSON"),
        (foreign_rank_pattern, "cannot load the adapter"),
    ],
    ids=["truncated-weights", "garbled-config", "foreign-rank-pattern"],
)
def test_a_damaged_adapter_is_one_clear_error(two_runs, tmp_path, damage, said):
    run_a, _ = two_runs
    adapter = tmp_path / "adapter"
    shutil.copytree(run_a / "adapter", adapter)
    damage(adapter)
    result = runner.invoke(app, ["eval", str(run_a), "--adapter", str(adapter), "--output", str(tmp_path / "m.json")])
    one_clear_line(result, str(adapter), said)


def test_truncated_model_weights_are_one_clear_error(tiny_llava_dir, colour_dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model)
    truncate = model / "model.safetensors"
    truncate.write_bytes(truncate.read_bytes()[:1000])
    path = write_config(tmp_path, "c", tiny_config(model, colour_dataset, tmp_path / "run"))
    one_clear_line(runner.invoke(app, ["validate", str(path)]), "cannot load the weights", "complete")
