"""The audited webhook actions: test, replay, pause and resume one subscription.

The HTTP routes (:mod:`.api`) and the operator console both act through :class:`WebhookActions`,
so a replay is the same replay, with the same checks and the same audit entry, whoever asks.
Each action writes one audit-log entry (the spec's ``AuditLogEntry``: operation, the
subscription as ``resource_id``, the request and trace ids) besides what it does: a test and a
replay change no ledger row, so without it they would leave no trace of who sent them.
Pause and resume also record their ``webhook.paused``/``webhook.resumed`` event (the service's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from runcycles_server.events import EventRecord, current_context
from runcycles_server.ledger import AuditRow, LedgerError
from runcycles_server.stores import operations
from runcycles_server.stores.base import EventQuery, OperationStore, Store, new_id
from runcycles_server.webhooks.dispatch import Dispatcher
from runcycles_server.webhooks.models import (
    SYSTEM_TENANT,
    DeliveryRow,
    SubscriptionRow,
    UpdateRequest,
    matches,
)
from runcycles_server.webhooks.sender import Attempt
from runcycles_server.webhooks.service import Subscriptions

REPLAY_SCAN_MAX: Final = 20_000
"""Most events one replay examines in its window."""
REPLAY_MAX_EVENTS: Final = 1000
"""Most events one replay may queue (the spec's ``max_events`` bound)."""
OPERATIONS: Final = {
    "test": "testWebhookSubscription",
    "replay": "replayEvents",
    "PAUSED": "pauseWebhookSubscription",
    "ACTIVE": "resumeWebhookSubscription",
}
"""The audit log's ``operation`` of each action (the spec's operationIds where it has one)."""


@dataclass(frozen=True)
class Replay:
    """A replay queued: its id and how many events it will send again."""

    replay_id: str
    events_queued: int


class WebhookActions:
    """Test, replay, pause and resume, each audited (see the module docstring)."""

    def __init__(self, store: Store, dispatcher: Dispatcher) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.subs = Subscriptions(store, dispatcher.storage, dispatcher.sender.resolver)

    async def test(
        self, row: SubscriptionRow, reason: str | None = None
    ) -> tuple[DeliveryRow, Attempt]:
        """Send a ``system.webhook_test`` event now and record the delivery.

        Raises:
            LedgerError: 409 TENANT_CLOSED (the subscription's tenant is closed).
        """
        await self.subs.check_open(row.tenant_id)
        delivery, attempt = await self.dispatcher.send_test(row)
        details: dict[str, Any] = {"success": attempt.ok}
        if attempt.status is not None:
            details["response_status"] = attempt.status
        await self.audit("test", row, reason, details)
        return delivery, attempt

    async def replay(
        self,
        row: SubscriptionRow,
        from_ms: int,
        to_ms: int,
        event_types: list[str] | None = None,
        max_events: int = 100,
        reason: str | None = None,
    ) -> Replay:
        """Queue a fresh delivery of every event of the window the subscription matches.

        Raises:
            LedgerError: INVALID_REQUEST (window backwards, subscription not ACTIVE, more
                than ``max_events`` events), CONFLICT (a replay still being delivered),
                TENANT_CLOSED.
        """
        await self.subs.check_open(row.tenant_id)
        if to_ms < from_ms:
            raise LedgerError("INVALID_REQUEST", "replay window: to is before from")
        if row.status != "ACTIVE":
            raise LedgerError(
                "INVALID_REQUEST",
                f"subscription is {row.status}: resume it (PATCH status=ACTIVE) before replaying",
            )
        events = await self.window(row, from_ms, to_ms, event_types, max_events)
        replay_id = new_id("rpl")
        queued = await self.dispatcher.replay(row, events, replay_id)
        await self.audit(
            "replay", row, reason, {"replay_id": replay_id, "events_queued": queued,
                                    "from_ms": from_ms, "to_ms": to_ms},
        )  # fmt: skip
        return Replay(replay_id, queued)

    async def set_status(
        self, row: SubscriptionRow, status: Literal["ACTIVE", "PAUSED"], reason: str | None = None
    ) -> SubscriptionRow:
        """Pause (``PAUSED``) or resume (``ACTIVE``, also re-enabling a DISABLED one).

        Raises:
            LedgerError: NOT_FOUND (deleted meanwhile).
        """
        updated = await self.subs.update(
            row.subscription_id, UpdateRequest(status=status), row.tenant_id
        )
        if updated.status != row.status:
            await self.audit(status, updated, reason, {"previous_status": row.status})
        return updated

    async def window(
        self,
        row: SubscriptionRow,
        from_ms: int,
        to_ms: int,
        types: list[str] | None,
        max_events: int,
    ) -> list[EventRecord]:
        """The events of ``[from_ms, to_ms]`` the subscription matches, oldest first.

        Events from before the subscription existed count too (a replay is asked for them).

        Raises:
            LedgerError: INVALID_REQUEST when there are more than ``max_events``.
        """
        tenants = [row.tenant_id]
        if row.tenant_id == SYSTEM_TENANT:
            cursor: str | None = None
            while True:
                page = await self.store.list_tenants(None, 100, cursor)
                tenants += [t.tenant_id for t in page.items]
                cursor = page.next_cursor
                if cursor is None:
                    break
        unbounded = SubscriptionRow(
            **{name: getattr(row, name) for name in SubscriptionRow.__slots__}
        )
        unbounded.created_at_ms = 0
        found: list[EventRecord] = []
        scanned = 0
        for tenant_id in tenants:
            at: str | None = None
            while True:
                query = EventQuery(tenant_id, from_ms=from_ms, to_ms=to_ms, limit=100, cursor=at)
                events = await self.store.list_events(query)
                scanned += len(events.items)
                found += [
                    e
                    for e in events.items
                    if (not types or e.event_type in types)
                    and matches(unbounded, e, self.dispatcher.detectors)
                ]
                if len(found) > max_events:
                    raise LedgerError(
                        "INVALID_REQUEST",
                        f"the window holds more than max_events={max_events} events for this "
                        f"subscription: narrow from/to or raise max_events (up to "
                        f"{REPLAY_MAX_EVENTS})",
                    )
                at = events.next_cursor
                if at is None or scanned > REPLAY_SCAN_MAX:
                    break
        found.sort(key=lambda e: (e.created_at_ms, e.event_id))
        return found

    async def audit(
        self,
        action: str,
        row: SubscriptionRow,
        reason: str | None,
        details: dict[str, Any],
    ) -> None:
        """Record the audit entry of ``action`` on ``row`` (in the subscription's tenant)."""
        if not isinstance(self.store, OperationStore):
            return  # a custom store keeps no audit log
        ctx = current_context()
        extra: dict[str, Any] = {"subscription_id": row.subscription_id, "url": row.url}
        if ctx.key_id is not None:
            extra["key_id"] = ctx.key_id
        if ctx.source_ip is not None:
            extra["source_ip"] = ctx.source_ip
        if reason:
            extra["reason"] = reason
        entry = AuditRow(
            audit_id=new_id("aud"),
            tenant_id=row.tenant_id,
            actor_type="api_key" if ctx.key_id is not None else "admin_on_behalf_of",
            operation=OPERATIONS[action],
            resource_id=row.subscription_id,
            created_at_ms=self.store.clock(),
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
            details={**extra, **details},
        )
        await self.store.run(operations.record_changes(row.tenant_id, [], entry))
