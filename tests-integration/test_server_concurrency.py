"""Acceptance: 200 concurrent reservers against one budget never oversubscribe it.

The budget fits exactly ``K = 137`` reservations of ``ESTIMATE`` (with a remainder smaller
than one estimate). Every run fires 200 reservations at once and checks that exactly ``K``
are granted, every other one is answered ``409 BUDGET_EXCEEDED``, and the ledger holds
exactly ``K * ESTIMATE`` reserved. Then every grant is committed or released (concurrently
too) and the ledger invariant ``allocated == remaining + spent + reserved + debt`` is checked
with the exact expected ``spent``.

Reservers are threads (SQLite server with two workers), OS processes (8 x 25), coroutines
on one ``AsyncCyclesClient`` (both stores), and threads split over two separate Redis-backed
server processes sharing one key prefix.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from runcycles import AsyncCyclesClient, CyclesClient
from runcycles_server.governance import policy_from_create
from runcycles_server.stores.redis import RedisStore
from runcycles_server.stores.redis_testing import require_redis
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.testing import ProvisionedTenant, ServerProcess

pytestmark = pytest.mark.slow

U = "USD_MICROCENTS"
RESERVERS = 200
K = 137
ESTIMATE = 7
BUDGET = K * ESTIMATE + ESTIMATE - 1  # one unit short of a 138th reservation
ACTUAL = 5  # committed per grant (under the estimate)
REPO = Path(__file__).resolve().parent


def reserve_body(tenant: str, key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": ESTIMATE},
    }


def ledger(tenant: ProvisionedTenant, server: ServerProcess | None = None) -> dict[str, int]:
    """The tenant budget's amounts, read through ``server`` (default: the tenant's own)."""
    target = server or tenant.server
    with CyclesClient(tenant.config(base_url=target.base_url)) as client:
        (row,) = client.get_balances(tenant=tenant.tenant_id).data.balances
    amounts = {"remaining": row.remaining.amount}
    for name in ("reserved", "spent", "debt", "allocated"):
        value = getattr(row, name)
        amounts[name] = 0 if value is None else value.amount
    return amounts


def assert_exactly_k_granted(outcomes: list[tuple[int, str | None, str | None]]) -> list[str]:
    """Check the 200 outcomes; return the granted reservation ids."""
    assert len(outcomes) == RESERVERS
    granted = [rid for status, _, rid in outcomes if status == 200]
    refused = [(status, code) for status, code, _ in outcomes if status != 200]
    assert len(granted) == K, f"{len(granted)} granted; refusals: {sorted(set(refused))}"
    assert all(rid for rid in granted)
    assert len(set(granted)) == K
    assert set(refused) == {(409, "BUDGET_EXCEEDED")}
    return [rid for rid in granted if rid]


def assert_fully_reserved(tenant: ProvisionedTenant) -> None:
    row = ledger(tenant)
    assert row == {
        "allocated": BUDGET,
        "remaining": BUDGET - K * ESTIMATE,
        "reserved": K * ESTIMATE,
        "spent": 0,
        "debt": 0,
    }


def settle_all(tenant: ProvisionedTenant, granted: list[str]) -> None:
    """Commit ACTUAL on even grants and release the odd ones, 32 at a time; check the ledger."""
    committed = granted[::2]
    released = granted[1::2]
    with CyclesClient(tenant.config(read_timeout=60.0)) as client:

        def commit(rid: str) -> int:
            body = {"idempotency_key": f"c-{rid}", "actual": {"unit": U, "amount": ACTUAL}}
            return client.commit_reservation(rid, body).status

        def release(rid: str) -> int:
            return client.release_reservation(rid, {"idempotency_key": f"r-{rid}"}).status

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(commit, committed)) + list(pool.map(release, released))
    assert statuses == [200] * K
    row = ledger(tenant)
    spent = len(committed) * ACTUAL
    assert row == {
        "allocated": BUDGET,
        "remaining": BUDGET - spent,
        "reserved": 0,
        "spent": spent,
        "debt": 0,
    }
    assert row["allocated"] == row["remaining"] + row["spent"] + row["reserved"] + row["debt"]


def reserve_from_threads(
    tenants: list[ProvisionedTenant], count: int, prefix: str
) -> list[tuple[int, str | None, str | None]]:
    """``count`` threads, each with its own client, round-robin over ``tenants``' servers."""
    clients = [
        CyclesClient(tenants[i % len(tenants)].config(read_timeout=60.0)) for i in range(count)
    ]
    barrier = threading.Barrier(count)
    tenant_id = tenants[0].tenant_id

    def one(index: int) -> tuple[int, str | None, str | None]:
        barrier.wait()
        response = clients[index].create_reservation(reserve_body(tenant_id, f"{prefix}-{index}"))
        return (
            response.status,
            response.get_body_attribute("error"),
            response.get_body_attribute("reservation_id"),
        )

    try:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))
    finally:
        for client in clients:
            client.close()


# ------------------------------------------------------------------------------ SQLite


@pytest.fixture(scope="module")
def sqlite_two_workers() -> Iterator[ServerProcess]:
    with ServerProcess.start(store="sqlite", workers=2) as process:
        yield process


def test_200_threads_get_exactly_k_grants_on_sqlite(sqlite_two_workers: ServerProcess) -> None:
    tenant = sqlite_two_workers.provision(budget=BUDGET)
    granted = assert_exactly_k_granted(reserve_from_threads([tenant], RESERVERS, "thr"))
    assert_fully_reserved(tenant)
    settle_all(tenant, granted)


def test_8_processes_of_25_reservers_get_exactly_k_grants(
    sqlite_two_workers: ServerProcess,
) -> None:
    tenant = sqlite_two_workers.provision(budget=BUDGET)
    processes, per_process = 8, RESERVERS // 8
    start_at = time.time() + 4.0  # every process is up and waiting by then
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "reserver_process.py"),
                sqlite_two_workers.base_url,
                tenant.api_key,
                tenant.tenant_id,
                str(per_process),
                str(ESTIMATE),
                f"proc{p}",
                repr(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    outcomes: list[tuple[int, str | None, str | None]] = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outcomes += [(status, code, rid) for status, code, rid in json.loads(out)]
    granted = assert_exactly_k_granted(outcomes)
    assert_fully_reserved(tenant)
    settle_all(tenant, granted)


# ------------------------------------------------------------------------------ asyncio


async def test_200_coroutines_get_exactly_k_grants(server: ServerProcess) -> None:
    tenant = server.provision(budget=BUDGET)
    async with AsyncCyclesClient(tenant.config(read_timeout=60.0, max_connections=200)) as client:
        responses = await asyncio.gather(
            *(
                client.create_reservation(reserve_body(tenant.tenant_id, f"co-{i}"))
                for i in range(RESERVERS)
            )
        )
    outcomes = [
        (r.status, r.get_body_attribute("error"), r.get_body_attribute("reservation_id"))
        for r in responses
    ]
    granted = assert_exactly_k_granted(outcomes)
    assert_fully_reserved(tenant)
    settle_all(tenant, granted)


# ------------------------------------------------------------------------------ Redis x 2


@pytest.mark.redis
def test_two_redis_server_processes_share_one_budget_exactly() -> None:
    url = require_redis()
    with ServerProcess.start(store="redis", redis_url=url) as first:
        assert first.redis_prefix is not None
        with ServerProcess.start(
            store="redis", redis_url=url, redis_prefix=first.redis_prefix
        ) as second:
            on_first = first.provision(budget=BUDGET)
            # the same tenant, seen through the second process (same key, same prefix)
            on_second = ProvisionedTenant(
                server=second,
                tenant_id=on_first.tenant_id,
                api_key=on_first.api_key,
                key_id=on_first.key_id,
            )
            outcomes = reserve_from_threads([on_first, on_second], RESERVERS, "two")
            granted = assert_exactly_k_granted(outcomes)
            by_server = [sum(o[0] == 200 for o in outcomes[i::2]) for i in (0, 1)]
            assert min(by_server) > 0, by_server  # both processes granted some
            assert_fully_reserved(on_first)
            assert ledger(on_first, second) == ledger(on_first)
            # grants from both processes exist, and each is visible through the other one
            with CyclesClient(on_second.config()) as client:
                seen = {r.reservation_id for r in client.iter_reservations(limit=50)}
            assert seen >= set(granted)
            settle_all(on_first, granted)
            assert ledger(on_first, second) == ledger(on_first)


# ------------------------------------------------------------------------------ action quotas

QUOTA = 50


def add_quota_policy(store: Any, tenant_id: str) -> None:
    """A policy capping ``llm.completion`` (what reserve_body sends) at QUOTA a day."""

    async def create() -> None:
        row = policy_from_create(
            tenant_id,
            {
                "name": "quota",
                "scope_pattern": f"tenant:{tenant_id}",
                "action_quotas": [
                    {
                        "action_kind": "llm.completion",
                        "max_calls": QUOTA,
                        "window": "per_day_tumbling",
                    }
                ],
            },
            policy_id=store.new_policy_id(tenant_id),
            now_ms=store.clock(),
            registry=store.registry,
        )
        await store.create_policy(row)
        await store.close()

    asyncio.run(create())


def assert_exactly_quota_granted(outcomes: list[tuple[int, str | None, str | None]]) -> None:
    granted = [rid for status, _, rid in outcomes if status == 200]
    refused = {(status, code) for status, code, _ in outcomes if status != 200}
    assert len(granted) == QUOTA, f"{len(granted)} granted; refusals: {sorted(refused)}"
    assert refused == {(409, "ACTION_QUOTA_EXCEEDED")}


def test_two_redis_processes_grant_exactly_the_quota() -> None:
    url = require_redis()
    with ServerProcess.start(store="redis", redis_url=url) as first:
        assert first.redis_prefix is not None
        with ServerProcess.start(
            store="redis", redis_url=url, redis_prefix=first.redis_prefix
        ) as second:
            tenant = first.provision(budget=RESERVERS * ESTIMATE * 10)
            add_quota_policy(RedisStore(url, prefix=first.redis_prefix), tenant.tenant_id)
            on_second = ProvisionedTenant(
                server=second,
                tenant_id=tenant.tenant_id,
                api_key=tenant.api_key,
                key_id=tenant.key_id,
            )
            outcomes = reserve_from_threads([tenant, on_second], RESERVERS, "quota")
            assert_exactly_quota_granted(outcomes)
            assert ledger(tenant)["reserved"] == QUOTA * ESTIMATE  # denials held nothing


def test_two_sqlite_workers_grant_exactly_the_quota(tmp_path: Path) -> None:
    db = tmp_path / "cycles.db"
    with ServerProcess.start(store="sqlite", workers=2, db_path=db) as server:
        tenant = server.provision(budget=RESERVERS * ESTIMATE * 10)
        add_quota_policy(SqliteStore(db), tenant.tenant_id)
        outcomes = reserve_from_threads([tenant], RESERVERS, "quota")
        assert_exactly_quota_granted(outcomes)
        assert ledger(tenant)["reserved"] == QUOTA * ESTIMATE
