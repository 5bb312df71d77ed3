from __future__ import annotations

from pathlib import Path

import pytest
from agents import set_tracing_disabled

set_tracing_disabled(True)  # the openai backend's SDK tracing: no export, no key


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path / "journal"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-never-sent")  # any-llm needs one; unused
