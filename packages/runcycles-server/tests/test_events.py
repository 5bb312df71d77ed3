"""The event log on every store: transition-based budget events written with the change that
causes them, reservation events, request context, and the two listing routes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.governance import deny_correlation_id

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"


def reserve(api: Api, key: str, idem: str, amount: int, **extra: Any) -> Any:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
        **extra,
    }
    return api.post(key, "/v1/reservations", body)


def events(api: Api, **params: Any) -> list[dict[str, Any]]:
    params.setdefault("tenant_id", "acme")
    body = api.admin("GET", "/v1/admin/events", 200, params=params)
    schema_validator("EventListResponse", EXTENDED_ADMIN).validate(body)
    return list(reversed(body["events"]))  # oldest first, to read like a story


def crossings(api: Api) -> list[tuple[float, str]]:
    found = events(api, event_type="budget.threshold_crossed")
    return [(e["data"]["threshold"], e["data"]["direction"]) for e in found]


def test_thresholds_fire_once_per_crossing_rising_and_falling(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    first = reserve(api, key, "a", 800)  # 0 -> 80 %
    assert crossings(api) == [(0.8, "rising")]
    second = reserve(api, key, "b", 150)  # 80 -> 95 %
    assert crossings(api) == [(0.8, "rising"), (0.95, "rising")]
    rid = second.json()["reservation_id"]
    api.post(key, f"/v1/reservations/{rid}/release", {"idempotency_key": "r"})  # 95 -> 80 %
    assert crossings(api)[-1] == (0.95, "falling")
    reserve(api, key, "c", 150)  # up again: fires again
    assert crossings(api) == [(0.8, "rising"), (0.95, "rising"), (0.95, "falling"),
                              (0.95, "rising")]  # fmt: skip
    event = events(api, event_type="budget.threshold_crossed")[-1]
    assert event["scope"] == "tenant:acme"
    assert event["category"] == "budget"
    assert event["data"]["utilization"] == 0.95
    assert event["correlation_id"] == reserve(api, key, "c", 150).json()["reservation_id"]
    assert first.status_code == 200


def test_exhaustion_fires_once_not_per_denial(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    assert reserve(api, key, "all", 1_000).status_code == 200
    for i in range(3):
        assert reserve(api, key, f"no{i}", 10).status_code == 409
    exhausted = events(api, event_type="budget.exhausted")
    assert len(exhausted) == 1
    assert exhausted[0]["data"]["remaining"] == 0
    # 100 % crossed too, once
    assert (1.0, "rising") in crossings(api)
    assert len(crossings(api)) == 3


def test_commit_overage_debt_and_over_limit(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000, overdraft_limit={"unit": U, "amount": 300})
    body = reserve(api, key, "a", 900, overage_policy="ALLOW_WITH_OVERDRAFT").json()
    rid = body["reservation_id"]
    commit = {"idempotency_key": "c", "actual": {"unit": U, "amount": 1_250}}
    assert api.post(key, f"/v1/reservations/{rid}/commit", commit).status_code == 200
    overage = events(api, event_type="reservation.commit_overage")
    pairs = [(e["data"]["estimated_amount"], e["data"]["actual_amount"]) for e in overage]
    assert pairs == [(900, 1_250)]
    assert overage[0]["correlation_id"] == rid
    debt = events(api, event_type="budget.debt_incurred")
    assert [(e["data"]["debt_incurred"], e["data"]["total_debt"]) for e in debt] == [(250, 250)]
    assert events(api, event_type="budget.exhausted")


def test_expiry_is_the_sweepers_event(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    rid = reserve(api, key, "a", 100, ttl_ms=1_000).json()["reservation_id"]
    clock.advance(1_000 + 5_001)
    store = api.client._client._transport.app.state.store  # type: ignore[attr-defined]
    assert api.client.run(store.expire_due()) == 1
    (expired,) = events(api, event_type="reservation.expired")
    assert expired["data"]["reservation_id"] == rid
    assert expired["source"] == "expiry-sweeper"
    assert expired["actor"] == {"type": "system"}
    assert "request_id" not in expired


def test_events_carry_the_request_context(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    trace = "0af7651916cd43dd8448eb211c80319c"
    response = api.post(
        key,
        "/v1/reservations",
        {
            "idempotency_key": "a",
            "subject": {"tenant": "acme"},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": U, "amount": 900},
        },
        traceparent=f"00-{trace}-b7ad6b7169203331-01",
    )
    (event,) = events(api, event_type="budget.threshold_crossed")
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["trace_id"] == trace
    assert event["actor"]["type"] == "api_key"
    assert event["actor"]["key_id"].startswith("key_")
    assert event["source"] == "cycles-server"
    assert events(api, trace_id=trace) == [event]
    assert events(api, request_id=response.headers["x-request-id"]) == [event]


def test_funding_records_its_event(api: Api) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    api.fund("acme", "tenant:acme", "CREDIT", 500, idempotency_key="f1")
    api.fund("acme", "tenant:acme", "CREDIT", 500, idempotency_key="f1")  # a replay: no event
    (funded,) = events(api, event_type="budget.funded")
    assert funded["actor"]["type"] == "admin"
    assert funded["data"]["operation"] == "CREDIT"
    assert funded["data"]["previous_state"]["allocated"] == 1_000
    assert funded["data"]["new_state"]["allocated"] == 1_500


def test_a_refused_operation_records_no_event(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    before = events(api)
    assert [e["event_type"] for e in before] == ["tenant.created", "api_key.created",
                                                  "budget.created"]  # fmt: skip
    assert reserve(api, key, "big", 5_000).status_code == 409
    assert reserve(api, key, "dry", 900, dry_run=True).status_code == 200
    assert events(api) == before


def test_pages_filters_and_the_tenant_route(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 10_000)
    other = api.tenant("globex")
    api.budget("globex", "tenant:globex", 1_000)
    for i in range(5):  # 0 -> 100 % in steps: 80, 95, 100 % and exhausted
        reserve(api, key, f"r{i}", 2_000)
    reserve(api, other, "g", 900, subject={"tenant": "globex"})
    everything = events(api)
    assert len(everything) == 3 + 4  # tenant, key and budget created; 4 budget transitions
    pages: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"tenant_id": "acme", "limit": 1}
        if cursor:
            params["cursor"] = cursor
        body = api.admin("GET", "/v1/admin/events", 200, params=params)
        pages += [e["event_id"] for e in body["events"]]
        cursor = body.get("next_cursor")
        assert body["has_more"] is (cursor is not None)
        if cursor is None:
            break
    assert pages == [e["event_id"] for e in reversed(everything)]
    assert len(events(api, category="budget", scope="tenant:acme")) == 1 + 4
    assert events(api, scope="tenant:acme/agent:x") == []
    # a tenant key needs events:read, and sees its own tenant only
    denied = api.client.get("/v1/events", headers={"X-Cycles-API-Key": key})
    assert denied.status_code == 403
    reader = api.admin(
        "POST", "/v1/admin/api-keys", 201,
        json={"tenant_id": "globex", "name": "r", "permissions": ["events:read"]},
    )["key_secret"]  # fmt: skip
    mine = api.client.get("/v1/events", headers={"X-Cycles-API-Key": reader}).json()
    schema_validator("EventListResponse", EXTENDED_ADMIN).validate(mine)
    assert {e["tenant_id"] for e in mine["events"]} == {"globex"}
    assert [e["event_type"] for e in mine["events"]] == [
        "budget.threshold_crossed",
        "budget.created",
        "tenant.created",
    ]  # api_key events are not a tenant key's to read
    bad = api.client.get(
        "/v1/events", params={"category": "policy"}, headers={"X-Cycles-API-Key": reader}
    )
    assert bad.status_code == 400


# --------------------------------------------------------------------------------------------
# The v0.1.26 extensions' events: observe mode and quotas


def policy(api: Api, **fields: Any) -> dict[str, Any]:
    body = {"tenant_id": "acme", "name": "p", "scope_pattern": "tenant:acme/*", **fields}
    created: dict[str, Any] = api.admin("POST", "/v1/admin/policies", 201, json=body)
    return created


def test_observe_mode_records_the_would_be_decision_as_an_event(api: Api) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    policy(api, denied_action_kinds=["payment.charge"])
    denied = reserve(
        api, key, "o1", 10, observe_mode="OBSERVE", action={"kind": "payment.charge", "name": "x"}
    ).json()
    assert denied["decision"] == "DENY"
    assert "reservation_id" not in denied
    enforced = reserve(api, key, "e1", 10, action={"kind": "payment.charge", "name": "x"})
    assert enforced.status_code == 409
    allowed = reserve(
        api, key, "o2", 10, observe_mode="OBSERVE", subject={"tenant": "acme", "agent": "bot",
                                                              "dimensions": {"run_id": "run-7"}},
    ).json()  # fmt: skip
    assert allowed["decision"] == "ALLOW"
    reserve(api, key, "o3", 10, observe_mode="OBSERVE")  # no run id: no correlation

    (shadow,) = events(api, event_type="reservation.observed_denied")
    assert shadow["category"] == "reservation"
    data = shadow["data"]
    assert data["observe_mode"] == "OBSERVE"
    assert data["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"
    assert data["would_have_blocked_at"] == data["deny_detail"]["blocked_by_scope"]
    assert data["action"]["kind"] == "payment.charge"
    assert data["estimated_amount"] == 10
    # joins the enforced denial of the same cause (its deny_detail gives the same hash)
    detail = enforced.json()["details"]["deny_detail"]
    assert shadow["correlation_id"] == deny_correlation_id("acme", "payment.charge", detail)
    with_run, without_run = events(api, event_type="reservation.observed_allowed")
    assert with_run["data"]["decision"] == "ALLOW"
    assert with_run["data"]["subject"]["dimensions"] == {"run_id": "run-7"}
    assert with_run["correlation_id"].startswith("observed:")
    assert "correlation_id" not in without_run or without_run["correlation_id"] is None
    # nothing moved: no reservation, no balance change, no budget event
    assert events(api, event_type="budget.threshold_crossed") == []


def test_quota_threshold_approaching_fires_once_per_window_and_reset_records_an_event(
    api: Api,
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    quota = {"action_kind": "llm.completion", "max_calls": 5, "window": "per_day_tumbling",
             "threshold_pct": 0.6}  # fmt: skip
    created = policy(api, action_quotas=[quota])
    for i in range(5):
        assert reserve(api, key, f"q{i}", 1).status_code == 200
    (approaching,) = events(api, event_type="quota.threshold_approaching")
    assert approaching["category"] == "policy"
    data = approaching["data"]
    assert (data["used"], data["limit"], data["threshold_pct"]) == (3, 5, 0.6)
    assert data["action_kind"] == "llm.completion"
    assert data["window"] == "per_day_tumbling"
    assert data["policy_id"] == created["policy_id"]
    assert data["scope"] == "tenant:acme/agent:bot"
    # observe mode moves no counter and records no threshold event
    reserve(api, key, "obs", 1, observe_mode="OBSERVE")
    assert len(events(api, event_type="quota.threshold_approaching")) == 1

    reset = {"tenant_id": "acme", "scope": data["scope"], "action_kind": "llm.completion",
             "window": "per_day_tumbling", "window_key": data["window_key"],
             "reason": "double count"}  # fmt: skip
    api.admin("POST", "/v1/admin/action-quota-counters/reset", 200, json=reset)
    (done,) = events(api, event_type="quota.counter_reset")
    assert done["data"]["previous_used"] == 5
    assert done["data"]["reason"] == "double count"
    assert done["data"]["window_key"] == data["window_key"]
    assert done["data"]["actor_id"]
    assert done["actor"]["type"] == "admin"
    assert done["correlation_id"] == approaching["correlation_id"]
    # counting again after the reset crosses the threshold again in the same window, which
    # the spec's emission rules report once per window instance: nothing new
    for i in range(3):
        assert reserve(api, key, f"again{i}", 1).status_code == 200
    assert len(events(api, event_type="quota.threshold_approaching")) == 1
