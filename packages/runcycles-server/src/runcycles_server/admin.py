"""The admin plane: tenants, API keys, budgets and funding (governance spec shapes).

Routes (``X-Admin-API-Key`` unless noted; "or tenant" = a tenant key works for its own tenant):

* ``POST/GET /v1/admin/tenants``, ``GET/PATCH /v1/admin/tenants/{tenant_id}`` (``status: CLOSED``
  is irreversible and cascades in one transaction: ACTIVE reservations released, budgets
  CLOSED, keys REVOKED).
* ``POST/GET /v1/admin/api-keys``, ``DELETE /v1/admin/api-keys/{key_id}`` (``PATCH`` and
  ``POST /v1/auth/validate``: :mod:`runcycles_server.admin_keys`; the two bulk actions:
  :mod:`runcycles_server.admin_bulk`). The secret
  (``cyc_live_`` + 32 random characters) is returned once; only its sha256 is stored.
* ``POST /v1/admin/budgets`` (or tenant), ``GET /v1/admin/budgets`` (or tenant),
  ``GET /v1/admin/budgets/lookup`` (or tenant), ``PATCH /v1/admin/budgets?scope=&unit=``
  (``overdraft_limit``, ``commit_overage_policy``, ``metadata`` and the extension field ``caps``,
  which makes reservations at that scope ``ALLOW_WITH_CAPS``), ``POST
  /v1/admin/budgets/freeze|unfreeze?scope=&unit=``.
* ``POST /v1/admin/budgets/fund?scope=&unit=[&tenant_id=]`` (or tenant): CREDIT, DEBIT, RESET,
  RESET_SPENT, REPAY_DEBT, idempotent by ``idempotency_key``.
* ``GET /v1/admin/audit/logs[?tenant_id=]``: audit entries of admin-on-behalf-of releases,
  budget freezes, unfreezes and funding (``freezeBudget``, ``unfreezeBudget``,
  ``fundBudget``, with the request's ``reason``), observe-mode decisions, policy changes and
  quota counter resets (for
  stores that implement :class:`~runcycles_server.stores.base.AuditReader`; the Redis store
  keeps them per tenant, so it needs ``tenant_id``).

Every query parameter the governance spec declares for these routes is validated as it says
(:data:`QUERY_PARAMS`); path parameters and body ids and names refuse control characters (see
:mod:`runcycles_server.query`).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles.models import Amount, CommitOveragePolicy, Unit
from runcycles_server import ledger
from runcycles_server.ledger import ApiKeyRow, AuditRow, BudgetRow, LedgerError, TenantRow
from runcycles_server.query import Param, check_path, check_query
from runcycles_server.roles import TENANT_ADMIN_PERMISSIONS
from runcycles_server.stores.base import AuditReader, Store, new_id
from runcycles_server.web import (
    Authenticator,
    Principal,
    json_response,
    parse_body,
    query_int,
    request_ids,
)

Permission = Literal[
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "budgets:write", "policies:read",
    "policies:write", "webhooks:read", "webhooks:write", "events:read", "admin:read",
    "admin:write", "admin:tenants:read", "admin:tenants:write", "admin:budgets:read",
    "admin:budgets:write", "admin:policies:read", "admin:policies:write", "admin:apikeys:read",
    "admin:apikeys:write", "admin:webhooks:read", "admin:webhooks:write", "admin:events:read",
    "admin:audit:read", "action_quotas:read",
]  # fmt: skip

DEFAULT_PERMISSIONS: Final = list(TENANT_ADMIN_PERMISSIONS)
"""What ``POST /v1/admin/api-keys`` grants when ``permissions`` is omitted: the spec's default,
which includes ``budgets:write`` and ``policies:write`` (see :mod:`runcycles_server.roles`)."""
DEFAULT_KEY_LIFETIME_MS: Final = 90 * ledger.DAY_MS
TENANT_STATUSES: Final = ("ACTIVE", "SUSPENDED", "CLOSED")
KEY_STATUSES: Final = ("ACTIVE", "REVOKED", "EXPIRED")
BUDGET_STATUSES: Final = ("ACTIVE", "FROZEN", "CLOSED")
BUDGET_SORT_KEYS: Final = (
    "tenant_id", "scope", "unit", "status", "commit_overage_policy", "utilization", "debt",
)  # fmt: skip
TtlMs = Annotated[StrictInt, Field(ge=1_000, le=86_400_000)]
TenantMetadata = Annotated[dict[str, str], Field(max_length=32)]
"""A tenant's metadata: at most 32 string values, as the spec's ``Tenant`` returns it (its
update request schema allows any object, which the response schema could not carry)."""


# --------------------------------------------------------------------------------------------
# Query parameters, as the governance spec declares them (``limit`` is 1 to 100 everywhere: the
# spec gives that range on tenants and leaves it open on the other lists; this server caps all)

_SORT_DIR: Final = Param("enum", ("asc", "desc"))
_SEARCH: Final = Param(max_length=128)
_LIMIT: Final = Param("integer", minimum=1, maximum=100)
_UNIT: Final = Param("enum", tuple(Unit.__members__))
_SCOPE_UNIT: Final = {"scope": Param(), "unit": _UNIT}
_LIST_OF_25: Final = Param("array", max_items=25)
_STATUS_CODE: Final = Param("integer", minimum=100, maximum=599)

QUERY_PARAMS: Final[dict[tuple[str, str], dict[str, Param]]] = {
    ("GET", "/v1/admin/tenants"): {
        "status": Param("enum", TENANT_STATUSES),
        "parent_tenant_id": Param(),
        "observe_mode": Param(),
        "search": _SEARCH,
        "sort_by": Param("enum", ("tenant_id", "name", "status", "created_at")),
        "sort_dir": _SORT_DIR,
        "cursor": Param(),
        "limit": _LIMIT,
    },
    ("GET", "/v1/admin/api-keys"): {
        "tenant_id": Param(),
        "status": Param("enum", KEY_STATUSES),
        "search": _SEARCH,
        "sort_by": Param(
            "enum", ("key_id", "name", "tenant_id", "status", "created_at", "expires_at")
        ),
        "sort_dir": _SORT_DIR,
        "cursor": Param(),
        "limit": _LIMIT,
    },
    ("DELETE", "/v1/admin/api-keys/{key_id}"): {"reason": Param(max_length=512)},
    ("GET", "/v1/admin/budgets"): {
        "tenant_id": Param(),
        "scope_prefix": Param(),
        "unit": _UNIT,
        "status": Param("enum", BUDGET_STATUSES),
        "over_limit": Param("boolean"),
        "has_debt": Param("boolean"),
        "utilization_min": Param("number", minimum=0, maximum=1),
        "utilization_max": Param("number", minimum=0, maximum=1),
        "search": _SEARCH,
        "sort_by": Param("enum", BUDGET_SORT_KEYS),
        "sort_dir": _SORT_DIR,
        "cursor": Param(),
        "limit": _LIMIT,
    },
    ("PATCH", "/v1/admin/budgets"): _SCOPE_UNIT,
    ("GET", "/v1/admin/budgets/lookup"): _SCOPE_UNIT,
    ("POST", "/v1/admin/budgets/freeze"): _SCOPE_UNIT,
    ("POST", "/v1/admin/budgets/unfreeze"): _SCOPE_UNIT,
    ("POST", "/v1/admin/budgets/fund"): {"tenant_id": Param(), **_SCOPE_UNIT},
    ("GET", "/v1/admin/audit/logs"): {
        "tenant_id": Param(),
        "key_id": Param(),
        "operation": _LIST_OF_25,
        "status": Param("integer"),
        "resource_type": _LIST_OF_25,
        "resource_id": Param(),
        "error_code": _LIST_OF_25,
        "error_code_exclude": _LIST_OF_25,
        "status_min": _STATUS_CODE,
        "status_max": _STATUS_CODE,
        "from": Param("date-time"),
        "to": Param("date-time"),
        "search": _SEARCH,
        "trace_id": Param(pattern="^[0-9a-f]{32}$"),
        "request_id": Param(),
        "sort_by": Param(
            "enum", ("timestamp", "operation", "resource_type", "tenant_id", "key_id", "status")
        ),
        "sort_dir": _SORT_DIR,
        "cursor": Param(),
        "limit": _LIMIT,
    },
}
"""Every query parameter of every admin route, by ``(method, path template)``. Parameters this
server accepts but does not apply (``search``, ``sort_by``, ``sort_dir``, most audit filters)
are still validated, so a typo is an error rather than a silently ignored filter value."""


def check_request(request: Request, method: str, path: str) -> None:
    """Validate ``request``'s path parameters and the query parameters of ``(method, path)``.

    Raises:
        LedgerError: INVALID_REQUEST (400) naming the first bad parameter.
    """
    check_path(request)
    check_query(request, QUERY_PARAMS.get((method, path), {}))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreateRequest(_Strict):
    """Body of ``POST /v1/admin/tenants``."""

    tenant_id: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", min_length=3, max_length=64)]
    name: Annotated[str, Field(max_length=256)]
    parent_tenant_id: str | None = None
    metadata: TenantMetadata | None = None
    default_commit_overage_policy: CommitOveragePolicy | None = None
    default_reservation_ttl_ms: TtlMs | None = None
    max_reservation_ttl_ms: TtlMs | None = None
    max_reservation_extensions: Annotated[StrictInt, Field(ge=0)] | None = None
    reservation_expiry_policy: Literal["AUTO_RELEASE", "MANUAL_CLEANUP", "GRACE_ONLY"] | None = None


class TenantUpdateRequest(_Strict):
    """Body of ``PATCH /v1/admin/tenants/{tenant_id}``."""

    name: Annotated[str, Field(max_length=256)] | None = None
    status: Literal["ACTIVE", "SUSPENDED", "CLOSED"] | None = None
    metadata: TenantMetadata | None = None
    default_commit_overage_policy: CommitOveragePolicy | None = None
    default_reservation_ttl_ms: TtlMs | None = None
    max_reservation_ttl_ms: TtlMs | None = None
    max_reservation_extensions: Annotated[StrictInt, Field(ge=0)] | None = None
    observe_mode: Literal["DISABLED", "OBSERVE", "ENFORCE"] | None = None
    """Default observe mode of the tenant's reservations (governance extension v0.1.26)."""


class ApiKeyCreateRequest(_Strict):
    """Body of ``POST /v1/admin/api-keys``."""

    tenant_id: str
    name: Annotated[str, Field(max_length=256)]
    description: Annotated[str, Field(max_length=1024)] | None = None
    permissions: list[Permission] | None = None
    scope_filter: list[str] | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None


class BudgetCreateRequest(_Strict):
    """Body of ``POST /v1/admin/budgets`` (``caps`` is this server's extension)."""

    tenant_id: str | None = None
    scope: Annotated[str, Field(min_length=1, max_length=1024)]
    unit: Unit
    allocated: Amount
    overdraft_limit: Amount | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    rollover_policy: Literal["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"] | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    metadata: dict[str, Any] | None = None
    caps: dict[str, Any] | None = None


class BudgetUpdateRequest(_Strict):
    """Body of ``PATCH /v1/admin/budgets`` (``caps: null`` clears the caps)."""

    overdraft_limit: Amount | None = None
    commit_overage_policy: CommitOveragePolicy | None = None
    metadata: dict[str, Any] | None = None
    caps: dict[str, Any] | None = None


class BudgetStatusRequest(_Strict):
    """Optional body of freeze/unfreeze."""

    reason: Annotated[str, Field(max_length=512)] | None = None
    metadata: dict[str, Any] | None = None


class BudgetFundingRequest(_Strict):
    """Body of ``POST /v1/admin/budgets/fund``."""

    operation: Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
    amount: Amount
    spent: Amount | None = None
    reason: Annotated[str, Field(max_length=512)] | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    metadata: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Views


def iso(ms: int | None) -> str | None:
    """Format epoch milliseconds as an RFC 3339 UTC timestamp."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def tenant_body(row: TenantRow) -> dict[str, Any]:
    """Return the wire ``Tenant``."""
    return _drop_none(
        {
            "tenant_id": row.tenant_id,
            "name": row.name,
            "status": row.status,
            "parent_tenant_id": row.parent_tenant_id,
            "default_commit_overage_policy": row.default_commit_overage_policy,
            "default_reservation_ttl_ms": row.default_reservation_ttl_ms,
            "max_reservation_ttl_ms": row.max_reservation_ttl_ms,
            "max_reservation_extensions": row.max_reservation_extensions,
            "reservation_expiry_policy": row.reservation_expiry_policy,
            "metadata": row.metadata,
            "created_at": iso(row.created_at_ms),
            "updated_at": iso(row.updated_at_ms),
            "suspended_at": iso(row.suspended_at_ms),
            "closed_at": iso(row.closed_at_ms),
            "observe_mode": row.observe_mode,
        }
    )


def api_key_body(row: ApiKeyRow) -> dict[str, Any]:
    """Return the wire ``ApiKey`` (never the secret)."""
    return _drop_none(
        {
            "key_id": row.key_id,
            "tenant_id": row.tenant_id,
            "key_prefix": row.key_prefix,
            "name": row.name,
            "description": row.description,
            "permissions": row.permissions,
            "scope_filter": row.scope_filter,
            "status": row.status,
            "created_at": iso(row.created_at_ms),
            "expires_at": iso(row.expires_at_ms),
            "revoked_at": iso(row.revoked_at_ms),
            "revoked_reason": row.revoked_reason,
            "metadata": row.metadata,
        }
    )


def budget_body(row: BudgetRow) -> dict[str, Any]:
    """Return the wire ``BudgetLedger`` (plus ``caps`` when configured)."""
    unit = row.unit
    return _drop_none(
        {
            "ledger_id": row.ledger_id,
            "tenant_id": row.tenant_id,
            "scope": row.scope,
            "scope_path": row.scope,
            "unit": unit,
            "allocated": {"unit": unit, "amount": row.allocated},
            "remaining": {"unit": unit, "amount": row.remaining},
            "reserved": {"unit": unit, "amount": row.reserved},
            "spent": {"unit": unit, "amount": row.spent},
            "debt": {"unit": unit, "amount": row.debt},
            "overdraft_limit": {"unit": unit, "amount": row.overdraft_limit},
            "is_over_limit": row.is_over_limit,
            "commit_overage_policy": row.commit_overage_policy,
            "status": row.status,
            "rollover_policy": row.rollover_policy,
            "period_start": row.period_start,
            "period_end": row.period_end,
            "created_at": iso(row.created_at_ms),
            "updated_at": iso(row.updated_at_ms),
            "caps": row.caps,
        }
    )


_RESOURCE_TYPES: Final = {
    "bulkActionTenants": "tenant",
    "bulkActionBudgets": "budget",
    "updateApiKey": "api_key",
    "testWebhookSubscription": "webhook",
    "replayEvents": "webhook",
    "pauseWebhookSubscription": "webhook",
    "resumeWebhookSubscription": "webhook",
}


def _resource_type(operation: str) -> str:
    """The audit log's ``resource_type`` of an entry, from its operation."""
    if operation.startswith("policy."):
        return "policy"
    if operation.startswith("quota."):
        return "quota_counter"
    if operation in _RESOURCE_TYPES:
        return _RESOURCE_TYPES[operation]
    if operation.endswith("Budget"):
        return "budget"
    return "reservation"


def _audit_entry(
    request: Request, principal: Principal, operation: str, reason: str | None
) -> AuditRow:
    """The audit entry of a budget change made by this request (the store completes it)."""
    request_id, trace_id = request_ids(request)
    details: dict[str, Any] = {}
    if principal.key is not None:
        details["key_id"] = principal.key.key_id
    if reason:
        details["reason"] = reason
    return AuditRow(
        audit_id=new_id("aud"),
        tenant_id="",
        actor_type="api_key" if principal.key is not None else "admin_on_behalf_of",
        operation=operation,
        resource_id="",
        created_at_ms=0,
        request_id=request_id,
        trace_id=trace_id,
        details=details,
    )


def _page_body(name: str, items: list[dict[str, Any]], cursor: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {name: items, "has_more": cursor is not None}
    if cursor is not None:
        body["next_cursor"] = cursor
    return body


def _check_unit(amount: Amount | None, unit: str, field: str) -> None:
    if amount is not None and amount.unit.value != unit:
        raise LedgerError(
            "UNIT_MISMATCH",
            f"{field}.unit is {amount.unit.value} but the budget's unit is {unit}",
        )


def _scope_unit(request: Request) -> tuple[str, str]:
    scope = request.query_params.get("scope")
    unit = request.query_params.get("unit")
    if not scope or not unit:
        raise LedgerError("INVALID_REQUEST", "query parameters scope and unit are required")
    if unit not in Unit.__members__:
        raise LedgerError("INVALID_REQUEST", f"unit must be one of {', '.join(Unit.__members__)}")
    return scope, unit


class Admin:
    """The admin route handlers, bound to one store."""

    def __init__(self, store: Store, auth: Authenticator, max_body_bytes: int) -> None:
        self.store = store
        self.auth = auth
        self.max_body = max_body_bytes

    def routes(self) -> list[BaseRoute]:
        """Return the admin routes."""
        return [
            Route("/v1/admin/tenants", self.create_tenant, methods=["POST"]),
            Route("/v1/admin/tenants", self.list_tenants, methods=["GET"]),
            Route("/v1/admin/tenants/{tenant_id}", self.get_tenant, methods=["GET"]),
            Route("/v1/admin/tenants/{tenant_id}", self.update_tenant, methods=["PATCH"]),
            Route("/v1/admin/api-keys", self.create_api_key, methods=["POST"]),
            Route("/v1/admin/api-keys", self.list_api_keys, methods=["GET"]),
            Route("/v1/admin/api-keys/{key_id}", self.revoke_api_key, methods=["DELETE"]),
            Route("/v1/admin/budgets", self.create_budget, methods=["POST"]),
            Route("/v1/admin/budgets", self.list_budgets, methods=["GET"]),
            Route("/v1/admin/budgets", self.update_budget, methods=["PATCH"]),
            Route("/v1/admin/budgets/lookup", self.lookup_budget, methods=["GET"]),
            Route("/v1/admin/budgets/fund", self.fund_budget, methods=["POST"]),
            Route("/v1/admin/budgets/freeze", self.freeze_budget, methods=["POST"]),
            Route("/v1/admin/budgets/unfreeze", self.unfreeze_budget, methods=["POST"]),
            Route("/v1/admin/audit/logs", self.list_audit_logs, methods=["GET"]),
        ]

    # -- tenants -------------------------------------------------------------------------------

    async def create_tenant(self, request: Request) -> Response:
        """``POST /v1/admin/tenants``: 201 created, 200 if the same tenant already exists."""
        self.auth.admin(request)
        body = await parse_body(request, TenantCreateRequest, self.max_body)
        fields = body.model_dump(mode="json", exclude_none=True)
        row = TenantRow(**fields)
        tenant, created = await self.store.create_tenant(row)
        return json_response(tenant_body(tenant), 201 if created else 200)

    async def list_tenants(self, request: Request) -> Response:
        """``GET /v1/admin/tenants``."""
        self.auth.admin(request)
        check_request(request, "GET", "/v1/admin/tenants")
        status = request.query_params.get("status") or None
        page = await self.store.list_tenants(
            status, query_int(request, "limit", 50, 1, 100), request.query_params.get("cursor")
        )
        return json_response(
            _page_body("tenants", [tenant_body(t) for t in page.items], page.next_cursor)
        )

    async def get_tenant(self, request: Request) -> Response:
        """``GET /v1/admin/tenants/{tenant_id}``."""
        self.auth.admin(request)
        check_request(request, "GET", "/v1/admin/tenants/{tenant_id}")
        tenant_id = str(request.path_params["tenant_id"])
        row = await self.store.get_tenant(tenant_id)
        if row is None:
            raise LedgerError("NOT_FOUND", f"tenant {tenant_id} does not exist")
        return json_response(tenant_body(row))

    async def update_tenant(self, request: Request) -> Response:
        """``PATCH /v1/admin/tenants/{tenant_id}``."""
        self.auth.admin(request)
        check_request(request, "PATCH", "/v1/admin/tenants/{tenant_id}")
        body = await parse_body(request, TenantUpdateRequest, self.max_body)
        changes = body.model_dump(mode="json", exclude_unset=True)
        nullable = {"metadata"}
        changes = {k: v for k, v in changes.items() if v is not None or k in nullable}
        row = await self.store.update_tenant(str(request.path_params["tenant_id"]), changes)
        return json_response(tenant_body(row))

    # -- API keys ------------------------------------------------------------------------------

    async def create_api_key(self, request: Request) -> Response:
        """``POST /v1/admin/api-keys``: 201 with the secret (shown only this once)."""
        self.auth.admin(request)
        body = await parse_body(request, ApiKeyCreateRequest, self.max_body)
        now = self.store.clock()
        expires = _ms(body.expires_at) if body.expires_at else now + DEFAULT_KEY_LIFETIME_MS
        if expires <= now:
            raise LedgerError("INVALID_REQUEST", "expires_at must be in the future")
        secret = "cyc_live_" + secrets.token_urlsafe(24)
        row = ApiKeyRow(
            key_id=new_id("key"),
            key_hash=ledger.hash_api_key(secret),
            key_prefix=secret[:14],
            tenant_id=body.tenant_id,
            name=body.name,
            description=body.description,
            permissions=list(body.permissions) if body.permissions else list(DEFAULT_PERMISSIONS),
            scope_filter=body.scope_filter,
            metadata=body.metadata,
            expires_at_ms=expires,
        )
        row = await self.store.create_api_key(row)
        return json_response(
            {
                "key_id": row.key_id,
                "key_secret": secret,
                "key_prefix": row.key_prefix,
                "tenant_id": row.tenant_id,
                "permissions": row.permissions,
                "created_at": iso(row.created_at_ms),
                "expires_at": iso(row.expires_at_ms),
            },
            201,
        )

    async def list_api_keys(self, request: Request) -> Response:
        """``GET /v1/admin/api-keys``."""
        self.auth.admin(request)
        check_request(request, "GET", "/v1/admin/api-keys")
        params = request.query_params
        status = params.get("status") or None
        page = await self.store.list_api_keys(
            params.get("tenant_id") or None,
            status,
            query_int(request, "limit", 50, 1, 100),
            params.get("cursor") or None,
        )
        return json_response(
            _page_body("keys", [api_key_body(k) for k in page.items], page.next_cursor)
        )

    async def revoke_api_key(self, request: Request) -> Response:
        """``DELETE /v1/admin/api-keys/{key_id}``: the key fails authentication from now on."""
        self.auth.admin(request)
        check_request(request, "DELETE", "/v1/admin/api-keys/{key_id}")
        row = await self.store.revoke_api_key(
            str(request.path_params["key_id"]), request.query_params.get("reason") or None
        )
        return json_response(api_key_body(row))

    # -- budgets -------------------------------------------------------------------------------

    async def _principal(self, request: Request, permission: str) -> Principal:
        return await self.auth.admin_or_tenant(request, permission)

    async def create_budget(self, request: Request) -> Response:
        """``POST /v1/admin/budgets`` (admin with ``tenant_id`` in the body, or a tenant key)."""
        principal = await self._principal(request, "budgets:write")
        body = await parse_body(request, BudgetCreateRequest, self.max_body)
        if principal.is_admin:
            if not body.tenant_id:
                raise LedgerError(
                    "INVALID_REQUEST", "tenant_id is required when using the admin key"
                )
            tenant_id = body.tenant_id
        else:
            if body.tenant_id is not None:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant_id must not be sent with a tenant API key (it comes from the key)",
                )
            assert principal.tenant_id is not None
            tenant_id = principal.tenant_id
        unit = body.unit.value
        _check_unit(body.allocated, unit, "allocated")
        _check_unit(body.overdraft_limit, unit, "overdraft_limit")
        ledger.validate_budget_scope(body.scope, tenant_id)
        row = BudgetRow(
            scope=body.scope,
            unit=unit,
            tenant_id=tenant_id,
            allocated=body.allocated.amount,
            remaining=body.allocated.amount,
            overdraft_limit=body.overdraft_limit.amount if body.overdraft_limit else 0,
            commit_overage_policy=(
                body.commit_overage_policy.value if body.commit_overage_policy else None
            ),
            caps=ledger.validate_caps(body.caps),
            ledger_id=new_id("ldg"),
            rollover_policy=body.rollover_policy or "NONE",
            period_start=iso(_ms(body.period_start)) if body.period_start else None,
            period_end=iso(_ms(body.period_end)) if body.period_end else None,
            metadata=body.metadata,
        )
        row = await self.store.create_budget(row)
        return json_response(budget_body(row), 201)

    async def list_budgets(self, request: Request) -> Response:
        """``GET /v1/admin/budgets`` → ``{ledgers}`` (a tenant key sees only its own)."""
        principal = await self._principal(request, "budgets:read")
        check_request(request, "GET", "/v1/admin/budgets")
        params = request.query_params
        tenant_id = (params.get("tenant_id") or None) if principal.is_admin else principal.tenant_id
        unit = params.get("unit") or None
        status = params.get("status") or None
        page = await self.store.list_budgets(
            tenant_id,
            scope_prefix=params.get("scope_prefix") or None,
            unit=unit,
            status=status,
            limit=query_int(request, "limit", 50, 1, 100),
            cursor=params.get("cursor") or None,
        )
        return json_response(
            _page_body("ledgers", [budget_body(b) for b in page.items], page.next_cursor)
        )

    async def lookup_budget(self, request: Request) -> Response:
        """``GET /v1/admin/budgets/lookup?scope=&unit=``."""
        principal = await self._principal(request, "budgets:read")
        check_request(request, "GET", "/v1/admin/budgets/lookup")
        scope, unit = _scope_unit(request)
        row = await self.store.get_budget(scope, unit)
        if row is None or (not principal.is_admin and row.tenant_id != principal.tenant_id):
            raise LedgerError("NOT_FOUND", f"no budget for scope {scope} in {unit}")
        return json_response(budget_body(row))

    async def update_budget(self, request: Request) -> Response:
        """``PATCH /v1/admin/budgets?scope=&unit=``."""
        self.auth.admin(request)
        check_request(request, "PATCH", "/v1/admin/budgets")
        scope, unit = _scope_unit(request)
        body = await parse_body(request, BudgetUpdateRequest, self.max_body)
        _check_unit(body.overdraft_limit, unit, "overdraft_limit")
        changes: dict[str, Any] = {}
        sent = body.model_fields_set
        if body.overdraft_limit is not None:
            changes["overdraft_limit"] = body.overdraft_limit.amount
        if body.commit_overage_policy is not None:
            changes["commit_overage_policy"] = body.commit_overage_policy.value
        if "metadata" in sent:
            changes["metadata"] = body.metadata
        if "caps" in sent:
            changes["caps"] = ledger.validate_caps(body.caps)
        row = await self.store.update_budget(scope, unit, None, changes)
        return json_response(budget_body(row))

    async def _set_status(self, request: Request, frm: str, to: str) -> Response:
        principal = self.auth.admin(request)
        path = "/v1/admin/budgets/freeze" if to == "FROZEN" else "/v1/admin/budgets/unfreeze"
        check_request(request, "POST", path)
        scope, unit = _scope_unit(request)
        body = BudgetStatusRequest()
        if (await request.body()).strip():
            body = await parse_body(request, BudgetStatusRequest, self.max_body)
        row = await self.store.get_budget(scope, unit)
        if row is None:
            raise LedgerError("NOT_FOUND", f"no budget for scope {scope} in {unit}")
        if row.status != frm:
            raise LedgerError(
                "BUDGET_CLOSED" if row.status == "CLOSED" else "INVALID_REQUEST",
                f"budget {scope} ({unit}) is {row.status}; only a {frm} budget can become {to}",
                status=409,
            )
        operation = "freezeBudget" if to == "FROZEN" else "unfreezeBudget"
        audit = _audit_entry(request, principal, operation, body.reason)
        row = await self.store.update_budget(scope, unit, None, {"status": to}, audit=audit)
        return json_response(budget_body(row))

    async def freeze_budget(self, request: Request) -> Response:
        """``POST /v1/admin/budgets/freeze``: ACTIVE → FROZEN."""
        return await self._set_status(request, "ACTIVE", "FROZEN")

    async def unfreeze_budget(self, request: Request) -> Response:
        """``POST /v1/admin/budgets/unfreeze``: FROZEN → ACTIVE."""
        return await self._set_status(request, "FROZEN", "ACTIVE")

    async def list_audit_logs(self, request: Request) -> Response:
        """``GET /v1/admin/audit/logs``: admin-on-behalf-of release entries, newest first."""
        self.auth.admin(request)
        check_request(request, "GET", "/v1/admin/audit/logs")
        if not isinstance(self.store, AuditReader):
            raise LedgerError("NOT_FOUND", "this store does not keep a readable audit log")
        params = request.query_params
        page = await self.store.list_audit_logs(
            params.get("tenant_id") or None,
            query_int(request, "limit", 50, 1, 100),
            params.get("cursor") or None,
        )
        logs = [
            _drop_none(
                {
                    "log_id": row.audit_id,
                    "timestamp": iso(row.created_at_ms),
                    "tenant_id": row.tenant_id,
                    "operation": row.operation,
                    "resource_type": _resource_type(row.operation),
                    "resource_id": row.resource_id,
                    "request_id": row.request_id,
                    "trace_id": row.trace_id,
                    "status": 200,
                    "metadata": {"actor_type": row.actor_type, **(row.details or {})},
                }
            )
            for row in page.items
        ]
        body: dict[str, Any] = {"logs": logs, "has_more": page.next_cursor is not None}
        if page.next_cursor is not None:
            body["next_cursor"] = page.next_cursor
        return json_response(body)

    async def fund_budget(self, request: Request) -> Response:
        """``POST /v1/admin/budgets/fund?scope=&unit=[&tenant_id=]``."""
        principal = await self._principal(request, "budgets:write")
        check_request(request, "POST", "/v1/admin/budgets/fund")
        scope, unit = _scope_unit(request)
        if principal.is_admin:
            tenant_id = request.query_params.get("tenant_id") or None
            if tenant_id is None:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant_id query parameter is required when using the admin key",
                )
        else:
            tenant_id = principal.tenant_id
        body = await parse_body(request, BudgetFundingRequest, self.max_body)
        _check_unit(body.amount, unit, "amount")
        _check_unit(body.spent, unit, "spent")
        payload = body.model_dump(mode="json", exclude_none=True)
        payload["scope"], payload["unit"] = scope, unit
        outcome = await self.store.fund_budget(
            tenant_id,
            scope,
            unit,
            operation=body.operation,
            amount=body.amount.amount,
            spent=body.spent.amount if body.spent is not None else None,
            idempotency_key=body.idempotency_key,
            request_hash=ledger.payload_hash("fund", payload),
            timestamp=iso(self.store.clock()) or "",
            audit=_audit_entry(request, principal, "fundBudget", body.reason),
        )
        return json_response(outcome.body, outcome.status_code)
