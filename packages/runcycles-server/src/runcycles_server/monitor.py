"""The monitor: a background task that turns the hot path's tallies into events.

Owned by the app (started and stopped in ``create_app``'s lifespan, beside the expiry
sweeper). Every ``DetectorConfig.tick_seconds`` it

1. takes this process's :class:`~runcycles_server.events.signals.Signals` tallies and adds
   their counts to the store's per-minute counters (one write per tick; a failed write puts
   them back for the next tick);
2. records the aggregated refusals: one ``reservation.denied`` per
   ``(tenant, scope, unit, reason_code)`` and one ``api_key.auth_failed`` per
   ``(tenant, key, failure_reason)`` at most once per ``refusal_window_seconds``, each with
   the ``count`` of refusals it stands for and the window they fell in (``window_start``,
   ``window_end``). A refusal the window holds back is counted into the next event, and
   pending ones are written when the app stops, so the counts of all events (of all
   processes) add up to the number of refusals;
3. runs the rate detectors (:mod:`runcycles_server.events.rates`) over the store's counters
   (every process's) and records ``budget.burn_rate_anomaly``,
   ``reservation.denial_rate_spike``, ``reservation.expiry_rate_spike`` and
   ``api_key.auth_failure_rate_spike`` when a condition **starts**: each condition has a
   shared flag in the store (``SignalStore.raise_flag``), raised for three ticks and
   refreshed every tick while the condition holds; only the process whose call raised it
   records the event. A condition that stops holding lets its flag lapse, and holding again
   later is a new spike. The spec's payloads have no field for an end, so none is recorded.

It also judges the request latency of the runtime routes (:mod:`runcycles_server.events.latency`):
``system.high_latency`` when the window's percentile crosses ``latency_threshold_ms``, once
per crossing, per process. And it writes the store outage events :class:`StoreHealth` holds
(``system.store_connection_lost``/``restored``) once the store answers again.

Expirations for the expiry rate are read from the event log (``reservation.expired`` of the
tenants that reserved within the window), which every process's sweeper writes.

A store without :class:`~runcycles_server.stores.base.SignalStore` still gets the refusal
events; its detectors do not run. Time comes from the store's clock (injectable), so tests
drive ticks with :meth:`Monitor.tick`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from runcycles.models import ReservationCreateRequest
from runcycles_server import ledger
from runcycles_server.errors import LedgerError
from runcycles_server.events import EventRecord, new_event_id
from runcycles_server.events.context import EventContext, current_context
from runcycles_server.events.latency import LatencyRule, LatencyWatch
from runcycles_server.events.rates import (
    BUCKET_MS,
    Condition,
    Counts,
    DetectorConfig,
    Profile,
    burn_condition,
    burn_rates,
    level_of,
    rate_spikes,
    wanted_level,
)
from runcycles_server.events.records import SOURCE
from runcycles_server.events.signals import (
    RESERVATIONS,
    SYSTEM_TENANT,
    Refusals,
    Signals,
    Tally,
)
from runcycles_server.governance.timestamps import iso
from runcycles_server.health import StoreHealth
from runcycles_server.ledger import Outcome
from runcycles_server.stores.base import Clock, EventQuery, SignalStore, Store

logger = logging.getLogger("runcycles_server.monitor")

ANOMALY_TYPES: Final = (
    "budget.burn_rate_anomaly", "reservation.denial_rate_spike",
    "reservation.expiry_rate_spike", "api_key.auth_failure_rate_spike",
)  # fmt: skip
DETECTOR_SOURCE: Final = "anomaly-detector"
"""``source`` of the detectors' events (the spec's example)."""
EXPIRED_SCAN_MAX: Final = 1_000
"""Most ``reservation.expired`` events counted per tenant per tick."""

_Key = tuple[str, ...]


@dataclasses.dataclass(slots=True)
class _Pending:
    refusals: Refusals
    since_ms: int


class _Window:
    """Refusals of one kind held back by the refusal window, per aggregation key."""

    def __init__(self, event_type: str) -> None:
        self.event_type = event_type
        self.pending: dict[_Key, _Pending] = {}
        self.last: dict[_Key, int] = {}

    def merge(self, found: dict[Any, Refusals], now_ms: int) -> None:
        for key, entry in found.items():
            held = self.pending.get(key)
            if held is None:
                self.pending[key] = _Pending(entry, self.last.get(key, now_ms))
            else:
                held.refusals.count += entry.count
                held.refusals.data = entry.data
                held.refusals.context = entry.context

    def due(self, now_ms: int, window_ms: int, *, everything: bool = False) -> list[EventRecord]:
        out = []
        for key, held in list(self.pending.items()):
            last = self.last.get(key)
            if everything or last is None or now_ms - last >= window_ms:
                out.append(self._record(key, held, now_ms))
                del self.pending[key]
                self.last[key] = now_ms
        for key in [k for k, at in self.last.items() if now_ms - at >= window_ms]:
            if key not in self.pending:
                del self.last[key]
        return out

    def _record(self, key: _Key, held: _Pending, now_ms: int) -> EventRecord:
        entry = held.refusals
        ctx = entry.context or EventContext()
        data = {**entry.data, "count": entry.count, "window_start": iso(held.since_ms),
                "window_end": iso(now_ms)}  # fmt: skip
        return EventRecord(
            event_id=new_event_id(now_ms),
            event_type=self.event_type,
            tenant_id=key[0],
            created_at_ms=now_ms,
            source=SOURCE,
            scope=entry.scope,
            actor_type=ctx.actor_type,
            key_id=ctx.key_id,
            source_ip=ctx.source_ip,
            data=data,
            correlation_id=ctx.request_id,
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
        )


class Monitor:
    """Flushes :class:`Signals` to the store and runs the rate detectors (see the module)."""

    def __init__(
        self,
        store: Store,
        signals: Signals,
        config: DetectorConfig | None = None,
        clock: Clock | None = None,
        health: StoreHealth | None = None,
        latency: LatencyWatch | None = None,
    ) -> None:
        self.store = store
        self.health = health
        self.signals = signals
        self.config = config or DetectorConfig()
        self.clock = clock or store.clock
        self.latency = latency
        """The runtime routes' latency histogram (``None``: latency not judged)."""
        self.profiles: Callable[[], Awaitable[list[Profile]]] | None = None
        """The detector parameter sets subscriptions want besides :attr:`config` (see
        :mod:`runcycles_server.webhooks.profiles`); ``None``: the server's only."""
        config = self.config
        self.latency_rule = LatencyRule(
            config.latency_threshold_ms,
            config.latency_window_seconds * 1000,
            config.latency_percentile,
            config.latency_min_samples,
        )
        self._denied = _Window("reservation.denied")
        self._auth = _Window("api_key.auth_failed")

    async def run(self) -> None:
        """Tick every ``tick_seconds`` forever (a failed tick is logged; the next retries)."""
        while True:
            await asyncio.sleep(self.config.tick_seconds)
            try:
                await self.tick()
            except Exception as exc:  # keep monitoring; the next tick retries
                if self.health is not None and self.health.is_unavailable(exc):
                    self.health.failed(exc, request=False)  # one log line per outage
                else:
                    logger.warning("event monitor tick failed", exc_info=True)

    async def tick(self, *, final: bool = False) -> list[EventRecord]:
        """Flush the tallies, record due refusals, run the detectors; return what it recorded.

        ``final``: the app is stopping: record every pending refusal now.
        """
        now = self.clock()
        tally = self.signals.take()
        await self._add_counts(tally, now)
        window_ms = self.config.refusal_window_seconds * 1000
        self._denied.merge(tally.denied, now)
        self._auth.merge(tally.auth_failed, now)
        kept = [(w, dict(w.pending), dict(w.last)) for w in (self._denied, self._auth)]
        records = self._denied.due(now, window_ms, everything=final)
        records += self._auth.due(now, window_ms, everything=final)
        latency = self._judge_latency(now) if not final else None
        try:
            if not final:
                records += await self._detect(now)
            if latency is not None:
                records.append(latency)
            if records:
                await self.store.record_events(records)
        except Exception:
            for window, pending, last in kept:  # the refusals go into the next tick's events
                window.pending, window.last = pending, last
            if latency is not None:
                self.latency_rule.high = False  # not recorded: the next tick crosses again
            raise
        if self.health is not None:
            await self.health.flush()
        return records

    def _judge_latency(self, now_ms: int) -> EventRecord | None:
        if self.latency is None:
            return None
        rule = self.latency_rule
        was_high = rule.high
        rule.add(now_ms, self.latency.take())
        crossing, value = rule.judge()
        if was_high and not rule.high:
            logger.info("runtime latency back to %.1f ms (threshold %g ms)", value,
                        rule.threshold_ms)  # fmt: skip
        if crossing is None:
            return None
        details = crossing.data["details"]
        if self.health is not None:
            details["process"] = self.health.process
        return EventRecord(
            event_id=new_event_id(now_ms),
            event_type="system.high_latency",
            tenant_id=SYSTEM_TENANT,
            created_at_ms=now_ms,
            source=DETECTOR_SOURCE,
            actor_type="system",
            data=crossing.data,
        )

    async def _add_counts(self, tally: Tally, now_ms: int) -> None:
        store = self.store
        if not tally.counts or not isinstance(store, SignalStore):
            return
        bucket = now_ms // BUCKET_MS * BUCKET_MS
        rows = [(bucket, tenant, name, n) for (tenant, name), n in tally.counts.items()]
        try:
            await store.add_signal_counts(rows, self.config.history_ms + BUCKET_MS)
        except Exception:
            self.signals.restore(Tally(tally.counts, {}, {}))
            raise

    async def _detect(self, now_ms: int) -> list[EventRecord]:
        store = self.store
        if not isinstance(store, SignalStore):
            return []
        config = self.config
        profiles = [Profile(config), *(await self.profiles() if self.profiles else [])]
        history = max(p.config.history_ms for p in profiles)
        counts = await store.signal_counts(now_ms - history)
        default_levels = {t: wanted_level(t, config) for t in ANOMALY_TYPES}
        seen: set[tuple[Any, ...]] = set()
        conditions: list[Condition] = []
        for profile in profiles:
            for condition in await self._conditions(counts, now_ms, profile):
                level = level_of(condition.event_type, condition.data)
                key = (condition.event_type, condition.tenant_id, condition.scope, level)
                if key in seen:
                    continue  # the same level another profile (the server's) already judged
                seen.add(key)
                if level != default_levels[condition.event_type] and level is not None:
                    flag = f"{condition.flag}|{level[0]:g}|{level[1]}"
                    condition = dataclasses.replace(condition, flag=flag)
                conditions.append(condition)
        ttl_ms = int(3 * config.tick_seconds * 1000)
        started = [c for c in conditions if await store.raise_flag(c.flag, ttl_ms)]
        return [self._record(c, now_ms) for c in started]

    async def _conditions(self, counts: Counts, now_ms: int, profile: Profile) -> list[Condition]:
        """The conditions that hold under one profile's parameters, for its tenants."""
        config = profile.config
        tenants = profile.tenants
        edge = (now_ms - config.rate_window_seconds * 1000) // BUCKET_MS * BUCKET_MS
        reserved: dict[str, int] = {}
        for (bucket, tenant, name), n in counts.items():
            if name == RESERVATIONS and bucket >= edge:
                reserved[tenant] = reserved.get(tenant, 0) + n
        expired = {
            tenant: await self._expired(tenant, edge)
            for tenant, n in reserved.items()
            if n >= config.min_samples and (tenants is None or tenant in tenants)
        }
        conditions = rate_spikes(counts, expired, now_ms, config)
        for burn in burn_rates(counts, now_ms, config):
            if tenants is not None and burn.tenant_id not in tenants:
                continue
            budget = await self.store.get_budget(burn.scope, burn.unit)
            remaining = budget.remaining if budget is not None else None
            conditions.append(burn_condition(burn, remaining, config))
        if tenants is None:
            return conditions
        return [c for c in conditions if c.tenant_id in tenants]

    async def _expired(self, tenant_id: str, since_ms: int) -> int:
        count, cursor = 0, None
        while count < EXPIRED_SCAN_MAX:
            query = EventQuery(
                tenant_id, event_type="reservation.expired", from_ms=since_ms, limit=100,
                cursor=cursor,
            )  # fmt: skip
            page = await self.store.list_events(query)
            count += len(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        return count

    @staticmethod
    def _record(condition: Condition, now_ms: int) -> EventRecord:
        return EventRecord(
            event_id=new_event_id(now_ms),
            event_type=condition.event_type,
            tenant_id=condition.tenant_id,
            created_at_ms=now_ms,
            source=DETECTOR_SOURCE,
            scope=condition.scope,
            actor_type="system",
            data=condition.data,
        )


# --------------------------------------------------------------------------------------------
# What the request handlers tally (a few dictionary operations; no store access, no clock)


def note_denial(
    signals: Signals, tenant_id: str, request: ReservationCreateRequest, error: LedgerError
) -> None:
    """Tally a denied live reservation (a refusal that carries a ``deny_detail``)."""
    detail = (error.details or {}).get("deny_detail")
    if not isinstance(detail, dict):
        return
    unit = request.estimate.unit.value
    scope = detail.get("blocked_by_scope") or ledger.derive_scopes(request.subject)[-1]
    data: dict[str, Any] = {
        "scope": scope,
        "unit": unit,
        "reason_code": error.code,
        "requested_amount": request.estimate.amount,
        "action": request.action.model_dump(mode="json", exclude_none=True),
        "subject": request.subject.model_dump(mode="json", exclude_none=True),
        "deny_detail": detail,
    }
    if isinstance(detail.get("budget_remaining"), int):
        data["remaining"] = detail["budget_remaining"]
    if isinstance(detail.get("blocked_by_policy"), str):
        data["policy_id"] = detail["blocked_by_policy"]
    signals.denied(tenant_id, str(scope), unit, error.code, data, current_context())


def note_spend(signals: Signals, tenant_id: str, outcome: Outcome) -> None:
    """Tally what a commit or ``POST /v1/events`` charged (a replay carries no rows)."""
    res = outcome.reservation
    if res is not None and res.committed:
        signals.spent(tenant_id, res.budgeted_scopes, res.unit, res.committed)
    event = outcome.event
    if event is not None:
        signals.spent(tenant_id, event.budgeted_scopes, event.unit, event.charged)
