"""The store interface, and the shared orchestration of row-based stores.

A *store* owns persistence and atomicity; the protocol's rules live in
:mod:`runcycles_server.ledger`. Every mutating method follows the same shape::

    in one atomic step:
        now = store clock
        same-key replay?  -> ledger.replay(...)            (nothing written)
        load rows         -> ledger.plan_<op>(rows, now)    (raises LedgerError: nothing written)
        write outcome's rows
    return the Outcome (status + exact body bytes)

:class:`Store` is the interface the ASGI app uses. It is ``async`` so a network store (Redis)
can await I/O, while an embedded store (SQLite) runs each short transaction inline on the event
loop thread: a transaction takes tens of microseconds, far less than handing it to a thread.

:class:`RowStore` implements every operation of :class:`Store` once, on top of a handful of
synchronous row primitives (``_get_budgets``, ``_get_reservation``, ``_apply`` ...) and a
``_write()`` transaction context. The SQLite store and the in-memory model store implement only
those primitives. A Redis store implements :class:`Store` directly: each mutating method becomes
one Lua script doing the same load/check/write steps, with the math of the ``ledger`` module
re-expressed in Lua (its docstrings specify every formula and check order).

Group commit: ``RowStore`` runs the runtime mutations (decide, reserve, commit, release, extend,
event) that queue up while the event loop is busy in one write transaction, answering each
only after that transaction committed (``RowStore._mutate``).

Time: every decision uses ``store.clock()`` (epoch milliseconds), injectable for tests, so
expiry tests never sleep.
"""

from __future__ import annotations

import asyncio
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from runcycles.models import (
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
)
from runcycles_server import ledger
from runcycles_server.ledger import (
    ApiKeyRow,
    AuditRow,
    BudgetRow,
    EventRow,
    IdempotencyRow,
    LedgerError,
    Outcome,
    ReservationRow,
    TenantRow,
)

Clock = Callable[[], int]
"""Returns the current time in epoch milliseconds."""

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The backing store did not answer: down, hung past its timeout, or refusing connections.

    Stores may raise it (or list their own client library's equivalents in an
    ``unavailable_errors`` tuple attribute); the app answers such a request ``503`` with
    ``Retry-After`` and logs the outage once instead of a traceback per request (see
    :mod:`runcycles_server.health`). Whether the operation was applied is unknown, as after
    any timeout: clients retry it with the same idempotency key.
    """


def system_clock() -> int:
    """Return the wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def new_id(prefix: str) -> str:
    """Return a new opaque identifier such as ``rsv_0195f2...``.

    The first 12 hex digits are the creation time in milliseconds, so ids sort roughly by time
    and new rows land next to each other in indexes; the other 80 bits are random.
    """
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


@dataclass(slots=True)
class Page(Generic[T]):
    """One page of a listing. ``next_cursor`` is ``None`` on the last page."""

    items: list[T]
    next_cursor: str | None = None


@dataclass(slots=True)
class ReservationQuery:
    """Filters of ``GET /v1/reservations`` (all optional but ``tenant_id``; AND semantics).

    Time bounds are inclusive epoch milliseconds. ``subject`` maps a standard level to the exact
    value to match. ``sort_by`` is one of :data:`RESERVATION_SORT_KEYS`.
    """

    tenant_id: str
    idempotency_key: str | None = None
    status: str | None = None
    subject: dict[str, str] = field(default_factory=dict)
    created_from_ms: int | None = None
    created_to_ms: int | None = None
    expires_from_ms: int | None = None
    expires_to_ms: int | None = None
    finalized_from_ms: int | None = None
    finalized_to_ms: int | None = None
    sort_by: str = "created_at_ms"
    sort_desc: bool = True
    limit: int = 50
    cursor: str | None = None


RESERVATION_SORT_KEYS = (
    "reservation_id",
    "tenant",
    "scope_path",
    "status",
    "reserved",
    "created_at_ms",
    "expires_at_ms",
)


@dataclass(slots=True)
class AuthRecord:
    """An API key found by its hash.

    ``tenant`` is optional: a store may include the key's tenant when it has it for free; the
    app does not rely on it (tenant status is enforced inside each operation).
    """

    key: ApiKeyRow
    tenant: TenantRow | None = None


class Store(Protocol):
    """Everything the ASGI app needs from persistence.

    Mutating runtime methods return an :class:`~runcycles_server.ledger.Outcome` (HTTP status
    and exact body) or raise :class:`~runcycles_server.ledger.LedgerError`. Each is one atomic
    step, concurrency-safe across processes sharing the same backing store.
    """

    clock: Clock

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> bool:
        """Return whether the backing store answers (readiness)."""

    async def authenticate(self, key_hash: str) -> AuthRecord | None:
        """Return the API key with this sha256 hash (any status), or ``None``."""

    async def decide(self, tenant_id: str, request: DecisionRequest, request_hash: str) -> Outcome:
        """``POST /v1/decide``."""

    async def reserve(
        self, tenant_id: str, request: ReservationCreateRequest, request_hash: str
    ) -> Outcome:
        """``POST /v1/reservations`` (live or dry run)."""

    async def commit(
        self, tenant_id: str, reservation_id: str, request: CommitRequest, request_hash: str
    ) -> Outcome:
        """``POST /v1/reservations/{id}/commit``."""

    async def release(
        self,
        tenant_id: str | None,
        reservation_id: str,
        request: ReleaseRequest,
        request_hash: str,
        *,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> Outcome:
        """``POST /v1/reservations/{id}/release``; ``tenant_id=None`` = audited admin release."""

    async def extend(
        self,
        tenant_id: str,
        reservation_id: str,
        request: ReservationExtendRequest,
        request_hash: str,
    ) -> Outcome:
        """``POST /v1/reservations/{id}/extend``."""

    async def create_event(
        self, tenant_id: str, request: EventCreateRequest, request_hash: str
    ) -> Outcome:
        """``POST /v1/events``."""

    async def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        """Return a reservation by id (any tenant; the caller checks ownership)."""

    async def list_reservations(self, query: ReservationQuery) -> Page[ReservationRow]:
        """Return one page of a tenant's reservations.

        Raises:
            LedgerError: INVALID_REQUEST for a malformed or mismatched cursor.
        """

    async def list_balances(
        self, tenant_id: str, segments: Sequence[str], limit: int, cursor: str | None
    ) -> Page[BudgetRow]:
        """Return a tenant's budgets whose scope contains every ``level:value`` segment."""

    async def expire_due(self, limit: int = 200) -> int:
        """Expire up to ``limit`` ACTIVE reservations past expiry + grace; return how many."""

    async def purge_idempotency(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` idempotency records past retention; return how many."""

    # -- admin ------------------------------------------------------------------------------

    async def create_tenant(self, row: TenantRow) -> tuple[TenantRow, bool]:
        """Insert a tenant; return ``(tenant, created)``. An identical existing one is returned.

        Raises:
            LedgerError: DUPLICATE_RESOURCE if the id exists with a different name.
        """

    async def get_tenant(self, tenant_id: str) -> TenantRow | None:
        """Return a tenant or ``None``."""

    async def list_tenants(
        self, status: str | None, limit: int, cursor: str | None
    ) -> Page[TenantRow]:
        """Return one page of tenants ordered by id."""

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any]) -> TenantRow:
        """Apply field changes; ``status=CLOSED`` cascades atomically (see RowStore).

        Raises:
            LedgerError: NOT_FOUND, or INVALID_REQUEST for reopening a closed tenant.
        """

    async def create_api_key(self, row: ApiKeyRow) -> ApiKeyRow:
        """Insert an API key (hash only).

        Raises:
            LedgerError: TENANT_NOT_FOUND / TENANT_CLOSED.
        """

    async def list_api_keys(
        self, tenant_id: str | None, status: str | None, limit: int, cursor: str | None
    ) -> Page[ApiKeyRow]:
        """Return one page of API keys ordered by id."""

    async def revoke_api_key(self, key_id: str, reason: str | None) -> ApiKeyRow:
        """Revoke a key.

        Raises:
            LedgerError: NOT_FOUND, or KEY_REVOKED if it already was.
        """

    async def create_budget(self, row: BudgetRow) -> BudgetRow:
        """Insert a budget ledger.

        Raises:
            LedgerError: TENANT_NOT_FOUND (400), tenant not ACTIVE (400/409), DUPLICATE_RESOURCE.
        """

    async def get_budget(self, scope: str, unit: str) -> BudgetRow | None:
        """Return one budget or ``None``."""

    async def list_budgets(
        self,
        tenant_id: str | None,
        *,
        scope_prefix: str | None,
        unit: str | None,
        status: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[BudgetRow]:
        """Return one page of budgets ordered by (scope, unit)."""

    async def update_budget(
        self, scope: str, unit: str, tenant_id: str | None, changes: dict[str, Any]
    ) -> BudgetRow:
        """Update budget properties (overdraft_limit, commit_overage_policy, caps, metadata).

        Recomputes ``is_over_limit = debt > overdraft_limit`` when the limit changes.

        Raises:
            LedgerError: NOT_FOUND / FORBIDDEN.
        """

    async def fund_budget(
        self,
        tenant_id: str | None,
        scope: str,
        unit: str,
        *,
        operation: str,
        amount: int,
        spent: int | None,
        idempotency_key: str | None,
        request_hash: str,
        timestamp: str,
    ) -> Outcome:
        """Apply a funding operation (see :func:`ledger.plan_fund`), idempotent by key."""


@runtime_checkable
class AuditReader(Protocol):
    """Optional store capability: list audit entries (``GET /v1/admin/audit/logs``)."""

    async def list_audit_logs(
        self, tenant_id: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRow]:
        """Return one page of audit entries, newest first."""


@runtime_checkable
class RetentionPurger(Protocol):
    """Optional store capability: delete finished reservations and events past a retention.

    Stores that expire such rows themselves (Redis, by key TTL) do not implement it.
    """

    async def purge_finished(self, retention_ms: int, limit: int = 500) -> int:
        """Delete old finished data in one short transaction; return how many rows went.

        Deletes up to ``limit`` finished (COMMITTED, RELEASED or EXPIRED) reservations whose
        deadline (``expires_at + grace``, never earlier than when they finished) is more than
        ``retention_ms`` in the past, together with their idempotency records (reserve,
        commit, release and extend replays), and up to ``limit`` event records created more
        than ``retention_ms`` ago. ACTIVE reservations, budgets, tenants, keys and the audit
        log are never touched.
        """


GROUP_MAX = 64
"""Most runtime mutations group-committed in one transaction (see ``RowStore._mutate``)."""


@dataclass(slots=True)
class _Pending:
    run: Callable[[], Outcome]
    future: asyncio.Future[Outcome]


def _settle(future: asyncio.Future[Outcome], answer: Outcome | BaseException) -> None:
    if future.done():  # the caller was cancelled; the mutation stands (idempotent retries)
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


class RowStore(ABC):
    """Implements :class:`Store` once on top of synchronous row primitives.

    Subclasses provide ``_write()`` (an exclusive transaction), ``_read()`` (a consistent read)
    and the ``_get_*`` / ``_put_*`` / ``_apply`` primitives. Methods are ``async`` but never
    await inside a transaction, so on one event loop two transactions never interleave.
    """

    clock: Clock
    auth_epoch: int
    """Bumped whenever an existing API key changes (revocation, tenant close), so a cache of
    authenticated keys in this process (see ``web.Authenticator``) drops stale entries."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or system_clock
        self.auth_epoch = 0
        self._pending: list[_Pending] = []
        self._flush_scheduled = False

    # -- group commit --------------------------------------------------------------------------

    async def _mutate(self, run: Callable[[], Outcome]) -> Outcome:
        """Run one runtime mutation in this process's next group-committed transaction.

        ``run`` does the operation's reads, planning and writes (no ``await``). Mutations
        submitted while the event loop is busy are run back to back, up to :data:`GROUP_MAX`,
        in **one** write transaction, and each caller gets its answer only after that
        transaction committed: one ``BEGIN``/``COMMIT`` (and one cross-process lock hand-off)
        per group instead of per request, the largest single cost of a mutation. Each mutation
        still sees the writes of the ones before it, exactly as in sequential transactions.
        A refusal (:class:`~runcycles_server.ledger.LedgerError`) is raised by ``run`` before
        it writes anything, so it fails alone; any other error rolls the group back, and the
        group's mutations are then retried one transaction each, so only the failing one fails.
        """
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(run, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            future.get_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        group, self._pending = self._pending[:GROUP_MAX], self._pending[GROUP_MAX:]
        if self._pending:
            self._flush_scheduled = True
            group[0].future.get_loop().call_soon(self._flush)
        answers: list[Outcome | LedgerError] = []
        try:
            with self._write():
                for op in group:
                    try:
                        answers.append(op.run())
                    except LedgerError as exc:
                        answers.append(exc)
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0].future, exc)
                return
            for op in group:  # find the culprit: one transaction each
                try:
                    with self._write():
                        outcome = op.run()
                except Exception as one:
                    _settle(op.future, one)
                else:
                    _settle(op.future, outcome)
            return
        for op, answer in zip(group, answers, strict=True):
            _settle(op.future, answer)

    # -- primitives ---------------------------------------------------------------------------

    @abstractmethod
    def _write(self) -> AbstractContextManager[None]:
        """Return a context manager holding the exclusive write transaction."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[None]:
        """Return a context manager for a consistent read."""

    @abstractmethod
    def _get_tenant(self, tenant_id: str) -> TenantRow | None: ...

    @abstractmethod
    def _put_tenant(self, row: TenantRow, *, insert: bool) -> None: ...

    @abstractmethod
    def _get_budgets(self, scopes: Sequence[str]) -> list[BudgetRow]:
        """Return the budgets (every unit) at these scopes."""

    @abstractmethod
    def _put_budget(self, row: BudgetRow, *, insert: bool) -> None: ...

    @abstractmethod
    def _get_reservation(self, reservation_id: str) -> ReservationRow | None: ...

    @abstractmethod
    def _get_idem(self, tenant_id: str, endpoint: str, key: str) -> IdempotencyRow | None:
        """Return the record even if past retention (callers check ``retain_until_ms``)."""

    @abstractmethod
    def _apply(self, outcome: Outcome) -> None:
        """Write every row of an outcome (budgets, reservation, idempotency, event, audit)."""

    @abstractmethod
    def _get_api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None: ...

    @abstractmethod
    def _get_api_key(self, key_id: str) -> ApiKeyRow | None: ...

    @abstractmethod
    def _put_api_key(self, row: ApiKeyRow, *, insert: bool) -> None: ...

    @abstractmethod
    def _tenant_children(
        self, tenant_id: str
    ) -> tuple[list[ReservationRow], list[BudgetRow], list[ApiKeyRow]]:
        """Return a tenant's ACTIVE reservations, all its budgets and all its API keys."""

    @abstractmethod
    def _due_reservations(self, now_ms: int, limit: int) -> list[ReservationRow]:
        """Return ACTIVE reservations whose ``expires_at + grace < now``."""

    @abstractmethod
    def _purge_idem(self, now_ms: int, limit: int) -> int: ...

    @abstractmethod
    def _purge_finished(self, before_ms: int, limit: int) -> int:
        """Delete old finished rows; return how many reservations and events went.

        Up to ``limit`` finished reservations with ``deadline_ms < before_ms`` (and their
        idempotency records) and up to ``limit`` events created before ``before_ms``.
        """

    # -- helpers -------------------------------------------------------------------------------

    def _live_idem(
        self, tenant_id: str, endpoint: str, key: str, now_ms: int
    ) -> IdempotencyRow | None:
        idem = self._get_idem(tenant_id, endpoint, key)
        if idem is None or idem.retain_until_ms < now_ms:
            return None
        return idem

    def _replay(self, idem: IdempotencyRow, request_hash: str, now_ms: int) -> Outcome:
        res = self._get_reservation(idem.reservation_id) if idem.reservation_id else None
        return ledger.replay(idem, request_hash, now_ms=now_ms, reservation=res)

    # -- runtime -------------------------------------------------------------------------------

    async def authenticate(self, key_hash: str) -> AuthRecord | None:
        """See :meth:`Store.authenticate` (one indexed read; the tenant is not loaded)."""
        key = self._get_api_key_by_hash(key_hash)
        return None if key is None else AuthRecord(key)

    async def decide(self, tenant_id: str, request: DecisionRequest, request_hash: str) -> Outcome:
        """See :meth:`Store.decide`."""

        def run() -> Outcome:
            now = self.clock()
            idem = self._live_idem(tenant_id, "decide", request.idempotency_key, now)
            if idem is not None:
                return self._replay(idem, request_hash, now)
            outcome = ledger.plan_decide(
                request=request,
                tenant_id=tenant_id,
                tenant=self._get_tenant(tenant_id),
                budgets=self._get_budgets(ledger.derive_scopes(request.subject)),
                request_hash=request_hash,
                now_ms=now,
            )
            self._apply(outcome)
            return outcome

        return await self._mutate(run)

    async def reserve(
        self, tenant_id: str, request: ReservationCreateRequest, request_hash: str
    ) -> Outcome:
        """See :meth:`Store.reserve`."""

        def run() -> Outcome:
            now = self.clock()
            idem = self._live_idem(tenant_id, "reserve", request.idempotency_key, now)
            if idem is not None:
                return self._replay(idem, request_hash, now)
            outcome = ledger.plan_reserve(
                request=request,
                tenant_id=tenant_id,
                tenant=self._get_tenant(tenant_id),
                budgets=self._get_budgets(ledger.derive_scopes(request.subject)),
                request_hash=request_hash,
                reservation_id=new_id("rsv"),
                now_ms=now,
            )
            self._apply(outcome)
            return outcome

        return await self._mutate(run)

    def _owned_reservation(self, reservation_id: str, tenant_id: str | None) -> ReservationRow:
        # Existence and ownership come before replay, so a foreign key cannot probe replays.
        return ledger.check_reservation_access(
            self._get_reservation(reservation_id), reservation_id, tenant_id
        )

    async def commit(
        self, tenant_id: str, reservation_id: str, request: CommitRequest, request_hash: str
    ) -> Outcome:
        """See :meth:`Store.commit`."""

        def run() -> Outcome:
            now = self.clock()
            res = self._owned_reservation(reservation_id, tenant_id)
            endpoint = f"commit:{reservation_id}"
            idem = self._live_idem(tenant_id, endpoint, request.idempotency_key, now)
            if idem is not None:
                return ledger.replay(idem, request_hash, now_ms=now, reservation=res)
            outcome = ledger.plan_commit(
                reservation_id=reservation_id,
                request=request,
                tenant_id=tenant_id,
                reservation=res,
                tenant=self._get_tenant(res.tenant_id),
                budgets=self._get_budgets(res.budgeted_scopes),
                request_hash=request_hash,
                now_ms=now,
            )
            self._apply(outcome)
            return outcome

        return await self._mutate(run)

    async def release(
        self,
        tenant_id: str | None,
        reservation_id: str,
        request: ReleaseRequest,
        request_hash: str,
        *,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> Outcome:
        """See :meth:`Store.release`."""

        def run() -> Outcome:
            now = self.clock()
            res = self._owned_reservation(reservation_id, tenant_id)
            endpoint = f"release:{reservation_id}"
            idem = self._live_idem(res.tenant_id, endpoint, request.idempotency_key, now)
            if idem is not None:
                return ledger.replay(idem, request_hash, now_ms=now, reservation=res)
            outcome = ledger.plan_release(
                reservation_id=reservation_id,
                request=request,
                tenant_id=tenant_id,
                reservation=res,
                tenant=self._get_tenant(res.tenant_id),
                budgets=self._get_budgets(res.budgeted_scopes),
                request_hash=request_hash,
                now_ms=now,
                audit_id=new_id("aud") if tenant_id is None else None,
                request_id=request_id,
                trace_id=trace_id,
            )
            self._apply(outcome)
            return outcome

        return await self._mutate(run)

    async def extend(
        self,
        tenant_id: str,
        reservation_id: str,
        request: ReservationExtendRequest,
        request_hash: str,
    ) -> Outcome:
        """See :meth:`Store.extend`."""

        def run() -> Outcome:
            now = self.clock()
            res = self._owned_reservation(reservation_id, tenant_id)
            endpoint = f"extend:{reservation_id}"
            idem = self._live_idem(tenant_id, endpoint, request.idempotency_key, now)
            if idem is not None:
                return ledger.replay(idem, request_hash, now_ms=now, reservation=res)
            outcome = ledger.plan_extend(
                reservation_id=reservation_id,
                request=request,
                tenant_id=tenant_id,
                reservation=res,
                tenant=self._get_tenant(tenant_id),
                request_hash=request_hash,
                now_ms=now,
            )
            self._apply(outcome)
            return outcome

        return await self._mutate(run)

    async def create_event(
        self, tenant_id: str, request: EventCreateRequest, request_hash: str
    ) -> Outcome:
        """See :meth:`Store.create_event`."""

        def run() -> Outcome:
            now = self.clock()
            idem = self._live_idem(tenant_id, "event", request.idempotency_key, now)
            if idem is not None:
                return self._replay(idem, request_hash, now)
            outcome = ledger.plan_event(
                request=request,
                tenant_id=tenant_id,
                tenant=self._get_tenant(tenant_id),
                budgets=self._get_budgets(ledger.derive_scopes(request.subject)),
                request_hash=request_hash,
                event_id=new_id("evt"),
                now_ms=now,
            )
            self._apply(outcome)
            return outcome

        return await self._mutate(run)

    async def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        """See :meth:`Store.get_reservation`."""
        return self._get_reservation(reservation_id)

    async def expire_due(self, limit: int = 200) -> int:
        """See :meth:`Store.expire_due`."""
        count = 0
        if not self._due_reservations(self.clock(), 1):  # cheap read: skip the write lock
            return 0
        with self._write():
            now = self.clock()
            for res in self._due_reservations(now, limit):
                outcome = ledger.plan_expire(res, self._get_budgets(res.budgeted_scopes), now)
                if outcome is not None:
                    self._apply(outcome)
                    count += 1
        return count

    async def purge_idempotency(self, limit: int = 1000) -> int:
        """See :meth:`Store.purge_idempotency`."""
        with self._write():
            return self._purge_idem(self.clock(), limit)

    async def purge_finished(self, retention_ms: int, limit: int = 500) -> int:
        """See :meth:`RetentionPurger.purge_finished`.

        Raises:
            ValueError: if ``retention_ms`` is negative or ``limit`` is not positive.
        """
        if retention_ms < 0 or limit < 1:
            raise ValueError(
                f"retention_ms must be >= 0 and limit >= 1, not {retention_ms}, {limit}"
            )
        with self._write():
            return self._purge_finished(self.clock() - retention_ms, limit)

    # -- admin ---------------------------------------------------------------------------------

    async def create_tenant(self, row: TenantRow) -> tuple[TenantRow, bool]:
        """See :meth:`Store.create_tenant`."""
        with self._write():
            existing = self._get_tenant(row.tenant_id)
            if existing is not None:
                if existing.name != row.name:
                    raise LedgerError(
                        "DUPLICATE_RESOURCE",
                        f"tenant {row.tenant_id} already exists with a different name "
                        f"({existing.name!r}); choose another tenant_id",
                    )
                return existing, False
            now = self.clock()
            row.created_at_ms = row.updated_at_ms = now
            self._put_tenant(row, insert=True)
            return row, True

    async def get_tenant(self, tenant_id: str) -> TenantRow | None:
        """See :meth:`Store.get_tenant`."""
        return self._get_tenant(tenant_id)

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any]) -> TenantRow:
        """See :meth:`Store.update_tenant`.

        Closing cascades in the same transaction (Mode A): ACTIVE reservations are released
        (their estimates return to their budgets), budgets become CLOSED, keys REVOKED.
        """
        with self._write():
            now = self.clock()
            row = self._get_tenant(tenant_id)
            if row is None:
                raise LedgerError("NOT_FOUND", f"tenant {tenant_id} does not exist")
            new_status = changes.get("status")
            if row.status == "CLOSED" and new_status not in (None, "CLOSED"):
                raise LedgerError(
                    "TENANT_CLOSED", f"tenant {tenant_id} is CLOSED; closing is irreversible"
                )
            closing = new_status == "CLOSED" and row.status != "CLOSED"
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated_at_ms = now
            if new_status == "SUSPENDED" and row.suspended_at_ms is None:
                row.suspended_at_ms = now
            elif new_status == "ACTIVE":
                row.suspended_at_ms = None
            if closing:
                row.closed_at_ms = now
                self._close_cascade(tenant_id, now)
            self._put_tenant(row, insert=False)
            return row

    def _close_cascade(self, tenant_id: str, now_ms: int) -> None:
        reservations, budgets, keys = self._tenant_children(tenant_id)
        for res in reservations:
            self._apply(
                ledger.plan_close_release(res, self._get_budgets(res.budgeted_scopes), now_ms)
            )
        for budget in self._get_budgets([b.scope for b in budgets]):
            if budget.tenant_id == tenant_id and budget.status != "CLOSED":
                budget.status = "CLOSED"
                budget.updated_at_ms = now_ms
                self._put_budget(budget, insert=False)
        for key in keys:
            if key.status == "ACTIVE":
                key.status = "REVOKED"
                key.revoked_at_ms = now_ms
                key.revoked_reason = "tenant closed"
                self._put_api_key(key, insert=False)
                self.auth_epoch += 1

    async def create_api_key(self, row: ApiKeyRow) -> ApiKeyRow:
        """See :meth:`Store.create_api_key`."""
        with self._write():
            tenant = self._get_tenant(row.tenant_id)
            if tenant is None:
                raise LedgerError(
                    "TENANT_NOT_FOUND",
                    f"tenant {row.tenant_id} does not exist; create it first "
                    "(POST /v1/admin/tenants)",
                    status=400,
                )
            if tenant.status == "CLOSED":
                raise LedgerError(
                    "TENANT_CLOSED", f"tenant {row.tenant_id} is CLOSED; keys cannot be created"
                )
            row.created_at_ms = self.clock()
            self._put_api_key(row, insert=True)
            return row

    async def revoke_api_key(self, key_id: str, reason: str | None) -> ApiKeyRow:
        """See :meth:`Store.revoke_api_key`."""
        with self._write():
            row = self._get_api_key(key_id)
            if row is None:
                raise LedgerError("NOT_FOUND", f"API key {key_id} does not exist")
            if row.status == "REVOKED":
                raise LedgerError("KEY_REVOKED", f"API key {key_id} is already revoked")
            row.status = "REVOKED"
            row.revoked_at_ms = self.clock()
            row.revoked_reason = reason
            self._put_api_key(row, insert=False)
            self.auth_epoch += 1
            return row

    async def create_budget(self, row: BudgetRow) -> BudgetRow:
        """See :meth:`Store.create_budget`."""
        with self._write():
            ledger.check_budget_creation(
                self._get_tenant(row.tenant_id), row, self._get_budgets([row.scope])
            )
            row.created_at_ms = row.updated_at_ms = self.clock()
            self._put_budget(row, insert=True)
            return row

    async def get_budget(self, scope: str, unit: str) -> BudgetRow | None:
        """See :meth:`Store.get_budget`."""
        for row in self._get_budgets([scope]):
            if row.unit == unit:
                return row
        return None

    def _budget_for(self, scope: str, unit: str, tenant_id: str | None) -> BudgetRow:
        for row in self._get_budgets([scope]):
            if row.unit == unit:
                if tenant_id is not None and row.tenant_id != tenant_id:
                    raise LedgerError(
                        "FORBIDDEN", f"budget {scope} ({unit}) belongs to another tenant"
                    )
                return row
        raise LedgerError(
            "NOT_FOUND",
            f"no budget for scope {scope} in {unit}; create it with POST /v1/admin/budgets",
        )

    async def update_budget(
        self, scope: str, unit: str, tenant_id: str | None, changes: dict[str, Any]
    ) -> BudgetRow:
        """See :meth:`Store.update_budget`."""
        with self._write():
            row = self._budget_for(scope, unit, tenant_id)
            for name, value in changes.items():
                setattr(row, name, value)
            if "overdraft_limit" in changes:
                row.is_over_limit = row.debt > row.overdraft_limit
            row.updated_at_ms = self.clock()
            self._put_budget(row, insert=False)
            return row

    async def fund_budget(
        self,
        tenant_id: str | None,
        scope: str,
        unit: str,
        *,
        operation: str,
        amount: int,
        spent: int | None,
        idempotency_key: str | None,
        request_hash: str,
        timestamp: str,
    ) -> Outcome:
        """See :meth:`Store.fund_budget`."""
        with self._write():
            now = self.clock()
            row = self._budget_for(scope, unit, tenant_id)
            endpoint = f"fund:{scope}:{unit}"
            if idempotency_key is not None:
                idem = self._live_idem(row.tenant_id, endpoint, idempotency_key, now)
                if idem is not None:
                    return ledger.replay(idem, request_hash, now_ms=now)
            new, response = ledger.plan_fund(row, operation, amount, spent=spent, now_ms=now)
            response["timestamp"] = timestamp
            raw = ledger.dumps(response)
            idem_row = None
            if idempotency_key is not None:
                idem_row = IdempotencyRow(
                    row.tenant_id, endpoint, idempotency_key, request_hash, 200, raw, None, now,
                    now + ledger.RETAIN_DECIDE_MS,
                )  # fmt: skip
            outcome = Outcome(200, raw, budgets=[new], idempotency=idem_row)
            self._apply(outcome)
            return outcome


__all__ = [
    "AuthRecord",
    "AuditRow",
    "Clock",
    "EventRow",
    "Page",
    "ReservationQuery",
    "RowStore",
    "Store",
    "new_id",
    "system_clock",
]
