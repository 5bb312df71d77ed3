"""A scriptable fake Cycles server for recovery tests (settlement, journal, heartbeat).

:class:`FakeLedger` answers commit, event, extend and release requests like a conformant
server, records every request and injects faults from a per-endpoint script; use it through
:meth:`FakeLedger.transport` / :meth:`FakeLedger.async_transport`, or over HTTP with
:func:`serve`::

    ledger = FakeLedger()
    ledger.add_reservation("r1")
    ledger.script("commit", Fault.lost())            # applied, but the answer never arrives
    client = CyclesClient(config, transport=ledger.transport())
    ...
    assert ledger.labels() == ["commit", "commit_same_key"]

Labels use the recovery profile's ``expected_requests`` vocabulary: ``<endpoint>`` for a new
key, ``<endpoint>_same_key`` for the reservation's original settlement key (see
:meth:`FakeLedger.expect_key`), plus the suffix set by :meth:`FakeLedger.mark`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import httpx

from runcycles.client import AsyncCyclesClient, CyclesClient
from runcycles.config import CyclesConfig
from runcycles.journal import Journal
from runcycles.settlement import AsyncSettlement, ReplayReport, Settlement

__all__ = ["Fault", "FakeLedger", "ProcessCrash", "RecordedRequest", "replay_worker", "serve"]


class ProcessCrash(BaseException):
    """Raised by a fault to simulate the client process dying mid-request.

    It derives from ``BaseException`` so no ``except Exception`` in the code under test can
    swallow it, like a real ``kill -9``.
    """


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour of the next request to an endpoint.

    Attributes:
        kind: ``status`` (answer ``status``/``body``/``headers`` without applying),
            ``lost`` (apply, then fail with a read timeout), ``transport`` (fail with a
            connection error before applying), ``crash`` (apply if ``apply`` is set, then
            raise :class:`ProcessCrash`), ``raw`` (answer ``content`` verbatim after
            applying if ``apply`` is set).
    """

    kind: str
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""
    apply: bool = False

    @classmethod
    def error(cls, status: int, code: str, headers: dict[str, str] | None = None) -> Fault:
        """An error answer ``status`` with body ``{"error": code, ...}``; nothing applied."""
        body = {"error": code, "message": f"scripted {code}", "request_id": "req-fake"}
        return cls("status", status=status, body=body, headers=headers or {})

    @classmethod
    def lost(cls) -> Fault:
        """Apply the request, then lose the answer (read timeout)."""
        return cls("lost")

    @classmethod
    def transport(cls) -> Fault:
        """Fail with a connection error; nothing reaches the server."""
        return cls("transport")

    @classmethod
    def crash(cls, *, apply: bool) -> Fault:
        """Simulate the client process dying while the request is in flight."""
        return cls("crash", apply=apply)

    @classmethod
    def raw(cls, status: int, content: bytes, *, apply: bool) -> Fault:
        """Answer ``status`` with ``content`` verbatim (e.g. a nonconformant 2xx)."""
        return cls("raw", status=status, content=content, apply=apply)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake server received (or that a fault intercepted)."""

    endpoint: str
    reservation_id: str | None
    idempotency_key: str | None
    body: dict[str, Any]
    suffix: str


@dataclass
class _Reservation:
    status: str = "ACTIVE"
    expires_at_ms: int = 0
    commit_key: str | None = None
    commit_response: dict[str, Any] | None = None
    extend_responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    extensions: int = 0


class FakeLedger:
    """Thread-safe in-memory Cycles server with idempotency, request log and fault script.

    Args:
        auto_create: Treat unknown reservation ids as active reservations (else 404).
        remaining_ttl_ms: ``remaining_ttl_ms`` returned by extend (``None``: omitted).
        apply_delay_s: Sleep while applying a commit (widens race windows in tests).
    """

    def __init__(
        self,
        *,
        auto_create: bool = True,
        remaining_ttl_ms: int | None = 60_000,
        apply_delay_s: float = 0.0,
    ) -> None:
        self.auto_create = auto_create
        self.remaining_ttl_ms = remaining_ttl_ms
        self.apply_delay_s = apply_delay_s
        self.requests: list[RecordedRequest] = []
        self.applied_commits: Counter[str] = Counter()
        self.applied_events: Counter[str] = Counter()
        self.events: dict[str, dict[str, Any]] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._event_responses: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._expected_keys: dict[str, str] = {}
        self._suffix = ""
        self._lock = threading.RLock()
        self._event_ids = 0

    # ------------------------------------------------------------------------------ setup

    def add_reservation(self, reservation_id: str, *, expires_at_ms: int = 0) -> None:
        """Register an active reservation."""
        with self._lock:
            self._reservations[reservation_id] = _Reservation(expires_at_ms=expires_at_ms)

    def expire(self, reservation_id: str) -> None:
        """Mark a reservation expired (commit/extend answer 410)."""
        with self._lock:
            self._get(reservation_id).status = "EXPIRED"

    def script(self, endpoint: str, *faults: Fault) -> None:
        """Queue faults for the next requests to ``endpoint`` (``commit``, ``extend``, ...)."""
        with self._lock:
            self._faults.setdefault(endpoint, deque()).extend(faults)

    def expect_key(self, reservation_id: str, key: str) -> None:
        """Declare ``key`` the reservation's original settlement key (for labels)."""
        with self._lock:
            self._expected_keys[reservation_id] = key

    def mark(self, suffix: str) -> None:
        """Append ``suffix`` to the labels of later same-key requests (``""`` to clear)."""
        with self._lock:
            self._suffix = suffix

    # ------------------------------------------------------------------------------ queries

    def labels(self, endpoints: tuple[str, ...] = ("commit", "event", "extend")) -> list[str]:
        """Return the choreography labels of the recorded requests, in order."""
        labels: list[str] = []
        seen: dict[tuple[str, str | None], set[str | None]] = {}
        for request in self.requests:
            if request.endpoint not in endpoints:
                continue
            rid = request.reservation_id
            if request.endpoint == "event":
                metadata = request.body.get("metadata") or {}
                rid = metadata.get("recovered_reservation_id", rid)
            family = "extend" if request.endpoint == "extend" else "settle"
            keys = seen.setdefault((family, rid), set())
            expected = self._expected_keys.get(rid or "") if family == "settle" else None
            key = request.idempotency_key
            same = key in keys or (expected is not None and key == expected)
            keys.add(key)
            labels.append(request.endpoint + ("_same_key" + request.suffix if same else ""))
        return labels

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        """Return the recorded requests to one endpoint."""
        return [r for r in self.requests if r.endpoint == endpoint]

    def status_of(self, reservation_id: str) -> str:
        """Return a reservation's status."""
        with self._lock:
            return self._get(reservation_id).status

    # ------------------------------------------------------------------------------ transport

    def transport(self) -> httpx.MockTransport:
        """An ``httpx`` transport for :class:`~runcycles.CyclesClient`."""
        return httpx.MockTransport(self.handle)

    def async_transport(self) -> httpx.MockTransport:
        """An ``httpx`` transport for :class:`~runcycles.AsyncCyclesClient`."""
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (the ``httpx.MockTransport`` handler)."""
        endpoint, rid = _route(request)
        body = json.loads(request.content) if request.content else {}
        key = body.get("idempotency_key") if isinstance(body, dict) else None
        with self._lock:
            self.requests.append(RecordedRequest(endpoint, rid, key, body, self._suffix))
            queue = self._faults.get(endpoint)
            fault = queue.popleft() if queue else None
        if fault is None:
            status, payload = self._apply(endpoint, rid, body)
            return httpx.Response(status, json=payload)
        if fault.kind == "status":
            return httpx.Response(fault.status, json=fault.body, headers=fault.headers)
        if fault.kind == "transport":
            raise httpx.ConnectError("scripted connection failure", request=request)
        if fault.kind == "lost":
            self._apply(endpoint, rid, body)
            raise httpx.ReadTimeout("scripted lost response", request=request)
        if fault.kind == "crash":
            if fault.apply:
                self._apply(endpoint, rid, body)
            raise ProcessCrash(f"scripted crash during {endpoint}")
        if fault.apply:
            self._apply(endpoint, rid, body)
        return httpx.Response(fault.status, content=fault.content, headers=fault.headers)

    # ------------------------------------------------------------------------------ semantics

    def _get(self, reservation_id: str | None) -> _Reservation:
        rid = reservation_id or ""
        if rid not in self._reservations and self.auto_create:
            self._reservations[rid] = _Reservation()
        return self._reservations[rid]

    def _apply(
        self, endpoint: str, rid: str | None, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if self.apply_delay_s:
            time.sleep(self.apply_delay_s)
        with self._lock:
            if endpoint == "event":
                return self._event(body)
            if endpoint == "create":
                return self._create(body)
            if rid is None or (rid not in self._reservations and not self.auto_create):
                return 404, _error("NOT_FOUND", "reservation not found")
            reservation = self._get(rid)
            key = body["idempotency_key"]
            if endpoint == "commit":
                return self._commit(rid, reservation, key, body)
            if endpoint == "extend":
                return self._extend(reservation, key, body)
            if endpoint == "release":
                if reservation.status != "ACTIVE":
                    return 409, _error("RESERVATION_FINALIZED", "already finalized")
                reservation.status = "RELEASED"
                return 200, {"status": "RELEASED", "released": {"unit": "TOKENS", "amount": 0}}
            return 404, _error("NOT_FOUND", f"no route {endpoint}")

    def _commit(
        self, rid: str, reservation: _Reservation, key: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if reservation.commit_key == key and reservation.commit_response is not None:
            return 200, reservation.commit_response  # idempotent replay
        if reservation.status == "EXPIRED":
            return 410, _error("RESERVATION_EXPIRED", "reservation expired")
        if reservation.status != "ACTIVE":
            return 409, _error("RESERVATION_FINALIZED", "reservation already finalized")
        reservation.status = "COMMITTED"
        reservation.commit_key = key
        reservation.commit_response = {"status": "COMMITTED", "charged": body["actual"]}
        self.applied_commits[rid] += 1
        return 200, reservation.commit_response

    def _create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._event_ids += 1
        rid = f"rsv-{self._event_ids}"
        ttl_ms = int(body.get("ttl_ms") or 60_000)
        self._reservations[rid] = _Reservation(expires_at_ms=ttl_ms)
        response = {
            "decision": "ALLOW",
            "reservation_id": rid,
            "affected_scopes": ["tenant:fake"],
            "reserved": body["estimate"],
            "expires_at_ms": ttl_ms,
            "remaining_ttl_ms": ttl_ms,
        }
        return 200, response

    def _event(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = body["idempotency_key"]
        if key in self._event_responses:
            return 201, self._event_responses[key]
        self._event_ids += 1
        response = {"status": "APPLIED", "event_id": f"evt-{self._event_ids}"}
        self._event_responses[key] = response
        metadata = body.get("metadata") or {}
        rid = str(metadata.get("recovered_reservation_id", key))
        self.applied_events[rid] += 1
        self.events[rid] = body
        return 201, response

    def _extend(
        self, reservation: _Reservation, key: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if key in reservation.extend_responses:
            return 200, reservation.extend_responses[key]
        if reservation.status == "EXPIRED":
            return 410, _error("RESERVATION_EXPIRED", "reservation expired")
        if reservation.status != "ACTIVE":
            return 409, _error("RESERVATION_FINALIZED", "reservation already finalized")
        reservation.expires_at_ms += body["extend_by_ms"]
        reservation.extensions += 1
        response: dict[str, Any] = {"status": "ACTIVE", "expires_at_ms": reservation.expires_at_ms}
        if self.remaining_ttl_ms is not None:
            response["remaining_ttl_ms"] = self.remaining_ttl_ms
        reservation.extend_responses[key] = response
        return 200, response


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message, "request_id": "req-fake"}


def _route(request: httpx.Request) -> tuple[str, str | None]:
    parts = [unquote(part) for part in request.url.raw_path.decode().split("?")[0].split("/")]
    parts = [part for part in parts if part]
    if parts[-1:] == ["events"]:
        return "event", None
    if parts[-1:] == ["reservations"] and request.method == "POST":
        return "create", None
    if len(parts) >= 4 and parts[-3] == "reservations":
        return parts[-1], parts[-2]
    return "/".join(parts), None


# --------------------------------------------------------------------------------------------
# Real HTTP


@contextmanager
def serve(ledger: FakeLedger) -> Iterator[str]:
    """Serve ``ledger`` over real HTTP on 127.0.0.1 in a background thread; yield its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            content = self.rfile.read(length)
            request = httpx.Request(
                "POST", f"http://fake{self.path}", content=content, headers=dict(self.headers)
            )
            try:
                response = ledger.handle(request)
                status, payload = response.status_code, response.content
            except httpx.HTTPError:
                status, payload = 503, b'{"error":"INTERNAL_ERROR","message":"x","request_id":"r"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="fake-cycles", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def replay_worker(mode: str, root: str, base_url: str, tenant: str, api_key: str) -> dict[str, Any]:
    """Body of one independent replay worker (see :func:`main`); returns a summary dict.

    Builds everything from scratch (config, client, journal) and replays the partition.
    """
    config = CyclesConfig(base_url=base_url, api_key=api_key, tenant=tenant)
    journal = Journal.for_config(config, root)
    report: ReplayReport
    if mode == "sync":
        with CyclesClient(config) as client:
            report = Settlement(client, journal=journal).replay()
    else:

        async def run() -> ReplayReport:
            async with AsyncCyclesClient(config) as client:
                return await AsyncSettlement(client, journal=journal).replay()

        report = asyncio.run(run())
    return {"settled": report.settled, "busy": report.busy, "pending": report.pending}


def main(argv: list[str] | None = None) -> int:
    """``python -m runcycles.testing.recovery_fakes replay MODE ROOT URL TENANT API_KEY``.

    Prints ``ready``, waits for one line on stdin (so that several workers start together),
    replays, and prints the summary as JSON.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 6 or args[0] != "replay":
        sys.stderr.write(__doc__ or "")
        return 2
    _, mode, root, url, tenant, api_key = args
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(replay_worker(mode, root, url, tenant, api_key)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
