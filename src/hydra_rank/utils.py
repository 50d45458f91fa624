"""Small shared helpers: progress bars, peak memory, atomic writes, JSON lines, Accelerate's optimizer wrapper."""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    import torch

console = Console(stderr=True, soft_wrap=True)  # messages are never re-wrapped: logs keep whole lines


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar; yields an `advance(**fields)` callable. `fields` (e.g. loss) show beside the bar."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, disable=not enabled, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(**fields: float) -> None:
            info = "  ".join(f"{key} {value:.4g}" for key, value in fields.items())
            progress.update(task, advance=1, info=info)

        yield advance


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 6
_SHORT.maxlevel = 3


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: a huge or deeply nested value (e.g. a YAML alias bomb) stays one short
    line, computed without walking the whole value."""
    return _SHORT.repr(value)


def one_line(text: str, limit: int) -> str:
    """`text` (e.g. a library's multi-line error) as one line of at most `limit` characters, for an error message."""
    return " ".join(text.split())[:limit]


def read_text_file(path: Path, what: str) -> str:
    """A text file's content as UTF-8, or one clear error naming the file and the first bad byte."""
    from .errors import DataError

    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as error:
        raise DataError(f"{what} {path} cannot be read ({error.strerror})") from None


def _umask_mode(mode: int) -> int:
    """`mode` filtered by the process umask: temp files are created private, the results should not be."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers (and crashes) see either the old or the whole new content, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(handle.name, _umask_mode(0o666))
    os.replace(handle.name, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_folder_target(path: Path, overwrite: bool, writes: str) -> None:
    """Refuse to write `writes` into folder `path` unless that cannot destroy anything the command did not create: a
    new or empty folder, or (with `overwrite`) a folder it will replace. A file there, or the current folder or one
    of its parents, is never replaced."""
    from .errors import ConfigError

    if path.is_file() or (path.exists() and not path.is_dir()):
        raise ConfigError(f"{path} is a file, not a folder; {writes} needs a folder: choose a new folder name")
    if path.exists() and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ConfigError(f"{path} is the current folder or one of its parents; choose a new folder for {writes}")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"{path} already holds files; {writes} would replace them: choose a new or empty folder, or pass "
            "--overwrite to replace it"
        )


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `path` only if the block finishes without error.

    An existing `path` is replaced only after the new one is complete, so an interrupted write never leaves a
    half-written directory where a good one was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield staging
        os.chmod(staging, _umask_mode(0o777))
        replace_directory(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(new: Path, path: Path) -> None:
    """Make the complete folder `new` (a sibling of `path`) be `path`: the old one is renamed aside first and only
    deleted once the new one is in place, so `path` is at every moment either the old folder or the new one."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    else:
        os.replace(new, path)


class JsonlWriter:
    """Append-only JSON-lines log, flushed per line so it can be followed (`tail -f`) and survives a crash."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's `AcceleratedOptimizer` (or `optimizer` itself): its param groups,
    state and step hooks are the ones that count."""
    return getattr(optimizer, "optimizer", optimizer)
