"""The ``cycles`` admin commands against real server processes (SQLite and Redis).

Every command runs through typer's ``CliRunner`` with ``--url`` and ``--admin-key`` pointing
at a ``ServerProcess``; results are checked against the server's own API, not the CLI's text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from runcycles_server.cli import cli
from runcycles_server.roles import AGENT_PERMISSIONS, TENANT_ADMIN_PERMISSIONS
from runcycles_server.testing import ServerProcess

U = "USD_MICROCENTS"
# The runner must not see the developer's own CYCLES_* variables.
CLEAN_ENV: dict[str, str | None] = {
    "CYCLES_BASE_URL": None,
    "CYCLES_ADMIN_API_KEY": None,
    "CYCLES_API_KEY": None,
    "CYCLES_TENANT": None,
}


def run(server: ServerProcess, *args: str, env: dict[str, str | None] | None = None) -> Result:
    extra = ["--url", server.base_url, "--admin-key", server.admin_key]
    return CliRunner().invoke(cli, [*args, *extra], env={**CLEAN_ENV, **(env or {})})


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def fresh_id() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


def budget(server: ServerProcess, scope: str, unit: str = U) -> dict[str, Any]:
    body: dict[str, Any] = server.admin(
        "GET", "/v1/admin/budgets/lookup", params={"scope": scope, "unit": unit}
    )
    return body


def exports(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            found[name] = value
    return found


def test_tenant_create_list_and_close(server: ServerProcess) -> None:
    tenant = fresh_id()
    assert f"tenant {tenant} (ACTIVE)" in ok(run(server, "tenant", "create", tenant, "--name", "A"))
    assert server.admin("GET", f"/v1/admin/tenants/{tenant}")["name"] == "A"
    ok(run(server, "tenant", "create", tenant, "--name", "A"))  # replay is harmless

    listed = json.loads(ok(run(server, "tenant", "list", "--json")))
    assert tenant in {t["tenant_id"] for t in listed}
    assert tenant in ok(run(server, "tenant", "list"))

    assert "CLOSED" in ok(run(server, "tenant", "close", tenant, "--yes"))
    assert server.admin("GET", f"/v1/admin/tenants/{tenant}")["status"] == "CLOSED"
    closed = json.loads(ok(run(server, "tenant", "list", "--status", "closed", "--json")))
    assert tenant in {t["tenant_id"] for t in closed}


def test_tenant_close_asks_first_and_aborts_on_no(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    result = CliRunner().invoke(
        cli,
        ["tenant", "close", tenant, "--url", server.base_url, "--admin-key", server.admin_key],
        input="n\n",
        env=CLEAN_ENV,
    )
    assert result.exit_code == 1
    assert server.admin("GET", f"/v1/admin/tenants/{tenant}")["status"] == "ACTIVE"


def test_invalid_tenant_id_reports_the_servers_reason(server: ServerProcess) -> None:
    result = run(server, "tenant", "create", "No Spaces!")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: server refused (400 INVALID_REQUEST)")
    assert "tenant_id" in result.stderr
    assert "Traceback" not in result.output


def test_key_create_prints_working_exports_then_revoke_disables_it(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    result = run(server, "key", "create", tenant, "--name", "agent")
    values = exports(ok(result))
    assert values["CYCLES_TENANT"] == tenant
    assert values["CYCLES_BASE_URL"] == server.base_url
    assert "shown only this once" in result.stderr
    secret = values["CYCLES_API_KEY"]
    introspect = httpx.get(
        f"{server.base_url}/v1/auth/introspect", headers={"X-Cycles-API-Key": secret}
    )
    assert introspect.status_code == 200
    assert introspect.json()["tenant_id"] == tenant

    keys = json.loads(ok(run(server, "key", "list", tenant, "--json")))
    assert [k["name"] for k in keys] == ["agent"]
    assert secret not in ok(run(server, "key", "list", tenant))
    key_id = keys[0]["key_id"]

    assert "REVOKED" in ok(run(server, "key", "revoke", key_id, "--reason", "rotated"))
    again = httpx.get(f"{server.base_url}/v1/auth/introspect", headers={"X-Cycles-API-Key": secret})
    assert again.status_code == 401


def test_key_create_with_restricted_permissions(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    values = exports(ok(run(server, "key", "create", tenant, "--permission", "balances:read")))
    introspect = httpx.get(
        f"{server.base_url}/v1/auth/introspect",
        headers={"X-Cycles-API-Key": values["CYCLES_API_KEY"]},
    ).json()
    assert introspect["permissions"] == ["balances:read"]


def _as_key(
    server: ServerProcess, secret: str, method: str, path: str, **kw: Any
) -> httpx.Response:
    return httpx.request(
        method, server.base_url + path, headers={"X-Cycles-API-Key": secret}, timeout=10, **kw
    )


def _fund(server: ServerProcess, secret: str, scope: str, amount: int) -> httpx.Response:
    return _as_key(
        server,
        secret,
        "POST",
        "/v1/admin/budgets/fund",
        params={"scope": scope, "unit": U},
        json={
            "operation": "CREDIT",
            "amount": {"unit": U, "amount": amount},
            "idempotency_key": uuid.uuid4().hex,
        },
    )


def test_key_create_makes_an_agent_key_that_cannot_refill_its_budget(
    server: ServerProcess,
) -> None:
    tenant = fresh_id()
    scope = f"tenant:{tenant}"
    ok(run(server, "tenant", "create", tenant))
    ok(run(server, "budget", "create", scope, "1000"))
    result = run(server, "key", "create", tenant)
    secret = exports(ok(result))["CYCLES_API_KEY"]
    # the printed key line says what the key may do
    assert "# it may: role agent: runtime only" in result.stderr
    assert "cannot create, fund or change budgets or policies" in result.stderr

    introspect = _as_key(server, secret, "GET", "/v1/auth/introspect").json()
    assert sorted(introspect["permissions"]) == sorted(AGENT_PERMISSIONS)
    assert introspect["capabilities"]["manage_budgets"] is False
    assert introspect["capabilities"]["manage_policies"] is False
    assert introspect["capabilities"]["manage_reservations"] is True

    # it does its job: reserve against the budget
    reserved = _as_key(
        server,
        secret,
        "POST",
        "/v1/reservations",
        json={
            "idempotency_key": "r1",
            "subject": {"tenant": tenant},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": U, "amount": 10},
        },
    )
    assert reserved.status_code == 200, reserved.text
    assert reserved.json()["decision"] == "ALLOW"

    # ... and cannot fund (credit 10^12 to itself), create, patch, freeze or unfreeze budgets
    funded = _fund(server, secret, scope, 10**12)
    assert funded.status_code == 403, funded.text
    assert funded.json()["error"] == "FORBIDDEN"
    assert "budgets:write" in funded.json()["message"]
    created = _as_key(
        server,
        secret,
        "POST",
        "/v1/admin/budgets",
        json={"scope": f"{scope}/agent:me", "unit": U, "allocated": {"unit": U, "amount": 10**12}},
    )
    assert created.status_code == 403, created.text
    assert "budgets:write" in created.json()["message"]
    for method, path in [
        ("PATCH", "/v1/admin/budgets"),
        ("POST", "/v1/admin/budgets/freeze"),
        ("POST", "/v1/admin/budgets/unfreeze"),
    ]:
        refused = _as_key(
            server,
            secret,
            method,
            path,
            params={"scope": scope, "unit": U},
            json={"overdraft_limit": {"unit": U, "amount": 10**12}} if method == "PATCH" else {},
        )
        assert refused.status_code == 401, (method, path, refused.text)
        assert "X-Admin-API-Key" in refused.json()["message"]
    # policies: the key lacks policies:write (this server has no policy routes at all, so no
    # request can write one; the permission is what would be checked if it had)
    assert "policies:write" not in introspect["permissions"]
    policy = _as_key(server, secret, "POST", "/v1/admin/policies", json={"name": "p"})
    assert policy.status_code >= 400, policy.text

    row = budget(server, scope)
    assert row["allocated"]["amount"] == 1000  # nothing was credited
    assert row["reserved"]["amount"] == 10
    assert (
        _as_key(server, secret, "GET", f"/v1/admin/budgets?tenant_id={tenant}").status_code == 403
    )


def test_key_create_role_tenant_admin_may_fund_its_own_budgets(server: ServerProcess) -> None:
    tenant = fresh_id()
    scope = f"tenant:{tenant}"
    ok(run(server, "tenant", "create", tenant))
    ok(run(server, "budget", "create", scope, "1000"))
    result = run(server, "key", "create", tenant, "--role", "tenant-admin")
    secret = exports(ok(result))["CYCLES_API_KEY"]
    assert "# it may: role tenant-admin" in result.stderr
    assert "budgets:read/write" in result.stderr
    funded = _fund(server, secret, scope, 500)
    assert funded.status_code == 200, funded.text
    assert budget(server, scope)["allocated"]["amount"] == 1500
    ok(run(server, "key", "create", tenant, "--name", "bot"))
    table = ok(run(server, "key", "list", tenant))
    rows = [[cell.strip() for cell in re.split("[│┃]", line)[1:-1]] for line in table.splitlines()]
    header = next(row for row in rows if "role" in row)
    roles = {
        row[header.index("name")]: row[header.index("role")]
        for row in rows
        if row and row[0].startswith("key_")
    }
    assert roles == {"cli": "tenant-admin", "bot": "agent"}, table


def test_key_create_role_plus_permissions_and_comma_lists(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    result = run(server, "key", "create", tenant, "--role", "agent", "--permission", "budgets:read")
    secret = exports(ok(result))["CYCLES_API_KEY"]
    assert "# it may: custom permissions:" in result.stderr
    granted = _as_key(server, secret, "GET", "/v1/auth/introspect").json()["permissions"]
    assert sorted(granted) == sorted([*AGENT_PERMISSIONS, "budgets:read"])
    # no role: exactly the listed permissions; "a,b" is two of them; a write is called out
    result = run(server, "key", "create", tenant, "--permissions", "balances:read,budgets:write")
    secret = exports(ok(result))["CYCLES_API_KEY"]
    granted = _as_key(server, secret, "GET", "/v1/auth/introspect").json()["permissions"]
    assert granted == ["balances:read", "budgets:write"]
    assert "it can change governance (budgets:write)" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--role", "boss"], "unknown --role 'boss'; use one of agent, tenant-admin"),
        (["--permission", "budgets:refill"], "unknown permission 'budgets:refill'"),
    ],
)
def test_key_create_bad_role_or_permission_exits_2_without_a_key(
    server: ServerProcess, args: list[str], needle: str
) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    result = run(server, "key", "create", tenant, *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert "CYCLES_API_KEY" not in result.stdout
    assert json.loads(ok(run(server, "key", "list", tenant, "--json"))) == []


def test_admin_api_without_permissions_keeps_the_spec_default(server: ServerProcess) -> None:
    """Conformance: POST /v1/admin/api-keys without ``permissions`` grants the spec default."""
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    body = server.admin("POST", "/v1/admin/api-keys", json={"tenant_id": tenant, "name": "raw"})
    assert body["permissions"] == list(TENANT_ADMIN_PERMISSIONS)
    assert {"budgets:write", "policies:write"} <= set(body["permissions"])


def test_key_revoke_unknown_key_fails_with_one_line(server: ServerProcess) -> None:
    result = run(server, "key", "revoke", "key_does_not_exist")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "404" in result.stderr


def test_budget_create_in_dollars_and_units(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    out = ok(run(server, "budget", "create", f"tenant:{tenant}", "$1.50"))
    assert "$1.50" in out
    assert budget(server, f"tenant:{tenant}")["allocated"]["amount"] == 150_000_000

    ok(
        run(
            server,
            "budget",
            "create",
            f"tenant:{tenant}/agent:bot",
            "1_000",
            "--overdraft-limit",
            "$0.00000250",
        )
    )
    row = budget(server, f"tenant:{tenant}/agent:bot")
    assert row["allocated"]["amount"] == 1_000
    assert row["overdraft_limit"]["amount"] == 250

    ok(run(server, "budget", "create", f"tenant:{tenant}", "5000", "--unit", "tokens"))
    assert budget(server, f"tenant:{tenant}", "TOKENS")["remaining"]["amount"] == 5000

    listed = json.loads(ok(run(server, "budget", "list", "--tenant", tenant, "--json")))
    assert {(b["scope"], b["unit"]) for b in listed} == {
        (f"tenant:{tenant}", U),
        (f"tenant:{tenant}/agent:bot", U),
        (f"tenant:{tenant}", "TOKENS"),
    }
    table = ok(run(server, "budget", "list", "--tenant", tenant, "--raw"))
    assert "150,000,000" in table
    assert "5,000" in table


def test_budget_create_bad_values_exit_2_without_calling_the_server(
    server: ServerProcess,
) -> None:
    tenant = fresh_id()
    cases = [
        (["tenant:" + tenant, "lots"], "not a whole number"),
        (["tenant:" + tenant, "$0.000000001"], "eight decimal places"),
        (["tenant:" + tenant, "$5", "--unit", "TOKENS"], "in dollars but the unit is TOKENS"),
        (["tenant:" + tenant, "5", "--unit", "EUR"], "unknown unit 'EUR'"),
        (["workspace:x", "5"], "pass --tenant"),
    ]
    for args, message in cases:
        result = run(server, "budget", "create", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error: ")
    # nothing was sent: the tenant does not even exist
    assert server.admin("GET", "/v1/admin/tenants", params={"limit": 100})["tenants"] is not None
    with pytest.raises(RuntimeError, match="404"):
        server.admin("GET", f"/v1/admin/tenants/{tenant}")


def test_budget_fund_operations(server: ServerProcess) -> None:
    tenant = fresh_id()
    scope = f"tenant:{tenant}"
    ok(run(server, "tenant", "create", tenant))
    ok(run(server, "budget", "create", scope, "1000"))

    ok(run(server, "budget", "fund", scope, "500"))  # credit is the default
    assert budget(server, scope)["allocated"]["amount"] == 1500
    ok(run(server, "budget", "fund", scope, "200", "--op", "debit"))
    assert budget(server, scope)["remaining"]["amount"] == 1300
    ok(run(server, "budget", "fund", scope, "$0.00005", "--op", "reset", "--reason", "new month"))
    row = budget(server, scope)
    assert row["allocated"]["amount"] == 5000
    assert row["remaining"]["amount"] == 5000
    ok(run(server, "budget", "fund", scope, "5000", "--op", "reset-spent"))
    assert budget(server, scope)["spent"]["amount"] == 0
    ok(run(server, "budget", "fund", scope, "0", "--op", "REPAY_DEBT"))

    key = f"fund-{uuid.uuid4().hex}"
    for _ in range(2):  # the same idempotency key applies once
        ok(run(server, "budget", "fund", scope, "10", "--idempotency-key", key))
    assert budget(server, scope)["allocated"]["amount"] == 5010


def test_budget_fund_errors(server: ServerProcess) -> None:
    tenant = fresh_id()
    scope = f"tenant:{tenant}"
    ok(run(server, "tenant", "create", tenant))
    ok(run(server, "budget", "create", scope, "100"))

    bad_op = run(server, "budget", "fund", scope, "1", "--op", "steal")
    assert bad_op.exit_code == 2
    assert "unknown --op 'steal'; use one of credit, debit" in bad_op.stderr

    too_much = run(server, "budget", "fund", scope, "1000", "--op", "debit")
    assert too_much.exit_code == 1
    assert "remaining is only 100" in too_much.stderr

    missing = run(server, "budget", "fund", f"tenant:{tenant}/agent:nobody", "1")
    assert missing.exit_code == 1
    assert "404" in missing.stderr


def test_balances_with_admin_key_and_with_tenant_key(server: ServerProcess) -> None:
    tenant = server.provision(budget=250_000_000)  # 2.50 USD
    scope = f"tenant:{tenant.tenant_id}"

    table = ok(run(server, "balances", "--tenant", tenant.tenant_id))
    assert scope in table
    assert "$2.50" in table
    rows = json.loads(ok(run(server, "balances", "--tenant", tenant.tenant_id, "--json")))
    assert [(r["scope"], r["remaining"]["amount"]) for r in rows] == [(scope, 250_000_000)]

    # only a tenant key (from the environment): GET /v1/balances for the key's tenant
    result = CliRunner().invoke(
        cli,
        ["balances", "--url", server.base_url, "--json"],
        env={**CLEAN_ENV, "CYCLES_API_KEY": tenant.api_key},
    )
    rows = json.loads(ok(result))
    assert [(r["scope_path"], r["allocated"]["amount"]) for r in rows] == [(scope, 250_000_000)]
    result = CliRunner().invoke(
        cli,
        ["balances", "--url", server.base_url, "--raw"],
        env={**CLEAN_ENV, "CYCLES_API_KEY": tenant.api_key},
    )
    assert "250,000,000" in ok(result)


def test_wrong_admin_key_says_what_to_check(server: ServerProcess) -> None:
    result = CliRunner().invoke(
        cli,
        ["tenant", "list", "--url", server.base_url, "--admin-key", "not-it"],
        env=CLEAN_ENV,
    )
    assert result.exit_code == 1
    assert "401 UNAUTHORIZED" in result.stderr
    assert "CYCLES_ADMIN_API_KEY matches the key the server was started with" in result.stderr


def test_url_and_admin_key_come_from_the_environment(server: ServerProcess) -> None:
    tenant = fresh_id()
    result = CliRunner().invoke(
        cli,
        ["tenant", "create", tenant],
        env={"CYCLES_BASE_URL": server.base_url, "CYCLES_ADMIN_API_KEY": server.admin_key},
    )
    ok(result)
    assert server.admin("GET", f"/v1/admin/tenants/{tenant}")["tenant_id"] == tenant


# -- bulk actions and key update -------------------------------------------------------------


def status(server: ServerProcess, tenant: str) -> str:
    return str(server.admin("GET", f"/v1/admin/tenants/{tenant}")["status"])


def test_tenant_bulk_previews_then_applies_with_yes(server: ServerProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    tenants = [f"bulk-{tag}-{i}" for i in range(3)]
    for tenant in tenants:
        ok(run(server, "tenant", "create", tenant))

    preview = ok(run(server, "tenant", "bulk", "suspend", "--search", tag))
    assert "3 tenant(s) matched" in preview
    assert "would change" in preview
    assert "run again with --yes" in preview
    assert [status(server, t) for t in tenants] == ["ACTIVE"] * 3  # only a preview

    applied = ok(run(server, "tenant", "bulk", "suspend", "--search", tag, "--yes"))
    assert "3 changed, 0 skipped, 0 failed" in applied
    assert [status(server, t) for t in tenants] == ["SUSPENDED"] * 3

    # --expected-count pins an earlier preview: a drifted count changes nothing
    ok(run(server, "tenant", "create", f"bulk-{tag}-new"))
    drifted = run(server, "tenant", "bulk", "reactivate", "--search", tag, "--expected-count", "3")
    assert drifted.exit_code == 1
    assert "COUNT_MISMATCH" in drifted.output
    assert [status(server, t) for t in tenants] == ["SUSPENDED"] * 3
    again = json.loads(ok(run(server, "tenant", "bulk", "reactivate", "--search", tag,
                              "--expected-count", "4", "--json")))  # fmt: skip
    assert sorted(r["id"] for r in again["succeeded"]) == tenants
    assert [s["id"] for s in again["skipped"]] == [f"bulk-{tag}-new"]


def test_tenant_bulk_bad_input_exits_2(server: ServerProcess) -> None:
    empty = run(server, "tenant", "bulk", "suspend")
    assert empty.exit_code == 2
    assert "give a filter" in empty.output
    unknown = run(server, "tenant", "bulk", "pause", "--search", "x")
    assert unknown.exit_code == 2
    assert "suspend, reactivate, close" in unknown.output


def test_budget_bulk_credit_and_reset_spent(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    for team in ("eng", "ops"):
        ok(run(server, "budget", "create", f"tenant:{tenant}/workspace:{team}", "$10"))
    ok(run(server, "budget", "create", f"tenant:{tenant}/workspace:tok", "500", "--unit", "TOKENS"))

    preview = ok(run(server, "budget", "bulk", "credit", "$5", "--tenant", tenant))
    assert "3 budget(s) matched" in preview
    assert "2 to change, 0 skipped, 1 failed" in preview
    assert budget(server, f"tenant:{tenant}/workspace:eng")["allocated"]["amount"] == 10 * 10**8

    applied = ok(run(server, "budget", "bulk", "credit", "$5", "--tenant", tenant,
                     "--only-unit", "--reason", "top-up", "--yes"))  # fmt: skip
    assert "2 changed" in applied
    assert budget(server, f"tenant:{tenant}/workspace:eng")["allocated"]["amount"] == 15 * 10**8
    assert budget(server, f"tenant:{tenant}/workspace:tok", "TOKENS")["allocated"]["amount"] == 500

    ok(run(server, "budget", "bulk", "reset-spent", "$20", "--tenant", tenant, "--scope-prefix",
           f"tenant:{tenant}/workspace:ops", "--spent", "$1", "--yes"))  # fmt: skip
    ops = budget(server, f"tenant:{tenant}/workspace:ops")
    assert (ops["allocated"]["amount"], ops["spent"]["amount"]) == (20 * 10**8, 10**8)
    wrong = run(server, "budget", "bulk", "credit", "$1", "--tenant", tenant, "--spent", "$1")
    assert wrong.exit_code == 2


def test_key_update_changes_name_and_permissions(server: ServerProcess) -> None:
    tenant = fresh_id()
    ok(run(server, "tenant", "create", tenant))
    ok(run(server, "key", "create", tenant))
    [key] = server.admin("GET", "/v1/admin/api-keys", params={"tenant_id": tenant})["keys"]
    out = ok(run(server, "key", "update", key["key_id"], "--name", "ci", "--role", "tenant-admin"))
    assert "updated" in out
    [after] = server.admin("GET", "/v1/admin/api-keys", params={"tenant_id": tenant})["keys"]
    assert after["name"] == "ci"
    assert "budgets:write" in after["permissions"]
    assert run(server, "key", "update", key["key_id"]).exit_code == 2
    ok(run(server, "key", "revoke", key["key_id"]))
    revoked = run(server, "key", "update", key["key_id"], "--name", "x")
    assert revoked.exit_code == 1
    assert "KEY_REVOKED" in revoked.output
