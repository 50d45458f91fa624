"""The package's structure, checked from its source: no import cycles (imports inside functions count), every
import goes to the same or a lower layer of docs/design.md's table, and method names are spelled only in the
registry (`methods.py`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from hydra_rank.methods import METHODS
from hydra_rank.provenance import PACKAGE, module_name, package_imports

ROOT = Path(__file__).resolve().parents[1]


def graph(runtime_only: bool) -> dict[str, set[str]]:
    return {module_name(p): package_imports(p, runtime_only=runtime_only) for p in sorted(PACKAGE.rglob("*.py"))}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layers() -> dict[str, int]:
    """Module -> layer number, read from the table in docs/design.md (bottom layer 0)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    table = text.split("<!-- layers -->")[1]
    result = {}
    for row in re.findall(r"^\| (\d+) [^|]*\| ([^|]+) \|", table, flags=re.M):
        for module in re.findall(r"`([\w./*]+)`", row[1]):
            result[module.removesuffix(".py")] = int(row[0])
    return result


def layer_of(module: str, table: dict[str, int]) -> int:
    relative = module.removeprefix("hydra_rank").lstrip(".").replace(".", "/") or "__init__"
    for key in (relative, relative.split("/")[0] + "/*"):
        if key in table:
            return table[key]
    raise KeyError(f"{module} is in no layer of docs/design.md")


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_package_modules():
    edges = graph(runtime_only=True)
    assert len(edges) > 40 and edges["hydra_rank.train"], "the import graph was not read"
    assert cycles(edges) == []


def test_every_import_goes_to_the_same_or_a_lower_layer():
    table = layers()
    assert table["methods"] == 0 and table["cli"] == max(table.values())
    upward = [
        f"{module} (layer {layer_of(module, table)}) imports {other} (layer {layer_of(other, table)})"
        for module, targets in graph(runtime_only=False).items()
        for other in targets
        if layer_of(other, table) > layer_of(module, table)
    ]
    assert upward == []


def test_the_low_layers_do_not_load_the_model_builder():
    """Importing the rank mechanics must not pull in the built-in model's build (it trains a projector)."""
    edges = graph(runtime_only=True)
    reached, todo = set(), ["hydra_rank.rank.signals", "hydra_rank.config", "hydra_rank.data"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(edges[module])
    assert "hydra_rank.builtin" not in reached and "hydra_rank.train" not in reached


PEFT_OPTIONS = {"init_lora_weights"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_method_names_are_spelled_only_in_the_registry(path):
    if path.name == "methods.py" and path.parent == PACKAGE:
        assert all(f'"{name}"' in path.read_text() for name in METHODS)
        return
    names = set(METHODS)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # PEFT's own option values that happen to equal a method name (init_lora_weights="eva") are not method names
    peft_values = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg in PEFT_OPTIONS}
    spelled = [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in peft_values
    ]
    assert spelled == [], "compare registry entries (methods.METHODS), not method names"
