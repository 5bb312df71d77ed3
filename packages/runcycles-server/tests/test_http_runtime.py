"""Runtime API behaviour through the ASGI app (every test runs against each store)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest

from runcycles.models import (
    BalanceResponse,
    CommitResponse,
    DecisionResponse,
    ErrorResponse,
    EventCreateResponse,
    ReleaseResponse,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendResponse,
    ReservationListResponse,
    parse_response,
)

if TYPE_CHECKING:
    from conftest import Api, Counter, FakeClock, SyncClient

U = "USD_MICROCENTS"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def reservation_body(key: str, amount: int = 100, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "idempotency_key": key,
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": {"unit": U, "amount": amount},
    }
    body.update(extra)
    return body


def reserve(
    api: Api, key: str, idem: str, amount: int = 100, expect: int = 200, **extra: Any
) -> dict[str, Any]:
    response = api.post(key, "/v1/reservations", reservation_body(idem, amount, **extra))
    assert response.status_code == expect, response.text
    return dict(response.json())


def assert_error(response: Any, status: int, code: str) -> ErrorResponse:
    assert response.status_code == status, response.text
    error = parse_response(ErrorResponse, response.json())
    assert error.error == code
    assert set(response.json()) <= {"error", "message", "request_id", "trace_id", "details"}
    assert error.request_id == response.headers["x-request-id"]
    assert error.trace_id == response.headers["x-cycles-trace-id"]
    assert error.trace_id is not None
    assert re.fullmatch(r"[0-9a-f]{32}", error.trace_id)
    return error


# -- reserve ------------------------------------------------------------------------------------


def test_reserve_allows_and_reports_balances_and_headers(api: Api, acme: str) -> None:
    response = api.post(acme, "/v1/reservations", reservation_body("r1", 250, ttl_ms=30_000))
    assert response.status_code == 200
    body = parse_response(ReservationCreateResponse, response.json())
    assert body.decision.value == "ALLOW"
    assert body.reservation_id
    assert body.reserved
    assert body.reserved.amount == 250
    assert body.remaining_ttl_ms == 30_000
    assert body.scope_path == "tenant:acme/agent:bot"
    assert body.affected_scopes == ["tenant:acme", "tenant:acme/agent:bot"]
    assert body.balances is not None
    assert body.balances[0].remaining.amount == 1_000_000 - 250
    assert response.headers["x-cycles-tenant"] == "acme"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-cycles-trace-id"])
    assert response.headers["x-request-id"]


def test_trace_id_comes_from_traceparent_then_header(api: Api, acme: str) -> None:
    other = "a" * 32
    headers = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "X-Cycles-Trace-Id": other}
    response = api.client.get("/healthz", headers=headers)
    assert response.headers["x-cycles-trace-id"] == TRACE
    response = api.client.get(
        "/healthz", headers={"traceparent": "garbage", "X-Cycles-Trace-Id": other}
    )
    assert response.headers["x-cycles-trace-id"] == other
    response = api.client.get("/healthz", headers={"X-Cycles-Trace-Id": "0" * 32})
    assert response.headers["x-cycles-trace-id"] != "0" * 32


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ttl": 5}, "ttl"),
        ({"estimate": {"unit": U, "amount": 1.5}}, "estimate.amount"),
        ({"estimate": {"unit": U, "amount": "100"}}, "estimate.amount"),
        ({"estimate": {"unit": "EUR", "amount": 1}}, "estimate.unit"),
        ({"estimate": {"unit": U, "amount": 2**63}}, "estimate.amount"),
        ({"ttl_ms": 999}, "ttl_ms"),
        ({"grace_period_ms": 60_001}, "grace_period_ms"),
        ({"subject": {"dimensions": {"a": "b"}}}, "subject"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"dry_run": "yes"}, "dry_run"),
    ],
)
def test_invalid_bodies_are_400_naming_the_field(
    api: Api, acme: str, body: dict[str, Any], field: str
) -> None:
    response = api.post(acme, "/v1/reservations", {**reservation_body("bad"), **body})
    error = assert_error(response, 400, "INVALID_REQUEST")
    assert field in error.message


def test_malformed_json_non_object_and_charset(api: Api, acme: str) -> None:
    headers = {"X-Cycles-API-Key": acme, "content-type": "application/json"}
    for raw in (b"{not json", b"[1,2]", b"", b"null"):
        response = api.client.post("/v1/reservations", content=raw, headers=headers)
        assert_error(response, 400, "INVALID_REQUEST")
    body = reservation_body("c", subject={"tenant": "acme", "agent": "a b"})
    error = assert_error(api.post(acme, "/v1/reservations", body), 400, "INVALID_REQUEST")
    assert "subject.agent" in error.message


def test_body_too_large_is_413(api: Api, acme: str) -> None:
    body = reservation_body("big", metadata={"blob": "x" * 70_000})
    assert_error(api.post(acme, "/v1/reservations", body), 413, "INVALID_REQUEST")


def test_idempotency_header_must_match_body(api: Api, acme: str) -> None:
    response = api.post(
        acme, "/v1/reservations", reservation_body("a"), **{"X-Idempotency-Key": "b"}
    )
    assert_error(response, 400, "INVALID_REQUEST")
    response = api.post(
        acme, "/v1/reservations", reservation_body("a"), **{"X-Idempotency-Key": "a"}
    )
    assert response.status_code == 200


def test_auth_failures_are_401(api: Api, acme: str) -> None:
    assert_error(
        api.client.post("/v1/reservations", json=reservation_body("x")), 401, "UNAUTHORIZED"
    )
    assert_error(
        api.post("cyc_live_nope", "/v1/reservations", reservation_body("x")), 401, "UNAUTHORIZED"
    )


def test_subject_tenant_must_match_key(api: Api, acme: str) -> None:
    body = reservation_body("x", subject={"tenant": "globex"})
    assert_error(api.post(acme, "/v1/reservations", body), 403, "FORBIDDEN")


def test_no_budget_is_404_and_wrong_unit_is_400(api: Api, acme: str) -> None:
    body = reservation_body(
        "x", subject={"tenant": "acme"}, estimate={"unit": "TOKENS", "amount": 1}
    )
    error = assert_error(api.post(acme, "/v1/reservations", body), 400, "UNIT_MISMATCH")
    assert error.details == {
        "scope": "tenant:acme",
        "requested_unit": "TOKENS",
        "expected_units": [U],
    }
    body = reservation_body("y", subject={"agent": "bot"})
    error = assert_error(api.post(acme, "/v1/reservations", body), 404, "NOT_FOUND")
    assert "subject.tenant" in error.message


def test_budget_state_errors_are_409(api: Api, acme: str, idem: Counter) -> None:
    error = assert_error(
        api.post(acme, "/v1/reservations", reservation_body(idem(), 2_000_000)),
        409,
        "BUDGET_EXCEEDED",
    )
    assert "tenant:acme" in error.message
    api.admin("POST", "/v1/admin/budgets/freeze", 200, params={"scope": "tenant:acme", "unit": U})
    assert_error(api.post(acme, "/v1/reservations", reservation_body(idem())), 409, "BUDGET_FROZEN")


def test_reserve_replay_returns_the_original_and_mismatch_is_409(
    api: Api, acme: str, clock: FakeClock
) -> None:
    first = reserve(api, acme, "same", 100)
    clock.advance(1_000)
    again = reserve(api, acme, "same", 100)
    assert again["reservation_id"] == first["reservation_id"]
    assert again["remaining_ttl_ms"] == first["remaining_ttl_ms"] - 1_000
    assert {k: v for k, v in again.items() if k != "remaining_ttl_ms"} == {
        k: v for k, v in first.items() if k != "remaining_ttl_ms"
    }
    assert api.balance(acme, "tenant:acme")["reserved"]["amount"] == 100  # held once
    assert_error(
        api.post(acme, "/v1/reservations", reservation_body("same", 101)),
        409,
        "IDEMPOTENCY_MISMATCH",
    )
    assert_error(
        api.post(acme, "/v1/reservations", reservation_body("same", 100, dry_run=True)),
        409,
        "IDEMPOTENCY_MISMATCH",
    )


def test_observe_mode_evaluates_like_a_dry_run_and_records_the_decision(api: Api, acme: str):
    response = api.post(acme, "/v1/reservations", reservation_body("obs", observe_mode="OBSERVE"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"] == "ALLOW"
    assert "reservation_id" not in body
    assert "expires_at_ms" not in body
    assert body["affected_scopes"][0] == "tenant:acme"
    assert api.balance(acme, "tenant:acme")["reserved"]["amount"] == 0
    # ENFORCE (and its synonym DISABLED) reserve as usual.
    for mode in ("ENFORCE", "DISABLED"):
        body = reserve(api, acme, f"enf-{mode}", 100, observe_mode=mode)
        assert body["decision"] == "ALLOW"
        assert body["reservation_id"]


def test_policy_keys_are_accepted_and_kept_on_the_reservation(api: Api, acme: str) -> None:
    keys = {"host": "api.sendgrid.com", "recipient_domain": "customer.com", "custom": {"k": "v"}}
    action = {"kind": "message.email.send", "name": "send", "policy_keys": keys}
    body = reserve(api, acme, "pk", 100, action=action)
    rid = body["reservation_id"]
    detail = api.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": acme}).json()
    assert parse_response(ReservationDetail, detail).action.policy_keys is not None
    assert detail["action"]["policy_keys"] == keys


def test_dry_run_evaluates_without_holding(api: Api, acme: str) -> None:
    body = reserve(api, acme, "dry", 500, dry_run=True)
    parsed = parse_response(ReservationCreateResponse, body)
    assert parsed.decision.value == "ALLOW"
    assert parsed.reservation_id is None
    assert "expires_at_ms" not in body
    assert "remaining_ttl_ms" not in body
    assert api.balance(acme, "tenant:acme")["reserved"]["amount"] == 0
    deny = reserve(api, acme, "dry2", 5_000_000, dry_run=True)
    assert deny["decision"] == "DENY"
    assert deny["reason_code"] == "BUDGET_EXCEEDED"
    assert deny["affected_scopes"] == ["tenant:acme", "tenant:acme/agent:bot"]


def test_caps_on_the_deepest_budget_give_allow_with_caps(api: Api, acme: str) -> None:
    api.budget("acme", "tenant:acme/agent:bot", 5000)
    api.admin(
        "PATCH",
        "/v1/admin/budgets",
        200,
        params={"scope": "tenant:acme/agent:bot", "unit": U},
        json={"caps": {"max_tokens": 256, "tool_denylist": ["shell"]}},
    )
    body = reserve(api, acme, "c1", 10)
    assert body["decision"] == "ALLOW_WITH_CAPS"
    assert body["caps"] == {"max_tokens": 256, "tool_denylist": ["shell"]}
    decided = api.post(acme, "/v1/decide", dict(reservation_body("d1", 10).items()))
    assert decided.json()["decision"] == "ALLOW_WITH_CAPS"
    bad = api.client.request(
        "PATCH",
        "/v1/admin/budgets",
        headers=api.admin_headers,
        params={"scope": "tenant:acme/agent:bot", "unit": U},
        json={"caps": {"max_tokens": -1}},
    )
    assert_error(bad, 400, "INVALID_REQUEST")


# -- commit / release / extend ----------------------------------------------------------------


def commit(api: Api, key: str, rid: str, idem: str, amount: int, expect: int = 200) -> Any:
    response = api.post(
        key,
        f"/v1/reservations/{rid}/commit",
        {"idempotency_key": idem, "actual": {"unit": U, "amount": amount}},
    )
    assert response.status_code == expect, response.text
    return response


def test_commit_charges_actual_and_replays(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r", 100)["reservation_id"]
    first = commit(api, acme, rid, "c", 60)
    body = parse_response(CommitResponse, first.json())
    assert body.charged.amount == 60
    assert body.released is not None
    assert body.released.amount == 40
    assert commit(api, acme, rid, "c", 60).json() == first.json()
    assert_error(commit(api, acme, rid, "c", 61, 409), 409, "IDEMPOTENCY_MISMATCH")
    assert_error(commit(api, acme, rid, "other", 60, 409), 409, "RESERVATION_FINALIZED")
    bal = api.balance(acme, "tenant:acme")
    assert (bal["spent"]["amount"], bal["reserved"]["amount"]) == (60, 0)
    detail = parse_response(
        ReservationDetail,
        api.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": acme}).json(),
    )
    assert detail.status.value == "COMMITTED"
    assert detail.committed is not None
    assert detail.committed.amount == 60
    assert detail.finalized_at_ms is not None


def test_commit_over_estimate_under_each_policy(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r1", 100, overage_policy="REJECT")["reservation_id"]
    assert_error(commit(api, acme, rid, "c1", 150, 409), 409, "BUDGET_EXCEEDED")
    commit(api, acme, rid, "c1b", 100)  # still ACTIVE after the refusal
    rid = reserve(api, acme, "r2", 100)["reservation_id"]
    assert commit(api, acme, rid, "c2", 150).json()["charged"]["amount"] == 150
    assert api.balance(acme, "tenant:acme")["spent"]["amount"] == 250


def test_commit_wrong_unit_and_unknown_reservation(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r", 100)["reservation_id"]
    response = api.post(
        acme,
        f"/v1/reservations/{rid}/commit",
        {"idempotency_key": "c", "actual": {"unit": "TOKENS", "amount": 1}},
    )
    assert_error(response, 400, "UNIT_MISMATCH")
    assert_error(commit(api, acme, "rsv_missing", "c", 1, 404), 404, "NOT_FOUND")
    assert_error(commit(api, acme, "x" * 129, "c", 1, 400), 400, "INVALID_REQUEST")


def test_release_returns_the_estimate(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r", 300)["reservation_id"]
    response = api.post(
        acme, f"/v1/reservations/{rid}/release", {"idempotency_key": "rel", "reason": "cancelled"}
    )
    body = parse_response(ReleaseResponse, response.json())
    assert body.released.amount == 300
    assert api.balance(acme, "tenant:acme")["remaining"]["amount"] == 1_000_000
    again = api.post(
        acme, f"/v1/reservations/{rid}/release", {"idempotency_key": "rel", "reason": "cancelled"}
    )
    assert again.json() == response.json()
    assert_error(commit(api, acme, rid, "c", 1, 409), 409, "RESERVATION_FINALIZED")


def test_expiry_window_grace_and_sweep(
    api: Api, acme: str, clock: FakeClock, client: SyncClient
) -> None:
    rid = reserve(api, acme, "r", 100, ttl_ms=10_000, grace_period_ms=2_000)["reservation_id"]
    clock.advance(10_001)  # past expiry, inside grace: extend refused, commit still accepted
    response = api.post(
        acme, f"/v1/reservations/{rid}/extend", {"idempotency_key": "e", "extend_by_ms": 1000}
    )
    assert_error(response, 410, "RESERVATION_EXPIRED")
    rid2 = rid
    rid = reserve(api, acme, "r2", 100, ttl_ms=10_000, grace_period_ms=2_000)["reservation_id"]
    commit(api, acme, rid2, "c", 10)
    clock.advance(12_001)  # rid is now past expiry + grace
    assert_error(commit(api, acme, rid, "c2", 10, 410), 410, "RESERVATION_EXPIRED")
    assert api.balance(acme, "tenant:acme")["reserved"]["amount"] == 100  # not swept yet
    assert client.run(api_store(api).expire_due()) == 1
    bal = api.balance(acme, "tenant:acme")
    assert (bal["reserved"]["amount"], bal["spent"]["amount"]) == (0, 10)
    got = api.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": acme})
    assert_error(got, 410, "RESERVATION_EXPIRED")
    listed = api.client.get(
        "/v1/reservations", params={"status": "EXPIRED"}, headers={"X-Cycles-API-Key": acme}
    ).json()
    assert [r["reservation_id"] for r in listed["reservations"]] == [rid]


def api_store(api: Api) -> Any:
    transport = api.client._client._transport  # the app's store, for the sweep
    return transport.app.state.store  # type: ignore[attr-defined]


def test_extend_moves_expiry_and_stops_at_the_limit(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme", max_reservation_extensions=1)
    api.budget("acme", "tenant:acme", 1000)
    res = reserve(api, key, "r", 10, ttl_ms=10_000)
    rid = res["reservation_id"]
    clock.advance(4_000)
    response = api.post(
        key, f"/v1/reservations/{rid}/extend", {"idempotency_key": "e1", "extend_by_ms": 10_000}
    )
    body = parse_response(ReservationExtendResponse, response.json())
    assert body.expires_at_ms == res["expires_at_ms"] + 10_000
    assert body.remaining_ttl_ms == body.expires_at_ms - clock()
    clock.advance(1_000)
    replay = api.post(
        key, f"/v1/reservations/{rid}/extend", {"idempotency_key": "e1", "extend_by_ms": 10_000}
    ).json()
    assert replay["expires_at_ms"] == body.expires_at_ms
    assert replay["remaining_ttl_ms"] == body.expires_at_ms - clock()
    response = api.post(
        key, f"/v1/reservations/{rid}/extend", {"idempotency_key": "e2", "extend_by_ms": 10_000}
    )
    assert_error(response, 409, "MAX_EXTENSIONS_EXCEEDED")
    response = api.post(
        key, f"/v1/reservations/{rid}/extend", {"idempotency_key": "e3", "extend_by_ms": 0}
    )
    assert_error(response, 400, "INVALID_REQUEST")


# -- tenant isolation & admin-on-behalf-of -------------------------------------------------------


def test_other_tenants_reservations_are_forbidden(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r", 10)["reservation_id"]
    globex = api.tenant("globex")
    h = {"X-Cycles-API-Key": globex}
    assert_error(api.client.get(f"/v1/reservations/{rid}", headers=h), 403, "FORBIDDEN")
    assert_error(commit(api, globex, rid, "c", 1, 403), 403, "FORBIDDEN")
    for path, body in (
        ("release", {"idempotency_key": "x"}),
        ("extend", {"idempotency_key": "x", "extend_by_ms": 10}),
    ):
        assert_error(api.post(globex, f"/v1/reservations/{rid}/{path}", body), 403, "FORBIDDEN")
    listed = api.client.get("/v1/reservations", headers=h).json()
    assert listed["reservations"] == []
    assert_error(
        api.client.get("/v1/reservations", params={"tenant": "acme"}, headers=h), 403, "FORBIDDEN"
    )
    assert_error(
        api.client.get("/v1/balances", params={"tenant": "acme"}, headers=h), 403, "FORBIDDEN"
    )


def test_admin_can_list_get_and_release_any_reservation(
    api: Api, acme: str, client: SyncClient
) -> None:
    rid = reserve(api, acme, "r", 10)["reservation_id"]
    h = api.admin_headers
    assert_error(api.client.get("/v1/reservations", headers=h), 400, "INVALID_REQUEST")
    listed = api.client.get("/v1/reservations", params={"tenant": "acme"}, headers=h).json()
    assert [r["reservation_id"] for r in listed["reservations"]] == [rid]
    assert api.client.get(f"/v1/reservations/{rid}", headers=h).status_code == 200
    response = api.client.post(
        f"/v1/reservations/{rid}/release",
        headers=h,
        json={"idempotency_key": "adm", "reason": "[INCIDENT]"},
    )
    assert response.status_code == 200, response.text
    store = api_store(api)
    audit = getattr(store, "audit", None)
    if hasattr(store, "list_audit"):  # Redis keeps audit rows per tenant
        count = len(client.run(store.list_audit("acme")))
    else:
        count = len(audit) if audit is not None else store.count_rows("audit_log")
    assert count == 1
    logs = api.client.get("/v1/admin/audit/logs", params={"tenant_id": "acme"}, headers=h)
    assert logs.status_code == 200, logs.text  # every store has a readable audit log
    entries = logs.json()["logs"]
    assert [e["resource_id"] for e in entries] == [rid]
    assert entries[0]["metadata"] == {
        "actor_type": "admin_on_behalf_of",
        "reason": "[INCIDENT]",
    }
    assert entries[0]["request_id"] == response.headers["x-request-id"]
    again = api.client.post(
        f"/v1/reservations/{rid}/release",
        headers=h,
        json={"idempotency_key": "adm", "reason": "[INCIDENT]"},
    )
    assert again.json() == response.json()
    listed_again = api.client.get("/v1/admin/audit/logs", params={"tenant_id": "acme"}, headers=h)
    assert len(listed_again.json()["logs"]) == 1
    # commit is not an admin operation
    response = api.client.post(
        f"/v1/reservations/{rid}/commit",
        headers=h,
        json={"idempotency_key": "c", "actual": {"unit": U, "amount": 1}},
    )
    assert_error(response, 401, "UNAUTHORIZED")


# -- decide & events -----------------------------------------------------------------------------


def decide_body(idem: str, amount: int, **subject: str) -> dict[str, Any]:
    return {
        "idempotency_key": idem,
        "subject": subject or {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
        "estimate": {"unit": U, "amount": amount},
    }


def test_audit_logs_page_newest_first(api: Api, acme: str) -> None:
    h = api.admin_headers
    rids = [reserve(api, acme, f"r{i}", 1)["reservation_id"] for i in range(5)]
    for rid in rids:
        released = api.client.post(
            f"/v1/reservations/{rid}/release", headers=h, json={"idempotency_key": f"a-{rid}"}
        )
        assert released.status_code == 200, released.text
    seen: list[str] = []
    params: dict[str, Any] = {"tenant_id": "acme", "limit": 2}
    for _ in range(5):
        page = api.client.get("/v1/admin/audit/logs", params=params, headers=h).json()
        seen += [entry["resource_id"] for entry in page["logs"]]
        if not page["has_more"]:
            break
        params["cursor"] = page["next_cursor"]
    assert sorted(seen) == sorted(rids)
    assert len(seen) == 5
    other = api.client.get("/v1/admin/audit/logs", params={"tenant_id": "nobody"}, headers=h)
    assert other.json() == {"logs": [], "has_more": False}
    every = api.client.get("/v1/admin/audit/logs", headers=h)
    if hasattr(api_store(api), "list_audit"):  # Redis keeps audit logs per tenant
        assert_error(every, 400, "INVALID_REQUEST")
        assert "tenant_id is required" in every.json()["message"]
    else:
        assert len(every.json()["logs"]) == 5


def test_decide_allow_deny_and_replay(api: Api, acme: str) -> None:
    ok = api.post(acme, "/v1/decide", decide_body("d1", 10))
    assert parse_response(DecisionResponse, ok.json()).decision.value == "ALLOW"
    deny = api.post(acme, "/v1/decide", decide_body("d2", 10**9)).json()
    assert (deny["decision"], deny["reason_code"]) == ("DENY", "BUDGET_EXCEEDED")
    missing = api.post(acme, "/v1/decide", decide_body("d3", 1, tenant="acme", app="x")).json()
    assert missing["decision"] == "ALLOW"  # the tenant budget covers the app scope
    api.budget("acme", "tenant:acme/app:y", 5, unit="TOKENS")
    response = api.post(acme, "/v1/decide", decide_body("d4", 1, tenant="acme", app="y"))
    assert response.json()["decision"] == "ALLOW"  # USD budget at tenant:acme still applies
    assert api.post(acme, "/v1/decide", decide_body("d1", 10)).json() == ok.json()
    assert_error(api.post(acme, "/v1/decide", decide_body("d1", 11)), 409, "IDEMPOTENCY_MISMATCH")


def test_decide_reports_missing_budget_as_deny(api: Api) -> None:
    key = api.tenant("lonely")
    body = decide_body("d", 1, tenant="lonely")
    deny = api.post(key, "/v1/decide", body).json()
    assert (deny["decision"], deny["reason_code"]) == ("DENY", "BUDGET_NOT_FOUND")


def test_events_debit_directly_and_replay(api: Api, acme: str) -> None:
    body = {
        "idempotency_key": "ev",
        "subject": {"tenant": "acme"},
        "action": {"kind": "tool.search", "name": "web"},
        "actual": {"unit": U, "amount": 70},
        "metrics": {"latency_ms": 5},
    }
    first = api.post(acme, "/v1/events", body)
    assert first.status_code == 201, first.text
    parsed = parse_response(EventCreateResponse, first.json())
    assert parsed.event_id.startswith("evt_")
    assert parsed.charged is None
    again = api.post(acme, "/v1/events", body)
    assert (again.status_code, again.json()) == (201, first.json())
    assert api.balance(acme, "tenant:acme")["spent"]["amount"] == 70
    over = {
        **body,
        "idempotency_key": "ev2",
        "actual": {"unit": U, "amount": 10**7},
        "overage_policy": "REJECT",
    }
    assert_error(api.post(acme, "/v1/events", over), 409, "BUDGET_EXCEEDED")
    capped = api.post(acme, "/v1/events", {**over, "overage_policy": "ALLOW_IF_AVAILABLE"})
    assert capped.json()["charged"]["amount"] == 1_000_000 - 70
    # the scope is now over limit: new reservations are blocked until an operator funds it
    assert_error(
        api.post(acme, "/v1/reservations", reservation_body("after")),
        409,
        "OVERDRAFT_LIMIT_EXCEEDED",
    )
    api.fund("acme", "tenant:acme", "CREDIT", 1000)
    assert reserve(api, acme, "after", 10)["decision"] == "ALLOW"


def test_int64_amounts_above_2_53_are_exact(api: Api) -> None:
    key = api.tenant("big")
    big = 2**63 - 1
    api.budget("big", "tenant:big", big)
    amount = 2**53 + 1
    body = reservation_body("r", amount, subject={"tenant": "big"})
    res = api.post(key, "/v1/reservations", body).json()
    assert res["balances"][0]["remaining"]["amount"] == big - amount
    got = commit(api, key, res["reservation_id"], "c", amount).json()
    assert got["charged"]["amount"] == amount


# -- balances, list, introspect, health ----------------------------------------------------------


def test_balances_filters_and_pagination(api: Api, acme: str) -> None:
    for agent in ("a", "b", "c"):
        api.budget("acme", f"tenant:acme/agent:{agent}", 100)
    api.budget("acme", "tenant:acme/workspace:w/agent:a", 100)
    h = {"X-Cycles-API-Key": acme}
    assert_error(api.client.get("/v1/balances", headers=h), 400, "INVALID_REQUEST")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"tenant": "acme", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = parse_response(
            BalanceResponse, api.client.get("/v1/balances", params=params, headers=h).json()
        )
        seen += [b.scope_path for b in page.balances]
        assert page.has_more == (page.next_cursor is not None)
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert seen == sorted(seen)
    assert len(seen) == 5
    only_a = api.client.get("/v1/balances", params={"agent": "A"}, headers=h).json()
    assert {b["scope_path"] for b in only_a["balances"]} == {
        "tenant:acme/agent:a",
        "tenant:acme/workspace:w/agent:a",
    }
    assert only_a["balances"][0]["scope"] == "agent:a"
    assert_error(
        api.client.get("/v1/balances", params={"tenant": "acme", "cursor": "zzz"}, headers=h),
        400,
        "INVALID_REQUEST",
    )
    assert_error(
        api.client.get("/v1/balances", params={"tenant": "acme", "limit": 0}, headers=h),
        400,
        "INVALID_REQUEST",
    )


def test_list_reservations_filters_pages_and_recovers_by_key(
    api: Api, acme: str, clock: FakeClock
) -> None:
    ids = []
    for i in range(5):
        clock.advance(10)
        agent = "x" if i % 2 else "y"
        body = reservation_body(
            f"r{i}", 10, subject={"tenant": "acme", "agent": agent}, metadata={"i": i}
        )
        ids.append(api.post(acme, "/v1/reservations", body).json()["reservation_id"])
    h = {"X-Cycles-API-Key": acme}
    pages: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = parse_response(
            ReservationListResponse,
            api.client.get("/v1/reservations", params=params, headers=h).json(),
        )
        pages += [r.reservation_id for r in page.reservations]
        if not page.next_cursor:
            break
        params["cursor"] = page.next_cursor
    assert pages == list(reversed(ids))  # newest first
    asc = api.client.get(
        "/v1/reservations", headers=h, params={"sort_dir": "asc", "agent": "x"}
    ).json()
    assert [r["reservation_id"] for r in asc["reservations"]] == [ids[1], ids[3]]
    assert "metadata" not in asc["reservations"][0]
    found = api.client.get(
        "/v1/reservations",
        headers=h,
        params={"idempotency_key": "r3", "include": "metadata,,bogus"},
    ).json()
    assert [r["reservation_id"] for r in found["reservations"]] == [ids[3]]
    assert found["reservations"][0]["metadata"] == {"i": 3}
    assert_error(
        api.client.get("/v1/reservations", headers=h, params={"status": "NOPE"}),
        400,
        "INVALID_REQUEST",
    )
    assert_error(
        api.client.get(
            "/v1/reservations",
            headers=h,
            params={"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
        ),
        400,
        "INVALID_REQUEST",
    )
    blank = api.client.get("/v1/reservations", headers=h, params={"from": "", "to": ""})
    assert len(blank.json()["reservations"]) == 5


def test_introspect_tenant_and_admin(api: Api, acme: str) -> None:
    tenant = api.client.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": acme}).json()
    assert tenant["auth_type"] == "tenant"
    assert tenant["tenant_id"] == "acme"
    assert tenant["capabilities"]["manage_reservations"] is True
    assert tenant["capabilities"]["view_events"] is False
    assert tenant["capabilities"]["view_tenants"] is False
    admin = api.client.get("/v1/auth/introspect", headers=api.admin_headers).json()
    assert admin["auth_type"] == "admin"
    assert admin["permissions"] == ["*"]
    assert "tenant_id" not in admin
    assert all(admin["capabilities"].values())


def test_health_and_unknown_routes(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").status_code == 200
    assert_error(api.client.get("/v1/nope"), 404, "NOT_FOUND")
    assert_error(api.client.request("DELETE", "/v1/decide"), 405, "INVALID_REQUEST")


# -- tenant lifecycle -----------------------------------------------------------------------------


def test_suspended_tenant_blocks_new_work_but_settles_existing(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r", 10)["reservation_id"]
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "SUSPENDED"})
    assert_error(
        api.post(acme, "/v1/reservations", reservation_body("r2")), 409, "TENANT_SUSPENDED"
    )
    dry = reserve(api, acme, "r3", 10, dry_run=True)
    assert dry["reason_code"] == "TENANT_SUSPENDED"
    commit(api, acme, rid, "c", 10)


def test_closing_a_tenant_cascades(api: Api, acme: str) -> None:
    rid = reserve(api, acme, "r", 10)["reservation_id"]
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    assert_error(api.post(acme, "/v1/reservations", reservation_body("r2")), 401, "UNAUTHORIZED")
    detail = api.client.get(f"/v1/reservations/{rid}", headers=api.admin_headers).json()
    assert detail["status"] == "RELEASED"
    ledger_row = api.admin(
        "GET", "/v1/admin/budgets/lookup", 200, params={"scope": "tenant:acme", "unit": U}
    )
    assert ledger_row["status"] == "CLOSED"
    assert ledger_row["reserved"]["amount"] == 0
    response = api.client.request(
        "PATCH", "/v1/admin/tenants/acme", headers=api.admin_headers, json={"status": "ACTIVE"}
    )
    assert_error(response, 409, "TENANT_CLOSED")
    # an admin release of a closed tenant's reservation hits the tenant guard
    response = api.client.post(
        f"/v1/reservations/{rid}/release",
        headers=api.admin_headers,
        json={"idempotency_key": "late"},
    )
    assert_error(response, 409, "TENANT_CLOSED")


def test_key_permissions_are_enforced(api: Api, acme: str) -> None:
    def key_with(*permissions: str) -> str:
        created = api.admin(
            "POST",
            "/v1/admin/api-keys",
            201,
            json={"tenant_id": "acme", "name": "p", "permissions": list(permissions)},
        )
        return str(created["key_secret"])

    reader = key_with("balances:read")
    error = assert_error(
        api.post(reader, "/v1/reservations", reservation_body("p1")), 403, "FORBIDDEN"
    )
    assert "reservations:create" in error.message
    assert (
        api.client.get(
            "/v1/balances", params={"tenant": "acme"}, headers={"X-Cycles-API-Key": reader}
        ).status_code
        == 200
    )
    creator = key_with("reservations:create")
    rid = reserve(api, creator, "p2", 10)["reservation_id"]
    assert_error(commit(api, creator, rid, "c", 5, 403), 403, "FORBIDDEN")
    commit(api, acme, rid, "c", 5)  # the default key may
    wildcard = key_with("admin:read")
    assert (
        api.client.get(
            "/v1/balances", params={"tenant": "acme"}, headers={"X-Cycles-API-Key": wildcard}
        ).status_code
        == 200
    )
    budget = {"scope": "tenant:acme/agent:q", "unit": U, "allocated": {"unit": U, "amount": 1}}
    response = api.client.post(
        "/v1/admin/budgets", headers={"X-Cycles-API-Key": wildcard}, json=budget
    )
    assert_error(response, 403, "FORBIDDEN")  # admin:read is not a write wildcard
