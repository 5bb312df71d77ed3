"""``system.store_connection_lost``/``restored`` and ``system.high_latency`` through the app.

Outages are real: a SQLite file whose write lock another program holds past the busy timeout,
and a ``redis-server`` child process of this test that is killed and started again on its own
port (never the shared Redis). The lost event cannot be written while the store is down: it is
kept in memory with the time the outage began and written once the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.app import create_app, run_sweeper
from runcycles_server.cli import bootstrap_dev
from runcycles_server.events.latency import LatencyRule, LatencyWatch, percentile_ms
from runcycles_server.events.rates import DetectorConfig
from runcycles_server.stores.base import EventQuery, Store
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.testing import free_port

ADMIN = "admin-secret"
U = "USD_MICROCENTS"
START_MS = 1_800_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now_ms = START_MS

    def __call__(self) -> int:
        return self.now_ms


def _decide(n: int) -> dict[str, Any]:
    return {
        "idempotency_key": f"d{n}",
        "subject": {"tenant": "demo"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": 1},
    }


async def _system_events(client: httpx.AsyncClient, prefix: str) -> list[dict[str, Any]]:
    response = await client.get(
        "/v1/admin/events",
        params={"tenant_id": "__system__", "category": "system"},
        headers={"X-Admin-API-Key": ADMIN},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    schema_validator("EventListResponse", EXTENDED_ADMIN).validate(body)
    found = [e for e in reversed(body["events"]) if e["event_type"].startswith(prefix)]
    for event in found:
        schema_validator("EventDataSystem", EXTENDED_ADMIN).validate(event["data"])
    return found


def _check_outage_pair(found: list[dict[str, Any]], began_ms: int, ended_ms: int) -> None:
    assert [e["event_type"] for e in found] == [
        "system.store_connection_lost",
        "system.store_connection_restored",
    ]
    lost, restored = found
    # written after the outage, stamped with when each transition happened
    assert lost["timestamp"] == _iso(began_ms)
    assert restored["timestamp"] == _iso(ended_ms)
    assert lost["correlation_id"] == restored["correlation_id"]
    assert lost["data"]["severity"] == "critical"
    assert restored["data"]["severity"] == "info"
    assert restored["data"]["details"]["outage_ms"] >= 0
    assert restored["data"]["details"]["failed_requests"] >= 3
    assert lost["actor"] == {"type": "system"}


def _iso(ms: int) -> str:
    from runcycles_server.governance.timestamps import iso

    return iso(ms)


async def _outage_scenario(
    store: Store,
    clock: Clock,
    go_down: Any,
    come_back: Any,
) -> tuple[list[dict[str, Any]], int, int]:
    app = create_app(store, admin_api_key=ADMIN, sweep_interval_s=None, close_store=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        try:
            return await _outage_steps(app, client, store, clock, go_down, come_back)
        finally:
            await store.close()


async def _outage_steps(
    app: Any, client: httpx.AsyncClient, store: Store, clock: Clock, go_down: Any, come_back: Any
) -> tuple[list[dict[str, Any]], int, int]:
    key = await bootstrap_dev(store)
    headers = {"X-Cycles-API-Key": key}
    assert (await client.post("/v1/decide", headers=headers, json=_decide(0))).is_success
    await go_down()
    began = clock.now_ms
    for n in range(1, 4):  # three failed requests: one outage, one event
        failed = await client.post("/v1/decide", headers=headers, json=_decide(n))
        assert failed.status_code == 503, failed.text
        clock.now_ms += 1_000
    await come_back()
    clock.now_ms += 10_000
    ended = clock.now_ms
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    health = app.state.store_health
    if not health.reads_prove_writes:  # SQLite: a read does not prove the lock is gone
        assert health.down_since is not None
        sweeper = asyncio.create_task(  # the sweep's purge round writes: it ends the outage
            run_sweeper(store, 0.01, retention_ms=None, purge_every_s=0.01, health=health)
        )
        try:
            for _ in range(500):
                await asyncio.sleep(0.01)
                if health.down_since is None and not health.pending:
                    break
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
    assert health.down_since is None
    clock.now_ms += 5_000
    await app.state.monitor.tick()  # writes the pending pair
    health = app.state.store_health
    assert health.outages == 1
    assert health.pending == []
    found = await _system_events(client, "system.store_connection")
    assert (await client.post("/v1/decide", headers=headers, json=_decide(9))).is_success
    await app.state.monitor.tick()  # nothing more to write
    assert await _system_events(client, "system.store_connection") == found
    return found, began, ended


def test_sqlite_outage_is_one_lost_and_one_restored_event(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "cycles.db"
    store = SqliteStore(path, busy_timeout_ms=50, clock=clock)
    other = sqlite3.connect(path, isolation_level=None)

    async def go_down() -> None:
        other.execute("BEGIN IMMEDIATE")  # another program's write lock

    async def come_back() -> None:
        other.execute("ROLLBACK")

    try:
        found, began, ended = asyncio.run(_outage_scenario(store, clock, go_down, come_back))
    finally:
        other.close()
    _check_outage_pair(found, began, ended)
    assert found[0]["data"]["details"]["store"] == "SqliteStore"
    assert "locked" in found[0]["data"]["details"]["error"]


class OwnRedis:
    """A ``redis-server`` of this test alone (its own port, nothing persisted)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(
            ["redis-server", *args, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if "PONG" in ping.stdout:
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
        if os.environ.get("CYCLES_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.mark.redis
def test_redis_outage_is_one_lost_and_one_restored_event(own_redis: OwnRedis) -> None:
    from runcycles_server.stores.redis import RedisStore

    clock = Clock()
    store = RedisStore(own_redis.url, prefix="sysevt", timeout_s=0.5, clock=clock)

    async def go_down() -> None:
        own_redis.kill()

    async def come_back() -> None:
        own_redis.start()  # same port, empty: what is written after the outage lands there

    found, began, ended = asyncio.run(_outage_scenario(store, clock, go_down, come_back))
    _check_outage_pair(found, began, ended)
    assert found[0]["data"]["details"]["store"] == "RedisStore"


# --------------------------------------------------------------------------------------------
# system.high_latency


def test_latency_histogram_percentiles_are_within_five_percent() -> None:
    watch = LatencyWatch()
    for ms in range(1, 101):  # 1 ms .. 100 ms
        watch.observe(ms / 1000)
    counts = watch.take()
    assert sum(counts) == 100
    assert sum(watch.take()) == 0
    p95 = percentile_ms(counts, 0.95)
    p50 = percentile_ms(counts, 0.5)
    assert p95 is not None
    assert 95 <= p95 <= 95 * 1.05
    assert p50 is not None
    assert 50 <= p50 <= 50 * 1.05
    assert percentile_ms([0] * 10, 0.95) is None
    watch.observe(1e-9)  # below a microsecond and past the last bucket: counted, not lost
    watch.observe(10_000.0)
    assert sum(watch.take()) == 2


def test_latency_rule_fires_on_the_crossing_only_and_again_after_recovery() -> None:
    rule = LatencyRule(threshold_ms=50, window_ms=10_000, fraction=0.95, min_samples=5)

    def tick(at_s: int, ms: float, n: int = 10) -> Any:
        watch = LatencyWatch()
        for _ in range(n):
            watch.observe(ms / 1000)
        rule.add(at_s * 1000, watch.take())
        return rule.judge()[0]

    assert tick(0, 5) is None  # fast
    crossing = tick(5, 200, 200)  # the window's p95 is now ~200 ms
    assert crossing is not None
    details = crossing.data["details"]
    assert details["percentile"] == "p95"
    assert 200 <= details["latency_ms"] <= 210
    assert details["threshold_ms"] == 50
    assert details["sample_count"] == 210
    assert tick(10, 200, 200) is None  # still high: no second event
    assert tick(25, 5) is None
    assert not rule.high
    assert tick(30, 200, 200) is not None  # high again: a new crossing
    assert tick(35, 200, 1) is None  # no new judgement below min_samples... still high anyway
    small = LatencyRule(threshold_ms=1, window_ms=10_000, fraction=0.95, min_samples=50)
    small.add(0, [5] * 5)
    assert small.judge() == (None, None)  # too few requests: no judgement


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_high_latency_event_through_the_app(backend: str, tmp_path: Path) -> None:
    """A threshold below any real request time: the first tick with enough runtime requests
    records one ``system.high_latency``; later slow ticks record nothing more; admin and probe
    requests do not count."""
    clock = Clock()
    detectors = DetectorConfig(latency_threshold_ms=0.001, latency_min_samples=5)

    async def scenario(store: Store) -> list[dict[str, Any]]:
        app = create_app(store, admin_api_key=ADMIN, sweep_interval_s=None, detectors=detectors)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            key = await bootstrap_dev(store)
            headers = {"X-Cycles-API-Key": key}
            monitor = app.state.monitor
            for _ in range(10):
                await client.get("/healthz")
                await client.get("/v1/admin/tenants", headers={"X-Admin-API-Key": ADMIN})
            assert [e.event_type for e in await monitor.tick()] == []  # nothing timed yet
            for n in range(6):
                assert (
                    await client.post("/v1/decide", headers=headers, json=_decide(n))
                ).is_success
            clock.now_ms += 5_000
            first = [e.event_type for e in await monitor.tick()]
            assert first == ["system.high_latency"]
            for n in range(6, 12):
                await client.post("/v1/decide", headers=headers, json=_decide(n))
            clock.now_ms += 5_000
            assert [e.event_type for e in await monitor.tick()] == []  # still high: once
            return await _system_events(client, "system.high_latency")

    if backend == "sqlite":
        store: Store = SqliteStore(tmp_path / "cycles.db", clock=clock)
    else:
        from runcycles_server.stores.redis_testing import redis_store_for_tests_sync

        with redis_store_for_tests_sync(clock=clock) as redis_store:
            found = asyncio.run(scenario(redis_store))
        _check_latency(found)
        return
    found = asyncio.run(scenario(store))
    _check_latency(found)


def _check_latency(found: list[dict[str, Any]]) -> None:
    assert len(found) == 1
    data = found[0]["data"]
    assert data["component"] == "runtime_api"
    assert data["severity"] == "warning"
    details = data["details"]
    assert details["percentile"] == "p95"
    assert details["threshold_ms"] == 0.001
    assert details["latency_ms"] > 0.001
    assert details["sample_count"] == 6  # the six decides; probes and admin calls not timed
    assert details["window_seconds"] == 60
    assert found[0]["source"] == "anomaly-detector"


def test_latency_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="latency_threshold_ms must be > 0"):
        DetectorConfig.parse('{"latency_threshold_ms": 0}')
    with pytest.raises(ValueError, match=r"latency_percentile must be 0\.5 to 0\.999"):
        DetectorConfig.parse('{"latency_percentile": 1}')
    with pytest.raises(ValueError, match="latency_window_seconds must be 10 to 3600"):
        DetectorConfig.parse('{"latency_window_seconds": 5}')
    parsed = DetectorConfig.parse('{"latency_threshold_ms": 250, "latency_percentile": 0.99}')
    assert parsed is not None
    assert parsed.latency_threshold_ms == 250


def test_the_sweeper_writes_the_outage_events_once_the_store_is_back(tmp_path: Path) -> None:
    """No request and no monitor: the expiry sweep, which ends the outage, writes them."""
    from runcycles_server.health import StoreHealth

    clock = Clock()
    path = tmp_path / "cycles.db"
    store = SqliteStore(path, busy_timeout_ms=20, clock=clock)
    other = sqlite3.connect(path, isolation_level=None)

    async def scenario() -> list[Any]:
        await bootstrap_dev(store)
        health = StoreHealth(store)
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(
            run_sweeper(store, 0.01, retention_ms=None, purge_every_s=0.02, health=health)
        )
        try:
            for _ in range(500):  # a sweep that needs the write lock fails: the outage begins
                await asyncio.sleep(0.01)
                if health.outages:
                    break
            assert health.outages == 1
            assert [e.event_type for e in health.pending] == ["system.store_connection_lost"]
            await asyncio.sleep(0.1)  # more failed sweeps: still one outage, one event
            assert len(health.pending) == 1
            other.execute("ROLLBACK")
            for _ in range(500):
                await asyncio.sleep(0.01)
                if not health.pending:
                    break
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        page = await store.list_events(EventQuery("__system__", category="system", limit=10))
        await store.close()
        return list(reversed(page.items))

    try:
        found = asyncio.run(scenario())
    finally:
        other.close()
    assert [e.event_type for e in found] == [
        "system.store_connection_lost",
        "system.store_connection_restored",
    ]
