"""Property: no request body or query string, however malformed, produces a 5xx."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from conftest import Api

U = "USD_MICROCENTS"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

VALID: dict[str, dict[str, Any]] = {
    "/v1/reservations": {
        "idempotency_key": "k",
        "subject": {"tenant": "acme", "agent": "a"},
        "action": {"kind": "k", "name": "n"},
        "estimate": {"unit": U, "amount": 5},
        "ttl_ms": 5000,
    },
    "/v1/decide": {
        "idempotency_key": "k",
        "subject": {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
        "estimate": {"unit": U, "amount": 5},
    },
    "/v1/events": {
        "idempotency_key": "k",
        "subject": {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
        "actual": {"unit": U, "amount": 5},
    },
    "/v1/reservations/rsv_x/commit": {"idempotency_key": "k", "actual": {"unit": U, "amount": 1}},
    "/v1/reservations/rsv_x/extend": {"idempotency_key": "k", "extend_by_ms": 10},
    "/v1/reservations/rsv_x/release": {"idempotency_key": "k"},
}
PATHS = sorted(VALID)
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def no_server_error(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert {"error", "message", "request_id", "trace_id"} <= set(response.json())


@pytest.mark.parametrize("store", ["memory"], indirect=True)
@FUZZ
@given(path=st.sampled_from(PATHS), body=json_values)
def test_arbitrary_json_bodies_never_5xx(api: Api, acme: str, path: str, body: Any) -> None:
    no_server_error(api.client.post(path, json=body, headers={"X-Cycles-API-Key": acme}))


@pytest.mark.parametrize("store", ["memory"], indirect=True)
@FUZZ
@given(path=st.sampled_from(PATHS), data=st.data())
def test_mutated_valid_bodies_never_5xx(api: Api, acme: str, path: str, data: Any) -> None:
    body = dict(VALID[path])
    field = data.draw(st.sampled_from([*body, "extra"]))
    body[field] = data.draw(json_values)
    if isinstance(body.get("subject"), dict) and data.draw(st.booleans()):
        body["subject"] = {**VALID["/v1/decide"]["subject"], "agent": data.draw(st.text())}
    no_server_error(api.client.post(path, json=body, headers={"X-Cycles-API-Key": acme}))


@pytest.mark.parametrize("store", ["memory"], indirect=True)
@FUZZ
@given(
    path=st.sampled_from(
        ["/v1/reservations", "/v1/balances", "/v1/admin/budgets", "/v1/admin/tenants"]
    ),
    params=st.dictionaries(
        st.sampled_from(
            [
                "limit",
                "cursor",
                "status",
                "from",
                "to",
                "sort_by",
                "sort_dir",
                "tenant",
                "agent",
                "include",
                "unit",
                "scope_prefix",
                "expires_from",
                "finalized_to",
            ]
        ),
        st.text(max_size=30),
        max_size=5,
    ),
    admin=st.booleans(),
)
def test_arbitrary_query_strings_never_5xx(
    api: Api, acme: str, path: str, params: dict[str, str], admin: bool
) -> None:
    headers = api.admin_headers if admin else {"X-Cycles-API-Key": acme}
    no_server_error(api.client.get(path, params=params, headers=headers))


ADMIN_VALID: dict[str, dict[str, Any]] = {
    "/v1/admin/tenants": {"tenant_id": "t-fuzz", "name": "x"},
    "/v1/admin/api-keys": {"tenant_id": "acme", "name": "k"},
    "/v1/admin/budgets": {
        "tenant_id": "acme",
        "scope": "tenant:acme/agent:f",
        "unit": U,
        "allocated": {"unit": U, "amount": 1},
    },
    "/v1/admin/budgets/fund?scope=tenant:acme&unit=USD_MICROCENTS&tenant_id=acme": {
        "operation": "CREDIT",
        "amount": {"unit": U, "amount": 1},
    },
}


@pytest.mark.parametrize("store", ["memory"], indirect=True)
@FUZZ
@given(path=st.sampled_from(sorted(ADMIN_VALID)), data=st.data())
def test_mutated_admin_bodies_never_5xx(api: Api, acme: str, path: str, data: Any) -> None:
    body = dict(ADMIN_VALID[path])
    field = data.draw(st.sampled_from([*body, "caps", "metadata", "expires_at", "spent"]))
    body[field] = data.draw(json_values)
    no_server_error(api.client.post(path, json=body, headers=api.admin_headers))
    patch = {field: data.draw(json_values)}
    no_server_error(
        api.client.request(
            "PATCH",
            "/v1/admin/budgets",
            params={"scope": "tenant:acme", "unit": U},
            json=patch,
            headers=api.admin_headers,
        )
    )
    no_server_error(
        api.client.request("PATCH", "/v1/admin/tenants/acme", json=patch, headers=api.admin_headers)
    )
