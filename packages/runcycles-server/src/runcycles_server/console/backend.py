"""The console's ways into the server: its JSON API, and the webhook service.

Most pages and actions are calls to the public API (``/v1/...``) made with the session's key
through :class:`httpx.ASGITransport` straight into this app (:class:`Backend`): no socket,
but the same routing, authentication, validation, tenant isolation, events and audit log as
any client gets, so the console cannot do anything its key could not do with ``curl``.

Webhooks are read and acted on through the webhook service itself (:class:`WebhookDesk`),
not through HTTP calls to the server's own routes: the page needs each subscription's health
and its deliveries together, and the actions (:class:`~runcycles_server.webhooks.actions.
WebhookActions`) are the very ones the HTTP routes run, with the same checks and audit
entry. The desk is bound to the session's tenant (``None`` for the admin key): another
tenant's subscription is "not found", exactly as the API answers a tenant key.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp

from runcycles_server.console.sessions import KeyKind
from runcycles_server.events import EventRecord
from runcycles_server.ledger import EventRow, LedgerError
from runcycles_server.stores.base import DebitReader, EventQuery, Page, Store
from runcycles_server.web import request_ids
from runcycles_server.webhooks.actions import Replay, WebhookActions
from runcycles_server.webhooks.dispatch import Dispatcher
from runcycles_server.webhooks.models import DeliveryRow, SubscriptionRow
from runcycles_server.webhooks.sender import Attempt
from runcycles_server.webhooks.storage import DeliveryQuery

T = TypeVar("T")
INTERNAL_BASE_URL: Final = "http://console.internal"
CALL_TIMEOUT_S: Final = 30.0
DISABLED_EVENTS: Final = ("webhook.disabled", "webhook.disabled_via_tenant_cascade")


@dataclass
class ApiError(Exception):
    """An API call the server refused: its status, error code and message."""

    status: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def key_headers(kind: KeyKind, key: str) -> dict[str, str]:
    """The header that carries a key of this kind."""
    return {"X-Admin-API-Key": key} if kind == "admin" else {"X-Cycles-API-Key": key}


class Backend:
    """Calls into one ASGI app with one key."""

    def __init__(
        self,
        app: ASGIApp,
        kind: KeyKind,
        key: str,
        *,
        client: tuple[str, int] = ("127.0.0.1", 0),
        trace_id: str | None = None,
    ) -> None:
        headers = key_headers(kind, key)
        if trace_id is not None:
            headers["X-Cycles-Trace-Id"] = trace_id
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=client),
            base_url=INTERNAL_BASE_URL,
            headers=headers,
            timeout=CALL_TIMEOUT_S,
        )

    @classmethod
    def of(cls, request: Request, kind: KeyKind, key: str) -> Backend:
        """Calls on behalf of a console request: from the operator's address, in its trace.

        Events and audit entries of what the calls change carry the operator's address as
        ``source_ip`` and the console request's trace id, so one page or action is one trace.
        """
        address = (request.client.host, request.client.port) if request.client else None
        return cls(
            request.app,
            kind,
            key,
            client=address or ("127.0.0.1", 0),
            trace_id=request_ids(request)[1],
        )

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """``GET path`` with the non-empty ``params``; the JSON body, or :class:`ApiError`."""
        clean = {k: v for k, v in (params or {}).items() if v not in ("", None)}
        return _result(await self._client.get(path, params=clean))

    async def post(
        self, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """``POST path`` with a JSON body; the JSON answer, or :class:`ApiError`."""
        return _result(await self._client.post(path, json=body or {}, params=params))


def _result(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        if not isinstance(body, dict):
            body = {}
        raise ApiError(
            response.status_code,
            str(body.get("error", "ERROR")),
            str(body.get("message", response.reason_phrase)),
        )
    return body if isinstance(body, dict) else {"items": body}


async def direct_debits(
    request: Request, tenant_id: str, from_ms: int, to_ms: int, limit: int
) -> tuple[list[EventRow], bool]:
    """The tenant's ``POST /v1/events`` debits in the window, read from the store.

    No API path lists them (the spend chart is their only reader). Answers at most ``limit``
    and whether there were more; none from a store that does not keep them readable.
    """
    store = request.app.state.store
    if not isinstance(store, DebitReader):
        return [], False
    rows = await store.list_debits(tenant_id, from_ms, to_ms, limit + 1)
    return rows[:limit], len(rows) > limit


class WebhookDesk:
    """The webhook service as one console session may use it (see the module docstring).

    Every failure is an :class:`ApiError` with the status and code the API would answer.
    """

    def __init__(self, store: Store, dispatcher: Dispatcher, tenant_id: str | None) -> None:
        self.store = store
        self.actions = WebhookActions(store, dispatcher)
        self.tenant_id = tenant_id
        """The only tenant this desk sees (``None``: every tenant, the admin key)."""

    @classmethod
    def of(cls, request: Request, tenant_id: str | None) -> WebhookDesk:
        """The desk of this app (its store and webhook dispatcher) for one session."""
        state = request.app.state
        return cls(state.store, state.webhook_dispatcher, tenant_id)

    async def subscriptions(
        self, tenant_id: str | None = None, status: str | None = None
    ) -> list[SubscriptionRow]:
        """The subscriptions visible to the session, by tenant then id (filters optional)."""
        owner = self.tenant_id if self.tenant_id is not None else tenant_id
        rows = await _api(self.actions.subs.all())
        return sorted(
            (
                r
                for r in rows
                if (owner is None or r.tenant_id == owner)
                and (status is None or r.status == status)
            ),
            key=lambda r: (r.tenant_id, r.subscription_id),
        )

    async def get(self, subscription_id: str) -> SubscriptionRow:
        """One subscription (another tenant's is not found)."""
        return await _api(self.actions.subs.get(subscription_id, self.tenant_id))

    async def deliveries(
        self, subscription_id: str, status: str | None, cursor: str | None, limit: int = 50
    ) -> Page[DeliveryRow]:
        """A page of the subscription's deliveries, newest first."""
        row = await self.get(subscription_id)
        query = DeliveryQuery(row.subscription_id, status=status, limit=limit, cursor=cursor)
        return await _api(self.actions.dispatcher.storage.list_deliveries(query))

    async def disable_reason(self, row: SubscriptionRow) -> str | None:
        """Why a DISABLED subscription was disabled (its latest ``webhook.disabled*`` event)."""
        if row.status != "DISABLED":
            return None
        for event_type in DISABLED_EVENTS:
            query = EventQuery(row.tenant_id, event_type=event_type, limit=100)
            page: Page[EventRecord] = await _api(self.store.list_events(query))
            for event in page.items:
                if event.data.get("subscription_id") == row.subscription_id:
                    if event_type != "webhook.disabled":
                        return "tenant_closed"
                    return str(event.data.get("disable_reason") or "unknown")
        return "unknown"

    async def test(self, subscription_id: str) -> tuple[DeliveryRow, Attempt]:
        """Send a test event now (audited)."""
        row = await self.get(subscription_id)
        return await _api(self.actions.test(row))

    async def replay(
        self, subscription_id: str, from_ms: int, to_ms: int, max_events: int, reason: str
    ) -> Replay:
        """Queue the window's events again (audited, with the operator's reason)."""
        row = await self.get(subscription_id)
        return await _api(self.actions.replay(row, from_ms, to_ms, None, max_events, reason))

    async def pause(self, subscription_id: str, reason: str) -> SubscriptionRow:
        """Pause deliveries (audited)."""
        row = await self.get(subscription_id)
        return await _api(self.actions.set_status(row, "PAUSED", reason))

    async def resume(self, subscription_id: str, reason: str) -> SubscriptionRow:
        """Resume (or re-enable a DISABLED subscription; audited)."""
        row = await self.get(subscription_id)
        return await _api(self.actions.set_status(row, "ACTIVE", reason))


async def _api(call: Awaitable[T]) -> T:
    """Await a service call, turning its refusal into the :class:`ApiError` the API answers."""
    try:
        return await call
    except LedgerError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
