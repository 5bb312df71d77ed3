"""Admin plane behaviour through the ASGI app (every test runs against each store)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"


def error_code(response: Any) -> str:
    body = response.json()
    assert {"error", "message", "request_id", "trace_id"} <= set(body), body
    return str(body["error"])


def test_admin_key_is_required(api: Api) -> None:
    response = api.client.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "A"})
    assert (response.status_code, error_code(response)) == (401, "UNAUTHORIZED")
    response = api.client.get("/v1/admin/tenants", headers={"X-Admin-API-Key": "wrong"})
    assert response.status_code == 401


def test_create_tenant_is_idempotent_and_conflicts_on_difference(api: Api) -> None:
    first = api.client.post(
        "/v1/admin/tenants",
        headers=api.admin_headers,
        json={
            "tenant_id": "acme",
            "name": "Acme",
            "metadata": {"a": "b"},
            "default_reservation_ttl_ms": 30_000,
        },
    )
    assert first.status_code == 201, first.text
    tenant = first.json()
    assert tenant["status"] == "ACTIVE"
    assert tenant["created_at"].endswith("Z")
    again = api.client.post(
        "/v1/admin/tenants", headers=api.admin_headers, json={"tenant_id": "acme", "name": "Acme"}
    )
    assert again.status_code == 200
    assert again.json()["tenant_id"] == "acme"
    clash = api.client.post(
        "/v1/admin/tenants", headers=api.admin_headers, json={"tenant_id": "acme", "name": "Other"}
    )
    assert (clash.status_code, error_code(clash)) == (409, "DUPLICATE_RESOURCE")
    for bad in (
        {"tenant_id": "A!", "name": "x"},
        {"tenant_id": "ab", "name": "x"},
        {"tenant_id": "abc"},
        {"tenant_id": "abc", "name": "x", "bogus": 1},
    ):
        response = api.client.post("/v1/admin/tenants", headers=api.admin_headers, json=bad)
        assert (response.status_code, error_code(response)) == (400, "INVALID_REQUEST")


def test_list_get_and_update_tenants(api: Api) -> None:
    for tenant_id in ("t-one", "t-two", "t-three"):
        api.admin("POST", "/v1/admin/tenants", 201, json={"tenant_id": tenant_id, "name": "x"})
    page = api.admin("GET", "/v1/admin/tenants", 200, params={"limit": 2})
    assert [t["tenant_id"] for t in page["tenants"]] == ["t-one", "t-three"]
    assert page["has_more"] is True
    rest = api.admin("GET", "/v1/admin/tenants", 200, params={"cursor": page["next_cursor"]})
    assert [t["tenant_id"] for t in rest["tenants"]] == ["t-two"]
    assert rest["has_more"] is False
    assert api.admin("GET", "/v1/admin/tenants/t-two", 200)["name"] == "x"
    response = api.client.get("/v1/admin/tenants/nope", headers=api.admin_headers)
    assert (response.status_code, error_code(response)) == (404, "NOT_FOUND")
    updated = api.admin(
        "PATCH",
        "/v1/admin/tenants/t-two",
        200,
        json={"name": "Two", "max_reservation_extensions": 3},
    )
    assert (updated["name"], updated["max_reservation_extensions"]) == ("Two", 3)
    suspended = api.admin("GET", "/v1/admin/tenants", 200, params={"status": "ACTIVE"})
    assert len(suspended["tenants"]) == 3


def test_tenant_defaults_apply_to_reservations(api: Api, clock: FakeClock) -> None:
    key = api.tenant(
        "acme",
        default_reservation_ttl_ms=5_000,
        max_reservation_ttl_ms=20_000,
        default_commit_overage_policy="REJECT",
    )
    api.budget("acme", "tenant:acme", 1000)
    base = {
        "subject": {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
        "estimate": {"unit": U, "amount": 10},
    }
    res = api.post(key, "/v1/reservations", {"idempotency_key": "a", **base}).json()
    assert res["expires_at_ms"] == clock() + 5_000
    res2 = api.post(
        key, "/v1/reservations", {"idempotency_key": "b", "ttl_ms": 60_000, **base}
    ).json()
    assert res2["expires_at_ms"] == clock() + 20_000
    over = api.post(
        key,
        f"/v1/reservations/{res['reservation_id']}/commit",
        {"idempotency_key": "c", "actual": {"unit": U, "amount": 11}},
    )
    assert (over.status_code, error_code(over)) == (409, "BUDGET_EXCEEDED")


def test_api_keys_are_shown_once_stored_hashed_and_revocable(api: Api) -> None:
    api.admin("POST", "/v1/admin/tenants", 201, json={"tenant_id": "acme", "name": "A"})
    created = api.admin(
        "POST",
        "/v1/admin/api-keys",
        201,
        json={
            "tenant_id": "acme",
            "name": "agent",
            "permissions": ["reservations:create", "balances:read"],
        },
    )
    secret = created["key_secret"]
    assert secret.startswith("cyc_live_")
    assert len(secret) == len("cyc_live_") + 32
    assert created["key_prefix"] == secret[:14]
    listed = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": "acme"})
    assert [k["key_id"] for k in listed["keys"]] == [created["key_id"]]
    assert secret not in str(listed)
    who = api.client.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": secret}).json()
    assert who["permissions"] == ["reservations:create", "balances:read"]
    revoked = api.admin(
        "DELETE", f"/v1/admin/api-keys/{created['key_id']}", 200, params={"reason": "rotated"}
    )
    assert revoked["status"] == "REVOKED"
    assert revoked["revoked_reason"] == "rotated"
    response = api.client.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": secret})
    assert response.status_code == 401
    assert "REVOKED" in response.json()["message"]
    again = api.client.request(
        "DELETE", f"/v1/admin/api-keys/{created['key_id']}", headers=api.admin_headers
    )
    assert (again.status_code, error_code(again)) == (409, "KEY_REVOKED")
    missing = api.client.request("DELETE", "/v1/admin/api-keys/key_nope", headers=api.admin_headers)
    assert missing.status_code == 404


def test_api_key_errors(api: Api, clock: FakeClock) -> None:
    response = api.client.post(
        "/v1/admin/api-keys", headers=api.admin_headers, json={"tenant_id": "ghost", "name": "k"}
    )
    assert (response.status_code, error_code(response)) == (400, "TENANT_NOT_FOUND")
    api.admin("POST", "/v1/admin/tenants", 201, json={"tenant_id": "acme", "name": "A"})
    response = api.client.post(
        "/v1/admin/api-keys",
        headers=api.admin_headers,
        json={"tenant_id": "acme", "name": "k", "permissions": ["root"]},
    )
    assert response.status_code == 400
    short = api.admin(
        "POST",
        "/v1/admin/api-keys",
        201,
        json={"tenant_id": "acme", "name": "k", "expires_at": "2027-01-15T08:00:10Z"},
    )
    assert short["expires_at"] == "2027-01-15T08:00:10.000Z"
    clock.advance(11_000)
    response = api.client.get(
        "/v1/auth/introspect", headers={"X-Cycles-API-Key": short["key_secret"]}
    )
    assert response.status_code == 401
    assert "expired" in response.json()["message"]
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    response = api.client.post(
        "/v1/admin/api-keys", headers=api.admin_headers, json={"tenant_id": "acme", "name": "k"}
    )
    assert (response.status_code, error_code(response)) == (409, "TENANT_CLOSED")


def test_budget_creation_rules(api: Api) -> None:
    key = api.tenant("acme")
    created = api.budget(
        "acme", "tenant:acme/workspace:prod", 500, overdraft_limit={"unit": U, "amount": 50}
    )
    assert created["remaining"]["amount"] == 500
    assert created["reserved"]["amount"] == 0
    assert created["overdraft_limit"]["amount"] == 50
    assert created["tenant_id"] == "acme"

    def create(body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return api.client.post("/v1/admin/budgets", headers=headers or api.admin_headers, json=body)

    base = {"scope": "tenant:acme", "unit": U, "allocated": {"unit": U, "amount": 1}}
    assert (
        create({**base, "tenant_id": "acme", "scope": "tenant:acme/workspace:prod"}).status_code
        == 409
    )
    assert error_code(create(base)) == "INVALID_REQUEST"  # admin without tenant_id
    assert (
        error_code(create({**base, "tenant_id": "acme", "scope": "tenant:other"}))
        == "INVALID_REQUEST"
    )
    assert (
        error_code(
            create({**base, "tenant_id": "acme", "allocated": {"unit": "TOKENS", "amount": 1}})
        )
        == "UNIT_MISMATCH"
    )
    assert (
        error_code(create({**base, "tenant_id": "ghost", "scope": "tenant:ghost"}))
        == "TENANT_NOT_FOUND"
    )
    own = create(base, {"X-Cycles-API-Key": key})  # a tenant key creates its own budgets
    assert own.status_code == 201, own.text
    assert create({**base, "tenant_id": "acme"}, {"X-Cycles-API-Key": key}).status_code == 400


def test_list_lookup_update_freeze(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    api.budget("acme", "tenant:acme/agent:a", 10)
    api.budget("acme", "tenant:acme/agent:a", 10, unit="TOKENS")
    other = api.tenant("globex")
    api.budget("globex", "tenant:globex", 5)
    listed = api.admin("GET", "/v1/admin/budgets", 200, params={"tenant_id": "acme"})
    assert len(listed["ledgers"]) == 3
    everyone = api.admin("GET", "/v1/admin/budgets", 200)
    assert len(everyone["ledgers"]) == 4
    prefixed = api.admin(
        "GET",
        "/v1/admin/budgets",
        200,
        params={"scope_prefix": "tenant:acme/agent:a", "unit": "TOKENS"},
    )
    assert [(b["scope"], b["unit"]) for b in prefixed["ledgers"]] == [
        ("tenant:acme/agent:a", "TOKENS")
    ]
    mine = api.client.get("/v1/admin/budgets", headers={"X-Cycles-API-Key": other}).json()
    assert [b["scope"] for b in mine["ledgers"]] == ["tenant:globex"]
    found = api.client.get(
        "/v1/admin/budgets/lookup",
        headers={"X-Cycles-API-Key": key},
        params={"scope": "tenant:acme", "unit": U},
    )
    assert found.status_code == 200
    hidden = api.client.get(
        "/v1/admin/budgets/lookup",
        headers={"X-Cycles-API-Key": other},
        params={"scope": "tenant:acme", "unit": U},
    )
    assert hidden.status_code == 404
    patched = api.admin(
        "PATCH",
        "/v1/admin/budgets",
        200,
        params={"scope": "tenant:acme", "unit": U},
        json={
            "overdraft_limit": {"unit": U, "amount": 100},
            "commit_overage_policy": "ALLOW_WITH_OVERDRAFT",
        },
    )
    assert patched["overdraft_limit"]["amount"] == 100
    assert patched["commit_overage_policy"] == "ALLOW_WITH_OVERDRAFT"
    frozen = api.admin(
        "POST", "/v1/admin/budgets/freeze", 200, params={"scope": "tenant:acme", "unit": U}
    )
    assert frozen["status"] == "FROZEN"
    again = api.client.post(
        "/v1/admin/budgets/freeze",
        headers=api.admin_headers,
        params={"scope": "tenant:acme", "unit": U},
    )
    assert again.status_code == 409
    funded = api.client.post(
        "/v1/admin/budgets/fund",
        headers=api.admin_headers,
        params={"scope": "tenant:acme", "unit": U, "tenant_id": "acme"},
        json={"operation": "CREDIT", "amount": {"unit": U, "amount": 1}},
    )
    assert (funded.status_code, error_code(funded)) == (409, "BUDGET_FROZEN")
    api.admin(
        "POST",
        "/v1/admin/budgets/unfreeze",
        200,
        params={"scope": "tenant:acme", "unit": U},
        json={"reason": "ok"},
    )
    missing = api.client.request(
        "PATCH",
        "/v1/admin/budgets",
        headers=api.admin_headers,
        params={"scope": "tenant:acme/agent:zz", "unit": U},
        json={},
    )
    assert missing.status_code == 404


def test_fund_operations_and_idempotency(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    result = api.fund("acme", "tenant:acme", "CREDIT", 500, idempotency_key="f1")
    assert (result["previous_allocated"]["amount"], result["new_allocated"]["amount"]) == (
        1000,
        1500,
    )
    assert result["timestamp"].endswith("Z")
    replay = api.fund("acme", "tenant:acme", "CREDIT", 500, idempotency_key="f1")
    assert replay == result
    assert api.balance(key, "tenant:acme")["allocated"]["amount"] == 1500
    mismatch = api.fund("acme", "tenant:acme", "CREDIT", 501, idempotency_key="f1", expect=409)
    assert mismatch["error"] == "IDEMPOTENCY_MISMATCH"
    assert api.fund("acme", "tenant:acme", "DEBIT", 2000, expect=409)["error"] == "BUDGET_EXCEEDED"
    reset = api.fund("acme", "tenant:acme", "RESET_SPENT", 800, spent={"unit": U, "amount": 300})
    assert (reset["new_spent"]["amount"], reset["new_remaining"]["amount"]) == (300, 500)
    # a tenant key funds its own budget; tenant_id is taken from the key
    own = api.client.post(
        "/v1/admin/budgets/fund",
        headers={"X-Cycles-API-Key": key},
        params={"scope": "tenant:acme", "unit": U},
        json={"operation": "REPAY_DEBT", "amount": {"unit": U, "amount": 5}},
    )
    assert own.status_code == 200
    assert own.json()["new_allocated"]["amount"] == 805
    no_tenant = api.client.post(
        "/v1/admin/budgets/fund",
        headers=api.admin_headers,
        params={"scope": "tenant:acme", "unit": U},
        json={"operation": "CREDIT", "amount": {"unit": U, "amount": 1}},
    )
    assert no_tenant.status_code == 400
    wrong_tenant = api.fund("globex", "tenant:acme", "CREDIT", 1, expect=403)
    assert wrong_tenant["error"] == "FORBIDDEN"
    bad_op = api.fund("acme", "tenant:acme", "STEAL", 1, expect=400)
    assert "operation" in bad_op["message"]


def test_overdraft_flow_end_to_end(api: Api) -> None:
    key = api.tenant("acme")
    api.budget(
        "acme",
        "tenant:acme",
        100,
        overdraft_limit={"unit": U, "amount": 1000},
        commit_overage_policy="ALLOW_WITH_OVERDRAFT",
    )
    body = {
        "idempotency_key": "r",
        "subject": {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
        "estimate": {"unit": U, "amount": 100},
    }
    rid = api.post(key, "/v1/reservations", body).json()["reservation_id"]
    done = api.post(
        key,
        f"/v1/reservations/{rid}/commit",
        {"idempotency_key": "c", "actual": {"unit": U, "amount": 400}},
    )
    assert done.json()["charged"]["amount"] == 400
    bal = api.balance(key, "tenant:acme")
    assert (bal["spent"]["amount"], bal["debt"]["amount"], bal["remaining"]["amount"]) == (
        100,
        300,
        -300,
    )
    blocked = api.post(
        key,
        "/v1/reservations",
        {**body, "idempotency_key": "r2", "estimate": {"unit": U, "amount": 1}},
    )
    assert blocked.status_code == 409  # remaining is negative
    api.fund("acme", "tenant:acme", "REPAY_DEBT", 500)
    bal = api.balance(key, "tenant:acme")
    assert (bal["debt"]["amount"], bal["remaining"]["amount"], bal["allocated"]["amount"]) == (
        0,
        200,
        300,
    )
