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

import functools
import re
from collections.abc import Callable, Sequence
from typing import Final

from runcycles.models import STANDARD_SUBJECT_FIELDS, Subject
from runcycles_server.errors import LedgerError

__all__ = [
    "matches",
    "matching_index",
    "matching_scope",
    "subject_scopes",
    "tenant_root",
    "validate_scope_pattern",
]

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
    return _compiled(pattern)(scope.split("/"))


def matching_scope(pattern: str, scopes: Sequence[str]) -> str | None:
    """Return the most specific of ``scopes`` (shallowest first) that ``pattern`` matches."""
    index = matching_index(pattern, [scope.split("/") for scope in scopes])
    return None if index is None else scopes[index]


def matching_index(pattern: str, split_scopes: Sequence[list[str]]) -> int | None:
    """Like :func:`matching_scope` on scopes already split at ``/`` (split once, match many)."""
    matcher = _compiled(pattern)
    for index in range(len(split_scopes) - 1, -1, -1):
        if matcher(split_scopes[index]):
            return index
    return None


_Matcher = Callable[[list[str]], bool]


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> _Matcher:
    """Turn a (validated) pattern into a function of a scope's segments; cached per pattern."""
    parts = pattern.split("/")
    anchored = parts[0].startswith("tenant:")
    if parts[0] == "*":
        parts = parts[1:]
    descendants = bool(parts) and parts[-1] == "*"
    if descendants:
        parts = parts[:-1]
    if not parts:
        return lambda segments: False
    width = len(parts)
    wanted = [
        (level + ":", None if value == "*" else f"{level}:{value}")
        for level, _, value in (part.partition(":") for part in parts)
    ]

    def fits(segments: list[str], start: int) -> bool:
        for offset, (prefix, exact) in enumerate(wanted):
            segment = segments[start + offset]
            if segment != exact if exact is not None else not segment.startswith(prefix):
                return False
        return True

    def matcher(segments: list[str]) -> bool:
        extra = len(segments) - width
        if extra < 0 or (extra == 0 and descendants):
            return False
        if anchored:
            return (extra > 0) == descendants and fits(segments, 0)
        if not descendants:
            return fits(segments, extra)
        return any(fits(segments, start) for start in range(extra))

    return matcher


def _bad(message: str) -> LedgerError:
    return LedgerError("INVALID_REQUEST", message)
