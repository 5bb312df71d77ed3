"""Prometheus metrics of one server process (``GET /metrics``; off unless asked for).

::

    from runcycles_server.app import create_app

    app = create_app(store, admin_api_key=ADMIN, metrics=True)  # GET /metrics with the admin key

:class:`Metrics` owns a private :class:`~prometheus_client.CollectorRegistry` (never the global
one, so several apps in one process do not collide). Two kinds of series:

* **Counted on the request path**, as cheaply as the library allows: the HTTP layer
  (:class:`runcycles_server.web.ContextMiddleware`, no extra middleware) calls
  :meth:`Metrics.observe` once per request with the matched endpoint, method, status and the
  ``time.perf_counter()`` duration. The label children of each (endpoint, method, status) are
  looked up once and cached (``.labels()`` costs microseconds), together with the outcome
  counter the combination implies (a ``200`` on commit is a commit). Decisions of decide and
  reserve are counted by :meth:`decided` / :meth:`denied` from the handlers' answers.
* **Read at scrape time** (:meth:`Metrics.read_store`, then :meth:`render`): live
  reservations, per-budget utilization (the ``top_scopes`` most used budgets only, plus the
  count of the others: bounded label cardinality whatever the number of budgets), the store's
  health. Nothing on the request path reads the store for metrics.

Labels are bounded: ``route`` is the route *template* (``/v1/reservations/{reservation_id}/commit``,
``unmatched`` for a path no route serves, ``other`` for a route added after the app was built),
``method`` one of the HTTP methods or ``OTHER``,
``status`` a number; decision reasons are the server's own reason codes.

Counters have no ``*_created`` twin series (``prometheus_client.disable_created_metrics()``).
Each process has its own registry: with ``cycles serve --workers N`` a scrape reaches one worker,
whose counters it reports (see ``docs/metrics.md``).

The seam for the webhook dispatcher (which this module does not import):
:meth:`Metrics.record_webhook_delivery` (``cycles_webhook_deliveries_total{outcome}``) and
:meth:`Metrics.add_gauge_callback` (e.g. ``cycles_webhook_queue_depth``). The app exposes the
instance as ``app.state.metrics`` (``None`` when metrics are off).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from runcycles_server.health import StoreHealth
from runcycles_server.stores.base import ActiveCounter, Store

__all__ = [
    "DEFAULT_TOP_SCOPES",
    "LATENCY_BUCKETS_S",
    "SCRAPE_STORE_TIMEOUT_S",
    "WEBHOOK_OUTCOMES",
    "Metrics",
    "StoreSnapshot",
]

logger = logging.getLogger("runcycles_server")

DEFAULT_TOP_SCOPES: Final = 100
"""Budgets (scope, unit) reported by ``cycles_budget_utilization_ratio`` by default."""
MAX_TOP_SCOPES: Final = 10_000
"""Upper bound of ``top_scopes`` (``--metrics-top-scopes``)."""
LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of ``cycles_http_request_duration_seconds``: a reserve takes ~1 ms."""
SCRAPE_STORE_TIMEOUT_S: Final = 5.0
"""Longest a scrape waits for its store reads; past it the store-derived series are left out."""
BUDGET_PAGE: Final = 200
"""Budgets read per store call while ranking utilization at scrape time."""
WEBHOOK_OUTCOMES: Final = ("SUCCESS", "RETRYING", "FAILED", "REFUSED")
"""Outcomes of a webhook delivery attempt, as the governance spec's ``WebhookDelivery.status``:
delivered (2xx), failed with a retry scheduled, failed for good (retries exhausted)."""
UNMATCHED_ROUTE: Final = "unmatched"
"""``route`` label of a request no route serves (404): never the raw path."""
OTHER_ROUTE: Final = "other"
"""``route`` label of a route whose template :class:`Metrics` was not told (see ``templates``)."""

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CACHE_MAX: Final = 4096
"""Most cached label combinations; past it (only with odd methods or statuses) no caching."""
_GAUGE_NAME_RE: Final = re.compile(r"^cycles_[a-z][a-z0-9_]*$")
_REASON_RE: Final = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_DENY: Final = b'"decision":"DENY"'
_WITH_CAPS: Final = b'"decision":"ALLOW_WITH_CAPS"'

# Route templates whose successful answers are counted as outcomes too.
_OUTCOME_ROUTES: Final = {
    ("POST", "/v1/reservations/{reservation_id}/commit"): "commit",
    ("POST", "/v1/reservations/{reservation_id}/release"): "release",
}


@dataclass(slots=True)
class StoreSnapshot:
    """What a scrape read from the store (see :meth:`Metrics.read_store`).

    Attributes:
        ok: whether every read answered in time (else the store-derived series are omitted).
        active_reservations: ACTIVE reservations (``None``: the store cannot count them).
        top: ``(utilization, scope, unit)`` of the most used budgets, most used first
            (empty when per-scope series were not asked for).
        budgets: budgets ranked (every budget not CLOSED), when per-scope series were asked for.
    """

    ok: bool = True
    active_reservations: int | None = None
    top: list[tuple[float, str, str]] = field(default_factory=list)
    budgets: int | None = None


def utilization(allocated: int, remaining: int) -> float:
    """Return the used share of a budget: ``(allocated - remaining) / allocated``.

    ``allocated - remaining`` is what is spent, reserved or owed (debt), so the ratio exceeds
    1 with debt. A budget with nothing allocated is 1.0 (nothing left to reserve) unless it
    somehow has something remaining (0.0).
    """
    if allocated > 0:
        return (allocated - remaining) / allocated
    return 1.0 if remaining <= 0 else 0.0


class _Children:
    """The cached label children one (endpoint, method, status) combination increments."""

    __slots__ = ("duration", "outcome", "requests")

    def __init__(self, requests: Any, duration: Any, outcome: Any) -> None:
        self.requests = requests
        self.duration = duration
        self.outcome = outcome


class Metrics:
    """The metrics of one server process (see the module docstring).

    Args:
        top_scopes: budgets reported by ``cycles_budget_utilization_ratio`` (the most used
            ones; 0 turns the per-budget series, and the scrape's budget reads, off).
        public: serve ``GET /metrics`` without credentials (aggregate series only: the
            per-scope ones still need the admin key).
        templates: endpoint (route handler) to route template, for the ``route`` label.

    Raises:
        ValueError: ``top_scopes`` outside 0 to :data:`MAX_TOP_SCOPES`.
    """

    def __init__(
        self,
        *,
        top_scopes: int = DEFAULT_TOP_SCOPES,
        public: bool = False,
        templates: dict[Any, str] | None = None,
    ) -> None:
        if not 0 <= top_scopes <= MAX_TOP_SCOPES:
            raise ValueError(
                f"top_scopes must be from 0 to {MAX_TOP_SCOPES}, not {top_scopes}; it bounds "
                "the budgets reported per scrape"
            )
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created twins
        self.top_scopes = top_scopes
        self.public = public
        self.templates: dict[Any, str] = dict(templates or {})
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "cycles_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=reg,
        )
        self.duration = Histogram(
            "cycles_http_request_duration_seconds",
            "Time from a request reaching the app to its answer being handed to the server "
            "(seconds), by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.decisions = Counter(
            "cycles_decisions",
            "Decisions answered by POST /v1/decide (endpoint=decide) and POST /v1/reservations "
            "(endpoint=reserve; a live denial is its 409): decision ALLOW, ALLOW_WITH_CAPS or "
            "DENY, reason the reason code of a DENY (none otherwise). Idempotent replays count.",
            ["endpoint", "decision", "reason"],
            registry=reg,
        )
        self.commits = Counter(
            "cycles_commits",
            "Successful commit answers (200; idempotent replays count).",
            registry=reg,
        )
        self.releases = Counter(
            "cycles_releases",
            "Successful release answers (200; idempotent replays count).",
            registry=reg,
        )
        self.expiries = Counter(
            "cycles_expiries",
            "Reservations this process's expiry sweep expired (their budget returned).",
            registry=reg,
        )
        self.webhook_deliveries = Counter(
            "cycles_webhook_deliveries",
            "Webhook delivery attempts by outcome: SUCCESS (2xx), RETRYING (failed, retry "
            "scheduled), FAILED (retries exhausted).",
            ["outcome"],
            registry=reg,
        )
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)  # every series exists from the start
        self._outcomes = {"commit": self.commits, "release": self.releases}
        self._children: dict[tuple[Any, str, int], _Children] = {}
        self._decisions: dict[tuple[str, str, str], Any] = {
            (endpoint, decision, "none"): self.decisions.labels(endpoint, decision, "none")
            for endpoint in ("decide", "reserve")
            for decision in ("ALLOW", "ALLOW_WITH_CAPS")
        }  # the allow series exist from the start (DENY ones appear with their reasons)
        self._scrape = _ScrapeCollector(self)
        reg.register(self._scrape)
        ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_start_time_seconds...

    # -- request path ------------------------------------------------------------------------

    def observe(self, endpoint: Any, method: str, status: int, seconds: float) -> None:
        """Count one answered request (``endpoint``: the route handler, ``None``: unmatched)."""
        children = self._children.get((endpoint, method, status))
        if children is None:
            children = self._new_children(endpoint, method, status)
        children.requests.inc()
        children.duration.observe(seconds)
        if children.outcome is not None:
            children.outcome.inc()

    def _new_children(self, endpoint: Any, method: str, status: int) -> _Children:
        # (a route added to the app after it was built has no known template: "other")
        route = UNMATCHED_ROUTE if endpoint is None else self.templates.get(endpoint, OTHER_ROUTE)
        method_label = method if method in _METHODS else "OTHER"
        kind = _OUTCOME_ROUTES.get((method_label, route)) if status == 200 else None
        children = _Children(
            self.requests.labels(route, method_label, str(status)),
            self.duration.labels(route, method_label),
            self._outcomes[kind] if kind is not None else None,
        )
        if len(self._children) < _CACHE_MAX:
            self._children[(endpoint, method, status)] = children
        return children

    def decided(self, endpoint: str, body: bytes) -> None:
        """Count the decision of a 200 answer of decide or reserve (its exact JSON body)."""
        if _WITH_CAPS in body:
            self._decision(endpoint, "ALLOW_WITH_CAPS", "none")
        elif _DENY in body:
            reason: object = None
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                reason = orjson.loads(body).get("reason_code")
            self.denied(endpoint, reason)
        else:
            self._decision(endpoint, "ALLOW", "none")

    def denied(self, endpoint: str, reason: object) -> None:
        """Count a DENY with its reason code (anything but a reason code counts as ``OTHER``)."""
        code = reason if isinstance(reason, str) and _REASON_RE.match(reason) else "OTHER"
        self._decision(endpoint, "DENY", code)

    def _decision(self, endpoint: str, decision: str, reason: str) -> None:
        key = (endpoint, decision, reason)
        child = self._decisions.get(key)
        if child is None:
            child = self.decisions.labels(endpoint, decision, reason)
            if len(self._decisions) < _CACHE_MAX:
                self._decisions[key] = child
        child.inc()

    def expired(self, count: int) -> None:
        """Count reservations the expiry sweep expired."""
        if count:
            self.expiries.inc(count)

    # -- seam for the webhook dispatcher -----------------------------------------------------

    def record_webhook_delivery(self, outcome: str) -> None:
        """Count one webhook delivery attempt (``outcome`` one of :data:`WEBHOOK_OUTCOMES`).

        Raises:
            ValueError: an unknown outcome (the label set is closed).
        """
        if outcome not in WEBHOOK_OUTCOMES:
            raise ValueError(
                f"webhook delivery outcome must be one of {', '.join(WEBHOOK_OUTCOMES)}, "
                f"not {outcome!r}"
            )
        self.webhook_deliveries.labels(outcome).inc()

    def add_gauge_callback(
        self, name: str, documentation: str, callback: Callable[[], float]
    ) -> None:
        """Report ``callback()`` as the gauge ``name`` at every scrape (e.g. a queue depth).

        The callback runs on the event loop during the scrape: it must be quick and must not
        block. One that raises is logged and its gauge left out of that scrape.

        Raises:
            ValueError: a name without the ``cycles_`` prefix, not ``[a-z0-9_]``, or taken.
        """
        if not _GAUGE_NAME_RE.match(name):
            raise ValueError(
                f"gauge name {name!r} must start with cycles_ and hold only a-z, 0-9 and _"
            )
        if name in self._scrape.callbacks or name in self._scrape.own_names:
            raise ValueError(f"gauge {name} is already registered")
        self._scrape.callbacks[name] = (documentation, callback)

    # -- scrape ------------------------------------------------------------------------------

    async def read_store(
        self,
        store: Store,
        *,
        scopes: bool,
        timeout_s: float = SCRAPE_STORE_TIMEOUT_S,
    ) -> StoreSnapshot:
        """Read the store-derived gauges (``scopes``: rank budget utilization too).

        A store that fails or does not answer within ``timeout_s`` yields ``ok=False`` (the
        scrape still reports every in-process series).
        """
        try:
            return await asyncio.wait_for(self._read(store, scopes), timeout_s)
        except Exception as exc:  # an unavailable store must not fail the scrape
            logger.warning("metrics: store reads failed (%s: %s)", type(exc).__name__, exc)
            return StoreSnapshot(ok=False)

    async def _read(self, store: Store, scopes: bool) -> StoreSnapshot:
        snapshot = StoreSnapshot()
        if isinstance(store, ActiveCounter):
            snapshot.active_reservations = await store.count_active_reservations()
        if scopes and self.top_scopes:
            snapshot.top, snapshot.budgets = await self._rank_budgets(store)
        return snapshot

    async def _rank_budgets(self, store: Store) -> tuple[list[tuple[float, str, str]], int]:
        """Return the ``top_scopes`` most used budgets (not CLOSED) and how many were ranked."""
        heap: list[tuple[float, str, str]] = []
        count = 0
        cursor: str | None = None
        while True:
            page = await store.list_budgets(
                None, scope_prefix=None, unit=None, status=None, limit=BUDGET_PAGE, cursor=cursor
            )
            for row in page.items:
                if row.status == "CLOSED":
                    continue
                count += 1
                entry = (utilization(row.allocated, row.remaining), row.scope, row.unit)
                if len(heap) < self.top_scopes:
                    heapq.heappush(heap, entry)
                elif entry > heap[0]:
                    heapq.heapreplace(heap, entry)
            cursor = page.next_cursor
            if cursor is None:
                break
            await asyncio.sleep(0)  # SQLite reads do not yield: let requests run between pages
        return sorted(heap, reverse=True), count

    def render(self, snapshot: StoreSnapshot, health: StoreHealth) -> bytes:
        """Return the Prometheus text exposition of every series, with ``snapshot``'s gauges.

        Synchronous from setting the snapshot to rendering: concurrent scrapes cannot mix.
        """
        self._scrape.snapshot = snapshot
        self._scrape.health = health
        try:
            return generate_latest(self.registry)
        finally:
            self._scrape.snapshot = None


class _ScrapeCollector(Collector):
    """Yields the scrape-time series from the snapshot :meth:`Metrics.render` hands it."""

    own_names: Final = frozenset(
        {
            "cycles_reservations_active",
            "cycles_budgets",
            "cycles_budget_utilization_ratio",
            "cycles_budget_utilization_omitted",
            "cycles_store_up",
            "cycles_store_read_ok",
            "cycles_store_outages",
            "cycles_store_unavailable_requests",
            "cycles_store_background_failures",
        }
    )

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.snapshot: StoreSnapshot | None = None
        self.health: StoreHealth | None = None
        self.callbacks: dict[str, tuple[str, Callable[[], float]]] = {}

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe ahead (the families depend on the scrape)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the scrape-time families."""
        snapshot, health = self.snapshot, self.health
        if health is not None:
            yield _gauge(
                "cycles_store_up",
                "1 unless this process saw the store unavailable and has not seen it answer since.",
                1 if health.down_since is None else 0,
            )
            yield CounterMetricFamily(
                "cycles_store_outages",
                "Store outages this process saw (see cycles_store_unavailable_requests_total).",
                value=health.outages,
            )
            yield CounterMetricFamily(
                "cycles_store_unavailable_requests",
                "Requests answered 503 with Retry-After because the store was unavailable.",
                value=health.total_failed_requests,
            )
            yield CounterMetricFamily(
                "cycles_store_background_failures",
                "Expiry sweeps and retention purges that failed on an unavailable store.",
                value=health.background_failures,
            )
        if snapshot is not None:
            yield _gauge(
                "cycles_store_read_ok",
                "1 if this scrape's store reads (live reservations, budgets) answered in time; "
                "0 leaves those series out.",
                1 if snapshot.ok else 0,
            )
            if snapshot.active_reservations is not None:
                yield _gauge(
                    "cycles_reservations_active",
                    "Reservations ACTIVE now, all tenants (read from the store at scrape time).",
                    snapshot.active_reservations,
                )
            if snapshot.budgets is not None:
                yield from self._budget_families(snapshot)
        yield from self._callback_families()

    def _budget_families(self, snapshot: StoreSnapshot) -> Iterator[Metric]:
        assert snapshot.budgets is not None
        n = self.metrics.top_scopes
        yield _gauge(
            "cycles_budgets",
            "Budgets (scope, unit) not CLOSED, all tenants (read at scrape time).",
            snapshot.budgets,
        )
        ratio = GaugeMetricFamily(
            "cycles_budget_utilization_ratio",
            f"(allocated - remaining) / allocated of the {n} most used budgets only (bounded "
            "cardinality; > 1 with debt). See cycles_budget_utilization_omitted.",
            labels=["scope", "unit"],
        )
        for value, scope, unit in snapshot.top:
            ratio.add_metric([scope, unit], value)
        yield ratio
        yield _gauge(
            "cycles_budget_utilization_omitted",
            "Budgets left out of cycles_budget_utilization_ratio (beyond the top N).",
            snapshot.budgets - len(snapshot.top),
        )

    def _callback_families(self) -> Iterator[Metric]:
        for name, (documentation, callback) in list(self.callbacks.items()):
            try:
                value = float(callback())
            except Exception:
                logger.exception("metrics: gauge callback %s failed", name)
                continue
            yield _gauge(name, documentation, value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
