"""``PATCH /v1/admin/api-keys/{key_id}``, ``POST /v1/auth/validate``, ``GET /v1/admin/events/{id}``.

On every store, through the app; request and response bodies validated against the spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from runcycles.testing.spec import EXTENDED_ADMIN, load_spec, schema_validator

if TYPE_CHECKING:
    from conftest import Api

    from runcycles_server.stores.base import Store

U = "USD_MICROCENTS"


def valid(schema: str, body: Any) -> Any:
    schema_validator(schema, EXTENDED_ADMIN).validate(body)
    return body


def valid_patch_body(body: dict[str, Any]) -> dict[str, Any]:
    """Validate against ``updateApiKey``'s inline request schema (it is not a component)."""
    document = load_spec(EXTENDED_ADMIN)
    registry: Registry[Any] = Registry().with_resource(
        "urn:spec", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    pointer = (
        "#/paths/~1v1~1admin~1api-keys~1{key_id}/patch/requestBody/content/application~1json/schema"
    )
    jsonschema.Draft202012Validator({"$ref": f"urn:spec{pointer}"}, registry=registry).validate(
        body
    )
    return body


def key_id_of(api: Api, tenant_id: str) -> str:
    keys = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": tenant_id})["keys"]
    return str(keys[0]["key_id"])


def test_patch_changes_the_key_and_its_permissions_take_effect(api: Api) -> None:
    secret = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    kid = key_id_of(api, "acme")
    h = {"X-Cycles-API-Key": secret}
    assert api.client.get("/v1/balances", params={"tenant": "acme"}, headers=h).status_code == 200
    body = valid_patch_body({"name": "renamed", "description": "ops", "metadata": {"team": "x"},
                             "permissions": ["reservations:create"]})  # fmt: skip
    changed = valid("ApiKey", api.admin("PATCH", f"/v1/admin/api-keys/{kid}", 200, json=body))
    assert (changed["name"], changed["description"], changed["permissions"]) == (
        "renamed", "ops", ["reservations:create"],
    )  # fmt: skip
    assert changed["metadata"] == {"team": "x"}
    # the next request sees the new permissions (the auth cache dropped the old ones)
    assert api.client.get("/v1/balances", params={"tenant": "acme"}, headers=h).status_code == 403
    listed = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": "acme"})["keys"]
    assert listed[0]["name"] == "renamed"
    events = api.admin("GET", "/v1/admin/events", 200, params={
        "tenant_id": "acme", "event_type": "api_key.permissions_changed"})["events"]  # fmt: skip
    assert len(events) == 1
    valid("Event", events[0])
    assert events[0]["data"]["permissions"] == ["reservations:create"]
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})["logs"]
    [entry] = [e for e in logs if e["operation"] == "updateApiKey"]
    assert (entry["resource_type"], entry["resource_id"]) == ("api_key", kid)
    assert entry["metadata"]["changed_fields"] == ["description", "metadata", "name", "permissions"]
    # a rename alone changes no permissions: no second event
    api.admin("PATCH", f"/v1/admin/api-keys/{kid}", 200, json={"name": "again"})
    again = api.admin("GET", "/v1/admin/events", 200, params={
        "tenant_id": "acme", "event_type": "api_key.permissions_changed"})["events"]  # fmt: skip
    assert len(again) == 1


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
        ({"tenant_id": "other"}, "tenant_id"),
        ({"permissions": ["reservations:fly"]}, "permissions"),
        ({"name": "n" * 257}, "name"),
        ({"name": None}, "name"),
        ({"scope_filter": "tenant:acme"}, "scope_filter"),
    ],
)
def test_patch_bad_input_is_a_400_naming_it(api: Api, body: dict[str, Any], named: str) -> None:
    api.tenant("acme")
    kid = key_id_of(api, "acme")
    refused = api.admin("PATCH", f"/v1/admin/api-keys/{kid}", 400, json=body)
    valid("ErrorResponse", refused)
    assert named in refused["message"] + str(refused.get("details", ""))


def test_patch_refuses_unknown_and_revoked_keys_and_tenant_keys(api: Api) -> None:
    secret = api.tenant("acme")
    kid = key_id_of(api, "acme")
    h = {"X-Cycles-API-Key": secret}
    forbidden = api.client.request(
        "PATCH", f"/v1/admin/api-keys/{kid}", json={"name": "x"}, headers=h
    )
    assert forbidden.status_code == 403
    assert api.admin("PATCH", "/v1/admin/api-keys/key_nope", 404, json={"name": "x"})
    api.admin("DELETE", f"/v1/admin/api-keys/{kid}", 200)
    revoked = api.admin("PATCH", f"/v1/admin/api-keys/{kid}", 409, json={"name": "x"})
    assert revoked["error"] == "KEY_REVOKED"
    valid("ErrorResponse", revoked)


def test_validate_answers_for_each_kind_of_key(api: Api) -> None:
    secret = api.tenant("acme")
    kid = key_id_of(api, "acme")

    def check(secret: str) -> dict[str, Any]:
        body = valid("ApiKeyValidationRequest", {"key_secret": secret})
        return dict(valid("ApiKeyValidationResponse",
                          api.admin("POST", "/v1/auth/validate", 200, json=body)))  # fmt: skip

    ok = check(secret)
    assert (ok["valid"], ok["tenant_id"], ok["key_id"]) == (True, "acme", kid)
    assert "reservations:create" in ok["permissions"]
    assert "expires_at" in ok
    assert check("cyc_live_unknown")["reason"] == "NOT_FOUND"
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "SUSPENDED"})
    assert check(secret) == {"valid": False, "tenant_id": "acme", "key_id": kid,
                             "reason": "TENANT_SUSPENDED"}  # fmt: skip
    api.admin("DELETE", f"/v1/admin/api-keys/{kid}", 200)
    assert check(secret)["reason"] == "REVOKED"
    other = {"X-Cycles-API-Key": api.tenant("beta")}
    refused = api.client.post("/v1/auth/validate", json={"key_secret": secret}, headers=other)
    assert refused.status_code == 403
    missing = api.admin("POST", "/v1/auth/validate", 400, json={})
    assert "key_secret" in str(missing)


def test_get_one_event_by_id(api: Api) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    listed = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": "acme"})["events"]
    assert listed
    for event in listed:
        got = api.admin("GET", f"/v1/admin/events/{event['event_id']}", 200)
        assert got == valid("Event", event)
    first = listed[0]["event_id"]
    unknown = first[:16] + "0" * (len(first) - 16)
    for missing in (unknown, "evt_zz", "nothing"):
        refused = api.admin("GET", f"/v1/admin/events/{missing}", 404)
        assert refused["error"] == "EVENT_NOT_FOUND"
        valid("ErrorResponse", refused)
    assert api.client.get(f"/v1/admin/events/{first}").status_code == 401


def test_store_update_without_an_audit_entry_still_changes_the_key(api: Api, store: Store) -> None:
    api.tenant("acme")
    kid = key_id_of(api, "acme")
    row = api.client.run(store.update_api_key(kid, {"name": "plain"}))
    assert row.name == "plain"
    assert api.client.run(store.update_api_key(kid, {"name": "plain"})).name == "plain"
    listed = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": "acme"})["keys"]
    assert listed[0]["name"] == "plain"
