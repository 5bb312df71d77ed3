"""The async client's own HTTP/1.1 pool, held to httpx's transport on the same exchanges.

A scripted asyncio server answers in every shape a server may use (``Content-Length``,
chunked with extensions and trailers, a body ended by closing, no body, compressed, bytes
dribbled in small writes); each exchange runs through :class:`AsyncHTTP11Transport` and through
``httpx.AsyncHTTPTransport`` (the plain twin) and must give the same request on the wire and
the same response. Then what only a pool does: keep-alive, a stale connection, limits,
timeouts, cancellation, and which clients use it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from runcycles import AsyncCyclesClient, _fastpath
from runcycles._http11 import AsyncHTTP11Transport

from .conftest import make_config

Reply = Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]
"""Writes the answer to one request (its raw bytes); returns whether to keep the connection."""
Serve = Callable[..., Awaitable["Server"]]


class Server:
    """An HTTP/1.1 server on 127.0.0.1 that answers each request with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.reply(writer, request):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(reply)
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server.server)
        return server

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answer(
    body: bytes = b'{"ok":true}', *, status: bytes = b"200 OK", headers: bytes = b"", **kw: Any
) -> Reply:
    """A reply writing ``status``, ``headers`` and ``body`` (framed by Content-Length)."""

    async def reply(writer: asyncio.StreamWriter, request: bytes) -> bool:
        writer.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
            % (status, headers, len(body), body)
        )
        await writer.drain()
        return True

    return reply


def raw(data: bytes, *, keep: bool = True, dribble: int = 0) -> Reply:
    """A reply writing ``data`` as it is (``dribble``: in writes of that many bytes)."""

    async def reply(writer: asyncio.StreamWriter, request: bytes) -> bool:
        step = dribble or len(data)
        for at in range(0, len(data), step):
            writer.write(data[at : at + step])
            await writer.drain()
            if dribble:
                await asyncio.sleep(0.001)
        return keep

    return reply


BODY = json.dumps({"decision": "ALLOW", "reservation_id": "r-1", "note": "é" * 40}).encode()
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    b"a;ext=1\r\n" + BODY[:10] + b"\r\n"
    b"%x\r\n" % (len(BODY) - 10) + BODY[10:] + b"\r\n0\r\nx-trailer: 1\r\n\r\n"
)
ZIPPED = gzip.compress(BODY)
SHAPES: dict[str, Reply] = {
    "content-length": answer(BODY, headers=b"x-request-id: abc\r\nSet-Cookie: a=1\r\n"),
    "chunked": raw(CHUNKED),
    "chunked-dribbled": raw(CHUNKED, dribble=5),
    "dribbled": raw(
        b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY), dribble=7
    ),
    "until-close": raw(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + BODY, keep=False),
    "http/1.0": raw(b"HTTP/1.0 200 OK\r\n\r\n" + BODY, keep=False),
    "no-content": raw(b"HTTP/1.1 204 No Content\r\n\r\n"),
    "gzip": answer(ZIPPED, headers=b"content-encoding: gzip\r\n"),
    "error-status": answer(b'{"error":"BUDGET_EXCEEDED"}', status=b"409 Conflict"),
    "informational": raw(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    ),
}


def _request(url: str, body: bytes = b'{"idempotency_key":"k-1"}') -> httpx.Request:
    return httpx.Request(
        "POST",
        url + "/v1/reservations?x=1",
        headers={"X-Cycles-API-Key": "key", "Content-Type": "application/json"},
        content=body,
        extensions={"timeout": httpx.Timeout(5.0).as_dict()},
    )


async def _exchange(transport: httpx.AsyncBaseTransport, url: str) -> httpx.Response:
    response = await transport.handle_async_request(_request(url))
    await response.aread()
    await transport.aclose()
    return response


def _lean() -> AsyncHTTP11Transport:
    return AsyncHTTP11Transport(ssl_context=None, max_connections=10)


@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_same_exchange_as_httpx(serve: Serve, shape: str) -> None:
    server = await serve(SHAPES[shape])
    ours = await _exchange(_lean(), server.url)
    plain = await _exchange(httpx.AsyncHTTPTransport(), server.url)
    assert server.requests[0] == server.requests[1]  # the same bytes on the wire
    assert ours.status_code == plain.status_code
    assert ours.headers.multi_items() == plain.headers.multi_items()
    assert ours.content == plain.content
    assert ours.reason_phrase == plain.reason_phrase
    assert ours.http_version == plain.http_version


async def test_keeps_the_connection_alive(serve: Serve) -> None:
    server = await serve(answer())
    transport = _lean()
    for _ in range(3):
        response = await transport.handle_async_request(_request(server.url))
        assert response.status_code == 200
    await transport.aclose()
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_a_connection_the_server_closed_is_replaced(
    serve: Serve,
) -> None:
    # The server closes after each answer without saying so: a kept connection goes stale.
    server = await serve(raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", keep=False))
    transport = _lean()
    for _ in range(3):
        response = await transport.handle_async_request(_request(server.url))
        assert await response.aread() == b"{}"
        await asyncio.sleep(0.01)  # the close reaches us while the connection is idle
    await transport.aclose()
    assert server.connections == 3


async def test_an_idle_connection_past_its_keepalive_expiry_is_not_reused(
    serve: Serve,
) -> None:
    server = await serve(answer())
    transport = AsyncHTTP11Transport(ssl_context=None, max_connections=10, keepalive_expiry_s=0.05)
    await transport.handle_async_request(_request(server.url))
    await transport.handle_async_request(_request(server.url))  # reused: still fresh
    await asyncio.sleep(0.1)
    await transport.handle_async_request(_request(server.url))
    await transport.aclose()
    assert server.connections == 2


async def test_a_stale_connection_written_to_is_retried_once(
    serve: Serve,
) -> None:
    # Each connection answers once, then drops the next request unanswered: what a server
    # that timed the idle connection out does to a request already on its way.
    answered: set[int] = set()

    async def once(writer: asyncio.StreamWriter, request: bytes) -> bool:
        if id(writer) in answered:
            return False
        answered.add(id(writer))
        return await answer()(writer, request)

    server = await serve(once)
    transport = _lean()
    for _ in range(3):
        response = await transport.handle_async_request(_request(server.url))
        assert await response.aread() == b'{"ok":true}'
    await transport.aclose()
    assert server.connections == 3
    assert len(server.requests) == 5  # two were sent twice, once on a stale connection


async def test_a_half_sent_response_is_an_error_not_a_retry(
    serve: Serve,
) -> None:
    server = await serve(raw(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", keep=False))
    transport = _lean()
    with pytest.raises(httpx.RemoteProtocolError, match="complete response"):
        await transport.handle_async_request(_request(server.url))
    await transport.aclose()
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 abc\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-1\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    ],
)
async def test_a_malformed_response_is_a_protocol_error_like_httpx(
    serve: Serve, data: bytes
) -> None:
    server = await serve(raw(data))
    for transport in (_lean(), httpx.AsyncHTTPTransport()):
        with pytest.raises(httpx.RemoteProtocolError):
            await _exchange(transport, server.url)


async def test_read_timeout(serve: Serve) -> None:
    async def silent(writer: asyncio.StreamWriter, request: bytes) -> bool:
        await asyncio.sleep(1)
        return False

    server = await serve(silent)
    transport = _lean()
    request = _request(server.url)
    request.extensions["timeout"] = httpx.Timeout(5.0, read=0.05).as_dict()
    with pytest.raises(httpx.ReadTimeout):
        await transport.handle_async_request(request)
    await transport.aclose()


async def test_connect_error_names_the_cause() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    transport = _lean()
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(_request(f"http://127.0.0.1:{port}"))
    await transport.aclose()


async def test_max_connections_queues_then_times_out(
    serve: Serve,
) -> None:
    release = asyncio.Event()

    async def held(writer: asyncio.StreamWriter, request: bytes) -> bool:
        await release.wait()
        return await answer()(writer, request)

    server = await serve(held)
    transport = AsyncHTTP11Transport(ssl_context=None, max_connections=1)
    first = asyncio.ensure_future(transport.handle_async_request(_request(server.url)))
    await asyncio.sleep(0.01)
    queued = _request(server.url)
    queued.extensions["timeout"] = httpx.Timeout(5.0, pool=0.05).as_dict()
    with pytest.raises(httpx.PoolTimeout):
        await transport.handle_async_request(queued)
    second = asyncio.ensure_future(transport.handle_async_request(_request(server.url)))
    await asyncio.sleep(0.01)
    release.set()
    assert (await first).status_code == (await second).status_code == 200
    await transport.aclose()
    assert server.connections == 1  # the queued request took the freed connection


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(
    serve: Serve,
) -> None:
    calls = 0

    async def slow_first(writer: asyncio.StreamWriter, request: bytes) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.2)  # answered late, to a caller that left
        return await answer()(writer, request)

    server = await serve(slow_first)
    transport = AsyncHTTP11Transport(ssl_context=None, max_connections=1)
    task = asyncio.ensure_future(transport.handle_async_request(_request(server.url)))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    response = await transport.handle_async_request(_request(server.url))
    assert await response.aread() == b'{"ok":true}'
    await transport.aclose()
    assert server.connections == 2


async def test_owned_async_client_uses_it_unless_a_proxy_or_the_plain_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)

    def pool_transport() -> object:
        client = AsyncCyclesClient(make_config())
        return client.http_client._transport_for_url(httpx.URL(client.config.base_url))

    with _fastpath.fast_path():
        assert isinstance(pool_transport(), AsyncHTTP11Transport)
        with _fastpath.plain_path():
            assert not isinstance(pool_transport(), AsyncHTTP11Transport)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        assert not isinstance(pool_transport(), AsyncHTTP11Transport)


async def test_a_client_against_a_real_server_matches_the_plain_path(
    serve: Serve,
) -> None:
    allow = {"decision": "ALLOW", "reservation_id": "r-1", "affected_scopes": ["tenant:acme"]}
    server = await serve(answer(json.dumps(allow).encode()))
    reserve = {
        "idempotency_key": "k-1",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt"},
        "estimate": {"unit": "TOKENS", "amount": 10},
    }
    results = []
    for switch in (_fastpath.fast_path, _fastpath.plain_path):
        with switch():
            async with AsyncCyclesClient(make_config(base_url=server.url)) as client:
                response = await client.create_reservation(reserve)
        results.append((response.status, response.body, response.request_id))
    assert results[0] == results[1]
    assert results[0][0] == 200
    fast, plain = server.requests
    assert fast == plain


async def test_a_respx_mock_sees_the_requests() -> None:
    with _fastpath.fast_path(), respx.mock(assert_all_called=True) as mock:
        route = mock.post("http://cycles.test/v1/reservations").respond(409, json={})
        async with AsyncCyclesClient(make_config(base_url="http://cycles.test")) as client:
            assert isinstance(
                client.http_client._transport_for_url(httpx.URL("http://cycles.test")),
                AsyncHTTP11Transport,
            )
            response = await client.create_reservation(
                {
                    "idempotency_key": "k-1",
                    "subject": {"tenant": "acme"},
                    "action": {"kind": "llm.completion", "name": "gpt"},
                    "estimate": {"unit": "TOKENS", "amount": 10},
                }
            )
    assert route.called
    assert response.status == 409


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate (and its key, in the same file) for localhost."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    pem = tmp_path / "localhost.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(pem), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    pem.write_text(pem.read_text() + (tmp_path / "cert.pem").read_text())
    return pem


async def test_tls_verified_with_the_clients_context_like_httpx(
    serve: Serve, certificate: Path
) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate)
    server = await serve(answer(BODY), tls)
    url = server.url.replace("http://127.0.0.1", "https://localhost")
    trusting = ssl.create_default_context(cafile=str(certificate))
    ours = AsyncHTTP11Transport(ssl_context=trusting, max_connections=1)
    plain = httpx.AsyncHTTPTransport(verify=trusting)
    responses = [await _exchange(transport, url) for transport in (ours, plain)]
    assert [r.content for r in responses] == [BODY, BODY]
    assert server.requests[0] == server.requests[1]
    for transport in (  # the system's CAs do not know this certificate
        AsyncHTTP11Transport(ssl_context=ssl.create_default_context(), max_connections=1),
        httpx.AsyncHTTPTransport(verify=ssl.create_default_context()),
    ):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await _exchange(transport, url)
