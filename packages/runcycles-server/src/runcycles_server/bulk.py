"""What the three bulk-action routes share (tenants, budgets, webhook subscriptions).

The governance spec gives ``POST /v1/admin/{tenants,budgets,webhooks}/bulk-action`` one set of
safety rules, so they live here once:

* at most :data:`BULK_MAX` matching rows, else 400 ``LIMIT_EXCEEDED`` (``details.total_matched``);
* ``expected_count`` must equal the server's count, else 409 ``COUNT_MISMATCH`` — checked
  before anything is written, so a refused request changes nothing;
* ``idempotency_key``: the first answer is kept :data:`BULK_WINDOW_MS` (15 minutes) and a
  repeat with the same key and body gets it again without the action running twice. The key
  is **claimed** in one atomic step before any row changes (the store's idempotency records,
  on every store), so two submits racing with one key cannot both apply; the loser gets 409
  until the first finishes (a server that dies mid-action leaves the claim until the window
  ends: the rows it changed carry the action's correlation id in their events). The same key
  with a different body is 409 ``IDEMPOTENCY_MISMATCH``.
* ``?dry_run=true`` (this server's preview; the spec declares no query parameter here and
  servers ignore unknown ones): the same checks and the same response shape, with each row's
  *predicted* outcome, and nothing written — not the rows, not the idempotency key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from runcycles_server import ledger
from runcycles_server.errors import LedgerError
from runcycles_server.ledger import AuditRow, IdempotencyRow, Outcome
from runcycles_server.query import Param, check_query
from runcycles_server.stores.base import OperationStore, Store
from runcycles_server.stores.operations import Op, Txn

BULK_MAX: Final = 500
"""Most rows one bulk action may match (the spec's hard limit)."""
BULK_WINDOW_MS: Final = 15 * 60_000
"""How long a bulk action's answer is replayed for the same ``idempotency_key``."""
ADMIN_TENANT: Final = "__admin__"
"""The spec's ``AuditLogEntry.tenant_id`` sentinel for admin work not scoped to one tenant; its
idempotency records and audit entries are kept under it."""
QUERY: Final = {"dry_run": Param("boolean")}
"""The query parameter of every bulk-action route (an extension: the preview)."""
_IN_PROGRESS: Final = 0
"""``status_code`` of a claimed key whose action has not answered yet."""

T = TypeVar("T")
Outcomes = dict[str, list[dict[str, Any]]]
"""``succeeded`` / ``failed`` / ``skipped`` rows (``BulkActionRowOutcome`` bodies)."""


def new_outcomes() -> Outcomes:
    """Empty ``succeeded`` / ``failed`` / ``skipped`` lists."""
    return {"succeeded": [], "failed": [], "skipped": []}


def failed(row_id: str, code: str, message: str) -> tuple[str, dict[str, Any]]:
    """A row of ``failed[]``."""
    return "failed", {"id": row_id, "error_code": code, "message": message}


def skipped(row_id: str, reason: str = "ALREADY_IN_TARGET_STATE") -> tuple[str, dict[str, Any]]:
    """A row of ``skipped[]``."""
    return "skipped", {"id": row_id, "reason": reason}


def dry_run(request: Request) -> bool:
    """Whether the request asks for the preview (``?dry_run=true``).

    Raises:
        LedgerError: INVALID_REQUEST for a value that is not ``true`` or ``false``.
    """
    check_query(request, QUERY)
    return request.query_params.get("dry_run", "").lower() == "true"


def check_matches(total: int, expected: int | None, noun: str) -> None:
    """The spec's two gates on the matched set, in its order (limit, then expected count).

    Raises:
        LedgerError: 400 LIMIT_EXCEEDED above :data:`BULK_MAX`; 409 COUNT_MISMATCH when
            ``expected`` is given and differs. Both carry ``details.total_matched``.
    """
    details = {"total_matched": total}
    if total > BULK_MAX:
        raise LedgerError(
            "LIMIT_EXCEEDED",
            f"the filter matches {total} {noun}, more than {BULK_MAX}: narrow it",
            status=400,
            details=details,
        )
    if expected is not None and expected != total:
        raise LedgerError(
            "COUNT_MISMATCH",
            f"the filter matches {total} {noun}, not expected_count={expected}; nothing was "
            "changed (preview again, then send the new count)",
            status=409,
            details={**details, "expected_count": expected},
        )


def envelope(action: str, total: int, outcome: Outcomes, key: str) -> dict[str, Any]:
    """The ``*BulkActionResponse`` body."""
    return {"action": action, "total_matched": total, **outcome, "idempotency_key": key}


async def _run(store: Store, op: Op[T]) -> T:
    if not isinstance(store, OperationStore):  # every store of this package is one
        raise LedgerError("NOT_FOUND", "this store cannot run bulk actions")
    return await store.run(op)


async def record_audit(store: Store, row: AuditRow) -> None:
    """Write the one audit entry of a bulk action (its time is the store's)."""

    def plan(txn: Txn) -> None:
        txn.apply(Outcome(200, b"", audit=dataclasses.replace(row, created_at_ms=txn.now)))

    await _run(store, Op(plan, row.tenant_id))


class BulkReplay:
    """The ``idempotency_key`` of one bulk-action route, kept in the store's idempotency records.

    ``endpoint`` names the route's records; ``tenant_id`` (per call) is the tenant whose records
    hold them — a budget bulk action's filter tenant, :data:`ADMIN_TENANT` otherwise.
    """

    def __init__(self, store: Store, endpoint: str) -> None:
        self.store = store
        self.endpoint = endpoint

    async def claim(self, tenant_id: str, body: BaseModel) -> dict[str, Any] | None:
        """Claim ``body.idempotency_key``: ``None`` to go ahead, or the answer to replay.

        Raises:
            LedgerError: 409 IDEMPOTENCY_MISMATCH (the key was used with another body) or 409
                INVALID_REQUEST while the first request with the key is still running.
        """
        key = str(getattr(body, "idempotency_key"))  # noqa: B009 - every bulk request has one
        digest = self._hash(body)
        endpoint = self.endpoint

        def plan(txn: Txn) -> bytes | None:
            found = txn.idem(tenant_id, endpoint, key)
            if found is not None:
                if found.status_code == _IN_PROGRESS and found.payload_hash == digest:
                    raise LedgerError(
                        "INVALID_REQUEST",
                        f"a bulk action with idempotency_key {key!r} is still running; retry "
                        "in a moment to get its answer",
                        status=409,
                    )
                return ledger.replay(found, digest, now_ms=txn.now).body
            row = IdempotencyRow(tenant_id, endpoint, key, digest, _IN_PROGRESS, b"", None,
                                 txn.now, txn.now + BULK_WINDOW_MS)  # fmt: skip
            txn.apply(Outcome(200, b"", idempotency=row))
            return None

        raw = await _run(self.store, Op(plan, tenant_id, idem=(endpoint, key)))
        return None if raw is None else dict(ledger.loads(raw))

    async def finish(self, tenant_id: str, body: BaseModel, response: dict[str, Any]) -> None:
        """Keep ``response`` as the answer to ``body.idempotency_key`` for the window."""
        key = str(getattr(body, "idempotency_key"))  # noqa: B009
        digest, raw, endpoint = self._hash(body), ledger.dumps(response), self.endpoint

        def plan(txn: Txn) -> None:
            row = IdempotencyRow(tenant_id, endpoint, key, digest, 200, raw, None, txn.now,
                                 txn.now + BULK_WINDOW_MS)  # fmt: skip
            txn.apply(Outcome(200, b"", idempotency=row))

        await _run(self.store, Op(plan, tenant_id, idem=(endpoint, key)))

    def _hash(self, body: BaseModel) -> str:
        return ledger.payload_hash(self.endpoint, body.model_dump(mode="json", exclude_none=True))
