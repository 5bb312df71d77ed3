"""Quota counters: their keys, UTC calendar buckets, cleanup TTLs and stored rows.

A counter counts the reservations one quota rule admitted in one window instance
(WINDOW MODEL of ``cycles-action-kinds``): a UTC calendar bucket derived from the request
time (``2026-04-09T14:32`` for a minute, ``2026-04-09T14`` for an hour, ``2026-04-09`` for a
day), or the ``run_id`` for ``per_run``. Its key is (scope, action kind or ``__risk__`` with
the risk class, window, bucket), as the spec's
``quota:{tenant}:{scope}:{action_kind}:{window_code}:{bucket}``; :attr:`CounterKey.name` is
that key without the tenant (the store prefixes it) and with the rule's allowlist
fingerprint, so two rules of one kind and window that filter differently never share a
count. ``per_tenant_per_day`` counts at the tenant root whatever the subject.

A row's ``expires_at_ms`` is for stale-row cleanup only and never ends a window (the bucket
does): the spec's 120 s / 3660 s / 90000 s after the bucket starts, which is always after
it ends. A ``per_run`` row lives ``per_run_counter_ttl_ms`` from its last increment
(PER_RUN COUNTER LIFECYCLE). A row whose ``expires_at_ms`` has passed counts as absent.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Final

import orjson

from runcycles.governance import RISK_COUNTER_KIND
from runcycles.models import ActionQuotaWindow
from runcycles_server.governance.policy_rows import PolicyRow, QuotaRule
from runcycles_server.governance.timestamps import DAY_MS, HOUR_MS, MINUTE_MS, iso, utc

__all__ = [
    "CLEANUP_TTL_MS",
    "RISK_COUNTER_KIND",
    "CounterKey",
    "CounterRow",
    "calendar_bucket",
    "correlation_id",
    "counter_limit",
    "counter_memory",
    "counter_matches_filters",
    "counter_state_body",
    "next_generation",
    "remembered_counter",
    "reset_counter",
    "reset_matches",
    "rule_fingerprint",
]

PER_RUN: Final = ActionQuotaWindow.PER_RUN.value
TENANT_DAY: Final = ActionQuotaWindow.PER_TENANT_PER_DAY.value
_WINDOW_MS: Final = {
    ActionQuotaWindow.PER_MINUTE_TUMBLING.value: MINUTE_MS,
    ActionQuotaWindow.PER_HOUR_TUMBLING.value: HOUR_MS,
    ActionQuotaWindow.PER_DAY_TUMBLING.value: DAY_MS,
    TENANT_DAY: DAY_MS,
}
CLEANUP_TTL_MS: Final = {
    ActionQuotaWindow.PER_MINUTE_TUMBLING.value: 120_000,
    ActionQuotaWindow.PER_HOUR_TUMBLING.value: 3_660_000,
    ActionQuotaWindow.PER_DAY_TUMBLING.value: 90_000_000,
    TENANT_DAY: 90_000_000,
}
"""The spec's recommended cleanup TTL of each calendar window, counted from the bucket start."""
_BUCKET_FORMAT: Final = {
    ActionQuotaWindow.PER_MINUTE_TUMBLING.value: "%Y-%m-%dT%H:%M",
    ActionQuotaWindow.PER_HOUR_TUMBLING.value: "%Y-%m-%dT%H",
    ActionQuotaWindow.PER_DAY_TUMBLING.value: "%Y-%m-%d",
    TENANT_DAY: "%Y-%m-%d",
}
_STORAGE_VERSION: Final = 3
_ARRAY_VERSIONS: Final = (2, 3)
"""Array forms read: 2 (before ``generation``, read as generation 0) and 3."""


def correlation_id(kind: str, *parts: str) -> str:
    """Return a deterministic event ``correlation_id``: ``kind`` and a digest of ``parts``.

    The spec asks for "a deterministic hash over" named fields so that related events join
    (a threshold crossing with the denials and the reset of the same counter).
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


def calendar_bucket(window: str, now_ms: int) -> tuple[str, int]:
    """Return the UTC bucket string of a calendar ``window`` at ``now_ms`` and its start (ms).

    Raises:
        ValueError: ``window`` is ``per_run`` or unknown (a run's bucket is its run id).
    """
    size = _WINDOW_MS.get(window)
    if size is None:
        raise ValueError(f"{window!r} is not a calendar window")
    start = now_ms - now_ms % size
    return _bucket_name(window, start), start


@functools.lru_cache(maxsize=256)
def _bucket_name(window: str, start_ms: int) -> str:
    return utc(start_ms).strftime(_BUCKET_FORMAT[window])


def rule_fingerprint(rule: QuotaRule) -> str:
    """Return ``""`` for a rule without allowlists, else a short digest of its filters."""
    lists = (rule.host_allowlist, rule.recipient_domain_allowlist, rule.resource_type_allowlist)
    if not any(lists):
        return ""
    canonical = orjson.dumps([sorted(v.lower() for v in values) for values in lists])
    return hashlib.sha256(canonical).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class CounterKey:
    """Which counter: one rule's window instance at one scope.

    ``action_kind`` is the kind, or :data:`RISK_COUNTER_KIND` with ``risk_class`` set for a
    risk-class counter. ``bucket`` is the calendar bucket or the run id; ``bucket_start_ms``
    its start (``None`` for ``per_run``). ``rule`` is :func:`rule_fingerprint` of a per-kind
    rule. ``policy_id`` is the policy that counted (not part of :attr:`name`: a counter
    carries on when the policy changes, as the spec's counter key has no policy).
    """

    policy_id: str
    action_kind: str
    risk_class: str | None
    window: str
    bucket: str
    scope: str
    rule: str = ""
    bucket_start_ms: int | None = None
    name: str = field(init=False, repr=False, compare=False)
    """The row key within the tenant (the run id last: it is the one free-text part);
    computed once, since every read and write of the counter looks it up."""

    def __post_init__(self) -> None:
        name = (
            f"quota|{self.scope}|{self.action_kind}|{self.risk_class or ''}|{self.rule}|"
            f"{self.window}|{self.bucket}"
        )
        object.__setattr__(self, "name", name)

    @property
    def window_end_ms(self) -> int | None:
        """When a calendar bucket ends (the quota boundary); ``None`` for ``per_run``."""
        if self.bucket_start_ms is None:
            return None
        return self.bucket_start_ms + _WINDOW_MS[self.window]

    def correlation_id(self, tenant_id: str) -> str:
        """The ``correlation_id`` of this counter's threshold and reset events.

        A hash over (tenant, scope, kind or risk class, window, window key), as both
        ``quota.threshold_approaching`` and ``quota.counter_reset`` require.
        """
        subject = self.risk_class if self.risk_class is not None else self.action_kind
        return correlation_id("quota", tenant_id, self.scope, subject, self.window, self.bucket)

    def cleanup_expiry_ms(self) -> int | None:
        """A calendar counter's cleanup expiry (bucket start + spec TTL); ``None`` for runs."""
        if self.bucket_start_ms is None:
            return None
        return self.bucket_start_ms + CLEANUP_TTL_MS[self.window]


@dataclass(frozen=True, slots=True)
class CounterRow:
    """A stored counter: its key, ``count``, and when it expires and last moved.

    ``ttl_ms`` is the ``per_run_counter_ttl_ms`` of its last refresh (``per_run`` only);
    ``fired_pcts`` the ``threshold_pct`` values already reported in this window instance (a
    ``quota.threshold_approaching`` event fires at most once per threshold).

    ``generation`` names the row's current life: it changes when the row starts again from
    nothing (first increment after it expired) and when it is reset. A reservation remembers
    the generation of each ``per_run`` row it counted in (:func:`remembered_counter`), so its
    late release or expiry gives back only to the life it took from: a run's counter that
    expired while a long reservation was open, or that an operator reset, is not lowered by
    a call it no longer counts.
    """

    key: CounterKey
    count: int
    expires_at_ms: int
    updated_at_ms: int
    incremented_at_ms: int | None = None
    ttl_ms: int | None = None
    fired_pcts: tuple[float, ...] = ()
    generation: int = 0

    @property
    def name(self) -> str:
        """The row key (:attr:`CounterKey.name`)."""
        return self.key.name

    def live_count(self, now_ms: int) -> int:
        """The count at ``now_ms``: 0 once the row has expired."""
        return self.count if now_ms < self.expires_at_ms else 0

    def to_json(self) -> bytes:
        """Return the storage form (read back exactly by :meth:`from_json`).

        A JSON array, the moving fields first and the key's fields last: every reservation a
        quota counts reads and writes its counters, and an array is cheaper both ways than an
        object, and lets :meth:`from_json` reuse the (immutable) key of a row it has seen.
        """
        key = self.key
        return orjson.dumps(
            [
                _STORAGE_VERSION,
                self.count,
                self.expires_at_ms,
                self.updated_at_ms,
                self.incremented_at_ms,
                self.ttl_ms,
                self.fired_pcts,
                key.policy_id,
                key.action_kind,
                key.risk_class,
                key.window,
                key.bucket,
                key.scope,
                key.rule,
                key.bucket_start_ms,
                self.generation,
            ]
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> CounterRow:
        """Return the row :meth:`to_json` stored (or the object form of storage version 1).

        Raises:
            ValueError: ``raw`` is not a stored counter of a version this code reads.
        """
        data = orjson.loads(raw)
        if isinstance(data, list) and len(data) in (15, 16) and data[0] in _ARRAY_VERSIONS:
            fields = tuple(data[7:15])
            key = _KEYS.get(fields)
            if key is None:
                key = CounterKey(*fields)
                if len(_KEYS) >= _KEYS_MAX:
                    _KEYS.clear()
                _KEYS[fields] = key
            generation = data[15] if len(data) == 16 else 0
            return cls(key, data[1], data[2], data[3], data[4], data[5], tuple(data[6]), generation)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError(f"not a stored quota counter (version 1 to {_STORAGE_VERSION})")
        key = CounterKey(
            policy_id=data["policy_id"],
            action_kind=data["action_kind"],
            risk_class=data["risk_class"],
            window=data["window"],
            bucket=data["bucket"],
            scope=data["scope"],
            rule=data["rule"],
            bucket_start_ms=data["bucket_start_ms"],
        )
        return cls(
            key=key,
            count=data["count"],
            expires_at_ms=data["expires_at_ms"],
            updated_at_ms=data["updated_at_ms"],
            incremented_at_ms=data["incremented_at_ms"],
            ttl_ms=data["ttl_ms"],
            fired_pcts=tuple(data["fired_pcts"]),
        )


_KEYS_MAX: Final = 16_384
_KEYS: dict[tuple[Any, ...], CounterKey] = {}
"""Keys of the counter rows read lately, by their stored fields (keys are immutable)."""


def counter_matches_filters(
    row: CounterRow,
    now_ms: int,
    *,
    scope: str | None = None,
    action_kind: str | None = None,
    window: str | None = None,
    run_id: str | None = None,
    include_zero: bool = False,
) -> bool:
    """Return whether ``row`` is listed by ``GET /v1/admin/action-quota-counters``.

    An expired row is never listed. ``scope`` matches the scope and everything below it
    (``tenant:acme`` lists ``tenant:acme/agent:bot``, not ``tenant:acme2``); ``run_id``
    keeps the ``per_run`` counters of that run; rows at 0 only with ``include_zero``.
    """
    if now_ms >= row.expires_at_ms:
        return False
    key = row.key
    if scope is not None and key.scope != scope and not key.scope.startswith(scope + "/"):
        return False
    if action_kind is not None and key.action_kind != action_kind:
        return False
    if window is not None and key.window != window:
        return False
    if run_id is not None and (key.window != PER_RUN or key.bucket != run_id):
        return False
    return include_zero or row.count > 0


def reset_matches(
    row: CounterRow,
    *,
    scope: str,
    action_kind: str,
    window: str,
    window_key: str,
    risk_class: str | None = None,
) -> bool:
    """Return whether ``row`` is the counter an ``ActionQuotaCounterResetRequest`` names.

    Rules of one kind and window that filter on different allowlists keep separate rows
    (:func:`rule_fingerprint`); a reset request names none of that, so it resets them all.
    """
    key = row.key
    return (
        key.scope == scope
        and key.action_kind == action_kind
        and key.window == window
        and key.bucket == window_key
        and (action_kind != RISK_COUNTER_KIND or key.risk_class == risk_class)
    )


def counter_limit(policy: PolicyRow, key: CounterKey) -> int | None:
    """Return the ``max_calls`` ``policy`` sets today for the counter ``key`` (its limit).

    The smallest of the rules that count on it; ``None`` if the policy no longer has one
    (a rule removed or changed since the counter moved).
    """
    if key.action_kind == RISK_COUNTER_KIND:
        limits = [
            rule.max_calls
            for rule in policy.risk_class_quotas
            if rule.risk_class == key.risk_class and rule.window == key.window
        ]
    else:
        limits = [
            rule.max_calls
            for rule in policy.action_quotas
            if rule.action_kind == key.action_kind
            and rule.window == key.window
            and rule_fingerprint(rule) == key.rule
        ]
    return min(limits, default=None)


def reset_counter(row: CounterRow, now_ms: int) -> CounterRow:
    """Return ``row`` reset to 0 (RESET SEMANTICS): calendar TTL kept, a run's TTL refreshed.

    The thresholds already reported stay reported: ``quota.threshold_approaching`` is never
    re-emitted for a window instance whose threshold was crossed (its EMISSION RULES), and a
    reset does not start a new window instance.
    """
    expires = row.expires_at_ms
    if row.key.window == PER_RUN and row.ttl_ms is not None:
        expires = now_ms + row.ttl_ms
    return replace(
        row,
        count=0,
        expires_at_ms=expires,
        updated_at_ms=now_ms,
        generation=next_generation(row, now_ms),
    )


def next_generation(old: CounterRow | None, now_ms: int) -> int:
    """The generation of a row starting a new life at ``now_ms`` (after ``old``'s, if any).

    The clock in milliseconds, or one more than the last life's when that is not smaller (two
    lives in one millisecond, or a clock that stepped back).
    """
    return now_ms if old is None else max(now_ms, old.generation + 1)


def remembered_counter(name: str, generation: int) -> str:
    """How a reservation remembers a ``per_run`` row: its generation and its name.

    Counter names start with ``quota|`` (:attr:`CounterKey.name`), so an entry that does is
    one written before generations existed (:func:`counter_memory` reads both).
    """
    return f"{generation}@{name}"


def counter_memory(entry: str) -> tuple[str, int | None]:
    """Return (counter name, generation or ``None`` for an entry without one)."""
    if entry.startswith("quota|"):
        return entry, None
    generation, _, name = entry.partition("@")
    return name, int(generation)


def counter_state_body(row: CounterRow, max_calls: int) -> dict[str, Any]:
    """Return the wire ``ActionQuotaState`` of ``row`` under a rule of ``max_calls``.

    ``expires_at`` is when the window ends for a calendar counter, and when an idle run's
    counter expires for ``per_run``.
    """
    key = row.key
    body: dict[str, Any] = {"action_kind": key.action_kind}
    if key.risk_class is not None:
        body["risk_class"] = key.risk_class
    body.update(
        scope=key.scope,
        scope_path=key.scope,
        window=key.window,
        window_key=key.bucket,
        used=row.count,
        limit=max_calls,
        remaining=max(0, max_calls - row.count),
        policy_id=key.policy_id,
    )
    end = key.window_end_ms
    body["expires_at"] = iso(end if end is not None else row.expires_at_ms)
    if row.incremented_at_ms is not None:
        body["last_incremented_at"] = iso(row.incremented_at_ms)
    return body
