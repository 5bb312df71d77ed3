"""Fixtures for end-to-end tests: real ``runcycles-server`` processes, both stores.

``server`` is parametrized over ``sqlite`` and ``redis``: each test using it runs once per
store against a real server process on a free loopback port. Without Redis the ``redis``
variant skips with the reason, or fails when ``CYCLES_REQUIRE_REDIS=1`` (CI sets it).
Servers are shared per module and store (starting one takes well under a second), and every
test provisions its own tenant, so tests never see each other's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runcycles_server.testing import ProvisionedTenant, ServerProcess, redis_url_for_tests

STORES = ["sqlite", "redis"]


@pytest.fixture(autouse=True)
def _isolated_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default durable journal at a per-test folder.

    Clients replay their journal partition when they start, so records left in the user's
    real state directory must never reach a test server, nor one test's records another.
    """
    path = tmp_path / "default-journal"
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(path))
    return path


def _redis_ok() -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(redis_url_for_tests(), socket_connect_timeout=1)
        client.ping()
        client.close()
        return None
    except Exception as exc:  # any failure means "not usable here"
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module", params=STORES)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    store = request.param
    if store == "redis":
        problem = _redis_ok()
        if problem is not None:
            from runcycles_server.stores.redis_testing import redis_unavailable

            redis_unavailable(problem)
    with ServerProcess.start(store=store) as process:
        yield process


@pytest.fixture
def tenant(server: ServerProcess) -> ProvisionedTenant:
    """A fresh tenant with an API key and a 1,000,000,000 USD_MICROCENTS tenant budget."""
    return server.provision(budget=1_000_000_000)
