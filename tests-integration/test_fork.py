"""A client inherited across ``fork()`` works in the child: it reserves, heartbeats and settles.

Pre-fork servers (gunicorn, Celery prefork, ``multiprocessing`` with ``fork``) build a client
in the parent and use it in every child. The child must not share the parent's connections
(two processes writing to one socket), and the parent's heartbeat thread, journal I/O thread
and event loops do not exist there. Each test:

1. uses the client in the parent (pool connected, heartbeat and settlement started);
2. forks; the child holds a reservation for several TTLs (only a working heartbeat keeps it
   alive: ``grace_period_ms=0``), commits it through the journal (``journal_fsync=True``, so
   the async settlement needs the journal's I/O thread), and reports back through a pipe;
3. meanwhile the parent keeps using the same client;
4. checks the ledger: exactly the parent's and the child's commits, nothing left reserved.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runcycles import AsyncCyclesClient, CyclesClient
from runcycles_server.testing import ProvisionedTenant, ServerProcess

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

TTL_MS = 2_000  # see test_guarded_e2e.py: the smallest lease the heartbeat can keep alive
HOLD_S = 5.0  # two and a half TTLs
FAST: dict[str, Any] = {"connect_timeout": 0.3, "read_timeout": 0.7, "journal_fsync": True}
OPTIONS: dict[str, Any] = {
    "action_kind": "llm.completion",
    "action_name": "forked",
    "ttl_ms": TTL_MS,
    "grace_period_ms": 0,
}


@pytest.fixture(scope="module")
def sqlite_server() -> Iterator[ServerProcess]:
    with ServerProcess.start(store="sqlite") as process:
        yield process


def _fork(child: Callable[[], dict[str, Any]]) -> tuple[int, int]:
    """Run ``child`` in a forked process; return its pid and the read end of its report."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
        os.close(read_fd)
        code = 0
        try:
            report = child()
        except BaseException:
            report = {"error": traceback.format_exc()}
            code = 1
        with os.fdopen(write_fd, "w") as out:
            out.write(json.dumps(report))
        sys.stdout.flush()
        os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _wait(pid: int, read_fd: int, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung (a dead heartbeat or journal thread?)")
        time.sleep(0.05)
    with os.fdopen(read_fd) as source:
        report: dict[str, Any] = json.loads(source.read() or "{}")
    assert os.waitstatus_to_exitcode(status) == 0, report.get("error", report)
    return report


def _spent(tenant: ProvisionedTenant) -> tuple[int, int]:
    with tenant.client(journal_enabled=False) as observer:
        rows = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data.balances
    (row,) = [r for r in rows if r.scope_path == f"tenant:{tenant.tenant_id}"]
    reserved = 0 if row.reserved is None else row.reserved.amount
    return (0 if row.spent is None else row.spent.amount), reserved


def _journal_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.json")) if root.exists() else []


def test_a_sync_client_works_in_a_forked_child(sqlite_server: ServerProcess, tmp_path: Path):
    tenant = sqlite_server.provision(budget=1_000_000)
    journal = tmp_path / "journal"
    client = CyclesClient(tenant.config(journal_dir=str(journal), **FAST))
    with client.reserve(estimate=1_000, **OPTIONS) as guard:  # pool, heartbeat, settlement
        guard.commit(100)
    parent_pool = client.http_client

    def child() -> dict[str, Any]:
        assert client.http_client is parent_pool  # nothing happens before the first use
        with client.reserve(estimate=5_000, **OPTIONS) as held:
            time.sleep(HOLD_S)
            result = held.commit(4_000)
        assert client.http_client is not parent_pool  # the parent's connections stay its own
        heartbeat_alive = client.heartbeat._thread is not None
        client.close()
        return {"outcome": result.outcome, "heartbeat_thread": heartbeat_alive}

    pid, read_fd = _fork(child)
    parent_commits = 0
    started = time.monotonic()
    while time.monotonic() - started < HOLD_S:  # the parent keeps using the same client
        with client.reserve(estimate=1_000, **OPTIONS) as guard:
            assert guard.commit(10).outcome == "committed"
        parent_commits += 1
        time.sleep(0.2)
    report = _wait(pid, read_fd)
    client.close()
    assert report == {"outcome": "committed", "heartbeat_thread": True}  # not an event
    assert parent_commits >= 5
    assert _spent(tenant) == (100 + 4_000 + 10 * parent_commits, 0)
    assert _journal_files(journal) == []


def test_an_async_client_works_in_a_forked_child(sqlite_server: ServerProcess, tmp_path: Path):
    tenant = sqlite_server.provision(budget=1_000_000)
    journal = tmp_path / "journal"
    client = AsyncCyclesClient(tenant.config(journal_dir=str(journal), **FAST))

    async def use_once(amount: int) -> str:
        async with client.reserve(estimate=1_000, **OPTIONS) as guard:
            return (await guard.commit(amount)).outcome

    loop = asyncio.new_event_loop()  # the parent's loop: pool, heartbeat task, settlement
    assert loop.run_until_complete(use_once(100)) == "committed"

    def child() -> dict[str, Any]:
        async def hold() -> dict[str, Any]:
            async with client.reserve(estimate=5_000, **OPTIONS) as held:
                await asyncio.sleep(HOLD_S)
                result = await held.commit(4_000)
            await client.aclose()
            return {"outcome": result.outcome}

        return asyncio.run(hold())

    pid, read_fd = _fork(child)
    report = _wait(pid, read_fd)
    assert loop.run_until_complete(use_once(10)) == "committed"  # the parent's pool still works
    loop.run_until_complete(client.aclose())
    loop.close()
    assert report == {"outcome": "committed"}  # kept alive by the child's heartbeat task
    assert _spent(tenant) == (100 + 4_000 + 10, 0)
    assert _journal_files(journal) == []
