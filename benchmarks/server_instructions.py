"""Server instructions per reserve+commit pair for each feature's cost target, under callgrind.

The cost targets of the server's issues are ratios of server work per reserve+commit pair:

==============  =====================================================  ==========
ratio           what it compares                                       target
==============  =====================================================  ==========
``none/base``   this tree without any policy vs the tree before         <= 1.10
                action governance (``--baseline``, issue 12)
``policy/base`` one policy of three quota rules vs that tree            <= 1.30
``webhook/none``  one ACTIVE webhook subscription vs none (issue 13)    <= 1.10
``evidence/none`` signed evidence on vs off (issue 14)                  <= 1.25
``none/noconsole``  the console served vs ``--no-console`` (issue 15)   <= 1.01
==============  =====================================================  ==========

``none`` is this tree as ``cycles serve`` runs by default except ``--no-evidence`` (evidence
has its own ratio); everything else (event log, monitor, detectors, webhook dispatcher,
console) is on. Server CPU time per pair (``server_throughput.py``,
``governance_throughput.py``) swings by ±30 % between rounds on a shared 2-core VM, too much
to judge a 10 % target; the instruction count of each configuration repeats within 0.3 %
(``_callgrind.py`` explains the method: one client, warm-up, the idle server's background
rate taken out). Each configuration is one server process under valgrind; ``--jobs`` of them
run at once (their counts do not depend on it, only the wall-clock time: about 2 minutes
each on a quiet 2-core machine, mostly valgrind's slow interpreter start).

Run::

    uv run python benchmarks/server_instructions.py                   # every ratio, both stores
    uv run python benchmarks/server_instructions.py --stores sqlite --ratios none/base

The exit status is 1 when a printed ratio misses its target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _callgrind import InstructionCount, callgrind_available, count_pair_instructions
from server_throughput import _redis_available

from runcycles_server.governance import Registry, policy_from_create
from runcycles_server.stores.base import Store
from runcycles_server.stores.redis import RedisStore
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.testing import ProvisionedTenant, ServerProcess, redis_url_for_tests

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "110a68b"
"""The last commit before action governance (issue 12's "today")."""
KIND = "llm.completion"  # what _loadgen reserves
QUOTAS = [
    {"action_kind": KIND, "max_calls": 100_000, "window": window}  # the most allowed
    for window in ("per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling")
]
WEBHOOK_EVENTS = [
    "budget.threshold_crossed",
    "budget.exhausted",
    "reservation.denied",
    "reservation.expired",
    "reservation.commit_overage",
]
"""What the benchmark's subscription asks for: everything a reserve+commit load can cause."""
RATIOS: dict[str, tuple[str, str, float]] = {
    "none/base": ("none", "base", 1.10),
    "policy/base": ("policy", "base", 1.30),
    "webhook/none": ("webhook", "none", 1.10),
    "evidence/none": ("evidence", "none", 1.25),
    "none/noconsole": ("none", "noconsole", 1.01),
}


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that accepts everything."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _add_policy(server: ServerProcess, tenant: ProvisionedTenant) -> None:
    """One policy on the load's scope with three quota rules that never deny."""

    async def create() -> None:
        store: Store
        if server.redis_url is None or server.redis_prefix is None:
            store = SqliteStore(server.workdir / "cycles.db")
        else:
            store = RedisStore(server.redis_url, prefix=server.redis_prefix)
        row = policy_from_create(
            tenant.tenant_id,
            {
                "name": "bench",
                "scope_pattern": f"tenant:{tenant.tenant_id}/*",
                "action_quotas": QUOTAS,
            },
            policy_id=store.new_policy_id(tenant.tenant_id),
            now_ms=store.clock(),
            registry=Registry(),
        )
        await store.create_policy(row)
        await store.close()

    asyncio.run(create())


@dataclass
class _Config:
    """One server configuration to count."""

    args: list[str] = field(default_factory=lambda: ["--no-evidence"])
    baseline: bool = False
    setup: Callable[[ServerProcess, ProvisionedTenant], None] | None = None


def _configs(receiver_port: int) -> dict[str, _Config]:
    def subscribe(server: ServerProcess, tenant: ProvisionedTenant) -> None:
        server.admin(
            "PUT",
            "/v1/admin/config/webhook-security",
            json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
        )
        server.admin(
            "POST",
            "/v1/admin/webhooks",
            params={"tenant_id": tenant.tenant_id},
            json={
                "url": f"http://127.0.0.1:{receiver_port}/hook",
                "event_types": WEBHOOK_EVENTS,
                "event_categories": ["budget", "reservation"],
            },
        )

    return {
        "base": _Config(args=[], baseline=True),
        "none": _Config(),
        "policy": _Config(setup=_add_policy),
        "webhook": _Config(setup=subscribe),
        "evidence": _Config(args=[]),
        "noconsole": _Config(args=["--no-evidence", "--no-console"]),
    }


def _count(
    store: str, name: str, config: _Config, baseline: Path, args: argparse.Namespace
) -> InstructionCount:
    env: dict[str, str] = {}
    if config.baseline:
        paths = [baseline / "packages/runcycles-server/src", baseline / "packages/runcycles/src"]
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    workdir = Path(tempfile.mkdtemp(prefix=f"cycles-instr-{store}-{name}-"))
    return count_pair_instructions(
        store,
        workdir=workdir,
        setup=config.setup,
        pairs=args.pairs,
        idle_s=args.idle,
        extra_args=config.args,
        env=env,
    )


def main() -> int:
    """Count every configuration the requested ratios need and print the ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument(
        "--ratios", default=",".join(RATIOS), help="comma list of " + ", ".join(RATIOS)
    )
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument(
        "--idle", type=float, default=20.0, help="idle seconds measured (half before the load)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="servers counted at once")
    args = parser.parse_args()
    if not callgrind_available():
        print("valgrind (with callgrind_control) is not installed; apt-get install valgrind")
        return 2
    ratios = [r.strip() for r in args.ratios.split(",") if r.strip()]
    unknown = [r for r in ratios if r not in RATIOS]
    if unknown:
        parser.error(f"--ratios: unknown {', '.join(unknown)}; choose from {', '.join(RATIOS)}")
    stores = [s for s in args.stores.split(",") if s]
    if "redis" in stores and not _redis_available(redis_url_for_tests()):
        print(f"redis: skipped, no Redis at {redis_url_for_tests()}")
        stores.remove("redis")
    needed = sorted({name for r in ratios for name in RATIOS[r][:2]})
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    configs = _configs(http.server_address[1])
    with tempfile.TemporaryDirectory(prefix="cycles-instr-tree-") as tmp:
        baseline = Path(tmp) / "tree"
        if "base" in needed:
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(ROOT),
                    "worktree",
                    "add",
                    "--detach",
                    str(baseline),
                    args.baseline,
                ],
                check=True,
                capture_output=True,
            )
        try:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {
                    (store, name): pool.submit(_count, store, name, configs[name], baseline, args)
                    for store in stores
                    for name in needed
                }
                counts = {}
                for (store, name), future in futures.items():
                    counts[(store, name)] = c = future.result()
                    print(
                        f"  counted {store}/{name}: {c.per_pair / 1e3:.0f} K per pair",
                        flush=True,
                    )
        finally:
            http.shutdown()
            http.server_close()
            if "base" in needed:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)],
                    check=False,
                    capture_output=True,
                )
    return _report(stores, needed, ratios, counts, args)


def _report(
    stores: list[str],
    needed: list[str],
    ratios: list[str],
    counts: dict[tuple[str, str], InstructionCount],
    args: argparse.Namespace,
) -> int:
    met = True
    for store in stores:
        print(f"\n== {store}: {args.pairs} pairs, one client, baseline {args.baseline}")
        for name in needed:
            c = counts[(store, name)]
            print(
                f"  {name:<10} {c.per_pair / 1e3:6.0f} K instructions per pair"
                f"  (raw {c.raw_per_pair / 1e3:5.0f} K, of which background"
                f" {c.background_per_s / 1e3:4.0f} K/s x {c.load_s:.0f} s taken out)"
            )
        for ratio in ratios:
            top, bottom, target = RATIOS[ratio]
            value = counts[(store, top)].per_pair / counts[(store, bottom)].per_pair
            raw = counts[(store, top)].raw_per_pair / counts[(store, bottom)].raw_per_pair
            ok = value <= target
            met = met and ok
            print(
                f"  ratio {ratio:<15} = {value:.3f}  target <= {target:.2f}: "
                f"{'met' if ok else 'NOT met'}   (raw, background in: {raw:.3f})"
            )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
