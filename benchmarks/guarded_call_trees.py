"""Client CPU of a ``@cycles`` call on this tree versus another revision, side by side in one run.

A refactor of the core must not make the guarded call dearer. This benchmark checks out a
baseline revision into a temporary git worktree, starts ONE local ``runcycles-server``
(SQLite; its own process, its CPU is not counted) and two worker processes: one imports
``runcycles`` from this tree, the other from the baseline's ``packages/runcycles/src`` (same
interpreter, same httpx and pydantic). The workers never run at the same time: each round
asks both, in shuffled order, to time ``--calls`` guarded calls of a trivial function
(``time.process_time()`` of the whole worker process, so the heartbeat and journal threads
count), sync then async. Printed: the median CPU per call of each tree and mode, the ratio
new/old of the medians and the median of the per-round ratios.

Run::

    uv run python benchmarks/guarded_call_trees.py                 # against ISSUE_8_BASE
    uv run python benchmarks/guarded_call_trees.py --baseline HEAD~3 --rounds 20

Target (issue 8): ratio new/old <= 1.05 for sync and async.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from runcycles_server.testing import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
ISSUE_8_BASE = "4a3019e"
"""The last commit before the layered core (issue 8): the default baseline."""
TARGET_RATIO = 1.05

WORKER = r"""
import asyncio, json, os, sys, time
from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig, cycles
import runcycles

config = CyclesConfig(
    base_url=os.environ["BENCH_URL"], api_key=os.environ["BENCH_KEY"],
    tenant=os.environ["BENCH_TENANT"], journal_dir=os.environ["BENCH_JOURNAL"],
)
client = CyclesClient(config)
aclient = AsyncCyclesClient(config)

@cycles(estimate=500, actual=lambda result: 420, action_kind="llm.completion",
        action_name="gpt-4o", client=client)
def work() -> str:
    return "ok"

@cycles(estimate=500, actual=lambda result: 420, action_kind="llm.completion",
        action_name="gpt-4o", client=aclient)
async def awork() -> str:
    return "ok"

loop = asyncio.new_event_loop()

def measure(mode: str, calls: int) -> float:
    if mode == "sync":
        start = time.process_time()
        for _ in range(calls):
            work()
        return (time.process_time() - start) / calls

    async def run() -> None:
        for _ in range(calls):
            await awork()

    start = time.process_time()
    loop.run_until_complete(run())
    return (time.process_time() - start) / calls

for mode in ("sync", "async"):  # warm up: connections, caches, the heartbeat
    measure(mode, 50)
print(json.dumps({"ready": runcycles.__file__}), flush=True)
for line in sys.stdin:
    mode, calls = line.split()
    print(json.dumps({"cpu_s": measure(mode, int(calls))}), flush=True)
"""


class Worker:
    """A process that imports ``runcycles`` from one tree and times calls on request."""

    def __init__(self, name: str, src: Path, env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONPATH": str(src)},
        )
        ready = self._read()
        where = Path(ready["ready"]).resolve()
        if not where.is_relative_to(src.resolve()):
            raise RuntimeError(f"{name} imported runcycles from {where}, not from {src}")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited (code {self.process.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def measure(self, mode: str, calls: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{mode} {calls}\n")
        self.process.stdin.flush()
        return float(self._read()["cpu_s"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


def _worktree(revision: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), revision],
        check=True,
        capture_output=True,
    )
    return where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=ISSUE_8_BASE, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=200, help="calls per measurement")
    args = parser.parse_args()
    rng = random.Random(8)
    with tempfile.TemporaryDirectory() as tmp, ServerProcess.start(store="sqlite") as server:
        base = _worktree(args.baseline, Path(tmp) / "baseline")
        tenant = server.provision(budget=10**15)
        env = {
            **os.environ,
            "BENCH_URL": server.base_url,
            "BENCH_KEY": tenant.api_key,
            "BENCH_TENANT": tenant.tenant_id,
            "BENCH_JOURNAL": str(Path(tmp) / "journal"),
        }
        workers = {
            "new": Worker("new", ROOT / "packages/runcycles/src", env),
            "old": Worker("old", base / "packages/runcycles/src", env),
        }
        samples: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(args.rounds):
                for mode in ("sync", "async"):
                    order = list(workers)
                    rng.shuffle(order)
                    for name in order:
                        cpu = workers[name].measure(mode, args.calls)
                        samples.setdefault((name, mode), []).append(cpu)
        finally:
            for worker in workers.values():
                worker.close()
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )
    print(f"baseline {args.baseline}; {args.rounds} rounds x {args.calls} calls, interleaved")
    ok = True
    for mode in ("sync", "async"):
        new, old = samples[("new", mode)], samples[("old", mode)]
        ratio = statistics.median(new) / statistics.median(old)
        paired = statistics.median(n / o for n, o in zip(new, old, strict=True))
        ok &= ratio <= TARGET_RATIO
        print(
            f"{mode:5}: new {statistics.median(new) * 1e6:7.1f} us/call, "
            f"old {statistics.median(old) * 1e6:7.1f} us/call, new/old x{ratio:.3f} "
            f"(paired x{paired:.3f}; target <= {TARGET_RATIO})"
        )
    print("OK" if ok else "ABOVE TARGET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
