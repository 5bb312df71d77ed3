"""Cheap in-process tallies of what the hot path sees, for aggregated events and rate detectors.

A refusal (a denied reservation, a failed authentication) writes nothing to the store on the
request path: a runaway agent denied in a tight loop must not turn every denial into a store
write. Instead the request adds to :class:`Signals`, a few dictionary increments in this
process, and the monitor (:mod:`runcycles_server.monitor`) takes the tallies every tick and

* records **one** ``reservation.denied`` per ``(tenant, scope, unit, reason_code)`` and one
  ``api_key.auth_failed`` per ``(tenant, key, failure_reason)`` at most once per refusal window
  (``DetectorConfig.refusal_window_seconds``, default 60 s) per process: the first refusal of a
  key is recorded at the next tick, later ones at most once a window, each event carrying in
  ``data.count`` how many refusals it stands for (with ``first_at`` and ``last_at``). With
  several processes each records its own events, so the counts of all the events add up to
  the number of refusals;
* adds the counts of the tick (reservations, denials, authentications, failures, spend per
  budget) to the store's per-minute counters, one write per tick per process, which the rate
  detectors read: counts from all processes add up there too.

Spend is counted when a commit (or ``POST /v1/events``) succeeds, on every budgeted scope.
Nothing here reads the clock on the hot path; counts are attributed to the minute of the tick
that takes them (off by at most one tick interval).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from runcycles_server.events.context import EventContext

SYSTEM_TENANT: Final = "__system__"
"""Tenant of the auth failures of keys that do not exist (the spec's system-wide tenant)."""

RESERVATIONS: Final = "reservations"
DENIED: Final = "denied"
AUTH_OK: Final = "auth"
AUTH_FAILED: Final = "auth_failed"
SPEND: Final = "spend"
"""Counter names (``spend`` counters are named ``spend|<scope>|<unit>``)."""


def spend_name(scope: str, unit: str) -> str:
    """The counter name of the spend of one budget."""
    return f"{SPEND}|{scope}|{unit}"


def parse_spend_name(name: str) -> tuple[str, str] | None:
    """``(scope, unit)`` of a spend counter name, else ``None``."""
    kind, _, rest = name.partition("|")
    if kind != SPEND:
        return None
    scope, _, unit = rest.rpartition("|")
    return (scope, unit) if scope and unit else None


@dataclass(slots=True)
class Refusals:
    """Refusals of one aggregation key since its last event (``count`` of them)."""

    count: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    """The payload of the last one (what the event carries besides the count)."""
    context: EventContext | None = None
    """The request context of the last one."""
    scope: str | None = None


@dataclass(slots=True)
class Tally:
    """What :meth:`Signals.take` hands over: counts and refusals since the last take."""

    counts: dict[tuple[str, str], int]
    """``(tenant_id, counter name) -> n``."""
    denied: dict[tuple[str, str, str, str], Refusals]
    """``(tenant_id, scope, unit, reason_code) -> refusals``."""
    auth_failed: dict[tuple[str, str, str], Refusals]
    """``(tenant_id, key_id or "", failure_reason) -> refusals``."""


class Signals:
    """The tallies of one process (event-loop confined: no locks)."""

    __slots__ = ("_auth_failed", "_counts", "_denied")

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._denied: dict[tuple[str, str, str, str], Refusals] = {}
        self._auth_failed: dict[tuple[str, str, str], Refusals] = {}

    def _add(self, tenant_id: str, name: str, n: int = 1) -> None:
        key = (tenant_id, name)
        counts = self._counts
        counts[key] = counts.get(key, 0) + n

    # The three tallies of every request are _add written out (they run per request).

    def reservation(self, tenant_id: str) -> None:
        """A live reservation was asked for (admitted or not)."""
        key = (tenant_id, RESERVATIONS)
        self._counts[key] = self._counts.get(key, 0) + 1

    def authenticated(self, tenant_id: str) -> None:
        """A tenant key authenticated."""
        key = (tenant_id, AUTH_OK)
        self._counts[key] = self._counts.get(key, 0) + 1

    def spent(self, tenant_id: str, scopes: Iterable[str], unit: str, amount: int) -> None:
        """``amount`` was charged to every budget at ``scopes``."""
        if amount > 0:
            counts = self._counts
            for scope in scopes:
                key = (tenant_id, f"{SPEND}|{scope}|{unit}")  # spend_name
                counts[key] = counts.get(key, 0) + amount

    def denied(
        self,
        tenant_id: str,
        scope: str,
        unit: str,
        reason_code: str,
        data: dict[str, Any],
        context: EventContext | None,
    ) -> None:
        """A live reservation was denied (``data``: the ``EventDataReservationDenied``)."""
        self._add(tenant_id, DENIED)
        key = (tenant_id, scope, unit, reason_code)
        entry = self._denied.get(key)
        if entry is None:
            entry = self._denied[key] = Refusals(scope=scope)
        entry.count += 1
        entry.data = data
        entry.context = context

    def auth_failed(
        self,
        tenant_id: str | None,
        key_id: str | None,
        reason: str,
        data: dict[str, Any],
        context: EventContext | None,
    ) -> None:
        """A tenant key was refused (``tenant_id`` ``None``: no such key)."""
        tenant = tenant_id or SYSTEM_TENANT
        self._add(tenant, AUTH_FAILED)
        key = (tenant, key_id or "", reason)
        entry = self._auth_failed.get(key)
        if entry is None:
            entry = self._auth_failed[key] = Refusals(scope=f"tenant:{tenant}")
        entry.count += 1
        entry.data = data
        entry.context = context

    def take(self) -> Tally:
        """Hand over everything tallied since the last call, and start afresh."""
        tally = Tally(self._counts, self._denied, self._auth_failed)
        self._counts, self._denied, self._auth_failed = {}, {}, {}
        return tally

    def restore(self, tally: Tally) -> None:
        """Put a tally back (its write failed): the next take includes it again."""
        for (tenant, name), n in tally.counts.items():
            self._add(tenant, name, n)
        for dkey, entry in tally.denied.items():
            mine = self._denied.setdefault(dkey, Refusals(scope=entry.scope))
            mine.count += entry.count
            mine.data = mine.data or entry.data
            mine.context = mine.context or entry.context
        for akey, entry in tally.auth_failed.items():
            mine = self._auth_failed.setdefault(akey, Refusals(scope=entry.scope))
            mine.count += entry.count
            mine.data = mine.data or entry.data
            mine.context = mine.context or entry.context
