"""Governance quota counters: UTC calendar buckets, cleanup TTLs, rows and the state body."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import orjson
import pytest

from runcycles.testing.spec import ACTION_KINDS_SPEC, schema_validator
from runcycles_server.governance import (
    CounterKey,
    CounterRow,
    Registry,
    calendar_bucket,
    counter_state_body,
    policy_from_create,
)
from runcycles_server.governance.policies import QuotaRule
from runcycles_server.governance.quotas import (
    counter_limit,
    counter_matches_filters,
    reset_counter,
    reset_matches,
    rule_fingerprint,
)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


LAST_MS_OF_DAY = ms(2026, 4, 9, 23, 59, 59) + 999
MIDNIGHT = ms(2026, 4, 10)


@pytest.mark.parametrize(
    ("window", "before", "after", "size_ms", "cleanup_ms"),
    [
        ("per_minute_tumbling", "2026-04-09T23:59", "2026-04-10T00:00", 60_000, 120_000),
        ("per_hour_tumbling", "2026-04-09T23", "2026-04-10T00", 3_600_000, 3_660_000),
        ("per_day_tumbling", "2026-04-09", "2026-04-10", 86_400_000, 90_000_000),
        ("per_tenant_per_day", "2026-04-09", "2026-04-10", 86_400_000, 90_000_000),
    ],
)
def test_calendar_buckets_change_exactly_at_the_utc_boundary(
    window: str, before: str, after: str, size_ms: int, cleanup_ms: int
):
    bucket, start = calendar_bucket(window, LAST_MS_OF_DAY)
    assert bucket == before
    assert start == MIDNIGHT - size_ms
    next_bucket, next_start = calendar_bucket(window, MIDNIGHT)
    assert next_bucket == after
    assert next_start == MIDNIGHT
    key = CounterKey("p", "llm.completion", None, window, bucket, "tenant:a", bucket_start_ms=start)
    assert key.window_end_ms == MIDNIGHT  # the quota boundary
    expiry = key.cleanup_expiry_ms()
    assert expiry == start + cleanup_ms
    assert expiry is not None
    assert expiry > MIDNIGHT  # cleanup never ends the window early


def test_minute_and_hour_buckets_inside_a_day():
    now = ms(2026, 4, 9, 14, 32, 17) + 5
    assert calendar_bucket("per_minute_tumbling", now)[0] == "2026-04-09T14:32"
    assert calendar_bucket("per_hour_tumbling", now)[0] == "2026-04-09T14"
    with pytest.raises(ValueError, match="not a calendar window"):
        calendar_bucket("per_run", now)


def test_names_differ_by_every_key_field_but_not_by_policy():
    base = CounterKey("p", "llm.completion", None, "per_run", "r1", "tenant:a")
    variants = [
        CounterKey("p", "llm.embedding", None, "per_run", "r1", "tenant:a"),
        CounterKey("p", "__risk__", "side_effect", "per_run", "r1", "tenant:a"),
        CounterKey("p", "llm.completion", None, "per_run", "r2", "tenant:a"),
        CounterKey("p", "llm.completion", None, "per_run", "r1", "tenant:a/agent:b"),
        CounterKey("p", "llm.completion", None, "per_run", "r1", "tenant:a", rule="abc"),
        CounterKey("p", "llm.completion", None, "per_hour_tumbling", "r1", "tenant:a"),
    ]
    names = {k.name for k in variants}
    assert len(names) == len(variants)
    assert base.name not in names
    assert (
        CounterKey("other", "llm.completion", None, "per_run", "r1", "tenant:a").name == base.name
    )
    assert "acme" not in CounterKey("p", "x.y", None, "per_run", "r", "tenant:a").name


def test_rule_fingerprint_separates_differently_filtered_rules():
    plain = QuotaRule("message.email.send", 5, "per_run")
    a = QuotaRule("message.email.send", 5, "per_run", host_allowlist=("a.com", "b.com"))
    b = QuotaRule("message.email.send", 9, "per_run", host_allowlist=("B.com", "a.com"))
    c = QuotaRule("message.email.send", 5, "per_run", recipient_domain_allowlist=("a.com", "b.com"))
    assert rule_fingerprint(plain) == ""
    assert rule_fingerprint(a) == rule_fingerprint(b) != ""
    assert rule_fingerprint(a) != rule_fingerprint(c)


ROW = CounterRow(
    key=CounterKey(
        "pol_1",
        "__risk__",
        "high_risk",
        "per_hour_tumbling",
        "2026-04-09T14",
        "tenant:acme/agent:bot",
        bucket_start_ms=ms(2026, 4, 9, 14),
    ),
    count=7,
    expires_at_ms=ms(2026, 4, 9, 15, 1),
    updated_at_ms=ms(2026, 4, 9, 14, 30),
    incremented_at_ms=ms(2026, 4, 9, 14, 30),
    fired_pcts=(0.5,),
)
RUN = CounterRow(
    key=CounterKey("pol_1", "message.email.send", None, "per_run", "run:42|x", "tenant:acme"),
    count=2,
    expires_at_ms=ms(2026, 4, 10),
    updated_at_ms=ms(2026, 4, 9),
    ttl_ms=86_400_000,
)


def test_rows_round_trip_exactly():
    for row in (ROW, RUN):
        assert CounterRow.from_json(row.to_json()) == row
    with pytest.raises(ValueError, match="not a stored quota counter"):
        CounterRow.from_json(b"{}")
    with pytest.raises(ValueError, match="not a stored quota counter"):
        CounterRow.from_json(b"[3, 1]")


def test_rows_stored_in_the_first_storage_form_still_read():
    """Version 1 stored a JSON object (databases and Redis written before version 2)."""
    for row in (ROW, RUN):
        key = row.key
        v1 = {
            "v": 1,
            "policy_id": key.policy_id,
            "action_kind": key.action_kind,
            "risk_class": key.risk_class,
            "window": key.window,
            "bucket": key.bucket,
            "scope": key.scope,
            "rule": key.rule,
            "bucket_start_ms": key.bucket_start_ms,
            "count": row.count,
            "expires_at_ms": row.expires_at_ms,
            "updated_at_ms": row.updated_at_ms,
            "incremented_at_ms": row.incremented_at_ms,
            "ttl_ms": row.ttl_ms,
            "fired_pcts": list(row.fired_pcts),
        }
        assert CounterRow.from_json(orjson.dumps(v1)) == row
        assert CounterRow.from_json(orjson.dumps(v1).decode()) == row


def test_an_expired_row_counts_zero():
    assert RUN.live_count(RUN.expires_at_ms - 1) == 2
    assert RUN.live_count(RUN.expires_at_ms) == 0


def test_counter_state_body_matches_the_spec():
    validator = schema_validator("ActionQuotaState", ACTION_KINDS_SPEC)
    body = counter_state_body(ROW, 5)
    validator.validate(body)
    assert body["action_kind"] == "__risk__"
    assert body["risk_class"] == "high_risk"
    assert body["used"] == 7
    assert body["remaining"] == 0
    assert body["window_key"] == "2026-04-09T14"
    assert body["expires_at"] == "2026-04-09T15:00:00.000Z"  # the window end, not the cleanup
    assert body["last_incremented_at"] == "2026-04-09T14:30:00.000Z"
    run = counter_state_body(RUN, 5)
    validator.validate(run)
    assert "risk_class" not in run
    assert run["remaining"] == 3
    assert run["expires_at"] == "2026-04-10T00:00:00.000Z"
    assert "last_incremented_at" not in run


def test_reset_keeps_calendar_ttl_and_refreshes_a_runs():
    now = ms(2026, 4, 9, 14, 45)
    reset = reset_counter(ROW, now)
    # the window instance stays the same: its reported thresholds stay reported
    assert (reset.count, reset.expires_at_ms, reset.fired_pcts) == (0, ROW.expires_at_ms, (0.5,))
    run = reset_counter(RUN, now)
    assert run.count == 0
    assert run.expires_at_ms == now + 86_400_000


def test_counter_list_filters():
    now = ms(2026, 4, 9, 14, 40)
    zero = dataclasses.replace(RUN, count=0)
    assert counter_matches_filters(ROW, now)
    assert not counter_matches_filters(ROW, ROW.expires_at_ms)  # expired rows are gone
    assert counter_matches_filters(ROW, now, scope="tenant:acme")
    assert counter_matches_filters(ROW, now, scope="tenant:acme/agent:bot")
    assert not counter_matches_filters(ROW, now, scope="tenant:ac")
    assert not counter_matches_filters(ROW, now, scope="tenant:acme/agent:bo")
    assert counter_matches_filters(ROW, now, action_kind="__risk__")
    assert not counter_matches_filters(ROW, now, action_kind="llm.completion")
    assert counter_matches_filters(ROW, now, window="per_hour_tumbling")
    assert not counter_matches_filters(ROW, now, window="per_run")
    assert counter_matches_filters(RUN, now, run_id="run:42|x")
    assert not counter_matches_filters(RUN, now, run_id="run:42")
    assert not counter_matches_filters(ROW, now, run_id="2026-04-09T14")  # calendar bucket
    assert not counter_matches_filters(zero, now)
    assert counter_matches_filters(zero, now, include_zero=True)


def test_reset_request_names_a_counter_by_its_key_fields():
    fields = {
        "scope": "tenant:acme",
        "action_kind": "message.email.send",
        "window": "per_run",
        "window_key": "run:42|x",
    }
    assert reset_matches(RUN, **fields)
    filtered = dataclasses.replace(RUN, key=dataclasses.replace(RUN.key, rule="abc"))
    assert reset_matches(filtered, **fields)  # every allowlist variant of the rule
    for field, other in (
        ("scope", "tenant:acme/agent:bot"),
        ("action_kind", "llm.completion"),
        ("window", "per_day_tumbling"),
        ("window_key", "run:43"),
    ):
        assert not reset_matches(RUN, **{**fields, field: other})
    risk = {
        "scope": "tenant:acme/agent:bot",
        "action_kind": "__risk__",
        "window": "per_hour_tumbling",
        "window_key": "2026-04-09T14",
    }
    assert reset_matches(ROW, **risk, risk_class="high_risk")
    assert not reset_matches(ROW, **risk, risk_class="read_only")


def test_counter_limit_is_the_policys_current_max_calls_for_that_counter():
    policy = policy_from_create(
        "acme",
        {
            "name": "p",
            "scope_pattern": "tenant:acme",
            "action_quotas": [
                {"action_kind": "message.email.send", "max_calls": 7, "window": "per_run"},
                {"action_kind": "message.email.send", "max_calls": 4, "window": "per_run"},
                {
                    "action_kind": "message.email.send",
                    "max_calls": 2,
                    "window": "per_run",
                    "host_allowlist": ["a.com"],
                },
            ],
            "risk_class_quotas": [
                {"risk_class": "high_risk", "max_calls": 9, "window": "per_hour_tumbling"}
            ],
        },
        policy_id="pol_1",
        now_ms=ms(2026, 4, 9),
        registry=Registry(),
    )
    assert counter_limit(policy, RUN.key) == 4
    filtered = dataclasses.replace(RUN.key, rule=rule_fingerprint(policy.action_quotas[2]))
    assert counter_limit(policy, filtered) == 2
    assert counter_limit(policy, ROW.key) == 9
    assert counter_limit(policy, dataclasses.replace(ROW.key, risk_class="read_only")) is None
    assert counter_limit(policy, dataclasses.replace(RUN.key, window="per_day_tumbling")) is None
