"""Settle known spend exactly once: :class:`Settlement` and its async twin.

The client-recovery profile, core and durable levels, as ``docs/recovery.md`` describes it:
journal first (an I/O failure is reported in ``result.journal_error``, never blocks the
attempt), same-key retries, the durable switch to ``POST /v1/events`` after a 410. Known
spend is never released because an outcome is ambiguous or the credentials were refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol

import httpx

from runcycles import _fastpath
from runcycles.config import CyclesConfig
from runcycles.exceptions import CyclesError, CyclesTransportError, MalformedResponseError
from runcycles.journal import (
    IntentEntry,
    Journal,
    JournalRecord,
    JournalScan,
    QuarantinedRecord,
    RecordLock,
    SettlementMode,
    _aclaim,
    _claim_for_loop,
    _journal_executor,
    _release_each,
    _ReleaseOnExit,
    run_journal_io,
)
from runcycles.models import (
    Action,
    CommitOveragePolicy,
    CommitRequest,
    CommitResponse,
    ErrorCode,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    Subject,
)
from runcycles.retry import RetryPolicy, single_attempt_options

if TYPE_CHECKING:
    from runcycles.response import CyclesResponse

__all__ = [
    "AsyncSettlement",
    "ReplayReport",
    "Settlement",
    "SettlementOutcome",
    "SettlementResult",
    "UNDERSTOOD_REJECTIONS",
    "default_journal",
]

logger = logging.getLogger("runcycles.settlement")

SettlementOutcome = Literal["committed", "event_applied", "rejected", "pending", "observed"]

UNDERSTOOD_REJECTIONS: Final = ErrorCode.ALL - {
    ErrorCode.UNAUTHORIZED,
    ErrorCode.FORBIDDEN,
    ErrorCode.INTERNAL_ERROR,
    ErrorCode.LIMIT_EXCEEDED,
    ErrorCode.RESERVATION_EXPIRED,
}
"""Error codes after which retrying cannot help: the record is removed and the error surfaced."""


def default_journal(config: CyclesConfig) -> Journal | None:
    """Return the journal ``config`` asks for, or ``None`` when journaling is disabled.

    Reads ``config.journal_enabled`` / ``config.journal_dir`` when the config has them, and
    the environment variable ``RUNCYCLES_JOURNAL`` (``0``/``false``/``off`` disables).
    """
    enabled = getattr(config, "journal_enabled", True)
    if os.environ.get("RUNCYCLES_JOURNAL", "").strip().lower() in ("0", "false", "no", "off"):
        enabled = False
    if not enabled:
        return None
    return Journal.for_config(config, getattr(config, "journal_dir", None))


@dataclass(frozen=True)
class SettlementResult:
    """How one settlement ended.

    Attributes:
        reservation_id: The reservation settled.
        outcome: ``committed`` (200 COMMITTED), ``event_applied`` (201 APPLIED after the
            reservation expired), ``rejected`` (understood terminal error, record removed),
            ``pending`` (unresolved; the journal record, if any, is kept for replay) or
            ``observed`` (observe mode: nothing was held, nothing was sent).
        mode: ``commit`` or ``event`` (the mode of the last attempt).
        idempotency_key: The key every attempt used.
        attempts: Requests sent by this call.
        commit: The commit response on ``committed``.
        event: The event response on ``event_applied``.
        error: Why it is ``rejected`` or ``pending``.
        journaled: Whether a journal record remains on disk for a later replay.
        journal_error: A journal I/O failure (settlement went ahead without durability).
        not_before_ms: Earliest retry time (epoch ms) the server asked for, if any.
    """

    reservation_id: str
    outcome: SettlementOutcome
    mode: SettlementMode
    idempotency_key: str
    attempts: int
    commit: CommitResponse | None = None
    event: EventCreateResponse | None = None
    error: CyclesError | None = None
    journaled: bool = False
    journal_error: str | None = None
    not_before_ms: int | None = None

    @property
    def settled(self) -> bool:
        """Whether the spend reached the ledger (committed or applied as an event)."""
        return self.outcome in ("committed", "event_applied")

    def raise_for_error(self) -> SettlementResult:
        """Raise ``error`` unless settled; return ``self``.

        Raises:
            CyclesError: The settlement was rejected or is still pending.
        """
        if not self.settled and self.outcome != "observed":
            if self.error is not None:
                raise self.error
            raise CyclesError(f"settlement of {self.reservation_id!r} is {self.outcome}")
        return self


@dataclass
class ReplayReport:
    """What a :meth:`Settlement.replay` / :meth:`Settlement.flush` did.

    Attributes:
        results: One result per record attempted.
        not_due: Records skipped because their ``not_before_ms`` is in the future.
        busy: Records skipped because another worker holds them.
        deferred: Records not attempted because the time bound ran out.
        quarantined: Corrupt or unknown-version records moved aside.
        migrated: Legacy files moved to their standard names.
        conflicts: Legacy files kept because they collide with a different record.
    """

    results: list[SettlementResult] = field(default_factory=list)
    not_due: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def settled(self) -> list[str]:
        """Reservation ids whose spend reached the ledger."""
        return [r.reservation_id for r in self.results if r.settled]

    @property
    def pending(self) -> list[str]:
        """Reservation ids still unresolved (their records remain)."""
        unresolved = [r.reservation_id for r in self.results if r.outcome == "pending"]
        return unresolved + self.not_due + self.busy + self.deferred

    @property
    def rejected(self) -> list[str]:
        """Reservation ids removed after an understood terminal rejection."""
        return [r.reservation_id for r in self.results if r.outcome == "rejected"]


# --------------------------------------------------------------------------------------------
# Pure classification


VerdictKind = Literal["success", "retry", "expired", "terminal", "hold"]


class _Verdict(NamedTuple):
    kind: VerdictKind
    data: CommitResponse | EventCreateResponse | None
    error: CyclesError | None
    retry_after_ms: int | None


def _classify(response: CyclesResponse[Any], mode: SettlementMode) -> _Verdict:
    status = response.status
    expected = 200 if mode == "commit" else 201
    if response.is_success:
        if status == expected:
            try:
                return _Verdict("success", response.data, None, None)
            except CyclesError as exc:
                return _Verdict("retry", None, exc, None)
        ambiguous = MalformedResponseError(
            f"unexpected HTTP {status} (expected {expected}) from {response.method} "
            f"{response.url}; the outcome is ambiguous, retrying with the same key",
            status=status,
        )
        return _Verdict("retry", None, ambiguous, None)
    error = response.to_exception()
    if response.is_transport_error or 200 <= status < 300 or status >= 500:
        return _Verdict("retry", None, error, None)
    if status == 429:
        return _Verdict("retry", None, error, response.retry_after_ms)
    body = response.body or {}
    code = body.get("error") if isinstance(body.get("error"), str) else None
    if mode == "commit" and (status == 410 or code == ErrorCode.RESERVATION_EXPIRED):
        return _Verdict("expired", None, error, None)
    if status in (401, 403) or code in (ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN):
        return _Verdict("hold", None, error, None)
    if 400 <= status < 500 and code in UNDERSTOOD_REJECTIONS:
        return _Verdict("terminal", None, error, None)
    return _Verdict("hold", None, error, None)


def _unreadable(exc: httpx.HTTPError) -> _Verdict:
    error = CyclesTransportError(f"the answer could not be read ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return _Verdict("retry", None, error, None)


_FINAL: Final = frozenset({"committed", "event_applied", "rejected"})


class _Send(NamedTuple):
    """The next thing the driver loop must do."""

    delay_s: float  # wait this long, then send (or stop if ``stop`` is set)
    persist: bool  # write the record before going on
    stop: SettlementOutcome | None


class _Engine:
    """State of one settlement drive, shared by the sync and async loops (pure, no I/O)."""

    __slots__ = ("attempts", "commit", "deadline_s", "last", "policy", "record", "wall_s")

    def __init__(
        self,
        record: JournalRecord,
        policy: RetryPolicy,
        wall_s: Callable[[], float],
        deadline_s: float | None,
        commit: CommitRequest | None = None,
    ) -> None:
        self.record = record
        self.policy = policy
        self.wall_s = wall_s
        self.deadline_s = deadline_s
        self.attempts = 0
        self.last: _Verdict | None = None
        # The commit body (the record's commit fields never change, so it is built once;
        # the caller's own request when the record was just made from it).
        self.commit = commit

    def before_send(self) -> _Send:
        """Decide whether the first/next attempt may go now (honours ``not_before_ms``)."""
        wait_s = max(0.0, self.record.not_before_ms / 1000 - self.wall_s())
        if wait_s <= 0:
            return _Send(0.0, False, None)
        if wait_s > self.policy.retry_after_max_s or self._past_deadline(wait_s):
            return _Send(0.0, False, "pending")
        return _Send(wait_s, False, None)

    def after(self, verdict: _Verdict) -> _Send:
        """Decide what follows an attempt's verdict."""
        self.last = verdict
        record = self.record
        if verdict.kind == "success":
            return _Send(0.0, False, "committed" if record.mode == "commit" else "event_applied")
        record.last_error = None if verdict.error is None else str(verdict.error)[:500]
        if verdict.kind == "terminal":
            return _Send(0.0, False, "rejected")
        if verdict.kind == "expired":
            record.mode = "event"
            record.not_before_ms = 0
            return _Send(0.0, True, None)  # persist event mode BEFORE the event attempt
        if verdict.kind == "hold":
            return _Send(0.0, True, "pending")
        if verdict.retry_after_ms is not None:
            record.not_before_ms = int(self.wall_s() * 1000) + verdict.retry_after_ms
            delay_s = verdict.retry_after_ms / 1000
            if delay_s > self.policy.retry_after_max_s or self.attempts >= self.policy.max_attempts:
                return _Send(0.0, True, "pending")
            if self._past_deadline(delay_s):
                return _Send(0.0, True, "pending")
            return _Send(delay_s, True, None)  # persist the 429 floor before waiting
        if self.attempts >= self.policy.max_attempts:
            return _Send(0.0, True, "pending")
        delay_s = self.policy.backoff_s(self.attempts)
        if self._past_deadline(delay_s):
            return _Send(0.0, True, "pending")
        return _Send(delay_s, False, None)

    def request(self) -> CommitRequest | EventCreateRequest:
        self.attempts += 1
        record = self.record
        # A count that only grows from a valid one: skip the validated assignment.
        _fastpath.set_unchecked(record, "attempts", record.attempts + 1)
        if record.mode == "commit":
            if self.commit is None:
                self.commit = record.commit_request()
            return self.commit
        return record.event_request()

    def result(
        self, outcome: SettlementOutcome, journaled: bool, journal_error: str | None
    ) -> SettlementResult:
        """Return how the settlement ended, and log it."""
        verdict = self.last
        data = None if verdict is None else verdict.data
        error = (
            None if verdict is None or outcome in ("committed", "event_applied") else verdict.error
        )
        if outcome == "pending" and error is None and verdict is None:
            error = CyclesError(
                f"settlement of {self.record.reservation_id!r} must wait until "
                f"not_before_ms={self.record.not_before_ms} (server Retry-After)"
            )
        result = SettlementResult(
            reservation_id=self.record.reservation_id,
            outcome=outcome,
            mode=self.record.mode,
            idempotency_key=self.record.idempotency_key,
            attempts=self.attempts,
            commit=data if isinstance(data, CommitResponse) else None,
            event=data if isinstance(data, EventCreateResponse) else None,
            error=error,
            journaled=journaled,
            journal_error=journal_error,
            not_before_ms=self.record.not_before_ms or None,
        )
        _log_outcome(result)
        return result

    def _past_deadline(self, delay_s: float) -> bool:
        return self.deadline_s is not None and self.wall_s() + delay_s > self.deadline_s


def _log_outcome(result: SettlementResult) -> None:
    if result.settled:
        logger.debug("settled reservation %s: %s", result.reservation_id, result.outcome)
    elif result.outcome == "rejected":
        logger.error(
            "settlement of reservation %s rejected by the server: %s",
            result.reservation_id,
            result.error,
        )
    else:
        logger.warning(
            "settlement of reservation %s is pending after %d attempt(s) (%s); %s",
            result.reservation_id,
            result.attempts,
            result.error,
            "the journal keeps it for replay"
            if result.journaled
            else "no journal record: it is NOT recoverable after this process exits",
        )


def _record_for(
    reservation_id: str,
    request: CommitRequest,
    subject: Subject | None,
    action: Action | None,
    overage_policy: CommitOveragePolicy | None,
    journal: Journal | None = None,
) -> JournalRecord:
    if not isinstance(request, CommitRequest):
        raise TypeError(
            f"request must be a CommitRequest, got {type(request).__name__}; build it with "
            "CommitRequest(idempotency_key=..., actual=Amount(...))"
        )
    return JournalRecord.for_commit(
        reservation_id,
        request,
        subject=subject,
        action=action,
        overage_policy=overage_policy,
        server=getattr(journal, "server", None),  # set now: no re-validated assignment later
    )


def _policy_for(client: object, policy: RetryPolicy | None) -> RetryPolicy:
    if policy is not None:
        return policy
    config = getattr(client, "config", None)
    return RetryPolicy.from_config(config) if isinstance(config, CyclesConfig) else RetryPolicy()


# --------------------------------------------------------------------------------------------
# Sync


class _SyncClient(Protocol):
    def commit_reservation(
        self, reservation_id: str, request: CommitRequest
    ) -> CyclesResponse[CommitResponse]: ...

    def create_event(self, request: EventCreateRequest) -> CyclesResponse[EventCreateResponse]: ...

    def release_reservation(
        self, reservation_id: str, request: ReleaseRequest
    ) -> CyclesResponse[ReleaseResponse]: ...


class _AsyncClient(Protocol):
    async def commit_reservation(
        self, reservation_id: str, request: CommitRequest
    ) -> CyclesResponse[CommitResponse]: ...

    async def create_event(
        self, request: EventCreateRequest
    ) -> CyclesResponse[EventCreateResponse]: ...

    async def release_reservation(
        self, reservation_id: str, request: ReleaseRequest
    ) -> CyclesResponse[ReleaseResponse]: ...


class _Setup:
    """What :class:`Settlement` and :class:`AsyncSettlement` set up alike."""

    def _setup(
        self,
        client: _SyncClient | _AsyncClient,
        journal: Journal | None,
        retry_policy: RetryPolicy | None,
        wall_clock: Callable[[], float],
        journal_first: bool,
    ) -> None:
        self.journal = journal
        self.journal_first = journal_first
        self.retry_policy = _policy_for(client, retry_policy)
        self._wall = wall_clock
        # single attempts on the client's pool: the engine runs its own retry schedule
        self._commit_options = single_attempt_options(client.commit_reservation)
        self._event_options = single_attempt_options(client.create_event)

    def _due(
        self,
        records: list[JournalRecord],
        report: ReplayReport,
        created_before_ms: int | None,
        deadline_s: float | None,
    ) -> Iterator[str]:
        """Yield the ids of the records to replay now; report the deferred and not due."""
        for record in records:
            rid = record.reservation_id
            if created_before_ms is not None and record.created_at_ms >= created_before_ms:
                continue
            if deadline_s is not None and self._wall() >= deadline_s:
                report.deferred.append(rid)
            elif record.not_before_ms > self._wall() * 1000:
                report.not_due.append(rid)
            else:
                yield rid


def _journal_failed(record: JournalRecord, exc: OSError) -> tuple[bool, str | None]:
    logger.error(
        "could not journal the settlement of %s (%s); settling without durability",
        record.reservation_id,
        exc,
    )
    return False, f"journal write failed: {exc}"


def _release_request(reason: str | None, idempotency_key: str | None) -> ReleaseRequest:
    key = idempotency_key or f"release-{uuid.uuid4().hex}"
    return ReleaseRequest(idempotency_key=key, reason=reason)


class Settlement(_Setup):
    """Commit known spend durably and exactly once, on top of a sync client.

    Args:
        client: A :class:`~runcycles.CyclesClient`. Settlement sends single attempts on its
            connection pool and runs its own retry loop (so a 429 floor can be persisted).
        journal: Where unresolved settlements are kept (``None``: no durability; see
            :func:`default_journal`).
        retry_policy: Attempts and backoff (default: from the client's config).
        sleep: Blocking sleep in seconds (injectable for tests).
        wall_clock: Wall-clock time in seconds, used for the persisted ``not_before_ms``.
        journal_first: Write the record before the first request (the default); ``False``
            writes it only once the first attempt did not settle (``docs/recovery.md``).
    """

    def __init__(
        self,
        client: _SyncClient,
        *,
        journal: Journal | None = None,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        journal_first: bool = True,
    ) -> None:
        self._client = client
        self._sleep = sleep
        self._setup(client, journal, retry_policy, wall_clock, journal_first)

    def commit(
        self,
        reservation_id: str,
        request: CommitRequest,
        *,
        subject: Subject | None,
        action: Action | None,
        overage_policy: CommitOveragePolicy | None = None,
    ) -> SettlementResult:
        """Settle ``request`` for a reservation: journal, commit, event fallback.

        Never raises for server or network failures; check ``result.settled`` or call
        ``result.raise_for_error()``. Every attempt uses ``request.idempotency_key``. The
        reservation's ``subject``, ``action`` and ``overage_policy`` build the event fallback
        (without a subject or action an expired reservation cannot be settled: kept).

        Raises:
            TypeError: ``request`` is not a :class:`~runcycles.models.CommitRequest`.
        """
        record = _record_for(reservation_id, request, subject, action, overage_policy, self.journal)
        journal_error = None
        journaled = False
        locks: list[RecordLock | None] = []
        intents: list[IntentEntry] = []
        if self.journal is not None and self.journal_first:
            journaled, journal_error = self._journal_now(record, locks, intents)
        try:
            first = request if type(request) is CommitRequest else None  # sent as built
            return self._drive(record, journaled, journal_error, None, locks, intents, first)
        finally:
            for entry in intents:
                _close_intent(self.journal, entry, locks)
            for lock in locks:
                if lock is not None:
                    lock.release()

    def _journal_now(
        self,
        record: JournalRecord,
        locks: list[RecordLock | None],
        intents: list[IntentEntry] | None = None,
    ) -> tuple[bool, str | None]:
        journal = self.journal
        assert journal is not None
        try:
            if intents is not None and journal.uses_intent_log:
                intents.append(journal.log_intent(record))
            else:
                locks.append(_lock_and_write(journal, record))
        except OSError as exc:
            return _journal_failed(record, exc)
        return True, None

    def replay(
        self, *, deadline_s: float | None = None, created_before_ms: int | None = None
    ) -> ReplayReport:
        """Replay every due record of the journal (e.g. at start-up, after a crash).

        No new attempt starts after ``deadline_s`` (wall clock); ``created_before_ms`` limits
        it to the records created before then (e.g. those left by earlier processes).

        Raises:
            RuntimeError: The settlement has no journal.
        """
        journal = _require_journal(self.journal)
        scan = journal.scan()
        report = _report_from_scan(scan)
        for rid in self._due(scan.records, report, created_before_ms, deadline_s):
            lock = journal.try_lock(rid)
            if lock is None:
                report.busy.append(rid)
                continue
            with lock:
                try:
                    current = journal.read(rid)
                except ValueError as exc:
                    report.quarantined.append(journal.quarantine(journal.path_for(rid), str(exc)))
                    continue
                if current is None:
                    continue  # settled by another worker meanwhile
                report.results.append(self._drive(current, True, None, deadline_s))
        return report

    def flush(
        self, timeout_s: float = 10.0, *, created_before_ms: int | None = None
    ) -> ReplayReport:
        """Replay what is left in the journal, giving up after ``timeout_s`` (records stay).

        ``created_before_ms`` is as for :meth:`replay`.
        """
        return self.replay(deadline_s=self._wall() + timeout_s, created_before_ms=created_before_ms)

    def release(
        self,
        reservation_id: str,
        reason: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> CyclesResponse[ReleaseResponse]:
        """Give an unused reservation back (the client retries transient failures).

        Only for work that spent nothing; never for an ambiguous or failed commit.
        """
        request = _release_request(reason, idempotency_key)
        return self._client.release_reservation(reservation_id, request)

    def _drive(
        self,
        record: JournalRecord,
        journaled: bool,
        journal_error: str | None,
        deadline_s: float | None,
        locks: list[RecordLock | None] | None = None,
        intents: list[IntentEntry] | None = None,
        commit: CommitRequest | None = None,
    ) -> SettlementResult:
        engine = _Engine(record, self.retry_policy, self._wall, deadline_s, commit)
        entry = intents[0] if intents else None
        step = engine.before_send()
        while step.stop is None:
            if step.persist and journaled:
                journal_error = self._persist(record, locks, entry) or journal_error
            if step.delay_s > 0:
                self._sleep(step.delay_s)
            try:
                request = engine.request()
            except ValueError as exc:
                engine.last = _Verdict("hold", None, CyclesError(str(exc)), None)
                step = _Send(0.0, True, "pending")
                break
            try:
                if isinstance(request, CommitRequest):
                    response: CyclesResponse[Any] = self._client.commit_reservation(
                        record.reservation_id, request, **self._commit_options
                    )
                else:
                    response = self._client.create_event(request, **self._event_options)
                verdict = _classify(response, record.mode)
            except httpx.HTTPError as exc:  # e.g. an undecodable answer: ambiguous
                verdict = _unreadable(exc)
            step = engine.after(verdict)
            late = locks is not None and self.journal is not None and not journaled
            if late and step.stop not in _FINAL:
                assert locks is not None
                journaled, journal_error = self._journal_now(record, locks)  # late journal
        outcome = step.stop
        assert outcome is not None
        if journaled and self.journal is not None:
            if outcome != "pending":
                journaled = False
                if _has_record_file(entry):
                    journal_error = self._persist(record, remove=True) or journal_error
            elif step.persist or (entry is not None and not entry.materialized):
                journal_error = self._persist(record, locks, entry) or journal_error
        return engine.result(outcome, journaled, journal_error)

    def _persist(
        self,
        record: JournalRecord,
        locks: list[RecordLock | None] | None = None,
        entry: IntentEntry | None = None,
        *,
        remove: bool = False,
    ) -> str | None:
        """Write, move to its record file, or (``remove``) delete the settlement's record."""
        assert self.journal is not None
        try:
            if remove:
                self.journal.remove(record.reservation_id)
            elif entry is not None and not entry.materialized:
                _materialize(self.journal, entry, locks)
            else:
                self.journal.write(record)
        except OSError as exc:
            logger.error("journal update for %s failed: %s", record.reservation_id, exc)
            return f"journal update failed: {exc}"
        return None


# --------------------------------------------------------------------------------------------
# Async


class AsyncSettlement(_Setup):
    """The asyncio twin of :class:`Settlement`; journal I/O never runs on the event loop.

    Args:
        client: An :class:`~runcycles.AsyncCyclesClient`.
        journal: As for :class:`Settlement`.
        retry_policy: As for :class:`Settlement`.
        sleep: Async sleep in seconds (injectable for tests).
        wall_clock: As for :class:`Settlement`.
        journal_first: As for :class:`Settlement`.
    """

    def __init__(
        self,
        client: _AsyncClient,
        *,
        journal: Journal | None = None,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        journal_first: bool = True,
    ) -> None:
        self._client = client
        self._sleep = sleep
        self._setup(client, journal, retry_policy, wall_clock, journal_first)

    async def commit(
        self,
        reservation_id: str,
        request: CommitRequest,
        *,
        subject: Subject | None,
        action: Action | None,
        overage_policy: CommitOveragePolicy | None = None,
    ) -> SettlementResult:
        """Settle ``request`` for a reservation; see :meth:`Settlement.commit`."""
        record = _record_for(reservation_id, request, subject, action, overage_policy, self.journal)
        journal_error = None
        journaled = False
        locks: list[RecordLock | None] = []
        intents: list[IntentEntry] = []
        try:
            if self.journal is not None and self.journal_first:
                journaled, journal_error = await self._journal_now(record, locks, intents)
            first = request if type(request) is CommitRequest else None  # sent as built
            result = await self._drive(
                record, journaled, journal_error, None, locks, intents, first
            )
        except BaseException as exc:  # cancelled, the loop closing, a bug in a transport
            if locks or intents:
                await _aclose(self.journal, intents, locks, closing=isinstance(exc, GeneratorExit))
            raise
        if locks or (intents and not (intents[0].finished or intents[0].materialized)):
            await _aclose(self.journal, intents, locks)  # a record file, or its write failed
        else:  # the common path: resolving the intent is a memory copy, on the loop
            for entry in intents:
                _close_intent(self.journal, entry, locks)
        return result

    async def _journal_now(
        self,
        record: JournalRecord,
        locks: list[RecordLock | None],
        intents: list[IntentEntry] | None = None,
    ) -> tuple[bool, str | None]:
        journal = self.journal
        assert journal is not None
        try:
            if intents is not None and journal.uses_intent_log:
                # A memory copy into the open log runs on the loop; opening the folder or a
                # new log file, or waiting for an fsync, runs on the journal's I/O thread.
                if journal.can_log_intent_inline():
                    intents.append(journal.log_intent(record))
                else:
                    intents.append(await run_journal_io(journal.log_intent, record))
            else:
                locks.append(await _aclaim(_lock_and_write, journal, record))
        except OSError as exc:
            return _journal_failed(record, exc)
        return True, None

    async def replay(
        self, *, deadline_s: float | None = None, created_before_ms: int | None = None
    ) -> ReplayReport:
        """Replay every due record of the journal; see :meth:`Settlement.replay`."""
        journal = _require_journal(self.journal)
        scan = await run_journal_io(journal.scan)
        report = _report_from_scan(scan)
        for rid in self._due(scan.records, report, created_before_ms, deadline_s):
            lock = await _aclaim(_claim_for_loop, journal, rid)  # never lost to a cancellation
            if lock is None:
                report.busy.append(rid)
                continue
            async with _ReleaseOnExit(lock):  # even if cancelled, or the loop closes meanwhile
                try:
                    current = await run_journal_io(journal.read, rid)
                except ValueError as exc:
                    path = journal.path_for(rid)
                    report.quarantined.append(
                        await run_journal_io(journal.quarantine, path, str(exc))
                    )
                    continue
                if current is None:
                    continue
                report.results.append(await self._drive(current, True, None, deadline_s))
        return report

    async def flush(
        self, timeout_s: float = 10.0, *, created_before_ms: int | None = None
    ) -> ReplayReport:
        """Async twin of :meth:`Settlement.flush`."""
        return await self.replay(
            deadline_s=self._wall() + timeout_s, created_before_ms=created_before_ms
        )

    async def release(
        self,
        reservation_id: str,
        reason: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> CyclesResponse[ReleaseResponse]:
        """Give an unused reservation back; see :meth:`Settlement.release`."""
        request = _release_request(reason, idempotency_key)
        return await self._client.release_reservation(reservation_id, request)

    async def _drive(
        self,
        record: JournalRecord,
        journaled: bool,
        journal_error: str | None,
        deadline_s: float | None,
        locks: list[RecordLock | None] | None = None,
        intents: list[IntentEntry] | None = None,
        commit: CommitRequest | None = None,
    ) -> SettlementResult:
        engine = _Engine(record, self.retry_policy, self._wall, deadline_s, commit)
        entry = intents[0] if intents else None
        step = engine.before_send()
        while step.stop is None:
            if step.persist and journaled:
                journal_error = await self._persist(record, locks, entry) or journal_error
            if step.delay_s > 0:
                await self._sleep(step.delay_s)
            try:
                request = engine.request()
            except ValueError as exc:
                engine.last = _Verdict("hold", None, CyclesError(str(exc)), None)
                step = _Send(0.0, True, "pending")
                break
            try:
                if isinstance(request, CommitRequest):
                    response: CyclesResponse[Any] = await self._client.commit_reservation(
                        record.reservation_id, request, **self._commit_options
                    )
                else:
                    response = await self._client.create_event(request, **self._event_options)
                verdict = _classify(response, record.mode)
            except httpx.HTTPError as exc:  # e.g. an undecodable answer: ambiguous
                verdict = _unreadable(exc)
            step = engine.after(verdict)
            late = locks is not None and self.journal is not None and not journaled
            if late and step.stop not in _FINAL:
                assert locks is not None
                journaled, journal_error = await self._journal_now(record, locks)  # late
        outcome = step.stop
        assert outcome is not None
        if journaled and self.journal is not None:
            if outcome != "pending":
                journaled = False
                if _has_record_file(entry):
                    journal_error = await self._persist(record, remove=True) or journal_error
            elif step.persist or (entry is not None and not entry.materialized):
                journal_error = await self._persist(record, locks, entry) or journal_error
        return engine.result(outcome, journaled, journal_error)

    async def _persist(
        self,
        record: JournalRecord,
        locks: list[RecordLock | None] | None = None,
        entry: IntentEntry | None = None,
        *,
        remove: bool = False,
    ) -> str | None:
        """Async twin of :meth:`Settlement._persist` (the I/O runs on the journal's thread)."""
        assert self.journal is not None
        try:
            if remove:
                await run_journal_io(self.journal.remove, record.reservation_id)
            elif entry is not None and not entry.materialized:
                assert locks is not None
                locks.append(await _aclaim(_materialize_for_loop, self.journal, entry))
            else:
                await run_journal_io(self.journal.write, record)
        except OSError as exc:
            logger.error("journal update for %s failed: %s", record.reservation_id, exc)
            return f"journal update failed: {exc}"
        return None


def _has_record_file(entry: IntentEntry | None) -> bool:
    """Mark a finished settlement's intent (if any) done; return whether a record file holds it."""
    if entry is not None:
        entry.finished = True
    return entry is None or entry.materialized


def _materialize(
    journal: Journal | None, entry: IntentEntry, locks: list[RecordLock | None] | None
) -> None:
    """Move a settlement from the intent log to its own (locked) record file."""
    assert journal is not None
    assert locks is not None
    locks.append(_lock_and_write(journal, entry.record))
    entry.materialized = True


def _close_intent(
    journal: Journal | None, entry: IntentEntry, locks: list[RecordLock | None]
) -> None:
    """Resolve an intent after its settlement; if the settlement raised, keep it on file."""
    assert journal is not None
    try:
        if not entry.finished and not entry.materialized:  # the drive raised
            _materialize(journal, entry, locks)
        journal.resolve_intent(entry)
    except OSError as exc:  # the open intent stays: a later scan recovers it
        logger.error("journal update for %s failed: %s", entry.record.reservation_id, exc)


def _lock_and_write(
    journal: Journal, record: JournalRecord, loop: asyncio.AbstractEventLoop | None = None
) -> RecordLock | None:
    """Claim ``record``'s file and write it (``loop``: the claim of an async commit on it)."""
    rid = record.reservation_id
    lock = journal.try_lock(rid) if loop is None else _claim_for_loop(journal, rid, loop)
    try:
        journal.write(record)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _materialize_for_loop(
    journal: Journal, entry: IntentEntry, loop: asyncio.AbstractEventLoop
) -> RecordLock | None:
    """:func:`_materialize` for an async commit on ``loop`` (runs on the I/O thread)."""
    lock = _lock_and_write(journal, entry.record, loop)
    entry.materialized = True
    return lock


async def _aclose(
    journal: Journal | None,
    intents: list[IntentEntry],
    locks: list[RecordLock | None],
    *,
    closing: bool = False,
) -> None:
    """End an async commit that wrote a record file or did not finish: on the I/O thread.

    Resolves its intents (keeping an unfinished settlement in a record file) and releases
    its claims, behind the journal I/O the commit queued there (one still being made is
    released by ``journal._aclaim``). The job is queued before anything is awaited, so a
    second cancellation cannot skip it, and ``closing`` (the coroutine is being closed,
    its loop maybe gone) does not wait for it.
    """
    try:
        job = _journal_executor().submit(_close_claims, journal, intents, locks)
    except RuntimeError:  # no new jobs at interpreter exit
        _close_claims(journal, intents, locks)
        return
    if not closing:
        await asyncio.shield(asyncio.wrap_future(job))


def _close_claims(
    journal: Journal | None, intents: list[IntentEntry], locks: list[RecordLock | None]
) -> None:
    try:
        for entry in intents:
            _close_intent(journal, entry, locks)
    finally:
        _release_each([lock for lock in locks if lock is not None])


def _require_journal(journal: Journal | None) -> Journal:
    if journal is None:
        raise RuntimeError(
            "this settlement has no journal, so there is nothing to replay; pass "
            "journal=Journal.for_config(config) (or default_journal(config))"
        )
    return journal


def _report_from_scan(scan: JournalScan) -> ReplayReport:
    return ReplayReport(
        quarantined=list(scan.quarantined),
        migrated=[str(path) for path in scan.migrated],
        conflicts=[str(path) for path in scan.conflicts],
    )
