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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Final

from runcycles.governance import RISK_COUNTER_KIND
from runcycles.models import Action, ObserveMode, ReasonCode, Subject
from runcycles_server.errors import LedgerError
from runcycles_server.governance.policies import (
    DEFAULT_PER_RUN_TTL_MS,
    DEFAULT_THRESHOLD_PCT,
    PolicyCaps,
    PolicyRow,
    QuotaRule,
    TtlOverride,
)
from runcycles_server.governance.quotas import (
    PER_RUN,
    TENANT_DAY,
    CounterKey,
    CounterRow,
    calendar_bucket,
    rule_fingerprint,
)
from runcycles_server.governance.registry import Registry
from runcycles_server.governance.scopes import matching_scope, subject_scopes, tenant_root
from runcycles_server.governance.timestamps import iso

__all__ = [
    "Admission",
    "Denial",
    "ThresholdCrossing",
    "counters_needed",
    "effective_observe_mode",
    "evaluate",
    "release_per_run",
]

_MAX_FIX: Final = 512
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
    (and not at all on a dry run or in observe mode); ``per_run_counters`` the names the
    reservation must keep so that its release or expiry gives them back
    (:func:`release_per_run`). ``policy`` is ``None`` when no policy governs the request.
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

    def error(self) -> LedgerError:
        """The ``409`` of a live reservation (``details.deny_detail`` carries the detail)."""
        return LedgerError(
            self.reason_code, self.message, details={"deny_detail": dict(self.deny_detail)}
        )


@dataclass(frozen=True, slots=True)
class _Check:
    """One applicable quota rule and the counter it reads."""

    key: CounterKey
    limit: int
    threshold_pct: float
    ttl_ms: int | None
    kind: str
    rule: str


@dataclass(frozen=True, slots=True)
class _Plan:
    scope: str
    risk_class: str
    risk_checks: tuple[_Check, ...]
    kind_checks: tuple[_Check, ...]


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
    plan = _plan(policy, action, subject, now_ms, registry)
    if not isinstance(plan, _Plan):
        return []
    unique: dict[str, CounterKey] = {}
    for check in (*plan.risk_checks, *plan.kind_checks):
        unique.setdefault(check.key.name, check.key)
    return list(unique.values())


def evaluate(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    counters: Mapping[str, CounterRow],
    now_ms: int,
    registry: Registry,
) -> Admission | Denial:
    """Run steps 1-3 for ``policy`` against the current ``counters`` (by name).

    A counter missing from ``counters`` or expired counts as 0.

    Raises:
        LedgerError: ``INVALID_REQUEST`` for a malformed or undeclared custom kind, or a
            ``per_run`` quota that applies to a subject without ``dimensions.run_id``.
    """
    plan = _plan(policy, action, subject, now_ms, registry)
    if isinstance(plan, Denial):
        return plan
    if policy is None or isinstance(plan, str):
        return Admission(policy=None, scope=None, risk_class=str(plan))

    def used(check: _Check) -> int:
        row = counters.get(check.key.name)
        return row.live_count(now_ms) if row is not None else 0

    for checks in (plan.risk_checks, plan.kind_checks):
        exceeded = [(check.limit - used(check), index, check) for index, check in enumerate(checks)]
        exceeded = [item for item in exceeded if item[0] <= 0]
        if exceeded:
            _, _, worst = min(exceeded, key=lambda item: (item[0], item[1]))
            return _quota_denial(policy, action.kind, worst, used(worst))
    return _admit(policy, plan, counters, now_ms)


def release_per_run(
    names: Sequence[str], counters: Mapping[str, CounterRow], now_ms: int
) -> list[CounterRow]:
    """Return the ``per_run`` rows a released or expired reservation gives back (-1 each).

    Never below 0; an absent or expired row is left alone (its run's count already went
    with it). The TTL is not refreshed: only increments refresh it.
    """
    rows = []
    for name in dict.fromkeys(names):
        row = counters.get(name)
        if row is None or row.live_count(now_ms) == 0:
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


def _plan(
    policy: PolicyRow | None,
    action: Action,
    subject: Subject,
    now_ms: int,
    registry: Registry,
) -> _Plan | Denial | str:
    """Step 1 and the list of applicable quota rules (a bare risk class when no policy)."""
    kind = registry.check_kind(action.kind)
    risk_class = registry.risk_class(kind).value
    if policy is None:
        return risk_class
    scopes = subject_scopes(subject)
    scope = matching_scope(policy.scope_pattern, scopes)
    if scope is None:
        raise ValueError(
            f"policy {policy.policy_id} ({policy.scope_pattern!r}) does not match {scopes}: "
            "pass the policy select_policy chose for this subject"
        )
    if kind in policy.denied_action_kinds:
        return _access_denial(policy, kind, scope, ReasonCode.ACTION_KIND_DENIED)
    if policy.allowed_action_kinds and kind not in policy.allowed_action_kinds:
        return _access_denial(policy, kind, scope, ReasonCode.ACTION_KIND_NOT_ALLOWED)
    run_id = (subject.dimensions or {}).get("run_id") or None
    risk_checks = []
    for index, risk_rule in enumerate(policy.risk_class_quotas):
        if risk_rule.risk_class != risk_class:
            continue
        rule_at = f"risk_class_quotas[{index}]"
        where = f"{rule_at} ({risk_class} {risk_rule.window})"
        key = _key(
            policy,
            RISK_COUNTER_KIND,
            risk_class,
            "",
            risk_rule.window,
            scope,
            run_id,
            now_ms,
            where,
        )
        risk_checks.append(
            _check(
                key,
                risk_rule.max_calls,
                risk_rule.threshold_pct,
                risk_rule.per_run_counter_ttl_ms,
                kind,
                rule_at,
            )
        )
    kind_checks = []
    dimensions = registry.policy_dimensions(kind)
    for index, rule in enumerate(policy.action_quotas):
        if rule.action_kind != kind or not _admits(rule, action, dimensions):
            continue
        rule_at = f"action_quotas[{index}]"
        where = f"{rule_at} ({kind} {rule.window})"
        key = _key(
            policy, kind, None, rule_fingerprint(rule), rule.window, scope, run_id, now_ms, where
        )
        kind_checks.append(
            _check(
                key, rule.max_calls, rule.threshold_pct, rule.per_run_counter_ttl_ms, kind, rule_at
            )
        )
    return _Plan(scope, risk_class, tuple(risk_checks), tuple(kind_checks))


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


def _key(
    policy: PolicyRow,
    action_kind: str,
    risk_class: str | None,
    rule: str,
    window: str,
    scope: str,
    run_id: str | None,
    now_ms: int,
    where: str,
) -> CounterKey:
    if window == PER_RUN:
        if run_id is None:
            raise LedgerError(
                "INVALID_REQUEST",
                f"subject.dimensions.run_id is required: policy {policy.policy_id!r} applies a "
                f"per_run quota ({where}) to this action; send the run's id in "
                "subject.dimensions.run_id",
            )
        bucket, start = run_id, None
    else:
        bucket, begin = calendar_bucket(window, now_ms)
        start = begin
    counted_at = tenant_root(scope) if window == TENANT_DAY else scope
    return CounterKey(
        policy_id=policy.policy_id,
        action_kind=action_kind,
        risk_class=risk_class,
        window=window,
        bucket=bucket,
        scope=counted_at,
        rule=rule,
        bucket_start_ms=start,
    )


def _check(
    key: CounterKey,
    limit: int,
    threshold_pct: float | None,
    ttl_ms: int | None,
    kind: str,
    rule: str,
) -> _Check:
    pct = threshold_pct if threshold_pct is not None else DEFAULT_THRESHOLD_PCT
    ttl = (ttl_ms or DEFAULT_PER_RUN_TTL_MS) if key.window == PER_RUN else None
    return _Check(key, limit, pct, ttl, kind, rule)


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
    return Denial(reason, detail, f"{message} (scope {scope})", policy)


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
    return Denial(ReasonCode.ACTION_QUOTA_EXCEEDED, detail, message, policy)


def _admit(
    policy: PolicyRow, plan: _Plan, counters: Mapping[str, CounterRow], now_ms: int
) -> Admission:
    """Step 5's counter half: every applicable counter +1 (once, however many rules share it)."""
    checks = (*plan.risk_checks, *plan.kind_checks)
    rows: dict[str, CounterRow] = {}
    for check in checks:
        name = check.key.name
        current = rows.get(name)
        if current is None:
            old = counters.get(name)
            live = old if old is not None and old.live_count(now_ms) > 0 else None
            current = CounterRow(
                key=check.key,
                count=(live.count if live is not None else 0) + 1,
                expires_at_ms=0,
                updated_at_ms=now_ms,
                incremented_at_ms=now_ms,
                fired_pcts=live.fired_pcts if live is not None else (),
            )
        if check.ttl_ms is not None:
            ttl = max(check.ttl_ms, current.ttl_ms or 0)
            current = replace(current, ttl_ms=ttl, expires_at_ms=now_ms + ttl)
        else:
            expiry = check.key.cleanup_expiry_ms()
            assert expiry is not None
            current = replace(current, expires_at_ms=expiry)
        rows[name] = current
    thresholds = []
    for check in checks:
        row = rows[check.key.name]
        pct = Fraction(str(check.threshold_pct))
        mark = pct * check.limit
        if row.count - 1 < mark <= row.count and check.threshold_pct not in row.fired_pcts:
            rows[check.key.name] = replace(row, fired_pcts=(*row.fired_pcts, check.threshold_pct))
            risk = check.key.risk_class
            thresholds.append(
                ThresholdCrossing(
                    rule=check.rule,
                    counter=check.key.name,
                    key=check.key,
                    action_kind=RISK_COUNTER_KIND if risk is not None else check.kind,
                    risk_class=risk,
                    used=row.count,
                    limit=check.limit,
                    threshold_pct=check.threshold_pct,
                )
            )
    per_run = tuple(name for name, row in rows.items() if row.key.window == PER_RUN)
    return Admission(
        policy=policy,
        scope=plan.scope,
        risk_class=plan.risk_class,
        counters=tuple(rows.values()),
        per_run_counters=per_run,
        thresholds=tuple(thresholds),
    )
