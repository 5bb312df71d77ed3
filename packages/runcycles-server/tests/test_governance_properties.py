"""Governance counting under random sequences: quotas hold, denials write nothing, never < 0."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles.models import Action, Subject
from runcycles_server.governance import (
    Admission,
    CounterRow,
    Denial,
    Registry,
    calendar_bucket,
    evaluate,
    policy_from_create,
    release_per_run,
)

START = int(datetime(2026, 4, 9, 23, 30, tzinfo=timezone.utc).timestamp() * 1000)
REG = Registry()
PER_RUN = 3
PER_HOUR = 5
POLICY = policy_from_create(
    "acme",
    {
        "name": "p",
        "scope_pattern": "tenant:acme",
        "action_quotas": [
            {"action_kind": "message.email.send", "max_calls": PER_RUN, "window": "per_run"},
            {
                "action_kind": "message.email.send",
                "max_calls": PER_HOUR,
                "window": "per_hour_tumbling",
            },
        ],
    },
    policy_id="pol",
    now_ms=START,
    registry=REG,
)
EMAIL = Action(kind="message.email.send", name="x")

reserve = st.tuples(st.just("reserve"), st.sampled_from(["r1", "r2"]))
release = st.tuples(st.just("release"), st.integers(0, 50))
wait = st.tuples(st.just("wait"), st.integers(1, 20 * 60_000))  # 60 waits < the 24 h run TTL


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(reserve, release, wait), max_size=60))
def test_quotas_hold_under_any_sequence(ops: list[tuple[str, object]]):
    now = START
    rows: dict[str, CounterRow] = {}
    held: list[tuple[str, tuple[str, ...]]] = []  # (run, per_run counter names) not released
    admitted_per_hour: dict[str, int] = {}
    for op, arg in ops:
        if op == "wait":
            assert isinstance(arg, int)
            now += arg
        elif op == "release":
            assert isinstance(arg, int)
            if held:
                _, names = held.pop(arg % len(held))
                rows.update((r.name, r) for r in release_per_run(names, rows, now))
        else:
            assert isinstance(arg, str)
            subject = Subject(tenant="acme", dimensions={"run_id": arg})
            before = dict(rows)
            verdict = evaluate(POLICY, EMAIL, subject, rows, now, REG)
            hour = calendar_bucket("per_hour_tumbling", now)[0]
            in_run = sum(1 for run, _ in held if run == arg)
            if isinstance(verdict, Denial):
                assert rows == before
                assert in_run >= PER_RUN or admitted_per_hour.get(hour, 0) >= PER_HOUR
                continue
            assert isinstance(verdict, Admission)
            assert in_run < PER_RUN
            assert admitted_per_hour.get(hour, 0) < PER_HOUR
            rows.update((r.name, r) for r in verdict.counters)
            held.append((arg, verdict.per_run_counters))
            admitted_per_hour[hour] = admitted_per_hour.get(hour, 0) + 1
        for row in rows.values():
            assert row.count >= 0
            if row.key.window == "per_run":
                live = sum(1 for run, _ in held if run == row.key.bucket)
                assert row.live_count(now) == live  # default TTL 24 h outlives the test
