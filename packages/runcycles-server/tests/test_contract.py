"""Every response body the server produces validates against the published OpenAPI schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, EXTENDED_RUNTIME, schema_validator

if TYPE_CHECKING:
    from conftest import Api, FakeClock

GOVERNANCE = EXTENDED_ADMIN
"""The server implements the v0.1.26 extensions: bodies validate against the extended specs."""
U = "USD_MICROCENTS"


def check(schema: str, response: Any, status: int, spec: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    validator = schema_validator(schema, EXTENDED_RUNTIME if spec is None else spec)
    validator.validate(body)
    return dict(body)


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_runtime_responses_match_the_protocol_spec(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme")
    h = {"X-Cycles-API-Key": key}
    api.budget("acme", "tenant:acme", 10_000, overdraft_limit={"unit": U, "amount": 100})
    api.budget("acme", "tenant:acme/agent:bot", 500)
    base = {
        "subject": {"tenant": "acme", "agent": "bot", "dimensions": {"run_id": "r1"}},
        "action": {"kind": "llm.completion", "name": "m", "tags": ["prod"]},
    }
    res = check(
        "ReservationCreateResponse",
        api.post(
            key,
            "/v1/reservations",
            {
                "idempotency_key": "r1",
                **base,
                "estimate": {"unit": U, "amount": 100},
                "metadata": {"step": 1},
            },
        ),
        200,
    )
    rid = res["reservation_id"]
    check(
        "ReservationCreateResponse",
        api.post(
            key,
            "/v1/reservations",
            {
                "idempotency_key": "r1",
                **base,
                "estimate": {"unit": U, "amount": 100},
                "metadata": {"step": 1},
            },
        ),
        200,
    )
    check(
        "ReservationCreateResponse",
        api.post(
            key,
            "/v1/reservations",
            {
                "idempotency_key": "dry",
                **base,
                "estimate": {"unit": U, "amount": 10**6},
                "dry_run": True,
            },
        ),
        200,
    )
    check(
        "DecisionResponse",
        api.post(
            key,
            "/v1/decide",
            {"idempotency_key": "d", **base, "estimate": {"unit": U, "amount": 1}},
        ),
        200,
    )
    check(
        "DecisionResponse",
        api.post(
            key,
            "/v1/decide",
            {"idempotency_key": "d2", **base, "estimate": {"unit": U, "amount": 10**6}},
        ),
        200,
    )
    check(
        "ReservationExtendResponse",
        api.post(
            key, f"/v1/reservations/{rid}/extend", {"idempotency_key": "x", "extend_by_ms": 1000}
        ),
        200,
    )
    check("ReservationDetail", api.client.get(f"/v1/reservations/{rid}", headers=h), 200)
    check(
        "CommitResponse",
        api.post(
            key,
            f"/v1/reservations/{rid}/commit",
            {
                "idempotency_key": "c",
                "actual": {"unit": U, "amount": 40},
                "metrics": {"tokens_input": 3},
                "metadata": {"done": True},
            },
        ),
        200,
    )
    check("ReservationDetail", api.client.get(f"/v1/reservations/{rid}", headers=h), 200)
    rid2 = api.post(
        key,
        "/v1/reservations",
        {"idempotency_key": "r2", **base, "estimate": {"unit": U, "amount": 10}},
    ).json()
    rid3 = api.post(
        key,
        "/v1/reservations",
        {"idempotency_key": "r3", **base, "estimate": {"unit": U, "amount": 1}},
    ).json()["reservation_id"]
    check(
        "ReleaseResponse",
        api.post(
            key, f"/v1/reservations/{rid2['reservation_id']}/release", {"idempotency_key": "rel"}
        ),
        200,
    )
    check(
        "EventCreateResponse",
        api.post(
            key,
            "/v1/events",
            {
                "idempotency_key": "e",
                **base,
                "actual": {"unit": U, "amount": 5000},
                "client_time_ms": 1,
            },
        ),
        201,
    )
    check(
        "BalanceResponse",
        api.client.get("/v1/balances", params={"tenant": "acme", "limit": 1}, headers=h),
        200,
    )
    check(
        "ReservationListResponse",
        api.client.get(
            "/v1/reservations",
            params={"include": "metadata,committed_metadata", "limit": 1},
            headers=h,
        ),
        200,
    )
    for response, status in (
        (api.post(key, "/v1/reservations", {"idempotency_key": "z"}), 400),
        (api.client.get("/v1/reservations/rsv_x", headers=h), 404),
        (
            api.post(
                key,
                "/v1/reservations",
                {"idempotency_key": "big", **base, "estimate": {"unit": U, "amount": 10**6}},
            ),
            409,
        ),
        (api.post("bad", "/v1/decide", {}), 401),
    ):
        check("ErrorResponse", response, status)
    check(
        "AuthIntrospectResponse", api.client.get("/v1/auth/introspect", headers=h), 200, GOVERNANCE
    )
    admin_release = api.client.post(
        f"/v1/reservations/{rid3}/release",
        headers=api.admin_headers,
        json={"idempotency_key": "adm", "reason": "[INCIDENT_FORCE_RELEASE]"},
    )
    check("ReleaseResponse", admin_release, 200)
    logs = check(
        "AuditLogListResponse",
        api.client.get("/v1/admin/audit/logs", headers=api.admin_headers),
        200,
        GOVERNANCE,
    )
    assert [entry["resource_id"] for entry in logs["logs"]] == [rid3]


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_admin_responses_match_the_governance_spec(api: Api) -> None:
    a = api.admin_headers
    c = api.client
    check(
        "Tenant",
        c.post(
            "/v1/admin/tenants",
            headers=a,
            json={"tenant_id": "acme", "name": "Acme", "default_commit_overage_policy": "REJECT"},
        ),
        201,
        GOVERNANCE,
    )
    check("TenantListResponse", c.get("/v1/admin/tenants", headers=a), 200, GOVERNANCE)
    created = check(
        "ApiKeyCreateResponse",
        c.post("/v1/admin/api-keys", headers=a, json={"tenant_id": "acme", "name": "k"}),
        201,
        GOVERNANCE,
    )
    check("ApiKeyListResponse", c.get("/v1/admin/api-keys", headers=a), 200, GOVERNANCE)
    check(
        "BudgetLedger",
        c.post(
            "/v1/admin/budgets",
            headers=a,
            json={
                "tenant_id": "acme",
                "scope": "tenant:acme",
                "unit": U,
                "allocated": {"unit": U, "amount": 10},
                "period_start": "2026-01-01T00:00:00Z",
            },
        ),
        201,
        GOVERNANCE,
    )
    check("BudgetListResponse", c.get("/v1/admin/budgets", headers=a), 200, GOVERNANCE)
    check(
        "BudgetFundingResponse",
        c.post(
            "/v1/admin/budgets/fund",
            headers=a,
            params={"scope": "tenant:acme", "unit": U, "tenant_id": "acme"},
            json={"operation": "CREDIT", "amount": {"unit": U, "amount": 5}},
        ),
        200,
        GOVERNANCE,
    )
    check(
        "ApiKey",
        c.request("DELETE", f"/v1/admin/api-keys/{created['key_id']}", headers=a),
        200,
        GOVERNANCE,
    )
    check(
        "Tenant",
        c.request("PATCH", "/v1/admin/tenants/acme", headers=a, json={"status": "CLOSED"}),
        200,
        GOVERNANCE,
    )
    check("AuthIntrospectResponse", c.get("/v1/auth/introspect", headers=a), 200, GOVERNANCE)
    check("ErrorResponse", c.get("/v1/admin/tenants/nope", headers=a), 404, GOVERNANCE)
    check("AuditLogListResponse", c.get("/v1/admin/audit/logs", headers=a), 200, GOVERNANCE)


def test_the_remaining_admin_paths_match_the_governance_spec(api: Api) -> None:
    """Bulk actions (answer, preview, refusals), key update, key validation, one event."""
    a = api.admin_headers
    c = api.client
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 10)
    request = {"filter": {"search": "acme"}, "action": "SUSPEND", "idempotency_key": "k"}
    schema_validator("TenantBulkActionRequest", GOVERNANCE).validate(request)
    preview = c.post("/v1/admin/tenants/bulk-action?dry_run=true", headers=a, json=request)
    check("TenantBulkActionResponse", preview, 200, GOVERNANCE)
    refused = c.post("/v1/admin/tenants/bulk-action", headers=a,
                     json={**request, "expected_count": 9})  # fmt: skip
    check("ErrorResponse", refused, 409, GOVERNANCE)
    applied = c.post("/v1/admin/tenants/bulk-action", headers=a, json=request)
    check("TenantBulkActionResponse", applied, 200, GOVERNANCE)
    budgets = {"filter": {"tenant_id": "acme"}, "action": "CREDIT",
               "amount": {"unit": U, "amount": 1}, "idempotency_key": "b"}  # fmt: skip
    schema_validator("BudgetBulkActionRequest", GOVERNANCE).validate(budgets)
    funded = c.post("/v1/admin/budgets/bulk-action", headers=a, json=budgets)
    check("BudgetBulkActionResponse", funded, 200, GOVERNANCE)
    check("ErrorResponse", c.post("/v1/admin/budgets/bulk-action", headers=a,
                                  json={**budgets, "filter": {}}), 400, GOVERNANCE)  # fmt: skip
    key_id = c.get("/v1/admin/api-keys", headers=a).json()["keys"][0]["key_id"]
    patch = c.request("PATCH", f"/v1/admin/api-keys/{key_id}", headers=a, json={"name": "n"})
    check("ApiKey", patch, 200, GOVERNANCE)
    validated = c.post("/v1/auth/validate", headers=a, json={"key_secret": "cyc_live_x"})
    check("ApiKeyValidationResponse", validated, 200, GOVERNANCE)
    listed = c.get("/v1/admin/events", headers=a, params={"tenant_id": "acme"}).json()
    event_id = listed["events"][0]["event_id"]
    check("Event", c.get(f"/v1/admin/events/{event_id}", headers=a), 200, GOVERNANCE)
    check("ErrorResponse", c.get("/v1/admin/events/evt_nope", headers=a), 404, GOVERNANCE)
