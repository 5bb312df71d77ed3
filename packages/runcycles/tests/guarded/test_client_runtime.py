"""A client owns what it starts: heartbeat, settlement, tenant, replay; close() stops it all."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

import pytest

from runcycles import reserve
from runcycles._autoreplay import wait_idle
from runcycles._base_client import _closers
from runcycles.journal import _journal_executor

OPTIONS: dict[str, Any] = {"estimate": 500, "action_kind": "llm.completion", "action_name": "m"}


def _runcycles_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("runcycles-"))


def _settle_background(timeout_s: float = 5.0) -> None:
    """Let the process-wide helpers end: the replay and journal I/O threads end when idle."""
    assert wait_idle(timeout_s)
    assert _journal_executor().idle(timeout_s)


def test_close_stops_the_heartbeat_and_leaves_no_thread(fake: Any) -> None:
    client = fake.sync_client()
    guard = reserve(client, **OPTIONS).start()
    assert "runcycles-heartbeat" in _runcycles_threads()
    assert client.heartbeat is client.heartbeat  # one scheduler per client
    assert len(client.heartbeat) == 1
    client.close()
    _settle_background()
    assert _runcycles_threads() == []
    assert guard.abandon()  # nothing left to extend it: its lease ends on the server


def test_each_client_has_its_own_heartbeat_and_settlement(fake: Any) -> None:
    first, second = fake.sync_client(), fake.sync_client()
    assert first.heartbeat is not second.heartbeat
    assert first.settlement is not second.settlement
    assert first.settlement.journal is not None
    first.close()
    second.close()


def test_the_tenant_is_discovered_once_per_client(fake: Any) -> None:
    client = fake.sync_client(tenant=None)
    assert client.discover_tenant() == "acme"
    assert client.discover_tenant() == "acme"
    assert fake.paths().count("GET /v1/reservations") == 1
    assert client.api_key_tenant == "acme"
    other = fake.sync_client(tenant=None)
    assert other.api_key_tenant is None  # per client, not per process
    client.close()
    other.close()


async def test_aclose_stops_the_heartbeat_task(fake: Any) -> None:
    client = fake.async_client()
    guard = await reserve(client, **OPTIONS).start()
    scheduler = client.heartbeat
    assert scheduler.background_tasks == 1
    await client.aclose()
    assert scheduler.background_tasks == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert guard.abandon()


async def test_async_discover_tenant(fake: Any) -> None:
    client = fake.async_client(tenant=None)
    assert await client.discover_tenant() == "acme"
    assert await client.discover_tenant() == "acme"
    assert fake.paths().count("GET /v1/reservations") == 1
    await client.aclose()


async def test_a_heartbeat_needs_a_running_loop(fake: Any) -> None:
    client = fake.async_client()

    def outside() -> None:
        with pytest.raises(RuntimeError, match="no running event loop"):
            _ = client.heartbeat

    await asyncio.to_thread(outside)
    await client.aclose()


def test_the_journal_worker_ends_when_idle_and_starts_again() -> None:
    worker = _journal_executor()
    assert worker.submit(lambda: 1).result(5) == 1
    assert worker.idle(5)
    assert "runcycles-journal" not in _runcycles_threads()
    # a new thread picks the next job up
    assert worker.submit(lambda: threading.current_thread().name).result(5) == "runcycles-journal"


def test_the_journal_worker_runs_jobs_in_order() -> None:
    worker = _journal_executor()
    seen: list[int] = []
    futures = [worker.submit(seen.append, n) for n in range(200)]
    for future in futures:
        future.result(5)
    assert seen == list(range(200))


async def test_an_async_client_dropped_without_aclose_is_collectable(fake: Any) -> None:
    client = fake.async_client()
    (await client.list_reservations(limit=1)).raise_for_error()
    ref = weakref.ref(client)
    del client
    gc.collect()
    assert ref() is None  # its loop-shutdown closer does not keep it alive


async def test_aclose_forgets_its_loop_closer(fake: Any) -> None:
    client = fake.async_client()
    (await client.list_reservations(limit=1)).raise_for_error()
    closer = client._loop_closer
    assert closer in _closers
    await client.aclose()
    assert closer not in _closers
