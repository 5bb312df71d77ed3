"""Unit tests of the pure protocol rules in runcycles_server.ledger."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles.models import (
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    Subject,
)
from runcycles_server import ledger
from runcycles_server.ledger import BudgetRow, LedgerError, ReservationRow, TenantRow

NOW = 1_000_000
U = "USD_MICROCENTS"
INT64_MAX = 2**63 - 1


def budget(scope: str = "tenant:acme", allocated: int = 1000, **fields: Any) -> BudgetRow:
    row = BudgetRow(
        scope=scope,
        unit=fields.pop("unit", U),
        tenant_id="acme",
        allocated=allocated,
        remaining=allocated,
    )
    for name, value in fields.items():
        setattr(row, name, value)
    if "remaining" not in fields:
        row.remaining = row.allocated - row.spent - row.reserved - row.debt
    return row


def invariant(row: BudgetRow) -> bool:
    return row.remaining == row.allocated - row.spent - row.reserved - row.debt


def reserve_request(amount: int, subject: dict[str, str] | None = None, **extra: Any) -> Any:
    return ReservationCreateRequest.model_validate(
        {
            "idempotency_key": "k",
            "subject": subject or {"tenant": "acme"},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": U, "amount": amount},
            **extra,
        }
    )


def reservation(estimate: int, scopes: list[str], policy: str, **fields: Any) -> ReservationRow:
    row = ReservationRow(
        reservation_id="rsv_1",
        tenant_id="acme",
        status="ACTIVE",
        subject={"tenant": "acme"},
        action={"kind": "k", "name": "n"},
        unit=U,
        estimate=estimate,
        scope_path=scopes[-1],
        affected_scopes=scopes,
        budgeted_scopes=scopes,
        created_at_ms=NOW,
        expires_at_ms=NOW + 60_000,
        grace_ms=5_000,
        overage_policy=policy,
        max_extensions=10,
    )
    return dataclasses.replace(row, **fields)


def reserve(rows: list[BudgetRow], amount: int, **kw: Any) -> ledger.Outcome:
    subject = kw.pop("subject", {"tenant": "acme", "agent": "bot"})
    tenant = kw.pop("tenant", None)
    return ledger.plan_reserve(
        request=reserve_request(amount, subject, **kw),
        tenant_id="acme",
        tenant=tenant,
        budgets=rows,
        request_hash="h",
        reservation_id="rsv_1",
        now_ms=NOW,
    )


def commit(
    res: ReservationRow, rows: list[BudgetRow], actual: int, now: int = NOW
) -> ledger.Outcome:
    return ledger.plan_commit(
        reservation_id=res.reservation_id,
        request=CommitRequest.model_validate(
            {"idempotency_key": "c", "actual": {"unit": U, "amount": actual}}
        ),
        tenant_id="acme",
        reservation=res,
        tenant=None,
        budgets=rows,
        request_hash="h",
        now_ms=now,
    )


def event(rows: list[BudgetRow], actual: int, policy: str | None = None) -> ledger.Outcome:
    body: dict[str, Any] = {
        "idempotency_key": "e",
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "k", "name": "n"},
        "actual": {"unit": U, "amount": actual},
    }
    if policy:
        body["overage_policy"] = policy
    return ledger.plan_event(
        request=EventCreateRequest.model_validate(body),
        tenant_id="acme",
        tenant=None,
        budgets=rows,
        request_hash="h",
        event_id="evt_1",
        now_ms=NOW,
    )


def by_scope(outcome: ledger.Outcome) -> dict[str, BudgetRow]:
    return {row.scope: row for row in outcome.budgets}


# -- scopes -------------------------------------------------------------------------------------


_ROWS: dict[type[Any], Any] = {
    TenantRow: TenantRow(tenant_id="acme", name="Acme", metadata={"a": "b"}),
    BudgetRow: BudgetRow(scope="tenant:acme", unit=U, tenant_id="acme", allocated=9, remaining=9),
    ReservationRow: ReservationRow(
        reservation_id="r",
        tenant_id="acme",
        status="ACTIVE",
        subject={"tenant": "acme"},
        action={"kind": "k", "name": "n"},
        unit=U,
        estimate=5,
        scope_path="tenant:acme",
        affected_scopes=["tenant:acme"],
        budgeted_scopes=["tenant:acme"],
        created_at_ms=1,
        expires_at_ms=2,
        grace_ms=0,
        overage_policy="REJECT",
        max_extensions=3,
    ),
    ledger.IdempotencyRow: ledger.IdempotencyRow(
        "acme", "reserve", "k", "h", 200, b"{}", None, 1, 2
    ),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_evolve_is_dataclasses_replace(data: st.DataObject) -> None:
    """The hot path's row copy gives exactly what ``dataclasses.replace`` gives, and a copy."""
    cls = data.draw(st.sampled_from(list(_ROWS)))
    row = _ROWS[cls]
    names = [f.name for f in dataclasses.fields(cls)]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
    changes = {name: data.draw(st.integers() | st.text(max_size=3) | st.none()) for name in chosen}
    before = dataclasses.replace(row)
    evolved = ledger.evolve(row, **changes)
    assert evolved == dataclasses.replace(row, **changes)
    assert type(evolved) is cls
    assert evolved is not row
    assert row == before  # the original is untouched


def test_evolve_refuses_a_name_that_is_not_a_field() -> None:
    with pytest.raises(AttributeError):
        ledger.evolve(budget(), no_such_field=1)


def test_derive_scopes_orders_skips_missing_levels_and_lowercases() -> None:
    subject = Subject(toolset="Search", tenant="Acme", agent="bot")
    assert ledger.derive_scopes(subject) == [
        "tenant:acme",
        "tenant:acme/agent:bot",
        "tenant:acme/agent:bot/toolset:search",
    ]


def test_subject_values_with_delimiters_are_rejected() -> None:
    with pytest.raises(LedgerError) as info:
        ledger.validate_subject(Subject(tenant="acme", agent="a/b"))
    assert info.value.code == "INVALID_REQUEST"
    assert "subject.agent" in info.value.message


@pytest.mark.parametrize(
    ("scope", "ok"),
    [
        ("tenant:acme", True),
        ("tenant:acme/workspace:prod/agent:bot", True),
        ("tenant:other/agent:bot", False),
        ("tenant:acme/agent:bot/workspace:prod", False),
        ("tenant:Acme", False),
        ("agent:bot", False),
    ],
)
def test_budget_scope_validation(scope: str, ok: bool) -> None:
    if ok:
        ledger.validate_budget_scope(scope, "acme")
    else:
        with pytest.raises(LedgerError):
            ledger.validate_budget_scope(scope, "acme")


# -- reserve checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"status": "FROZEN", "is_over_limit": True, "debt": 5}, "BUDGET_FROZEN"),
        ({"status": "CLOSED", "is_over_limit": True}, "BUDGET_CLOSED"),
        ({"is_over_limit": True, "debt": 5}, "OVERDRAFT_LIMIT_EXCEEDED"),
        ({"debt": 5}, "DEBT_OUTSTANDING"),
        ({"spent": 950}, "BUDGET_EXCEEDED"),
    ],
)
def test_reserve_check_precedence(fields: dict[str, Any], reason: str) -> None:
    assert ledger.reserve_check(budget(**fields), 100) == reason


def test_debt_with_an_overdraft_limit_does_not_block_reservations() -> None:
    assert ledger.reserve_check(budget(debt=5, overdraft_limit=10), 100) is None


def test_live_reserve_charges_every_budgeted_scope_and_skips_unbudgeted() -> None:
    leaf = "tenant:acme/workspace:w/agent:bot"
    rows = [budget("tenant:acme", 1000), budget(leaf, 300)]
    out = reserve(rows, 200, subject={"tenant": "acme", "workspace": "w", "agent": "bot"})
    got = by_scope(out)
    assert got["tenant:acme"].reserved == 200
    assert got["tenant:acme"].remaining == 800
    assert got[leaf].remaining == 100
    assert all(invariant(r) for r in out.budgets)
    assert out.reservation is not None
    assert out.reservation.budgeted_scopes == ["tenant:acme", leaf]
    assert out.reservation.affected_scopes == [
        "tenant:acme",
        "tenant:acme/workspace:w",
        "tenant:acme/workspace:w/agent:bot",
    ]


def test_live_reserve_fails_on_the_tightest_scope() -> None:
    rows = [budget("tenant:acme", 1000), budget("tenant:acme/agent:bot", 100)]
    with pytest.raises(LedgerError) as info:
        reserve(rows, 200)
    assert (info.value.code, info.value.status) == ("BUDGET_EXCEEDED", 409)
    assert "tenant:acme/agent:bot" in info.value.message


def test_no_budget_is_404_but_other_unit_is_unit_mismatch() -> None:
    with pytest.raises(LedgerError) as info:
        reserve([], 1)
    assert (info.value.code, info.value.status) == ("NOT_FOUND", 404)
    with pytest.raises(LedgerError) as info:
        reserve([budget(unit="TOKENS")], 1)
    assert (info.value.code, info.value.status) == ("UNIT_MISMATCH", 400)
    assert info.value.details == {
        "scope": "tenant:acme",
        "requested_unit": U,
        "expected_units": ["TOKENS"],
    }


def test_dry_run_reports_denials_as_200_and_writes_only_idempotency() -> None:
    out = reserve([budget(spent=990)], 100, dry_run=True)
    body = json.loads(out.body)
    assert out.status_code == 200
    assert body["decision"] == "DENY"
    assert body["reason_code"] == "BUDGET_EXCEEDED"
    assert "reservation_id" not in body
    assert "expires_at_ms" not in body
    assert out.budgets == []
    assert out.reservation is None
    assert out.idempotency is not None


def test_caps_come_from_the_deepest_budgeted_scope() -> None:
    rows = [
        budget("tenant:acme", caps={"max_tokens": 5}),
        budget("tenant:acme/agent:bot", caps={"tool_denylist": ["rm"]}),
    ]
    body = json.loads(reserve(rows, 10).body)
    assert body["decision"] == "ALLOW_WITH_CAPS"
    assert body["caps"] == {"tool_denylist": ["rm"]}


def test_ttl_defaults_and_tenant_cap() -> None:
    tenant = TenantRow(
        "acme", "Acme", max_reservation_ttl_ms=10_000, default_reservation_ttl_ms=5_000
    )
    assert ledger.resolve_ttl_ms(None, tenant) == 5_000
    assert ledger.resolve_ttl_ms(60_000, tenant) == 10_000
    assert ledger.resolve_ttl_ms(None, None) == 60_000


def test_overage_policy_resolution_order() -> None:
    tenant = TenantRow("acme", "Acme", default_commit_overage_policy="REJECT")
    deep = [budget(), budget("tenant:acme/agent:bot", commit_overage_policy="ALLOW_WITH_OVERDRAFT")]
    assert ledger.resolve_overage_policy("REJECT", deep, tenant) == "REJECT"
    assert ledger.resolve_overage_policy(None, deep, tenant) == "ALLOW_WITH_OVERDRAFT"
    assert ledger.resolve_overage_policy(None, [budget()], tenant) == "REJECT"
    assert ledger.resolve_overage_policy(None, [budget()], None) == "ALLOW_IF_AVAILABLE"


def test_decide_maps_closed_tenant_to_deny() -> None:
    out = ledger.plan_decide(
        request=DecisionRequest.model_validate(
            {
                "idempotency_key": "d",
                "subject": {"tenant": "acme"},
                "action": {"kind": "k", "name": "n"},
                "estimate": {"unit": U, "amount": 1},
            }
        ),
        tenant_id="acme",
        tenant=TenantRow("acme", "A", status="CLOSED"),
        budgets=[budget()],
        request_hash="h",
        now_ms=NOW,
    )
    assert json.loads(out.body)["reason_code"] == "TENANT_CLOSED"


def test_unreadable_tenant_status_fails_closed() -> None:
    with pytest.raises(LedgerError) as info:
        reserve([budget()], 1, tenant=TenantRow("acme", "A", status="???"))
    assert info.value.status == 500


# -- commit math --------------------------------------------------------------------------------


def held(rows: list[BudgetRow], estimate: int) -> list[BudgetRow]:
    """Rows after a reservation of ``estimate``."""
    return [
        dataclasses.replace(r, reserved=r.reserved + estimate, remaining=r.remaining - estimate)
        for r in rows
    ]


def test_commit_under_estimate_releases_the_rest() -> None:
    rows = held([budget()], 100)
    out = commit(reservation(100, ["tenant:acme"], "REJECT"), rows, 60)
    row = out.budgets[0]
    assert (row.reserved, row.spent, row.remaining) == (0, 60, 940)
    body = json.loads(out.body)
    assert body["charged"]["amount"] == 60
    assert body["released"]["amount"] == 40
    assert invariant(row)


def test_commit_reject_policy_refuses_any_overage_and_changes_nothing() -> None:
    rows = held([budget()], 100)
    with pytest.raises(LedgerError) as info:
        commit(reservation(100, ["tenant:acme"], "REJECT"), rows, 101)
    assert info.value.code == "BUDGET_EXCEEDED"


def test_commit_allow_if_available_covers_overage_when_it_fits() -> None:
    rows = held([budget()], 100)
    out = commit(reservation(100, ["tenant:acme"], "ALLOW_IF_AVAILABLE"), rows, 150)
    row = out.budgets[0]
    assert (row.spent, row.remaining, row.debt, row.is_over_limit) == (150, 850, 0, False)
    assert "released" not in json.loads(out.body)


def test_commit_allow_if_available_caps_and_flags_short_scopes() -> None:
    rows = held([budget("tenant:acme", 1000), budget("tenant:acme/agent:bot", 130)], 100)
    res = reservation(100, ["tenant:acme", "tenant:acme/agent:bot"], "ALLOW_IF_AVAILABLE")
    out = commit(res, rows, 200)  # delta 100, the agent scope has only 30 left
    got = by_scope(out)
    assert json.loads(out.body)["charged"]["amount"] == 130
    assert got["tenant:acme/agent:bot"].spent == 130
    assert got["tenant:acme/agent:bot"].remaining == 0
    assert got["tenant:acme/agent:bot"].is_over_limit is True
    assert got["tenant:acme"].is_over_limit is False
    assert got["tenant:acme"].spent == 130
    assert all(r.debt == 0 and invariant(r) for r in out.budgets)


def test_commit_overdraft_records_only_the_unfunded_part_as_debt() -> None:
    rows = held([budget(allocated=130, overdraft_limit=500)], 100)  # remaining 30 after hold
    out = commit(reservation(100, ["tenant:acme"], "ALLOW_WITH_OVERDRAFT"), rows, 200)
    row = out.budgets[0]
    assert json.loads(out.body)["charged"]["amount"] == 200
    assert (row.spent, row.debt, row.remaining, row.reserved) == (130, 70, -70, 0)
    assert invariant(row)
    assert not row.is_over_limit


def test_commit_overdraft_beyond_limit_is_refused() -> None:
    rows = held([budget(allocated=130, overdraft_limit=50)], 100)
    with pytest.raises(LedgerError) as info:
        commit(reservation(100, ["tenant:acme"], "ALLOW_WITH_OVERDRAFT"), rows, 200)
    assert info.value.code == "OVERDRAFT_LIMIT_EXCEEDED"


def test_overdraft_with_zero_limit_behaves_like_allow_if_available() -> None:
    rows = held([budget(allocated=130)], 100)
    res = reservation(100, ["tenant:acme"], "ALLOW_WITH_OVERDRAFT")
    a = commit(res, rows, 200).budgets[0]
    b = commit(dataclasses.replace(res, overage_policy="ALLOW_IF_AVAILABLE"), rows, 200).budgets[0]
    assert a == b
    assert a.debt == 0
    assert a.is_over_limit


def test_commit_check_order_and_windows() -> None:
    rows = held([budget()], 100)
    res = reservation(100, ["tenant:acme"], "REJECT")
    with pytest.raises(LedgerError) as info:
        commit(res, rows, 10, now=res.expires_at_ms + res.grace_ms + 1)
    assert (info.value.code, info.value.status) == ("RESERVATION_EXPIRED", 410)
    commit(res, rows, 10, now=res.expires_at_ms + res.grace_ms)  # inside grace: accepted
    for status, code in (
        ("COMMITTED", "RESERVATION_FINALIZED"),
        ("EXPIRED", "RESERVATION_EXPIRED"),
    ):
        with pytest.raises(LedgerError) as info:
            commit(dataclasses.replace(res, status=status), rows, 10)
        assert info.value.code == code
    with pytest.raises(LedgerError) as info:
        ledger.plan_commit(
            reservation_id="rsv_1",
            request=CommitRequest.model_validate(
                {"idempotency_key": "c", "actual": {"unit": "TOKENS", "amount": 1}}
            ),
            tenant_id="acme",
            reservation=res,
            tenant=None,
            budgets=rows,
            request_hash="h",
            now_ms=NOW,
        )
    assert info.value.code == "UNIT_MISMATCH"
    with pytest.raises(LedgerError) as info:
        ledger.plan_commit(
            reservation_id="rsv_1",
            request=CommitRequest.model_validate(
                {"idempotency_key": "c", "actual": {"unit": U, "amount": 1}}
            ),
            tenant_id="other",
            reservation=res,
            tenant=None,
            budgets=rows,
            request_hash="h",
            now_ms=NOW,
        )
    assert info.value.code == "FORBIDDEN"


def test_closed_tenant_beats_finalized() -> None:
    res = reservation(100, ["tenant:acme"], "REJECT", status="COMMITTED")
    with pytest.raises(LedgerError) as info:
        ledger.plan_release(
            reservation_id="rsv_1",
            request=ReleaseRequest(idempotency_key="r"),
            tenant_id="acme",
            reservation=res,
            tenant=TenantRow("acme", "A", status="CLOSED"),
            budgets=[],
            request_hash="h",
            now_ms=NOW,
        )
    assert info.value.code == "TENANT_CLOSED"


# -- events ---------------------------------------------------------------------------------------


def test_event_reject_needs_remaining_on_every_scope() -> None:
    with pytest.raises(LedgerError) as info:
        event([budget(spent=950)], 100, "REJECT")
    assert info.value.code == "BUDGET_EXCEEDED"
    out = event([budget()], 100, "REJECT")
    assert out.status_code == 201
    assert out.budgets[0].spent == 100


def test_event_allow_if_available_caps_and_reports_charged() -> None:
    out = event([budget(spent=950)], 100)
    body = json.loads(out.body)
    assert body["charged"]["amount"] == 50
    assert out.budgets[0].remaining == 0
    assert out.budgets[0].is_over_limit


def test_event_overdraft_and_debt_do_not_block() -> None:
    out = event([budget(spent=950, debt=10, overdraft_limit=100)], 100, "ALLOW_WITH_OVERDRAFT")
    row = out.budgets[0]
    assert "charged" not in json.loads(out.body)
    assert (row.spent, row.debt, row.remaining) == (990, 70, -60)
    assert invariant(row)


def test_event_on_frozen_budget_is_refused() -> None:
    with pytest.raises(LedgerError) as info:
        event([budget(status="FROZEN")], 1)
    assert info.value.code == "BUDGET_FROZEN"


# -- int64 ----------------------------------------------------------------------------------------


def test_overflow_is_rejected_not_wrapped() -> None:
    row = budget(allocated=INT64_MAX, spent=0)
    held_row = dataclasses.replace(row, reserved=INT64_MAX, remaining=0)
    with pytest.raises(LedgerError) as info:
        ledger.plan_fund(held_row, "CREDIT", INT64_MAX, spent=None, now_ms=NOW)
    assert info.value.status == 400
    assert "int64" in info.value.message


def test_int64_amounts_round_trip_exactly() -> None:
    big = 2**62 + 1
    out = reserve([budget(allocated=INT64_MAX)], big)
    assert json.loads(out.body)["balances"][0]["remaining"]["amount"] == INT64_MAX - big


# -- extend, expire, replay -----------------------------------------------------------------------


def extend(res: ReservationRow, by: int, now: int = NOW, tenant: TenantRow | None = None) -> Any:
    return ledger.plan_extend(
        reservation_id="rsv_1",
        request=ReservationExtendRequest(idempotency_key="x", extend_by_ms=by),
        tenant_id="acme",
        reservation=res,
        tenant=tenant,
        request_hash="h",
        now_ms=now,
    )


def test_extend_is_relative_to_expiry_has_no_grace_and_is_limited() -> None:
    res = reservation(10, ["tenant:acme"], "REJECT")
    out = extend(res, 1000)
    assert json.loads(out.body) == {
        "status": "ACTIVE",
        "expires_at_ms": res.expires_at_ms + 1000,
        "remaining_ttl_ms": res.expires_at_ms + 1000 - NOW,
    }
    with pytest.raises(LedgerError) as info:
        extend(res, 1000, now=res.expires_at_ms + 1)
    assert info.value.status == 410
    with pytest.raises(LedgerError) as info:
        extend(dataclasses.replace(res, extension_count=10), 1000)
    assert info.value.code == "MAX_EXTENSIONS_EXCEEDED"


def test_extend_is_clamped_to_the_tenant_max_ttl_from_now() -> None:
    res = reservation(10, ["tenant:acme"], "REJECT")
    out = extend(res, 86_400_000, tenant=TenantRow("acme", "A", max_reservation_ttl_ms=120_000))
    assert json.loads(out.body)["expires_at_ms"] == NOW + 120_000


def test_expire_only_after_grace_and_returns_the_estimate() -> None:
    res = reservation(100, ["tenant:acme"], "REJECT")
    rows = held([budget()], 100)
    assert ledger.plan_expire(res, rows, res.deadline_ms) is None
    out = ledger.plan_expire(res, rows, res.deadline_ms + 1)
    assert out is not None
    assert out.reservation is not None
    assert out.reservation.status == "EXPIRED"
    assert (out.budgets[0].reserved, out.budgets[0].remaining) == (0, 1000)
    assert ledger.plan_expire(out.reservation, out.budgets, res.deadline_ms + 2) is None


def test_replay_recomputes_remaining_ttl_and_detects_mismatch() -> None:
    out = reserve([budget()], 10)
    assert out.idempotency is not None
    assert out.reservation is not None
    later = ledger.replay(out.idempotency, "h", now_ms=NOW + 1000, reservation=out.reservation)
    assert json.loads(later.body)["remaining_ttl_ms"] == 59_000
    assert json.loads(later.body)["reservation_id"] == "rsv_1"
    done = dataclasses.replace(out.reservation, status="COMMITTED")
    assert (
        json.loads(ledger.replay(out.idempotency, "h", now_ms=NOW, reservation=done).body)[
            "remaining_ttl_ms"
        ]
        == 0
    )
    with pytest.raises(LedgerError) as info:
        ledger.replay(out.idempotency, "other", now_ms=NOW)
    assert info.value.code == "IDEMPOTENCY_MISMATCH"


def test_payload_hash_treats_fixed_defaults_as_sent() -> None:
    plain = reserve_request(10)
    explicit = reserve_request(10, grace_period_ms=5000, dry_run=False)
    other = reserve_request(10, dry_run=True)
    h = [
        ledger.payload_hash("reserve", ledger.request_payload(m)) for m in (plain, explicit, other)
    ]
    assert h[0] == h[1] != h[2]


def test_request_digest_hashes_as_the_payload_and_keeps_the_dump_as_parsed() -> None:
    for m in (reserve_request(10), reserve_request(10, grace_period_ms=5000, dry_run=True)):
        digest, dumped = ledger.request_digest("reserve", m)
        assert digest == ledger.payload_hash("reserve", ledger.request_payload(m))
        assert dumped == m.model_dump(mode="json", exclude_none=True)  # no defaults filled in


# -- funding --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "amount", "spent", "expect"),
    [
        ("CREDIT", 500, None, {"allocated": 1500, "remaining": 1200, "debt": 100}),
        ("DEBIT", 200, None, {"allocated": 800, "remaining": 500, "debt": 100}),
        ("RESET", 2000, None, {"allocated": 2000, "remaining": 1700, "spent": 100}),
        ("RESET_SPENT", 2000, 50, {"allocated": 2000, "remaining": 1750, "spent": 50}),
        ("RESET_SPENT", 2000, None, {"allocated": 2000, "remaining": 1800, "spent": 0}),
        ("REPAY_DEBT", 30, None, {"allocated": 1000, "remaining": 730, "debt": 70}),
        ("REPAY_DEBT", 150, None, {"allocated": 1050, "remaining": 850, "debt": 0}),
    ],
)
def test_fund_operations(
    operation: str, amount: int, spent: int | None, expect: dict[str, int]
) -> None:
    row = budget(
        allocated=1000, spent=100, reserved=100, debt=100, is_over_limit=True, overdraft_limit=0
    )  # remaining 700
    new, response = ledger.plan_fund(row, operation, amount, spent=spent, now_ms=NOW)
    for name, value in expect.items():
        assert getattr(new, name) == value, name
    assert invariant(new)
    assert new.is_over_limit == (new.debt > new.overdraft_limit)
    assert response["previous_remaining"]["amount"] == 700
    assert response["new_remaining"]["amount"] == new.remaining


def test_debit_below_zero_and_frozen_funding_are_refused() -> None:
    with pytest.raises(LedgerError) as info:
        ledger.plan_fund(budget(spent=900), "DEBIT", 200, spent=None, now_ms=NOW)
    assert info.value.code == "BUDGET_EXCEEDED"
    with pytest.raises(LedgerError) as info:
        ledger.plan_fund(budget(status="FROZEN"), "CREDIT", 1, spent=None, now_ms=NOW)
    assert info.value.code == "BUDGET_FROZEN"


# -- property: every sequence keeps the invariant ----------------------------------------------


ops = st.lists(
    st.tuples(
        st.sampled_from(["commit", "release", "event", "fund"]),
        st.integers(0, 400),
        st.integers(0, 400),
        st.sampled_from(["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]),
    ),
    max_size=25,
)


def apply_op(rows: dict[str, BudgetRow], op: str, est: int, actual: int, policy: str) -> int:
    """Apply one random operation to ``rows`` in place; return what it charged."""
    if op == "fund":
        new, _ = ledger.plan_fund(
            rows["tenant:acme/agent:bot"], "CREDIT", est, spent=None, now_ms=NOW
        )
        rows[new.scope] = new
        return 0
    if op == "event":
        out = event(list(rows.values()), actual, policy)
        rows.update(by_scope(out))
        return out.event.charged if out.event else 0
    held_out = reserve(list(rows.values()), est, overage_policy=policy)
    rows.update(by_scope(held_out))
    assert held_out.reservation is not None
    if op == "commit":
        refused: LedgerError | None = None
        try:
            out = commit(held_out.reservation, list(rows.values()), actual)
        except LedgerError as exc:  # REJECT / overdraft refusal: the client releases instead
            refused = exc
        if refused is None:
            rows.update(by_scope(out))
            return int(json.loads(out.body)["charged"]["amount"])
        assert refused.code in ("BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED")
    out = ledger.plan_release(
        reservation_id="rsv_1",
        request=ReleaseRequest(idempotency_key="r"),
        tenant_id="acme",
        reservation=held_out.reservation,
        tenant=None,
        budgets=list(rows.values()),
        request_hash="h",
        now_ms=NOW,
    )
    rows.update(by_scope(out))
    return 0


@settings(max_examples=150, deadline=None)
@given(ops=ops, limit=st.integers(0, 300), leaf_alloc=st.integers(0, 1000))
def test_invariant_holds_for_any_operation_sequence(
    ops: list[tuple[str, int, int, str]], limit: int, leaf_alloc: int
) -> None:
    rows = {
        "tenant:acme": budget("tenant:acme", 2000, overdraft_limit=limit),
        "tenant:acme/agent:bot": budget("tenant:acme/agent:bot", leaf_alloc),
    }
    charged_total = 0
    for op, est, actual, policy in ops:
        refused: LedgerError | None = None
        try:
            charged_total += apply_op(rows, op, est, actual, policy)
        except LedgerError as exc:
            refused = exc
        assert refused is None or refused.status in (404, 409), refused
        for row in rows.values():
            assert invariant(row), row
            assert row.reserved == 0
            assert row.debt <= max(row.overdraft_limit, 0) or row.debt == 0
        assert rows["tenant:acme/agent:bot"].debt == 0  # no overdraft limit: never owes
    for row in rows.values():  # every charge lands on every budgeted scope, funded or owed
        assert row.spent + row.debt == charged_total
