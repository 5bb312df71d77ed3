"""``GET /v1/admin/overview`` on every store: the spec's ``AdminOverviewResponse``, with numbers
that match the state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.monitor import Monitor

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"


def overview(api: Api) -> dict[str, Any]:
    body: dict[str, Any] = api.admin("GET", "/v1/admin/overview", 200)
    schema_validator("AdminOverviewResponse", EXTENDED_ADMIN).validate(body)
    return body


def reserve(api: Api, key: str, tenant: str, idem: str, amount: int, **extra: Any) -> Any:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
        **extra,
    }
    return api.post(key, "/v1/reservations", body)


def test_an_empty_server(api: Api) -> None:
    body = overview(api)
    assert body["event_window_seconds"] == 3600
    assert body["tenant_counts"] == {"total": 0, "active": 0, "suspended": 0, "closed": 0,
                                     "in_observe_mode": 0}  # fmt: skip
    assert body["budget_counts"]["total"] == 0
    assert body["webhook_counts"] == {"total": 0, "active": 0, "disabled": 0, "with_failures": 0}
    assert body["recent_denials"] == body["recent_expiries"] == body["failing_webhooks"] == []
    assert body["event_counts"] == {"total_recent": 0, "by_category": {}}


def test_overview_matches_the_state(api: Api, clock: FakeClock) -> None:
    acme = api.tenant("acme")
    api.tenant("beta")
    api.tenant("gamma")
    api.admin("PATCH", "/v1/admin/tenants/gamma", 200, json={"observe_mode": "OBSERVE"})
    api.admin("PATCH", "/v1/admin/tenants/beta", 200, json={"status": "SUSPENDED"})
    api.budget("acme", "tenant:acme", 1_000, overdraft_limit={"unit": U, "amount": 300})
    api.budget("acme", "tenant:acme/workspace:w", 500, unit="TOKENS")
    api.budget("gamma", "tenant:gamma", 10)
    for name, rules in (("a", {"denied_action_kinds": ["payment.charge"]}),
                        ("b", {"allowed_action_kinds": ["llm.completion"]}),
                        ("d", {"denied_action_kinds": ["payment.refund"]}),
                        ("c", {"priority": 3})):  # fmt: skip
        api.admin("POST", "/v1/admin/policies", 201,
                  json={"tenant_id": "gamma", "name": name, "scope_pattern": "tenant:gamma/*",
                        **rules})  # fmt: skip
    api.admin("POST", "/v1/admin/budgets/freeze", 200,
              params={"scope": "tenant:gamma", "unit": U})  # fmt: skip
    api.admin("PATCH", "/v1/admin/tenants/gamma", 200, json={"status": "CLOSED"})
    rid = reserve(api, acme, "acme", "a", 900, overage_policy="ALLOW_WITH_OVERDRAFT").json()[
        "reservation_id"
    ]
    commit = {"idempotency_key": "c", "actual": {"unit": U, "amount": 1_250}}
    assert api.post(acme, f"/v1/reservations/{rid}/commit", commit).status_code == 200
    params = {"scope": "tenant:acme", "unit": U}
    body = {"overdraft_limit": {"unit": U, "amount": 100}}  # debt 250 > 100: over limit
    api.admin("PATCH", "/v1/admin/budgets", 200, params=params, json=body)
    for i in range(3):
        assert reserve(api, acme, "acme", f"no{i}", 50).status_code == 409
    tokens = {"subject": {"tenant": "acme", "workspace": "w"},
              "estimate": {"unit": "TOKENS", "amount": 10}}  # fmt: skip
    rid = reserve(api, acme, "acme", "short", 0, ttl_ms=1_000, **tokens).json()["reservation_id"]
    clock.advance(7_000)
    store = api.client._client._transport.app.state.store  # type: ignore[attr-defined]
    assert api.client.run(store.expire_due()) == 1
    monitor = api.client._client._transport.app.state.monitor  # type: ignore[attr-defined]
    assert isinstance(monitor, Monitor)
    api.client.run(monitor.tick())

    found = overview(api)
    assert found["tenant_counts"] == {"total": 3, "active": 1, "suspended": 1, "closed": 1,
                                      "in_observe_mode": 1}  # fmt: skip
    assert found["budget_counts"] == {
        "total": 3, "active": 2, "frozen": 0, "closed": 1, "over_limit": 1, "with_debt": 1,
        "by_unit": {"TOKENS": 1, U: 2},
    }  # fmt: skip
    assert found["over_limit_scopes"] == [
        {"scope": "tenant:acme", "unit": U, "allocated": 1_000, "remaining": -250, "debt": 250}
    ]
    assert found["debt_scopes"] == [
        {"scope": "tenant:acme", "unit": U, "debt": 250, "overdraft_limit": 100}
    ]
    assert found["access_control_stats"] == {"policies_with_allow_list": 1,
                                             "policies_with_deny_list": 2}  # fmt: skip
    (denial,) = found["recent_denials"]
    assert denial["event_type"] == "reservation.denied"
    assert denial["data"]["count"] == 3
    assert found["recent_denials_by_reason"] == {denial["data"]["reason_code"]: 3}
    (expiry,) = found["recent_expiries"]
    assert expiry["data"]["reservation_id"] == rid
    listed = 0
    by_category: dict[str, int] = {}
    for tenant in ("acme", "beta", "gamma"):
        page = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": tenant,
                                                                  "limit": 100})  # fmt: skip
        listed += len(page["events"])
        for e in page["events"]:
            by_category[e["category"]] = by_category.get(e["category"], 0) + 1
    assert found["event_counts"] == {"total_recent": listed, "by_category": by_category}
    clock.advance(3_600_001)  # the window has passed: counts go, state stays
    later = overview(api)
    assert later["event_counts"]["total_recent"] == 0
    assert later["recent_denials"] == []
    assert later["budget_counts"] == found["budget_counts"]


def test_overview_needs_the_admin_key(api: Api) -> None:
    assert api.client.get("/v1/admin/overview").status_code == 401
    key = api.tenant("acme")
    headers = {"X-Cycles-API-Key": key}
    assert api.client.get("/v1/admin/overview", headers=headers).status_code == 401
