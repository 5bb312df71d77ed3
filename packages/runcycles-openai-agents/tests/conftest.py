from __future__ import annotations

from pathlib import Path

import pytest
from agents import set_tracing_disabled

set_tracing_disabled(True)


@pytest.fixture(autouse=True)
def _journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path / "journal"))
