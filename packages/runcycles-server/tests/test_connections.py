"""``cycles serve``'s slow-client limits: validation, the environment hand-off, the fd budget.

The behaviour on real sockets (stalled connections closed on time, the connection cap) is
tested against a real server in ``tests-integration/test_serve_slow_clients.py``.
"""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from uvicorn.config import Config
from uvicorn.server import ServerState

from runcycles_server import cli as cli_module
from runcycles_server import connections
from runcycles_server.cli import cli
from runcycles_server.connections import ConnectionLimits, GuardedHttpToolsProtocol


def test_limits_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = ConnectionLimits(2.5, 7.0, 3, 42)
    for name, value in limits.to_env().items():
        monkeypatch.setenv(name, value)
    assert ConnectionLimits.from_env() == limits


def test_unset_environment_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ConnectionLimits().to_env():
        monkeypatch.delenv(name, raising=False)
    assert ConnectionLimits.from_env() == ConnectionLimits(10.0, 30.0, 5, 1000)


def test_bad_environment_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYCLES_HEADER_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="CYCLES_HEADER_TIMEOUT_S must be a number, not 'soon'"):
        ConnectionLimits.from_env()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"header_timeout_s": 0.0}, "header_timeout_s must be a positive number"),
        ({"body_timeout_s": float("nan")}, "body_timeout_s must be a positive number"),
        ({"idle_timeout_s": float("inf")}, "idle_timeout_s must be a positive number"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
    ],
)
def test_invalid_limits_are_refused(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionLimits(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout", "0"),
        ("--body-timeout", "-1"),
        ("--store-timeout", "nan"),
        ("--idle-timeout", "0"),
        ("--max-connections", "0"),
    ],
)
def test_serve_refuses_bad_limit_flags_naming_the_flag(
    tmp_path: Path, flag: str, value: str
) -> None:
    db = tmp_path / "x.db"
    result = CliRunner().invoke(cli, ["serve", "--db", str(db), flag, value])
    assert result.exit_code == 2, result.output
    assert flag in result.output
    assert "Traceback" not in result.output
    assert not db.exists()  # refused before anything was opened


def test_the_connection_cap_fits_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    # raised up to the hard limit, which is enough
    assert cli_module._fit_connection_cap(300) == (300, None)
    assert calls == [(300 + cli_module.FD_HEADROOM, 512)]
    # the hard limit is not enough: the cap is lowered, and the note says so
    calls.clear()
    cap, note = cli_module._fit_connection_cap(1000)
    assert calls == [(512, 512)]
    assert cap == 512 - cli_module.FD_HEADROOM
    assert note is not None
    assert "lowered from 1000 to 384" in note
    assert "ulimit -n" in note


def test_a_refused_rlimit_raise_lowers_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 100_000))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert cli_module._fit_connection_cap(1000)[0] == 1024 - cli_module.FD_HEADROOM
    monkeypatch.setattr(resource, "getrlimit", lambda _: (128, 128))  # `ulimit -n 128`
    assert cli_module._fit_connection_cap(1000)[0] == 96  # a quarter kept for the rest


# --------------------------------------------------------------------------------------------
# The protocol in-process, on a fake transport (fast; the real sockets are in tests-integration)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.7", 5555), "sockname": ("127.0.0.1", 7878)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _echo_body_app(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    while message["type"] == "http.request" and message.get("more_body"):
        message = await receive()
    if message["type"] == "http.disconnect":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _protocols(
    monkeypatch: pytest.MonkeyPatch, limits: ConnectionLimits
) -> tuple[Any, ServerState]:
    monkeypatch.setattr(connections, "_process_limits", limits)
    config = Config(app=_echo_body_app, log_level="warning")
    config.load()
    state = ServerState()

    def make() -> GuardedHttpToolsProtocol:
        return GuardedHttpToolsProtocol(config, state, {}, asyncio.get_running_loop())

    return make, state


SHORT = ConnectionLimits(header_timeout_s=0.3, body_timeout_s=0.3, max_connections=2)


async def test_partial_headers_get_408_after_the_header_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, _ = _protocols(monkeypatch, SHORT)
    protocol, transport = make(), FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    await asyncio.sleep(0.05)
    assert not transport.is_closing()
    await asyncio.sleep(0.5)
    assert transport.is_closing()
    assert transport.written.startswith(b"HTTP/1.1 408 Request Timeout")
    protocol.connection_lost(None)


async def test_a_silent_connection_is_closed_without_a_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, _ = _protocols(monkeypatch, SHORT)
    protocol, transport = make(), FakeTransport()
    protocol.connection_made(transport)
    await asyncio.sleep(0.5)
    assert transport.is_closing()
    assert transport.written == b""
    protocol.connection_lost(None)


async def test_a_stalled_body_disconnects_the_app_and_gets_408(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, _ = _protocols(monkeypatch, SHORT)
    protocol, transport = make(), FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
    await asyncio.sleep(0.6)
    assert transport.is_closing()
    assert transport.written.startswith(b"HTTP/1.1 408 Request Timeout")
    assert protocol.cycle.disconnected
    assert protocol.cycle.scope["state"]["timeout"] == "body"
    protocol.connection_lost(None)


async def test_a_complete_request_is_served_and_no_timeout_runs_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, _ = _protocols(monkeypatch, SHORT)
    protocol, transport = make(), FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert protocol.deadline is None  # the request is in: the app's time is not limited
    await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 200 OK")
    assert not transport.is_closing()
    protocol.connection_lost(None)


async def test_connections_beyond_the_cap_get_503_and_the_others_are_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, state = _protocols(monkeypatch, SHORT)  # max_connections=2
    first, second, third = make(), make(), make()
    transports = [FakeTransport() for _ in range(3)]
    first.connection_made(transports[0])
    second.connection_made(transports[1])
    third.connection_made(transports[2])
    assert len(state.connections) == 2
    assert transports[2].closed
    assert transports[2].written.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"retry-after: 1\r\n" in transports[2].written
    assert not transports[0].closed
    assert not transports[1].closed
    third.connection_lost(None)  # a refused connection was never set up: nothing to undo
    assert len(state.connections) == 2
    first.connection_lost(None)
    second.connection_lost(None)
    assert not state.connections
