"""The async client's own HTTP/1.1 connection pool: an ``httpx`` transport, lean on CPU.

Why: per reserve + commit, ``httpx``'s default transport (``httpcore``, ``h11``, ``anyio``)
spends several times the CPU of the exchange itself, so a governed model call cost more
than the two round trips it needs (``benchmarks/openai_agents_hooks.py``). This pool speaks
the HTTP/1.1 a Cycles server answers with, straight on :mod:`asyncio` protocols: keep-alive
connections to the client's server (at most ``max_connections``), bodies framed by
``Content-Length``, chunked or by the connection's end, ``httpx``'s ``timeout`` extension
(connect, read, write and pool), TLS with the client's SSL context. It raises ``httpx``'s
errors (``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError``...) and returns
``httpx.Response`` objects, so nothing above the transport changes.

An async client that builds its own pool uses it while the fast path is on and no proxy is
configured (``urllib.request.getproxies()``, where ``httpx`` reads proxies from too): with a
proxy, or ``RUNCYCLES_FASTPATH=0``, the pool keeps ``httpx``'s own transport. A URL that is
neither ``http`` nor ``https``, and every request while a test mocks ``httpcore``'s pool
(``respx``'s default way, so that the mock sees them), go through a plain ``httpx``
transport. ``tests/test_http11.py`` holds this one to the plain one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Final

import httpcore
import httpx

__all__ = ["AsyncHTTP11Transport"]

_MAX_HEAD: Final = 64 * 1024
"""Longest status line and headers accepted (``h11``'s default limit too)."""
_DEFAULT_TIMEOUT: Final = httpx.Timeout(5.0)
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"

Origin = tuple[bytes, bytes, int]


class _Answer:
    """A complete response as read off the connection."""

    __slots__ = ("body", "headers", "keep_alive", "reason", "status", "version")

    def __init__(
        self, version: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.version, self.status, self.reason, self.headers = version, status, reason, headers
        self.body, self.keep_alive = b"", True


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses the one response it awaits."""

    def __init__(self, pool: AsyncHTTP11Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.loop = pool, loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[_Answer] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.read_s = 5.0
        self.answer: _Answer | None = None  # the head parsed, the body still coming
        self.length = -1  # body bytes awaited; -1: chunked, -2: until the connection ends
        self.closed = False
        self.counted = True  # holds one of the pool's max_connections
        self.served = 0  # requests answered on it (a reused connection may have gone stale)
        self.idle_since = 0.0  # loop time it went back to the pool
        self.head_request = False

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():  # nothing was asked: the connection is not sound
            self.close()
            return
        self.buffer += data
        try:
            done = self._parse()
        except httpx.RemoteProtocolError as exc:
            self._fail(exc)
            return
        if not done and self.timer is not None:  # more is coming: the read timeout restarts
            self.timer.cancel()
            self.timer = self.loop.call_later(self.read_s, self._timed_out)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost settles the waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._uncount(self)
        if self.waiter is None or self.waiter.done():
            self.pool._forget_idle(self)
            return
        answer = self.answer
        if answer is not None and self.length == -2:  # the body ended with the connection
            answer.body, answer.keep_alive = bytes(self.buffer), False
            self._finish(answer)
            return
        partly = self.buffer or answer is not None
        what = "without sending a complete response" if partly else "without a response"
        self._fail(httpx.RemoteProtocolError(f"Server disconnected {what}."))

    # -- one exchange ----------------------------------------------------------------

    async def exchange(self, data: bytes, timeout: dict[str, float | None], head: bool) -> _Answer:
        """Send one request's bytes and return its response."""
        self.answer, self.head_request = None, head
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise httpx.RemoteProtocolError("Server disconnected without a response.")
        waiter: asyncio.Future[_Answer] = self.loop.create_future()
        self.waiter = waiter
        read_s = timeout.get("read")
        if read_s is not None:
            self.read_s = read_s
            self.timer = self.loop.call_later(read_s, self._timed_out)
        transport.write(data)
        try:
            return await waiter
        finally:
            self.waiter = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        transport = self.transport
        writing = transport is not None and transport.get_write_buffer_size() > 0
        self._fail(httpx.WriteTimeout("timed out") if writing else httpx.ReadTimeout("timed out"))

    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _finish(self, answer: _Answer) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.waiter
        if self.buffer:  # bytes after the response: nothing was asked for them
            answer.keep_alive = False
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def close(self) -> None:
        """Close the connection (it gives back its place in the pool at once)."""
        self.closed = True
        self.pool._uncount(self)
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed: gone already
                self.transport.close()

    # -- parsing ---------------------------------------------------------------------

    def _parse(self) -> bool:
        """Parse what the buffer holds; ``True`` once the response is complete."""
        buffer = self.buffer
        answer = self.answer
        while answer is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise httpx.RemoteProtocolError("response head too long")
                return False
            answer = self._head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if answer.status < 200 and answer.status != 101:
                answer = None  # an informational response: the real one follows
        self.answer = answer
        length = self.length
        if length >= 0:
            if len(buffer) < length:
                return False
            answer.body = bytes(buffer[:length])
            del buffer[:length]
        elif length == -1:
            if not buffer.endswith(b"\r\n\r\n"):  # how every complete chunked body ends
                return False
            body = _dechunk(buffer)
            if body is None:
                return False
            answer.body = body
        else:
            return False  # the body ends with the connection
        self._finish(answer)
        return True

    def _head(self, head: bytes) -> _Answer:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        version = parts[0]
        if len(parts) < 2 or version[:7] != b"HTTP/1." or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked, close = False, version != b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or name[:1] in (b" ", b"\t"):
                raise httpx.RemoteProtocolError(f"malformed response header: {line[:80]!r}")
            value = value.strip(b" \t")
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise httpx.RemoteProtocolError(f"bad Content-Length: {value[:40]!r}")
                length = int(value)
            elif lower == b"transfer-encoding":  # only chunked, as h11 (httpx's parser)
                chunked = value.lower() == b"chunked"
                if not chunked:
                    raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding: {value!r}")
            elif lower == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                close = b"close" in tokens or (close and b"keep-alive" not in tokens)
        answer = _Answer(version, status, parts[2] if len(parts) > 2 else b"", headers)
        answer.keep_alive = not close
        if self.head_request or status < 200 or status in (204, 304):
            self.length = 0
        elif chunked:
            self.length = -1
        elif length is not None:
            self.length = length
        else:
            self.length, answer.keep_alive = -2, False
        return answer


def _dechunk(buffer: bytearray) -> bytes | None:
    """The body of a complete chunked message at the start of ``buffer`` (removed), or None."""
    chunks: list[bytes] = []
    at = 0
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip(b" \t")
        if not size_text or size_text.strip(_HEX_DIGITS):
            raise httpx.RemoteProtocolError(f"bad chunk size: {size_text[:40]!r}")
        size = int(size_text, 16)
        at = line_end + 2
        if size == 0:
            trailers_end = buffer.find(b"\r\n", at)
            while trailers_end > at:  # skip trailer fields up to the empty line
                at = trailers_end + 2
                trailers_end = buffer.find(b"\r\n", at)
            if trailers_end < 0:
                return None
            del buffer[: trailers_end + 2]
            return b"".join(chunks)
        if len(buffer) < at + size + 2:
            return None
        chunks.append(bytes(buffer[at : at + size]))
        at += size + 2


class AsyncHTTP11Transport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport keeping up to ``max_connections`` HTTP/1.1 connections.

    Args:
        ssl_context: For ``https`` URLs (the client's own; ``None``: the system default).
        max_connections: Open connections at most; a request beyond waits (the ``pool``
            timeout), as with ``httpx.Limits(max_connections=...)``.
        keepalive_expiry_s: An idle connection older than this is closed, not reused
            (``httpx.Limits``' default: a server or a middlebox may have dropped it).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_expiry_s: float = 5.0,
    ) -> None:
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry_s = keepalive_expiry_s
        self._idle: dict[Origin, list[_Connection]] = {}
        self._count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._other: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled connection and return the whole response."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https") or _pool_mocked():
            return await self._plain().handle_async_request(request)
        port = url.port or (443 if scheme == b"https" else 80)
        origin = (scheme, url.raw_host, port)
        timeout = request.extensions.get("timeout") or _DEFAULT_TIMEOUT.as_dict()
        body = await request.aread()
        raw = request.headers.raw
        data = b"".join(
            [
                request.method.encode("ascii"),
                b" ",
                url.raw_path,
                b" HTTP/1.1\r\n",
                *[b"%s: %s\r\n" % pair for pair in raw],
                b"\r\n",
                body,
            ]
        )
        head = request.method == "HEAD"
        loop = asyncio.get_running_loop()
        connection = await self._acquire(loop, origin, timeout)
        try:
            answer = await connection.exchange(data, timeout, head)
        except httpx.RemoteProtocolError:
            connection.close()
            if not connection.served or connection.answer is not None or connection.buffer:
                raise
            # A kept-alive connection the server had closed: the others may be stale too.
            self._drop_idle()
            connection = await self._acquire(loop, origin, timeout)
            try:
                answer = await connection.exchange(data, timeout, head)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        connection.served += 1
        self._release(origin, connection, answer.keep_alive)
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=httpx.ByteStream(answer.body),
            request=request,
            extensions={"http_version": answer.version, "reason_phrase": answer.reason},
        )

    async def aclose(self) -> None:
        """Close every connection; requests still running end with their connections."""
        self._closed = True
        self._drop_idle()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._other is not None:
            await self._other.aclose()

    # -- the pool --------------------------------------------------------------------

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, timeout: dict[str, float | None]
    ) -> _Connection:
        expiry_s = self._expiry_s
        while True:
            idle = self._idle.get(origin)
            while idle:
                connection = idle.pop()
                # Opened on an event loop no longer in use, or idle for too long: not reused.
                if connection.loop is not loop or loop.time() - connection.idle_since > expiry_s:
                    connection.close()
                elif not connection.closed:
                    return connection
            if self._closed:
                raise RuntimeError("the transport is closed")
            if self._count < self._max:
                return await self._connect(loop, origin, timeout.get("connect"))
            if self._idle:  # room is held by idle connections to another origin
                self._drop_idle()
                continue
            await self._wait(loop, timeout.get("pool"))

    async def _wait(self, loop: asyncio.AbstractEventLoop, timeout_s: float | None) -> None:
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = None
        if timeout_s is not None:
            timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, timeout_s: float | None
    ) -> _Connection:
        scheme, host_bytes, port = origin
        host = host_bytes.decode("ascii")
        self._count += 1
        try:
            context = (self._ssl or ssl.create_default_context()) if scheme == b"https" else None
            connecting = loop.create_connection(
                lambda: _Connection(self, loop), host, port, ssl=context,
                server_hostname=host if context is not None else None,
            )  # fmt: skip
            _, connection = await asyncio.wait_for(connecting, timeout_s)
        except asyncio.TimeoutError:
            self._count -= 1
            self._wake()
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._count -= 1
            self._wake()
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self._count -= 1
            self._wake()
            raise
        return connection

    def _release(self, origin: Origin, connection: _Connection, keep: bool) -> None:
        if keep and not self._closed and not connection.closed:
            connection.idle_since = connection.loop.time()
            self._idle.setdefault(origin, []).append(connection)
            self._wake()
        else:
            connection.close()

    def _forget_idle(self, connection: _Connection) -> None:
        for idle in self._idle.values():
            if connection in idle:
                idle.remove(connection)

    def _uncount(self, connection: _Connection) -> None:
        if connection.counted:
            connection.counted = False
            self._count -= 1
            self._wake()

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _plain(self) -> httpx.AsyncHTTPTransport:
        if self._other is None:
            self._other = httpx.AsyncHTTPTransport(verify=self._ssl or True)
        return self._other


def _pool_mocked() -> bool:
    """Whether a test mocks ``httpcore``'s pool (``respx``'s default): it must see every request."""
    send = httpcore.AsyncConnectionPool.handle_async_request
    return getattr(send, "__module__", None) != _POOL_MODULE


_POOL_MODULE: Final = httpcore.AsyncConnectionPool.handle_async_request.__module__


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.PoolTimeout("no connection free in time"))
