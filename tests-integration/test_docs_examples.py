"""Every runnable example in ``README.md`` and ``docs/`` runs, in CI, as written.

A Markdown code block is runnable when the line before its opening fence is a marker:

* ``<!-- example: offline -->``: runs as it is, with no server;
* ``<!-- example: server -->``: runs against a real server; ``CYCLES_BASE_URL``,
  ``CYCLES_API_KEY`` and ``CYCLES_TENANT`` describe a fresh tenant with a USD_MICROCENTS
  budget of 10**12 at tenant scope (both stores).

Unmarked blocks are fragments (signatures, shell commands). A test below fails if a page has
Python blocks and none of them is runnable, so new pages cannot silently opt out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runcycles_server.testing import ServerProcess, run_example

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- example: (offline|server) -->\n```python\n(.*?)```", re.S)


def _examples(kind: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for index, (marker, code) in enumerate(BLOCK.findall(page.read_text())):
            if marker == kind:
                found.append((f"{page.name}#{index + 1}", code))
    return found


OFFLINE = _examples("offline")
SERVER = _examples("server")


@pytest.mark.parametrize(("name", "source"), OFFLINE, ids=[n for n, _ in OFFLINE])
def test_offline_example(name: str, source: str) -> None:
    run_example(source, name=name)


@pytest.mark.parametrize(("name", "source"), SERVER, ids=[n for n, _ in SERVER])
def test_server_example(name: str, source: str, server: ServerProcess, monkeypatch) -> None:
    tenant = server.provision(budget=10**12)
    monkeypatch.setenv("CYCLES_BASE_URL", server.base_url)
    monkeypatch.setenv("CYCLES_API_KEY", tenant.api_key)
    monkeypatch.setenv("CYCLES_TENANT", tenant.tenant_id)
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", server.admin_key)
    run_example(source, name=name)


# Pages whose examples another test runs as written (against a scripted fake ledger).
TESTED_ELSEWHERE = {
    "heartbeat.md": ROOT / "packages/runcycles/tests/test_docs_recovery.py",
    "recovery.md": ROOT / "packages/runcycles/tests/test_docs_recovery.py",
}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "index.md"], ids=lambda p: p.name)
def test_pages_with_python_have_runnable_examples(page: Path) -> None:
    text = page.read_text()
    if page.name in TESTED_ELSEWHERE:
        runner = TESTED_ELSEWHERE[page.name]
        assert page.name in runner.read_text(), f"{runner.name} must run {page.name}"
        return
    if "```python" in text:
        assert BLOCK.search(text), f"{page.name} has Python blocks but none marked runnable"
