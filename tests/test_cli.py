"""The CLI as a user meets it: help, one-line errors with exit status 2, train then eval of a run directory."""

import json

import pytest
from typer.testing import CliRunner

from hydra_rank.cli import app

from .test_train import tiny_config

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "demo", "prepare"):
        assert command in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.yaml"], "config file missing.yaml does not exist"),
        (["train", "{config}", "--set", "train.lrr=1"], "Did you mean 'train.lr'?"),
        (["train", "{config}", "--max-steps", "0"], "train.max_steps must be at least 1"),
        (["train", "{config}", "--set", "model.name_or_path=builtin:nope"], "unknown built-in model"),
    ],
)
def test_input_errors_are_one_line_and_exit_2(tmp_path, args, message):
    config = tmp_path / "config.yaml"
    config.write_text(f"train:\n  output_dir: {tmp_path / 'out'}\n")
    result = runner.invoke(app, [arg.format(config=config) for arg in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


def test_debug_flag_keeps_the_traceback():
    result = runner.invoke(app, ["--debug", "train", "missing.yaml"])
    assert result.exit_code != 0 and result.exception is not None


def test_train_then_eval_a_run_directory(tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "unused")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    out = tmp_path / "run"
    trained = runner.invoke(app, ["train", str(path), "--max-steps", "2", "--output-dir", str(out)])
    assert trained.exit_code == 0, trained.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "eval accuracy" not in trained.output
    assert "lora" in trained.output  # the result table

    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((out / "eval.json").read_text())
    assert again["adapter"] == str(out / "adapter")
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert again["eval_accuracy"] == metrics["eval_accuracy"]


def test_allocate_then_export(tiny_llava_dir, colour_dataset, tmp_path):
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "run")
    config.adapter.method = "hydra-static"
    config.adapter.calibration_batches = 1
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    allocated = runner.invoke(app, ["allocate", str(path), "--output-dir", str(tmp_path / "alloc")])
    assert allocated.exit_code == 0, allocated.output
    assert (tmp_path / "alloc" / "allocation.png").is_file()
    assert "mean rank per module kind" in allocated.output and "calibration" in allocated.output

    trained = runner.invoke(
        app,
        [
            "train",
            str(path),
            "--max-steps",
            "1",
            "--set",
            f"adapter.allocation_path={tmp_path / 'alloc/allocation.json'}",
        ],
    )
    assert trained.exit_code == 0, trained.output
    exported = runner.invoke(app, ["export", str(tmp_path / "run")])
    assert exported.exit_code == 0, exported.output
    assert "largest logit difference" in exported.output
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "export" / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (tmp_path / "run" / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_export_of_something_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "is not a finished run directory" in result.output


def test_make_scenes_writes_a_llava_dataset(tmp_path):
    result = runner.invoke(app, ["make-scenes", str(tmp_path / "scenes"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "train and" in result.output
    from hydra_rank.data.records import load_json_samples

    assert len(load_json_samples(tmp_path / "scenes" / "test.jsonl")) > 1000


BOMB = (
    "[&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8))
    + "]"
)  # one value whose last element reaches 9^9 leaves through aliases


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"train:\n  lr: .inf\n", "train.lr must be a finite number"),
        (b"train:\n  max_grad_norm: .nan\n", "train.max_grad_norm must be a finite number"),
        (b"train:\n  lr: 0.001 \xff\n", "is not UTF-8 text (byte 0xff"),
        (b"- model\n- data\n", "a config is a mapping of sections"),
        (b"42\n", "a config is a mapping of sections"),
        (f"train:\n  lr: {BOMB}\n".encode(), "train.lr: expected float"),
    ],
    ids=["inf", "nan", "not-utf8", "list", "scalar", "alias-bomb"],
)
def test_bad_config_files_are_one_short_line(tmp_path, content, message):
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output and len(result.output) < 2000


def test_bench_without_methods(tmp_path):
    result = runner.invoke(app, ["bench", "configs/scenes.yaml", "--methods", ","])
    assert result.exit_code == 2 and "--methods names no method" in result.output


def test_error_text_is_bounded(tmp_path):
    result = runner.invoke(app, ["validate", "configs/scenes.yaml", "--set", f"train.{'x' * 5000}=1"])
    assert result.exit_code == 2 and "more characters" in result.output and len(result.output) < 1500
