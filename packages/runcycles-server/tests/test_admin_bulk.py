"""``POST /v1/admin/tenants/bulk-action`` and ``/v1/admin/budgets/bulk-action`` on every store.

Through the app over HTTP: preview (``?dry_run=true``) then apply, per-row outcomes, events
with the bulk correlation id, one audit entry, replay by ``idempotency_key``, the
``expected_count`` and row-limit gates (nothing changes when refused), bad input, a tenant key.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.errors import LedgerError

if TYPE_CHECKING:
    from conftest import Api

    from runcycles_server.stores.base import Store

TENANTS = "/v1/admin/tenants/bulk-action"
BUDGETS = "/v1/admin/budgets/bulk-action"
U = "USD_MICROCENTS"


def valid(schema: str, body: Any) -> Any:
    schema_validator(schema, EXTENDED_ADMIN).validate(body)
    return body


def status_of(api: Api, tenant_id: str) -> str:
    return str(api.admin("GET", f"/v1/admin/tenants/{tenant_id}", 200)["status"])


def events(api: Api, tenant_id: str, **params: str) -> list[dict[str, Any]]:
    got = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": tenant_id, **params})
    return list(got["events"])


def audit(api: Api, tenant_id: str, operation: str) -> list[dict[str, Any]]:
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": tenant_id})
    valid("AuditLogListResponse", logs)
    return [e for e in logs["logs"] if e["operation"] == operation]


@pytest.fixture
def fleet(api: Api) -> Api:
    """team-a, team-b ACTIVE; team-c SUSPENDED; team-d CLOSED; other ACTIVE."""
    for tid in ("team-a", "team-b", "team-c", "team-d", "other"):
        api.tenant(tid)
    api.admin("PATCH", "/v1/admin/tenants/team-c", 200, json={"status": "SUSPENDED"})
    api.admin("PATCH", "/v1/admin/tenants/team-d", 200, json={"status": "CLOSED"})
    return api


def test_tenant_bulk_preview_then_apply(fleet: Api) -> None:
    api = fleet
    body = valid(
        "TenantBulkActionRequest",
        {"filter": {"search": "TEAM"}, "action": "SUSPEND", "idempotency_key": "k-1"},
    )
    preview = api.client.post(TENANTS, params={"dry_run": "true"}, json=body,
                              headers=api.admin_headers)  # fmt: skip
    assert preview.status_code == 200, preview.text
    assert preview.headers["X-Cycles-Dry-Run"] == "true"
    seen = valid("TenantBulkActionResponse", preview.json())
    assert seen["total_matched"] == 4
    assert [r["id"] for r in seen["succeeded"]] == ["team-a", "team-b"]
    assert seen["skipped"] == [{"id": "team-c", "reason": "ALREADY_IN_TARGET_STATE"}]
    assert [(r["id"], r["error_code"]) for r in seen["failed"]] == [
        ("team-d", "INVALID_TRANSITION")
    ]
    assert status_of(api, "team-a") == "ACTIVE"  # the preview changed nothing

    applied = api.admin("POST", TENANTS, 200, json={**body, "expected_count": 4})
    valid("TenantBulkActionResponse", applied)
    assert {k: applied[k] for k in ("succeeded", "failed", "skipped")} == {
        k: seen[k] for k in ("succeeded", "failed", "skipped")
    }
    assert [status_of(api, t) for t in ("team-a", "team-b", "team-c", "team-d", "other")] == [
        "SUSPENDED", "SUSPENDED", "SUSPENDED", "CLOSED", "ACTIVE",
    ]  # fmt: skip
    suspended = events(api, "team-a", event_type="tenant.suspended")
    assert len(suspended) == 1
    corr = suspended[0]["correlation_id"]
    assert corr.startswith("tenant_bulk_action:suspend:")
    assert [e["event_type"] for e in events(api, "team-b", correlation_id=corr)] == [
        "tenant.suspended"
    ]
    assert events(api, "team-c", correlation_id=corr) == []  # skipped rows emit nothing
    [entry] = audit(api, "__admin__", "bulkActionTenants")
    assert entry["resource_type"] == "tenant"
    meta = entry["metadata"]
    assert meta["succeeded"] == ["team-a", "team-b"]
    assert meta["skipped"] == ["team-c"]
    assert meta["failed"] == [{"id": "team-d", "error_code": "INVALID_TRANSITION"}]

    # The same key and body: the first answer again, nothing applied twice.
    api.admin("PATCH", "/v1/admin/tenants/team-a", 200, json={"status": "ACTIVE"})
    again = api.admin("POST", TENANTS, 200, json={**body, "expected_count": 4})
    assert again == applied
    assert status_of(api, "team-a") == "ACTIVE"
    assert len(audit(api, "__admin__", "bulkActionTenants")) == 1
    # The same key with another body is refused.
    other = api.admin("POST", TENANTS, 409, json={**body, "action": "CLOSE"})
    assert other["error"] == "IDEMPOTENCY_MISMATCH"
    valid("ErrorResponse", other)


def test_tenant_reactivate_and_close(fleet: Api) -> None:
    api = fleet
    up_body = {"filter": {"status": "SUSPENDED"}, "action": "REACTIVATE", "idempotency_key": "r"}
    up = api.admin("POST", TENANTS, 200, json=up_body)
    assert [r["id"] for r in up["succeeded"]] == ["team-c"]
    assert status_of(api, "team-c") == "ACTIVE"
    key = api.tenant("team-e")
    api.budget("team-e", "tenant:team-e", 1_000)
    close = {"filter": {"search": "team-e"}, "action": "CLOSE", "idempotency_key": "c"}
    closed = api.admin("POST", TENANTS, 200, json=close)
    assert [r["id"] for r in closed["succeeded"]] == ["team-e"]
    # The close cascade ran: the tenant's key no longer authenticates, its budget is CLOSED.
    assert api.client.get("/v1/balances", params={"tenant": "team-e"},
                          headers={"X-Cycles-API-Key": key}).status_code == 401  # fmt: skip
    lookup = api.admin("GET", "/v1/admin/budgets/lookup", 200,
                       params={"scope": "tenant:team-e", "unit": U})  # fmt: skip
    assert lookup["status"] == "CLOSED"
    # The parent event carries the bulk id, the cascade's children the Rule 1 cascade id.
    found = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": "team-e"})["events"]
    (parent,) = [e for e in found if e["event_type"] == "tenant.closed"]
    assert parent["correlation_id"] == f"tenant_bulk_action:close:{parent['request_id']}"
    children = [e for e in found if e["event_type"].endswith("_via_tenant_cascade")]
    assert {e["event_type"] for e in children} == {
        "budget.closed_via_tenant_cascade", "api_key.revoked_via_tenant_cascade",
    }  # fmt: skip
    cascade = f"tenant_close_cascade:team-e:{parent['request_id']}"
    assert {e["correlation_id"] for e in children} == {cascade}


def test_expected_count_mismatch_changes_nothing(fleet: Api) -> None:
    api = fleet
    body = {"filter": {"status": "ACTIVE"}, "action": "SUSPEND", "idempotency_key": "m",
            "expected_count": 2}  # fmt: skip
    refused = api.admin("POST", TENANTS, 409, json=body)
    valid("ErrorResponse", refused)
    assert refused["error"] == "COUNT_MISMATCH"
    assert refused["details"]["total_matched"] == 3
    assert [status_of(api, t) for t in ("team-a", "team-b", "other")] == ["ACTIVE"] * 3
    assert audit(api, "__admin__", "bulkActionTenants") == []
    # A refused request does not use up its key: the corrected count goes through with it.
    done = api.admin("POST", TENANTS, 200, json={**body, "expected_count": 3})
    assert len(done["succeeded"]) == 3


def test_more_rows_than_the_limit_is_refused(fleet: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runcycles_server.bulk.BULK_MAX", 2)
    api = fleet
    for path, body in (
        (TENANTS, {"filter": {"search": "team"}, "action": "SUSPEND"}),
        (BUDGETS, {"filter": {"tenant_id": "team-a"}, "action": "CREDIT",
                   "amount": {"unit": U, "amount": 1}}),
    ):  # fmt: skip
        if path == BUDGETS:
            for ws in ("x", "y", "z"):
                api.budget("team-a", f"tenant:team-a/workspace:{ws}", 10)
        refused = api.admin("POST", path, 400, json={**body, "idempotency_key": "big"})
        assert refused["error"] == "LIMIT_EXCEEDED"
        assert refused["details"]["total_matched"] > 2
        assert "narrow it" in refused["message"]
    assert status_of(api, "team-a") == "ACTIVE"


@pytest.fixture
def books(api: Api) -> Api:
    """acme: three USD workspaces (one FROZEN), one TOKENS workspace, one with debt 0."""
    api.tenant("acme")
    for ws in ("a", "b", "c"):
        api.budget("acme", f"tenant:acme/workspace:{ws}", 1_000)
    api.budget("acme", "tenant:acme/workspace:t", 500, unit="TOKENS")
    api.admin("POST", "/v1/admin/budgets/freeze", 200,
              params={"scope": "tenant:acme/workspace:c", "unit": U})  # fmt: skip
    api.tenant("beta")
    api.budget("beta", "tenant:beta/workspace:a", 1_000)
    return api


def lookup(api: Api, scope: str, unit: str = U) -> dict[str, Any]:
    got = api.admin("GET", "/v1/admin/budgets/lookup", 200, params={"scope": scope, "unit": unit})
    return dict(got)


def test_budget_bulk_preview_then_apply(books: Api) -> None:
    api = books
    body = valid("BudgetBulkActionRequest", {
        "filter": {"tenant_id": "acme", "scope_prefix": "tenant:acme"}, "action": "CREDIT",
        "amount": {"unit": U, "amount": 250}, "reason": "period rollover",
        "idempotency_key": "credit-1",
    })  # fmt: skip
    ids = {s: lookup(api, f"tenant:acme/workspace:{s}")["ledger_id"] for s in "abc"}
    tokens = lookup(api, "tenant:acme/workspace:t", "TOKENS")["ledger_id"]
    preview = api.client.post(BUDGETS, params={"dry_run": "true"}, json=body,
                              headers=api.admin_headers)  # fmt: skip
    seen = valid("BudgetBulkActionResponse", preview.json())
    assert seen["total_matched"] == 4
    assert sorted(r["id"] for r in seen["succeeded"]) == sorted([ids["a"], ids["b"]])
    assert sorted((r["id"], r["error_code"]) for r in seen["failed"]) == sorted(
        [(ids["c"], "INVALID_TRANSITION"), (tokens, "INVALID_TRANSITION")]
    )
    assert lookup(api, "tenant:acme/workspace:a")["allocated"]["amount"] == 1_000

    applied = api.admin("POST", BUDGETS, 200, json={**body, "expected_count": 4})
    valid("BudgetBulkActionResponse", applied)
    assert {k: sorted(map(str, applied[k])) for k in ("succeeded", "failed", "skipped")} == {
        k: sorted(map(str, seen[k])) for k in ("succeeded", "failed", "skipped")
    }
    assert lookup(api, "tenant:acme/workspace:a")["allocated"]["amount"] == 1_250
    assert lookup(api, "tenant:acme/workspace:b")["remaining"]["amount"] == 1_250
    assert lookup(api, "tenant:acme/workspace:c")["allocated"]["amount"] == 1_000  # FROZEN
    assert lookup(api, "tenant:beta/workspace:a")["allocated"]["amount"] == 1_000
    funded = events(api, "acme", event_type="budget.funded")
    assert len(funded) == 2
    assert {e["correlation_id"] for e in funded} == {
        f"budget_bulk_action:credit:{funded[0]['request_id']}"
    }
    [entry] = audit(api, "acme", "bulkActionBudgets")
    assert entry["resource_type"] == "budget"
    assert entry["metadata"]["reason"] == "period rollover"
    assert sorted(entry["metadata"]["succeeded"]) == sorted([ids["a"], ids["b"]])

    again = api.admin("POST", BUDGETS, 200, json={**body, "expected_count": 4})
    assert again == applied
    assert lookup(api, "tenant:acme/workspace:a")["allocated"]["amount"] == 1_250


def test_budget_bulk_row_outcomes(books: Api) -> None:
    api = books
    base = {"filter": {"tenant_id": "acme", "unit": U, "status": "ACTIVE"}}
    debit = api.admin("POST", BUDGETS, 200, json={**base, "action": "DEBIT",
                      "amount": {"unit": U, "amount": 5_000}, "idempotency_key": "d"})  # fmt: skip
    assert {r["error_code"] for r in debit["failed"]} == {"BUDGET_EXCEEDED"}
    assert len(debit["failed"]) == 2
    repay = api.admin("POST", BUDGETS, 200, json={**base, "action": "REPAY_DEBT",
                      "amount": {"unit": U, "amount": 10}, "idempotency_key": "r"})  # fmt: skip
    assert {r["reason"] for r in repay["skipped"]} == {"ALREADY_IN_TARGET_STATE"}
    assert len(repay["skipped"]) == 2
    reset = api.admin("POST", BUDGETS, 200, json={**base, "action": "RESET_SPENT",
                      "amount": {"unit": U, "amount": 800}, "spent": {"unit": U, "amount": 600},
                      "idempotency_key": "s"})  # fmt: skip
    assert len(reset["succeeded"]) == 2
    assert lookup(api, "tenant:acme/workspace:a")["spent"]["amount"] == 600
    # utilization = spent / allocated = 0.75 now: a filter at 0.8 matches nothing
    none = api.admin("POST", BUDGETS, 200, json={
        "filter": {"tenant_id": "acme", "utilization_min": 0.8}, "action": "CREDIT",
        "amount": {"unit": U, "amount": 1}, "idempotency_key": "u"})  # fmt: skip
    assert none["total_matched"] == 0
    some = api.admin("POST", BUDGETS, 200, json={
        "filter": {"tenant_id": "acme", "utilization_min": 0.7, "search": "WORKSPACE:A"},
        "action": "CREDIT", "amount": {"unit": U, "amount": 1}, "idempotency_key": "u2",
    })  # fmt: skip
    assert some["total_matched"] == 1


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        (TENANTS, {"filter": {}, "action": "SUSPEND", "idempotency_key": "x"}, "filter"),
        (TENANTS, {"filter": {"search": ""}, "action": "SUSPEND", "idempotency_key": "x"},
         "filter"),
        (TENANTS, {"filter": {"status": "ACTIVE"}, "action": "PAUSE", "idempotency_key": "x"},
         "action"),
        (TENANTS, {"filter": {"search": "s" * 129}, "action": "CLOSE", "idempotency_key": "x"},
         "search"),
        (TENANTS, {"filter": {"status": "ACTIVE"}, "action": "CLOSE"}, "idempotency_key"),
        (TENANTS, {"filter": {"status": "ACTIVE"}, "action": "CLOSE", "idempotency_key": "x",
                   "expected_count": -1}, "expected_count"),
        (TENANTS, {"filter": {"state": "ACTIVE"}, "action": "CLOSE", "idempotency_key": "x"},
         "state"),
        (BUDGETS, {"filter": {"tenant_id": "acme"}, "action": "CREDIT", "idempotency_key": "x"},
         "amount"),
        (BUDGETS, {"filter": {"scope_prefix": "tenant:acme"}, "action": "CREDIT",
                   "amount": {"unit": U, "amount": 1}, "idempotency_key": "x"}, "tenant_id"),
        (BUDGETS, {"filter": {"tenant_id": "acme", "utilization_min": 0.9,
                              "utilization_max": 0.1}, "action": "CREDIT",
                   "amount": {"unit": U, "amount": 1}, "idempotency_key": "x"}, "utilization_min"),
        (BUDGETS, {"filter": {"tenant_id": "acme"}, "action": "CREDIT",
                   "amount": {"unit": U, "amount": -1}, "idempotency_key": "x"}, "amount"),
        (BUDGETS, {"filter": {"tenant_id": "acme", "has_debt": "yes"}, "action": "CREDIT",
                   "amount": {"unit": U, "amount": 1}, "idempotency_key": "x"}, "has_debt"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_it(api: Api, path: str, body: Any, named: str) -> None:
    api.tenant("acme")
    refused = api.admin("POST", path, 400, json=body)
    valid("ErrorResponse", refused)
    assert refused["error"] == "INVALID_REQUEST"
    assert named in refused["message"] + str(refused.get("details", "")), refused


def test_racing_submits_with_one_key_apply_once(api: Api) -> None:
    for i in range(3):
        api.tenant(f"race-{i}")
        api.budget(f"race-{i}", f"tenant:race-{i}", 1_000)
    body = {"filter": {"search": "race"}, "action": "SUSPEND", "idempotency_key": "race"}

    async def both() -> list[Any]:
        send = api.client._client.post
        return list(await asyncio.gather(
            send(TENANTS, json=body, headers=api.admin_headers),
            send(TENANTS, json=body, headers=api.admin_headers),
        ))  # fmt: skip

    answers = api.client.run(both())
    codes = sorted(r.status_code for r in answers)
    assert codes in ([200, 200], [200, 409]), [r.text for r in answers]
    if codes == [200, 200]:  # the second came after the first answered: the same answer
        assert answers[0].json() == answers[1].json()
    for i in range(3):
        assert len(events(api, f"race-{i}", event_type="tenant.suspended")) == 1
    assert len(audit(api, "__admin__", "bulkActionTenants")) == 1


def test_bad_dry_run_value_and_unknown_tenant(api: Api) -> None:
    body = {"filter": {"status": "ACTIVE"}, "action": "SUSPEND", "idempotency_key": "x"}
    response = api.client.post(TENANTS, params={"dry_run": "maybe"}, json=body,
                               headers=api.admin_headers)  # fmt: skip
    assert response.status_code == 400
    assert "dry_run" in response.json()["message"]
    missing = api.admin("POST", BUDGETS, 404, json={
        "filter": {"tenant_id": "nobody"}, "action": "CREDIT",
        "amount": {"unit": U, "amount": 1}, "idempotency_key": "x"})  # fmt: skip
    assert "nobody" in missing["message"]


def test_a_tenant_key_cannot_call_them(api: Api) -> None:
    key = api.tenant("acme")
    h = {"X-Cycles-API-Key": key}
    bodies = {
        TENANTS: {"filter": {"search": "acme"}, "action": "SUSPEND", "idempotency_key": "x"},
        BUDGETS: {"filter": {"tenant_id": "acme"}, "action": "CREDIT",
                  "amount": {"unit": U, "amount": 1}, "idempotency_key": "x"},
    }  # fmt: skip
    for path, body in bodies.items():
        response = api.client.post(path, json=body, headers=h)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "FORBIDDEN"
        assert api.client.post(path, json=body).status_code == 401
    assert status_of(api, "acme") == "ACTIVE"


def test_the_row_guards_are_checked_in_the_rows_transaction(api: Api, store: Store) -> None:
    """What a bulk row does when the row changed after it was listed (a race, made directly)."""
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "SUSPENDED"})
    with pytest.raises(LedgerError) as already:
        api.client.run(store.update_tenant("acme", {"status": "SUSPENDED"},
                                           only_from=("ACTIVE",)))  # fmt: skip
    assert already.value.code == "ALREADY_IN_TARGET_STATE"
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "ACTIVE"})
    with pytest.raises(LedgerError) as again:
        api.client.run(store.update_tenant("acme", {"status": "ACTIVE"},
                                           only_from=("SUSPENDED",)))  # fmt: skip
    assert again.value.code == "ALREADY_IN_TARGET_STATE"
    with pytest.raises(LedgerError) as no_debt:
        api.client.run(store.fund_budget(
            "acme", "tenant:acme", U, operation="REPAY_DEBT", amount=10, spent=None,
            idempotency_key=None, request_hash="", timestamp="", require_debt=True,
        ))  # fmt: skip
    assert no_debt.value.code == "ALREADY_IN_TARGET_STATE"
    assert lookup(api, "tenant:acme")["allocated"]["amount"] == 1_000  # nothing credited
    assert status_of(api, "acme") == "ACTIVE"
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    with pytest.raises(LedgerError) as invalid:
        api.client.run(store.update_tenant("acme", {"status": "ACTIVE"},
                                           only_from=("SUSPENDED",)))  # fmt: skip
    assert invalid.value.code == "INVALID_TRANSITION"
    assert status_of(api, "acme") == "CLOSED"
