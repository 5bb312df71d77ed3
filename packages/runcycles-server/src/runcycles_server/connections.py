"""Slow-client protection for ``cycles serve``: read timeouts and a cap on open connections.

uvicorn times out only an idle keep-alive connection *after* a response (``timeout_keep_alive``);
a client that connects and sends nothing, part of its headers, or headers and part of a body
keeps its connection (and a file descriptor) forever, and ``limit_concurrency`` answers 503 to
every new *request*, established connections' included, once the count is reached. So
``cycles serve`` runs uvicorn with :class:`GuardedHttpToolsProtocol`, a subclass of uvicorn's
httptools protocol (same parser, same request path, so the same throughput) that adds:

* a **header timeout**: from the moment a connection opens (or the first byte of the next
  request on a kept-alive connection) until the end of the request headers; a client that
  trickles its headers is answered ``408`` and closed, one that sends nothing is closed;
* a **body timeout**: from the end of the headers until the end of the body (a total, so a
  client dripping one byte a second cannot keep it alive); the request's ASGI app sees a
  disconnect and the client gets ``408``;
* an **idle timeout** for kept-alive connections between requests (uvicorn's own
  ``timeout_keep_alive``, set from the same :class:`ConnectionLimits`);
* a **header size cap** (:data:`MAX_HEADER_BYTES`): more header bytes get ``431``;
* a **connection cap** per server process: a connection opened beyond it is answered ``503``
  with ``Retry-After`` and closed at once, so established connections keep being served and
  the process never runs out of file descriptors.

Timeouts are checked by one timer per process (every :data:`CHECK_EVERY_S`, or a quarter of
the shortest timeout), not one per request: a request only records its deadlines (two reads
of the loop's clock and a few attribute writes on the hot path). Every stalled or refused
connection writes one line to the access log (``runcycles_server.access``) when it is on, e.g.
``{"ts":"...","status":408,"timeout":"headers","client":"10.0.0.7","duration_ms":10000.4}``;
a body timeout is logged by the access-log middleware as the request's line, with
``"status":408,"timeout":"body"``.

The limits reach uvicorn's worker processes through environment variables
(:meth:`ConnectionLimits.to_env` / :meth:`ConnectionLimits.from_env`), as the rest of
``cycles serve``'s configuration does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from runcycles_server.access_log import ACCESS_LOGGER, TIMEOUT_STATE_KEY

__all__ = [
    "CHECK_EVERY_S",
    "MAX_HEADER_BYTES",
    "ConnectionLimits",
    "GuardedHttpToolsProtocol",
]

ENV_HEADER_TIMEOUT: Final = "CYCLES_HEADER_TIMEOUT_S"
ENV_BODY_TIMEOUT: Final = "CYCLES_BODY_TIMEOUT_S"
ENV_IDLE_TIMEOUT: Final = "CYCLES_IDLE_TIMEOUT_S"
ENV_MAX_CONNECTIONS: Final = "CYCLES_MAX_CONNECTIONS"
CHECK_EVERY_S: Final = 0.5
"""Longest interval between two deadline checks (shorter when a timeout is shorter)."""
MAX_HEADER_BYTES: Final = 65_536
"""Most bytes of request line plus headers one request may send (431 beyond)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """Timeouts (seconds) and the connection cap of one server process.

    Raises:
        ValueError: for a timeout that is not a positive finite number or a cap below 1.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")

    def to_env(self) -> dict[str, str]:
        """Return the environment variables :meth:`from_env` reads back."""
        return {
            ENV_HEADER_TIMEOUT: repr(self.header_timeout_s),
            ENV_BODY_TIMEOUT: repr(self.body_timeout_s),
            ENV_IDLE_TIMEOUT: repr(self.idle_timeout_s),
            ENV_MAX_CONNECTIONS: str(self.max_connections),
        }

    @classmethod
    def from_env(cls) -> ConnectionLimits:
        """Read the limits from the environment (unset variables: the defaults).

        Raises:
            ValueError: naming the variable whose value is not valid.
        """
        default = cls()
        values: dict[str, Any] = {}
        for env, name, kind in (
            (ENV_HEADER_TIMEOUT, "header_timeout_s", float),
            (ENV_BODY_TIMEOUT, "body_timeout_s", float),
            (ENV_IDLE_TIMEOUT, "idle_timeout_s", float),
            (ENV_MAX_CONNECTIONS, "max_connections", int),
        ):
            raw = (os.environ.get(env) or "").strip()
            try:
                values[name] = kind(raw) if raw else getattr(default, name)
            except ValueError:
                raise ValueError(f"{env} must be a number, not {raw!r}") from None
        return cls(**values)


_process_limits: ConnectionLimits | None = None


def _limits() -> ConnectionLimits:
    global _process_limits  # read once per process (uvicorn workers inherit the environment)
    if _process_limits is None:
        _process_limits = ConnectionLimits.from_env()
    return _process_limits


class _Reaper:
    """One timer per event loop closing the connections past their deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every_s: float) -> None:
        self.loop = loop
        self.every_s = every_s
        self.connections: set[GuardedHttpToolsProtocol] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, protocol: GuardedHttpToolsProtocol) -> None:
        self.connections.add(protocol)
        if self._handle is None:
            self._handle = self.loop.call_later(self.every_s, self._tick)

    def discard(self, protocol: GuardedHttpToolsProtocol) -> None:
        self.connections.discard(protocol)

    def _tick(self) -> None:
        self._handle = None
        now = self.loop.time()
        for protocol in [p for p in self.connections if p.deadline is not None]:
            if protocol.deadline is not None and protocol.deadline <= now:
                protocol.timed_out()
        if self.connections:
            self._handle = self.loop.call_later(self.every_s, self._tick)


_reapers: dict[asyncio.AbstractEventLoop, _Reaper] = {}


def _reaper(loop: asyncio.AbstractEventLoop, limits: ConnectionLimits) -> _Reaper:
    reaper = _reapers.get(loop)
    if reaper is None:
        shortest = min(limits.header_timeout_s, limits.body_timeout_s)
        reaper = _reapers[loop] = _Reaper(loop, min(CHECK_EVERY_S, shortest / 4))
    return reaper


def _raw_response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"connection: close\r\n\r\n"
    ) + body


def _error_body(message: str, request_id: str | None = None) -> bytes:
    # The spec's ErrorResponse shape; the id is made up when no request reached the app.
    return orjson.dumps(
        {
            "error": "INVALID_REQUEST",
            "message": message,
            "request_id": request_id or os.urandom(16).hex(),
        }
    )


_base = HttpToolsProtocol  # its callbacks are called directly: cheaper than super() per request


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body timeouts, a header cap and a connection cap.

    Pass it as ``uvicorn.run(..., http=GuardedHttpToolsProtocol)``; the limits come from the
    environment (:meth:`ConnectionLimits.from_env`) and the idle timeout must be passed as
    ``timeout_keep_alive`` (``cycles serve`` does both).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = _limits()
        self._header_s = self.limits.header_timeout_s
        self._body_s = self.limits.body_timeout_s
        self.deadline: float | None = None
        """Loop time at which the current phase times out (``None``: no phase running)."""
        self._phase: str | None = None
        self._phase_started = 0.0
        self._header_bytes = 0
        self._refused = False
        self._reaper = _reaper(self.loop, self.limits)

    # -- phases ----------------------------------------------------------------------------------

    def _arm(self, phase: str, timeout_s: float) -> None:
        now = self.loop.time()
        self._phase = phase
        self._phase_started = now
        self.deadline = now + timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept the connection (header timeout starts) or refuse it beyond the cap."""
        cap = self.limits.max_connections
        if len(self.connections) >= cap:
            self._refused = True
            body = orjson.dumps(
                {
                    "error": "INTERNAL_ERROR",
                    "message": f"the server has its maximum of {cap} connections open; retry "
                    "later, or reuse a kept-alive connection",
                    "request_id": os.urandom(16).hex(),
                }
            )
            transport.write(_raw_response(b"503 Service Unavailable", body, b"retry-after: 1\r\n"))
            transport.close()
            self._log(transport, 503, refused=f"max connections ({cap})")
            return
        super().connection_made(transport)
        self._arm("headers", self.limits.header_timeout_s)
        self._reaper.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection (a refused one was never set up)."""
        if self._refused:
            return
        self._reaper.discard(self)
        self.deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Start the header timeout on the first byte after an idle keep-alive period."""
        if self._phase is None and self._idle():
            self._arm("headers", self._header_s)
            self._header_bytes = 0
        _base.data_received(self, data)
        if self._phase == "headers":
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._close_with(
                    b"431 Request Header Fields Too Large",
                    f"request line and headers are larger than {MAX_HEADER_BYTES} bytes",
                )

    def _idle(self) -> bool:
        # uvicorn types ``cycle`` as always set, but it is None until the first request.
        cycle: RequestResponseCycle | None = self.__dict__.get("cycle")
        return cycle is None or cycle.response_complete

    def on_message_begin(self) -> None:
        """Start the header timeout of a pipelined request."""
        _base.on_message_begin(self)
        if self._phase is None:
            self._arm("headers", self._header_s)
            self._header_bytes = 0

    def on_headers_complete(self) -> None:
        """Headers are in: the body timeout starts."""
        _base.on_headers_complete(self)
        now = self.loop.time()  # = self._arm("body", ...), inlined on the hot path
        self._phase = "body"
        self._phase_started = now
        self.deadline = now + self._body_s

    def on_message_complete(self) -> None:
        """The whole request is in: no read timeout while the app works on it."""
        _base.on_message_complete(self)
        self._phase = None
        self.deadline = None

    # -- timeouts --------------------------------------------------------------------------------

    def _current_cycle(self) -> RequestResponseCycle | None:
        # uvicorn types ``cycle`` as always set, but it is None until the first request.
        cycle: RequestResponseCycle | None = getattr(self, "cycle", None)
        return cycle

    def timed_out(self) -> None:
        """Close a connection whose header or body phase ran past its deadline."""
        phase, started = self._phase, self._phase_started
        self.deadline = None
        self._phase = None
        if self.transport.is_closing():
            return
        cycle = self._current_cycle()
        waited_ms = (self.loop.time() - started) * 1000
        if phase == "body" and cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                state = cycle.scope.setdefault("state", {})
                state[TIMEOUT_STATE_KEY] = "body"
                self.transport.write(
                    _timeout_response("body", self.limits.body_timeout_s, state.get("request_id"))
                )
            cycle.disconnected = True  # the app's receive() answers http.disconnect
            cycle.message_event.set()
            self.transport.close()
            return  # the access-log middleware writes the request's line
        # A 408 goes only to a client that started a request: one written on a connection
        # that never sent a byte could be read as the answer to the request it sends next.
        # (And none while a pipelined request is in flight.)
        if self._header_bytes and (cycle is None or cycle.response_complete):
            self.transport.write(
                _timeout_response(phase or "headers", self.limits.header_timeout_s)
            )
        self.transport.close()
        self._log(self.transport, 408, timeout=phase or "headers", duration_ms=waited_ms)

    def _close_with(self, status: bytes, message: str) -> None:
        self.deadline = None
        self._phase = None
        cycle = self._current_cycle()
        if cycle is None or cycle.response_complete:
            self.transport.write(_raw_response(status, _error_body(message)))
        self.transport.close()
        self._log(self.transport, int(status[:3]), refused=message)

    def _log(self, transport: asyncio.BaseTransport, status: int, **fields: Any) -> None:
        logger = logging.getLogger(ACCESS_LOGGER)
        if not logger.handlers:  # the access log is off
            return
        record: dict[str, Any] = {"ts": _now_iso(), "status": status}
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            record["client"] = str(peer[0])
        for name, value in fields.items():
            record[name] = round(value, 1) if isinstance(value, float) else value
        logger.info(orjson.dumps(record).decode())


def _timeout_response(phase: str, timeout_s: float, request_id: str | None = None) -> bytes:
    return _raw_response(
        b"408 Request Timeout",
        _error_body(
            f"the request {phase} did not arrive within {timeout_s:g} s; send the whole "
            "request promptly",
            request_id,
        ),
    )


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
