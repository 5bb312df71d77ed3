"""Action governance (the v0.1.26 extensions): pure rules, no I/O, no clock, no store.

Every function takes the time as ``now_ms`` and the data it needs as arguments; the ledger
loads rows, calls these rules and writes what they return. This package imports
:mod:`runcycles`, :mod:`runcycles_server.errors` and the standard library, never the ledger
or a store (the ledger imports it).

Modules, bottom up:

* :mod:`~.timestamps`: epoch milliseconds to and from the admin plane's date-time strings.
* :mod:`~.scopes`: a subject's derived scopes and the ``scope_pattern`` language
  (validation confined to the policy's tenant, matching, the most specific matching scope).
* :mod:`~.registry`: :class:`Registry`, the built-in action kinds plus the operator's
  declared ``custom.*`` kinds (loaded from YAML/JSON, :class:`DeclarationError` on a bad
  file); kind checks, risk classes, the ``/v1/action-kinds`` bodies.
* :mod:`~.policy_rows`: :class:`PolicyRow` and its rule rows (frozen data), the wire
  ``Policy`` and the storage JSON.
* :mod:`~.policies`: create/PATCH validation (``400`` naming the field), and
  :func:`select_policy` (the one highest-priority ``ACTIVE`` policy in its effective window
  that matches the request; deterministic ties), list filters.
* :mod:`~.quotas`: :class:`CounterKey` / :class:`CounterRow`, UTC calendar buckets, cleanup
  TTLs, the counters endpoint body.
* :mod:`~.evaluate`: :func:`evaluate` (steps 1-3 of the RESERVATION EVALUATION ORDER:
  access control, risk-class quotas, per-kind quotas), :func:`release_per_run`,
  :func:`effective_observe_mode`.

How a store uses it on a reservation (one transaction, or one Redis script)::

    policy = select_policy(tenant_policies, derive_scopes(subject), now_ms)
    prepared = prepare(policy, action, subject, now_ms, registry)  # may raise 400
    rows = {row.name: row for row in store.read_counters(tenant, prepared.counter_keys)}
    verdict = prepared.evaluate(rows)     # = evaluate(policy, action, subject, rows, ...)
    if isinstance(verdict, Denial):       # 409 live, decision=DENY on dry run / decide
        ...                                # nothing written
    else:                                  # budget check (step 4), then, unless dry run or
        write(balance, verdict.counters)   # observe mode, balance and counters together
        remember(reservation, verdict.per_run_counters)

The counters are read and written inside the same transaction as the balance (check then
commit): concurrent reservations serialise on it, so a quota of 50 admits exactly 50, and
a denial, a dry run or observe mode writes no counter. Release and expiry of a reservation
write :func:`release_per_run` of the counters it remembered, in the transaction that returns
its budget.
"""

from __future__ import annotations

from runcycles_server.governance.evaluate import (
    Admission,
    Denial,
    Prepared,
    ThresholdCrossing,
    counters_needed,
    deny_correlation_id,
    effective_observe_mode,
    evaluate,
    prepare,
    release_per_run,
)
from runcycles_server.governance.policies import (
    PolicyCaps,
    PolicyRow,
    QuotaRule,
    RateLimitRule,
    RiskQuotaRule,
    TtlOverride,
    caps_body,
    is_effective,
    matches,
    matches_list_filters,
    policy_body,
    policy_from_create,
    policy_from_json,
    policy_patch,
    policy_to_json,
    select_policy,
)
from runcycles_server.governance.quotas import (
    CounterKey,
    CounterRow,
    calendar_bucket,
    counter_limit,
    counter_matches_filters,
    counter_memory,
    counter_state_body,
    reset_counter,
    reset_matches,
)
from runcycles_server.governance.registry import DeclarationError, KindInfo, Registry
from runcycles_server.governance.scopes import subject_scopes, validate_scope_pattern

__all__ = [
    "Admission",
    "CounterKey",
    "CounterRow",
    "DeclarationError",
    "Denial",
    "KindInfo",
    "PolicyCaps",
    "PolicyRow",
    "Prepared",
    "QuotaRule",
    "RateLimitRule",
    "Registry",
    "RiskQuotaRule",
    "ThresholdCrossing",
    "TtlOverride",
    "calendar_bucket",
    "caps_body",
    "counter_limit",
    "counter_matches_filters",
    "counter_memory",
    "counter_state_body",
    "counters_needed",
    "deny_correlation_id",
    "effective_observe_mode",
    "evaluate",
    "is_effective",
    "matches",
    "matches_list_filters",
    "policy_body",
    "policy_from_create",
    "policy_from_json",
    "policy_patch",
    "policy_to_json",
    "prepare",
    "release_per_run",
    "reset_counter",
    "reset_matches",
    "select_policy",
    "subject_scopes",
    "validate_scope_pattern",
]
