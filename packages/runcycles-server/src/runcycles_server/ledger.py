"""The Cycles protocol's rules, as pure functions: no I/O, no clock, no randomness.

Every store uses this module the same way::

    load the few rows the operation needs       (budgets, reservation, idempotency, tenant)
    outcome = ledger.plan_<operation>(rows...)  (raises LedgerError, or returns an Outcome)
    apply outcome's mutations atomically        (one SQLite transaction / one Redis script)
    return outcome.status_code, outcome.body

An :class:`Outcome` carries the *complete new state* of every row the operation changes
(``budgets``, ``reservation``, ``idempotency``, ``event``, ``audit``) plus the exact response
body. A store writes those rows as given; it never recomputes anything. Failing checks raise
:class:`LedgerError` before any row is produced, so an error never half-applies.

Ledger math (per budgeted scope, ``e`` = estimate, ``a`` = actual; invariant after every
operation: ``remaining == allocated - spent - reserved - debt``; only ``remaining`` may be
negative; every field must stay within int64, otherwise the request is rejected with 400):

==========================================  ========  ===============  ===========  ====
operation                                   reserved  remaining        spent        debt
==========================================  ========  ===============  ===========  ====
reserve                                     +e        -e
commit a <= e                               -e        +(e - a)         +a
commit a > e, delta d = a - e, charge c     -e        -c               +e + funded  +def
release / expire                            -e        +e
event a (charge c)                                    -c               +funded      +def
==========================================  ========  ===============  ===========  ====

where ``c``, ``funded`` and ``def`` (deficit) follow the overage policy (see
:func:`overage_charge`): ``REJECT`` refuses any ``d > 0`` on commit (409 BUDGET_EXCEEDED) and an
event whose ``a`` exceeds some scope's remaining; ``ALLOW_IF_AVAILABLE`` charges
``c = min(d, min over scopes of max(remaining, 0))``, never creates debt, and flags every scope
whose remaining was below ``d`` as ``is_over_limit``; ``ALLOW_WITH_OVERDRAFT`` caps ``d`` by the
scopes without an overdraft limit like ``ALLOW_IF_AVAILABLE``, then on each scope with a limit
and ``remaining < c`` records ``funded = max(remaining, 0)``, ``def = c - funded`` into debt,
refusing the whole operation (409 OVERDRAFT_LIMIT_EXCEEDED) if any ``debt + def`` would exceed
that scope's ``overdraft_limit``. This is the reference server's reading of the spec (protocol
digest section 7): it is the only one that keeps the invariant exact.

Scope identifiers: subject levels in the fixed order ``tenant > workspace > app > workflow >
agent > toolset`` become ``level:value`` segments joined with ``/``; missing levels are skipped;
every prefix is a derived scope. Values are **lower-cased**, like the reference server, so
``Acme`` and ``acme`` share budgets and admin-created (lower-case) scopes always match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import orjson

from runcycles.models import (
    INT64_MAX,
    STANDARD_SUBJECT_FIELDS,
    Caps,
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    Subject,
)
from runcycles_server import governance
from runcycles_server.errors import STATUS_BY_CODE as STATUS_BY_CODE
from runcycles_server.errors import LedgerError as LedgerError
from runcycles_server.events import NO_CORRELATION, Detected, EventRecord
from runcycles_server.evidence.records import EvidenceRow
from runcycles_server.governance import (
    Admission,
    CounterRow,
    Denial,
    PolicyCaps,
    Prepared,
    TtlOverride,
    caps_body,
)
from runcycles_server.governance.quotas import correlation_id
from runcycles_server.governance.scopes import subject_scopes

INT64_MIN: Final = -(2**63)

DEFAULT_TTL_MS: Final = 60_000
DEFAULT_MAX_TTL_MS: Final = 3_600_000
DEFAULT_GRACE_MS: Final = 5_000
DEFAULT_MAX_EXTENSIONS: Final = 10
DEFAULT_OVERAGE_POLICY: Final = "ALLOW_IF_AVAILABLE"

DAY_MS: Final = 86_400_000
RETAIN_RESERVE_MIN_MS: Final = DAY_MS
"""A reserve key is kept ``max(ttl + grace, 24 h)``."""
RETAIN_DECIDE_MS: Final = DAY_MS
"""Decide and dry-run keys are kept 24 h."""
RETAIN_EVENT_MS: Final = 7 * DAY_MS
RETAIN_TERMINAL_MS: Final = 30 * DAY_MS
"""Commit, release and extend keys are kept 30 days."""

SUBJECT_VALUE_RE: Final = re.compile(r"^[a-zA-Z0-9_.\-]+$")
SCOPE_RE: Final = re.compile(
    r"^tenant:[a-z0-9_.\-]+(/(workspace|app|workflow|agent|toolset):[a-z0-9_.\-]+)*$"
)

# --------------------------------------------------------------------------------------------
# Rows: what a store loads and writes. Plain data, no behaviour.


@dataclass(slots=True)
class TenantRow:
    """A tenant and its reservation defaults."""

    tenant_id: str
    name: str
    status: str = "ACTIVE"
    parent_tenant_id: str | None = None
    default_commit_overage_policy: str | None = None
    default_reservation_ttl_ms: int | None = None
    max_reservation_ttl_ms: int | None = None
    max_reservation_extensions: int | None = None
    reservation_expiry_policy: str | None = None
    metadata: dict[str, Any] | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0
    suspended_at_ms: int | None = None
    closed_at_ms: int | None = None
    observe_mode: str | None = None
    """Default observe mode of the tenant's reservations (``ENFORCE``/``OBSERVE``/``DISABLED``)."""
    policy_count: int | None = 0
    """How many policies the tenant has, so a reservation of a tenant without any skips
    reading them (``None``: not known, as on a row written before it was kept: read them)."""
    event_thresholds: list[float] | None = None
    """The ``budget.threshold_crossed`` utilizations recorded for this tenant's budgets
    (``None``: the defaults): the union of the defaults and its webhook subscriptions'
    ``budget_utilization``, kept here so an operation reads no subscription."""


@dataclass(slots=True)
class ApiKeyRow:
    """A tenant API key. Only the sha256 of the secret is ever stored."""

    key_id: str
    key_hash: str
    key_prefix: str
    tenant_id: str
    name: str
    status: str = "ACTIVE"
    description: str | None = None
    permissions: list[str] = field(default_factory=list)
    scope_filter: list[str] | None = None
    metadata: dict[str, Any] | None = None
    created_at_ms: int = 0
    expires_at_ms: int | None = None
    revoked_at_ms: int | None = None
    revoked_reason: str | None = None


@dataclass(slots=True)
class BudgetRow:
    """One (scope, unit) ledger."""

    scope: str
    unit: str
    tenant_id: str
    allocated: int
    remaining: int
    reserved: int = 0
    spent: int = 0
    debt: int = 0
    overdraft_limit: int = 0
    is_over_limit: bool = False
    status: str = "ACTIVE"
    commit_overage_policy: str | None = None
    caps: dict[str, Any] | None = None
    ledger_id: str = ""
    rollover_policy: str | None = None
    period_start: str | None = None
    period_end: str | None = None
    metadata: dict[str, Any] | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0


@dataclass(slots=True)
class ReservationRow:
    """A reservation; ``budgeted_scopes`` and ``overage_policy`` are frozen at reserve time."""

    reservation_id: str
    tenant_id: str
    status: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    estimate: int
    scope_path: str
    affected_scopes: list[str]
    budgeted_scopes: list[str]
    created_at_ms: int
    expires_at_ms: int
    grace_ms: int
    overage_policy: str
    max_extensions: int
    extension_count: int = 0
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    committed: int | None = None
    committed_metadata: dict[str, Any] | None = None
    finalized_at_ms: int | None = None
    quota_counters: list[str] | None = None
    """The ``per_run`` quota counters this reservation counted in, each with the generation
    it counted in (given back, -1 each, when it is released or expires, to that generation
    only; see :class:`~runcycles_server.governance.quotas.CounterRow`)."""

    @property
    def deadline_ms(self) -> int:
        """Last instant (inclusive) a commit or release is accepted: expiry plus grace."""
        return self.expires_at_ms + self.grace_ms


@dataclass(slots=True)
class IdempotencyRow:
    """The stored outcome of a successful keyed request, replayed verbatim."""

    tenant_id: str
    endpoint: str
    key: str
    payload_hash: str
    status_code: int
    body: bytes
    reservation_id: str | None
    created_at_ms: int
    retain_until_ms: int


_Row = TypeVar("_Row", "TenantRow", "BudgetRow", "ReservationRow", "IdempotencyRow")


def evolve(row: _Row, **changes: Any) -> _Row:
    """A copy of a ledger row with ``changes``: ``dataclasses.replace`` for the hot path.

    The row classes are ``slots`` dataclasses whose fields are all ``__init__`` arguments,
    without ``__post_init__``, so a copy is their constructor called with the current values
    in field order; :func:`dataclasses.replace` walks the field list in Python and calls with
    keywords, several times the work on a reserve or commit (a test compares both). A name
    that is not a field raises ``AttributeError`` (slots), as ``replace`` raises ``TypeError``.
    """
    new: _Row = _COPY[type(row)](row)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


@dataclass(slots=True)
class EventRow:
    """A direct debit recorded by ``POST /v1/events``."""

    event_id: str
    tenant_id: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    actual: int
    charged: int
    scope_path: str
    affected_scopes: list[str]
    budgeted_scopes: list[str]
    overage_policy: str
    idempotency_key: str
    created_at_ms: int
    metrics: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    client_time_ms: int | None = None


@dataclass(slots=True)
class AuditRow:
    """An audit entry (written for admin-on-behalf-of operations)."""

    audit_id: str
    tenant_id: str
    actor_type: str
    operation: str
    resource_id: str
    created_at_ms: int
    request_id: str | None = None
    trace_id: str | None = None
    details: dict[str, Any] | None = None


def _copier(cls: type[Any]) -> Callable[[Any], Any]:
    values = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))
    return lambda row: cls(*values(row))


_COPY: Final[dict[type[Any], Callable[[Any], Any]]] = {
    cls: _copier(cls) for cls in (TenantRow, BudgetRow, ReservationRow, IdempotencyRow)
}


@dataclass(slots=True)
class Outcome:
    """What a successful operation changes and answers.

    Attributes:
        status_code: HTTP status of the answer.
        body: the exact JSON body (bytes), also stored for idempotent replay.
        budgets: new full state of every budget row that changed.
        reservation: new full state of the reservation (insert or update), if any.
        idempotency: the idempotency record to insert, if any.
        event: the event row to insert, if any.
        audit: the audit row to insert, if any.
        counters: new state of the quota counters that changed, all of the tenant of
            ``reservation`` (counted by a reservation, given back by its release or expiry).
        events: the events this change causes (written with it, see :mod:`.events`).
        signals: events the plan itself names (an observe-mode decision, a quota threshold
            approached), which the operation records in :attr:`events` with the rest.
        evidence: the signed-evidence envelope of this answer, written with it so an
            ``evidence_id`` the answer carries always resolves (see :mod:`.evidence`).
        data: what ``body`` was serialised from (``body == dumps(data)``), kept by the plans
            whose answers get an evidence envelope so it is built without parsing ``body``.
    """

    status_code: int
    body: bytes
    budgets: list[BudgetRow] = field(default_factory=list)
    reservation: ReservationRow | None = None
    idempotency: IdempotencyRow | None = None
    event: EventRow | None = None
    audit: AuditRow | None = None
    counters: list[CounterRow] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    signals: list[Detected] = field(default_factory=list)
    evidence: EvidenceRow | None = None
    data: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# JSON and hashing


def dumps(obj: Any) -> bytes:
    """Serialize compactly to UTF-8 JSON (orjson; stdlib fallback for ints beyond 64 bits)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # e.g. an integer in free-form metadata that exceeds 64 bits
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: bytes | str) -> Any:
    """Parse JSON (orjson; stdlib fallback for what orjson refuses, e.g. huge integers)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def canonical_json(obj: Any) -> bytes:
    """Return the canonical JSON form used for payload hashing (sorted keys, no spaces)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def payload_hash(endpoint: str, payload: Mapping[str, Any]) -> str:
    """Hash a parsed request for idempotency comparison.

    ``payload`` is the request as parsed (``None`` fields dropped), with server-fixed defaults
    filled in by :func:`request_payload`, so omitting a default and sending it explicitly hash
    the same. The endpoint is part of the hash.
    """
    digest = hashlib.sha256(endpoint.encode())
    digest.update(b"\n")
    digest.update(canonical_json(payload))
    return digest.hexdigest()


def request_json(model: Any) -> dict[str, Any]:
    """Return a request model as parsed: its JSON dump without ``None`` fields."""
    data: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return data


def request_payload(model: Any, dumped: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """Return the hashable payload of a request model, with server-fixed defaults applied.

    ``grace_period_ms`` (5000) and ``dry_run`` (false) have fixed defaults, so they are filled;
    ``ttl_ms`` and ``overage_policy`` default from tenant configuration, so they hash as sent.
    ``dumped``: the model's :func:`request_json`, when the caller has it (never changed: the
    payload is a new mapping where defaults are filled, else ``dumped`` itself).
    """
    data = request_json(model) if dumped is None else dumped
    if isinstance(model, ReservationCreateRequest) and not (
        "grace_period_ms" in data and "dry_run" in data
    ):
        return {"grace_period_ms": DEFAULT_GRACE_MS, "dry_run": False, **data}
    return data


def request_digest(endpoint: str, model: Any) -> tuple[str, dict[str, Any]]:
    """Return a request's idempotency hash and its :func:`request_json`, dumped once.

    The dump is handed to the store as well (``request_json=``): the evidence envelope is
    built from it, so the model is serialised once per request.
    """
    dumped = request_json(model)
    return payload_hash(endpoint, request_payload(model, dumped)), dumped


def hash_api_key(secret: str) -> str:
    """Return the stored form of an API key secret: sha256 hex.

    API key secrets are 192-bit random strings, so a fast hash is as strong as bcrypt here:
    brute force is infeasible no matter how cheap one guess is (bcrypt's cost factor only
    protects low-entropy, human-chosen secrets), and a fast hash keeps authentication off the
    hot path's critical cost and lets keys be looked up by hash directly.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Scopes


def validate_subject(subject: Subject) -> None:
    """Reject standard subject values outside ``^[a-zA-Z0-9_.-]+$`` with 400.

    Raises:
        LedgerError: INVALID_REQUEST naming the field.
    """
    for level in STANDARD_SUBJECT_FIELDS:
        value = getattr(subject, level)
        if value is not None and not SUBJECT_VALUE_RE.match(value):
            raise LedgerError(
                "INVALID_REQUEST",
                f"subject.{level} {value!r} has characters outside [a-zA-Z0-9_.-]; "
                "':' and '/' delimit scope paths, so use only letters, digits, '_', '.', '-'",
            )


def derive_scopes(subject: Subject) -> list[str]:
    """Return the derived scopes of a subject, shallowest first; the last is the scope path.

    ``{tenant: Acme, agent: bot}`` gives ``["tenant:acme", "tenant:acme/agent:bot"]``.
    """
    return subject_scopes(subject)


def leaf_scope(scope_path: str) -> str:
    """Return the last segment of a scope path (``tenant:a/agent:b`` gives ``agent:b``)."""
    return scope_path.rsplit("/", 1)[-1]


def scope_tenant(scope: str) -> str | None:
    """Return the tenant of a tenant-rooted scope path, or ``None``."""
    first = scope.split("/", 1)[0]
    return first[len("tenant:") :] if first.startswith("tenant:") else None


def validate_budget_scope(scope: str, tenant_id: str) -> None:
    """Check an admin-supplied budget scope: canonical, lower-case, rooted at ``tenant_id``.

    Raises:
        LedgerError: INVALID_REQUEST saying which rule the scope breaks.
    """
    if not SCOPE_RE.match(scope):
        raise LedgerError(
            "INVALID_REQUEST",
            f"scope {scope!r} is not canonical: use 'tenant:<id>' followed by optional "
            "'/<level>:<value>' segments in the order workspace, app, workflow, agent, toolset, "
            "all lower-case (e.g. 'tenant:acme/workspace:prod')",
        )
    levels = [segment.split(":", 1)[0] for segment in scope.split("/")]
    order = [lvl for lvl in STANDARD_SUBJECT_FIELDS if lvl in levels]
    if levels != order:
        raise LedgerError(
            "INVALID_REQUEST",
            f"scope {scope!r} has levels out of order or repeated; canonical order is "
            "tenant > workspace > app > workflow > agent > toolset",
        )
    if scope_tenant(scope) != tenant_id:
        raise LedgerError(
            "INVALID_REQUEST",
            f"scope {scope!r} must start with 'tenant:{tenant_id}' (the budget's tenant)",
        )


def scope_matches_filters(scope: str, segments: Sequence[str]) -> bool:
    """Return whether every ``level:value`` filter segment is a segment of ``scope``."""
    parts = scope.split("/")
    return all(segment in parts for segment in segments)


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_int64(row: BudgetRow) -> None:
    for name in ("allocated", "remaining", "reserved", "spent", "debt", "overdraft_limit"):
        value = getattr(row, name)
        if not INT64_MIN <= value <= INT64_MAX:
            raise LedgerError(
                "INVALID_REQUEST",
                f"this operation would push {name} of budget {row.scope} ({row.unit}) outside "
                "the int64 range; use smaller amounts",
            )


def _amount(unit: str, amount: int) -> dict[str, Any]:
    return {"unit": unit, "amount": amount}


def balance_body(row: BudgetRow) -> dict[str, Any]:
    """Return the wire ``Balance`` of a budget row (every amount present, so it is checkable)."""
    unit = row.unit
    return {
        "scope": leaf_scope(row.scope),
        "scope_path": row.scope,
        "remaining": _amount(unit, row.remaining),
        "reserved": _amount(unit, row.reserved),
        "spent": _amount(unit, row.spent),
        "debt": _amount(unit, row.debt),
        "allocated": _amount(unit, row.allocated),
        "overdraft_limit": _amount(unit, row.overdraft_limit),
        "is_over_limit": row.is_over_limit,
    }


def _tenant_value(tenant: TenantRow | None, name: str, default: int) -> int:
    value = getattr(tenant, name) if tenant is not None else None
    return default if value is None else int(value)


def resolve_ttl_ms(
    requested: int | None, tenant: TenantRow | None, override: TtlOverride | None = None
) -> int:
    """Return the effective TTL: requested or default, capped by the maximum.

    The default and the maximum are the matching policy's ``reservation_ttl_override`` where
    it sets them, else the tenant's, else the server's.
    """
    default = override.default_ttl_ms if override is not None else None
    if default is None:
        default = _tenant_value(tenant, "default_reservation_ttl_ms", DEFAULT_TTL_MS)
    cap = override.max_ttl_ms if override is not None else None
    if cap is None:
        cap = _tenant_value(tenant, "max_reservation_ttl_ms", DEFAULT_MAX_TTL_MS)
    return min(requested if requested is not None else default, cap)


def resolve_overage_policy(
    requested: str | None,
    budgets: Sequence[BudgetRow],
    tenant: TenantRow | None,
    policy: str | None = None,
) -> str:
    """Resolve the overage policy: the request's, else the matching policy's.

    Then the deepest budget's, else the tenant's, else the default.
    """
    if requested is not None:
        return requested
    if policy is not None:
        return policy
    for row in reversed(budgets):
        if row.commit_overage_policy:
            return row.commit_overage_policy
    if tenant is not None and tenant.default_commit_overage_policy:
        return tenant.default_commit_overage_policy
    return DEFAULT_OVERAGE_POLICY


def tenant_guard(tenant: TenantRow | None, *, new_work: bool = False) -> str | None:
    """Return why the tenant refuses an operation, or ``None`` (no tenant record = no guard).

    ``TENANT_CLOSED`` for a closed tenant. ``TENANT_SUSPENDED`` for a suspended tenant when
    ``new_work`` (reservations and events); commits, releases and extensions of existing
    reservations stay allowed while suspended, as the governance spec describes.

    Raises:
        LedgerError: INTERNAL_ERROR (500) for a status that cannot be interpreted (fail closed).
    """
    if tenant is None:
        return None
    if tenant.status == "CLOSED":
        return "TENANT_CLOSED"
    if tenant.status == "SUSPENDED":
        return "TENANT_SUSPENDED" if new_work else None
    if tenant.status != "ACTIVE":
        raise LedgerError(
            "INTERNAL_ERROR",
            f"tenant {tenant.tenant_id} has an unreadable status {tenant.status!r}; "
            "refusing to act on it (an operator must repair the tenant record)",
        )
    return None


_TENANT_CLOSED_MSG: Final = (
    "tenant {t} is CLOSED: no further reservations, commits, releases, extensions or events "
    "are accepted (closing a tenant is irreversible)"
)


_TENANT_SUSPENDED_MSG: Final = (
    "tenant {t} is SUSPENDED: new reservations and events are refused until an operator "
    "reactivates it; existing reservations can still be committed or released"
)


def _raise_tenant_closed(tenant_id: str) -> None:
    raise LedgerError("TENANT_CLOSED", _TENANT_CLOSED_MSG.format(t=tenant_id))


# --------------------------------------------------------------------------------------------
# Budget evaluation (reserve, dry run, decide)

_REASON_MESSAGES: Final[Mapping[str, str]] = {
    "BUDGET_FROZEN": "budget {s} ({u}) is FROZEN by an operator; no new reservations until it "
    "is unfrozen",
    "BUDGET_CLOSED": "budget {s} ({u}) is CLOSED",
    "OVERDRAFT_LIMIT_EXCEEDED": "budget {s} ({u}) is over its limit (an overage could not be "
    "covered); new reservations are blocked until an operator funds or updates it",
    "DEBT_OUTSTANDING": "budget {s} ({u}) has outstanding debt and no overdraft limit; repay "
    "the debt (REPAY_DEBT) before reserving again",
    "BUDGET_EXCEEDED": "insufficient remaining budget in {s} ({u}): requested {a}, remaining {r}",
}


def reserve_check(row: BudgetRow, amount: int) -> str | None:
    """Return the reason a budget refuses a new reservation of ``amount``, or ``None``.

    Precedence: FROZEN, CLOSED, over limit, debt outstanding (debt > 0 with no overdraft limit),
    insufficient remaining. Overdraft headroom never helps a reservation.
    """
    if row.status == "FROZEN":
        return "BUDGET_FROZEN"
    if row.status == "CLOSED":
        return "BUDGET_CLOSED"
    if row.is_over_limit:
        return "OVERDRAFT_LIMIT_EXCEEDED"
    if row.debt > 0 and row.overdraft_limit == 0:
        return "DEBT_OUTSTANDING"
    if row.remaining < amount:
        return "BUDGET_EXCEEDED"
    return None


@dataclass(slots=True)
class Evaluation:
    """Result of checking a request against the budgets of its derived scopes.

    Attributes:
        scopes: all derived scopes, shallowest first.
        budgeted: the budget rows in the requested unit, in scope order.
        reason: ``None`` if allowed, else a DENY reason code.
        message: human explanation of ``reason``.
        caps: caps of the deepest budgeted scope merged with the matching policy's
            (ALLOW_WITH_CAPS), if any.
        deny_detail: the wire ``DenyDetail`` when ``reason`` is set.
        admission: what action governance let through (counters to write, the policy's
            TTL and overage rules), when it ran and admitted the request.
    """

    scopes: list[str]
    budgeted: list[BudgetRow]
    reason: str | None
    message: str
    caps: dict[str, Any] | None
    deny_detail: dict[str, Any] | None = None
    admission: Admission | None = None


@dataclass(frozen=True, slots=True)
class Governance:
    """The governance inputs of one request, loaded by the operation in its transaction.

    ``prepared`` is the request after step 1 with the quota rules of the one policy that
    applies (:func:`governance.prepare`), ``counters`` the quota counters those rules read (by
    name). ``error`` is a refusal met while preparing (an undeclared ``custom.*`` kind, a
    ``per_run`` quota without a run id), raised in evaluation order: after the tenant guard.
    """

    prepared: Prepared | None
    counters: Mapping[str, CounterRow]
    error: LedgerError | None = None

    def verdict(self) -> Admission | Denial:
        """Steps 1-3 of the reservation evaluation order (access control, then quotas)."""
        if self.error is not None:
            raise self.error
        assert self.prepared is not None
        return self.prepared.evaluate(self.counters)


def merge_caps(
    budget: Mapping[str, Any] | None, policy: PolicyCaps | None
) -> dict[str, Any] | None:
    """Combine a budget's caps and a policy's into the stricter of both, field by field.

    Limits take the lower value (``cooldown_ms`` the longer wait), tool allowlists intersect
    and denylists unite.
    """
    if policy is None:
        return dict(budget) if budget else None
    caps = dict(budget or {})
    for name, value in caps_body(policy).items():
        if value is None:
            continue
        old = caps.get(name)
        if old is None:
            caps[name] = value
        elif name == "tool_allowlist":
            caps[name] = [tool for tool in old if tool in set(value)]
        elif name == "tool_denylist":
            caps[name] = sorted({*old, *value})
        elif name == "cooldown_ms":
            caps[name] = max(old, value)
        else:
            caps[name] = min(old, value)
    return caps or None


def _budget_fix(reason: str, row: BudgetRow, amount: int) -> str:
    if reason == "BUDGET_EXCEEDED":
        return f"Fund {row.scope} by at least {amount - row.remaining} {row.unit}"
    if reason in ("OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING"):
        return f"Repay the debt of {row.debt} {row.unit} on {row.scope} (REPAY_DEBT)"
    if reason == "BUDGET_FROZEN":
        return f"Unfreeze the budget {row.scope} ({row.unit})"
    return f"Create or reopen a budget at {row.scope} ({row.unit})"


def _deny_detail(
    reason: str, scope: str | None = None, fix: str | None = None, remaining: int | None = None
) -> dict[str, Any]:
    detail: dict[str, Any] = {"reason_code": reason}
    if scope is not None:
        detail["blocked_by_scope"] = scope
    if fix is not None:
        detail["suggested_fix"] = fix
    if remaining is not None:
        detail["budget_remaining"] = remaining
    return detail


def _select_budgets(
    scopes: Sequence[str], unit: str, budgets: Iterable[BudgetRow]
) -> tuple[list[BudgetRow], dict[str, list[str]]]:
    by_scope: dict[str, BudgetRow] = {}
    other_units: dict[str, list[str]] = {}
    for row in budgets:
        if row.unit == unit:
            by_scope[row.scope] = row
        else:
            other_units.setdefault(row.scope, []).append(row.unit)
    return [by_scope[s] for s in scopes if s in by_scope], other_units


def _raise_unit_mismatch(scopes: Sequence[str], unit: str, other: Mapping[str, list[str]]) -> None:
    scope = next(s for s in scopes if s in other)
    units = sorted(other[scope])
    raise LedgerError(
        "UNIT_MISMATCH",
        f"no budget in {unit} at the derived scopes, but {scope} has a budget in "
        f"{', '.join(units)}; send amounts in that unit",
        details={"scope": scope, "requested_unit": unit, "expected_units": units},
    )


def evaluate(
    *,
    scopes: Sequence[str],
    unit: str,
    amount: int,
    budgets: Iterable[BudgetRow],
    tenant: TenantRow | None,
    tenant_id: str,
    gov: Governance | None = None,
) -> Evaluation:
    """Check a reservation-shaped request without changing anything.

    Steps, in the spec's RESERVATION EVALUATION ORDER: tenant guard (CLOSED gives reason
    TENANT_CLOSED); action governance when ``gov`` is given (kind access control, risk-class
    quotas, per-kind quotas of the one matching policy); then each budgeted scope in order
    (:func:`reserve_check`, first failure wins), then "no budget": a budget in another unit at a
    derived scope raises 400 UNIT_MISMATCH, otherwise the reason is BUDGET_NOT_FOUND. Every
    denial carries its ``deny_detail``.

    Raises:
        LedgerError: UNIT_MISMATCH, INVALID_REQUEST from governance (an undeclared custom
            kind, a per-run quota without a run id), or INTERNAL_ERROR for an unreadable
            tenant status.
    """
    budgeted, other_units = _select_budgets(scopes, unit, budgets)
    scope_list = list(scopes)

    def denied(reason: str, message: str, detail: dict[str, Any]) -> Evaluation:
        return Evaluation(scope_list, budgeted, reason, message, None, detail)

    refused = tenant_guard(tenant, new_work=True)
    if refused is not None:
        text = _TENANT_CLOSED_MSG if refused == "TENANT_CLOSED" else _TENANT_SUSPENDED_MSG
        return denied(refused, text.format(t=tenant_id), _deny_detail(refused, scope_list[0]))
    admission = None
    if gov is not None:
        verdict = gov.verdict()
        if isinstance(verdict, Denial):
            return denied(verdict.reason_code, verdict.message, dict(verdict.deny_detail))
        admission = verdict
    if not budgeted:
        if other_units:
            _raise_unit_mismatch(scope_list, unit, other_units)
        return denied(
            "BUDGET_NOT_FOUND",
            f"Budget not found for provided scope: {scope_list[-1]} ({unit}); create a budget "
            "at one of the derived scopes: " + ", ".join(scope_list),
            _deny_detail(
                "BUDGET_NOT_FOUND",
                scope_list[-1],
                f"Create a budget in {unit} at one of: {', '.join(scope_list)}",
            ),
        )
    for row in budgeted:
        reason = reserve_check(row, amount)
        if reason is not None:
            message = _REASON_MESSAGES[reason].format(
                s=row.scope, u=row.unit, a=amount, r=row.remaining
            )
            remaining = row.remaining if reason == "BUDGET_EXCEEDED" else None
            fix = _budget_fix(reason, row, amount)
            return denied(reason, message, _deny_detail(reason, row.scope, fix, remaining))
    budget_caps = budgeted[-1].caps
    if admission is not None and admission.policy is not None:
        caps = merge_caps(budget_caps, admission.caps)
    else:
        caps = dict(budget_caps) if budget_caps else None
    return Evaluation(scope_list, budgeted, None, "", caps, None, admission)


# --------------------------------------------------------------------------------------------
# Idempotency


def _retention(created_ms: int, span_ms: int) -> int:
    return created_ms + span_ms


def replay(
    idem: IdempotencyRow,
    request_hash: str,
    *,
    now_ms: int,
    reservation: ReservationRow | None = None,
) -> Outcome:
    """Answer a repeated keyed request from its stored outcome.

    The stored body replays verbatim, except ``remaining_ttl_ms``, which is recomputed as
    ``max(0, expires_at_ms - now)`` while the reservation is ACTIVE and 0 otherwise.

    Raises:
        LedgerError: IDEMPOTENCY_MISMATCH when the payload differs from the original.
    """
    if idem.payload_hash != request_hash:
        raise LedgerError(
            "IDEMPOTENCY_MISMATCH",
            f"idempotency key {idem.key!r} was already used with a different request body; "
            "reuse a key only to retry the identical request, use a new key for a new request",
        )
    body = idem.body
    if b'"remaining_ttl_ms"' in body:
        data = loads(body)
        active = reservation is not None and reservation.status == "ACTIVE"
        expires = int(data.get("expires_at_ms", 0))
        data["remaining_ttl_ms"] = max(0, expires - now_ms) if active else 0
        body = dumps(data)
    return Outcome(idem.status_code, body)


def _idem(
    tenant_id: str,
    endpoint: str,
    key: str,
    request_hash: str,
    status: int,
    body: bytes,
    now_ms: int,
    retain_ms: int,
    reservation_id: str | None = None,
) -> IdempotencyRow:
    return IdempotencyRow(
        tenant_id=tenant_id,
        endpoint=endpoint,
        key=key,
        payload_hash=request_hash,
        status_code=status,
        body=body,
        reservation_id=reservation_id,
        created_at_ms=now_ms,
        retain_until_ms=_retention(now_ms, retain_ms),
    )


# --------------------------------------------------------------------------------------------
# Decide and reserve


def plan_decide(
    *,
    request: DecisionRequest,
    tenant_id: str,
    tenant: TenantRow | None,
    budgets: Iterable[BudgetRow],
    request_hash: str,
    now_ms: int,
    gov: Governance | None = None,
    scopes: list[str] | None = None,
) -> Outcome:
    """Evaluate ``POST /v1/decide``: every budget or governance condition is a 200 DENY.

    A DENY carries ``reason_code`` and ``deny_detail``.

    Only the idempotency record is written (no quota counter moves). UNIT_MISMATCH stays a 400.
    """
    if scopes is None:
        scopes = derive_scopes(request.subject)
    ev = evaluate(
        scopes=scopes,
        unit=request.estimate.unit.value,
        amount=request.estimate.amount,
        budgets=budgets,
        tenant=tenant,
        tenant_id=tenant_id,
        gov=gov,
    )
    body: dict[str, Any]
    if ev.reason is not None:
        body = {
            "decision": "DENY",
            "reason_code": ev.reason,
            "affected_scopes": ev.scopes,
            "deny_detail": ev.deny_detail,
        }
    elif ev.caps:
        body = {"decision": "ALLOW_WITH_CAPS", "caps": ev.caps, "affected_scopes": ev.scopes}
    else:
        body = {"decision": "ALLOW", "affected_scopes": ev.scopes}
    raw = dumps(body)
    idem = _idem(
        tenant_id, "decide", request.idempotency_key, request_hash, 200, raw, now_ms,
        RETAIN_DECIDE_MS,
    )  # fmt: skip
    return Outcome(200, raw, idempotency=idem, data=body)


def plan_reserve(
    *,
    request: ReservationCreateRequest,
    tenant_id: str,
    tenant: TenantRow | None,
    budgets: Iterable[BudgetRow],
    request_hash: str,
    reservation_id: str,
    now_ms: int,
    gov: Governance | None = None,
    audit_id: Callable[[], str] | None = None,
    scopes: list[str] | None = None,
) -> Outcome:
    """Plan ``POST /v1/reservations`` (live, dry run or observe mode).

    Live: any failing check raises its 409 (or 404 when no budget exists in any unit) with
    ``details.deny_detail``; on success every budgeted scope gets ``reserved += e;
    remaining -= e``, the governing policy's quota counters move by one (in the same
    outcome), and the reservation is created with its TTL (tenant- or policy-capped), grace,
    overage policy and max extensions frozen, and the ``per_run`` counters it must give back.
    Dry run: same evaluation, nothing but the idempotency record written; failures are 200 DENY.
    Observe mode (the request's ``observe_mode``, else the tenant's): dry-run semantics even
    without ``dry_run``, and the would-be decision recorded in the audit log
    (``reservation.observed_denied`` / ``reservation.observed_allowed``, its id drawn from
    ``audit_id``).

    ``scopes``: the request's derived scopes, when the caller has worked them out already.

    Raises:
        LedgerError: the live failure, UNIT_MISMATCH, an int64 overflow, or INVALID_REQUEST
            from governance.
    """
    unit = request.estimate.unit.value
    amount = request.estimate.amount
    if scopes is None:
        scopes = derive_scopes(request.subject)
    ev = evaluate(
        scopes=scopes, unit=unit, amount=amount, budgets=budgets, tenant=tenant,
        tenant_id=tenant_id, gov=gov,
    )  # fmt: skip
    scope_path = scopes[-1]
    key = request.idempotency_key
    tenant_mode = tenant.observe_mode if tenant is not None else None
    observe = (request.observe_mode is not None or tenant_mode is not None) and (
        governance.effective_observe_mode(request.observe_mode, tenant_mode) == "OBSERVE"
    )

    if request.dry_run or observe:
        body: dict[str, Any] = {"affected_scopes": ev.scopes, "scope_path": scope_path}
        if ev.reason is not None:
            body["decision"] = "DENY"
            body["reason_code"] = ev.reason
            body["deny_detail"] = ev.deny_detail
        else:
            body["decision"] = "ALLOW_WITH_CAPS" if ev.caps else "ALLOW"
            body["reserved"] = _amount(unit, amount)
            if ev.caps:
                body["caps"] = ev.caps
        if ev.budgeted:
            body["balances"] = [balance_body(row) for row in ev.budgeted]
        raw = dumps(body)
        idem = _idem(tenant_id, "reserve", key, request_hash, 200, raw, now_ms, RETAIN_DECIDE_MS)
        if not observe or audit_id is None:
            return Outcome(200, raw, idempotency=idem, data=body)
        audit = _observed(audit_id(), tenant_id, request, body, now_ms)
        signal = _observed_event(tenant_id, request, audit)
        return Outcome(200, raw, idempotency=idem, audit=audit, signals=[signal], data=body)

    if ev.reason is not None:
        details = {"deny_detail": ev.deny_detail}
        if ev.reason == "BUDGET_NOT_FOUND":
            raise LedgerError("NOT_FOUND", ev.message, details=details)
        raise LedgerError(ev.reason, ev.message, details=details)

    new_rows: list[BudgetRow] = []
    for row in ev.budgeted:
        new = evolve(
            row,
            reserved=row.reserved + amount,
            remaining=row.remaining - amount,
            updated_at_ms=now_ms,
        )
        _check_int64(new)
        new_rows.append(new)

    admitted = ev.admission
    if admitted is not None and admitted.policy is None:
        admitted = None  # no policy governs it: nothing of governance's to apply or write
    override = admitted.reservation_ttl_override if admitted is not None else None
    ttl_ms = resolve_ttl_ms(request.ttl_ms, tenant, override)
    grace_ms = request.grace_period_ms if request.grace_period_ms is not None else DEFAULT_GRACE_MS
    policy = resolve_overage_policy(
        request.overage_policy.value if request.overage_policy is not None else None,
        ev.budgeted,
        tenant,
        admitted.commit_overage_policy if admitted is not None else None,
    )
    max_extensions = override.max_extensions if override is not None else None
    if max_extensions is None:
        max_extensions = _tenant_value(tenant, "max_reservation_extensions", DEFAULT_MAX_EXTENSIONS)
    expires = now_ms + ttl_ms
    reservation = ReservationRow(
        reservation_id=reservation_id,
        tenant_id=tenant_id,
        status="ACTIVE",
        subject=request.subject.model_dump(mode="json", exclude_none=True),
        action=request.action.model_dump(mode="json", exclude_none=True),
        unit=unit,
        estimate=amount,
        scope_path=scope_path,
        affected_scopes=ev.scopes,
        budgeted_scopes=[row.scope for row in ev.budgeted],
        created_at_ms=now_ms,
        expires_at_ms=expires,
        grace_ms=grace_ms,
        overage_policy=policy,
        max_extensions=max_extensions,
        idempotency_key=key,
        metadata=request.metadata,
        quota_counters=list(admitted.per_run_counters)
        if admitted and admitted.per_run_counters
        else None,
    )
    body = {
        "decision": "ALLOW_WITH_CAPS" if ev.caps else "ALLOW",
        "reservation_id": reservation_id,
        "reserved": _amount(unit, amount),
        "expires_at_ms": expires,
        "remaining_ttl_ms": ttl_ms,
        "scope_path": scope_path,
        "affected_scopes": ev.scopes,
        "balances": [balance_body(row) for row in new_rows],
    }
    if ev.caps:
        body["caps"] = ev.caps
    raw = dumps(body)
    idem = _idem(
        tenant_id, "reserve", key, request_hash, 200, raw, now_ms,
        max(ttl_ms + grace_ms, RETAIN_RESERVE_MIN_MS), reservation_id,
    )  # fmt: skip
    counters = list(admitted.counters) if admitted is not None else []
    signals = [
        Detected(
            "quota.threshold_approaching",
            crossing.key.scope,
            crossing.event_data(tenant_id),
            crossing.correlation_id(tenant_id),
        )
        for crossing in (admitted.thresholds if admitted is not None else ())
    ]
    return Outcome(
        200, raw, budgets=new_rows, reservation=reservation, idempotency=idem,
        counters=counters, signals=signals, data=body,
    )  # fmt: skip


def _observed_event(tenant_id: str, request: ReservationCreateRequest, audit: AuditRow) -> Detected:
    """The ``reservation.observed_denied`` / ``observed_allowed`` event of an observe mode.

    The audit entry's payload, with the correlation id its type defines: a denial's joins the
    enforced denials; an allowance's groups one run (none without a run id).
    """
    details = dict(audit.details or {})
    scope = str(details["scope"])
    if audit.operation == "reservation.observed_denied":
        correlation = governance.deny_correlation_id(
            tenant_id, request.action.kind, details["deny_detail"]
        )
    else:
        run_id = (request.subject.dimensions or {}).get("run_id")
        correlation = (
            NO_CORRELATION
            if not run_id
            else correlation_id("observed", tenant_id, scope, str(run_id))
        )
        if "caps" in details:
            details["caps_applied"] = details.pop("caps")
    return Detected(audit.operation, scope, details, correlation)


def _observed(
    audit_id: str,
    tenant_id: str,
    request: ReservationCreateRequest,
    body: Mapping[str, Any],
    now_ms: int,
) -> AuditRow:
    """The audit entry of an observe-mode reservation: its would-be decision and context.

    ``details`` is the spec's ``reservation.observed_denied`` / ``observed_allowed`` event
    payload (the event plane will emit the same payload as an event).
    """
    denied = body["decision"] == "DENY"
    details: dict[str, Any] = {
        "scope": body["scope_path"],
        "unit": request.estimate.unit.value,
        "action": request.action.model_dump(mode="json", exclude_none=True),
        "subject": request.subject.model_dump(mode="json", exclude_none=True),
        "estimated_amount": request.estimate.amount,
        "observe_mode": "OBSERVE",
    }
    if denied:
        details["deny_detail"] = body["deny_detail"]
        details["would_have_blocked_at"] = body["deny_detail"].get(
            "blocked_by_scope", body["scope_path"]
        )
    else:
        details["decision"] = body["decision"]
        if "caps" in body:
            details["caps"] = body["caps"]
    kind = "observed_denied" if denied else "observed_allowed"
    return AuditRow(
        audit_id=audit_id,
        tenant_id=tenant_id,
        actor_type="system",
        operation=f"reservation.{kind}",
        resource_id=body["scope_path"],
        created_at_ms=now_ms,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# Overage (shared by commit and event)


@dataclass(slots=True)
class Charge:
    """How an overage ``delta`` lands on each scope.

    Attributes:
        charged: the part of ``delta`` that is charged (``<= delta``).
        funded: per scope, the part of ``charged`` paid from remaining (goes to ``spent``).
        deficit: per scope, the part of ``charged`` recorded as debt.
        flag_over_limit: scopes to mark ``is_over_limit``.
    """

    charged: int
    funded: list[int]
    deficit: list[int]
    flag_over_limit: list[bool]


def overage_charge(rows: Sequence[BudgetRow], delta: int, policy: str, *, event: bool) -> Charge:
    """Decide how ``delta > 0`` extra units are charged across ``rows`` under ``policy``.

    REJECT: a commit refuses any overage; an event refuses when some scope's remaining is below
    ``delta``. ALLOW_IF_AVAILABLE: charge ``min(delta, min(max(remaining, 0)))``, flag scopes
    whose remaining was below ``delta``. ALLOW_WITH_OVERDRAFT: scopes with
    ``overdraft_limit == 0`` cap the charge like ALLOW_IF_AVAILABLE (and are flagged when short);
    scopes with a limit fund ``max(remaining, 0)`` and record the rest as debt, and the whole
    operation is refused if any ``debt + deficit > overdraft_limit``.

    Raises:
        LedgerError: BUDGET_EXCEEDED (REJECT) or OVERDRAFT_LIMIT_EXCEEDED.
    """
    n = len(rows)
    if policy == "REJECT":
        if not event:
            raise LedgerError(
                "BUDGET_EXCEEDED",
                f"actual exceeds the reserved estimate by {delta} and the reservation's overage "
                "policy is REJECT; the reservation is still ACTIVE: release it, or commit at most "
                "the estimate (reserve a buffer next time)",
            )
        for row in rows:
            if row.remaining < delta:
                raise LedgerError(
                    "BUDGET_EXCEEDED",
                    f"insufficient remaining budget in {row.scope} ({row.unit}) for an event of "
                    f"{delta} under overage policy REJECT: remaining {row.remaining}",
                )
        return Charge(delta, [delta] * n, [0] * n, [False] * n)

    if policy == "ALLOW_WITH_OVERDRAFT":
        capped = delta
        for row in rows:
            if row.overdraft_limit == 0:
                capped = min(capped, max(row.remaining, 0))
        funded: list[int] = []
        deficit: list[int] = []
        flags: list[bool] = []
        for row in rows:
            if row.overdraft_limit == 0:
                funded.append(capped)
                deficit.append(0)
                flags.append(row.remaining < delta)
                continue
            if row.remaining >= capped:
                funded.append(capped)
                deficit.append(0)
                flags.append(False)
                continue
            have = max(row.remaining, 0)
            short = capped - have
            if row.debt + short > row.overdraft_limit:
                raise LedgerError(
                    "OVERDRAFT_LIMIT_EXCEEDED",
                    f"charging {capped} to {row.scope} ({row.unit}) needs {short} of overdraft but "
                    f"debt {row.debt} + {short} exceeds overdraft_limit {row.overdraft_limit}; "
                    "an operator must fund the budget or raise its overdraft limit",
                )
            funded.append(have)
            deficit.append(short)
            flags.append(False)
        return Charge(capped, funded, deficit, flags)

    # ALLOW_IF_AVAILABLE (the default; unknown policies are refused at validation time)
    capped = delta
    for row in rows:
        capped = min(capped, max(row.remaining, 0))
    return Charge(capped, [capped] * n, [0] * n, [row.remaining < delta for row in rows])


# --------------------------------------------------------------------------------------------
# Commit, release, extend, expire


def _check_reservation_owner(
    reservation: ReservationRow | None, reservation_id: str, tenant_id: str | None
) -> ReservationRow:
    if reservation is None:
        raise LedgerError("NOT_FOUND", f"reservation {reservation_id} does not exist")
    if tenant_id is not None and reservation.tenant_id != tenant_id:
        raise LedgerError(
            "FORBIDDEN",
            f"reservation {reservation_id} belongs to another tenant than this API key's",
        )
    return reservation


def check_reservation_access(
    reservation: ReservationRow | None, reservation_id: str, tenant_id: str | None
) -> ReservationRow:
    """Return the reservation if it exists and ``tenant_id`` may see it (``None`` = admin).

    Raises:
        LedgerError: NOT_FOUND or FORBIDDEN.
    """
    return _check_reservation_owner(reservation, reservation_id, tenant_id)


def _check_settleable(res: ReservationRow, now_ms: int, tenant: TenantRow | None) -> None:
    if tenant_guard(tenant) is not None:
        _raise_tenant_closed(res.tenant_id)
    if res.status == "EXPIRED":
        raise LedgerError(
            "RESERVATION_EXPIRED",
            f"reservation {res.reservation_id} expired; record the usage with POST /v1/events "
            "instead",
        )
    if res.status != "ACTIVE":
        raise LedgerError(
            "RESERVATION_FINALIZED",
            f"reservation {res.reservation_id} is already {res.status}",
        )


def _check_window(res: ReservationRow, now_ms: int, deadline_ms: int) -> None:
    if now_ms > deadline_ms:
        raise LedgerError(
            "RESERVATION_EXPIRED",
            f"reservation {res.reservation_id} expired at {res.expires_at_ms} (grace "
            f"{res.grace_ms} ms); record the usage with POST /v1/events instead",
        )


def plan_commit(
    *,
    reservation_id: str,
    request: CommitRequest,
    tenant_id: str,
    reservation: ReservationRow | None,
    tenant: TenantRow | None,
    budgets: Iterable[BudgetRow],
    request_hash: str,
    now_ms: int,
) -> Outcome:
    """Plan ``POST /v1/reservations/{id}/commit``.

    Check order (after the caller's same-key replay): exists (404), owner (403), tenant closed
    (409), state EXPIRED (410) / not ACTIVE (409 FINALIZED), unit (400), window
    ``now <= expires_at + grace`` (410), overage policy. Budget FROZEN/CLOSED does not block a
    commit (the spend already happened). ``budgets`` are the rows of the reservation's
    ``budgeted_scopes`` (frozen at reserve time) in its unit; missing rows are skipped.

    Raises:
        LedgerError: any of the failures above, or an int64 overflow.
    """
    res = _check_reservation_owner(reservation, reservation_id, tenant_id)
    _check_settleable(res, now_ms, tenant)
    actual = request.actual.amount
    if request.actual.unit.value != res.unit:
        raise LedgerError(
            "UNIT_MISMATCH",
            f"actual is in {request.actual.unit.value} but reservation {reservation_id} was "
            f"made in {res.unit}",
            details={"requested_unit": request.actual.unit.value, "expected_units": [res.unit]},
        )
    _check_window(res, now_ms, res.deadline_ms)

    by_scope = {row.scope: row for row in budgets if row.unit == res.unit}
    rows = [by_scope[s] for s in res.budgeted_scopes if s in by_scope]
    est = res.estimate
    delta = actual - est
    new_rows: list[BudgetRow] = []
    if delta <= 0:
        charged = actual
        for row in rows:
            new_rows.append(
                evolve(
                    row,
                    reserved=row.reserved - est,
                    remaining=row.remaining + (est - actual),
                    spent=row.spent + actual,
                    updated_at_ms=now_ms,
                )
            )
    else:
        charge = overage_charge(rows, delta, res.overage_policy, event=False)
        charged = est + charge.charged
        for i, row in enumerate(rows):
            new_rows.append(
                evolve(
                    row,
                    reserved=row.reserved - est,
                    remaining=row.remaining - charge.charged,
                    spent=row.spent + est + charge.funded[i],
                    debt=row.debt + charge.deficit[i],
                    is_over_limit=(
                        row.is_over_limit
                        or charge.flag_over_limit[i]
                        or row.debt + charge.deficit[i] > row.overdraft_limit
                    ),
                    updated_at_ms=now_ms,
                )
            )
    for new in new_rows:
        _check_int64(new)

    body: dict[str, Any] = {"status": "COMMITTED", "charged": _amount(res.unit, charged)}
    if est > charged:
        body["released"] = _amount(res.unit, est - charged)
    body["balances"] = [balance_body(row) for row in new_rows]
    raw = dumps(body)
    updated = evolve(
        res,
        status="COMMITTED",
        committed=charged,
        committed_metadata=request.metadata,
        finalized_at_ms=now_ms,
    )
    idem = _idem(
        tenant_id, f"commit:{reservation_id}", request.idempotency_key, request_hash, 200, raw,
        now_ms, RETAIN_TERMINAL_MS, reservation_id,
    )  # fmt: skip
    return Outcome(200, raw, budgets=new_rows, reservation=updated, idempotency=idem, data=body)


def _refund_rows(res: ReservationRow, budgets: Iterable[BudgetRow], now_ms: int) -> list[BudgetRow]:
    by_scope = {row.scope: row for row in budgets if row.unit == res.unit}
    out = []
    for scope in res.budgeted_scopes:
        row = by_scope.get(scope)
        if row is None:
            continue
        new = evolve(
            row,
            reserved=row.reserved - res.estimate,
            remaining=row.remaining + res.estimate,
            updated_at_ms=now_ms,
        )
        _check_int64(new)
        out.append(new)
    return out


def plan_release(
    *,
    reservation_id: str,
    request: ReleaseRequest,
    tenant_id: str | None,
    reservation: ReservationRow | None,
    tenant: TenantRow | None,
    budgets: Iterable[BudgetRow],
    request_hash: str,
    now_ms: int,
    audit_id: str | None = None,
    request_id: str | None = None,
    trace_id: str | None = None,
) -> Outcome:
    """Plan ``POST /v1/reservations/{id}/release``: ``reserved -= e; remaining += e``.

    ``tenant_id`` is ``None`` for an admin-on-behalf-of release, which also writes an audit row
    (``audit_id`` must then be given). Check order as for :func:`plan_commit` (no unit check).

    Raises:
        LedgerError: NOT_FOUND, FORBIDDEN, TENANT_CLOSED, RESERVATION_EXPIRED, FINALIZED.
    """
    res = _check_reservation_owner(reservation, reservation_id, tenant_id)
    _check_settleable(res, now_ms, tenant)
    _check_window(res, now_ms, res.deadline_ms)
    new_rows = _refund_rows(res, budgets, now_ms)
    body = {
        "status": "RELEASED",
        "released": _amount(res.unit, res.estimate),
        "balances": [balance_body(row) for row in new_rows],
    }
    raw = dumps(body)
    updated = evolve(res, status="RELEASED", finalized_at_ms=now_ms)
    idem = _idem(
        res.tenant_id, f"release:{reservation_id}", request.idempotency_key, request_hash, 200,
        raw, now_ms, RETAIN_TERMINAL_MS, reservation_id,
    )  # fmt: skip
    audit = None
    if tenant_id is None:
        audit = AuditRow(
            audit_id=audit_id or f"aud_{reservation_id}",
            tenant_id=res.tenant_id,
            actor_type="admin_on_behalf_of",
            operation="releaseReservation",
            resource_id=reservation_id,
            created_at_ms=now_ms,
            request_id=request_id,
            trace_id=trace_id,
            details={"reason": request.reason} if request.reason else None,
        )
    return Outcome(
        200, raw, budgets=new_rows, reservation=updated, idempotency=idem, audit=audit, data=body
    )


def plan_extend(
    *,
    reservation_id: str,
    request: ReservationExtendRequest,
    tenant_id: str,
    reservation: ReservationRow | None,
    tenant: TenantRow | None,
    request_hash: str,
    now_ms: int,
) -> Outcome:
    """Plan ``POST /v1/reservations/{id}/extend``.

    Accepted while ``now <= expires_at`` (no grace). ``new_expires = expires_at + extend_by_ms``
    (relative to the current expiry), clamped so a reservation never runs more than the tenant's
    ``max_reservation_ttl_ms`` (default 1 h) past *now* (the spec lets a server clamp; the
    returned ``expires_at_ms`` is authoritative; never earlier than the current expiry).
    At most ``max_extensions`` (tenant setting, default 10) extensions per reservation.

    Raises:
        LedgerError: NOT_FOUND, FORBIDDEN, TENANT_CLOSED, RESERVATION_EXPIRED, FINALIZED,
            MAX_EXTENSIONS_EXCEEDED.
    """
    res = _check_reservation_owner(reservation, reservation_id, tenant_id)
    _check_settleable(res, now_ms, tenant)
    if now_ms > res.expires_at_ms:
        raise LedgerError(
            "RESERVATION_EXPIRED",
            f"reservation {reservation_id} expired at {res.expires_at_ms} and can no longer be "
            "extended (extension has no grace period); commit or release it within its grace",
        )
    if res.extension_count >= res.max_extensions:
        raise LedgerError(
            "MAX_EXTENSIONS_EXCEEDED",
            f"reservation {reservation_id} was already extended {res.extension_count} times "
            f"(limit {res.max_extensions}); commit or release it and reserve again",
        )
    cap = now_ms + _tenant_value(tenant, "max_reservation_ttl_ms", DEFAULT_MAX_TTL_MS)
    new_expires = max(res.expires_at_ms, min(res.expires_at_ms + request.extend_by_ms, cap))
    updated = evolve(res, expires_at_ms=new_expires, extension_count=res.extension_count + 1)
    body = {
        "status": "ACTIVE",
        "expires_at_ms": new_expires,
        "remaining_ttl_ms": max(0, new_expires - now_ms),
    }
    raw = dumps(body)
    idem = _idem(
        tenant_id, f"extend:{reservation_id}", request.idempotency_key, request_hash, 200, raw,
        now_ms, RETAIN_TERMINAL_MS, reservation_id,
    )  # fmt: skip
    return Outcome(200, raw, reservation=updated, idempotency=idem)


def plan_expire(
    reservation: ReservationRow, budgets: Iterable[BudgetRow], now_ms: int
) -> Outcome | None:
    """Plan the expiry of one reservation past ``expires_at + grace``; ``None`` if not due.

    Only an ACTIVE reservation past its deadline expires; its full estimate returns to every
    budgeted scope (``reserved -= e; remaining += e``). Idempotent by construction.
    """
    if reservation.status != "ACTIVE" or now_ms <= reservation.deadline_ms:
        return None
    new_rows = _refund_rows(reservation, budgets, now_ms)
    updated = evolve(reservation, status="EXPIRED")
    return Outcome(200, b"", budgets=new_rows, reservation=updated)


def plan_close_release(
    reservation: ReservationRow, budgets: Iterable[BudgetRow], now_ms: int
) -> Outcome:
    """Release an ACTIVE reservation as part of a tenant-close cascade (no checks, no body)."""
    new_rows = _refund_rows(reservation, budgets, now_ms)
    updated = evolve(reservation, status="RELEASED", finalized_at_ms=now_ms)
    return Outcome(200, b"", budgets=new_rows, reservation=updated)


# --------------------------------------------------------------------------------------------
# Events


def plan_event(
    *,
    request: EventCreateRequest,
    tenant_id: str,
    tenant: TenantRow | None,
    budgets: Iterable[BudgetRow],
    request_hash: str,
    event_id: str,
    now_ms: int,
    scopes: list[str] | None = None,
) -> Outcome:
    """Plan ``POST /v1/events``: debit ``actual`` on every budgeted scope without a reservation.

    Checks: tenant closed (409), budget FROZEN/CLOSED (409), no budget (404 or 400
    UNIT_MISMATCH), then the overage policy with ``delta = actual`` (debt and over-limit flags
    do not block events: the spend already happened). Answers 201; ``charged`` is present only
    when the charge was capped.

    Raises:
        LedgerError: the failures above or an int64 overflow.
    """
    refused = tenant_guard(tenant, new_work=True)
    if refused == "TENANT_CLOSED":
        _raise_tenant_closed(tenant_id)
    if refused is not None:
        raise LedgerError(refused, _TENANT_SUSPENDED_MSG.format(t=tenant_id))
    unit = request.actual.unit.value
    actual = request.actual.amount
    if scopes is None:
        scopes = derive_scopes(request.subject)
    rows, other_units = _select_budgets(scopes, unit, budgets)
    if not rows:
        if other_units:
            _raise_unit_mismatch(scopes, unit, other_units)
        raise LedgerError(
            "NOT_FOUND",
            f"Budget not found for provided scope: {scopes[-1]} ({unit}); create a budget at "
            "one of the derived scopes: " + ", ".join(scopes),
        )
    for row in rows:
        if row.status in ("FROZEN", "CLOSED"):
            code = "BUDGET_FROZEN" if row.status == "FROZEN" else "BUDGET_CLOSED"
            raise LedgerError(code, _REASON_MESSAGES[code].format(s=row.scope, u=row.unit))
    policy = resolve_overage_policy(
        request.overage_policy.value if request.overage_policy is not None else None, rows, tenant
    )
    charge = (
        overage_charge(rows, actual, policy, event=True)
        if actual > 0
        else Charge(0, [0] * len(rows), [0] * len(rows), [False] * len(rows))
    )
    new_rows = []
    for i, row in enumerate(rows):
        new = evolve(
            row,
            remaining=row.remaining - charge.charged,
            spent=row.spent + charge.funded[i],
            debt=row.debt + charge.deficit[i],
            is_over_limit=(
                row.is_over_limit
                or charge.flag_over_limit[i]
                or row.debt + charge.deficit[i] > row.overdraft_limit
            ),
            updated_at_ms=now_ms,
        )
        _check_int64(new)
        new_rows.append(new)
    body: dict[str, Any] = {"status": "APPLIED", "event_id": event_id}
    if charge.charged < actual:
        body["charged"] = _amount(unit, charge.charged)
    body["balances"] = [balance_body(row) for row in new_rows]
    raw = dumps(body)
    event = EventRow(
        event_id=event_id,
        tenant_id=tenant_id,
        subject=request.subject.model_dump(mode="json", exclude_none=True),
        action=request.action.model_dump(mode="json", exclude_none=True),
        unit=unit,
        actual=actual,
        charged=charge.charged,
        scope_path=scopes[-1],
        affected_scopes=scopes,
        budgeted_scopes=[row.scope for row in rows],
        overage_policy=policy,
        idempotency_key=request.idempotency_key,
        created_at_ms=now_ms,
        metrics=(
            request.metrics.model_dump(mode="json", exclude_none=True) if request.metrics else None
        ),
        metadata=request.metadata,
        client_time_ms=request.client_time_ms,
    )
    idem = _idem(
        tenant_id, "event", request.idempotency_key, request_hash, 201, raw, now_ms,
        RETAIN_EVENT_MS,
    )  # fmt: skip
    return Outcome(201, raw, budgets=new_rows, idempotency=idem, event=event)


# --------------------------------------------------------------------------------------------
# Reservation views


def reservation_body(
    res: ReservationRow, *, include: Iterable[str] = ("metadata", "committed_metadata")
) -> dict[str, Any]:
    """Return the wire ``ReservationDetail``/``ReservationSummary`` of a reservation."""
    body: dict[str, Any] = {
        "reservation_id": res.reservation_id,
        "status": res.status,
        "subject": res.subject,
        "action": res.action,
        "reserved": _amount(res.unit, res.estimate),
        "created_at_ms": res.created_at_ms,
        "expires_at_ms": res.expires_at_ms,
        "scope_path": res.scope_path,
        "affected_scopes": res.affected_scopes,
    }
    if res.idempotency_key is not None:
        body["idempotency_key"] = res.idempotency_key
    if res.status == "COMMITTED" and res.committed is not None:
        body["committed"] = _amount(res.unit, res.committed)
    if res.finalized_at_ms is not None and res.status in ("COMMITTED", "RELEASED"):
        body["finalized_at_ms"] = res.finalized_at_ms
    wanted = set(include)
    if "metadata" in wanted and res.metadata:
        body["metadata"] = res.metadata
    if "committed_metadata" in wanted and res.committed_metadata and res.status == "COMMITTED":
        body["committed_metadata"] = res.committed_metadata
    return body


# --------------------------------------------------------------------------------------------
# Admin: budgets and funding

FUND_OPERATIONS: Final = ("CREDIT", "DEBIT", "RESET", "RESET_SPENT", "REPAY_DEBT")


def plan_fund(
    row: BudgetRow, operation: str, amount: int, *, spent: int | None, now_ms: int
) -> tuple[BudgetRow, dict[str, Any]]:
    """Apply an admin funding operation to one budget; return the new row and the response.

    * CREDIT: ``allocated += x; remaining += x`` (debt untouched).
    * DEBIT: ``allocated -= x; remaining -= x``; 409 if remaining would go below 0.
    * RESET: ``allocated = x; remaining = x - spent - reserved - debt``.
    * RESET_SPENT: ``allocated = x; spent = s (default 0); remaining = x - s - reserved - debt``.
    * REPAY_DEBT: ``r = min(debt, x)``; ``debt -= r; remaining += r``; the excess ``x - r`` is
      credited (``allocated += excess; remaining += excess``).

    Every operation recomputes ``is_over_limit = debt > overdraft_limit`` (the operator's way to
    clear the flag). FROZEN and CLOSED budgets refuse funding.

    Raises:
        LedgerError: BUDGET_FROZEN, BUDGET_CLOSED, BUDGET_EXCEEDED (DEBIT), INVALID_REQUEST.
    """
    if row.status == "FROZEN":
        raise LedgerError(
            "BUDGET_FROZEN", f"budget {row.scope} ({row.unit}) is FROZEN; unfreeze it first"
        )
    if row.status == "CLOSED":
        raise LedgerError("BUDGET_CLOSED", f"budget {row.scope} ({row.unit}) is CLOSED")
    new = evolve(row, updated_at_ms=now_ms)
    if operation == "CREDIT":
        new.allocated += amount
        new.remaining += amount
    elif operation == "DEBIT":
        if row.remaining - amount < 0:
            raise LedgerError(
                "BUDGET_EXCEEDED",
                f"cannot DEBIT {amount} from {row.scope} ({row.unit}): remaining is only "
                f"{row.remaining} and would go negative",
            )
        new.allocated -= amount
        new.remaining -= amount
    elif operation == "RESET":
        new.allocated = amount
        new.remaining = amount - row.spent - row.reserved - row.debt
    elif operation == "RESET_SPENT":
        new.allocated = amount
        new.spent = spent or 0
        new.remaining = amount - new.spent - row.reserved - row.debt
    elif operation == "REPAY_DEBT":
        repaid = min(row.debt, amount)
        excess = amount - repaid
        new.debt -= repaid
        new.remaining += repaid + excess
        new.allocated += excess
    else:
        raise LedgerError(
            "INVALID_REQUEST",
            f"unknown funding operation {operation!r}; use one of {', '.join(FUND_OPERATIONS)}",
        )
    if new.allocated < 0:
        raise LedgerError(
            "INVALID_REQUEST",
            f"{operation} would make allocated of {row.scope} ({row.unit}) negative",
        )
    new.is_over_limit = new.debt > new.overdraft_limit
    _check_int64(new)
    unit = row.unit
    response = {
        "operation": operation,
        "previous_allocated": _amount(unit, row.allocated),
        "new_allocated": _amount(unit, new.allocated),
        "previous_remaining": _amount(unit, row.remaining),
        "new_remaining": _amount(unit, new.remaining),
        "previous_debt": _amount(unit, row.debt),
        "new_debt": _amount(unit, new.debt),
        "previous_spent": _amount(unit, row.spent),
        "new_spent": _amount(unit, new.spent),
    }
    return new, response


def validate_caps(caps: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate operator-configured caps against the spec's ``Caps`` schema.

    Raises:
        LedgerError: INVALID_REQUEST naming the bad field.
    """
    if caps is None:
        return None
    try:
        parsed = Caps.model_validate(caps)
    except ValueError as exc:
        raise LedgerError("INVALID_REQUEST", f"caps: {exc}") from None
    out: dict[str, Any] = parsed.model_dump(mode="json", exclude_none=True)
    return out or None


def check_budget_creation(
    tenant: TenantRow | None, row: BudgetRow, existing: Iterable[BudgetRow]
) -> None:
    """Refuse a new budget for a missing or non-ACTIVE tenant, or a duplicate (scope, unit).

    ``existing`` are the budgets already at ``row.scope`` (any unit).

    Raises:
        LedgerError: ``TENANT_NOT_FOUND`` (400), ``TENANT_CLOSED``, ``INVALID_REQUEST`` (tenant
            not ACTIVE) or ``DUPLICATE_RESOURCE``.
    """
    if tenant is None:
        raise LedgerError(
            "TENANT_NOT_FOUND",
            f"tenant {row.tenant_id} does not exist; create it first",
            status=400,
        )
    if tenant.status == "CLOSED":
        raise LedgerError("TENANT_CLOSED", f"tenant {row.tenant_id} is CLOSED")
    if tenant.status != "ACTIVE":
        raise LedgerError(
            "INVALID_REQUEST",
            f"tenant {row.tenant_id} is {tenant.status}; budgets can only be created "
            "for ACTIVE tenants",
        )
    if any(b.unit == row.unit for b in existing):
        raise LedgerError(
            "DUPLICATE_RESOURCE",
            f"a budget for {row.scope} in {row.unit} already exists; fund it with "
            "POST /v1/admin/budgets/fund instead",
        )
