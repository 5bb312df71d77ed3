"""SQLite-specific behaviour: migrations, durability across connections, multi-writer safety."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from runcycles.models import CommitRequest, ReleaseRequest, ReservationCreateRequest
from runcycles_server import ledger
from runcycles_server.ledger import BudgetRow, LedgerError, TenantRow
from runcycles_server.stores.sqlite import MMAP_BYTES, SCHEMA_VERSION, SqliteStore

U = "USD_MICROCENTS"


def reserve_request(key: str, amount: int, agent: str = "bot") -> ReservationCreateRequest:
    return ReservationCreateRequest.model_validate(
        {
            "idempotency_key": key,
            "subject": {"tenant": "acme", "agent": agent},
            "action": {"kind": "k", "name": "n"},
            "estimate": {"unit": U, "amount": amount},
            "overage_policy": "REJECT",
        }
    )


def setup(path: Path, allocated: int) -> None:
    store = SqliteStore(path)

    async def go() -> None:
        await store.create_tenant(TenantRow("acme", "Acme"))
        for scope in ("tenant:acme", "tenant:acme/agent:bot"):
            await store.create_budget(
                BudgetRow(scope, U, "acme", allocated, allocated, ledger_id=scope)
            )
        await store.close()

    asyncio.run(go())


def test_migrations_are_recorded_and_not_rerun(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    first = SqliteStore(path)
    assert first.schema_version() == SCHEMA_VERSION
    asyncio.run(first.close())
    second = SqliteStore(path)  # reopening must not fail on existing tables
    assert second.schema_version() == SCHEMA_VERSION
    asyncio.run(second.close())
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this server supports"):
        SqliteStore(path)


def test_wal_mode_and_default_location_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "c.db"
    store = SqliteStore(path, synchronous="FULL")
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    asyncio.run(store.close())


def test_pages_are_memory_mapped_only_for_a_file_shared_by_processes(tmp_path: Path) -> None:
    lone = SqliteStore(tmp_path / "lone.db")
    shared = SqliteStore(tmp_path / "shared.db", mmap=True)
    try:
        assert lone._conn.execute("PRAGMA mmap_size").fetchone()[0] == 0
        assert shared._conn.execute("PRAGMA mmap_size").fetchone()[0] == MMAP_BYTES
    finally:
        asyncio.run(lone.close())
        asyncio.run(shared.close())


def test_acknowledged_writes_are_visible_to_a_new_connection(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    setup(path, 1000)
    writer = SqliteStore(path)
    outcome = asyncio.run(writer.reserve("acme", reserve_request("a", 10), "h"))
    rid = json.loads(outcome.body)["reservation_id"]
    # no close(): a crashed process leaves its WAL behind; a new process must still see the row
    reader = SqliteStore(path)
    res = asyncio.run(reader.get_reservation(rid))
    assert res is not None
    assert res.estimate == 10
    budget = asyncio.run(reader.get_budget("tenant:acme", U))
    assert budget is not None
    assert budget.reserved == 10


def test_failed_operation_leaves_no_partial_write(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    setup(path, 100)
    store = SqliteStore(path)
    with pytest.raises(LedgerError):
        asyncio.run(store.reserve("acme", reserve_request("big", 101), "h"))
    assert store.count_rows("reservations") == 0
    assert store.count_rows("idempotency") == 0
    budget = asyncio.run(store.get_budget("tenant:acme", U))
    assert budget is not None
    assert budget.reserved == 0
    asyncio.run(store.close())


def test_many_writers_on_one_file_never_oversubscribe(tmp_path: Path) -> None:
    """Eight connections (as eight server processes would) race reserve/commit/release."""
    path = tmp_path / "c.db"
    allocated = 5_000
    setup(path, allocated)
    outcomes: list[str] = []
    charged: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        store = SqliteStore(path, busy_timeout_ms=30_000)

        async def run() -> None:
            for i in range(40):
                key = f"w{n}-{i}"
                try:
                    out = await store.reserve("acme", reserve_request(key, 100 + i), "h" + key)
                except LedgerError as exc:
                    with lock:
                        outcomes.append(exc.code)
                    continue
                rid = json.loads(out.body)["reservation_id"]
                if i % 3 == 0:
                    await store.release("acme", rid, ReleaseRequest(idempotency_key="r"), "r")
                    with lock:
                        outcomes.append("RELEASED")
                    continue
                actual = 50 + i
                commit = CommitRequest.model_validate(
                    {"idempotency_key": "c", "actual": {"unit": U, "amount": actual}}
                )
                done = await store.commit("acme", rid, commit, "c")
                with lock:
                    outcomes.append("COMMITTED")
                    charged.append(json.loads(done.body)["charged"]["amount"])
            await store.close()

        asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert set(outcomes) <= {"COMMITTED", "RELEASED", "BUDGET_EXCEEDED"}
    assert "BUDGET_EXCEEDED" in outcomes  # the budget really ran out under contention
    check = SqliteStore(path)
    for scope in ("tenant:acme", "tenant:acme/agent:bot"):
        row = asyncio.run(check.get_budget(scope, U))
        assert row is not None
        assert row.remaining == row.allocated - row.spent - row.reserved - row.debt
        assert (row.reserved, row.debt) == (0, 0)
        assert row.spent == sum(charged) <= allocated
    assert check.count_rows("reservations") == outcomes.count("COMMITTED") + outcomes.count(
        "RELEASED"
    )
    asyncio.run(check.close())


def test_expire_due_is_idempotent_and_purge_drops_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    setup(path, 1000)
    now = [1_000_000]
    store = SqliteStore(path, clock=lambda: now[0])
    req = reserve_request("a", 10).model_copy(update={"ttl_ms": 1000, "grace_period_ms": 0})
    asyncio.run(store.reserve("acme", req, "h"))
    now[0] += 1001
    assert asyncio.run(store.expire_due()) == 1
    assert asyncio.run(store.expire_due()) == 0
    budget: Any = asyncio.run(store.get_budget("tenant:acme", U))
    assert (budget.reserved, budget.remaining) == (0, 1000)
    now[0] += ledger.RETAIN_RESERVE_MIN_MS + 1
    assert asyncio.run(store.purge_idempotency()) == 1
    assert store.count_rows("idempotency") == 0
    asyncio.run(store.close())


def test_a_failed_commit_rolls_back_and_the_store_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    setup(path, 1000)
    store = SqliteStore(path)
    real_conn = store._conn

    class FailingCommit:
        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return real_conn.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real_conn, name)

    store._conn = FailingCommit()  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        asyncio.run(store.reserve("acme", reserve_request("a", 10), "h"))
    store._conn = real_conn
    assert not real_conn.in_transaction
    assert store.count_rows("reservations") == 0
    out = asyncio.run(store.reserve("acme", reserve_request("a", 10), "h"))
    assert out.status_code == 200
    asyncio.run(store.close())
