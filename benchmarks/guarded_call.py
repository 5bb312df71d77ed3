"""Client CPU of a guarded call (``@cycles``) versus raw httpx, and the cost of live reservations.

One run starts ONE local ``runcycles-server`` (SQLite store, its own process: its CPU is not
counted), provisions a tenant with a budget that never runs out, and measures in this process:

1. **CPU per guarded call**: ``time.process_time()`` (all threads of this process, so the
   heartbeat thread and the journal worker thread are included) per call of a trivial function
   decorated with ``@cycles`` (heartbeat ON, the default; journal as configured by default)
   on a ``CyclesClient`` and on an ``AsyncCyclesClient``, versus raw ``httpx.Client`` /
   ``httpx.AsyncClient`` sending the same reserve + commit JSON with the same headers, parsing
   the answers and checking ``decision`` / ``status``. A third variant calls the client's
   own ``create_reservation`` + ``commit_reservation`` by hand (request models built per
   call, no decorator, no journal, no heartbeat): ``@cycles / by hand`` is what the
   decorator's machinery costs over the client, while ``@cycles / raw`` (the target) also
   counts what the client saves by sending straight to httpx's transport instead of through
   ``httpx.Client.send`` (see ``runcycles._wire``). Variants are interleaved over several
   rounds (shuffled order); medians and the ratios to raw per mode are printed, plus the
   median of the per-round ratios.
2. **10,000 concurrently live reservations** on one ``AsyncCyclesClient``: that many
   ``@cycles`` calls held open at once (asyncio tasks waiting on an ``Event``, heartbeat on).
   Printed: the background asyncio tasks and threads the client created for them (all tasks
   minus the workload's own, threads minus those alive before), and client-side memory per
   live reservation (``tracemalloc`` growth with the reservations live, minus the growth of
   the same number of bare tasks waiting on the same ``Event``, divided by the count).

The journal directory is a temporary one; the output says whether the journal is on and in
which fsync mode. Run::

    uv run python benchmarks/guarded_call.py            # default, about 1-2 minutes
    uv run python benchmarks/guarded_call.py --quick    # a few seconds of measurement

Options: ``--calls`` per measurement, ``--rounds``, ``--live`` (number of live reservations).
Targets (the GitHub issue): ratio <= 1.10 for sync and async; 1 background task and 0 extra
threads for the live reservations.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    CyclesMetrics,
    ReservationCreateRequest,
    Subject,
    Unit,
    cycles,
)
from runcycles._protocol import USER_AGENT
from runcycles.settlement import default_journal
from runcycles_server.testing import ServerProcess

BUDGET = 10**15
ESTIMATE = 500
ACTUAL = 420
ACTION = {"kind": "llm.completion", "name": "gpt-4o"}
TARGET_RATIO = 1.10
MEMORY_SAMPLE = 1_000
"""Live reservations started under tracemalloc (the last ones, with the others already live)."""
HELD_TTL_MS = 600_000
"""Lease of the held reservations: long enough that no beat falls due while they are counted
(the point is what each live reservation costs at rest, not the extends)."""


def _has_sniffio() -> bool:
    """Whether ``sniffio`` is importable: without it httpcore retries the import on every
    async request, which costs raw httpx and runcycles alike."""
    return importlib.util.find_spec("sniffio") is not None


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


# ------------------------------------------------------------------------------- raw httpx


class _Raw:
    """Reserve + commit the way a careful hand-written httpx caller would."""

    def __init__(self, config: CyclesConfig) -> None:
        self.url = f"{config.base_url}/v1/reservations"
        self.tenant = config.tenant
        self.headers = {
            "X-Cycles-API-Key": config.api_key,
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        self.run = os.urandom(6).hex()
        self.count = 0

    def reserve(self) -> tuple[bytes, dict[str, str]]:
        self.count += 1
        key = f"{self.run}-r{self.count}"
        body = {
            "idempotency_key": key,
            "subject": {"tenant": self.tenant},
            "action": ACTION,
            "estimate": {"unit": "USD_MICROCENTS", "amount": ESTIMATE},
            "ttl_ms": 60_000,
        }
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": key}
        return json.dumps(body).encode(), headers

    def commit(self, latency_ms: int) -> tuple[bytes, dict[str, str]]:
        key = f"{self.run}-c{self.count}"
        body = {
            "idempotency_key": key,
            "actual": {"unit": "USD_MICROCENTS", "amount": ACTUAL},
            "metrics": {"latency_ms": latency_ms},
        }
        headers = {"Content-Type": "application/json", "X-Idempotency-Key": key}
        return json.dumps(body).encode(), headers


def _work() -> str:
    return "ok"


async def _awork() -> str:
    return "ok"


def _raw_sync(config: CyclesConfig) -> Callable[[], object]:
    raw = _Raw(config)
    http = httpx.Client(headers=raw.headers)

    def call() -> object:
        content, headers = raw.reserve()
        data = http.post(raw.url, content=content, headers=headers).json()
        if data["decision"] != "ALLOW":
            raise RuntimeError(f"reservation denied: {data}")
        started = time.perf_counter()
        result = _work()
        content, headers = raw.commit(int((time.perf_counter() - started) * 1000))
        url = f"{raw.url}/{data['reservation_id']}/commit"
        answer = http.post(url, content=content, headers=headers).json()
        if answer["status"] != "COMMITTED":
            raise RuntimeError(f"commit failed: {answer}")
        return result

    return call


def _raw_async(config: CyclesConfig) -> Callable[[], Awaitable[object]]:
    raw = _Raw(config)
    http = httpx.AsyncClient(headers=raw.headers)

    async def call() -> object:
        content, headers = raw.reserve()
        data = (await http.post(raw.url, content=content, headers=headers)).json()
        if data["decision"] != "ALLOW":
            raise RuntimeError(f"reservation denied: {data}")
        started = time.perf_counter()
        result = await _awork()
        content, headers = raw.commit(int((time.perf_counter() - started) * 1000))
        url = f"{raw.url}/{data['reservation_id']}/commit"
        answer = (await http.post(url, content=content, headers=headers)).json()
        if answer["status"] != "COMMITTED":
            raise RuntimeError(f"commit failed: {answer}")
        return result

    return call


# ------------------------------------------------------------------------------- client, bare


def _bare_sync(config: CyclesConfig) -> Callable[[], object]:
    """The client's own reserve + commit, no decorator: what ``@cycles`` adds is the rest."""
    client = CyclesClient(config)
    run = os.urandom(6).hex()
    count = 0

    def call() -> object:
        nonlocal count
        count += 1
        reserve = ReservationCreateRequest(
            idempotency_key=f"{run}-r{count}",
            subject=Subject(tenant=config.tenant),
            action=Action(kind=ACTION["kind"], name=ACTION["name"]),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=ESTIMATE),
            ttl_ms=60_000,
        )
        reservation = client.create_reservation(reserve).data
        if reservation.decision != "ALLOW" or reservation.reservation_id is None:
            raise RuntimeError(f"reservation denied: {reservation}")
        started = time.perf_counter()
        result = _work()
        commit = CommitRequest(
            idempotency_key=f"{run}-c{count}",
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=ACTUAL),
            metrics=CyclesMetrics(latency_ms=int((time.perf_counter() - started) * 1000)),
        )
        if client.commit_reservation(reservation.reservation_id, commit).data.status != "COMMITTED":
            raise RuntimeError("commit failed")
        return result

    return call


def _bare_async(config: CyclesConfig) -> Callable[[], Awaitable[object]]:
    client = AsyncCyclesClient(config)
    run = os.urandom(6).hex()
    count = 0

    async def call() -> object:
        nonlocal count
        count += 1
        reserve = ReservationCreateRequest(
            idempotency_key=f"{run}-r{count}",
            subject=Subject(tenant=config.tenant),
            action=Action(kind=ACTION["kind"], name=ACTION["name"]),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=ESTIMATE),
            ttl_ms=60_000,
        )
        reservation = (await client.create_reservation(reserve)).data
        if reservation.decision != "ALLOW" or reservation.reservation_id is None:
            raise RuntimeError(f"reservation denied: {reservation}")
        started = time.perf_counter()
        result = await _awork()
        commit = CommitRequest(
            idempotency_key=f"{run}-c{count}",
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=ACTUAL),
            metrics=CyclesMetrics(latency_ms=int((time.perf_counter() - started) * 1000)),
        )
        answer = await client.commit_reservation(reservation.reservation_id, commit)
        if answer.data.status != "COMMITTED":
            raise RuntimeError("commit failed")
        return result

    return call


# ------------------------------------------------------------------------------- @cycles


def _cycles_sync(config: CyclesConfig) -> Callable[[], object]:
    client = CyclesClient(config)

    @cycles(
        ESTIMATE,
        actual=lambda result: ACTUAL,
        action_kind=ACTION["kind"],
        action_name=ACTION["name"],
        client=client,
    )
    def call() -> object:
        return _work()

    return call


def _cycles_async(config: CyclesConfig) -> Callable[[], Awaitable[object]]:
    client = AsyncCyclesClient(config)

    @cycles(
        ESTIMATE,
        actual=lambda result: ACTUAL,
        action_kind=ACTION["kind"],
        action_name=ACTION["name"],
        client=client,
    )
    async def call() -> object:
        return await _awork()

    return call


# ------------------------------------------------------------------------------- measuring


def _measure_sync(call: Callable[[], object], calls: int) -> float:
    gc.collect()
    start = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - start) / calls * 1e6


def _measure_async(
    loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[object]], calls: int
) -> float:
    async def run() -> None:
        for _ in range(calls):
            await call()

    gc.collect()
    start = time.process_time()
    loop.run_until_complete(run())
    return (time.process_time() - start) / calls * 1e6


def bench_cpu(config: CyclesConfig, calls: int, rounds: int) -> bool:
    """Print CPU per call of each variant; return whether both ratios meet the target."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sync_variants = {
        "raw httpx.Client": _raw_sync(config),
        "CyclesClient, by hand": _bare_sync(config),
        "@cycles sync": _cycles_sync(config),
    }
    async_variants = {
        "raw httpx.AsyncClient": _raw_async(config),
        "AsyncCyclesClient, by hand": _bare_async(config),
        "@cycles async": _cycles_async(config),
    }
    for fn in sync_variants.values():  # warm connections, caches, the heartbeat thread
        _measure_sync(fn, 30)
    for afn in async_variants.values():
        _measure_async(loop, afn, 30)
    samples: dict[str, list[float]] = {name: [] for name in [*sync_variants, *async_variants]}
    order = random.Random(1234)
    names = list(samples)
    for _ in range(rounds):
        order.shuffle(names)  # no variant always runs first or last
        for name in names:
            if name in sync_variants:
                samples[name].append(_measure_sync(sync_variants[name], calls))
            else:
                samples[name].append(_measure_async(loop, async_variants[name], calls))
    loop.close()
    asyncio.set_event_loop(None)

    print(
        f"\n1. client CPU per guarded call (reserve + run + commit), {rounds} interleaved "
        f"rounds of {calls} calls; process CPU of this process (all its threads)"
    )
    print(f"  {'variant':<27} {'median':>9} {'best':>9}   {'ratio':>6} {'paired':>7}")
    met = True
    for raw_name, bare_name, guarded_name in (
        ("raw httpx.Client", "CyclesClient, by hand", "@cycles sync"),
        ("raw httpx.AsyncClient", "AsyncCyclesClient, by hand", "@cycles async"),
    ):
        raw_values = samples[raw_name]
        print(f"  {raw_name:<27} {statistics.median(raw_values):7.1f}us {min(raw_values):7.1f}us")
        for name in (bare_name, guarded_name):
            values = samples[name]
            ratio = statistics.median(values) / statistics.median(raw_values)
            paired = statistics.median(v / r for v, r in zip(values, raw_values, strict=True))
            print(
                f"  {name:<27} {statistics.median(values):7.1f}us {min(values):7.1f}us"
                f"   x{ratio:.3f} x{paired:.3f}"
            )
            if name == guarded_name:
                met = met and ratio <= TARGET_RATIO
        machinery = statistics.median(samples[guarded_name]) / statistics.median(samples[bare_name])
        print(f"  {'':<27} @cycles / by hand with the client: x{machinery:.3f}")
    print(
        "  ratio = median(variant) / median(raw httpx); paired = median over rounds of the ratio "
        f"measured in the same round.\n  target ratio (@cycles / raw) <= {TARGET_RATIO:.2f}: "
        f"{'met' if met else 'NOT met'} (load average {_load_average()})"
    )
    return met


# ------------------------------------------------------------------------------- live reservations


async def _hold(
    count: int,
    fn: Callable[[asyncio.Event], Awaitable[object]],
    tasks_before: set[asyncio.Task[Any]],
    threads_before: set[int | None],
) -> dict[str, Any]:
    """Start ``count`` calls of ``fn`` that wait on Events; measure while all are live.

    Calls are started and released in batches of one Event each, below the connection pool's
    size, so no request queues in httpx's pool (whose queue handling is slow when long).
    Tasks and threads are counted against those alive before the client was created.
    """

    holder = _Holder()
    me = asyncio.current_task()
    gc.collect()
    cpu_start = time.process_time()
    workload: list[asyncio.Task[object]] = []
    batches: list[tuple[asyncio.Event, list[asyncio.Task[object]]]] = []
    batch = 64
    traced_from = max(0, count - MEMORY_SAMPLE) // batch * batch
    mem_before = 0
    holder.activate()
    for start in range(0, count, batch):
        if start == traced_from:  # trace only the last ones: tracemalloc slows everything
            gc.collect()
            tracemalloc.start()
            mem_before = tracemalloc.get_traced_memory()[0]
        release = asyncio.Event()
        current = [
            asyncio.ensure_future(fn(release)) for _ in range(start, min(count, start + batch))
        ]
        batches.append((release, current))
        workload += current
        while holder.entered < len(workload):
            await asyncio.sleep(0.002)
            failed = [task for task in current if task.done() and task.exception()]
            if failed:
                raise RuntimeError(f"a held call failed: {failed[0].exception()!r}")
    gc.collect()
    mem_live = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    cpu_s = time.process_time() - cpu_start
    others = set(asyncio.all_tasks()) - set(workload) - tasks_before - {me}
    new_threads = [thread for thread in threading.enumerate() if thread.ident not in threads_before]
    for release, current in batches:
        release.set()
        await asyncio.gather(*current)
    holder.deactivate()
    return {
        "bytes": mem_live - mem_before,
        "traced": count - traced_from,
        "cpu_s": cpu_s,
        "tasks": sorted(task.get_name() for task in others),
        "threads": sorted(thread.name for thread in new_threads),
    }


class _Holder:
    """Counts how many held calls have entered their body (a module-level hook)."""

    current: _Holder | None = None

    def __init__(self) -> None:
        self.entered = 0

    def activate(self) -> None:
        _Holder.current = self

    def deactivate(self) -> None:
        _Holder.current = None

    def enter(self) -> None:
        self.entered += 1


async def _held_body(release: asyncio.Event) -> str:
    holder = _Holder.current
    if holder is not None:
        holder.enter()
    await release.wait()
    return "ok"


async def _live(config: CyclesConfig, count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    tasks_before = set(asyncio.all_tasks())
    threads_before = {thread.ident for thread in threading.enumerate()}
    bare = await _hold(count, _held_body, tasks_before, threads_before)
    client = AsyncCyclesClient(config)

    @cycles(
        ESTIMATE,
        actual=lambda result: ACTUAL,
        action_kind=ACTION["kind"],
        action_name="held",
        ttl_ms=HELD_TTL_MS,
        client=client,
    )
    async def held(release: asyncio.Event) -> str:
        return await _held_body(release)

    await held(_already_set())  # connect once (the heartbeat task starts here and is counted)
    guarded = await _hold(count, held, tasks_before, threads_before)
    await client.aclose()
    return bare, guarded


def _already_set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def bench_live(config: CyclesConfig, count: int) -> bool:
    """Print tasks, threads and memory of ``count`` live reservations; return target met."""
    started = time.perf_counter()
    bare, guarded = asyncio.run(_live(config, count))
    elapsed = time.perf_counter() - started
    traced = guarded["traced"]
    per_reservation = guarded["bytes"] / traced - bare["bytes"] / bare["traced"]
    print(
        f"\n2. {count:,} concurrently live @cycles reservations on one AsyncCyclesClient "
        f"(heartbeat on, ttl_ms={HELD_TTL_MS:,}; {elapsed:.1f} s incl. reserving and "
        "committing them)"
    )
    tasks, threads = guarded["tasks"], guarded["threads"]
    print(f"  background asyncio tasks created by the client: {len(tasks)} {tasks}")
    print(f"  threads created by the client:                  {len(threads)} {threads}")
    print(
        f"  client memory per live reservation: {per_reservation:,.0f} bytes (tracemalloc "
        f"growth over the last {traced:,} started: {guarded['bytes'] / traced:,.0f} B per "
        f"@cycles call - {bare['bytes'] / bare['traced']:,.0f} B per bare task on an Event)"
    )
    print(
        f"  client CPU to start them: {guarded['cpu_s'] / count * 1e6:,.0f} us per reservation "
        f"(the last {traced:,} under tracemalloc)"
    )
    met = len(tasks) == 1 and not threads
    print(
        f"  target 1 task, 0 threads: {'met' if met else 'NOT met'} "
        f"(load average {_load_average()})"
    )
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--calls", type=int, help="calls per measurement (default 100)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15)")
    parser.add_argument(
        "--fsync", action="store_true", help="journal with fsync (journal_fsync=True)"
    )
    parser.add_argument(
        "--store", choices=["sqlite", "redis"], default="sqlite", help="server store"
    )
    parser.add_argument("--live", type=int, help="live reservations (default 10000; 0 skips)")
    args = parser.parse_args()
    calls = args.calls or (40 if args.quick else 100)
    rounds = args.rounds or (4 if args.quick else 15)
    live = (2_000 if args.quick else 10_000) if args.live is None else args.live

    with (
        tempfile.TemporaryDirectory(prefix="cycles-bench-journal-") as journal_dir,
        ServerProcess.start(store=args.store) as server,
    ):
        tenant = server.provision(budget=BUDGET)
        options: dict[str, Any] = {"journal_dir": journal_dir}
        if any(field.name == "journal_fsync" for field in dataclasses.fields(CyclesConfig)):
            options["journal_fsync"] = args.fsync  # (older clients always fsync)
        config = dataclasses.replace(tenant.config(), **options)
        journal = default_journal(config)
        if journal is None:
            journal_mode = "off"
        elif getattr(journal, "fsync", True):
            journal_mode = "on, fsync"
        else:
            journal_mode = "on, no fsync (the default)"
        print(
            f"guarded_call: server {server.base_url} ({args.store} store, separate process); "
            f"journal {journal_mode}; Python {sys.version.split()[0]}; httpx "
            f"{httpx.__version__}, sniffio {'installed' if _has_sniffio() else 'missing'}; "
            f"load average {_load_average()} on {os.cpu_count()} CPUs"
        )
        cpu_met = bench_cpu(config, calls, rounds)
        live_met = bench_live(config, live) if live > 0 else True
    print(
        f"\ntargets: CPU ratio {'met' if cpu_met else 'NOT met'}; "
        f"live reservations {'met' if live_met else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
