"""The pure heartbeat schedule (spec: extendReservation HEARTBEAT GUIDANCE)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles.heartbeat import (
    LeasePlanner,
    attempt_budget_ms,
    next_delay_ms,
    retry_delay_ms,
    safety_margin_ms,
)

# --------------------------------------------------------------------------- arithmetic


def test_spec_worked_example_gives_37000():
    # lead ~60000, 10000 ms timeout, 1500 ms max rtt: budget 10000, margin 3000, reserve 23000.
    assert attempt_budget_ms(10_000, 1_500) == 10_000
    assert safety_margin_ms(1_500) == 3_000
    assert next_delay_ms(remaining_ttl_ms=61_500, rtt_ms=1_500, request_timeout_ms=10_000) == 37_000
    # remaining 60000 measured with that rtt leaves lead_floor 58500.
    assert next_delay_ms(remaining_ttl_ms=60_000, rtt_ms=1_500, request_timeout_ms=10_000) == 35_500


def test_spec_30s_timeout_makes_60s_lease_zero_delay():
    assert next_delay_ms(remaining_ttl_ms=60_000, rtt_ms=100, request_timeout_ms=30_000) == 0


def test_unknown_timing_or_unbounded_timeout_gives_zero():
    assert next_delay_ms(remaining_ttl_ms=60_000, rtt_ms=None, request_timeout_ms=5_000) == 0
    assert next_delay_ms(remaining_ttl_ms=60_000, rtt_ms=10, request_timeout_ms=None) == 0
    assert attempt_budget_ms(None, 10) is None


def test_budget_and_margin_floors():
    assert attempt_budget_ms(200, 0) == 1_000
    assert attempt_budget_ms(200, 900) == 1_800
    assert safety_margin_ms(0) == 1_000
    assert safety_margin_ms(700) == 1_400


def test_retry_delay_rules():
    # window = 20000 - 5000 - 1000 = 14000; transient delay = min(30000, 5000, 14000)
    assert (
        retry_delay_ms(current_lead_ms=20_000, attempt_budget=5_000, safety_margin=1_000) == 5_000
    )
    # negative window: stop
    assert retry_delay_ms(current_lead_ms=5_000, attempt_budget=5_000, safety_margin=1_000) is None
    # 429: exactly Retry-After when it fits, else stop; missing header stops
    kwargs = {"current_lead_ms": 20_000, "attempt_budget": 5_000, "safety_margin": 1_000}
    assert retry_delay_ms(**kwargs, rate_limited=True, retry_after_ms=2_000) == 2_000
    assert retry_delay_ms(**kwargs, rate_limited=True, retry_after_ms=15_000) is None
    assert retry_delay_ms(**kwargs, rate_limited=True, retry_after_ms=None) is None
    assert (
        retry_delay_ms(current_lead_ms=10**9, attempt_budget=1_000, safety_margin=1_000) == 30_000
    )


@given(
    remaining=st.integers(min_value=0, max_value=10**12),
    rtt=st.one_of(st.none(), st.integers(min_value=0, max_value=10**7)),
    timeout=st.one_of(st.none(), st.integers(min_value=1, max_value=10**9)),
    max_rtt=st.integers(min_value=0, max_value=10**7),
)
def test_next_delay_is_never_negative_and_never_exceeds_the_lead(remaining, rtt, timeout, max_rtt):
    delay = next_delay_ms(
        remaining_ttl_ms=remaining, rtt_ms=rtt, request_timeout_ms=timeout, max_rtt_ms=max_rtt
    )
    assert 0 <= delay <= remaining
    if delay > 0:
        assert rtt is not None
        assert timeout is not None
        # a positive delay always leaves room for two full attempts plus the margin
        budget = attempt_budget_ms(timeout, max(max_rtt, rtt))
        assert budget is not None
        assert remaining - rtt - delay >= 2 * budget + safety_margin_ms(max(max_rtt, rtt))


# --------------------------------------------------------------------------- planner


def test_create_response_schedules_first_beat_without_priming():
    planner = LeasePlanner(60_000, 10_000)
    step = planner.on_success(
        0.0, rtt_ms=1_500, remaining_ttl_ms=61_500, expires_at_ms=1, initial=True
    )
    assert step.delay_ms == 37_000
    assert step.fresh_key
    assert step.disposition == "extended"


def test_zero_delay_guard_allows_one_immediate_beat_then_stops():
    planner = LeasePlanner(5_000, 10_000)
    first = planner.on_success(0.0, rtt_ms=5, remaining_ttl_ms=5_000, expires_at_ms=1, initial=True)
    assert first.delay_ms == 0
    second = planner.on_success(10.0, rtt_ms=5, remaining_ttl_ms=5_000, expires_at_ms=2)
    assert second.delay_ms is None
    assert second.disposition == "stopped_lease_too_short"


def test_zero_delay_guard_resets_after_a_positive_delay():
    planner = LeasePlanner(60_000, 1_000)
    assert planner.on_success(0.0, rtt_ms=1, remaining_ttl_ms=100, expires_at_ms=1).delay_ms == 0
    assert planner.on_success(1.0, rtt_ms=1, remaining_ttl_ms=60_000, expires_at_ms=2).delay_ms
    assert planner.on_success(2.0, rtt_ms=1, remaining_ttl_ms=100, expires_at_ms=3).delay_ms == 0


def test_transient_failure_retries_same_key_within_window():
    planner = LeasePlanner(60_000, 5_000)
    planner.on_success(0.0, rtt_ms=0, remaining_ttl_ms=60_000, expires_at_ms=1, initial=True)
    # at t=40000: lead 20000, window 20000 - 5000 - 1000 = 14000, delay min(30000, 5000, 14000)
    step = planner.on_failure(40_000.0, "transient")
    assert (step.delay_ms, step.fresh_key, step.disposition) == (5_000, False, "retrying")
    # at t=53500: lead 6500, window 500 -> delay min(30000, 1625, 500)
    step = planner.on_failure(53_500.0, "transient")
    assert step.delay_ms == 500
    step = planner.on_failure(54_500.0, "transient")
    assert step.delay_ms is None
    assert step.disposition == "stopped_window_exhausted"


def test_rate_limited_waits_exactly_retry_after_or_stops():
    planner = LeasePlanner(60_000, 5_000)
    planner.on_success(0.0, rtt_ms=0, remaining_ttl_ms=60_000, expires_at_ms=1, initial=True)
    step = planner.on_failure(30_000.0, "rate_limited", retry_after_ms=3_000)
    assert step.delay_ms == 3_000
    step = planner.on_failure(33_000.0, "rate_limited", retry_after_ms=30_000)
    assert step.delay_ms is None
    assert step.disposition == "stopped_rate_limited"


def test_rate_limited_without_retry_after_stops():
    planner = LeasePlanner(60_000, 5_000)
    planner.on_success(0.0, rtt_ms=0, remaining_ttl_ms=60_000, expires_at_ms=1, initial=True)
    assert planner.on_failure(1.0, "rate_limited").disposition == "stopped_rate_limited"


@pytest.mark.parametrize(
    ("kind", "disposition"), [("terminal", "stopped_terminal"), ("rejected", "stopped_rejected")]
)
def test_terminal_and_rejected_stop(kind, disposition):
    planner = LeasePlanner(60_000, 5_000)
    planner.on_success(0.0, rtt_ms=0, remaining_ttl_ms=60_000, expires_at_ms=1, initial=True)
    step = planner.on_failure(1.0, kind)
    assert step.delay_ms is None
    assert step.disposition == disposition


def test_zero_window_allows_one_immediate_retry_then_stops():
    planner = LeasePlanner(60_000, 1_000)
    planner.on_success(0.0, rtt_ms=0, remaining_ttl_ms=2_000, expires_at_ms=1, initial=True)
    step = planner.on_failure(0.0, "transient")  # lead 2000, window exactly 0
    assert step.delay_ms == 0
    again = planner.on_failure(0.0, "transient")
    assert again.delay_ms is None


def test_no_progress_between_failures_stops():
    planner = LeasePlanner(60_000, 1_000)
    planner.on_success(0.0, rtt_ms=0, remaining_ttl_ms=60_000, expires_at_ms=1, initial=True)
    assert planner.on_failure(5.0, "transient").delay_ms
    assert planner.on_failure(5.0, "transient").disposition == "stopped_no_progress"


def test_unknown_create_rtt_means_immediate_first_beat():
    planner = LeasePlanner(60_000, 1_000)
    step = planner.on_success(
        0.0, rtt_ms=None, remaining_ttl_ms=60_000, expires_at_ms=1, initial=True
    )
    assert step.delay_ms == 0
    assert planner.lead_floor_ms == 0


# --------------------------------------------------------------------------- fallback


def test_fallback_first_beat_immediate_then_half_grant():
    planner = LeasePlanner(20_000, 1_000)
    first = planner.on_success(
        0.0, rtt_ms=5, remaining_ttl_ms=None, expires_at_ms=100_000, initial=True
    )
    assert first.delay_ms == 0
    assert planner.uses_fallback
    normal = planner.on_success(10.0, rtt_ms=5, remaining_ttl_ms=None, expires_at_ms=120_000)
    assert normal.delay_ms == 10_000  # grant 20000 >= 0.9 * ttl -> grant / 2


def test_fallback_max_lead_clamp_holds_cadence():
    planner = LeasePlanner(60_000, 1_000)
    planner.on_success(0.0, rtt_ms=5, remaining_ttl_ms=None, expires_at_ms=100_000, initial=True)
    # a beat 30 s later measures a grant equal to the elapsed time: maximum-lead clamping
    step = planner.on_success(30_000.0, rtt_ms=5, remaining_ttl_ms=None, expires_at_ms=130_000)
    assert step.delay_ms == 30_000  # min(ttl/2, 30 s)
    zero_grant = planner.on_success(
        60_000.0, rtt_ms=5, remaining_ttl_ms=None, expires_at_ms=130_000
    )
    assert zero_grant.delay_ms == 30_000


def test_fallback_skips_a_beat_when_lead_is_ample():
    planner = LeasePlanner(10_000, 1_000)
    planner.on_success(0.0, rtt_ms=1, remaining_ttl_ms=None, expires_at_ms=0, initial=True)
    planner.on_success(1.0, rtt_ms=1, remaining_ttl_ms=None, expires_at_ms=10_000)
    planner.on_success(2.0, rtt_ms=1, remaining_ttl_ms=None, expires_at_ms=20_000)
    # lead_min = 20000 - 3 >= 1.5 * 10000: skip
    assert planner.on_due(3.0) > 0
    # once the lead has shrunk, beat
    assert planner.on_due(10_000.0) == 0


def test_fallback_failure_retries_until_ttl_horizon():
    planner = LeasePlanner(8_000, 1_000)
    planner.on_success(0.0, rtt_ms=1, remaining_ttl_ms=None, expires_at_ms=0, initial=True)
    assert planner.on_failure(100.0, "transient").delay_ms == 2_000
    assert planner.on_failure(8_500.0, "transient").disposition == "stopped_window_exhausted"


# --------------------------------------------------------------------------- properties

_outcome = st.one_of(
    st.tuples(st.just("ok"), st.integers(min_value=0, max_value=200_000)),
    st.tuples(st.just("transient"), st.just(0)),
    st.tuples(st.just("rate_limited"), st.integers(min_value=0, max_value=60_000)),
)


@settings(max_examples=300, deadline=None)
@given(
    ttl=st.integers(min_value=1_000, max_value=120_000),
    timeout=st.one_of(st.none(), st.integers(min_value=1, max_value=40_000)),
    initial_remaining=st.one_of(st.none(), st.integers(min_value=0, max_value=200_000)),
    rtts=st.lists(st.integers(min_value=0, max_value=3_000), min_size=40, max_size=40),
    outcomes=st.lists(_outcome, min_size=1, max_size=40),
)
def test_planner_never_negative_never_loops_on_zero(
    ttl, timeout, initial_remaining, rtts, outcomes
):
    planner = LeasePlanner(ttl, timeout)
    now = 0.0
    step = planner.on_success(
        now, rtt_ms=rtts[0], remaining_ttl_ms=initial_remaining, expires_at_ms=0, initial=True
    )
    expires = 0
    zero_run = 0
    for index, (kind, value) in enumerate(outcomes):
        if step.delay_ms is None:
            break
        assert step.delay_ms >= 0
        now += step.delay_ms
        skip = planner.on_due(now)
        assert skip >= 0
        now += skip
        rtt = rtts[index % len(rtts)]
        now += rtt
        if kind == "ok":
            expires += ttl
            remaining = None if initial_remaining is None else value
            step = planner.on_success(
                now, rtt_ms=rtt, remaining_ttl_ms=remaining, expires_at_ms=expires
            )
        elif kind == "transient":
            step = planner.on_failure(now, "transient")
        else:
            step = planner.on_failure(now, "rate_limited", retry_after_ms=value)
        progressed = (step.delay_ms or 0) > 0 or rtt > 0 or skip > 0
        zero_run = 0 if progressed else zero_run + 1
        # a zero-delay, zero-time step can repeat at most a bounded number of times
        assert zero_run <= 3
        if step.delay_ms is not None and not step.fresh_key and not planner.uses_fallback:
            # a same-key retry always leaves one complete attempt plus margin in the lease
            budget = attempt_budget_ms(timeout, planner.max_rtt_ms)
            assert budget is not None
            lead = planner.lead_floor_ms - (now - planner._lead_anchor_ms)
            assert step.delay_ms + budget + safety_margin_ms(planner.max_rtt_ms) <= lead
