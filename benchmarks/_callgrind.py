"""Server work per reserve+commit pair counted in instructions, under callgrind.

Server CPU time per pair (``/proc`` user+system time divided by pairs) is the figure the
benchmarks print, but on a shared 2-core virtual machine it swings by ±30 % between rounds
even with nothing else running, so a 10 % target cannot be judged from it. Instructions
executed are repeatable: the same binary, inputs and environment execute the same count,
whatever else the machine does. This module runs a ``cycles serve`` process under
``valgrind --tool=callgrind`` and counts what it executes for a fixed number of pairs:

1. start the server under callgrind (startup under valgrind takes a minute) and set up
   whatever the configuration needs (tenant, budget, policy, subscription ...);
2. warm up with ``warmup`` pairs (first-use imports, caches, the memo of prepared policies);
3. **idle**: zero the counters (``callgrind_control --zero``), wait ``idle_s / 2`` seconds
   with no request, dump; once before the load and once after it: the background tasks'
   instructions per second (sweeper, event monitor, webhook dispatcher polling ...);
4. **load**: zero, run ``pairs`` pairs from one client, one request at a time, dump;
5. instructions per pair = (load count - idle rate * load seconds) / pairs.

Step 5 takes the background out because under valgrind the server runs ~50 times slower, so a
timer-driven task would weigh ~50 times more per pair than on a real machine (its real cost
at 1,000 pairs/s is a rounding error, and is printed separately). Work a pair causes in the
background (signing its evidence, delivering its webhook events) is counted with the pair.

One client at a time makes each request run alone: no batching of concurrent requests, which
the CPU-time figure includes and which varies with timing. The two measures answer slightly
different questions; the benchmarks print both. Needs ``valgrind`` with ``callgrind_control``
on ``PATH`` (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _loadgen import LoadResult, run_load

from runcycles_server.testing import ProvisionedTenant, ServerProcess

__all__ = ["InstructionCount", "callgrind_available", "count_pair_instructions"]

_TOTALS = re.compile(rb"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class InstructionCount:
    """What one callgrind run of a server measured."""

    per_pair: float
    """Instructions per reserve+commit pair, background taken out."""
    raw_per_pair: float
    """Everything the process executed during the load, per pair (background included)."""
    background_per_s: float
    """Instructions per second of the idle server's timer-driven tasks."""
    pairs: int
    load_s: float
    """Wall-clock seconds the pairs took under valgrind."""


def callgrind_available() -> bool:
    """Whether valgrind and callgrind_control are installed."""
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


class _Counter:
    """Zero and dump the instruction counters of one process running under callgrind."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self._dumps = 0

    def _control(self, flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(self.pid)], check=True, capture_output=True, timeout=60
        )

    def zero(self) -> None:
        self._control("--zero")

    def dump(self) -> int:
        """Write the counts since the last zero and return their total instructions."""
        self._control("--dump")
        self._dumps += 1
        path = Path(f"{self.out}.{self._dumps}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists():
                match = _TOTALS.search(path.read_bytes())
                if match:
                    return int(match.group(1))
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no totals to {path}")


@contextmanager
def _callgrind_server(store: str, **start: Any) -> Iterator[tuple[ServerProcess, _Counter]]:
    out = Path(start.pop("workdir")) / "callgrind.out"
    prefix = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-instr=no",
        "--compress-strings=no",
    ]
    kind: Any = store
    with ServerProcess.start(
        store=kind, command_prefix=prefix, ready_timeout_s=600.0, **start
    ) as server:
        yield server, _Counter(server.process.pid, out)


def count_pair_instructions(
    store: str,
    *,
    workdir: Path,
    setup: Callable[[ServerProcess, ProvisionedTenant], None] | None = None,
    pairs: int = 200,
    warmup: int = 30,
    idle_s: float = 20.0,
    budget: int = 10**15,
    **start: Any,
) -> InstructionCount:
    """Start a server under callgrind, run ``pairs`` pairs and return its instruction counts.

    ``start`` goes to :meth:`ServerProcess.start` (``extra_args``, ``env``, ``db_path`` ...);
    ``setup`` runs once the tenant is provisioned, before the warm-up.
    """
    with _callgrind_server(store, workdir=workdir, **start) as (server, counter):
        tenant = server.provision(budget=budget)
        if setup is not None:
            setup(server, tenant)

        def run_pairs(count: int) -> LoadResult:
            return run_load(
                "pair",
                host=server.host,
                port=server.port,
                api_key=tenant.api_key,
                tenant=tenant.tenant_id,
                clients=1,
                duration_s=3600.0,
                count=count,
            )

        warm = run_pairs(warmup)
        if warm.errors:
            raise RuntimeError(f"warm-up: {warm.statuses}\n{server.log_text()}")

        def idle_window() -> tuple[int, float]:
            counter.zero()
            began = time.monotonic()
            time.sleep(idle_s / 2)
            return counter.dump(), time.monotonic() - began

        before = idle_window()
        counter.zero()
        began = time.monotonic()
        result = run_pairs(pairs)
        total = counter.dump()
        load_s = time.monotonic() - began
        after = idle_window()  # background measured on both sides of the load
        if result.errors or result.completed != pairs:
            raise RuntimeError(
                f"{result.completed}/{pairs} pairs, {result.statuses}\n{server.log_text()}"
            )
    idle_rate = (before[0] + after[0]) / (before[1] + after[1])
    return InstructionCount(
        per_pair=(total - idle_rate * load_s) / pairs,
        raw_per_pair=total / pairs,
        background_per_s=idle_rate,
        pairs=pairs,
        load_s=load_s,
    )
