"""``cycles events`` (with ``--follow``) and ``cycles overview`` against real server processes
(SQLite and Redis).

Listings run through typer's ``CliRunner``; ``--follow`` runs as its own process, is sent
SIGINT (Ctrl-C) and must exit 0 without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner, Result

from runcycles_server.cli import cli
from runcycles_server.events import EventRecord, new_event_id
from runcycles_server.stores.base import system_clock
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.testing import ProvisionedTenant, ServerProcess

U = "USD_MICROCENTS"
CLEAN_ENV: dict[str, str | None] = {
    "CYCLES_BASE_URL": None,
    "CYCLES_ADMIN_API_KEY": None,
    "CYCLES_API_KEY": None,
    "CYCLES_TENANT": None,
}


def run(
    server: ServerProcess, *args: str, admin: bool = True, api_key: str | None = None
) -> Result:
    extra = ["--url", server.base_url]
    if admin:
        extra += ["--admin-key", server.admin_key]
    return CliRunner().invoke(cli, [*args, *extra], env={**CLEAN_ENV, "CYCLES_API_KEY": api_key})


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def reserve(tenant: ProvisionedTenant, idem: str, amount: int) -> httpx.Response:
    return httpx.post(
        f"{tenant.server.base_url}/v1/reservations",
        headers={"X-Cycles-API-Key": tenant.api_key},
        json={
            "idempotency_key": idem,
            "subject": {"tenant": tenant.tenant_id},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": U, "amount": amount},
        },
    )


def test_events_lists_with_filters(server: ServerProcess) -> None:
    tenant = server.provision(budget=1_000)
    t = tenant.tenant_id
    assert reserve(tenant, "a", 850).status_code == 200  # crosses 80 %
    listed = json.loads(ok(run(server, "events", "--tenant", t, "--json")))
    assert [e["event_type"] for e in listed] == [
        "tenant.created", "api_key.created", "budget.created", "budget.threshold_crossed",
    ]  # fmt: skip
    only = json.loads(
        ok(run(server, "events", "--tenant", t, "--type", "budget.threshold_crossed", "--json"))
    )
    assert [e["data"]["threshold"] for e in only] == [0.8]
    assert (
        json.loads(ok(run(server, "events", "--tenant", t, "--category", "policy", "--json"))) == []
    )
    last = json.loads(ok(run(server, "events", "--tenant", t, "--limit", "2", "--json")))
    assert [e["event_type"] for e in last] == ["budget.created", "budget.threshold_crossed"]
    table = ok(run(server, "events", "--tenant", t))
    assert "4 event(s)" in table
    assert "budget.threshold_crossed" in table
    assert "80% (now 85.0%)" in table
    # a tenant key with events:read reads its own tenant without --tenant
    reader = server.admin(
        "POST", "/v1/admin/api-keys",
        json={"tenant_id": t, "name": "reader", "permissions": ["events:read"]},
    )["key_secret"]  # fmt: skip
    mine = json.loads(ok(run(server, "events", "--json", admin=False, api_key=reader)))
    assert {e["tenant_id"] for e in mine} == {t}
    assert "api_key.created" not in {e["event_type"] for e in mine}  # not a tenant key's
    bad = run(server, "events", "--tenant", t, "--type", "no.such", "--json")
    assert bad.exit_code == 1
    assert "event_type" in bad.output


def _lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def _wait_for(lines: queue.Queue[str], want: str, timeout_s: float = 15.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if want in line:
            return seen
    raise AssertionError(f"{want!r} not printed within {timeout_s} s; got {seen}")


def test_events_follow_prints_new_events_and_stops_on_ctrl_c(server: ServerProcess) -> None:
    tenant = server.provision(budget=1_000)
    args = [
        sys.executable, "-m", "runcycles_server", "events", "--tenant", tenant.tenant_id,
        "--follow", "--interval", "0.2", "--json", "--url", server.base_url,
        "--admin-key", server.admin_key,
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=None
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = _wait_for(lines, "budget.created")
        assert len(first) == 3  # the tenant's events so far
        assert reserve(tenant, "a", 850).status_code == 200
        for i in range(3):  # a burst: every event printed once, in order
            assert reserve(tenant, f"b{i}", 40).status_code == 200
        more = _wait_for(lines, '"threshold":0.95')
        events = [json.loads(line) for line in first + more]
        kinds = [e["event_type"] for e in events]
        assert kinds.count("budget.threshold_crossed") == 2
        assert len({e["event_id"] for e in events}) == len(events)
        assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
        time.sleep(0.6)  # a few quiet polls print nothing again
        assert lines.empty()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_follow_prints_an_event_committed_a_moment_late(tmp_path: Path) -> None:
    db = tmp_path / "cycles.db"
    with ServerProcess.start(store="sqlite", db_path=db) as server:
        tenant = server.provision(budget=1_000)
        process = subprocess.Popen(
            [sys.executable, "-m", "runcycles_server", "events", "--tenant", tenant.tenant_id,
             "--follow", "--interval", "0.2", "--json", "--url", server.base_url,
             "--admin-key", server.admin_key],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
        try:
            _wait_for(lines, "budget.created")
            assert reserve(tenant, "a", 850).status_code == 200
            _wait_for(lines, "budget.threshold_crossed")
            # another process commits an event stamped 2 s before the newest one printed
            late = SqliteStore(db, clock=lambda: system_clock() - 2_000)
            now = late.clock()
            row = EventRecord(new_event_id(now), "tenant.updated", tenant.tenant_id, now,
                              "cycles-server", data={"changed_fields": ["name"]})  # fmt: skip
            asyncio.run(late.record_events([row]))
            asyncio.run(late.close())
            printed = _wait_for(lines, row.event_id)
            assert [json.loads(line)["event_id"] for line in printed] == [row.event_id]
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=15)
    assert process.returncode == 0


def test_overview(server: ServerProcess) -> None:
    tenant = server.provision(budget=1_000)
    assert reserve(tenant, "big", 5_000).status_code == 409
    body = json.loads(ok(run(server, "overview", "--json")))
    assert body["tenant_counts"]["total"] >= 1
    assert body["event_window_seconds"] == 3600
    text = ok(run(server, "overview"))
    assert "tenants:" in text
    assert "budgets:" in text
    assert "events in the last 1 h:" in text
    assert run(server, "overview", admin=False).exit_code == 2  # no admin key


def test_serve_checks_the_detector_parameters() -> None:
    bad = CliRunner().invoke(cli, ["serve", "--detectors", '{"burn_rate_multiplier": 1}'])
    assert bad.exit_code == 2
    assert "--detectors: burn_rate_multiplier must be >= 1.5" in bad.output
    unknown = CliRunner().invoke(cli, ["serve", "--detectors", '{"nope": 1}'])
    assert unknown.exit_code == 2
    assert "unknown field(s) nope" in unknown.output


def test_a_server_with_its_own_detector_parameters(tmp_path: Any) -> None:
    params = '{"tick_seconds": 0.2, "refusal_window_seconds": 1}'
    with ServerProcess.start(store="sqlite", extra_args=["--detectors", params]) as server:
        tenant = server.provision(budget=100)
        for i in range(4):
            assert reserve(tenant, f"no{i}", 500).status_code == 409
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = server.admin(
                "GET", "/v1/admin/events",
                params={"tenant_id": tenant.tenant_id, "event_type": "reservation.denied"},
            )["events"]  # fmt: skip
            if sum(e["data"]["count"] for e in found) == 4:
                break
            time.sleep(0.1)
        # the first denial at the next tick (0.2 s), the others once its 1 s window passed
        assert sum(e["data"]["count"] for e in found) == 4
        assert 1 <= len(found) <= 2
