"""Acceptance: SIGKILL of the SQLite server mid-load loses no acknowledged commit.

Eight committer threads loop reserve -> commit against a SQLite server (single process, so
SIGKILL really kills the process that holds the database) and record every outcome. Once
enough commits are acknowledged the server is SIGKILLed and a new server is started on the
same database file, three times over (each restart under load again). Then:

* every commit acknowledged with 200 is ``COMMITTED`` with its amount;
* ``spent`` equals the acknowledged commits plus those "ambiguous" ones (sent, no answer)
  that the server had applied, before anything is retried;
* retrying each ambiguous commit with its idempotency key succeeds and applies it exactly
  once (a replay if it was applied, a first application if not); an ambiguous reserve retried
  with its key gives back the same reservation or creates it once;
* afterwards ``spent`` is exactly the sum of all commits, ``reserved`` exactly the estimates of
  the reservations still ACTIVE (the server lists exactly those), and
  ``allocated == remaining + spent + reserved + debt``.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runcycles import CyclesClient
from runcycles_server.testing import ProvisionedTenant, ServerProcess

pytestmark = pytest.mark.slow

U = "USD_MICROCENTS"
BUDGET = 10**12
ESTIMATE = 1_000
THREADS = 8
ACKED_PER_ROUND = 100
ROUNDS = 3


@dataclass
class Op:
    """One reserve -> commit attempt of a committer thread."""

    reserve_key: str
    commit_key: str
    actual: int
    reservation_id: str | None = None
    reserve: str = "pending"  # acked | ambiguous
    commit: str = "not-sent"  # acked | ambiguous | not-sent


@dataclass
class Load:
    """Everything the committers did, shared between threads."""

    ops: list[Op] = field(default_factory=list)
    acked_commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)


def reserve_body(tenant: str, key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": ESTIMATE},
        "ttl_ms": 600_000,
    }


def commit_body(op: Op) -> dict[str, Any]:
    return {"idempotency_key": op.commit_key, "actual": {"unit": U, "amount": op.actual}}


def committer(tenant: ProvisionedTenant, index: str, load: Load) -> None:
    """Reserve and commit until the server stops answering; record every outcome."""
    config = tenant.config(retry_enabled=False, connect_timeout=2.0, read_timeout=10.0)
    with CyclesClient(config) as client:
        for n in range(100_000):
            actual = 1 + (zlib.crc32(index.encode()) + n * 104729) % 997
            op = Op(f"r-{index}-{n}", f"c-{index}-{n}", actual=actual)
            with load.lock:
                load.ops.append(op)
            created = client.create_reservation(reserve_body(tenant.tenant_id, op.reserve_key))
            if created.is_transport_error:
                op.reserve = "ambiguous"
                return
            if created.status != 200:
                load.errors.append(f"reserve {created.status}: {created.content!r}")
                return
            op.reserve, op.reservation_id = "acked", created.data.reservation_id
            assert op.reservation_id is not None
            committed = client.commit_reservation(op.reservation_id, commit_body(op))
            if committed.is_transport_error:
                op.commit = "ambiguous"
                return
            if committed.status != 200:
                load.errors.append(f"commit {committed.status}: {committed.content!r}")
                return
            op.commit = "acked"
            with load.lock:
                load.acked_commits += 1


def balance(client: CyclesClient, tenant: str) -> dict[str, int]:
    (row,) = client.get_balances(tenant=tenant).data.balances
    amounts = {"remaining": row.remaining.amount}
    for name in ("reserved", "spent", "debt", "allocated"):
        value = getattr(row, name)
        amounts[name] = 0 if value is None else value.amount
    return amounts


def load_until_killed(
    server: ServerProcess, tenant: ProvisionedTenant, load: Load, round_: int
) -> None:
    """Run THREADS committers until ACKED_PER_ROUND more commits are acked, then SIGKILL."""
    target = load.acked_commits + ACKED_PER_ROUND
    threads = [
        threading.Thread(target=committer, args=(tenant, f"{round_}-{i}", load))
        for i in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while load.acked_commits < target and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL, mid-load
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert load.acked_commits >= target


def test_sigkill_mid_load_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    db_path = tmp_path / "crash.db"
    load = Load()
    tenant: ProvisionedTenant | None = None
    for round_ in range(ROUNDS):  # each round: a new server on the same file, killed mid-load
        server = ServerProcess.start(store="sqlite", db_path=db_path)
        try:
            if tenant is None:
                tenant = server.provision(budget=BUDGET)
            else:  # the tenant and its key live in the database
                tenant = ProvisionedTenant(server, tenant.tenant_id, tenant.api_key, tenant.key_id)
            load_until_killed(server, tenant, load, round_)
        finally:
            server.stop()
    assert tenant is not None
    assert load.errors == []
    assert db_path.exists()

    acked = [op for op in load.ops if op.commit == "acked"]
    ambiguous_commits = [op for op in load.ops if op.commit == "ambiguous"]
    ambiguous_reserves = [op for op in load.ops if op.reserve == "ambiguous"]
    # each thread stopped at its first unanswered request: one ambiguous op per thread
    assert len(ambiguous_commits) + len(ambiguous_reserves) == THREADS * ROUNDS

    with ServerProcess.start(store="sqlite", db_path=db_path) as second:
        survivor = ProvisionedTenant(second, tenant.tenant_id, tenant.api_key, tenant.key_id)
        with CyclesClient(survivor.config()) as client:
            # 1. every acknowledged commit survived, with its amount
            for op in acked:
                assert op.reservation_id is not None
                detail = client.get_reservation(op.reservation_id).data
                assert detail.status == "COMMITTED", op
                assert detail.committed is not None
                assert detail.committed.amount == op.actual, op

            # 2. before any retry: spent == acknowledged + the ambiguous ones actually applied
            applied = []
            for op in ambiguous_commits:
                assert op.reservation_id is not None
                status = client.get_reservation(op.reservation_id).data.status
                assert status in ("ACTIVE", "COMMITTED"), (op, status)
                if status == "COMMITTED":
                    applied.append(op)
            print(  # for the log: how the crash cut the load
                f"acked={len(acked)} ambiguous_commits={len(ambiguous_commits)} "
                f"(applied={len(applied)}) ambiguous_reserves={len(ambiguous_reserves)}"
            )
            row = balance(client, tenant.tenant_id)
            assert row["spent"] == sum(op.actual for op in acked + applied)

            # 3. retry every ambiguous request with its key: applied exactly once
            for op in ambiguous_commits:
                assert op.reservation_id is not None
                retried = client.commit_reservation(op.reservation_id, commit_body(op))
                assert retried.status == 200, retried.content
                assert retried.data.charged.amount == op.actual
            for op in ambiguous_reserves:
                retried_reserve = client.create_reservation(
                    reserve_body(tenant.tenant_id, op.reserve_key)
                )
                assert retried_reserve.status == 200, retried_reserve.content
                op.reservation_id = retried_reserve.data.reservation_id
                again = client.create_reservation(reserve_body(tenant.tenant_id, op.reserve_key))
                assert again.data.reservation_id == op.reservation_id  # a replay now

            # 4. the ledger adds up exactly
            all_commits = acked + ambiguous_commits
            still_active = {op.reservation_id for op in load.ops if op.commit == "not-sent"} - {
                None
            }
            listed_active = {
                r.reservation_id for r in client.iter_reservations(status="ACTIVE", limit=200)
            }
            assert listed_active == still_active
            row = balance(client, tenant.tenant_id)
            assert row["spent"] == sum(op.actual for op in all_commits)
            assert row["reserved"] == ESTIMATE * len(still_active)
            assert row["debt"] == 0
            assert row["allocated"] == BUDGET
            assert row["allocated"] == row["remaining"] + row["spent"] + row["reserved"]
            committed_rows = list(client.iter_reservations(status="COMMITTED", limit=200))
            assert len(committed_rows) == len(all_commits)
