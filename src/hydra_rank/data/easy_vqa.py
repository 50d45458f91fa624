"""easy-VQA (MIT, shipped in the `easy-vqa` wheel): 64x64 images of one coloured shape, 13 one-word answers.

Read straight from the wheel's files (its `questions.json` rows are `[question, answer, image_id]`), so the embedded
default needs no download.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..cache import package_dir
from .sample import IMAGE_PLACEHOLDER, Sample

SHAPES = frozenset({"circle", "rectangle", "triangle"})
COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
SPLITS = ("train", "test")
CAPTION_PROMPT = "Describe the image."


def data_dir() -> Path:
    return package_dir("easy-vqa") / "data"


@lru_cache(maxsize=2)
def _rows(split: str) -> tuple[tuple[str, str, int], ...]:
    if split not in SPLITS:
        raise ValueError(f"easy-VQA has splits {SPLITS}, not {split!r}")
    with open(data_dir() / split / "questions.json", encoding="utf-8") as handle:
        return tuple((question, answer, int(image_id)) for question, answer, image_id in json.load(handle))


def image_path(split: str, image_id: int) -> Path:
    return data_dir() / split / "images" / f"{image_id}.png"


def vqa_sample(split: str, question: str, answer: str, image_id: int) -> Sample:
    return Sample(
        messages=(
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
            {"role": "assistant", "content": answer},
        ),
        images=(image_path(split, image_id),),
        source=f"easy-vqa {split} image {image_id}",
    )


def questions(split: str) -> list[Sample]:
    """Every question of a split as a one-turn sample, in the file's order."""
    return [vqa_sample(split, *row) for row in _rows(split)]


def answer_counts(split: str = "train") -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, answer, _ in _rows(split):
        counts[answer] = counts.get(answer, 0) + 1
    return counts


def image_attributes(split: str) -> dict[int, dict[str, str]]:
    """Shape and colour of each image, read off its questions and answers.

    An answer that is a shape or colour states it; a question naming the other attribute ("what color is the
    triangle?") states that too; a yes/no answer states every attribute the question names when the shape is present
    ("is there a red shape?" yes, "is there not a circle?" no). About 88 % of images get both attributes this way.
    """
    attributes: dict[int, dict[str, str]] = {}
    for question, answer, image_id in _rows(split):
        words = set(question.rstrip("?").split())
        found = attributes.setdefault(image_id, {})
        if answer in ("yes", "no"):
            negated = bool(words & {"not", "no"})
            named = words if (answer == "yes") != negated else set()
        else:
            named = words | {answer}
        for word in named & SHAPES:
            found["shape"] = word
        for word in named & COLORS:
            found["color"] = word
    return attributes


def captions(split: str = "train") -> list[Sample]:
    """One caption sample per image ("A blue triangle."), the image/text pairs of projector pre-training (stage 1)."""
    samples = []
    for image_id, found in sorted(image_attributes(split).items()):
        words = [found[key] for key in ("color", "shape") if key in found]
        if "shape" not in found:
            words.append("shape")
        article = "An" if words[0][0] in "aeiou" else "A"
        samples.append(
            Sample(
                messages=(
                    {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"},
                    {"role": "assistant", "content": f"{article} {' '.join(words)}."},
                ),
                images=(image_path(split, image_id),),
                source=f"easy-vqa {split} image {image_id}",
            )
        )
    return samples
