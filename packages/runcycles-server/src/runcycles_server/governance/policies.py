"""Policies: validated from requests, and which one applies to a request.

A policy (``/v1/admin/policies``, base governance spec plus ``PolicyExtension``) binds a
``scope_pattern`` to caps, TTL overrides, rate limits, a commit overage policy and the
v0.1.26 governance lists: allow/deny lists of action kinds, per-kind and per-risk-class
action quotas. :func:`policy_from_create` and :func:`policy_patch` turn request bodies into
:class:`~runcycles_server.governance.policy_rows.PolicyRow` values, refusing every rule
break with ``400 INVALID_REQUEST`` and a message that names the field. The rows, their wire
``Policy`` (:func:`policy_body`) and storage JSON live in
:mod:`~runcycles_server.governance.policy_rows` and are re-exported here.

Only one policy applies to a request (MULTI-POLICY SEMANTICS): :func:`select_policy` picks,
among the ``ACTIVE`` policies inside their effective window (``effective_from`` inclusive,
``effective_until`` exclusive) whose pattern matches one of the request's derived scopes,
the one with the highest ``priority``. Ties go to the policy whose match is the most specific
(deepest) scope, then to the oldest policy, then to the smallest ``policy_id``, so the choice
never depends on the order the store returns rows in.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from runcycles.governance import (
    ActionQuota,
    PolicyCreateRequest,
    PolicyUpdateRequest,
    RateLimits,
    ReservationTtlOverride,
    RiskClassQuota,
)
from runcycles.models import INT64_MAX, INT64_MIN, ActionRiskClass, Caps
from runcycles_server.errors import LedgerError
from runcycles_server.governance.policy_rows import (
    ACTIVE,
    DEFAULT_PER_RUN_TTL_MS,
    DEFAULT_THRESHOLD_PCT,
    DISABLED,
    PolicyCaps,
    PolicyRow,
    QuotaRule,
    RateLimitRule,
    RiskQuotaRule,
    TtlOverride,
    caps_body,
    policy_body,
    policy_from_json,
    policy_to_json,
)
from runcycles_server.governance.registry import Registry
from runcycles_server.governance.scopes import (
    matches,
    matching_index,
    tenant_root,
    validate_scope_pattern,
)
from runcycles_server.governance.timestamps import iso, ms_from_datetime

__all__ = [
    "ACTIVE",
    "DEFAULT_PER_RUN_TTL_MS",
    "DEFAULT_THRESHOLD_PCT",
    "DISABLED",
    "PolicyCaps",
    "PolicyRow",
    "QuotaRule",
    "RateLimitRule",
    "RiskQuotaRule",
    "TtlOverride",
    "caps_body",
    "is_effective",
    "matches",
    "matches_list_filters",
    "policy_body",
    "policy_from_create",
    "policy_from_json",
    "policy_patch",
    "policy_to_json",
    "select_policy",
]

_DATE_TIME_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}")
_RISK_CLASSES: Final = frozenset(c.value for c in ActionRiskClass)
_ALLOWLISTS: Final = (
    ("host_allowlist", "host"),
    ("recipient_domain_allowlist", "recipient_domain"),
    ("resource_type_allowlist", "resource_type"),
)

# --------------------------------------------------------------------------------------------
# Create and patch


def policy_from_create(
    tenant_id: str,
    body: Mapping[str, Any],
    *,
    policy_id: str,
    now_ms: int,
    registry: Registry,
) -> PolicyRow:
    """Validate a ``PolicyCreateRequest`` body and return the new policy of ``tenant_id``.

    Raises:
        LedgerError: ``INVALID_REQUEST`` naming the field for every rule the body breaks.
    """
    _check_times_are_strings(body)
    request = _parse(PolicyCreateRequest, body, _CREATE_HINTS)
    if request.tenant_id is not None and request.tenant_id != tenant_id:
        raise _invalid(
            f"tenant_id {request.tenant_id!r} is not the tenant {tenant_id!r} this policy is "
            "created for: drop tenant_id (an API key implies its tenant) or send the right one"
        )
    row = PolicyRow(
        policy_id=policy_id,
        tenant_id=tenant_id,
        name=_name(request.name),
        scope_pattern=validate_scope_pattern(request.scope_pattern, tenant_id),
        status=ACTIVE,
        priority=request.priority or 0,
        created_at_ms=now_ms,
        description=_description(request.description),
        caps=_caps(request.caps),
        commit_overage_policy=(
            request.commit_overage_policy.value if request.commit_overage_policy else None
        ),
        reservation_ttl_override=_ttl_override(request.reservation_ttl_override),
        rate_limits=_rate_limits(request.rate_limits),
        effective_from_ms=_time_ms(request.effective_from, "effective_from"),
        effective_until_ms=_time_ms(request.effective_until, "effective_until"),
        action_quotas=_quota_rules(request.action_quotas, registry),
        risk_class_quotas=_risk_rules(request.risk_class_quotas),
        allowed_action_kinds=_kinds(request.allowed_action_kinds, "allowed_action_kinds", registry),
        denied_action_kinds=_kinds(request.denied_action_kinds, "denied_action_kinds", registry),
    )
    _check_row(row)
    return row


_NOT_NULL: Final = frozenset(
    {
        "name",
        "priority",
        "status",
        "action_quotas",
        "risk_class_quotas",
        "allowed_action_kinds",
        "denied_action_kinds",
    }
)
"""PATCH fields that cannot be removed (``null``); the others' ``null`` removes the value."""
_LISTS: Final = (
    "action_quotas",
    "risk_class_quotas",
    "allowed_action_kinds",
    "denied_action_kinds",
)


def policy_patch(
    row: PolicyRow, body: Mapping[str, Any], *, now_ms: int, registry: Registry
) -> tuple[PolicyRow, list[str]]:
    """Apply a ``PATCH /v1/admin/policies/{policy_id}`` body to ``row``.

    Absent fields keep their value; a list that is sent replaces the stored one (``[]``
    clears it); ``null`` removes an optional field. Returns the new row and the
    ``changed_fields`` of the ``policy.updated`` event: the JSON names of the fields whose
    value actually changed, in ``Policy`` field order (``updated_at`` moves only then).

    Raises:
        LedgerError: ``INVALID_REQUEST`` naming the field (including allow and deny lists
            both non-empty once the patch is applied: clear one with ``[]``).
    """
    _check_times_are_strings(body)
    request = _parse(PolicyUpdateRequest, body, _PATCH_HINTS)
    sent = request.model_fields_set
    for name in sorted(sent & _NOT_NULL):
        if body.get(name) is None:
            hint = "send [] to clear it" if name in _LISTS else "omit it to keep the value"
            raise _invalid(f"{name}: null is not allowed; {hint}")
    converters: dict[str, Callable[[], Any]] = {
        "name": lambda: _name(request.name),
        "description": lambda: _description(request.description),
        "priority": lambda: request.priority,
        "caps": lambda: _caps(request.caps),
        "commit_overage_policy": lambda: (
            request.commit_overage_policy.value if request.commit_overage_policy else None
        ),
        "reservation_ttl_override": lambda: _ttl_override(request.reservation_ttl_override),
        "rate_limits": lambda: _rate_limits(request.rate_limits),
        "effective_from": lambda: _time_ms(request.effective_from, "effective_from"),
        "effective_until": lambda: _time_ms(request.effective_until, "effective_until"),
        "status": lambda: request.status.value if request.status else None,
        "action_quotas": lambda: _quota_rules(request.action_quotas, registry),
        "risk_class_quotas": lambda: _risk_rules(request.risk_class_quotas),
        "allowed_action_kinds": lambda: _kinds(
            request.allowed_action_kinds, "allowed_action_kinds", registry
        ),
        "denied_action_kinds": lambda: _kinds(
            request.denied_action_kinds, "denied_action_kinds", registry
        ),
    }
    changes: dict[str, Any] = {}
    changed: list[str] = []
    for wire_name, convert in converters.items():
        if wire_name not in sent:
            continue
        attribute = _ATTRIBUTE.get(wire_name, wire_name)
        value = convert()
        if value != getattr(row, attribute):
            changes[attribute] = value
            changed.append(wire_name)
    if not changed:
        return row, []
    updated = dataclasses.replace(row, updated_at_ms=now_ms, **changes)
    _check_row(updated)
    return updated, changed


_ATTRIBUTE: Final = {"effective_from": "effective_from_ms", "effective_until": "effective_until_ms"}


# --------------------------------------------------------------------------------------------
# Selection


def is_effective(policy: PolicyRow, now_ms: int) -> bool:
    """Return whether ``policy`` is ``ACTIVE`` and ``now_ms`` is inside its effective window."""
    if policy.status != ACTIVE:
        return False
    if policy.effective_from_ms is not None and now_ms < policy.effective_from_ms:
        return False
    return policy.effective_until_ms is None or now_ms < policy.effective_until_ms


def select_policy(
    policies: Iterable[PolicyRow], scopes: Sequence[str], now_ms: int
) -> PolicyRow | None:
    """Return the one policy that governs a request with derived ``scopes`` (module docs).

    ``scopes`` are the request's derived scopes, shallowest first; a policy of another
    tenant never applies, whatever its pattern.
    """
    if not scopes:
        return None
    tenant = tenant_root(scopes[0]).removeprefix("tenant:")
    split = [scope.split("/") for scope in scopes]
    best: PolicyRow | None = None
    best_key: tuple[int, int, int, str] | None = None
    for policy in policies:
        if policy.tenant_id.lower() != tenant or not is_effective(policy, now_ms):
            continue
        depth = matching_index(policy.scope_pattern, split)
        if depth is None:
            continue
        key = (-policy.priority, -depth, policy.created_at_ms, policy.policy_id)
        if best_key is None or key < best_key:
            best, best_key = policy, key
    return best


def matches_list_filters(
    policy: PolicyRow,
    *,
    scope_pattern: str | None = None,
    status: str | None = None,
    has_action_quotas: bool | None = None,
    references_action_kind: str | None = None,
) -> bool:
    """Return whether ``policy`` passes the ``GET /v1/admin/policies`` query filters.

    ``has_action_quotas``: non-empty ``action_quotas`` or ``risk_class_quotas`` (or, when
    false, neither); ``references_action_kind``: the kind is named by an action quota or an
    allow/deny list (ADMIN OVERVIEW AND LIST FILTERS).
    """
    if scope_pattern is not None and policy.scope_pattern != scope_pattern:
        return False
    if status is not None and policy.status != status:
        return False
    if has_action_quotas is not None and has_action_quotas != bool(
        policy.action_quotas or policy.risk_class_quotas
    ):
        return False
    if references_action_kind is not None:
        kind = references_action_kind
        named = (
            kind in policy.allowed_action_kinds
            or kind in policy.denied_action_kinds
            or any(rule.action_kind == kind for rule in policy.action_quotas)
        )
        if not named:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Validation helpers

_ModelT = TypeVar("_ModelT", bound=BaseModel)


_CREATE_HINTS: Final = {
    "status": "a new policy is ACTIVE; PATCH its status to disable it",
    "policy_id": "the server assigns the policy_id",
}
_PATCH_HINTS: Final = {
    "scope_pattern": (
        "a policy's scope_pattern cannot change: create a policy with the new pattern and "
        "disable this one"
    ),
    "tenant_id": "the policy_id already names the tenant",
    "policy_id": "the policy_id is in the path",
}


def _parse(model: type[_ModelT], body: object, hints: Mapping[str, str]) -> _ModelT:
    if not isinstance(body, Mapping):
        raise _invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_int64(body, "")
    try:
        return model.model_validate(dict(body))
    except ValidationError as exc:
        raise _invalid(_validation_message(exc, hints)) from None


def _validation_message(exc: ValidationError, hints: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = _location(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            hint = hints.get(where, "check the spelling; see the Policy schema")
            message = f"is not a field of this request ({hint})"
        problems.append(f"{where}: {message}" if where else message)
    more = len(exc.errors()) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _check_int64(value: object, where: str) -> None:
    """Refuse integers the storage JSON (and the protocol's int64) cannot carry."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise _invalid(f"{where}: {value} is outside the 64-bit integer range")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_int64(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_int64(item, f"{where}[{index}]")


def _location(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.startswith(("function-", "constrained-")):
            text += f".{part}" if text else part
    return text


def _check_times_are_strings(body: object) -> None:
    if not isinstance(body, Mapping):
        return
    for name in ("effective_from", "effective_until"):
        value = body.get(name)
        if value is not None and not (isinstance(value, str) and _DATE_TIME_RE.match(value)):
            shown = repr(value) if isinstance(value, str) else type(value).__name__
            raise _invalid(
                f"{name}: expected an RFC 3339 date-time such as '2026-04-01T00:00:00Z', "
                f"got {shown}"
            )


def _time_ms(moment: datetime | None, name: str) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _invalid(
            f"{name}: give a time zone (e.g. '2026-04-01T00:00:00Z'); a local time is ambiguous"
        )
    return ms_from_datetime(moment)


def _name(name: str | None) -> str:
    if name is None or not name.strip():
        raise _invalid("name: must be a non-empty string")
    if len(name) > 256:
        raise _invalid(f"name: at most 256 characters, got {len(name)}")
    return name


def _description(description: str | None) -> str | None:
    if description is not None and len(description) > 1024:
        raise _invalid(f"description: at most 1024 characters, got {len(description)}")
    return description


def _caps(caps: Caps | None) -> PolicyCaps | None:
    if caps is None:
        return None
    return PolicyCaps(
        max_tokens=caps.max_tokens,
        max_steps_remaining=caps.max_steps_remaining,
        tool_allowlist=tuple(caps.tool_allowlist) if caps.tool_allowlist else None,
        tool_denylist=tuple(caps.tool_denylist) if caps.tool_denylist else None,
        cooldown_ms=caps.cooldown_ms,
    )


def _ttl_override(value: ReservationTtlOverride | None) -> TtlOverride | None:
    if value is None:
        return None
    default, maximum = value.default_ttl_ms, value.max_ttl_ms
    if default is not None and maximum is not None and default > maximum:
        raise _invalid(
            f"reservation_ttl_override.default_ttl_ms ({default}) exceeds max_ttl_ms "
            f"({maximum}): lower the default or raise the maximum"
        )
    return TtlOverride(default, maximum, value.max_extensions)


def _rate_limits(value: RateLimits | None) -> RateLimitRule | None:
    if value is None:
        return None
    return RateLimitRule(value.max_reservations_per_minute, value.max_commits_per_minute)


def _policy_kind(kind: str, field: str, registry: Registry) -> str:
    if kind in _RISK_CLASSES:
        raise _invalid(
            f"{field}: {kind!r} is a risk class, not an action kind: list exact kinds, or cap "
            "the class with risk_class_quotas"
        )
    if "*" in kind:
        raise _invalid(f"{field}: {kind!r}: wildcards are not supported; list exact kinds")
    return registry.check_kind(kind, field=field)


def _kinds(kinds: list[str] | None, field: str, registry: Registry) -> tuple[str, ...]:
    return tuple(
        _policy_kind(kind, f"{field}[{index}]", registry) for index, kind in enumerate(kinds or ())
    )


def _quota_rules(quotas: list[ActionQuota] | None, registry: Registry) -> tuple[QuotaRule, ...]:
    rules = []
    for index, quota in enumerate(quotas or ()):
        where = f"action_quotas[{index}]"
        kind = _policy_kind(quota.action_kind, f"{where}.action_kind", registry)
        dimensions = registry.policy_dimensions(kind)
        for field, dimension in _ALLOWLISTS:
            if getattr(quota, field) and dimension not in dimensions:
                routes = ", ".join(sorted(dimensions)) or "no policy key"
                raise _invalid(
                    f"{where}.{field}: {kind} does not route on {dimension} (its policy_key_spec "
                    f"declares {routes}), so this rule would never apply: remove the allowlist "
                    "or use a kind that declares it"
                )
        rules.append(
            QuotaRule(
                action_kind=kind,
                max_calls=quota.max_calls,
                window=quota.window.value,
                host_allowlist=tuple(quota.host_allowlist or ()),
                recipient_domain_allowlist=tuple(quota.recipient_domain_allowlist or ()),
                resource_type_allowlist=tuple(quota.resource_type_allowlist or ()),
                per_run_counter_ttl_ms=quota.per_run_counter_ttl_ms,
                threshold_pct=quota.threshold_pct,
            )
        )
    return tuple(rules)


def _risk_rules(quotas: list[RiskClassQuota] | None) -> tuple[RiskQuotaRule, ...]:
    return tuple(
        RiskQuotaRule(
            risk_class=quota.risk_class.value,
            max_calls=quota.max_calls,
            window=quota.window.value,
            per_run_counter_ttl_ms=quota.per_run_counter_ttl_ms,
            threshold_pct=quota.threshold_pct,
        )
        for quota in quotas or ()
    )


def _check_row(row: PolicyRow) -> None:
    """Rules across fields, checked on the row a create or a patch produces."""
    if row.allowed_action_kinds and row.denied_action_kinds:
        raise _invalid(
            "allowed_action_kinds and denied_action_kinds are mutually exclusive and both would "
            "be non-empty: set one and clear the other with []"
        )
    start, end = row.effective_from_ms, row.effective_until_ms
    if start is not None and end is not None and end <= start:
        raise _invalid(f"effective_until ({iso(end)}) must be after effective_from ({iso(start)})")


def _invalid(message: str) -> LedgerError:
    return LedgerError("INVALID_REQUEST", message)
