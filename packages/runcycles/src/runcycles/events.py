"""Wire models of the event plane: the ``Event`` envelope and its per-type payloads.

An :class:`Event` is what ``/v1/admin/events`` and ``/v1/events`` list and what a webhook
delivery carries as its body (``cycles-governance-admin-v0.1.25.yaml``: ``Event``,
``EventType``, ``EventCategory``, ``EventData*``; the four event types of the v0.1.26
extensions have their payloads in :mod:`runcycles.governance`).

The rules of :mod:`runcycles.models` for responses hold: unknown fields are kept, and so are
event types, categories and enum values this version does not know (plain strings).
``Event.data`` is the payload exactly as sent (it is what a receiver stores or forwards);
``Event.payload`` is the same payload parsed into the model its ``event_type`` names, checked
when the event is parsed, so a malformed payload of a known type fails up front instead of in
the handler. An event type this version does not know has no ``payload`` (``None``) but keeps
its ``data``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Final

from pydantic import BaseModel, Field, PrivateAttr, model_validator

from runcycles.governance import (
    EventDataObservedAllowed,
    EventDataObservedDenied,
    EventDataQuotaCounterReset,
    EventDataQuotaThresholdApproaching,
)
from runcycles.governance import EventType as _ExtensionEventType
from runcycles.models import CommitOveragePolicy, DenyDetail, Unit, _Response, to_wire

__all__ = [
    "BudgetStateSnapshot",
    "Event",
    "EventActor",
    "EventCategory",
    "EventDataApiKey",
    "EventDataBudgetDebtIncurred",
    "EventDataBudgetLifecycle",
    "EventDataBudgetOverLimit",
    "EventDataBudgetThreshold",
    "EventDataBurnRateAnomaly",
    "EventDataCommitOverage",
    "EventDataObservedAllowed",
    "EventDataObservedDenied",
    "EventDataPolicy",
    "EventDataQuotaCounterReset",
    "EventDataQuotaThresholdApproaching",
    "EventDataRateSpike",
    "EventDataReservationDenied",
    "EventDataReservationExpired",
    "EventDataSystem",
    "EventDataTenantCascade",
    "EventDataTenantLifecycle",
    "EventDataWebhookLifecycle",
    "EventListResponse",
    "EventPayload",
    "EventType",
    "PAYLOAD_MODELS",
    "SYSTEM_TENANT",
    "category_of",
]

SYSTEM_TENANT: Final = "__system__"
"""``tenant_id`` of system events and of system-wide webhook subscriptions."""

OpenUnit = Annotated[Unit | str, Field(union_mode="left_to_right")]
OpenOveragePolicy = Annotated[CommitOveragePolicy | str, Field(union_mode="left_to_right")]


class EventCategory(str, Enum):
    """Top-level group of an event type (the part before the first dot)."""

    BUDGET = "budget"
    TENANT = "tenant"
    API_KEY = "api_key"
    POLICY = "policy"
    RESERVATION = "reservation"
    SYSTEM = "system"
    WEBHOOK = "webhook"

    def __str__(self) -> str:
        return self.value


OpenCategory = Annotated[EventCategory | str, Field(union_mode="left_to_right")]


class EventType:
    """Known values of ``Event.event_type`` (an open string: unknown types are kept as-is).

    The governance spec's 51 types plus the four of the v0.1.26 extensions
    (:class:`runcycles.governance.EventType` lists those alone).
    """

    BUDGET_CREATED: Final = "budget.created"
    BUDGET_UPDATED: Final = "budget.updated"
    BUDGET_FUNDED: Final = "budget.funded"
    BUDGET_DEBITED: Final = "budget.debited"
    BUDGET_RESET: Final = "budget.reset"
    BUDGET_RESET_SPENT: Final = "budget.reset_spent"
    BUDGET_DEBT_REPAID: Final = "budget.debt_repaid"
    BUDGET_FROZEN: Final = "budget.frozen"
    BUDGET_UNFROZEN: Final = "budget.unfrozen"
    BUDGET_CLOSED: Final = "budget.closed"
    BUDGET_CLOSED_VIA_TENANT_CASCADE: Final = "budget.closed_via_tenant_cascade"
    BUDGET_THRESHOLD_CROSSED: Final = "budget.threshold_crossed"
    BUDGET_EXHAUSTED: Final = "budget.exhausted"
    BUDGET_OVER_LIMIT_ENTERED: Final = "budget.over_limit_entered"
    BUDGET_OVER_LIMIT_EXITED: Final = "budget.over_limit_exited"
    BUDGET_DEBT_INCURRED: Final = "budget.debt_incurred"
    BUDGET_BURN_RATE_ANOMALY: Final = "budget.burn_rate_anomaly"
    RESERVATION_DENIED: Final = "reservation.denied"
    RESERVATION_DENIAL_RATE_SPIKE: Final = "reservation.denial_rate_spike"
    RESERVATION_EXPIRED: Final = "reservation.expired"
    RESERVATION_EXPIRY_RATE_SPIKE: Final = "reservation.expiry_rate_spike"
    RESERVATION_COMMIT_OVERAGE: Final = "reservation.commit_overage"
    RESERVATION_RELEASED_VIA_TENANT_CASCADE: Final = "reservation.released_via_tenant_cascade"
    TENANT_CREATED: Final = "tenant.created"
    TENANT_UPDATED: Final = "tenant.updated"
    TENANT_SUSPENDED: Final = "tenant.suspended"
    TENANT_REACTIVATED: Final = "tenant.reactivated"
    TENANT_CLOSED: Final = "tenant.closed"
    TENANT_SETTINGS_CHANGED: Final = "tenant.settings_changed"
    WEBHOOK_CREATED: Final = "webhook.created"
    WEBHOOK_UPDATED: Final = "webhook.updated"
    WEBHOOK_PAUSED: Final = "webhook.paused"
    WEBHOOK_RESUMED: Final = "webhook.resumed"
    WEBHOOK_DISABLED: Final = "webhook.disabled"
    WEBHOOK_DELETED: Final = "webhook.deleted"
    WEBHOOK_DISABLED_VIA_TENANT_CASCADE: Final = "webhook.disabled_via_tenant_cascade"
    API_KEY_CREATED: Final = "api_key.created"
    API_KEY_REVOKED: Final = "api_key.revoked"
    API_KEY_REVOKED_VIA_TENANT_CASCADE: Final = "api_key.revoked_via_tenant_cascade"
    API_KEY_EXPIRED: Final = "api_key.expired"
    API_KEY_PERMISSIONS_CHANGED: Final = "api_key.permissions_changed"
    API_KEY_AUTH_FAILED: Final = "api_key.auth_failed"
    API_KEY_AUTH_FAILURE_RATE_SPIKE: Final = "api_key.auth_failure_rate_spike"
    POLICY_CREATED: Final = "policy.created"
    POLICY_UPDATED: Final = "policy.updated"
    POLICY_DELETED: Final = "policy.deleted"
    SYSTEM_STORE_CONNECTION_LOST: Final = "system.store_connection_lost"
    SYSTEM_STORE_CONNECTION_RESTORED: Final = "system.store_connection_restored"
    SYSTEM_HIGH_LATENCY: Final = "system.high_latency"
    SYSTEM_WEBHOOK_DELIVERY_FAILED: Final = "system.webhook_delivery_failed"
    SYSTEM_WEBHOOK_TEST: Final = "system.webhook_test"
    # v0.1.26 extensions
    RESERVATION_OBSERVED_DENIED: Final = _ExtensionEventType.RESERVATION_OBSERVED_DENIED
    RESERVATION_OBSERVED_ALLOWED: Final = _ExtensionEventType.RESERVATION_OBSERVED_ALLOWED
    QUOTA_THRESHOLD_APPROACHING: Final = _ExtensionEventType.QUOTA_THRESHOLD_APPROACHING
    QUOTA_COUNTER_RESET: Final = _ExtensionEventType.QUOTA_COUNTER_RESET

    ALL: Final = frozenset(value for name, value in list(vars().items()) if name.isupper())
    """Every event type of the governance spec and its v0.1.26 extensions."""


# --------------------------------------------------------------------------------------------
# Payloads (Event.data per event type). Every field is optional unless the spec requires it.


class BudgetStateSnapshot(_Response):
    """A budget's amounts before or after a lifecycle change (only the affected ones are set)."""

    allocated: int | None = None
    remaining: int | None = None
    debt: int | None = None
    spent: int | None = None
    reserved: int | None = None
    status: str | None = None


class EventDataBudgetLifecycle(_Response):
    """Payload of the budget lifecycle events (``budget.created``, ``.funded``, ``.reset``...).

    ``operation`` is one of ``CREDIT``, ``DEBIT``, ``RESET``, ``RESET_SPENT``, ``REPAY_DEBT``,
    ``STATUS_CHANGE``, ``CREATE``, ``UPDATE``. ``spent_override_provided`` is only on
    ``budget.reset_spent``: whether the request set ``spent`` (an operator adjustment) rather
    than letting it default to 0 (a routine period rollover).
    """

    ledger_id: str | None = None
    scope: str | None = None
    unit: OpenUnit | None = None
    operation: str | None = None
    previous_state: BudgetStateSnapshot | None = None
    new_state: BudgetStateSnapshot | None = None
    spent_override_provided: bool | None = None
    reason: str | None = None


class EventDataBudgetThreshold(_Response):
    """Payload of ``budget.threshold_crossed`` and ``budget.exhausted``.

    ``utilization`` is ``(spent + reserved) / allocated`` (above 1.0 in overdraft);
    ``threshold`` the configured ratio crossed (``0.8``, ``0.95``, ``1.0``); ``direction``
    ``rising`` or ``falling`` (a crossing fires once per direction).
    """

    scope: str | None = None
    unit: OpenUnit | None = None
    threshold: float | None = None
    utilization: float | None = None
    allocated: int | None = None
    remaining: int | None = None
    spent: int | None = None
    reserved: int | None = None
    direction: str | None = None


class EventDataBudgetOverLimit(_Response):
    """Payload of ``budget.over_limit_entered`` / ``budget.over_limit_exited``."""

    scope: str | None = None
    unit: OpenUnit | None = None
    debt: int | None = None
    overdraft_limit: int | None = None
    is_over_limit: bool | None = None
    debt_utilization: float | None = None


class EventDataBudgetDebtIncurred(_Response):
    """Payload of ``budget.debt_incurred``: a commit created ``debt_incurred`` of new debt."""

    scope: str | None = None
    unit: OpenUnit | None = None
    reservation_id: str | None = None
    debt_incurred: int | None = None
    total_debt: int | None = None
    overdraft_limit: int | None = None
    overage_policy: OpenOveragePolicy | None = None


class EventDataBurnRateAnomaly(_Response):
    """Payload of ``budget.burn_rate_anomaly``: spend per minute against its baseline."""

    scope: str | None = None
    unit: OpenUnit | None = None
    current_rate: float | None = None
    baseline_rate: float | None = None
    multiplier: float | None = None
    window_seconds: int | None = None
    projected_exhaustion_minutes: float | None = None


class EventDataReservationDenied(_Response):
    """Payload of ``reservation.denied``.

    ``reason_code`` is an open string (see :class:`runcycles.models.ReasonCode`).
    ``deny_detail`` is a :class:`~runcycles.models.DenyDetail` when the server sent one in
    that shape (v0.1.26 servers do), otherwise the object as sent.
    """

    scope: str | None = None
    unit: OpenUnit | None = None
    reason_code: str | None = None
    requested_amount: int | None = None
    remaining: int | None = None
    action: dict[str, Any] | None = None
    subject: dict[str, Any] | None = None
    policy_id: str | None = None
    deny_detail: (
        Annotated[DenyDetail | dict[str, Any], Field(union_mode="left_to_right")] | None
    ) = None


class EventDataReservationExpired(_Response):
    """Payload of ``reservation.expired``: ``estimated_amount`` was held and never committed."""

    reservation_id: str | None = None
    scope: str | None = None
    unit: OpenUnit | None = None
    estimated_amount: int | None = None
    created_at: datetime | None = None
    expired_at: datetime | None = None
    ttl_ms: int | None = None
    extensions_used: int | None = None


class EventDataRateSpike(_Response):
    """Payload of the rate spikes (denials, expiries, auth failures) over a rolling window.

    ``metric`` is ``denial_rate``, ``expiry_rate`` or ``auth_failure_rate``.
    """

    metric: str | None = None
    current_rate: float | None = None
    threshold_rate: float | None = None
    window_seconds: int | None = None
    sample_count: int | None = None


class EventDataCommitOverage(_Response):
    """Payload of ``reservation.commit_overage``: ``overage = actual - estimated``."""

    reservation_id: str | None = None
    scope: str | None = None
    unit: OpenUnit | None = None
    estimated_amount: int | None = None
    actual_amount: int | None = None
    overage: int | None = None
    overage_policy: OpenOveragePolicy | None = None
    debt_incurred: int | None = None


class EventDataTenantLifecycle(_Response):
    """Payload of the ``tenant.*`` events (statuses ``ACTIVE``, ``SUSPENDED``, ``CLOSED``)."""

    tenant_id: str | None = None
    previous_status: str | None = None
    new_status: str | None = None
    changed_fields: list[str] | None = None


class EventDataWebhookLifecycle(_Response):
    """Payload of the ``webhook.*`` lifecycle events (``disable_reason`` on ``.disabled``)."""

    subscription_id: str | None = None
    tenant_id: str | None = None
    previous_status: str | None = None
    new_status: str | None = None
    changed_fields: list[str] | None = None
    disable_reason: str | None = None


class EventDataApiKey(_Response):
    """Payload of the ``api_key.*`` events: the key's id, never the key itself."""

    key_id: str | None = None
    key_name: str | None = None
    previous_status: str | None = None
    new_status: str | None = None
    permissions: list[str] | None = None
    failure_reason: str | None = None
    source_ip: str | None = None


class EventDataPolicy(_Response):
    """Payload of ``policy.created``, ``policy.updated`` and ``policy.deleted``."""

    policy_id: str | None = None
    name: str | None = None
    scope_pattern: str | None = None
    changed_fields: list[str] | None = None


class EventDataSystem(_Response):
    """Payload of the ``system.*`` events (``severity``: ``info``, ``warning``, ``critical``)."""

    component: str | None = None
    message: str | None = None
    severity: str | None = None
    details: dict[str, Any] | None = None


class EventDataTenantCascade(_Response):
    """Payload of the four ``*_via_tenant_cascade`` events of a tenant close.

    Exactly one of ``ledger_id``, ``subscription_id``, ``key_id`` names the object acted on;
    ``released_amount`` is the reserved amount drained back on
    ``reservation.released_via_tenant_cascade`` (one event per closed budget).
    """

    ledger_id: str | None = None
    subscription_id: str | None = None
    key_id: str | None = None
    name: str | None = None
    scope: str | None = None
    unit: OpenUnit | None = None
    prior_status: str | None = None
    new_status: str | None = None
    released_amount: int | None = None
    cascade_reason: str | None = None


EventPayload = (
    EventDataBudgetLifecycle
    | EventDataBudgetThreshold
    | EventDataBudgetOverLimit
    | EventDataBudgetDebtIncurred
    | EventDataBurnRateAnomaly
    | EventDataReservationDenied
    | EventDataReservationExpired
    | EventDataRateSpike
    | EventDataCommitOverage
    | EventDataTenantLifecycle
    | EventDataWebhookLifecycle
    | EventDataApiKey
    | EventDataPolicy
    | EventDataSystem
    | EventDataTenantCascade
    | EventDataObservedDenied
    | EventDataObservedAllowed
    | EventDataQuotaThresholdApproaching
    | EventDataQuotaCounterReset
)
"""Any typed payload; narrow it with ``isinstance`` or ``match`` on the class."""

_T = EventType
PAYLOAD_MODELS: Final[Mapping[str, type[EventPayload]]] = {
    **dict.fromkeys(
        [
            _T.BUDGET_CREATED,
            _T.BUDGET_UPDATED,
            _T.BUDGET_FUNDED,
            _T.BUDGET_DEBITED,
            _T.BUDGET_RESET,
            _T.BUDGET_RESET_SPENT,
            _T.BUDGET_DEBT_REPAID,
            _T.BUDGET_FROZEN,
            _T.BUDGET_UNFROZEN,
            _T.BUDGET_CLOSED,
        ],
        EventDataBudgetLifecycle,
    ),
    _T.BUDGET_THRESHOLD_CROSSED: EventDataBudgetThreshold,
    _T.BUDGET_EXHAUSTED: EventDataBudgetThreshold,
    _T.BUDGET_OVER_LIMIT_ENTERED: EventDataBudgetOverLimit,
    _T.BUDGET_OVER_LIMIT_EXITED: EventDataBudgetOverLimit,
    _T.BUDGET_DEBT_INCURRED: EventDataBudgetDebtIncurred,
    _T.BUDGET_BURN_RATE_ANOMALY: EventDataBurnRateAnomaly,
    _T.RESERVATION_DENIED: EventDataReservationDenied,
    _T.RESERVATION_EXPIRED: EventDataReservationExpired,
    _T.RESERVATION_DENIAL_RATE_SPIKE: EventDataRateSpike,
    _T.RESERVATION_EXPIRY_RATE_SPIKE: EventDataRateSpike,
    _T.API_KEY_AUTH_FAILURE_RATE_SPIKE: EventDataRateSpike,
    _T.RESERVATION_COMMIT_OVERAGE: EventDataCommitOverage,
    **dict.fromkeys(
        [
            _T.TENANT_CREATED,
            _T.TENANT_UPDATED,
            _T.TENANT_SUSPENDED,
            _T.TENANT_REACTIVATED,
            _T.TENANT_CLOSED,
            _T.TENANT_SETTINGS_CHANGED,
        ],
        EventDataTenantLifecycle,
    ),
    **dict.fromkeys(
        [
            _T.WEBHOOK_CREATED,
            _T.WEBHOOK_UPDATED,
            _T.WEBHOOK_PAUSED,
            _T.WEBHOOK_RESUMED,
            _T.WEBHOOK_DISABLED,
            _T.WEBHOOK_DELETED,
        ],
        EventDataWebhookLifecycle,
    ),
    **dict.fromkeys(
        [
            _T.API_KEY_CREATED,
            _T.API_KEY_REVOKED,
            _T.API_KEY_EXPIRED,
            _T.API_KEY_PERMISSIONS_CHANGED,
            _T.API_KEY_AUTH_FAILED,
        ],
        EventDataApiKey,
    ),
    **dict.fromkeys([_T.POLICY_CREATED, _T.POLICY_UPDATED, _T.POLICY_DELETED], EventDataPolicy),
    **dict.fromkeys(
        [
            _T.SYSTEM_STORE_CONNECTION_LOST,
            _T.SYSTEM_STORE_CONNECTION_RESTORED,
            _T.SYSTEM_HIGH_LATENCY,
            _T.SYSTEM_WEBHOOK_DELIVERY_FAILED,
            _T.SYSTEM_WEBHOOK_TEST,
        ],
        EventDataSystem,
    ),
    **dict.fromkeys(
        [
            _T.BUDGET_CLOSED_VIA_TENANT_CASCADE,
            _T.RESERVATION_RELEASED_VIA_TENANT_CASCADE,
            _T.WEBHOOK_DISABLED_VIA_TENANT_CASCADE,
            _T.API_KEY_REVOKED_VIA_TENANT_CASCADE,
        ],
        EventDataTenantCascade,
    ),
    _T.RESERVATION_OBSERVED_DENIED: EventDataObservedDenied,
    _T.RESERVATION_OBSERVED_ALLOWED: EventDataObservedAllowed,
    _T.QUOTA_THRESHOLD_APPROACHING: EventDataQuotaThresholdApproaching,
    _T.QUOTA_COUNTER_RESET: EventDataQuotaCounterReset,
}
"""The payload model of each known event type (the spec names it in each schema's prose)."""
del _T


_CATEGORY_OF_EXTENSION_TYPES: Final = {
    # The v0.1.26 extensions add quota.* types but no "quota" category; the enum is closed
    # in the spec, so these map onto the category a subscriber would look in.
    EventType.QUOTA_THRESHOLD_APPROACHING: EventCategory.RESERVATION,  # runtime, tenant-visible
    EventType.QUOTA_COUNTER_RESET: EventCategory.POLICY,  # an operator's action on a policy
}


def category_of(event_type: str) -> str:
    """Return the ``category`` of an event type: the part before its first dot.

    Except ``quota.threshold_approaching`` (``reservation``: runtime enforcement, visible to
    the tenant) and ``quota.counter_reset`` (``policy``: an operator resetting a policy's
    counter), whose prefix is not a category of the spec.
    """
    known = _CATEGORY_OF_EXTENSION_TYPES.get(event_type)
    return known.value if known is not None else event_type.split(".", 1)[0]


# --------------------------------------------------------------------------------------------
# The envelope


class EventActor(_Response):
    """Who or what caused an event.

    ``type`` is ``admin``, ``api_key``, ``admin_on_behalf_of``, ``system`` or ``scheduler``
    (an open string).
    """

    type: str | None = None
    key_id: str | None = None
    source_ip: str | None = None


class Event(_Response):
    """One immutable event: the body of a webhook delivery and an entry of the event lists.

    Deliveries are at least once: deduplicate on ``event_id``. ``payload`` is ``data``
    parsed by its ``event_type`` (``None`` for an unknown type or no data).
    """

    event_id: str
    event_type: str
    category: OpenCategory
    timestamp: datetime
    tenant_id: str
    source: str
    scope: str | None = None
    actor: EventActor | None = None
    data: dict[str, Any] | None = None
    correlation_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    metadata: dict[str, Any] | None = None

    _payload: EventPayload | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _parse_payload(self) -> Event:
        model = PAYLOAD_MODELS.get(self.event_type)
        if model is not None and self.data is not None:
            # A ValidationError is a ValueError: pydantic reports it as this event's error.
            self._payload = model.model_validate(self.data, extra="allow")
        return self

    @property
    def payload(self) -> EventPayload | None:
        """``data`` as the model of this event type, or ``None`` (unknown type, no data)."""
        return self._payload

    @classmethod
    def new(
        cls,
        event_type: str,
        *,
        tenant_id: str,
        source: str,
        data: BaseModel | Mapping[str, Any] | None = None,
        scope: str | None = None,
        actor: EventActor | None = None,
        correlation_id: str | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        event_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> Event:
        """Build an event, filling the id (``evt_`` + 32 random hex), category and time (now).

        The category is :func:`category_of` the type.

        ``data`` may be a payload model (sent without its unset fields) or a plain mapping.

        Raises:
            pydantic.ValidationError: if ``data`` does not fit the payload of ``event_type``.
        """
        body = to_wire(data) if isinstance(data, BaseModel) else data
        return cls.model_validate(
            {
                "event_id": event_id or f"evt_{secrets.token_hex(16)}",
                "event_type": event_type,
                "category": category_of(event_type),
                "timestamp": timestamp or datetime.now(timezone.utc),
                "tenant_id": tenant_id,
                "source": source,
                "scope": scope,
                "actor": actor,
                "data": dict(body) if body is not None else None,
                "correlation_id": correlation_id,
                "request_id": request_id,
                "trace_id": trace_id,
                "metadata": dict(metadata) if metadata is not None else None,
            }
        )

    def encode(self) -> bytes:
        """Return the event as compact JSON bytes: a delivery body (unset fields omitted)."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, body: bytes | str) -> Event:
        """Parse a delivery body (JSON) into an event, its payload checked by type.

        Raises:
            pydantic.ValidationError: if the body is not JSON or not a valid event.
        """
        return cls.model_validate_json(body)


class EventListResponse(_Response):
    """One page of ``GET /v1/admin/events`` or ``GET /v1/events`` (cursor pagination)."""

    events: list[Event]
    has_more: bool
    next_cursor: str | None = None
