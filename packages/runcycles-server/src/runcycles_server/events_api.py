"""The HTTP routes of the event log (``cycles-governance-admin-v0.1.25.yaml``).

* ``GET /v1/admin/events`` (admin key): every tenant's events, or one tenant's with
  ``tenant_id`` (required on the Redis store, which keeps events per tenant).
* ``GET /v1/admin/events/{event_id}`` (admin key): one event, 404 ``EVENT_NOT_FOUND``.
* ``GET /v1/events`` (a tenant API key with ``events:read``): the key's own tenant's events
  of the tenant-visible categories (``budget``, ``reservation``, ``tenant``).

Both: newest first, filters ``event_type``, ``category``, ``scope`` (that scope and below),
``correlation_id``, ``trace_id``, ``request_id``, ``from``/``to`` (inclusive), cursor pages of
``limit`` (1-100, default 50). ``search``, ``sort_by`` and ``sort_dir`` are validated; only the
default order (newest first) is served.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles_server.errors import LedgerError
from runcycles_server.events import CATEGORIES, EVENT_TYPES, EventRecord, event_body
from runcycles_server.events.signals import SYSTEM_TENANT
from runcycles_server.governance.timestamps import ms_from_datetime
from runcycles_server.query import Param, check_path, check_query
from runcycles_server.stores.base import EventQuery, Store
from runcycles_server.stores.sqlite import encode_cursor
from runcycles_server.web import Authenticator, json_response, query_int

TENANT_CATEGORIES: Final = frozenset({"budget", "reservation", "tenant"})
"""Event categories a tenant key may read (the spec's ``listTenantEvents``)."""

_COMMON: Final = {
    "event_type": Param("enum", EVENT_TYPES),
    "category": Param("enum", tuple(sorted(CATEGORIES))),
    "scope": Param(),
    "correlation_id": Param(),
    "trace_id": Param(pattern="^[0-9a-f]{32}$"),
    "request_id": Param(),
    "from": Param("date-time"),
    "to": Param("date-time"),
    "search": Param(max_length=128),
    "sort_by": Param("enum", ("event_type", "category", "scope", "tenant_id", "timestamp")),
    "sort_dir": Param("enum", ("asc", "desc")),
    "cursor": Param(),
    "limit": Param("integer", minimum=1, maximum=100),
}
ADMIN_PARAMS: Final = {"tenant_id": Param(), **_COMMON}
TENANT_PARAMS: Final = _COMMON
QUERY_PARAMS: Final = {
    ("GET", "/v1/admin/events"): ADMIN_PARAMS,
    ("GET", "/v1/events"): TENANT_PARAMS,
}
"""The query parameters of both routes (validated like every admin list's)."""


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value if value else None


def _moment(request: Request, name: str) -> int | None:
    value = _text(request, name)
    if value is None:
        return None
    return ms_from_datetime(datetime.fromisoformat(value.replace("Z", "+00:00")))


def _query(request: Request, tenant_id: str | None) -> EventQuery:
    if (
        request.query_params.get("sort_dir") == "asc"
        or request.query_params.get("sort_by", "timestamp") != "timestamp"
    ):
        raise LedgerError(
            "INVALID_REQUEST",
            "events are listed by timestamp, newest first (sort_by=timestamp, sort_dir=desc); "
            "narrow the list with the filters and from/to instead",
        )
    return EventQuery(
        tenant_id=tenant_id,
        event_type=_text(request, "event_type"),
        category=_text(request, "category"),
        scope=_text(request, "scope"),
        correlation_id=_text(request, "correlation_id"),
        request_id=_text(request, "request_id"),
        trace_id=_text(request, "trace_id"),
        from_ms=_moment(request, "from"),
        to_ms=_moment(request, "to"),
        limit=query_int(request, "limit", 50, 1, 100),
        cursor=_text(request, "cursor"),
    )


class EventsApi:
    """``GET /v1/admin/events`` and ``GET /v1/events`` over a store's event log."""

    def __init__(self, store: Store, auth: Authenticator) -> None:
        self.store = store
        self.auth = auth

    def routes(self) -> list[BaseRoute]:
        """Return the event routes (``GET /v1/events`` beside the runtime's ``POST``)."""
        return [
            Route("/v1/admin/events", self.list_admin_events, methods=["GET"]),
            Route("/v1/admin/events/{event_id}", self.get_admin_event, methods=["GET"]),
            Route("/v1/events", self.list_tenant_events, methods=["GET"]),
        ]

    async def list_admin_events(self, request: Request) -> Response:
        """``GET /v1/admin/events``."""
        self.auth.admin(request)
        check_path(request)
        check_query(request, ADMIN_PARAMS)
        page = await self.store.list_events(_query(request, _text(request, "tenant_id")))
        return self._page(page.items, page.next_cursor)

    async def get_admin_event(self, request: Request) -> Response:
        """``GET /v1/admin/events/{event_id}``: the full event, or 404 ``EVENT_NOT_FOUND``."""
        self.auth.admin(request)
        check_path(request)
        event_id = str(request.path_params["event_id"])
        found = await self._find(event_id)
        if found is None:
            raise LedgerError(
                "EVENT_NOT_FOUND",
                f"event {event_id} does not exist (or is past retention); list events with "
                "GET /v1/admin/events",
                status=404,
            )
        return json_response(event_body(found))

    async def _find(self, event_id: str) -> EventRecord | None:
        """Find an event by id through the listing: an id starts with its creation time.

        An event id is ``evt_`` + 12 hex digits of its epoch ms + more digits (see
        :func:`runcycles_server.events.records.new_event_id`), so the lookup lists only that
        millisecond. A store that keeps events per tenant (Redis) needs a tenant to list:
        each tenant's millisecond is then read in turn (and the system's own events).
        """
        try:
            at = int(event_id[4:16], 16) if event_id.startswith("evt_") else -1
        except ValueError:
            return None
        if at < 0:
            return None
        try:
            return await self._find_in(None, event_id, at)
        except LedgerError as exc:
            if exc.code != "INVALID_REQUEST":  # the store needs a tenant to list events
                raise
        cursor: str | None = None
        while True:
            page = await self.store.list_tenants(None, 100, cursor)
            for tenant_id in [t.tenant_id for t in page.items]:
                found = await self._find_in(tenant_id, event_id, at)
                if found is not None:
                    return found
            cursor = page.next_cursor
            if cursor is None:
                return await self._find_in(SYSTEM_TENANT, event_id, at)

    async def _find_in(self, tenant_id: str | None, event_id: str, at: int) -> EventRecord | None:
        query = EventQuery(tenant_id, from_ms=at, to_ms=at, limit=100)
        while True:
            page = await self.store.list_events(query)
            for event in page.items:
                if event.event_id == event_id:
                    return event
            if page.next_cursor is None:
                return None
            query = dataclasses.replace(query, cursor=page.next_cursor)

    async def list_tenant_events(self, request: Request) -> Response:
        """``GET /v1/events``: the calling key's tenant, tenant-visible categories only."""
        principal = await self.auth.tenant(request, "events:read")
        check_path(request)
        check_query(request, TENANT_PARAMS)
        query = _query(request, principal.tenant_id)
        if query.category is not None and query.category not in TENANT_CATEGORIES:
            raise LedgerError(
                "INVALID_REQUEST",
                f"category {query.category!r} is not readable with a tenant key; use one of "
                f"{', '.join(sorted(TENANT_CATEGORIES))}",
            )
        wanted = query.limit
        items: list[EventRecord] = []
        cursor = query.cursor
        while len(items) < wanted:  # skip the categories a tenant key does not see
            page = await self.store.list_events(dataclasses.replace(query, cursor=cursor))
            items += [e for e in page.items if e.category in TENANT_CATEGORIES]
            cursor = page.next_cursor
            if cursor is None:
                break
        if len(items) > wanted:  # go on after the last event answered, not after the page
            items = items[:wanted]
            cursor = encode_cursor([items[-1].created_at_ms, items[-1].event_id])
        return self._page(items, cursor)

    @staticmethod
    def _page(items: list[EventRecord], cursor: str | None) -> Response:
        body: dict[str, object] = {"events": [event_body(e) for e in items]}
        body["has_more"] = cursor is not None
        if cursor is not None:
            body["next_cursor"] = cursor
        return json_response(body)
