"""Subscription management: create, update (pause, resume, rotate), delete, bulk actions.

Each change is one webhook transaction that also records its lifecycle event
(``webhook.created/updated/paused/resumed/deleted``, spec payload ``EventDataWebhookLifecycle``
and correlation ids) in the owning tenant's event log (``__system__`` for system-wide
subscriptions). A URL is checked against the security configuration (:mod:`.ssrf`) before
it is saved; the dispatcher checks it again on every delivery.

Closing a tenant disables its subscriptions (the spec's CASCADE SEMANTICS, Rule 1, Mode B:
the tenant row flips first, in the ledger store's transaction; :func:`disable_for_closed_tenant`
follows, run by the dispatcher, see :mod:`.dispatch`), recording one
``webhook.disabled_via_tenant_cascade`` per subscription it disables, with the cascade's
correlation id and the ``tenant.closed`` event's request context. Rule 2 guards the gap: every
change to a subscription of a CLOSED tenant (create, update, rotate, delete, test, replay,
bulk) is refused with 409 ``TENANT_CLOSED`` (:meth:`Subscriptions.check_open`), so none
succeeds after the close whether the cascade has run yet or not. A suspended tenant keeps its
subscriptions (suspension is reversible, and the spec cascades on close only).

After a change, the owning tenant's recorded threshold set (``TenantRow.event_thresholds``)
becomes the union of the defaults and its subscriptions' ``budget_utilization``, so the ledger
records every crossing some subscription wants while the request path reads no subscription.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Final

from runcycles_server.events import SOURCE, EventRecord, current_context, new_event_id
from runcycles_server.events.context import EventContext
from runcycles_server.events.detect import DEFAULT_THRESHOLDS
from runcycles_server.ledger import LedgerError
from runcycles_server.stores import operations
from runcycles_server.stores.base import OperationStore, Store, new_id
from runcycles_server.webhooks.models import (
    SYSTEM_TENANT,
    CreateRequest,
    RetryPolicy,
    SecretRow,
    SubscriptionRow,
    UpdateRequest,
    check_scope_filter,
    check_selectors,
    lifecycle_data,
    new_secret,
)
from runcycles_server.webhooks.ssrf import Resolver, resolve_target
from runcycles_server.webhooks.storage import WebhookStorage, WebhookTxn

_CONFIG_FIELDS: Final = (
    "url", "event_types", "event_categories", "name", "description", "scope_filter",
    "thresholds", "headers", "retry_policy", "disable_after_failures", "metadata",
)  # fmt: skip


def lifecycle_event(
    row: SubscriptionRow,
    event_type: str,
    now_ms: int,
    data: dict[str, Any],
    correlation_id: str,
    *,
    system: bool = False,
) -> EventRecord:
    """A ``webhook.*`` event about ``row`` (the request's context, or the system's)."""
    ctx = current_context()
    return EventRecord(
        event_id=new_event_id(now_ms),
        event_type=event_type,
        tenant_id=row.tenant_id,
        created_at_ms=now_ms,
        source=SOURCE,
        actor_type="system" if system else ctx.actor_type,
        key_id=None if system else ctx.key_id,
        source_ip=None if system else ctx.source_ip,
        data=data,
        correlation_id=correlation_id,
        request_id=None if system else ctx.request_id,
        trace_id=None if system else ctx.trace_id,
    )


class Subscriptions:
    """The subscription operations the HTTP routes call."""

    def __init__(self, store: Store, storage: WebhookStorage, resolver: Resolver) -> None:
        self.store = store
        self.storage = storage
        self.resolver = resolver

    async def check_open(self, tenant_id: str) -> None:
        """Refuse a change to a subscription of a CLOSED tenant (the spec's Rule 2).

        Raises:
            LedgerError: 409 TENANT_CLOSED.
        """
        if tenant_id == SYSTEM_TENANT:
            return
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is not None and tenant.status == "CLOSED":
            raise LedgerError(
                "TENANT_CLOSED",
                f"tenant {tenant_id} is CLOSED: its webhook subscriptions are disabled for good "
                "and cannot be created or changed (they can still be read)",
                status=409,
            )

    async def check_url(self, url: str) -> None:
        """Refuse a URL the security configuration does not allow (resolving its host now).

        Raises:
            LedgerError: INVALID_REQUEST saying why.
        """

        async def read(t: WebhookTxn) -> Any:
            return await t.security()

        security = await self.storage.read(read)
        await resolve_target(url, security, self.resolver)

    async def get(self, subscription_id: str, tenant_id: str | None = None) -> SubscriptionRow:
        """The subscription (of ``tenant_id`` when given: another tenant's is not found).

        Raises:
            LedgerError: NOT_FOUND.
        """

        async def read(t: WebhookTxn) -> SubscriptionRow | None:
            return await t.sub(subscription_id)

        row = await self.storage.read(read)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise LedgerError("NOT_FOUND", f"webhook subscription {subscription_id} not found")
        return row

    async def all(self) -> list[SubscriptionRow]:
        """Every subscription, by id."""

        async def read(t: WebhookTxn) -> list[SubscriptionRow]:
            return await t.subs()

        return await self.storage.read(read)

    async def create(self, tenant_id: str, body: CreateRequest) -> tuple[SubscriptionRow, str]:
        """Create a subscription; return it and its signing secret (answered only now).

        Raises:
            LedgerError: INVALID_REQUEST (selectors, scope filter, URL), NOT_FOUND (tenant).
        """
        if tenant_id != SYSTEM_TENANT and await self.store.get_tenant(tenant_id) is None:
            raise LedgerError("NOT_FOUND", f"tenant {tenant_id} does not exist")
        await self.check_open(tenant_id)
        secret = body.signing_secret or new_secret()
        row = SubscriptionRow(
            subscription_id=new_id("whsub"),
            tenant_id=tenant_id,
            url=body.url,
            event_types=list(body.event_types),
            event_categories=list(body.event_categories or []),
            secrets=[SecretRow(secret)],
            name=body.name,
            description=body.description,
            scope_filter=body.scope_filter,
            thresholds=_thresholds(body.thresholds),
            headers=dict(body.headers or {}),
            retry_policy=(body.retry_policy or RetryPolicy()).model_dump(),
            disable_after_failures=body.disable_after_failures,
            metadata=body.metadata,
        )
        check_selectors(row)
        check_scope_filter(row.scope_filter)
        await self.check_url(row.url)

        async def write(t: WebhookTxn) -> SubscriptionRow:
            new = dataclasses.replace(row, created_at_ms=t.now, updated_at_ms=t.now)
            t.put_sub(new)
            data = lifecycle_data(new, None, new.status)
            corr = f"webhook_create:{new.subscription_id}"
            t.record([lifecycle_event(new, "webhook.created", t.now, data, corr)])
            return new

        created = await self.storage.transact(write)
        await self.sync_thresholds(tenant_id)
        return created, secret

    async def update(
        self, subscription_id: str, body: UpdateRequest, tenant_id: str | None = None
    ) -> SubscriptionRow:
        """Apply a partial update (status changes, secret rotation included).

        Raises:
            LedgerError: NOT_FOUND, INVALID_REQUEST, TENANT_CLOSED.
        """
        await self.check_open((await self.get(subscription_id, tenant_id)).tenant_id)
        changes = body.model_dump(exclude_unset=True)
        if "url" in changes:
            if changes["url"] is None:
                raise LedgerError("INVALID_REQUEST", "url cannot be null: give the new URL")
            await self.check_url(changes["url"])
        if changes.get("scope_filter") is not None:
            check_scope_filter(changes["scope_filter"])
        request_id = current_context().request_id or new_id("req")

        async def write(t: WebhookTxn) -> SubscriptionRow:
            old = await t.sub(subscription_id)
            if old is None or (tenant_id is not None and old.tenant_id != tenant_id):
                raise LedgerError("NOT_FOUND", f"webhook subscription {subscription_id} not found")
            new = dataclasses.replace(old, secrets=list(old.secrets))
            changed: list[str] = []
            for name in _CONFIG_FIELDS:
                if name not in changes:
                    continue
                value = changes[name]
                if name == "thresholds":
                    value = _thresholds(body.thresholds)
                elif name == "retry_policy":
                    value = (body.retry_policy or RetryPolicy()).model_dump()
                elif name in ("event_types", "event_categories", "headers") and value is None:
                    value = [] if name != "headers" else {}
                elif name == "disable_after_failures" and value is None:
                    continue
                if getattr(new, name) != value:
                    setattr(new, name, value)
                    changed.append(name)
            if changes.get("signing_secret"):
                rotate(new, changes["signing_secret"], t.now)
                changed.append("signing_secret")
            check_selectors(new)
            status = changes.get("status")
            previous = old.status
            if status is not None and status != previous:
                new.status = status
                if status == "ACTIVE":
                    new.consecutive_failures = 0
            if not changed and new.status == previous:
                return old  # a no-op update records nothing
            new.updated_at_ms = t.now
            t.put_sub(new)
            corr = f"webhook_update:{subscription_id}:{request_id}"
            if new.status != previous:
                kind = "webhook.paused" if new.status == "PAUSED" else "webhook.resumed"
                data = lifecycle_data(new, previous, new.status, changed)
            else:
                kind = "webhook.updated"
                data = lifecycle_data(new, previous, new.status, changed)
            t.record([lifecycle_event(new, kind, t.now, data, corr)])
            return new

        row = await self.storage.transact(write)
        await self.sync_thresholds(row.tenant_id)
        return row

    async def rotate_secret(
        self, subscription_id: str, secret: str | None, overlap_s: int, tenant_id: str | None
    ) -> tuple[SubscriptionRow, str]:
        """Put a new secret first; the previous one signs for ``overlap_s`` more seconds.

        Raises:
            LedgerError: NOT_FOUND.
        """
        new_value = secret or new_secret()
        request_id = current_context().request_id or new_id("req")

        async def write(t: WebhookTxn) -> SubscriptionRow:
            old = await t.sub(subscription_id)
            if old is None or (tenant_id is not None and old.tenant_id != tenant_id):
                raise LedgerError("NOT_FOUND", f"webhook subscription {subscription_id} not found")
            new = dataclasses.replace(old, secrets=list(old.secrets), updated_at_ms=t.now)
            rotate(new, new_value, t.now, overlap_s * 1000)
            t.put_sub(new)
            data = lifecycle_data(new, old.status, new.status, ["signing_secret"])
            corr = f"webhook_update:{subscription_id}:{request_id}"
            t.record([lifecycle_event(new, "webhook.updated", t.now, data, corr)])
            return new

        return await self.storage.transact(write), new_value

    async def delete(self, subscription_id: str, tenant_id: str | None = None) -> SubscriptionRow:
        """Delete a subscription; its deliveries still to send are cancelled.

        Raises:
            LedgerError: NOT_FOUND.
        """

        async def write(t: WebhookTxn) -> SubscriptionRow:
            old = await t.sub(subscription_id)
            if old is None or (tenant_id is not None and old.tenant_id != tenant_id):
                raise LedgerError("NOT_FOUND", f"webhook subscription {subscription_id} not found")
            t.delete_sub(subscription_id)
            data = lifecycle_data(old, old.status, None)
            corr = f"webhook_delete:{subscription_id}"
            t.record([lifecycle_event(old, "webhook.deleted", t.now, data, corr)])
            return old

        row = await self.storage.transact(write)
        await self.sync_thresholds(row.tenant_id)
        return row

    async def bulk(
        self, ids: Iterable[str], action: str, request_id: str, *, preview: bool = False
    ) -> dict[str, list[dict[str, Any]]]:
        """Apply PAUSE/RESUME/DELETE to each id; return ``succeeded``/``failed``/``skipped``.

        ``preview``: decide each row the same way, in a read, and change nothing.
        """
        out: dict[str, list[dict[str, Any]]] = {"succeeded": [], "failed": [], "skipped": []}
        touched: set[str] = set()
        corr = f"webhook_bulk_action:{action.lower()}:{request_id}"
        ids = list(ids)
        closed: set[str] = set()
        owners = {row.subscription_id: row.tenant_id for row in await self.all()}
        for tenant_id in {owners[i] for i in ids if i in owners}:
            try:
                await self.check_open(tenant_id)
            except LedgerError:
                closed.add(tenant_id)
        for sid in ids:

            async def write(t: WebhookTxn, sid: str = sid) -> tuple[str, dict[str, Any]]:
                old = await t.sub(sid)
                if old is None:
                    if action == "DELETE":
                        return "skipped", {"id": sid, "reason": "ALREADY_DELETED"}
                    return "failed", {"id": sid, "error_code": "NOT_FOUND",
                                      "message": "subscription not found"}  # fmt: skip
                if old.tenant_id in closed:
                    return "failed", {"id": sid, "error_code": "TENANT_CLOSED",
                                      "message": f"tenant {old.tenant_id} is CLOSED"}  # fmt: skip
                if action == "DELETE":
                    if not preview:
                        t.delete_sub(sid)
                        data = lifecycle_data(old, old.status, None)
                        t.record([lifecycle_event(old, "webhook.deleted", t.now, data, corr)])
                        touched.add(old.tenant_id)
                    return "succeeded", {"id": sid}
                target = "PAUSED" if action == "PAUSE" else "ACTIVE"
                if action == "PAUSE" and old.status in ("PAUSED", "DISABLED"):
                    return "skipped", {"id": sid, "reason": "ALREADY_IN_TARGET_STATE"}
                if action == "RESUME" and old.status == "ACTIVE":
                    return "skipped", {"id": sid, "reason": "ALREADY_IN_TARGET_STATE"}
                if action == "RESUME" and old.status == "DISABLED":
                    message = "re-enable a DISABLED subscription with PATCH status=ACTIVE"
                    return "failed", {"id": sid, "error_code": "INVALID_TRANSITION",
                                      "message": message}  # fmt: skip
                if preview:
                    return "succeeded", {"id": sid}
                new = dataclasses.replace(old, status=target, updated_at_ms=t.now)
                t.put_sub(new)
                kind = "webhook.paused" if target == "PAUSED" else "webhook.resumed"
                data = lifecycle_data(new, old.status, target)
                t.record([lifecycle_event(new, kind, t.now, data, corr)])
                return "succeeded", {"id": sid}

            run = self.storage.read if preview else self.storage.transact
            bucket, entry = await run(write)
            out[bucket].append(entry)
        for tenant_id in touched:
            await self.sync_thresholds(tenant_id)
        return out

    async def sync_thresholds(self, tenant_id: str) -> None:
        """Make the tenant's recorded thresholds the defaults and its subscriptions' ones.

        ``None`` when that union is just the defaults.
        """
        if tenant_id == SYSTEM_TENANT:
            return
        wanted = set(DEFAULT_THRESHOLDS)
        for row in await self.all():
            if row.tenant_id == tenant_id:
                wanted |= set(row.utilization_thresholds)
        value = None if wanted == set(DEFAULT_THRESHOLDS) else sorted(wanted)
        if isinstance(self.store, OperationStore):
            await self.store.run(operations.set_event_thresholds(tenant_id, value))


CASCADE_EVENT: Final = "webhook.disabled_via_tenant_cascade"


async def disable_for_closed_tenant(
    storage: WebhookStorage, tenant_id: str, cause: EventRecord | None
) -> list[SubscriptionRow]:
    """Disable every ACTIVE or PAUSED subscription of a CLOSED tenant; return them.

    One webhook transaction: each one becomes DISABLED with its
    ``webhook.disabled_via_tenant_cascade`` event (``EventDataTenantCascade``), carrying the
    request context of ``cause`` (the ``tenant.closed`` event, when found) and the cascade's
    correlation id (``tenant_close_cascade:<tenant_id>:<request_id>``, as its other children).
    Idempotent: already DISABLED ones are left alone, so running it again records nothing
    twice.
    """

    async def write(t: WebhookTxn) -> list[SubscriptionRow]:
        done: list[SubscriptionRow] = []
        events: list[EventRecord] = []
        for sub in await t.subs():
            if sub.tenant_id != tenant_id or sub.status == "DISABLED":
                continue
            new = dataclasses.replace(sub, status="DISABLED", updated_at_ms=t.now)
            t.put_sub(new)
            done.append(new)
            data: dict[str, Any] = {"subscription_id": sub.subscription_id}
            if sub.name:
                data["name"] = sub.name
            data.update(prior_status=sub.status, new_status="DISABLED",
                        cascade_reason="tenant_closed")  # fmt: skip
            events.append(
                EventRecord(
                    event_id=new_event_id(t.now),
                    event_type=CASCADE_EVENT,
                    tenant_id=tenant_id,
                    created_at_ms=t.now,
                    source=SOURCE,
                    actor_type=cause.actor_type if cause is not None else "system",
                    key_id=cause.key_id if cause is not None else None,
                    source_ip=cause.source_ip if cause is not None else None,
                    data=data,
                    correlation_id=operations.cascade_correlation_id(
                        tenant_id, EventContext(request_id=cause.request_id) if cause else None
                    ),
                    request_id=cause.request_id if cause is not None else None,
                    trace_id=cause.trace_id if cause is not None else None,
                )
            )
        if events:
            t.record(events)
        return done

    return await storage.transact(write)


def rotate(row: SubscriptionRow, secret: str, now_ms: int, overlap_ms: int | None = None) -> None:
    """Put ``secret`` first; live older secrets keep signing until ``now + overlap``."""
    from_now = now_ms + (overlap_ms if overlap_ms is not None else 24 * 3_600_000)
    kept = [
        SecretRow(s.secret, min(from_now, s.expires_at_ms or from_now))
        for s in row.secrets
        if (s.expires_at_ms is None or s.expires_at_ms > now_ms) and s.secret != secret
    ]
    row.secrets = [SecretRow(secret), *[s for s in kept if s.expires_at_ms != now_ms]][:5]


def _thresholds(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    dumped: dict[str, Any] = config.model_dump(exclude_none=True)
    return dumped or None
