"""Webhook subscriptions and deliveries: rows, request models, wire bodies and matching.

Shapes are the governance spec's (``cycles-governance-admin-v0.1.25.yaml``):
``WebhookSubscription``, ``WebhookCreateRequest``/``WebhookUpdateRequest``,
``WebhookDelivery``, ``WebhookThresholdConfig``, ``WebhookRetryPolicy``.

Secrets: a subscription holds a list of live signing secrets, newest first, each with an
optional expiry. Creating one stores one secret (generated when not given) and answers it once.
Rotating (``signing_secret`` in an update, or ``POST .../rotate-secret``) puts the new secret
first and keeps the previous one valid for :data:`ROTATION_OVERLAP_MS` (or the caller's
``previous_secret_ttl_s``): every delivery in that window carries a ``v1`` signature for each
live secret, so receivers switch secrets without dropping a delivery. No response after the
create (or rotate) ever carries a secret; custom header values are masked.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import secrets as _secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from runcycles_server.events import EVENT_TYPES, EventRecord, category_of
from runcycles_server.events.detect import DEFAULT_THRESHOLDS
from runcycles_server.events.rates import DetectorConfig, level_of, wanted_level
from runcycles_server.governance.timestamps import iso
from runcycles_server.ledger import LedgerError
from runcycles_server.webhooks.sealing import SealingError, SecretBox, is_sealed

SYSTEM_TENANT: Final = "__system__"
"""Owner of system-wide subscriptions (they receive every tenant's events)."""
TENANT_CATEGORIES: Final = frozenset({"budget", "reservation", "tenant"})
"""Categories a tenant-owned subscription may select (the spec's TENANT-ACCESSIBLE BOUNDARY)."""
STATUSES: Final = ("ACTIVE", "PAUSED", "DISABLED")
DELIVERY_STATUSES: Final = ("PENDING", "SUCCESS", "FAILED", "RETRYING")
OPEN_STATUSES: Final = ("PENDING", "RETRYING")
"""Delivery statuses still to be sent."""
ROTATION_OVERLAP_MS: Final = 24 * 3_600_000
"""How long a rotated-out secret keeps signing deliveries by default (24 h)."""
SECRET_PREFIX: Final = "whsec_"
MASK: Final = "********"

DETECTOR_FIELDS: Final = frozenset(
    {"burn_rate_multiplier", "burn_rate_window_seconds", "denial_rate_threshold",
     "expiry_rate_threshold", "auth_failure_rate_threshold", "rate_window_seconds"}
)  # fmt: skip
"""The ``WebhookThresholdConfig`` fields that are detector parameters (``DetectorConfig``)."""

EventTypeName = Literal[EVENT_TYPES]  # type: ignore[valid-type]
CategoryName = Literal["budget", "tenant", "api_key", "policy", "reservation", "system", "webhook"]
Url = Annotated[str, Field(min_length=1, max_length=2048)]
Utilization = Annotated[float, Field(ge=0.0, le=1.0)]


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 43 URL-safe random characters (256 bits)."""
    return SECRET_PREFIX + _secrets.token_urlsafe(32)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetryPolicy(_Strict):
    """``WebhookRetryPolicy`` with the spec's bounds and defaults."""

    max_retries: Annotated[StrictInt, Field(ge=0, le=10)] = 5
    initial_delay_ms: Annotated[StrictInt, Field(ge=100, le=60_000)] = 1_000
    backoff_multiplier: Annotated[StrictFloat | StrictInt, Field(ge=1.0, le=10.0)] = 2.0
    max_delay_ms: Annotated[StrictInt, Field(ge=1_000, le=3_600_000)] = 60_000


class ThresholdConfig(_Strict):
    """``WebhookThresholdConfig``: what this subscription counts as a crossing or an anomaly.

    Every field applies to what is delivered to the subscription (the server's settings stand
    for the fields it leaves out); see :mod:`.profiles` for how, without the request path
    reading any subscription.
    """

    budget_utilization: Annotated[list[Utilization], Field(min_length=1, max_length=20)] | None = (
        None
    )
    burn_rate_multiplier: Annotated[float, Field(ge=1.5)] | None = None
    burn_rate_window_seconds: Annotated[StrictInt, Field(ge=60, le=86_400)] | None = None
    denial_rate_threshold: Utilization | None = None
    expiry_rate_threshold: Utilization | None = None
    auth_failure_rate_threshold: Utilization | None = None
    rate_window_seconds: Annotated[StrictInt, Field(ge=60, le=86_400)] | None = None


Headers = Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=32)]


class CreateRequest(_Strict):
    """``WebhookCreateRequest``."""

    url: Url
    event_types: Annotated[list[EventTypeName], Field(min_length=1)]
    event_categories: list[CategoryName] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    description: Annotated[str, Field(max_length=1024)] | None = None
    scope_filter: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    thresholds: ThresholdConfig | None = None
    signing_secret: Annotated[str, Field(min_length=16, max_length=256)] | None = None
    headers: Headers | None = None
    retry_policy: RetryPolicy | None = None
    disable_after_failures: Annotated[StrictInt, Field(ge=1, le=10_000)] = 10
    metadata: dict[str, Any] | None = None


class UpdateRequest(_Strict):
    """``WebhookUpdateRequest`` (every field optional; ``event_types`` may be emptied)."""

    url: Url | None = None
    event_types: list[EventTypeName] | None = None
    event_categories: list[CategoryName] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    description: Annotated[str, Field(max_length=1024)] | None = None
    scope_filter: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    thresholds: ThresholdConfig | None = None
    signing_secret: Annotated[str, Field(min_length=16, max_length=256)] | None = None
    headers: Headers | None = None
    retry_policy: RetryPolicy | None = None
    disable_after_failures: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = None
    status: Literal["ACTIVE", "PAUSED"] | None = None
    metadata: dict[str, Any] | None = None


class RotateRequest(_Strict):
    """Body of ``POST .../rotate-secret`` (an extension).

    The new secret (generated when omitted) and how long the previous one keeps signing
    (default 24 h, 0 = retire now).
    """

    signing_secret: Annotated[str, Field(min_length=16, max_length=256)] | None = None
    previous_secret_ttl_s: Annotated[StrictInt, Field(ge=0, le=30 * 86_400)] = (
        ROTATION_OVERLAP_MS // 1000
    )


class ReplayRequest(_Strict):
    """Body of ``POST .../replay``."""

    from_: Annotated[str, Field(alias="from")]
    to: str | None = None
    event_types: list[EventTypeName] | None = None
    max_events: Annotated[StrictInt, Field(ge=1, le=1000)] = 100

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


DEFAULT_BLOCKED_CIDRS: Final = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
    "::1/128", "fc00::/7",
)  # fmt: skip
"""The spec's default ``blocked_cidr_ranges``."""


class SecurityConfig(_Strict):
    """``WebhookSecurityConfig`` with the spec's defaults."""

    blocked_cidr_ranges: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=lambda: list(DEFAULT_BLOCKED_CIDRS), max_length=256
    )
    allowed_url_patterns: list[Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=list, max_length=256
    )
    allow_http: StrictBool = False


class BulkFilter(_Strict):
    """``WebhookBulkFilter`` (at least one property)."""

    tenant_id: str | None = None
    status: Literal["ACTIVE", "PAUSED", "DISABLED"] | None = None
    event_type: EventTypeName | None = None
    search: Annotated[str, Field(max_length=128)] | None = None


class BulkActionRequest(_Strict):
    """``WebhookBulkActionRequest``."""

    filter: BulkFilter
    action: Literal["PAUSE", "RESUME", "DELETE"]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)]
    expected_count: Annotated[StrictInt, Field(ge=0)] | None = None


# --------------------------------------------------------------------------------------------
# Rows


@dataclass(slots=True)
class SecretRow:
    """One live signing secret (``expires_at_ms`` ``None``: until rotated)."""

    secret: str
    expires_at_ms: int | None = None


@dataclass(slots=True)
class SubscriptionRow:
    """A stored subscription (secrets included: never answered as they are)."""

    subscription_id: str
    tenant_id: str
    url: str
    event_types: list[str]
    secrets: list[SecretRow]
    event_categories: list[str] = field(default_factory=list)
    name: str | None = None
    description: str | None = None
    scope_filter: str | None = None
    thresholds: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    status: str = "ACTIVE"
    retry_policy: dict[str, Any] = field(default_factory=lambda: RetryPolicy().model_dump())
    disable_after_failures: int = 10
    consecutive_failures: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0
    last_triggered_at_ms: int | None = None
    last_success_at_ms: int | None = None
    last_failure_at_ms: int | None = None
    metadata: dict[str, Any] | None = None
    stored_plain: bool = False
    """Read from a row whose secrets or header values were stored plain (before sealing):
    the dispatcher writes it again, sealed. Not stored."""

    def live_secrets(self, now_ms: int) -> list[str]:
        """The secrets that sign a delivery now, newest first."""
        return [
            s.secret for s in self.secrets if s.expires_at_ms is None or s.expires_at_ms > now_ms
        ]

    def detector_config(self, defaults: DetectorConfig) -> DetectorConfig:
        """The detector parameters this subscription wants: ``defaults`` with its overrides."""
        overrides = {k: v for k, v in (self.thresholds or {}).items() if k in DETECTOR_FIELDS}
        if not overrides:
            return defaults
        try:
            return dataclasses.replace(defaults, **overrides)
        except ValueError:  # validated on save with the spec's bounds; the server's are wider
            return defaults

    @property
    def utilization_thresholds(self) -> tuple[float, ...]:
        """The ``budget.threshold_crossed`` thresholds this subscription receives."""
        found = (self.thresholds or {}).get("budget_utilization")
        return tuple(sorted(set(found))) if found else DEFAULT_THRESHOLDS

    def to_json(self, box: SecretBox | None = None) -> bytes:
        """The storage form (read back by :meth:`from_json`).

        With ``box`` the secrets and the header values are sealed (:mod:`.sealing`), each
        bound to this subscription and its place.
        """
        data = {name: getattr(self, name) for name in SubscriptionRow.__slots__}
        del data["stored_plain"]
        sid = self.subscription_id
        seal = box.seal if box is not None else _as_is
        data["secrets"] = [[seal(s.secret, f"{sid}/secret"), s.expires_at_ms] for s in self.secrets]
        data["headers"] = {k: seal(v, f"{sid}/header/{k}") for k, v in self.headers.items()}
        return orjson.dumps(data)

    @staticmethod
    def from_json(raw: bytes | str, box: SecretBox | None = None) -> SubscriptionRow:
        """Read a row :meth:`to_json` wrote (sealed with ``box``, or plain).

        Raises:
            SealingError: a value is sealed and ``box`` cannot open it (or is ``None``).
        """
        data = orjson.loads(raw)
        sid = data["subscription_id"]
        plain = [s for s, _ in data["secrets"]] + list(data.get("headers", {}).values())
        data["stored_plain"] = any(not is_sealed(v) for v in plain)
        if box is None:
            if any(map(is_sealed, plain)):
                raise SealingError(
                    f"the secrets of {sid} are sealed: start the server with its webhook key "
                    "(--webhook-key, $CYCLES_WEBHOOK_KEY_FILE or $CYCLES_WEBHOOK_KEY)"
                )
            unseal = _as_is
        else:
            unseal = box.open
        data["secrets"] = [SecretRow(unseal(s, f"{sid}/secret"), e) for s, e in data["secrets"]]
        data["headers"] = {
            k: unseal(v, f"{sid}/header/{k}") for k, v in data.get("headers", {}).items()
        }
        return SubscriptionRow(**data)


def _as_is(value: str, place: str) -> str:
    return value


@dataclass(slots=True)
class DeliveryRow:
    """One delivery of one event to one subscription, and what became of it.

    ``order`` sorts a subscription's deliveries in sending order (when it was queued, then the
    event's time and id); ``lease_owner``/``lease_until_ms`` mark a delivery a dispatcher is
    sending (another dispatcher takes it once the lease has expired).
    """

    delivery_id: str
    subscription_id: str
    tenant_id: str
    event: dict[str, Any]
    """The stored event (``events.event_to_json`` form, as a dict)."""
    queued_at_ms: int
    status: str = "PENDING"
    attempts: int = 0
    next_attempt_ms: int = 0
    attempted_at_ms: int | None = None
    completed_at_ms: int | None = None
    response_status: int | None = None
    response_time_ms: int | None = None
    error_message: str | None = None
    lease_owner: str | None = None
    lease_until_ms: int | None = None
    counts: bool = True
    """Whether its outcome counts toward the subscription's consecutive failures (a test
    delivery does not)."""

    @property
    def event_id(self) -> str:
        """The delivered event's id."""
        return str(self.event["event_id"])

    @property
    def event_type(self) -> str:
        """The delivered event's type."""
        return str(self.event["event_type"])

    @property
    def order(self) -> str:
        """Sending order: when queued, then the event's time and id."""
        return f"{self.queued_at_ms:013d}:{int(self.event['created_at_ms']):013d}:{self.event_id}"

    def record(self) -> EventRecord:
        """The event this delivery sends."""
        data = dict(self.event)
        data.pop("v", None)
        return EventRecord(**data)

    def to_json(self) -> bytes:
        """The storage form (read back by :meth:`from_json`)."""
        return orjson.dumps({name: getattr(self, name) for name in DeliveryRow.__slots__})

    @staticmethod
    def from_json(raw: bytes | str) -> DeliveryRow:
        """Read a row :meth:`to_json` wrote."""
        return DeliveryRow(**orjson.loads(raw))


def delivery_id(subscription_id: str, event_id: str) -> str:
    """The deterministic id of the live delivery of ``event_id`` to a subscription."""
    return f"whd_{subscription_id.removeprefix('whsub_')}_{event_id.removeprefix('evt_')}"


# --------------------------------------------------------------------------------------------
# Validation and matching


def check_selectors(row: SubscriptionRow) -> None:
    """Refuse a subscription without selectors, or with admin-only ones on a tenant's row.

    Raises:
        LedgerError: INVALID_REQUEST naming the offending entries.
    """
    if not row.event_types and not row.event_categories:
        raise LedgerError(
            "INVALID_REQUEST",
            "a subscription needs at least one selector: event_types or event_categories "
            "must be non-empty",
        )
    if row.tenant_id == SYSTEM_TENANT:
        return
    bad = [t for t in row.event_types if category_of(t) not in TENANT_CATEGORIES]
    bad += [c for c in row.event_categories if c not in TENANT_CATEGORIES]
    if bad:
        raise LedgerError(
            "INVALID_REQUEST",
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} admin-only: a tenant's "
            "subscription may select budget, reservation and tenant events only (create a "
            "system-wide subscription, without tenant_id, to receive the others)",
        )


def check_scope_filter(pattern: str | None) -> None:
    """Refuse a scope filter that is not a scope path with optional ``*`` wildcards.

    Raises:
        LedgerError: INVALID_REQUEST.
    """
    if pattern is None:
        return
    parts = pattern.split("/")
    for part in parts:
        if part == "*":
            continue
        kind, sep, value = part.partition(":")
        if not sep or not kind or not value:
            raise LedgerError(
                "INVALID_REQUEST",
                f"scope_filter {pattern!r} is not a scope pattern: use levels like "
                "tenant:acme/workspace:prod, with * for any value (tenant:acme/*, "
                "tenant:acme/agent:*)",
            )


def scope_matches(pattern: str | None, scope: str | None) -> bool:
    """Whether an event's scope matches a subscription's ``scope_filter``.

    No filter matches everything. A pattern matches the scope itself and every scope below it;
    ``*`` matches any one level (``tenant:acme/*``) or any value within a level
    (``agent:*``). An event without a scope matches only when there is no filter.
    """
    if pattern is None:
        return True
    if scope is None:
        return False
    want = pattern.split("/")
    if want and want[-1] == "*":  # tenant:acme/* : acme and everything below it
        want = want[:-1]
    have = scope.split("/")
    if len(have) < len(want):
        return False
    return all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, want, strict=False))


def matches(
    row: SubscriptionRow, event: EventRecord, defaults: DetectorConfig | None = None
) -> bool:
    """Whether ``row`` receives ``event`` (selectors, tenant, scope and its thresholds).

    ``defaults``: the server's detector parameters. A burn-rate or rate-spike event is then
    delivered only to the subscriptions whose parameters (theirs, or these) it was detected at
    (its ``data`` carries the threshold and window); ``None`` delivers every such event.
    """
    if event.created_at_ms < row.created_at_ms:
        return False
    if row.tenant_id != SYSTEM_TENANT:
        if event.tenant_id != row.tenant_id:
            return False
        if category_of(event.event_type) not in TENANT_CATEGORIES:
            return False
    if event.event_type not in row.event_types and (
        category_of(event.event_type) not in row.event_categories
    ):
        return False
    if not scope_matches(row.scope_filter, event.scope):
        return False
    if event.event_type == "budget.threshold_crossed":
        threshold = event.data.get("threshold")
        return isinstance(threshold, (int, float)) and any(
            abs(threshold - t) < 1e-9 for t in row.utilization_thresholds
        )
    if defaults is not None:
        level = level_of(event.event_type, event.data)
        if level is not None:
            wanted = wanted_level(event.event_type, row.detector_config(defaults))
            return wanted is not None and abs(wanted[0] - level[0]) < 1e-9 and wanted[1] == level[1]
    return True


# --------------------------------------------------------------------------------------------
# Wire bodies


def _masked(headers: dict[str, str]) -> dict[str, str]:
    return dict.fromkeys(headers, MASK)


def subscription_body(row: SubscriptionRow) -> dict[str, Any]:
    """The spec's ``WebhookSubscription`` (no secret; header values masked)."""
    body: dict[str, Any] = {
        "subscription_id": row.subscription_id,
        "tenant_id": row.tenant_id,
        "url": row.url,
        "event_types": list(row.event_types),
        "status": row.status,
        "retry_policy": dict(row.retry_policy),
        "disable_after_failures": row.disable_after_failures,
        "consecutive_failures": row.consecutive_failures,
        "created_at": iso(row.created_at_ms),
        "updated_at": iso(row.updated_at_ms),
    }
    if row.event_categories:
        body["event_categories"] = list(row.event_categories)
    for name in ("name", "description", "scope_filter", "thresholds", "metadata"):
        value = getattr(row, name)
        if value is not None:
            body[name] = value
    if row.headers:
        body["headers"] = _masked(row.headers)
    for name in ("last_triggered_at", "last_success_at", "last_failure_at"):
        value = getattr(row, f"{name}_ms")
        if value is not None:
            body[name] = iso(value)
    return body


def delivery_body(row: DeliveryRow) -> dict[str, Any]:
    """The spec's ``WebhookDelivery``."""
    body: dict[str, Any] = {
        "delivery_id": row.delivery_id,
        "subscription_id": row.subscription_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "status": row.status,
        "attempts": row.attempts,
        "attempted_at": iso(row.attempted_at_ms or row.queued_at_ms),
    }
    if row.completed_at_ms is not None:
        body["completed_at"] = iso(row.completed_at_ms)
    if row.status == "RETRYING":
        body["next_retry_at"] = iso(row.next_attempt_ms)
    for name in ("response_status", "response_time_ms", "error_message"):
        value = getattr(row, name)
        if value is not None:
            body[name] = value
    trace_id = row.event.get("trace_id")
    if trace_id:
        body["trace_id"] = trace_id
        body["trace_flags"] = "01"
    return body


def lifecycle_data(
    row: SubscriptionRow,
    previous: str | None,
    new: str | None,
    changed: list[str] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """``EventDataWebhookLifecycle``."""
    data: dict[str, Any] = {"subscription_id": row.subscription_id, "tenant_id": row.tenant_id}
    if previous is not None:
        data["previous_status"] = previous
    if new is not None:
        data["new_status"] = new
    data["changed_fields"] = changed or []
    if reason is not None:
        data["disable_reason"] = reason
    return data
