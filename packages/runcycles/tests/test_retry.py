"""RetryPolicy: what is retried and how long it waits (pure, no I/O)."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx
import pytest

from runcycles import CommitResponse, CyclesConfig, CyclesResponse, RetryPolicy
from runcycles.response import TRANSPORT_ERROR_STATUS
from runcycles.retry import asleep_s, sleep_s
from runcycles.testing import no_backoff


def answer(
    status: int, body: dict[str, Any] | None = None, retry_after: str | None = None
) -> CyclesResponse[Any]:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return CyclesResponse(
        status=status,
        model=CommitResponse,
        body=body if body is not None else {"error": "X", "message": "m", "request_id": "r"},
        headers=httpx.Headers(headers),
    )


def failure(exc: Exception) -> CyclesResponse[Any]:
    return CyclesResponse(status=TRANSPORT_ERROR_STATUS, model=CommitResponse, exception=exc)


def test_from_config() -> None:
    config = CyclesConfig(
        base_url="http://h",
        api_key="k",
        retry_max_attempts=4,
        retry_initial_delay=0.1,
        retry_multiplier=3.0,
        retry_max_delay=2.0,
        retry_after_max_s=9.0,
    )

    assert RetryPolicy.from_config(config) == RetryPolicy(
        max_attempts=4, initial_delay_s=0.1, multiplier=3.0, max_delay_s=2.0, retry_after_max_s=9.0
    )
    disabled = CyclesConfig(base_url="http://h", api_key="k", retry_enabled=False)
    assert RetryPolicy.from_config(disabled).max_attempts == 1


def test_backoff_without_jitter_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_delay_s=0.5, multiplier=2.0, max_delay_s=3.0, jitter=False)

    assert [policy.backoff_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.backoff_s(10_000) == 3.0  # no overflow for absurd attempt numbers


def test_equal_jitter_is_bounded_and_deterministic_with_a_seed() -> None:
    first = RetryPolicy(rng=random.Random(7))
    second = RetryPolicy(rng=random.Random(7))

    delays = [first.backoff_s(n) for n in range(1, 8)]

    assert delays == [second.backoff_s(n) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        nominal = min(30.0, 0.5 * 2.0 ** (n - 1))
        assert nominal / 2 <= delay <= nominal
    assert len(set(delays)) == len(delays)


@pytest.mark.parametrize(
    ("response", "retryable"),
    [
        (answer(500), True),
        (answer(502), True),
        (answer(503), True),
        (answer(504), True),
        (answer(501), False),
        (answer(505), False),
        (answer(429), True),
        (answer(400), False),
        (answer(401), False),
        (answer(404), False),
        (answer(409), False),
        (answer(410), False),
        (answer(200, {"status": "COMMITTED"}), False),
        (CyclesResponse(status=200, model=CommitResponse, body=None), True),
        (failure(httpx.ConnectError("refused")), True),
        (failure(httpx.ConnectTimeout("slow")), True),
        (failure(httpx.ReadTimeout("slow")), True),
        (failure(httpx.PoolTimeout("busy")), True),
        (failure(httpx.RemoteProtocolError("reset")), True),
        (failure(httpx.ReadError("eof")), True),
        (failure(httpx.UnsupportedProtocol("ftp")), False),
        (failure(httpx.LocalProtocolError("bad header")), False),
    ],
)
def test_what_is_retried(response: CyclesResponse[Any], retryable: bool) -> None:
    assert RetryPolicy().is_retryable(response) is retryable
    delay = RetryPolicy().next_delay_s(1, response)
    assert (delay is not None) is retryable


def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=False)

    assert policy.next_delay_s(1, answer(503)) == 0.5
    assert policy.next_delay_s(2, answer(503)) == 1.0
    assert policy.next_delay_s(3, answer(503)) is None
    assert RetryPolicy.never().next_delay_s(1, answer(503)) is None


def test_retry_after_is_honoured_up_to_the_bound() -> None:
    policy = RetryPolicy(retry_after_max_s=5.0)

    assert policy.next_delay_s(1, answer(429, retry_after="3")) == 3.0
    assert policy.next_delay_s(1, answer(429, retry_after="0")) == 0.0
    assert policy.next_delay_s(1, answer(503, retry_after="5")) == 5.0
    assert policy.next_delay_s(1, answer(429, retry_after="6")) is None
    body = {"error": "LIMIT_EXCEEDED", "message": "m", "request_id": "r", "retry_after_ms": 1200}
    assert policy.next_delay_s(1, answer(429, body)) == 1.2


def test_invalid_policies_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ValueError, match="delays"):
        RetryPolicy(initial_delay_s=-1)


async def test_no_backoff_records_instead_of_sleeping() -> None:
    with no_backoff() as outer:
        sleep_s(100.0)
        with no_backoff() as inner:
            await asleep_s(200.0)
        sleep_s(300.0)

    assert outer == [100.0, 300.0]
    assert inner == [200.0]


async def test_sleeps_are_real_outside_no_backoff() -> None:
    start = time.monotonic()
    sleep_s(0.02)
    await asleep_s(0.02)
    assert time.monotonic() - start >= 0.04
