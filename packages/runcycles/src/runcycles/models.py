"""Wire models for every schema of the Cycles runtime protocol (``cycles-protocol-v0.yaml``).

The single source of truth for the wire format: the client and ``runcycles-server`` both use
them. Requests forbid unknown fields and enforce every constraint of the spec (strict
integers and booleans: ``"500"`` or ``5.0`` is not an amount); responses accept unknown
fields (``extra="allow"``), so a newer server never breaks an older client. Error and reason
codes stay open strings (known values on :class:`ErrorCode` and :class:`ReasonCode`), and so
do enum fields that only responses carry (``DenyDetail.quota_violation.window``): a value this
version does not know is kept as a plain string. Optional request fields default to ``None``
and are omitted from the body (serialize with :func:`to_wire`), so the server's defaults apply.

The fields of the v0.1.26 extensions (``cycles-protocol-extensions-v0.1.26.yaml``) are here
too: :class:`DenyDetail` on denials, ``observe_mode`` on reservation requests and
``policy_keys`` on :class:`Action`. The admin-plane governance models (policies, the
action-kind registry, quota counters) are in :mod:`runcycles.governance`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

__all__ = [
    "INT64_MAX",
    "STANDARD_SUBJECT_FIELDS",
    "Action",
    "ActionPolicyKeys",
    "ActionQuotaViolation",
    "ActionQuotaWindow",
    "ActionRiskClass",
    "Amount",
    "Balance",
    "BalanceResponse",
    "Caps",
    "CommitOveragePolicy",
    "CommitRequest",
    "CommitResponse",
    "CyclesEvidenceRef",
    "CyclesMetrics",
    "Decision",
    "DecisionRequest",
    "DecisionResponse",
    "DenyDetail",
    "ErrorCode",
    "ErrorResponse",
    "EventCreateRequest",
    "EventCreateResponse",
    "ObserveMode",
    "ReasonCode",
    "ReleaseRequest",
    "ReleaseResponse",
    "ReservationCreateRequest",
    "ReservationCreateResponse",
    "ReservationDetail",
    "ReservationEvidence",
    "ReservationExtendRequest",
    "ReservationExtendResponse",
    "ReservationListResponse",
    "ReservationStatus",
    "ReservationSummary",
    "SignedAmount",
    "StandardMetrics",
    "Subject",
    "Unit",
    "deny_detail_from",
    "parse_response",
    "to_wire",
]

INT64_MAX: Final = 2**63 - 1
"""Largest amount the protocol can carry (amounts are int64 on the wire)."""
INT64_MIN: Final = -(2**63)

STANDARD_SUBJECT_FIELDS: Final = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
"""The six standard subject levels, in canonical scope order."""

# --------------------------------------------------------------------------------------------
# Constrained scalar types

NonNegInt64 = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=256)]
SubjectValue = Annotated[str, Field(max_length=128)]
Metadata = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Enums and open-string constants


class Unit(str, Enum):
    """Unit of an amount. ``1 USD = 10**8 USD_MICROCENTS``."""

    USD_MICROCENTS = "USD_MICROCENTS"
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"

    def __str__(self) -> str:
        return self.value


class Decision(str, Enum):
    """Outcome of a decide or reservation evaluation."""

    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"

    def __str__(self) -> str:
        return self.value


class CommitOveragePolicy(str, Enum):
    """What the server does when a commit's actual exceeds the reserved estimate.

    * ``REJECT``: the commit fails with 409 ``BUDGET_EXCEEDED`` (reserve a buffer instead).
    * ``ALLOW_IF_AVAILABLE`` (server default): charge the overage up to what remains, never
      create debt, and mark scopes that could not cover it as over limit.
    * ``ALLOW_WITH_OVERDRAFT``: charge the overage in full, recording any shortfall as debt
      up to the scope's ``overdraft_limit``.
    """

    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"

    def __str__(self) -> str:
        return self.value


class ReservationStatus(str, Enum):
    """Lifecycle state of a reservation (every state but ``ACTIVE`` is terminal)."""

    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"

    def __str__(self) -> str:
        return self.value


class ObserveMode(str, Enum):
    """How the server evaluates a reservation (``ObserveModeEnum``, v0.1.26 extension).

    * ``ENFORCE`` (the default): normal enforcement.
    * ``OBSERVE``: shadow mode. The server evaluates everything (access control, quotas,
      budget) but changes nothing, answers ``200`` with the decision it would have taken and
      no ``reservation_id``, and records it as a ``reservation.observed_*`` event.
    * ``DISABLED``: a synonym of ``ENFORCE``.

    Set per request on :class:`ReservationCreateRequest`; the tenant's ``observe_mode`` applies
    when the request has none.
    """

    DISABLED = "DISABLED"
    OBSERVE = "OBSERVE"
    ENFORCE = "ENFORCE"

    def __str__(self) -> str:
        return self.value


class ActionRiskClass(str, Enum):
    """Risk class of an action kind, in ascending order of risk (action-kind registry)."""

    READ_ONLY = "read_only"
    LOCAL_MUTATION = "local_mutation"
    SIDE_EFFECT = "side_effect"
    EXTERNAL_SIDE_EFFECT = "external_side_effect"
    HIGH_RISK = "high_risk"

    def __str__(self) -> str:
        return self.value


class ActionQuotaWindow(str, Enum):
    """Window of an action quota (action-kind registry).

    ``per_run`` counts per ``subject.dimensions.run_id`` (required when such a quota applies);
    the others are UTC calendar buckets (minute, hour, day; ``per_tenant_per_day`` counts at
    the tenant root whatever the subject).
    """

    PER_RUN = "per_run"
    PER_MINUTE_TUMBLING = "per_minute_tumbling"
    PER_HOUR_TUMBLING = "per_hour_tumbling"
    PER_DAY_TUMBLING = "per_day_tumbling"
    PER_TENANT_PER_DAY = "per_tenant_per_day"

    def __str__(self) -> str:
        return self.value


class ErrorCode:
    """Known values of ``ErrorResponse.error`` (an open string: unknown codes are kept as-is)."""

    INVALID_REQUEST: Final = "INVALID_REQUEST"
    UNAUTHORIZED: Final = "UNAUTHORIZED"
    FORBIDDEN: Final = "FORBIDDEN"
    NOT_FOUND: Final = "NOT_FOUND"
    BUDGET_EXCEEDED: Final = "BUDGET_EXCEEDED"
    BUDGET_FROZEN: Final = "BUDGET_FROZEN"
    BUDGET_CLOSED: Final = "BUDGET_CLOSED"
    RESERVATION_EXPIRED: Final = "RESERVATION_EXPIRED"
    RESERVATION_FINALIZED: Final = "RESERVATION_FINALIZED"
    IDEMPOTENCY_MISMATCH: Final = "IDEMPOTENCY_MISMATCH"
    UNIT_MISMATCH: Final = "UNIT_MISMATCH"
    OVERDRAFT_LIMIT_EXCEEDED: Final = "OVERDRAFT_LIMIT_EXCEEDED"
    DEBT_OUTSTANDING: Final = "DEBT_OUTSTANDING"
    MAX_EXTENSIONS_EXCEEDED: Final = "MAX_EXTENSIONS_EXCEEDED"
    LIMIT_EXCEEDED: Final = "LIMIT_EXCEEDED"
    TENANT_CLOSED: Final = "TENANT_CLOSED"
    INTERNAL_ERROR: Final = "INTERNAL_ERROR"
    # v0.1.26 extensions (action governance): a policy refused the action.
    ACTION_QUOTA_EXCEEDED: Final = "ACTION_QUOTA_EXCEEDED"
    ACTION_KIND_NOT_ALLOWED: Final = "ACTION_KIND_NOT_ALLOWED"
    ACTION_KIND_DENIED: Final = "ACTION_KIND_DENIED"

    ALL: Final = frozenset(value for name, value in list(vars().items()) if name.isupper())
    """Every error code of the runtime spec and its v0.1.26 extensions (the constants above)."""


class ReasonCode:
    """Known values of ``reason_code`` on a ``DENY`` decision (an open string).

    Clients must treat an unknown reason code as a generic, terminal denial.
    """

    BUDGET_EXCEEDED: Final = "BUDGET_EXCEEDED"
    BUDGET_FROZEN: Final = "BUDGET_FROZEN"
    BUDGET_CLOSED: Final = "BUDGET_CLOSED"
    BUDGET_NOT_FOUND: Final = "BUDGET_NOT_FOUND"
    OVERDRAFT_LIMIT_EXCEEDED: Final = "OVERDRAFT_LIMIT_EXCEEDED"
    DEBT_OUTSTANDING: Final = "DEBT_OUTSTANDING"
    TENANT_CLOSED: Final = "TENANT_CLOSED"
    ACTION_QUOTA_EXCEEDED: Final = "ACTION_QUOTA_EXCEEDED"
    ACTION_KIND_DENIED: Final = "ACTION_KIND_DENIED"
    ACTION_KIND_NOT_ALLOWED: Final = "ACTION_KIND_NOT_ALLOWED"
    TENANT_SUSPENDED: Final = "TENANT_SUSPENDED"
    POLICY_VIOLATION: Final = "POLICY_VIOLATION"


OpenRiskClass = Annotated[ActionRiskClass | str, Field(union_mode="left_to_right")]
"""A risk class in a response: an :class:`ActionRiskClass`, or the string a newer server sent."""
OpenQuotaWindow = Annotated[ActionQuotaWindow | str, Field(union_mode="left_to_right")]
"""A quota window in a response: an :class:`ActionQuotaWindow`, or the string as sent."""


# --------------------------------------------------------------------------------------------
# Base classes


_ModelT = TypeVar("_ModelT", bound=BaseModel)


class _Request(BaseModel):
    """Base of every request model and value object.

    Unknown fields are rejected and assignments re-validated. When a value object is parsed
    as part of a *response* (see :func:`parse_response`), unknown fields are tolerated
    instead, so a newer server that adds a field to, say, ``Caps`` never breaks an older
    client.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Response(BaseModel):
    """Base of every response model: unknown fields from newer servers are kept."""

    model_config = ConfigDict(extra="allow")


def parse_response(model: type[_ModelT], data: Any) -> _ModelT:
    """Validate a decoded JSON response body as ``model``, tolerating unknown fields anywhere.

    Raises:
        pydantic.ValidationError: if a required field is missing or has the wrong type.
    """
    return model.model_validate(data, extra="allow")


def to_wire(model: BaseModel) -> dict[str, Any]:
    """Return the JSON-ready dict of ``model`` as sent on the wire (``None`` fields omitted)."""
    return model.model_dump(mode="json", exclude_none=True)


# --------------------------------------------------------------------------------------------
# Value objects (used in both directions, so they forbid extras like the spec says)


class Amount(_Request):
    """A non-negative int64 quantity in one unit."""

    unit: Unit
    amount: NonNegInt64


class SignedAmount(_Request):
    """Like :class:`Amount` but may be negative (``Balance.remaining`` in overdraft)."""

    unit: Unit
    amount: Int64


class Subject(_Request):
    """Who is spending: ``tenant > workspace > app > workflow > agent > toolset``.

    At least one of the six standard fields is required; ``dimensions`` alone is not enough.
    ``dimensions`` holds up to 16 free-form string tags that servers round-trip.
    """

    tenant: SubjectValue | None = None
    workspace: SubjectValue | None = None
    app: SubjectValue | None = None
    workflow: SubjectValue | None = None
    agent: SubjectValue | None = None
    toolset: SubjectValue | None = None
    dimensions: dict[str, Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, max_length=16
    )

    @model_validator(mode="after")
    def _require_standard_field(self) -> Subject:
        if not self.has_standard_field():
            raise ValueError(
                "subject needs at least one of tenant, workspace, app, workflow, agent or "
                "toolset (dimensions alone are not a subject)"
            )
        return self

    def has_standard_field(self) -> bool:
        """Return whether at least one of the six standard fields is set."""
        return any(getattr(self, name) is not None for name in STANDARD_SUBJECT_FIELDS)


class ActionPolicyKeys(_Request):
    """Extra routing dimensions of an action for policy matching (``Action.policy_keys``).

    Optional, and never an error to omit: a quota rule with an allowlist on a dimension the
    action does not carry simply does not apply to it. Which dimensions a kind's policies
    use is in the registry (:func:`runcycles.action_kinds.policy_dimensions`); servers ignore
    the others. ``custom`` holds up to 8 free string dimensions.
    """

    host: Annotated[str, Field(max_length=253)] | None = None
    recipient_domain: Annotated[str, Field(max_length=253)] | None = None
    resource_type: Annotated[str, Field(max_length=128)] | None = None
    path_prefix: Annotated[str, Field(max_length=512)] | None = None
    custom: dict[str, Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, max_length=8
    )


class Action(_Request):
    """What is being done: ``kind`` (``llm.completion``) and ``name`` (``openai:gpt-4o``).

    Use a canonical kind of the registry (constants and checks in
    :mod:`runcycles.action_kinds`) so policies can name it; ``policy_keys`` adds routing
    dimensions such as the host or the recipient domain.
    """

    kind: Annotated[str, Field(max_length=64)]
    name: Annotated[str, Field(max_length=256)]
    tags: list[Annotated[str, Field(max_length=64)]] | None = Field(default=None, max_length=10)
    policy_keys: ActionPolicyKeys | None = None


class Caps(_Request):
    """Soft-landing constraints returned with an ``ALLOW_WITH_CAPS`` decision."""

    max_tokens: NonNegInt | None = None
    max_steps_remaining: NonNegInt | None = None
    tool_allowlist: list[Annotated[str, Field(max_length=256)]] | None = None
    tool_denylist: list[Annotated[str, Field(max_length=256)]] | None = None
    cooldown_ms: NonNegInt | None = None

    def is_tool_allowed(self, tool_name: str) -> bool:
        """Apply the spec's precedence: a non-empty allowlist wins, else the denylist excludes.

        Matching is case-sensitive and compares against ``Action.name``.
        """
        if self.tool_allowlist:
            return tool_name in self.tool_allowlist
        if self.tool_denylist:
            return tool_name not in self.tool_denylist
        return True


class StandardMetrics(_Request):
    """Optional usage metrics attached to a commit or event."""

    tokens_input: NonNegInt | None = None
    tokens_output: NonNegInt | None = None
    latency_ms: NonNegInt | None = None
    model_version: Annotated[str, Field(max_length=128)] | None = None
    custom: Metadata | None = None

    def put_custom(self, key: str, value: Any) -> None:
        """Set one entry of the free-form ``custom`` map."""
        custom = dict(self.custom or {})
        custom[key] = value
        self.custom = custom

    def is_empty(self) -> bool:
        """Return whether no metric is set."""
        return all(getattr(self, name) is None for name in type(self).model_fields)


CyclesMetrics = StandardMetrics
"""The name the published client uses for :class:`StandardMetrics`."""


class CyclesEvidenceRef(_Response):
    """Reference to a signed evidence envelope (transport metadata; clients may ignore it)."""

    evidence_id: str
    cycles_evidence_url: str


class ReservationEvidence(_Response):
    """Evidence references of a reservation's operations."""

    reserve: CyclesEvidenceRef | None = None
    commit: CyclesEvidenceRef | None = None
    release: CyclesEvidenceRef | None = None


class CyclesEvidence(_Response):
    """A signed evidence envelope (``GET /v1/evidence/{evidence_id}``; ``cycles-evidence-v0.2``).

    ``artifact_type`` is an open string (``decide``, ``reserve``, ``commit``, ``release``,
    ``error``); ``payload`` holds one key, the artifact type. Verify it with
    :func:`runcycles.evidence.verify_envelope` (on the served bytes or on this model's
    ``model_dump(mode="json", exclude_unset=True)``).
    """

    schema_version: str
    artifact_type: str
    server_id: str
    signer_did: str
    issued_at_ms: int
    payload: dict[str, Any]
    evidence_id: str
    signature: str
    trace_id: str | None = None


class CyclesEvidenceJwk(_Response):
    """One Ed25519 signing key of a server with its validity window (epoch ms, end exclusive)."""

    kty: str
    crv: str
    x: str
    kid: str
    cycles_nbf_ms: int
    cycles_exp_ms: int | None = None
    alg: str | None = None
    status: str | None = None
    """``active`` or ``retired`` (advisory: keys are selected by window, never by status)."""


class CyclesEvidenceJwks(_Response):
    """A server's evidence signing keys (``GET /v1/.well-known/cycles-jwks.json``)."""

    keys: list[CyclesEvidenceJwk]


class ActionQuotaViolation(_Response):
    """The quota rule that denied an action (``DenyDetail.quota_violation``).

    ``used`` of ``limit`` calls were made in the window (``window_key`` is the run id for
    ``per_run``, the UTC bucket otherwise) at ``scope``. ``risk_class`` is set when the rule
    is a risk-class quota; ``action_kind`` is then the kind that tripped it.
    """

    action_kind: str
    window: OpenQuotaWindow
    used: int
    limit: int
    scope: str
    window_key: str | None = None
    policy_id: str | None = None
    risk_class: OpenRiskClass | None = None


class DenyDetail(_Response):
    """Why a request was denied, for operators: the rule, the quota, what to change.

    Sent with every ``DENY`` decision (``deny_detail`` of a decide or dry-run answer) and in
    the ``details`` of a 409 error (read it as ``error.deny_detail``). ``reason_code`` is an
    open string (known values on :class:`ReasonCode`); ``quota_violation`` is set for
    ``ACTION_QUOTA_EXCEEDED``; ``budget_remaining`` (in the request's unit, negative in
    overdraft) for ``BUDGET_EXCEEDED``.
    """

    reason_code: str
    quota_violation: ActionQuotaViolation | None = None
    blocked_by_scope: str | None = None
    blocked_by_policy: str | None = None
    suggested_fix: str | None = None
    budget_remaining: int | None = None


class Balance(_Response):
    """Ledger state of one (scope, unit) budget.

    When every amount is present, ``remaining = allocated - spent - reserved - debt``.
    """

    scope: str
    scope_path: str
    remaining: SignedAmount
    reserved: Amount | None = None
    spent: Amount | None = None
    debt: Amount | None = None
    allocated: Amount | None = None
    overdraft_limit: Amount | None = None
    is_over_limit: bool | None = None


# --------------------------------------------------------------------------------------------
# Requests


class DecisionRequest(_Request):
    """Body of ``POST /v1/decide``: would this reservation be allowed? Nothing is held."""

    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    metadata: Metadata | None = None


class ReservationCreateRequest(_Request):
    """Body of ``POST /v1/reservations``: hold ``estimate`` on every budgeted scope."""

    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    ttl_ms: Annotated[StrictInt, Field(ge=1_000, le=86_400_000)] | None = None
    grace_period_ms: Annotated[StrictInt, Field(ge=0, le=60_000)] | None = None
    overage_policy: CommitOveragePolicy | None = None
    dry_run: StrictBool | None = None
    metadata: Metadata | None = None
    observe_mode: ObserveMode | None = None


class CommitRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/commit``: record the actual usage."""

    idempotency_key: IdempotencyKey
    actual: Amount
    metrics: StandardMetrics | None = None
    metadata: Metadata | None = None


class ReleaseRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/release``: give the whole reservation back."""

    idempotency_key: IdempotencyKey
    reason: Annotated[str, Field(max_length=256)] | None = None


class ReservationExtendRequest(_Request):
    """Body of ``POST /v1/reservations/{id}/extend``: move the expiry by ``extend_by_ms``."""

    idempotency_key: IdempotencyKey
    extend_by_ms: Annotated[StrictInt, Field(ge=1, le=86_400_000)]
    metadata: Metadata | None = None


class EventCreateRequest(_Request):
    """Body of ``POST /v1/events``: debit ``actual`` directly, without a reservation."""

    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    actual: Amount
    overage_policy: CommitOveragePolicy | None = None
    metrics: StandardMetrics | None = None
    client_time_ms: NonNegInt64 | None = None
    metadata: Metadata | None = None


# --------------------------------------------------------------------------------------------
# Responses


class DecisionResponse(_Response):
    """Answer of ``POST /v1/decide``."""

    decision: Decision
    caps: Caps | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None
    affected_scopes: list[str] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None
    deny_detail: DenyDetail | None = None


class ReservationCreateResponse(_Response):
    """Answer of ``POST /v1/reservations``.

    ``reservation_id`` is present for a live ``ALLOW``/``ALLOW_WITH_CAPS``; a dry run, an
    ``observe_mode=OBSERVE`` evaluation or a ``DENY`` has none. ``deny_detail`` explains a
    ``DENY``.
    """

    decision: Decision
    affected_scopes: list[str]
    reservation_id: str | None = None
    reserved: Amount | None = None
    expires_at_ms: int | None = None
    remaining_ttl_ms: int | None = None
    scope_path: str | None = None
    caps: Caps | None = None
    balances: list[Balance] | None = None
    reason_code: str | None = None
    retry_after_ms: int | None = None
    cycles_evidence: CyclesEvidenceRef | None = None
    deny_detail: DenyDetail | None = None


class CommitResponse(_Response):
    """Answer of a commit. ``released`` is the surplus returned when actual < reserved."""

    status: Literal["COMMITTED"]
    charged: Amount
    released: Amount | None = None
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None


class ReleaseResponse(_Response):
    """Answer of a release."""

    status: Literal["RELEASED"]
    released: Amount
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None


class ReservationExtendResponse(_Response):
    """Answer of an extend. ``expires_at_ms`` is authoritative."""

    status: Literal["ACTIVE"]
    expires_at_ms: int
    remaining_ttl_ms: int | None = None
    balances: list[Balance] | None = None


class EventCreateResponse(_Response):
    """Answer of ``POST /v1/events`` (HTTP 201). ``charged`` is present when it was capped."""

    status: Literal["APPLIED"]
    event_id: str
    charged: Amount | None = None
    balances: list[Balance] | None = None


class BalanceResponse(_Response):
    """One page of ``GET /v1/balances``."""

    balances: list[Balance]
    next_cursor: str | None = None
    has_more: bool | None = None


class ReservationSummary(_Response):
    """One row of ``GET /v1/reservations``."""

    reservation_id: str
    status: ReservationStatus
    subject: Subject
    action: Action
    reserved: Amount
    created_at_ms: int
    expires_at_ms: int
    scope_path: str
    affected_scopes: list[str]
    idempotency_key: str | None = None
    committed: Amount | None = None
    finalized_at_ms: int | None = None
    metadata: Metadata | None = None
    committed_metadata: Metadata | None = None
    evidence: ReservationEvidence | None = None


class ReservationDetail(ReservationSummary):
    """Answer of ``GET /v1/reservations/{id}``."""


class ReservationListResponse(_Response):
    """One page of ``GET /v1/reservations``."""

    reservations: list[ReservationSummary]
    next_cursor: str | None = None
    has_more: bool | None = None


class ErrorResponse(_Response):
    """Body of every 4xx/5xx answer. ``error`` is an open string (see :class:`ErrorCode`)."""

    error: str
    message: str
    request_id: str
    trace_id: str | None = None
    details: Metadata | None = None
    cycles_evidence: CyclesEvidenceRef | None = None

    @property
    def error_code(self) -> str:
        """Alias of :attr:`error`."""
        return self.error

    @property
    def deny_detail(self) -> DenyDetail | None:
        """``details.deny_detail`` as a :class:`DenyDetail` (``None`` if absent or malformed)."""
        return deny_detail_from(self.details)


def deny_detail_from(details: Any) -> DenyDetail | None:
    """Return ``details["deny_detail"]`` as a :class:`DenyDetail`, or ``None``.

    ``None`` when ``details`` is not a mapping, has no ``deny_detail``, or holds one that is
    not a valid ``DenyDetail`` (the raw value stays readable in ``details``).
    """
    if not isinstance(details, Mapping):
        return None
    raw = details.get("deny_detail")
    if raw is None:
        return None
    try:
        return parse_response(DenyDetail, raw)
    except ValidationError:
        return None
