"""The governance steps of a reservation: access control, risk-class quotas, per-kind quotas.

RESERVATION EVALUATION ORDER (``cycles-protocol-extensions``), for the one policy
:func:`~runcycles_server.governance.policies.select_policy` chose:

1. access control: a kind on ``denied_action_kinds`` is ``ACTION_KIND_DENIED``; with a
   non-empty ``allowed_action_kinds``, a kind not on it is ``ACTION_KIND_NOT_ALLOWED``.
   Nothing else is evaluated for a refused kind.
2. risk-class quotas of the kind's risk class (``side_effect`` for an unregistered
   non-custom kind): a counter at or over ``max_calls`` is ``ACTION_QUOTA_EXCEEDED``.
3. per-kind quotas of the kind whose allowlists admit the action's ``policy_keys`` (a rule
   with a non-empty allowlist is skipped when the key is absent, not declared by the kind's
   ``policy_key_spec``, or not listed). Of several exceeded rules, the one with the least
   headroom (``max_calls - used``) is reported; ties go to the first in the policy.

Budget checks (step 4) and the atomic commit (step 5) are the ledger's: on
:class:`Admission` it checks the budget, then writes :attr:`Admission.counters` with the
balance in one transaction. An undeclared ``custom.*`` kind is a ``400`` before any step,
with or without a policy, and so is a missing ``subject.dimensions.run_id`` when a
``per_run`` quota applies (checked before the quota steps, as a malformed request).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, NamedTuple

from runcycles.governance import RISK_COUNTER_KIND
from runcycles.models import Action, ActionRiskClass, ObserveMode, ReasonCode, Subject
from runcycles_server.errors import LedgerError
from runcycles_server.governance.policy_rows import (
    DEFAULT_PER_RUN_TTL_MS,
    DEFAULT_THRESHOLD_PCT,
    PolicyCaps,
    PolicyRow,
    QuotaRule,
    RiskQuotaRule,
    TtlOverride,
)
from runcycles_server.governance.quotas import (
    PER_RUN,
    TENANT_DAY,
    CounterKey,
    CounterRow,
    calendar_bucket,
    correlation_id,
    counter_memory,
    next_generation,
    remembered_counter,
    rule_fingerprint,
)
from runcycles_server.governance.registry import Registry
from runcycles_server.governance.scopes import matching_scope, subject_scopes, tenant_root
from runcycles_server.governance.timestamps import MINUTE_MS, iso

__all__ = [
    "Admission",
    "Denial",
    "Prepared",
    "ThresholdCrossing",
    "counters_needed",
    "deny_correlation_id",
    "effective_observe_mode",
    "evaluate",
    "prepare",
    "prepare_uncached",
    "release_per_run",
]

_MAX_FIX: Final = 512
_PPM: Final = 1_000_000
"""Thresholds compare in parts per million: exact for the spec's two-decimal percentages."""
_CASE_INSENSITIVE: Final = frozenset({"host", "recipient_domain"})
_ALLOWLISTS: Final = (
    ("host_allowlist", "host"),
    ("recipient_domain_allowlist", "recipient_domain"),
    ("resource_type_allowlist", "resource_type"),
)


@dataclass(frozen=True, slots=True)
class ThresholdCrossing:
    """A counter this admission takes across a rule's ``threshold_pct`` (an event to record).

    ``rule`` is where the rule sits in the policy (``action_quotas[0]``); ``action_kind`` is
    the kind, or ``__risk__`` with ``risk_class`` for a risk-class rule.
    """

    rule: str
    counter: str
    key: CounterKey
    action_kind: str
    risk_class: str | None
    used: int
    limit: int
    threshold_pct: float

    def correlation_id(self, tenant_id: str) -> str:
        """The event's ``correlation_id`` (:meth:`CounterKey.correlation_id`)."""
        return self.key.correlation_id(tenant_id)

    def event_data(self, tenant_id: str) -> dict[str, Any]:
        """Return the ``quota.threshold_approaching`` event payload."""
        data: dict[str, Any] = {
            "scope": self.key.scope,
            "action_kind": self.action_kind,
            "window": self.key.window,
            "window_key": self.key.bucket,
            "used": self.used,
            "limit": self.limit,
            "threshold_pct": self.threshold_pct,
            "policy_id": self.key.policy_id,
            "tenant_id": tenant_id,
        }
        if self.risk_class is not None:
            data["risk_class"] = self.risk_class
        return data


@dataclass(frozen=True, slots=True)
class Admission:
    """Governance lets the reservation through (the budget check is still to come).

    ``counters`` are the rows *after* the increment, to write atomically with the balance
    (and not at all on a dry run or in observe mode); ``per_run_counters`` the entries
    (name and generation, :func:`remembered_counter`) the reservation must keep so that its
    release or expiry gives them back (:func:`release_per_run`); ``thresholds`` the
    ``quota.threshold_approaching`` events to record once those rows are written (never in
    observe mode: nothing moved).
    ``policy`` is ``None`` when no policy governs the request.
    """

    policy: PolicyRow | None
    scope: str | None
    risk_class: str
    counters: tuple[CounterRow, ...] = ()
    per_run_counters: tuple[str, ...] = ()
    thresholds: tuple[ThresholdCrossing, ...] = ()

    @property
    def caps(self) -> PolicyCaps | None:
        """The policy's caps, for an ``ALLOW_WITH_CAPS`` decision."""
        return self.policy.caps if self.policy is not None else None

    @property
    def reservation_ttl_override(self) -> TtlOverride | None:
        """The policy's reservation TTL governance."""
        return self.policy.reservation_ttl_override if self.policy is not None else None

    @property
    def commit_overage_policy(self) -> str | None:
        """The policy's commit overage policy (over the tenant's and the ledger's)."""
        return self.policy.commit_overage_policy if self.policy is not None else None


@dataclass(frozen=True, slots=True)
class Denial:
    """Governance refuses the reservation: ``reason_code`` and the wire ``deny_detail``.

    The ledger adds ``budget_remaining`` where it applies, answers a dry run, a decide or
    observe mode with ``decision=DENY``, and a live reservation with :meth:`error`.
    """

    reason_code: str
    deny_detail: dict[str, Any]
    message: str
    policy: PolicyRow
    action_kind: str

    def correlation_id(self, tenant_id: str) -> str:
        """The ``correlation_id`` of this denial's ``reservation.(observed_)denied`` events."""
        return deny_correlation_id(tenant_id, self.action_kind, self.deny_detail)

    def error(self) -> LedgerError:
        """The ``409`` of a live reservation (``details.deny_detail`` carries the detail)."""
        return LedgerError(
            self.reason_code, self.message, details={"deny_detail": dict(self.deny_detail)}
        )


def deny_correlation_id(tenant_id: str, action_kind: str, deny_detail: Mapping[str, Any]) -> str:
    """The ``correlation_id`` of the ``reservation.(observed_)denied`` events of a denial.

    A hash over (tenant, scope, action kind, window key, reason code, policy), read from the
    ``deny_detail``: the same for the shadow and the enforced denial, so dashboards join the
    two streams (``EventDataObservedDenied``).
    """
    violation = deny_detail.get("quota_violation") or {}
    return correlation_id(
        "deny",
        tenant_id,
        str(deny_detail.get("blocked_by_scope", "")),
        action_kind,
        str(violation.get("window_key", "")),
        str(deny_detail.get("reason_code", "")),
        str(deny_detail.get("blocked_by_policy", "")),
    )


class _Check(NamedTuple):
    """One applicable quota rule and the counter it reads."""

    key: CounterKey
    name: str
    limit: int
    threshold_pct: float
    threshold_ppm: int
    ttl_ms: int | None
    kind: str
    rule: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request after step 1, with the quota rules that apply to it: evaluation minus counters.

    :func:`prepare` builds it once; :attr:`counter_keys` says which counters to read and
    :meth:`evaluate` finishes steps 2 and 3 against them (what :func:`counters_needed` and
    :func:`evaluate` do, without working the rules out twice).
    """

    policy: PolicyRow | None
    kind: str
    risk_class: str
    now_ms: int
    scope: str | None = None
    denial: Denial | None = None
    risk_checks: tuple[_Check, ...] = ()
    kind_checks: tuple[_Check, ...] = ()

    @property
    def counter_keys(self) -> list[CounterKey]:
        """The counters steps 2 and 3 read, each once (none for a refused kind)."""
        unique: dict[str, CounterKey] = {}
        for check in (*self.risk_checks, *self.kind_checks):
            unique.setdefault(check.name, check.key)
        return list(unique.values())

    def evaluate(self, counters: Mapping[str, CounterRow]) -> Admission | Denial:
        """Steps 2 and 3 against ``counters`` (by name; absent or expired rows count 0)."""
        if self.denial is not None:
            return self.denial
        policy = self.policy
        if policy is None:
            return _ungoverned(self.risk_class)
        now_ms = self.now_ms

        def used(check: _Check) -> int:
            row = counters.get(check.name)
            return row.live_count(now_ms) if row is not None else 0

        for checks in (self.risk_checks, self.kind_checks):
            worst: tuple[int, _Check] | None = None
            for check in checks:
                headroom = check.limit - used(check)
                if headroom <= 0 and (worst is None or headroom < worst[0]):
                    worst = (headroom, check)  # ties keep the first rule
            if worst is not None:
                return _quota_denial(policy, self.kind, worst[1], used(worst[1]))
        return _admit(policy, self, counters, now_ms)


def prepare(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    now_ms: int,
    registry: Registry,
) -> Prepared:
    """Check the kind, run step 1 and find the quota rules that apply (see :class:`Prepared`).

    Memoized: what this works out depends only on the policy (a stored row is decoded once,
    so the same object comes back until it changes), the registry, the action's kind and
    policy keys, the subject's scope fields and run id, and the UTC minute (every calendar
    bucket starts on a minute). The result for ``now_ms`` is the cached one with ``now_ms``
    set; :func:`prepare_uncached` is the plain computation, which a test compares it with.

    Raises:
        LedgerError: ``INVALID_REQUEST`` as :func:`evaluate`.
    """
    if policy is None:  # only the kind is checked
        cache_key: tuple[object, ...] = (id(registry), action.kind)
    else:
        keys = action.policy_keys
        cache_key = (
            id(policy),
            id(registry),
            action.kind,
            None if keys is None else (keys.host, keys.recipient_domain, keys.resource_type),
            subject.tenant,
            subject.workspace,
            subject.app,
            subject.workflow,
            subject.agent,
            subject.toolset,
            (subject.dimensions or {}).get("run_id"),
            now_ms // MINUTE_MS,
        )
    hit = _PREPARED.get(cache_key)
    if hit is not None and hit.policy is policy and hit.registry is registry:
        done = hit.prepared
    else:
        done = _prepare(policy, action, subject, now_ms, registry)
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[cache_key] = _Memo(policy, registry, done)
    return Prepared(
        done.policy,
        done.kind,
        done.risk_class,
        now_ms,
        done.scope,
        done.denial,
        done.risk_checks,
        done.kind_checks,
    )


def prepare_uncached(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    now_ms: int,
    registry: Registry,
) -> Prepared:
    """:func:`prepare` without its memo (the reference a test compares the memo with)."""
    return _prepare(policy, action, subject, now_ms, registry)


@functools.cache
def _ungoverned(risk_class: str) -> Admission:
    """The admission of a request no policy governs (frozen: one per risk class, shared)."""
    return Admission(policy=None, scope=None, risk_class=risk_class)


class _Memo(NamedTuple):
    """A memoized :func:`prepare`: the objects its key names by ``id`` (kept alive, checked)."""

    policy: PolicyRow | None
    registry: Registry
    prepared: Prepared


_PREPARED_MAX: Final = 4096
_PREPARED: dict[tuple[object, ...], _Memo] = {}


def counters_needed(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    now_ms: int,
    registry: Registry,
) -> list[CounterKey]:
    """Return the counters :func:`evaluate` will read, each once (none for a refused kind).

    Raises:
        LedgerError: ``INVALID_REQUEST`` as :func:`evaluate`.
    """
    return prepare(policy, action, subject, now_ms, registry).counter_keys


def evaluate(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    counters: Mapping[str, CounterRow],
    now_ms: int,
    registry: Registry,
) -> Admission | Denial:
    """Run steps 1-3 for ``policy`` against the current ``counters`` (by name).

    A counter missing from ``counters`` or expired counts as 0. With ``policy=None`` (no
    policy governs the request) only the kind is checked.

    Raises:
        LedgerError: ``INVALID_REQUEST`` for a malformed or undeclared custom kind, or a
            ``per_run`` quota that applies to a subject without ``dimensions.run_id``.
    """
    return prepare(policy, action, subject, now_ms, registry).evaluate(counters)


def release_per_run(
    remembered: Sequence[str], counters: Mapping[str, CounterRow], now_ms: int
) -> list[CounterRow]:
    """Return the ``per_run`` rows a released or expired reservation gives back (-1 each).

    ``remembered`` are the reservation's entries (:func:`remembered_counter`; ``counters``
    the rows by name, :func:`counter_memory` gives the names). Never below 0; an absent or
    expired row is left alone (its run's count already went with it), and so is a row in a
    later life than the one the reservation counted in (it expired meanwhile and started
    again, or was reset: the call is not in its count). The TTL is not refreshed: only
    increments refresh it.
    """
    rows = []
    for entry in dict.fromkeys(remembered):
        name, generation = counter_memory(entry)
        row = counters.get(name)
        if row is None or row.live_count(now_ms) == 0:
            continue
        if generation is not None and row.generation != generation:
            continue
        rows.append(replace(row, count=row.count - 1, updated_at_ms=now_ms))
    return rows


def effective_observe_mode(
    request_mode: ObserveMode | str | None, tenant_mode: ObserveMode | str | None
) -> str:
    """Return ``OBSERVE`` or ``ENFORCE`` by the spec's PRECEDENCE (``DISABLED`` is ``ENFORCE``).

    The request's mode wins when present (a request's ``ENFORCE`` or ``DISABLED`` overrides
    a tenant in observe mode); otherwise the tenant's; otherwise ``ENFORCE``.

    Raises:
        LedgerError: ``INVALID_REQUEST`` for a value that is not an observe mode.
    """
    for value, field in ((request_mode, "observe_mode"), (tenant_mode, "tenant observe_mode")):
        if value is None:
            continue
        try:
            mode = ObserveMode(value)
        except ValueError:
            modes = ", ".join(m.value for m in ObserveMode)
            raise LedgerError(
                "INVALID_REQUEST", f"{field} {value!r} is not one of {modes}"
            ) from None
        observe = mode is ObserveMode.OBSERVE
        return ObserveMode.OBSERVE.value if observe else ObserveMode.ENFORCE.value
    return ObserveMode.ENFORCE.value


# --------------------------------------------------------------------------------------------
# Steps


def _prepare(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    now_ms: int,
    registry: Registry,
) -> Prepared:
    kind = registry.check_kind(action.kind)
    info = registry.info(kind)
    risk_class = info.risk_class.value if info is not None else ActionRiskClass.SIDE_EFFECT.value
    if policy is None:
        return Prepared(None, kind, risk_class, now_ms)
    scopes = subject_scopes(subject)
    scope = matching_scope(policy.scope_pattern, scopes)
    if scope is None:
        raise ValueError(
            f"policy {policy.policy_id} ({policy.scope_pattern!r}) does not match {scopes}: "
            "pass the policy select_policy chose for this subject"
        )
    if kind in policy.denied_action_kinds:
        denial = _access_denial(policy, kind, scope, ReasonCode.ACTION_KIND_DENIED)
        return Prepared(policy, kind, risk_class, now_ms, scope, denial)
    if policy.allowed_action_kinds and kind not in policy.allowed_action_kinds:
        denial = _access_denial(policy, kind, scope, ReasonCode.ACTION_KIND_NOT_ALLOWED)
        return Prepared(policy, kind, risk_class, now_ms, scope, denial)
    run_id = (subject.dimensions or {}).get("run_id") or None
    risk_checks = [
        _check(
            policy,
            f"risk_class_quotas[{index}]",
            RISK_COUNTER_KIND,
            risk_class,
            "",
            rule,
            kind,
            scope,
            run_id,
            now_ms,
        )
        for index, rule in enumerate(policy.risk_class_quotas)
        if rule.risk_class == risk_class
    ]
    dimensions = registry.policy_dimensions(kind)
    kind_checks = [
        _check(
            policy,
            f"action_quotas[{index}]",
            kind,
            None,
            rule_fingerprint(rule),
            rule,
            kind,
            scope,
            run_id,
            now_ms,
        )
        for index, rule in enumerate(policy.action_quotas)
        if rule.action_kind == kind and _admits(rule, action, dimensions)
    ]
    return Prepared(
        policy, kind, risk_class, now_ms, scope, None, tuple(risk_checks), tuple(kind_checks)
    )


def _admits(rule: QuotaRule, action: Action, dimensions: frozenset[str]) -> bool:
    """POLICY KEYS EVALUATION SEMANTICS: every non-empty allowlist lists the action's key."""
    keys = action.policy_keys
    for field, dimension in _ALLOWLISTS:
        allowlist: tuple[str, ...] = getattr(rule, field)
        if not allowlist:
            continue
        value = getattr(keys, dimension) if keys is not None else None
        if value is None or dimension not in dimensions:
            return False
        if dimension in _CASE_INSENSITIVE:
            if value.lower() not in {item.lower() for item in allowlist}:
                return False
        elif value not in allowlist:
            return False
    return True


def _check(
    policy: PolicyRow,
    rule_at: str,
    counter_kind: str,
    risk_class: str | None,
    fingerprint: str,
    rule: QuotaRule | RiskQuotaRule,
    kind: str,
    scope: str,
    run_id: str | None,
    now_ms: int,
) -> _Check:
    """The counter one applicable rule reads, with what its evaluation needs."""
    window = rule.window
    if window == PER_RUN:
        if run_id is None:
            raise LedgerError(
                "INVALID_REQUEST",
                f"subject.dimensions.run_id is required: policy {policy.policy_id!r} applies a "
                f"per_run quota ({rule_at}, {rule.max_calls} per run) to {kind}; send the "
                "run's id in subject.dimensions.run_id",
            )
        bucket, start = run_id, None
        ttl: int | None = rule.per_run_counter_ttl_ms or DEFAULT_PER_RUN_TTL_MS
    else:
        bucket, begin = calendar_bucket(window, now_ms)
        start, ttl = begin, None
    if window == TENANT_DAY:
        scope = tenant_root(scope)
    key = CounterKey(
        policy.policy_id, counter_kind, risk_class, window, bucket, scope, fingerprint, start
    )
    pct = rule.threshold_pct if rule.threshold_pct is not None else DEFAULT_THRESHOLD_PCT
    return _Check(key, key.name, rule.max_calls, pct, round(pct * _PPM), ttl, kind, rule_at)


def _access_denial(policy: PolicyRow, kind: str, scope: str, reason: str) -> Denial:
    if reason == ReasonCode.ACTION_KIND_DENIED:
        message = f"action kind {kind!r} is denied by policy {policy.policy_id!r}"
        fix = (
            f"Remove {kind} from denied_action_kinds of policy '{policy.policy_id}' if this "
            "action should be allowed"
        )
    else:
        message = f"action kind {kind!r} is not on the allowlist of policy {policy.policy_id!r}"
        fix = (
            f"Add {kind} to allowed_action_kinds of policy '{policy.policy_id}' if this action "
            "should be allowed"
        )
    detail = {
        "reason_code": reason,
        "blocked_by_scope": scope,
        "blocked_by_policy": policy.policy_id,
        "suggested_fix": fix[:_MAX_FIX],
    }
    return Denial(reason, detail, f"{message} (scope {scope})", policy, kind)


def _quota_denial(policy: PolicyRow, kind: str, check: _Check, used: int) -> Denial:
    key = check.key
    violation: dict[str, Any] = {
        "action_kind": kind,
        "window": key.window,
        "window_key": key.bucket,
        "used": used,
        "limit": check.limit,
        "scope": key.scope,
        "policy_id": policy.policy_id,
    }
    if key.risk_class is not None:
        violation["risk_class"] = key.risk_class
        what = f"{key.risk_class} risk-class quota"
    else:
        what = f"{kind} quota"
    end = key.window_end_ms
    later = "or start a new run" if end is None else f"or wait until {iso(end)}"
    fix = (
        f"Increase the {what} from {check.limit} {key.window} in policy '{policy.policy_id}', "
        f"{later}"
    )
    detail = {
        "reason_code": ReasonCode.ACTION_QUOTA_EXCEEDED,
        "quota_violation": violation,
        "blocked_by_scope": key.scope,
        "blocked_by_policy": policy.policy_id,
        "suggested_fix": fix[:_MAX_FIX],
    }
    message = (
        f"action quota exceeded: {used} of {check.limit} {what} calls used "
        f"({key.window} {key.bucket}) at {key.scope}, policy {policy.policy_id!r}"
    )
    return Denial(ReasonCode.ACTION_QUOTA_EXCEEDED, detail, message, policy, kind)


def _admit(
    policy: PolicyRow, plan: Prepared, counters: Mapping[str, CounterRow], now_ms: int
) -> Admission:
    """Step 5's counter half: every applicable counter +1 (once, however many rules share it).

    A ``per_run`` row lives the longest ``per_run_counter_ttl_ms`` of the rules counting on it
    from now; a calendar row expires its cleanup TTL after its bucket starts.
    """
    checks = (*plan.risk_checks, *plan.kind_checks)
    ttls: dict[str, int | None] = {}
    for check in checks:
        if check.ttl_ms is None or check.name not in ttls:
            ttls[check.name] = check.ttl_ms
        else:
            ttls[check.name] = max(check.ttl_ms, ttls[check.name] or 0)
    rows: dict[str, CounterRow] = {}
    for check in checks:
        if check.name in rows:
            continue
        old = counters.get(check.name)
        live = old if old is not None and now_ms < old.expires_at_ms else None
        ttl = ttls[check.name]
        expiry = now_ms + ttl if ttl is not None else check.key.cleanup_expiry_ms()
        assert expiry is not None
        rows[check.name] = CounterRow(
            key=check.key,
            count=(live.count if live is not None else 0) + 1,
            expires_at_ms=expiry,
            updated_at_ms=now_ms,
            incremented_at_ms=now_ms,
            ttl_ms=ttl,
            fired_pcts=live.fired_pcts if live is not None else (),
            generation=live.generation if live is not None else next_generation(old, now_ms),
        )
    thresholds = []
    for check in checks:
        row = rows[check.name]
        mark = check.threshold_ppm * check.limit
        crossed = (row.count - 1) * _PPM < mark <= row.count * _PPM
        if crossed and check.threshold_pct not in row.fired_pcts:
            rows[check.name] = replace(row, fired_pcts=(*row.fired_pcts, check.threshold_pct))
            risk = check.key.risk_class
            thresholds.append(
                ThresholdCrossing(
                    rule=check.rule,
                    counter=check.name,
                    key=check.key,
                    action_kind=RISK_COUNTER_KIND if risk is not None else check.kind,
                    risk_class=risk,
                    used=row.count,
                    limit=check.limit,
                    threshold_pct=check.threshold_pct,
                )
            )
    per_run = tuple(
        remembered_counter(name, row.generation)
        for name, row in rows.items()
        if row.key.window == PER_RUN
    )
    return Admission(
        policy=policy,
        scope=plan.scope,
        risk_class=plan.risk_class,
        counters=tuple(rows.values()),
        per_run_counters=per_run,
        thresholds=tuple(thresholds),
    )
