"""The one sample type every dataset format is read into.

A sample is a chat (`messages` with `role`/`content`) plus the images its `<image>` placeholders refer to, in order:
files (opened when encoded, so large datasets stay on disk) or images a `datasets` folder already decoded. Keeping
formats out of the encoder means a new format is a reader that yields `Sample`s, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sample:
    """A conversation whose last message is the assistant answer we train on and evaluate against."""

    messages: tuple[dict[str, str], ...]
    images: tuple[Path | Image.Image, ...] = field(default=())
    source: str = ""  # where the sample came from (file:line), for error messages

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        if not self.messages or self.messages[-1].get("role") != "assistant":
            raise DataError(f"sample{where} must end with an assistant message: it is the answer to learn")
        for message in self.messages:
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise DataError(f"sample{where} has a message {message!r}; each needs a role in {ROLES} and text")
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages)
        if placeholders != len(self.images):
            raise DataError(
                f"sample{where} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(self.images)} image(s);"
                f" put one {IMAGE_PLACEHOLDER} in the text where each image belongs"
            )

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> tuple[dict[str, str], ...]:
        return self.messages[:-1]


def load_image(path: Path | Image.Image, source: str = "") -> Image.Image:
    """Open an image as RGB, turning the ways it can fail into one `DataError` that names the file."""
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    where = f" (referenced by {source})" if source else ""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path}{where} does not exist; check the image folder setting") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"image {path}{where} is too large to decode safely ({error}); downscale it") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"image {path}{where} cannot be read as an image ({error}); replace or remove it") from None
