"""The error tree: mapping from error codes, helpers, str and pickling."""

from __future__ import annotations

import pickle

import httpx
import pytest

import runcycles
from runcycles import (
    BudgetExceededError,
    CommitResponse,
    CyclesError,
    CyclesProtocolError,
    CyclesResponse,
    CyclesTimeoutError,
    CyclesTransportError,
    ErrorCode,
    MalformedResponseError,
    RateLimitedError,
)
from runcycles.exceptions import ERROR_CLASSES, protocol_error_class

SEED_NAMES = [
    "CyclesError",
    "CyclesProtocolError",
    "BudgetExceededError",
    "OverdraftLimitExceededError",
    "DebtOutstandingError",
    "ReservationExpiredError",
    "ReservationFinalizedError",
    "CyclesTransportError",
]


def test_every_spec_error_code_has_its_own_class() -> None:
    assert set(ERROR_CLASSES) == set(ErrorCode.ALL)
    assert len(set(ERROR_CLASSES.values())) == len(ERROR_CLASSES)
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, CyclesProtocolError)
        assert protocol_error_class(code) is cls
        assert code in (cls.__doc__ or "")


def test_unknown_and_missing_codes_map_to_the_base_class() -> None:
    assert protocol_error_class("SOMETHING_NEW") is CyclesProtocolError
    assert protocol_error_class(None) is CyclesProtocolError


def test_seed_readme_names_exist() -> None:
    for name in SEED_NAMES:
        assert issubclass(getattr(runcycles, name), CyclesError)
    assert issubclass(CyclesTimeoutError, CyclesTransportError)


def make_errors() -> list[CyclesError]:
    errors: list[CyclesError] = [
        cls(
            "message",
            status=409,
            error_code=code,
            reason_code="R",
            request_id="rq",
            trace_id="t" * 32,
            retry_after_ms=250,
            details={"scope": "tenant:acme"},
        )
        for code, cls in ERROR_CLASSES.items()
    ]
    errors.append(CyclesProtocolError("m", status=418, error_code="NEW_CODE"))
    errors.append(MalformedResponseError("m", status=200))
    errors.append(CyclesTransportError("down", method="POST", url="http://h/v1/x"))
    errors.append(CyclesTimeoutError("slow", method="GET", url="http://h/v1/y"))
    return errors


@pytest.mark.parametrize("error", make_errors(), ids=lambda e: type(e).__name__)
def test_exceptions_survive_pickle(error: CyclesError) -> None:
    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is type(error)
    assert copy.__dict__ == error.__dict__
    assert str(copy) == str(error)


def test_protocol_error_text_and_helpers() -> None:
    error = BudgetExceededError(
        "Insufficient budget", status=409, error_code="BUDGET_EXCEEDED", request_id="rq-1"
    )

    assert str(error) == "HTTP 409 BUDGET_EXCEEDED: Insufficient budget (request_id=rq-1)"
    assert "BudgetExceededError(status=409" in repr(error)
    assert error.is_budget_exceeded()
    assert error.is_client_error()
    assert not error.is_server_error()
    assert not error.is_retryable()
    assert not error.is_reservation_expired()
    assert error.details == {}


@pytest.mark.parametrize(
    ("helper", "code"),
    [
        ("is_budget_exceeded", "BUDGET_EXCEEDED"),
        ("is_budget_frozen", "BUDGET_FROZEN"),
        ("is_budget_closed", "BUDGET_CLOSED"),
        ("is_overdraft_limit_exceeded", "OVERDRAFT_LIMIT_EXCEEDED"),
        ("is_debt_outstanding", "DEBT_OUTSTANDING"),
        ("is_reservation_expired", "RESERVATION_EXPIRED"),
        ("is_reservation_finalized", "RESERVATION_FINALIZED"),
        ("is_idempotency_mismatch", "IDEMPOTENCY_MISMATCH"),
        ("is_unit_mismatch", "UNIT_MISMATCH"),
        ("is_max_extensions_exceeded", "MAX_EXTENSIONS_EXCEEDED"),
        ("is_tenant_closed", "TENANT_CLOSED"),
        ("is_rate_limited", "LIMIT_EXCEEDED"),
        ("is_not_found", "NOT_FOUND"),
    ],
)
def test_is_helpers_match_exactly_their_code(helper: str, code: str) -> None:
    for other in ErrorCode.ALL:
        error = CyclesProtocolError("m", status=409, error_code=other)
        assert getattr(error, helper)() is (other == code)


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (500, "INTERNAL_ERROR", True),
        (503, None, True),
        (429, "LIMIT_EXCEEDED", True),
        (409, "BUDGET_EXCEEDED", False),
        (410, "RESERVATION_EXPIRED", False),
        (400, "INVALID_REQUEST", False),
        (0, "INTERNAL_ERROR", True),
    ],
)
def test_is_retryable(status: int, code: str | None, retryable: bool) -> None:
    assert CyclesProtocolError("m", status=status, error_code=code).is_retryable() is retryable


def test_malformed_2xx_is_retryable_but_malformed_4xx_is_not() -> None:
    assert MalformedResponseError("m", status=200).is_retryable()
    assert not MalformedResponseError("m", status=404).is_retryable()
    assert MalformedResponseError("m", status=502).is_retryable()
    assert CyclesTransportError("down").is_retryable()


def test_response_maps_rate_limit_with_header_retry_after() -> None:
    response = CyclesResponse(
        status=429,
        model=CommitResponse,
        body={"error": "LIMIT_EXCEEDED", "message": "slow down", "request_id": "r"},
        headers=httpx.Headers({"Retry-After": "3"}),
        error_message="slow down",
    )

    error = response.to_exception()

    assert isinstance(error, RateLimitedError)
    assert error.retry_after_ms == 3000
    assert error.is_rate_limited()


def test_successful_response_has_no_exception() -> None:
    response = CyclesResponse(
        status=200,
        model=CommitResponse,
        body={"status": "COMMITTED", "charged": {"unit": "TOKENS", "amount": 3}},
    )

    assert response.to_exception() is None
    assert response.raise_for_error() is response
    assert response.data.charged.amount == 3
    assert response.data is response.data  # validated once, cached
    assert response.get_error_response() is None
    assert "ok" in repr(response)
