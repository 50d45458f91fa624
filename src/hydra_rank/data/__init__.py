"""Datasets: readers that yield `Sample`s, and the encoder that turns them into tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from ..errors import DataError
from . import easy_vqa, scenes, text_tasks
from .encode import ChatEncoder, Encoded, collate
from .records import load_hf_dataset, load_json_samples
from .sample import Sample

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["ChatEncoder", "DataError", "EncodedDataset", "Sample", "collate", "load_samples"]

EVAL_SHUFFLE_SEED = 1234  # fixed: every run, whatever its training seed, is scored on the same eval questions
VALIDATION_SEED = 4321  # fixed: the validation split is the same training samples for every run and seed


def _subset(samples: list[Sample], size: int | None, seed: int) -> list[Sample]:
    order = list(samples)
    random.Random(seed).shuffle(order)
    return order if size is None else order[:size]


def split_validation(train: list[Sample], size: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples without the validation split, the validation split): `size` training samples chosen by a
    fixed shuffle, never trained on. The rest keep their order, so `size` 0 leaves training exactly as it was."""
    if size > len(train) // 2:
        raise DataError(
            f"data.validation_samples={size} would hold out more than half of the {len(train)} training samples; "
            "lower it"
        )
    chosen = set(random.Random(VALIDATION_SEED).sample(range(len(train)), size))
    kept = [s for i, s in enumerate(train) if i not in chosen]
    return kept, [train[i] for i in sorted(chosen)]


def load_samples(config: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples in a seeded random order, evaluation samples: a fixed subset of the split that
    `data.eval_split` names: the test set, or the validation samples held out of training)."""
    if config.dataset == "easy-vqa":
        train, held_out = easy_vqa.questions("train"), easy_vqa.questions("test")
    elif config.dataset in ("scenes", "text-tasks"):
        root = scenes.cached_scenes() if config.dataset == "scenes" else text_tasks.cached_text_tasks()
        train, held_out = load_json_samples(root / "train.jsonl"), load_json_samples(root / "test.jsonl")
    elif config.dataset == "hf-dataset":
        train = load_hf_dataset(config.train_path, "train", config.image_root)
        held_out = load_hf_dataset(config.eval_path or config.train_path, "eval", config.image_root)
    else:
        train = load_json_samples(config.train_path, config.image_root)
        held_out = load_json_samples(config.eval_path, config.image_root)
    train, validation = split_validation(train, config.validation_samples)
    evaluated = validation if config.eval_split == "validation" else held_out
    return _subset(train, config.train_samples, seed), _subset(evaluated, config.eval_samples, EVAL_SHUFFLE_SEED)


class EncodedDataset(Dataset):
    """Samples encoded on access, so start-up stays fast and memory stays flat for large datasets."""

    def __init__(self, samples: Sequence[Sample], encoder: ChatEncoder) -> None:
        self.samples = samples
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        return self.encoder.encode(self.samples[index])
