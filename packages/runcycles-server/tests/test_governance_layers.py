"""The governance engine stays pure: it imports no ledger, store, HTTP or clock code."""

from __future__ import annotations

import ast
from pathlib import Path

import runcycles_server.governance as governance

PACKAGE = Path(governance.__file__).parent
ALLOWED_SERVER = {"runcycles_server.errors", "runcycles_server.governance"}
FORBIDDEN_STDLIB = {"time", "socket", "asyncio", "sqlite3", "random", "os", "subprocess"}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.lineno, id(node) in nested))
    return found


def test_governance_imports_only_runcycles_errors_and_pure_libraries():
    for path in sorted(PACKAGE.glob("*.py")):
        for module, line, in_function in imports(path):
            where = f"{path.name}:{line} imports {module}"
            assert not in_function, where
            root = module.split(".")[0]
            if root == "runcycles_server":
                assert any(module == a or module.startswith(a + ".") for a in ALLOWED_SERVER), where
            assert root not in FORBIDDEN_STDLIB, where
            assert (
                module != "datetime" or path.name == "timestamps.py" or path.name == "policies.py"
            ), where


def test_no_module_reads_the_clock():
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        for call in ("time.time(", "datetime.now(", "datetime.utcnow(", "monotonic("):
            assert call not in text, f"{path.name} calls {call}"


def test_package_all_is_sorted_and_every_name_exists():
    assert governance.__all__ == sorted(governance.__all__)
    for name in governance.__all__:
        assert hasattr(governance, name), name
