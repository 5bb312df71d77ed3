"""In-memory store: plain dicts, no persistence.

Useful as the *reference model* in property tests (it shares the protocol rules of
:mod:`runcycles_server.ledger` but none of the SQL), for examples, and for a throwaway server.
Rows are copied in and out, so callers can never alias the stored state. One process only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from runcycles_server import ledger
from runcycles_server.events import EventRecord
from runcycles_server.evidence.records import EvidenceRow
from runcycles_server.governance import CounterRow, PolicyRow
from runcycles_server.ledger import (
    ApiKeyRow,
    AuditRow,
    BudgetRow,
    EventRow,
    IdempotencyRow,
    Outcome,
    ReservationRow,
    TenantRow,
)
from runcycles_server.stores.base import (
    Clock,
    EventQuery,
    Page,
    ReservationQuery,
    RowStore,
    SignalCount,
)
from runcycles_server.stores.sqlite import decode_cursor, encode_cursor

_T = TypeVar("_T")


def _copy(row: _T) -> _T:
    return copy.deepcopy(row)


class MemoryStore(RowStore):
    """A :class:`~runcycles_server.stores.base.Store` kept in Python dicts."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self.tenants: dict[str, TenantRow] = {}
        self.api_keys: dict[str, ApiKeyRow] = {}
        self.budgets: dict[tuple[str, str], BudgetRow] = {}
        self.reservations: dict[str, ReservationRow] = {}
        self.idempotency: dict[tuple[str, str, str], IdempotencyRow] = {}
        self.events: dict[str, EventRow] = {}
        self.audit: dict[str, AuditRow] = {}
        self.policies: dict[str, PolicyRow] = {}
        self.event_log: list[EventRecord] = []
        self.counters: dict[tuple[str, str], CounterRow] = {}
        self.signal_counters: dict[tuple[int, str, str], int] = {}
        self.signal_flags: dict[str, int] = {}
        self.evidence: dict[str, EvidenceRow] = {}

    @contextmanager
    def _tx(self) -> Iterator[None]:
        # Operations never await inside a transaction and the ledger raises before any write,
        # so there is nothing to roll back.
        yield

    def _write(self) -> AbstractContextManager[None]:
        return self._tx()

    def _read(self) -> AbstractContextManager[None]:
        return self._tx()

    async def close(self) -> None:
        """Nothing to release."""

    async def ping(self) -> bool:
        """Always ready."""
        return True

    # -- primitives ------------------------------------------------------------------------------

    def _get_tenant(self, tenant_id: str) -> TenantRow | None:
        row = self.tenants.get(tenant_id)
        return None if row is None else _copy(row)

    def _put_tenant(self, row: TenantRow, *, insert: bool) -> None:
        self.tenants[row.tenant_id] = _copy(row)

    def _get_budgets(self, scopes: Sequence[str]) -> list[BudgetRow]:
        wanted = set(scopes)
        return [_copy(row) for (scope, _), row in self.budgets.items() if scope in wanted]

    def _put_budget(self, row: BudgetRow, *, insert: bool) -> None:
        self.budgets[(row.scope, row.unit)] = _copy(row)

    def _get_reservation(self, reservation_id: str) -> ReservationRow | None:
        row = self.reservations.get(reservation_id)
        return None if row is None else _copy(row)

    def _get_idem(self, tenant_id: str, endpoint: str, key: str) -> IdempotencyRow | None:
        row = self.idempotency.get((tenant_id, endpoint, key))
        return None if row is None else _copy(row)

    def _apply(self, outcome: Outcome) -> None:
        for row in outcome.budgets:
            stored = self.budgets[(row.scope, row.unit)]
            for name in ("allocated", "remaining", "reserved", "spent", "debt", "is_over_limit",
                         "updated_at_ms"):  # fmt: skip
                setattr(stored, name, getattr(row, name))
        if outcome.reservation is not None:
            self.reservations[outcome.reservation.reservation_id] = _copy(outcome.reservation)
        idem = outcome.idempotency
        if idem is not None:
            self.idempotency[(idem.tenant_id, idem.endpoint, idem.key)] = _copy(idem)
        if outcome.event is not None:
            self.events[outcome.event.event_id] = _copy(outcome.event)
        if outcome.audit is not None:
            self.audit[outcome.audit.audit_id] = _copy(outcome.audit)

    def _get_policies(self, tenant_id: str) -> list[PolicyRow]:
        return [row for row in self.policies.values() if row.tenant_id == tenant_id]

    def _get_policy(self, policy_id: str) -> PolicyRow | None:
        return self.policies.get(policy_id)  # frozen: shared safely

    def _put_policy(self, row: PolicyRow, *, insert: bool) -> None:
        self.policies[row.policy_id] = row

    def _get_counters(self, tenant_id: str, names: Sequence[str]) -> dict[str, CounterRow]:
        found = (self.counters.get((tenant_id, name)) for name in names)
        return {row.name: row for row in found if row is not None}

    def _put_counters(
        self, tenant_id: str, rows: Sequence[CounterRow], read: Mapping[str, CounterRow]
    ) -> None:
        for row in rows:
            self.counters[(tenant_id, row.name)] = row

    def _live_counters(self, tenant_id: str, now_ms: int) -> list[CounterRow]:
        rows = [r for (t, _), r in self.counters.items() if t == tenant_id]
        return sorted((r for r in rows if r.expires_at_ms > now_ms), key=lambda r: r.name)

    def _put_events(self, rows: Sequence[EventRecord]) -> None:
        self.event_log.extend(rows)  # frozen: shared safely

    async def add_signal_counts(self, rows: Sequence[SignalCount], keep_ms: int) -> None:
        """See :class:`~runcycles_server.stores.base.SignalStore`."""
        counters = self.signal_counters
        for bucket, tenant, name, n in rows:
            counters[(bucket, tenant, name)] = counters.get((bucket, tenant, name), 0) + n
        oldest = self.clock() - keep_ms
        for key in [k for k in counters if k[0] < oldest]:
            del counters[key]

    async def signal_counts(self, since_ms: int) -> dict[tuple[int, str, str], int]:
        """See :class:`~runcycles_server.stores.base.SignalStore`."""
        return {k: n for k, n in self.signal_counters.items() if k[0] >= since_ms}

    async def raise_flag(self, name: str, ttl_ms: int) -> bool:
        """See :class:`~runcycles_server.stores.base.SignalStore`."""
        now = self.clock()
        until = self.signal_flags.get(name)
        self.signal_flags[name] = now + ttl_ms
        return until is None or until <= now

    def _list_events(self, query: EventQuery) -> Page[EventRecord]:
        rows = sorted(
            (e for e in self.event_log if query.matches(e)),
            key=lambda e: (e.created_at_ms, e.event_id),
            reverse=True,
        )
        if query.cursor:
            at, last_id = decode_cursor(query.cursor, 2)
            rows = [e for e in rows if (e.created_at_ms, e.event_id) < (at, last_id)]
        items = rows[: query.limit]
        more = len(rows) > query.limit
        last = items[-1] if more else None
        return Page(items, encode_cursor([last.created_at_ms, last.event_id]) if last else None)

    def _get_api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        for row in self.api_keys.values():
            if row.key_hash == key_hash:
                return _copy(row)
        return None

    def _get_api_key(self, key_id: str) -> ApiKeyRow | None:
        row = self.api_keys.get(key_id)
        return None if row is None else _copy(row)

    def _put_api_key(self, row: ApiKeyRow, *, insert: bool) -> None:
        self.api_keys[row.key_id] = _copy(row)

    def _due_api_keys(self, now_ms: int, limit: int) -> list[ApiKeyRow]:
        due = [
            k
            for k in self.api_keys.values()
            if k.status == "ACTIVE" and k.expires_at_ms is not None and k.expires_at_ms <= now_ms
        ]
        return [_copy(k) for k in sorted(due, key=lambda k: k.expires_at_ms or 0)[:limit]]

    def _tenant_children(
        self, tenant_id: str
    ) -> tuple[list[ReservationRow], list[BudgetRow], list[ApiKeyRow]]:
        return (
            [
                _copy(r)
                for r in self.reservations.values()
                if r.tenant_id == tenant_id and r.status == "ACTIVE"
            ],
            [_copy(b) for b in self.budgets.values() if b.tenant_id == tenant_id],
            [_copy(k) for k in self.api_keys.values() if k.tenant_id == tenant_id],
        )

    def _due_reservations(self, now_ms: int, limit: int) -> list[ReservationRow]:
        due = [
            r for r in self.reservations.values() if r.status == "ACTIVE" and r.deadline_ms < now_ms
        ]
        due.sort(key=lambda r: r.deadline_ms)
        return [_copy(r) for r in due[:limit]]

    def _purge_idem(self, now_ms: int, limit: int) -> int:
        old = [k for k, v in self.idempotency.items() if v.retain_until_ms < now_ms][:limit]
        for k in old:
            del self.idempotency[k]
        return len(old)

    def _put_evidence(self, rows: Sequence[EvidenceRow]) -> None:
        for row in rows:
            self.evidence.setdefault(row.evidence_id, _copy(row))

    def _get_evidence(self, evidence_id: str) -> EvidenceRow | None:
        row = self.evidence.get(evidence_id)
        return None if row is None else _copy(row)

    def _reservation_evidence(self, reservation_id: str) -> dict[str, str]:
        return {
            row.artifact_type: row.evidence_id
            for row in self.evidence.values()
            if row.reservation_id == reservation_id and row.artifact_type != "error"
        }

    def _purge_evidence(self, now_ms: int, limit: int) -> int:
        old = [k for k, v in self.evidence.items() if v.retain_until_ms < now_ms][:limit]
        for k in old:
            del self.evidence[k]
        return len(old)

    def _purge_finished(self, before_ms: int, limit: int) -> int:
        finished = [
            rid
            for rid, r in self.reservations.items()
            if r.status != "ACTIVE" and r.deadline_ms < before_ms
        ][:limit]
        gone = set(finished)
        if gone:
            for k in [k for k, v in self.idempotency.items() if v.reservation_id in gone]:
                del self.idempotency[k]
            for rid in finished:
                del self.reservations[rid]
        events = [eid for eid, e in self.events.items() if e.created_at_ms < before_ms][:limit]
        for eid in events:
            del self.events[eid]
        old = [e for e in self.event_log if e.created_at_ms < before_ms][:limit]
        if old:
            gone_events = {e.event_id for e in old}
            self.event_log = [e for e in self.event_log if e.event_id not in gone_events]
        return len(finished) + len(events) + len(old)

    # -- listings --------------------------------------------------------------------------------

    async def list_reservations(self, query: ReservationQuery) -> Page[ReservationRow]:
        """See :meth:`Store.list_reservations` (same ordering and cursor rules as SQLite)."""

        def sort_value(r: ReservationRow) -> Any:
            return {
                "reservation_id": r.reservation_id,
                "tenant": r.subject.get("tenant"),
                "scope_path": r.scope_path,
                "status": r.status,
                "reserved": r.estimate,
                "created_at_ms": r.created_at_ms,
                "expires_at_ms": r.expires_at_ms,
            }.get(query.sort_by, r.created_at_ms)

        def keep(r: ReservationRow) -> bool:
            checks = (
                r.tenant_id == query.tenant_id,
                query.idempotency_key is None or r.idempotency_key == query.idempotency_key,
                query.status is None or r.status == query.status,
                all(r.subject.get(level) == value for level, value in query.subject.items()),
                _within(r.created_at_ms, query.created_from_ms, query.created_to_ms),
                _within(r.expires_at_ms, query.expires_from_ms, query.expires_to_ms),
                (query.finalized_from_ms is None and query.finalized_to_ms is None)
                or _within(r.finalized_at_ms, query.finalized_from_ms, query.finalized_to_ms),
            )
            return all(checks)

        rows = sorted(
            (r for r in self.reservations.values() if keep(r)),
            key=lambda r: (sort_value(r) is not None, sort_value(r), r.reservation_id),
            reverse=query.sort_desc,
        )
        if query.cursor:
            value, last_id, _ = decode_cursor(query.cursor, 3)
            pos = next((i for i, r in enumerate(rows) if r.reservation_id == last_id), None)
            rows = rows[pos + 1 :] if pos is not None else []
            del value
        items = [_copy(r) for r in rows[: query.limit]]
        more = len(rows) > query.limit
        cursor = (
            encode_cursor([sort_value(items[-1]), items[-1].reservation_id, ""]) if more else None
        )
        return Page(items, cursor)

    def _page_budgets(
        self, keep: Callable[[BudgetRow], bool], limit: int, cursor: str | None
    ) -> Page[BudgetRow]:
        rows = sorted(
            (b for b in self.budgets.values() if keep(b)), key=lambda b: (b.scope, b.unit)
        )
        if cursor:
            scope, unit = decode_cursor(cursor, 2)
            rows = [b for b in rows if (b.scope, b.unit) > (scope, unit)]
        items = [_copy(b) for b in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor([items[-1].scope, items[-1].unit]) if more else None)

    async def list_balances(
        self, tenant_id: str, segments: Sequence[str], limit: int, cursor: str | None
    ) -> Page[BudgetRow]:
        """See :meth:`Store.list_balances`."""
        return self._page_budgets(
            lambda b: b.tenant_id == tenant_id and ledger.scope_matches_filters(b.scope, segments),
            limit,
            cursor,
        )

    async def count_active_reservations(self) -> int:
        """See :class:`~runcycles_server.stores.base.ActiveCounter`."""
        return sum(1 for r in self.reservations.values() if r.status == "ACTIVE")

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
        """See :meth:`Store.list_budgets`."""
        return self._page_budgets(
            lambda b: (
                (tenant_id is None or b.tenant_id == tenant_id)
                and (unit is None or b.unit == unit)
                and (status is None or b.status == status)
                and (
                    scope_prefix is None
                    or b.scope == scope_prefix
                    or b.scope.startswith(scope_prefix + "/")
                )
            ),
            limit,
            cursor,
        )

    async def list_tenants(
        self, status: str | None, limit: int, cursor: str | None
    ) -> Page[TenantRow]:
        """See :meth:`Store.list_tenants`."""
        rows = sorted(
            (t for t in self.tenants.values() if status is None or t.status == status),
            key=lambda t: t.tenant_id,
        )
        if cursor:
            (after,) = decode_cursor(cursor, 1)
            rows = [t for t in rows if t.tenant_id > after]
        items = [_copy(t) for t in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor([items[-1].tenant_id]) if more else None)

    async def list_debits(
        self, tenant_id: str, from_ms: int, to_ms: int, limit: int
    ) -> list[EventRow]:
        """See :class:`~runcycles_server.stores.base.DebitReader`."""
        rows = sorted(
            (
                e
                for e in self.events.values()
                if e.tenant_id == tenant_id and from_ms <= e.created_at_ms <= to_ms
            ),
            key=lambda e: (e.created_at_ms, e.event_id),
        )
        return [_copy(e) for e in rows[:limit]]

    async def list_audit_logs(
        self, tenant_id: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRow]:
        """Return one page of audit entries, newest first (see :class:`AuditReader`)."""
        return _audit_page(list(self.audit.values()), tenant_id, limit, cursor)

    async def list_api_keys(
        self, tenant_id: str | None, status: str | None, limit: int, cursor: str | None
    ) -> Page[ApiKeyRow]:
        """See :meth:`Store.list_api_keys`."""
        rows = sorted(
            (
                k
                for k in self.api_keys.values()
                if (tenant_id is None or k.tenant_id == tenant_id)
                and (status is None or k.status == status)
            ),
            key=lambda k: k.key_id,
        )
        if cursor:
            (after,) = decode_cursor(cursor, 1)
            rows = [k for k in rows if k.key_id > after]
        items = [_copy(k) for k in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor([items[-1].key_id]) if more else None)


def _audit_page(
    rows: list[AuditRow], tenant_id: str | None, limit: int, cursor: str | None
) -> Page[AuditRow]:
    keep = sorted(
        (r for r in rows if tenant_id is None or r.tenant_id == tenant_id),
        key=lambda r: (r.created_at_ms, r.audit_id),
        reverse=True,
    )
    if cursor:
        created, audit_id = decode_cursor(cursor, 2)
        keep = [r for r in keep if (r.created_at_ms, r.audit_id) < (created, audit_id)]
    items = [_copy(r) for r in keep[:limit]]
    more = len(keep) > limit
    return Page(
        items, encode_cursor([items[-1].created_at_ms, items[-1].audit_id]) if more else None
    )


def _within(value: int | None, lo: int | None, hi: int | None) -> bool:
    if value is None:
        return lo is None and hi is None
    return (lo is None or value >= lo) and (hi is None or value <= hi)
