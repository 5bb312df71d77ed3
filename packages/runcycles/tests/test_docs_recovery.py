"""Every Python example in docs/heartbeat.md and docs/recovery.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import respx

from runcycles.testing.recovery_fakes import FakeLedger

DOCS = Path(__file__).resolve().parents[3] / "docs"
PAGES = ("heartbeat.md", "recovery.md")
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> list[Any]:
    found = []
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        for index, match in enumerate(BLOCK.finditer(text)):
            found.append(pytest.param(match.group(1), id=f"{page}#{index}"))
    return found


def test_pages_have_examples() -> None:
    assert len(examples()) >= 4


@pytest.mark.parametrize("code", examples())
def test_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path))
    ledger = FakeLedger()
    with respx.mock(base_url="http://localhost:7878", assert_all_called=False) as router:
        router.route().mock(side_effect=ledger.handle)
        exec(compile(code, "<docs example>", "exec"), {"__name__": "docs_example"})
    assert ledger.requests or "flush" in code
    # nothing is left in the journal: every example settles what it journals
    assert list(tmp_path.rglob("*.json")) == []
