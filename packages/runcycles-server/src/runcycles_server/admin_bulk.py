"""``POST /v1/admin/tenants/bulk-action`` and ``POST /v1/admin/budgets/bulk-action``.

Admin key only (a tenant key is 403). The safety gates, the replay by ``idempotency_key`` and the
``?dry_run=true`` preview are :mod:`runcycles_server.bulk`'s, shared with the webhook route.

Each matched row changes in a transaction of its own, with its event (typed by the action, its
``correlation_id`` ``tenant_bulk_action:<action>:<request_id>`` or
``budget_bulk_action:<action>:<request_id>``), exactly as the single-row PATCH / fund would; a
row that cannot change lands in ``failed[]`` and the others still run. After the rows, one audit
entry (``bulkActionTenants`` under the ``__admin__`` sentinel tenant, ``bulkActionBudgets`` under
the filter's tenant) records the invocation with every row's outcome, as the spec asks.

Filters mirror the list routes' query parameters and are applied as the spec defines them
(``search``: case-insensitive substring of tenant id and name, or of tenant id and scope;
``utilization`` is ``spent / allocated``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles.models import Amount, Unit
from runcycles_server import ledger
from runcycles_server.bulk import (
    ADMIN_TENANT,
    BulkReplay,
    Outcomes,
    check_matches,
    dry_run,
    envelope,
    failed,
    new_outcomes,
    record_audit,
    skipped,
)
from runcycles_server.errors import LedgerError
from runcycles_server.events import current_context
from runcycles_server.governance.timestamps import iso
from runcycles_server.ledger import AuditRow, BudgetRow, TenantRow
from runcycles_server.stores.base import Store, new_id
from runcycles_server.web import Authenticator, json_response, parse_body, request_ids

logger = logging.getLogger(__name__)

_PAGE: Final = 100
_TARGET: Final = {"SUSPEND": "SUSPENDED", "REACTIVATE": "ACTIVE", "CLOSE": "CLOSED"}
_FROM: Final = {"SUSPEND": ("ACTIVE",), "REACTIVATE": ("SUSPENDED",),
                "CLOSE": ("ACTIVE", "SUSPENDED")}  # fmt: skip
"""The statuses each action may start from, checked again in the row's own transaction."""
_ROW_CODES: Final = {"BUDGET_EXCEEDED": "BUDGET_EXCEEDED", "NOT_FOUND": "NOT_FOUND",
                     "FORBIDDEN": "PERMISSION_DENIED"}  # fmt: skip
"""Per-row codes kept as they are; any other refusal of a row is ``INVALID_TRANSITION``."""
Search = Annotated[StrictStr, Field(max_length=128)]
Ratio = Annotated[StrictInt | StrictFloat, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantBulkFilter(_Strict):
    """``TenantBulkFilter``: at least one property (an empty filter would match everyone)."""

    status: Literal["ACTIVE", "SUSPENDED", "CLOSED"] | None = None
    parent_tenant_id: StrictStr | None = None
    observe_mode: StrictStr | None = None
    search: Search | None = None


class TenantBulkActionRequest(_Strict):
    """``TenantBulkActionRequest``."""

    filter: TenantBulkFilter
    action: Literal["SUSPEND", "REACTIVATE", "CLOSE"]
    expected_count: Annotated[StrictInt, Field(ge=0)] | None = None
    idempotency_key: Annotated[StrictStr, Field(min_length=1, max_length=128)]


class BudgetBulkFilter(_Strict):
    """``BudgetBulkFilter``: ``tenant_id`` is required (one tenant per invocation)."""

    tenant_id: StrictStr
    scope_prefix: StrictStr | None = None
    unit: Unit | None = None
    status: Literal["ACTIVE", "FROZEN", "CLOSED"] | None = None
    over_limit: StrictBool | None = None
    has_debt: StrictBool | None = None
    utilization_min: Ratio | None = None
    utilization_max: Ratio | None = None
    search: Search | None = None


class BudgetBulkActionRequest(_Strict):
    """``BudgetBulkActionRequest`` (``spent`` counts only for RESET_SPENT)."""

    filter: BudgetBulkFilter
    action: Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
    amount: Amount | None = None
    spent: Amount | None = None
    reason: Annotated[str, Field(max_length=512)] | None = None
    expected_count: Annotated[StrictInt, Field(ge=0)] | None = None
    idempotency_key: Annotated[StrictStr, Field(min_length=1, max_length=128)]


def tenant_matches(row: TenantRow, f: TenantBulkFilter) -> bool:
    """Whether ``row`` passes the filter (``status`` is already applied by the listing)."""
    needle = f.search.lower() if f.search else None
    return (
        (f.parent_tenant_id is None or row.parent_tenant_id == f.parent_tenant_id)
        and (f.observe_mode is None or row.observe_mode == f.observe_mode)
        and (needle is None or needle in row.tenant_id.lower() or needle in row.name.lower())
    )


def budget_matches(row: BudgetRow, f: BudgetBulkFilter) -> bool:
    """Whether ``row`` passes the filters the listing does not apply itself."""
    needle = f.search.lower() if f.search else None
    used = row.spent / row.allocated if row.allocated > 0 else None
    return (
        (f.over_limit is None or row.is_over_limit == f.over_limit)
        and (f.has_debt is None or (row.debt > 0) == f.has_debt)
        and (f.utilization_min is None or (used is not None and used >= f.utilization_min))
        and (f.utilization_max is None or (used is not None and used <= f.utilization_max))
        and (needle is None or needle in row.tenant_id.lower() or needle in row.scope.lower())
    )


RowStep = Callable[[], Awaitable[tuple[str, dict[str, Any]]]]


async def _each(steps: list[tuple[str, RowStep]]) -> Outcomes:
    """Run every row's step; an unexpected error fails that row only (``INTERNAL_ERROR``)."""
    out = new_outcomes()
    for row_id, step in steps:
        try:
            bucket, entry = await step()
        except Exception:
            logger.exception("bulk action: row %s failed", row_id)
            bucket, entry = failed(row_id, "INTERNAL_ERROR", "the server could not change it")
        out[bucket].append(entry)
    return out


class BulkApi:
    """The two bulk-action routes over one store."""

    def __init__(self, store: Store, auth: Authenticator, max_body_bytes: int) -> None:
        self.store = store
        self.auth = auth
        self.max_body = max_body_bytes
        self.tenants_replay = BulkReplay(store, "bulk:tenants")
        self.budgets_replay = BulkReplay(store, "bulk:budgets")

    def routes(self) -> list[BaseRoute]:
        """Return the routes."""
        return [
            Route("/v1/admin/tenants/bulk-action", self.tenants, methods=["POST"]),
            Route("/v1/admin/budgets/bulk-action", self.budgets, methods=["POST"]),
        ]

    # -- tenants -------------------------------------------------------------------------------

    async def tenants(self, request: Request) -> Response:
        """``POST /v1/admin/tenants/bulk-action[?dry_run=true]``."""
        await self.auth.admin_only(request)
        preview = dry_run(request)
        body = await parse_body(request, TenantBulkActionRequest, self.max_body)
        f = body.filter
        if (
            f.status is None
            and f.parent_tenant_id is None
            and f.observe_mode is None
            and not (f.search)
        ):
            raise LedgerError(
                "INVALID_REQUEST",
                "filter needs at least one of status, parent_tenant_id, observe_mode, search "
                "(an empty filter would act on every tenant)",
            )
        rows = await self._tenants(f)
        check_matches(len(rows), body.expected_count, "tenants")
        if preview:
            out = await _each(
                [(r.tenant_id, self._tenant_step(r, body.action, None)) for r in rows]
            )
            return _preview(envelope(body.action, len(rows), out, body.idempotency_key))
        replayed = await self.tenants_replay.claim(ADMIN_TENANT, body)
        if replayed is not None:
            return json_response(replayed)
        corr = f"tenant_bulk_action:{body.action.lower()}:{_request_id(request)}"
        out = await _each([(r.tenant_id, self._tenant_step(r, body.action, corr)) for r in rows])
        response = envelope(body.action, len(rows), out, body.idempotency_key)
        await record_audit(self.store, _audit(request, ADMIN_TENANT, "bulkActionTenants", corr, {
            "action": body.action, "filter": f.model_dump(exclude_none=True),
            "total_matched": len(rows), **_ids(out), "idempotency_key": body.idempotency_key,
        }))  # fmt: skip
        await self.tenants_replay.finish(ADMIN_TENANT, body, response)
        return json_response(response)

    async def _tenants(self, f: TenantBulkFilter) -> list[TenantRow]:
        found: list[TenantRow] = []
        cursor: str | None = None
        while True:
            page = await self.store.list_tenants(f.status, _PAGE, cursor)
            found += [t for t in page.items if tenant_matches(t, f)]
            cursor = page.next_cursor
            if cursor is None:
                return found

    def _tenant_step(self, row: TenantRow, action: str, corr: str | None) -> RowStep:
        """One tenant's outcome; ``corr`` ``None`` predicts it without changing anything."""

        async def step() -> tuple[str, dict[str, Any]]:
            tid, target = row.tenant_id, _TARGET[action]
            if row.status == target:
                return skipped(tid)
            if row.status == "CLOSED":
                return failed(tid, "INVALID_TRANSITION",
                              f"tenant {tid} is CLOSED; closing is irreversible")  # fmt: skip
            if action == "REACTIVATE" and row.status != "SUSPENDED":
                return failed(tid, "INVALID_TRANSITION", f"tenant {tid} is {row.status}")
            if corr is not None:
                try:
                    await self.store.update_tenant(
                        tid, {"status": target}, correlation_id=corr, only_from=_FROM[action]
                    )
                except LedgerError as exc:
                    if exc.code == "ALREADY_IN_TARGET_STATE":  # changed since it was listed
                        return skipped(tid)
                    return failed(tid, _row_code(exc), exc.message)
            return "succeeded", {"id": tid}

        return step

    # -- budgets -------------------------------------------------------------------------------

    async def budgets(self, request: Request) -> Response:
        """``POST /v1/admin/budgets/bulk-action[?dry_run=true]``."""
        await self.auth.admin_only(request)
        preview = dry_run(request)
        body = await parse_body(request, BudgetBulkActionRequest, self.max_body)
        f = body.filter
        if body.amount is None:
            raise LedgerError("INVALID_REQUEST", f"amount is required for action {body.action}")
        lo, hi = f.utilization_min, f.utilization_max
        if lo is not None and hi is not None and lo > hi:
            raise LedgerError(
                "INVALID_REQUEST",
                f"filter.utilization_min ({lo}) is greater than filter.utilization_max ({hi})",
            )
        if await self.store.get_tenant(f.tenant_id) is None:
            raise LedgerError(
                "NOT_FOUND", f"tenant {f.tenant_id} (filter.tenant_id) does not exist"
            )
        rows = await self._budgets(f)
        check_matches(len(rows), body.expected_count, "budgets")
        if preview:
            out = await _each([(r.ledger_id, self._budget_step(r, body, None)) for r in rows])
            return _preview(envelope(body.action, len(rows), out, body.idempotency_key))
        replayed = await self.budgets_replay.claim(f.tenant_id, body)
        if replayed is not None:
            return json_response(replayed)
        corr = f"budget_bulk_action:{body.action.lower()}:{_request_id(request)}"
        out = await _each([(r.ledger_id, self._budget_step(r, body, corr)) for r in rows])
        response = envelope(body.action, len(rows), out, body.idempotency_key)
        details = {
            "action": body.action, "filter": f.model_dump(mode="json", exclude_none=True),
            "amount": body.amount.amount, "unit": body.amount.unit.value,
            "total_matched": len(rows), **_ids(out), "idempotency_key": body.idempotency_key,
        }  # fmt: skip
        if body.reason:
            details["reason"] = body.reason
        await record_audit(
            self.store, _audit(request, f.tenant_id, "bulkActionBudgets", corr, details)
        )
        await self.budgets_replay.finish(f.tenant_id, body, response)
        return json_response(response)

    async def _budgets(self, f: BudgetBulkFilter) -> list[BudgetRow]:
        found: list[BudgetRow] = []
        cursor: str | None = None
        while True:
            page = await self.store.list_budgets(
                f.tenant_id,
                scope_prefix=f.scope_prefix,
                unit=f.unit.value if f.unit is not None else None,
                status=f.status,
                limit=_PAGE,
                cursor=cursor,
            )
            found += [b for b in page.items if budget_matches(b, f)]
            cursor = page.next_cursor
            if cursor is None:
                return found

    def _budget_step(
        self, row: BudgetRow, body: BudgetBulkActionRequest, corr: str | None
    ) -> RowStep:
        """One budget's outcome; ``corr`` ``None`` predicts it without changing anything."""
        assert body.amount is not None
        amount, action = body.amount, body.action
        spent = body.spent if action == "RESET_SPENT" else None

        async def step() -> tuple[str, dict[str, Any]]:
            rid = row.ledger_id
            for name, value in (("amount", amount), ("spent", spent)):
                if value is not None and value.unit.value != row.unit:
                    return failed(rid, "INVALID_TRANSITION", f"{name} is in {value.unit.value} "
                                  f"but budget {row.scope} is in {row.unit}")  # fmt: skip
            if action == "REPAY_DEBT" and row.debt == 0:
                return skipped(rid)
            spent_amount = spent.amount if spent is not None else None
            try:
                if corr is None:
                    ledger.plan_fund(row, action, amount.amount, spent=spent_amount,
                                     now_ms=self.store.clock())  # fmt: skip
                else:
                    await self.store.fund_budget(
                        row.tenant_id, row.scope, row.unit, operation=action,
                        amount=amount.amount, spent=spent_amount, idempotency_key=None,
                        request_hash="", timestamp=iso(self.store.clock()), audit=None,
                        correlation_id=corr, require_debt=action == "REPAY_DEBT",
                    )  # fmt: skip
            except LedgerError as exc:
                if exc.code == "ALREADY_IN_TARGET_STATE":  # repaid since it was listed
                    return skipped(rid)
                return failed(rid, _row_code(exc), exc.message)
            return "succeeded", {"id": rid}

        return step


def _row_code(exc: LedgerError) -> str:
    return _ROW_CODES.get(exc.code, "INVALID_TRANSITION")


def _request_id(request: Request) -> str:
    return current_context().request_id or request_ids(request)[0]


def _ids(out: Outcomes) -> dict[str, Any]:
    """Each row's outcome, for the audit entry (ids; failures with their code)."""
    return {
        "succeeded": [r["id"] for r in out["succeeded"]],
        "failed": [{"id": r["id"], "error_code": r["error_code"]} for r in out["failed"]],
        "skipped": [r["id"] for r in out["skipped"]],
    }


def _audit(
    request: Request, tenant_id: str, operation: str, corr: str, details: dict[str, Any]
) -> AuditRow:
    request_id, trace_id = request_ids(request)
    return AuditRow(
        audit_id=new_id("aud"),
        tenant_id=tenant_id,
        actor_type="admin_on_behalf_of",
        operation=operation,
        resource_id=corr,
        created_at_ms=0,
        request_id=request_id,
        trace_id=trace_id,
        details={**details, "correlation_id": corr},
    )


def _preview(body: dict[str, Any]) -> Response:
    response = json_response(body)
    response.headers["X-Cycles-Dry-Run"] = "true"
    return response
