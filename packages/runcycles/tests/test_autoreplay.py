"""A client with the journal enabled replays what earlier processes left, without being asked.

Records are put in the default journal (``RUNCYCLES_JOURNAL_DIR``, a per-test directory) the
way a crashed process leaves them; then a fresh client is built and used normally, and the
fake ledger shows what reached the server.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    Subject,
    Unit,
    _autoreplay,
)
from runcycles.journal import Journal, JournalRecord, run_journal_io
from runcycles.retry import RetryPolicy
from runcycles.settlement import AsyncSettlement, Settlement, default_journal
from runcycles.testing.recovery_fakes import FakeLedger, Fault, ProcessCrash

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key-1", tenant="acme")
SUBJECT = Subject(tenant="acme", workflow="wf")
ACTION = Action(kind="tool.search", name="web")
GUARD: dict[str, Any] = {"estimate": 100, "action_kind": "tool.search", "action_name": "web"}


def record(rid: str = "r1", key: str = "settle-key", **fields: Any) -> JournalRecord:
    built = JournalRecord.for_commit(
        rid,
        CommitRequest(idempotency_key=key, actual=Amount(unit=Unit.USD_MICROCENTS, amount=900)),
        subject=SUBJECT,
        action=ACTION,
    )
    return built.model_copy(update=fields) if fields else built


@pytest.fixture
def journal(journal_dir: Path) -> Journal:
    found = default_journal(CONFIG)
    assert found is not None
    assert found.root == journal_dir
    return found


@pytest.fixture
def ledger() -> FakeLedger:
    built = FakeLedger()
    built.expect_key("r1", "settle-key")
    return built


def commits_of(ledger: FakeLedger, rid: str) -> list[str]:
    return [
        r.idempotency_key or "" for r in ledger.requests_to("commit") if r.reservation_id == rid
    ]


# --------------------------------------------------------------------------- sync


def test_sync_client_settles_a_crashed_record_on_start(ledger, journal):
    journal.write(record())  # left by a process that died before settling

    client = CyclesClient(CONFIG, transport=ledger.transport())  # no explicit call
    assert _autoreplay.wait_sync(10)

    assert ledger.applied_commits == {"r1": 1}
    assert commits_of(ledger, "r1") == ["settle-key"]  # the stored key
    assert journal.scan().records == []
    client.close()


def test_sync_construction_does_not_block_on_the_replay(ledger, journal):
    journal.write(record())
    entered = threading.Event()
    release = threading.Event()

    def slow(request: Any) -> Any:
        entered.set()
        release.wait(10)
        return ledger.handle(request)

    import httpx

    client = CyclesClient(CONFIG, transport=httpx.MockTransport(slow))  # returns at once
    assert entered.wait(10)  # the replay is in flight on the background thread...
    assert ledger.requests == []  # ...and has not been answered yet
    release.set()
    assert _autoreplay.wait_sync(10)
    assert ledger.applied_commits == {"r1": 1}
    client.close()


def test_sync_restart_after_a_crash_mid_commit_settles_once(journal):
    ledger = FakeLedger()

    def first_process(request: Any) -> Any:
        ledger.script("commit", Fault.crash(apply=True))  # applied, then the process dies
        return ledger.handle(request)

    import httpx

    crashed = CyclesClient(CONFIG, transport=httpx.MockTransport(first_process))
    assert _autoreplay.wait_sync(10)  # its start-up replay ran before it commits anything
    settlement = Settlement(crashed, journal=journal, retry_policy=RetryPolicy(jitter=False))
    with pytest.raises(ProcessCrash):
        settlement.commit(
            "r1",
            CommitRequest(
                idempotency_key="settle-key", actual=Amount(unit=Unit.USD_MICROCENTS, amount=900)
            ),
            subject=SUBJECT,
            action=ACTION,
        )
    assert [r.reservation_id for r in journal.scan().records] == ["r1"]

    ledger.mark("_after_restart")
    restarted = CyclesClient(CONFIG, transport=ledger.transport())
    assert _autoreplay.wait_sync(10)

    assert ledger.labels() == ["commit", "commit_same_key_after_restart"]
    assert ledger.applied_commits == {"r1": 1}
    assert journal.scan().records == []
    restarted.close()


def test_records_written_after_start_are_left_to_their_settlement(ledger, journal):
    client = CyclesClient(CONFIG, transport=ledger.transport())
    assert _autoreplay.wait_sync(10)
    later = _autoreplay.now_ms() + 60_000  # a live settlement of this process, not a leftover
    journal.write(record(created_at_ms=later))
    other = CyclesClient(CONFIG, transport=ledger.transport())  # started before that record
    journal.write(record("r2", "k2", created_at_ms=later))
    assert _autoreplay.wait_sync(10)
    assert ledger.requests == []
    assert {r.reservation_id for r in journal.scan().records} == {"r1", "r2"}

    report = Settlement(client, journal=journal).flush(5.0)  # the explicit API still works
    assert sorted(report.settled) == ["r1", "r2"]
    assert journal.scan().records == []
    client.close()
    other.close()


def test_concurrent_automatic_and_explicit_replays_settle_once(journal):
    ledger = FakeLedger(apply_delay_s=0.2)  # keeps the first commit in flight while others race
    for rid in ("r1", "r2", "r3"):
        journal.write(record(rid, f"key-{rid}"))
    clients = [CyclesClient(CONFIG, transport=ledger.transport()) for _ in range(3)]
    explicit = Settlement(clients[0], journal=journal).flush(10.0)
    assert _autoreplay.wait_sync(10)

    assert ledger.applied_commits == {"r1": 1, "r2": 1, "r3": 1}
    for rid in ("r1", "r2", "r3"):
        assert commits_of(ledger, rid) == [f"key-{rid}"]  # one request each, never two
    assert set(explicit.settled) | set(explicit.busy) <= {"r1", "r2", "r3"}
    assert journal.scan().records == []
    for client in clients:
        client.close()


def test_sibling_clients_never_replay(monkeypatch):
    started: list[object] = []
    monkeypatch.setattr(_autoreplay, "start", started.append)
    client = CyclesClient(CONFIG)
    sibling = client.with_options(retry_policy=RetryPolicy.never())
    assert started == [client]
    assert sibling is not client
    client.close()


@pytest.mark.parametrize("how", ["config", "env"])
def test_disabled_journal_is_not_replayed(ledger, journal, monkeypatch, how):
    journal.write(record())
    config = CONFIG
    if how == "config":
        config = CyclesConfig(
            base_url="http://cycles.test", api_key="key-1", tenant="acme", journal_enabled=False
        )
    else:
        monkeypatch.setenv("RUNCYCLES_JOURNAL", "off")
    client = CyclesClient(config, transport=ledger.transport())
    assert _autoreplay.wait_sync(10)
    assert ledger.requests == []
    assert [r.reservation_id for r in journal.scan().records] == ["r1"]
    client.close()


def test_sync_replay_stopped_mid_record_releases_its_lock_even_if_unlinking_fails(
    ledger: FakeLedger, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.write(record())
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".lock"):  # e.g. a read-only or permission-changed directory
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok)

    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug in a custom transport")  # not an httpx error: the replay stops

    monkeypatch.setattr(Path, "unlink", unlink)
    crashed = CyclesClient(CONFIG, transport=httpx.MockTransport(broken))
    assert _autoreplay.wait_sync(10)  # the replay thread logged the error and lives on
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert [r.reservation_id for r in journal.scan().records] == ["r1"]  # kept for later

    fresh = CyclesClient(CONFIG, transport=ledger.transport())  # same process: not "busy"
    assert _autoreplay.wait_sync(10)
    assert ledger.applied_commits == {"r1": 1}
    assert commits_of(ledger, "r1") == ["settle-key"]
    assert journal.scan().records == []
    crashed.close()
    fresh.close()


# --------------------------------------------------------------------------- async


async def test_async_client_settles_a_crashed_record_on_first_use(ledger, journal):
    journal.write(record())
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    assert ledger.requests == []  # built outside any request: nothing yet

    async with client.reserve(**GUARD) as guard:  # ordinary use, no explicit replay call
        await guard.commit(40)
    assert await _autoreplay.wait_async(10)

    assert ledger.applied_commits["r1"] == 1
    assert commits_of(ledger, "r1") == ["settle-key"]
    assert journal.scan().records == []
    await client.aclose()


async def test_async_replay_reads_the_journal_off_the_event_loop(ledger, journal, monkeypatch):
    journal.write(record())
    loop_thread = threading.get_ident()
    probed_on: list[int] = []
    scanned_on: list[int] = []
    real_probe = _autoreplay._journal_with_records
    real_scan = Journal.scan

    def probe(config: CyclesConfig) -> Any:
        probed_on.append(threading.get_ident())
        return real_probe(config)

    def scan(self: Journal) -> Any:
        scanned_on.append(threading.get_ident())
        return real_scan(self)

    monkeypatch.setattr(_autoreplay, "_journal_with_records", probe)
    monkeypatch.setattr(Journal, "scan", scan)
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    await client.get_reservation("other")  # first request
    assert await _autoreplay.wait_async(10)

    assert ledger.applied_commits == {"r1": 1}
    assert probed_on
    assert scanned_on
    assert loop_thread not in probed_on + scanned_on
    await client.aclose()


async def test_async_empty_journal_creates_no_task(ledger, journal):
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    await client.get_reservation("other")
    assert await _autoreplay.wait_async(10)
    assert [r.endpoint for r in ledger.requests] == ["v1/reservations/other"]
    assert journal.scan().records == []
    await client.aclose()


async def test_async_restart_and_concurrent_explicit_flush_settle_once(journal):
    ledger = FakeLedger(apply_delay_s=0.1)
    for rid in ("r1", "r2"):
        journal.write(record(rid, f"key-{rid}"))
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    await client.get_reservation("other")  # starts the automatic replay
    await AsyncSettlement(client, journal=journal).flush(10.0)
    assert await _autoreplay.wait_async(10)

    assert ledger.applied_commits == {"r1": 1, "r2": 1}
    for rid in ("r1", "r2"):
        assert commits_of(ledger, rid) == [f"key-{rid}"]
    assert journal.scan().records == []
    await client.aclose()


def test_async_replay_cancelled_by_loop_shutdown_while_claiming_releases_the_record(
    ledger: FakeLedger, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.write(record())
    claiming = threading.Event()
    proceed = threading.Event()
    real_try_lock = Journal.try_lock

    def slow_try_lock(self: Journal, reservation_id: str) -> Any:
        claiming.set()
        proceed.wait(10)
        return real_try_lock(self, reservation_id)

    monkeypatch.setattr(Journal, "try_lock", slow_try_lock)

    async def first_process() -> None:
        client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
        await client.get_reservation("other")  # starts the automatic replay
        await asyncio.to_thread(claiming.wait, 10)  # it is claiming r1 on the I/O thread...
        proceed.set()  # ...and gets the claim after asyncio.run has cancelled it

    asyncio.run(first_process())  # returns: the loop shuts down under the replay
    asyncio.run(run_journal_io(int))  # the claim made on the I/O thread has finished
    assert ledger.requests_to("commit") == []

    fresh = CyclesClient(CONFIG, transport=ledger.transport())  # same process: not "busy"
    assert _autoreplay.wait_sync(10)
    assert ledger.applied_commits == {"r1": 1}
    assert commits_of(ledger, "r1") == ["settle-key"]
    assert journal.scan().records == []
    fresh.close()


def test_async_replay_left_on_a_closed_loop_mid_commit_releases_the_record(
    ledger: FakeLedger, journal: Journal
) -> None:
    journal.write(record())
    first_commits: list[str] = []

    async def first_process() -> None:
        committing = asyncio.Event()

        async def never_answers(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/commit"):
                first_commits.append(request.url.path)
                committing.set()
                await asyncio.Event().wait()  # the answer never comes: the loop closes first
            return ledger.handle(request)

        client = AsyncCyclesClient(CONFIG, transport=httpx.MockTransport(never_answers))
        await client.get_reservation("other")  # starts the automatic replay
        await committing.wait()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first_process())
    loop.close()  # without cancelling the replay task: it never runs again
    assert len(first_commits) == 1

    fresh = CyclesClient(CONFIG, transport=ledger.transport())  # same process: not "busy"
    assert _autoreplay.wait_sync(10)
    assert ledger.applied_commits == {"r1": 1}
    assert commits_of(ledger, "r1") == ["settle-key"]
    assert journal.scan().records == []
    fresh.close()


def replay_task() -> asyncio.Task[Any]:
    loop = asyncio.get_running_loop()
    (task,) = [
        t for t in _autoreplay._tasks if isinstance(t, asyncio.Task) and t.get_loop() is loop
    ]
    return task


async def test_async_replay_cancelled_while_claiming_releases_the_claim(
    ledger: FakeLedger, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.write(record())
    claiming = threading.Event()
    proceed = threading.Event()
    real_try_lock = Journal.try_lock

    def slow_try_lock(self: Journal, reservation_id: str) -> Any:
        claiming.set()
        proceed.wait(10)
        return real_try_lock(self, reservation_id)

    monkeypatch.setattr(Journal, "try_lock", slow_try_lock)
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    await client.get_reservation("other")  # starts the automatic replay
    await asyncio.to_thread(claiming.wait, 10)
    task = replay_task()
    task.cancel()  # while r1 is being claimed on the I/O thread; the loop keeps running
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()  # the claim is made now, for a replay that is gone

    report = await AsyncSettlement(client, journal=journal).flush(5.0)
    assert report.settled == ["r1"]
    assert report.busy == []
    assert commits_of(ledger, "r1") == ["settle-key"]
    assert journal.scan().records == []
    await client.aclose()


async def test_async_replay_cancelled_again_while_releasing_still_releases(
    ledger: FakeLedger, journal: Journal
) -> None:
    journal.write(record())
    committing = asyncio.Event()

    async def never_answers(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/commit"):
            committing.set()
            await asyncio.Event().wait()
        return ledger.handle(request)

    client = AsyncCyclesClient(CONFIG, transport=httpx.MockTransport(never_answers))
    await client.get_reservation("other")  # starts the automatic replay
    await committing.wait()
    task = replay_task()
    io_busy = threading.Event()
    io_free = threading.Event()

    def hold_io_thread() -> None:
        io_busy.set()
        io_free.wait(10)

    held = asyncio.ensure_future(run_journal_io(hold_io_thread))  # the release has to queue
    await asyncio.to_thread(io_busy.wait, 10)
    while not task.done():  # cancel at every await: mid-commit, then while releasing
        task.cancel()
        await asyncio.sleep(0)
    io_free.set()
    await held

    other = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    report = await AsyncSettlement(other, journal=journal).flush(5.0)
    assert report.settled == ["r1"]
    assert report.busy == []
    assert commits_of(ledger, "r1") == ["settle-key"]
    assert journal.scan().records == []
    await client.aclose()
    await other.aclose()
