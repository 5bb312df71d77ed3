"""pytest fixtures for testing agents under a Cycles budget (registered as a pytest plugin).

* ``cycles_server``: a real Cycles server (SQLite, a subprocess) for the test session; needs
  ``runcycles-server`` installed (``pip install runcycles-server``), else the test skips;
* ``cycles_tenant``: a fresh tenant on it with an API key, 10**12 USD micro-cents and
  10**6 risk points (``.config()``, ``.async_client()``, ``.add_budget()``);
* ``scripted_model``: ``scripted_model(turns, ...)`` builds a
  :class:`~runcycles_openai_agents.testing.ScriptedModel` (tracing export off: no key needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["cycles_server", "cycles_tenant", "scripted_model"]


@pytest.fixture(scope="session")
def cycles_server() -> Iterator[Any]:
    """A real Cycles server process for the session (SQLite in a temporary folder)."""
    testing = pytest.importorskip(
        "runcycles_server.testing", reason="cycles_server needs `pip install runcycles-server`"
    )
    with testing.ServerProcess.start(store="sqlite") as server:
        yield server


@pytest.fixture
def cycles_tenant(cycles_server: Any) -> Any:
    """A fresh tenant: API key, 10**12 USD_MICROCENTS and 10**6 RISK_POINTS at tenant scope."""
    tenant = cycles_server.provision(budget=10**12)
    tenant.add_budget(10**6, unit="RISK_POINTS")
    return tenant


@pytest.fixture
def scripted_model() -> Callable[..., Any]:
    """``scripted_model(turns, usage=None, name="gpt-4o-mini")``: a scripted Agents SDK model."""
    from agents import set_tracing_disabled

    from runcycles_openai_agents.testing import ScriptedModel

    set_tracing_disabled(True)
    return ScriptedModel
