from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from langchain_core.tools import tool

from runcycles import ModelPrice, Pricer

PRICER = Pricer(overrides={"tiny": ModelPrice(Decimal("2.5"), 10)}, builtin=False)
RAN: list[str] = []
THREADS: set[str] = set()


def cost(inp: int, out: int) -> int:
    """Micro-cents at 2.5 / 10 USD per Mtok, worked out here (not by the pricer)."""
    return inp * 250 + out * 1_000


@tool
def search(query: str) -> str:
    """Search the knowledge base."""
    RAN.append(f"search:{query}")
    THREADS.add(threading.current_thread().name)
    return "found"


@tool
def send_email(to: str) -> str:
    """Send an email."""
    RAN.append(f"send_email:{to}")
    return "sent"


@tool
def broken(query: str) -> str:
    """Always fails."""
    raise RuntimeError("tool crashed")


@pytest.fixture(autouse=True)
def _journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path / "journal"))
    RAN.clear()
    THREADS.clear()


def user(text: str = "go") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


@pytest.fixture
def kit() -> SimpleNamespace:
    """What the tests share: the pricer, the tools, what they ran, ``cost`` and ``user``."""
    return SimpleNamespace(
        PRICER=PRICER, RAN=RAN, THREADS=THREADS, cost=cost, user=user,
        search=search, send_email=send_email, broken=broken,
    )  # fmt: skip
