"""Retention: the sweeper deletes finished reservations, their replays and old events in batches.

SQLite and the in-memory store implement ``purge_finished``; Redis expires the same data by key
TTL and is covered by its own tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from runcycles_server.app import create_app, purge_old_data, run_sweeper
from runcycles_server.ledger import DAY_MS
from runcycles_server.stores.base import RetentionPurger, RowStore, Store
from runcycles_server.stores.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteStore

if TYPE_CHECKING:
    from conftest import Api, FakeClock, SyncClient

U = "USD_MICROCENTS"
WEEK_MS = 7 * DAY_MS

pytestmark = pytest.mark.parametrize("store", ["sqlite", "memory"], indirect=True)


def reserve(api: Api, key: str, idem: str, ttl_ms: int = 60_000) -> str:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt"},
        "estimate": {"unit": U, "amount": 100},
        "ttl_ms": ttl_ms,
        "grace_period_ms": 1_000,
    }
    response = api.post(key, "/v1/reservations", body)
    assert response.status_code == 200, response.text
    return str(response.json()["reservation_id"])


def settle(api: Api, key: str, rid: str, action: str, body: dict[str, Any]) -> Any:
    response = api.post(key, f"/v1/reservations/{rid}/{action}", body)
    assert response.status_code == 200, response.text
    return response.json()


def event(api: Api, key: str, idem: str) -> None:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": "acme"},
        "action": {"kind": "tool.search", "name": "web"},
        "actual": {"unit": U, "amount": 5},
    }
    assert api.post(key, "/v1/events", body).status_code == 201


def reservation_ids(store: Store) -> set[str]:
    if isinstance(store, SqliteStore):
        return {r[0] for r in store._conn.execute("SELECT reservation_id FROM reservations")}
    return set(store.reservations)  # type: ignore[attr-defined]


def event_count(store: Store) -> int:
    if isinstance(store, SqliteStore):
        return int(store._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    return len(store.events)  # type: ignore[attr-defined]


def ledger_state(api: Api) -> list[tuple[int, int, int, int]]:
    rows = api.admin("GET", "/v1/admin/budgets", params={"tenant_id": "acme"})["ledgers"]
    return [
        (r["allocated"]["amount"], r["remaining"]["amount"], r["reserved"]["amount"],
         r["spent"]["amount"])
        for r in rows
    ]  # fmt: skip


def test_finished_reservations_events_and_their_replays_go_after_the_retention(
    api: Api, store: Store, clock: FakeClock, client: SyncClient
) -> None:
    assert isinstance(store, RetentionPurger)
    assert isinstance(store, RowStore)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    committed = reserve(api, key, "r-commit")
    settle(api, key, committed, "extend", {"idempotency_key": "x1", "extend_by_ms": 1_000})
    commit_body = {"idempotency_key": "c1", "actual": {"unit": U, "amount": 40}}
    first_commit = settle(api, key, committed, "commit", commit_body)
    released = reserve(api, key, "r-release")
    settle(api, key, released, "release", {"idempotency_key": "l1"})
    expired = reserve(api, key, "r-expire", ttl_ms=1_000)
    event(api, key, "ev1")
    clock.advance(3_000)
    assert client.run(store.expire_due()) == 1
    active = reserve(api, key, "r-active", ttl_ms=60_000)  # left ACTIVE, never swept
    before = ledger_state(api)

    clock.advance(WEEK_MS - 120_000)  # just inside the retention of every finished one
    assert client.run(store.purge_finished(WEEK_MS)) == 0
    assert settle(api, key, committed, "commit", commit_body) == first_commit  # replay

    clock.advance(200_000)  # every deadline is now more than a week old
    # 3 reservations, 1 POST /v1/events record and 4 of the event plane (tenant, key and
    # budget created, reservation expired); the ones recorded since are younger
    log = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": "acme"})["events"]
    assert client.run(store.purge_finished(WEEK_MS)) == 3 + 1 + 4
    assert reservation_ids(store) == {active}  # ACTIVE survives even past its deadline
    assert event_count(store) == 0
    left = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": "acme"})["events"]
    assert [e["event_id"] for e in left] == [e["event_id"] for e in log[:-4]]
    for tenant, endpoint, idem in [
        ("acme", "reserve", "r-commit"),
        ("acme", f"extend:{committed}", "x1"),
        ("acme", f"commit:{committed}", "c1"),
        ("acme", f"release:{released}", "l1"),
        ("acme", "reserve", "r-expire"),
    ]:
        assert store._get_idem(tenant, endpoint, idem) is None, endpoint
    assert store._get_idem("acme", "reserve", "r-active") is not None
    assert ledger_state(api) == before  # money is never touched
    gone = api.post(key, f"/v1/reservations/{committed}/commit", commit_body)
    assert (gone.status_code, gone.json()["error"]) == (404, "NOT_FOUND")
    assert client.run(store.purge_finished(WEEK_MS)) == 0
    assert expired not in reservation_ids(store)


def test_purge_runs_in_batches_of_the_given_size(
    api: Api, store: Store, clock: FakeClock, client: SyncClient
) -> None:
    assert isinstance(store, RetentionPurger)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    for n in range(7):
        rid = reserve(api, key, f"r{n}")
        settle(api, key, rid, "release", {"idempotency_key": f"l{n}"})
    clock.advance(WEEK_MS + 120_000)
    # 7 reservations, and 3 event-log entries (tenant, key and budget created) in the first
    assert [client.run(store.purge_finished(WEEK_MS, 3)) for _ in range(4)] == [3 + 3, 3, 1, 0]
    assert reservation_ids(store) == set()


def test_purge_old_data_drains_idempotency_then_finished_rows(
    api: Api, store: Store, clock: FakeClock, client: SyncClient
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    for n in range(5):
        event(api, key, f"ev{n}")  # event replays are kept 7 days, the rows `retention`
    clock.advance(8 * DAY_MS)
    # 5 event idempotency records (past their 7 days) + 5 event rows + 3 event-log entries
    # (tenant, key and budget created), 2 of each kind per transaction
    assert client.run(purge_old_data(store, WEEK_MS, batch=2)) == 13
    assert event_count(store) == 0
    assert client.run(purge_old_data(store, None)) == 0


def test_without_retention_finished_rows_are_kept(
    api: Api, store: Store, clock: FakeClock, client: SyncClient
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    rid = reserve(api, key, "r")
    settle(api, key, rid, "release", {"idempotency_key": "l"})
    clock.advance(400 * DAY_MS)
    client.run(purge_old_data(store, None))
    assert reservation_ids(store) == {rid}


def test_the_sweeper_purges_on_its_own(
    api: Api, store: Store, clock: FakeClock, client: SyncClient
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    rid = reserve(api, key, "r")
    settle(api, key, rid, "release", {"idempotency_key": "l"})
    clock.advance(2 * DAY_MS)

    async def sweep_until_gone() -> None:
        task = asyncio.create_task(
            run_sweeper(store, 0.001, retention_ms=DAY_MS, purge_every_s=0.002)
        )
        try:
            for _ in range(5_000):  # a bounded wait, not a speed check
                if not reservation_ids(store):
                    return
                await asyncio.sleep(0.001)
            raise AssertionError("the sweeper did not purge the finished reservation")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    client.run(sweep_until_gone())


@pytest.mark.parametrize("days", [0, 0.5, -1])
def test_create_app_refuses_a_retention_under_one_day(store: Store, days: float) -> None:
    with pytest.raises(ValueError, match="retention_days must be at least 1"):
        create_app(store, retention_days=days)


def test_an_older_sqlite_file_gets_the_retention_indexes(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)  # a file exactly as schema 1 left it
    conn.executescript(_MIGRATIONS[1])
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER "
        "NOT NULL)"
    )
    conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
    conn.commit()
    conn.close()

    upgraded = SqliteStore(path)
    try:
        assert upgraded.schema_version() == SCHEMA_VERSION
        names = {r[0] for r in upgraded._conn.execute("SELECT name FROM sqlite_master")}
        assert {"reservations_finished", "events_created"} <= names
        plan = upgraded._conn.execute(
            "EXPLAIN QUERY PLAN SELECT reservation_id FROM reservations "
            "WHERE status != 'ACTIVE' AND deadline_ms < 5 LIMIT 10"
        ).fetchall()
        assert "reservations_finished" in str(plan)
    finally:
        asyncio.run(upgraded.close())
