"""Governance counting under random sequences: quotas hold, denials write nothing, never < 0."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles.models import Action, Subject
from runcycles_server.errors import LedgerError
from runcycles_server.governance import (
    Admission,
    CounterRow,
    Denial,
    PolicyRow,
    Registry,
    calendar_bucket,
    evaluate,
    matches,
    policy_from_create,
    release_per_run,
    select_policy,
    subject_scopes,
    validate_scope_pattern,
)
from runcycles_server.governance.evaluate import prepare, prepare_uncached

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


LEVELS = ["tenant", "workspace", "app", "workflow", "agent", "toolset"]


def reference_matches(pattern: str, scope: str) -> bool:
    """The pattern language spelled out naively: try every alignment of the segments."""
    parts = pattern.split("/")
    anchored = parts[0].startswith("tenant:")
    parts = parts[1:] if parts[0] == "*" else parts
    descendants = parts[-1] == "*"
    parts = parts[:-1] if descendants else parts
    segments = scope.split("/")
    for start in range(len(segments)):
        if anchored and start:
            break
        window = segments[start : start + len(parts)]
        rest = len(segments) - start - len(parts)
        if len(window) < len(parts) or (rest < 1 if descendants else rest != 0):
            continue
        if all(
            s == p or (p.endswith(":*") and s.split(":")[0] == p[:-2])
            for p, s in zip(parts, window, strict=True)
        ):
            return True
    return False


@st.composite
def scope_and_pattern(draw: st.DrawFn) -> tuple[str, str]:
    levels = sorted(draw(st.sets(st.sampled_from(LEVELS[1:]), max_size=4)), key=LEVELS.index)
    scope = "/".join(
        ["tenant:acme", *(f"{lv}:{draw(st.sampled_from(['a', 'b']))}" for lv in levels)]
    )
    chosen = sorted(
        draw(st.sets(st.sampled_from(LEVELS), min_size=1, max_size=3)), key=LEVELS.index
    )
    segments = [
        f"{lv}:{'acme' if lv == 'tenant' else draw(st.sampled_from(['a', 'b', '*']))}"
        for lv in chosen
    ]
    if chosen[0] != "tenant" and draw(st.booleans()):
        segments.insert(0, "*")
    if draw(st.booleans()):
        segments.append("*")
    return "/".join(segments), scope


@settings(max_examples=400, deadline=None)
@given(scope_and_pattern())
def test_pattern_matching_agrees_with_the_naive_definition(case: tuple[str, str]):
    pattern, scope = case
    validate_scope_pattern(pattern, "acme")
    assert matches(pattern, scope) is reference_matches(pattern, scope)


MEMO_POLICIES = [
    POLICY,
    policy_from_create(
        "acme",
        {
            "name": "q",
            "scope_pattern": "tenant:acme/*",
            "denied_action_kinds": ["payment.charge"],
            "action_quotas": [
                {
                    "action_kind": "message.email.send",
                    "max_calls": 4,
                    "window": "per_minute_tumbling",
                    "host_allowlist": ["API.example.com"],
                },
                {"action_kind": "llm.completion", "max_calls": 9, "window": "per_day_tumbling"},
                {"action_kind": "llm.completion", "max_calls": 9, "window": "per_tenant_per_day"},
            ],
            "risk_class_quotas": [
                {"risk_class": "side_effect", "max_calls": 2, "window": "per_hour_tumbling"}
            ],
        },
        policy_id="pol2",
        now_ms=START,
        registry=REG,
    ),
    None,
]
KINDS = ["message.email.send", "http.request", "llm.completion", "payment.charge", "x.unknown"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(MEMO_POLICIES),
            st.sampled_from(KINDS),
            st.sampled_from([None, "api.example.com", "API.EXAMPLE.com", "other.org"]),
            st.sampled_from([None, "bot", "Bot"]),
            st.sampled_from([None, "r1", "r2"]),
            st.integers(0, 3 * 24 * 3600 * 1000),
        ),
        max_size=25,
    )
)
def test_the_memoized_prepare_answers_as_the_plain_computation(
    calls: list[tuple[PolicyRow | None, str, str | None, str | None, str | None, int]],
) -> None:
    """The memo of ``prepare`` (by policy, kind, keys, subject and minute) changes nothing."""
    for candidate, kind, host, agent, run, offset in calls:
        keys = {"host": host} if host is not None else None
        action = Action.model_validate({"kind": kind, "name": "x", "policy_keys": keys})
        dims = {"run_id": run} if run is not None else None
        subject = Subject(tenant="acme", agent=agent, dimensions=dims)
        now = START + offset
        policies = [candidate] if candidate is not None else []
        policy = select_policy(policies, subject_scopes(subject), now)
        for at in (now, now + 1, now + 59_999):  # memo hits in the minute, misses across it
            outcomes: list[object] = []
            for compute in (prepare, prepare_uncached):
                try:
                    outcomes.append(compute(policy, action, subject, at, REG))
                except LedgerError as exc:
                    outcomes.append(("error", exc.code, exc.message))
            assert outcomes[0] == outcomes[1]
