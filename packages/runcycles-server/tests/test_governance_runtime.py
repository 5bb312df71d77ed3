"""Action governance end to end on every store: policies decide reservations, decide and dry
runs in the spec's evaluation order, quota counters move atomically with the balance, and
observe mode changes nothing but the audit log.

Policies are created through the store (the admin routes have their own tests); everything
else goes through the HTTP API.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from runcycles.models import Action, Amount, ReservationCreateRequest, Subject, Unit
from runcycles_server.governance import PolicyRow, Registry, policy_from_create
from runcycles_server.ledger import LedgerError, TenantRow
from runcycles_server.stores.base import Store

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"
MINUTE = 60_000


def add_policy(api: Api, store: Store, **body: Any) -> PolicyRow:
    body.setdefault("name", "p")
    body.setdefault("scope_pattern", "tenant:acme/*")
    row = policy_from_create(
        "acme",
        body,
        policy_id=store.new_policy_id("acme"),
        now_ms=store.clock(),
        registry=store.registry,
    )
    created: PolicyRow = api.client.run(store.create_policy(row))
    return created


def reservation(
    key: str,
    kind: str = "llm.completion",
    amount: int = 100,
    run_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    subject: dict[str, Any] = {"tenant": "acme", "agent": "support"}
    if run_id is not None:
        subject["dimensions"] = {"run_id": run_id}
    body: dict[str, Any] = {
        "idempotency_key": key,
        "subject": subject,
        "action": {"kind": kind, "name": "tool"},
        "estimate": {"unit": U, "amount": amount},
    }
    body.update(extra)
    return body


def post(api: Api, key: str, body: dict[str, Any]) -> Any:
    return api.post(key, "/v1/reservations", body)


def reserved(api: Api, key: str) -> int:
    return int(api.balance(key, "tenant:acme")["reserved"]["amount"])


def counters(api: Api, store: Store) -> dict[str, int]:
    rows = api.client.run(store.list_counters("acme"))
    return {row.name: row.count for row in rows}


def denial(response: Any, code: str) -> dict[str, Any]:
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == code
    detail: dict[str, Any] = body["details"]["deny_detail"]
    assert detail["reason_code"] == code
    return detail


# --------------------------------------------------------------------------------------------
# Step 1: access control


def test_a_denied_kind_is_refused_before_quota_and_budget(
    api: Api, store: Store, acme: str
) -> None:
    policy = add_policy(
        api,
        store,
        denied_action_kinds=["payment.charge"],
        action_quotas=[{"action_kind": "payment.charge", "max_calls": 1, "window": "per_run"}],
    )
    # Denied even though no run_id is sent (the quota would need one) and the budget is short.
    detail = denial(
        post(api, acme, reservation("pay", "payment.charge", 10**9)), "ACTION_KIND_DENIED"
    )
    assert detail["blocked_by_policy"] == policy.policy_id
    assert "quota_violation" not in detail
    assert "payment.charge" in detail["suggested_fix"]
    assert reserved(api, acme) == 0
    assert post(api, acme, reservation("llm")).status_code == 200
    # decide and dry run answer the same decision with 200
    decide = api.post(acme, "/v1/decide", reservation("d1", "payment.charge"))
    assert decide.status_code == 200, decide.text
    assert decide.json()["decision"] == "DENY"
    assert decide.json()["reason_code"] == "ACTION_KIND_DENIED"
    assert decide.json()["deny_detail"]["blocked_by_policy"] == policy.policy_id
    dry = post(api, acme, reservation("d2", "payment.charge", dry_run=True)).json()
    assert dry["decision"] == "DENY"
    assert dry["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"


def test_an_allowlist_refuses_every_other_kind(api: Api, store: Store, acme: str) -> None:
    add_policy(api, store, allowed_action_kinds=["llm.completion", "web.search"])
    assert post(api, acme, reservation("a", "web.search")).status_code == 200
    denial(post(api, acme, reservation("b", "message.email.send")), "ACTION_KIND_NOT_ALLOWED")
    denial(post(api, acme, reservation("c", "some.unregistered")), "ACTION_KIND_NOT_ALLOWED")


def test_only_the_highest_priority_matching_policy_applies(
    api: Api, store: Store, acme: str
) -> None:
    add_policy(api, store, name="low", priority=1, denied_action_kinds=["web.search"])
    add_policy(api, store, name="high", priority=5, denied_action_kinds=["db.write"])
    assert post(api, acme, reservation("a", "web.search")).status_code == 200
    denial(post(api, acme, reservation("b", "db.write")), "ACTION_KIND_DENIED")
    # a policy for another agent does not match this subject
    add_policy(
        api,
        store,
        name="other",
        priority=9,
        scope_pattern="tenant:acme/agent:other",
        denied_action_kinds=["web.search"],
    )
    assert post(api, acme, reservation("c", "web.search")).status_code == 200


def test_a_policy_outside_its_effective_window_does_not_apply(
    api: Api, store: Store, acme: str, clock: FakeClock
) -> None:
    start = "2027-01-16T00:00:00Z"  # the fake clock starts at 2027-01-15T08:00:00Z
    add_policy(api, store, denied_action_kinds=["web.search"], effective_from=start)
    assert post(api, acme, reservation("a", "web.search")).status_code == 200
    clock.now_ms = 1_800_000_000_000 + 10 * 86_400_000
    denial(post(api, acme, reservation("b", "web.search")), "ACTION_KIND_DENIED")


# --------------------------------------------------------------------------------------------
# Steps 2 and 3: quotas


def test_a_per_run_quota_counts_reservations_and_gets_them_back(
    api: Api, store: Store, acme: str, clock: FakeClock
) -> None:
    email = "message.email.send"
    add_policy(
        api, store, action_quotas=[{"action_kind": email, "max_calls": 2, "window": "per_run"}]
    )
    first = post(api, acme, reservation("e1", email, run_id="r1")).json()
    second = post(api, acme, reservation("e2", email, run_id="r1")).json()
    detail = denial(post(api, acme, reservation("e3", email, run_id="r1")), "ACTION_QUOTA_EXCEEDED")
    violation = detail["quota_violation"]
    assert (violation["used"], violation["limit"]) == (2, 2)
    assert violation["window"] == "per_run"
    assert violation["window_key"] == "r1"
    assert violation["action_kind"] == email
    assert reserved(api, acme) == 200  # the denied one holds nothing
    # another run has its own counter
    assert post(api, acme, reservation("other", email, run_id="r2")).status_code == 200
    # a commit keeps the count (the email was sent); a release gives one back
    rid1, rid2 = first["reservation_id"], second["reservation_id"]
    commit = {"idempotency_key": "c1", "actual": {"unit": U, "amount": 50}}
    assert api.post(acme, f"/v1/reservations/{rid1}/commit", commit).status_code == 200
    denial(post(api, acme, reservation("e4", email, run_id="r1")), "ACTION_QUOTA_EXCEEDED")
    release = {"idempotency_key": "rel"}
    assert api.post(acme, f"/v1/reservations/{rid2}/release", release).status_code == 200
    third = post(api, acme, reservation("e5", email, run_id="r1", ttl_ms=1_000))
    assert third.status_code == 200, third.text
    denial(post(api, acme, reservation("e6", email, run_id="r1")), "ACTION_QUOTA_EXCEEDED")
    # expiry gives back too
    clock.advance(1_000 + 5_001)
    assert api.client.run(store.expire_due()) >= 1
    assert post(api, acme, reservation("e7", email, run_id="r1")).status_code == 200


def test_a_late_release_gives_back_only_to_the_counter_life_it_counted_in(
    api: Api, store: Store, acme: str, clock: FakeClock
) -> None:
    """A run's counter that expired while a long reservation stayed open starts again at the
    next call; the old reservation's release must not lower the new count (it would let one
    call more through than the quota)."""
    email = "message.email.send"
    quota = {"action_kind": email, "max_calls": 1, "window": "per_run"}
    add_policy(api, store, action_quotas=[{**quota, "per_run_counter_ttl_ms": 60_000}])
    old = post(api, acme, reservation("a", email, run_id="r1", ttl_ms=3_600_000)).json()
    clock.advance(60_001)  # the counter expired, the reservation is still live
    assert post(api, acme, reservation("b", email, run_id="r1")).status_code == 200
    release = {"idempotency_key": "rel-a"}
    rid = old["reservation_id"]
    assert api.post(acme, f"/v1/reservations/{rid}/release", release).status_code == 200
    assert list(counters(api, store).values()) == [1]
    denial(post(api, acme, reservation("c", email, run_id="r1")), "ACTION_QUOTA_EXCEEDED")


def test_a_release_after_an_operator_reset_gives_nothing_back(
    api: Api, store: Store, acme: str
) -> None:
    email = "message.email.send"
    add_policy(
        api, store, action_quotas=[{"action_kind": email, "max_calls": 1, "window": "per_run"}]
    )
    old = post(api, acme, reservation("a", email, run_id="r1")).json()
    (row,) = api.client.run(store.list_counters("acme"))
    reset = {
        "tenant_id": "acme",
        "scope": row.key.scope,
        "action_kind": email,
        "window": "per_run",
        "window_key": "r1",
        "reason": "operator reset",
    }
    api.admin("POST", "/v1/admin/action-quota-counters/reset", expect=200, json=reset)
    assert post(api, acme, reservation("b", email, run_id="r1")).status_code == 200
    rid = old["reservation_id"]
    release = {"idempotency_key": "rel-a"}
    assert api.post(acme, f"/v1/reservations/{rid}/release", release).status_code == 200
    assert list(counters(api, store).values()) == [1]
    denial(post(api, acme, reservation("c", email, run_id="r1")), "ACTION_QUOTA_EXCEEDED")


def test_a_per_run_quota_needs_a_run_id(api: Api, store: Store, acme: str) -> None:
    add_policy(
        api,
        store,
        action_quotas=[{"action_kind": "web.search", "max_calls": 3, "window": "per_run"}],
    )
    response = post(api, acme, reservation("x", "web.search"))
    assert response.status_code == 400, response.text
    assert "run_id" in response.json()["message"]
    assert post(api, acme, reservation("y", "llm.completion")).status_code == 200


def test_calendar_windows_turn_over_at_the_utc_boundary(
    api: Api, store: Store, acme: str, clock: FakeClock
) -> None:
    add_policy(
        api,
        store,
        action_quotas=[
            {"action_kind": "web.search", "max_calls": 2, "window": "per_minute_tumbling"}
        ],
    )
    clock.now_ms = (clock.now_ms // MINUTE + 1) * MINUTE - 2  # two ms before a minute ends
    assert post(api, acme, reservation("a", "web.search")).status_code == 200
    assert post(api, acme, reservation("b", "web.search")).status_code == 200
    clock.advance(1)  # the minute's last millisecond
    denial(post(api, acme, reservation("c", "web.search")), "ACTION_QUOTA_EXCEEDED")
    clock.advance(1)  # the next minute
    assert post(api, acme, reservation("d", "web.search")).status_code == 200


def test_a_risk_class_quota_counts_every_kind_of_the_class(
    api: Api, store: Store, acme: str
) -> None:
    add_policy(
        api,
        store,
        risk_class_quotas=[
            {"risk_class": "external_side_effect", "max_calls": 1, "window": "per_hour_tumbling"}
        ],
    )
    assert post(api, acme, reservation("a", "message.email.send")).status_code == 200
    detail = denial(post(api, acme, reservation("b", "message.sms.send")), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"]["risk_class"] == "external_side_effect"
    assert detail["quota_violation"]["action_kind"] == "message.sms.send"
    assert post(api, acme, reservation("c", "llm.completion")).status_code == 200


def test_a_quota_denial_changes_no_balance_and_no_counter(
    api: Api, store: Store, acme: str
) -> None:
    add_policy(
        api,
        store,
        action_quotas=[{"action_kind": "web.search", "max_calls": 1, "window": "per_day_tumbling"}],
    )
    assert post(api, acme, reservation("a", "web.search")).status_code == 200
    before = (api.balance(acme, "tenant:acme"), counters(api, store))
    denial(post(api, acme, reservation("b", "web.search")), "ACTION_QUOTA_EXCEEDED")
    assert (api.balance(acme, "tenant:acme"), counters(api, store)) == before
    # and a budget denial moves no counter either
    before_counters = counters(api, store)
    assert post(api, acme, reservation("c", "llm.completion", 10**9)).status_code == 409
    assert counters(api, store) == before_counters


def test_dry_run_and_decide_never_count(api: Api, store: Store, acme: str) -> None:
    add_policy(
        api,
        store,
        action_quotas=[{"action_kind": "web.search", "max_calls": 1, "window": "per_day_tumbling"}],
    )
    for i in range(3):
        assert (
            post(api, acme, reservation(f"dry{i}", "web.search", dry_run=True)).json()["decision"]
            == "ALLOW"
        )
        assert (
            api.post(acme, "/v1/decide", reservation(f"dec{i}", "web.search")).json()["decision"]
            == "ALLOW"
        )
    assert counters(api, store) == {}
    assert post(api, acme, reservation("live", "web.search")).status_code == 200


# --------------------------------------------------------------------------------------------
# Registry, caps, TTL


def test_an_undeclared_custom_kind_is_a_400_and_a_declared_one_is_governed(
    api: Api, store: Store, acme: str
) -> None:
    response = post(api, acme, reservation("x", "custom.acme.erp.post"))
    assert response.status_code == 400, response.text
    assert "custom.acme.erp.post" in response.json()["message"]
    store.registry = Registry.from_declarations(
        {"kinds": [{"kind": "custom.acme.erp.post", "risk_class": "high_risk"}]}
    )
    assert post(api, acme, reservation("y", "custom.acme.erp.post")).status_code == 200
    add_policy(
        api,
        store,
        risk_class_quotas=[
            {"risk_class": "high_risk", "max_calls": 1, "window": "per_hour_tumbling"}
        ],
    )
    assert post(api, acme, reservation("z", "custom.acme.erp.post")).status_code == 200
    denial(post(api, acme, reservation("w", "custom.acme.erp.post")), "ACTION_QUOTA_EXCEEDED")


def test_policy_caps_and_ttl_override_are_honoured(api: Api, store: Store, acme: str) -> None:
    add_policy(
        api,
        store,
        caps={"max_tokens": 256, "tool_denylist": ["shell"]},
        reservation_ttl_override={"max_ttl_ms": 5_000, "max_extensions": 1},
        commit_overage_policy="REJECT",
    )
    body = post(api, acme, reservation("a", ttl_ms=60_000)).json()
    assert body["decision"] == "ALLOW_WITH_CAPS"
    assert body["caps"]["max_tokens"] == 256
    assert body["caps"]["tool_denylist"] == ["shell"]
    assert body["remaining_ttl_ms"] == 5_000
    rid = body["reservation_id"]
    over = {"idempotency_key": "c", "actual": {"unit": U, "amount": 500}}
    response = api.post(acme, f"/v1/reservations/{rid}/commit", over)
    assert response.status_code == 409  # the policy's REJECT overage policy
    assert response.json()["error"] == "BUDGET_EXCEEDED"


# --------------------------------------------------------------------------------------------
# Observe mode


def test_tenant_observe_mode_evaluates_fully_and_changes_nothing(
    api: Api, store: Store, acme: str
) -> None:
    add_policy(
        api,
        store,
        denied_action_kinds=["payment.charge"],
        action_quotas=[{"action_kind": "web.search", "max_calls": 5, "window": "per_day_tumbling"}],
    )
    api.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"observe_mode": "OBSERVE"})
    before = api.balance(acme, "tenant:acme")
    denied = post(api, acme, reservation("a", "payment.charge"))
    assert denied.status_code == 200, denied.text
    assert denied.json()["decision"] == "DENY"
    assert denied.json()["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"
    allowed = post(api, acme, reservation("b", "web.search")).json()
    assert allowed["decision"] == "ALLOW"
    for body in (denied.json(), allowed):
        assert "reservation_id" not in body
        assert "expires_at_ms" not in body
        assert body["affected_scopes"]
    assert api.balance(acme, "tenant:acme") == before
    assert counters(api, store) == {}
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})["logs"]
    operations = sorted(entry["operation"] for entry in logs)
    assert operations == ["reservation.observed_allowed", "reservation.observed_denied"]
    # a request's ENFORCE overrides the tenant's OBSERVE
    enforced = post(api, acme, reservation("c", "payment.charge", observe_mode="ENFORCE"))
    denial(enforced, "ACTION_KIND_DENIED")
    live = post(api, acme, reservation("d", "web.search", observe_mode="ENFORCE")).json()
    assert live["reservation_id"]


# --------------------------------------------------------------------------------------------
# Atomicity


def test_200_concurrent_reservations_against_a_quota_of_50_grant_exactly_50(
    api: Api, store: Store, acme: str
) -> None:
    api.budget("acme", "tenant:acme/agent:support", 100)
    add_policy(
        api,
        store,
        action_quotas=[
            {"action_kind": "web.search", "max_calls": 50, "window": "per_day_tumbling"}
        ],
    )

    async def one(i: int) -> str:
        request = ReservationCreateRequest(
            idempotency_key=f"c{i}",
            subject=Subject(tenant="acme", agent="support"),
            action=Action(kind="web.search", name="search"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=1),
        )
        try:
            await store.reserve("acme", request, f"h{i}")
        except LedgerError as exc:
            return exc.code
        return "granted"

    async def burst() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    answers = api.client.run(burst())
    assert answers.count("granted") == 50
    assert answers.count("ACTION_QUOTA_EXCEEDED") == 150
    assert api.balance(acme, "tenant:acme/agent:support")["reserved"]["amount"] == 50
    assert list(counters(api, store).values()) == [50]


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_a_store_error_mid_commit_leaves_no_partial_state(
    api: Api, store: Store, acme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_policy(
        api,
        store,
        action_quotas=[{"action_kind": "web.search", "max_calls": 5, "window": "per_day_tumbling"}],
    )
    assert post(api, acme, reservation("ok", "web.search")).status_code == 200
    before = (api.balance(acme, "tenant:acme"), counters(api, store))

    def broken(tenant_id: str, rows: Any, read: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_put_counters", broken)  # fails after the balance is written
    with pytest.raises(RuntimeError, match="disk full"):
        api.client.run(
            store.reserve(
                "acme",
                ReservationCreateRequest(
                    idempotency_key="boom",
                    subject=Subject(tenant="acme", agent="support"),
                    action=Action(kind="web.search", name="search"),
                    estimate=Amount(unit=Unit.USD_MICROCENTS, amount=100),
                ),
                "h",
            )
        )
    monkeypatch.undo()
    assert (api.balance(acme, "tenant:acme"), counters(api, store)) == before


def test_an_observing_tenant_row_survives_its_store(api: Api, store: Store, acme: str) -> None:
    row = api.client.run(store.update_tenant("acme", {"observe_mode": "OBSERVE"}))
    assert isinstance(row, TenantRow)
    again = api.client.run(store.get_tenant("acme"))
    assert again is not None
    assert again.observe_mode == "OBSERVE"


@pytest.mark.parametrize("store", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True)
def test_a_redis_failure_on_the_write_leaves_no_partial_state(
    api: Api, store: Store, acme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Redis the balance, the reservation and the counters go in one script call: when
    that call fails, none of them is written (and the request fails, to be retried)."""
    add_policy(
        api,
        store,
        action_quotas=[{"action_kind": "web.search", "max_calls": 5, "window": "per_day_tumbling"}],
    )
    assert post(api, acme, reservation("ok", "web.search")).status_code == 200
    before = (api.balance(acme, "tenant:acme"), counters(api, store))

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("connection reset while writing")

    monkeypatch.setattr(store, "_cas", unreachable)
    assert post(api, acme, reservation("boom", "web.search")).status_code == 503
    monkeypatch.undo()
    assert (api.balance(acme, "tenant:acme"), counters(api, store)) == before
    # the retry with the same key succeeds and counts once
    assert post(api, acme, reservation("boom", "web.search")).status_code == 200
    assert list(counters(api, store).values()) == [2]


def test_a_tenant_row_without_a_policy_count_still_reads_its_policies(
    api: Api, store: Store, acme: str
) -> None:
    """Tenants keep a policy count so that reservations of tenants without policies skip
    reading them; a row written before the count was kept (``None``) reads them every time."""
    add_policy(api, store, denied_action_kinds=["payment.charge"])
    tenant = api.client.run(store.get_tenant("acme"))
    assert tenant is not None
    assert tenant.policy_count == 1
    api.client.run(store.update_tenant("acme", {"policy_count": None}))
    denial(post(api, acme, reservation("a", "payment.charge")), "ACTION_KIND_DENIED")
    api.client.run(store.update_tenant("acme", {"policy_count": 0}))  # a wrong count skips them
    assert post(api, acme, reservation("b", "payment.charge")).status_code == 200
