"""Server throughput: reserve+commit pairs per second against a real server, per store.

For each store (SQLite, and Redis when reachable) this starts ``runcycles-server`` with
``--workers`` processes, provisions a tenant with a budget large enough never to run out, and
runs N concurrent virtual clients doing reserve+commit pairs for a fixed time with a lean
HTTP/1.1 load generator (``_loadgen.py``). Printed side by side, in one run:

* pairs/s, p50 and p99 latency per pair, errors;
* the floor of the same HTTP stack: the server's no-op route (``GET /healthz``), which is also
  the load generator's own ceiling — if it is not far above the pair rate, the generator
  would be the bottleneck;
* for Redis, the rate of raw ``EVALSHA`` calls of a trivial script from one client
  (``redis-benchmark``-style), the store's own floor;
* a ledger check: after the run, the tenant's ``spent`` must equal the sum of acknowledged
  commits and ``reserved`` must be 0.

Usage: ``uv run python benchmarks/server_throughput.py [--clients 64] [--seconds 10]
[--workers 2] [--stores sqlite,redis]``. Target on a 2-core machine: >= 1,500 pairs/s at 64
clients with 0 ledger mismatches for both stores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _loadgen import LoadResult, run_load

from runcycles_server.testing import ServerProcess, redis_url_for_tests

BUDGET = 10**15
AMOUNT = 1_000


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


def _ledger_check(server: ServerProcess, tenant_id: str, committed: int) -> tuple[bool, str]:
    balances = server.admin("GET", "/v1/admin/budgets", params={"tenant_id": tenant_id})
    ledgers = balances.get("ledgers") or balances.get("budgets") or []
    ledger = next(x for x in ledgers if x["scope"] == f"tenant:{tenant_id}")
    spent = ledger["spent"]["amount"]
    reserved = ledger["reserved"]["amount"]
    ok = spent == committed and reserved == 0
    return ok, f"spent={spent} acknowledged={committed} reserved={reserved}"


def _row(label: str, result: LoadResult, unit: str) -> str:
    return (
        f"  {label:<28} {result.rate:>10,.0f} {unit:<8} p50 {result.p50:6.2f} ms  "
        f"p99 {result.percentile(99):6.2f} ms  errors {result.errors}"
    )


def bench_store(store: str, clients: int, seconds: float, workers: int) -> bool:
    """Benchmark one store; return whether the ledger check passed."""
    print(f"\n== store: {store} ({workers} server workers, {clients} clients, {seconds:.0f} s)")
    with ServerProcess.start(store=store, workers=workers) as server:  # type: ignore[arg-type]
        tenant = server.provision(budget=BUDGET)
        noop = run_load(
            "noop",
            host=server.host,
            port=server.port,
            api_key=tenant.api_key,
            clients=clients,
            duration_s=seconds / 2,
        )
        pairs = run_load(
            "pair",
            host=server.host,
            port=server.port,
            api_key=tenant.api_key,
            tenant=tenant.tenant_id,
            clients=clients,
            duration_s=seconds,
            amount=AMOUNT,
        )
        ok, detail = _ledger_check(server, tenant.tenant_id, pairs.committed_amount)
    print(_row("no-op route (HTTP floor)", noop, "req/s"))
    print(_row("reserve+commit", pairs, "pairs/s"))
    print(f"  ratio pairs/s : no-op req/s = {pairs.rate / noop.rate:.3f}")
    if store == "redis":
        floor = _redis_script_floor(redis_url_for_tests(), 2.0)
        print(f"  raw EVALSHA (pipelined, 1 client)   {floor:>10,.0f} calls/s")
    print(f"  ledger check: {'OK' if ok else 'MISMATCH'} ({detail})")
    target = pairs.rate >= 1_500
    print(f"  target >= 1,500 pairs/s: {'met' if target else 'NOT met'}")
    return ok


def main() -> int:
    """Run the benchmark for every requested store."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stores", default="sqlite,redis")
    args = parser.parse_args()
    ok = True
    for store in args.stores.split(","):
        if store == "redis" and not _redis_available(redis_url_for_tests()):
            print(f"\n== store: redis skipped: no Redis at {redis_url_for_tests()}")
            continue
        ok = bench_store(store, args.clients, args.seconds, args.workers) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
