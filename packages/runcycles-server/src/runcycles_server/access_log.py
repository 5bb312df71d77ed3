"""Structured access logs: one JSON line per HTTP request on the ``runcycles_server.access`` logger.

::

    {"ts":"2026-11-22T06:30:00.123Z","method":"POST","path":"/v1/reservations/{reservation_id}/commit",
     "status":200,"duration_ms":1.84,"request_id":"5f0c...","tenant":"acme"}

A request whose body did not arrive within ``--body-timeout`` is logged with ``"status":408`` and
``"timeout":"body"``; connections closed before a request reached the app (header timeout,
connection cap) are logged by :mod:`runcycles_server.connections`.

``path`` is the route template (``{reservation_id}`` rather than the id), so lines group by
endpoint; ``tenant`` is present once a tenant API key authenticated the request. ``cycles serve``
installs :class:`AccessLogMiddleware` at log level ``info`` and below unless ``--no-access-log``
is given; when it is not installed it costs nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any, Final

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ACCESS_LOGGER",
    "TIMEOUT_STATE_KEY",
    "AccessLogMiddleware",
    "configure_access_logger",
    "route_template",
]

ACCESS_LOGGER: Final = "runcycles_server.access"
TIMEOUT_STATE_KEY: Final = "timeout"
"""``scope["state"]`` key the connection layer sets to ``"body"`` when a request's body timed
out: the request is then logged with status 408 and ``"timeout": "body"``."""


def configure_access_logger(stream: Any = None) -> logging.Logger:
    """Send the access logger's records, as bare JSON lines, to ``stream`` (default stderr).

    Idempotent: calling it again replaces the handler instead of adding a second one.
    """
    log = logging.getLogger(ACCESS_LOGGER)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


class AccessLogMiddleware:
    """Pure ASGI middleware logging one JSON line per HTTP request, after the response is sent.

    Install it outermost (after the app's own middleware) so it sees the request id and the
    tenant that the inner middleware and authentication record in ``scope["state"]``.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the wrapped app and log the request once it finished (or failed)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            record: dict[str, Any] = {
                "ts": _now_iso(),
                "method": scope["method"],
                "path": route_template(scope),
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "request_id": state.get("request_id"),
            }
            tenant = state.get("tenant")
            if tenant:
                record["tenant"] = tenant
            timeout = state.get(TIMEOUT_STATE_KEY)
            if timeout:  # the connection layer closed the request (see connections.py)
                record["status"] = 408
                record["timeout"] = timeout
            self.logger.info(orjson.dumps(record).decode())


def route_template(scope: Scope) -> str:
    """Return the matched route's template (``/v1/reservations/{reservation_id}``), else the path.

    Uses the router's ``scope["route"]`` when present; requests dispatched without the router
    still name their ``path_params``, whose values are put back as ``{name}``.
    """
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    path: str = scope["path"]
    params = scope.get("path_params")
    if not params:
        return path
    names = {str(value): name for name, value in params.items()}
    return "/".join(f"{{{names[part]}}}" if part in names else part for part in path.split("/"))


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
