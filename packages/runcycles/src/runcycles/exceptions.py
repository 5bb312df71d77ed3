"""Errors raised by runcycles (the tree is drawn in ``docs/client.md``).

Everything derives from :class:`CyclesError`: :class:`CyclesConfigError` (bad configuration),
:class:`CyclesTransportError` (no HTTP answer) and :class:`CyclesProtocolError` (the server
answered with an error), whose subclasses map the body's ``error`` code (never the HTTP
status alone; :data:`ERROR_CLASSES`). An unknown code (a newer server) gives a plain
:class:`CyclesProtocolError` that still carries it. The clients' methods return a
:class:`~runcycles.response.CyclesResponse` rather than raising these for server or network
failures. Every exception survives ``pickle``.

A denial carries the server's :class:`~runcycles.models.DenyDetail` (which rule fired, what
quota was hit, what to change) as ``error.deny_detail`` when the server sent one; the
governance denials of the v0.1.26 extensions (:class:`ActionQuotaExceededError`,
:class:`ActionKindDeniedError`, :class:`ActionKindNotAllowedError`) share the base
:class:`ActionDeniedError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from runcycles.models import DenyDetail, ErrorCode, deny_detail_from

__all__ = [
    "ActionDeniedError",
    "ActionKindDeniedError",
    "ActionKindNotAllowedError",
    "ActionQuotaExceededError",
    "BudgetClosedError",
    "BudgetExceededError",
    "BudgetFrozenError",
    "CyclesConfigError",
    "CyclesError",
    "CyclesProtocolError",
    "CyclesTimeoutError",
    "CyclesTransportError",
    "DebtOutstandingError",
    "ERROR_CLASSES",
    "ForbiddenError",
    "IdempotencyMismatchError",
    "InternalServerError",
    "InvalidRequestError",
    "MalformedResponseError",
    "MaxExtensionsExceededError",
    "NotFoundError",
    "OverdraftLimitExceededError",
    "RateLimitedError",
    "ReservationExpiredError",
    "ReservationFinalizedError",
    "SubjectRequiredError",
    "TenantClosedError",
    "UnauthorizedError",
    "UnitMismatchError",
    "protocol_error_class",
]


class CyclesError(Exception):
    """Base class of every error raised by runcycles."""


class CyclesConfigError(CyclesError, ValueError):
    """A configuration value is missing or invalid; the message names it and the fix."""


class SubjectRequiredError(CyclesConfigError):
    """No subject field is set anywhere: not in the call, not in the ``CyclesConfig``.

    Guards and ``@cycles`` then ask the server which tenant the API key belongs to (see
    ``client.discover_tenant()``); this error is raised only when that is impossible too.
    """


class CyclesTransportError(CyclesError):
    """The server could not be reached or the connection failed before an answer arrived.

    The request may or may not have reached the server; retrying with the *same*
    idempotency key is always safe.

    Attributes:
        message: What failed, including the method and URL.
        method: HTTP method of the failed request, if known.
        url: URL of the failed request, if known.
    """

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None):
        super().__init__(message)
        self.message = message
        self.method = method
        self.url = url

    def __str__(self) -> str:
        return self.message

    def is_retryable(self) -> bool:
        """Return ``True``: a transport failure is always worth a retry with the same key."""
        return True


class CyclesTimeoutError(CyclesTransportError):
    """A connect, read, write or connection-pool timeout expired."""


class CyclesProtocolError(CyclesError):
    """The server answered with an error (or with a body the spec does not allow).

    Attributes:
        message: The server's ``message`` (or a description of what was wrong).
        status: HTTP status code.
        error_code: The body's ``error`` code (an open string; see ``ErrorCode``), or ``None``
            if the body carried none.
        reason_code: A decision ``reason_code`` if the body carried one.
        request_id: ``request_id`` from the body or the ``X-Request-Id`` header.
        trace_id: ``trace_id`` from the body or the ``X-Cycles-Trace-Id`` header.
        retry_after_ms: How long the server asked to wait before retrying, if it said.
        details: The body's free-form ``details`` object (e.g. for ``UNIT_MISMATCH``).
        deny_detail: Why the server denied the request (``details.deny_detail`` parsed, or
            the ``deny_detail`` given), or ``None`` if it sent none or a malformed one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        error_code: str | None = None,
        reason_code: str | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        retry_after_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
        deny_detail: DenyDetail | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code
        self.reason_code = reason_code
        self.request_id = request_id
        self.trace_id = trace_id
        self.retry_after_ms = retry_after_ms
        self.details: dict[str, Any] = dict(details) if details else {}
        self.deny_detail = deny_detail if deny_detail is not None else deny_detail_from(details)

    def __str__(self) -> str:
        code = self.error_code or "no error code"
        text = f"HTTP {self.status} {code}: {self.message}"
        fix = self.deny_detail.suggested_fix if self.deny_detail is not None else None
        if fix:
            text += f" (suggested fix: {fix})"
        if self.request_id:
            text += f" (request_id={self.request_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, error_code={self.error_code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )

    def is_retryable(self) -> bool:
        """Return whether resending the same request (same idempotency key) may succeed.

        True for 5xx, 429 ``LIMIT_EXCEEDED`` and ``INTERNAL_ERROR``; false for every other
        4xx, including ``BUDGET_EXCEEDED`` (it needs more budget, not another attempt).
        """
        return (
            self.status >= 500
            or self.status == 429
            or self.error_code in (ErrorCode.INTERNAL_ERROR, ErrorCode.LIMIT_EXCEEDED)
        )

    def is_client_error(self) -> bool:
        """Return whether the status is a 4xx."""
        return 400 <= self.status < 500

    def is_server_error(self) -> bool:
        """Return whether the status is a 5xx."""
        return self.status >= 500

    def is_budget_exceeded(self) -> bool:
        """Return whether the error code is ``BUDGET_EXCEEDED``."""
        return self.error_code == ErrorCode.BUDGET_EXCEEDED

    def is_budget_frozen(self) -> bool:
        """Return whether the error code is ``BUDGET_FROZEN``."""
        return self.error_code == ErrorCode.BUDGET_FROZEN

    def is_budget_closed(self) -> bool:
        """Return whether the error code is ``BUDGET_CLOSED``."""
        return self.error_code == ErrorCode.BUDGET_CLOSED

    def is_overdraft_limit_exceeded(self) -> bool:
        """Return whether the error code is ``OVERDRAFT_LIMIT_EXCEEDED``."""
        return self.error_code == ErrorCode.OVERDRAFT_LIMIT_EXCEEDED

    def is_debt_outstanding(self) -> bool:
        """Return whether the error code is ``DEBT_OUTSTANDING``."""
        return self.error_code == ErrorCode.DEBT_OUTSTANDING

    def is_reservation_expired(self) -> bool:
        """Return whether the error code is ``RESERVATION_EXPIRED``."""
        return self.error_code == ErrorCode.RESERVATION_EXPIRED

    def is_reservation_finalized(self) -> bool:
        """Return whether the error code is ``RESERVATION_FINALIZED``."""
        return self.error_code == ErrorCode.RESERVATION_FINALIZED

    def is_idempotency_mismatch(self) -> bool:
        """Return whether the error code is ``IDEMPOTENCY_MISMATCH``."""
        return self.error_code == ErrorCode.IDEMPOTENCY_MISMATCH

    def is_unit_mismatch(self) -> bool:
        """Return whether the error code is ``UNIT_MISMATCH``."""
        return self.error_code == ErrorCode.UNIT_MISMATCH

    def is_max_extensions_exceeded(self) -> bool:
        """Return whether the error code is ``MAX_EXTENSIONS_EXCEEDED``."""
        return self.error_code == ErrorCode.MAX_EXTENSIONS_EXCEEDED

    def is_tenant_closed(self) -> bool:
        """Return whether the error code is ``TENANT_CLOSED``."""
        return self.error_code == ErrorCode.TENANT_CLOSED

    def is_rate_limited(self) -> bool:
        """Return whether the server throttled the call (429 or ``LIMIT_EXCEEDED``)."""
        return self.status == 429 or self.error_code == ErrorCode.LIMIT_EXCEEDED

    def is_not_found(self) -> bool:
        """Return whether the error code is ``NOT_FOUND``."""
        return self.error_code == ErrorCode.NOT_FOUND

    def is_action_quota_exceeded(self) -> bool:
        """Return whether the error code is ``ACTION_QUOTA_EXCEEDED``."""
        return self.error_code == ErrorCode.ACTION_QUOTA_EXCEEDED

    def is_action_kind_denied(self) -> bool:
        """Return whether the error code is ``ACTION_KIND_DENIED``."""
        return self.error_code == ErrorCode.ACTION_KIND_DENIED

    def is_action_kind_not_allowed(self) -> bool:
        """Return whether the error code is ``ACTION_KIND_NOT_ALLOWED``."""
        return self.error_code == ErrorCode.ACTION_KIND_NOT_ALLOWED


class MalformedResponseError(CyclesProtocolError):
    """The server's answer does not match the spec: not JSON, not an object, wrong schema.

    On a 2xx the outcome is *ambiguous* (the operation may have been applied), so it counts
    as retryable: resend with the same idempotency key to get the stored outcome.
    """

    def is_retryable(self) -> bool:
        """Return ``True`` for an ambiguous 2xx or a 5xx/429, ``False`` otherwise."""
        return 200 <= self.status < 300 or super().is_retryable()


class InvalidRequestError(CyclesProtocolError):
    """400 ``INVALID_REQUEST``: the request failed validation; fix it, do not retry."""


class UnitMismatchError(CyclesProtocolError):
    """400 ``UNIT_MISMATCH``: the budget or reservation uses a different unit (see details)."""


class UnauthorizedError(CyclesProtocolError):
    """401 ``UNAUTHORIZED``: the API key is missing, invalid, revoked or expired."""


class ForbiddenError(CyclesProtocolError):
    """403 ``FORBIDDEN``: the subject or reservation belongs to another tenant than the key."""


class NotFoundError(CyclesProtocolError):
    """404 ``NOT_FOUND``: no such reservation, or no budget at any scope of the subject."""


class BudgetExceededError(CyclesProtocolError):
    """409 ``BUDGET_EXCEEDED``: not enough budget remains; degrade, queue or ask for more."""


class BudgetFrozenError(CyclesProtocolError):
    """409 ``BUDGET_FROZEN``: an operator froze a budget on the subject's scope path."""


class BudgetClosedError(CyclesProtocolError):
    """409 ``BUDGET_CLOSED``: a budget on the subject's scope path is closed."""


class OverdraftLimitExceededError(CyclesProtocolError):
    """409 ``OVERDRAFT_LIMIT_EXCEEDED``: debt is over (or would exceed) the overdraft limit."""


class DebtOutstandingError(CyclesProtocolError):
    """409 ``DEBT_OUTSTANDING``: a scope has debt; an operator must fund it first."""


class ReservationFinalizedError(CyclesProtocolError):
    """409 ``RESERVATION_FINALIZED``: the reservation was already committed or released."""


class IdempotencyMismatchError(CyclesProtocolError):
    """409 ``IDEMPOTENCY_MISMATCH``: the idempotency key was used before with another body."""


class MaxExtensionsExceededError(CyclesProtocolError):
    """409 ``MAX_EXTENSIONS_EXCEEDED``: the reservation cannot be extended any more."""


class TenantClosedError(CyclesProtocolError):
    """409 ``TENANT_CLOSED``: the tenant is closed (irreversible)."""


class ActionDeniedError(CyclesProtocolError):
    """409: a governance policy refused the action (v0.1.26 extensions); nothing was held.

    The base of the three ``ACTION_*`` denials. Retrying the same request does not help:
    another action kind, a later quota window, or a policy change does. ``deny_detail`` says
    which policy (``blocked_by_policy``), where (``blocked_by_scope``) and what to change
    (``suggested_fix``).
    """


class ActionQuotaExceededError(ActionDeniedError):
    """409 ``ACTION_QUOTA_EXCEEDED``: the action's quota for its window is used up.

    ``deny_detail.quota_violation`` names the rule: action kind (or risk class), window and
    window key (the run id for ``per_run``), ``used`` of ``limit`` and the policy.
    """


class ActionKindDeniedError(ActionDeniedError):
    """409 ``ACTION_KIND_DENIED``: the action kind is on the policy's ``denied_action_kinds``."""


class ActionKindNotAllowedError(ActionDeniedError):
    """409 ``ACTION_KIND_NOT_ALLOWED``: the policy's ``allowed_action_kinds`` omits the kind."""


class ReservationExpiredError(CyclesProtocolError):
    """410 ``RESERVATION_EXPIRED``: the reservation expired; record the spend as an event."""


class RateLimitedError(CyclesProtocolError):
    """429 ``LIMIT_EXCEEDED``: the server throttled the call; wait ``retry_after_ms``."""


class InternalServerError(CyclesProtocolError):
    """500 ``INTERNAL_ERROR``: the server failed; retrying with the same key is safe."""


ERROR_CLASSES: Final[Mapping[str, type[CyclesProtocolError]]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.UNIT_MISMATCH: UnitMismatchError,
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.BUDGET_EXCEEDED: BudgetExceededError,
    ErrorCode.BUDGET_FROZEN: BudgetFrozenError,
    ErrorCode.BUDGET_CLOSED: BudgetClosedError,
    ErrorCode.OVERDRAFT_LIMIT_EXCEEDED: OverdraftLimitExceededError,
    ErrorCode.DEBT_OUTSTANDING: DebtOutstandingError,
    ErrorCode.RESERVATION_FINALIZED: ReservationFinalizedError,
    ErrorCode.IDEMPOTENCY_MISMATCH: IdempotencyMismatchError,
    ErrorCode.MAX_EXTENSIONS_EXCEEDED: MaxExtensionsExceededError,
    ErrorCode.TENANT_CLOSED: TenantClosedError,
    ErrorCode.RESERVATION_EXPIRED: ReservationExpiredError,
    ErrorCode.LIMIT_EXCEEDED: RateLimitedError,
    ErrorCode.INTERNAL_ERROR: InternalServerError,
    ErrorCode.ACTION_QUOTA_EXCEEDED: ActionQuotaExceededError,
    ErrorCode.ACTION_KIND_DENIED: ActionKindDeniedError,
    ErrorCode.ACTION_KIND_NOT_ALLOWED: ActionKindNotAllowedError,
}
"""Exception class for each known error code; look codes up with :func:`protocol_error_class`."""


def protocol_error_class(error_code: str | None) -> type[CyclesProtocolError]:
    """Return the exception class for ``error_code`` (:class:`CyclesProtocolError` if unknown)."""
    if error_code is None:
        return CyclesProtocolError
    return ERROR_CLASSES.get(error_code, CyclesProtocolError)
