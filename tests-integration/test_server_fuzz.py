"""Bad input end to end: schemathesis against the spec, plus hand-written malformed requests.

The schemathesis run drives ``st run`` (its CLI, in a subprocess) against a real server process
for each store, with ``spec/cycles-protocol-v0.yaml`` and its v0.1.26 extensions applied
(``extended_spec("runtime")``: a ``DENY`` decision carries ``deny_detail``, which the base
``DecisionResponse`` alone forbids) and a provisioned tenant's key. It runs
every check except ``positive_data_acceptance``: this server is legitimately stricter than the
schema alone can say (subject values outside ``[a-zA-Z0-9_.-]``, which the spec lets servers
refuse; ``X-Idempotency-Key`` differing from the body key; a unit that does not match the
reservation; ``from`` later than ``to``; balances without any subject filter; ``5.0`` for an
integer). ``schemathesis_hooks.py`` steers most generated cases onto the tenant's real data
and documents the one filtered deviation (explicit ``null`` for an optional field means
"absent").

The public evidence routes (``/v1/evidence/{id}``, ``/v1/.well-known/cycles-jwks.json``) are
in the run too, and checked by hand below (malformed id 400, unknown id 404, the JWK Set).

A second run covers the governance (admin) spec, ``spec/cycles-governance-admin-v0.1.25.yaml``
with its v0.1.26 extensions applied (``runcycles.testing.spec.extended_spec("admin")``: the
extended ``Policy`` and ``Tenant`` this server returns), with the admin key, over every
operation this server implements (:data:`ADMIN_OPERATIONS`), policies included, with the same
checks; the deviations its hooks filter (and why) are listed in ``schemathesis_hooks.py``. A
third run covers the action-kind spec (``spec/cycles-action-kinds-v0.1.26.yaml``): the public
registry and the quota counters (:data:`ACTION_KIND_OPERATIONS`). Set
``CYCLES_FUZZ_FILTER_LOG=/some/file`` to see every filtered failure of a run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles.testing.spec import extended_spec
from runcycles_server.testing import ProvisionedTenant, ServerProcess, redis_url_for_tests

U = "USD_MICROCENTS"
JSON = "application/json"
REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "spec" / "cycles-protocol-v0.yaml"
ACTION_KINDS_SPEC = REPO / "spec" / "cycles-action-kinds-v0.1.26.yaml"
HOOKS_DIR = Path(__file__).resolve().parent
# Every check but ``positive_data_acceptance`` (schema-valid requests this server refuses):
# runtime, see the module docstring; admin, it refuses on purpose a ``limit`` over 100 where the
# spec leaves it open, non-string tenant ``metadata`` values on update (the spec's ``Tenant``
# could not return them), control characters in ids and names, a cursor it did not issue, and
# valid requests naming tenants, keys or budgets that do not exist (404).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
]
MAX_EXAMPLES = int(os.environ.get("CYCLES_FUZZ_MAX_EXAMPLES", "25"))
ADMIN_MAX_EXAMPLES = int(os.environ.get("CYCLES_FUZZ_ADMIN_MAX_EXAMPLES", "20"))
"""The admin run has 16 operations to the runtime run's 9: fewer examples each keep the two
stores' admin runs to about 90 s of CI time together."""
SEED = os.environ.get("CYCLES_FUZZ_SEED", "20261122")


def _redis_problem() -> str | None:
    import redis

    try:
        client = redis.Redis.from_url(redis_url_for_tests(), socket_connect_timeout=1)
        client.ping()
        client.close()
        return None
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"


def reserve_body(tenant: str, key: str, amount: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
        **extra,
    }


@pytest.fixture
def http(tenant: ProvisionedTenant) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=tenant.server.base_url,
        headers={"X-Cycles-API-Key": tenant.api_key},
        timeout=10,
    ) as client:
        yield client


# ------------------------------------------------------------------------------ schemathesis


def _junit_totals(report_dir: Path) -> dict[str, int]:
    (report,) = report_dir.glob("*.xml")
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for suite in suites:
        for name in totals:
            totals[name] += int(suite.get(name, "0"))
    return totals


def _extended_spec(tmp_path: Path, plane: str) -> Path:
    """Write a base spec with its v0.1.26 extensions applied as one file for ``st run``."""
    path = tmp_path / f"cycles-{plane}-extended.json"
    path.write_text(json.dumps(extended_spec(plane)))
    return path


def _schemathesis(
    server: ServerProcess,
    tmp_path: Path,
    spec: Path,
    auth_header: str,
    extra_env: dict[str, str],
    selection: list[str],
    max_examples: int = MAX_EXAMPLES,
) -> tuple[str, dict[str, int]]:
    """Run ``st run`` on ``spec`` against ``server``; return its output and JUnit totals."""
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS_DIR), os.environ.get("PYTHONPATH")])),
        "CYCLES_SPEC_DIR": str(spec.parent),
        "CYCLES_FUZZ_SPEC": spec.name,
        "NO_COLOR": "1",
        **extra_env,
    }
    report_dir = tmp_path / "report"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", str(spec)),
        *("--url", server.base_url),
        *("-H", auth_header),
        *("--checks", ",".join(CHECKS)),
        *selection,
        *("--max-examples", str(max_examples)),
        *("--seed", SEED),
        "--no-shrink",
        *("--output-sanitize", "false"),  # show failing values (the keys are throwaways)
        *("--request-timeout", "10"),
        *("--report", "junit", "--report-dir", str(report_dir)),
    ]
    # cwd: schemathesis keeps caches in the working directory; keep them out of the repo.
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found problems:\n{output[-20000:]}"
    totals = _junit_totals(report_dir)
    assert totals["failures"] == totals["errors"] == 0, totals
    return output, totals


@pytest.mark.slow
def test_schemathesis_finds_no_spec_violation(server: ServerProcess, tmp_path: Path) -> None:
    tenant = server.provision(budget=10**15)
    for unit in ("TOKENS", "CREDITS", "RISK_POINTS"):
        tenant.add_budget(10**15, unit=unit)
    with tenant.client() as client:
        pool = [
            client.create_reservation(reserve_body(tenant.tenant_id, f"pool-{i}", ttl_ms=600_000))
            .raise_for_error()
            .data.reservation_id
            for i in range(60)
        ]
    output, totals = _schemathesis(
        server,
        tmp_path,
        _extended_spec(tmp_path, "runtime"),
        f"X-Cycles-API-Key: {tenant.api_key}",
        {
            "CYCLES_FUZZ_TENANT": tenant.tenant_id,
            "CYCLES_FUZZ_RESERVATION_IDS": json.dumps(pool),
            "CYCLES_SPEC_DIR": str(SPEC.parent),
            "CYCLES_FUZZ_SPEC": "extended:runtime",
        },
        [],
    )
    assert "Tested: 11" in output, output[-5000:]  # every runtime operation, evidence included
    assert totals["tests"] >= 11, totals


ADMIN_OPERATIONS = [
    *("createTenant", "listTenants", "getTenant", "updateTenant"),
    *("createApiKey", "listApiKeys", "revokeApiKey", "introspectAuth"),
    *("createBudget", "listBudgets", "lookupBudget", "updateBudget", "fundBudget"),
    *("freezeBudget", "unfreezeBudget", "listAuditLogs", "getAdminOverview"),
    *("createWebhookSubscription", "listWebhookSubscriptions", "getWebhookSubscription"),
    *("updateWebhookSubscription", "deleteWebhookSubscription", "testWebhookSubscription"),
    *("listWebhookDeliveries", "replayEvents", "bulkActionWebhooks"),
    *("getWebhookSecurityConfig", "updateWebhookSecurityConfig"),
    *("bulkActionTenants", "bulkActionBudgets", "updateApiKey", "validateApiKey"),
    *("listEvents", "getEvent", "createPolicy", "listPolicies", "updatePolicy"),
]
"""The governance-spec operations fuzzed here: every one this server serves, except the
tenant-plane webhook routes (their own auth), the tenant event listing and ``GET /v1/balances``,
whose runtime contract is the protocol spec's (run above), not this spec's differing copy.
``test_spec_routes.py`` checks that all 46 operations are routed."""


@pytest.mark.slow
def test_schemathesis_admin_spec_finds_no_spec_violation(
    server: ServerProcess, tmp_path: Path
) -> None:
    tenant = server.provision(budget=10**15)
    for unit in ("TOKENS", "CREDITS", "RISK_POINTS"):
        tenant.add_budget(10**15, unit=unit)
    policies = [
        server.admin(
            "POST",
            "/v1/admin/policies",
            json={
                "tenant_id": tenant.tenant_id,
                "name": f"fuzz-{i}",
                "scope_pattern": f"tenant:{tenant.tenant_id}",
            },
        )["policy_id"]
        for i in range(5)
    ]
    output, totals = _schemathesis(
        server,
        tmp_path,
        _extended_spec(tmp_path, "admin"),
        f"X-Admin-API-Key: {server.admin_key}",
        {
            "CYCLES_FUZZ_TENANT": tenant.tenant_id,
            "CYCLES_FUZZ_ADMIN_KEY": server.admin_key,
            "CYCLES_FUZZ_POLICY_IDS": json.dumps(policies),
            "CYCLES_SPEC_DIR": str(SPEC.parent),
            "CYCLES_FUZZ_SPEC": "extended:admin",
        },
        ["--include-operation-id-regex", f"^({'|'.join(ADMIN_OPERATIONS)})$"],
        ADMIN_MAX_EXAMPLES,
    )
    assert f"Tested: {len(ADMIN_OPERATIONS)}" in output, output[-5000:]
    assert totals["tests"] >= len(ADMIN_OPERATIONS), totals


ACTION_KIND_OPERATIONS = [
    *("listActionKinds", "getActionKind"),
    *("listActionQuotaCounters", "resetActionQuotaCounter"),
]
"""Every operation of the action-kind spec (this server implements them all)."""


@pytest.mark.slow
def test_schemathesis_action_kinds_spec_finds_no_spec_violation(
    server: ServerProcess, tmp_path: Path
) -> None:
    tenant = server.provision(budget=10**15)
    output, totals = _schemathesis(
        server,
        tmp_path,
        ACTION_KINDS_SPEC,
        f"X-Admin-API-Key: {server.admin_key}",
        {"CYCLES_FUZZ_TENANT": tenant.tenant_id, "CYCLES_FUZZ_ADMIN_KEY": server.admin_key},
        [],
        ADMIN_MAX_EXAMPLES,
    )
    assert f"Tested: {len(ACTION_KIND_OPERATIONS)}" in output, output[-5000:]
    assert totals["tests"] >= len(ACTION_KIND_OPERATIONS), totals


def test_evidence_routes_answer_cleanly_without_a_key(http: httpx.Client) -> None:
    malformed = http.get("/v1/evidence/ev_123")
    assert_error(malformed, 400, "INVALID_REQUEST", "64 lower-case hex")
    unknown = http.get("/v1/evidence/" + "0" * 64)
    assert_error(unknown, 404, "NOT_FOUND", "retry")
    jwks = http.get("/v1/.well-known/cycles-jwks.json")
    assert jwks.status_code == 200, jwks.text
    assert [key["kty"] for key in jwks.json()["keys"]] == ["OKP"]


# ------------------------------------------------------------------------------ hand-written


def assert_error(response: httpx.Response, status: int, code: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    message = body["message"].lower()
    for needle in needles:
        assert needle.lower() in message, f"{needle!r} not in {body['message']!r}"


def test_invalid_json_names_the_body(http: httpx.Client) -> None:
    response = http.post(
        "/v1/reservations", content=b'{"idempotency_key": "k",', headers={"content-type": JSON}
    )
    assert_error(response, 400, "INVALID_REQUEST", "not valid JSON")


def test_a_json_array_body_must_be_an_object(http: httpx.Client, tenant: ProvisionedTenant) -> None:
    response = http.post("/v1/reservations", json=[reserve_body(tenant.tenant_id, "k")])
    assert_error(response, 400, "INVALID_REQUEST", "body", "must be a JSON object")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/reservations", "reserve"),
        ("/v1/decide", "reserve"),
        ("/v1/events", "event"),
        (
            "/v1/reservations/{rid}/commit",
            {"idempotency_key": "c", "actual": {"unit": U, "amount": 1}},
        ),
        ("/v1/reservations/{rid}/release", {"idempotency_key": "r"}),
        ("/v1/reservations/{rid}/extend", {"idempotency_key": "e", "extend_by_ms": 1000}),
    ],
)
def test_unknown_fields_are_named(
    http: httpx.Client, tenant: ProvisionedTenant, path: str, body: Any
) -> None:
    rid = http.post("/v1/reservations", json=reserve_body(tenant.tenant_id, "live")).json()[
        "reservation_id"
    ]
    if body == "reserve":
        payload = reserve_body(tenant.tenant_id, "x")
    elif body == "event":
        payload = {**reserve_body(tenant.tenant_id, "x"), "actual": {"unit": U, "amount": 1}}
        del payload["estimate"]
    else:
        payload = dict(body)
    payload["estimat_typo"] = 1
    response = http.post(path.format(rid=rid), json=payload)
    assert_error(response, 400, "INVALID_REQUEST", "estimat_typo", "unknown field")
    # nothing was applied: the reservation is untouched and the budget only holds it
    assert http.get(f"/v1/reservations/{rid}").json()["status"] == "ACTIVE"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("ttl_ms", "60s", "ttl_ms"),
        ("estimate", {"unit": U, "amount": "five"}, "estimate.amount"),
        ("estimate", {"unit": "EUROS", "amount": 5}, "estimate.unit"),
        ("subject", "tenant-a", "subject"),
        ("ttl_ms", 10, "ttl_ms"),
        ("grace_period_ms", 60_001, "grace_period_ms"),
        ("idempotency_key", "", "idempotency_key"),
    ],
)
def test_wrong_types_and_ranges_are_named(
    http: httpx.Client, tenant: ProvisionedTenant, field: str, value: Any, needle: str
) -> None:
    body = {**reserve_body(tenant.tenant_id, "k"), field: value}
    assert_error(http.post("/v1/reservations", json=body), 400, "INVALID_REQUEST", needle)


def test_a_1_mb_body_is_refused_with_413(http: httpx.Client, tenant: ProvisionedTenant) -> None:
    body = reserve_body(tenant.tenant_id, "big", metadata={"blob": "x" * 1_048_576})
    assert_error(http.post("/v1/reservations", json=body), 413, "INVALID_REQUEST", "byte limit")
    # the same without a Content-Length header (chunked upload) is refused too
    chunks = iter([json.dumps(body).encode()[i : i + 65536] for i in range(0, 1_100_000, 65536)])
    response = http.post("/v1/reservations", content=chunks, headers={"content-type": JSON})
    assert_error(response, 413, "INVALID_REQUEST", "byte limit")
    # and nothing was reserved
    rows = http.get("/v1/reservations").json()["reservations"]
    assert rows == []


def test_a_129_character_reservation_id_is_refused(http: httpx.Client) -> None:
    for method, path in [("GET", ""), ("POST", "/release")]:
        response = http.request(
            method, f"/v1/reservations/{'r' * 129}{path}", json={"idempotency_key": "k"}
        )
        assert_error(response, 400, "INVALID_REQUEST", "reservation_id", "128")
    response = http.get(f"/v1/reservations/{'r' * 128}")
    assert_error(response, 404, "NOT_FOUND", "r" * 128)


def test_odd_reservation_ids_are_not_found_not_errors(http: httpx.Client) -> None:
    # an encoded '/' is decoded by the HTTP layer, so no route matches: a clean 404
    response = http.get("/v1/reservations/rsv%2F..%2Fx")
    assert_error(response, 404, "NOT_FOUND", "/v1/reservations/rsv/../x")
    for rid in ("résa-ünïcode", "rsv%20space", "💸"):
        response = http.get(f"/v1/reservations/{rid}")
        assert_error(response, 404, "NOT_FOUND", "does not exist")
        response = http.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": "k"})
        assert_error(response, 404, "NOT_FOUND", "does not exist")
    # a control character is never part of an id: a 400 naming the field
    for rid in ("rsv_%00", "rsv_%1B", "rsv_%7F"):
        response = http.get(f"/v1/reservations/{rid}")
        assert_error(response, 400, "INVALID_REQUEST", "reservation_id contains a control")
        response = http.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": "k"})
        assert_error(response, 400, "INVALID_REQUEST", "reservation_id contains a control")


def test_missing_and_wrong_api_keys_are_401(tenant: ProvisionedTenant) -> None:
    url = f"{tenant.server.base_url}/v1/reservations"
    body = reserve_body(tenant.tenant_id, "k")
    assert_error(httpx.post(url, json=body), 401, "UNAUTHORIZED", "missing X-Cycles-API-Key")
    response = httpx.post(url, json=body, headers={"X-Cycles-API-Key": tenant.api_key + "x"})
    assert_error(response, 401, "UNAUTHORIZED", "not a valid API key")
    response = httpx.get(url, headers={"X-Cycles-API-Key": "cyc_live_" + "A" * 32})
    assert_error(response, 401, "UNAUTHORIZED", "not a valid API key")
    # a wrong admin key on an admin-or-tenant route is refused even with a valid tenant key
    response = httpx.get(
        url, headers={"X-Cycles-API-Key": tenant.api_key, "X-Admin-API-Key": "nope"}
    )
    assert_error(response, 401, "UNAUTHORIZED", "X-Admin-API-Key")


def test_an_unsupported_method_is_405_with_allow(http: httpx.Client) -> None:
    response = http.request("DELETE", "/v1/reservations")
    assert_error(response, 405, "INVALID_REQUEST", "DELETE", "not allowed")
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


@pytest.mark.parametrize(
    ("path", "param", "value"),
    [
        ("/v1/reservations", "sort_by", "cost"),
        ("/v1/reservations", "sort_dir", "up"),
        ("/v1/reservations", "status", "DONE"),
        ("/v1/reservations", "limit", "0"),
        ("/v1/reservations", "from", "yesterday"),
        ("/v1/balances", "include_children", "20227"),
        ("/v1/balances", "limit", "201"),
        ("/v1/reservations", "idempotency_key", "k" * 257),
    ],
)
def test_bad_query_values_are_named(
    http: httpx.Client, tenant: ProvisionedTenant, path: str, param: str, value: str
) -> None:
    response = http.get(path, params={"tenant": tenant.tenant_id, param: value})
    assert_error(response, 400, "INVALID_REQUEST", param)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_client_hanging_up_mid_body_is_a_499_not_an_error(store: str, tmp_path: Path) -> None:
    if store == "redis":
        problem = _redis_problem()
        if problem is not None:
            from runcycles_server.stores.redis_testing import redis_unavailable

            redis_unavailable(problem)
    # log level info: the access log is on, and an ERROR or a traceback would show
    with ServerProcess.start(store=store, extra_args=["--log-level", "info"]) as server:  # type: ignore[arg-type]
        tenant = server.provision(budget=1_000)
        paths = ["/v1/reservations", "/v1/reservations/rsv_x/commit", "/v1/admin/budgets/fund"]
        query = f"scope=tenant:{tenant.tenant_id}&unit={U}&tenant_id={tenant.tenant_id}"
        for path in paths:
            auth = (
                f"X-Admin-API-Key: {server.admin_key}"
                if "admin" in path
                else f"X-Cycles-API-Key: {tenant.api_key}"
            )
            with socket.create_connection((server.host, server.port), timeout=5) as sock:
                head = (
                    f"POST {path}?{query} HTTP/1.1\r\nHost: {server.host}\r\n"
                    f"Content-Type: application/json\r\n{auth}\r\nContent-Length: 500\r\n\r\n"
                )
                sock.sendall(head.encode() + b'{"idempotency_key": "k", "sub')
                time.sleep(0.2)  # the server is reading the body when the client goes
        deadline = time.monotonic() + 5
        while server.log_text().count('"status":499') < len(paths) and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log_text()
        # still serving, nothing held
        with tenant.client() as client:
            balance = client.get_balances(tenant=tenant.tenant_id).raise_for_error().data
        assert balance.balances[0].reserved is not None
        assert balance.balances[0].reserved.amount == 0
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    hung_up = [line for line in lines if line["status"] == 499]
    assert sorted(line["path"] for line in hung_up) == sorted(
        ["/v1/reservations", "/v1/reservations/{reservation_id}/commit", "/v1/admin/budgets/fund"]
    ), log
    assert not [line for line in lines if line["status"] >= 500], log
    assert "Traceback" not in log
    assert "ERROR" not in log
    assert "unhandled error" not in log
