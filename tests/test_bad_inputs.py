"""Bad input gets one clear error: what, where, how to fix; exit status 2; no traceback (unless --debug).

One case per kind of mistake, each through the CLI a user would type (`validate`, or `train` where the problem only
shows while training), on a tiny random LLaVA and a small generated dataset.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hydra_rank.cli import app

runner = CliRunner()


def base_config(model_dir: Path, data: Path, output_dir: Path) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "dataset": "llava-json",
            "train_path": str(data / "train.jsonl"),
            "eval_path": str(data / "eval.json"),
        },
        "adapter": {"method": "lora", "rank": 2, "alpha": 4.0},
        "train": {"max_steps": 3, "batch_size": 4, "output_dir": str(output_dir)},
        "eval": {"max_new_tokens": 2},
    }


def first_line(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def set_first_line(path: Path, record: dict | str) -> None:
    lines = path.read_text().splitlines()
    lines[0] = record if isinstance(record, str) else json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def missing_image(data: Path, config: dict) -> None:
    (data / "images" / "0.png").unlink()


def corrupt_image(data: Path, config: dict) -> None:
    png = data / "images" / "1.png"
    png.write_bytes(png.read_bytes()[:40])  # a truncated PNG


def not_an_image(data: Path, config: dict) -> None:
    (data / "images" / "2.png").write_text("this is a text file, not a picture")


def bad_json_line(data: Path, config: dict) -> None:
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[2] = '{"image": "images/2.png", "conversations": [ oops'
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")


def no_placeholder(data: Path, config: dict) -> None:
    record = first_line(data / "train.jsonl")
    record["conversations"][0]["value"] = "what color is the shape?"  # the image is there, <image> is not
    set_first_line(data / "train.jsonl", record)


def empty_dataset(data: Path, config: dict) -> None:
    (data / "train.jsonl").write_text("\n")


def answer_too_long(data: Path, config: dict) -> None:
    record = first_line(data / "train.jsonl")
    record["conversations"][1]["value"] = "red " * 400
    set_first_line(data / "train.jsonl", record)


def path_escapes_root(data: Path, config: dict) -> None:
    record = first_line(data / "train.jsonl")
    record["image"] = "../../../../etc/hostname"
    set_first_line(data / "train.jsonl", record)


def unknown_key(data: Path, config: dict) -> None:
    config["train"]["learning_rate"] = 1e-3


def budget_too_small(data: Path, config: dict) -> None:
    config["adapter"].update(method="hydra-static", budget_params=100, min_rank=1)


def rank_below_one(data: Path, config: dict) -> None:
    config["adapter"]["rank"] = 0


def unknown_target(data: Path, config: dict) -> None:
    config["adapter"]["target_modules"] = ["q_proj", "query_key_value"]


def output_not_writable(data: Path, config: dict) -> None:
    blocker = data / "a-file"
    blocker.write_text("")
    config["train"]["output_dir"] = str(blocker / "run")


def output_is_a_file(data: Path, config: dict) -> None:
    (data / "a-file").write_text("mine")
    config["train"]["output_dir"] = str(data / "a-file")


def decompression_bomb(data: Path, config: dict) -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = 100  # the 32x32 test images are then "bombs"; the fixture below restores the limit


def non_utf8_jsonl(data: Path, config: dict) -> None:
    (data / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes() + b'{"id": "caf\xe9"}\n')


def rank_above_every_width(data: Path, config: dict) -> None:
    config["adapter"]["rank"] = 100000


def _saved_allocation(data: Path, config: dict, text: str) -> None:
    (data / "allocation.json").write_text(text)
    config["adapter"].update(method="hydra-static", allocation_path=str(data / "allocation.json"))


def allocation_missing(data: Path, config: dict) -> None:
    config["adapter"].update(method="hydra-static", allocation_path=str(data / "nowhere.json"))


def allocation_not_json(data: Path, config: dict) -> None:
    _saved_allocation(data, config, "{ranks: ")


def allocation_negative_rank(data: Path, config: dict) -> None:
    ranks = {f"model.language_model.layers.{i}.{kind}": -1 for i in range(2) for kind in KINDS}
    _saved_allocation(data, config, json.dumps({"budget": 10**6, "ranks": ranks, "info": {}}))


def allocation_foreign_modules(data: Path, config: dict) -> None:
    _saved_allocation(data, config, json.dumps({"budget": 10**6, "ranks": {"transformer.h.0.attn": 4}, "info": {}}))


KINDS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


CASES = [
    ("validate", missing_image, "images/0.png", "does not exist"),
    ("validate", corrupt_image, "1.png", "cannot be read as an image"),
    ("validate", not_an_image, "2.png", "cannot be read as an image"),
    ("validate", bad_json_line, "train.jsonl:3", "is not valid JSON"),
    ("validate", no_placeholder, "train.jsonl:1", "0 <image> placeholder(s) but 1 image(s)"),
    ("validate", empty_dataset, "train.jsonl", "holds no samples"),
    ("validate", answer_too_long, "data.max_length=256", "raise data.max_length or shorten the sample"),
    ("validate", path_escapes_root, "train.jsonl:1", "points outside the image folder"),
    ("validate", unknown_key, "train.learning_rate", "Did you mean 'train.lr'?"),
    ("validate", budget_too_small, "budget of 100 parameters", "raise adapter.rank / adapter.budget_params"),
    ("validate", rank_below_one, "adapter.rank", "must be at least 1"),
    ("validate", unknown_target, "['query_key_value']", "are not linears of the decoder layers"),
    ("train", output_not_writable, "a-file/run", "is not writable"),
    ("train", output_is_a_file, "a-file", "is a file; choose a folder"),
    ("validate", decompression_bomb, "images/", "is too large to decode safely"),
    ("validate", non_utf8_jsonl, "train.jsonl", "is not UTF-8 text (byte 0xe9"),
    ("validate", rank_above_every_width, "adapter.rank 100000", "above the width of every target module"),
    ("validate", allocation_missing, "nowhere.json", "cannot read allocation"),
    ("validate", allocation_not_json, "allocation.json", "cannot read allocation"),
    ("validate", allocation_negative_rank, "allocation.json", "ranks outside"),
    ("validate", allocation_foreign_modules, "allocation.json", "does not cover exactly the target modules"),
]


@pytest.fixture(autouse=True)
def _pillow_limit():
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.mark.parametrize(("command", "mistake", "where", "what"), CASES, ids=[c[1].__name__ for c in CASES])
def test_each_mistake_is_one_clear_error(command, mistake, where, what, tiny_llava_dir, colour_dataset, tmp_path):
    data = colour_dataset[0].parent
    config = base_config(tiny_llava_dir, data, tmp_path / "run")
    mistake(data, config)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    result = runner.invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and where in errors[0] and what in errors[0], result.output
    assert "Traceback" not in result.output


def test_a_clean_config_validates(tiny_llava_dir, colour_dataset, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(base_config(tiny_llava_dir, colour_dataset[0].parent, tmp_path / "run")))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "train_samples: 12" in result.output and "ok" in result.output


def test_unsupported_architecture_names_what_to_add(tokenizer, colour_dataset, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(
        tmp_path / "m"
    )
    tokenizer.save_pretrained(tmp_path / "m")
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(base_config(tmp_path / "m", colour_dataset[0].parent, tmp_path / "run")))
    result = runner.invoke(app, ["validate", str(path)])
    assert (
        result.exit_code == 2 and "model type 'gpt2' is not in" in result.output and "add an ArchSpec" in result.output
    )


def test_model_folder_without_weights(tiny_llava_dir, colour_dataset, tmp_path):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_llava_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(base_config(model_dir, colour_dataset[0].parent, tmp_path / "run")))
    result = runner.invoke(app, ["validate", str(path)])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "cannot load the weights or processor" in errors[0] and "needs the model's weights" in errors[0]


def test_tokenizer_without_chat_template(tiny_llava_dir, colour_dataset, tmp_path):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_llava_dir, model_dir)
    for name in ("chat_template.jinja", "chat_template.json"):
        (model_dir / name).unlink(missing_ok=True)
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(base_config(model_dir, colour_dataset[0].parent, tmp_path / "run")))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "no chat template" in result.output, result.output


def test_non_finite_loss_stops_and_points_to_the_last_good_checkpoint(tiny_llava_dir, colour_dataset, tmp_path):
    config = base_config(tiny_llava_dir, colour_dataset[0].parent, tmp_path / "run")
    # Adam moves every entry by about lr per step, so once A and B have both moved, B·A ~ lr² overflows float32 on
    # any CPU (at 1e12 the product stayed finite, and whether the loss did depended on the CPU's rounding)
    config["train"].update(max_steps=40, lr=1e30, max_grad_norm=None, warmup_steps=0, checkpoint_every=1)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "the training loss became" in result.output and "last good checkpoint is" in result.output
    checkpoint = result.output.split("last good checkpoint is ")[1].split(" ")[0]
    state = torch.load(Path(checkpoint) / "state.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["trainable"].values())
    assert math.isfinite(json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["loss"])


def test_debug_shows_the_traceback(tiny_llava_dir, colour_dataset, tmp_path):
    config = base_config(tiny_llava_dir, colour_dataset[0].parent, tmp_path / "run")
    rank_below_one(colour_dataset[0].parent, config)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    result = runner.invoke(app, ["--debug", "validate", str(path)])
    assert result.exit_code != 0 and type(result.exception).__name__ == "ConfigError"


def test_max_rank_above_every_width_is_capped_not_a_crash(tiny_llava_dir, colour_dataset, tmp_path):
    """A max_rank wider than every module once crashed the gradient sketch; the bound is now each module's width."""
    config = base_config(tiny_llava_dir, colour_dataset[0].parent, tmp_path / "run")
    config["adapter"].update(method="hydra", max_rank=600)
    config["train"]["max_steps"] = 4
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    ranks = json.loads((tmp_path / "run" / "allocation.json").read_text())["ranks"]
    assert max(ranks.values()) <= 32  # the tiny model's widest module
