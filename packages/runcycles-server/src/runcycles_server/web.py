"""HTTP plumbing shared by the runtime and admin routes.

* :class:`ContextMiddleware` (pure ASGI): gives every request an ``X-Request-Id`` and an
  ``X-Cycles-Trace-Id`` (from a valid ``traceparent``, else a valid ``X-Cycles-Trace-Id``, else
  random), echoes them and ``X-Cycles-Tenant`` on every response, and turns an unexpected
  exception into a 500 ``ErrorResponse`` (never a bare traceback).
* :func:`parse_body`: size-limited body, strict validation with a pydantic model; any problem is
  a 400 ``INVALID_REQUEST`` naming the field (413 for an oversized body).
* :func:`error_response`: the ``ErrorResponse`` body with ``request_id`` and ``trace_id``.
* Authentication helpers for tenant keys (``X-Cycles-API-Key``) and the admin key
  (``X-Admin-API-Key``).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runcycles_server import ledger
from runcycles_server.ledger import ApiKeyRow, LedgerError
from runcycles_server.stores.base import Store

logger = logging.getLogger("runcycles_server")

JSON: Final = "application/json"
DEFAULT_MAX_BODY_BYTES: Final = 1_048_576

_TRACE_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")
_TRACEPARENT_RE: Final = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16

ModelT = TypeVar("ModelT", bound=BaseModel)


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
        value = secrets.token_hex(16)
        if value != _ZERO_TRACE:
            return value


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class ContextMiddleware:
    """Request id, trace id and tenant headers on every response; 500s as ``ErrorResponse``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the wrapped app with the request context set up."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        trace_id = trace_id_from_headers(
            _header(scope, b"traceparent"), _header(scope, b"x-cycles-trace-id")
        )
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["trace_id"] = trace_id
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.append((b"x-cycles-trace-id", trace_id.encode()))
                tenant = state.get("tenant")
                if tenant:
                    headers.append((b"x-cycles-tenant", str(tenant).encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            logger.exception("unhandled error (request_id=%s)", request_id)
            if started:
                raise
            body = ledger.dumps(
                {
                    "error": "INTERNAL_ERROR",
                    "message": "internal server error; retry with the same idempotency key",
                    "request_id": request_id,
                    "trace_id": trace_id,
                }
            )
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", JSON.encode()),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_headers({"type": "http.response.body", "body": body})


def request_ids(request: Request) -> tuple[str, str]:
    """Return ``(request_id, trace_id)`` set by :class:`ContextMiddleware`."""
    state = request.scope.get("state", {})
    return state.get("request_id") or str(uuid.uuid4()), state.get("trace_id") or secrets.token_hex(
        16
    )


def error_response(request: Request, error: LedgerError) -> Response:
    """Render a :class:`LedgerError` as an ``ErrorResponse``."""
    request_id, trace_id = request_ids(request)
    body: dict[str, Any] = {
        "error": error.code,
        "message": error.message,
        "request_id": request_id,
        "trace_id": trace_id,
    }
    if error.details:
        body["details"] = error.details
    return Response(ledger.dumps(body), status_code=error.status, media_type=JSON)


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
    """
    declared = request.headers.get("content-length")
    too_big = LedgerError(
        "INVALID_REQUEST",
        f"request body is larger than the {max_bytes}-byte limit; send a smaller body "
        "(large metadata belongs elsewhere)",
        status=413,
    )
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """Read and strictly validate a JSON body.

    Raises:
        LedgerError: INVALID_REQUEST (400) naming the offending fields, or 413.
    """
    raw = await read_body(request, max_bytes)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, fields = describe_validation_error(exc)
        raise LedgerError("INVALID_REQUEST", message, details={"errors": fields}) from None


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


class Authenticator:
    """Checks ``X-Cycles-API-Key`` against the store and ``X-Admin-API-Key`` against config."""

    def __init__(self, store: Store, admin_api_key: str | None) -> None:
        self.store = store
        self._admin_key = admin_api_key.encode() if admin_api_key else None

    async def tenant(self, request: Request, permission: str | None = None) -> Principal:
        """Authenticate a tenant key (holding ``permission``, if given); set ``X-Cycles-Tenant``.

        Raises:
            LedgerError: UNAUTHORIZED (401) for a missing, unknown, revoked or expired key;
                FORBIDDEN (403) when the key lacks ``permission``.
        """
        secret = request.headers.get("x-cycles-api-key")
        if not secret:
            raise LedgerError(
                "UNAUTHORIZED",
                "missing X-Cycles-API-Key header; send the tenant API key you got from "
                "POST /v1/admin/api-keys (or `cycles serve --dev`)",
            )
        record = await self.store.authenticate(ledger.hash_api_key(secret))
        if record is None:
            raise LedgerError("UNAUTHORIZED", "X-Cycles-API-Key is not a valid API key")
        key = record.key
        if key.status != "ACTIVE":
            raise LedgerError(
                "UNAUTHORIZED",
                f"API key {key.key_prefix}... is {key.status}"
                + (f" ({key.revoked_reason})" if key.revoked_reason else "")
                + "; ask an operator for a new key",
            )
        if key.expires_at_ms is not None and key.expires_at_ms <= self.store.clock():
            raise LedgerError(
                "UNAUTHORIZED", f"API key {key.key_prefix}... has expired; create a new key"
            )
        request.scope.setdefault("state", {})["tenant"] = key.tenant_id
        if permission is not None and not has_permission(key.permissions, permission):
            raise LedgerError(
                "FORBIDDEN",
                f"API key {key.key_prefix}... lacks the {permission} permission; ask an operator "
                "for a key that has it",
            )
        return Principal(key.tenant_id, key)

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
        if not hmac.compare_digest(secret.encode(), self._admin_key):
            raise LedgerError("UNAUTHORIZED", "X-Admin-API-Key is not valid")
        return Principal(None)

    async def admin_or_tenant(self, request: Request, permission: str | None = None) -> Principal:
        """Use the admin key if ``X-Admin-API-Key`` is sent, else a tenant key."""
        if "x-admin-api-key" in request.headers:
            return self.admin(request)
        return await self.tenant(request, permission)
