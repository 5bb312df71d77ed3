"""An async commit's claim on its record file is released however the commit ends.

``AsyncSettlement.commit`` claims its record (a ``RecordLock``) when it writes a record file:
journaled late (``journal_first=False``, or the intent log failed), or moved out of the
intent log (the event fallback, a 429 floor, a ``pending`` outcome). The claim must end with
the commit, whether it is cancelled while the claim is being made, cancelled again while the
claim is being released, or left on an event loop that is closed under it, so that a later
``flush()`` in the same process takes the record and settles it exactly once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
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
from runcycles.settlement import AsyncSettlement, Settlement, SettlementResult, default_journal
from runcycles.testing.recovery_fakes import FakeLedger, Fault

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key", tenant="acme")
SUBJECT = Subject(tenant="acme", agent="bot")
ACTION = Action(kind="llm.completion", name="gpt")
# how the commit came to hold a claim on its record file while it awaits the server
GUARD: dict[str, Any] = {"estimate": 100, "action_kind": "tool.search", "action_name": "web"}
CLAIMED_BY = pytest.mark.parametrize("claimed_by", ["late journal", "event fallback"])

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def journal(tmp_path: Any) -> Journal:
    return Journal.for_config(CONFIG, tmp_path / "journal")


async def no_sleep(seconds: float) -> None:
    return None


def settlement_for(
    client: AsyncCyclesClient, journal: Journal, *, journal_first: bool = True
) -> AsyncSettlement:
    return AsyncSettlement(
        client,
        journal=journal,
        retry_policy=RetryPolicy(max_attempts=4, jitter=False),
        sleep=no_sleep,
        journal_first=journal_first,
    )


async def commit(settlement: AsyncSettlement) -> SettlementResult:
    request = CommitRequest(idempotency_key="key-1", actual=Amount(unit=Unit.TOKENS, amount=42))
    return await settlement.commit("r1", request, subject=SUBJECT, action=ACTION)


def is_io_thread() -> bool:
    return threading.current_thread().name.startswith("runcycles-journal")


class BlockedRecordWrite:
    """The first record file written on the journal's I/O thread waits for ``proceed``.

    ``writing`` is set once that write has the record's claim and is about to write.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writing = threading.Event()
        self.proceed = threading.Event()
        real_write = Journal.write

        def write(journal: Journal, record: JournalRecord) -> Any:
            if is_io_thread() and not self.writing.is_set():
                self.writing.set()
                self.proceed.wait(10)
            return real_write(journal, record)

        monkeypatch.setattr(Journal, "write", write)


def stall_once_claimed(ledger: FakeLedger, claimed_by: str, stalled: asyncio.Event) -> Handler:
    """Script ``ledger`` so the commit claims its record; the next request never gets an answer.

    ``late journal``: the first commit fails (503), the record is written and claimed, the
    retry stalls. ``event fallback``: the commit finds the reservation expired, the record is
    written in event mode and claimed, the event stalls. Nothing stalled reaches the ledger.
    """
    if claimed_by == "late journal":
        ledger.script("commit", Fault.error(503, "INTERNAL_ERROR"))
        stall_path, stall_at = "/v1/reservations/r1/commit", 2
    else:
        ledger.expire("r1")
        stall_path, stall_at = "/v1/events", 1
    seen = 0

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal seen
        if request.url.path == stall_path:
            seen += 1
            if seen == stall_at:
                stalled.set()
                await asyncio.Event().wait()  # the answer never comes
        return ledger.handle(request)

    return handle


def assert_settled_once(ledger: FakeLedger, claimed_by: str) -> None:
    if claimed_by == "late journal":
        assert ledger.applied_commits == {"r1": 1}
        assert ledger.applied_events == {}
    else:
        assert ledger.applied_events == {"r1": 1}
        assert ledger.applied_commits == {}
    keys = {r.idempotency_key for r in ledger.requests if r.endpoint in ("commit", "event")}
    assert keys == {"key-1"}


def cancel_then(task: asyncio.Future[Any], then: Callable[[], None]) -> None:
    """Cancel ``task``; call ``then`` once the task has run its next step (handling it).

    The cancelled task's wake-up is scheduled by ``cancel()``; a callback scheduled after it
    runs after that step (the loop runs callbacks in the order they were scheduled).
    """
    task.cancel()
    asyncio.get_running_loop().call_soon(then)


def hold_io_thread() -> tuple[Callable[[], None], threading.Event, threading.Event]:
    busy = threading.Event()
    free = threading.Event()

    def hold() -> None:
        busy.set()
        free.wait(10)

    return hold, busy, free


# ---------------------------------------------------------------------- cancelled while claiming


async def test_commit_cancelled_while_journaling_late_releases_the_claim(
    ledger: FakeLedger, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.script("commit", Fault.error(503, "INTERNAL_ERROR"))  # journaled after this one
    blocked = BlockedRecordWrite(monkeypatch)
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    task = asyncio.ensure_future(commit(settlement_for(client, journal, journal_first=False)))
    assert await asyncio.to_thread(blocked.writing.wait, 10)  # claimed, being written
    cancel_then(task, blocked.proceed.set)  # the claim is made for a commit that is gone
    with pytest.raises(asyncio.CancelledError):
        await task

    report = await AsyncSettlement(client, journal=journal).flush(5.0)
    assert report.busy == []
    assert report.settled == ["r1"]
    assert_settled_once(ledger, "late journal")
    assert journal.scan().records == []
    await client.aclose()


async def test_commit_cancelled_while_writing_its_record_file_releases_the_claim(
    ledger: FakeLedger, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.expire("r1")  # the record moves from the intent log to a file, in event mode
    blocked = BlockedRecordWrite(monkeypatch)
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    task = asyncio.ensure_future(commit(settlement_for(client, journal)))
    assert await asyncio.to_thread(blocked.writing.wait, 10)
    cancel_then(task, blocked.proceed.set)
    with pytest.raises(asyncio.CancelledError):
        await task

    report = await AsyncSettlement(client, journal=journal).flush(5.0)
    assert report.busy == []
    assert report.settled == ["r1"]
    assert_settled_once(ledger, "event fallback")
    assert journal.scan().records == []
    await client.aclose()


def test_guarded_commit_cut_by_asyncio_run_returning_while_writing_its_record_releases_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The guard settles in a shielded background task; asyncio.run cancels it on the way out.
    ledger = FakeLedger()
    ledger.script("commit", Fault.error(410, "RESERVATION_EXPIRED"))  # -> a record file
    blocked = BlockedRecordWrite(monkeypatch)
    started: list[asyncio.Future[Any]] = []

    async def first_process() -> None:
        client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())

        async def guarded_work() -> None:
            async with client.reserve(**GUARD) as guard:
                await guard.commit(42)

        async def free_io_when_cancelled() -> None:
            try:
                await asyncio.Event().wait()
            finally:  # asyncio.run has cancelled every task, the settlement's too
                blocked.proceed.set()

        started.append(asyncio.ensure_future(guarded_work()))
        started.append(asyncio.ensure_future(free_io_when_cancelled()))
        assert await asyncio.to_thread(blocked.writing.wait, 10)

    asyncio.run(first_process())
    assert ledger.applied_events == {}

    fresh = CyclesClient(CONFIG, transport=ledger.transport())  # same process: not "busy"
    assert _autoreplay.wait_sync(10)
    assert ledger.applied_events == {"rsv-1": 1}
    journal = default_journal(CONFIG)
    assert journal is not None
    assert journal.scan().records == []
    fresh.close()


# ---------------------------------------------------------------------- loop closed under it


@CLAIMED_BY
def test_commit_left_on_a_closed_loop_with_its_record_claimed_releases_it(
    ledger: FakeLedger, journal: Journal, claimed_by: str
) -> None:
    left: list[asyncio.Task[SettlementResult]] = []

    async def first_process() -> None:
        stalled = asyncio.Event()
        handler = stall_once_claimed(ledger, claimed_by, stalled)
        client = AsyncCyclesClient(CONFIG, transport=httpx.MockTransport(handler))
        settlement = settlement_for(client, journal, journal_first=claimed_by != "late journal")
        left.append(asyncio.create_task(commit(settlement)))
        await stalled.wait()  # the record is claimed and the commit awaits the server

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first_process())
    loop.close()  # without cancelling the commit: it never runs again
    assert not left[0].done()
    assert ledger.applied_commits == {}
    assert ledger.applied_events == {}

    later = Settlement(CyclesClient(CONFIG, transport=ledger.transport()), journal=journal)
    report = later.flush(5.0)
    assert report.busy == []
    assert report.settled == ["r1"]
    assert_settled_once(ledger, claimed_by)
    assert journal.scan().records == []

    left[0].get_coro().close()  # as when the abandoned task is collected: it awaits nothing
    left[0]._log_destroy_pending = False  # type: ignore[attr-defined]  # known: never ends
    assert later.flush(5.0).results == []  # and brings back no record
    assert_settled_once(ledger, claimed_by)


# ---------------------------------------------------------------------- cancelled again


@CLAIMED_BY
async def test_commit_cancelled_again_while_releasing_its_claim_still_releases_it(
    ledger: FakeLedger, journal: Journal, claimed_by: str
) -> None:
    stalled = asyncio.Event()
    handler = stall_once_claimed(ledger, claimed_by, stalled)
    client = AsyncCyclesClient(CONFIG, transport=httpx.MockTransport(handler))
    settlement = settlement_for(client, journal, journal_first=claimed_by != "late journal")
    task = asyncio.ensure_future(commit(settlement))
    await stalled.wait()
    hold, io_busy, io_free = hold_io_thread()
    held = asyncio.ensure_future(run_journal_io(hold))  # the release has to queue
    await asyncio.to_thread(io_busy.wait, 10)
    while not task.done():  # cancel at every await: mid-request, then while releasing
        task.cancel()
        await asyncio.sleep(0)
    io_free.set()
    await held
    with pytest.raises(asyncio.CancelledError):
        await task

    other = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    report = await AsyncSettlement(other, journal=journal).flush(5.0)
    assert report.busy == []
    assert report.settled == ["r1"]
    assert_settled_once(ledger, claimed_by)
    assert journal.scan().records == []
    await client.aclose()
    await other.aclose()
