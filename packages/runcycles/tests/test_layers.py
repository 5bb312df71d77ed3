"""The core's import graph: imports only point down through the layers, with no cycles.

The layers are drawn in ``docs/architecture.md``; :data:`LAYERS` is their one source of
truth. A module may import modules of strictly lower layers only (type-only imports under
``if TYPE_CHECKING:`` included: a type that points up is a layer that is wrong). No module
imports another ``runcycles`` module inside a function: such an import is how a cycle hides.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import runcycles

SRC = Path(runcycles.__file__).parent

LAYERS: list[set[str]] = [
    {"_version", "models"},
    {"exceptions", "_fastpath", "governance"},
    {"config", "context", "response", "usage", "action_kinds", "events"},
    {"retry", "pricing", "_protocol", "_wire", "_http11", "journal", "webhooks", "evidence"},
    {"heartbeat", "settlement"},
    {"_autoreplay"},
    {"_base_client"},
    {"lifecycle"},
    {"streaming", "adapter_plan", "adapter_glue"},
    {"client"},
    {"decorator", "adapters"},
    {"__init__", "testing"},
]
"""Bottom to top. ``testing`` stands for the whole ``runcycles.testing`` package."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return "testing" if parts[0] == "testing" else parts[0]


def _layer(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"runcycles.{name} is in no layer: add it to LAYERS and the docs")


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The ``runcycles`` modules an import statement loads (first component below the root)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level:  # relative imports are not used in this package
        raise AssertionError(f"relative import at line {node.lineno}")
    elif node.module == "runcycles":
        names = [f"runcycles.{alias.name}" for alias in node.names]
    else:
        names = [node.module or ""]
    found = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "runcycles" and len(parts) > 1:
            found.append(parts[1])
    return found


def _imports(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Return (module-level imports, imports inside functions) as (line, target) pairs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: list[tuple[int, str]] = []
    nested: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                bucket = nested if in_function else top
                bucket.extend((child.lineno, target) for target in _targets(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, nested


SOURCES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    source = _module_name(path)
    top, _ = _imports(path)
    upward = [
        f"line {line}: runcycles.{target} (layer {_layer(target)})"
        for line, target in top
        if target != source and _layer(target) >= _layer(source)
    ]
    assert not upward, f"runcycles.{source} (layer {_layer(source)}) imports up: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_inside_a_function(path: Path) -> None:
    _, nested = _imports(path)
    assert not nested, f"{path.name} imports runcycles modules inside functions: {nested}"


def test_every_module_is_in_a_layer() -> None:
    for path in SOURCES:
        _layer(_module_name(path))


def test_the_check_sees_an_upward_and_a_nested_import(tmp_path: Path) -> None:
    """The checker itself: a module that imports up, and one that hides an import, are caught."""
    up = tmp_path / "up.py"
    up.write_text("from runcycles.decorator import cycles\n", encoding="utf-8")
    hidden = tmp_path / "hidden.py"
    hidden.write_text("def f():\n    from runcycles import lifecycle\n", encoding="utf-8")
    assert _imports(up) == ([(1, "decorator")], [])
    assert _imports(hidden) == ([], [(2, "lifecycle")])
    assert _layer("decorator") > _layer("models")
