"""An unavailable store: 503 with Retry-After on every route, one log line per outage.

The store here is a :class:`MemoryStore` that can be switched "down" (every call raises
:class:`StoreUnavailable`) or "hung" (``ping`` never answers); the real-Redis version of these
checks (SIGSTOP / SIGKILL of a redis-server) is ``tests-integration/test_redis_outage.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from runcycles.testing.spec import schema_validator
from runcycles_server.app import READY_TIMEOUT_S, create_app, run_sweeper
from runcycles_server.cli import bootstrap_dev
from runcycles_server.health import StoreHealth
from runcycles_server.stores.base import StoreUnavailable
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.redis import UNAVAILABLE_ERRORS, RedisStore

U = "USD_MICROCENTS"
ADMIN = "admin-secret"


class FlakyStore(MemoryStore):
    """A memory store whose every call fails while ``down`` (and whose ping hangs if ``hung``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hung = False

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not asyncio.iscoroutinefunction(attr) or name == "ping":
            return attr

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if super(FlakyStore, self).__getattribute__("down"):
                raise StoreUnavailable("connection refused")
            return await attr(*args, **kwargs)

        return guarded

    async def ping(self) -> bool:
        if self.hung:
            await asyncio.sleep(3600)
        return not self.down and await super().ping()


def _decide_body() -> dict[str, Any]:
    return {
        "idempotency_key": "d1",
        "subject": {"tenant": "demo"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": 1},
    }


async def test_requests_get_503_with_retry_after_and_the_outage_is_logged_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    key = await bootstrap_dev(store)
    app = create_app(store, admin_api_key=ADMIN, sweep_interval_s=None)
    transport = httpx.ASGITransport(app=app)
    tenant = {"X-Cycles-API-Key": key}
    admin = {"X-Admin-API-Key": ADMIN}
    caplog.set_level(logging.WARNING, logger="runcycles_server")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/v1/decide", headers=tenant, json=_decide_body())).is_success
        store.down = True
        answers = [
            await client.post("/v1/decide", headers=tenant, json=_decide_body()),  # fast route
            await client.get("/v1/balances", params={"tenant": "demo"}, headers=tenant),
            await client.get("/v1/admin/tenants", headers=admin),  # admin, via the router
            await client.post("/v1/decide", headers=tenant, json=_decide_body()),
        ]
        ready = await client.get("/readyz")
        healthy = await client.get("/healthz")
        store.down = False
        recovered = await client.get("/readyz")
        after = await client.post("/v1/decide", headers=tenant, json=_decide_body())

    for response in answers:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        body = response.json()
        schema_validator("ErrorResponse").validate(body)
        assert body["error"] == "INTERNAL_ERROR"
        assert "same idempotency key" in body["message"]
        assert "connection refused" not in body["message"]  # internals are logged, not leaked
        assert body["request_id"] == response.headers["x-request-id"]
    assert ready.status_code == 503
    assert healthy.status_code == 200
    assert recovered.status_code == 200
    assert after.is_success
    records = [r for r in caplog.records if r.name == "runcycles_server"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.WARNING]
    assert "store unavailable (StoreUnavailable: connection refused)" in records[0].getMessage()
    assert "4 requests were answered 503" in records[1].getMessage()
    assert all(r.exc_info is None for r in records)  # no traceback


async def test_readyz_answers_within_its_bound_when_the_store_hangs() -> None:
    store = FlakyStore()
    store.hung = True
    app = create_app(store, sweep_interval_s=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        started = time.monotonic()
        response = await client.get("/readyz")
        took = time.monotonic() - started
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}
    assert READY_TIMEOUT_S <= took < READY_TIMEOUT_S + 0.5


async def test_the_sweeper_logs_an_outage_once_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    health = StoreHealth(store)
    caplog.set_level(logging.DEBUG, logger="runcycles_server")
    store.down = True
    task = asyncio.create_task(
        run_sweeper(store, 0.01, retention_ms=None, purge_every_s=0.02, health=health)
    )
    try:
        await asyncio.sleep(0.2)  # about 20 failed sweeps and 10 failed purges
        assert health.outages == 1  # the outage began (and is logged once)
        store.down = False
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    messages = [r.getMessage() for r in caplog.records if r.name == "runcycles_server"]
    assert len(messages) == 2, messages
    assert messages[0].startswith("store unavailable (StoreUnavailable")
    assert "0 requests were answered 503" in messages[1]  # background failures: not requests
    assert health.down_since is None
    assert health.outages == 1


async def test_other_errors_stay_500_with_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(MemoryStore):
        async def decide(self, *args: Any, **kwargs: Any) -> Any:
            raise KeyError("a bug")

    store = Broken()
    key = await bootstrap_dev(store)
    app = create_app(store, sweep_interval_s=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/decide", headers={"X-Cycles-API-Key": key}, json=_decide_body()
        )
    assert response.status_code == 500
    assert "retry-after" not in response.headers
    assert any(r.exc_info is not None for r in caplog.records)  # a bug keeps its traceback
    assert app.state.store_health.down_since is None  # and is not an outage


def test_store_health_counts_requests_and_outages() -> None:
    now = [100.0]
    logger = logging.getLogger("test-store-health")
    health = StoreHealth(MemoryStore(), logger=logger, monotonic_s=lambda: now[0])
    assert not health.is_unavailable(RuntimeError("bug"))
    assert health.is_unavailable(StoreUnavailable("down"))
    health.succeeded()  # nothing to end
    assert health.outages == 0
    for _ in range(3):
        health.failed(StoreUnavailable("down"))
    health.failed(StoreUnavailable("down"), request=False)
    assert (health.outages, health.failed_requests) == (1, 3)
    now[0] += 2.5
    health.succeeded()
    assert health.down_since is None
    health.failed(StoreUnavailable("again"))
    assert (health.outages, health.failed_requests) == (2, 1)


async def test_the_redis_store_bounds_every_wait_by_its_timeout() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="p", timeout_s=1.5)  # never connects
    try:
        pool = store._redis.connection_pool
        assert pool.timeout == 1.5  # waiting for a free pooled connection
        kwargs = pool.connection_kwargs
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.5
        retry = kwargs["retry"]
        assert retry.get_retries() == 1  # once, and only on a broken connection:
        assert retry._supported_errors == (RedisConnectionError,)  # never after a timeout
        assert store.unavailable_errors == UNAVAILABLE_ERRORS
    finally:
        await store.close()
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        RedisStore("redis://127.0.0.1:1/0", timeout_s=0)


def test_a_sqlite_file_locked_by_another_program_answers_503_and_recovers(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program (a backup, an ``sqlite3`` shell) holding the write lock past the busy
    timeout makes writes answer 503 with Retry-After, logged once without a traceback; when it
    lets go, the same request succeeds."""
    import sqlite3

    from runcycles_server.stores.sqlite import SqliteStore

    path = tmp_path / "cycles.db"
    store = SqliteStore(path, busy_timeout_ms=50)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        app = create_app(store, admin_api_key=ADMIN, sweep_interval_s=None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            secret = await bootstrap_dev(store)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the other program's write lock
            headers = {"X-Cycles-API-Key": secret}
            try:
                locked = await client.post("/v1/decide", json=_decide_body(), headers=headers)
            finally:
                other.execute("ROLLBACK")
                other.close()
            after = await client.post("/v1/decide", json=_decide_body(), headers=headers)
        await store.close()
        return locked, after

    with caplog.at_level(logging.WARNING, logger="runcycles_server"):
        locked, after = asyncio.run(scenario())
    assert locked.status_code == 503, locked.text
    assert locked.headers["retry-after"] == "1"
    assert "locked" in caplog.text
    assert "Traceback" not in caplog.text
    assert all(record.exc_info is None for record in caplog.records)
    assert after.status_code == 200, after.text
