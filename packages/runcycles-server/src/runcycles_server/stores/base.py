"""The store interface, and the shared orchestration of row-based stores.

A *store* owns persistence and atomicity; the protocol's rules live in
:mod:`runcycles_server.ledger`, and the steps of every operation (which rows to load, which
rule to apply, what to write) live once in :mod:`runcycles_server.stores.operations`, written
against one transaction interface (:class:`~runcycles_server.stores.operations.Txn`).

:class:`Store` is the interface the ASGI app uses. It is ``async`` so a network store (Redis)
can await I/O, while an embedded store (SQLite) runs each short transaction inline on the event
loop thread: a transaction takes tens of microseconds, far less than handing it to a thread.

:class:`OperationStore` implements the ledger methods of :class:`Store` once, as operations
handed to the store's ``run``. :class:`RowStore` is the ``run`` of the SQL stores: it runs an
operation inside one write transaction on top of a handful of synchronous row primitives
(``_get_budgets``, ``_get_reservation``, ``_apply`` ...), which the SQLite store and the
in-memory model store implement. The Redis store's ``run`` plans on an atomic snapshot and
writes with one compare-and-set script (see :mod:`runcycles_server.stores.redis`).

Group commit: ``RowStore`` runs the mutations that queue up while the event loop is busy in
one write transaction, answering each only after that transaction committed
(``RowStore._mutate``).

Time: every decision uses ``store.clock()`` (epoch milliseconds), injectable for tests, so
expiry tests never sleep.
"""

from __future__ import annotations

import asyncio
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar, runtime_checkable

from runcycles.models import (
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
)
from runcycles_server.events import EventRecord
from runcycles_server.evidence.issuer import Issuer
from runcycles_server.evidence.records import EvidenceRow
from runcycles_server.governance import CounterRow, PolicyRow, Registry
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
from runcycles_server.stores import operations
from runcycles_server.stores.operations import Op

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


def _new_audit_id() -> str:
    return new_id("aud")


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


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters of ``GET /v1/admin/events`` and ``GET /v1/events`` (AND semantics).

    Events come newest first (by time, then id). ``scope`` matches the scope and every scope
    below it; time bounds are inclusive epoch milliseconds.
    """

    tenant_id: str | None
    event_type: str | None = None
    category: str | None = None
    scope: str | None = None
    correlation_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    limit: int = 50
    cursor: str | None = None

    def matches(self, row: EventRecord) -> bool:
        """Whether ``row`` passes every filter (the cursor and limit aside)."""
        return (
            (self.tenant_id is None or row.tenant_id == self.tenant_id)
            and (self.event_type is None or row.event_type == self.event_type)
            and (self.category is None or row.event_type.startswith(self.category + "."))
            and (
                self.scope is None
                or row.scope == self.scope
                or (row.scope or "").startswith(self.scope + "/")
            )
            and all(
                value is None or getattr(row, name) == value
                for name, value in (
                    ("correlation_id", self.correlation_id),
                    ("request_id", self.request_id),
                    ("trace_id", self.trace_id),
                )
            )
            and (self.from_ms is None or row.created_at_ms >= self.from_ms)
            and (self.to_ms is None or row.created_at_ms <= self.to_ms)
        )


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


class GovernanceStore(Protocol):
    """The policies and quota counters of action governance (the v0.1.26 extensions)."""

    registry: Registry
    """The action-kind registry (built-in kinds plus the operator's declared ``custom.*``)."""

    def new_policy_id(self, tenant_id: str) -> str:
        """A fresh id for a new policy of ``tenant_id``."""

    async def create_policy(self, row: PolicyRow, *, audit: AuditRow | None = None) -> PolicyRow:
        """Insert a validated policy; its ``created_at`` is the store's time.

        ``audit``: the ``policy.created`` entry to record in the same transaction.

        Raises:
            LedgerError: TENANT_NOT_FOUND (400), TENANT_CLOSED, DUPLICATE_RESOURCE (a policy
                of that name exists in the tenant).
        """

    async def get_policy(self, policy_id: str) -> PolicyRow | None:
        """Return a policy by id (any tenant; the caller checks ownership), or ``None``."""

    async def list_policies(self, tenant_id: str) -> list[PolicyRow]:
        """Return every policy of a tenant, highest priority first (then by id)."""

    async def update_policy(
        self,
        tenant_id: str,
        policy_id: str,
        body: dict[str, Any],
        *,
        audit: AuditRow | None = None,
    ) -> tuple[PolicyRow, list[str]]:
        """Apply a PATCH body atomically; return the policy and its ``changed_fields``.

        ``audit``: the ``policy.updated`` entry, recorded only when a field changed.

        Raises:
            LedgerError: NOT_FOUND (no such policy in that tenant), INVALID_REQUEST,
                TENANT_CLOSED.
        """

    async def list_counters(self, tenant_id: str) -> list[CounterRow]:
        """Return the tenant's quota counters that have not expired."""

    async def reset_counters(
        self, tenant_id: str, names: Sequence[str], *, audit: AuditRow | None = None
    ) -> list[tuple[CounterRow, CounterRow]]:
        """Reset these counters to 0 in one atomic step; return each one before and after.

        ``audit``: the ``quota.counter_reset`` entry, recorded once per counter reset.
        """


class Store(GovernanceStore, Protocol):
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

    async def decide(
        self,
        tenant_id: str,
        request: DecisionRequest,
        request_hash: str,
        *,
        request_json: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """``POST /v1/decide``.

        ``request_json`` (here and on reserve, commit and release): the request as parsed,
        ``request.model_dump(mode="json", exclude_none=True)``, when the caller has made it
        already (for its idempotency hash); the evidence envelope is built from it.
        """

    async def reserve(
        self,
        tenant_id: str,
        request: ReservationCreateRequest,
        request_hash: str,
        *,
        request_json: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """``POST /v1/reservations`` (live or dry run)."""

    async def commit(
        self,
        tenant_id: str,
        reservation_id: str,
        request: CommitRequest,
        request_hash: str,
        *,
        request_json: Mapping[str, Any] | None = None,
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
        request_json: Mapping[str, Any] | None = None,
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

    async def record_events(self, rows: Sequence[EventRecord]) -> None:
        """Write events that no ledger change carries (detectors, aggregated refusals).

        Each tenant's events are written in one transaction.
        """

    async def list_events(self, query: EventQuery) -> Page[EventRecord]:
        """Return one page of events, newest first.

        Raises:
            LedgerError: INVALID_REQUEST for a malformed cursor, or a store that keeps
                events per tenant asked without ``tenant_id``.
        """

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

    async def expire_api_keys(self, limit: int = 200) -> int:
        """Mark up to ``limit`` ACTIVE keys past their ``expires_at`` EXPIRED; return how many.

        Each records ``api_key.expired`` (actor ``system``, source ``expiry-sweeper``). A key
        past its ``expires_at`` is refused either way; this makes its status say so.
        """

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

    async def update_tenant(
        self,
        tenant_id: str,
        changes: dict[str, Any],
        *,
        correlation_id: str | None = None,
        only_from: Sequence[str] | None = None,
    ) -> TenantRow:
        """Apply field changes; ``status=CLOSED`` cascades atomically (see RowStore).

        ``correlation_id``: the correlation of the tenant's own events (default: the request
        id); a bulk action names itself here. ``only_from``: the statuses the change may start
        from (see :func:`operations.update_tenant`).

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

    async def update_api_key(
        self, key_id: str, changes: dict[str, Any], *, audit: AuditRow | None = None
    ) -> ApiKeyRow:
        """Change a key's name, description, permissions, scope_filter or metadata.

        Records ``api_key.permissions_changed`` when permissions or the scope filter changed,
        and ``audit`` (its tenant, resource, time and the changed fields filled in) when
        anything changed.

        Raises:
            LedgerError: NOT_FOUND, or KEY_REVOKED / KEY_EXPIRED (409) for a key not ACTIVE.
        """

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
        self,
        scope: str,
        unit: str,
        tenant_id: str | None,
        changes: dict[str, Any],
        *,
        audit: AuditRow | None = None,
    ) -> BudgetRow:
        """Update budget properties (overdraft_limit, commit_overage_policy, caps, metadata).

        Recomputes ``is_over_limit = debt > overdraft_limit`` when the limit changes.
        ``audit``: the entry to record in the same transaction when something changed (its
        tenant, resource, time and the budget's old and new status are filled in).

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
        audit: AuditRow | None = None,
        correlation_id: str | None = None,
        require_debt: bool = False,
    ) -> Outcome:
        """Apply a funding operation (see :func:`ledger.plan_fund`), idempotent by key.

        ``audit``: the entry to record with it (not again on an idempotent replay).
        ``correlation_id``: the correlation of its events (default: the request id).
        ``require_debt``: see :func:`operations.fund_budget`.
        """


@runtime_checkable
class AuditReader(Protocol):
    """Optional store capability: list audit entries (``GET /v1/admin/audit/logs``)."""

    async def list_audit_logs(
        self, tenant_id: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRow]:
        """Return one page of audit entries, newest first."""


@runtime_checkable
class DebitReader(Protocol):
    """Optional store capability: list the direct debits ``POST /v1/events`` recorded.

    The console's spend chart adds them to committed reservations (spend without a
    reservation is spend too). They are kept as long as events (``retention_ms``).
    """

    async def list_debits(
        self, tenant_id: str, from_ms: int, to_ms: int, limit: int
    ) -> list[EventRow]:
        """The tenant's debits recorded in ``[from_ms, to_ms]``, oldest first, at most ``limit``."""


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
        commit, release and extend replays), up to ``limit`` ``POST /v1/events`` records and
        up to ``limit`` event-log entries (the event plane) created more than ``retention_ms``
        ago. ACTIVE reservations, budgets, tenants, keys and the audit
        log are never touched.
        """


@runtime_checkable
class ActiveCounter(Protocol):
    """Optional store capability: count the ACTIVE reservations of every tenant.

    Read at scrape time by :mod:`runcycles_server.metrics` (``cycles_reservations_active``),
    never on the request path.
    """

    async def count_active_reservations(self) -> int:
        """Return how many reservations are ACTIVE now (all tenants)."""


SignalCount = tuple[int, str, str, int]
"""``(bucket start ms, tenant_id, counter name, n)``: one per-minute counter increment."""


@runtime_checkable
class SignalStore(Protocol):
    """Optional store capability: shared per-minute counters and flags of the rate detectors.

    Every server process adds its tallies to the same counters (so counts add up across
    processes) and the detectors read them back; a flag marks a condition (a spike) as
    already reported, so several processes report its start once (see
    :mod:`runcycles_server.monitor`).
    """

    async def add_signal_counts(self, rows: Sequence[SignalCount], keep_ms: int) -> None:
        """Add these increments; counters older than ``keep_ms`` may be dropped."""

    async def signal_counts(self, since_ms: int) -> dict[tuple[int, str, str], int]:
        """Every counter of a bucket starting at or after ``since_ms``."""

    async def raise_flag(self, name: str, ttl_ms: int) -> bool:
        """Set the flag ``name`` for ``ttl_ms`` (refreshing it if set); whether it was not set."""


EVIDENCE_INDEX_BATCH: Final = 5000
"""Envelopes indexed per background transaction (``EvidenceStore.index_evidence``)."""


@runtime_checkable
class EvidenceStore(Protocol):
    """Store capability: evidence envelopes (every store of this package has it).

    Envelopes of successful operations are written by the operation itself, in its
    transaction (``Outcome.evidence``); :meth:`put_evidence` is for denials, which write
    nothing else.
    """

    async def put_evidence(self, rows: Sequence[EvidenceRow]) -> None:
        """Store envelopes durably; return only once they survive a crash of this process."""

    async def get_evidence(self, evidence_id: str) -> EvidenceRow | None:
        """Return a stored envelope (``None`` if unknown or past its retention)."""

    async def reservation_evidence(self, reservation_id: str) -> dict[str, str]:
        """Return ``{artifact_type: evidence_id}`` of a reservation's reserve/commit/release."""

    async def purge_evidence(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` envelopes past their retention; return how many."""

    async def index_evidence(self, limit: int = EVIDENCE_INDEX_BATCH) -> int:
        """Index up to ``limit`` recently stored envelopes (a store that defers it); how many.

        Run in the background (the sweeper); an unindexed envelope is still found, slower.
        """


class OperationStore(ABC):
    """Implements the ledger methods of :class:`Store` once, as :mod:`.operations` run by ``run``.

    A store supplies ``run`` (atomicity) and, if its ids must carry routing, a reservation id
    scheme; every rule and every step lives in the operations.
    """

    @abstractmethod
    async def run(self, op: Op[T]) -> T:
        """Run ``op.plan`` atomically (see :mod:`runcycles_server.stores.operations`)."""

    registry: Registry = Registry()
    """The action-kind registry (``cycles serve --action-kinds FILE`` declares custom kinds)."""

    on_events: Callable[[], None] | None = None
    """Called after an operation of this process recorded events (the webhook dispatcher's
    wake-up; it must not block)."""

    def _recorded(self, outcome: Outcome) -> Outcome:
        if outcome.events and self.on_events is not None:
            self.on_events()
        return outcome

    issuer: Issuer | None = None
    """Emits signed evidence for decide, reserve, commit and release (set by ``create_app``;
    ``None``: evidence off)."""

    def new_reservation_id(self, tenant_id: str) -> str:
        """A fresh reservation id (a sharded store embeds the tenant to route by it)."""
        return new_id("rsv")

    def new_policy_id(self, tenant_id: str) -> str:
        """A fresh policy id (a sharded store embeds the tenant to route by it)."""
        return new_id("pol")

    # -- governance ------------------------------------------------------------------------------

    async def create_policy(self, row: PolicyRow, *, audit: AuditRow | None = None) -> PolicyRow:
        """See :meth:`GovernanceStore.create_policy`."""
        return await self.run(operations.create_policy(row, audit))

    async def list_policies(self, tenant_id: str) -> list[PolicyRow]:
        """See :meth:`GovernanceStore.list_policies`."""
        rows = await self.run(Op(lambda txn: txn.policies(tenant_id), tenant_id))
        return sorted(rows, key=lambda p: (-p.priority, p.policy_id))

    async def update_policy(
        self,
        tenant_id: str,
        policy_id: str,
        body: dict[str, Any],
        *,
        audit: AuditRow | None = None,
    ) -> tuple[PolicyRow, list[str]]:
        """See :meth:`GovernanceStore.update_policy`."""
        return await self.run(
            operations.update_policy(tenant_id, policy_id, body, self.registry, audit)
        )

    async def reset_counters(
        self, tenant_id: str, names: Sequence[str], *, audit: AuditRow | None = None
    ) -> list[tuple[CounterRow, CounterRow]]:
        """See :meth:`GovernanceStore.reset_counters`."""
        return await self.run(operations.reset_counters(tenant_id, names, audit))

    async def decide(
        self,
        tenant_id: str,
        request: DecisionRequest,
        request_hash: str,
        *,
        request_json: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """See :meth:`Store.decide`."""
        op = operations.decide(
            tenant_id, request, request_hash, self.registry, self.issuer, request_json
        )
        return self._recorded(await self.run(op))

    async def reserve(
        self,
        tenant_id: str,
        request: ReservationCreateRequest,
        request_hash: str,
        *,
        request_json: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """See :meth:`Store.reserve`."""
        op = operations.reserve(
            tenant_id,
            request,
            request_hash,
            self.new_reservation_id(tenant_id),
            self.registry,
            _new_audit_id,
            self.issuer,
            request_json,
        )
        return self._recorded(await self.run(op))

    async def commit(
        self,
        tenant_id: str,
        reservation_id: str,
        request: CommitRequest,
        request_hash: str,
        *,
        request_json: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """See :meth:`Store.commit`."""
        op = operations.commit(
            tenant_id, reservation_id, request, request_hash, self.issuer, request_json
        )
        return self._recorded(await self.run(op))

    async def release(
        self,
        tenant_id: str | None,
        reservation_id: str,
        request: ReleaseRequest,
        request_hash: str,
        *,
        request_id: str | None = None,
        trace_id: str | None = None,
        request_json: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """See :meth:`Store.release`."""
        op = operations.release(
            tenant_id,
            reservation_id,
            request,
            request_hash,
            audit_id=new_id("aud") if tenant_id is None else None,
            request_id=request_id,
            trace_id=trace_id,
            issuer=self.issuer,
            request_json=request_json,
        )
        return self._recorded(await self.run(op))

    async def extend(
        self,
        tenant_id: str,
        reservation_id: str,
        request: ReservationExtendRequest,
        request_hash: str,
    ) -> Outcome:
        """See :meth:`Store.extend`."""
        return self._recorded(
            await self.run(operations.extend(tenant_id, reservation_id, request, request_hash))
        )

    async def create_event(
        self, tenant_id: str, request: EventCreateRequest, request_hash: str
    ) -> Outcome:
        """See :meth:`Store.create_event`."""
        op = operations.event(tenant_id, request, request_hash, new_id("evt"))
        return self._recorded(await self.run(op))

    async def create_tenant(self, row: TenantRow) -> tuple[TenantRow, bool]:
        """See :meth:`Store.create_tenant`."""
        return await self.run(operations.create_tenant(row))

    async def record_events(self, rows: Sequence[EventRecord]) -> None:
        """See :meth:`Store.record_events`."""
        for tenant_id in dict.fromkeys(r.tenant_id for r in rows):
            mine = [r for r in rows if r.tenant_id == tenant_id]
            await self.run(operations.record_events(tenant_id, mine))

    async def create_budget(self, row: BudgetRow) -> BudgetRow:
        """See :meth:`Store.create_budget`."""
        return await self.run(operations.create_budget(row))

    async def update_budget(
        self,
        scope: str,
        unit: str,
        tenant_id: str | None,
        changes: dict[str, Any],
        *,
        audit: AuditRow | None = None,
    ) -> BudgetRow:
        """See :meth:`Store.update_budget`."""
        return await self.run(operations.update_budget(scope, unit, tenant_id, changes, audit))

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
        audit: AuditRow | None = None,
        correlation_id: str | None = None,
        require_debt: bool = False,
    ) -> Outcome:
        """See :meth:`Store.fund_budget`."""
        op = operations.fund_budget(
            tenant_id,
            scope,
            unit,
            operation=operation,
            amount=amount,
            spent=spent,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            timestamp=timestamp,
            audit=audit,
            correlation_id=correlation_id,
            require_debt=require_debt,
        )
        return self._recorded(await self.run(op))


GROUP_MAX = 64
"""Most runtime mutations group-committed in one transaction (see ``RowStore._mutate``)."""


@dataclass(slots=True)
class _Pending:
    run: Callable[[], Any]
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], answer: object) -> None:
    if future.done():  # the caller was cancelled; the mutation stands (idempotent retries)
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


class _RowTxn:
    """A :class:`~.operations.Txn` over a row store's primitives, inside its write transaction.

    The primitives are bound once per transaction (no extra call layer on the hot path).
    """

    __slots__ = ("_counters", "_read", "_s", "now", "policies", "reservation", "tenant")

    def __init__(self, store: RowStore, now: int) -> None:
        self._s = store
        self.now = now
        self.tenant = store._get_tenant
        self.reservation = store._get_reservation
        self.policies = store._get_policies
        self._read: dict[tuple[str, str], BudgetRow] = {}
        self._counters: dict[str, CounterRow] = {}

    def budgets(self, scopes: Sequence[str]) -> list[BudgetRow]:
        rows = self._s._get_budgets(scopes)
        for row in rows:
            self._read[(row.scope, row.unit)] = row
        return rows

    def current_budgets(self, rows: Sequence[BudgetRow]) -> list[BudgetRow]:
        read = self._read
        if all((r.scope, r.unit) in read for r in rows):
            return [read[(r.scope, r.unit)] for r in rows]
        return self.budgets(sorted({r.scope for r in rows}))

    def apply(self, outcome: Outcome) -> None:
        self._s._apply(outcome)
        self._read.clear()  # written: no longer the stored state
        if outcome.counters:
            assert outcome.reservation is not None  # counters move with a reservation
            tenant_id = outcome.reservation.tenant_id
            self._s._put_counters(tenant_id, outcome.counters, self._counters)
        self._counters = {}
        if outcome.events:
            self._s._put_events(outcome.events)
        if outcome.evidence is not None:
            self._s._put_evidence([outcome.evidence])

    def put_policy(self, row: PolicyRow, *, new: bool = False) -> None:
        self._s._put_policy(row, insert=new)

    def counters(self, tenant_id: str, names: Sequence[str]) -> dict[str, CounterRow]:
        found = self._s._get_counters(tenant_id, names) if names else {}
        self._counters = found  # what this operation's write replaces (see _put_counters)
        return found

    def put_counters(self, tenant_id: str, rows: Sequence[CounterRow]) -> None:
        if rows:
            self._s._put_counters(tenant_id, rows, self._counters)
        self._counters = {}

    def idem(self, tenant_id: str, endpoint: str, key: str) -> IdempotencyRow | None:
        idem = self._s._get_idem(tenant_id, endpoint, key)
        return None if idem is None or idem.retain_until_ms < self.now else idem

    def put_tenant(self, row: TenantRow, *, new: bool = False) -> None:
        self._s._put_tenant(row, insert=new)

    def put_budget(self, row: BudgetRow, *, new: bool = False) -> None:
        self._s._put_budget(row, insert=new)


class RowStore(OperationStore):
    """Runs operations on top of synchronous row primitives (the SQL stores' ``run``).

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

    async def _mutate(self, run: Callable[[], T]) -> T:
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
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
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
        answers: list[object] = []
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
    def _get_policies(self, tenant_id: str) -> list[PolicyRow]: ...

    @abstractmethod
    def _get_policy(self, policy_id: str) -> PolicyRow | None: ...

    @abstractmethod
    def _put_policy(self, row: PolicyRow, *, insert: bool) -> None: ...

    @abstractmethod
    def _get_counters(self, tenant_id: str, names: Sequence[str]) -> dict[str, CounterRow]: ...

    @abstractmethod
    def _put_counters(
        self, tenant_id: str, rows: Sequence[CounterRow], read: Mapping[str, CounterRow]
    ) -> None:
        """Write counter rows.

        ``read`` holds the rows of those names this operation read in this transaction: the
        stored state the write replaces (a store may write less for them).
        """

    @abstractmethod
    def _live_counters(self, tenant_id: str, now_ms: int) -> list[CounterRow]:
        """Return the tenant's counters with ``expires_at_ms > now_ms``."""

    @abstractmethod
    def _put_events(self, rows: Sequence[EventRecord]) -> None: ...

    @abstractmethod
    def _list_events(self, query: EventQuery) -> Page[EventRecord]: ...

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
    def _due_api_keys(self, now_ms: int, limit: int) -> list[ApiKeyRow]:
        """Return ACTIVE keys with ``expires_at_ms <= now_ms``."""

    @abstractmethod
    def _due_reservations(self, now_ms: int, limit: int) -> list[ReservationRow]:
        """Return ACTIVE reservations whose ``expires_at + grace < now``."""

    @abstractmethod
    def _purge_idem(self, now_ms: int, limit: int) -> int: ...

    @abstractmethod
    def _put_evidence(self, rows: Sequence[EvidenceRow]) -> None:
        """Insert envelopes (an id already stored is left as it is: same id, same bytes)."""

    @abstractmethod
    def _get_evidence(self, evidence_id: str) -> EvidenceRow | None: ...

    @abstractmethod
    def _reservation_evidence(self, reservation_id: str) -> dict[str, str]: ...

    @abstractmethod
    def _purge_evidence(self, now_ms: int, limit: int) -> int:
        """Delete up to ``limit`` envelopes with ``retain_until_ms < now_ms``."""

    def _index_evidence(self, limit: int) -> int:
        """Index up to ``limit`` stored envelopes; return how many (default: nothing to do)."""
        return 0

    def _evidence_unindexed(self) -> bool:
        """Whether some stored envelope is not indexed yet (default: never)."""
        return False

    @abstractmethod
    def _purge_finished(self, before_ms: int, limit: int) -> int:
        """Delete old finished rows; return how many reservations and events went.

        Up to ``limit`` finished reservations with ``deadline_ms < before_ms`` (and their
        idempotency records) and up to ``limit`` events created before ``before_ms``.
        """

    # -- operations ----------------------------------------------------------------------------

    async def run(self, op: Op[T]) -> T:
        """Run one operation in this process's next group-committed write transaction."""
        return await self._mutate(lambda: op.plan(_RowTxn(self, self.clock())))

    async def authenticate(self, key_hash: str) -> AuthRecord | None:
        """See :meth:`Store.authenticate` (one indexed read; the tenant is not loaded)."""
        key = self._get_api_key_by_hash(key_hash)
        return None if key is None else AuthRecord(key)

    async def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        """See :meth:`Store.get_reservation`."""
        return self._get_reservation(reservation_id)

    async def expire_due(self, limit: int = 200) -> int:
        """See :meth:`Store.expire_due`."""
        count = 0
        if not self._due_reservations(self.clock(), 1):  # cheap read: skip the write lock
            return 0
        with self._write():
            txn = _RowTxn(self, self.clock())
            for res in self._due_reservations(txn.now, limit):
                count += operations.expire(res.reservation_id, txn.now).plan(txn) == "expired"
        return count

    async def expire_api_keys(self, limit: int = 200) -> int:
        """See :meth:`Store.expire_api_keys` (one transaction)."""
        if not self._due_api_keys(self.clock(), 1):  # cheap read: skip the write lock
            return 0
        with self._write():
            now = self.clock()
            due = self._due_api_keys(now, limit)
            for key in due:
                key.status = "EXPIRED"
                self._put_api_key(key, insert=False)
                events = operations.api_key_events(
                    "api_key.expired", key, "ACTIVE", now, system=True
                )
                self._put_events(events)
            if due:
                self.auth_epoch += 1
            return len(due)

    async def purge_idempotency(self, limit: int = 1000) -> int:
        """See :meth:`Store.purge_idempotency`."""
        with self._write():
            return self._purge_idem(self.clock(), limit)

    async def put_evidence(self, rows: Sequence[EvidenceRow]) -> None:
        """See :meth:`EvidenceStore.put_evidence`: group-committed with concurrent mutations."""
        await self._mutate(lambda: self._put_evidence(rows))

    async def get_evidence(self, evidence_id: str) -> EvidenceRow | None:
        """See :meth:`EvidenceStore.get_evidence`."""
        row = self._get_evidence(evidence_id)
        return None if row is None or row.retain_until_ms < self.clock() else row

    async def reservation_evidence(self, reservation_id: str) -> dict[str, str]:
        """See :meth:`EvidenceStore.reservation_evidence`."""
        return self._reservation_evidence(reservation_id)

    async def purge_evidence(self, limit: int = 1000) -> int:
        """See :meth:`EvidenceStore.purge_evidence`."""
        with self._write():
            return self._purge_evidence(self.clock(), limit)

    async def index_evidence(self, limit: int = EVIDENCE_INDEX_BATCH) -> int:
        """See :meth:`EvidenceStore.index_evidence` (one short write transaction, if any)."""
        if not self._evidence_unindexed():  # a cheap read: skip the write lock
            return 0
        with self._write():
            return self._index_evidence(limit)

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

    async def get_tenant(self, tenant_id: str) -> TenantRow | None:
        """See :meth:`Store.get_tenant`."""
        return self._get_tenant(tenant_id)

    async def update_tenant(
        self,
        tenant_id: str,
        changes: dict[str, Any],
        *,
        correlation_id: str | None = None,
        only_from: Sequence[str] | None = None,
    ) -> TenantRow:
        """See :meth:`Store.update_tenant`.

        Closing cascades in the same transaction (Mode A): ACTIVE reservations are released
        (their estimates return to their budgets), budgets become CLOSED, keys REVOKED.
        """
        with self._write():
            txn = _RowTxn(self, self.clock())
            op = operations.update_tenant(tenant_id, changes, correlation_id, only_from)
            row = op.plan(txn)
            if changes.get("status") == "CLOSED":
                reservations, budgets, keys = self._tenant_children(tenant_id)
                ids = [r.reservation_id for r in reservations]
                operations.close_reservations(tenant_id, ids).plan(txn)
                operations.close_budgets(tenant_id, [b.scope for b in budgets]).plan(txn)
                for key in keys:
                    if key.status == "ACTIVE":
                        key.status = "REVOKED"
                        key.revoked_at_ms = txn.now
                        key.revoked_reason = "tenant closed"
                        self._put_api_key(key, insert=False)
                        self.auth_epoch += 1
                        kind = "api_key.revoked_via_tenant_cascade"
                        self._put_events(operations.api_key_events(kind, key, "ACTIVE", txn.now))
            return row

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
            self._put_events(
                operations.api_key_events("api_key.created", row, None, row.created_at_ms)
            )
            return row

    async def update_api_key(
        self, key_id: str, changes: dict[str, Any], *, audit: AuditRow | None = None
    ) -> ApiKeyRow:
        """See :meth:`Store.update_api_key` (the key, its event and audit in one transaction)."""
        with self._write():
            row = self._get_api_key(key_id)
            if row is None:
                raise LedgerError("NOT_FOUND", f"API key {key_id} does not exist")
            now = self.clock()
            new, events, entry = operations.plan_api_key_update(row, changes, now, audit)
            if new is row:  # nothing changed
                return row
            self._put_api_key(new, insert=False)
            self._put_events(events)
            if entry is not None:
                self._apply(Outcome(200, b"", audit=entry))
            self.auth_epoch += 1  # cached authentications carry the old permissions
            return new

    async def revoke_api_key(self, key_id: str, reason: str | None) -> ApiKeyRow:
        """See :meth:`Store.revoke_api_key`."""
        with self._write():
            row = self._get_api_key(key_id)
            if row is None:
                raise LedgerError("NOT_FOUND", f"API key {key_id} does not exist")
            if row.status == "REVOKED":
                raise LedgerError("KEY_REVOKED", f"API key {key_id} is already revoked")
            previous = row.status
            row.status = "REVOKED"
            row.revoked_at_ms = self.clock()
            row.revoked_reason = reason
            self._put_api_key(row, insert=False)
            self._put_events(
                operations.api_key_events("api_key.revoked", row, previous, row.revoked_at_ms)
            )
            self.auth_epoch += 1
            return row

    async def get_policy(self, policy_id: str) -> PolicyRow | None:
        """See :meth:`GovernanceStore.get_policy`."""
        return self._get_policy(policy_id)

    async def list_counters(self, tenant_id: str) -> list[CounterRow]:
        """See :meth:`GovernanceStore.list_counters`."""
        return self._live_counters(tenant_id, self.clock())

    async def list_events(self, query: EventQuery) -> Page[EventRecord]:
        """See :meth:`Store.list_events`."""
        return self._list_events(query)

    async def get_budget(self, scope: str, unit: str) -> BudgetRow | None:
        """See :meth:`Store.get_budget`."""
        for row in self._get_budgets([scope]):
            if row.unit == unit:
                return row
        return None


__all__ = [
    "SignalCount",
    "SignalStore",
    "AuthRecord",
    "AuditRow",
    "Clock",
    "EventQuery",
    "DebitReader",
    "EventRow",
    "EvidenceStore",
    "GovernanceStore",
    "Page",
    "ReservationQuery",
    "RowStore",
    "Store",
    "new_id",
    "system_clock",
]
