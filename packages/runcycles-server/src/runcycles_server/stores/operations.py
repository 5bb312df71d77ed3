"""Every ledger operation, written once against one transaction interface.

A store supplies atomicity; this module supplies the steps. Each operation is an :class:`Op`:
a ``plan`` function that reads rows from a :class:`Txn`, asks :mod:`runcycles_server.ledger`
for the outcome and writes it back through the same ``Txn``, plus a description of the rows it
will read (so a network store can fetch them in one round trip before planning)::

    op = operations.reserve(tenant_id, request, request_hash, reservation_id)
    outcome = await store.run(op)

How a store runs an ``Op``:

* the SQL stores (:class:`~runcycles_server.stores.base.RowStore`) call ``op.plan`` inside one
  write transaction, with a ``Txn`` that reads and writes rows directly;
* the Redis store reads the described rows in one atomic script call, runs ``op.plan`` on that
  snapshot in memory (the ``Txn`` records the writes) and sends the writes back in one
  compare-and-set script call; if any row changed meanwhile it runs ``op.plan`` again on the
  fresh rows. So ``plan`` must be repeatable: no clock reads (``txn.now``), no fresh ids (the
  factories below draw them once, outside ``plan``), no side effects except through ``txn``.

A refusal raises :class:`~runcycles_server.errors.LedgerError` before anything is written, so
it never half-applies on either kind of store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from runcycles.models import (
    Action,
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    Subject,
)
from runcycles_server import ledger
from runcycles_server.errors import LedgerError
from runcycles_server.events import (
    EVENT_TYPES,
    SOURCE,
    SWEEPER_SOURCE,
    Detected,
    EventContext,
    EventRecord,
    budget_transitions,
    current_context,
    new_event_id,
)
from runcycles_server.events.detect import DEFAULT_THRESHOLDS
from runcycles_server.evidence.issuer import Issuer
from runcycles_server.governance import (
    CounterRow,
    PolicyRow,
    Registry,
    counter_memory,
    policy_patch,
    prepare,
    release_per_run,
    reset_counter,
    select_policy,
)
from runcycles_server.governance.timestamps import iso
from runcycles_server.ledger import (
    ApiKeyRow,
    AuditRow,
    BudgetRow,
    IdempotencyRow,
    Outcome,
    ReservationRow,
    TenantRow,
)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Txn(Protocol):
    """The rows of one atomic unit of work, as an operation sees and changes them.

    Rows returned are shared with the transaction: an operation never mutates one in place (it
    writes a changed copy, ``dataclasses.replace``), so a re-planned operation sees the rows it
    saw the first time.
    """

    @property
    def now(self) -> int:
        """The transaction's time (epoch ms); every decision in it uses this one instant."""

    def tenant(self, tenant_id: str) -> TenantRow | None:
        """The tenant row, or ``None`` if there is no such tenant."""

    def budgets(self, scopes: Sequence[str]) -> list[BudgetRow]:
        """The budget rows (every unit) at ``scopes``."""

    def reservation(self, reservation_id: str) -> ReservationRow | None:
        """The reservation (any status, any tenant), or ``None``."""

    def idem(self, tenant_id: str, endpoint: str, key: str) -> IdempotencyRow | None:
        """The idempotency record of a keyed request, if still within its retention."""

    def apply(self, outcome: Outcome) -> None:
        """Write every row of ``outcome`` (budgets, reservation, idempotency, event, audit)."""

    def put_tenant(self, row: TenantRow, *, new: bool = False) -> None:
        """Write a tenant row (``new``: insert it)."""

    def put_budget(self, row: BudgetRow, *, new: bool = False) -> None:
        """Write a budget row (``new``: insert it)."""

    def current_budgets(self, rows: Sequence[BudgetRow]) -> list[BudgetRow]:
        """The stored state of these budget rows (as read before they are written)."""

    def policies(self, tenant_id: str) -> list[PolicyRow]:
        """Every policy of the tenant (any status; :func:`select_policy` picks)."""

    def put_policy(self, row: PolicyRow, *, new: bool = False) -> None:
        """Write a policy row (``new``: insert it)."""

    def counters(self, tenant_id: str, names: Sequence[str]) -> dict[str, CounterRow]:
        """The tenant's quota counters of these names that exist (expired ones included)."""

    def put_counters(self, tenant_id: str, rows: Sequence[CounterRow]) -> None:
        """Write quota counter rows (insert or replace; each expires at ``expires_at_ms``)."""


@dataclass(frozen=True, slots=True)
class Op(Generic[T_co]):
    """One operation: how it plans, and which rows it reads (a prefetch hint, never a limit).

    ``tenant_id`` is the tenant whose rows it touches; ``None`` means the tenant that owns
    ``reservation_id`` (a store that shards by tenant finds it from the id).
    """

    plan: Callable[[Txn], T_co]
    tenant_id: str | None
    reservation_id: str | None = None
    idem: tuple[str, str] | None = None
    """``(endpoint, key)`` of the request's idempotency record."""
    scopes: Sequence[str] = ()
    governed: bool = False
    """Whether it reads the tenant's policies (and the quota counters they name)."""
    counter_hint: Callable[[Sequence[PolicyRow], int], list[str]] | None = None
    """The quota counters it would read given the tenant's policies and the time (a store
    that prefetches uses it with the policies it saw last; a wrong guess costs a re-read)."""


def _replayed(
    txn: Txn,
    tenant_id: str,
    endpoint: str,
    key: str,
    request_hash: str,
    res: ReservationRow | None = None,
) -> Outcome | None:
    """The stored answer to an earlier request with the same key, or ``None``.

    ``res`` is the reservation the request names, when the operation already read it.
    """
    idem = txn.idem(tenant_id, endpoint, key)
    if idem is None:
        return None
    if res is None and idem.reservation_id:
        res = txn.reservation(idem.reservation_id)
    return ledger.replay(idem, request_hash, now_ms=txn.now, reservation=res)


def _applied(
    txn: Txn,
    outcome: Outcome,
    context: EventContext | None = None,
    extra: Sequence[Detected] = (),
    correlation_id: str | None = None,
    tenant_id: str | None = None,
    tenant: TenantRow | None = None,
) -> Outcome:
    """Write ``outcome`` with the events its changed budgets (and ``extra``) cause.

    ``context`` is the request's (captured when the operation was made); ``None`` for the
    system's own work. ``tenant`` is the tenant row when the operation already read it (its
    ``event_thresholds`` are the thresholds recorded); otherwise it is read here.
    ``tenant_id`` names the tenant of an outcome that changes neither a reservation nor a
    budget (an observe-mode evaluation's events).
    """
    if outcome.signals:
        extra = [*extra, *outcome.signals]
    if outcome.budgets or extra:
        if outcome.reservation is not None:
            tenant_id = outcome.reservation.tenant_id
        elif outcome.budgets:
            tenant_id = outcome.budgets[0].tenant_id
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS
        if outcome.budgets and tenant_id is not None:
            if tenant is None or tenant.tenant_id != tenant_id:
                tenant = txn.tenant(tenant_id)
            if tenant is not None and tenant.event_thresholds:
                thresholds = tenant.event_thresholds
        before = txn.current_budgets(outcome.budgets)
        found = [*budget_transitions(before, outcome.budgets, thresholds), *extra]
        if found:
            assert tenant_id is not None  # else the caller names it
            outcome.events = _records(found, tenant_id, txn.now, context, correlation_id)
    txn.apply(outcome)
    return outcome


def _records(
    found: Sequence[Detected],
    tenant_id: str,
    now_ms: int,
    context: EventContext | None,
    correlation_id: str | None,
) -> list[EventRecord]:
    ctx = context or EventContext()
    return [
        EventRecord(
            event_id=new_event_id(now_ms),
            event_type=d.event_type,
            tenant_id=tenant_id,
            created_at_ms=now_ms,
            source=SOURCE if context is not None else SWEEPER_SOURCE,
            scope=d.scope,
            actor_type=ctx.actor_type,
            key_id=ctx.key_id,
            source_ip=ctx.source_ip,
            data=d.data,
            correlation_id=(
                (d.correlation_id or None)
                if d.correlation_id is not None
                else correlation_id or ctx.request_id
            ),
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
        )
        for d in found
    ]


def cascade_correlation_id(tenant_id: str, context: EventContext | None) -> str:
    """Return the ``correlation_id`` of a tenant-close cascade's child events.

    The spec's CASCADE SEMANTICS Rule 1 identity, ``tenant_close_cascade:<tenant_id>:<request_id>``:
    the same for every child of one close, whether it came from ``PATCH`` or a bulk ``CLOSE``.
    """
    request_id = context.request_id if context is not None else None
    return f"tenant_close_cascade:{tenant_id}:{request_id or ''}"


def _emit(
    txn: Txn,
    tenant_id: str,
    found: Sequence[Detected],
    context: EventContext | None,
    correlation_id: str | None = None,
) -> None:
    """Write the events ``found`` in this transaction (an outcome of events alone)."""
    if found:
        events = _records(found, tenant_id, txn.now, context, correlation_id)
        txn.apply(Outcome(200, b"", events=events))


def _governance(
    txn: Txn,
    tenant_id: str,
    tenant: TenantRow | None,
    scopes: Sequence[str],
    action: Action,
    subject: Subject,
    registry: Registry,
) -> ledger.Governance:
    """Load what action governance needs: the one policy that applies and its counters."""
    count = tenant.policy_count if tenant is not None else 0
    policies = txn.policies(tenant_id) if count != 0 else None
    policy = select_policy(policies, scopes, txn.now) if policies else None
    try:
        prepared = prepare(policy, action, subject, txn.now, registry)
    except LedgerError as exc:  # raised by the ledger in evaluation order
        return ledger.Governance(None, {}, exc)
    keys = prepared.counter_keys
    counters = txn.counters(tenant_id, [k.name for k in keys]) if keys else {}
    return ledger.Governance(prepared, counters)


def _counter_hint(
    scopes: Sequence[str], action: Action, subject: Subject, registry: Registry
) -> Callable[[Sequence[PolicyRow], int], list[str]]:
    def names(policies: Sequence[PolicyRow], now_ms: int) -> list[str]:
        policy = select_policy(policies, scopes, now_ms)
        if policy is None:
            return []
        try:
            keys = prepare(policy, action, subject, now_ms, registry).counter_keys
        except LedgerError:
            return []
        return [key.name for key in keys]

    return names


def _stamp(
    issuer: Issuer,
    artifact: str,
    request: DecisionRequest | ReservationCreateRequest | CommitRequest | ReleaseRequest,
    outcome: Outcome,
    tenant_id: str,
    reservation_id: str | None,
    now_ms: int,
    context: EventContext | None,
    request_json: Mapping[str, Any] | None,
) -> Outcome:
    """Attach the answer's evidence envelope (written with it) and its ``cycles_evidence`` ref.

    The stored idempotency body gets the ref too, so a replay answers the same ``evidence_id``
    and emits no second envelope. Deterministic (no clock, no randomness): a re-planned
    operation builds the identical envelope.
    """
    stamped = issuer.stamp(
        artifact,
        request,
        outcome.body,
        tenant_id=tenant_id,
        reservation_id=reservation_id,
        issued_at_ms=now_ms,
        trace_id=context.trace_id if context is not None else None,
        data=outcome.data,
        request_json=request_json,
    )
    if stamped is not None:
        outcome.body, outcome.evidence = stamped
        if outcome.idempotency is not None:
            outcome.idempotency = ledger.evolve(outcome.idempotency, body=outcome.body)
    return outcome


def _give_back(txn: Txn, outcome: Outcome) -> Outcome:
    """Add the ``per_run`` counters a released or expired reservation gives back (-1 each)."""
    res = outcome.reservation
    if res is not None and res.quota_counters and res.status in ("RELEASED", "EXPIRED"):
        names = [counter_memory(entry)[0] for entry in res.quota_counters]
        counters = txn.counters(res.tenant_id, names)
        outcome.counters = release_per_run(res.quota_counters, counters, txn.now)
    return outcome


# --------------------------------------------------------------------------------------------
# Runtime


def decide(
    tenant_id: str,
    request: DecisionRequest,
    request_hash: str,
    registry: Registry,
    issuer: Issuer | None = None,
    request_json: Mapping[str, Any] | None = None,
) -> Op[Outcome]:
    """``POST /v1/decide``.

    ``issuer``: emit its evidence envelope; ``request_json``: the request as parsed, when the
    caller has dumped it already (see :meth:`Store.decide`).
    """
    scopes = ledger.derive_scopes(request.subject)
    key = request.idempotency_key
    context = current_context()

    def plan(txn: Txn) -> Outcome:
        replayed = _replayed(txn, tenant_id, "decide", key, request_hash)
        if replayed is not None:
            return replayed
        tenant = txn.tenant(tenant_id)
        outcome = ledger.plan_decide(
            request=request,
            tenant_id=tenant_id,
            tenant=tenant,
            budgets=txn.budgets(scopes),
            request_hash=request_hash,
            now_ms=txn.now,
            gov=_governance(
                txn, tenant_id, tenant, scopes, request.action, request.subject, registry
            ),
            scopes=scopes,
        )
        if issuer is not None:
            outcome = _stamp(
                issuer, "decide", request, outcome, tenant_id, None, txn.now, context, request_json
            )
        return _applied(txn, outcome, tenant=tenant)

    hint = _counter_hint(scopes, request.action, request.subject, registry)
    return Op(
        plan, tenant_id, idem=("decide", key), scopes=scopes, governed=True, counter_hint=hint
    )


def reserve(
    tenant_id: str,
    request: ReservationCreateRequest,
    request_hash: str,
    reservation_id: str,
    registry: Registry,
    audit_id: Callable[[], str],
    issuer: Issuer | None = None,
    request_json: Mapping[str, Any] | None = None,
) -> Op[Outcome]:
    """``POST /v1/reservations`` (live, dry run or observe mode).

    ``reservation_id`` is the store's new id; ``audit_id`` names the audit entry an
    observe-mode evaluation records; ``issuer`` emits the evidence envelope.
    """
    scopes = ledger.derive_scopes(request.subject)
    key = request.idempotency_key
    context = current_context()

    def plan(txn: Txn) -> Outcome:
        replayed = _replayed(txn, tenant_id, "reserve", key, request_hash)
        if replayed is not None:
            return replayed
        tenant = txn.tenant(tenant_id)
        outcome = ledger.plan_reserve(
            request=request,
            tenant_id=tenant_id,
            tenant=tenant,
            budgets=txn.budgets(scopes),
            request_hash=request_hash,
            reservation_id=reservation_id,
            now_ms=txn.now,
            gov=_governance(
                txn, tenant_id, tenant, scopes, request.action, request.subject, registry
            ),
            audit_id=audit_id,
            scopes=scopes,
        )
        if issuer is not None:
            rid = reservation_id if outcome.reservation is not None else None
            outcome = _stamp(
                issuer, "reserve", request, outcome, tenant_id, rid, txn.now, context, request_json
            )
        return _applied(
            txn,
            outcome,
            context,
            correlation_id=reservation_id,
            tenant_id=tenant_id,
            tenant=tenant,
        )

    hint = _counter_hint(scopes, request.action, request.subject, registry)
    return Op(
        plan, tenant_id, idem=("reserve", key), scopes=scopes, governed=True, counter_hint=hint
    )


def _on_reservation(
    kind: str,
    tenant_id: str | None,
    reservation_id: str,
    key: str,
    request_hash: str,
    planner: Callable[[Txn, ReservationRow, TenantRow | None], Outcome],
    issuer: Issuer | None = None,
    request: CommitRequest | ReleaseRequest | None = None,
    request_json: Mapping[str, Any] | None = None,
) -> Op[Outcome]:
    """A keyed operation on one reservation (commit, release, extend).

    Existence and ownership come before replay, so a foreign key cannot probe replays; then
    a replay answers, else ``planner`` plans on the reservation and the outcome is written
    (with its evidence envelope when ``issuer`` and ``request`` are given).
    """
    endpoint = f"{kind}:{reservation_id}"
    context = current_context()

    def plan(txn: Txn) -> Outcome:
        res = ledger.check_reservation_access(
            txn.reservation(reservation_id), reservation_id, tenant_id
        )
        replayed = _replayed(txn, res.tenant_id, endpoint, key, request_hash, res)
        if replayed is not None:
            return replayed
        tenant = txn.tenant(res.tenant_id)
        outcome = planner(txn, res, tenant)
        if issuer is not None and request is not None:
            outcome = _stamp(
                issuer, kind, request, outcome, res.tenant_id, reservation_id, txn.now, context,
                request_json,
            )  # fmt: skip
        extra = []
        done = outcome.reservation
        if done is not None and done.committed is not None and done.committed > done.estimate:
            data = {"reservation_id": reservation_id, "scope": done.scope_path,
                    "unit": done.unit, "estimated_amount": done.estimate,
                    "actual_amount": done.committed, "overage": done.committed - done.estimate,
                    "overage_policy": done.overage_policy, "tenant_id": done.tenant_id}  # fmt: skip
            extra.append(Detected("reservation.commit_overage", done.scope_path, data))
        return _applied(txn, outcome, context, extra, reservation_id, tenant=tenant)

    return Op(plan, None, reservation_id, idem=(endpoint, key))


def commit(
    tenant_id: str,
    reservation_id: str,
    request: CommitRequest,
    request_hash: str,
    issuer: Issuer | None = None,
    request_json: Mapping[str, Any] | None = None,
) -> Op[Outcome]:
    """``POST /v1/reservations/{id}/commit``."""

    def planner(txn: Txn, res: ReservationRow, tenant: TenantRow | None) -> Outcome:
        return ledger.plan_commit(
            reservation_id=reservation_id,
            request=request,
            tenant_id=tenant_id,
            reservation=res,
            tenant=tenant,
            budgets=txn.budgets(res.budgeted_scopes),
            request_hash=request_hash,
            now_ms=txn.now,
        )

    key = request.idempotency_key
    return _on_reservation(
        "commit", tenant_id, reservation_id, key, request_hash, planner, issuer, request,
        request_json,
    )  # fmt: skip


def release(
    tenant_id: str | None,
    reservation_id: str,
    request: ReleaseRequest,
    request_hash: str,
    *,
    audit_id: str | None,
    request_id: str | None = None,
    trace_id: str | None = None,
    issuer: Issuer | None = None,
    request_json: Mapping[str, Any] | None = None,
) -> Op[Outcome]:
    """``POST /v1/reservations/{id}/release``; ``tenant_id=None`` is an audited admin release."""

    def planner(txn: Txn, res: ReservationRow, tenant: TenantRow | None) -> Outcome:
        outcome = ledger.plan_release(
            reservation_id=reservation_id,
            request=request,
            tenant_id=tenant_id,
            reservation=res,
            tenant=tenant,
            budgets=txn.budgets(res.budgeted_scopes),
            request_hash=request_hash,
            now_ms=txn.now,
            audit_id=audit_id,
            request_id=request_id,
            trace_id=trace_id,
        )
        return _give_back(txn, outcome)

    key = request.idempotency_key
    return _on_reservation(
        "release", tenant_id, reservation_id, key, request_hash, planner, issuer, request,
        request_json,
    )  # fmt: skip


def extend(
    tenant_id: str, reservation_id: str, request: ReservationExtendRequest, request_hash: str
) -> Op[Outcome]:
    """``POST /v1/reservations/{id}/extend``."""

    def planner(txn: Txn, res: ReservationRow, tenant: TenantRow | None) -> Outcome:
        return ledger.plan_extend(
            reservation_id=reservation_id,
            request=request,
            tenant_id=tenant_id,
            reservation=res,
            tenant=tenant,
            request_hash=request_hash,
            now_ms=txn.now,
        )

    key = request.idempotency_key
    return _on_reservation("extend", tenant_id, reservation_id, key, request_hash, planner)


def event(
    tenant_id: str, request: EventCreateRequest, request_hash: str, event_id: str
) -> Op[Outcome]:
    """``POST /v1/events``."""
    scopes = ledger.derive_scopes(request.subject)
    key = request.idempotency_key
    context = current_context()

    def plan(txn: Txn) -> Outcome:
        replayed = _replayed(txn, tenant_id, "event", key, request_hash)
        if replayed is not None:
            return replayed
        tenant = txn.tenant(tenant_id)
        return _applied(
            txn,
            ledger.plan_event(
                request=request,
                tenant_id=tenant_id,
                tenant=tenant,
                budgets=txn.budgets(scopes),
                request_hash=request_hash,
                event_id=event_id,
                now_ms=txn.now,
                scopes=scopes,
            ),
            context,
            tenant=tenant,
        )

    return Op(plan, tenant_id, idem=("event", key), scopes=scopes)


Expiry = Literal["expired", "not due", "gone"]


def expire(reservation_id: str, now_ms: int) -> Op[Expiry]:
    """Expire one reservation if still ACTIVE and past ``expires_at + grace`` at ``now_ms``.

    ``gone``: missing or already finished (a stale index entry); ``not due``: extended since
    the sweep looked at it.
    """

    def plan(txn: Txn) -> Expiry:
        res = txn.reservation(reservation_id)
        if res is None or res.status != "ACTIVE":
            return "gone"
        outcome = ledger.plan_expire(res, txn.budgets(res.budgeted_scopes), max(txn.now, now_ms))
        if outcome is None:
            return "not due"
        data = {"reservation_id": reservation_id, "scope": res.scope_path, "unit": res.unit,
                "estimated_amount": res.estimate, "created_at": iso(res.created_at_ms),
                "expired_at": iso(res.expires_at_ms),
                "ttl_ms": res.expires_at_ms - res.created_at_ms,
                "extensions_used": res.extension_count}  # fmt: skip
        expired = Detected("reservation.expired", res.scope_path, data)
        _applied(txn, _give_back(txn, outcome), None, [expired], reservation_id)
        return "expired"

    return Op(plan, None, reservation_id)


def close_reservations(tenant_id: str, reservation_ids: Sequence[str]) -> Op[list[str]]:
    """Release ACTIVE reservations of a closing tenant; return the ids that were not ACTIVE.

    Records one ``reservation.released_via_tenant_cascade`` per budget whose reserved amount
    this step drained (the spec's ledger-level aggregate, ``released_amount``); a store that
    closes in batches records one per budget per batch.
    """
    context = current_context()

    def plan(txn: Txn) -> list[str]:
        stale = []
        drained: dict[tuple[str, str], tuple[BudgetRow, int]] = {}
        for rid in reservation_ids:
            res = txn.reservation(rid)
            if res is None or res.status != "ACTIVE":
                stale.append(rid)
            else:
                budgets = txn.budgets(res.budgeted_scopes)
                outcome = ledger.plan_close_release(res, budgets, txn.now)
                before = {(b.scope, b.unit): b for b in txn.current_budgets(outcome.budgets)}
                for new in outcome.budgets:
                    old = before[(new.scope, new.unit)]
                    first, total = drained.get((new.scope, new.unit), (old, 0))
                    drained[(new.scope, new.unit)] = (first, total + old.reserved - new.reserved)
                txn.apply(_give_back(txn, outcome))
        found = [
            Detected("reservation.released_via_tenant_cascade", b.scope,
                     {"ledger_id": b.ledger_id, "scope": b.scope, "unit": b.unit,
                      "prior_status": b.status, "released_amount": amount,
                      "cascade_reason": "tenant_closed"})
            for b, amount in drained.values() if amount > 0
        ]  # fmt: skip
        _emit(txn, tenant_id, found, context, cascade_correlation_id(tenant_id, context))
        return stale

    return Op(plan, tenant_id)


def close_budgets(tenant_id: str, scopes: Sequence[str]) -> Op[None]:
    """Mark a closing tenant's budgets at ``scopes`` CLOSED.

    Records ``budget.closed_via_tenant_cascade`` for each budget it closes.
    """
    context = current_context()

    def plan(txn: Txn) -> None:
        found = []
        for budget in txn.budgets(scopes):
            if budget.tenant_id == tenant_id and budget.status != "CLOSED":
                txn.put_budget(dataclasses.replace(budget, status="CLOSED", updated_at_ms=txn.now))
                data = {"ledger_id": budget.ledger_id, "scope": budget.scope, "unit": budget.unit,
                        "prior_status": budget.status, "new_status": "CLOSED",
                        "cascade_reason": "tenant_closed"}  # fmt: skip
                found.append(Detected("budget.closed_via_tenant_cascade", budget.scope, data))
        _emit(txn, tenant_id, found, context, cascade_correlation_id(tenant_id, context))

    return Op(plan, tenant_id, scopes=scopes)


# --------------------------------------------------------------------------------------------
# Admin: tenants and budgets


def create_tenant(row: TenantRow) -> Op[tuple[TenantRow, bool]]:
    """Insert a tenant; an identical existing one is returned with ``created=False``."""

    def plan(txn: Txn) -> tuple[TenantRow, bool]:
        existing = txn.tenant(row.tenant_id)
        if existing is not None:
            if existing.name != row.name:
                raise LedgerError(
                    "DUPLICATE_RESOURCE",
                    f"tenant {row.tenant_id} already exists with a different name "
                    f"({existing.name!r}); choose another tenant_id",
                )
            return existing, False
        new = dataclasses.replace(row, created_at_ms=txn.now, updated_at_ms=txn.now)
        txn.put_tenant(new, new=True)
        data = {"tenant_id": new.tenant_id, "new_status": new.status, "changed_fields": []}
        _emit(txn, new.tenant_id, [Detected("tenant.created", _tenant_scope(new), data)], context)
        return new, True

    context = current_context()
    return Op(plan, row.tenant_id)


def update_tenant(
    tenant_id: str,
    changes: dict[str, Any],
    correlation_id: str | None = None,
    only_from: Sequence[str] | None = None,
) -> Op[TenantRow]:
    """Apply field changes to a tenant; closing is irreversible.

    Only the tenant row changes here: the store runs the close cascade (releasing ACTIVE
    reservations, closing budgets, revoking keys) when ``status`` becomes ``CLOSED``.
    ``correlation_id`` ties its events to a larger request (a bulk action); by default they
    carry the request id. ``only_from``: the statuses the change may start from, checked in the
    transaction (a bulk action's row); otherwise 409 ``ALREADY_IN_TARGET_STATE`` when the tenant
    already has the new status, ``INVALID_TRANSITION`` when it has another.
    """
    new_status = changes.get("status")

    def plan(txn: Txn) -> TenantRow:
        old = txn.tenant(tenant_id)
        if old is None:
            raise LedgerError("NOT_FOUND", f"tenant {tenant_id} does not exist")
        if only_from is not None and old.status not in only_from:
            code = "ALREADY_IN_TARGET_STATE" if old.status == new_status else "INVALID_TRANSITION"
            raise LedgerError(code, f"tenant {tenant_id} is {old.status}", status=409)
        if old.status == "CLOSED" and new_status not in (None, "CLOSED"):
            raise LedgerError(
                "TENANT_CLOSED", f"tenant {tenant_id} is CLOSED; closing is irreversible"
            )
        row = dataclasses.replace(old, **changes, updated_at_ms=txn.now)
        if new_status == "SUSPENDED" and old.status != "SUSPENDED":
            row.suspended_at_ms = txn.now
        elif new_status == "ACTIVE":
            row.suspended_at_ms = None
        if new_status == "CLOSED" and old.status != "CLOSED":
            row.closed_at_ms = txn.now
        txn.put_tenant(row)
        _emit(txn, tenant_id, _tenant_events(old, row, changes), context, correlation_id)
        return row

    context = current_context()
    return Op(plan, tenant_id)


TENANT_SETTINGS: Final = frozenset(
    {"default_commit_overage_policy", "default_reservation_ttl_ms", "max_reservation_ttl_ms",
     "max_reservation_extensions", "reservation_expiry_policy", "observe_mode"}
)  # fmt: skip
"""Tenant fields whose change is ``tenant.settings_changed`` (others: ``tenant.updated``)."""
_STATUS_EVENTS: Final = {"SUSPENDED": "tenant.suspended", "CLOSED": "tenant.closed"}


def _tenant_scope(row: TenantRow) -> str:
    return f"tenant:{row.tenant_id}"


def _tenant_events(old: TenantRow, new: TenantRow, changes: dict[str, Any]) -> list[Detected]:
    """The lifecycle events of one tenant update (nothing when nothing changed)."""
    changed = sorted(k for k in changes if k != "status" and getattr(old, k) != getattr(new, k))
    base = {"tenant_id": new.tenant_id, "previous_status": old.status, "new_status": new.status}
    scope = _tenant_scope(new)
    found = []
    if new.status != old.status:
        kind = _STATUS_EVENTS.get(new.status, "tenant.reactivated")
        found.append(Detected(kind, scope, {**base, "changed_fields": ["status"]}))
    settings = [k for k in changed if k in TENANT_SETTINGS]
    other = [k for k in changed if k not in TENANT_SETTINGS]
    if settings:
        found.append(
            Detected("tenant.settings_changed", scope, {**base, "changed_fields": settings})
        )
    if other:
        found.append(Detected("tenant.updated", scope, {**base, "changed_fields": other}))
    return found


def create_budget(row: BudgetRow) -> Op[BudgetRow]:
    """Insert a budget ledger for an ACTIVE tenant."""

    def plan(txn: Txn) -> BudgetRow:
        ledger.check_budget_creation(txn.tenant(row.tenant_id), row, txn.budgets([row.scope]))
        new = dataclasses.replace(row, created_at_ms=txn.now, updated_at_ms=txn.now)
        txn.put_budget(new, new=True)
        data = {"ledger_id": new.ledger_id, "scope": new.scope, "unit": new.unit,
                "operation": "CREATE", "new_state": _state(new)}  # fmt: skip
        _emit(txn, new.tenant_id, [Detected("budget.created", new.scope, data)], context)
        return new

    context = current_context()
    return Op(plan, row.tenant_id, scopes=[row.scope])


def _budget_for(txn: Txn, scope: str, unit: str, tenant_id: str | None) -> BudgetRow:
    for row in txn.budgets([scope]):
        if row.unit == unit:
            if tenant_id is not None and row.tenant_id != tenant_id:
                raise LedgerError("FORBIDDEN", f"budget {scope} ({unit}) belongs to another tenant")
            return row
    raise LedgerError(
        "NOT_FOUND",
        f"no budget for scope {scope} in {unit}; create it with POST /v1/admin/budgets",
    )


def budget_owner(scope: str) -> str:
    """The tenant a budget scope belongs to (``NOT_FOUND`` for a scope no budget can have)."""
    owner = ledger.scope_tenant(scope)
    if owner is None:
        raise LedgerError(
            "NOT_FOUND", f"no budget for scope {scope}: budget scopes start with 'tenant:<id>'"
        )
    return owner


def update_budget(
    scope: str,
    unit: str,
    tenant_id: str | None,
    changes: dict[str, Any],
    audit: AuditRow | None = None,
) -> Op[BudgetRow]:
    """Update budget properties; ``is_over_limit`` follows a changed ``overdraft_limit``.

    ``audit`` is recorded (for the budget's tenant, with its old and new status) when a
    field changed.
    """

    def plan(txn: Txn) -> BudgetRow:
        old = _budget_for(txn, scope, unit, tenant_id)
        row = dataclasses.replace(old, **changes)
        if "overdraft_limit" in changes:
            row.is_over_limit = row.debt > row.overdraft_limit
        row.updated_at_ms = txn.now
        txn.put_budget(row)
        events = _budget_events(old, row, changes)
        _emit(txn, row.tenant_id, events, context)
        if audit is not None and events:
            details = {"previous_status": old.status, "new_status": row.status}
            txn.apply(Outcome(200, b"", audit=_budget_audit(txn, audit, row, details)))
        return row

    context = current_context()
    return Op(plan, budget_owner(scope), scopes=[scope])


def _budget_audit(
    txn: Txn, audit: AuditRow, budget: BudgetRow, details: dict[str, Any]
) -> AuditRow:
    """The audit entry of a budget change: the budget's tenant and ledger id, the change."""
    return dataclasses.replace(
        audit,
        tenant_id=budget.tenant_id,
        resource_id=budget.ledger_id,
        created_at_ms=txn.now,
        details={**(audit.details or {}), "scope": budget.scope, "unit": budget.unit, **details},
    )


_BUDGET_STATUS_EVENTS: Final = {
    ("ACTIVE", "FROZEN"): "budget.frozen",
    ("FROZEN", "ACTIVE"): "budget.unfrozen",
}


def _budget_events(old: BudgetRow, new: BudgetRow, changes: dict[str, Any]) -> list[Detected]:
    """``budget.frozen``/``unfrozen``/``closed`` or ``budget.updated``, then what it crossed."""
    changed = sorted(k for k in changes if getattr(old, k) != getattr(new, k))
    if not changed:
        return []
    data = {"ledger_id": new.ledger_id, "scope": new.scope, "unit": new.unit,
            "previous_state": _state(old), "new_state": _state(new)}  # fmt: skip
    if old.status != new.status:
        kind = _BUDGET_STATUS_EVENTS.get((old.status, new.status), f"budget.{new.status.lower()}")
        if kind not in EVENT_TYPES:
            kind = "budget.updated"
        data["operation"] = "STATUS_CHANGE"
    else:
        kind = "budget.updated"
        data["operation"] = "UPDATE"
    data["changed_fields"] = changed
    return [Detected(kind, new.scope, data), *budget_transitions([old], [new])]


def _state(row: BudgetRow) -> dict[str, Any]:
    """A budget's amounts and status (the ``previous_state`` / ``new_state`` of an event)."""
    return {"allocated": row.allocated, "remaining": row.remaining, "debt": row.debt,
            "spent": row.spent, "reserved": row.reserved, "status": row.status}  # fmt: skip


_FUND_EVENTS = {
    "CREDIT": "budget.funded",
    "DEBIT": "budget.debited",
    "RESET": "budget.reset",
    "RESET_SPENT": "budget.reset_spent",
    "REPAY_DEBT": "budget.debt_repaid",
}


def fund_budget(
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
) -> Op[Outcome]:
    """Apply a funding operation (see :func:`ledger.plan_fund`), idempotent by key.

    ``audit`` is recorded with it (not on an idempotent replay). ``correlation_id`` ties its
    events to a larger request (a bulk action); by default they carry the request id.
    ``require_debt``: refuse (409 ``ALREADY_IN_TARGET_STATE``, nothing written) when the
    budget has no debt, checked in the transaction (a bulk ``REPAY_DEBT``'s row).
    """
    endpoint = f"fund:{scope}:{unit}"
    owner = budget_owner(scope)

    def plan(txn: Txn) -> Outcome:
        row = _budget_for(txn, scope, unit, tenant_id)
        if idempotency_key is not None:
            replayed = _replayed(txn, row.tenant_id, endpoint, idempotency_key, request_hash)
            if replayed is not None:
                return replayed
        if require_debt and row.debt == 0:
            raise LedgerError(
                "ALREADY_IN_TARGET_STATE", f"budget {scope} ({unit}) has no debt", status=409
            )
        new, response = ledger.plan_fund(row, operation, amount, spent=spent, now_ms=txn.now)
        response["timestamp"] = timestamp
        raw = ledger.dumps(response)
        idem_row = None
        if idempotency_key is not None:
            idem_row = IdempotencyRow(
                row.tenant_id, endpoint, idempotency_key, request_hash, 200, raw, None, txn.now,
                txn.now + ledger.RETAIN_DECIDE_MS,
            )  # fmt: skip
        outcome = Outcome(200, raw, budgets=[new], idempotency=idem_row)
        data = {"ledger_id": new.ledger_id, "scope": scope, "unit": unit, "operation": operation,
                "previous_state": _state(row), "new_state": _state(new)}  # fmt: skip
        funded = Detected(_FUND_EVENTS[operation], scope, data)
        if audit is not None:
            details = {
                "operation": operation,
                "amount": amount,
                "previous_remaining": row.remaining,
                "new_remaining": new.remaining,
            }
            outcome.audit = _budget_audit(txn, audit, new, details)
        return _applied(txn, outcome, context, [funded], correlation_id=correlation_id)

    context = current_context()
    idem = None if idempotency_key is None else (endpoint, idempotency_key)
    return Op(plan, owner, idem=idem, scopes=[scope])


def record_events(tenant_id: str, rows: Sequence[EventRecord]) -> Op[None]:
    """Write events of one tenant on their own (detectors, aggregated refusals, key changes)."""

    def plan(txn: Txn) -> None:
        if rows:
            txn.apply(Outcome(200, b"", events=list(rows)))

    return Op(plan, tenant_id)


def record_changes(
    tenant_id: str, events: Sequence[EventRecord], audit: AuditRow | None = None
) -> Op[None]:
    """Write a tenant's events and an audit entry made by a change outside its rows.

    For what a sharded store keeps apart from the tenant's rows (API keys) and for the one
    audit entry of a bulk action, which changes many rows in transactions of their own.
    """

    def plan(txn: Txn) -> None:
        if events or audit is not None:
            txn.apply(Outcome(200, b"", events=list(events), audit=audit))

    return Op(plan, tenant_id)


def api_key_events(
    kind: str,
    key: ApiKeyRow,
    previous_status: str | None,
    now_ms: int,
    *,
    system: bool = False,
) -> list[EventRecord]:
    """The event of an API key change (``api_key.created``, ``revoked``, ...), for the stores.

    API keys are not rows of a tenant's :class:`Txn` (a sharded store keeps them apart), so
    the stores write these records themselves, with the key change.
    ``api_key.revoked_via_tenant_cascade`` carries the spec's cascade payload. ``system``: the
    sweep's own change (``api_key.expired``), not a request's.
    """
    if kind == "api_key.revoked_via_tenant_cascade":
        data: dict[str, Any] = {"key_id": key.key_id, "name": key.name,
                                "prior_status": previous_status, "new_status": key.status,
                                "cascade_reason": "tenant_closed"}  # fmt: skip
    else:
        data = {"key_id": key.key_id, "key_name": key.name, "new_status": key.status,
                "permissions": list(key.permissions)}  # fmt: skip
        if previous_status is not None:
            data["previous_status"] = previous_status
        if key.revoked_reason and key.status == "REVOKED":
            data["reason"] = key.revoked_reason
    found = [Detected(kind, f"tenant:{key.tenant_id}", data)]
    context = None if system else current_context()
    correlation = None
    if kind == "api_key.revoked_via_tenant_cascade":
        correlation = cascade_correlation_id(key.tenant_id, context)
    return _records(found, key.tenant_id, now_ms, context, correlation)


API_KEY_MUTABLE: Final = ("name", "description", "permissions", "scope_filter", "metadata")
"""What ``PATCH /v1/admin/api-keys/{key_id}`` may change (the spec keeps the rest immutable)."""


def plan_api_key_update(
    row: ApiKeyRow, changes: dict[str, Any], now_ms: int, audit: AuditRow | None
) -> tuple[ApiKeyRow, list[EventRecord], AuditRow | None]:
    """The changed key (``row`` itself when nothing changed), its events and audit entry.

    Shared by the stores so both apply the same rules: only an ACTIVE, unexpired key changes;
    ``api_key.permissions_changed`` is recorded when the permissions or the scope filter
    changed (the spec's only event for this operation).

    Raises:
        LedgerError: KEY_REVOKED / KEY_EXPIRED (409) for a key that is not usable.
    """
    expired = row.expires_at_ms is not None and row.expires_at_ms <= now_ms
    if row.status == "REVOKED":
        raise LedgerError("KEY_REVOKED", f"API key {row.key_id} is revoked and cannot change")
    if row.status != "ACTIVE" or expired:
        raise LedgerError(
            "KEY_EXPIRED",
            f"API key {row.key_id} has expired and cannot change; create a new key",
            status=409,
        )
    unknown = sorted(set(changes) - set(API_KEY_MUTABLE))
    if unknown:
        raise LedgerError("INVALID_REQUEST", f"API key fields {unknown} cannot be changed")
    changed = sorted(k for k, v in changes.items() if getattr(row, k) != v)
    if not changed:
        return row, [], None
    new = dataclasses.replace(row, **changes)
    events: list[EventRecord] = []
    if {"permissions", "scope_filter"} & set(changed):
        [event] = api_key_events("api_key.permissions_changed", new, row.status, now_ms)
        data = {**event.data, "previous_permissions": list(row.permissions)}
        events = [dataclasses.replace(event, data={**data, "changed_fields": changed})]
    entry = None
    if audit is not None:
        entry = dataclasses.replace(
            audit,
            tenant_id=row.tenant_id,
            resource_id=row.key_id,
            created_at_ms=now_ms,
            details={**(audit.details or {}), "changed_fields": changed},
        )
    return new, events, entry


# --------------------------------------------------------------------------------------------
# Admin: policies and quota counters


def create_policy(row: PolicyRow, audit: AuditRow | None = None) -> Op[PolicyRow]:
    """Insert a policy (already validated) for an existing tenant that is not CLOSED.

    ``audit`` is the entry to record (``policy.created``; its time and the policy's
    ``policy_id``/``name``/``scope_pattern`` details are filled in here). A policy name is
    unique within its tenant (409 ``DUPLICATE_RESOURCE``).
    """

    def plan(txn: Txn) -> PolicyRow:
        tenant = txn.tenant(row.tenant_id)
        if tenant is None:
            raise LedgerError(
                "TENANT_NOT_FOUND",
                f"tenant {row.tenant_id} does not exist; create it first",
                status=400,
            )
        if tenant.status == "CLOSED":
            raise LedgerError(
                "TENANT_CLOSED", f"tenant {row.tenant_id} is CLOSED; policies cannot be created"
            )
        for other in txn.policies(row.tenant_id):
            if other.name == row.name:
                raise LedgerError(
                    "DUPLICATE_RESOURCE",
                    f"tenant {row.tenant_id} already has a policy named {row.name!r} "
                    f"({other.policy_id}); pick another name or PATCH that policy",
                )
        new = dataclasses.replace(row, created_at_ms=txn.now)
        txn.put_policy(new, new=True)
        if tenant.policy_count is not None:
            txn.put_tenant(dataclasses.replace(tenant, policy_count=tenant.policy_count + 1))
        _audit(txn, audit, new, [])
        _emit(txn, new.tenant_id, [_policy_event("policy.created", new, [])], context)
        return new

    context = current_context()
    return Op(plan, row.tenant_id)


def update_policy(
    tenant_id: str,
    policy_id: str,
    body: dict[str, Any],
    registry: Registry,
    audit: AuditRow | None = None,
) -> Op[tuple[PolicyRow, list[str]]]:
    """Apply a PATCH body to a policy of ``tenant_id``; return it and its ``changed_fields``.

    A policy of a CLOSED tenant is read-only (409 ``TENANT_CLOSED``). ``audit`` is recorded
    (``policy.updated`` with the ``changed_fields``) only when a field actually changed.
    """

    def plan(txn: Txn) -> tuple[PolicyRow, list[str]]:
        for row in txn.policies(tenant_id):
            if row.policy_id == policy_id:
                tenant = txn.tenant(tenant_id)
                if tenant is not None and tenant.status == "CLOSED":
                    raise LedgerError(
                        "TENANT_CLOSED",
                        f"tenant {tenant_id} is CLOSED; its policies are read-only",
                    )
                new, changed = policy_patch(row, body, now_ms=txn.now, registry=registry)
                if changed:
                    txn.put_policy(new)
                    _audit(txn, audit, new, changed)
                    event = _policy_event("policy.updated", new, changed)
                    _emit(txn, tenant_id, [event], context)
                return new, changed
        raise LedgerError("NOT_FOUND", f"policy {policy_id} does not exist")

    context = current_context()
    return Op(plan, tenant_id)


def _policy_event(kind: str, policy: PolicyRow, changed: list[str]) -> Detected:
    data = {"policy_id": policy.policy_id, "name": policy.name,
            "scope_pattern": policy.scope_pattern, "changed_fields": changed}  # fmt: skip
    return Detected(kind, f"tenant:{policy.tenant_id}", data)


def _audit(txn: Txn, audit: AuditRow | None, policy: PolicyRow, changed: list[str]) -> None:
    if audit is None:
        return
    details: dict[str, Any] = {
        **(audit.details or {}),
        "policy_id": policy.policy_id,
        "name": policy.name,
        "scope_pattern": policy.scope_pattern,
    }
    if changed:
        details["changed_fields"] = changed
    entry = dataclasses.replace(
        audit, resource_id=policy.policy_id, created_at_ms=txn.now, details=details
    )
    txn.apply(Outcome(200, b"", audit=entry))


def reset_counters(
    tenant_id: str, names: Sequence[str], audit: AuditRow | None = None
) -> Op[list[tuple[CounterRow, CounterRow]]]:
    """Reset the named quota counters of a tenant to 0; return each one before and after.

    ``audit`` (``quota.counter_reset``) is recorded once per counter reset, its details
    completed with the counter's ``previous_used``, ``policy_id`` and ``window_key`` (the
    ``i``-th counter's entry id is ``audit_id`` plus ``_i`` from the second one on), and so
    is a ``quota.counter_reset`` event with the same payload (``EventDataQuotaCounterReset``,
    correlated with the counter's threshold events by :meth:`CounterKey.correlation_id`).
    """
    context = current_context()

    def plan(txn: Txn) -> list[tuple[CounterRow, CounterRow]]:
        found = txn.counters(tenant_id, names)
        pairs = [(row, reset_counter(row, txn.now)) for row in found.values()]
        txn.put_counters(tenant_id, [new for _, new in pairs])
        if audit is not None:
            for index, (old, _) in enumerate(pairs):
                details = {
                    **(audit.details or {}),
                    "window_key": old.key.bucket,
                    "previous_used": old.count,
                    "policy_id": old.key.policy_id,
                }
                entry = dataclasses.replace(
                    audit,
                    audit_id=audit.audit_id + (f"_{index}" if index else ""),
                    resource_id=old.name,
                    created_at_ms=txn.now,
                    details=details,
                )
                correlation = old.key.correlation_id(tenant_id)
                event = Detected("quota.counter_reset", old.key.scope, details, correlation)
                events = _records([event], tenant_id, txn.now, context, None)
                txn.apply(Outcome(200, b"", audit=entry, events=events))
        return pairs

    return Op(plan, tenant_id)


def set_event_thresholds(tenant_id: str, thresholds: Sequence[float] | None) -> Op[bool]:
    """Set the tenant's recorded threshold set (``None``: the defaults).

    Answers ``False`` when the tenant does not exist. Its ``updated_at`` is not touched: the
    tenant itself did not change.
    """
    wanted = None if thresholds is None else sorted(set(thresholds))

    def plan(txn: Txn) -> bool:
        tenant = txn.tenant(tenant_id)
        if tenant is None:
            return False
        if tenant.event_thresholds != wanted:
            txn.put_tenant(dataclasses.replace(tenant, event_thresholds=wanted))
        return True

    return Op(plan, tenant_id)
