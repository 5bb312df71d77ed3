"""The governance routes over HTTP: policies, the action-kind registry, quota counters.

Every test runs against each store (SQLite, memory, Redis); bodies are validated against the
extended specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.governance import Registry
from runcycles_server.governance_api import UNLIMITED
from runcycles_server.roles import AGENT_PERMISSIONS

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Api, FakeClock

    from runcycles_server.stores.base import Store

U = "USD_MICROCENTS"
EMAIL = "message.email.send"


def valid(schema: str, response: Any, status: int) -> Any:
    """Assert the status, validate the body against the extended admin spec, return it."""
    assert response.status_code == status, response.text
    body = response.json()
    schema_validator(schema, EXTENDED_ADMIN).validate(body)
    return body


def refused(response: Any, status: int, code: str, *words: str) -> str:
    """Assert an ErrorResponse with this status and code whose message has ``words``."""
    assert response.status_code == status, response.text
    body = response.json()
    schema_validator("ErrorResponse", EXTENDED_ADMIN).validate(body)
    assert body["error"] == code, body
    for word in words:
        assert word in body["message"], body["message"]
    return str(body["message"])


def key_with(api: Api, tenant_id: str, permissions: list[str]) -> str:
    body = api.admin(
        "POST",
        "/v1/admin/api-keys",
        201,
        json={"tenant_id": tenant_id, "name": "k", "permissions": permissions},
    )
    return str(body["key_secret"])


def create_policy(api: Api, tenant_id: str = "acme", expect: int = 201, **fields: Any) -> Any:
    body = {"tenant_id": tenant_id, "name": "p", "scope_pattern": f"tenant:{tenant_id}", **fields}
    response = api.client.post("/v1/admin/policies", json=body, headers=api.admin_headers)
    if expect == 201:
        return valid("Policy", response, 201)
    assert response.status_code == expect, response.text
    return response


def reserve(api: Api, key: str, kind: str, run_id: str = "r1", n: int = 0) -> Any:
    return api.post(
        key,
        "/v1/reservations",
        {
            "idempotency_key": f"{kind}-{run_id}-{n}",
            "subject": {"tenant": "acme", "agent": "bot", "dimensions": {"run_id": run_id}},
            "action": {"kind": kind, "name": "act"},
            "estimate": {"unit": U, "amount": 10},
        },
    )


# --------------------------------------------------------------------------------------------
# Policies


def test_admin_creates_gets_and_lists_a_policy(api: Api, acme: str) -> None:
    created = create_policy(
        api,
        name="support-agent",
        scope_pattern="tenant:acme/agent:*",
        priority=10,
        denied_action_kinds=["payment.charge"],
        action_quotas=[{"action_kind": EMAIL, "max_calls": 20, "window": "per_run"}],
    )
    assert created["policy_id"].startswith("pol_")
    assert created["denied_action_kinds"] == ["payment.charge"]
    assert created["status"] == "ACTIVE"
    got = api.client.get(f"/v1/admin/policies/{created['policy_id']}", headers=api.admin_headers)
    assert valid("Policy", got, 200) == created
    listed = api.client.get(
        "/v1/admin/policies", params={"tenant_id": "acme"}, headers=api.admin_headers
    )
    assert valid("PolicyListResponse", listed, 200) == {"policies": [created], "has_more": False}


def test_create_refuses_bad_input_naming_the_field(api: Api, acme: str) -> None:
    h = api.admin_headers
    create_policy(api, name="taken")
    refused(create_policy(api, name="taken", expect=409), 409, "DUPLICATE_RESOURCE", "taken")
    no_tenant = api.client.post("/v1/admin/policies", json={"name": "x"}, headers=h)
    refused(no_tenant, 400, "INVALID_REQUEST", "tenant_id is required")
    number = api.client.post("/v1/admin/policies", json={"tenant_id": 7, "name": "x"}, headers=h)
    refused(number, 400, "INVALID_REQUEST", "tenant_id must be a string")
    ghost = create_policy(api, "ghost", expect=400)
    refused(ghost, 400, "TENANT_NOT_FOUND", "ghost")
    for fields, words in (
        ({"priority": "high"}, ("priority",)),
        ({"bogus": 1}, ("bogus", "not a field")),
        ({"scope_pattern": "tenant:other"}, ("scope_pattern",)),
        (
            {"allowed_action_kinds": ["llm.completion"], "denied_action_kinds": [EMAIL]},
            ("mutually exclusive",),
        ),
        ({"denied_action_kinds": ["custom.acme.undeclared"]}, ("not registered",)),
        (
            {"action_quotas": [{"action_kind": EMAIL, "max_calls": 0, "window": "per_run"}]},
            ("action_quotas[0].max_calls",),
        ),
    ):
        refused(create_policy(api, expect=400, **fields), 400, "INVALID_REQUEST", *words)
    for raw in (b"{not json", b"[1, 2]"):
        response = api.client.post(
            "/v1/admin/policies", content=raw, headers={**h, "Content-Type": "application/json"}
        )
        refused(response, 400, "INVALID_REQUEST", "JSON")
    control = api.client.post(
        "/v1/admin/policies",
        json={"tenant_id": "acme", "name": "bad\x07name", "scope_pattern": "tenant:acme"},
        headers=h,
    )
    refused(control, 400, "INVALID_REQUEST", "control character")


def test_tenant_keys_manage_their_own_policies_and_agents_cannot(api: Api, acme: str) -> None:
    operator = {"X-Cycles-API-Key": acme}  # api.tenant() keys get the spec default permissions
    created = api.client.post(
        "/v1/admin/policies", json={"name": "own", "scope_pattern": "tenant:acme"}, headers=operator
    )
    policy = valid("Policy", created, 201)
    with_tenant = api.client.post(
        "/v1/admin/policies",
        json={"tenant_id": "acme", "name": "x", "scope_pattern": "tenant:acme"},
        headers=operator,
    )
    refused(with_tenant, 400, "INVALID_REQUEST", "must not be sent")
    agent = {"X-Cycles-API-Key": key_with(api, "acme", list(AGENT_PERMISSIONS))}
    for method, path, body in (
        ("POST", "/v1/admin/policies", {"name": "a", "scope_pattern": "tenant:acme"}),
        ("PATCH", f"/v1/admin/policies/{policy['policy_id']}", {"priority": 1}),
    ):
        response = api.client.request(method, path, json=body, headers=agent)
        refused(response, 403, "FORBIDDEN", "policies:write")
    refused(api.client.get("/v1/admin/policies", headers=agent), 403, "FORBIDDEN", "policies:read")
    reader = {"X-Cycles-API-Key": key_with(api, "acme", ["policies:read"])}
    listed = valid("PolicyListResponse", api.client.get("/v1/admin/policies", headers=reader), 200)
    assert [p["policy_id"] for p in listed["policies"]] == [policy["policy_id"]]
    refused(api.client.get("/v1/admin/policies"), 401, "UNAUTHORIZED")


def test_another_tenants_policy_looks_absent(api: Api, acme: str) -> None:
    other = api.tenant("globex")
    foreign = create_policy(api, "globex", name="theirs")
    path = f"/v1/admin/policies/{foreign['policy_id']}"
    h = {"X-Cycles-API-Key": acme}
    refused(api.client.get(path, headers=h), 404, "NOT_FOUND")
    refused(api.client.request("PATCH", path, json={"priority": 99}, headers=h), 404, "NOT_FOUND")
    # the tenant_id query parameter cannot widen a tenant key's view
    listed = api.client.get("/v1/admin/policies", params={"tenant_id": "globex"}, headers=h)
    assert valid("PolicyListResponse", listed, 200)["policies"] == []
    mine = api.client.get("/v1/admin/policies", headers={"X-Cycles-API-Key": other})
    assert [p["name"] for p in mine.json()["policies"]] == ["theirs"]
    unchanged = api.client.get(path, headers=api.admin_headers).json()
    assert unchanged["priority"] == 0
    refused(
        api.client.get("/v1/admin/policies/pol_nope", headers=api.admin_headers), 404, "NOT_FOUND"
    )


def test_list_filters_pagination_and_query_validation(api: Api, acme: str) -> None:
    h = api.admin_headers
    low = create_policy(api, name="low", priority=1, denied_action_kinds=["payment.charge"])
    high = create_policy(
        api,
        name="high",
        priority=50,
        scope_pattern="tenant:acme/agent:bot",
        action_quotas=[{"action_kind": EMAIL, "max_calls": 5, "window": "per_day_tumbling"}],
    )
    mid = create_policy(api, name="mid", priority=20)
    api.admin("PATCH", f"/v1/admin/policies/{mid['policy_id']}", 200, json={"status": "DISABLED"})

    def names(**params: Any) -> list[str]:
        response = api.client.get(
            "/v1/admin/policies", params={"tenant_id": "acme", **params}, headers=h
        )
        return [p["name"] for p in valid("PolicyListResponse", response, 200)["policies"]]

    assert names() == ["high", "mid", "low"]
    assert names(status="DISABLED") == ["mid"]
    assert names(has_action_quotas="true") == ["high"]
    assert names(has_action_quotas="false") == ["mid", "low"]
    assert names(references_action_kind="payment.charge") == ["low"]
    assert names(references_action_kind=EMAIL) == ["high"]
    assert names(scope_pattern="tenant:acme/agent:bot") == ["high"]
    first = api.admin("GET", "/v1/admin/policies", 200, params={"tenant_id": "acme", "limit": 2})
    assert ([p["name"] for p in first["policies"]], first["has_more"]) == (["high", "mid"], True)
    rest = api.admin(
        "GET",
        "/v1/admin/policies",
        200,
        params={"tenant_id": "acme", "limit": 2, "cursor": first["next_cursor"]},
    )
    assert [p["policy_id"] for p in rest["policies"]] == [low["policy_id"]]
    assert rest["has_more"] is False
    assert "next_cursor" not in rest
    assert high["priority"] == 50
    refused(api.client.get("/v1/admin/policies", headers=h), 400, "INVALID_REQUEST", "tenant_id")
    for params, word in (
        ({"status": "PAUSED"}, "status"),
        ({"has_action_quotas": "maybe"}, "has_action_quotas"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"references_action_kind": "x" * 65}, "references_action_kind"),
    ):
        response = api.client.get(
            "/v1/admin/policies", params={"tenant_id": "acme", **params}, headers=h
        )
        refused(response, 400, "INVALID_REQUEST", word)


def test_patch_changes_only_what_it_names_and_audits_the_change(
    api: Api, acme: str, clock: FakeClock
) -> None:
    policy = create_policy(api, name="rollout", denied_action_kinds=["payment.charge"])
    clock.advance(1)  # the audit log lists newest first; same-millisecond entries are unordered
    path = f"/v1/admin/policies/{policy['policy_id']}"
    operator = {"X-Cycles-API-Key": acme}
    response = api.client.request(
        "PATCH",
        path,
        json={"denied_action_kinds": [], "allowed_action_kinds": ["llm.completion"], "priority": 3},
        headers=operator,
    )
    patched = valid("Policy", response, 200)
    assert patched["denied_action_kinds"] == []
    assert patched["priority"] == 3
    assert patched["allowed_action_kinds"] == ["llm.completion"]
    assert patched["name"] == "rollout"
    assert "updated_at" in patched
    same = api.client.request("PATCH", path, json={"priority": 3}, headers=api.admin_headers)
    assert valid("Policy", same, 200)["priority"] == 3
    for body, words in (
        ({"scope_pattern": "tenant:acme/agent:x"}, ("scope_pattern", "cannot change")),
        ({"name": None}, ("name", "null")),
        ({"denied_action_kinds": ["payment.charge"]}, ("mutually exclusive",)),
        ({"priority": -1}, ("priority",)),
    ):
        refused(
            api.client.request("PATCH", path, json=body, headers=operator),
            400,
            "INVALID_REQUEST",
            *words,
        )
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})["logs"]
    entries = [log for log in logs if log["resource_type"] == "policy"]
    assert [log["operation"] for log in entries] == ["policy.updated", "policy.created"]
    updated = entries[0]
    assert updated["resource_id"] == policy["policy_id"]
    assert updated["metadata"]["changed_fields"] == [
        "priority",
        "allowed_action_kinds",
        "denied_action_kinds",
    ]
    assert updated["metadata"]["actor_type"] == "api_key"
    assert entries[1]["metadata"]["actor_type"] == "admin_on_behalf_of"
    assert entries[1]["metadata"]["name"] == "rollout"


def test_a_closed_tenants_policies_are_read_only(api: Api, acme: str) -> None:
    policy = create_policy(api, name="frozen")
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    response = api.client.request(
        "PATCH",
        f"/v1/admin/policies/{policy['policy_id']}",
        json={"priority": 5},
        headers=api.admin_headers,
    )
    refused(response, 409, "TENANT_CLOSED")
    refused(create_policy(api, name="new", expect=409), 409, "TENANT_CLOSED")


# --------------------------------------------------------------------------------------------
# The registry


def test_registry_lists_pages_filters_and_gets_kinds(api: Api, store: Store) -> None:
    store.registry = Registry.from_declarations(
        [{"kind": "custom.acme.erp.post", "risk_class": "external_side_effect"}]
    )
    first = valid("ActionKindRegistry", api.client.get("/v1/action-kinds"), 200)
    assert first["kinds"][0]["kind"] == "llm.completion"
    seen = [k["kind"] for k in first["kinds"]]
    cursor = first.get("next_cursor")
    while cursor:
        page = api.client.get("/v1/action-kinds", params={"cursor": cursor, "limit": 10}).json()
        seen += [k["kind"] for k in page["kinds"]]
        cursor = page.get("next_cursor")
    assert seen[-1] == "unknown.call"
    assert len(seen) == len(set(seen))
    assert "custom.acme.erp.post" not in seen  # custom kinds stay out of the public list
    with_custom = api.client.get(
        "/v1/action-kinds", params={"limit": 100}, headers=api.admin_headers
    )
    assert "custom.acme.erp.post" in [k["kind"] for k in with_custom.json()["kinds"]]
    assert with_custom.headers["cache-control"].startswith("private")  # never in shared caches
    public = api.client.get("/v1/action-kinds", params={"limit": 100})
    assert with_custom.headers["etag"] != public.headers["etag"]
    high = api.client.get("/v1/action-kinds", params={"risk_class": "high_risk", "limit": 100})
    kinds = valid("ActionKindRegistry", high, 200)["kinds"]
    assert kinds
    assert {k["risk_class"] for k in kinds} == {"high_risk"}
    email = valid("ActionKind", api.client.get(f"/v1/action-kinds/{EMAIL}"), 200)
    assert email["kind"] == EMAIL
    assert email["policy_key_spec"]["recipient_domain"] is True
    refused(api.client.get("/v1/action-kinds/message.email"), 404, "NOT_FOUND", "exact match")
    refused(api.client.get("/v1/action-kinds/custom.acme.erp.post"), 404, "NOT_FOUND")
    custom = api.client.get("/v1/action-kinds/custom.acme.erp.post", headers=api.admin_headers)
    assert valid("ActionKind", custom, 200)["risk_class"] == "external_side_effect"
    wrong_admin = api.client.get("/v1/action-kinds", headers={"X-Admin-API-Key": "nope"})
    refused(wrong_admin, 401, "UNAUTHORIZED")
    for params, word in (
        ({"risk_class": "scary"}, "risk_class"),
        ({"limit": "0"}, "limit"),
        ({"deprecated": "yes"}, "deprecated"),
        ({"cursor": "no.such"}, "cursor"),
    ):
        refused(api.client.get("/v1/action-kinds", params=params), 400, "INVALID_REQUEST", word)
    refused(api.client.get("/v1/action-kinds/" + "a" * 65), 404, "NOT_FOUND", "...")


def test_registry_is_cacheable_and_rate_limited(make_api: Callable[..., Api]) -> None:
    api = make_api(registry_requests_per_minute=2)
    first = api.client.get("/v1/action-kinds")
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "public, max-age=3600"
    for _ in range(5):  # a 304 costs no token
        cached = api.client.get("/v1/action-kinds", headers={"If-None-Match": etag})
        assert (cached.status_code, cached.content, cached.headers["etag"]) == (304, b"", etag)
    assert api.client.get("/v1/action-kinds/llm.completion").status_code == 200
    limited = api.client.get("/v1/action-kinds")
    refused(limited, 429, "LIMIT_EXCEEDED", "If-None-Match")
    assert int(limited.headers["retry-after"]) >= 1


# --------------------------------------------------------------------------------------------
# Quota counters


@pytest.fixture
def counted(api: Api, acme: str) -> dict[str, Any]:
    """A per-run email quota of 3 with two emails sent in run r1 and one in r2."""
    policy = create_policy(
        api,
        name="emails",
        action_quotas=[
            {"action_kind": EMAIL, "max_calls": 3, "window": "per_run"},
            {"action_kind": "llm.completion", "max_calls": 100, "window": "per_day_tumbling"},
        ],
        risk_class_quotas=[
            {"risk_class": "external_side_effect", "max_calls": 50, "window": "per_run"}
        ],
    )
    for n, run in enumerate(("r1", "r1", "r2")):
        assert reserve(api, acme, EMAIL, run, n).status_code == 200
    return {"policy": policy, "key": acme}


def list_counters(api: Api, headers: dict[str, str], **params: Any) -> Any:
    return api.client.get("/v1/admin/action-quota-counters", params=params, headers=headers)


def test_counters_are_listed_with_their_rules_limit(api: Api, counted: dict[str, Any]) -> None:
    response = list_counters(api, api.admin_headers, tenant_id="acme")
    counters = valid("ActionQuotaCounterListResponse", response, 200)["counters"]
    emails = sorted(
        (c for c in counters if c["action_kind"] == EMAIL), key=lambda c: c["window_key"]
    )
    assert [(c["window_key"], c["used"], c["limit"], c["remaining"]) for c in emails] == [
        ("r1", 2, 3, 1),
        ("r2", 1, 3, 2),
    ]
    assert all(c["policy_id"] == counted["policy"]["policy_id"] for c in counters)
    risk = [c for c in counters if c["action_kind"] == "__risk__"]
    assert {c["risk_class"] for c in risk} == {"external_side_effect"}
    assert risk[0]["limit"] == 50
    only_r1 = list_counters(api, api.admin_headers, tenant_id="acme", run_id="r1").json()
    assert {c["window_key"] for c in only_r1["counters"]} == {"r1"}
    by_kind = list_counters(api, api.admin_headers, tenant_id="acme", action_kind=EMAIL).json()
    assert len(by_kind["counters"]) == 2
    by_window = list_counters(api, api.admin_headers, tenant_id="acme", window="per_day_tumbling")
    assert by_window.json()["counters"] == []  # no llm call yet: no counter
    scoped = list_counters(api, api.admin_headers, tenant_id="acme", scope="tenant:acme")
    assert len(scoped.json()["counters"]) == len(counters)
    elsewhere = list_counters(api, api.admin_headers, tenant_id="acme", scope="tenant:acmex")
    assert elsewhere.json()["counters"] == []
    first = list_counters(api, api.admin_headers, tenant_id="acme", limit=1).json()
    seen = [first["counters"][0]]
    cursor = first.get("next_cursor")
    while cursor:
        page = list_counters(api, api.admin_headers, tenant_id="acme", limit=1, cursor=cursor)
        seen += page.json()["counters"]
        cursor = page.json().get("next_cursor")
    assert seen == counters


def test_counter_listing_auth_and_the_balances_read_fallback(
    api: Api, counted: dict[str, Any]
) -> None:
    modern = {"X-Cycles-API-Key": key_with(api, "acme", ["action_quotas:read"])}
    ok = list_counters(api, modern)
    assert len(valid("ActionQuotaCounterListResponse", ok, 200)["counters"]) == 4
    assert "x-cycles-permission-deprecated" not in ok.headers
    legacy = {"X-Cycles-API-Key": key_with(api, "acme", ["balances:read"])}
    old = list_counters(api, legacy, tenant_id="globex")  # tenant_id is ignored for a tenant key
    assert len(old.json()["counters"]) == 4
    assert old.headers["x-cycles-permission-deprecated"] == "balances:read"
    neither = {"X-Cycles-API-Key": key_with(api, "acme", ["reservations:create"])}
    refused(list_counters(api, neither), 403, "FORBIDDEN", "action_quotas:read")
    refused(list_counters(api, {}), 401, "UNAUTHORIZED")
    refused(list_counters(api, api.admin_headers), 400, "INVALID_REQUEST", "tenant_id")
    for params, word in (
        ({"window": "per_week"}, "window"),
        ({"include_zero": "1"}, "include_zero"),
        ({"limit": "201"}, "limit"),
        ({"run_id": "r" * 257}, "run_id"),
    ):
        response = list_counters(api, api.admin_headers, tenant_id="acme", **params)
        refused(response, 400, "INVALID_REQUEST", word)


def test_reset_sets_one_counter_to_zero_and_audits_it(api: Api, counted: dict[str, Any]) -> None:
    def reset(body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return api.client.post(
            "/v1/admin/action-quota-counters/reset",
            json=body,
            headers=api.admin_headers if headers is None else headers,
        )

    r1 = next(
        c
        for c in list_counters(api, api.admin_headers, tenant_id="acme").json()["counters"]
        if c["action_kind"] == EMAIL and c["window_key"] == "r1"
    )
    target = {
        "tenant_id": "acme",
        "scope": r1["scope"],
        "action_kind": EMAIL,
        "window": "per_run",
        "window_key": "r1",
    }
    done = valid(
        "ActionQuotaCounterResetResponse", reset({**target, "reason": "double count"}), 200
    )
    assert done["previous_used"] == 2
    assert (done["counter"]["used"], done["counter"]["remaining"], done["counter"]["limit"]) == (
        0,
        3,
        3,
    )
    zero = list_counters(api, api.admin_headers, tenant_id="acme", run_id="r1", action_kind=EMAIL)
    assert zero.json()["counters"] == []  # at 0: listed only with include_zero
    shown = list_counters(
        api,
        api.admin_headers,
        tenant_id="acme",
        run_id="r1",
        action_kind=EMAIL,
        include_zero="true",
    ).json()["counters"]
    assert [c["used"] for c in shown] == [0]
    # run r1 may send three emails again
    for n in range(3):
        assert reserve(api, counted["key"], EMAIL, "r1", 10 + n).status_code == 200
    denied = reserve(api, counted["key"], EMAIL, "r1", 20)
    assert denied.json()["error"] == "ACTION_QUOTA_EXCEEDED"
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})["logs"]
    entry = next(log for log in logs if log["operation"] == "quota.counter_reset")
    assert entry["resource_type"] == "quota_counter"
    meta = entry["metadata"]
    assert (meta["previous_used"], meta["reason"], meta["window_key"]) == (2, "double count", "r1")
    assert meta["actor_type"] == "admin_on_behalf_of"
    # refusals
    refused(reset(target, {"X-Cycles-API-Key": counted["key"]}), 403, "FORBIDDEN", "admin key")
    refused(reset(target, {}), 401, "UNAUTHORIZED")
    no_tenant = {k: v for k, v in target.items() if k != "tenant_id"}
    refused(reset(no_tenant), 400, "INVALID_REQUEST", "missing_required_field: tenant_id")
    refused(reset({**target, "window_key": "r9"}), 404, "NOT_FOUND", "r9")
    refused(reset({**target, "window": "hourly"}), 400, "INVALID_REQUEST", "window")
    risk = {**target, "action_kind": "__risk__"}
    refused(reset(risk), 400, "INVALID_REQUEST", "risk_class")
    ok = reset({**risk, "risk_class": "external_side_effect"})
    assert valid("ActionQuotaCounterResetResponse", ok, 200)["counter"]["risk_class"] == (
        "external_side_effect"
    )


def test_a_counter_whose_rule_is_gone_is_listed_as_unlimited(
    api: Api, counted: dict[str, Any]
) -> None:
    path = f"/v1/admin/policies/{counted['policy']['policy_id']}"
    api.admin(
        "PATCH",
        path,
        200,
        json={"action_quotas": [{"action_kind": EMAIL, "max_calls": 9, "window": "per_run"}]},
    )
    counters = list_counters(api, api.admin_headers, tenant_id="acme", action_kind=EMAIL).json()
    assert {c["limit"] for c in counters["counters"]} == {9}  # the rule's current max_calls
    api.admin("PATCH", path, 200, json={"action_quotas": []})
    response = list_counters(api, api.admin_headers, tenant_id="acme", action_kind=EMAIL)
    gone = valid("ActionQuotaCounterListResponse", response, 200)["counters"]
    assert [(c["used"], c["limit"]) for c in sorted(gone, key=lambda c: c["window_key"])] == [
        (2, UNLIMITED),
        (1, UNLIMITED),
    ]
    assert all(c["remaining"] == UNLIMITED - c["used"] for c in gone)
    assert all(c["policy_id"] == counted["policy"]["policy_id"] for c in gone)
