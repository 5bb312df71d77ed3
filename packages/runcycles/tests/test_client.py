"""Behaviour of CyclesClient and AsyncCyclesClient: one suite, run against both (``flavour``)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    BudgetExceededError,
    CommitRequest,
    CommitResponse,
    CyclesClient,
    CyclesConfig,
    CyclesProtocolError,
    CyclesTimeoutError,
    CyclesTransportError,
    DecisionRequest,
    ErrorCode,
    EventCreateRequest,
    MalformedResponseError,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationExtendRequest,
    ReservationStatus,
    Subject,
    Unit,
)
from runcycles.exceptions import ERROR_CLASSES
from runcycles.testing import no_backoff

BASE_URL = "http://cycles.test"
API_KEY = "test-api-key"
RID = "3f2b8c1e-9a4d-4e1b-8f6a-2c7d5e9b1a0f"
TRACE = "0af7651916cd43dd8448eb211c80319c"

SUBJECT = Subject(tenant="acme", agent="bot")
ACTION = Action(kind="llm.completion", name="openai:gpt-4o")
ESTIMATE = Amount(unit=Unit.USD_MICROCENTS, amount=500_000)

RESERVE_OK = {
    "decision": "ALLOW",
    "reservation_id": RID,
    "affected_scopes": ["tenant:acme", "tenant:acme/agent:bot"],
    "reserved": {"unit": "USD_MICROCENTS", "amount": 500_000},
    "expires_at_ms": 1_800_000_060_000,
}
COMMIT_OK = {"status": "COMMITTED", "charged": {"unit": "USD_MICROCENTS", "amount": 420_000}}


def reserve_request(key: str = "req-001", **extra: Any) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=key, subject=SUBJECT, action=ACTION, estimate=ESTIMATE, **extra
    )


def error_body(code: str, message: str = "nope", **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, "request_id": "req-42", "trace_id": TRACE, **extra}


def summary(rid: str) -> dict[str, Any]:
    return {
        "reservation_id": rid,
        "status": "ACTIVE",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt"},
        "reserved": {"unit": "TOKENS", "amount": 10},
        "created_at_ms": 1,
        "expires_at_ms": 2,
        "scope_path": "tenant:acme",
        "affected_scopes": ["tenant:acme"],
    }


def balance(scope: str) -> dict[str, Any]:
    return {
        "scope": scope,
        "scope_path": f"tenant:acme/{scope}",
        "remaining": {"unit": "USD_MICROCENTS", "amount": -5},
    }


# ------------------------------------------------------------------------------ endpoints

ENDPOINTS: list[tuple[str, tuple[Any, ...], str, str, int, dict[str, Any]]] = [
    ("create_reservation", (reserve_request(),), "POST", "/v1/reservations", 200, RESERVE_OK),
    (
        "commit_reservation",
        (RID, CommitRequest(idempotency_key="c-1", actual=ESTIMATE)),
        "POST",
        f"/v1/reservations/{RID}/commit",
        200,
        COMMIT_OK,
    ),
    (
        "release_reservation",
        (RID, ReleaseRequest(idempotency_key="r-1", reason="cancelled")),
        "POST",
        f"/v1/reservations/{RID}/release",
        200,
        {"status": "RELEASED", "released": {"unit": "USD_MICROCENTS", "amount": 500_000}},
    ),
    (
        "extend_reservation",
        (RID, ReservationExtendRequest(idempotency_key="e-1", extend_by_ms=30_000)),
        "POST",
        f"/v1/reservations/{RID}/extend",
        200,
        {"status": "ACTIVE", "expires_at_ms": 1_800_000_090_000, "remaining_ttl_ms": 30_000},
    ),
    (
        "decide",
        (
            DecisionRequest(
                idempotency_key="d-1", subject=SUBJECT, action=ACTION, estimate=ESTIMATE
            ),
        ),
        "POST",
        "/v1/decide",
        200,
        {"decision": "DENY", "reason_code": "BUDGET_EXCEEDED"},
    ),
    (
        "create_event",
        (
            EventCreateRequest(
                idempotency_key="ev-1", subject=SUBJECT, action=ACTION, actual=ESTIMATE
            ),
        ),
        "POST",
        "/v1/events",
        201,
        {"status": "APPLIED", "event_id": "evt-1"},
    ),
]


@pytest.mark.parametrize(
    ("name", "args", "method", "path", "status", "answer"),
    ENDPOINTS,
    ids=[row[0] for row in ENDPOINTS],
)
async def test_post_endpoints_send_the_spec_request(
    api: Any,
    router: respx.MockRouter,
    name: str,
    args: tuple[Any, ...],
    method: str,
    path: str,
    status: int,
    answer: dict[str, Any],
) -> None:
    route = router.route(method=method, path=path).respond(
        status, json=answer, headers={"X-Request-Id": "rq-1", "X-Cycles-Trace-Id": TRACE}
    )

    response = await getattr(api, name)(*args)

    assert route.call_count == 1
    sent = route.calls.last.request
    body = json.loads(sent.content)
    request_model = args[-1]
    assert body == request_model.model_dump(mode="json", exclude_none=True)
    assert sent.headers["X-Idempotency-Key"] == request_model.idempotency_key
    assert sent.headers["X-Cycles-API-Key"] == API_KEY
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"].startswith("runcycles-python/")
    assert " httpx/" in sent.headers["User-Agent"]
    assert " python/3." in sent.headers["User-Agent"]
    assert response.is_success
    assert response.status == status
    assert response.body == answer
    assert response.request_id == "rq-1"
    assert response.trace_id == TRACE
    assert response.data.model_dump(mode="json", exclude_none=True) == answer


async def test_reservation_body_omits_unset_optional_fields(
    api: Any, router: respx.MockRouter
) -> None:
    route = router.post("/v1/reservations").respond(200, json=RESERVE_OK)

    await api.create_reservation(reserve_request(ttl_ms=30_000, dry_run=False))

    assert json.loads(route.calls.last.request.content) == {
        "idempotency_key": "req-001",
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 500_000},
        "ttl_ms": 30_000,
        "dry_run": False,
    }


async def test_free_form_metadata_keeps_nulls(api: Any, router: respx.MockRouter) -> None:
    route = router.post(f"/v1/reservations/{RID}/commit").respond(200, json=COMMIT_OK)
    metadata = {"note": None, "nested": {"x": None, "y": [1, None]}}

    await api.commit_reservation(
        RID, CommitRequest(idempotency_key="c-1", actual=ESTIMATE, metadata=metadata)
    )

    assert json.loads(route.calls.last.request.content)["metadata"] == metadata


async def test_get_reservation(api: Any, router: respx.MockRouter) -> None:
    route = router.get(f"/v1/reservations/{RID}").respond(200, json=summary(RID))

    response = await api.get_reservation(RID)

    sent = route.calls.last.request
    assert sent.headers["X-Cycles-API-Key"] == API_KEY
    assert "X-Idempotency-Key" not in sent.headers
    assert sent.content == b""
    assert response.data.reservation_id == RID
    assert response.data.status is ReservationStatus.ACTIVE


@pytest.mark.parametrize(
    ("reservation_id", "raw_path"),
    [
        ("../decide?x=1", b"/v1/reservations/..%2Fdecide%3Fx%3D1/commit"),
        ("..", b"/v1/reservations/%2E%2E/commit"),
        ("a b/c#d", b"/v1/reservations/a%20b%2Fc%23d/commit"),
        ("rsv_ünï", b"/v1/reservations/rsv_%C3%BCn%C3%AF/commit"),
    ],
)
async def test_reservation_ids_are_one_encoded_path_segment(
    api: Any, router: respx.MockRouter, reservation_id: str, raw_path: bytes
) -> None:
    route = router.route().respond(200, json=COMMIT_OK)

    await api.commit_reservation(
        reservation_id, CommitRequest(idempotency_key="c-1", actual=ESTIMATE)
    )

    assert route.calls.last.request.url.raw_path == raw_path


@pytest.mark.parametrize("reservation_id", ["", "x" * 129, None, 42])
async def test_bad_reservation_id_fails_before_sending(
    api: Any, router: respx.MockRouter, reservation_id: Any
) -> None:
    route = router.route().respond(200, json=COMMIT_OK)

    with pytest.raises(ValueError, match="reservation_id"):
        await api.commit_reservation(
            reservation_id, CommitRequest(idempotency_key="c-1", actual=ESTIMATE)
        )
    assert route.call_count == 0


async def test_dict_requests_are_validated_and_sent_like_models(
    api: Any, router: respx.MockRouter
) -> None:
    route = router.post("/v1/reservations").respond(200, json=RESERVE_OK)
    as_dict = {
        "idempotency_key": "req-001",
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 500_000},
        "ttl_ms": None,
    }

    await api.create_reservation(as_dict)
    await api.create_reservation(reserve_request())

    first, second = (call.request for call in route.calls)
    assert first.content == second.content
    assert first.headers["X-Idempotency-Key"] == "req-001"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"ttl": 5}, "ttl"),
        ({"ttl_ms": 10}, "ttl_ms"),
        ({"estimate": {"unit": "USD_MICROCENTS", "amount": -1}}, "amount"),
        ({"subject": {"dimensions": {"run_id": "r1"}}}, "subject"),
        ({"idempotency_key": ""}, "idempotency_key"),
    ],
)
async def test_invalid_dict_requests_fail_before_sending(
    api: Any, router: respx.MockRouter, bad: dict[str, Any], field: str
) -> None:
    route = router.route().respond(200, json=RESERVE_OK)
    body = reserve_request().model_dump(mode="json", exclude_none=True) | bad

    with pytest.raises(ValidationError, match=field):
        await api.create_reservation(body)
    assert route.call_count == 0


async def test_wrong_request_model_is_a_type_error(api: Any, router: respx.MockRouter) -> None:
    route = router.route().respond(200, json=COMMIT_OK)

    with pytest.raises(TypeError, match="expected a CommitRequest"):
        await api.commit_reservation(RID, ReleaseRequest(idempotency_key="r-1"))
    assert route.call_count == 0


async def test_per_call_headers_pass_trace_context(api: Any, router: respx.MockRouter) -> None:
    route = router.route().respond(200, json=RESERVE_OK)
    traceparent = f"00-{TRACE}-b7ad6b7169203331-01"

    await api.create_reservation(reserve_request(), headers={"traceparent": traceparent})
    await api.get_reservation(RID, headers={"X-Cycles-Trace-Id": TRACE})

    post, get = (call.request for call in route.calls)
    assert post.headers["traceparent"] == traceparent
    assert post.headers["X-Idempotency-Key"] == "req-001"
    assert get.headers["X-Cycles-Trace-Id"] == TRACE
    assert get.headers["X-Cycles-API-Key"] == API_KEY


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("code", "exc_class"), sorted(ERROR_CLASSES.items()))
async def test_every_error_code_maps_to_its_exception(
    api: Any, router: respx.MockRouter, code: str, exc_class: type[CyclesProtocolError]
) -> None:
    router.post("/v1/reservations").respond(
        409, json=error_body(code, details={"scope": "tenant:acme"})
    )

    with no_backoff():
        response = await api.create_reservation(reserve_request())

    assert not response.is_success
    assert not response.is_transport_error
    assert response.error_message == "nope"
    assert response.get_error_response().error == code
    with pytest.raises(exc_class) as caught:
        response.raise_for_error()
    assert type(caught.value) is exc_class
    error = caught.value
    assert (error.status, error.error_code, error.request_id, error.trace_id) == (
        409,
        code,
        "req-42",
        TRACE,
    )
    assert error.details == {"scope": "tenant:acme"}
    with pytest.raises(exc_class):
        _ = response.data


async def test_unknown_error_code_is_a_plain_protocol_error(
    api: Any, router: respx.MockRouter
) -> None:
    # ACTION_QUOTA_EXCEEDED was this test's unknown code until the v0.1.26 extensions.
    router.post("/v1/reservations").respond(409, json=error_body("A_CODE_FROM_THE_FUTURE"))

    response = await api.create_reservation(reserve_request())

    error = response.to_exception()
    assert type(error) is CyclesProtocolError
    assert error.error_code == "A_CODE_FROM_THE_FUTURE"
    assert not error.is_retryable()
    assert "A_CODE_FROM_THE_FUTURE" in str(error)


async def test_budget_exceeded_reads_like_the_seed_readme(
    api: Any, router: respx.MockRouter
) -> None:
    router.post("/v1/reservations").respond(
        409,
        json=error_body(ErrorCode.BUDGET_EXCEEDED, "Insufficient budget"),
        headers={"X-Request-Id": "hdr-id"},
    )

    response = await api.create_reservation(reserve_request())

    assert response.status == 409
    assert response.error_message == "Insufficient budget"
    assert response.request_id == "hdr-id"
    with pytest.raises(BudgetExceededError) as caught:
        response.raise_for_error()
    assert caught.value.is_budget_exceeded()
    assert not caught.value.is_retryable()


# ------------------------------------------------------------------------------ retries


async def test_5xx_is_retried_with_identical_body_and_key(
    api: Any, router: respx.MockRouter
) -> None:
    route = router.post("/v1/reservations").mock(
        side_effect=[
            httpx.Response(503, json=error_body("INTERNAL_ERROR")),
            httpx.Response(500, text="<html>oops</html>"),
            httpx.Response(200, json=RESERVE_OK),
        ]
    )

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert response.is_success
    assert route.call_count == 3
    bodies = {call.request.content for call in route.calls}
    keys = {call.request.headers["X-Idempotency-Key"] for call in route.calls}
    assert len(bodies) == 1
    assert keys == {"req-001"}
    assert len(delays) == 2
    assert 0.25 <= delays[0] <= 0.5  # equal jitter on the 0.5 s initial delay
    assert 0.5 <= delays[1] <= 1.0


async def test_429_honours_retry_after(api: Any, router: respx.MockRouter) -> None:
    route = router.post("/v1/reservations").mock(
        side_effect=[
            httpx.Response(429, json=error_body("LIMIT_EXCEEDED"), headers={"Retry-After": "2"}),
            httpx.Response(200, json=RESERVE_OK),
        ]
    )

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert response.is_success
    assert route.call_count == 2
    assert delays == [2.0]


async def test_retry_after_beyond_the_bound_returns_the_429(
    make_api: Any, router: respx.MockRouter
) -> None:
    api = make_api(retry_after_max_s=10.0)
    route = router.post("/v1/reservations").respond(
        429, json=error_body("LIMIT_EXCEEDED"), headers={"Retry-After": "11"}
    )

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 1
    assert delays == []
    assert response.status == 429
    assert response.retry_after_ms == 11_000
    error = response.to_exception()
    assert error.is_rate_limited()
    assert error.is_retryable()
    assert error.retry_after_ms == 11_000


async def test_429_without_retry_after_uses_backoff(api: Any, router: respx.MockRouter) -> None:
    route = router.post("/v1/reservations").mock(
        side_effect=[httpx.Response(429, json=error_body("LIMIT_EXCEEDED"))] * 2
        + [httpx.Response(200, json=RESERVE_OK)]
    )

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert response.is_success
    assert route.call_count == 3
    assert 0.25 <= delays[0] <= 0.5
    assert 0.5 <= delays[1] <= 1.0


@pytest.mark.parametrize(
    "status_code",
    [400, 401, 403, 404, 409, 410, 422, 501],
)
async def test_4xx_and_501_are_never_retried(
    api: Any, router: respx.MockRouter, status_code: int
) -> None:
    route = router.post("/v1/reservations").respond(status_code, json=error_body("INVALID_REQUEST"))

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 1
    assert delays == []
    assert response.status == status_code


async def test_retries_stop_after_max_attempts(make_api: Any, router: respx.MockRouter) -> None:
    api = make_api(retry_max_attempts=3, retry_initial_delay=1.0, retry_max_delay=1.5)
    route = router.post("/v1/reservations").respond(503, json=error_body("INTERNAL_ERROR"))

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 3
    assert response.status == 503
    assert len(delays) == 2
    assert all(0.5 <= delay <= 1.5 for delay in delays)
    with pytest.raises(CyclesProtocolError) as caught:
        response.raise_for_error()
    assert caught.value.is_retryable()


async def test_retry_disabled_makes_one_attempt(make_api: Any, router: respx.MockRouter) -> None:
    api = make_api(retry_enabled=False)
    route = router.post("/v1/reservations").respond(503, json=error_body("INTERNAL_ERROR"))

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 1
    assert delays == []
    assert response.is_server_error


async def test_connect_error_is_retried_then_succeeds(api: Any, router: respx.MockRouter) -> None:
    route = router.post("/v1/reservations").mock(
        side_effect=[httpx.ConnectError("connection refused"), httpx.Response(200, json=RESERVE_OK)]
    )

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert response.is_success
    assert route.call_count == 2
    assert len(delays) == 1
    first, second = (call.request for call in route.calls)
    assert first.content == second.content
    assert first.headers["X-Idempotency-Key"] == second.headers["X-Idempotency-Key"]


# ------------------------------------------------------------------------------ transport


async def test_unreachable_server_is_a_transport_error_response(
    api: Any, router: respx.MockRouter
) -> None:
    route = router.post("/v1/reservations").mock(side_effect=httpx.ConnectError("refused"))

    with no_backoff():
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 5
    assert response.is_transport_error
    assert not response.is_success
    assert response.status == -1
    assert response.body is None
    assert BASE_URL in response.error_message
    assert "running" in response.error_message
    with pytest.raises(CyclesTransportError) as caught:
        response.raise_for_error()
    assert type(caught.value) is CyclesTransportError
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.url == f"{BASE_URL}/v1/reservations"


async def test_timeout_is_a_timeout_error(make_api: Any, router: respx.MockRouter) -> None:
    api = make_api(retry_max_attempts=2)
    route = router.post("/v1/reservations").mock(side_effect=httpx.ReadTimeout("slow"))

    with no_backoff():
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 2
    assert response.is_transport_error
    assert "read_timeout" in response.error_message
    with pytest.raises(CyclesTimeoutError):
        _ = response.data


async def test_unsupported_protocol_is_not_retried(api: Any, router: respx.MockRouter) -> None:
    route = router.post("/v1/reservations").mock(side_effect=httpx.UnsupportedProtocol("ftp"))

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 1
    assert delays == []
    assert response.is_transport_error


# ------------------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"<html>gateway</html>", "not valid JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b"", "empty"),
        (b"\xff\xfe garbage", "not valid JSON"),
    ],
)
async def test_2xx_without_a_json_object_is_ambiguous_not_success(
    make_api: Any, router: respx.MockRouter, content: bytes, problem: str
) -> None:
    api = make_api(retry_max_attempts=2)
    route = router.post("/v1/reservations").respond(200, content=content)

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert route.call_count == 2  # ambiguous: retried with the same key
    assert len(delays) == 1
    assert not response.is_success
    assert response.is_ambiguous
    assert response.status == 200
    assert problem in response.error_message
    assert response.get_body_attribute("reservation_id") is None
    with pytest.raises(MalformedResponseError) as caught:
        response.raise_for_error()
    assert caught.value.is_retryable()


async def test_wrong_schema_on_200_fails_on_typed_access(
    api: Any, router: respx.MockRouter
) -> None:
    router.post("/v1/reservations").respond(200, json={"reservation_id": RID, "extra": 1})

    response = await api.create_reservation(reserve_request())

    assert response.is_success  # a JSON object arrived; the schema is checked lazily
    assert response.get_body_attribute("reservation_id") == RID
    with pytest.raises(MalformedResponseError, match="decision") as caught:
        _ = response.data
    assert "ReservationCreateResponse" in str(caught.value)
    with pytest.raises(MalformedResponseError):
        response.raise_for_error()


async def test_unknown_response_fields_are_tolerated(api: Any, router: respx.MockRouter) -> None:
    answer = {**RESERVE_OK, "new_field": {"x": 1}, "caps": {"max_tokens": 5, "future": True}}
    router.post("/v1/reservations").respond(200, json=answer)

    response = await api.create_reservation(reserve_request())

    data = response.raise_for_error().data
    assert isinstance(data, ReservationCreateResponse)
    assert data.reservation_id == RID
    assert data.caps is not None
    assert data.caps.max_tokens == 5


async def test_error_status_with_html_body(api: Any, router: respx.MockRouter) -> None:
    router.post("/v1/reservations").respond(404, text="<h1>Not Found</h1>")

    response = await api.create_reservation(reserve_request())

    assert response.status == 404
    assert "not valid JSON" in response.error_message
    assert "base_url" in response.error_message
    assert response.get_error_response() is None
    with pytest.raises(MalformedResponseError) as caught:
        response.raise_for_error()
    assert caught.value.status == 404
    assert not caught.value.is_retryable()


async def test_redirect_with_json_is_not_success(api: Any, router: respx.MockRouter) -> None:
    router.post("/v1/reservations").respond(
        302, json={"see": "elsewhere"}, headers={"Location": "http://elsewhere.test/"}
    )

    response = await api.create_reservation(reserve_request())

    assert not response.is_success
    assert not response.is_client_error
    assert response.error_message == "unexpected HTTP 302 from the Cycles server"
    assert type(response.to_exception()) is CyclesProtocolError


async def test_error_code_without_message(api: Any, router: respx.MockRouter) -> None:
    router.get(f"/v1/reservations/{RID}").respond(410, json={"error": "RESERVATION_EXPIRED"})

    response = await api.get_reservation(RID)

    assert response.is_client_error
    assert response.error_message == "RESERVATION_EXPIRED (HTTP 410)"
    error = response.to_exception()
    assert error.is_reservation_expired()
    assert error.request_id is None


async def test_error_body_without_error_code(api: Any, router: respx.MockRouter) -> None:
    router.post("/v1/reservations").respond(418, json={"detail": "teapot"})

    response = await api.create_reservation(reserve_request())

    assert "418" in response.error_message
    assert response.get_error_response() is None
    error = response.to_exception()
    assert type(error) is CyclesProtocolError
    assert error.error_code is None


# ------------------------------------------------------------------------------ listing


async def test_list_reservations_renders_filters(api: Any, router: respx.MockRouter) -> None:
    route = router.get("/v1/reservations").respond(200, json={"reservations": [summary(RID)]})
    since = datetime(2026, 11, 1, tzinfo=timezone.utc)

    response = await api.list_reservations(
        status=ReservationStatus.ACTIVE,
        tenant="acme",
        from_=since,
        to="2026-11-22T00:00:00Z",
        include=["metadata", "evidence"],
        sort_by="created_at_ms",
        sort_dir="asc",
        limit=10,
        idempotency_key=None,
    )

    params = dict(route.calls.last.request.url.params)
    assert params == {
        "status": "ACTIVE",
        "tenant": "acme",
        "from": "2026-11-01T00:00:00+00:00",
        "to": "2026-11-22T00:00:00Z",
        "include": "metadata,evidence",
        "sort_by": "created_at_ms",
        "sort_dir": "asc",
        "limit": "10",
    }
    assert [row.reservation_id for row in response.data.reservations] == [RID]


@pytest.mark.parametrize(
    ("filters", "error", "match"),
    [
        ({"tenat": "acme"}, TypeError, "unknown filter 'tenat'"),
        ({"limit": 0}, ValueError, "limit"),
        ({"limit": 201}, ValueError, "limit"),
        ({"limit": True}, ValueError, "limit"),
        ({"status": "OPEN"}, ValueError, "ACTIVE"),
        ({"sort_dir": "up"}, ValueError, "sort_dir"),
        ({"from_": datetime(2026, 1, 1)}, ValueError, "timezone-aware"),
        ({"tenant": 5}, ValueError, "tenant must be a string"),
        ({"include": 5}, ValueError, "include must be a string"),
    ],
)
async def test_bad_list_filters_fail_before_sending(
    api: Any, router: respx.MockRouter, filters: dict[str, Any], error: type[Exception], match: str
) -> None:
    route = router.route().respond(200, json={"reservations": []})

    with pytest.raises(error, match=match):
        await api.list_reservations(**filters)
    assert route.call_count == 0


async def test_iter_reservations_follows_cursors(api: Any, router: respx.MockRouter) -> None:
    route = router.get("/v1/reservations").mock(
        side_effect=[
            httpx.Response(
                200,
                json={
                    "reservations": [summary("a"), summary("b")],
                    "next_cursor": "c1",
                    "has_more": True,
                },
            ),
            httpx.Response(
                200, json={"reservations": [summary("c")], "next_cursor": "c2", "has_more": True}
            ),
            httpx.Response(200, json={"reservations": [], "has_more": False}),
        ]
    )

    rows = await api.collect("iter_reservations", tenant="acme", limit=2)

    assert [row.reservation_id for row in rows] == ["a", "b", "c"]
    sent = [dict(call.request.url.params) for call in route.calls]
    assert sent == [
        {"tenant": "acme", "limit": "2"},
        {"tenant": "acme", "limit": "2", "cursor": "c1"},
        {"tenant": "acme", "limit": "2", "cursor": "c2"},
    ]


async def test_iter_reservations_stops_on_a_repeated_cursor(
    api: Any, router: respx.MockRouter
) -> None:
    page = {"reservations": [summary("a")], "next_cursor": "same", "has_more": True}
    router.get("/v1/reservations").respond(200, json=page)

    with pytest.raises(MalformedResponseError, match="looping forever"):
        await api.collect("iter_reservations", cursor="same")


async def test_iter_reservations_raises_page_errors(api: Any, router: respx.MockRouter) -> None:
    router.get("/v1/reservations").respond(403, json=error_body("FORBIDDEN"))

    with pytest.raises(CyclesProtocolError, match="FORBIDDEN"):
        await api.collect("iter_reservations", tenant="other")


async def test_iter_reservations_checks_filters_eagerly(api: Any) -> None:
    with pytest.raises(TypeError, match="unknown filter"):
        api.client.iter_reservations(bogus=1)


async def test_get_balances_sends_filters(api: Any, router: respx.MockRouter) -> None:
    route = router.get("/v1/balances").respond(200, json={"balances": [balance("agent:bot")]})

    response = await api.get_balances(tenant="acme", include_children=True, limit=50)

    assert dict(route.calls.last.request.url.params) == {
        "tenant": "acme",
        "include_children": "true",
        "limit": "50",
    }
    assert response.data.balances[0].remaining.amount == -5


async def test_include_children_must_be_a_bool(api: Any, router: respx.MockRouter) -> None:
    route = router.route().respond(200, json={"balances": []})

    with pytest.raises(ValueError, match="include_children must be True or False"):
        await api.get_balances(tenant="acme", include_children="yes")
    assert route.call_count == 0


@pytest.mark.parametrize("filters", [{}, {"limit": 5}, {"tenant": None, "cursor": "x"}])
async def test_get_balances_requires_a_subject_filter(
    api: Any, router: respx.MockRouter, filters: dict[str, Any]
) -> None:
    route = router.route().respond(200, json={"balances": []})

    with pytest.raises(ValueError, match=r"at least one subject filter"):
        await api.get_balances(**filters)
    assert route.call_count == 0


async def test_iter_balances_follows_cursors(api: Any, router: respx.MockRouter) -> None:
    router.get("/v1/balances").mock(
        side_effect=[
            httpx.Response(
                200, json={"balances": [balance("a")], "next_cursor": "n", "has_more": True}
            ),
            httpx.Response(200, json={"balances": [balance("b")]}),
        ]
    )

    rows = await api.collect("iter_balances", workspace="prod")

    assert [row.scope for row in rows] == ["a", "b"]


# ------------------------------------------------------------------------------ headers


async def test_response_metadata_headers(api: Any, router: respx.MockRouter) -> None:
    router.post("/v1/reservations").respond(
        200,
        json=RESERVE_OK,
        headers={
            "X-Request-Id": "rq-9",
            "X-Cycles-Tenant": "acme",
            "X-RateLimit-Remaining": "41",
            "X-RateLimit-Reset": "1800000000",
        },
    )

    response = await api.create_reservation(reserve_request())

    assert response.request_id == "rq-9"
    assert response.cycles_tenant == "acme"
    assert response.rate_limit_remaining == 41
    assert response.rate_limit_reset == 1_800_000_000
    assert response.retry_after_ms is None


@pytest.mark.parametrize("value", ["", "soon", "-1", "1.5", "Wed, 21 Oct 2026 07:28:00 GMT"])
async def test_malformed_numeric_headers_read_as_none(
    api: Any, router: respx.MockRouter, value: str
) -> None:
    router.post("/v1/reservations").respond(
        200,
        json=RESERVE_OK,
        headers={"X-RateLimit-Remaining": value, "X-RateLimit-Reset": value, "Retry-After": value},
    )

    response = await api.create_reservation(reserve_request())

    assert response.rate_limit_remaining is None
    assert response.rate_limit_reset is None
    assert response.retry_after_ms is None


async def test_body_retry_after_ms_wins_over_header(api: Any, router: respx.MockRouter) -> None:
    router.post("/v1/decide").respond(
        200,
        json={"decision": "DENY", "reason_code": "BUDGET_EXCEEDED", "retry_after_ms": 1500},
        headers={"Retry-After": "9"},
    )

    response = await api.decide(
        DecisionRequest(idempotency_key="d", subject=SUBJECT, action=ACTION, estimate=ESTIMATE)
    )

    assert response.retry_after_ms == 1500
    assert response.data.reason_code == "BUDGET_EXCEEDED"


# ------------------------------------------------------------------------------ lifecycle


async def test_context_managers_close_the_owned_pool(flavour: str) -> None:
    config = CyclesConfig(base_url=BASE_URL, api_key=API_KEY)
    if flavour == "sync":
        with CyclesClient(config) as client:
            assert client.config is config
        assert client.http_client.is_closed
    else:
        async with AsyncCyclesClient(config) as aclient:
            assert aclient.config is config
        assert aclient.http_client.is_closed


async def test_a_shared_http_client_is_left_open(flavour: str, router: respx.MockRouter) -> None:
    route = router.post("/v1/reservations").respond(200, json=RESERVE_OK)
    config = CyclesConfig(base_url=BASE_URL, api_key=API_KEY)
    if flavour == "sync":
        with httpx.Client() as shared:
            with CyclesClient(config, http_client=shared) as client:
                assert client.http_client is shared
                client.create_reservation(reserve_request())
            assert not shared.is_closed
    else:
        ashared = httpx.AsyncClient()
        async with AsyncCyclesClient(config, http_client=ashared) as aclient:
            await aclient.create_reservation(reserve_request())
        assert not ashared.is_closed
        await ashared.aclose()
    sent = route.calls.last.request
    assert sent.headers["X-Cycles-API-Key"] == API_KEY  # headers travel per request
    assert sent.headers["User-Agent"].startswith("runcycles-python/")


async def test_transport_argument_is_used(flavour: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMMIT_OK)

    config = CyclesConfig(base_url=BASE_URL, api_key=API_KEY)
    commit = CommitRequest(idempotency_key="c", actual=ESTIMATE)
    if flavour == "sync":
        with CyclesClient(config, transport=httpx.MockTransport(handler)) as client:
            response = client.commit_reservation(RID, commit)
    else:
        async with AsyncCyclesClient(config, transport=httpx.MockTransport(handler)) as aclient:
            response = await aclient.commit_reservation(RID, commit)
    assert isinstance(response.data, CommitResponse)
    assert seen[0].headers["X-Cycles-API-Key"] == API_KEY


def test_http_client_and_transport_are_exclusive() -> None:
    config = CyclesConfig(base_url=BASE_URL, api_key=API_KEY)
    transport = httpx.MockTransport(lambda _: httpx.Response(200))
    with httpx.Client() as shared, pytest.raises(TypeError, match="either http_client"):
        CyclesClient(config, http_client=shared, transport=transport)


async def test_async_http_client_and_transport_are_exclusive() -> None:
    config = CyclesConfig(base_url=BASE_URL, api_key=API_KEY)
    transport = httpx.MockTransport(lambda _: httpx.Response(200))
    async with httpx.AsyncClient() as shared:
        with pytest.raises(TypeError, match="either http_client"):
            AsyncCyclesClient(config, http_client=shared, transport=transport)


def test_client_needs_a_config() -> None:
    with pytest.raises(TypeError, match="CyclesConfig"):
        CyclesClient({"base_url": BASE_URL})  # type: ignore[arg-type]


async def test_base_url_with_path_prefix(flavour: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=RESERVE_OK)

    config = CyclesConfig(base_url="http://gateway.test/cycles/", api_key=API_KEY)
    if flavour == "sync":
        with CyclesClient(config, transport=httpx.MockTransport(handler)) as client:
            client.create_reservation(reserve_request())
    else:
        async with AsyncCyclesClient(config, transport=httpx.MockTransport(handler)) as aclient:
            await aclient.create_reservation(reserve_request())
    assert seen == ["http://gateway.test/cycles/v1/reservations"]


async def test_timeouts_come_from_the_config(make_api: Any) -> None:
    api = make_api(connect_timeout=1.5, read_timeout=7.0)

    timeout = api.client.http_client.timeout
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (1.5, 7.0, 7.0, 7.0)


async def test_retries_are_logged(
    api: Any, router: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router.post("/v1/reservations").mock(
        side_effect=[httpx.Response(502, text="bad gateway"), httpx.Response(200, json=RESERVE_OK)]
    )

    with caplog.at_level("INFO", logger="runcycles"), no_backoff():
        await api.create_reservation(reserve_request())

    [record] = caplog.records
    assert "retrying POST http://cycles.test/v1/reservations" in record.getMessage()
    assert "HTTP 502" in record.getMessage()


def test_type_hints_resolve_at_runtime() -> None:
    import typing

    for cls in (CyclesClient, AsyncCyclesClient):
        hints = typing.get_type_hints(cls.list_reservations)
        assert "filters" in hints
        assert "return" in typing.get_type_hints(cls.create_reservation)


def corrupt_gzip_response() -> httpx.Response:
    # A stream, so the body is only decoded (and fails) when the client reads it.
    return httpx.Response(
        200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")
    )


async def test_undecodable_body_is_ambiguous_and_retried_with_the_same_key(
    api: Any, router: respx.MockRouter
) -> None:
    corrupt = corrupt_gzip_response()
    route = router.post("/v1/reservations").mock(
        side_effect=[corrupt, httpx.Response(200, json=RESERVE_OK)]
    )

    with no_backoff() as delays:
        response = await api.create_reservation(reserve_request())

    assert response.is_success
    assert route.call_count == 2
    assert len(delays) == 1
    first, second = (call.request for call in route.calls)
    assert first.headers["X-Idempotency-Key"] == second.headers["X-Idempotency-Key"]


async def test_undecodable_body_never_raises_from_the_method(
    make_api: Any, router: respx.MockRouter
) -> None:
    api = make_api(retry_enabled=False)
    router.post("/v1/reservations").mock(side_effect=lambda request: corrupt_gzip_response())

    response = await api.create_reservation(reserve_request())

    assert not response.is_success
    assert response.is_transport_error
    with pytest.raises(CyclesTransportError):
        response.raise_for_error()


async def test_with_options_shares_the_pool_and_changes_only_the_retry_policy(
    make_api: Any, router: respx.MockRouter
) -> None:
    from runcycles.retry import RetryPolicy

    api = make_api()
    sibling = api.client.with_options(retry_policy=RetryPolicy.never())
    assert type(sibling) is type(api.client)
    assert sibling.http_client is api.client.http_client
    assert sibling.config is api.client.config
    route = router.post("/v1/reservations").respond(503, json=error_body("INTERNAL_ERROR"))

    with no_backoff() as delays:
        result = sibling.create_reservation(reserve_request())
        if api.is_async:
            result = await result

    assert route.call_count == 1
    assert delays == []
    assert result.is_server_error
