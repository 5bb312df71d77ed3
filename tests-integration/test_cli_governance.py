"""``cycles policy`` and ``cycles quota`` against real server processes (SQLite and Redis).

Every command runs through typer's ``CliRunner`` with ``--url`` and ``--admin-key`` pointing
at a ``ServerProcess``; results are checked against the server's own API. Also
``cycles serve --action-kinds`` and the example policy of ``cycles serve --dev``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner, Result

from runcycles_server.cli import cli
from runcycles_server.roles import TENANT_ADMIN_PERMISSIONS
from runcycles_server.testing import ProvisionedTenant, ServerProcess

U = "USD_MICROCENTS"
EMAIL = "message.email.send"
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
    env = {**CLEAN_ENV, "CYCLES_API_KEY": api_key}
    return CliRunner().invoke(cli, [*args, *extra], env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def policies(server: ServerProcess, tenant_id: str) -> list[dict[str, Any]]:
    body = server.admin("GET", "/v1/admin/policies", params={"tenant_id": tenant_id})
    return list(body["policies"])


def reserve(tenant: ProvisionedTenant, kind: str, run_id: str, n: int) -> httpx.Response:
    return httpx.post(
        f"{tenant.server.base_url}/v1/reservations",
        headers={"X-Cycles-API-Key": tenant.api_key},
        json={
            "idempotency_key": f"{kind}-{run_id}-{n}",
            "subject": {"tenant": tenant.tenant_id, "dimensions": {"run_id": run_id}},
            "action": {"kind": kind, "name": "x"},
            "estimate": {"unit": U, "amount": 1},
        },
    )


def test_policy_create_list_and_update(server: ServerProcess, tenant: ProvisionedTenant) -> None:
    t = tenant.tenant_id
    out = ok(
        run(
            server, "policy", "create", "support", "--scope", f"tenant:{t}", "--priority", "5",
            "--deny", "payment.charge,payment.refund", "--quota", f"{EMAIL}:2:run",
        )
    )  # fmt: skip
    (policy,) = policies(server, t)
    assert out.startswith(f"created policy {policy['policy_id']} (support)")
    assert policy["denied_action_kinds"] == ["payment.charge", "payment.refund"]
    assert policy["action_quotas"] == [{"action_kind": EMAIL, "max_calls": 2, "window": "per_run"}]
    assert policy["priority"] == 5
    # the policy is enforced: the third email of a run is refused
    assert [reserve(tenant, EMAIL, "r1", n).status_code for n in range(3)] == [200, 200, 409]
    assert reserve(tenant, "payment.charge", "r1", 9).json()["error"] == "ACTION_KIND_DENIED"
    listed = json.loads(ok(run(server, "policy", "list", "--tenant", t, "--json")))
    assert [p["policy_id"] for p in listed] == [policy["policy_id"]]
    table = ok(run(server, "policy", "list", "--tenant", t))
    assert "support" in table
    assert f"{EMAIL} ≤2/per_run" in table
    out = ok(
        run(
            server, "policy", "update", policy["policy_id"], "--clear", "deny",
            "--allow", "llm.completion", "--quota", f"{EMAIL}:5:per_run", "--disable",
        )
    )  # fmt: skip
    assert out.startswith(f"updated policy {policy['policy_id']}")
    (updated,) = policies(server, t)
    assert updated["status"] == "DISABLED"
    assert (updated["denied_action_kinds"], updated["allowed_action_kinds"]) == (
        [],
        ["llm.completion"],
    )
    assert updated["action_quotas"][0]["max_calls"] == 5
    refused = run(server, "policy", "update", policy["policy_id"], "--deny", "payment.charge")
    assert refused.exit_code == 1
    assert "mutually exclusive" in refused.stderr
    assert "Traceback" not in refused.output


def test_policy_from_file_with_flags_on_top(
    server: ServerProcess, tenant: ProvisionedTenant, tmp_path: Path
) -> None:
    t = tenant.tenant_id
    spec = tmp_path / "policy.yaml"
    spec.write_text(
        f"name: from-file\nscope_pattern: tenant:{t}\npriority: 1\n"
        "risk_class_quotas:\n  - {risk_class: high_risk, max_calls: 3, window: per_day_tumbling}\n"
        "reservation_ttl_override: {default_ttl_ms: 30000}\n"
    )
    ok(run(server, "policy", "create", "--from-file", str(spec), "--priority", "7"))
    (policy,) = policies(server, t)
    assert (policy["name"], policy["priority"]) == ("from-file", 7)
    assert policy["risk_class_quotas"][0]["risk_class"] == "high_risk"
    assert policy["reservation_ttl_override"] == {"default_ttl_ms": 30000}
    again = run(server, "policy", "create", "--from-file", str(spec))
    assert again.exit_code == 1
    assert "DUPLICATE_RESOURCE" in again.stderr


def test_a_tenant_admin_key_manages_its_own_policies(server: ServerProcess) -> None:
    tenant = server.provision(permissions=TENANT_ADMIN_PERMISSIONS)
    key = tenant.api_key
    ok(
        run(
            server,
            "policy",
            "create",
            "own",
            "--scope",
            f"tenant:{tenant.tenant_id}",
            admin=False,
            api_key=key,
        )
    )
    listed = json.loads(ok(run(server, "policy", "list", "--json", admin=False, api_key=key)))
    assert [p["name"] for p in listed] == ["own"]
    agent = server.provision()  # an agent key: runtime only
    refused = run(
        server, "policy", "create", "mine", "--scope", f"tenant:{agent.tenant_id}",
        admin=False, api_key=agent.api_key,
    )  # fmt: skip
    assert refused.exit_code == 1
    assert "403 FORBIDDEN" in refused.stderr
    assert "policies:write" in refused.stderr


def test_quota_counters_and_reset(server: ServerProcess, tenant: ProvisionedTenant) -> None:
    t = tenant.tenant_id
    ok(
        run(
            server,
            "policy",
            "create",
            "emails",
            "--scope",
            f"tenant:{t}",
            "--quota",
            f"{EMAIL}:2:run",
        )
    )
    for n in range(2):
        assert reserve(tenant, EMAIL, "run-42", n).status_code == 200
    assert reserve(tenant, EMAIL, "run-42", 2).json()["error"] == "ACTION_QUOTA_EXCEEDED"
    counters = json.loads(ok(run(server, "quota", "counters", "--tenant", t, "--json")))
    (counter,) = counters
    assert (counter["window_key"], counter["used"], counter["limit"]) == ("run-42", 2, 2)
    table = ok(run(server, "quota", "counters", "--tenant", t, "--run-id", "run-42"))
    assert "run-42" in table
    assert EMAIL in table
    out = ok(
        run(
            server, "quota", "reset", "--tenant", t, "--scope", counter["scope"], "--kind", EMAIL,
            "--window", "run", "--key", "run-42", "--reason", "test", "--yes",
        )
    )  # fmt: skip
    assert "used 2 -> 0" in out
    assert reserve(tenant, EMAIL, "run-42", 3).status_code == 200  # the run may send again
    zero = json.loads(
        ok(run(server, "quota", "counters", "--tenant", t, "--json", "--include-zero"))
    )
    assert [c["used"] for c in zero] == [1]
    missing = run(
        server, "quota", "reset", "--tenant", t, "--scope", counter["scope"], "--kind", EMAIL,
        "--window", "run", "--key", "no-such-run", "--yes",
    )  # fmt: skip
    assert missing.exit_code == 1
    assert "404 NOT_FOUND" in missing.stderr


def test_serve_action_kinds_declares_custom_kinds(tmp_path: Path) -> None:
    kinds = tmp_path / "kinds.yaml"
    kinds.write_text(
        "kinds:\n  - kind: custom.acme.erp.invoice.post\n    risk_class: high_risk\n"
        "    description: Post an invoice\n"
    )
    with ServerProcess.start(extra_args=["--action-kinds", str(kinds)]) as server:
        assert "1 custom action kind(s) declared" in server.log_text()
        body = server.admin("GET", "/v1/action-kinds/custom.acme.erp.invoice.post")
        assert body["risk_class"] == "high_risk"
        tenant = server.provision(budget=1_000)
        ok(
            run(
                server, "policy", "create", "erp", "--scope", f"tenant:{tenant.tenant_id}",
                "--quota", "custom.acme.erp.invoice.post:1:day",
            )
        )  # fmt: skip
        undeclared = run(
            server, "policy", "create", "x", "--scope", f"tenant:{tenant.tenant_id}",
            "--deny", "custom.acme.erp.unknown",
        )  # fmt: skip
        assert undeclared.exit_code == 1
        assert "not registered" in undeclared.stderr


def test_dev_mode_creates_and_prints_an_example_policy(tmp_path: Path) -> None:
    db = tmp_path / "dev.db"
    with ServerProcess.start(db_path=db, extra_args=["--dev"]) as server:
        log = server.log_text()
        (policy,) = policies(server, "demo")
        assert f"# example policy {policy['policy_id']} (dev-example-guardrails)" in log
        assert policy["denied_action_kinds"] == ["payment.charge"]
        assert policy["action_quotas"][0]["action_kind"] == EMAIL
    with ServerProcess.start(db_path=db, extra_args=["--dev"]) as again:  # not created twice
        assert [p["policy_id"] for p in policies(again, "demo")] == [policy["policy_id"]]
        assert policy["policy_id"] in again.log_text()
