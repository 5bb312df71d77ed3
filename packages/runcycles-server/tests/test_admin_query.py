"""Input hygiene of the admin plane, driven by the governance spec.

For every admin route this server serves, every query parameter the spec declares gets each
kind of invalid value its schema implies (outside an enum, not an integer, below the minimum,
above the maximum, too long, not matching the pattern, too many items, not a date-time, not a
boolean) plus a control character, and must be refused with 400 ``INVALID_REQUEST`` naming the
parameter; valid values of the read routes must not be. The values come from the spec file, so
a parameter added to the spec without a validator fails here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import pytest
from starlette.routing import Route

from runcycles.testing.spec import load_spec, schema_validator
from runcycles_server import admin, events_api, governance_api
from runcycles_server.app import create_app
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.web import CLIENT_CLOSED_REQUEST
from runcycles_server.webhooks import api as webhooks_api

if TYPE_CHECKING:
    from conftest import Api

GOVERNANCE = "cycles-governance-admin-v0.1.25.yaml"
U = "USD_MICROCENTS"
REQUIRED_CONTEXT = {"scope": "tenant:acme", "unit": U, "tenant_id": "acme"}
"""Valid values for the parameters a route requires, so the one under test is the bad one."""


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _served() -> set[tuple[str, str]]:
    app = create_app(MemoryStore(), admin_api_key="k", sweep_interval_s=None)
    return {
        (method, route.path)
        for route in app.router.routes
        if isinstance(route, Route) and route.path.startswith("/v1/admin/")
        for method in route.methods or ()
        if method != "HEAD"
    }


def _spec_params() -> list[tuple[str, str, str, dict[str, Any], bool]]:
    """``(method, path, name, schema, required)`` of every query parameter of a served route."""
    spec = load_spec(GOVERNANCE)
    served = _served()
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or (method.upper(), path) not in served:
                continue
            for raw in [*item.get("parameters", []), *operation.get("parameters", [])]:
                param = _resolve(spec, raw)
                if param["in"] == "query":
                    schema = _resolve(spec, param["schema"])
                    if schema.get("type") == "array":
                        schema = {**schema, "items": _resolve(spec, schema["items"])}
                    found.append(
                        (method.upper(), path, param["name"], schema, param.get("required", False))
                    )
    return found


SPEC_PARAMS = _spec_params()


def invalid_values(schema: dict[str, Any]) -> list[str | list[str]]:
    """Values that violate ``schema`` (as query strings), one per constraint it declares."""
    bad: list[str | list[str]] = ["ok\x00nul", "esc\x1b[0m"]  # control characters, always
    kind = schema.get("type")
    if "enum" in schema:
        bad.append("NOT_" + str(schema["enum"][0]))
    if kind in ("integer", "number"):
        bad += ["abc", "nan", "inf"]
        if kind == "integer":
            bad.append("1.5")
        if "minimum" in schema:
            bad.append(str(schema["minimum"] - 1))
        if "maximum" in schema:
            bad.append(str(schema["maximum"] + (1 if kind == "integer" else 0.5)))
    if kind == "boolean":
        bad.append("maybe")
    if "maxLength" in schema:
        bad.append("x" * (schema["maxLength"] + 1))
    if "pattern" in schema:
        bad.append("zz")
    if schema.get("format") == "date-time":
        bad.append("yesterday")
    if kind == "array" and "maxItems" in schema:
        bad.append([f"v{i}" for i in range(schema["maxItems"] + 1)])
    return bad


def valid_value(schema: dict[str, Any]) -> str:
    """A value ``schema`` accepts."""
    if "enum" in schema:
        return str(schema["enum"][-1])
    kind = schema.get("type")
    if kind == "integer":
        return str(schema.get("maximum", schema.get("minimum", 50)))
    if kind == "number":
        return str(schema.get("maximum", 0.5))
    if kind == "boolean":
        return "false"
    if "pattern" in schema:
        return "0123456789abcdef" * 2
    if schema.get("format") == "date-time":
        return "2026-01-31T12:00:00Z"
    if "maxLength" in schema:
        return "x" * int(schema["maxLength"])
    return "tenant:acme" if schema.get("type") == "string" else "v"


CASES = [
    pytest.param(method, path, name, value, required, id=f"{method} {path} {name}={value!r:.20}")
    for method, path, name, schema, required in SPEC_PARAMS
    for value in invalid_values(schema)
]


def test_every_spec_query_parameter_has_a_validator() -> None:
    declared = {(m, p, n) for m, p, n, _, _ in SPEC_PARAMS}
    routes = {(m, p) for m, p, _, _, _ in SPEC_PARAMS}
    rules = {
        **admin.QUERY_PARAMS,
        **governance_api.QUERY_PARAMS,
        **events_api.QUERY_PARAMS,
        **webhooks_api.QUERY_PARAMS,
    }
    validated = {(m, p, n) for (m, p), params in rules.items() if (m, p) in routes for n in params}
    assert declared == validated
    assert len(declared) == 94  # the spec's admin lists; a parse slip would show here
    assert len(CASES) >= 150


@pytest.mark.parametrize("store", ["memory"], indirect=True)
@pytest.mark.parametrize(("method", "path", "name", "value", "required"), CASES)
def test_an_invalid_query_value_is_a_400_naming_the_parameter(
    api: Api, method: str, path: str, name: str, value: str | list[str], required: bool
) -> None:
    params: dict[str, Any] = {k: v for k, v in REQUIRED_CONTEXT.items() if k != name}
    params[name] = value
    url = path.replace("{key_id}", "key_unknown").replace("{tenant_id}", "acme")
    response = api.client.request(
        method, url, params=params, headers=api.admin_headers, json={} if method != "GET" else None
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "INVALID_REQUEST"
    assert f"query parameter {name} " in body["message"], body["message"]
    schema_validator("ErrorResponse", GOVERNANCE).validate(body)


@pytest.mark.parametrize("store", ["memory"], indirect=True)
def test_valid_query_values_are_accepted(api: Api) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    checked = 0
    for method, path, name, schema, _ in SPEC_PARAMS:
        if method not in ("GET", "DELETE") or name == "cursor":
            continue  # the others need a body; a cursor is opaque (only the server's own work)
        params = {**REQUIRED_CONTEXT, name: valid_value(schema)}
        url = path.replace("{key_id}", "key_unknown")
        response = api.client.request(method, url, params=params, headers=api.admin_headers)
        assert response.status_code in (200, 404), (method, path, name, response.text)
        checked += 1
    assert checked >= 45


@pytest.mark.parametrize("store", ["memory"], indirect=True)
def test_a_revoke_reason_is_at_most_512_characters(api: Api) -> None:
    api.tenant("acme")
    key = api.admin("POST", "/v1/admin/api-keys", 201, json={"tenant_id": "acme", "name": "k"})
    url = f"/v1/admin/api-keys/{key['key_id']}"
    too_long = api.client.request(
        "DELETE", url, params={"reason": "r" * 600}, headers=api.admin_headers
    )
    assert too_long.status_code == 400, too_long.text
    assert "query parameter reason must be at most 512 characters, not 600" in too_long.text
    listed = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": "acme"})
    assert [k["status"] for k in listed["keys"]] == ["ACTIVE", "ACTIVE"]  # nothing revoked
    revoked = api.client.request(
        "DELETE", url, params={"reason": "r" * 512}, headers=api.admin_headers
    )
    assert revoked.status_code == 200, revoked.text
    listed = api.admin("GET", "/v1/admin/api-keys", 200, params={"tenant_id": "acme"})
    schema_validator("ApiKeyListResponse", GOVERNANCE).validate(listed)
    assert sorted(len(k.get("revoked_reason", "")) for k in listed["keys"]) == [0, 512]


# -- control characters in ids and names ---------------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_runtime_ids_and_names_are_named(
    api: Api, acme: str, char: str
) -> None:
    base = {
        "idempotency_key": "k1",
        "subject": {"tenant": "acme", "dimensions": {"team": "a"}},
        "action": {"kind": "llm.completion", "name": "gpt"},
        "estimate": {"unit": U, "amount": 1},
    }
    for field, body in [
        ("idempotency_key", {**base, "idempotency_key": f"k{char}1"}),
        ("action.name", {**base, "action": {"kind": "llm.completion", "name": f"g{char}pt"}}),
        ("action.kind", {**base, "action": {"kind": f"llm{char}", "name": "gpt"}}),
        (
            "subject.dimensions.team",
            {**base, "subject": {"tenant": "acme", "dimensions": {"team": f"a{char}"}}},
        ),
    ]:
        for path in ("/v1/reservations", "/v1/decide"):
            response = api.post(acme, path, body)
            assert response.status_code == 400, (path, field, response.text)
            message = response.json()["message"]
            assert message.startswith(f"{field} contains a control character (U+{ord(char):04X}")
    assert api.balance(acme, "tenant:acme")["reserved"]["amount"] == 0  # nothing was held
    # free text may hold control characters such as newlines
    ok = api.post(acme, "/v1/reservations", {**base, "metadata": {"note": "a\nb"}})
    assert ok.status_code == 200, ok.text


def test_control_characters_in_admin_ids_and_names_are_named(api: Api) -> None:
    for body, field in [
        ({"tenant_id": "acme", "name": "Acme\x00"}, "name"),
        ({"tenant_id": "acme", "name": "Acme", "parent_tenant_id": "p\x1b"}, "parent_tenant_id"),
    ]:
        response = api.client.post("/v1/admin/tenants", json=body, headers=api.admin_headers)
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith(f"{field} contains a control character")
    api.tenant("acme")
    response = api.client.post(
        "/v1/admin/api-keys",
        json={"tenant_id": "acme", "name": "bot\x07"},
        headers=api.admin_headers,
    )
    assert response.status_code == 400
    assert response.json()["message"].startswith("name contains a control character (U+0007")
    for url, field in [
        ("/v1/admin/tenants/ac%00me", "tenant_id"),
        ("/v1/admin/api-keys/key_%1B", "key_id"),
    ]:
        method = "GET" if "tenants" in url else "DELETE"
        response = api.client.request(method, url, headers=api.admin_headers)
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith(f"{field} contains a control character")


def test_control_characters_in_a_reservation_id_are_named(api: Api, acme: str) -> None:
    headers = {"X-Cycles-API-Key": acme}
    response = api.client.get("/v1/reservations/rsv_%00", headers=headers)
    assert response.status_code == 400
    assert response.json()["message"].startswith("reservation_id contains a control character")
    response = api.client.get(
        "/v1/reservations", params={"tenant": "acme", "agent": "a\x00"}, headers=headers
    )
    assert response.status_code == 400
    assert "query parameter agent contains a control character" in response.text


# -- a client that hangs up mid-body -------------------------------------------------------------


async def _hang_up_mid_body(app: Any, method: str, path: str, query: bytes, key: str) -> list[Any]:
    sent: list[Any] = []
    messages = [
        {"type": "http.request", "body": b'{"idempotency_key": "k", "subj', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Any:
        await asyncio.sleep(0)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"content-type", b"application/json"), (b"x-cycles-api-key", key.encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("POST", "/v1/reservations", b""),  # a hot route (dispatched directly)
        ("POST", "/v1/reservations/rsv_x/commit", b""),  # a hot route with a path parameter
        ("POST", "/v1/admin/budgets/fund", b"scope=tenant:acme&unit=USD_MICROCENTS"),  # router
    ],
)
def test_a_client_that_hangs_up_mid_body_is_not_a_500_nor_an_error(
    api: Api, acme: str, caplog: pytest.LogCaptureFixture, method: str, path: str, query: bytes
) -> None:
    app = api.client._client._transport.app  # type: ignore[attr-defined]
    with caplog.at_level(logging.DEBUG, logger="runcycles_server"):
        sent = api.client.run(_hang_up_mid_body(app, method, path, query, acme))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [CLIENT_CLOSED_REQUEST]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("client disconnected" in r.getMessage() for r in caplog.records)
    assert api.balance(acme, "tenant:acme")["reserved"]["amount"] == 0
