"""Wire models of action governance on the admin plane (the v0.1.26 extensions).

Policies (``/v1/admin/policies``) with their action quotas and allow/deny lists
(``cycles-governance-admin-v0.1.25.yaml`` with ``cycles-governance-extensions-v0.1.26.yaml``),
the action-kind registry (``GET /v1/action-kinds``) and the quota counters
(``/v1/admin/action-quota-counters``, ``cycles-action-kinds-v0.1.26.yaml``), and the payloads
of the events these extensions add. The runtime side (``DenyDetail``, ``observe_mode``,
``policy_keys``) is in :mod:`runcycles.models`.

The rules of :mod:`runcycles.models` hold here too: requests forbid unknown fields and check
every bound of the spec, responses keep unknown fields, and enum fields that only responses
carry keep a value this version does not know as a plain string. Where the spec states a rule
in prose that its JSON Schema cannot express, the request models check it as well, so the
mistake is reported before the server answers ``400``:

* ``per_run_counter_ttl_ms`` only on a ``per_run`` quota;
* ``allowed_action_kinds`` and ``denied_action_kinds`` not both non-empty in one request;
* a counter reset names its ``tenant_id``, and its ``risk_class`` for a ``__risk__`` counter.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Final

from pydantic import Field, StrictFloat, StrictInt, model_validator

from runcycles.models import (
    ActionQuotaWindow,
    ActionRiskClass,
    Caps,
    CommitOveragePolicy,
    DenyDetail,
    ObserveMode,
    OpenQuotaWindow,
    OpenRiskClass,
    Unit,
    _Request,
    _Response,
)

__all__ = [
    "ActionKind",
    "ActionKindRegistry",
    "ActionPolicyKeySpec",
    "ActionQuota",
    "ActionQuotaCounterListResponse",
    "ActionQuotaCounterResetRequest",
    "ActionQuotaCounterResetResponse",
    "ActionQuotaState",
    "EventDataObservedAllowed",
    "EventDataObservedDenied",
    "EventDataQuotaCounterReset",
    "EventDataQuotaThresholdApproaching",
    "EventType",
    "ObservedAction",
    "Policy",
    "PolicyCreateRequest",
    "PolicyListResponse",
    "PolicyStatus",
    "PolicyUpdateRequest",
    "RISK_COUNTER_KIND",
    "RateLimits",
    "ReservationTtlOverride",
    "RiskClassQuota",
]

RISK_COUNTER_KIND: Final = "__risk__"
"""``action_kind`` of a risk-class quota counter (its ``risk_class`` names the class)."""

Kind = Annotated[str, Field(max_length=64)]
MaxCalls = Annotated[StrictInt, Field(ge=1, le=100_000)]
PerRunTtlMs = Annotated[StrictInt, Field(ge=60_000, le=604_800_000)]
ThresholdPct = Annotated[StrictFloat, Field(ge=0.01, le=0.99)]
TtlMs = Annotated[StrictInt, Field(ge=1_000, le=86_400_000)]


class PolicyStatus(str, Enum):
    """Whether a policy is evaluated (``ACTIVE``) or kept but ignored (``DISABLED``)."""

    ACTIVE = "ACTIVE"
    DISABLED = "DISABLED"

    def __str__(self) -> str:
        return self.value


class EventType:
    """The event types the v0.1.26 extensions add (``Event.event_type``, an open string)."""

    RESERVATION_OBSERVED_DENIED: Final = "reservation.observed_denied"
    RESERVATION_OBSERVED_ALLOWED: Final = "reservation.observed_allowed"
    QUOTA_THRESHOLD_APPROACHING: Final = "quota.threshold_approaching"
    QUOTA_COUNTER_RESET: Final = "quota.counter_reset"

    ALL: Final = frozenset(value for name, value in list(vars().items()) if name.isupper())


# --------------------------------------------------------------------------------------------
# Quota rules and the other parts of a policy (both directions: forbid unknown fields)


def _check_per_run_ttl(window: ActionQuotaWindow, ttl_ms: int | None) -> None:
    if ttl_ms is not None and window is not ActionQuotaWindow.PER_RUN:
        raise ValueError(
            f"per_run_counter_ttl_ms applies only to window=per_run, not {window.value}: "
            "remove it (calendar windows end at their UTC boundary)"
        )


class ActionQuota(_Request):
    """At most ``max_calls`` reservations of ``action_kind`` per ``window``.

    Counts in scopes matching the policy's ``scope_pattern``. A non-empty allowlist narrows
    the rule to actions whose ``policy_keys`` carry a listed host, recipient domain or
    resource type (an action without that key is not counted). ``threshold_pct`` (default
    0.80) is where a ``quota.threshold_approaching`` event fires; ``per_run_counter_ttl_ms``
    (``per_run`` only, default 24 h) is how long an idle run's counter is kept.
    """

    action_kind: Kind
    max_calls: MaxCalls
    window: ActionQuotaWindow
    host_allowlist: list[Annotated[str, Field(max_length=253)]] | None = None
    recipient_domain_allowlist: list[Annotated[str, Field(max_length=253)]] | None = None
    resource_type_allowlist: list[Annotated[str, Field(max_length=128)]] | None = None
    per_run_counter_ttl_ms: PerRunTtlMs | None = None
    threshold_pct: ThresholdPct | None = None

    @model_validator(mode="after")
    def _per_run_ttl_only_per_run(self) -> ActionQuota:
        _check_per_run_ttl(self.window, self.per_run_counter_ttl_ms)
        return self


class RiskClassQuota(_Request):
    """At most ``max_calls`` reservations of all kinds of ``risk_class`` together per window."""

    risk_class: ActionRiskClass
    max_calls: MaxCalls
    window: ActionQuotaWindow
    per_run_counter_ttl_ms: PerRunTtlMs | None = None
    threshold_pct: ThresholdPct | None = None

    @model_validator(mode="after")
    def _per_run_ttl_only_per_run(self) -> RiskClassQuota:
        _check_per_run_ttl(self.window, self.per_run_counter_ttl_ms)
        return self


class ReservationTtlOverride(_Request):
    """Reservation TTL limits a policy imposes on the scopes it matches."""

    default_ttl_ms: TtlMs | None = None
    max_ttl_ms: TtlMs | None = None
    max_extensions: Annotated[StrictInt, Field(ge=0)] | None = None


class RateLimits(_Request):
    """Per-minute rate limits a policy imposes on the scopes it matches."""

    max_reservations_per_minute: Annotated[StrictInt, Field(ge=1)] | None = None
    max_commits_per_minute: Annotated[StrictInt, Field(ge=1)] | None = None


KindList = Annotated[list[Kind], Field(max_length=200)]


class _PolicyRules(_Request):
    """The four governance lists of the v0.1.26 extensions, shared by create and update."""

    action_quotas: Annotated[list[ActionQuota], Field(max_length=50)] | None = None
    risk_class_quotas: Annotated[list[RiskClassQuota], Field(max_length=20)] | None = None
    allowed_action_kinds: KindList | None = None
    denied_action_kinds: KindList | None = None

    @model_validator(mode="after")
    def _allow_or_deny_list(self) -> _PolicyRules:
        if self.allowed_action_kinds and self.denied_action_kinds:
            raise ValueError(
                "allowed_action_kinds and denied_action_kinds are mutually exclusive: set one "
                "(an allowlist permits only its kinds, a denylist blocks its kinds)"
            )
        return self


class PolicyCreateRequest(_PolicyRules):
    """Body of ``POST /v1/admin/policies``.

    The policy applies to scopes matching ``scope_pattern``; of the policies matching a scope
    only the one with the highest ``priority`` applies. Omitted lists are stored empty (no
    rule of that type).
    """

    name: str
    scope_pattern: str
    tenant_id: str | None = None
    description: str | None = None
    priority: Annotated[StrictInt, Field(ge=0)] | None = None
    caps: Caps | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None


class PolicyUpdateRequest(_PolicyRules):
    """Body of ``PATCH /v1/admin/policies/{policy_id}``: only the fields set change.

    A list that is set replaces the stored one (``[]`` clears it). Quota counters carry on
    under new limits.
    """

    name: str | None = None
    description: str | None = None
    priority: Annotated[StrictInt, Field(ge=0)] | None = None
    caps: Caps | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    status: PolicyStatus | None = None


class ActionQuotaCounterResetRequest(_Request):
    """Body of ``POST /v1/admin/action-quota-counters/reset`` (admin key; incident response).

    Names one counter exactly: ``tenant_id`` (required although the schema lists it as
    optional: the spec's text makes servers refuse a reset without it), ``scope``,
    ``action_kind`` (``"__risk__"`` with ``risk_class`` for a risk-class counter), ``window``
    and ``window_key``. ``reason`` goes to the audit event.
    """

    tenant_id: str
    scope: str
    action_kind: Kind
    window: ActionQuotaWindow
    window_key: str
    risk_class: ActionRiskClass | None = None
    reason: Annotated[str, Field(max_length=512)] | None = None

    @model_validator(mode="after")
    def _risk_counter_names_its_class(self) -> ActionQuotaCounterResetRequest:
        if self.action_kind == RISK_COUNTER_KIND and self.risk_class is None:
            raise ValueError(
                'a risk-class counter (action_kind="__risk__") needs risk_class: name the class '
                "whose counter to reset"
            )
        return self


# --------------------------------------------------------------------------------------------
# Responses


class Policy(_Response):
    """A policy as the server returns it (``GET``/``POST``/``PATCH /v1/admin/policies``)."""

    policy_id: str
    scope_pattern: str
    status: Annotated[PolicyStatus | str, Field(union_mode="left_to_right")]
    created_at: datetime
    name: str | None = None
    description: str | None = None
    priority: int | None = None
    caps: Caps | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    updated_at: datetime | None = None
    action_quotas: list[ActionQuota] | None = None
    risk_class_quotas: list[RiskClassQuota] | None = None
    allowed_action_kinds: list[str] | None = None
    denied_action_kinds: list[str] | None = None


class PolicyListResponse(_Response):
    """One page of ``GET /v1/admin/policies``."""

    policies: list[Policy]
    next_cursor: str | None = None
    has_more: bool | None = None


class ActionPolicyKeySpec(_Response):
    """Which ``policy_keys`` dimensions the policies of a kind use (registry entry)."""

    host: bool | None = None
    recipient_domain: bool | None = None
    resource_type: str | None = None
    path_prefix: bool | None = None


class ActionKind(_Response):
    """One entry of the action-kind registry (``GET /v1/action-kinds/{kind}``)."""

    kind: str
    risk_class: OpenRiskClass
    policy_key_spec: ActionPolicyKeySpec | None = None
    description: str | None = None
    mcp_tool_prefixes: list[str] | None = None
    deprecated: bool | None = None
    replacement_kind: str | None = None


class ActionKindRegistry(_Response):
    """One page of ``GET /v1/action-kinds``."""

    version: str
    kinds: list[ActionKind]
    next_cursor: str | None = None
    has_more: bool | None = None


class ActionQuotaState(_Response):
    """One live quota counter: ``used`` of ``limit`` in one window instance."""

    action_kind: str
    scope: str
    window: OpenQuotaWindow
    used: int
    limit: int
    risk_class: OpenRiskClass | None = None
    scope_path: str | None = None
    window_key: str | None = None
    remaining: int | None = None
    policy_id: str | None = None
    expires_at: datetime | None = None
    last_incremented_at: datetime | None = None


class ActionQuotaCounterListResponse(_Response):
    """One page of ``GET /v1/admin/action-quota-counters``."""

    counters: list[ActionQuotaState]
    has_more: bool
    next_cursor: str | None = None


class ActionQuotaCounterResetResponse(_Response):
    """Answer of a counter reset: the counter now (``used=0``) and its value before."""

    counter: ActionQuotaState
    previous_used: int


class ObservedAction(_Response):
    """The action of an observed reservation, as an event payload carries it."""

    kind: str | None = None
    name: str | None = None
    policy_keys: dict[str, object] | None = None


class EventDataObservedDenied(_Response):
    """Payload of ``reservation.observed_denied``: observe mode evaluated a ``DENY``."""

    scope: str
    deny_detail: DenyDetail
    observe_mode: Annotated[ObserveMode | str, Field(union_mode="left_to_right")]
    unit: Annotated[Unit | str, Field(union_mode="left_to_right")] | None = None
    action: ObservedAction | None = None
    subject: dict[str, object] | None = None
    estimated_amount: int | None = None
    would_have_blocked_at: str | None = None


class EventDataObservedAllowed(_Response):
    """Payload of ``reservation.observed_allowed`` (possibly sampled: see ``sample_rate``)."""

    scope: str
    decision: str
    observe_mode: Annotated[ObserveMode | str, Field(union_mode="left_to_right")]
    unit: Annotated[Unit | str, Field(union_mode="left_to_right")] | None = None
    action: ObservedAction | None = None
    subject: dict[str, object] | None = None
    estimated_amount: int | None = None
    caps_applied: dict[str, object] | None = None
    sample_rate: float | None = None


class EventDataQuotaThresholdApproaching(_Response):
    """Payload of ``quota.threshold_approaching``: a counter crossed ``threshold_pct``."""

    scope: str
    action_kind: str
    window: OpenQuotaWindow
    used: int
    limit: int
    threshold_pct: float
    risk_class: OpenRiskClass | None = None
    window_key: str | None = None
    policy_id: str | None = None
    tenant_id: str | None = None


class EventDataQuotaCounterReset(_Response):
    """Payload of ``quota.counter_reset``: an operator reset a counter (audit)."""

    scope: str
    action_kind: str
    window: OpenQuotaWindow
    window_key: str
    previous_used: int
    actor_id: str
    risk_class: OpenRiskClass | None = None
    limit: int | None = None
    reason: str | None = None
    policy_id: str | None = None
    tenant_id: str | None = None
