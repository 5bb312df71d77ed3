"""The error every protocol rule raises, and the HTTP status of each error code.

Kept apart from :mod:`runcycles_server.ledger` so the rules below the ledger (the governance
engine) raise the same error without importing the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

STATUS_BY_CODE: Final[Mapping[str, int]] = {
    "INVALID_REQUEST": 400,
    "UNIT_MISMATCH": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "TENANT_NOT_FOUND": 404,
    "BUDGET_NOT_FOUND": 404,
    "BUDGET_EXCEEDED": 409,
    "BUDGET_FROZEN": 409,
    "BUDGET_CLOSED": 409,
    "RESERVATION_FINALIZED": 409,
    "IDEMPOTENCY_MISMATCH": 409,
    "OVERDRAFT_LIMIT_EXCEEDED": 409,
    "DEBT_OUTSTANDING": 409,
    "MAX_EXTENSIONS_EXCEEDED": 409,
    "TENANT_CLOSED": 409,
    "TENANT_SUSPENDED": 409,
    "DUPLICATE_RESOURCE": 409,
    "KEY_REVOKED": 409,
    # v0.1.26 action governance: a live reservation a policy refuses is a 409, like a budget
    # denial (cycles-protocol-extensions: "On live 409 DENY: deny_detail appears in
    # ErrorResponse.details").
    "ACTION_KIND_DENIED": 409,
    "ACTION_KIND_NOT_ALLOWED": 409,
    "ACTION_QUOTA_EXCEEDED": 409,
    "RESERVATION_EXPIRED": 410,
    "PAYLOAD_TOO_LARGE": 413,
    "LIMIT_EXCEEDED": 429,
    "INTERNAL_ERROR": 500,
}
"""HTTP status of every error code this server produces."""


class LedgerError(Exception):
    """A protocol rule refused the request. Maps 1:1 to an ``ErrorResponse``.

    Attributes:
        code: the ``ErrorResponse.error`` value (e.g. ``BUDGET_EXCEEDED``).
        message: a sentence saying what is wrong and what to do.
        status: the HTTP status (from :data:`STATUS_BY_CODE` unless given).
        details: optional machine-readable context.
        evidence: the ``CyclesEvidenceRef`` of the denial's stored evidence envelope, if any
            (answered as ``cycles_evidence``).
        evidence_omitted: why a denial that should have an envelope has none (answered as the
            ``X-Cycles-Evidence-Omitted`` header).
    """

    evidence: dict[str, str] | None = None
    evidence_omitted: str | None = None

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 400)
        self.details = details
