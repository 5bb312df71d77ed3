"""The HTTP routes of webhook subscriptions (``cycles-governance-admin-v0.1.25.yaml``).

Admin (``X-Admin-API-Key``): ``POST/GET /v1/admin/webhooks`` (``?tenant_id=`` scopes a new
subscription to a tenant; without it the subscription is system-wide), ``GET/PATCH/DELETE
/v1/admin/webhooks/{id}``, ``POST .../{id}/test``, ``GET .../{id}/deliveries``, ``POST
.../{id}/replay``, ``POST /v1/admin/webhooks/bulk-action``, ``GET/PUT
/v1/admin/config/webhook-security``.

Tenant self-service (a tenant key with ``webhooks:read`` / ``webhooks:write``; the admin key
also works and acts on any tenant's): ``POST/GET /v1/webhooks``, ``GET/PATCH/DELETE
/v1/webhooks/{id}``, ``POST .../{id}/test``, ``GET .../{id}/deliveries``. A tenant key only
ever sees its own tenant's subscriptions (another tenant's answer 404) and may select only
budget, reservation and tenant events.

Extension: ``POST .../{id}/rotate-secret`` (both planes) puts a new secret first and keeps the
previous one signing for ``previous_secret_ttl_s`` (default 24 h); it answers the new secret
once, like the create.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles_server.bulk import ADMIN_TENANT, BulkReplay, check_matches, dry_run, envelope
from runcycles_server.events import EVENT_TYPES, current_context
from runcycles_server.events.context import set_actor
from runcycles_server.governance.timestamps import ms_from_datetime
from runcycles_server.ledger import LedgerError
from runcycles_server.query import Param, check_path, check_query
from runcycles_server.stores.base import Store, new_id
from runcycles_server.stores.sqlite import decode_cursor, encode_cursor
from runcycles_server.web import Authenticator, Principal, json_response, parse_body, query_int
from runcycles_server.webhooks.actions import WebhookActions
from runcycles_server.webhooks.dispatch import Dispatcher
from runcycles_server.webhooks.models import (
    DELIVERY_STATUSES,
    STATUSES,
    SYSTEM_TENANT,
    BulkActionRequest,
    CreateRequest,
    ReplayRequest,
    RotateRequest,
    SecurityConfig,
    SubscriptionRow,
    UpdateRequest,
    delivery_body,
    subscription_body,
)
from runcycles_server.webhooks.ssrf import parse_networks
from runcycles_server.webhooks.storage import DeliveryQuery, WebhookStorage, WebhookTxn

_LIMIT: Final = Param("integer", minimum=1, maximum=100)
_DELIVERY_PARAMS: Final = {
    "status": Param("enum", DELIVERY_STATUSES),
    "from": Param("date-time"),
    "to": Param("date-time"),
    "cursor": Param(),
    "limit": _LIMIT,
}
_ADMIN_LIST: Final = {
    "tenant_id": Param(),
    "status": Param("enum", STATUSES),
    "event_type": Param("enum", EVENT_TYPES),
    "search": Param(max_length=128),
    "sort_by": Param("enum", ("url", "tenant_id", "status", "consecutive_failures")),
    "sort_dir": Param("enum", ("asc", "desc")),
    "cursor": Param(),
    "limit": _LIMIT,
}
_TENANT_LIST: Final = {
    "tenant": Param(),
    "status": Param("enum", STATUSES),
    "cursor": Param(),
    "limit": _LIMIT,
}
QUERY_PARAMS: Final = {
    ("POST", "/v1/admin/webhooks"): {"tenant_id": Param()},
    ("GET", "/v1/admin/webhooks"): _ADMIN_LIST,
    ("GET", "/v1/admin/webhooks/{subscription_id}/deliveries"): _DELIVERY_PARAMS,
    ("GET", "/v1/webhooks"): _TENANT_LIST,
    ("GET", "/v1/webhooks/{subscription_id}/deliveries"): _DELIVERY_PARAMS,
}
"""The query parameters of the webhook routes, as the spec declares them."""


def _moment(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if not value:
        return None
    return ms_from_datetime(datetime.fromisoformat(value.replace("Z", "+00:00")))


def _iso_ms(value: str, name: str) -> int:
    try:
        return ms_from_datetime(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise LedgerError(
            "INVALID_REQUEST", f"{name} must be an ISO-8601 date-time such as 2026-01-31T12:00:00Z"
        ) from None


class WebhooksApi:
    """Both planes' webhook routes over one store's webhook storage and dispatcher."""

    def __init__(
        self,
        store: Store,
        storage: WebhookStorage,
        dispatcher: Dispatcher,
        auth: Authenticator,
        max_body_bytes: int,
    ) -> None:
        self.store = store
        self.storage = storage
        self.dispatcher = dispatcher
        self.auth = auth
        self.max_body = max_body_bytes
        self.actions = WebhookActions(store, dispatcher)
        self.subs = self.actions.subs
        self.bulk_replay = BulkReplay(store, "bulk:webhooks")

    def routes(self) -> list[BaseRoute]:
        """Return the webhook routes."""
        admin = "/v1/admin/webhooks"
        tenant = "/v1/webhooks"
        return [
            Route(admin, self.admin_create, methods=["POST"]),
            Route(admin, self.admin_list, methods=["GET"]),
            Route(f"{admin}/bulk-action", self.bulk_action, methods=["POST"]),
            Route(f"{admin}/{{subscription_id}}", self.get, methods=["GET"]),
            Route(f"{admin}/{{subscription_id}}", self.update, methods=["PATCH"]),
            Route(f"{admin}/{{subscription_id}}", self.delete, methods=["DELETE"]),
            Route(f"{admin}/{{subscription_id}}/test", self.test, methods=["POST"]),
            Route(f"{admin}/{{subscription_id}}/deliveries", self.deliveries, methods=["GET"]),
            Route(f"{admin}/{{subscription_id}}/replay", self.replay, methods=["POST"]),
            Route(f"{admin}/{{subscription_id}}/rotate-secret", self.rotate, methods=["POST"]),
            Route("/v1/admin/config/webhook-security", self.get_security, methods=["GET"]),
            Route("/v1/admin/config/webhook-security", self.put_security, methods=["PUT"]),
            Route(tenant, self.tenant_create, methods=["POST"]),
            Route(tenant, self.tenant_list, methods=["GET"]),
            Route(f"{tenant}/{{subscription_id}}", self.get, methods=["GET"]),
            Route(f"{tenant}/{{subscription_id}}", self.update, methods=["PATCH"]),
            Route(f"{tenant}/{{subscription_id}}", self.delete, methods=["DELETE"]),
            Route(f"{tenant}/{{subscription_id}}/test", self.test, methods=["POST"]),
            Route(f"{tenant}/{{subscription_id}}/deliveries", self.deliveries, methods=["GET"]),
            Route(f"{tenant}/{{subscription_id}}/rotate-secret", self.rotate, methods=["POST"]),
        ]

    async def _caller(self, request: Request, write: bool) -> Principal:
        """The admin key on ``/v1/admin/...``; on ``/v1/webhooks`` a tenant key or the admin."""
        check_path(request)
        if request.url.path.startswith("/v1/admin/"):
            return self.auth.admin(request)
        permission = "webhooks:write" if write else "webhooks:read"
        return await self.auth.admin_or_tenant(request, permission)

    # -- create and list -------------------------------------------------------------------

    async def _create(self, tenant_id: str, request: Request) -> Response:
        body = await parse_body(request, CreateRequest, self.max_body)
        row, secret = await self.subs.create(tenant_id, body)
        return json_response(
            {"subscription": subscription_body(row), "signing_secret": secret}, 201
        )

    async def admin_create(self, request: Request) -> Response:
        """``POST /v1/admin/webhooks[?tenant_id=]``."""
        self.auth.admin(request)
        check_query(request, {"tenant_id": Param()})
        return await self._create(request.query_params.get("tenant_id") or SYSTEM_TENANT, request)

    async def tenant_create(self, request: Request) -> Response:
        """``POST /v1/webhooks``: the calling key's tenant."""
        principal = await self.auth.tenant(request, "webhooks:write")
        assert principal.tenant_id is not None
        return await self._create(principal.tenant_id, request)

    async def admin_list(self, request: Request) -> Response:
        """``GET /v1/admin/webhooks``."""
        self.auth.admin(request)
        check_query(request, _ADMIN_LIST)
        q = request.query_params
        rows = _filtered(
            await self.subs.all(),
            tenant_id=q.get("tenant_id") or None,
            status=q.get("status") or None,
            event_type=q.get("event_type") or None,
            search=q.get("search") or None,
        )
        sort_by = q.get("sort_by") or None
        if sort_by is not None:
            desc = (q.get("sort_dir") or "desc") == "desc"
            rows.sort(key=lambda r: (getattr(r, sort_by), r.subscription_id), reverse=desc)
        return self._page(rows, request)

    async def tenant_list(self, request: Request) -> Response:
        """``GET /v1/webhooks``: the key's tenant (the admin key names one with ``tenant``)."""
        principal = await self.auth.admin_or_tenant(request, "webhooks:read")
        check_query(request, _TENANT_LIST)
        wanted = request.query_params.get("tenant") or None
        if principal.is_admin:
            if wanted is None:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant query parameter is required when using admin key authentication",
                )
            tenant_id = wanted
        else:
            assert principal.tenant_id is not None
            if wanted is not None and wanted != principal.tenant_id:
                raise LedgerError(
                    "FORBIDDEN", "the tenant parameter must be your API key's own tenant"
                )
            tenant_id = principal.tenant_id
        rows = _filtered(
            await self.subs.all(),
            tenant_id=tenant_id,
            status=request.query_params.get("status") or None,
        )
        return self._page(rows, request)

    @staticmethod
    def _page(rows: list[SubscriptionRow], request: Request) -> Response:
        limit = query_int(request, "limit", 50, 1, 100)
        start = 0
        cursor = request.query_params.get("cursor")
        if cursor:
            start = _int_cursor(decode_cursor(cursor, 1)[0])
        items = rows[start : start + limit]
        body: dict[str, Any] = {"subscriptions": [subscription_body(r) for r in items]}
        more = start + limit < len(rows)
        body["has_more"] = more
        if more:
            body["next_cursor"] = encode_cursor([start + limit])
        return json_response(body)

    # -- one subscription ------------------------------------------------------------------

    async def _target(self, request: Request, write: bool) -> tuple[Principal, SubscriptionRow]:
        principal = await self._caller(request, write)
        sid = request.path_params["subscription_id"]
        row = await self.subs.get(sid, principal.tenant_id)
        if write:
            await self.subs.check_open(row.tenant_id)
        return principal, row

    async def get(self, request: Request) -> Response:
        """``GET .../{subscription_id}``."""
        _, row = await self._target(request, write=False)
        return json_response(subscription_body(row))

    async def update(self, request: Request) -> Response:
        """``PATCH .../{subscription_id}``."""
        principal, row = await self._target(request, write=True)
        body = await parse_body(request, UpdateRequest, self.max_body)
        if principal.is_admin and not request.url.path.startswith("/v1/admin/"):
            _on_behalf()
        updated = await self.subs.update(row.subscription_id, body, principal.tenant_id)
        if updated.status != row.status:
            await self.actions.audit(updated.status, updated, None, {"previous_status": row.status})
        return json_response(subscription_body(updated))

    async def delete(self, request: Request) -> Response:
        """``DELETE .../{subscription_id}``: 204."""
        principal, row = await self._target(request, write=True)
        if principal.is_admin and not request.url.path.startswith("/v1/admin/"):
            _on_behalf()
        await self.subs.delete(row.subscription_id, principal.tenant_id)
        return Response(status_code=204)

    async def rotate(self, request: Request) -> Response:
        """``POST .../{subscription_id}/rotate-secret`` (extension)."""
        principal, row = await self._target(request, write=True)
        body = await parse_body(request, RotateRequest, self.max_body)
        updated, secret = await self.subs.rotate_secret(
            row.subscription_id, body.signing_secret, body.previous_secret_ttl_s,
            principal.tenant_id,
        )  # fmt: skip
        return json_response({"subscription": subscription_body(updated), "signing_secret": secret})

    async def test(self, request: Request) -> Response:
        """``POST .../{subscription_id}/test``: sends ``system.webhook_test`` now."""
        _, row = await self._target(request, write=True)
        delivery, attempt = await self.actions.test(row)
        body: dict[str, Any] = {"success": attempt.ok, "event_id": delivery.event_id}
        if attempt.status is not None:
            body["response_status"] = attempt.status
        body["response_time_ms"] = attempt.elapsed_ms
        if attempt.error is not None:
            body["error_message"] = attempt.error
        return json_response(body)

    async def deliveries(self, request: Request) -> Response:
        """``GET .../{subscription_id}/deliveries``."""
        check_query(request, _DELIVERY_PARAMS)
        _, row = await self._target(request, write=False)
        cursor = request.query_params.get("cursor") or None
        if cursor is not None:
            at, last = decode_cursor(cursor, 2)
            if not isinstance(last, str):
                _int_cursor(None)
            _int_cursor(at)
        query = DeliveryQuery(
            subscription_id=row.subscription_id,
            status=request.query_params.get("status") or None,
            from_ms=_moment(request, "from"),
            to_ms=_moment(request, "to"),
            limit=query_int(request, "limit", 50, 1, 100),
            cursor=cursor,
        )
        page = await self.storage.list_deliveries(query)
        body: dict[str, Any] = {"deliveries": [delivery_body(d) for d in page.items]}
        body["has_more"] = page.next_cursor is not None
        if page.next_cursor is not None:
            body["next_cursor"] = page.next_cursor
        return json_response(body)

    async def replay(self, request: Request) -> Response:
        """``POST /v1/admin/webhooks/{subscription_id}/replay``: 202."""
        _, row = await self._target(request, write=True)
        body = await parse_body(request, ReplayRequest, self.max_body)
        from_ms = _iso_ms(body.from_, "from")
        to_ms = _iso_ms(body.to, "to") if body.to else self.store.clock()
        done = await self.actions.replay(row, from_ms, to_ms, body.event_types, body.max_events)
        return json_response(
            {"replay_id": done.replay_id, "events_queued": done.events_queued,
             "estimated_completion_seconds": max(1, done.events_queued // 10)},
            202,
        )  # fmt: skip

    # -- bulk and security -----------------------------------------------------------------

    async def bulk_action(self, request: Request) -> Response:
        """``POST /v1/admin/webhooks/bulk-action``."""
        self.auth.admin(request)
        body = await parse_body(request, BulkActionRequest, self.max_body)
        f = body.filter
        if f.tenant_id is None and f.status is None and f.event_type is None and not f.search:
            raise LedgerError(
                "INVALID_REQUEST",
                "filter needs at least one of tenant_id, status, event_type, search",
            )
        rows = _filtered(await self.subs.all(), tenant_id=f.tenant_id, status=f.status,
                         event_type=f.event_type, search=f.search)  # fmt: skip
        check_matches(len(rows), body.expected_count, "subscriptions")
        if dry_run(request):
            ids = [r.subscription_id for r in rows]
            out = await self.subs.bulk(ids, body.action, "", preview=True)
            return _preview(envelope(body.action, len(rows), out, body.idempotency_key))
        replayed = await self.bulk_replay.claim(ADMIN_TENANT, body)
        if replayed is not None:
            return json_response(replayed)
        request_id = current_context().request_id or new_id("req")
        outcome = await self.subs.bulk([r.subscription_id for r in rows], body.action, request_id)
        response = envelope(body.action, len(rows), outcome, body.idempotency_key)
        await self.bulk_replay.finish(ADMIN_TENANT, body, response)
        return json_response(response)

    async def get_security(self, request: Request) -> Response:
        """``GET /v1/admin/config/webhook-security``."""
        self.auth.admin(request)

        async def read(t: WebhookTxn) -> SecurityConfig:
            return await t.security()

        return json_response((await self.storage.read(read)).model_dump())

    async def put_security(self, request: Request) -> Response:
        """``PUT /v1/admin/config/webhook-security`` (takes effect at once, deliveries too)."""
        self.auth.admin(request)
        config = await parse_body(request, SecurityConfig, self.max_body)
        parse_networks(config.blocked_cidr_ranges)

        async def write(t: WebhookTxn) -> None:
            t.put_security(config)

        await self.storage.transact(write)
        return json_response(config.model_dump())


def _preview(body: dict[str, Any]) -> Response:
    response = json_response(body)
    response.headers["X-Cycles-Dry-Run"] = "true"
    return response


def _on_behalf() -> None:
    """Record the request's events as the admin's acting on a tenant's subscription."""
    set_actor("admin_on_behalf_of")


def _int_cursor(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise LedgerError(
        "INVALID_REQUEST",
        "cursor is not valid: pass back next_cursor from the previous page unchanged",
    )


def _filtered(
    rows: list[SubscriptionRow],
    *,
    tenant_id: str | None = None,
    status: str | None = None,
    event_type: str | None = None,
    search: str | None = None,
) -> list[SubscriptionRow]:
    needle = search.lower() if search else None
    return [
        r
        for r in rows
        if (tenant_id is None or r.tenant_id == tenant_id)
        and (status is None or r.status == status)
        and (event_type is None or event_type in r.event_types)
        and (needle is None or needle in r.subscription_id.lower() or needle in r.url.lower())
    ]
