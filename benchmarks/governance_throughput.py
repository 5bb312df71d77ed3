"""Server CPU per reserve+commit pair with action governance, against the tree before it.

Issue 12's targets: the reserve hot path **without any policy** stays within 10% of the
server before governance, and **with one policy of three quota rules** within 30%. This
benchmark checks out the baseline revision into a temporary git worktree and, per store,
runs three servers in turn, in shuffled order each round (same interpreter and dependencies;
the baseline server imports ``runcycles_server`` and ``runcycles`` from the worktree):

* ``base``: the baseline tree;
* ``none``: this tree, no policy;
* ``policy``: this tree, one policy on the load's scope with three quota rules on the load's
  action kind (per minute, per hour and per day, limits high enough never to deny), so every
  reservation reads and increments three counters atomically with its balance.

Each server runs ``--clients`` keep-alive clients doing reserve+commit pairs for ``--seconds``
(``_loadgen.py``); the number compared is the **server CPU per pair** (user+system time of
the server process from ``/proc``), the figure that stays comparable on a shared machine.
Printed: the median per configuration and the ratios none/base and policy/base (of the
medians, and the median of the per-round ratios).

This tree's servers run with ``--current-args`` (default ``--no-evidence``): signed evidence
(issue 14) came after governance with a cost target of its own (``server_throughput.py
--evidence off,on``), so it is off here to measure what governance costs; everything else
(the event log, the monitor's tallies, the webhook dispatcher, the console) runs as by default.

Run::

    uv run python benchmarks/governance_throughput.py                  # both stores, 5 rounds
    uv run python benchmarks/governance_throughput.py --stores sqlite --rounds 3 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _loadgen import run_load
from server_throughput import _process_tree_cpu_s, _redis_available

from runcycles_server.governance import Registry, policy_from_create
from runcycles_server.stores.base import Store
from runcycles_server.stores.redis import RedisStore
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.testing import ServerProcess, redis_url_for_tests

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "110a68b"
"""The last commit before action governance (the issue's "today")."""
TARGETS = {"none": 1.10, "policy": 1.30}
BUDGET = 10**15
KIND = "llm.completion"  # what _loadgen reserves
QUOTAS = [
    {"action_kind": KIND, "max_calls": 100_000, "window": window}
    for window in ("per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling")
]


def _open_store(server: ServerProcess, db: Path) -> Store:
    """The server's own store, opened from this process (SQLite file or Redis prefix)."""
    if server.redis_url is None or server.redis_prefix is None:
        return SqliteStore(db)
    return RedisStore(server.redis_url, prefix=server.redis_prefix)


def _add_policy(opener: Callable[[], Store], tenant_id: str) -> None:
    async def create() -> None:
        store = opener()  # opened on this event loop (Redis pools are bound to it)
        row = policy_from_create(
            tenant_id,
            {"name": "bench", "scope_pattern": f"tenant:{tenant_id}/*", "action_quotas": QUOTAS},
            policy_id=store.new_policy_id(tenant_id),
            now_ms=store.clock(),
            registry=Registry(),
        )
        await store.create_policy(row)
        await store.close()

    asyncio.run(create())


def _one(
    store: str, config: str, baseline: Path, clients: int, seconds: float, current: list[str]
) -> tuple[float, int]:
    """Run one server configuration; return (server CPU µs per pair, pairs).

    ``current`` are the ``cycles serve`` arguments of this tree's servers (not the baseline's).
    """
    env: dict[str, str] = {}
    extra: list[str] = []
    if config == "base":
        paths = [baseline / "packages/runcycles-server/src", baseline / "packages/runcycles/src"]
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    else:
        extra = current
    workdir = Path(tempfile.mkdtemp(prefix="cycles-govbench-"))
    db = workdir / "cycles.db"
    kind: Any = store
    with ServerProcess.start(store=kind, db_path=db, env=env, extra_args=extra) as server:
        tenant = server.provision(budget=BUDGET)
        if config == "policy":
            _add_policy(lambda: _open_store(server, db), tenant.tenant_id)
        before = _process_tree_cpu_s(server.process.pid)
        result = run_load(
            "pair",
            host=server.host,
            port=server.port,
            api_key=tenant.api_key,
            tenant=tenant.tenant_id,
            clients=clients,
            duration_s=seconds,
            amount=1_000,
        )
        after = _process_tree_cpu_s(server.process.pid)
        if result.errors:
            raise RuntimeError(f"{store}/{config}: {result.errors} errors\n{server.log_text()}")
    if before is None or after is None:
        raise RuntimeError("server CPU needs Linux /proc")
    return (after - before) / max(result.completed, 1) * 1e6, result.completed


def main() -> int:
    """Run the rounds and print the medians and ratios per store."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--current-args",
        default="--no-evidence",
        help="cycles serve arguments of this tree's servers (default: signed evidence off, "
        "a later issue's feature with its own cost target, so the ratios measure governance; "
        "'' to run with every default)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cycles-govbench-tree-") as tmp:
        baseline = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            return _run(args, baseline)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)],
                check=False,
                capture_output=True,
            )


def _run(args: argparse.Namespace, baseline: Path) -> int:
    met = True
    for store in args.stores.split(","):
        if store == "redis" and not _redis_available(redis_url_for_tests()):
            print(f"\n== {store}: skipped, no Redis at {redis_url_for_tests()}")
            continue
        print(
            f"\n== {store}: {args.rounds} rounds x {args.seconds:g} s, {args.clients} clients, "
            f"baseline {args.baseline}"
        )
        cpu: dict[str, list[float]] = {"base": [], "none": [], "policy": []}
        for i in range(args.rounds):
            order = list(cpu)
            random.shuffle(order)
            line = []
            for config in order:
                per_pair, pairs = _one(
                    store, config, baseline, args.clients, args.seconds, args.current_args.split()
                )
                cpu[config].append(per_pair)
                line.append(f"{config} {per_pair:5.0f} us ({pairs} pairs)")
            print(f"  round {i + 1}: " + ", ".join(line))
        base = statistics.median(cpu["base"])
        print(f"  server CPU per pair, median: base {base:.0f} us", end="")
        for config in ("none", "policy"):
            print(f", {config} {statistics.median(cpu[config]):.0f} us", end="")
        print()
        for config, target in TARGETS.items():
            ratio = statistics.median(cpu[config]) / base
            paired = statistics.median(a / b for a, b in zip(cpu[config], cpu["base"], strict=True))
            ok = ratio <= target
            met = met and ok
            print(
                f"  ratio {config}/base = {ratio:.3f} (paired {paired:.3f}); target <= "
                f"{target:.2f}: {'met' if ok else 'NOT met'}"
            )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
