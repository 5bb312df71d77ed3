"""``GET /v1/admin/overview``: the operational dashboard in one request.

The answer is the spec's ``AdminOverviewResponse`` (governance admin spec,
``getAdminOverview``).

Aggregated server-side from the store's own listings, as the spec describes: every tenant and
every budget is paged through for exact counts (``tenant_counts``, ``budget_counts`` with
``by_unit``, the ten largest ``over_limit_scopes`` and ``debt_scopes`` by debt), and the events
of the last hour (``event_window_seconds``: 3600) are counted per category, with the ten most
recent ``reservation.denied`` and ``reservation.expired`` events and the denials per
``reason_code`` (``recent_denials_by_reason``; an aggregated ``reservation.denied`` counts
``data.count`` refusals). ``access_control_stats`` counts the policies (of every tenant, any
status) with an allow list and with a deny list; ``quota_health`` is not served.

Webhook counts come from the store's webhook subscriptions (a custom store may answer them
itself by implementing :class:`WebhookOverview`; one that keeps no webhooks answers zero):
``with_failures`` and ``failing_webhooks`` are the subscriptions whose last deliveries failed
(``consecutive_failures`` > 0), most failures first.

Cost: one pass over tenants and budgets, and over the hour's events (at most
:data:`EVENT_SCAN_MAX` per tenant; past that ``event_counts`` are a lower bound). For large
deployments, cache the answer for a few seconds in front of the server.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles_server.events import event_body
from runcycles_server.events.records import EventRecord
from runcycles_server.events.signals import SYSTEM_TENANT
from runcycles_server.governance.timestamps import iso
from runcycles_server.ledger import BudgetRow, LedgerError, TenantRow
from runcycles_server.stores.base import EventQuery, Store
from runcycles_server.web import Authenticator, json_response
from runcycles_server.webhooks.backends import storage_for
from runcycles_server.webhooks.models import SubscriptionRow
from runcycles_server.webhooks.storage import WebhookTxn

EVENT_WINDOW_S: Final = 3600
"""The spec's window of the recent-event summaries (an hour)."""
TOP: Final = 10
EVENT_SCAN_MAX: Final = 10_000
"""Most events of one tenant the overview reads (the hour's)."""
_PAGE: Final = 100


@runtime_checkable
class WebhookOverview(Protocol):
    """Optional store capability: the webhook part of the overview."""

    async def webhook_overview(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """The spec's ``webhook_counts`` and ``failing_webhooks`` (most failures first)."""


async def _webhook_health(store: Store) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """``webhook_counts`` and ``failing_webhooks`` from the store's subscriptions."""
    try:
        storage = storage_for(store)
    except LedgerError:  # a custom store without webhooks
        return {"total": 0, "active": 0, "disabled": 0, "with_failures": 0}, []

    async def read(t: WebhookTxn) -> list[SubscriptionRow]:
        return await t.subs()

    rows = await storage.read(read)
    failing = sorted(
        (r for r in rows if r.consecutive_failures > 0),
        key=lambda r: (-r.consecutive_failures, r.subscription_id),
    )
    counts = {
        "total": len(rows),
        "active": sum(1 for r in rows if r.status == "ACTIVE"),
        "disabled": sum(1 for r in rows if r.status == "DISABLED"),
        "with_failures": len(failing),
    }
    top: list[dict[str, Any]] = []
    for row in failing[:TOP]:
        item: dict[str, Any] = {"subscription_id": row.subscription_id, "url": row.url,
                                "consecutive_failures": row.consecutive_failures}  # fmt: skip
        if row.last_failure_at_ms is not None:
            item["last_failure_at"] = iso(row.last_failure_at_ms)
        top.append(item)
    return counts, top


async def _tenants(store: Store) -> list[TenantRow]:
    found: list[TenantRow] = []
    cursor = None
    while True:
        page = await store.list_tenants(None, _PAGE, cursor)
        found += page.items
        cursor = page.next_cursor
        if cursor is None:
            return found


async def _budgets(store: Store) -> list[BudgetRow]:
    found: list[BudgetRow] = []
    cursor = None
    while True:
        page = await store.list_budgets(
            None, scope_prefix=None, unit=None, status=None, limit=_PAGE, cursor=cursor
        )
        found += page.items
        cursor = page.next_cursor
        if cursor is None:
            return found


async def _events(store: Store, tenant_id: str, since_ms: int) -> list[EventRecord]:
    found: list[EventRecord] = []
    cursor = None
    while len(found) < EVENT_SCAN_MAX:
        page = await store.list_events(
            EventQuery(tenant_id, from_ms=since_ms, limit=_PAGE, cursor=cursor)
        )
        found += page.items
        cursor = page.next_cursor
        if cursor is None:
            break
    return found


def _over(b: BudgetRow) -> dict[str, Any]:
    return {
        "scope": b.scope,
        "unit": b.unit,
        "allocated": b.allocated,
        "remaining": b.remaining,
        "debt": b.debt,
    }


def _debt(b: BudgetRow) -> dict[str, Any]:
    return {"scope": b.scope, "unit": b.unit, "debt": b.debt, "overdraft_limit": b.overdraft_limit}


async def overview(store: Store) -> dict[str, Any]:
    """Compute the ``AdminOverviewResponse`` body."""
    now = store.clock()
    tenants = await _tenants(store)
    tenant_status = Counter(t.status for t in tenants)
    budgets = await _budgets(store)
    budget_status = Counter(b.status for b in budgets)
    over = sorted((b for b in budgets if b.is_over_limit), key=lambda b: (-b.debt, b.scope))
    debt = sorted((b for b in budgets if b.debt > 0), key=lambda b: (-b.debt, b.scope))
    since = now - EVENT_WINDOW_S * 1000
    recent: list[EventRecord] = []
    for tenant_id in [*(t.tenant_id for t in tenants), SYSTEM_TENANT]:
        recent += await _events(store, tenant_id, since)
    recent.sort(key=lambda e: (e.created_at_ms, e.event_id), reverse=True)
    denials = [e for e in recent if e.event_type == "reservation.denied"]
    expiries = [e for e in recent if e.event_type == "reservation.expired"]
    by_reason: Counter[str] = Counter()
    for e in denials:
        count = e.data.get("count", 1)
        reason = str(e.data.get("reason_code", "UNKNOWN"))
        by_reason[reason] += count if isinstance(count, int) else 1
    allow_lists = deny_lists = 0
    for tenant in tenants:
        if tenant.policy_count == 0:
            continue
        for policy in await store.list_policies(tenant.tenant_id):
            allow_lists += bool(policy.allowed_action_kinds)
            deny_lists += bool(policy.denied_action_kinds)
    if isinstance(store, WebhookOverview):
        webhook_counts, failing = await store.webhook_overview()
    else:
        webhook_counts, failing = await _webhook_health(store)
    return {
        "as_of": iso(now),
        "event_window_seconds": EVENT_WINDOW_S,
        "tenant_counts": {
            "total": len(tenants),
            "active": tenant_status["ACTIVE"],
            "suspended": tenant_status["SUSPENDED"],
            "closed": tenant_status["CLOSED"],
            "in_observe_mode": sum(1 for t in tenants if t.observe_mode not in (None, "ENFORCE")),
        },
        "budget_counts": {
            "total": len(budgets),
            "active": budget_status["ACTIVE"],
            "frozen": budget_status["FROZEN"],
            "closed": budget_status["CLOSED"],
            "over_limit": sum(1 for b in budgets if b.is_over_limit),
            "with_debt": sum(1 for b in budgets if b.debt > 0),
            "by_unit": dict(sorted(Counter(b.unit for b in budgets).items())),
        },
        "over_limit_scopes": [_over(b) for b in over[:TOP]],
        "debt_scopes": [_debt(b) for b in debt[:TOP]],
        "webhook_counts": webhook_counts,
        "failing_webhooks": failing[:TOP],
        "event_counts": {
            "total_recent": len(recent),
            "by_category": dict(sorted(Counter(e.category for e in recent).items())),
        },
        "recent_denials": [event_body(e) for e in denials[:TOP]],
        "recent_expiries": [event_body(e) for e in expiries[:TOP]],
        "recent_denials_by_reason": dict(sorted(by_reason.items())),
        "access_control_stats": {
            "policies_with_allow_list": allow_lists,
            "policies_with_deny_list": deny_lists,
        },
    }


class OverviewApi:
    """``GET /v1/admin/overview`` (admin key)."""

    def __init__(self, store: Store, auth: Authenticator) -> None:
        self.store = store
        self.auth = auth

    def routes(self) -> list[BaseRoute]:
        """Return the overview route."""
        return [Route("/v1/admin/overview", self.get_overview, methods=["GET"])]

    async def get_overview(self, request: Request) -> Response:
        """``GET /v1/admin/overview``."""
        self.auth.admin(request)
        return json_response(await overview(self.store))
