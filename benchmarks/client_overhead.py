"""Client CPU overhead of runcycles versus raw httpx, per reserve + commit pair.

A tiny HTTP/1.1 server runs in a subprocess (its CPU is not counted) and answers
``POST /v1/reservations`` and ``POST /v1/reservations/{id}/commit`` with valid canned JSON.
In this process we measure ``time.process_time()`` per reserve+commit pair for:

* raw ``httpx.Client`` posting the same JSON (dict built per call, ``json.dumps``, ``.json()``);
* ``CyclesClient`` (request models built per call, ``get_body_attribute``);
* raw ``httpx.AsyncClient`` and ``AsyncCyclesClient`` likewise.

Variants are interleaved over several rounds; medians and ratios are printed. Extra rows show
the typed path (``response.data``) and dict requests. Run::

    uv run python benchmarks/client_overhead.py [--pairs 150] [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    ReservationCreateRequest,
    Subject,
    Unit,
)

RESERVE_BODY = json.dumps(
    {
        "decision": "ALLOW",
        "reservation_id": "3f2b8c1e-9a4d-4e1b-8f6a-2c7d5e9b1a0f",
        "affected_scopes": ["tenant:acme", "tenant:acme/agent:bot"],
        "reserved": {"unit": "USD_MICROCENTS", "amount": 500000},
        "expires_at_ms": 1795000000000,
        "remaining_ttl_ms": 60000,
        "scope_path": "tenant:acme/agent:bot",
    }
).encode()
COMMIT_BODY = json.dumps(
    {
        "status": "COMMITTED",
        "charged": {"unit": "USD_MICROCENTS", "amount": 420000},
        "released": {"unit": "USD_MICROCENTS", "amount": 80000},
    }
).encode()


# ------------------------------------------------------------------------------------ server


def _answer(body: bytes) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        "x-request-id: 7c1e2f3a-0000-4000-8000-000000000001\r\n"
        "x-cycles-trace-id: 0af7651916cd43dd8448eb211c80319c\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


RESERVE_ANSWER = _answer(RESERVE_BODY)
COMMIT_ANSWER = _answer(COMMIT_BODY)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, _, rest = head.partition(b"\r\n")
            length = 0
            for line in rest.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            method, path, _ = request_line.split(b" ", 2)
            if method == b"POST" and path == b"/v1/reservations":
                writer.write(RESERVE_ANSWER)
            elif method == b"POST" and path.endswith(b"/commit"):
                writer.write(COMMIT_ANSWER)
            else:
                writer.write(NOT_FOUND)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve() -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------------ client

API_KEY = "bench-key"


def _reserve_dict(i: int) -> dict[str, object]:
    return {
        "idempotency_key": f"reserve-{i}",
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 500_000},
        "ttl_ms": 60_000,
    }


def _commit_dict(i: int) -> dict[str, object]:
    return {
        "idempotency_key": f"commit-{i}",
        "actual": {"unit": "USD_MICROCENTS", "amount": 420_000},
    }


def _reserve_model(i: int) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=f"reserve-{i}",
        subject=Subject(tenant="acme", agent="bot"),
        action=Action(kind="llm.completion", name="openai:gpt-4o"),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=500_000),
        ttl_ms=60_000,
    )


def _commit_model(i: int) -> CommitRequest:
    return CommitRequest(
        idempotency_key=f"commit-{i}",
        actual=Amount(unit=Unit.USD_MICROCENTS, amount=420_000),
    )


def _raw_sync(base: str) -> Callable[[int], None]:
    http = httpx.Client(headers={"X-Cycles-API-Key": API_KEY, "Accept": "application/json"})
    url = f"{base}/v1/reservations"

    def pair(i: int) -> None:
        body = _reserve_dict(i)
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": f"reserve-{i}"}
        rid = http.post(url, content=json.dumps(body).encode(), headers=headers).json()[
            "reservation_id"
        ]
        body = _commit_dict(i)
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": f"commit-{i}"}
        http.post(f"{url}/{rid}/commit", content=json.dumps(body).encode(), headers=headers).json()

    return pair


def _cycles_sync(base: str, mode: str) -> Callable[[int], None]:
    client = CyclesClient(CyclesConfig(base_url=base, api_key=API_KEY))

    def pair(i: int) -> None:
        if mode == "dict":
            reserve: object = _reserve_dict(i)
        else:
            reserve = _reserve_model(i)
        response = client.create_reservation(reserve)  # type: ignore[arg-type]
        if mode == "typed":
            rid = response.data.reservation_id
            assert rid is not None
        else:
            rid = response.get_body_attribute("reservation_id")
        commit = _commit_dict(i) if mode == "dict" else _commit_model(i)
        result = client.commit_reservation(rid, commit)
        charged = result.data.charged if mode == "typed" else result.get_body_attribute("charged")
        assert charged is not None

    return pair


def _raw_async(base: str) -> Callable[[int], Awaitable[None]]:
    http = httpx.AsyncClient(headers={"X-Cycles-API-Key": API_KEY, "Accept": "application/json"})
    url = f"{base}/v1/reservations"

    async def pair(i: int) -> None:
        body = _reserve_dict(i)
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": f"reserve-{i}"}
        response = await http.post(url, content=json.dumps(body).encode(), headers=headers)
        rid = response.json()["reservation_id"]
        body = _commit_dict(i)
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": f"commit-{i}"}
        response = await http.post(
            f"{url}/{rid}/commit", content=json.dumps(body).encode(), headers=headers
        )
        response.json()

    return pair


def _cycles_async(base: str, mode: str) -> Callable[[int], Awaitable[None]]:
    client = AsyncCyclesClient(CyclesConfig(base_url=base, api_key=API_KEY))

    async def pair(i: int) -> None:
        if mode == "dict":
            reserve: object = _reserve_dict(i)
        else:
            reserve = _reserve_model(i)
        response = await client.create_reservation(reserve)  # type: ignore[arg-type]
        if mode == "typed":
            rid = response.data.reservation_id
            assert rid is not None
        else:
            rid = response.get_body_attribute("reservation_id")
        commit = _commit_dict(i) if mode == "dict" else _commit_model(i)
        result = await client.commit_reservation(rid, commit)
        charged = result.data.charged if mode == "typed" else result.get_body_attribute("charged")
        assert charged is not None

    return pair


def _measure_sync(pair: Callable[[int], None], pairs: int) -> float:
    for i in range(20):  # warm the connection and caches
        pair(i)
    gc.collect()
    start = time.process_time()
    for i in range(pairs):
        pair(i)
    return (time.process_time() - start) / pairs * 1e6


def _measure_async(
    loop: asyncio.AbstractEventLoop, pair: Callable[[int], Awaitable[None]], pairs: int
) -> float:
    async def run(count: int) -> None:
        for i in range(count):
            await pair(i)

    loop.run_until_complete(run(20))
    gc.collect()
    start = time.process_time()
    loop.run_until_complete(run(pairs))
    return (time.process_time() - start) / pairs * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=150, help="pairs per measurement")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return 0

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        base = f"http://127.0.0.1:{int(server.stdout.readline())}"
        loop = asyncio.new_event_loop()
        sync_variants: dict[str, Callable[[int], None]] = {
            "raw httpx.Client": _raw_sync(base),
            "CyclesClient": _cycles_sync(base, "models"),
            "CyclesClient (typed .data)": _cycles_sync(base, "typed"),
            "CyclesClient (dict requests)": _cycles_sync(base, "dict"),
        }
        async_variants: dict[str, Callable[[int], Awaitable[None]]] = {
            "raw httpx.AsyncClient": _raw_async(base),
            "AsyncCyclesClient": _cycles_async(base, "models"),
            "AsyncCyclesClient (typed .data)": _cycles_async(base, "typed"),
            "AsyncCyclesClient (dict requests)": _cycles_async(base, "dict"),
        }
        samples: dict[str, list[float]] = {name: [] for name in [*sync_variants, *async_variants]}
        order = random.Random(1234)
        names = list(samples)
        for _ in range(args.rounds):
            order.shuffle(names)  # no variant always runs first or last
            for name in names:
                if name in sync_variants:
                    samples[name].append(_measure_sync(sync_variants[name], args.pairs))
                else:
                    samples[name].append(_measure_async(loop, async_variants[name], args.pairs))
        loop.close()
    finally:
        server.terminate()
        server.wait()

    baselines = dict.fromkeys(sync_variants, "raw httpx.Client")
    baselines.update(dict.fromkeys(async_variants, "raw httpx.AsyncClient"))
    print(
        f"client CPU per reserve+commit pair, {args.rounds} interleaved rounds of {args.pairs} "
        "pairs each.\n  best = fastest round (interference from other processes only adds "
        "time);\n  paired = median over rounds of variant / raw httpx measured in the same round"
    )
    print(f"  {'variant':<36} {'best':>8}   {'ratio':>6}   {'median':>8}   {'paired':>6}")
    ratios: dict[str, float] = {}
    for name, values in samples.items():
        reference_values = samples[baselines[name]]
        ratios[name] = min(values) / min(reference_values)
        paired = statistics.median(
            value / reference for value, reference in zip(values, reference_values, strict=True)
        )
        print(
            f"  {name:<36} {min(values):6.1f}us   x{ratios[name]:.3f}"
            f"   {statistics.median(values):6.1f}us   x{paired:.3f}"
        )
    sync_ratio, async_ratio = ratios["CyclesClient"], ratios["AsyncCyclesClient"]
    verdict = "met" if max(sync_ratio, async_ratio) <= 1.10 else "NOT met"
    print(f"target <= 1.10 (best): sync x{sync_ratio:.3f}, async x{async_ratio:.3f} -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
