"""Shared fixtures: the real tokenizer, a tiny randomly initialised LLaVA, and a small generated LLaVA-JSON dataset.

Unit tests run on tiny random models (fast, any architecture); `e2e` tests use the real built-in weights. Both use the
real SmolLM2 tokenizer and chat template, from the same cache the built-in VLM lives in.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from hydra_rank.builtin import IMAGE_TOKEN, image_processor, smollm2_path

TINY_IMAGE_SIZE = 28  # 2x2 patches of 14 px: 4 image tokens
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), give each worker its share of the cores: torch
    would otherwise start a thread per core in every worker, and oversubscribed threads spin instead of working.
    The environment variable reaches the CLI subprocesses some tests start."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer with the `<image>` token added, as in the built-in VLM."""
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def make_tiny_llava(
    tokenizer, seed: int = 0, hidden: int = 32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A 2-layer LLaVA; `hidden` >= 64 where bitsandbytes quantizes it (its CPU kernels pack 64-wide blocks)."""
    torch.manual_seed(seed)
    vision = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=TINY_IMAGE_SIZE
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(TINY_IMAGE_SIZE // 14) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    processor = LlavaProcessor(
        image_processor=image_processor(TINY_IMAGE_SIZE),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LLaVA saved as an ordinary checkpoint with its processor (loadable by name_or_path)."""
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = make_tiny_llava(tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_colour_dataset(root: Path, count: int = 12) -> tuple[Path, Path]:
    """Images of one coloured square each, with "what color is the shape?" questions, as LLaVA JSONL and JSON."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    names = list(COLOURS)
    for index in range(count):
        colour = names[index % len(names)]
        image = Image.new("RGB", (32, 32), "white")
        image.paste(COLOURS[colour], (8, 8, 24, 24))
        image.save(root / "images" / f"{index}.png")
        records.append(
            {
                "id": str(index),
                "image": f"images/{index}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color is the shape?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = root / "eval.json"
    held_out.write_text(json.dumps(records[: count // 2]))
    return train, held_out


@pytest.fixture
def colour_dataset(tmp_path) -> tuple[Path, Path]:
    return write_colour_dataset(tmp_path / "data")


def write_text_dataset(root: Path, count: int = 12) -> tuple[Path, Path]:
    """The colour questions without images (the colour is named in the question), for text-only language models."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = [
        {
            "id": str(index),
            "conversations": [
                {"from": "human", "value": f"the square is {names[index % len(names)]}. what color is the shape?"},
                {"from": "gpt", "value": names[index % len(names)]},
            ],
        }
        for index in range(count)
    ]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = root / "eval.json"
    held_out.write_text(json.dumps(records[: count // 2]))
    return train, held_out


REFERENCE = Path(__file__).with_name("reference_numbers.json")
# Machines of one CPU family still round differently when their vector units differ (AVX2 against AVX-512): eight
# LoRA steps on easy-VQA drifted by up to 1.6e-5 relative between two AMD EPYC machines (twenty-first session), while
# a change to data order, initialisation or the update moves these numbers by 1e-3 or more.
REFERENCE_TOLERANCE = 1e-4


class Reference:
    """Numbers of short, deterministic runs on the real built-in weights, recorded in tests/reference_numbers.json, so
    a change that moves results is noticed when it is made. After a deliberate change, re-record them with
    `HYDRA_RANK_RECORD_REFERENCE=1 pytest -m e2e` and re-measure what BENCHMARKS.md publishes. Numbers kept per
    build (`check`'s `build`) are re-recorded only for the build of the machine that records: delete the other
    builds' entries of a changed test rather than leave them stale."""

    def __init__(self) -> None:
        self.recording = os.environ.get("HYDRA_RANK_RECORD_REFERENCE") == "1"
        self.values = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}

    def check(self, name: str, values: dict, build: str | None = None) -> None:
        """Compare with the recorded numbers. `build` names base weights that can differ by machine (a built-in VLM
        whose projector was trained on its machine: before the projector shipped, or for another recipe or other
        source wheels; CPU families round differently): numbers are kept per build, and on a build nobody recorded
        the exact comparison is skipped with a warning (the test's other checks still run)."""
        if build is not None:
            recorded_builds = sorted(key.split("@")[1] for key in self.values if key.startswith(f"{name}@"))
            name = f"{name}@{build}"
            if not self.recording and name not in self.values and recorded_builds:
                warnings.warn(f"{name}: numbers are recorded for builds {recorded_builds} only", stacklevel=2)
                return
        if self.recording:
            self.values[name] = values
            REFERENCE.write_text(json.dumps(self.values, indent=2, sort_keys=True) + "\n")
            return
        assert name in self.values, f"no recorded numbers for {name!r}: record them (see Reference)"
        recorded = self.values[name]
        assert set(values) == set(recorded), f"{name}: recorded {sorted(recorded)}, measured {sorted(values)}"
        for key, value in values.items():
            assert value == pytest.approx(recorded[key], rel=REFERENCE_TOLERANCE), (
                f"{name}: {key} moved from the value recorded in {REFERENCE.name}; if the change is intended, "
                "re-record the numbers and re-measure BENCHMARKS.md"
            )


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()
