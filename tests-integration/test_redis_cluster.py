"""A real 3-master Redis Cluster (local ``redis-server`` binaries) behind a real server process.

The module starts three ``redis-server --cluster-enabled yes`` nodes on free loopback ports,
joins them with ``redis-cli --cluster create``, runs ``cycles serve --redis
redis+cluster://...`` against the cluster, and drives reserve / commit / release / balances /
list through the client for two tenants whose hash slots live on different masters. It skips
(with the reason) only when the ``redis-server`` or ``redis-cli`` binary is missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles.evidence import Disposition
from runcycles_server.testing import ServerProcess

pytestmark = pytest.mark.slow

NODES = 3
U = "USD_MICROCENTS"


def _free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10_000 > 65_535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair (P, P + 10000) for a cluster node")


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    result = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout + result.stderr


def _wait(condition: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: cannot start a Redis Cluster")
    workdir = Path(tempfile.mkdtemp(prefix="cycles-redis-cluster-"))
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for _ in range(NODES):
            port = _free_cluster_port()
            node_dir = workdir / str(port)
            node_dir.mkdir()
            log = (node_dir / "redis.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--dir",
                        str(node_dir),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
            ports.append(port)
        for port in ports:
            _wait(lambda p=port: "PONG" in _cli(p, "ping"), f"redis-server on port {port}")
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for port in ports:
            _wait(
                lambda p=port: "cluster_state:ok" in _cli(p, "cluster", "info"),
                f"cluster state ok on node {port}",
            )
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _owner_port(cluster_url: str, key: str) -> int:
    """The port of the master serving ``key``'s slot."""
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(cluster_url.replace("redis+cluster://", "redis://"))
    try:
        node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
        return int(node.port)
    finally:
        client.close()


def _tenants_on_two_masters(cluster_url: str, prefix: str) -> tuple[str, str]:
    first = "acme"
    first_port = _owner_port(cluster_url, f"{prefix}:{{t:{first}}}:tenant")
    for n in range(200):
        other = f"globex{n}"
        if _owner_port(cluster_url, f"{prefix}:{{t:{other}}}:tenant") != first_port:
            return first, other
    raise AssertionError("no second tenant on another master in 200 tries")


def test_a_server_on_a_redis_cluster_serves_two_tenants_on_different_masters(
    cluster_url: str,
) -> None:
    prefix = "cyclescluster"
    with ServerProcess.start(store="redis", redis_url=cluster_url, redis_prefix=prefix) as server:
        names = _tenants_on_two_masters(cluster_url, prefix)
        results: dict[str, Any] = {}
        for name in names:
            tenant = server.provision(tenant_id=name, budget=1_000_000)
            with tenant.client() as client:
                subject = {"tenant": name, "workspace": "eng"}
                committed = client.create_reservation(
                    {
                        "idempotency_key": f"{name}-r1",
                        "subject": subject,
                        "action": {"kind": "llm.completion", "name": "gpt"},
                        "estimate": {"unit": U, "amount": 1_000},
                    }
                )
                assert committed.is_success, committed
                rid = committed.data.reservation_id
                done = client.commit_reservation(
                    rid, {"idempotency_key": f"{name}-c1", "actual": {"unit": U, "amount": 600}}
                )
                assert done.is_success, done
                # signed evidence: the envelope is in the tenant's slot, its owner pointer in
                # its own; a public read finds it from the id alone, and a denial's too
                denied = client.create_reservation(
                    {
                        "idempotency_key": f"{name}-big",
                        "subject": subject,
                        "action": {"kind": "llm.completion", "name": "gpt"},
                        "estimate": {"unit": U, "amount": 10**9},
                    }
                )
                assert denied.status == 409, denied
                for answer in (committed, done, denied):
                    assert answer.body is not None
                    evidence_id = answer.body["cycles_evidence"]["evidence_id"]
                    verified = client.verify_evidence(evidence_id)
                    assert verified.disposition is Disposition.AUTHENTIC, verified.reason
                released = client.create_reservation(
                    {
                        "idempotency_key": f"{name}-r2",
                        "subject": subject,
                        "action": {"kind": "llm.completion", "name": "gpt"},
                        "estimate": {"unit": U, "amount": 300},
                    }
                )
                assert released.is_success, released
                rid2 = released.data.reservation_id
                assert client.release_reservation(
                    rid2, {"idempotency_key": f"{name}-l1"}
                ).is_success
                balances = client.get_balances(tenant=name)
                assert balances.is_success, balances
                listed = client.list_reservations(tenant=name)
                assert listed.is_success, listed
                results[name] = (balances.data, listed.data, {rid, rid2})
        for name in names:
            balances, listed, rids = results[name]
            (row,) = [b for b in balances.balances if b.scope_path == f"tenant:{name}"]
            assert (row.spent.amount, row.reserved.amount, row.remaining.amount) == (
                600, 0, 1_000_000 - 600,
            )  # fmt: skip
            assert {r.reservation_id for r in listed.reservations} == rids
            statuses = {
                r.reservation_id: getattr(r.status, "value", r.status) for r in listed.reservations
            }
            assert sorted(statuses.values()) == ["COMMITTED", "RELEASED"]
        # the data really is spread over the cluster: both tenants' masters hold keys
        ports = {_owner_port(cluster_url, f"{prefix}:{{t:{n}}}:tenant") for n in names}
        assert len(ports) == 2
        for port in ports:
            keys = _cli(port, "--scan", "--pattern", f"{prefix}:*").split()
            assert keys, f"no keys of the server on the master at port {port}"


def test_a_plain_url_to_a_cluster_node_is_refused_with_the_cluster_url(cluster_url: str) -> None:
    import sys

    from runcycles_server.testing import free_port

    node = cluster_url.removeprefix("redis+cluster://")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runcycles_server",
            "serve",
            "--port",
            str(free_port()),
            "--redis",
            f"redis://{node}/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--redis redis+cluster://{node}" in result.stderr


def test_webhooks_are_delivered_by_a_server_on_a_redis_cluster(cluster_url: str) -> None:
    bodies: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        with ServerProcess.start(
            store="redis",
            redis_url=cluster_url,
            redis_prefix="cyclesclusterhooks",
            extra_args=["--webhook-poll", "0.1"],
        ) as server:
            server.admin(
                "PUT",
                "/v1/admin/config/webhook-security",
                json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
            )
            tenant = server.provision(budget=1_000)
            hook = f"http://127.0.0.1:{http.server_address[1]}/hook"
            created = server.admin(
                "POST",
                "/v1/admin/webhooks",
                params={"tenant_id": tenant.tenant_id},
                json={"url": hook, "event_types": ["budget.threshold_crossed"]},
            )
            answer = httpx.post(
                f"{server.base_url}/v1/reservations",
                headers={"X-Cycles-API-Key": tenant.api_key},
                json={
                    "idempotency_key": "r1",
                    "subject": {"tenant": tenant.tenant_id},
                    "action": {"kind": "llm.completion", "name": "gpt"},
                    "estimate": {"unit": U, "amount": 900},
                },
            )
            assert answer.status_code == 200, answer.text
            _wait(lambda: len(bodies) == 1, "the webhook delivery")
            assert bodies[0]["data"]["threshold"] == 0.8
            sid = created["subscription"]["subscription_id"]
            _wait(
                lambda: (
                    server.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries")["deliveries"][0][
                        "status"
                    ]
                    == "SUCCESS"
                ),
                "the delivery to be recorded",
            )
    finally:
        http.shutdown()
        http.server_close()
