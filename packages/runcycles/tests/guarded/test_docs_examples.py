"""Every Python example in docs/decorator.md, docs/guards.md and docs/streaming.md runs.

Each code block is executed as written, offline: ``CYCLES_*`` variables point
``CyclesConfig.from_env()`` at a URL that respx routes to the in-memory fake. (The same
blocks also run against the real server in ``tests-integration/test_docs_examples.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import respx

DOCS = Path(__file__).resolve().parents[4] / "docs"
PAGES = ("decorator.md", "guards.md", "streaming.md")
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> list[Any]:
    found = []
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        for index, match in enumerate(BLOCK.finditer(text)):
            found.append(pytest.param(match.group(1), id=f"{page}#{index}"))
    return found


def test_every_page_has_examples() -> None:
    assert len(examples()) >= 10


@pytest.mark.parametrize("code", examples())
def test_example_runs(code: str, fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYCLES_BASE_URL", "http://localhost:7878")
    monkeypatch.setenv("CYCLES_API_KEY", "docs-key")
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    with respx.mock(base_url="http://localhost:7878", assert_all_called=False) as router:
        router.route().mock(side_effect=fake.handler)
        exec(compile(code, "<docs example>", "exec"), {"__name__": "docs_example"})
    assert fake.creates(), "the example made no reservation"
    # every live reservation an example made was settled one way or the other
    assert "ACTIVE" not in fake.statuses()
