"""A generated, deterministic VQA task where adapter capacity matters: multi-shape scenes.

easy-VQA is a poor judge of rank allocation: its answers are one word, mostly yes/no, and a rank-1 adapter already
gets most of what the vision features allow. Here a 2x2 grid holds one to four shapes (3 shapes x 5 colours), and
questions need counting, colours, positions, relations and multi-word descriptions ("a red circle at top left and
a blue square at bottom right"), so the adapter has to learn a structured mapping from image tokens to text.

Images are 56x56 (the built-in VLM's input size: each quadrant is 2x2 of its 14-px patches). Everything derives
from one integer seed, and the files are written as LLaVA JSONL + PNGs, so any LLaVA-format tool can use them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..cache import cached
from ..provenance import code_digest, versions
from ..utils import atomic_directory

SIZE = 56
CELL = SIZE // 2
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "black": (20, 20, 20),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Item:
    shape: str
    color: str
    position: int  # index into POSITIONS

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"


def draw(items: list[Item]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(image)
    for item in items:
        x0, y0 = (item.position % 2) * CELL + 4, (item.position // 2) * CELL + 4
        x1, y1 = x0 + CELL - 8, y0 + CELL - 8
        fill = COLORS[item.color]
        if item.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            pen.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
        else:
            pen.polygon(((x0 + x1) // 2, y0, x1, y1, x0, y1), fill=fill)
    return image


def describe(items: list[Item]) -> str:
    parts = [f"{item.phrase} at {POSITIONS[item.position]}" for item in sorted(items, key=lambda i: i.position)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(items: list[Item], rng: random.Random) -> list[tuple[str, str]]:
    """Every question type that makes sense for the scene, one of each."""
    by_position = {item.position: item for item in items}
    asked = [("Describe the image.", describe(items)), ("How many shapes are there?", NUMBERS[len(items)])]
    color = rng.choice(sorted(COLORS))
    count = sum(item.color == color for item in items)
    asked.append((f"How many {color} shapes are there?", NUMBERS[count]))
    position = rng.randrange(4)
    found = by_position.get(position)
    asked.append((f"What is at the {POSITIONS[position]}?", found.phrase if found else "nothing"))
    unique = [i for i in items if sum((j.shape, j.color) == (i.shape, i.color) for j in items) == 1]
    item = rng.choice(unique) if unique else None
    if item:
        asked.append((f"Where is the {item.color} {item.shape}?", POSITIONS[item.position]))
    pairs = [(a, b) for a in unique for b in unique if a.position % 2 != b.position % 2]
    if pairs:
        a, b = rng.choice(pairs)
        left = a.position % 2 < b.position % 2
        asked.append((f"Is the {a.color} {a.shape} left of the {b.color} {b.shape}?", "yes" if left else "no"))
    return asked


def scene(rng: random.Random) -> list[Item]:
    count = rng.randint(1, 4)
    return [Item(rng.choice(SHAPES), rng.choice(sorted(COLORS)), p) for p in sorted(rng.sample(range(4), count))]


def write_split(directory: Path, split: str, images: int, rng: random.Random) -> int:
    """Draw `images` scenes into `directory/images/` and their questions into `directory/{split}.jsonl`."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(images):
        items = scene(rng)
        name = f"images/{split}-{index:05d}.png"
        draw(items).save(directory / name)
        for question, answer in questions(items, rng):
            record = {
                "id": f"{split}-{index:05d}-{len(lines)}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
            lines.append(json.dumps(record))
    (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def write_task(directory: Path, seed: int = 0, train_images: int = 2000, test_images: int = 300) -> dict[str, int]:
    """Write the task (train.jsonl, test.jsonl, images/) into an existing, empty `directory`."""
    rng = random.Random(seed)
    counts = {
        split: write_split(directory, split, n, rng) for split, n in (("train", train_images), ("test", test_images))
    }
    (directory / "README.md").write_text(
        f"Generated by hydra_rank.data.scenes (seed {seed}): multi-shape scenes, LLaVA JSONL.\nQuestions: {counts}.\n"
    )
    return counts


def generate(directory: Path, seed: int = 0) -> dict[str, int]:
    """Write the task into `directory`, replacing what was there only once the new files are complete."""
    with atomic_directory(directory) as staging:
        return write_task(staging, seed)


def cached_scenes(seed: int = 0) -> Path:
    """The default task, generated once into the cache (deterministic for a seed); the entry's key covers this
    module's code and Pillow's version (it draws the images)."""
    inputs = {"code": code_digest(__name__), "libraries": versions(("pillow",)), "seed": seed}
    return cached("scenes", inputs, lambda directory: write_task(directory, seed), marker="test.jsonl")
