"""Governance policies: create/PATCH validation, scope patterns, selection, wire and storage."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.errors import LedgerError
from runcycles_server.governance import (
    PolicyRow,
    QuotaRule,
    Registry,
    caps_body,
    matches,
    matches_list_filters,
    policy_body,
    policy_from_create,
    policy_from_json,
    policy_patch,
    policy_to_json,
    select_policy,
    validate_scope_pattern,
)
from runcycles_server.governance.scopes import matching_scope

NOW = int(datetime(2026, 4, 9, 12, tzinfo=timezone.utc).timestamp() * 1000)
REG = Registry.from_declarations([{"kind": "custom.acme.erp.post", "risk_class": "high_risk"}])
SCOPES = ["tenant:acme", "tenant:acme/workspace:eng", "tenant:acme/workspace:eng/agent:bot"]


def create(
    body: dict[str, Any], *, tenant: str = "acme", pid: str = "pol_1", now: int = NOW
) -> PolicyRow:
    full = {"name": "p", "scope_pattern": "tenant:acme", **body}
    return policy_from_create(tenant, full, policy_id=pid, now_ms=now, registry=REG)


def refused(body: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(LedgerError) as caught:
        create(body, **kwargs)
    assert caught.value.code == "INVALID_REQUEST"
    assert caught.value.status == 400
    return caught.value.message


FULL: dict[str, Any] = {
    "name": "Support agent",
    "description": "limits",
    "scope_pattern": "tenant:acme/workspace:eng/*",
    "priority": 10,
    "caps": {"max_tokens": 4096, "tool_denylist": ["rm"]},
    "commit_overage_policy": "ALLOW_IF_AVAILABLE",
    "reservation_ttl_override": {"default_ttl_ms": 5000, "max_ttl_ms": 60000, "max_extensions": 2},
    "rate_limits": {"max_reservations_per_minute": 100},
    "effective_from": "2026-04-01T00:00:00Z",
    "effective_until": "2026-05-01T00:00:00+02:00",
    "action_quotas": [
        {
            "action_kind": "message.email.send",
            "max_calls": 5,
            "window": "per_run",
            "per_run_counter_ttl_ms": 3_600_000,
            "threshold_pct": 0.5,
            "host_allowlist": ["api.sendgrid.com"],
        },
        {"action_kind": "llm.completion", "max_calls": 200, "window": "per_hour_tumbling"},
    ],
    "risk_class_quotas": [
        {"risk_class": "high_risk", "max_calls": 10, "window": "per_day_tumbling"}
    ],
    "denied_action_kinds": ["payment.charge", "custom.acme.erp.post"],
}


# ------------------------------------------------------------------------------- create


def test_create_keeps_every_field_and_the_body_matches_the_extended_policy_schema():
    row = create(FULL)
    assert row.tenant_id == "acme"
    assert row.status == "ACTIVE"
    assert row.created_at_ms == NOW
    assert row.effective_until_ms == int(
        datetime(2026, 4, 30, 22, tzinfo=timezone.utc).timestamp() * 1000
    )
    assert row.action_quotas[0] == QuotaRule(
        "message.email.send", 5, "per_run", ("api.sendgrid.com",), (), (), 3_600_000, 0.5
    )
    body = policy_body(row)
    schema_validator("Policy", EXTENDED_ADMIN).validate(body)
    assert "tenant_id" not in body
    assert body["effective_from"] == "2026-04-01T00:00:00.000Z"
    assert body["caps"] == {"max_tokens": 4096, "tool_denylist": ["rm"]}
    assert body["denied_action_kinds"] == ["payment.charge", "custom.acme.erp.post"]
    assert body["allowed_action_kinds"] == []


def test_absent_governance_lists_are_returned_as_empty_lists():
    body = policy_body(create({}))
    for name in (
        "action_quotas",
        "risk_class_quotas",
        "allowed_action_kinds",
        "denied_action_kinds",
    ):
        assert body[name] == []
    assert body["priority"] == 0
    schema_validator("Policy", EXTENDED_ADMIN).validate(body)


def test_storage_json_round_trips_exactly():
    for row in (create(FULL), create({})):
        assert policy_from_json(policy_to_json(row)) == row
    patched, _ = policy_patch(
        create(FULL), {"status": "DISABLED", "caps": None}, now_ms=NOW + 1, registry=REG
    )
    assert policy_from_json(policy_to_json(patched)) == patched
    with pytest.raises(ValueError, match="not a stored policy"):
        policy_from_json(b'{"policy_id": "x"}')


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"allowed_action_kinds": ["llm.completion"], "denied_action_kinds": ["payment.charge"]},
            "mutually exclusive",
        ),
        (
            {"denied_action_kinds": ["custom.acme.nope.x"]},
            "denied_action_kinds[0]: custom action kind 'custom.acme.nope.x' is not registered",
        ),
        ({"allowed_action_kinds": ["llm.completion", "Http.get"]}, "allowed_action_kinds[1]: "),
        ({"allowed_action_kinds": ["high_risk"]}, "is a risk class, not an action kind"),
        ({"denied_action_kinds": ["http.*"]}, "wildcards are not supported"),
        (
            {
                "action_quotas": [
                    {"action_kind": "custom.acme.nope.x", "max_calls": 1, "window": "per_run"}
                ]
            },
            "action_quotas[0].action_kind: custom action kind",
        ),
        (
            {
                "action_quotas": [
                    {
                        "action_kind": "llm.completion",
                        "max_calls": 1,
                        "window": "per_hour_tumbling",
                        "per_run_counter_ttl_ms": 60_000,
                    }
                ]
            },
            "action_quotas[0]: per_run_counter_ttl_ms applies only to window=per_run",
        ),
        (
            {
                "risk_class_quotas": [
                    {
                        "risk_class": "high_risk",
                        "max_calls": 1,
                        "window": "per_day_tumbling",
                        "per_run_counter_ttl_ms": 60_000,
                    }
                ]
            },
            "risk_class_quotas[0]: per_run_counter_ttl_ms applies only",
        ),
        (
            {
                "action_quotas": [
                    {"action_kind": "llm.completion", "max_calls": 0, "window": "per_run"}
                ]
            },
            "action_quotas[0].max_calls",
        ),
        (
            {
                "action_quotas": [
                    {"action_kind": "llm.completion", "max_calls": 100_001, "window": "per_run"}
                ]
            },
            "action_quotas[0].max_calls",
        ),
        (
            {
                "action_quotas": [
                    {"action_kind": "llm.completion", "max_calls": 1, "window": "per_week"}
                ]
            },
            "action_quotas[0].window",
        ),
        (
            {"action_quotas": [{"action_kind": "llm.completion", "max_calls": 1}]},
            "action_quotas[0].window",
        ),
        (
            {
                "action_quotas": [
                    {
                        "action_kind": "llm.completion",
                        "max_calls": 1,
                        "window": "per_run",
                        "per_run_counter_ttl_ms": 59_999,
                    }
                ]
            },
            "per_run_counter_ttl_ms",
        ),
        (
            {
                "action_quotas": [
                    {
                        "action_kind": "llm.completion",
                        "max_calls": 1,
                        "window": "per_run",
                        "threshold_pct": 1.0,
                    }
                ]
            },
            "threshold_pct",
        ),
        (
            {
                "action_quotas": [
                    {
                        "action_kind": "message.sms.send",
                        "max_calls": 1,
                        "window": "per_run",
                        "host_allowlist": ["twilio.com"],
                    }
                ]
            },
            "action_quotas[0].host_allowlist: message.sms.send does not route on host",
        ),
        (
            {
                "action_quotas": [
                    {
                        "action_kind": "proprietary.action",
                        "max_calls": 1,
                        "window": "per_run",
                        "resource_type_allowlist": ["t"],
                    }
                ]
            },
            "does not route on resource_type",
        ),
        (
            {
                "action_quotas": [
                    {"action_kind": "llm.completion", "max_calls": 1, "window": "per_run"}
                ]
                * 51
            },
            "action_quotas",
        ),
        (
            {"risk_class_quotas": [{"risk_class": "scary", "max_calls": 1, "window": "per_run"}]},
            "risk_class_quotas[0].risk_class",
        ),
        ({"priority": -1}, "priority"),
        ({"priority": 2**63}, "priority: 9223372036854775808 is outside the 64-bit integer range"),
        (
            {"rate_limits": {"max_commits_per_minute": 2**64}},
            "rate_limits.max_commits_per_minute: ",
        ),
        ({"name": ""}, "name: must be a non-empty string"),
        ({"name": "x" * 257}, "name: at most 256"),
        ({"description": "x" * 1025}, "description: at most 1024"),
        ({"scope_pattern": "tenant:other"}, "outside tenant 'acme'"),
        ({"tenant_id": "other"}, "tenant_id 'other' is not the tenant 'acme'"),
        ({"effective_from": "2026-04-01T00:00:00"}, "effective_from: give a time zone"),
        (
            {"effective_from": 1775000000},
            "effective_from: expected an RFC 3339 date-time such as '2026-04-01T00:00:00Z', "
            "got int",
        ),
        ({"effective_until": "1775000000"}, "effective_until: expected an RFC 3339 date-time"),
        ({"effective_until": "2026-04-01"}, "got '2026-04-01'"),
        (
            {"effective_from": "2026-05-01T00:00:00Z", "effective_until": "2026-05-01T00:00:00Z"},
            "effective_until (2026-05-01T00:00:00.000Z) must be after effective_from",
        ),
        (
            {"reservation_ttl_override": {"default_ttl_ms": 9000, "max_ttl_ms": 5000}},
            "reservation_ttl_override.default_ttl_ms (9000) exceeds max_ttl_ms",
        ),
        ({"caps": {"max_tokens": -1}}, "caps.max_tokens"),
        ({"commit_overage_policy": "MAYBE"}, "commit_overage_policy"),
        ({"status": "ACTIVE"}, "status: is not a field of this request (a new policy is ACTIVE"),
        ({"colour": "red"}, "colour: is not a field"),
    ],
)
def test_create_refuses_each_rule_break_naming_the_field(body: dict[str, Any], words: str):
    message = refused(body)
    assert words in message, message


def test_missing_required_fields_are_named():
    with pytest.raises(LedgerError, match="scope_pattern: Field required"):
        policy_from_create("acme", {"name": "p"}, policy_id="p", now_ms=NOW, registry=REG)
    with pytest.raises(LedgerError, match="name: Field required"):
        policy_from_create(
            "acme", {"scope_pattern": "tenant:acme"}, policy_id="p", now_ms=NOW, registry=REG
        )
    with pytest.raises(LedgerError, match="must be a JSON object"):
        policy_from_create("acme", [], policy_id="p", now_ms=NOW, registry=REG)  # type: ignore[arg-type]


def test_unregistered_non_custom_kinds_are_accepted_in_policies_like_at_runtime():
    row = create({"denied_action_kinds": ["code.exec.shell"]})
    assert row.denied_action_kinds == ("code.exec.shell",)


def test_tenant_id_matching_the_owner_is_accepted():
    assert create({"tenant_id": "acme"}).tenant_id == "acme"


# -------------------------------------------------------------------------------- PATCH


def test_patch_changes_only_the_sent_fields_and_names_them_exactly():
    row = create(FULL)
    new, changed = policy_patch(
        row,
        {
            "priority": 11,
            "action_quotas": [],
            "allowed_action_kinds": ["llm.completion"],
            "denied_action_kinds": [],
            "name": "Support agent",
        },
        now_ms=NOW + 5,
        registry=REG,
    )
    assert changed == ["priority", "action_quotas", "allowed_action_kinds", "denied_action_kinds"]
    assert new.priority == 11
    assert new.action_quotas == ()
    assert new.risk_class_quotas == row.risk_class_quotas
    assert new.updated_at_ms == NOW + 5
    assert new.created_at_ms == row.created_at_ms
    schema_validator("Policy", EXTENDED_ADMIN).validate(policy_body(new))


def test_patch_body_validates_against_the_extended_update_schema():
    body = {
        "risk_class_quotas": [{"risk_class": "read_only", "max_calls": 3, "window": "per_run"}],
        "status": "DISABLED",
        "effective_until": "2026-06-01T00:00:00Z",
    }
    schema_validator("PolicyUpdateRequest", EXTENDED_ADMIN).validate(body)
    new, changed = policy_patch(create(FULL), body, now_ms=NOW, registry=REG)
    assert changed == ["effective_until", "status", "risk_class_quotas"]
    assert new.status == "DISABLED"


def test_patch_without_a_change_keeps_the_row():
    row = create(FULL)
    assert policy_patch(row, {}, now_ms=NOW + 1, registry=REG) == (row, [])
    assert policy_patch(row, {"priority": 10}, now_ms=NOW + 1, registry=REG) == (row, [])


def test_patch_null_removes_optional_fields_and_is_refused_for_the_others():
    row = create(FULL)
    new, changed = policy_patch(
        row, {"caps": None, "effective_from": None}, now_ms=NOW, registry=REG
    )
    assert changed == ["caps", "effective_from"]
    assert new.caps is None
    assert new.effective_from_ms is None
    for name, hint in (
        ("action_quotas", "send \\[\\]"),
        ("priority", "omit it"),
        ("status", "omit it"),
    ):
        with pytest.raises(LedgerError, match=f"{name}: null is not allowed; {hint}"):
            policy_patch(row, {name: None}, now_ms=NOW, registry=REG)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"allowed_action_kinds": ["llm.completion"], "denied_action_kinds": ["payment.charge"]},
            "mutually exclusive",
        ),
        ({"allowed_action_kinds": ["llm.completion"]}, "clear the other with []"),
        ({"scope_pattern": "tenant:acme"}, "scope_pattern cannot change: create a policy"),
        ({"tenant_id": "acme"}, "tenant_id: is not a field of this request (the policy_id"),
        ({"status": "PAUSED"}, "status"),
        ({"effective_until": "2026-03-01T00:00:00Z"}, "must be after effective_from"),
        (
            {
                "action_quotas": [
                    {"action_kind": "custom.acme.nope.x", "max_calls": 1, "window": "per_run"}
                ]
            },
            "action_quotas[0].action_kind",
        ),
        (
            {
                "action_quotas": [
                    {
                        "action_kind": "llm.completion",
                        "max_calls": 1,
                        "window": "per_day_tumbling",
                        "per_run_counter_ttl_ms": 60_000,
                    }
                ]
            },
            "per_run_counter_ttl_ms",
        ),
    ],
)
def test_patch_refuses_each_rule_break_naming_the_field(body: dict[str, Any], words: str):
    row = create(FULL)  # has a deny list
    with pytest.raises(LedgerError) as caught:
        policy_patch(row, body, now_ms=NOW, registry=REG)
    assert caught.value.code == "INVALID_REQUEST"
    assert words in caught.value.message, caught.value.message


def test_patch_may_swap_deny_list_for_allow_list_in_one_request():
    new, _ = policy_patch(
        create(FULL),
        {"denied_action_kinds": [], "allowed_action_kinds": ["llm.completion"]},
        now_ms=NOW,
        registry=REG,
    )
    assert new.allowed_action_kinds == ("llm.completion",)
    assert new.denied_action_kinds == ()


# ------------------------------------------------------------------------- scope patterns


@pytest.mark.parametrize(
    ("pattern", "scope", "expected"),
    [
        ("tenant:acme", "tenant:acme", True),
        ("tenant:acme", "tenant:acme/agent:bot", False),
        ("tenant:acme/*", "tenant:acme/agent:bot", True),
        ("tenant:acme/*", "tenant:acme/workspace:eng/agent:bot", True),
        ("tenant:acme/*", "tenant:acme", False),
        ("tenant:acme/workspace:*", "tenant:acme/workspace:eng", True),
        ("tenant:acme/workspace:*", "tenant:acme/workspace:eng/agent:bot", False),
        ("tenant:acme/workspace:eng/*", "tenant:acme/workspace:ops/agent:bot", False),
        ("agent:*", "tenant:acme/workspace:eng/agent:bot", True),
        ("agent:*", "tenant:acme/agent:bot/toolset:t", False),
        ("agent:*", "tenant:acme/workspace:eng", False),
        ("*/agent:summarizer", "tenant:acme/agent:summarizer", True),
        ("*/agent:summarizer", "tenant:acme/agent:other", False),
        ("workspace:eng/*", "tenant:acme/workspace:eng/agent:bot", True),
        ("tenant:acme/agent:bot", "tenant:acme/workspace:eng/agent:bot", False),
    ],
)
def test_scope_pattern_matching(pattern: str, scope: str, expected: bool):
    assert validate_scope_pattern(pattern, "acme") == pattern
    assert matches(pattern, scope) is expected


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("", "non-empty"),
        ("*", "names no scope level"),
        ("Tenant:acme", "capital letters"),
        ("tenant:acme/*/agent:bot", "'*' may only be the first or the last segment"),
        ("tenant:acme/team:x", "is not <level>:<value>"),
        ("tenant:acme/agent:b c", "must be letters"),
        ("tenant:acme/agent:bot/workspace:eng", "levels must follow the order"),
        ("tenant:other/*", "outside tenant 'acme'"),
        ("tenant:*", "outside tenant 'acme'"),
        ("*/tenant:acme", "drop the leading"),
    ],
)
def test_bad_scope_patterns_are_refused(pattern: str, words: str):
    with pytest.raises(LedgerError) as caught:
        validate_scope_pattern(pattern, "acme")
    assert caught.value.code == "INVALID_REQUEST"
    assert words in caught.value.message


def test_matching_scope_is_the_most_specific():
    assert matching_scope("tenant:acme", SCOPES) == "tenant:acme"
    assert matching_scope("tenant:acme/*", SCOPES) == SCOPES[-1]
    assert matching_scope("tenant:acme/workspace:*", SCOPES) == SCOPES[1]
    assert matching_scope("tenant:acme/app:*", SCOPES) is None


# ------------------------------------------------------------------------------ selection


def pol(pid: str, pattern: str, priority: int = 0, created: int = NOW, **extra: Any) -> PolicyRow:
    body = {"scope_pattern": pattern, "priority": priority, **extra}
    return create(body, pid=pid, now=created)


def test_highest_priority_matching_policy_wins_whatever_the_order():
    low = pol("low", "tenant:acme/*", 1)
    high = pol("high", "tenant:acme", 5)
    other = pol("other", "tenant:acme/app:*", 99)
    for order in ([low, high, other], [other, high, low]):
        assert select_policy(order, SCOPES, NOW) is high
    assert select_policy([other], SCOPES, NOW) is None
    assert select_policy([low], [], NOW) is None


def test_ties_go_to_the_most_specific_then_oldest_then_smallest_id():
    broad = pol("a", "tenant:acme", 3)
    narrow = pol("b", "tenant:acme/workspace:eng/*", 3)
    assert select_policy([broad, narrow], SCOPES, NOW) is narrow
    older = pol("z", "tenant:acme", 3, created=NOW - 10)
    assert select_policy([broad, older], SCOPES, NOW) is older
    twin = pol("b", "tenant:acme", 3)
    assert select_policy([twin, broad], SCOPES, NOW) is broad


def test_disabled_and_out_of_window_policies_do_not_apply():
    high = pol(
        "high",
        "tenant:acme",
        9,
        effective_from="2026-04-09T12:00:00Z",
        effective_until="2026-04-09T13:00:00Z",
    )
    low = pol("low", "tenant:acme", 1)
    assert select_policy([high, low], SCOPES, NOW) is high  # from is inclusive
    assert select_policy([high, low], SCOPES, NOW - 1) is low
    assert select_policy([high, low], SCOPES, NOW + 3_600_000 - 1) is high
    assert select_policy([high, low], SCOPES, NOW + 3_600_000) is low  # until is exclusive
    disabled, _ = policy_patch(high, {"status": "DISABLED"}, now_ms=NOW, registry=REG)
    assert select_policy([disabled, low], SCOPES, NOW) is low


def test_a_policy_of_another_tenant_never_applies():
    theirs = policy_from_create(
        "globex",
        {"name": "g", "scope_pattern": "agent:*", "priority": 100},
        policy_id="g",
        now_ms=NOW,
        registry=REG,
    )
    ours = pol("ours", "tenant:acme")
    assert select_policy([theirs, ours], SCOPES, NOW) is ours


def test_list_filters():
    quota = pol(
        "q",
        "tenant:acme",
        action_quotas=[{"action_kind": "llm.completion", "max_calls": 1, "window": "per_run"}],
    )
    risk = pol(
        "r",
        "tenant:acme/*",
        risk_class_quotas=[{"risk_class": "high_risk", "max_calls": 1, "window": "per_run"}],
    )
    deny = pol("d", "tenant:acme", denied_action_kinds=["payment.charge"])
    allow = pol("a", "tenant:acme", allowed_action_kinds=["llm.completion"])
    rows = [quota, risk, deny, allow]

    def ids(**filters: Any) -> list[str]:
        return [row.policy_id for row in rows if matches_list_filters(row, **filters)]

    assert ids() == ["q", "r", "d", "a"]
    assert ids(has_action_quotas=True) == ["q", "r"]
    assert ids(has_action_quotas=False) == ["d", "a"]
    assert ids(references_action_kind="llm.completion") == ["q", "a"]
    assert ids(references_action_kind="payment.charge") == ["d"]
    assert ids(references_action_kind="high_risk") == []
    assert ids(scope_pattern="tenant:acme/*") == ["r"]
    assert ids(status="DISABLED") == []


def test_caps_body_is_the_wire_caps():
    row = create(FULL)
    assert row.caps is not None
    body = caps_body(row.caps)
    assert body == {"max_tokens": 4096, "tool_denylist": ["rm"]}
    schema_validator("Caps", EXTENDED_ADMIN).validate(body)
