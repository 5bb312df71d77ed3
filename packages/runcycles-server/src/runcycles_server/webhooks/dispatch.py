"""The dispatcher: follows the event log (the outbox), queues deliveries, sends them.

A background task of the app (started in ``create_app``'s lifespan). Each round:

1. **Follow.** For every tenant with an ACTIVE subscription (every tenant, and
   ``__system__``, when a system-wide subscription exists) it reads the tenant's events from
   its persisted cursor minus a small lag window (:data:`LAG_MS`, so an event another process
   wrote with a slightly older timestamp is not skipped) up to now, and in **one** webhook
   transaction creates a delivery for each matching subscription and moves the cursor. A
   delivery's id is the subscription's and the event's (:func:`~.models.delivery_id`), and
   one that exists is never created again: re-reading the lag window is harmless. The request
   path does none of this: a reserve or commit writes its events in its own transaction and
   never reads a subscription.
2. **Claim.** For each ACTIVE subscription, the first delivery still to send (deliveries of
   one subscription go out in order: the next waits while an older one is retried), if due
   and not leased, is leased to this dispatcher (``lease_owner``, ``lease_until_ms``) in one
   transaction. A dispatcher that dies mid-delivery loses nothing: when the lease ends
   another one (or this one restarted) takes the delivery again. Several processes share the
   queue; the transaction lets one of them win each delivery.
3. **Send** (concurrently, bounded) and **record**: success, a retry at the policy's
   backoff (``initial_delay_ms * backoff_multiplier**n`` capped at ``max_delay_ms``, with
   jitter), or a failure once retries are exhausted or the event is older than
   ``max_age_ms`` (a day). ``disable_after_failures`` failed deliveries in a row disable the
   subscription and record ``webhook.disabled``.

Between following and claiming, a round runs the tenant-close cascade
(:func:`~.service.disable_for_closed_tenant`): at once for a tenant whose ``tenant.closed``
event it has just followed, and every :data:`CASCADE_CHECK_MS` (and on its first round) for
every tenant that still has an ACTIVE or PAUSED subscription, which catches a close it did not
follow (only PAUSED subscriptions, a restart mid-cascade). Since it runs before the claim, a
closed tenant's own subscriptions receive nothing after the close.

It wakes at once when this process recorded events (``OperationStore.on_events``) and polls
every ``poll_interval_s`` otherwise (other processes' events, retries coming due).
``on_delivery`` (``success``/``retry``/``failed``/``refused``) is the hook for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from runcycles_server.events import EventRecord, event_to_json, new_event_id
from runcycles_server.events.rates import DetectorConfig
from runcycles_server.health import StoreHealth
from runcycles_server.ledger import DAY_MS, LedgerError
from runcycles_server.stores.base import EventQuery, Store
from runcycles_server.webhooks.models import (
    SYSTEM_TENANT,
    DeliveryRow,
    SubscriptionRow,
    delivery_id,
    lifecycle_data,
    matches,
)
from runcycles_server.webhooks.sealing import SealingError
from runcycles_server.webhooks.sender import Attempt, Sender
from runcycles_server.webhooks.service import disable_for_closed_tenant, lifecycle_event
from runcycles_server.webhooks.ssrf import Resolver, system_resolver
from runcycles_server.webhooks.storage import WebhookStorage, WebhookTxn

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("runcycles_server.webhooks")

LAG_MS: Final = 5_000
"""How far behind its cursor the dispatcher re-reads a tenant's events."""
LEASE_MS: Final = 60_000
"""How long a claimed delivery is this dispatcher's (longer than an attempt can take)."""
PURGE_EVERY_MS: Final = 600_000
"""How often a dispatcher deletes finished deliveries older than its retention."""
FOLLOW_MAX: Final = 10_000
REPLAY_PREFIX: Final = "whd_rpl_"
"""Delivery ids of replays start with it (a new replay waits until none is left to send)."""
REPLAY_MAX: Final = 1000
CURSOR_IDLE_MS: Final = 60_000
"""How often the cursor of a tenant without new events is moved."""
CASCADE_CHECK_MS: Final = 30_000
"""How often every subscription's tenant is checked for a close the dispatcher missed."""
"""Most events one round reads per tenant (a backlog drains over the next rounds)."""
DeliveryHook = Callable[[str], None]


def _cursor_key(tenant_id: str) -> str:
    return f"cursor:{tenant_id}"


def retry_delay_ms(policy: dict[str, Any], retry: int, jitter: Callable[[], float]) -> int:
    """The wait before retry number ``retry`` (0-based), with up to 20 % random jitter."""
    base = policy["initial_delay_ms"] * policy["backoff_multiplier"] ** retry
    capped = min(base, policy["max_delay_ms"])
    return max(1, int(capped * (0.8 + 0.2 * jitter())))


class Dispatcher:
    """Follows the outbox, claims and sends deliveries (see the module docstring).

    Args:
        store: the ledger store (its event log is the outbox).
        storage: the webhook storage of ``store``.
        resolver: how hosts are resolved (the SSRF seam).
        poll_interval_s: seconds between rounds when nothing wakes it.
        lease_ms: how long a claim lasts.
        timeout_s: per-attempt HTTP timeout (at most 80 % of ``lease_ms``).
        max_age_ms: deliveries of older events are given up.
        concurrency: most attempts in flight.
        transport: an httpx transport (tests, proxies).
        owner: this dispatcher's lease name (default: host, pid and a random part).
        retention_ms: finished deliveries are deleted this long after they were queued
            (``None``: kept).
    """

    def __init__(
        self,
        store: Store,
        storage: WebhookStorage,
        *,
        resolver: Resolver = system_resolver,
        poll_interval_s: float = 1.0,
        lease_ms: int = LEASE_MS,
        timeout_s: float = 10.0,
        max_age_ms: int = DAY_MS,
        concurrency: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
        owner: str | None = None,
        jitter: Callable[[], float] = random.random,
        retention_ms: int | None = 7 * DAY_MS,
        health: StoreHealth | None = None,
    ) -> None:
        self.store = store
        self.health = health
        """Where a round that failed because the store is unavailable is reported (one log
        line per outage, as the sweeper's), instead of a traceback each round."""
        self.storage = storage
        self.poll_interval_s = poll_interval_s
        self.lease_ms = lease_ms
        self.max_age_ms = max_age_ms
        self.concurrency = concurrency
        self.jitter = jitter
        self.retention_ms = retention_ms
        self._purged_at = 0
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # An attempt never outlives its claim: past the lease another dispatcher may send the
        # delivery too, so the attempt's timeout is capped at 80 % of the lease.
        self.sender = Sender(
            resolver, timeout_s=min(timeout_s, lease_ms / 1000 * 0.8), transport=transport
        )
        self.on_delivery: DeliveryHook | None = None
        """Called with each attempt's outcome: ``success``, ``retry``, ``failed``, ``refused``
        (connect a metrics counter here)."""
        self._wake = asyncio.Event()
        self._stopping = False
        self._cascade_checked_ms: int | None = None
        self.detectors: DetectorConfig | None = None
        """The server's detector parameters: anomaly events go to the subscriptions whose
        parameters they were detected at (see :mod:`.profiles`); ``None``: to all."""
        self._resealed = False
        self._sealing_error = ""
        self._closed_seen: dict[str, EventRecord] = {}
        """Tenants whose ``tenant.closed`` the last follow read (their cascade is due)."""

    def wake(self) -> None:
        """Run a round soon (safe to call from the request path: it only sets a flag)."""
        self._wake.set()

    async def close(self) -> None:
        """Close the HTTP client and the storage's own connections."""
        await self.sender.close()
        await self.storage.close()

    async def run(self) -> None:
        """Run rounds until :meth:`stop` (a failing round is logged; the next one tries again)."""
        while not self._stopping:
            if await self.run_round():
                continue
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError on 3.10
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()

    def stop(self) -> None:
        """Make :meth:`run` return after the round in progress (or at once when it waits).

        A shutdown stops the dispatcher this way rather than by cancelling it: a round
        cancelled in the middle of a store transaction (a Redis ``WATCH``/``MULTI`` claim)
        can leave its connection unusable; a finished round leaves nothing half done.
        """
        self._stopping = True
        self._wake.set()

    async def run_round(self) -> int:
        """One round of :meth:`run`: :meth:`run_once`, its failure reported instead of raised.

        An unavailable store goes to the store health (one line per outage), secrets that do
        not open (a server started with another webhook key) are said once, anything else is
        logged with its traceback. Returns how many attempts the round made (0 if it failed).
        """
        try:
            return await self.run_once()
        except asyncio.CancelledError:
            raise
        except SealingError as exc:  # a configuration error: say it once, not every round
            if str(exc) != self._sealing_error:
                self._sealing_error = str(exc)
                logger.error("webhook dispatch stopped: %s", exc)
        except Exception as exc:
            if self.health is not None and self.health.is_unavailable(exc):
                self.health.failed(exc, request=False)
            else:
                logger.exception("webhook dispatch round failed")
        return 0

    async def run_once(self) -> int:
        """One round: follow, claim, send. Returns how many attempts it made."""
        if not self._resealed:  # rows written before sealing: sealed once, on the first round
            await self.storage.reseal()
            self._resealed = True
        subs = await self._subs()
        active = [s for s in subs if s.status == "ACTIVE"]
        if active:
            await self.follow(active)
        if await self.cascade(subs):
            active = [s for s in await self._subs() if s.status == "ACTIVE"]
        await self._purge()  # after following: the cursors no longer reach what it deletes
        if not active:
            return 0
        claimed = await self.claim()
        if not claimed:
            return 0
        limit = asyncio.Semaphore(self.concurrency)

        async def one(sub: SubscriptionRow, row: DeliveryRow) -> None:
            async with limit:
                await self._deliver(sub, row)

        await asyncio.gather(*(one(s, d) for s, d in claimed))
        return len(claimed)

    async def _purge(self) -> None:
        """Every :data:`PURGE_EVERY_MS`, delete finished deliveries older than the retention."""
        now = self.store.clock()
        if self.retention_ms is None or now - self._purged_at < PURGE_EVERY_MS:
            return
        self._purged_at = now
        for _ in range(20):
            if await self.storage.purge_deliveries(now - self.retention_ms) < 500:
                break

    async def _subs(self) -> list[SubscriptionRow]:
        async def read(t: WebhookTxn) -> list[SubscriptionRow]:
            return await t.subs()

        return await self.storage.read(read)

    # -- tenant-close cascade --------------------------------------------------------------

    async def cascade(self, subs: list[SubscriptionRow]) -> int:
        """Disable the subscriptions of CLOSED tenants (see the module); return how many."""
        now = self.store.clock()
        open_tenants = {
            s.tenant_id for s in subs if s.tenant_id != SYSTEM_TENANT and s.status != "DISABLED"
        }
        due: dict[str, EventRecord | None] = {
            t: e for t, e in self._closed_seen.items() if t in open_tenants
        }
        self._closed_seen.clear()
        last = self._cascade_checked_ms
        if open_tenants and (last is None or now - last >= CASCADE_CHECK_MS):
            self._cascade_checked_ms = now
            for tenant_id in sorted(open_tenants - set(due)):
                tenant = await self.store.get_tenant(tenant_id)
                if tenant is not None and tenant.status == "CLOSED":
                    due[tenant_id] = await self._close_event(tenant_id)
        done = 0
        for tenant_id in sorted(due):
            done += len(await disable_for_closed_tenant(self.storage, tenant_id, due[tenant_id]))
        return done

    async def _close_event(self, tenant_id: str) -> EventRecord | None:
        query = EventQuery(tenant_id, event_type="tenant.closed", limit=1)
        page = await self.store.list_events(query)
        return page.items[0] if page.items else None

    # -- follow ----------------------------------------------------------------------------

    async def _tenants(self, active: list[SubscriptionRow]) -> set[str]:
        tenants = {s.tenant_id for s in active if s.tenant_id != SYSTEM_TENANT}
        if any(s.tenant_id == SYSTEM_TENANT for s in active):
            tenants.add(SYSTEM_TENANT)
            cursor: str | None = None
            while True:
                page = await self.store.list_tenants(None, 100, cursor)
                tenants.update(t.tenant_id for t in page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
        return tenants

    async def follow(self, active: list[SubscriptionRow]) -> int:
        """Queue deliveries for the new events of every followed tenant; return how many."""
        total = 0
        for tenant_id in sorted(await self._tenants(active)):
            relevant = [s for s in active if s.tenant_id in (tenant_id, SYSTEM_TENANT)]
            total += await self._follow_tenant(tenant_id, relevant)
        return total

    async def _follow_tenant(self, tenant_id: str, subs: list[SubscriptionRow]) -> int:
        async def read_cursor(t: WebhookTxn) -> bytes | None:
            return await t.state(_cursor_key(tenant_id))

        raw = await self.storage.read(read_cursor)
        start = int(raw) if raw is not None else min(s.created_at_ms for s in subs)
        now = self.store.clock()
        events = await self._events(tenant_id, start - LAG_MS, now)
        pairs = [(s, e) for e in events for s in subs if matches(s, e, self.detectors)]
        for event in events:
            if event.event_type == "tenant.closed":
                self._closed_seen[tenant_id] = event
        if not events and raw is not None and now - int(raw) < CURSOR_IDLE_MS:
            return 0  # nothing new, cursor fresh enough: no transaction at all

        async def write(t: WebhookTxn) -> int:
            made = 0
            for sub, event in pairs:
                did = delivery_id(sub.subscription_id, event.event_id)
                if await t.delivery(did) is not None:
                    continue
                row = DeliveryRow(
                    delivery_id=did,
                    subscription_id=sub.subscription_id,
                    tenant_id=sub.tenant_id,
                    event=orjson.loads(event_to_json(event)),
                    queued_at_ms=t.now,
                    next_attempt_ms=t.now,
                )
                t.put_delivery(row, None)
                made += 1
            # An idle tenant's cursor moves once a minute, not every round: re-reading an
            # empty window costs an index probe, a write costs the writer lock.
            current = await t.state(_cursor_key(tenant_id))
            stale = current is None or now - int(current) >= CURSOR_IDLE_MS
            if (events or stale) and (current is None or int(current) < now):
                t.put_state(_cursor_key(tenant_id), str(now).encode())
            return made

        return await self.storage.transact(write)

    async def _events(self, tenant_id: str, from_ms: int, to_ms: int) -> list[EventRecord]:
        """The tenant's events in ``[from_ms, to_ms]``, oldest first."""
        found: list[EventRecord] = []
        cursor: str | None = None
        while len(found) < FOLLOW_MAX:
            query = EventQuery(
                tenant_id=tenant_id, from_ms=from_ms, to_ms=to_ms, limit=100, cursor=cursor
            )
            page = await self.store.list_events(query)
            found += page.items
            cursor = page.next_cursor
            if cursor is None:
                break
        found.reverse()
        return found

    # -- claim and send --------------------------------------------------------------------

    async def claim(self, limit: int = 64) -> list[tuple[SubscriptionRow, DeliveryRow]]:
        """Lease the due head delivery of each ACTIVE subscription (at most ``limit``)."""

        async def write(t: WebhookTxn) -> list[tuple[SubscriptionRow, DeliveryRow]]:
            out: list[tuple[SubscriptionRow, DeliveryRow]] = []
            for sub in await t.subs():
                if sub.status != "ACTIVE":
                    continue
                heads = await t.open_deliveries(sub.subscription_id, 1)
                if not heads:
                    continue
                head = heads[0]
                if head.next_attempt_ms > t.now:
                    continue
                if head.lease_until_ms is not None and head.lease_until_ms > t.now:
                    continue
                new = dataclasses.replace(
                    head,
                    lease_owner=self.owner,
                    lease_until_ms=t.now + self.lease_ms,
                    attempts=head.attempts + 1,
                    attempted_at_ms=t.now,
                )
                t.put_delivery(new, head)
                out.append((sub, new))
                if len(out) >= limit:
                    break
            return out

        return await self.storage.transact(write)

    async def _deliver(self, sub: SubscriptionRow, row: DeliveryRow) -> None:
        now = self.store.clock()
        event = row.record()
        if now - event.created_at_ms > self.max_age_ms:
            attempt = Attempt(False, None, 0, "given up: the event is older than the maximum age")
            await self._finish(row, attempt, give_up=True)
            return

        async def read(t: WebhookTxn) -> Any:
            return await t.security()

        security = await self.storage.read(read)
        attempt = await self.sender.send(sub, event, security, now)
        await self._finish(row, attempt)

    async def _finish(self, row: DeliveryRow, attempt: Attempt, *, give_up: bool = False) -> None:
        async def write(t: WebhookTxn) -> str | None:
            cur = await t.delivery(row.delivery_id)
            if cur is None or cur.lease_owner != self.owner:
                return None  # deleted meanwhile, or our lease ended and another took it
            sub = await t.sub(row.subscription_id)
            new = dataclasses.replace(
                cur,
                lease_owner=None,
                lease_until_ms=None,
                response_status=attempt.status,
                response_time_ms=attempt.elapsed_ms,
                error_message=attempt.error,
            )
            outcome: str
            if attempt.ok:
                new.status = "SUCCESS"
                new.completed_at_ms = t.now
                outcome = "success"
            else:
                retry = cur.attempts - 1
                policy = sub.retry_policy if sub is not None else {"max_retries": 0}
                if not give_up and sub is not None and retry < policy["max_retries"]:
                    new.status = "RETRYING"
                    new.next_attempt_ms = t.now + retry_delay_ms(policy, retry, self.jitter)
                    outcome = "refused" if attempt.refused else "retry"
                else:
                    new.status = "FAILED"
                    new.completed_at_ms = t.now
                    outcome = "refused" if attempt.refused else "failed"
            t.put_delivery(new, cur)
            if sub is not None:
                self._count(t, sub, new, attempt)
            return outcome

        outcome = await self.storage.transact(write)
        if outcome is not None and self.on_delivery is not None:
            self.on_delivery(outcome)

    def _count(
        self, t: WebhookTxn, sub: SubscriptionRow, row: DeliveryRow, attempt: Attempt
    ) -> None:
        """Update the subscription's health after an attempt (disable it after N failures)."""
        new = dataclasses.replace(sub, last_triggered_at_ms=t.now)
        if attempt.ok:
            new.last_success_at_ms = t.now
            if row.counts:
                new.consecutive_failures = 0
        else:
            new.last_failure_at_ms = t.now
        events: list[EventRecord] = []
        if row.status == "FAILED" and row.counts:
            new.consecutive_failures = sub.consecutive_failures + 1
            if row.event_type != "system.webhook_delivery_failed":
                events.append(self._failed_event(sub, row, t.now))
            if new.consecutive_failures >= sub.disable_after_failures and sub.status != "DISABLED":
                new.status = "DISABLED"
                data = lifecycle_data(
                    new, sub.status, "DISABLED", reason="consecutive_failures_exceeded_threshold"
                )
                corr = f"webhook_auto_disable:{sub.subscription_id}:{row.delivery_id}"
                events.append(
                    lifecycle_event(new, "webhook.disabled", t.now, data, corr, system=True)
                )
        t.put_sub(new)
        if events:
            t.record(events)

    @staticmethod
    def _failed_event(sub: SubscriptionRow, row: DeliveryRow, now: int) -> EventRecord:
        return EventRecord(
            event_id=new_event_id(now),
            event_type="system.webhook_delivery_failed",
            tenant_id=SYSTEM_TENANT,
            created_at_ms=now,
            source="webhook-dispatcher",
            actor_type="system",
            data={
                "subscription_id": sub.subscription_id,
                "event_id": row.event_id,
                "delivery_id": row.delivery_id,
                "attempts": row.attempts,
                "error_message": row.error_message,
                "response_status": row.response_status,
            },
            correlation_id=row.delivery_id,
        )

    # -- test and replay -------------------------------------------------------------------

    async def send_test(self, sub: SubscriptionRow) -> tuple[DeliveryRow, Attempt]:
        """Send a ``system.webhook_test`` event now; record it (it never counts as a failure)."""
        now = self.store.clock()
        event = EventRecord(
            event_id=new_event_id(now),
            event_type="system.webhook_test",
            tenant_id=sub.tenant_id,
            created_at_ms=now,
            source="webhook-dispatcher",
            actor_type="system",
            data={"subscription_id": sub.subscription_id, "message": "test delivery"},
        )

        async def read(t: WebhookTxn) -> Any:
            return await t.security()

        attempt = await self.sender.send(sub, event, await self.storage.read(read), now)
        row = DeliveryRow(
            delivery_id=delivery_id(sub.subscription_id, event.event_id),
            subscription_id=sub.subscription_id,
            tenant_id=sub.tenant_id,
            event=orjson.loads(event_to_json(event)),
            queued_at_ms=now,
            status="SUCCESS" if attempt.ok else "FAILED",
            attempts=1,
            attempted_at_ms=now,
            completed_at_ms=now,
            response_status=attempt.status,
            response_time_ms=attempt.elapsed_ms,
            error_message=attempt.error,
            counts=False,
        )

        async def write(t: WebhookTxn) -> None:
            t.put_delivery(row, None)

        await self.storage.transact(write)
        return row, attempt

    async def replay(
        self,
        sub: SubscriptionRow,
        events: list[EventRecord],
        replay_id: str,
    ) -> int:
        """Queue a fresh delivery of each event (oldest first); return how many."""

        async def write(t: WebhookTxn) -> int:
            current = await t.sub(sub.subscription_id)
            if current is None:
                return 0
            pending = await t.open_deliveries(sub.subscription_id, REPLAY_MAX + 1)
            if any(d.delivery_id.startswith(REPLAY_PREFIX) for d in pending):
                raise LedgerError(
                    "INVALID_REQUEST",
                    "an earlier replay of this subscription is still being delivered; wait "
                    "for it to finish (see .../deliveries) and try again",
                    status=409,
                )
            for event in events:
                row = DeliveryRow(
                    delivery_id=f"{REPLAY_PREFIX}{replay_id.removeprefix('rpl_')}_"
                    f"{event.event_id.removeprefix('evt_')}",
                    subscription_id=sub.subscription_id,
                    tenant_id=sub.tenant_id,
                    event=orjson.loads(event_to_json(event)),
                    queued_at_ms=t.now,
                    next_attempt_ms=t.now,
                )
                t.put_delivery(row, None)
            return len(events)

        queued = await self.storage.transact(write)
        self.wake()
        return queued
