"""An event as stored and as answered: the spec's ``Event`` (governance admin spec)."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from runcycles_server.governance.timestamps import iso

CATEGORIES: Final = frozenset(
    {"budget", "tenant", "api_key", "policy", "reservation", "system", "webhook"}
)
"""The spec's ``EventCategory`` values: an event type is ``{category}.{action}``, except the
``quota.*`` types of the v0.1.26 extensions, which add no category: theirs is ``policy``
(quota counters are kept for the policies that declare them)."""
_CATEGORY_OF_PREFIX: Final = {"quota": "policy"}

EVENT_TYPES: Final = (
    "budget.created", "budget.updated", "budget.funded", "budget.debited", "budget.reset",
    "budget.reset_spent", "budget.debt_repaid", "budget.frozen", "budget.unfrozen",
    "budget.closed", "budget.closed_via_tenant_cascade", "budget.threshold_crossed",
    "budget.exhausted", "budget.over_limit_entered", "budget.over_limit_exited",
    "budget.debt_incurred", "budget.burn_rate_anomaly", "reservation.denied",
    "reservation.denial_rate_spike", "reservation.expired", "reservation.expiry_rate_spike",
    "reservation.commit_overage", "reservation.released_via_tenant_cascade", "tenant.created",
    "tenant.updated", "tenant.suspended", "tenant.reactivated", "tenant.closed",
    "tenant.settings_changed", "webhook.created", "webhook.updated", "webhook.paused",
    "webhook.resumed", "webhook.disabled", "webhook.deleted",
    "webhook.disabled_via_tenant_cascade", "api_key.created", "api_key.revoked",
    "api_key.revoked_via_tenant_cascade", "api_key.expired", "api_key.permissions_changed",
    "api_key.auth_failed", "api_key.auth_failure_rate_spike", "policy.created",
    "policy.updated", "policy.deleted", "system.store_connection_lost",
    "system.store_connection_restored", "system.high_latency", "system.webhook_delivery_failed",
    "system.webhook_test", "reservation.observed_denied", "reservation.observed_allowed",
    "quota.threshold_approaching", "quota.counter_reset",
)  # fmt: skip
"""The spec's ``EventType`` values (governance admin spec, revision 0.1.25) and the four of
the protocol extensions v0.1.26 (``EventTypeExtension``: observe mode and quotas)."""

_STORAGE_VERSION: Final = 1

SOURCE: Final = "cycles-server"
"""``source`` of the events a request causes."""
SWEEPER_SOURCE: Final = "expiry-sweeper"
"""``source`` of the events the background expiry sweep causes."""


_SEQUENCE = itertools.count()


def new_event_id(now_ms: int) -> str:
    """A fresh, globally unique event id that sorts by time (``evt_`` and 32 hex digits).

    The time comes first, then a per-process sequence, then random digits: events of one
    process keep their order within a millisecond (a listing orders by time, then id).
    """
    seq = next(_SEQUENCE) % 0x1000000
    return f"evt_{now_ms:012x}{seq:06x}{uuid.uuid4().hex[:14]}"


def category_of(event_type: str) -> str:
    """Return the category of an event type (its first segment).

    Raises:
        ValueError: the type's first segment is not a category of the spec.
    """
    category = event_type.partition(".")[0]
    category = _CATEGORY_OF_PREFIX.get(category, category)
    if category not in CATEGORIES:
        raise ValueError(f"event type {event_type!r} has no known category")
    return category


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One immutable event.

    ``actor_type`` is the spec's ``actor.type`` (``api_key``, ``admin``,
    ``admin_on_behalf_of``, ``system``, ``scheduler``); ``data`` the type's payload.
    """

    event_id: str
    event_type: str
    tenant_id: str
    created_at_ms: int
    source: str
    scope: str | None = None
    actor_type: str | None = None
    key_id: str | None = None
    source_ip: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None

    @property
    def category(self) -> str:
        """The event's category (see :func:`category_of`)."""
        return category_of(self.event_type)


def event_body(row: EventRecord) -> dict[str, Any]:
    """Return the wire ``Event`` (absent optional fields left out)."""
    body: dict[str, Any] = {
        "event_id": row.event_id,
        "event_type": row.event_type,
        "category": row.category,
        "timestamp": iso(row.created_at_ms),
        "tenant_id": row.tenant_id,
        "source": row.source,
    }
    if row.scope is not None:
        body["scope"] = row.scope
    if row.actor_type is not None:
        actor: dict[str, Any] = {"type": row.actor_type}
        if row.key_id is not None:
            actor["key_id"] = row.key_id
        if row.source_ip is not None:
            actor["source_ip"] = row.source_ip
        body["actor"] = actor
    if row.data:
        body["data"] = row.data
    for name in ("correlation_id", "request_id", "trace_id"):
        value = getattr(row, name)
        if value is not None:
            body[name] = value
    return body


def event_to_json(row: EventRecord) -> bytes:
    """Return the storage form of ``row`` (read back exactly by :func:`event_from_json`)."""
    data = {name: getattr(row, name) for name in EventRecord.__slots__}
    data["v"] = _STORAGE_VERSION
    return orjson.dumps(data)


def event_from_json(raw: bytes | str) -> EventRecord:
    """Return the row :func:`event_to_json` stored.

    Raises:
        ValueError: ``raw`` is not a stored event of a version this code reads.
    """
    data = orjson.loads(raw)
    if not isinstance(data, dict) or data.pop("v", None) != _STORAGE_VERSION:
        raise ValueError("not a stored event (version 1)")
    return EventRecord(**data)
