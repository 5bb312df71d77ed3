"""One HTTP attempt of one delivery: SSRF-checked, pinned to the checked address, signed.

Every attempt resolves the subscription's host again and checks every address against the
security configuration (:mod:`.ssrf`), then connects to exactly the address it checked; the
URL's host stays the ``Host`` header and, for https, the TLS SNI and the name the certificate
must carry (httpx's ``sni_hostname`` request extension). Redirects are not followed (a 3xx is
a failure: a redirect could point anywhere), response bodies are read up to
:data:`RESPONSE_CAP` bytes, and each attempt is signed afresh (a new timestamp), with every
live secret of the subscription (:func:`runcycles.sign_delivery`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import orjson

from runcycles.webhooks import sign_delivery
from runcycles_server.events import EventRecord, event_body
from runcycles_server.webhooks.models import SecurityConfig, SubscriptionRow
from runcycles_server.webhooks.ssrf import Resolver, UrlRefused, resolve_target

if TYPE_CHECKING:
    import httpx

RESPONSE_CAP: Final = 4096
"""Most response body bytes read (for the error message of a failed attempt)."""
USER_AGENT: Final = "runcycles-server-webhooks/1"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt got: ``ok`` for a 2xx; otherwise the status and/or an error."""

    ok: bool
    status: int | None
    elapsed_ms: int
    error: str | None = None
    refused: bool = False
    """The URL was refused by the security configuration (nothing was sent)."""


def delivery_headers(
    sub: SubscriptionRow, event: EventRecord, body: bytes, now_ms: int
) -> dict[str, str]:
    """The headers of one attempt: the subscription's custom ones, then ours over them."""
    signed = sign_delivery(
        body,
        sub.live_secrets(now_ms),
        event_id=event.event_id,
        event_type=event.event_type,
        timestamp=now_ms // 1000,
        trace_id=event.trace_id,
        request_id=event.request_id,
    )
    ours = {**signed, "User-Agent": USER_AGENT}
    lowered = {name.lower() for name in ours} | {"host", "content-length"}
    custom = {k: v for k, v in sub.headers.items() if k.lower() not in lowered}
    return {**custom, **ours}


def encode(event: EventRecord) -> bytes:
    """The delivery body: the spec's ``Event`` as compact JSON."""
    return orjson.dumps(event_body(event))


def _httpx() -> ModuleType:
    """The ``httpx`` module, imported on the first delivery.

    A server that sends no webhook starts without loading it (``cycles serve`` start-up time);
    deferred for that, not to dodge an import cycle.
    """
    import httpx

    return httpx


class Sender:
    """Sends attempts over one pooled ``httpx.AsyncClient`` (made on the first attempt)."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.transport = transport
        self._client: Any = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client (no redirects followed, no proxy from the environment)."""
        if self._client is None:
            http = _httpx()
            self._client = http.AsyncClient(
                timeout=http.Timeout(self.timeout_s),
                follow_redirects=False,
                transport=self.transport,
                trust_env=False,
            )
        client: httpx.AsyncClient = self._client
        return client

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(
        self,
        sub: SubscriptionRow,
        event: EventRecord,
        security: SecurityConfig,
        now_ms: int,
    ) -> Attempt:
        """Make one attempt (never raises for what the receiver or the network does)."""
        started = time.monotonic()
        try:
            target = await resolve_target(sub.url, security, self.resolver)
        except UrlRefused as refused:
            return Attempt(False, None, 0, f"refused: {refused.message}", refused=True)
        body = encode(event)
        headers = delivery_headers(sub, event, body, now_ms)
        headers["Host"] = target.host_header
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            request = self.client.build_request(
                "POST", target.pinned_url, content=body, headers=headers, extensions=extensions
            )
            response = await self.client.send(request, stream=True)
            try:
                received = b""
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= RESPONSE_CAP:
                        break
            finally:
                await response.aclose()
        except _httpx().HTTPError as exc:
            elapsed = int((time.monotonic() - started) * 1000)
            return Attempt(False, None, elapsed, f"{type(exc).__name__}: {exc}"[:500])
        elapsed = int((time.monotonic() - started) * 1000)
        if 200 <= response.status_code < 300:
            return Attempt(True, response.status_code, elapsed)
        text = received[:RESPONSE_CAP].decode("utf-8", "replace").strip()
        error = f"HTTP {response.status_code}" + (f": {text[:300]}" if text else "")
        if 300 <= response.status_code < 400:
            error += " (redirects are not followed: point the subscription at the final URL)"
        return Attempt(False, response.status_code, elapsed, error)
