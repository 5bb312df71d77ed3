"""Settlement / AsyncSettlement behaviour (each test runs against both twins)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    CyclesResponse,
    IdempotencyMismatchError,
    ReleaseResponse,
    ReservationFinalizedError,
    Subject,
    UnauthorizedError,
    Unit,
)
from runcycles.journal import Journal
from runcycles.retry import RetryPolicy
from runcycles.settlement import (
    AsyncSettlement,
    ReplayReport,
    Settlement,
    SettlementResult,
    default_journal,
)
from runcycles.testing.recovery_fakes import FakeLedger, Fault

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key", tenant="acme")
SUBJECT = Subject(tenant="acme", agent="bot")
ACTION = Action(kind="llm.completion", name="gpt")
MODES = pytest.mark.parametrize("mode", ["sync", "async"])


class Wall:
    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now_s


class Harness:
    """One settlement (sync or async) over a fake ledger; sleeps advance the fake wall clock."""

    def __init__(self, mode: str, ledger: FakeLedger, journal: Journal | None, **kwargs) -> None:
        self.mode = mode
        self.wall = Wall()
        self.sleeps: list[float] = []
        policy = kwargs.pop("retry_policy", RetryPolicy(max_attempts=4, jitter=False))
        if mode == "sync":
            self.client: CyclesClient | AsyncCyclesClient = CyclesClient(
                CONFIG, transport=ledger.transport()
            )
            self.settlement: Settlement | AsyncSettlement = Settlement(
                self.client,
                journal=journal,
                retry_policy=policy,
                sleep=self._sleep,
                wall_clock=self.wall,
                **kwargs,
            )
        else:
            self.client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
            self.settlement = AsyncSettlement(
                self.client,
                journal=journal,
                retry_policy=policy,
                sleep=self._asleep,
                wall_clock=self.wall,
                **kwargs,
            )

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.wall.now_s += seconds

    async def _asleep(self, seconds: float) -> None:
        self._sleep(seconds)

    async def commit(
        self, rid: str = "r1", key: str = "key-1", amount: int = 42
    ) -> SettlementResult:
        request = CommitRequest(
            idempotency_key=key,
            actual=Amount(unit=Unit.TOKENS, amount=amount),
            metadata={"step": 1},
        )
        if isinstance(self.settlement, AsyncSettlement):
            return await self.settlement.commit(rid, request, subject=SUBJECT, action=ACTION)
        return self.settlement.commit(rid, request, subject=SUBJECT, action=ACTION)

    async def replay(self) -> ReplayReport:
        if isinstance(self.settlement, AsyncSettlement):
            return await self.settlement.replay()
        return self.settlement.replay()

    async def flush(self, timeout_s: float) -> ReplayReport:
        if isinstance(self.settlement, AsyncSettlement):
            return await self.settlement.flush(timeout_s)
        return self.settlement.flush(timeout_s)

    async def release(self, rid: str, reason: str) -> CyclesResponse[ReleaseResponse]:
        if isinstance(self.settlement, AsyncSettlement):
            return await self.settlement.release(rid, reason)
        return self.settlement.release(rid, reason)


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def journal(tmp_path) -> Journal:
    return Journal.for_config(CONFIG, tmp_path / "journal")


@MODES
async def test_success_commits_once_and_leaves_no_record(mode, ledger, journal):
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "committed"
    assert result.settled
    assert result.commit is not None
    assert result.commit.charged.amount == 42
    assert result.attempts == 1
    assert not result.journaled
    assert journal.scan().records == []
    assert ledger.applied_commits == {"r1": 1}


@MODES
async def test_server_errors_are_retried_with_same_key_and_backoff(mode, ledger, journal):
    ledger.script("commit", Fault.error(503, "INTERNAL_ERROR"), Fault.transport())
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "committed"
    assert result.attempts == 3
    assert {r.idempotency_key for r in ledger.requests_to("commit")} == {"key-1"}
    assert h.sleeps == [0.5, 1.0]


@MODES
async def test_exhaustion_keeps_the_record_for_replay(mode, ledger, journal):
    ledger.script("commit", *[Fault.error(500, "INTERNAL_ERROR")] * 4)
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "pending"
    assert result.journaled
    assert result.attempts == 4
    (record,) = journal.scan().records
    assert record.attempts == 4
    assert record.last_error
    # later, the server is healthy: replay settles with the same key
    report = await h.replay()
    assert report.settled == ["r1"]
    assert journal.scan().records == []
    assert {r.idempotency_key for r in ledger.requests_to("commit")} == {"key-1"}


@MODES
async def test_auth_failure_holds_without_release(mode, ledger, journal):
    ledger.script("commit", Fault.error(401, "UNAUTHORIZED"))
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "pending"
    assert isinstance(result.error, UnauthorizedError)
    assert result.attempts == 1
    assert result.journaled
    assert ledger.requests_to("release") == []
    with pytest.raises(UnauthorizedError):
        result.raise_for_error()


@MODES
async def test_unknown_4xx_holds(mode, ledger, journal):
    ledger.script("commit", Fault.error(422, "SOMETHING_NEW"))
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "pending"
    assert result.journaled


@MODES
@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        ("RESERVATION_FINALIZED", ReservationFinalizedError),
        ("IDEMPOTENCY_MISMATCH", IdempotencyMismatchError),
    ],
)
async def test_understood_rejection_removes_record_and_surfaces(
    mode, ledger, journal, code, error_type
):
    ledger.script("commit", Fault.error(409, code))
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "rejected"
    assert isinstance(result.error, error_type)
    assert not result.journaled
    assert journal.scan().records == []
    assert ledger.requests_to("event") == []


@MODES
async def test_429_honours_retry_after_and_persists_the_floor(mode, ledger, journal):
    ledger.script("commit", Fault.error(429, "LIMIT_EXCEEDED", {"Retry-After": "2"}))
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "committed"
    assert h.sleeps == [2.0]


@MODES
async def test_429_beyond_retry_after_max_returns_pending_with_floor(mode, ledger, journal):
    ledger.script("commit", Fault.error(429, "LIMIT_EXCEEDED", {"Retry-After": "3600"}))
    h = Harness(mode, ledger, journal)
    start_ms = int(h.wall.now_s * 1000)
    result = await h.commit()
    assert result.outcome == "pending"
    assert h.sleeps == []
    (record,) = journal.scan().records
    assert record.not_before_ms == start_ms + 3_600_000
    assert result.not_before_ms == record.not_before_ms
    report = await h.replay()
    assert report.not_due == ["r1"]
    assert len(ledger.requests_to("commit")) == 1


@MODES
async def test_expired_commit_becomes_event_with_original_fields(mode, ledger, journal):
    ledger.expire("r1")
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "event_applied"
    assert result.mode == "event"
    assert result.event is not None
    (event,) = ledger.requests_to("event")
    assert event.idempotency_key == "key-1"
    assert event.body["subject"] == {"tenant": "acme", "agent": "bot"}
    assert event.body["action"] == {"kind": "llm.completion", "name": "gpt"}
    assert event.body["actual"] == {"unit": "TOKENS", "amount": 42}
    assert event.body["metadata"] == {"step": 1, "recovered_reservation_id": "r1"}
    assert ledger.applied_events == {"r1": 1}
    assert journal.scan().records == []


@MODES
async def test_event_needs_exactly_201(mode, ledger, journal):
    ledger.expire("r1")
    ledger.script("event", Fault.raw(200, b'{"status": "APPLIED", "event_id": "e"}', apply=True))
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "event_applied"
    assert ledger.labels() == ["commit", "event_same_key", "event_same_key"]
    assert ledger.applied_events == {"r1": 1}


@MODES
async def test_journal_failure_does_not_prevent_settlement(mode, ledger, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    broken = Journal(blocker / "journal", base_url="http://cycles.test", tenant="acme")
    h = Harness(mode, ledger, broken)
    result = await h.commit()
    assert result.outcome == "committed"
    assert result.journal_error is not None
    assert not result.journaled


@MODES
async def test_without_journal_commit_still_retries(mode, ledger):
    ledger.script("commit", Fault.lost())
    h = Harness(mode, ledger, None)
    result = await h.commit()
    assert result.outcome == "committed"
    assert ledger.labels() == ["commit", "commit_same_key"]
    assert ledger.applied_commits == {"r1": 1}


@MODES
async def test_replay_without_journal_is_an_error(mode, ledger):
    h = Harness(mode, ledger, None)
    with pytest.raises(RuntimeError, match="no journal"):
        await h.replay()


@MODES
async def test_flush_is_bounded_and_keeps_records(mode, ledger, journal):
    ledger.script("commit", *[Fault.error(503, "INTERNAL_ERROR")] * 10)
    h = Harness(mode, ledger, journal, retry_policy=RetryPolicy(max_attempts=1, jitter=False))
    await h.commit("r1", "k1")
    await h.commit("r2", "k2")
    h.settlement.retry_policy = RetryPolicy(max_attempts=10, initial_delay_s=1.0, jitter=False)
    report = await h.flush(timeout_s=2.5)
    # each record retries only while its next backoff still ends before the deadline
    assert sum(h.sleeps) <= 2.5
    assert set(report.pending) == {"r1", "r2"}
    assert {r.reservation_id for r in journal.scan().records} == {"r1", "r2"}


@MODES
async def test_busy_records_are_skipped(mode, ledger, journal):
    ledger.script("commit", Fault.error(503, "INTERNAL_ERROR"))
    h = Harness(mode, ledger, journal, retry_policy=RetryPolicy(max_attempts=1))
    await h.commit()
    lock = journal.try_lock("r1")
    assert lock is not None
    report = await h.replay()
    assert report.busy == ["r1"]
    lock.release()
    report = await h.replay()
    assert report.settled == ["r1"]


@MODES
async def test_release_sends_a_fresh_key_and_reason(mode, ledger, journal):
    h = Harness(mode, ledger, journal)
    response = await h.release("r1", "tool failed")
    assert response.is_success
    (request,) = ledger.requests_to("release")
    assert request.body["reason"] == "tool failed"
    assert request.idempotency_key


def test_commit_rejects_a_non_commit_request(ledger):
    client = CyclesClient(CONFIG, transport=ledger.transport())
    settlement = Settlement(client)
    with pytest.raises(TypeError, match="CommitRequest"):
        settlement.commit("r1", {"actual": 1}, subject=SUBJECT, action=ACTION)  # type: ignore[arg-type]
    assert ledger.requests == []


def test_default_journal_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path))
    journal = default_journal(CONFIG)
    assert journal is not None
    assert journal.root == tmp_path
    monkeypatch.setenv("RUNCYCLES_JOURNAL", "off")
    assert default_journal(CONFIG) is None


async def test_async_journal_io_stays_off_the_event_loop(ledger, tmp_path, monkeypatch):
    # an fsynced journal-first write must not block the event loop
    journal = Journal.for_config(dataclasses.replace(CONFIG, journal_fsync=True), tmp_path)
    assert journal.fsync
    loop_thread = threading.get_ident()
    writer_threads: set[int] = set()
    real_write = Journal.write
    real_log_intent = Journal.log_intent

    def spy(self, record):
        writer_threads.add(threading.get_ident())
        return real_write(self, record)

    def spy_intent(self, record):
        writer_threads.add(threading.get_ident())
        return real_log_intent(self, record)

    monkeypatch.setattr(Journal, "write", spy)
    monkeypatch.setattr(Journal, "log_intent", spy_intent)
    h = Harness("async", ledger, journal)
    results = await asyncio.gather(*(h.commit(f"r{i}", f"k{i}") for i in range(5)))
    assert all(r.settled for r in results)
    assert writer_threads
    assert loop_thread not in writer_threads
    assert len(writer_threads) == 1  # one shared worker, not a thread per write


async def test_async_intent_log_file_io_stays_off_the_event_loop(ledger, tmp_path, monkeypatch):
    # without fsync an append to the open intent log is a memory copy and runs on the loop,
    # but opening the partition and its log file (the first append, or a full log) is file
    # I/O and runs on the journal's worker thread
    journal = Journal.for_config(CONFIG, tmp_path)
    assert not journal.fsync
    loop_thread = threading.get_ident()
    appends: list[tuple[int, bool]] = []  # (thread, the log was open with room before)
    real_log_intent = Journal.log_intent

    def spy_intent(self, record):
        appends.append((threading.get_ident(), self.can_log_intent_inline()))
        return real_log_intent(self, record)

    monkeypatch.setattr(Journal, "log_intent", spy_intent)
    h = Harness("async", ledger, journal)
    for i in range(3):
        assert (await h.commit(f"r{i}", f"k{i}")).settled
    first, *later = appends
    assert first[0] != loop_thread  # opened the log off the loop
    assert not first[1]
    assert len(later) == 2
    assert all(thread == loop_thread for thread, _ in later)  # then memory copies on it
    assert all(ready for _, ready in later)


@MODES
async def test_unreadable_answer_is_ambiguous_and_retried(mode, ledger, journal):
    garbled = Fault(
        "raw", status=200, content=b"not gzip", headers={"Content-Encoding": "gzip"}, apply=True
    )
    ledger.script("commit", garbled)
    h = Harness(mode, ledger, journal)
    result = await h.commit()
    assert result.outcome == "committed"
    assert ledger.labels() == ["commit", "commit_same_key"]
    assert ledger.applied_commits == {"r1": 1}


def test_client_subclasses_are_used_as_they_are(ledger):
    calls: list[str] = []

    class Traced(CyclesClient):
        # an override written before retry_policy= existed: it keeps its own retries
        def commit_reservation(self, reservation_id, request, *, headers=None):  # type: ignore[override]
            calls.append(reservation_id)
            return super().commit_reservation(reservation_id, request, headers=headers)

    client = Traced(CONFIG, transport=ledger.transport())
    settlement = Settlement(client)
    request = CommitRequest(idempotency_key="k", actual=Amount(unit=Unit.TOKENS, amount=1))
    assert settlement.commit("r1", request, subject=SUBJECT, action=ACTION).settled
    assert calls == ["r1"]


@MODES
async def test_journal_later_skips_disk_on_success(mode, ledger, journal, monkeypatch):
    writes: list[str] = []
    real_write = Journal.write

    def spy(self, record):
        writes.append(record.reservation_id)
        return real_write(self, record)

    monkeypatch.setattr(Journal, "write", spy)
    h = Harness(mode, ledger, journal, journal_first=False)
    assert (await h.commit()).outcome == "committed"
    assert writes == []


@MODES
async def test_journal_later_writes_once_the_first_attempt_fails(mode, ledger, journal):
    ledger.script("commit", *[Fault.error(503, "INTERNAL_ERROR")] * 4)
    h = Harness(mode, ledger, journal, journal_first=False)
    result = await h.commit()
    assert result.outcome == "pending"
    assert result.journaled
    (record,) = journal.scan().records
    assert record.idempotency_key == "key-1"
    assert record.attempts == 4
