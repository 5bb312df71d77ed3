"""CPU cost of the governance rules per reservation, next to parsing the reservation body.

The server parses every ``POST /v1/reservations`` body into a ``ReservationCreateRequest``
today; that parse is the yardstick. Per reservation, measured with ``time.process_time()``:

* ``parse``: ``ReservationCreateRequest.model_validate`` of a typical body;
* ``no policy``: what the ledger adds when the tenant has no policy (``select_policy`` over
  none, ``evaluate`` with ``None``: the kind check);
* ``1 policy, 3 rules``: one matching policy with a per-run and an hourly quota on the kind
  and a risk-class quota, among 5 non-matching policies (``select_policy``, ``prepare``,
  ``Prepared.evaluate`` against live counters);
* ``... (2 calls)``: the same through ``counters_needed`` then ``evaluate`` (which work the
  applicable rules out twice).

Variants are interleaved over several rounds; medians and ratios to ``parse`` are printed.
This is the pure-rule cost only: the store's reads and writes of counter rows are not in it
(``server_throughput.py`` measures the whole server). Run::

    uv run python benchmarks/governance_rules.py [--calls 2000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

from runcycles.models import ReservationCreateRequest
from runcycles_server.governance import (
    CounterRow,
    Registry,
    counters_needed,
    evaluate,
    policy_from_create,
    prepare,
    select_policy,
    subject_scopes,
)

NOW = int(datetime(2026, 4, 9, 12, tzinfo=timezone.utc).timestamp() * 1000)
REG = Registry()
BODY = {
    "idempotency_key": "k-1",
    "subject": {
        "tenant": "acme",
        "workspace": "eng",
        "agent": "bot",
        "dimensions": {"run_id": "run-1"},
    },
    "action": {
        "kind": "message.email.send",
        "name": "sendgrid",
        "policy_keys": {"host": "api.sendgrid.com"},
    },
    "estimate": {"unit": "USD_MICROCENTS", "amount": 1000},
}
REQUEST = ReservationCreateRequest.model_validate(BODY)
OTHERS = [
    policy_from_create(
        "acme",
        {"name": f"o{i}", "scope_pattern": f"tenant:acme/app:a{i}/*"},
        policy_id=f"o{i}",
        now_ms=NOW,
        registry=REG,
    )
    for i in range(5)
]
POLICY = policy_from_create(
    "acme",
    {
        "name": "support",
        "scope_pattern": "tenant:acme/workspace:eng/*",
        "priority": 10,
        "action_quotas": [
            {"action_kind": "message.email.send", "max_calls": 10**5, "window": "per_run"},
            {
                "action_kind": "message.email.send",
                "max_calls": 10**5,
                "window": "per_hour_tumbling",
            },
        ],
        "risk_class_quotas": [
            {"risk_class": "external_side_effect", "max_calls": 10**5, "window": "per_day_tumbling"}
        ],
    },
    policy_id="pol",
    now_ms=NOW,
    registry=REG,
)
POLICIES = [*OTHERS, POLICY]
COUNTERS: dict[str, CounterRow] = {}


def parse() -> None:
    ReservationCreateRequest.model_validate(BODY)


def no_policy() -> None:
    scopes = subject_scopes(REQUEST.subject)
    policy = select_policy(OTHERS[:0], scopes, NOW)
    evaluate(policy, REQUEST.action, REQUEST.subject, COUNTERS, NOW, REG)


def one_policy() -> None:
    scopes = subject_scopes(REQUEST.subject)
    policy = select_policy(POLICIES, scopes, NOW)
    prepared = prepare(policy, REQUEST.action, REQUEST.subject, NOW, REG)
    rows = {key.name: COUNTERS[key.name] for key in prepared.counter_keys if key.name in COUNTERS}
    verdict = prepared.evaluate(rows)
    COUNTERS.update((row.name, row) for row in getattr(verdict, "counters", ()))


def one_policy_two_calls() -> None:
    scopes = subject_scopes(REQUEST.subject)
    policy = select_policy(POLICIES, scopes, NOW)
    counters_needed(policy, REQUEST.action, REQUEST.subject, NOW, REG)
    verdict = evaluate(policy, REQUEST.action, REQUEST.subject, COUNTERS, NOW, REG)
    COUNTERS.update((row.name, row) for row in getattr(verdict, "counters", ()))


def measure(fn: Callable[[], None], calls: int) -> float:
    gc.disable()
    start = time.process_time()
    for _ in range(calls):
        fn()
    elapsed = time.process_time() - start
    gc.enable()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    variants = {
        "parse": parse,
        "no policy": no_policy,
        "1 policy, 3 rules": one_policy,
        "... (2 calls)": one_policy_two_calls,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        measure(fn, args.calls // 10)  # warm up
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name].append(measure(fn, args.calls))
    base = statistics.median(samples["parse"])
    print(f"{'variant':<20} {'us/reservation':>15} {'x parse':>8}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<20} {median:>15.2f} {median / base:>8.2f}")


if __name__ == "__main__":
    main()
