"""Server throughput: reserve+commit pairs per second against a real server, per store.

For each store (SQLite, and Redis when reachable) and each worker count, this starts
``runcycles-server`` (``python -m runcycles_server serve --workers N``, no access log),
provisions a tenant with a budget large enough never to run out, and runs N concurrent virtual
clients doing reserve+commit pairs for a fixed time with a lean HTTP/1.1 load generator
(``_loadgen.py``, one keep-alive connection per client). Printed per run:

* pairs/s, p50 and p99 latency per pair, errors;
* **server CPU per pair** (user+system time of the server process and its workers, read from
  ``/proc``, divided by the pairs done): the number to compare between versions on a shared or
  noisy machine, where wall-clock rates swing with whatever else runs; and the load
  generator's own CPU per pair (it runs in this process, on the same cores);
* the floor of the same HTTP stack: the server's no-op route (``GET /healthz``), with its
  server CPU per request — the cost of uvicorn plus the app's request context, which no
  handler can go below — and the ratio pairs/s : no-op req/s;
* for Redis, the rate of raw ``EVALSHA`` calls of a trivial script from one pipelined client
  (``redis-benchmark``-style), the store's own floor;
* a ledger check: afterwards ``GET /v1/admin/budgets?tenant_id=`` (``{"ledgers": [...]}``)
  must show ``spent`` equal to the sum of acknowledged commits, ``reserved == 0`` and
  ``remaining == allocated - spent - reserved - debt``;
* the 1-minute load average before and after, so a number can be judged against the noise;
* with ``--evidence off,on`` (the default), each store runs twice, without and with signed
  evidence (``cycles serve --no-evidence`` / the default), and the **evidence cost** is printed:
  server CPU per pair with evidence on divided by off (target <= 1.25x; see docs/evidence.md).

Usage::

    uv run python benchmarks/server_throughput.py                # both stores, 1 and 2 workers
    uv run python benchmarks/server_throughput.py --seconds 5 --workers 2,3 --stores sqlite

Options: ``--clients 64``, ``--seconds 10``, ``--workers 1,2`` (comma list to compare),
``--evidence off,on`` (``on``, ``off`` or both),
``--stores sqlite,redis`` (Redis from ``CYCLES_TEST_REDIS_URL``, default db 15 on loopback,
under a fresh key prefix that is deleted afterwards). The exit status is 1 on a ledger
mismatch. Target (the GitHub issue): on a 2-core machine with the load generator on the same
machine, >= 1,500 pairs/s at 64 clients with 0 ledger mismatches, for both stores. Server CPU
needs Linux ``/proc``; elsewhere it prints ``n/a``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _loadgen import LoadResult, run_load

from runcycles_server.testing import ServerProcess, redis_url_for_tests

BUDGET = 10**15
AMOUNT = 1_000
TARGET_PAIRS_PER_S = 1_500
EVIDENCE_CPU_TARGET = 1.25
"""Most server CPU per pair with evidence on, relative to off."""


def _redis_available(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def _redis_script_floor(url: str, seconds: float) -> float:
    """Rate of EVALSHA calls of a one-key script from one pipelined client (calls/s)."""
    import redis

    client = redis.Redis.from_url(url)
    sha = client.script_load("return redis.call('INCR', KEYS[1])")
    key = "{cyclesbench}:floor"
    done = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        pipe = client.pipeline(transaction=False)
        for _ in range(64):
            pipe.evalsha(sha, 1, key)
        pipe.execute()
        done += 64
    elapsed = time.perf_counter() - started
    client.delete(key)
    client.close()
    return done / elapsed


def _process_tree_cpu_s(root: int) -> float | None:
    """Return user+system CPU seconds of ``root`` and its live descendants (Linux), else None."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    if root not in cpu:
        return None
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(cpu[pid] for pid in tree)


def _measure(
    server: ServerProcess, scenario: str, **kwargs: Any
) -> tuple[LoadResult, float | None, str]:
    """Run one load scenario; return it with server CPU (us, or None) and loadgen CPU per op."""
    before = _process_tree_cpu_s(server.process.pid)
    own = time.process_time()
    result = run_load(scenario, host=server.host, port=server.port, **kwargs)
    own = time.process_time() - own
    after = _process_tree_cpu_s(server.process.pid)
    done = max(result.completed, 1)
    server_cpu = (after - before) / done * 1e6 if before is not None and after is not None else None
    return result, server_cpu, f"{own / done * 1e6:4.0f} us"


def _ledger_check(server: ServerProcess, tenant_id: str, committed: int) -> tuple[bool, str]:
    answer = server.admin("GET", "/v1/admin/budgets", params={"tenant_id": tenant_id})
    scope = f"tenant:{tenant_id}"
    found = [row for row in answer["ledgers"] if row["scope"] == scope]
    if not found:
        return False, f"no ledger for {scope} in GET /v1/admin/budgets: {answer}"
    row = found[0]
    allocated, remaining, spent, reserved, debt = (
        row[name]["amount"] if name in row else 0
        for name in ("allocated", "remaining", "spent", "reserved", "debt")
    )
    ok = spent == committed and reserved == 0 and remaining == allocated - spent - reserved - debt
    return ok, (
        f"spent={spent} acknowledged={committed} reserved={reserved} "
        f"remaining={remaining} allocated={allocated} debt={debt}"
    )


def _row(label: str, result: LoadResult, unit: str, cpu_us: float | None, own_cpu: str) -> str:
    server_cpu = "   n/a" if cpu_us is None else f"{cpu_us:6.0f} us"
    return (
        f"  {label:<26} {result.rate:>8,.0f} {unit:<7} p50 {result.p50:6.2f} ms  "
        f"p99 {result.percentile(99):6.2f} ms  errors {result.errors}  "
        f"server CPU {server_cpu}/op  loadgen CPU {own_cpu}/op"
    )


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def bench_store(
    store: str, clients: int, seconds: float, workers: int, evidence: bool = True
) -> tuple[bool, float | None]:
    """Benchmark one store with ``workers`` server processes.

    Returns whether the ledger held, and the server CPU per pair (us; ``None`` without /proc).
    """
    print(
        f"\n== store: {store} ({workers} server workers, {clients} clients, {seconds:g} s, "
        f"evidence {'on' if evidence else 'off'}; load average {_load_average()} on "
        f"{os.cpu_count()} CPUs)"
    )
    extra = [] if evidence else ["--no-evidence"]
    with ServerProcess.start(store=store, workers=workers, extra_args=extra) as server:  # type: ignore[arg-type]
        tenant = server.provision(budget=BUDGET)
        common: dict[str, Any] = {"api_key": tenant.api_key, "clients": clients}
        noop, noop_cpu, noop_own = _measure(server, "noop", duration_s=seconds / 2, **common)
        pairs, pair_cpu, pair_own = _measure(
            server,
            "pair",
            tenant=tenant.tenant_id,
            duration_s=seconds,
            amount=AMOUNT,
            **common,
        )
        ok, detail = _ledger_check(server, tenant.tenant_id, pairs.committed_amount)
    print(_row("no-op GET /healthz (floor)", noop, "req/s", noop_cpu, noop_own))
    print(_row("reserve+commit", pairs, "pairs/s", pair_cpu, pair_own))
    print(f"  ratio pairs/s : no-op req/s = {pairs.rate / max(noop.rate, 1e-9):.3f}")
    if store == "redis":
        floor = _redis_script_floor(redis_url_for_tests(), 2.0)
        print(f"  raw EVALSHA (pipelined, 1 client) {floor:>10,.0f} calls/s")
    print(f"  ledger check: {'OK' if ok else 'MISMATCH'} ({detail})")
    met = pairs.rate >= TARGET_PAIRS_PER_S and pairs.errors == 0 and ok
    print(
        f"  target >= {TARGET_PAIRS_PER_S:,} pairs/s, 0 errors, ledger OK: "
        f"{'met' if met else 'NOT met'} (load average now {_load_average()})"
    )
    return ok, pair_cpu


def main() -> int:
    """Run the benchmark for every requested store and worker count."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", default="1,2", help="worker count, or a comma list (2,3)")
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--evidence", default="off,on", help="off, on, or both (off,on)")
    args = parser.parse_args()
    modes = [mode.strip() == "on" for mode in args.evidence.split(",")]
    ok = True
    for store in args.stores.split(","):
        if store == "redis" and not _redis_available(redis_url_for_tests()):
            print(f"\n== store: redis skipped: no Redis at {redis_url_for_tests()}")
            continue
        for workers in (int(w) for w in args.workers.split(",")):
            cpu: dict[bool, float | None] = {}
            for evidence in modes:
                held, cpu[evidence] = bench_store(
                    store, args.clients, args.seconds, workers, evidence
                )
                ok = held and ok
            off, on = cpu.get(False), cpu.get(True)
            if off and on:
                ratio = on / off
                verdict = "met" if ratio <= EVIDENCE_CPU_TARGET else "NOT met"
                print(
                    f"  evidence cost ({store}, {workers} workers): server CPU per pair "
                    f"{on:.0f} us on / {off:.0f} us off = {ratio:.2f}x "
                    f"(target <= {EVIDENCE_CPU_TARGET}x: {verdict})"
                )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
