"""Where a result came from: the code (git commit and whether the tree was dirty; a digest of the source that builds a
cache entry), the library versions, the machine.

Every run's metrics.json carries `environment()` (plus the base model's identity, `inputs.py`), and every cache
entry's name is a digest of what built it (`cache.cached`), so a published figure can be traced to the code,
libraries and inputs it was measured with, and a cache entry built by other code is never silently reused.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# What a result's provenance lists; the libraries that decide the numbers of a run or a build.
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy", "pillow")


def versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_state(directory: Path = PACKAGE) -> dict[str, str | bool | None]:
    """The commit of the checkout `directory` is in, and whether its tracked files differ from it (None when the
    package is not running from a git checkout, e.g. installed from a wheel)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout

    commit = git("rev-parse", "HEAD")
    if commit is None or git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return {"commit": None, "dirty": None}  # not a checkout of ours (e.g. a venv inside someone's repository)
    status = git("status", "--porcelain", "--untracked-files=no")  # results being written are not a change
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def machine() -> dict[str, str | int | None]:
    """The CPU model, core count, OS and Python: enough to tell two machines' timings apart."""
    model = platform.processor() or None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return {"cpu": model, "cores": os.cpu_count(), "os": platform.platform(), "python": sys.version.split()[0]}


def environment() -> dict:
    """Provenance of a result measured now: git state, library versions and machine."""
    return {"git": git_state(), "versions": versions(), "machine": machine()}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """`hydra_rank.rank.plan` for `root/rank/plan.py` (a package's `__init__.py` is the package itself)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path, root: Path = PACKAGE, runtime_only: bool = True) -> set[str]:
    """The package modules the file `path` imports anywhere (module level, functions, classes). `runtime_only`
    leaves out imports under `if TYPE_CHECKING:`, which never run. Importing `a.b.c` also runs the packages `a.b` and
    `a`, unless the importer lives inside them already."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    skipped = {id(n) for node in guarded for n in ast.walk(node)} if runtime_only else set()
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import easy_vqa` is a module
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    edges = set()
    for target in found:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):  # the packages on the way, then the module itself
            prefix = ".".join(parts[:end])
            if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                edges.add(prefix)
    return edges


def _source_path(module: str, root: Path) -> Path:
    relative = Path(*module.split(".")[1:])
    package_init = root / relative / "__init__.py"
    return package_init if package_init.is_file() else (root / relative).with_suffix(".py")


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def code_digest(module: str, root: Path = PACKAGE) -> str:
    """A digest of `module`'s code and of every package module it imports at run time, transitively. It reads the
    syntax tree without docstrings, so comments, docstrings and formatting do not change it; any code change does."""
    todo, seen = [module], set()
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(package_imports(_source_path(current, root), root))
    digest = hashlib.sha256()
    for current in sorted(seen):
        tree = _without_docstrings(ast.parse(_source_path(current, root).read_text(encoding="utf-8")))
        digest.update(f"{current}\n{ast.dump(tree)}\n".encode())
    return digest.hexdigest()[:16]
