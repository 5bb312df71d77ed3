"""The Cycles server as a Starlette ASGI app: runtime routes under ``/v1`` plus the admin plane.

::

    from runcycles_server.app import create_app
    from runcycles_server.stores.sqlite import SqliteStore

    app = create_app(SqliteStore("cycles.db"), admin_api_key="...")
    # uvicorn.run(app)

Tenant keys must hold the matching permission (403 otherwise): ``reservations:create`` for
decide and reserve, ``reservations:commit`` for commit and ``POST /v1/events`` (post-hoc
settlement), ``reservations:release``, ``reservations:extend``, ``reservations:list`` for list
and get, ``balances:read`` for balances; ``admin:read``/``admin:write`` act as wildcards.

Runtime routes (``cycles-protocol-v0.yaml``): ``POST /v1/decide``, ``POST /v1/reservations``,
``GET /v1/reservations``, ``GET /v1/reservations/{id}``, ``POST /v1/reservations/{id}/commit``,
``/release``, ``/extend``, ``GET /v1/balances``, ``POST /v1/events``, ``GET /v1/auth/introspect``,
plus ``GET /healthz`` (liveness) and ``GET /readyz`` (store reachable; answers within
:data:`READY_TIMEOUT_S`). With ``evidence`` (see :mod:`runcycles_server.evidence`), decide,
reserve, commit, release and their denials carry ``cycles_evidence``, and the public
``GET /v1/evidence/{id}`` and ``GET /v1/.well-known/cycles-jwks.json`` serve the signed
envelopes and the keys (:mod:`runcycles_server.evidence.api`). Admin routes live in
:mod:`runcycles_server.admin`; the action governance routes (policies, ``/v1/action-kinds``,
quota counters) in :mod:`runcycles_server.governance_api`.

A store that is unavailable (down, or hung past its timeout) makes a request fail with ``503``
and ``Retry-After``, and each outage is logged once (:mod:`runcycles_server.health`).

A background task expires reservations past ``expires_at + grace`` (returning their budget)
every ``sweep_interval_s``; commit, release and extend enforce the deadlines themselves, so
correctness never waits for the sweep. Every :data:`PURGE_EVERY_S` it also deletes, in short
batches, idempotency records past their retention and (SQLite, memory) finished reservations
and event records older than ``retention_days`` (Redis expires those by key TTL), and marks
API keys past their ``expires_at`` EXPIRED (``api_key.expired``).

Beside it runs the event monitor (:mod:`runcycles_server.monitor`): refusals (denied
reservations, refused keys) are only tallied on the request path, and the monitor records them
as aggregated events and runs the burn-rate and rate-spike detectors (``detectors``).

With ``rate_limit_per_s`` every tenant-key request takes a token from its tenant's bucket
(see :mod:`runcycles_server.ratelimit`): responses carry ``X-RateLimit-Remaining`` and
``X-RateLimit-Reset``, and an empty bucket answers ``429 LIMIT_EXCEEDED`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from runcycles.models import (
    STANDARD_SUBJECT_FIELDS,
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    Subject,
)
from runcycles_server import ledger
from runcycles_server.admin import Admin
from runcycles_server.admin_bulk import BulkApi
from runcycles_server.admin_keys import KeysApi
from runcycles_server.console import Console
from runcycles_server.events.latency import LatencyWatch
from runcycles_server.events.rates import DetectorConfig
from runcycles_server.events.signals import Signals
from runcycles_server.events_api import EventsApi
from runcycles_server.evidence.api import PUBLIC_REQUESTS_PER_MINUTE, EvidenceApi
from runcycles_server.evidence.issuer import Issuer
from runcycles_server.governance_api import REGISTRY_REQUESTS_PER_MINUTE, GovernanceApi
from runcycles_server.health import StoreHealth
from runcycles_server.ledger import LedgerError
from runcycles_server.metrics import DEFAULT_TOP_SCOPES, Metrics
from runcycles_server.metrics_api import MetricsApi
from runcycles_server.monitor import Monitor, note_denial, note_spend
from runcycles_server.overview import OverviewApi
from runcycles_server.query import check_text
from runcycles_server.ratelimit import TokenBucketLimiter
from runcycles_server.stores.base import (
    RESERVATION_SORT_KEYS,
    EvidenceStore,
    OperationStore,
    ReservationQuery,
    RetentionPurger,
    Store,
)
from runcycles_server.web import (
    DEFAULT_MAX_BODY_BYTES,
    JSON,
    Authenticator,
    ContextMiddleware,
    Principal,
    check_idempotency_header,
    error_response,
    json_response,
    parse_body,
    query_int,
    request_ids,
)
from runcycles_server.webhooks import Dispatcher, Resolver, storage_for, system_resolver
from runcycles_server.webhooks.api import WebhooksApi
from runcycles_server.webhooks.profiles import detector_profiles
from runcycles_server.webhooks.sealing import SealingError, SecretBox

logger = logging.getLogger("runcycles_server")

MAX_RESERVATION_ID_LEN: Final = 128
READY_TIMEOUT_S: Final = 0.8
"""Longest ``GET /readyz`` waits for the store's answer before reporting 503."""
RESERVATION_STATUSES: Final = ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED")

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

_CAPABILITY_TABLE: Final[dict[str, tuple[str, ...]]] = {
    "view_budgets": ("budgets:read", "admin:read", "admin:budgets:read"),
    "view_policies": ("policies:read", "admin:read", "admin:policies:read"),
    "view_webhooks": ("webhooks:read", "admin:read", "admin:webhooks:read"),
    "view_events": ("events:read", "admin:read", "admin:events:read"),
    "view_reservations": (
        "reservations:list", "reservations:create", "reservations:commit",
        "reservations:release", "reservations:extend", "admin:read",
    ),
    "manage_budgets": ("budgets:write", "admin:write", "admin:budgets:write"),
    "manage_policies": ("policies:write", "admin:write", "admin:policies:write"),
    "manage_webhooks": ("webhooks:write", "admin:write", "admin:webhooks:write"),
    "manage_reservations": (
        "reservations:create", "reservations:commit", "reservations:release",
        "reservations:extend", "admin:write",
    ),
}  # fmt: skip
_ADMIN_ONLY_CAPABILITIES: Final = (
    "view_overview", "view_audit", "view_tenants", "view_api_keys", "manage_tenants",
    "manage_api_keys",
)  # fmt: skip


def capabilities_for(permissions: list[str]) -> dict[str, bool]:
    """Derive the introspection capability map of a tenant key (the spec's frozen table)."""
    granted = set(permissions)
    caps = {name: bool(granted.intersection(perms)) for name, perms in _CAPABILITY_TABLE.items()}
    caps.update(dict.fromkeys(_ADMIN_ONLY_CAPABILITIES, False))
    return caps


# --------------------------------------------------------------------------------------------
# Query parameter helpers


def query_time_ms(request: Request, name: str) -> int | None:
    """Parse an ISO-8601 date-time query parameter to epoch ms (blank means unset).

    Raises:
        LedgerError: INVALID_REQUEST naming the parameter.
    """
    raw = request.query_params.get(name)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise LedgerError(
            "INVALID_REQUEST",
            f"query parameter {name} must be an ISO-8601 date-time such as 2026-01-31T12:00:00Z",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _window(request: Request, lo_name: str, hi_name: str) -> tuple[int | None, int | None]:
    lo, hi = query_time_ms(request, lo_name), query_time_ms(request, hi_name)
    if lo is not None and hi is not None and lo > hi:
        raise LedgerError("INVALID_REQUEST", f"{lo_name} must not be later than {hi_name}")
    return lo, hi


def _check_subject(principal: Principal, subject: Subject) -> None:
    ledger.validate_subject(subject)
    if subject.tenant is not None and subject.tenant != principal.tenant_id:
        raise LedgerError(
            "FORBIDDEN",
            f"subject.tenant {subject.tenant!r} does not match the API key's tenant "
            f"{principal.tenant_id!r}",
        )


def _reservation_id(request: Request) -> str:
    rid = str(request.path_params["reservation_id"])
    if not 1 <= len(rid) <= MAX_RESERVATION_ID_LEN:
        raise LedgerError(
            "INVALID_REQUEST", f"reservation_id must be 1 to {MAX_RESERVATION_ID_LEN} characters"
        )
    check_text(rid, "reservation_id")
    return rid


def _check_query_text(request: Request) -> None:
    """Refuse control characters in any query parameter (ids, names and filters)."""
    for name, value in request.query_params.multi_items():
        check_text(value, f"query parameter {name}")


def _hint_missing_tenant(error: LedgerError, subject: Subject, tenant_id: str | None) -> None:
    if error.code == "NOT_FOUND" and subject.tenant is None and tenant_id:
        error.message += (
            f"; note: the subject has no tenant, so its scopes are not rooted at "
            f"tenant:{tenant_id} where budgets live; send subject.tenant={tenant_id!r}"
        )


def _plain_answer(body: bytes, status: int) -> Response:
    return Response(body, status_code=status, media_type=JSON)


class Runtime:
    """The runtime route handlers, bound to one store."""

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        max_body_bytes: int,
        health: StoreHealth | None = None,
        metrics: Metrics | None = None,
        evidence: EvidenceApi | None = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.max_body = max_body_bytes
        self.health = health or StoreHealth(store)
        self.metrics = metrics
        self.signals: Signals | None = None
        """Where reservations, denials and spend are tallied (see :mod:`.monitor`)."""
        self.evidence = evidence or EvidenceApi(store, None)
        self._answer: Callable[[bytes, int], Response] = (
            self.evidence.answer if self.evidence.issuer is not None else _plain_answer
        )
        """How a decision is answered (evidence off: the body as it is, no check for a ref)."""
        self._settle_routes: dict[str, Handler] = {
            "commit": self.commit,
            "release": self.release,
            "extend": self.extend,
        }

    def routes(self) -> list[BaseRoute]:
        """Return the runtime routes."""
        return [
            Route("/v1/decide", self.decide, methods=["POST"]),
            Route("/v1/reservations", self.create_reservation, methods=["POST"]),
            Route("/v1/reservations", self.list_reservations, methods=["GET"]),
            Route("/v1/reservations/{reservation_id}", self.get_reservation, methods=["GET"]),
            Route("/v1/reservations/{reservation_id}/commit", self.commit, methods=["POST"]),
            Route("/v1/reservations/{reservation_id}/release", self.release, methods=["POST"]),
            Route("/v1/reservations/{reservation_id}/extend", self.extend, methods=["POST"]),
            Route("/v1/balances", self.balances, methods=["GET"]),
            Route("/v1/events", self.create_event, methods=["POST"]),
            Route("/v1/auth/introspect", self.introspect, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    def timed_endpoints(self) -> list[Handler]:
        """The runtime routes whose latency ``system.high_latency`` judges (not the probes)."""
        return [
            self.decide, self.create_reservation, self.list_reservations, self.get_reservation,
            self.commit, self.release, self.extend, self.balances, self.create_event,
            self.introspect,
        ]  # fmt: skip

    def fast_route(self, scope: Scope) -> Handler | None:
        """Return the handler of a hot route for this request, or ``None`` (Starlette's router).

        Matches exactly what :meth:`routes` would for these paths and methods (path parameter
        ``[^/]+``), so answers are identical; anything else (other methods, ``HEAD``, a
        ``root_path``, trailing slashes) falls through to the router.
        """
        if scope.get("root_path"):
            return None
        method = scope["method"]
        path: str = scope["path"]
        if method == "POST":
            if path == "/v1/reservations":
                return self.create_reservation
            if path.startswith("/v1/reservations/"):
                rid, sep, action = path[17:].partition("/")
                handler = self._settle_routes.get(action) if sep and rid else None
                if handler is not None:
                    scope["path_params"] = {"reservation_id": rid}
                return handler
            if path == "/v1/decide":
                return self.decide
            if path == "/v1/events":
                return self.create_event
        elif method == "GET" and path == "/healthz":
            return self.healthz
        return None

    async def decide(self, request: Request) -> Response:
        """``POST /v1/decide``."""
        principal = await self.auth.tenant(request, "reservations:create")
        body = await parse_body(request, DecisionRequest, self.max_body)
        check_idempotency_header(request, body.idempotency_key)
        assert principal.tenant_id is not None
        try:
            _check_subject(principal, body.subject)
            digest, dumped = ledger.request_digest("decide", body)
            outcome = await self.store.decide(
                principal.tenant_id, body, digest, request_json=dumped
            )
        except LedgerError as exc:
            await self.evidence.denied(request, exc, "decide", body, principal.tenant_id)
            raise
        if self.metrics is not None:
            self.metrics.decided("decide", outcome.body)
        return self._answer(outcome.body, outcome.status_code)

    async def create_reservation(self, request: Request) -> Response:
        """``POST /v1/reservations``."""
        principal = await self.auth.tenant(request, "reservations:create")
        body = await parse_body(request, ReservationCreateRequest, self.max_body)
        check_idempotency_header(request, body.idempotency_key)
        assert principal.tenant_id is not None
        signals = self.signals if not body.dry_run else None
        if signals is not None:
            signals.reservation(principal.tenant_id)
        try:
            _check_subject(principal, body.subject)
            digest, dumped = ledger.request_digest("reserve", body)
            outcome = await self.store.reserve(
                principal.tenant_id, body, digest, request_json=dumped
            )
        except LedgerError as exc:
            if signals is not None:
                note_denial(signals, principal.tenant_id, body, exc)
            _hint_missing_tenant(exc, body.subject, principal.tenant_id)
            deny = exc.details.get("deny_detail") if exc.details else None
            if self.metrics is not None and isinstance(deny, dict):  # a live denial
                self.metrics.denied("reserve", deny.get("reason_code"))
            await self.evidence.denied(request, exc, "reserve", body, principal.tenant_id)
            raise
        if self.metrics is not None:
            self.metrics.decided("reserve", outcome.body)
        return self._answer(outcome.body, outcome.status_code)

    async def list_reservations(self, request: Request) -> Response:
        """``GET /v1/reservations``."""
        principal = await self.auth.admin_or_tenant(request, "reservations:list")
        _check_query_text(request)
        params = request.query_params
        tenant_param = params.get("tenant") or None
        if principal.is_admin:
            if tenant_param is None:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant query parameter is required when using admin key authentication",
                )
            tenant_id = tenant_param
        else:
            assert principal.tenant_id is not None
            if tenant_param is not None and tenant_param != principal.tenant_id:
                raise LedgerError(
                    "FORBIDDEN", "tenant query parameter does not match the API key's tenant"
                )
            tenant_id = principal.tenant_id
        status = params.get("status") or None
        if status is not None and status not in RESERVATION_STATUSES:
            raise LedgerError(
                "INVALID_REQUEST",
                f"status must be one of {', '.join(RESERVATION_STATUSES)}",
            )
        if len(params.get("idempotency_key", "")) > 256:  # blank means unset, as elsewhere
            raise LedgerError(
                "INVALID_REQUEST", "query parameter idempotency_key must be 1 to 256 characters"
            )
        sort_dir = params.get("sort_dir") or "desc"
        if sort_dir not in ("asc", "desc"):
            raise LedgerError("INVALID_REQUEST", "sort_dir must be asc or desc")
        sort_by = params.get("sort_by") or "created_at_ms"
        if sort_by not in RESERVATION_SORT_KEYS:  # like status and sort_dir: a closed enum
            raise LedgerError(
                "INVALID_REQUEST", f"sort_by must be one of {', '.join(RESERVATION_SORT_KEYS)}"
            )
        created = _window(request, "from", "to")
        expires = _window(request, "expires_from", "expires_to")
        finalized = _window(request, "finalized_from", "finalized_to")
        subject = {
            level: params[level]
            for level in STANDARD_SUBJECT_FIELDS
            if level != "tenant" and params.get(level)
        }
        query = ReservationQuery(
            tenant_id=tenant_id,
            idempotency_key=params.get("idempotency_key") or None,
            status=status,
            subject=subject,
            created_from_ms=created[0],
            created_to_ms=created[1],
            expires_from_ms=expires[0],
            expires_to_ms=expires[1],
            finalized_from_ms=finalized[0],
            finalized_to_ms=finalized[1],
            sort_by=sort_by,
            sort_desc=sort_dir == "desc",
            limit=query_int(request, "limit", 50, 1, 200),
            cursor=params.get("cursor") or None,
        )
        page = await self.store.list_reservations(query)
        include = {token.strip() for token in params.get("include", "").split(",")}
        rows = [ledger.reservation_body(r, include=include) for r in page.items]
        if "evidence" in include:
            for row in rows:
                refs = await self.evidence.reservation_refs(row["reservation_id"])
                if refs is not None:
                    row["evidence"] = refs
        body: dict[str, Any] = {"reservations": rows, "has_more": page.next_cursor is not None}
        if page.next_cursor is not None:
            body["next_cursor"] = page.next_cursor
        return json_response(body)

    async def get_reservation(self, request: Request) -> Response:
        """``GET /v1/reservations/{reservation_id}``."""
        principal = await self.auth.admin_or_tenant(request, "reservations:list")
        rid = _reservation_id(request)
        res = ledger.check_reservation_access(
            await self.store.get_reservation(rid), rid, principal.tenant_id
        )
        # Past expiry + grace it is expired even before the sweeper marks it (commit and
        # release already say so): never report such a reservation as ACTIVE.
        if res.status == "EXPIRED" or (
            res.status == "ACTIVE" and self.store.clock() > res.deadline_ms
        ):
            raise LedgerError("RESERVATION_EXPIRED", f"reservation {rid} expired")
        body = ledger.reservation_body(res)
        refs = await self.evidence.reservation_refs(rid)
        if refs is not None:
            body["evidence"] = refs
        return json_response(body)

    async def commit(self, request: Request) -> Response:
        """``POST /v1/reservations/{reservation_id}/commit``."""
        principal = await self.auth.tenant(request, "reservations:commit")
        rid = _reservation_id(request)
        body = await parse_body(request, CommitRequest, self.max_body)
        check_idempotency_header(request, body.idempotency_key)
        assert principal.tenant_id is not None
        digest, dumped = ledger.request_digest("commit", body)
        try:
            outcome = await self.store.commit(
                principal.tenant_id, rid, body, digest, request_json=dumped
            )
        except LedgerError as exc:
            await self.evidence.denied(request, exc, "commit", body, principal.tenant_id, rid)
            raise
        if self.signals is not None:
            note_spend(self.signals, principal.tenant_id, outcome)
        return self._answer(outcome.body, outcome.status_code)

    async def release(self, request: Request) -> Response:
        """``POST /v1/reservations/{reservation_id}/release`` (tenant or audited admin)."""
        principal = await self.auth.admin_or_tenant(request, "reservations:release")
        rid = _reservation_id(request)
        body = await parse_body(request, ReleaseRequest, self.max_body)
        check_idempotency_header(request, body.idempotency_key)
        digest, dumped = ledger.request_digest("release", body)
        request_id, trace_id = request_ids(request)
        try:
            outcome = await self.store.release(
                principal.tenant_id, rid, body, digest, request_id=request_id,
                trace_id=trace_id, request_json=dumped,
            )  # fmt: skip
        except LedgerError as exc:
            await self.evidence.denied(request, exc, "release", body, principal.tenant_id, rid)
            raise
        return self._answer(outcome.body, outcome.status_code)

    async def extend(self, request: Request) -> Response:
        """``POST /v1/reservations/{reservation_id}/extend``."""
        principal = await self.auth.tenant(request, "reservations:extend")
        rid = _reservation_id(request)
        body = await parse_body(request, ReservationExtendRequest, self.max_body)
        check_idempotency_header(request, body.idempotency_key)
        assert principal.tenant_id is not None
        digest = ledger.payload_hash("extend", ledger.request_payload(body))
        outcome = await self.store.extend(principal.tenant_id, rid, body, digest)
        return json_response(outcome.body, outcome.status_code)

    async def create_event(self, request: Request) -> Response:
        """``POST /v1/events`` (201)."""
        principal = await self.auth.tenant(request, "reservations:commit")
        body = await parse_body(request, EventCreateRequest, self.max_body)
        check_idempotency_header(request, body.idempotency_key)
        _check_subject(principal, body.subject)
        assert principal.tenant_id is not None
        digest = ledger.payload_hash("event", ledger.request_payload(body))
        try:
            outcome = await self.store.create_event(principal.tenant_id, body, digest)
        except LedgerError as exc:
            _hint_missing_tenant(exc, body.subject, principal.tenant_id)
            raise
        if self.signals is not None:
            note_spend(self.signals, principal.tenant_id, outcome)
        return json_response(outcome.body, outcome.status_code)

    async def balances(self, request: Request) -> Response:
        """``GET /v1/balances``: a tenant's budgets matching every given subject filter.

        Each filter ``level=value`` matches scopes containing the ``level:value`` segment
        (descendants included). The admin key may query any tenant via ``tenant``/``tenant_id``.
        """
        principal = await self.auth.admin_or_tenant(request, "balances:read")
        _check_query_text(request)
        params = request.query_params
        tenant_param = params.get("tenant") or params.get("tenant_id") or None
        if principal.is_admin:
            if tenant_param is None:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant query parameter is required when using admin key authentication",
                )
            tenant_id = tenant_param
        else:
            assert principal.tenant_id is not None
            if tenant_param is not None and tenant_param != principal.tenant_id:
                raise LedgerError(
                    "FORBIDDEN", "tenant query parameter does not match the API key's tenant"
                )
            tenant_id = principal.tenant_id
        if params.get("include_children", "true").lower() not in ("true", "false"):
            raise LedgerError(  # accepted and ignored, as v0 allows, but it must be a boolean
                "INVALID_REQUEST", "query parameter include_children must be true or false"
            )
        segments = [
            f"{level}:{params[level].lower()}"
            for level in STANDARD_SUBJECT_FIELDS
            if params.get(level)
        ]
        if principal.is_admin and tenant_param and not params.get("tenant"):
            segments.insert(0, f"tenant:{tenant_param.lower()}")
        if not segments:
            raise LedgerError(
                "INVALID_REQUEST",
                "at least one of tenant, workspace, app, workflow, agent or toolset is required "
                "as a query parameter",
            )
        page = await self.store.list_balances(
            tenant_id,
            segments,
            query_int(request, "limit", 50, 1, 200),
            params.get("cursor") or None,
        )
        body: dict[str, Any] = {
            "balances": [ledger.balance_body(row) for row in page.items],
            "has_more": page.next_cursor is not None,
        }
        if page.next_cursor is not None:
            body["next_cursor"] = page.next_cursor
        return json_response(body)

    async def introspect(self, request: Request) -> Response:
        """``GET /v1/auth/introspect``."""
        principal = await self.auth.admin_or_tenant(request)
        if principal.is_admin:
            caps = dict.fromkeys((*_CAPABILITY_TABLE, *_ADMIN_ONLY_CAPABILITIES), True)
            return json_response(
                {
                    "authenticated": True,
                    "auth_type": "admin",
                    "permissions": ["*"],
                    "capabilities": caps,
                }
            )
        key = principal.key
        assert key is not None
        body: dict[str, Any] = {
            "authenticated": True,
            "auth_type": "tenant",
            "permissions": key.permissions,
            "capabilities": capabilities_for(key.permissions),
            "tenant_id": key.tenant_id,
        }
        if key.scope_filter:
            body["scope_filter"] = key.scope_filter
        return json_response(body)

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process answers."""
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Readiness: the store answers within :data:`READY_TIMEOUT_S` (503 otherwise)."""
        try:
            ready = await asyncio.wait_for(self.store.ping(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            ready = False
        if ready:
            self.health.succeeded(wrote=False)
            return json_response({"status": "ready"})
        return json_response({"status": "unavailable"}, 503)


# --------------------------------------------------------------------------------------------
# Error handlers and app factory


async def _ledger_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LedgerError)
    return error_response(request, exc)


async def _sealing_error(request: Request, exc: Exception) -> Response:
    """A webhook secret that does not open: the server's key is not the one that sealed it."""
    logger.error("webhook secrets cannot be opened: %s", exc)  # a configuration error: no trace
    error = LedgerError(
        "INTERNAL_ERROR",
        "this server cannot open the stored webhook secrets (it was not started with the "
        "webhook key that sealed them); the operator finds the details in the server log",
        status=500,
    )
    return error_response(request, error)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = LedgerError("NOT_FOUND", f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        allowed = _allowed_methods(request)
        error = LedgerError(
            "INVALID_REQUEST",
            f"method {request.method} is not allowed on {request.url.path}; "
            f"use {', '.join(allowed)}",
            status=405,
        )
        response = error_response(request, error)
        response.headers["Allow"] = ", ".join(allowed)  # RFC 9110: a 405 must list them
        return response
    else:
        error = LedgerError("INVALID_REQUEST", str(exc.detail), status=exc.status_code)
    return error_response(request, error)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (several routes may share it).

    A literal path (``/v1/admin/webhooks/bulk-action``) hides the parameterized routes it
    also fits (``/v1/admin/webhooks/{subscription_id}``): it names its own resource.
    """
    literal: set[str] = set()
    methods: set[str] = set()
    path = request.url.path
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods.update(route.methods)
            if route.path == path:
                literal.update(route.methods)
    return sorted(literal or methods)


DEFAULT_RETENTION_DAYS: Final = 7
"""Days finished reservations and event records are kept (``--retention-days``)."""
PURGE_EVERY_S: Final = 10.0
"""Seconds between two retention purges (see :func:`purge_old_data`)."""
DISPATCH_STOP_GRACE_S: Final = 5.0
"""How long a shutdown lets the webhook dispatcher finish its round before cancelling it."""
PURGE_BATCH: Final = 500
"""Rows deleted per purge transaction: each holds the write lock for a few milliseconds."""
PURGE_MAX_BATCHES: Final = 100
"""Batches per purge round per kind; a larger backlog drains over the next rounds."""


async def purge_old_data(
    store: Store,
    retention_ms: int | None,
    *,
    batch: int = PURGE_BATCH,
    max_batches: int = PURGE_MAX_BATCHES,
) -> int:
    """Purge old data in short transactions; return how many rows were deleted.

    First idempotency records past their retention, then finished reservations and events
    older than ``retention_ms`` (``None``: keep them). Each batch is its own transaction of
    at most ``batch`` rows; between batches the event loop serves requests and other
    processes take the write lock.
    """
    total = 0
    for _ in range(max_batches):
        done = await store.purge_idempotency(batch)
        total += done
        if done < batch:
            break
        await asyncio.sleep(0)
    if isinstance(store, EvidenceStore):  # envelopes past their own retention
        for _ in range(max_batches):
            done = await store.purge_evidence(batch)
            total += done
            if done < batch:
                break
            await asyncio.sleep(0)
    if retention_ms is not None and isinstance(store, RetentionPurger):
        for _ in range(max_batches):
            done = await store.purge_finished(retention_ms, batch)
            total += done
            if done < batch:
                break
            await asyncio.sleep(0)
    return total


async def run_sweeper(
    store: Store,
    interval_s: float,
    *,
    retention_ms: int | None = DEFAULT_RETENTION_DAYS * ledger.DAY_MS,
    purge_every_s: float = PURGE_EVERY_S,
    health: StoreHealth | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Expire due reservations every ``interval_s`` and purge old data, forever.

    Every ``purge_every_s`` it purges expired idempotency records and (unless ``retention_ms``
    is ``None``) finished reservations and events older than ``retention_ms`` (see
    :func:`purge_old_data`). An unavailable store is reported to ``health`` (one log line per
    outage) instead of logging a traceback every round; a round that succeeds ends the outage.
    """
    health = health or StoreHealth(store)
    purge_every = max(1, round(purge_every_s / interval_s))
    ticks = 0
    while True:
        await asyncio.sleep(interval_s)
        try:
            for _ in range(50):  # a backlog drains in batches, yielding between them
                expired = await store.expire_due(200)
                if metrics is not None:
                    metrics.expired(expired)
                if expired < 200:
                    break
                await asyncio.sleep(0)
            if isinstance(store, EvidenceStore):  # envelopes written since the last round
                await store.index_evidence()
        except Exception as exc:  # keep sweeping; one failure must not stop expiry
            _background_failure(health, exc, "expiry sweep failed")
        else:
            health.succeeded(wrote=False)  # a sweep with nothing due only reads
            await _flush_outage_events(health)
        ticks += 1
        if ticks % purge_every == 0:
            try:
                await store.expire_api_keys()  # keys past expires_at: EXPIRED, with an event
                await purge_old_data(store, retention_ms)
            except Exception as exc:  # the next round tries again; expiry goes on meanwhile
                _background_failure(health, exc, "retention purge failed")
            else:
                health.succeeded()  # the purge writes
                await _flush_outage_events(health)


async def _flush_outage_events(health: StoreHealth) -> None:
    """Write the outage events kept while the store was down (see :class:`StoreHealth`)."""
    try:
        await health.flush()
    except Exception:
        logger.exception("could not record the store outage events")


def _background_failure(health: StoreHealth, exc: Exception, what: str) -> None:
    if health.is_unavailable(exc):
        health.failed(exc, request=False)
    else:
        logger.exception(what)


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    """Settings of the webhook dispatcher (see :mod:`runcycles_server.webhooks.dispatch`)."""

    poll_interval_s: float = 1.0
    lease_ms: int = 60_000
    timeout_s: float = 10.0
    max_age_ms: int = ledger.DAY_MS
    resolver: Resolver = system_resolver
    transport: Any = None
    """An ``httpx.AsyncBaseTransport`` for the deliveries (a custom CA, a test server)."""


_DELIVERY_OUTCOMES: Final = {
    "success": "SUCCESS",
    "retry": "RETRYING",
    "failed": "FAILED",
    "refused": "REFUSED",
}
"""The dispatcher's attempt outcomes as ``cycles_webhook_deliveries_total`` labels."""


def create_app(
    store: Store,
    *,
    admin_api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    sweep_interval_s: float | None = 1.0,
    close_store: bool = True,
    rate_limit_per_s: float | None = None,
    retention_days: float | None = DEFAULT_RETENTION_DAYS,
    registry_requests_per_minute: int | None = REGISTRY_REQUESTS_PER_MINUTE,
    metrics: bool = False,
    metrics_public: bool = False,
    metrics_top_scopes: int = DEFAULT_TOP_SCOPES,
    detectors: DetectorConfig | None = DetectorConfig(),  # noqa: B008 (frozen)
    webhook_options: WebhookOptions | None = None,
    evidence: Issuer | None = None,
    evidence_requests_per_minute: int | None = PUBLIC_REQUESTS_PER_MINUTE,
    console: bool = True,
    webhook_key: SecretBox | None = None,
) -> Starlette:
    """Build the ASGI app.

    Args:
        store: where the ledger lives (e.g. ``SqliteStore``).
        admin_api_key: the ``X-Admin-API-Key`` secret; ``None`` disables the admin plane.
        max_body_bytes: larger request bodies get 413.
        sweep_interval_s: how often expired reservations are swept (``None``: never; tests
            call ``store.expire_due()`` themselves).
        close_store: close the store when the app shuts down.
        rate_limit_per_s: requests per second allowed per tenant in this process (a token
            bucket of the same size; ``None``: no limit). See :mod:`runcycles_server.ratelimit`.
        retention_days: finished reservations (with their idempotency records) and event
            records are deleted this many days after their deadline / creation by the sweeper
            (``None``: kept forever). Idempotency records are purged at their own retention
            either way (see ``ledger.RETAIN_*``).
        registry_requests_per_minute: requests a minute each client address may make to the
            public ``/v1/action-kinds`` endpoints (``None``: no limit); see
            :mod:`runcycles_server.governance_api`.
        metrics: serve ``GET /metrics`` (Prometheus) and count requests for it; off, no
            request pays anything for metrics. See :mod:`runcycles_server.metrics` and
            ``docs/metrics.md``.
        metrics_public: serve ``GET /metrics`` without credentials (aggregate series only;
            the per-budget ones still need the admin key).
        metrics_top_scopes: budgets reported by ``cycles_budget_utilization_ratio`` (the
            most used ones, 0 to 10000).
        detectors: parameters of the event monitor (aggregated ``reservation.denied`` and
            ``api_key.auth_failed``, burn-rate and rate-spike detectors; see
            :mod:`runcycles_server.monitor`), started beside the sweeper (``None``: no
            tallies and no monitor). With ``sweep_interval_s=None`` it is not started either:
            tests call ``app.state.monitor.tick()``.
        webhook_options: the webhook dispatcher's settings (poll interval, lease, timeouts,
            resolver; ``None``: the defaults). The dispatcher runs with the sweeper
            (``sweep_interval_s`` ``None`` runs neither: tests call
            ``app.state.webhook_dispatcher.run_once()``).
        evidence: signs every decide, reserve, commit, release and denial (see
            :mod:`runcycles_server.evidence` and ``docs/evidence.md``); ``None``: evidence off
            (no ``cycles_evidence`` on responses, the two evidence routes answer 404).
            ``cycles serve`` turns it on unless given ``--no-evidence``.
        evidence_requests_per_minute: per-address limit of the two public evidence routes
            (``None``: no limit).
        console: serve the operator console at ``/console`` (see
            :mod:`runcycles_server.console` and ``docs/console.md``); its routes sit behind
            the router, never on the runtime's fast routes.
        webhook_key: seals webhook signing secrets and custom header values at rest (see
            :mod:`runcycles_server.webhooks.sealing`); ``None`` stores them plain.
            ``cycles serve`` always passes one (created on first start).

    Raises:
        ValueError: if ``rate_limit_per_s`` is not a positive number, ``retention_days``
            is less than 1, or ``metrics_top_scopes`` is out of range.
    """
    if retention_days is not None and not retention_days >= 1:
        raise ValueError(
            f"retention_days must be at least 1 (reserve replays are kept 24 h), not "
            f"{retention_days}; pass None to keep finished reservations forever"
        )
    retention_ms = None if retention_days is None else int(retention_days * ledger.DAY_MS)

    limiter = TokenBucketLimiter(rate_limit_per_s) if rate_limit_per_s is not None else None
    health = StoreHealth(store)
    signals = Signals() if detectors is not None else None
    latency = LatencyWatch() if detectors is not None else None
    monitor = (
        Monitor(store, signals, detectors, health=health, latency=latency)
        if signals is not None
        else None
    )
    auth = Authenticator(store, admin_api_key, limiter=limiter, signals=signals)
    meter = Metrics(top_scopes=metrics_top_scopes, public=metrics_public) if metrics else None
    if isinstance(store, OperationStore):
        store.issuer = evidence
    elif evidence is not None:
        raise ValueError(f"{type(store).__name__} cannot emit evidence")
    evidence_api = EvidenceApi(store, evidence, requests_per_minute=evidence_requests_per_minute)
    runtime = Runtime(store, auth, max_body_bytes, health, meter, evidence_api)
    runtime.signals = signals
    admin = Admin(store, auth, max_body_bytes)
    governance = GovernanceApi(
        store, auth, max_body_bytes, registry_requests_per_minute=registry_requests_per_minute
    )
    events = EventsApi(store, auth)
    extra_routes = MetricsApi(store, auth, health, meter).routes() if meter is not None else []
    overview = OverviewApi(store, auth)
    options = webhook_options or WebhookOptions()
    webhook_storage = storage_for(store)
    webhook_storage.box = webhook_key
    dispatcher = Dispatcher(
        store,
        webhook_storage,
        resolver=options.resolver,
        poll_interval_s=options.poll_interval_s,
        lease_ms=options.lease_ms,
        timeout_s=options.timeout_s,
        max_age_ms=options.max_age_ms,
        retention_ms=retention_ms,
        transport=options.transport,
        health=health,
    )
    webhooks = WebhooksApi(store, dispatcher.storage, dispatcher, auth, max_body_bytes)
    if monitor is not None and detectors is not None:
        defaults = detectors
        dispatcher.detectors = defaults
        monitor.profiles = lambda: detector_profiles(webhook_storage, defaults)
    if meter is not None:
        record = meter.record_webhook_delivery
        dispatcher.on_delivery = lambda outcome: record(_DELIVERY_OUTCOMES[outcome])
    if isinstance(store, OperationStore):
        store.on_events = dispatcher.wake
    console_routes = Console(clock=store.clock).routes() if console else []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = (
            asyncio.create_task(
                run_sweeper(
                    store,
                    sweep_interval_s,
                    retention_ms=retention_ms,
                    health=health,
                    metrics=meter,
                )
            )
            if sweep_interval_s is not None
            else None
        )
        watcher = (
            asyncio.create_task(monitor.run())
            if monitor is not None and sweep_interval_s is not None
            else None
        )
        dispatch = asyncio.create_task(dispatcher.run()) if sweep_interval_s is not None else None
        try:
            yield
        finally:
            if dispatch is not None:  # let its round finish (a claim is never cut in half)
                dispatcher.stop()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(dispatch), DISPATCH_STOP_GRACE_S)
            for running in (task, watcher, dispatch):
                if running is not None:
                    running.cancel()  # nothing when it has returned
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
            if watcher is not None and monitor is not None:
                try:  # the refusals still held back by their window
                    await monitor.tick(final=True)
                except Exception:
                    logger.warning("could not record the last refusal events", exc_info=True)
            if health.pending and health.down_since is None:
                try:  # an outage that ended just before the stop
                    await health.flush()
                except Exception:
                    logger.warning("could not record the store outage events", exc_info=True)
            await dispatcher.close()
            if close_store:
                await store.close()

    app = Starlette(
        routes=[
            *runtime.routes(),
            *admin.routes(),
            *BulkApi(store, auth, max_body_bytes).routes(),
            *KeysApi(store, auth, max_body_bytes).routes(),
            *governance.routes(),
            *events.routes(),
            *extra_routes,
            *overview.routes(),
            *webhooks.routes(),
            *evidence_api.routes(),
            *console_routes,
        ],
        exception_handlers={
            LedgerError: _ledger_error,
            HTTPException: _http_error,
            SealingError: _sealing_error,
        },
        lifespan=lifespan,
    )
    if meter is not None:
        meter.templates.update(
            (route.endpoint, route.path) for route in app.routes if isinstance(route, Route)
        )
    app.add_middleware(
        ContextMiddleware,
        fast_route=runtime.fast_route,
        health=health,
        metrics=meter,
        latency=latency,
        timed=runtime.timed_endpoints(),
    )
    app.state.store = store
    app.state.webhook_dispatcher = dispatcher
    app.state.store_health = health
    app.state.metrics = meter  # the webhook dispatcher's seam (None: metrics off)
    app.state.monitor = monitor
    return app
