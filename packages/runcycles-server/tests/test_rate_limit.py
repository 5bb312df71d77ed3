"""The optional per-tenant rate limit: token buckets, rate-limit headers and 429 bodies."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest

from runcycles.testing.spec import load_spec, schema_validator
from runcycles_server.app import create_app
from runcycles_server.ledger import LedgerError
from runcycles_server.ratelimit import RATE_LIMIT_STATE_KEY, TokenBucketLimiter
from runcycles_server.stores.base import Store

if TYPE_CHECKING:
    from conftest import Api


class Clocks:
    """A settable monotonic clock and Unix clock (seconds) for the limiter."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_800_000_000.25

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def limiter(rate: float, clocks: Clocks, burst: float | None = None) -> TokenBucketLimiter:
    return TokenBucketLimiter(
        rate, burst=burst, monotonic_s=lambda: clocks.mono, wall_s=lambda: clocks.wall
    )


# -- the bucket ---------------------------------------------------------------------------------


def test_bucket_allows_its_size_then_refuses_and_refills_at_the_rate() -> None:
    clocks = Clocks()
    bucket = limiter(3, clocks)

    assert [bucket.take("acme")[:2] for _ in range(3)] == [(True, 2), (True, 1), (True, 0)]
    allowed, remaining, reset, retry_after = bucket.take("acme")
    assert (allowed, remaining, retry_after) == (False, 0, 1)
    assert reset == 1_800_000_002  # full again after 3 tokens / 3 per s, rounded up

    clocks.advance(1 / 3 + 1e-9)  # one token back
    assert bucket.take("acme")[:2] == (True, 0)
    assert bucket.take("acme")[0] is False
    clocks.advance(10)  # never more than the bucket holds
    assert bucket.take("acme")[:2] == (True, 2)


def test_tenants_have_separate_buckets() -> None:
    clocks = Clocks()
    bucket = limiter(1, clocks)
    assert bucket.take("acme")[0] is True
    assert bucket.take("acme")[0] is False
    assert bucket.take("globex")[0] is True


def test_retry_after_is_whole_seconds_until_one_token() -> None:
    clocks = Clocks()
    bucket = limiter(0.25, clocks)  # one token every 4 s; the bucket holds at least one
    assert bucket.take("acme")[:2] == (True, 0)
    allowed, _, reset, retry_after = bucket.take("acme")
    assert (allowed, retry_after) == (False, 4)
    assert reset == 1_800_000_005  # ceil(wall + 4 s)
    clocks.advance(2.5)
    assert bucket.take("acme")[3] == 2  # 1.5 s left, rounded up


def test_burst_sets_the_bucket_size() -> None:
    clocks = Clocks()
    bucket = limiter(1, clocks, burst=5)
    assert [bucket.take("t")[0] for _ in range(6)] == [True] * 5 + [False]


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, None), (-1, None), (float("nan"), None), (1, 0.5), (1, float("inf"))]
)
def test_bad_settings_are_refused_with_a_clear_message(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        TokenBucketLimiter(rate, burst=burst)


def test_check_records_headers_and_raises_limit_exceeded() -> None:
    clocks = Clocks()
    bucket = limiter(1, clocks)
    state: dict[str, Any] = {}
    bucket.check(state, "acme")
    assert dict(state[RATE_LIMIT_STATE_KEY]) == {
        b"x-ratelimit-remaining": b"0",
        b"x-ratelimit-reset": b"1800000002",
    }
    with pytest.raises(LedgerError) as caught:
        bucket.check(state, "acme")
    assert (caught.value.code, caught.value.status) == ("LIMIT_EXCEEDED", 429)
    assert "acme" in caught.value.message
    assert dict(state[RATE_LIMIT_STATE_KEY])[b"retry-after"] == b"1"


def test_idle_buckets_are_dropped_when_many_tenants_were_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import runcycles_server.ratelimit as ratelimit

    monkeypatch.setattr(ratelimit, "MAX_TRACKED_TENANTS", 3)
    clocks = Clocks()
    bucket = limiter(1, clocks)
    for tenant in ("a", "b", "c"):
        bucket.take(tenant)
    clocks.advance(5)  # a, b and c are full again: nothing to remember
    bucket.take("d")
    assert bucket.take("d")[0] is False  # d itself is still limited
    assert len(bucket._buckets) == 1


# -- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture
def limited(make_api: Callable[..., Api]) -> Api:
    """An app whose tenants get one request, then wait 1000 s for the next (no refill race)."""
    return make_api(rate_limit_per_s=0.001)


def reserve_body(tenant: str, key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "gpt"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 10},
    }


def _header_is_valid(response: Any, name: str) -> int:
    """Return the header's integer value after checking it against the spec's header schema."""
    raw = response.headers[name]
    assert raw.isdigit(), f"{name}: {raw!r} is not a non-negative integer"
    schema = load_spec()["components"]["headers"][name]["schema"]
    jsonschema.validate(int(raw), schema)
    return int(raw)


def test_headers_on_success_then_429_with_the_spec_error_body(limited: Api) -> None:
    api = limited
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    before = int(time.time())

    ok = api.post(key, "/v1/reservations", reserve_body("acme", "r1"))
    assert ok.status_code == 200, ok.text
    assert _header_is_valid(ok, "X-RateLimit-Remaining") == 0
    reset = _header_is_valid(ok, "X-RateLimit-Reset")
    assert before + 999 <= reset <= int(time.time()) + 1001  # full again in 1000 s
    assert "retry-after" not in ok.headers

    refused = api.post(key, "/v1/reservations", reserve_body("acme", "r2"))
    assert refused.status_code == 429
    body = refused.json()
    schema_validator("ErrorResponse").validate(body)
    assert body["error"] == "LIMIT_EXCEEDED"
    assert body["request_id"] == refused.headers["x-request-id"]
    assert 999 <= _header_is_valid(refused, "Retry-After") <= 1000
    assert _header_is_valid(refused, "X-RateLimit-Reset") >= reset
    assert refused.headers["x-cycles-tenant"] == "acme"

    # the refused reservation was never made: the budget holds only the first estimate
    admin = api.admin("GET", "/v1/admin/budgets", params={"tenant_id": "acme"})
    assert [row["reserved"]["amount"] for row in admin["ledgers"]] == [10]


def test_routed_requests_are_limited_too_and_tenants_are_separate(limited: Api) -> None:
    api, client = limited, limited.client
    acme, globex = api.tenant("acme"), api.tenant("globex")
    h = {"X-Cycles-API-Key": acme}

    first = client.get("/v1/balances", params={"tenant": "acme"}, headers=h)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-remaining"] == "0"
    second = client.get("/v1/balances", params={"tenant": "acme"}, headers=h)
    assert second.status_code == 429
    schema_validator("ErrorResponse").validate(second.json())
    assert int(second.headers["retry-after"]) >= 1

    other = client.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": globex})
    assert other.status_code == 200
    assert other.headers["x-ratelimit-remaining"] == "0"


def test_admin_key_health_and_bad_keys_are_not_limited(limited: Api) -> None:
    client = limited.client
    limited.tenant("acme")
    for _ in range(3):
        listing = client.get("/v1/admin/tenants", headers=limited.admin_headers)
        assert listing.status_code == 200
        assert "x-ratelimit-remaining" not in listing.headers
        assert client.get("/healthz").status_code == 200
        unknown = client.get("/v1/auth/introspect", headers={"X-Cycles-API-Key": "nope"})
        assert unknown.status_code == 401
        assert "x-ratelimit-remaining" not in unknown.headers


def test_without_a_rate_limit_there_are_no_rate_limit_headers(api: Api, acme: str) -> None:
    for n in range(3):
        response = api.post(acme, "/v1/reservations", reserve_body("acme", f"k{n}"))
        assert response.status_code == 200
        assert "x-ratelimit-remaining" not in response.headers
        assert "x-ratelimit-reset" not in response.headers


def test_create_app_refuses_a_bad_rate(store: Store) -> None:
    with pytest.raises(ValueError, match="positive"):
        create_app(store, rate_limit_per_s=0)
