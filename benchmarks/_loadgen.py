"""A lean HTTP/1.1 load generator for the server benchmarks.

httpx's async client spends several milliseconds of CPU per request at high concurrency, so
it would measure itself rather than the server. This generator keeps one keep-alive
connection per virtual client, writes pre-rendered request bytes and parses only the status
line, ``Content-Length`` and (for reservations) the ``reservation_id`` of the body. It runs on
uvloop when available.

Each virtual client loops over *scenarios*: ``pair`` (reserve, then commit the reservation)
or ``noop`` (one GET of a route that does nothing, to measure the HTTP stack's floor and this
generator's own ceiling).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

__all__ = ["LoadResult", "run_load"]


@dataclass
class LoadResult:
    """What one load run measured."""

    scenario: str
    clients: int
    duration_s: float
    completed: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    committed_amount: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    started: int = 0
    """Operations begun (counted only when the run has a ``count``)."""

    @property
    def rate(self) -> float:
        """Completed operations (pairs or no-op requests) per second."""
        return self.completed / self.duration_s if self.duration_s else 0.0

    def percentile(self, pct: float) -> float:
        """Return the ``pct`` percentile latency in milliseconds (0 when nothing completed)."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
        return ordered[index]

    @property
    def p50(self) -> float:
        """Median latency in milliseconds."""
        return statistics.median(self.latencies_ms) if self.latencies_ms else 0.0


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("connection closed by server")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._try_complete()

    def _try_complete(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end])
        length = 0
        lower = head.lower()
        marker = lower.find(b"content-length:")
        if marker >= 0:
            stop = lower.find(b"\r\n", marker)
            length = int(head[marker + 15 : stop if stop >= 0 else None].strip())
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        status = int(head[9:12])
        body = bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        self._waiter.set_result((status, body))

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """Send one pre-rendered request and wait for its response."""
        if self._lost is not None:
            raise self._lost
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self.transport.write(payload)
        return await self._waiter


def _render(method: str, host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _client(
    index: int,
    scenario: str,
    host: str,
    port: int,
    headers: dict[str, str],
    make_reserve: Callable[[str], bytes],
    amount: int,
    deadline: float,
    result: LoadResult,
    count: int | None,
) -> None:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, host, port)
    hostport = f"{host}:{port}"
    noop = _render("GET", hostport, "/healthz", headers, b"")
    seq = 0
    try:
        while time.perf_counter() < deadline:
            if count is not None:
                if result.started >= count:
                    break
                result.started += 1
            seq += 1
            start = time.perf_counter()
            if scenario == "noop":
                status, _ = await conn.request(noop)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status != 200:
                    result.errors += 1
                    continue
            else:
                key = f"lg-{index}-{seq}"
                body = make_reserve(key)
                status, raw = await conn.request(
                    _render("POST", hostport, "/v1/reservations", headers, body)
                )
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status != 200:
                    result.errors += 1
                    continue
                reservation_id = json.loads(raw)["reservation_id"]
                commit = json.dumps(
                    {"idempotency_key": key, "actual": {"unit": "USD_MICROCENTS", "amount": amount}}
                ).encode()
                status, _ = await conn.request(
                    _render(
                        "POST",
                        hostport,
                        f"/v1/reservations/{reservation_id}/commit",
                        headers,
                        commit,
                    )
                )
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status != 200:
                    result.errors += 1
                    continue
                result.committed_amount += amount
            result.latencies_ms.append((time.perf_counter() - start) * 1000)
            result.completed += 1
    finally:
        if conn.transport is not None:
            conn.transport.close()


async def _run(
    scenario: str,
    host: str,
    port: int,
    api_key: str,
    tenant: str,
    clients: int,
    duration_s: float,
    amount: int,
    count: int | None,
) -> LoadResult:
    headers = {"X-Cycles-API-Key": api_key, "Connection": "keep-alive"}

    def make_reserve(key: str) -> bytes:
        return (
            f'{{"idempotency_key":"{key}",'
            f'"subject":{{"tenant":"{tenant}","agent":"bench"}},'
            '"action":{"kind":"llm.completion","name":"bench-model"},'
            f'"estimate":{{"unit":"USD_MICROCENTS","amount":{amount}}},"ttl_ms":60000}}'
        ).encode()

    result = LoadResult(scenario=scenario, clients=clients, duration_s=duration_s)
    started = time.perf_counter()
    deadline = started + duration_s
    await asyncio.gather(
        *(
            _client(i, scenario, host, port, headers, make_reserve, amount, deadline, result, count)
            for i in range(clients)
        )
    )
    result.duration_s = time.perf_counter() - started
    return result


def run_load(
    scenario: str,
    *,
    host: str,
    port: int,
    api_key: str = "",
    tenant: str = "",
    clients: int = 64,
    duration_s: float = 5.0,
    amount: int = 1_000,
    count: int | None = None,
) -> LoadResult:
    """Run one load scenario (``"pair"`` or ``"noop"``) and return its measurements.

    With ``count``, the clients stop after that many operations in all (or at the deadline).
    """
    try:
        import uvloop

        runner: Callable[..., LoadResult] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    return runner(_run(scenario, host, port, api_key, tenant, clients, duration_s, amount, count))
