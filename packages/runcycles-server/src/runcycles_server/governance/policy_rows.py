"""Policy rows: the stored form of a policy, its wire ``Policy`` and its storage JSON.

Plain frozen data (no validation here: :mod:`~runcycles_server.governance.policies` builds
rows from requests). Times are epoch milliseconds; lists are tuples; an absent optional
field is ``None``. :func:`policy_to_json` and :func:`policy_from_json` round-trip a row
exactly; :func:`policy_body` is the ``Policy`` of the admin plane with its v0.1.26
extension lists always present.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import orjson

from runcycles_server.governance.timestamps import iso

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
    "policy_body",
    "policy_from_json",
    "policy_to_json",
]

ACTIVE: Final = "ACTIVE"
DISABLED: Final = "DISABLED"
DEFAULT_PER_RUN_TTL_MS: Final = 86_400_000
DEFAULT_THRESHOLD_PCT: Final = 0.80
_STORAGE_VERSION: Final = 1

# --------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True, slots=True)
class QuotaRule:
    """One ``ActionQuota``: at most ``max_calls`` of ``action_kind`` per ``window``.

    Empty allowlists mean "no filter"; ``per_run_counter_ttl_ms`` and ``threshold_pct`` are
    ``None`` when not given (the spec defaults apply: :data:`DEFAULT_PER_RUN_TTL_MS`,
    :data:`DEFAULT_THRESHOLD_PCT`).
    """

    action_kind: str
    max_calls: int
    window: str
    host_allowlist: tuple[str, ...] = ()
    recipient_domain_allowlist: tuple[str, ...] = ()
    resource_type_allowlist: tuple[str, ...] = ()
    per_run_counter_ttl_ms: int | None = None
    threshold_pct: float | None = None


@dataclass(frozen=True, slots=True)
class RiskQuotaRule:
    """One ``RiskClassQuota``: at most ``max_calls`` of all kinds of ``risk_class`` per window."""

    risk_class: str
    max_calls: int
    window: str
    per_run_counter_ttl_ms: int | None = None
    threshold_pct: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyCaps:
    """The ``Caps`` a policy imposes (empty tool lists are stored as ``None``)."""

    max_tokens: int | None = None
    max_steps_remaining: int | None = None
    tool_allowlist: tuple[str, ...] | None = None
    tool_denylist: tuple[str, ...] | None = None
    cooldown_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TtlOverride:
    """``reservation_ttl_override``: reservation TTL governance for matching scopes."""

    default_ttl_ms: int | None = None
    max_ttl_ms: int | None = None
    max_extensions: int | None = None


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """``rate_limits``: per-minute request limits for matching scopes."""

    max_reservations_per_minute: int | None = None
    max_commits_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """A stored policy: every field of the spec's ``Policy`` (times in ms) plus its tenant."""

    policy_id: str
    tenant_id: str
    name: str
    scope_pattern: str
    status: str
    priority: int
    created_at_ms: int
    updated_at_ms: int | None = None
    description: str | None = None
    caps: PolicyCaps | None = None
    commit_overage_policy: str | None = None
    reservation_ttl_override: TtlOverride | None = None
    rate_limits: RateLimitRule | None = None
    effective_from_ms: int | None = None
    effective_until_ms: int | None = None
    action_quotas: tuple[QuotaRule, ...] = ()
    risk_class_quotas: tuple[RiskQuotaRule, ...] = ()
    allowed_action_kinds: tuple[str, ...] = ()
    denied_action_kinds: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Wire and storage shapes


def caps_body(caps: PolicyCaps) -> dict[str, Any]:
    """Return the wire ``Caps`` of a policy's caps (for an ``ALLOW_WITH_CAPS`` decision)."""
    return _plain(caps)


def policy_body(row: PolicyRow) -> dict[str, Any]:
    """Return the wire ``Policy`` (extension lists always present, ``[]`` when empty)."""
    body: dict[str, Any] = {
        "policy_id": row.policy_id,
        "name": row.name,
        "scope_pattern": row.scope_pattern,
        "priority": row.priority,
        "status": row.status,
        "created_at": iso(row.created_at_ms),
    }
    if row.description is not None:
        body["description"] = row.description
    for name in ("caps", "reservation_ttl_override", "rate_limits"):
        value = getattr(row, name)
        if value is not None:
            body[name] = _plain(value)
    if row.commit_overage_policy is not None:
        body["commit_overage_policy"] = row.commit_overage_policy
    if row.effective_from_ms is not None:
        body["effective_from"] = iso(row.effective_from_ms)
    if row.effective_until_ms is not None:
        body["effective_until"] = iso(row.effective_until_ms)
    if row.updated_at_ms is not None:
        body["updated_at"] = iso(row.updated_at_ms)
    body["action_quotas"] = [_plain(rule) for rule in row.action_quotas]
    body["risk_class_quotas"] = [_plain(rule) for rule in row.risk_class_quotas]
    body["allowed_action_kinds"] = list(row.allowed_action_kinds)
    body["denied_action_kinds"] = list(row.denied_action_kinds)
    return body


def policy_to_json(row: PolicyRow) -> bytes:
    """Return the storage form of ``row`` (what :func:`policy_from_json` reads back exactly)."""
    data = _plain(row)
    data["v"] = _STORAGE_VERSION
    return orjson.dumps(data)


def policy_from_json(raw: bytes | str) -> PolicyRow:
    """Return the row :func:`policy_to_json` stored.

    Every governed reservation reads its tenant's policies, which rarely change: the decoded
    rows (frozen, so shared safely) are memoized by their stored bytes.

    Raises:
        ValueError: ``raw`` is not a stored policy of a version this code reads.
    """
    return _decoded_policy(raw)


@functools.lru_cache(maxsize=4096)
def _decoded_policy(raw: bytes | str) -> PolicyRow:
    data = orjson.loads(raw)
    if not isinstance(data, dict) or data.pop("v", None) != _STORAGE_VERSION:
        raise ValueError("not a stored policy (version 1)")
    nested: dict[str, Callable[[Any], Any]] = {
        "caps": lambda d: _build(PolicyCaps, d),
        "reservation_ttl_override": lambda d: _build(TtlOverride, d),
        "rate_limits": lambda d: _build(RateLimitRule, d),
        "action_quotas": lambda items: tuple(_build(QuotaRule, d) for d in items),
        "risk_class_quotas": lambda items: tuple(_build(RiskQuotaRule, d) for d in items),
        "allowed_action_kinds": tuple,
        "denied_action_kinds": tuple,
    }
    for name, convert in nested.items():
        if data.get(name) is not None:
            data[name] = convert(data[name])
    return PolicyRow(**data)


_T = TypeVar("_T")


def _build(cls: type[_T], data: Mapping[str, Any]) -> _T:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _plain(value: Any) -> dict[str, Any]:
    """Return a row or rule as a JSON-ready dict (``None`` and empty allowlists left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if item is None or (item == () and f.default == ()):
            continue
        if isinstance(item, tuple):
            item = [_plain(x) if dataclasses.is_dataclass(x) else x for x in item]
        elif dataclasses.is_dataclass(item):
            item = _plain(item)
        out[f.name] = item
    return out
