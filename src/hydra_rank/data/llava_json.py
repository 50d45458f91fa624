"""The LLaVA instruction format: `{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}`.

Accepted as a JSON list (`.json`) or one record per line (`.jsonl`). Image paths are relative to an image folder and
may not leave it: a dataset file must not be able to make us read arbitrary files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from .sample import Sample

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs; the location is `file:line` for JSONL and `file[index]` for a JSON list."""
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; check data.train_path / data.eval_path")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number} is not valid JSON ({error.msg}); fix or delete that line") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno} is not valid JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of samples (or use .jsonl with one sample per line)")
    return [(f"{path}[{index}]", record) for index, record in enumerate(data)]


def resolve_image(image_root: Path, relative: str, source: str) -> Path:
    """The image file for a dataset entry, refusing paths that escape `image_root` and files that do not exist (a
    missing image is found when the dataset is read, not hours into training)."""
    root = image_root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{source}: image path {relative!r} points outside the image folder {root}")
    if not path.is_file():
        raise DataError(f"{source}: image {path} does not exist; check data.image_root or the file name")
    return path


def _sample(record: Any, image_root: Path, source: str) -> Sample:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{source}: expected an object with a 'conversations' list")
    messages = []
    for turn in record["conversations"]:
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SPEAKERS or not isinstance(turn.get("value"), str):
            raise DataError(f"{source}: each turn needs 'from' (one of {sorted(SPEAKERS)}) and a text 'value'")
        messages.append({"role": SPEAKERS[speaker], "content": turn["value"]})
    names = record.get("image") or []
    names = [names] if isinstance(names, str) else names
    images = tuple(resolve_image(image_root, name, source) for name in names)
    return Sample(messages=tuple(messages), images=images, source=source)


def load_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read a LLaVA-format file; `image_root` defaults to the file's folder."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    samples = [_sample(record, root, source) for source, record in _records(path)]
    if not samples:
        raise DataError(f"dataset file {path} holds no samples")
    return samples
