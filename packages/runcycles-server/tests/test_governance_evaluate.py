"""Governance evaluation: the spec's order of steps, quota counting and observe mode."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from runcycles.models import Action, ActionPolicyKeys, Subject
from runcycles.testing.spec import PROTOCOL_EXTENSIONS_SPEC, schema_validator
from runcycles_server.errors import LedgerError
from runcycles_server.governance import (
    Admission,
    CounterRow,
    Denial,
    PolicyRow,
    Registry,
    counter_memory,
    counters_needed,
    effective_observe_mode,
    evaluate,
    policy_from_create,
    prepare,
    release_per_run,
)

NOW = int(datetime(2026, 4, 9, 12, tzinfo=timezone.utc).timestamp() * 1000)
MIDNIGHT = int(datetime(2026, 4, 10, tzinfo=timezone.utc).timestamp() * 1000)
REG = Registry.from_declarations([{"kind": "custom.acme.erp.post", "risk_class": "read_only"}])
BOT = Subject(tenant="acme", workspace="eng", agent="bot", dimensions={"run_id": "r1"})
DENY_DETAIL = schema_validator("DenyDetail", PROTOCOL_EXTENSIONS_SPEC)
THRESHOLD_EVENT = schema_validator("EventDataQuotaThresholdApproaching", PROTOCOL_EXTENSIONS_SPEC)


def policy(pattern: str = "tenant:acme/*", **body: Any) -> PolicyRow:
    return policy_from_create(
        "acme",
        {"name": "p", "scope_pattern": pattern, **body},
        policy_id="pol_1",
        now_ms=NOW,
        registry=REG,
    )


def act(kind: str = "message.email.send", **keys: str) -> Action:
    policy_keys = ActionPolicyKeys.model_validate(keys) if keys else None
    return Action(kind=kind, name="x", policy_keys=policy_keys)


class Ledger:
    """Applies admissions the way a store would: counters written, denials change nothing."""

    def __init__(self, pol: PolicyRow | None, subject: Subject = BOT) -> None:
        self.policy = pol
        self.subject = subject
        self.rows: dict[str, CounterRow] = {}

    def reserve(self, action: Action, now: int = NOW) -> Admission | Denial:
        verdict = evaluate(self.policy, action, self.subject, self.rows, now, REG)
        if isinstance(verdict, Admission):
            self.rows.update((row.name, row) for row in verdict.counters)
        return verdict

    def admitted(self, action: Action, times: int, now: int = NOW) -> list[Admission]:
        out = []
        for _ in range(times):
            verdict = self.reserve(action, now)
            assert isinstance(verdict, Admission), verdict
            out.append(verdict)
        return out

    def release(self, names: Iterable[str], now: int = NOW) -> None:
        self.rows.update((row.name, row) for row in release_per_run(list(names), self.rows, now))


def denial(verdict: Admission | Denial, reason: str) -> dict[str, Any]:
    assert isinstance(verdict, Denial), verdict
    assert verdict.reason_code == reason
    DENY_DETAIL.validate(verdict.deny_detail)
    assert verdict.deny_detail["reason_code"] == reason
    assert verdict.deny_detail["blocked_by_policy"] == "pol_1"
    error = verdict.error()
    assert (error.code, error.status) == (reason, 409)
    assert error.details == {"deny_detail": verdict.deny_detail}
    return verdict.deny_detail


EMAIL_PER_RUN = {"action_kind": "message.email.send", "max_calls": 2, "window": "per_run"}


# --------------------------------------------------------------------- no policy, kinds


def test_without_a_policy_everything_is_admitted_and_nothing_counted():
    verdict = evaluate(None, act("proprietary.action"), BOT, {}, NOW, REG)
    assert isinstance(verdict, Admission)
    assert (verdict.policy, verdict.counters, verdict.risk_class) == (None, (), "side_effect")
    assert verdict.caps is None
    assert counters_needed(None, act(), BOT, NOW, REG) == []


@pytest.mark.parametrize("pol", [None, "policy"])
def test_an_undeclared_custom_kind_is_a_400_with_or_without_policy(pol: str | None):
    row = policy() if pol else None
    calls = (
        lambda: evaluate(row, act("custom.acme.nope.x"), BOT, {}, NOW, REG),
        lambda: counters_needed(row, act("custom.acme.nope.x"), BOT, NOW, REG),
    )
    for call in calls:
        with pytest.raises(LedgerError) as caught:
            call()
        assert (caught.value.code, caught.value.status) == ("INVALID_REQUEST", 400)
        assert "custom.acme.nope.x" in caught.value.message


# ------------------------------------------------------------------------------ step 1


def test_deny_list_denies_before_any_quota_even_an_exhausted_one():
    pol = policy(
        denied_action_kinds=["message.email.send"],
        action_quotas=[{**EMAIL_PER_RUN, "max_calls": 1}],
        risk_class_quotas=[
            {"risk_class": "external_side_effect", "max_calls": 1, "window": "per_run"}
        ],
    )
    full = Ledger(policy(action_quotas=[{**EMAIL_PER_RUN, "max_calls": 1}]))
    full.admitted(act(), 1)
    ledger = Ledger(pol)
    ledger.rows = dict(full.rows)
    detail = denial(ledger.reserve(act()), "ACTION_KIND_DENIED")
    assert "quota_violation" not in detail
    assert detail["blocked_by_scope"] == "tenant:acme/workspace:eng/agent:bot"
    assert "denied_action_kinds" in detail["suggested_fix"]
    assert counters_needed(pol, act(), BOT, NOW, REG) == []
    assert isinstance(ledger.reserve(act("llm.completion")), Admission)


def test_a_denied_kind_needs_no_run_id():
    pol = policy(
        "tenant:acme", denied_action_kinds=["message.email.send"], action_quotas=[EMAIL_PER_RUN]
    )
    denial(Ledger(pol, Subject(tenant="acme")).reserve(act()), "ACTION_KIND_DENIED")


def test_allow_list_refuses_every_other_kind():
    ledger = Ledger(policy(allowed_action_kinds=["llm.completion", "custom.acme.erp.post"]))
    assert isinstance(ledger.reserve(act("llm.completion")), Admission)
    assert isinstance(ledger.reserve(act("custom.acme.erp.post")), Admission)
    detail = denial(ledger.reserve(act("payment.charge")), "ACTION_KIND_NOT_ALLOWED")
    assert "allowed_action_kinds" in detail["suggested_fix"]
    denial(ledger.reserve(act("proprietary.action")), "ACTION_KIND_NOT_ALLOWED")


# ------------------------------------------------------------------------------ step 2


def test_risk_class_quota_counts_all_kinds_of_the_class_together():
    ledger = Ledger(
        policy(
            risk_class_quotas=[
                {
                    "risk_class": "external_side_effect",
                    "max_calls": 3,
                    "window": "per_hour_tumbling",
                }
            ]
        )
    )
    ledger.admitted(act("message.email.send"), 2)
    ledger.admitted(act("message.slack.post"), 1)
    assert isinstance(ledger.reserve(act("llm.completion")), Admission)  # another class
    detail = denial(ledger.reserve(act("http.post")), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"] == {
        "action_kind": "http.post",
        "risk_class": "external_side_effect",
        "window": "per_hour_tumbling",
        "window_key": "2026-04-09T12",
        "used": 3,
        "limit": 3,
        "scope": "tenant:acme/workspace:eng/agent:bot",
        "policy_id": "pol_1",
    }
    assert "2026-04-09T13:00:00.000Z" in detail["suggested_fix"]


def test_unregistered_kind_counts_as_side_effect_and_custom_kind_as_declared():
    ledger = Ledger(
        policy(
            risk_class_quotas=[
                {"risk_class": "side_effect", "max_calls": 1, "window": "per_run"},
                {"risk_class": "read_only", "max_calls": 1, "window": "per_run"},
            ]
        )
    )
    ledger.admitted(act("proprietary.action"), 1)
    denial(ledger.reserve(act("llm.completion")), "ACTION_QUOTA_EXCEEDED")
    ledger.admitted(act("custom.acme.erp.post"), 1)
    detail = denial(ledger.reserve(act("web.search")), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"]["risk_class"] == "read_only"


def test_risk_class_quota_is_checked_before_per_kind_quotas():
    ledger = Ledger(
        policy(
            action_quotas=[{**EMAIL_PER_RUN, "max_calls": 1}],
            risk_class_quotas=[
                {"risk_class": "external_side_effect", "max_calls": 1, "window": "per_day_tumbling"}
            ],
        )
    )
    ledger.admitted(act(), 1)
    detail = denial(ledger.reserve(act()), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"]["risk_class"] == "external_side_effect"


# ------------------------------------------------------------------------------ step 3


def test_per_kind_quota_denies_at_max_calls_and_changes_no_counter():
    ledger = Ledger(policy(action_quotas=[EMAIL_PER_RUN]))
    ledger.admitted(act(), 2)
    before = dict(ledger.rows)
    detail = denial(ledger.reserve(act()), "ACTION_QUOTA_EXCEEDED")
    assert ledger.rows == before
    violation = detail["quota_violation"]
    assert (violation["used"], violation["limit"], violation["window_key"]) == (2, 2, "r1")
    assert "risk_class" not in violation
    assert "start a new run" in detail["suggested_fix"]
    assert isinstance(ledger.reserve(act("llm.completion")), Admission)


def test_the_most_restrictive_violated_rule_is_reported_ties_to_the_first():
    ledger = Ledger(
        policy(
            action_quotas=[
                {"action_kind": "message.email.send", "max_calls": 3, "window": "per_day_tumbling"},
                {
                    "action_kind": "message.email.send",
                    "max_calls": 4,
                    "window": "per_hour_tumbling",
                },
                {"action_kind": "message.email.send", "max_calls": 5, "window": "per_run"},
            ]
        )
    )
    ledger.admitted(act(), 3)
    detail = denial(ledger.reserve(act()), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"]["window"] == "per_day_tumbling"  # headroom 0 vs 1, 2
    tie = Ledger(
        policy(
            action_quotas=[
                {
                    "action_kind": "message.email.send",
                    "max_calls": 2,
                    "window": "per_hour_tumbling",
                },
                {"action_kind": "message.email.send", "max_calls": 2, "window": "per_run"},
            ]
        )
    )
    tie.admitted(act(), 2)
    assert denial(tie.reserve(act()), "ACTION_QUOTA_EXCEEDED")["quota_violation"]["window"] == (
        "per_hour_tumbling"
    )
    # A limit lowered below the count (PATCH keeps counters) is the least headroom.
    lowered = dataclasses.replace(
        ledger.policy,
        action_quotas=(  # type: ignore[type-var]
            dataclasses.replace(ledger.policy.action_quotas[0], max_calls=3),  # type: ignore[union-attr]
            dataclasses.replace(ledger.policy.action_quotas[2], max_calls=1),  # type: ignore[union-attr]
        ),
    )
    ledger.policy = lowered
    assert denial(ledger.reserve(act()), "ACTION_QUOTA_EXCEEDED")["quota_violation"]["window"] == (
        "per_run"
    )


HOST_RULE = {
    "action_kind": "message.email.send",
    "max_calls": 1,
    "window": "per_run",
    "host_allowlist": ["api.sendgrid.com"],
}


def test_allowlist_rule_applies_only_to_a_listed_key():
    ledger = Ledger(policy(action_quotas=[HOST_RULE]))
    ledger.admitted(act(host="API.SendGrid.com"), 1)  # hosts compare case-insensitively
    denial(ledger.reserve(act(host="api.sendgrid.com")), "ACTION_QUOTA_EXCEEDED")
    ledger.admitted(act(host="smtp.example.com"), 3)  # listed elsewhere: rule does not apply
    ledger.admitted(act(recipient_domain="customer.com"), 3)  # host absent: skipped
    ledger.admitted(act(), 3)  # no policy_keys at all: skipped
    assert counters_needed(ledger.policy, act(), BOT, NOW, REG) == []


def test_undeclared_dimensions_are_ignored_so_the_rule_is_skipped():
    pol = policy(action_quotas=[HOST_RULE])
    sms_rule = dataclasses.replace(pol.action_quotas[0], action_kind="message.sms.send")
    ledger = Ledger(dataclasses.replace(pol, action_quotas=(sms_rule,)))
    ledger.admitted(act("message.sms.send", host="api.sendgrid.com"), 3)
    odd_rule = dataclasses.replace(pol.action_quotas[0], action_kind="proprietary.action")
    ledger = Ledger(dataclasses.replace(pol, action_quotas=(odd_rule,)))
    ledger.admitted(act("proprietary.action", host="api.sendgrid.com"), 3)


def test_rules_with_different_allowlists_count_separately_and_a_shared_counter_once():
    ledger = Ledger(
        policy(
            action_quotas=[
                HOST_RULE,
                {**HOST_RULE, "host_allowlist": ["smtp.example.com"], "max_calls": 5},
                {"action_kind": "message.email.send", "max_calls": 3, "window": "per_run"},
                {"action_kind": "message.email.send", "max_calls": 4, "window": "per_run"},
            ]
        )
    )
    first = ledger.admitted(act(host="api.sendgrid.com"), 1)[0]
    assert len(first.counters) == 2  # the sendgrid rule's and the shared unfiltered one
    assert sorted(r.count for r in first.counters) == [1, 1]
    ledger.admitted(act(host="smtp.example.com"), 2)
    detail = denial(ledger.reserve(act(host="smtp.example.com")), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"]["limit"] == 3  # the unfiltered count reached 3


# --------------------------------------------------------------------------- counters


def test_counter_scope_is_the_most_specific_matching_scope():
    broad = Ledger(policy("tenant:acme", action_quotas=[EMAIL_PER_RUN]))
    (adm,) = broad.admitted(act(), 1)
    assert adm.counters[0].key.scope == "tenant:acme"
    by_ws = Ledger(policy("tenant:acme/workspace:*", action_quotas=[EMAIL_PER_RUN]))
    (adm,) = by_ws.admitted(act(), 1)
    assert adm.counters[0].key.scope == "tenant:acme/workspace:eng"
    assert adm.scope == "tenant:acme/workspace:eng"


def test_per_tenant_per_day_counts_at_the_tenant_root_for_every_agent():
    rule = {"action_kind": "llm.completion", "max_calls": 2, "window": "per_tenant_per_day"}
    pol = policy(action_quotas=[rule])
    ledger = Ledger(pol)
    ledger.admitted(act("llm.completion"), 1)
    ledger.subject = Subject(tenant="acme", app="other")
    (adm,) = ledger.admitted(act("llm.completion"), 1)
    assert adm.counters[0].key.scope == "tenant:acme"
    detail = denial(ledger.reserve(act("llm.completion")), "ACTION_QUOTA_EXCEEDED")
    assert detail["quota_violation"]["scope"] == "tenant:acme"
    assert detail["blocked_by_scope"] == "tenant:acme"


@pytest.mark.parametrize(
    ("window", "size_ms"),
    [
        ("per_minute_tumbling", 60_000),
        ("per_hour_tumbling", 3_600_000),
        ("per_day_tumbling", 86_400_000),
    ],
)
def test_a_calendar_quota_resets_at_the_utc_boundary(window: str, size_ms: int):
    ledger = Ledger(
        policy(action_quotas=[{"action_kind": "llm.completion", "max_calls": 1, "window": window}])
    )
    ledger.admitted(act("llm.completion"), 1, now=MIDNIGHT - size_ms)
    denial(ledger.reserve(act("llm.completion"), MIDNIGHT - 1), "ACTION_QUOTA_EXCEEDED")
    (adm,) = ledger.admitted(act("llm.completion"), 1, now=MIDNIGHT)
    row = adm.counters[0]
    assert row.count == 1
    assert row.key.bucket_start_ms == MIDNIGHT
    assert row.expires_at_ms > MIDNIGHT + size_ms  # cleanup TTL, after the boundary


def test_an_expired_row_is_a_fresh_count():
    ledger = Ledger(policy(action_quotas=[{**EMAIL_PER_RUN, "per_run_counter_ttl_ms": 60_000}]))
    ledger.admitted(act(), 2)
    denial(ledger.reserve(act(), NOW + 59_999), "ACTION_QUOTA_EXCEEDED")
    (adm,) = ledger.admitted(act(), 1, now=NOW + 60_000)
    assert adm.counters[0].count == 1


def test_per_run_counters_increment_refresh_ttl_and_are_given_back_on_release():
    ledger = Ledger(policy(action_quotas=[{**EMAIL_PER_RUN, "per_run_counter_ttl_ms": 600_000}]))
    (first,) = ledger.admitted(act(), 1)
    entry = first.per_run_counters[0]
    name, generation = counter_memory(entry)
    assert (name, generation) == (first.counters[0].name, NOW)  # the row's first life
    assert first.counters[0].expires_at_ms == NOW + 600_000
    (second,) = ledger.admitted(act(), 1, now=NOW + 1000)
    assert second.per_run_counters == (entry,)  # the same life
    assert ledger.rows[name].count == 2
    assert ledger.rows[name].expires_at_ms == NOW + 1000 + 600_000  # refreshed
    denial(ledger.reserve(act(), NOW + 2000), "ACTION_QUOTA_EXCEEDED")
    ledger.release([entry], now=NOW + 3000)
    assert ledger.rows[name].count == 1
    assert ledger.rows[name].expires_at_ms == NOW + 1000 + 600_000  # not refreshed
    ledger.admitted(act(), 1, now=NOW + 4000)
    ledger.release([entry, entry], now=NOW + 5000)  # one reservation, one decrement
    ledger.release([entry], now=NOW + 5000)
    ledger.release([entry], now=NOW + 5000)
    assert ledger.rows[name].count == 0  # never below 0
    assert release_per_run(["1@absent"], ledger.rows, NOW) == []
    assert release_per_run([entry], ledger.rows, NOW + 10_000_000) == []  # expired
    ledger.release([name], now=NOW + 5000)  # a plain name (stored before generations) still works
    assert ledger.rows[name].count == 0


def test_a_run_counter_that_starts_again_is_a_new_generation():
    ledger = Ledger(policy(action_quotas=[{**EMAIL_PER_RUN, "per_run_counter_ttl_ms": 60_000}]))
    (old,) = ledger.admitted(act(), 1)
    (new,) = ledger.admitted(act(), 1, now=NOW + 60_000)  # after the first life expired
    assert new.per_run_counters != old.per_run_counters
    name, generation = counter_memory(new.per_run_counters[0])
    assert generation == NOW + 60_000
    ledger.release(old.per_run_counters, now=NOW + 60_001)  # the old life's reservation
    assert ledger.rows[name].count == 1
    ledger.release(new.per_run_counters, now=NOW + 60_001)
    assert ledger.rows[name].count == 0


def test_counter_rows_round_trip_with_their_generation_and_read_the_older_form():
    ledger = Ledger(policy(action_quotas=[EMAIL_PER_RUN]))
    (adm,) = ledger.admitted(act(), 1)
    row = adm.counters[0]
    assert CounterRow.from_json(row.to_json()) == row
    older = orjson.loads(row.to_json())[:15]
    older[0] = 2  # storage version 2 had no generation
    assert CounterRow.from_json(orjson.dumps(older)) == dataclasses.replace(row, generation=0)


def test_per_run_risk_class_counter_has_the_same_lifecycle():
    ledger = Ledger(
        policy(
            risk_class_quotas=[
                {"risk_class": "external_side_effect", "max_calls": 1, "window": "per_run"}
            ]
        )
    )
    (adm,) = ledger.admitted(act(), 1)
    assert adm.counters[0].expires_at_ms == NOW + 86_400_000  # the default TTL
    denial(ledger.reserve(act("http.post")), "ACTION_QUOTA_EXCEEDED")
    ledger.release(adm.per_run_counters)
    ledger.admitted(act("http.post"), 1)


def test_a_new_run_id_has_its_own_counter():
    ledger = Ledger(policy(action_quotas=[EMAIL_PER_RUN]))
    ledger.admitted(act(), 2)
    ledger.subject = Subject(
        tenant="acme", workspace="eng", agent="bot", dimensions={"run_id": "r2"}
    )
    ledger.admitted(act(), 2)


def test_a_missing_run_id_is_a_400_only_when_a_per_run_quota_applies():
    pol = policy("tenant:acme", action_quotas=[EMAIL_PER_RUN])
    bare = Subject(tenant="acme", workspace="eng", agent="bot")
    calls = (
        lambda: evaluate(pol, act(), bare, {}, NOW, REG),
        lambda: counters_needed(pol, act(), bare, NOW, REG),
    )
    for call in calls:
        with pytest.raises(LedgerError) as caught:
            call()
        assert (caught.value.code, caught.value.status) == ("INVALID_REQUEST", 400)
        assert "subject.dimensions.run_id" in caught.value.message
        assert "action_quotas[0]" in caught.value.message
    assert isinstance(evaluate(pol, act("llm.completion"), bare, {}, NOW, REG), Admission)
    with_empty = Subject(tenant="acme", dimensions={"run_id": ""})
    with pytest.raises(LedgerError, match="run_id"):
        evaluate(pol, act(), with_empty, {}, NOW, REG)


def test_counters_needed_are_the_rows_evaluate_writes():
    pol = policy(
        action_quotas=[EMAIL_PER_RUN, {**EMAIL_PER_RUN, "max_calls": 9}],
        risk_class_quotas=[
            {"risk_class": "external_side_effect", "max_calls": 5, "window": "per_hour_tumbling"}
        ],
    )
    keys = counters_needed(pol, act(), BOT, NOW, REG)
    verdict = evaluate(pol, act(), BOT, {}, NOW, REG)
    assert isinstance(verdict, Admission)
    assert [k.name for k in keys] == [row.name for row in verdict.counters]
    assert len(keys) == 2


def test_admission_carries_the_policy_settings_for_the_ledger():
    pol = policy(
        caps={"max_tokens": 100},
        commit_overage_policy="REJECT",
        reservation_ttl_override={"max_ttl_ms": 5000},
    )
    verdict = evaluate(pol, act(), BOT, {}, NOW, REG)
    assert isinstance(verdict, Admission)
    assert verdict.caps is not None
    assert verdict.caps.max_tokens == 100
    assert verdict.commit_overage_policy == "REJECT"
    assert verdict.reservation_ttl_override is not None
    assert verdict.reservation_ttl_override.max_ttl_ms == 5000
    assert verdict.counters == ()


def test_a_policy_that_does_not_match_the_subject_is_a_programming_error():
    with pytest.raises(ValueError, match="does not match"):
        evaluate(policy("tenant:acme/app:*"), act(), BOT, {}, NOW, REG)


# ------------------------------------------------------------------------- thresholds


def test_threshold_crossing_is_reported_once_per_window_instance():
    ledger = Ledger(
        policy(action_quotas=[{**EMAIL_PER_RUN, "max_calls": 10, "threshold_pct": 0.7}])
    )
    crossings = [a.thresholds for a in ledger.admitted(act(), 10)]
    assert [i for i, c in enumerate(crossings) if c] == [6]  # the 7th call: 7/10 >= 0.7
    crossing = crossings[6][0]
    assert crossing.rule == "action_quotas[0]"
    data = crossing.event_data("acme")
    THRESHOLD_EVENT.validate(data)
    assert (data["used"], data["limit"], data["threshold_pct"]) == (7, 10, 0.7)
    assert data["window_key"] == "r1"
    ledger.release(ledger.rows)  # back under the threshold, then over it again: no repeat
    ledger.release(ledger.rows)
    ledger.release(ledger.rows)
    ledger.release(ledger.rows)
    assert [a.thresholds for a in ledger.admitted(act(), 3)] == [(), (), ()]


def test_risk_class_threshold_names_the_class_and_default_is_80_percent():
    ledger = Ledger(
        policy(
            risk_class_quotas=[
                {
                    "risk_class": "external_side_effect",
                    "max_calls": 5,
                    "window": "per_minute_tumbling",
                }
            ]
        )
    )
    crossings = [a.thresholds for a in ledger.admitted(act(), 5)]
    assert [i for i, c in enumerate(crossings) if c] == [3]  # 4/5 = 0.8
    assert crossings[3][0].rule == "risk_class_quotas[0]"
    data = crossings[3][0].event_data("acme")
    THRESHOLD_EVENT.validate(data)
    assert (data["action_kind"], data["risk_class"]) == ("__risk__", "external_side_effect")
    fresh = ledger.admitted(act(), 4, now=NOW + 60_000)  # next minute: threshold resets
    assert [bool(a.thresholds) for a in fresh] == [False, False, False, True]


# ------------------------------------------------------------------------- observe mode


@pytest.mark.parametrize(
    ("request_mode", "tenant_mode", "expected"),
    [
        (None, None, "ENFORCE"),
        (None, "ENFORCE", "ENFORCE"),
        (None, "DISABLED", "ENFORCE"),
        (None, "OBSERVE", "OBSERVE"),
        ("OBSERVE", None, "OBSERVE"),
        ("OBSERVE", "ENFORCE", "OBSERVE"),
        ("ENFORCE", "OBSERVE", "ENFORCE"),
        ("DISABLED", "OBSERVE", "ENFORCE"),
        ("DISABLED", None, "ENFORCE"),
    ],
)
def test_effective_observe_mode_precedence(
    request_mode: str | None, tenant_mode: str | None, expected: str
):
    assert effective_observe_mode(request_mode, tenant_mode) == expected


def test_an_unknown_observe_mode_is_a_400():
    with pytest.raises(LedgerError, match="observe_mode 'SHADOW' is not one of"):
        effective_observe_mode("SHADOW", None)


def test_prepare_once_gives_the_same_keys_and_verdicts_as_the_two_calls():
    pol = policy(
        action_quotas=[EMAIL_PER_RUN],
        risk_class_quotas=[
            {"risk_class": "external_side_effect", "max_calls": 3, "window": "per_hour_tumbling"}
        ],
    )
    ledger = Ledger(pol)
    for _ in range(3):
        prepared = prepare(pol, act(), BOT, NOW, REG)
        assert prepared.counter_keys == counters_needed(pol, act(), BOT, NOW, REG)
        assert prepared.evaluate(ledger.rows) == evaluate(pol, act(), BOT, ledger.rows, NOW, REG)
        ledger.reserve(act())
    denied = prepare(policy(denied_action_kinds=["message.email.send"]), act(), BOT, NOW, REG)
    assert denied.counter_keys == []
    assert isinstance(denied.evaluate({}), Denial)


def test_correlation_ids_join_the_events_the_spec_joins():
    pol = policy(action_quotas=[{**EMAIL_PER_RUN, "max_calls": 1}])
    ledger = Ledger(pol)
    (adm,) = ledger.admitted(act(), 1)
    counter_id = adm.counters[0].key.correlation_id("acme")
    first = denial(ledger.reserve(act()), "ACTION_QUOTA_EXCEEDED")
    assert first
    again = ledger.reserve(act())
    assert isinstance(again, Denial)
    one = again.correlation_id("acme")
    assert one == ledger.reserve(act()).correlation_id("acme")  # type: ignore[union-attr]
    assert one != again.correlation_id("globex")
    other_run = Ledger(
        pol, Subject(tenant="acme", workspace="eng", agent="bot", dimensions={"run_id": "r2"})
    )
    other_run.rows = ledger.rows
    other_run.admitted(act(), 1)
    later = other_run.reserve(act())
    assert isinstance(later, Denial)
    assert later.correlation_id("acme") != one  # another window key
    denied = Ledger(policy(denied_action_kinds=["message.email.send"])).reserve(act())
    assert isinstance(denied, Denial)
    assert denied.correlation_id("acme") != one  # another reason
    # a threshold crossing and a reset of the same counter share the counter's id
    crossing_ledger = Ledger(policy(action_quotas=[{**EMAIL_PER_RUN, "max_calls": 5}]))
    crossing = next(a for a in crossing_ledger.admitted(act(), 4) if a.thresholds).thresholds[0]
    assert crossing.correlation_id("acme") == crossing.key.correlation_id("acme")
    assert counter_id.startswith("quota:")
    assert one.startswith("deny:")
