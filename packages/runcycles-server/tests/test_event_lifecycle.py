"""Admin lifecycle events on every store: one event per change, written with it, with the
spec's payload, the actor and the request context."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"
PAYLOAD = {
    "tenant": "EventDataTenantLifecycle",
    "policy": "EventDataPolicy",
    "budget": "EventDataBudgetLifecycle",
    "api_key": "EventDataApiKey",
}


def events(api: Api, tenant: str = "acme", **params: Any) -> list[dict[str, Any]]:
    body = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": tenant, **params})
    schema_validator("EventListResponse", EXTENDED_ADMIN).validate(body)
    found = list(reversed(body["events"]))
    for event in found:
        kind = event["event_type"]
        name = "EventDataTenantCascade" if "cascade" in kind else PAYLOAD.get(event["category"])
        if name is not None and kind not in ("budget.threshold_crossed",):
            schema_validator(name, EXTENDED_ADMIN).validate(event["data"])
    return found


def types(api: Api, tenant: str = "acme", **params: Any) -> list[str]:
    return [e["event_type"] for e in events(api, tenant, **params)]


def test_tenant_lifecycle(api: Api) -> None:
    api.admin("POST", "/v1/admin/tenants", 201, json={"tenant_id": "acme", "name": "Acme"})
    api.admin("POST", "/v1/admin/tenants", 200, json={"tenant_id": "acme", "name": "Acme"})
    (created,) = events(api)
    assert created["event_type"] == "tenant.created"
    assert created["actor"] == {"type": "admin", "source_ip": created["actor"]["source_ip"]}
    assert created["data"] == {"tenant_id": "acme", "new_status": "ACTIVE", "changed_fields": []}
    assert created["request_id"]
    assert created["trace_id"]

    def patch(body: dict[str, Any]) -> None:
        api.admin("PATCH", "/v1/admin/tenants/acme", 200, json=body)

    patch({"status": "SUSPENDED"})
    patch({"status": "SUSPENDED"})  # no change: no event
    patch({"status": "ACTIVE"})
    patch({"name": "Acme Corp", "default_commit_overage_policy": "REJECT"})
    patch({"name": "Acme Corp"})  # no change
    found = events(api)[1:]
    assert [e["event_type"] for e in found] == [
        "tenant.suspended", "tenant.reactivated", "tenant.settings_changed", "tenant.updated",
    ]  # fmt: skip
    assert (found[0]["data"]["previous_status"], found[0]["data"]["new_status"]) == (
        "ACTIVE", "SUSPENDED",
    )  # fmt: skip
    assert found[2]["data"]["changed_fields"] == ["default_commit_overage_policy"]
    assert found[3]["data"]["changed_fields"] == ["name"]
    assert all(e["scope"] == "tenant:acme" for e in found)


def test_closing_a_tenant_cascades_with_one_event_per_object(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    api.budget("acme", "tenant:acme/workspace:w", 500)
    api.budget("acme", "tenant:acme/workspace:idle", 500)
    for idem, amount in (("a", 100), ("b", 50)):
        body = {"idempotency_key": idem, "subject": {"tenant": "acme", "workspace": "w"},
                "action": {"kind": "llm.completion", "name": "m"},
                "estimate": {"unit": U, "amount": amount}}  # fmt: skip
        assert api.post(key, "/v1/reservations", body).status_code == 200
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    found = events(api)
    kinds = [e["event_type"] for e in found]
    assert kinds.count("tenant.closed") == 1
    released = {e["scope"]: e["data"] for e in found
                if e["event_type"] == "reservation.released_via_tenant_cascade"}  # fmt: skip
    assert set(released) == {"tenant:acme", "tenant:acme/workspace:w"}  # reserved > 0 only
    assert released["tenant:acme/workspace:w"]["released_amount"] == 150
    assert released["tenant:acme"]["cascade_reason"] == "tenant_closed"
    closed = [e for e in found if e["event_type"] == "budget.closed_via_tenant_cascade"]
    assert sorted(e["scope"] for e in closed) == [
        "tenant:acme", "tenant:acme/workspace:idle", "tenant:acme/workspace:w",
    ]  # fmt: skip
    assert all(e["data"]["new_status"] == "CLOSED" for e in closed)
    (revoked,) = [e for e in found if e["event_type"] == "api_key.revoked_via_tenant_cascade"]
    assert revoked["data"]["prior_status"] == "ACTIVE"
    assert revoked["data"]["new_status"] == "REVOKED"
    assert revoked["actor"]["type"] == "admin"
    # the children carry the spec's cascade id (Rule 1); the parent its request's id
    (parent,) = [e for e in found if e["event_type"] == "tenant.closed"]
    children = [e for e in found if e["event_type"].endswith("_via_tenant_cascade")]
    assert len(children) == 6
    cascade = f"tenant_close_cascade:acme:{parent['request_id']}"
    assert {e["correlation_id"] for e in children} == {cascade}
    assert parent["correlation_id"] != cascade
    # closing again finishes nothing new
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    assert len(events(api)) == len(found)


def test_api_key_created_and_revoked(api: Api) -> None:
    api.tenant("acme")
    made = api.admin(
        "POST", "/v1/admin/api-keys", 201,
        json={"tenant_id": "acme", "name": "ci", "permissions": ["events:read"]},
    )  # fmt: skip
    api.admin("DELETE", f"/v1/admin/api-keys/{made['key_id']}", 200, params={"reason": "leak"})
    api.admin("DELETE", f"/v1/admin/api-keys/{made['key_id']}", 409)  # already: no event
    found = [e for e in events(api, category="api_key") if e["data"]["key_id"] == made["key_id"]]
    assert [e["event_type"] for e in found] == ["api_key.created", "api_key.revoked"]
    assert found[0]["data"]["permissions"] == ["events:read"]
    assert found[0]["data"]["key_name"] == "ci"
    assert "key_secret" not in str(found)
    assert made["key_secret"] not in str(found)
    assert (found[1]["data"]["previous_status"], found[1]["data"]["new_status"]) == (
        "ACTIVE", "REVOKED",
    )  # fmt: skip


def test_budget_lifecycle(api: Api) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    params = {"scope": "tenant:acme", "unit": U}
    api.admin("POST", "/v1/admin/budgets/freeze", 200, params=params)
    api.admin("POST", "/v1/admin/budgets/unfreeze", 200, params=params)
    body = {"overdraft_limit": {"unit": U, "amount": 50}}
    api.admin("PATCH", "/v1/admin/budgets", 200, params=params, json=body)
    api.admin("PATCH", "/v1/admin/budgets", 200, params=params, json=body)  # unchanged
    found = events(api, category="budget")
    assert [e["event_type"] for e in found] == [
        "budget.created", "budget.frozen", "budget.unfrozen", "budget.updated",
    ]  # fmt: skip
    created, frozen, _, updated = found
    assert created["data"]["operation"] == "CREATE"
    assert created["data"]["new_state"]["allocated"] == 1_000
    assert created["data"]["ledger_id"]
    assert frozen["data"]["operation"] == "STATUS_CHANGE"
    assert frozen["data"]["new_state"]["status"] == "FROZEN"
    assert updated["data"]["changed_fields"] == ["overdraft_limit"]


def test_policy_created_and_updated(api: Api) -> None:
    api.tenant("acme")
    policy = api.admin(
        "POST", "/v1/admin/policies", 201,
        json={"tenant_id": "acme", "name": "p", "scope_pattern": "tenant:acme/*",
              "priority": 1},
    )  # fmt: skip
    pid = policy["policy_id"]
    api.admin("PATCH", f"/v1/admin/policies/{pid}", 200, json={"priority": 5})
    api.admin("PATCH", f"/v1/admin/policies/{pid}", 200, json={"priority": 5})  # unchanged
    found = events(api, category="policy")
    assert [e["event_type"] for e in found] == ["policy.created", "policy.updated"]
    assert found[0]["data"]["policy_id"] == pid
    assert found[1]["data"]["changed_fields"] == ["priority"]


def test_api_keys_past_their_expiry_become_expired_once(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme")  # a key of the default lifetime (90 days)
    made = api.admin(
        "POST", "/v1/admin/api-keys", 201,
        json={"tenant_id": "acme", "name": "short",
              "expires_at": "2027-01-15T09:00:00Z"},
    )  # fmt: skip
    store = api.client._client._transport.app.state.store  # type: ignore[attr-defined]
    assert api.client.run(store.expire_api_keys()) == 0
    clock.advance(91 * 86_400_000)
    assert api.client.get("/v1/balances", headers={"X-Cycles-API-Key": key}).status_code == 401
    assert api.client.run(store.expire_api_keys()) == 2
    assert api.client.run(store.expire_api_keys()) == 0  # once
    expired = events(api, event_type="api_key.expired")
    assert sorted(e["data"]["key_name"] for e in expired) == ["short", "test"]
    for e in expired:
        assert (e["data"]["previous_status"], e["data"]["new_status"]) == ("ACTIVE", "EXPIRED")
        assert e["actor"] == {"type": "system"}
        assert e["source"] == "expiry-sweeper"
    keys = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": "acme"})["keys"]
    assert {k["key_id"]: k["status"] for k in keys}[made["key_id"]] == "EXPIRED"
