"""Server startup: time from spawning ``cycles serve`` until ``/readyz`` answers 200, per store.

For each store (SQLite on a fresh file, and Redis when reachable) this starts
``python -m runcycles_server serve`` ``--runs`` times (default 10) on a free loopback port,
polls ``GET /readyz`` every 5 ms over a raw socket (so the poller adds almost nothing), stops the
process, and prints the median, minimum and maximum time to ready. Beside it, the floor: the
median time of ``python -c pass`` with the same interpreter, and the ratio startup : floor. The
1-minute load average before and after is printed so a number can be judged against the noise
(other processes on the same cores slow every start).

Each store is measured twice:

* **cold bytecode** (``PYTHONDONTWRITEBYTECODE=1``, as in this repository's dev environment):
  every imported module is compiled from source on every start, so the number follows how
  much code the server imports;
* **cached bytecode** (``.pyc`` files kept under a temporary ``PYTHONPYCACHEPREFIX``, one
  untimed warm-up start first): what an installed server sees from its second start on.

Usage::

    uv run python benchmarks/server_startup.py                  # both stores, 10 runs each
    uv run python benchmarks/server_startup.py --runs 20 --stores sqlite

Redis comes from ``CYCLES_TEST_REDIS_URL`` (default db 15 on loopback) under a fresh key prefix
that is deleted afterwards. Target (the GitHub issue): median under 1 s for both stores.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from runcycles_server.testing import free_port, redis_url_for_tests

TARGET_S = 1.0
POLL_S = 0.005
TIMEOUT_S = 30.0


def _ready(port: int) -> bool:
    """Return True if ``GET /readyz`` on 127.0.0.1:``port`` answers 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.1 200")


def _time_to_ready(store_args: list[str], env: dict[str, str]) -> float:
    port = free_port()
    args = [sys.executable, "-m", "runcycles_server", "serve", "--port", str(port)]
    args += ["--log-level", "warning", *store_args]
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while not _ready(port):
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"server exited with {process.returncode}: {err}")
            if time.perf_counter() - started > TIMEOUT_S:
                raise RuntimeError(f"server not ready after {TIMEOUT_S}s")
            time.sleep(POLL_S)
        return time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _floor(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
    return time.perf_counter() - started


def _env(pycache: str | None) -> dict[str, str]:
    """Child environment: no bytecode writes (``pycache`` None) or a private bytecode cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def _redis_available(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _median_line(name: str, samples: list[float], floor: float) -> str:
    median = statistics.median(samples)
    verdict = "ok" if median < TARGET_S else f"OVER the {TARGET_S:.1f} s target"
    return (
        f"{name:<22} median {median * 1000:7.1f} ms  min {min(samples) * 1000:7.1f}  "
        f"max {max(samples) * 1000:7.1f}  = {median / floor:5.1f}x the floor  [{verdict}]"
    )


def _measure(store: str, runs: int, env: dict[str, str], warm_up: bool) -> list[float] | None:
    """Return ``runs`` times to ready for ``store``, or None when Redis is unreachable."""
    if store == "sqlite":
        with tempfile.TemporaryDirectory(prefix="cycles-startup-") as tmp:
            # A fresh file per run: the first start creates the schema, as a new install does.
            if warm_up:
                _time_to_ready(["--db", str(Path(tmp) / "warm.db")], env)
            return [
                _time_to_ready(["--db", str(Path(tmp) / f"run{i}.db")], env) for i in range(runs)
            ]
    url = redis_url_for_tests()
    if not _redis_available(url):
        return None
    prefix = f"cyclesbench-{uuid.uuid4().hex[:12]}"
    args = ["--redis", url, "--redis-prefix", prefix]
    try:
        if warm_up:
            _time_to_ready(args, env)
        return [_time_to_ready(args, env) for _ in range(runs)]
    finally:
        _delete_prefix(url, prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="starts per store (default 10)")
    parser.add_argument("--stores", default="sqlite,redis", help="comma list: sqlite,redis")
    opts = parser.parse_args()
    stores = [s.strip() for s in opts.stores.split(",") if s.strip()]
    unknown = set(stores) - {"sqlite", "redis"}
    if unknown:
        parser.error(f"--stores: unknown store(s) {', '.join(sorted(unknown))}")
    if opts.runs < 1:
        parser.error("--runs must be at least 1")
    load_before = os.getloadavg()[0]
    failed = False
    with tempfile.TemporaryDirectory(prefix="cycles-pycache-") as pycache:
        for label, env, warm_up in (
            ("cold bytecode", _env(None), False),
            ("cached bytecode", _env(pycache), True),
        ):
            _floor(env)
            floor = statistics.median(_floor(env) for _ in range(opts.runs))
            print(f"-- {label}")
            print(f"{'python -c pass (floor)':<22} median {floor * 1000:7.1f} ms")
            for store in stores:
                name = f"cycles serve ({'SQLite' if store == 'sqlite' else 'Redis'})"
                samples = _measure(store, opts.runs, env, warm_up)
                if samples is None:
                    print(f"{name:<22} skipped: no Redis answers at {redis_url_for_tests()}")
                    continue
                print(_median_line(name, samples, floor))
                failed = failed or statistics.median(samples) >= TARGET_S
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
