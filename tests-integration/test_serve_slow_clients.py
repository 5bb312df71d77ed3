"""Slow clients against a real ``cycles serve``: stalled connections are closed on time, and a
connection cap refuses extra connections without harming established ones.

Each stalled kind (nothing sent, partial headers, headers dripped one byte at a time, headers
plus part of a body, an idle kept-alive connection) is opened many times; every socket must be
closed by the server within its timeout (plus the reaper's tick and scheduling slack, and not
much before it), while ``GET /healthz`` on fresh connections keeps answering. The access log
must count every stalled request.
"""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from runcycles_server.testing import ServerProcess, free_port

pytestmark = pytest.mark.slow

HEADER_S = 1.0
BODY_S = 1.5
IDLE_S = 1
SLACK_S = 1.0  # reaper tick (a quarter of the shortest timeout) plus a loaded 2-core machine
PER_KIND = 16


@dataclass
class Stalled:
    kind: str
    sock: socket.socket
    opened: float
    timeout_s: float
    data: bytes = b""
    closed_after: float | None = None
    drip: bytes = b""


@dataclass
class HealthProbe:
    """Polls ``/healthz`` on a fresh connection every 50 ms from a thread."""

    url: str
    statuses: list[int] = field(default_factory=list)
    slowest_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with httpx.Client(timeout=5) as http:
                    self.statuses.append(http.get(self.url).status_code)
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    """Read one small response (headers and a Content-Length body) from a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_stalled_connections_are_closed_within_their_timeouts_while_healthz_answers() -> None:
    args = [
        "--header-timeout", str(HEADER_S),
        "--body-timeout", str(BODY_S),
        "--idle-timeout", str(IDLE_S),
        "--access-log",
    ]  # fmt: skip
    with ServerProcess.start(extra_args=args) as server:
        tenant = server.provision(budget=1_000_000)
        port = server.port
        decide = (
            f"POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Cycles-API-Key: {tenant.api_key}\r\nContent-Length: 400\r\n\r\n"
            '{"idempotency_key": "k1", "subject"'
        ).encode()
        probe = HealthProbe(f"{server.base_url}/healthz")
        thread = threading.Thread(target=probe.run, daemon=True)
        thread.start()
        stalled: list[Stalled] = []
        try:
            for _ in range(PER_KIND):
                now = time.monotonic()
                nothing = _connect(port)
                stalled.append(Stalled("nothing", nothing, now, HEADER_S))
                partial = _connect(port)
                partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
                stalled.append(Stalled("partial headers", partial, now, HEADER_S))
                drip = _connect(port)
                drip.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                stalled.append(Stalled("dripped headers", drip, now, HEADER_S, drip=b"a"))
                body = _connect(port)
                body.sendall(decide)
                stalled.append(Stalled("partial body", body, now, BODY_S))
                idle = _connect(port)
                idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(idle).startswith(b"HTTP/1.1 200")
                stalled.append(Stalled("idle keep-alive", idle, time.monotonic(), IDLE_S))
            _wait_for_closes(stalled)
        finally:
            probe.stop()
            thread.join(10)
            for item in stalled:
                item.sock.close()
        log = server.log_text()

    for item in stalled:
        assert item.closed_after is not None, f"{item.kind}: still open"
        assert item.timeout_s - 0.1 <= item.closed_after <= item.timeout_s + SLACK_S, (
            f"{item.kind}: closed after {item.closed_after:.2f} s (timeout {item.timeout_s} s)"
        )
        if item.kind in ("idle keep-alive", "nothing"):
            assert item.data == b"", item.data  # no request started: closed without a 408
        else:
            assert item.data.startswith(b"HTTP/1.1 408 Request Timeout"), (item.kind, item.data)
    assert probe.errors == []
    assert len(probe.statuses) >= 10
    assert set(probe.statuses) == {200}
    assert probe.slowest_s < 1.0, probe.slowest_s

    assert "Traceback" not in log, log  # a body timeout is a client disconnect, not an error
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    header_lines = [line for line in lines if line.get("timeout") == "headers"]
    body_lines = [line for line in lines if line.get("timeout") == "body"]
    assert len(header_lines) == 3 * PER_KIND  # nothing, partial and dripped headers
    assert all(line["status"] == 408 and line["client"] == "127.0.0.1" for line in header_lines)
    assert len(body_lines) == PER_KIND
    assert all(
        line["status"] == 408 and line["path"] == "/v1/decide" and line["tenant"]
        for line in body_lines
    )


def _wait_for_closes(stalled: list[Stalled]) -> None:
    """Read every socket until the server closes it; drip a byte every 0.3 s into drippers."""
    selector = selectors.DefaultSelector()
    for item in stalled:
        item.sock.setblocking(False)
        selector.register(item.sock, selectors.EVENT_READ, item)
    deadline = time.monotonic() + max(HEADER_S, BODY_S, IDLE_S) + SLACK_S + 2
    next_drip = time.monotonic() + 0.3
    open_count = len(stalled)
    while open_count and time.monotonic() < deadline:
        if time.monotonic() >= next_drip:
            next_drip += 0.3
            for item in stalled:
                if item.drip and item.closed_after is None:
                    with contextlib.suppress(OSError):
                        item.sock.send(item.drip[:1])
        for key, _ in selector.select(timeout=0.05):
            item = key.data
            try:
                chunk = item.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            except BlockingIOError:
                continue
            if chunk:
                item.data += chunk
                continue
            item.closed_after = time.monotonic() - item.opened
            selector.unregister(item.sock)
            open_count -= 1
    selector.close()


def test_connection_cap_refuses_extra_connections_and_spares_established_ones() -> None:
    cap = 24
    args = ["--max-connections", str(cap), "--header-timeout", "60", "--idle-timeout", "60"]
    with ServerProcess.start(extra_args=[*args, "--access-log"]) as server:
        port = server.port
        established = [_connect(port) for _ in range(4)]
        for sock in established:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
        silent: list[socket.socket] = []
        refused: list[bytes] = []
        # Fill the cap with silent connections until the server refuses one (the test
        # harness may hold one more connection of its own, so the exact count can vary by 1).
        while not refused and len(silent) < cap + 2:
            sock = _connect(port)
            sock.settimeout(0.3)
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                silent.append(sock)  # accepted: the server waits for its request
                continue
            refused.append(answer)
            sock.close()
        assert refused, f"no refusal after {len(silent)} silent connections (cap {cap})"
        assert cap - 1 - len(established) <= len(silent) <= cap - len(established)
        for _ in range(8):  # every further connection is refused at once, with 503
            sock = _connect(port)
            sock.settimeout(5)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            sock.close()
            refused.append(data)
        for answer in refused:
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer
            assert b"retry-after: 1\r\n" in answer
            assert b'"error":"INTERNAL_ERROR"' in answer
            assert b"maximum of 24" in answer
        for _ in range(3):  # established connections are served as before
            for sock in established:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(sock).startswith(b"HTTP/1.1 200")
        for sock in silent:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # slots are free again once the server saw the closes
            try:
                if httpx.get(f"{server.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the cap did not free up after closing"
            time.sleep(0.05)
        for sock in established:
            sock.close()
        log = server.log_text()
    refusals = [
        json.loads(line) for line in log.splitlines() if '"refused":"max connections' in line
    ]
    assert len(refusals) >= len(refused)
    assert all(line["status"] == 503 for line in refusals)


def test_under_ulimit_128_a_flood_of_stalled_connections_does_not_take_the_server_down(
    tmp_path: Path,
) -> None:
    """The issue's reproduction: ``ulimit -n 128`` and 140 stalled sockets."""
    port = free_port()
    log_path = tmp_path / "server.log"

    def ulimit_128() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    args = [sys.executable, "-m", "runcycles_server", "serve", "--port", str(port)]
    args += ["--db", str(tmp_path / "cycles.db"), "--header-timeout", "2", "--log-level", "warning"]
    with log_path.open("wb") as sink:
        process = subprocess.Popen(
            args, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=ulimit_128
        )
    base_url = f"http://127.0.0.1:{port}"
    stalled: list[socket.socket] = []
    try:
        _wait_healthy(base_url, process, 30)
        assert "--max-connections lowered from 1000 to 96" in log_path.read_text()
        established = _connect(port)
        established.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(established).startswith(b"HTTP/1.1 200")
        refused = 0
        for _ in range(140):
            sock = _connect(port)
            stalled.append(sock)
        for sock in stalled:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                if sock.recv(4096).startswith(b"HTTP/1.1 503"):
                    refused += 1
        assert refused >= 140 - 96, refused  # beyond the cap: refused at once, not accepted
        established.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(established).startswith(b"HTTP/1.1 200")  # unharmed
        # the stalled ones are closed after --header-timeout: new clients get in again
        _wait_healthy(base_url, process, 2 + SLACK_S + 2)
        established.close()
    finally:
        for sock in stalled:
            sock.close()
        process.terminate()
        process.wait(timeout=30)
    log = log_path.read_text()
    assert "Too many open files" not in log, log
    assert "Traceback" not in log, log


def _wait_healthy(base_url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"/healthz did not answer 200 within {timeout_s} s")


def test_oversized_headers_get_431_and_normal_requests_pass() -> None:
    with ServerProcess.start(extra_args=["--access-log"]) as server:
        sock = _connect(server.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(66):  # just over 64 KiB of headers, never finished
                sock.sendall(b"X-Pad: " + b"a" * 1010 + b"\r\n")
        sock.settimeout(5)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), data[:100]
        big_but_fine = {"X-Pad": "a" * 30_000}  # under the 64 KiB cap
        response = httpx.get(f"{server.base_url}/healthz", headers=big_but_fine)
        assert response.status_code == 200
        log = server.log_text()
    assert '"status":431' in log
