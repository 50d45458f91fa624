"""Chat records from files: the LLaVA / ShareGPT format, the `messages` format, and local HF `datasets` folders.

Every record becomes one `Sample`. Accepted shapes, detected per record:

* LLaVA / ShareGPT (LLaMA-Factory `sharegpt`): `{"conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}], "image": "a.png"}`; `images` (a list) and a top-level `system` also work.
* messages (TRL, LLaMA-Factory with role/content tags, OpenAI style): `{"messages": [{"role": "user", "content":
  "<image>..."}, ...], "images": [...]}`, where `content` may also be a list of parts `{"type": "text", "text": ...}`
  / `{"type": "image"}` (an image part becomes an `<image>` placeholder at its position).

Images are paths relative to an image folder (they may not leave it: a dataset file must not be able to make us read
arbitrary files) or, from a `datasets` folder, decoded images or `{"bytes": ...}` records. Files are a JSON list
(`.json`) or one record per line (`.jsonl`); folders are what `datasets.Dataset.save_to_disk` writes (a `DatasetDict`
gives its `train` split for training and `test`/`validation` for evaluation). Multi-turn chats are kept whole: every
assistant message is learned (encode.py), and evaluation asks for the last one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError
from ..utils import one_line, read_text_file
from .sample import Sample

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EVAL_SPLITS = ("test", "validation")


def _records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs; the location is `file:line` for JSONL and `file[index]` for a JSON list."""
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; check data.train_path / data.eval_path")
    text = read_text_file(path, "dataset file")
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


def _text(content: Any, images: list[Any], source: str) -> str:
    """A message's text; list-of-parts content gets an `<image>` placeholder per image part (inline images join
    `images` in order)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{source}: message content must be text or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            inline = next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)
            if inline is not None:
                images.append(inline)
            pieces.append("<image>")
        else:
            raise DataError(f"{source}: content parts must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}")
    return "".join(pieces)


def _image(value: Any, image_root: Path, source: str) -> Path | Image.Image:
    if isinstance(value, str):
        return resolve_image(image_root, value, source)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        try:
            with Image.open(io.BytesIO(value["bytes"])) as image:
                return image.convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:
            raise DataError(f"{source}: an embedded image cannot be read ({error})") from None
    raise DataError(f"{source}: an image must be a file path or an image, got {type(value).__name__}")


def sample_from_record(record: Any, image_root: Path, source: str) -> Sample:
    """One record in any accepted shape (see the module docstring) as a `Sample`."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with a 'conversations' or 'messages' list")
    inline: list[Any] = []
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    if isinstance(record.get("conversations"), list):
        for turn in record["conversations"]:
            speaker = turn.get("from") if isinstance(turn, dict) else None
            if speaker not in SPEAKERS or not isinstance(turn.get("value"), str):
                raise DataError(f"{source}: each turn needs 'from' (one of {sorted(SPEAKERS)}) and a text 'value'")
            messages.append({"role": SPEAKERS[speaker], "content": turn["value"]})
    elif isinstance(record.get("messages"), list):
        for turn in record["messages"]:
            role = turn.get("role") if isinstance(turn, dict) else None
            if role not in SPEAKERS or "content" not in turn:
                raise DataError(f"{source}: each message needs 'role' (one of {sorted(SPEAKERS)}) and 'content'")
            messages.append({"role": SPEAKERS[role], "content": _text(turn["content"], inline, source)})
    else:
        raise DataError(f"{source}: expected an object with a 'conversations' or 'messages' list")
    listed = record.get("images") if record.get("images") is not None else record.get("image")
    listed = [] if listed is None else [listed] if isinstance(listed, (str, dict, Image.Image)) else list(listed)
    images = tuple(_image(value, image_root, source) for value in [*inline, *listed])
    return Sample(messages=tuple(messages), images=images, source=source)


def load_json_samples(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read a `.json`/`.jsonl` file of chat records; `image_root` defaults to the file's folder."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    samples = [sample_from_record(record, root, source) for source, record in _records(path)]
    if not samples:
        raise DataError(f"dataset file {path} holds no samples")
    return samples


def load_hf_dataset(path: str | Path, role: str, image_root: str | Path | None = None) -> list[Sample]:
    """Read a folder written by `datasets` `save_to_disk`; `role` ("train" or "eval") picks a `DatasetDict` split."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(
            "data.dataset hf-dataset needs the datasets package: pip install 'hydra-rank[datasets]'"
        ) from None
    path = Path(path)
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DataError(f"{path} is not a folder written by datasets' save_to_disk (no dataset_info.json)")
    try:
        data = load_from_disk(str(path))
    except Exception as error:  # datasets raises whatever its readers meet in a damaged folder
        reason = one_line(str(error), 200)
        raise DataError(
            f"{path} cannot be read by datasets' load_from_disk ({type(error).__name__}: {reason})"
        ) from None
    if isinstance(data, DatasetDict):
        wanted = ("train",) if role == "train" else EVAL_SPLITS
        split = next((name for name in wanted if name in data), None)
        if split is None:
            raise DataError(f"{path} has splits {sorted(data)}; the {role} data needs one of {list(wanted)}")
        data, path = data[split], path / split
    root = Path(image_root) if image_root else path
    samples = [sample_from_record(record, root, f"{path}[{index}]") for index, record in enumerate(data)]
    if not samples:
        raise DataError(f"dataset {path} holds no samples")
    return samples
