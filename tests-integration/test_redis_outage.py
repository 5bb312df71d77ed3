"""A Redis that hangs (SIGSTOP) or dies (SIGKILL) behind a real ``cycles serve --redis``.

The test starts its own ``redis-server`` on a free port (never the shared one), with an
``appendfsync always`` AOF so a restart brings the ledger back, and a server with
``--store-timeout 1``. For each outage it shows that requests fail within the timeout with
``503`` and ``Retry-After`` (not 500), ``/readyz`` answers ``503`` within about a second,
``/healthz`` stays fast, the server recovers by itself once Redis is back, and the server's log
holds one line when the outage begins and one when it ends (with the number of requests
answered 503), with no traceback; the event log holds one ``system.store_connection_lost`` and
one ``system.store_connection_restored`` per outage, written once Redis is back. A reservation
whose reserve call failed during the freeze holds no budget past its TTL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.testing import ProvisionedTenant, ServerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.redis]

STORE_TIMEOUT_S = 1.0
SLACK_S = 1.0  # a loaded 2-core machine
READY_BOUND_S = 1.5  # "/readyz answers within about a second"
U = "USD_MICROCENTS"


@dataclass
class OwnRedis:
    """A ``redis-server`` child process of this test, on its own port and directory."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.process = subprocess.Popen(
            ["redis-server", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if "PONG" in ping.stdout:
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        from runcycles_server.stores.redis_testing import redis_unavailable

        redis_unavailable(f"{' and '.join(missing)} not on PATH: cannot start a private Redis")
    redis = OwnRedis(free_port(), Path(tempfile.mkdtemp(prefix="cycles-redis-outage-")))
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()
        shutil.rmtree(redis.workdir, ignore_errors=True)


@dataclass
class Answer:
    what: str
    status: int
    seconds: float
    retry_after: str | None
    body: dict[str, object]


def _reserve_body(tenant: str, key: str) -> dict[str, object]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": 1_000},
        "ttl_ms": 1_000,
        "grace_period_ms": 0,
    }


def _round(server: ServerProcess, tenant: ProvisionedTenant) -> list[Answer]:
    """Send reserve, decide, balances (x2 each), /readyz and /healthz at once."""
    headers = {"X-Cycles-API-Key": tenant.api_key}
    kinds = ["reserve", "decide", "balances"] * 2 + ["readyz", "healthz"]
    limits = httpx.Limits(max_connections=len(kinds), max_keepalive_connections=len(kinds))
    with (
        httpx.Client(base_url=server.base_url, timeout=30, limits=limits) as http,
        ThreadPoolExecutor(len(kinds)) as pool,
    ):
        return list(pool.map(lambda what: _call(http, tenant, headers, what), kinds))


def _call(
    http: httpx.Client, tenant: ProvisionedTenant, headers: dict[str, str], what: str
) -> Answer:
    started = time.monotonic()
    if what == "reserve":
        body = _reserve_body(tenant.tenant_id, uuid.uuid4().hex)
        response = http.post("/v1/reservations", json=body, headers=headers)
    elif what == "decide":
        body = _reserve_body(tenant.tenant_id, uuid.uuid4().hex)
        del body["ttl_ms"], body["grace_period_ms"]
        response = http.post("/v1/decide", json=body, headers=headers)
    elif what == "balances":
        params = {"tenant": tenant.tenant_id}
        response = http.get("/v1/balances", params=params, headers=headers)
    else:
        response = http.get(f"/{what}")
    seconds = time.monotonic() - started
    return Answer(
        what, response.status_code, seconds, response.headers.get("retry-after"), response.json()
    )


def _check_outage_round(answers: list[Answer]) -> int:
    """Check one round sent during an outage; return how many requests were answered 503."""
    failed = 0
    for answer in answers:
        if answer.what == "healthz":
            assert answer.status == 200
            assert answer.seconds < 0.5, answer
        elif answer.what == "readyz":
            assert answer.status == 503, answer
            assert answer.body == {"status": "unavailable"}
            assert answer.seconds < READY_BOUND_S, answer
        else:
            assert answer.status == 503, answer
            assert answer.retry_after == "1", answer
            assert answer.seconds < STORE_TIMEOUT_S + SLACK_S, answer
            schema_validator("ErrorResponse").validate(answer.body)
            assert "store is unavailable" in str(answer.body["message"])
            failed += 1
    return failed


def _wait_ready(server: ServerProcess, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the server did not recover within {timeout_s} s")


def _check_serving(server: ServerProcess, tenant: ProvisionedTenant) -> None:
    for answer in _round(server, tenant):
        assert answer.status == 200, answer


def _balance(tenant: ProvisionedTenant) -> dict[str, int]:
    response = httpx.get(
        f"{tenant.server.base_url}/v1/balances",
        params={"tenant": tenant.tenant_id},
        headers={"X-Cycles-API-Key": tenant.api_key},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    (row,) = response.json()["balances"]
    return {name: row[name]["amount"] for name in ("allocated", "reserved", "spent", "remaining")}


def test_frozen_then_killed_redis_fails_fast_with_503_and_recovers(own_redis: OwnRedis) -> None:
    args = ["--store-timeout", str(STORE_TIMEOUT_S)]
    with ServerProcess.start(store="redis", redis_url=own_redis.url, extra_args=args) as server:
        tenant = server.provision(budget=1_000_000)
        _check_serving(server, tenant)

        # Outage 1: Redis hangs (SIGSTOP). Three rounds over a few seconds.
        own_redis.signal(signal.SIGSTOP)
        failed_frozen = 0
        try:
            for _ in range(3):
                failed_frozen += _check_outage_round(_round(server, tenant))
        finally:
            own_redis.signal(signal.SIGCONT)
        _wait_ready(server, 10)
        _check_serving(server, tenant)

        # The reservations whose reserve call failed (Redis may have run them on resuming) hold
        # no budget past their TTL (1 s, no grace) once the sweep has run.
        deadline = time.monotonic() + 10
        while _balance(tenant)["reserved"] != 0:
            assert time.monotonic() < deadline, _balance(tenant)
            time.sleep(0.2)

        # Outage 2: Redis dies (SIGKILL), then comes back on the same port with its AOF.
        own_redis.kill()
        failed_down = 0
        for _ in range(3):
            failed_down += _check_outage_round(_round(server, tenant))
        own_redis.start()
        _wait_ready(server, 10)
        _check_serving(server, tenant)
        deadline = time.monotonic() + 10
        while (balance := _balance(tenant))["reserved"] != 0:
            assert time.monotonic() < deadline, balance
            time.sleep(0.2)
        assert balance["remaining"] == balance["allocated"] - balance["spent"]
        outages = _outage_events(server, 4)
        log = server.log_text()

    assert "Traceback" not in log, log
    began = re.findall(r"store unavailable \((\w+): .*\); answering 503", log)
    ended = [int(n) for n in re.findall(r"store available again after [\d.]+ s; (\d+) req", log)]
    assert len(began) == 2, log
    assert began[0] == "TimeoutError"  # frozen: no reply within --store-timeout
    assert began[1] == "ConnectionError"  # killed: connection refused
    assert ended == [failed_frozen, failed_down], log
    assert failed_frozen == failed_down == 18
    # the same two outages as events, written once Redis answered again
    kinds = [e["event_type"].rpartition("_")[2] for e in outages]
    assert kinds == ["lost", "restored", "lost", "restored"], outages
    for pair, failed in ((outages[:2], failed_frozen), (outages[2:], failed_down)):
        lost, restored = pair
        assert lost["correlation_id"] == restored["correlation_id"]
        assert lost["timestamp"] < restored["timestamp"]
        assert restored["data"]["details"]["failed_requests"] == failed


def _outage_events(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    """The store outage events (oldest first), once ``count`` of them have been written."""
    deadline = time.monotonic() + 10
    while True:
        body = server.admin("GET", "/v1/admin/events",
                            params={"tenant_id": "__system__", "category": "system"})  # fmt: skip
        schema_validator("EventListResponse", EXTENDED_ADMIN).validate(body)
        found = [e for e in reversed(body["events"])
                 if e["event_type"].startswith("system.store_connection")]  # fmt: skip
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
