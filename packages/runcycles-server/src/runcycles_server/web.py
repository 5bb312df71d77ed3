"""HTTP plumbing shared by the runtime and admin routes.

* :class:`ContextMiddleware` (pure ASGI): gives every request an ``X-Request-Id`` and an
  ``X-Cycles-Trace-Id`` (from a valid ``traceparent``, else a valid ``X-Cycles-Trace-Id``, else
  random), echoes them and ``X-Cycles-Tenant`` on every response, and turns an unexpected
  exception into a 500 ``ErrorResponse`` (never a bare traceback), and an unavailable store
  into a 503 with ``Retry-After`` (see :mod:`runcycles_server.health`). A client that hangs up
  before its body arrived (``ClientDisconnect``) is no error: it is recorded as status 499.
  It also dispatches the hot runtime routes (reserve, commit, ...) straight to their handlers
  (see :data:`FastRoute`), skipping Starlette's router and exception middleware, which cost
  more per request than the handlers' own Python; every other path goes through Starlette
  unchanged.
* :func:`parse_body`: size-limited body, strict validation with a pydantic model; any problem is
  a 400 ``INVALID_REQUEST`` naming the field (413 for an oversized body), control characters in
  ids and names included (see :mod:`runcycles_server.query`).
* :func:`error_response`: the ``ErrorResponse`` body with ``request_id`` and ``trace_id``.
* Authentication helpers for tenant keys (``X-Cycles-API-Key``) and the admin key
  (``X-Admin-API-Key``). Successful tenant-key lookups are cached per process for
  :data:`AUTH_CACHE_TTL_S` (1 s): a revocation made through this process's store takes effect at
  once, one made by another process (another worker, the CLI) within one second.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runcycles_server import ledger
from runcycles_server.events.context import CURRENT as _event_context
from runcycles_server.events.context import EventContext, set_actor
from runcycles_server.events.latency import LatencyWatch
from runcycles_server.events.signals import Signals
from runcycles_server.health import RETRY_AFTER_S, StoreHealth
from runcycles_server.ledger import ApiKeyRow, LedgerError
from runcycles_server.metrics import Metrics
from runcycles_server.query import check_body_ids
from runcycles_server.ratelimit import RATE_LIMIT_STATE_KEY, TokenBucketLimiter
from runcycles_server.stores.base import Store

logger = logging.getLogger("runcycles_server")

JSON: Final = "application/json"
DEFAULT_MAX_BODY_BYTES: Final = 1_048_576
CLIENT_CLOSED_REQUEST: Final = 499
EVIDENCE_OMITTED_HEADER: Final = "X-Cycles-Evidence-Omitted"
"""Set on a decision answered without the ``cycles_evidence`` it should carry, saying why."""
"""Status recorded (access log) for a request whose client hung up before it was read."""

_TRACE_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")
_TRACEPARENT_RE: Final = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16

ModelT = TypeVar("ModelT", bound=BaseModel)

FastRoute = Callable[[Scope], "Callable[[Request], Awaitable[Response]] | None"]
"""Picks the handler of a hot route for a request scope (setting ``path_params``), or ``None``."""

_JSON_HEADER: Final = (b"content-type", JSON.encode())


def new_request_id() -> str:
    """Return a random (version 4) UUID string, as ``str(uuid.uuid4())`` but cheaper."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def trace_id_from_headers(traceparent: str | None, cycles_trace_id: str | None) -> str:
    """Pick the trace id: valid ``traceparent``, else valid ``X-Cycles-Trace-Id``, else random.

    Malformed or all-zero values are ignored, never rejected.
    """
    if traceparent:
        match = _TRACEPARENT_RE.match(traceparent.strip())
        if match and match.group(1) != _ZERO_TRACE and match.group(2) != _ZERO_SPAN:
            return match.group(1)
    if cycles_trace_id:
        value = cycles_trace_id.strip()
        if _TRACE_ID_RE.match(value) and value != _ZERO_TRACE:
            return value
    while True:
        value = os.urandom(16).hex()
        if value != _ZERO_TRACE:
            return value


def _trace_headers(scope: Scope) -> tuple[str | None, str | None]:
    """Return the first ``traceparent`` and ``X-Cycles-Trace-Id`` header values (one pass)."""
    traceparent = cycles_trace = None
    for key, value in scope["headers"]:
        if key == b"traceparent":
            if traceparent is None:
                traceparent = value.decode("latin-1")
        elif key == b"x-cycles-trace-id" and cycles_trace is None:
            cycles_trace = value.decode("latin-1")
    return traceparent, cycles_trace


class ContextMiddleware:
    """Request id, trace id and tenant headers on every response; 500s as ``ErrorResponse``.

    Args:
        app: the wrapped ASGI app (the Starlette app's router stack).
        fast_route: picks the handler of a hot route (see :data:`FastRoute`); such requests
            run their handler directly, with a :class:`LedgerError` rendered by
            :func:`error_response` exactly as the app's exception handler would.
        health: recognizes a store outage: such a failure is answered ``503`` with
            ``Retry-After`` and counted (one log line per outage), not logged as a traceback.
        metrics: counts every answered request by endpoint, method and status with its
            ``time.perf_counter()`` duration (``None``: metrics off; nothing is timed).
        latency: the histogram the requests to ``timed`` endpoints (the runtime routes) are
            counted into, for ``system.high_latency`` (``None``: not timed).
        timed: the endpoints whose latency counts.
    """

    def __init__(
        self,
        app: ASGIApp,
        fast_route: FastRoute | None = None,
        health: StoreHealth | None = None,
        metrics: Metrics | None = None,
        latency: LatencyWatch | None = None,
        timed: Collection[object] = (),
    ) -> None:
        self.app = app
        self.fast_route = fast_route
        self.health = health
        self.metrics = metrics
        self.latency = latency
        self.timed = frozenset(timed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the wrapped app (or a hot route's handler) with the request context set up."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        latency = self.latency
        began = perf_counter() if metrics is not None or latency is not None else 0.0
        request_id = new_request_id()
        trace_id = trace_id_from_headers(*_trace_headers(scope))
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = request_id
        state["trace_id"] = trace_id
        started = False
        status = 500
        handler: Callable[[Request], Awaitable[Response]] | None = None

        def context_headers() -> list[tuple[bytes, bytes]]:
            extra = [
                (b"x-request-id", request_id.encode()),
                (b"x-cycles-trace-id", trace_id.encode()),
            ]
            tenant = state.get("tenant")
            if tenant:
                extra.append((b"x-cycles-tenant", str(tenant).encode()))
                limit_headers = state.get(RATE_LIMIT_STATE_KEY)  # set only with a rate limit
                if limit_headers:
                    extra.extend(limit_headers)
            return extra

        async def send_with_headers(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *context_headers()]
            await send(message)

        client = scope.get("client")
        context = EventContext(
            request_id=request_id,
            trace_id=trace_id,
            actor_type="system",
            source_ip=client[0] if client else None,
        )
        token = _event_context.set(context)
        try:
            handler = self.fast_route(scope) if self.fast_route is not None else None
            if handler is None:
                await self.app(scope, receive, send_with_headers)
                return
            request = Request(scope, receive)
            try:
                response = await handler(request)
            except LedgerError as exc:
                response = error_response(request, exc)
            started = True
            status = response.status_code
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*response.raw_headers, *context_headers()],
                }
            )
            await send({"type": "http.response.body", "body": response.body})
        except ClientDisconnect:
            # The client hung up before its request was read: nothing was applied and nothing
            # is wrong with the server, so no 500 and no error log. The access log records the
            # request with status 499 ("client closed request"); the answer goes nowhere.
            logger.debug(
                "client disconnected before its request was read (request_id=%s)", request_id
            )
            if not started:
                await send_with_headers(
                    {"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []}
                )
                await send_with_headers({"type": "http.response.body", "body": b""})
        except Exception as exc:
            status, extra = 500, []
            message = "internal server error; retry with the same idempotency key"
            if self.health is not None and self.health.is_unavailable(exc):
                self.health.failed(exc)  # one log line per outage, no traceback
                status, extra = 503, [(b"retry-after", str(RETRY_AFTER_S).encode())]
                message = (
                    "the ledger store is unavailable; the request may or may not have been "
                    "applied: retry it with the same idempotency key after Retry-After seconds"
                )
            else:
                logger.exception("unhandled error (request_id=%s)", request_id)
            if started:
                raise
            body = ledger.dumps(
                {
                    "error": "INTERNAL_ERROR",
                    "message": message,
                    "request_id": request_id,
                    "trace_id": trace_id,
                }
            )
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        _JSON_HEADER,
                        (b"content-length", str(len(body)).encode()),
                        *extra,
                    ],
                }
            )
            await send_with_headers({"type": "http.response.body", "body": body})
        finally:
            _event_context.reset(token)
            if metrics is not None or latency is not None:
                # the route the router matched, if it was not a hot one
                endpoint = handler if handler is not None else scope.get("endpoint")
                took = perf_counter() - began
                if metrics is not None:
                    metrics.observe(endpoint, scope["method"], status, took)
                if latency is not None and endpoint in self.timed:
                    latency.observe(took)


def request_ids(request: Request) -> tuple[str, str]:
    """Return ``(request_id, trace_id)`` set by :class:`ContextMiddleware`."""
    state = request.scope.get("state") or {}
    return state.get("request_id") or new_request_id(), state.get("trace_id") or secrets.token_hex(
        16
    )


def error_body(request: Request, error: LedgerError) -> dict[str, Any]:
    """The ``ErrorResponse`` body of a :class:`LedgerError` (without ``cycles_evidence``)."""
    request_id, trace_id = request_ids(request)
    body: dict[str, Any] = {
        "error": error.code,
        "message": error.message,
        "request_id": request_id,
        "trace_id": trace_id,
    }
    if error.details:
        body["details"] = error.details
    return body


def error_response(request: Request, error: LedgerError) -> Response:
    """Render a :class:`LedgerError` as an ``ErrorResponse``."""
    body = error_body(request, error)
    if error.evidence is not None:
        body["cycles_evidence"] = error.evidence
    response = Response(ledger.dumps(body), status_code=error.status, media_type=JSON)
    if error.evidence_omitted is not None:
        response.headers[EVIDENCE_OMITTED_HEADER] = error.evidence_omitted
    return response


def json_response(body: bytes | Mapping[str, Any], status: int = 200) -> Response:
    """Return a JSON response from raw bytes or a mapping."""
    raw = body if isinstance(body, bytes) else ledger.dumps(body)
    return Response(raw, status_code=status, media_type=JSON)


# --------------------------------------------------------------------------------------------
# Bodies


def describe_validation_error(exc: ValidationError) -> tuple[str, list[dict[str, str]]]:
    """Turn a pydantic error into one readable sentence plus a per-field list."""
    fields: list[dict[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"]) or "body"
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown field (check its spelling against the API reference)"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "json_invalid":
            loc, message = "body", f"not valid JSON ({err['msg']})"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            message = "must be a JSON object"
        else:
            message = str(err["msg"])
        fields.append({"field": loc, "message": message})
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    if len(fields) > 5:
        summary += f"; and {len(fields) - 5} more"
    return f"invalid request: {summary}", fields


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Read the request body, refusing more than ``max_bytes`` with 413.

    Raises:
        LedgerError: PAYLOAD_TOO_LARGE (413).
        ClientDisconnect: the client went away before sending the whole body.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_big(max_bytes)
    if getattr(request, "_body", None) is not None:  # already read with request.body()
        cached = await request.body()
        if len(cached) > max_bytes:
            raise _too_big(max_bytes)
        return cached
    receive = request.receive
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the usual case: one message
        if len(body) > max_bytes:
            raise _too_big(max_bytes)
        return body
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise _too_big(max_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        message = await receive()


def _too_big(max_bytes: int) -> LedgerError:
    return LedgerError(
        "INVALID_REQUEST",
        f"request body is larger than the {max_bytes}-byte limit; send a smaller body "
        "(large metadata belongs elsewhere)",
        status=413,
    )


async def parse_body(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Read and strictly validate a JSON body.

    Ids and names in the body (see :data:`runcycles_server.query.ID_FIELDS`) must not hold
    control characters.

    Raises:
        LedgerError: INVALID_REQUEST (400) naming the offending fields, or 413.
    """
    raw = await read_body(request, max_bytes)
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        message, fields = describe_validation_error(exc)
        raise LedgerError("INVALID_REQUEST", message, details={"errors": fields}) from None
    # A control character reaches a JSON string only escaped (a backslash), as DEL (0x7f) or
    # as a C1 character (UTF-8 0xc2 0x80-0x9f): bodies without those bytes skip the walk.
    # (An int ``in`` bytes is one memchr: three cost about 60 ns on a typical body.)
    if 0x5C in raw or 0x7F in raw or 0xC2 in raw:
        check_body_ids(body)
    return body


def check_idempotency_header(request: Request, body_key: str) -> None:
    """Refuse an ``X-Idempotency-Key`` header that differs from the body's key (400).

    Raises:
        LedgerError: INVALID_REQUEST.
    """
    header = request.headers.get("x-idempotency-key")
    if header is not None and header != body_key:
        raise LedgerError(
            "INVALID_REQUEST",
            "X-Idempotency-Key header does not match idempotency_key in the body; send the same "
            "key in both, or only in the body",
        )


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """Parse an integer query parameter within ``[lo, hi]``.

    Raises:
        LedgerError: INVALID_REQUEST naming the parameter.
    """
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise LedgerError(
            "INVALID_REQUEST", f"query parameter {name} must be an integer from {lo} to {hi}"
        )
    return value


# --------------------------------------------------------------------------------------------
# Authentication


@dataclass(slots=True)
class Principal:
    """Who is calling: a tenant key (``tenant_id`` set) or the admin key (``tenant_id=None``)."""

    tenant_id: str | None
    key: ApiKeyRow | None = None

    @property
    def is_admin(self) -> bool:
        """Whether the caller used the admin key."""
        return self.tenant_id is None


def has_permission(granted: list[str], needed: str) -> bool:
    """Return whether ``granted`` satisfies ``needed``.

    ``admin:read`` and ``admin:write`` are wildcards for every ``*:read`` and ``*:write``
    permission, as the governance spec defines.
    """
    if needed in granted:
        return True
    if needed.endswith(":read") and "admin:read" in granted:
        return True
    return needed.endswith(":write") and "admin:write" in granted


AUTH_CACHE_TTL_S: Final = 1.0
"""How long a successful API key lookup is reused: the longest a key revoked by *another*
process (another worker, the CLI) keeps working here. Revocations through this process's store
invalidate the cache at once (see ``auth_epoch`` below)."""
AUTH_CACHE_MAX_KEYS: Final = 4096
"""Most cached keys; the cache is emptied when full (it refills from the store)."""


class Authenticator:
    """Checks ``X-Cycles-API-Key`` against the store and ``X-Admin-API-Key`` against config.

    Tenant keys found ACTIVE are cached by secret for :data:`AUTH_CACHE_TTL_S`, so the hot path
    neither hashes the secret nor reads the store on every request. Unknown secrets are never
    cached. A store that exposes an integer ``auth_epoch`` (bumped whenever it revokes a key or
    closes a tenant) empties the cache when the value changes. Status and expiry are checked
    on every request, the cached row included.

    Args:
        store: where API keys live.
        admin_api_key: the ``X-Admin-API-Key`` secret (``None``: admin plane off).
        monotonic_s: the clock of the cache's time-to-live (seconds; tests inject one).
        limiter: per-tenant rate limit applied to every tenant-key request (``None``: off);
            see :mod:`runcycles_server.ratelimit`.
        signals: where authentications and refused keys are tallied (``None``: nowhere); a
            refusal is aggregated into ``api_key.auth_failed`` events off the request path
            (see :mod:`runcycles_server.events.signals`).
    """

    def __init__(
        self,
        store: Store,
        admin_api_key: str | None,
        *,
        monotonic_s: Callable[[], float] = time.monotonic,
        limiter: TokenBucketLimiter | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.signals = signals
        self._admin_key = admin_api_key.encode() if admin_api_key else None
        self._monotonic_s = monotonic_s
        self._keys: dict[str, tuple[float, ApiKeyRow]] = {}
        self._epoch: object = getattr(store, "auth_epoch", None)

    async def _key_for(self, secret: str) -> ApiKeyRow | None:
        """Return the API key with this secret (cached when ACTIVE), or ``None``."""
        now = self._monotonic_s()
        epoch = getattr(self.store, "auth_epoch", None)
        if epoch != self._epoch:
            self._keys.clear()
            self._epoch = epoch
        hit = self._keys.get(secret)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = await self.store.authenticate(ledger.hash_api_key(secret))
        if record is None:
            self._keys.pop(secret, None)
            return None
        key = record.key
        if key.status == "ACTIVE" and getattr(self.store, "auth_epoch", None) == epoch:
            if len(self._keys) >= AUTH_CACHE_MAX_KEYS:
                self._keys.clear()
            self._keys[secret] = (now + AUTH_CACHE_TTL_S, key)
        else:
            self._keys.pop(secret, None)
        return key

    async def tenant(self, request: Request, permission: str | None = None) -> Principal:
        """Authenticate a tenant key (holding ``permission``, if given); set ``X-Cycles-Tenant``.

        Raises:
            LedgerError: UNAUTHORIZED (401) for a missing, unknown, revoked or expired key;
                LIMIT_EXCEEDED (429) when a rate limit is on and the tenant is over it;
                FORBIDDEN (403) when the key lacks ``permission``.
        """
        secret = request.headers.get("x-cycles-api-key")
        if not secret:
            self._failed(request, None, "key_missing")
            raise LedgerError(
                "UNAUTHORIZED",
                "missing X-Cycles-API-Key header; send the tenant API key you got from "
                "POST /v1/admin/api-keys (or `cycles serve --dev`)",
            )
        key = await self._key_for(secret)
        if key is None:
            self._failed(request, None, "key_not_found")
            raise LedgerError("UNAUTHORIZED", "X-Cycles-API-Key is not a valid API key")
        if key.status != "ACTIVE":
            self._failed(request, key, f"key_{key.status.lower()}")
            raise LedgerError(
                "UNAUTHORIZED",
                f"API key {key.key_prefix}... is {key.status}"
                + (f" ({key.revoked_reason})" if key.revoked_reason else "")
                + "; ask an operator for a new key",
            )
        if key.expires_at_ms is not None and key.expires_at_ms <= self.store.clock():
            self._failed(request, key, "key_expired")
            raise LedgerError(
                "UNAUTHORIZED", f"API key {key.key_prefix}... has expired; create a new key"
            )
        if self.signals is not None:
            self.signals.authenticated(key.tenant_id)
        state = request.scope.setdefault("state", {})
        state["tenant"] = key.tenant_id
        if self.limiter is not None:
            self.limiter.check(state, key.tenant_id)
        if permission is not None and not has_permission(key.permissions, permission):
            raise LedgerError(
                "FORBIDDEN",
                f"API key {key.key_prefix}... lacks the {permission} permission; ask an operator "
                "for a key that has it",
            )
        set_actor("api_key", key.key_id)
        return Principal(key.tenant_id, key)

    def _failed(self, request: Request, key: ApiKeyRow | None, reason: str) -> None:
        """Tally a refused tenant key (the aggregated ``api_key.auth_failed``)."""
        if self.signals is None:
            return
        client = request.scope.get("client")
        data: dict[str, Any] = {"failure_reason": reason}
        if client:
            data["source_ip"] = client[0]
        if key is not None:
            data.update(key_id=key.key_id, key_name=key.name, new_status=key.status)
        context = _event_context.get()
        if key is None:
            self.signals.auth_failed(None, None, reason, data, context)
            return
        context = context._replace(actor_type="api_key", key_id=key.key_id)
        self.signals.auth_failed(key.tenant_id, key.key_id, reason, data, context)

    def admin(self, request: Request) -> Principal:
        """Authenticate the admin key.

        Raises:
            LedgerError: UNAUTHORIZED (401).
        """
        secret = request.headers.get("x-admin-api-key")
        if self._admin_key is None:
            raise LedgerError(
                "UNAUTHORIZED",
                "the admin API is disabled on this server; start it with --admin-key or "
                "CYCLES_ADMIN_API_KEY",
            )
        if not secret:
            raise LedgerError("UNAUTHORIZED", "missing X-Admin-API-Key header")
        return self.admin_secret(secret, "X-Admin-API-Key")

    def admin_secret(self, secret: str, sent_as: str = "the admin key") -> Principal:
        """Authenticate an admin key secret however it was sent (``sent_as`` names it).

        Raises:
            LedgerError: UNAUTHORIZED (401).
        """
        if self._admin_key is None:
            raise LedgerError(
                "UNAUTHORIZED",
                "the admin API is disabled on this server; start it with --admin-key or "
                "CYCLES_ADMIN_API_KEY",
            )
        if not hmac.compare_digest(secret.encode(), self._admin_key):
            raise LedgerError("UNAUTHORIZED", f"{sent_as} is not valid")
        set_actor("admin")
        return Principal(None)

    async def admin_only(self, request: Request) -> Principal:
        """Authenticate the admin key on a route no tenant key may call.

        A valid tenant key is told so with 403 (it is authenticated, just not allowed here),
        rather than the 401 of a missing credential.

        Raises:
            LedgerError: UNAUTHORIZED (401), or FORBIDDEN (403) for a tenant key.
        """
        if "x-admin-api-key" not in request.headers and "x-cycles-api-key" in request.headers:
            await self.tenant(request)
            raise LedgerError(
                "FORBIDDEN",
                "this route needs the admin key (X-Admin-API-Key); a tenant API key cannot call it",
            )
        return self.admin(request)

    async def admin_or_tenant(self, request: Request, permission: str | None = None) -> Principal:
        """Use the admin key if ``X-Admin-API-Key`` is sent, else a tenant key."""
        if "x-admin-api-key" in request.headers:
            return self.admin(request)
        return await self.tenant(request, permission)
