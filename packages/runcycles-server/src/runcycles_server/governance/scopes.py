"""Scope paths of a subject, and the ``scope_pattern`` language of policies.

A scope path is lower-case ``level:value`` segments joined by ``/`` in the canonical level
order (``tenant:acme/workspace:eng/agent:bot``); a request's derived scopes are the paths of
every prefix of its subject, shallowest first (the same rule as
:func:`runcycles_server.ledger.derive_scopes`, restated here because the ledger sits above
this package).

A pattern (``cycles-governance-admin`` ``/v1/admin/policies``, SCOPE PATTERNS) is segments
of the same shape where a value may be ``*`` (any value at that level), optionally:

* ending in ``/*``: strict descendants of what precedes it (``tenant:acme/*`` matches
  ``tenant:acme/agent:bot`` but not ``tenant:acme`` itself);
* starting with ``*/``, or with a level below ``tenant``: anchored at the end of the scope
  instead of at its root (``agent:*`` and ``*/agent:summarizer`` match any scope whose last
  segments are those).

A ``*`` anywhere else is refused. Patterns of a tenant's policy are confined to that
tenant: a rooted pattern must start with ``tenant:<its id>``, and an unrooted one only ever
meets that tenant's scopes (policies are selected per tenant).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from runcycles.models import STANDARD_SUBJECT_FIELDS, Subject
from runcycles_server.errors import LedgerError

__all__ = ["matches", "matching_scope", "subject_scopes", "tenant_root", "validate_scope_pattern"]

_LEVEL_RANK: Final = {level: rank for rank, level in enumerate(STANDARD_SUBJECT_FIELDS)}
_VALUE_RE: Final = re.compile(r"^[a-z0-9_.\-]+$")
_EXAMPLES: Final = (
    "e.g. 'tenant:acme' (the tenant and everything in it), 'tenant:acme/workspace:eng/*' "
    "(everything below workspace eng), 'tenant:acme/agent:*' (each agent) or "
    "'*/agent:summarizer'"
)


def subject_scopes(subject: Subject) -> list[str]:
    """Return the derived scopes of ``subject``, shallowest first (values lower-cased)."""
    scopes: list[str] = []
    path = ""
    for level in STANDARD_SUBJECT_FIELDS:
        value = getattr(subject, level)
        if value is None:
            continue
        segment = f"{level}:{value.lower()}"
        path = f"{path}/{segment}" if path else segment
        scopes.append(path)
    return scopes


def tenant_root(scope: str) -> str:
    """Return the tenant root of a scope path (``tenant:acme`` of ``tenant:acme/agent:b``)."""
    return scope.split("/", 1)[0]


def validate_scope_pattern(pattern: object, tenant_id: str) -> str:
    """Return ``pattern`` if it is a valid pattern for a policy of ``tenant_id``.

    Raises:
        LedgerError: ``INVALID_REQUEST`` naming ``scope_pattern`` and what to write instead.
    """
    if not isinstance(pattern, str) or not pattern:
        raise _bad(f"scope_pattern must be a non-empty string, {_EXAMPLES}")
    if pattern != pattern.lower():
        raise _bad(
            f"scope_pattern {pattern!r} has capital letters: scopes are lower case "
            f"({pattern.lower()!r})"
        )
    parts = pattern.split("/")
    anchored = parts[0] != "*"
    body = parts if anchored else parts[1:]
    if body and body[-1] == "*":
        body = body[:-1]
    if not body:
        raise _bad(f"scope_pattern {pattern!r} names no scope level: {_EXAMPLES}")
    previous = -1
    for segment in body:
        level, sep, value = segment.partition(":")
        if segment == "*":
            raise _bad(
                f"scope_pattern {pattern!r}: '*' may only be the first or the last segment; "
                f"use 'level:*' for any value at one level ({_EXAMPLES})"
            )
        if not sep or level not in _LEVEL_RANK:
            levels = ", ".join(STANDARD_SUBJECT_FIELDS)
            raise _bad(
                f"scope_pattern {pattern!r}: segment {segment!r} is not <level>:<value> with a "
                f"level among {levels}"
            )
        if value != "*" and not _VALUE_RE.match(value):
            raise _bad(
                f"scope_pattern {pattern!r}: value {value!r} of {level} must be letters, "
                "digits, '_', '.', '-' or '*'"
            )
        if _LEVEL_RANK[level] <= previous:
            raise _bad(
                f"scope_pattern {pattern!r}: levels must follow the order "
                f"{' > '.join(STANDARD_SUBJECT_FIELDS)}, each at most once"
            )
        previous = _LEVEL_RANK[level]
    first_level, _, first_value = body[0].partition(":")
    if first_level == "tenant":
        if not anchored:
            raise _bad(f"scope_pattern {pattern!r}: drop the leading '*/' before tenant")
        if first_value != tenant_id.lower():
            raise _bad(
                f"scope_pattern {pattern!r} is outside tenant {tenant_id!r}: a policy governs "
                f"its own tenant's scopes only; start it with 'tenant:{tenant_id.lower()}'"
            )
    return pattern


def matches(pattern: str, scope: str) -> bool:
    """Return whether the scope path ``scope`` matches ``pattern`` (see the module docs)."""
    parts = pattern.split("/")
    anchored = parts[0] != "*" and parts[0].startswith("tenant:")
    if parts[0] == "*":
        parts = parts[1:]
    descendants = parts[-1] == "*"
    if descendants:
        parts = parts[:-1]
    segments = scope.split("/")
    width = len(parts)
    if anchored:
        starts: Sequence[int] = (0,)
    else:
        starts = range(len(segments) - width + 1)
    for start in starts:
        end = start + width
        tail = len(segments) - end
        if (tail < 1) if descendants else (tail != 0):
            continue
        if all(_segment_matches(p, s) for p, s in zip(parts, segments[start:end], strict=True)):
            return True
    return False


def matching_scope(pattern: str, scopes: Sequence[str]) -> str | None:
    """Return the most specific of ``scopes`` (shallowest first) that ``pattern`` matches."""
    for scope in reversed(scopes):
        if matches(pattern, scope):
            return scope
    return None


def _segment_matches(pattern: str, segment: str) -> bool:
    if pattern == segment:
        return True
    level, _, value = pattern.partition(":")
    return value == "*" and segment.partition(":")[0] == level


def _bad(message: str) -> LedgerError:
    return LedgerError("INVALID_REQUEST", message)
