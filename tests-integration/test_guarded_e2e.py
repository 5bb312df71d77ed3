"""Guarded calls end to end: ``@cycles``, guards and stream reservations against a real server.

Every test runs against a SQLite and a Redis server process (the ``server`` fixture) and has
a sync and an async twin. Each provisions its own tenant with a small budget and checks the
ledger with exact amounts through a separate observer client:

* budget exhaustion stops a ``@cycles`` function before its body runs;
* the heartbeat keeps a reservation alive well past its TTL (grace 0, so nothing else could);
* a commit after the server expired the reservation lands once, as an event;
* an exception in a guard releases the reservation and the budget comes back;
* a stream cancelled mid-way commits the usage it already produced.

TTLs are the smallest that work: the protocol's minimum ``ttl_ms`` (1000) for the expiry
tests. The heartbeat test needs 2000 ms: the spec's heartbeat keeps a retry reserve of
``2 * attempt_budget + safety_margin`` >= 3000 ms of lead, and a 1000 ms lease only reaches
~2000 ms after its one permitted immediate extension, so the heartbeat (correctly) stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from runcycles import (
    AsyncCyclesClient,
    AsyncReservationGuard,
    BudgetExceededError,
    CyclesClient,
    CyclesConfig,
    ReservationExpiredError,
    ReservationGuard,
    StreamUsage,
    cycles,
    reserve,
    stream_reservation,
)
from runcycles.journal import Journal
from runcycles.settlement import default_journal
from runcycles_server.testing import ProvisionedTenant, ServerProcess

U = "USD_MICROCENTS"
MIN_TTL_MS = 1_000  # ReservationCreateRequest.ttl_ms minimum in spec/cycles-protocol-v0.yaml
HEARTBEAT_TTL_MS = 2_000
CALL_TTLS = 3.5  # the heartbeat test's call lasts this many TTLs
# One extend attempt is bounded by connect + read timeout (1 s here): the heartbeat's retry
# reserve is then 3 s, which a 2 s lease clears after its first immediate extension.
FAST_TIMEOUTS: dict[str, Any] = {"connect_timeout": 0.3, "read_timeout": 0.7}


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def journal_dir(tmp_path: Path) -> str:
    return str(tmp_path / "journal")


@pytest.fixture
def observer(server: ServerProcess) -> Iterator[Any]:
    """Read-only access to a tenant's ledger, independent of the client under test."""
    clients: list[CyclesClient] = []

    def open_for(tenant: ProvisionedTenant) -> CyclesClient:
        client: CyclesClient = tenant.client(journal_enabled=False)
        clients.append(client)
        return client

    yield open_for
    for client in clients:
        client.close()


def ledger(client: CyclesClient, tenant: ProvisionedTenant) -> dict[str, int]:
    """The tenant-scope budget's amounts; checks ``allocated = remaining+spent+reserved+debt``."""
    rows = client.get_balances(tenant=tenant.tenant_id).raise_for_error().data.balances
    (row,) = [r for r in rows if r.scope_path == f"tenant:{tenant.tenant_id}"]
    amounts = {"remaining": row.remaining.amount}
    for name in ("reserved", "spent", "debt", "allocated"):
        value = getattr(row, name)
        amounts[name] = 0 if value is None else value.amount
    assert amounts["allocated"] == (
        amounts["remaining"] + amounts["spent"] + amounts["reserved"] + amounts["debt"]
    ), amounts
    amounts["over_limit"] = int(bool(row.is_over_limit))
    return amounts


def settled(budget: int, spent: int) -> dict[str, int]:
    """The ledger of a tenant budget with nothing held, nothing owed and ``spent`` charged."""
    return {
        "remaining": budget - spent,
        "reserved": 0,
        "spent": spent,
        "debt": 0,
        "allocated": budget,
        "over_limit": 0,
    }


def journal_files(directory: str) -> list[Path]:
    return sorted(Path(directory).rglob("*.json"))


def wait_until_swept(client: CyclesClient, reservation_id: str, timeout_s: float = 10.0) -> None:
    """Wait until the server's expiry sweep marked the reservation EXPIRED (polls)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = client.list_reservations(status="EXPIRED").raise_for_error().data.reservations
        if any(row.reservation_id == reservation_id for row in rows):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not expire {reservation_id} within {timeout_s} s")
        time.sleep(0.1)


def price(usage: StreamUsage) -> int:
    return usage.tokens_output * 10


# ------------------------------------------------------------ (a) budget exhaustion


def test_cycles_budget_exhaustion_stops_the_function_before_it_runs_sync(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    ran: list[str] = []
    with tenant.client(journal_dir=journal_dir) as client:

        @cycles(6_000, actual=6_000, action_kind="llm.completion", action_name="e2e", client=client)
        def work(prompt: str) -> str:
            ran.append(prompt)
            return prompt.upper()

        assert work("first") == "FIRST"
        with pytest.raises(BudgetExceededError) as caught:
            work("second")  # 4,000 left < 6,000 estimate
    assert caught.value.status == 409
    assert ran == ["first"]  # the denied call's body never ran
    assert ledger(observer(tenant), tenant) == settled(10_000, spent=6_000)
    assert journal_files(journal_dir) == []


async def test_cycles_budget_exhaustion_stops_the_function_before_it_runs_async(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    ran: list[str] = []
    async with tenant.async_client(journal_dir=journal_dir) as client:

        @cycles(6_000, actual=6_000, action_kind="llm.completion", action_name="e2e", client=client)
        async def work(prompt: str) -> str:
            ran.append(prompt)
            return prompt.upper()

        assert await work("first") == "FIRST"
        with pytest.raises(BudgetExceededError) as caught:
            await work("second")
    assert caught.value.status == 409
    assert ran == ["first"]
    assert ledger(observer(tenant), tenant) == settled(10_000, spent=6_000)
    assert journal_files(journal_dir) == []


# ------------------------------------------------------- (b) heartbeat outlives TTLs


def test_heartbeat_keeps_a_long_call_alive_past_several_ttls_sync(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=100_000)
    with (
        tenant.client(journal_dir=journal_dir, **FAST_TIMEOUTS) as client,
        reserve(
            client,
            estimate=5_000,
            action_kind="llm.completion",
            action_name="long",
            ttl_ms=HEARTBEAT_TTL_MS,
            grace_period_ms=0,  # without extensions the commit could only become an event
        ) as guard,
    ):
        rid = guard.reservation_id
        assert rid is not None
        initial_expires = guard.expires_at_ms
        assert initial_expires is not None
        time.sleep(HEARTBEAT_TTL_MS * (CALL_TTLS - 0.5) / 1000)
        # three TTLs in: still ACTIVE on the server, its expiry moved out
        mid = client.get_reservation(rid).raise_for_error().data
        mid_now = int(time.time() * 1000)
        time.sleep(HEARTBEAT_TTL_MS * 0.5 / 1000)
        result = guard.commit(4_000)
    assert result.outcome == "committed"
    assert mid.status.value == "ACTIVE"
    assert mid.expires_at_ms > mid_now  # alive three TTLs after a lease of one TTL
    assert mid.expires_at_ms >= initial_expires + 2 * HEARTBEAT_TTL_MS
    check = observer(tenant)
    detail = check.get_reservation(rid).raise_for_error().data
    assert detail.status.value == "COMMITTED"  # a commit, not an event fallback
    assert detail.committed is not None
    assert detail.committed.amount == 4_000
    assert detail.expires_at_ms >= initial_expires + 3 * HEARTBEAT_TTL_MS
    assert ledger(check, tenant) == settled(100_000, spent=4_000)
    assert journal_files(journal_dir) == []


async def test_heartbeat_keeps_a_long_call_alive_past_several_ttls_async(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=100_000)
    async with (
        tenant.async_client(journal_dir=journal_dir, **FAST_TIMEOUTS) as client,
        reserve(
            client,
            estimate=5_000,
            action_kind="llm.completion",
            action_name="long",
            ttl_ms=HEARTBEAT_TTL_MS,
            grace_period_ms=0,
        ) as guard,
    ):
        rid = guard.reservation_id
        assert rid is not None
        initial_expires = guard.expires_at_ms
        assert initial_expires is not None
        await asyncio.sleep(HEARTBEAT_TTL_MS * (CALL_TTLS - 0.5) / 1000)
        mid = (await client.get_reservation(rid)).raise_for_error().data
        mid_now = int(time.time() * 1000)
        await asyncio.sleep(HEARTBEAT_TTL_MS * 0.5 / 1000)
        result = await guard.commit(4_000)
    assert result.outcome == "committed"
    assert mid.status.value == "ACTIVE"
    assert mid.expires_at_ms > mid_now
    assert mid.expires_at_ms >= initial_expires + 2 * HEARTBEAT_TTL_MS
    check = observer(tenant)
    detail = check.get_reservation(rid).raise_for_error().data
    assert detail.status.value == "COMMITTED"
    assert detail.committed is not None
    assert detail.committed.amount == 4_000
    assert detail.expires_at_ms >= initial_expires + 3 * HEARTBEAT_TTL_MS
    assert ledger(check, tenant) == settled(100_000, spent=4_000)
    assert journal_files(journal_dir) == []


# --------------------------------------------------- (c) commit after expiry -> event


def test_commit_after_expiry_lands_once_as_an_event_sync(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    check = observer(tenant)
    with (
        tenant.client(journal_dir=journal_dir) as client,
        reserve(
            client,
            estimate=3_000,
            action_kind="llm.completion",
            action_name="slow",
            ttl_ms=MIN_TTL_MS,
            grace_period_ms=0,
            heartbeat=False,
        ) as guard,
    ):
        rid = guard.reservation_id
        assert rid is not None
        assert ledger(check, tenant)["reserved"] == 3_000
        time.sleep(MIN_TTL_MS / 1000)
        wait_until_swept(check, rid)  # the server expired it and returned the hold
        assert ledger(check, tenant) == settled(10_000, spent=0)
        result = guard.commit(2_500)
    assert result.outcome == "event_applied"
    assert result.settled
    assert not result.journaled
    with pytest.raises(ReservationExpiredError):
        check.get_reservation(rid).raise_for_error()
    assert ledger(check, tenant) == settled(10_000, spent=2_500)  # charged exactly once
    assert journal_files(journal_dir) == []


async def test_commit_after_expiry_lands_once_as_an_event_async(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    check = observer(tenant)
    async with (
        tenant.async_client(journal_dir=journal_dir) as client,
        reserve(
            client,
            estimate=3_000,
            action_kind="llm.completion",
            action_name="slow",
            ttl_ms=MIN_TTL_MS,
            grace_period_ms=0,
            heartbeat=False,
        ) as guard,
    ):
        rid = guard.reservation_id
        assert rid is not None
        assert ledger(check, tenant)["reserved"] == 3_000
        await asyncio.sleep(MIN_TTL_MS / 1000)
        await asyncio.to_thread(wait_until_swept, check, rid)
        assert ledger(check, tenant) == settled(10_000, spent=0)
        result = await guard.commit(2_500)
    assert result.outcome == "event_applied"
    assert result.settled
    assert not result.journaled
    with pytest.raises(ReservationExpiredError):
        check.get_reservation(rid).raise_for_error()
    assert ledger(check, tenant) == settled(10_000, spent=2_500)
    assert journal_files(journal_dir) == []


# ------------------------------------------------- (d) exception releases the hold


class ToolFailed(Exception):
    pass


def test_guard_exception_releases_the_reservation_sync(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    check = observer(tenant)
    held: list[tuple[ReservationGuard, int]] = []

    def failing_tool(client: CyclesClient) -> None:
        with reserve(client, estimate=7_000, action_kind="tool.call", action_name="search") as g:
            held.append((g, ledger(check, tenant)["reserved"]))
            raise ToolFailed("search backend down")

    with tenant.client(journal_dir=journal_dir) as client, pytest.raises(ToolFailed):
        failing_tool(client)
    ((guard, reserved_inside),) = held
    assert reserved_inside == 7_000  # held while the block ran
    assert guard.is_finalized
    rid = guard.reservation_id
    assert rid is not None
    assert check.get_reservation(rid).raise_for_error().data.status.value == "RELEASED"
    assert ledger(check, tenant) == settled(10_000, spent=0)  # all 7,000 came back
    assert journal_files(journal_dir) == []


async def test_guard_exception_releases_the_reservation_async(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    check = observer(tenant)
    held: list[tuple[AsyncReservationGuard, int]] = []

    async def failing_tool(client: AsyncCyclesClient) -> None:
        async with reserve(
            client, estimate=7_000, action_kind="tool.call", action_name="search"
        ) as g:
            held.append((g, ledger(check, tenant)["reserved"]))
            raise ToolFailed("search backend down")

    async with tenant.async_client(journal_dir=journal_dir) as client:
        with pytest.raises(ToolFailed):
            await failing_tool(client)
    ((guard, reserved_inside),) = held
    assert reserved_inside == 7_000
    assert guard.is_finalized
    rid = guard.reservation_id
    assert rid is not None
    assert check.get_reservation(rid).raise_for_error().data.status.value == "RELEASED"
    assert ledger(check, tenant) == settled(10_000, spent=0)
    assert journal_files(journal_dir) == []


# ------------------------------------------- (e) cancelled stream commits partial usage


def test_cancelled_stream_commits_its_partial_usage_sync(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    check = observer(tenant)
    ids: list[str] = []
    with tenant.client(journal_dir=journal_dir) as client:

        def tokens() -> Generator[int, None, None]:
            with stream_reservation(
                client,
                estimate=5_000,
                action_kind="llm.completion",
                action_name="stream",
                cost_fn=price,
            ) as stream:
                ids.append(stream.reservation_id or "")
                for index in range(100):
                    stream.usage.add_output_tokens(7)
                    yield index

        consumer = tokens()
        for index in consumer:
            if index == 2:  # the reader goes away after three chunks
                break
        consumer.close()  # GeneratorExit inside the stream block
    (rid,) = ids
    detail = check.get_reservation(rid).raise_for_error().data
    assert detail.status.value == "COMMITTED"
    assert detail.committed is not None
    assert detail.committed.amount == 3 * 7 * 10
    assert detail.committed_metadata is not None
    assert detail.committed_metadata.get("stream_outcome") == "cancelled"
    assert ledger(check, tenant) == settled(10_000, spent=210)
    assert journal_files(journal_dir) == []


async def test_cancelled_stream_commits_its_partial_usage_async(
    server: ServerProcess, observer: Any, journal_dir: str
) -> None:
    tenant = server.provision(budget=10_000)
    check = observer(tenant)
    ids: list[str] = []
    three_chunks = asyncio.Event()
    async with tenant.async_client(journal_dir=journal_dir) as client:

        async def tokens() -> AsyncIterator[int]:
            async with stream_reservation(
                client,
                estimate=5_000,
                action_kind="llm.completion",
                action_name="stream",
                cost_fn=price,
            ) as stream:
                ids.append(stream.reservation_id or "")
                for index in range(100):
                    stream.usage.add_output_tokens(7)
                    if index == 2:
                        three_chunks.set()
                        await asyncio.Event().wait()  # the provider stalls; never set
                    yield index

        async def consume() -> None:
            async for _ in tokens():
                pass

        task = asyncio.create_task(consume())
        await asyncio.wait_for(three_chunks.wait(), timeout=10)
        task.cancel()  # CancelledError inside the stream block
        with pytest.raises(asyncio.CancelledError):
            await task
    (rid,) = ids
    detail = check.get_reservation(rid).raise_for_error().data
    assert detail.status.value == "COMMITTED"
    assert detail.committed is not None
    assert detail.committed.amount == 3 * 7 * 10
    assert detail.committed_metadata is not None
    assert detail.committed_metadata.get("stream_outcome") == "cancelled"
    assert ledger(check, tenant) == settled(10_000, spent=210)
    assert journal_files(journal_dir) == []


# --------------------------------------------------------------- journal location (bug)


def test_journal_for_config_opens_the_journal_guarded_calls_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNCYCLES_JOURNAL_DIR", raising=False)
    monkeypatch.delenv("RUNCYCLES_JOURNAL", raising=False)
    config = CyclesConfig(
        base_url="http://127.0.0.1:7878", api_key="k", tenant="acme", journal_dir=str(tmp_path)
    )
    automatic = default_journal(config)  # what @cycles, guards and streams write to
    assert automatic is not None
    assert automatic.directory.parent == tmp_path
    assert Journal.for_config(config).directory == automatic.directory
