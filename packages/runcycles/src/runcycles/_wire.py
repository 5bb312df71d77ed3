"""How a client's requests reach the connection pool.

A client that owns its pool skips ``httpx.Client.send`` (about a third of its CPU per call;
``docs/client.md`` says what is skipped): :class:`SyncWire` / :class:`AsyncWire` build the
request once, complete, and hand it straight to the transport ``httpx`` would pick. A client
given ``http_client=`` keeps using that client's ``send``. Both shortcuts go through
:mod:`runcycles._fastpath` (``RUNCYCLES_FASTPATH=0``: plain ``httpx.Client.send``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import httpx

from runcycles import _fastpath

__all__ = ["AsyncWire", "SyncWire"]

_CLOSED_MESSAGE: Final = "Cannot send a request, as the client has been closed."


class _Wire:
    """State shared by both wires: the URLs parsed once and the per-request extensions."""

    __slots__ = ("direct", "extensions", "host", "make", "pool", "timeout", "urls")

    def __init__(
        self,
        http: httpx.Client | httpx.AsyncClient,
        *,
        direct: bool,
        fixed_urls: tuple[str, ...],
    ) -> None:
        self.direct = direct
        self.pool = http
        self.timeout = http.timeout
        self.extensions = {"timeout": self.timeout.as_dict()}
        self.urls: dict[str, httpx.URL] = {url: httpx.URL(url) for url in fixed_urls}
        self.host = httpx.URL(fixed_urls[0]).netloc.decode("ascii") if fixed_urls else ""
        self.make = _fastpath.request_builder(http, self.host)

    def build(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        """Return the request, complete: it is sent as it is."""
        http = self.pool
        if not self.direct:
            return http.build_request(method, url, content=content, headers=headers, params=params)
        if http.timeout is not self.timeout:  # someone set client.http_client.timeout
            self.timeout = http.timeout
            self.extensions = {"timeout": self.timeout.as_dict()}
        target = self.urls.get(url) or url
        return self.make(method, target, headers, content, params, self.extensions)


class SyncWire(_Wire):
    """Sends a sync client's requests (see the module docstring)."""

    __slots__ = ("http", "transport")

    def __init__(
        self, http: httpx.Client, *, owned: bool, base_url: str, fixed_urls: tuple[str, ...]
    ) -> None:
        transport = _fastpath.direct_transport(http, base_url) if owned else None
        super().__init__(
            http, direct=isinstance(transport, httpx.BaseTransport), fixed_urls=fixed_urls
        )
        self.http = http
        self.transport = transport if isinstance(transport, httpx.BaseTransport) else None

    def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read the whole answer.

        Raises:
            httpx.TransportError: No answer (connect, read, write, pool, protocol errors).
            httpx.DecodingError: The answer's content encoding is broken.
            RuntimeError: The client was closed.
        """
        transport = self.transport
        if transport is None:
            return self.http.send(request)
        if self.http.is_closed:
            raise RuntimeError(_CLOSED_MESSAGE)
        try:
            response = transport.handle_request(request)
        except httpx.RequestError as exc:
            exc.request = request
            raise
        response.request = request
        try:
            response.read()
        except BaseException:
            response.close()
            raise
        return response


class AsyncWire(_Wire):
    """Sends an async client's requests (see the module docstring)."""

    __slots__ = ("http", "transport")

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        owned: bool,
        base_url: str,
        fixed_urls: tuple[str, ...],
    ) -> None:
        transport = _fastpath.direct_transport(http, base_url) if owned else None
        super().__init__(
            http, direct=isinstance(transport, httpx.AsyncBaseTransport), fixed_urls=fixed_urls
        )
        self.http = http
        self.transport = transport if isinstance(transport, httpx.AsyncBaseTransport) else None

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read the whole answer (raises as :meth:`SyncWire.send`)."""
        transport = self.transport
        if transport is None:
            return await self.http.send(request)
        if self.http.is_closed:
            raise RuntimeError(_CLOSED_MESSAGE)
        try:
            response = await transport.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request
            raise
        response.request = request
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response
