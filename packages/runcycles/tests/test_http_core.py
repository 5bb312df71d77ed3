"""Properties of the pure request/response helpers shared by both clients."""

from __future__ import annotations

from urllib.parse import unquote

import httpx
from hypothesis import given
from hypothesis import strategies as st

from runcycles import CommitResponse, CyclesConfig, CyclesResponse
from runcycles._protocol import ClientCore, parse_http_response

CORE = ClientCore(CyclesConfig(base_url="http://cycles.test", api_key="k"))


@given(st.text(min_size=1, max_size=128))
def test_any_reservation_id_stays_one_path_segment(reservation_id: str) -> None:
    url = httpx.URL(CORE.reservation_url(reservation_id, "/commit"))

    segments = url.raw_path.decode("ascii").split("/")
    assert segments[:3] == ["", "v1", "reservations"]
    assert segments[4:] == ["commit"]
    assert unquote(segments[3], errors="strict") == reservation_id
    assert url.host == "cycles.test"
    assert url.query == b""


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_numeric_headers_never_raise(value: str) -> None:
    headers = httpx.Headers(
        {"X-RateLimit-Remaining": value, "X-RateLimit-Reset": value, "Retry-After": value}
    )
    response = CyclesResponse(status=429, model=CommitResponse, headers=headers, body={})

    parsed = [response.rate_limit_remaining, response.rate_limit_reset]
    stripped = value.strip()
    expected = int(stripped) if stripped.isascii() and stripped.isdigit() else None
    assert parsed == [expected, expected]
    assert response.retry_after_ms == (None if expected is None else expected * 1000)


@given(st.binary(max_size=64))
def test_any_body_parses_without_raising(content: bytes) -> None:
    request = httpx.Request("POST", "http://cycles.test/v1/reservations")
    raw = httpx.Response(200, content=content, request=request)

    response = parse_http_response(raw, CommitResponse)

    assert response.is_success is isinstance(response.body, dict)
    assert response.is_ambiguous is (response.body is None)
    assert (response.error_message is None) is response.is_success
