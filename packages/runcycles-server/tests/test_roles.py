"""Least privilege: the named key roles, the CLI's choice of permissions, the dev server's key."""

from __future__ import annotations

from typing import TYPE_CHECKING, get_args

import pytest

from runcycles_server import admin
from runcycles_server.cli import bootstrap_dev
from runcycles_server.cli_admin import CliError, key_permissions
from runcycles_server.roles import (
    AGENT_PERMISSIONS,
    ALL_PERMISSIONS,
    ROLES,
    TENANT_ADMIN_PERMISSIONS,
    describe_permissions,
    role_of,
)
from runcycles_server.stores.base import Store

if TYPE_CHECKING:
    from conftest import Api

U = "USD_MICROCENTS"


def test_the_permission_list_is_the_admin_models_list() -> None:
    assert tuple(get_args(admin.Permission)) == ALL_PERMISSIONS
    assert set(TENANT_ADMIN_PERMISSIONS) <= set(ALL_PERMISSIONS)


def test_agent_is_runtime_only_and_tenant_admin_is_the_spec_default() -> None:
    assert not any(p.startswith(("budgets:", "policies:", "admin")) for p in AGENT_PERMISSIONS)
    assert all(p.startswith(("reservations:", "balances:")) for p in AGENT_PERMISSIONS)
    # the governance spec's default tenant permissions, kept by POST /v1/admin/api-keys
    assert list(TENANT_ADMIN_PERMISSIONS) == admin.DEFAULT_PERMISSIONS
    assert set(TENANT_ADMIN_PERMISSIONS) - set(AGENT_PERMISSIONS) == {
        "budgets:read",
        "budgets:write",
        "policies:read",
        "policies:write",
    }


def test_describe_permissions_names_the_role_or_warns_about_writes() -> None:
    assert describe_permissions(list(reversed(AGENT_PERMISSIONS))).startswith("role agent: ")
    assert "cannot create, fund" in describe_permissions(AGENT_PERMISSIONS)
    assert describe_permissions(TENANT_ADMIN_PERMISSIONS).startswith("role tenant-admin: ")
    assert describe_permissions(["balances:read"]) == "custom permissions: balances:read"
    text = describe_permissions(["reservations:create", "budgets:write"])
    assert text.endswith("it can change governance (budgets:write)")


def test_role_of_names_exact_sets_only() -> None:
    assert role_of(list(reversed(AGENT_PERMISSIONS))) == "agent"
    assert role_of(TENANT_ADMIN_PERMISSIONS) == "tenant-admin"
    assert role_of([*AGENT_PERMISSIONS, "budgets:read"]) == "custom"
    assert role_of([]) == "custom"


@pytest.mark.parametrize(
    ("role", "extra", "expected"),
    [
        (None, None, list(AGENT_PERMISSIONS)),
        ("agent", None, list(AGENT_PERMISSIONS)),
        (" Tenant-Admin ", None, list(TENANT_ADMIN_PERMISSIONS)),
        (None, ["balances:read"], ["balances:read"]),
        (
            None,
            ["balances:read, reservations:list", "balances:read"],
            ["balances:read", "reservations:list"],
        ),
        ("agent", ["budgets:read"], [*AGENT_PERMISSIONS, "budgets:read"]),
        ("tenant-admin", ["budgets:write"], list(TENANT_ADMIN_PERMISSIONS)),
    ],
)
def test_key_permissions(role: str | None, extra: list[str] | None, expected: list[str]) -> None:
    assert key_permissions(role, extra) == expected


def test_key_permissions_refuses_unknown_names() -> None:
    with pytest.raises(
        CliError, match="unknown --role 'root'; use one of agent, tenant-admin"
    ) as e:
        key_permissions("root", None)
    assert e.value.exit_code == 2
    with pytest.raises(CliError, match="unknown permission 'budgets:refill'") as e:
        key_permissions("agent", ["budgets:refill"])
    assert e.value.exit_code == 2
    assert set(ROLES) == {"agent", "tenant-admin"}


def test_the_dev_servers_key_is_an_agent_key(store: Store, api: Api) -> None:
    secret = api.client.run(bootstrap_dev(store))
    headers = {"X-Cycles-API-Key": secret}
    introspect = api.client.get("/v1/auth/introspect", headers=headers).json()
    assert introspect["permissions"] == list(AGENT_PERMISSIONS)
    funded = api.client.post(
        "/v1/admin/budgets/fund",
        params={"scope": "tenant:demo", "unit": U},
        headers=headers,
        json={"operation": "CREDIT", "amount": {"unit": U, "amount": 10**12}},
    )
    assert funded.status_code == 403, funded.text
    assert "budgets:write" in funded.json()["message"]
    balance = api.balance(secret, "tenant:demo")
    assert balance["allocated"]["amount"] == 100 * 10**8
