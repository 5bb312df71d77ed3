"""``cycles webhook`` against a real server process and a real local receiver.

Every command runs through typer's ``CliRunner`` with ``--url`` and a key pointing at a
``ServerProcess`` (SQLite); results are checked against the server's own API and against
what the receiver got.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from runcycles_server.cli import cli
from runcycles_server.testing import ServerProcess

pytestmark = pytest.mark.slow

CLEAN_ENV: dict[str, str | None] = {
    "CYCLES_BASE_URL": None,
    "CYCLES_ADMIN_API_KEY": None,
    "CYCLES_API_KEY": None,
}
PERMS = ["reservations:create", "reservations:commit", "balances:read", "webhooks:read",
         "webhooks:write"]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess.start("sqlite", extra_args=["--webhook-poll", "0.1"]) as found:
        found.admin(
            "PUT",
            "/v1/admin/config/webhook-security",
            json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
        )
        yield found


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}/hook", bodies
    http.shutdown()
    http.server_close()


def run(server: ServerProcess, *args: str, api_key: str | None = None) -> Result:
    extra = ["--url", server.base_url]
    if api_key is None:
        extra += ["--admin-key", server.admin_key]
    env = {**CLEAN_ENV, "CYCLES_API_KEY": api_key}
    return CliRunner().invoke(cli, [*args, *extra], env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def wait_for(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_webhook_commands(
    server: ServerProcess, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, bodies = receiver
    tenant = server.provision(budget=1_000, permissions=PERMS)
    created = json.loads(
        ok(
            run(
                server,
                "webhook",
                "create",
                url,
                "--tenant",
                tenant.tenant_id,
                "--event",
                "budget.threshold_crossed",
                "--threshold",
                "0.5",
                "--json",
            )
        )
    )
    sid = created["subscription"]["subscription_id"]
    assert created["signing_secret"].startswith("whsec_")
    assert created["subscription"]["thresholds"] == {"budget_utilization": [0.5]}
    listed = ok(run(server, "webhook", "list", "--tenant", tenant.tenant_id))
    assert sid in listed
    assert created["signing_secret"] not in listed
    # a threshold crossing reaches the receiver; deliveries shows it
    reservation = {
        "idempotency_key": "r1",
        "subject": {"tenant": tenant.tenant_id},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 600},
    }
    headers = {"X-Cycles-API-Key": tenant.api_key}
    answer = httpx.post(f"{server.base_url}/v1/reservations", json=reservation, headers=headers)
    assert answer.status_code == 200, answer.text
    wait_for(lambda: len(bodies) == 1, "the delivery")
    assert bodies[0]["data"]["threshold"] == 0.5
    shown = ok(run(server, "webhook", "deliveries", sid))
    assert "SUCCESS" in shown
    assert bodies[0]["event_id"] in shown
    # test, pause, resume, update with the tenant's own key
    assert "ok: HTTP 204" in ok(run(server, "webhook", "test", sid, api_key=tenant.api_key))
    assert bodies[-1]["event_type"] == "system.webhook_test"
    assert "paused" in ok(run(server, "webhook", "pause", sid, api_key=tenant.api_key))
    assert "(ACTIVE)" in ok(run(server, "webhook", "resume", sid))
    updated = ok(run(server, "webhook", "update", sid, "--scope", f"tenant:{tenant.tenant_id}"))
    assert "updated" in updated
    # replay the window: the crossing again
    before = len(bodies)
    replayed = ok(run(server, "webhook", "replay", sid, "--from", "2020-01-01T00:00:00Z"))
    assert "1 event(s) queued" in replayed
    wait_for(lambda: len(bodies) == before + 1, "the replayed delivery")
    assert bodies[-1]["event_id"] == bodies[0]["event_id"]
    # bad input exits 2 before the server is called; a refusal exits 1
    assert run(server, "webhook", "create", url).exit_code == 2
    assert run(server, "webhook", "create", url, "--event", "x", "--threshold", "2").exit_code == 2
    refused = run(server, "webhook", "create", "https://10.0.0.1/x", "--event", "budget.exhausted")
    assert refused.exit_code == 1
    assert "10.0.0.1" in refused.output
    assert "deleted" in ok(run(server, "webhook", "delete", sid, "--yes"))
    assert sid not in ok(run(server, "webhook", "list"))
