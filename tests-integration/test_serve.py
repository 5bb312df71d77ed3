"""``cycles serve`` operations: startup time, ``--dev``, graceful shutdown, access logs, limits.

Each test starts its own real server process (``python -m runcycles_server serve``).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from runcycles_server.cli import cli
from runcycles_server.stores.redis_testing import require_redis
from runcycles_server.testing import ServerProcess

pytestmark = pytest.mark.slow

U = "USD_MICROCENTS"


def reserve(base_url: str, api_key: str, tenant: str, amount: int) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/reservations",
        headers={"X-Cycles-API-Key": api_key},
        json={
            "idempotency_key": str(uuid.uuid4()),
            "subject": {"tenant": tenant, "agent": "bot"},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": U, "amount": amount},
        },
    )


def test_server_gets_ready_and_says_where_it_listens(tmp_path: Path) -> None:
    db = tmp_path / "cycles.db"
    started = time.perf_counter()
    with ServerProcess.start(db_path=db) as server:
        elapsed = time.perf_counter() - started
        print(
            f"cycles serve -> /readyz in {elapsed:.3f} s (benchmarks/server_startup.py measures it)"
        )
        banner = server.log_text()
        assert f"listening on http://127.0.0.1:{server.port}" in banner
        assert f"store: SQLite {db.resolve()}" in banner
        assert "admin API: on" in banner
        assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{server.base_url}/readyz").json() == {"status": "ready"}


def test_dev_mode_prints_exports_that_work(tmp_path: Path) -> None:
    with ServerProcess.start(db_path=tmp_path / "dev.db", extra_args=["--dev"]) as server:
        values = {}
        for line in server.log_text().splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                values[name] = value
        assert values["CYCLES_BASE_URL"] == server.base_url
        assert values["CYCLES_TENANT"] == "demo"
        assert values["CYCLES_ADMIN_API_KEY"] == server.admin_key
        response = reserve(server.base_url, values["CYCLES_API_KEY"], "demo", 1_000)
        assert response.status_code == 200, response.text
        assert response.json()["decision"] == "ALLOW"
        result = CliRunner().invoke(
            cli, ["balances", "--json"], env={**values, "CYCLES_ADMIN_API_KEY": None}
        )
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.stdout)
        assert row["allocated"]["amount"] == 100 * 10**8
        assert row["reserved"]["amount"] == 1_000


def test_sigterm_finishes_in_flight_requests_and_checkpoints_the_wal(tmp_path: Path) -> None:
    db = tmp_path / "cycles.db"
    server = ServerProcess.start(db_path=db)
    try:
        tenant = server.provision(budget=10_000)
        assert reserve(server.base_url, tenant.api_key, tenant.tenant_id, 100).status_code == 200
        assert Path(f"{db}-wal").exists()  # WAL mode, not yet checkpointed
        body_started = threading.Event()
        answer: list[httpx.Response] = []

        def slow_body() -> Iterator[bytes]:
            yield b'{"tenant_id": "slow-tenant", '
            body_started.set()
            time.sleep(0.8)  # SIGTERM arrives while the request is still being received
            yield b'"name": "Slow"}'

        def send() -> None:
            answer.append(
                httpx.post(
                    f"{server.base_url}/v1/admin/tenants",
                    headers={
                        "X-Admin-API-Key": server.admin_key,
                        "Content-Type": "application/json",
                    },
                    content=slow_body(),
                    timeout=10,
                )
            )

        thread = threading.Thread(target=send)
        thread.start()
        assert body_started.wait(5)
        time.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        thread.join(15)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit too
        assert server.process.wait(15) in (0, -signal.SIGTERM), server.log_text()
        assert answer, "the in-flight request got no answer"
        assert answer[0].status_code == 201, answer[0].text
    finally:
        server.stop()
    wal = Path(f"{db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on close
    with sqlite3.connect(db) as conn:
        names = {row[0] for row in conn.execute("SELECT tenant_id FROM tenants")}
    assert {tenant.tenant_id, "slow-tenant"} <= names


def test_access_log_lines_and_body_limit(tmp_path: Path) -> None:
    args = ["--access-log", "--max-body-bytes", "2048"]
    with ServerProcess.start(db_path=tmp_path / "c.db", extra_args=args) as server:
        tenant = server.provision(budget=10_000)
        created = reserve(server.base_url, tenant.api_key, tenant.tenant_id, 100)
        rid = created.json()["reservation_id"]
        commit = httpx.post(
            f"{server.base_url}/v1/reservations/{rid}/commit",
            headers={"X-Cycles-API-Key": tenant.api_key},
            json={"idempotency_key": "c1", "actual": {"unit": U, "amount": 50}},
        )
        assert commit.status_code == 200
        too_big = httpx.post(
            f"{server.base_url}/v1/reservations",
            headers={"X-Cycles-API-Key": tenant.api_key},
            content=b" " * 4096,
        )
        assert too_big.status_code == 413
        assert "2048-byte limit" in too_big.json()["message"]
        time.sleep(0.2)  # the log line is written after the response
        lines = [
            json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")
        ]
    by_id = {line["request_id"]: line for line in lines}
    line = by_id[commit.headers["x-request-id"]]
    assert line["method"] == "POST"
    assert line["path"] == "/v1/reservations/{reservation_id}/commit"
    assert line["status"] == 200
    assert line["tenant"] == tenant.tenant_id
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0
    assert by_id[too_big.headers["x-request-id"]]["status"] == 413
    assert any(entry["path"] == "/readyz" for entry in lines)


def test_no_access_log_at_warning_level(tmp_path: Path) -> None:
    # ServerProcess runs with --log-level warning: no per-request lines, no per-request cost
    with ServerProcess.start(db_path=tmp_path / "c.db") as server:
        server.provision(budget=1)
        text = server.log_text()
    assert not [line for line in text.splitlines() if line.startswith("{")]


def test_redis_banner_names_the_store() -> None:
    url = require_redis()
    with ServerProcess.start(store="redis", redis_url=url) as server:
        assert "store: Redis redis://" in server.log_text()
        assert server.provision(budget=5).tenant_id


def test_cycles_demo_command_runs_offline() -> None:
    result = CliRunner().invoke(cli, ["demo", "--delay", "0"])
    assert result.exit_code == 0, result.output
    assert "DENIED BUDGET_EXCEEDED" in result.stdout
    assert "the next send_email was denied before it ran" in result.stdout
    loop = CliRunner().invoke(cli, ["demo", "--loop", "--delay", "0"])
    assert loop.exit_code == 0, loop.output
    assert "the next one was stopped before the model ran" in loop.stdout
