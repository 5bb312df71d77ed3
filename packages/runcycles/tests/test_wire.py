"""How requests leave the clients: straight to the pool's transport when the client owns it.

A client that built its own ``httpx`` client skips ``httpx.Client.send`` (its merging, auth,
redirect and hook machinery) but must put the same request on the wire: every default
header, the configured timeouts, the transport httpx would have picked (proxies from the
environment included). A client given ``http_client=`` must keep honouring that client's
hooks.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig, _fastpath
from runcycles._protocol import USER_AGENT
from runcycles.retry import RetryPolicy

from .conftest import API_KEY, Api, make_config

RESERVE = {
    "idempotency_key": "wire-key-1",
    "subject": {"tenant": "acme"},
    "action": {"kind": "llm.completion", "name": "gpt"},
    "estimate": {"unit": "TOKENS", "amount": 10},
}
ALLOW = {"decision": "ALLOW", "reservation_id": "r-1", "affected_scopes": ["tenant:acme"]}


class Recorder:
    """A MockTransport handler that answers ALLOW and keeps every request it saw."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, json=ALLOW)


def _build(flavour: str, config: CyclesConfig, **kwargs: Any) -> Api:
    if flavour == "async":
        return Api(AsyncCyclesClient(config, **kwargs))
    return Api(CyclesClient(config, **kwargs))


@pytest.fixture
def no_client_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``httpx.Client.send``/``AsyncClient.send`` fail loudly if anything calls them.

    The fast path is what skips them: it is on for these tests whatever
    ``RUNCYCLES_FASTPATH`` says (``test_fastpath.py`` covers the plain path).
    """
    monkeypatch.setattr(_fastpath, "enabled", True)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("httpx.Client.send was called")

    monkeypatch.setattr(httpx.Client, "send", refuse)
    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)


@pytest.mark.usefixtures("no_client_send")
async def test_owned_client_sends_complete_requests_without_httpx_client_send(
    flavour: str,
) -> None:
    recorder = Recorder()
    config = make_config(connect_timeout=1.5, read_timeout=7.0)
    api = _build(flavour, config, transport=httpx.MockTransport(recorder))
    try:
        response = await api.create_reservation(RESERVE)
        balances = await api.get_balances(tenant="acme")
    finally:
        await api.close()
    assert response.is_success
    assert response.data.reservation_id == "r-1"
    assert balances.status == 200
    post, get = recorder.requests
    assert post.method == "POST"
    assert str(post.url) == "http://cycles.test/v1/reservations"
    assert post.headers["x-cycles-api-key"] == API_KEY
    assert post.headers["user-agent"] == USER_AGENT
    assert post.headers["accept"] == "application/json"
    assert post.headers["content-type"] == "application/json"
    assert post.headers["x-idempotency-key"] == "wire-key-1"
    assert post.headers["host"] == "cycles.test"
    assert int(post.headers["content-length"]) == len(post.content)
    assert json.loads(post.content)["idempotency_key"] == "wire-key-1"
    assert post.extensions["timeout"] == {"connect": 1.5, "read": 7.0, "write": 7.0, "pool": 7.0}
    assert str(get.url) == "http://cycles.test/v1/balances?tenant=acme"
    assert get.headers["x-cycles-api-key"] == API_KEY
    assert "content-type" not in get.headers


@pytest.mark.usefixtures("no_client_send")
async def test_siblings_share_the_direct_path(flavour: str) -> None:
    recorder = Recorder()
    api = _build(flavour, make_config(), transport=httpx.MockTransport(recorder))
    sibling = Api(api.client.with_options(retry_policy=RetryPolicy.never()))
    try:
        response = await sibling.create_reservation(RESERVE)
    finally:
        await api.close()
    assert response.is_success
    assert recorder.requests[0].headers["x-cycles-api-key"] == API_KEY


async def test_given_http_client_keeps_its_hooks(flavour: str) -> None:
    recorder = Recorder()
    seen: list[str] = []
    if flavour == "async":

        async def ahook(request: httpx.Request) -> None:
            seen.append(str(request.url))

        http: httpx.Client | httpx.AsyncClient = httpx.AsyncClient(
            transport=httpx.MockTransport(recorder), event_hooks={"request": [ahook]}
        )
    else:

        def hook(request: httpx.Request) -> None:
            seen.append(str(request.url))

        http = httpx.Client(
            transport=httpx.MockTransport(recorder), event_hooks={"request": [hook]}
        )
    api = _build(flavour, make_config(), http_client=http)
    try:
        response = await api.create_reservation(RESERVE)
    finally:
        await api.close()
        if isinstance(http, httpx.AsyncClient):
            await http.aclose()
        else:
            http.close()
    assert response.is_success
    assert seen == ["http://cycles.test/v1/reservations"]
    assert recorder.requests[0].headers["x-cycles-api-key"] == API_KEY


async def test_closed_client_refuses_to_send(flavour: str) -> None:
    api = _build(flavour, make_config(), transport=httpx.MockTransport(Recorder()))
    await api.close()
    with pytest.raises(RuntimeError, match="client has been closed"):
        await api.create_reservation(RESERVE)


async def test_transport_error_becomes_a_transport_failure_naming_the_request(
    flavour: str,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    config = make_config(retry_enabled=False)
    api = _build(flavour, config, transport=httpx.MockTransport(refuse))
    try:
        response = await api.create_reservation(RESERVE)
    finally:
        await api.close()
    assert response.is_transport_error
    assert isinstance(response.exception, httpx.ConnectError)
    assert response.exception.request.url == "http://cycles.test/v1/reservations"
    assert "POST http://cycles.test/v1/reservations" in (response.error_message or "")


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy stand-in: records the absolute-form target, answers ALLOW itself."""

    targets: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.rfile.read(length)
        _Proxy.targets.append(self.path)
        body = json.dumps(ALLOW).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Proxy.targets = []
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield _Proxy.targets
    finally:
        server.shutdown()
        server.server_close()


async def test_proxy_from_the_environment_is_used(flavour: str, proxy: list[str]) -> None:
    # cycles.invalid cannot resolve: an answer can only come through the proxy
    config = make_config(base_url="http://cycles.invalid", retry_enabled=False)
    api = _build(flavour, config)
    try:
        response = await api.create_reservation(RESERVE)
    finally:
        await api.close()
    assert response.is_success, response.error_message
    assert proxy == ["http://cycles.invalid/v1/reservations"]


@pytest.mark.usefixtures("no_client_send")
async def test_caller_set_host_header_is_sent_once(flavour: str) -> None:
    recorder = Recorder()
    api = _build(flavour, make_config(), transport=httpx.MockTransport(recorder))
    try:
        response = await api.create_reservation(RESERVE, headers={"host": "cycles.example"})
    finally:
        await api.close()
    assert response.is_success
    sent = recorder.requests[0]
    assert sent.headers.get_list("host") == ["cycles.example"]
    assert sent.headers.get_list("content-length") == [str(len(sent.content))]


@pytest.mark.usefixtures("no_client_send")
async def test_timeout_set_on_the_pool_later_applies(flavour: str) -> None:
    recorder = Recorder()
    api = _build(flavour, make_config(), transport=httpx.MockTransport(recorder))
    api.client.http_client.timeout = httpx.Timeout(30.0, connect=3.0)
    try:
        await api.create_reservation(RESERVE)
    finally:
        await api.close()
    sent = recorder.requests[0]
    assert sent.extensions["timeout"] == {"connect": 3.0, "read": 30.0, "write": 30.0, "pool": 30.0}
