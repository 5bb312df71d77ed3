"""The console's way to the server's own JSON API: in-process HTTP with the session's key.

Every page and action of the console is one or more calls to the public API (``/v1/...``)
made through :class:`httpx.ASGITransport` straight into this app: no socket, but the same
routing, authentication, validation, tenant isolation, events and audit log as any client
gets. The console therefore cannot do anything its key could not do with ``curl``, and an
admin action from the console is recorded exactly as the same call from the CLI would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp

from runcycles_server.console.sessions import KeyKind
from runcycles_server.web import request_ids

INTERNAL_BASE_URL: Final = "http://console.internal"
CALL_TIMEOUT_S: Final = 30.0


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
