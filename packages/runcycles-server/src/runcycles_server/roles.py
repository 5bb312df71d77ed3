"""Named permission sets for tenant API keys: what an ``agent`` and a ``tenant-admin`` may do.

* ``agent`` (:data:`AGENT_PERMISSIONS`): the runtime only. Reserve, commit, release, extend and
  list reservations (``POST /v1/decide`` and ``POST /v1/events`` ride on ``reservations:create``
  and ``reservations:commit``) and read balances. It cannot create, fund or change budgets, nor
  write policies: an agent holding it cannot refill its own budget. ``cycles key create``, the
  dev server, the demo and the examples make these keys.
* ``tenant-admin`` (:data:`TENANT_ADMIN_PERMISSIONS`): the governance spec's default tenant
  permissions, which add ``budgets:read``/``budgets:write`` and ``policies:read``/
  ``policies:write``: a key for a tenant's operator, never for an agent.

``POST /v1/admin/api-keys`` without ``permissions`` grants the ``tenant-admin`` set, as the spec
requires (conformance); send ``permissions`` (or use ``cycles key create``) for an agent key.

This module imports nothing, so the CLI's key commands can use it without loading the server.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AGENT_PERMISSIONS",
    "ALL_PERMISSIONS",
    "ROLES",
    "ROLE_SUMMARIES",
    "TENANT_ADMIN_PERMISSIONS",
    "describe_permissions",
    "role_of",
]

ALL_PERMISSIONS: Final = (
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "budgets:write", "policies:read",
    "policies:write", "webhooks:read", "webhooks:write", "events:read", "admin:read",
    "admin:write", "admin:tenants:read", "admin:tenants:write", "admin:budgets:read",
    "admin:budgets:write", "admin:policies:read", "admin:policies:write", "admin:apikeys:read",
    "admin:apikeys:write", "admin:webhooks:read", "admin:webhooks:write", "admin:events:read",
    "admin:audit:read", "action_quotas:read",
)  # fmt: skip
"""Every permission the governance spec defines, with the v0.1.26 extension's
``action_quotas:read`` (``Permission`` in :mod:`runcycles_server.admin` is the same list as a
type)."""
AGENT_PERMISSIONS: Final[tuple[str, ...]] = (
    "reservations:create",
    "reservations:commit",
    "reservations:release",
    "reservations:extend",
    "reservations:list",
    "balances:read",
)
"""The runtime-only set of an agent key."""

TENANT_ADMIN_PERMISSIONS: Final[tuple[str, ...]] = (
    *AGENT_PERMISSIONS,
    "budgets:read",
    "budgets:write",
    "policies:read",
    "policies:write",
)
"""The governance spec's default tenant permissions (``POST /v1/admin/api-keys`` without
``permissions``)."""

ROLES: Final[dict[str, tuple[str, ...]]] = {
    "agent": AGENT_PERMISSIONS,
    "tenant-admin": TENANT_ADMIN_PERMISSIONS,
}
"""Role name to permission set (``cycles key create --role``)."""

ROLE_SUMMARIES: Final[dict[str, str]] = {
    "agent": "runtime only: reserve/commit/release/extend/list reservations, decide, events, "
    "read balances; cannot create, fund or change budgets or policies",
    "tenant-admin": "runtime plus budgets:read/write and policies:read/write: can create and "
    "fund its tenant's budgets (not for agents)",
}


def role_of(permissions: list[str] | tuple[str, ...]) -> str:
    """Return the role name whose permissions are exactly ``permissions``, else ``custom``."""
    granted = set(permissions)
    return next((role for role, perms in ROLES.items() if granted == set(perms)), "custom")


def describe_permissions(permissions: list[str] | tuple[str, ...]) -> str:
    """Say in one line what a key with ``permissions`` may do (its role name when it has one)."""
    granted = set(permissions)
    for role, perms in ROLES.items():
        if granted == set(perms):
            return f"role {role}: {ROLE_SUMMARIES[role]}"
    listed = ", ".join(sorted(granted))
    warning = ""
    writes = sorted(p for p in granted if p.endswith(":write"))
    if writes:
        warning = f"; it can change governance ({', '.join(writes)})"
    return f"custom permissions: {listed}{warning}"
