"""A generated, deterministic text-only task for the built-in SmolLM2: small string and number transformations.

So that benchmark results do not rest on one (visual) task: reversing words, adding three-digit numbers, sorting
digits and spelling words backwards letter by letter need exact, multi-token answers that a 135M model does not
produce zero-shot but learns with a few hundred examples, and how fast it learns depends on adapter capacity.
Written as LLaVA-format JSONL without images, read by the same reader as any user dataset.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..cache import cached
from ..provenance import code_digest

WORDS = [
    "anchor",
    "basket",
    "candle",
    "dragon",
    "engine",
    "falcon",
    "garden",
    "harbor",
    "island",
    "jacket",
    "kitten",
    "ladder",
    "magnet",
    "needle",
    "orange",
    "pepper",
    "quartz",
    "rabbit",
    "saddle",
    "tunnel",
    "umbrella",
    "velvet",
    "walnut",
    "yellow",
    "zipper",
    "bridge",
    "castle",
    "forest",
    "meadow",
    "pillow",
    "rocket",
    "silver",
    "timber",
    "valley",
    "window",
    "winter",
    "summer",
    "planet",
    "copper",
    "marble",
]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        word = rng.choice(WORDS)
        return f"Reverse the word: {word}", word[::-1]
    if kind == 1:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"Add: {a} + {b}", str(a + b)
    if kind == 2:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 7)))
        return f"Sort the digits in ascending order: {digits}", "".join(sorted(digits))
    word = rng.choice(WORDS)
    return f"Spell the word backwards with dashes: {word}", "-".join(reversed(word))


def write_task(directory: Path, seed: int = 0, train: int = 6000, test: int = 600) -> dict[str, int]:
    """Write train.jsonl and test.jsonl into an existing, empty `directory`."""
    rng = random.Random(seed)
    for split, count in (("train", train), ("test", test)):
        lines = []
        for index in range(count):
            question, answer = _task(rng)
            conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            lines.append(json.dumps({"id": f"{split}-{index}", "conversations": conversation}))
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"train": train, "test": test}


def cached_text_tasks(seed: int = 0) -> Path:
    """The default task, generated once into the cache; the entry's key covers this module's code and the seed."""
    inputs = {"code": code_digest(__name__), "seed": seed}
    return cached("text-tasks", inputs, lambda directory: write_task(directory, seed), marker="test.jsonl")
