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
* the cost of webhooks (on unless ``--no-webhook``): server CPU per pair without and with one
  ACTIVE webhook subscription of the tenant (to a receiver on 127.0.0.1), in alternating
  rounds (the subscription created and deleted each round), as medians and their ratio
  (issue target: at most 1.10x). The request path reads no subscription; the dispatcher
  follows the tenant's event log in the background.
* with ``--evidence off,on`` (the default), each store runs twice, without and with signed
  evidence (``cycles serve --no-evidence`` / the default), and the **evidence cost** is printed:
  server CPU per pair with evidence on divided by off (target <= 1.25x; see docs/evidence.md).

Usage::

    uv run python benchmarks/server_throughput.py                # both stores, 1 and 2 workers
    uv run python benchmarks/server_throughput.py --seconds 5 --workers 2,3 --stores sqlite

Metrics overhead (``--metrics``): instead of the above, two servers per store and worker
count, one started with ``cycles serve --metrics`` and one without, take turns running the
same reserve+commit load for ``--rounds`` rounds (the order alternating each round, so drift in
the machine's load hits both alike); printed are each round's server CPU per pair, the medians
and the ratio on : off (the goal: at most 1.05), and a check that the metered server's
``/metrics`` counted the commits::

    uv run python benchmarks/server_throughput.py --metrics --stores sqlite --workers 1

Options: ``--no-webhook``, ``--rounds 3`` (webhook rounds per configuration),
``--clients 64``, ``--seconds 10``, ``--workers 1,2`` (comma list to compare),
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
import statistics
import sys
import threading
import time
import timeit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from _loadgen import LoadResult, run_load
from prometheus_client.parser import text_string_to_metric_families

from runcycles_server.app import create_app
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.testing import ServerProcess, redis_url_for_tests

BUDGET = 10**15
AMOUNT = 1_000
TARGET_PAIRS_PER_S = 1_500
METRICS_TARGET_RATIO = 1.05
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


def _cpu_per_pair_us(server: ServerProcess, tenant_id: str, api_key: str, **kw: Any) -> float:
    """Run one reserve+commit load; return the server's CPU microseconds per pair."""
    before = _process_tree_cpu_s(server.process.pid)
    result = run_load(
        "pair", host=server.host, port=server.port, tenant=tenant_id, api_key=api_key, **kw
    )
    after = _process_tree_cpu_s(server.process.pid)
    if before is None or after is None:
        raise SystemExit("--metrics needs Linux /proc to read the server's CPU time")
    if result.errors:
        raise SystemExit(f"{result.errors} errors during the load: {result.statuses}")
    return (after - before) / max(result.completed, 1) * 1e6


def _metrics_calls_us() -> float:
    """Return the CPU microseconds the metrics calls of one reserve+commit pair take.

    The calls the server makes per pair when metrics are on (two ``observe`` with their
    ``perf_counter`` pairs, one ``decided``) on the metrics object of a real app, timed in
    this process by CPU time (best of 5): a number that does not swing with the machine's
    load like the end-to-end comparison does.
    """
    app = create_app(MemoryStore(), metrics=True, sweep_interval_s=None)
    meter = app.state.metrics
    by_route = {route: endpoint for endpoint, route in meter.templates.items()}
    reserve = by_route["/v1/reservations"]
    commit = by_route["/v1/reservations/{reservation_id}/commit"]
    body = (
        b'{"decision":"ALLOW","reservation_id":"rsv_0123456789abcdef0123","reserved":{"unit":'
        b'"USD_MICROCENTS","amount":1000},"expires_at_ms":1800000060000,"affected_scopes":'
        b'["tenant:acme"],"scope_path":"tenant:acme","balances":[]}'
    )

    def pair() -> None:
        began = time.perf_counter()
        meter.decided("reserve", body)
        meter.observe(reserve, "POST", 200, time.perf_counter() - began)
        began = time.perf_counter()
        meter.observe(commit, "POST", 200, time.perf_counter() - began)

    number = 100_000
    runs = timeit.repeat(pair, number=number, repeat=5, timer=time.process_time)
    return min(runs) / number * 1e6


def bench_metrics_overhead(
    store: str, clients: int, seconds: float, workers: int, rounds: int
) -> bool:
    """Compare server CPU per pair with metrics on and off; return whether /metrics counted."""
    print(
        f"\n== metrics overhead, store: {store} ({workers} server workers, {clients} clients, "
        f"{rounds} rounds of {seconds:g} s each; load average {_load_average()} on "
        f"{os.cpu_count()} CPUs)"
    )
    kinds: Any = store
    with (
        ServerProcess.start(store=kinds, workers=workers) as off,
        ServerProcess.start(store=kinds, workers=workers, extra_args=["--metrics"]) as on,
    ):
        tenants = {
            name: server.provision(budget=BUDGET) for name, server in (("off", off), ("on", on))
        }
        servers = {"off": off, "on": on}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        warm = {"clients": clients, "duration_s": min(2.0, seconds), "amount": AMOUNT}
        for name, server in servers.items():  # warm up both (caches, first-request imports)
            _cpu_per_pair_us(server, tenants[name].tenant_id, tenants[name].api_key, **warm)
        for i in range(rounds):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for name in order:
                tenant = tenants[name]
                cpu[name].append(
                    _cpu_per_pair_us(
                        servers[name],
                        tenant.tenant_id,
                        tenant.api_key,
                        clients=clients,
                        duration_s=seconds,
                        amount=AMOUNT,
                    )
                )
            print(
                f"  round {i + 1}: server CPU/pair off {cpu['off'][-1]:6.1f} us, "
                f"on {cpu['on'][-1]:6.1f} us"
            )
        scraped = httpx.get(
            f"{on.base_url}/metrics", headers={"X-Admin-API-Key": on.admin_key}, timeout=10
        ).text
    median_off, median_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    ratio = median_on / median_off
    print(
        f"  median server CPU/pair: off {median_off:.1f} us, on {median_on:.1f} us, "
        f"ratio on:off {ratio:.3f} (goal <= {METRICS_TARGET_RATIO})"
    )
    ratios = sorted(on_us / off_us for off_us, on_us in zip(cpu["off"], cpu["on"], strict=True))
    print(f"  per-round ratios on:off, sorted: {' '.join(f'{r:.3f}' for r in ratios)}")
    calls = _metrics_calls_us()
    print(
        f"  the metrics calls alone (CPU in-process, best of 5): {calls:.2f} us per pair = "
        f"{calls / median_off:.1%} of the median server CPU per pair without metrics"
    )
    commits = [
        sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "cycles_commits_total"
    ]
    counted = bool(commits) and commits[0] > 0
    print(
        f"  /metrics of the metered server: cycles_commits_total "
        f"{commits[0] if commits else 'missing'} ({'OK' if counted else 'NOT counted'}"
        + (", one worker's count" if workers > 1 else "")
        + ")"
    )
    return counted


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _cpu_per_pair(
    server: ServerProcess, tenant_id: str, api_key: str, seconds: float, clients: int
) -> tuple[float, LoadResult]:
    before = _process_tree_cpu_s(server.process.pid)
    result = run_load(
        "pair",
        host=server.host,
        port=server.port,
        api_key=api_key,
        tenant=tenant_id,
        clients=clients,
        duration_s=seconds,
        amount=AMOUNT,
    )
    after = _process_tree_cpu_s(server.process.pid)
    if before is None or after is None:
        return float("nan"), result
    return (after - before) / max(result.completed, 1) * 1e6, result


def bench_webhook(store: str, clients: int, seconds: float, workers: int, rounds: int) -> None:
    """Server CPU per pair without, then with, one ACTIVE subscription; medians and ratio."""
    print(
        f"\n== webhooks: {store} ({workers} workers, {clients} clients, {rounds} rounds of "
        f"{seconds:g} s per configuration)"
    )
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        with ServerProcess.start(store=store, workers=workers) as server:  # type: ignore[arg-type]
            server.admin(
                "PUT",
                "/v1/admin/config/webhook-security",
                json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
            )
            tenant = server.provision(budget=BUDGET)
            run_load(
                "pair",
                host=server.host,
                port=server.port,
                api_key=tenant.api_key,
                tenant=tenant.tenant_id,
                clients=clients,
                duration_s=1.0,
            )
            without: list[float] = []
            with_sub: list[float] = []
            for _ in range(rounds):  # alternating, so drifting load hits both alike
                cost, _result = _cpu_per_pair(
                    server, tenant.tenant_id, tenant.api_key, seconds, clients
                )
                without.append(cost)
                created = server.admin(
                    "POST",
                    "/v1/admin/webhooks",
                    params={"tenant_id": tenant.tenant_id},
                    json={
                        "url": f"http://127.0.0.1:{http.server_address[1]}/hook",
                        "event_categories": ["budget", "reservation"],
                        "event_types": ["budget.exhausted"],
                    },
                )
                cost, _result = _cpu_per_pair(
                    server, tenant.tenant_id, tenant.api_key, seconds, clients
                )
                with_sub.append(cost)
                sid = created["subscription"]["subscription_id"]
                server.admin("DELETE", f"/v1/admin/webhooks/{sid}")
    finally:
        http.shutdown()
        http.server_close()
    base, hooked = statistics.median(without), statistics.median(with_sub)
    print(
        f"  server CPU per pair without a subscription: median {base:6.0f} us "
        f"(rounds: {', '.join(f'{c:.0f}' for c in without)})"
    )
    print(
        f"  server CPU per pair with one subscription:  median {hooked:6.0f} us "
        f"(rounds: {', '.join(f'{c:.0f}' for c in with_sub)})"
    )
    ratio = hooked / base if base else float("nan")
    print(
        f"  ratio with : without = {ratio:.3f} (target <= 1.10: "
        f"{'met' if ratio <= 1.10 else 'NOT met'})"
    )


def main() -> int:
    """Run the benchmark for every requested store and worker count."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", default="1,2", help="worker count, or a comma list (2,3)")
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="compare server CPU per pair with `serve --metrics` on and off instead",
    )
    parser.add_argument("--no-webhook", action="store_true", help="skip the webhook comparison")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per side (--metrics, webhook comparison)"
    )
    parser.add_argument("--evidence", default="off,on", help="off, on, or both (off,on)")
    args = parser.parse_args()
    modes = [mode.strip() == "on" for mode in args.evidence.split(",")]
    ok = True
    for store in args.stores.split(","):
        if store == "redis" and not _redis_available(redis_url_for_tests()):
            print(f"\n== store: redis skipped: no Redis at {redis_url_for_tests()}")
            continue
        for workers in (int(w) for w in args.workers.split(",")):
            if args.metrics:
                ok = (
                    bench_metrics_overhead(store, args.clients, args.seconds, workers, args.rounds)
                    and ok
                )
                continue
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
            if not args.no_webhook:
                bench_webhook(store, args.clients, args.seconds / 2, workers, args.rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
