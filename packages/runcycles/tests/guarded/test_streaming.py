"""Stream reservations commit accumulated usage however the stream ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Generator, Iterator
from typing import Any

import pytest

from runcycles import (
    AsyncStreamReservation,
    BudgetExceededError,
    CyclesMetrics,
    ReservationAlreadyFinalizedError,
    StreamReservation,
    StreamUsage,
    get_cycles_context,
    stream_reservation,
)

OPTIONS: dict[str, Any] = {
    "estimate": 20_000,
    "action_kind": "llm.completion",
    "action_name": "gpt-4o",
}


def price(usage: StreamUsage) -> int:
    return usage.tokens_input * 10 + usage.tokens_output * 30


def chunks(count: int) -> Iterator[int]:
    for index in range(count):
        if index == 3:
            raise ConnectionError("stream broke")
        yield 5


# --------------------------------------------------------------------------- usage


def test_stream_usage_helpers() -> None:
    usage = StreamUsage()
    assert usage.is_empty()
    usage.add_input_tokens(10)
    usage.add_output_tokens(3)
    usage.add_tokens(input=1, output=2)
    assert (usage.tokens_input, usage.tokens_output, usage.total_tokens) == (11, 5, 16)
    assert not usage.is_empty()
    usage.add_cost(7)
    usage.add_cost(3)
    assert usage.actual_cost == 10
    usage.set_cost(4)
    assert usage.actual_cost == 4
    usage.set_model_version("gpt-4o-2025")
    usage.put_custom("cache_hits", 2)
    metrics = usage.to_metrics(CyclesMetrics(latency_ms=5, custom={"a": 1}))
    assert metrics == CyclesMetrics(
        tokens_input=11,
        tokens_output=5,
        latency_ms=5,
        model_version="gpt-4o-2025",
        custom={"a": 1, "cache_hits": 2},
    )
    with pytest.raises(ValueError, match="non-negative"):
        usage.add_output_tokens(-1)
    with pytest.raises(ValueError, match="non-negative"):
        usage.add_cost(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sync


def test_completed_stream_commits_priced_usage(fake: Any, client: Any) -> None:
    stream = stream_reservation(client, **OPTIONS, cost_fn=price)
    assert isinstance(stream, StreamReservation)
    with stream:
        assert get_cycles_context() is stream.context
        stream.usage.add_input_tokens(100)
        for _ in range(4):
            stream.usage.add_output_tokens(25)
        stream.usage.set_model_version("gpt-4o-mini")
    assert get_cycles_context() is None
    (commit,) = fake.commits()
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 100 * 10 + 100 * 30}
    assert commit["metrics"] == {
        "tokens_input": 100,
        "tokens_output": 100,
        "model_version": "gpt-4o-mini",
    }
    assert commit["metadata"] == {"stream_outcome": "completed"}


def test_client_stream_reservation_method(fake: Any, client: Any) -> None:
    stream = client.stream_reservation(**OPTIONS, cost_fn=price)
    assert type(stream) is StreamReservation
    assert fake.calls == []
    with client.stream_reservation(**OPTIONS, cost_fn=price) as entered:
        assert get_cycles_context() is entered.context
        entered.usage.add_tokens(input=10, output=10)
    (commit,) = fake.commits()
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 400}
    assert commit["metadata"] == {"stream_outcome": "completed"}


async def test_async_client_stream_reservation_method(fake: Any, aclient: Any) -> None:
    stream = aclient.stream_reservation(**OPTIONS, cost_fn=price)
    assert type(stream) is AsyncStreamReservation
    assert fake.calls == []

    async def relay() -> None:
        async with aclient.stream_reservation(**OPTIONS, cost_fn=price) as entered:
            for tokens in chunks(10):
                entered.usage.add_output_tokens(tokens)

    with pytest.raises(ConnectionError):
        await relay()
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 450
    assert commit["metadata"] == {"stream_outcome": "failed"}


def test_failed_stream_commits_partial_usage(fake: Any, client: Any) -> None:
    def relay() -> None:
        with stream_reservation(client, **OPTIONS, cost_fn=price) as stream:
            for tokens in chunks(10):
                stream.usage.add_output_tokens(tokens)

    with pytest.raises(ConnectionError):
        relay()
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 15 * 30  # three chunks arrived before the break
    assert commit["metadata"] == {"stream_outcome": "failed"}
    assert fake.releases() == []  # partial spend is never given back


def test_closed_generator_commits_partial_usage_as_cancelled(fake: Any, client: Any) -> None:
    def relay() -> Generator[str, None, None]:
        with stream_reservation(client, **OPTIONS, cost_fn=price) as stream:
            for index in range(100):
                stream.usage.add_output_tokens(1)
                yield f"chunk {index}"

    consumer = relay()
    assert [next(consumer) for _ in range(3)] == ["chunk 0", "chunk 1", "chunk 2"]
    consumer.close()  # the reader went away: GeneratorExit inside the with block
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 3 * 30
    assert commit["metadata"] == {"stream_outcome": "cancelled"}


def test_empty_stream_is_released(fake: Any, client: Any) -> None:
    with pytest.raises(TimeoutError), stream_reservation(client, **OPTIONS, cost_fn=price):
        raise TimeoutError("no first token")
    assert fake.commits() == []
    assert fake.releases()[0]["reason"] == "stream_failed_without_usage"
    with stream_reservation(client, **OPTIONS):
        pass
    assert fake.releases()[1]["reason"] == "stream_completed_without_usage"
    assert fake.statuses() == ["RELEASED", "RELEASED"]


def test_actual_cost_wins_over_cost_fn(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS, cost_fn=price) as stream:
        stream.usage.add_output_tokens(1_000)
        stream.usage.set_cost(123)
    assert fake.commits()[0]["actual"]["amount"] == 123


def test_tokens_unit_commits_the_token_count(fake: Any, client: Any) -> None:
    with stream_reservation(client, **{**OPTIONS, "unit": "TOKENS"}) as stream:
        stream.usage.add_tokens(input=40, output=2)
    assert fake.commits()[0]["actual"] == {"unit": "TOKENS", "amount": 42}


def test_no_pricing_commits_the_estimate_marked(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS) as stream:
        stream.usage.add_output_tokens(5)
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 20_000
    assert commit["metadata"] == {"stream_outcome": "completed", "actual_source": "estimate"}


def test_failing_cost_fn_commits_the_estimate_flagged_with_commit_estimate(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # the opt-in of earlier versions' behaviour (the default raises: see
    # test_stream_unknown_actual.py)
    def broken(usage: StreamUsage) -> int:
        raise KeyError("no price for model")

    with (
        caplog.at_level(logging.ERROR, "runcycles"),
        stream_reservation(
            client, **OPTIONS, cost_fn=broken, on_unknown_actual="commit_estimate"
        ) as stream,
    ):
        stream.usage.add_output_tokens(5)
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 20_000
    assert commit["metadata"]["actual_source"] == "estimate"
    assert commit["metadata"]["actual_error"].startswith("KeyError")
    assert "cannot price the usage of stream reservation rsv_1" in caplog.text


def test_garbage_usage_commits_the_estimate_flagged_with_commit_estimate(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, "runcycles"),
        stream_reservation(client, **OPTIONS, on_unknown_actual="commit_estimate") as stream,
    ):
        stream.usage.actual_cost = -5  # assigned directly, bypassing the helpers
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 20_000
    assert commit["metadata"]["actual_error"].startswith("ValueError")
    assert fake.statuses() == ["COMMITTED"]
    assert "cannot price the usage" in caplog.text


def test_invalid_metrics_never_block_the_commit(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, "runcycles"),
        stream_reservation(client, **OPTIONS, cost_fn=price) as stream,
    ):
        stream.usage.add_output_tokens(1)
        stream.usage.set_model_version("m" * 500)  # longer than the protocol allows
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 30
    assert "metrics" not in commit
    assert "dropping invalid metrics" in caplog.text


def test_explicit_commit_ends_the_stream_once(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS, cost_fn=price) as stream:
        stream.usage.add_output_tokens(2)
        result = stream.commit()
        assert result.settled
        with pytest.raises(ReservationAlreadyFinalizedError):
            stream.commit(5)
    assert len(fake.commits()) == 1
    assert fake.commits()[0]["actual"]["amount"] == 60


def test_explicit_release(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS) as stream:
        stream.usage.add_output_tokens(2)
        stream.release("user aborted before billing")
    assert fake.commits() == []
    assert fake.statuses() == ["RELEASED"]


def test_denied_stream_never_starts(fake: Any, client: Any) -> None:
    fake.reject = (409, "BUDGET_EXCEEDED")
    started: list[bool] = []
    with pytest.raises(BudgetExceededError), stream_reservation(client, **OPTIONS):
        started.append(True)
    assert started == []


def test_commit_failure_is_recorded_not_raised(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake.commit_status = (409, "BUDGET_EXCEEDED")
    with (
        caplog.at_level(logging.ERROR, "runcycles"),
        stream_reservation(client, **OPTIONS, overage_policy="REJECT", cost_fn=price) as s,
    ):
        s.usage.add_output_tokens(10_000)
    assert isinstance(s.settlement_error, BudgetExceededError)
    assert "settling stream reservation rsv_1 failed" in caplog.text


def test_caps_are_exposed(fake: Any, client: Any) -> None:
    fake.caps = {"max_tokens": 128}
    with stream_reservation(client, **OPTIONS) as stream:
        assert stream.caps is not None
        assert stream.caps.max_tokens == 128
        assert stream.reservation_id == "rsv_1"
        assert stream.decision.value == "ALLOW_WITH_CAPS"
        assert stream.estimate.amount == 20_000
        stream.release()


def test_bad_cost_fn_is_refused(client: Any) -> None:
    with pytest.raises(TypeError, match="cost_fn"):
        stream_reservation(client, **OPTIONS, cost_fn=5)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- async


async def test_async_completed_stream_commits(fake: Any, aclient: Any) -> None:
    stream = stream_reservation(aclient, **OPTIONS, cost_fn=price)
    assert isinstance(stream, AsyncStreamReservation)
    async with stream:
        stream.usage.add_tokens(input=10, output=10)
    assert fake.commits()[0]["actual"]["amount"] == 400
    assert fake.commits()[0]["metadata"] == {"stream_outcome": "completed"}


async def test_async_failed_stream_commits_partial(fake: Any, aclient: Any) -> None:
    async def relay() -> None:
        async with stream_reservation(aclient, **OPTIONS, cost_fn=price) as stream:
            for tokens in chunks(10):
                stream.usage.add_output_tokens(tokens)

    with pytest.raises(ConnectionError):
        await relay()
    assert fake.commits()[0]["actual"]["amount"] == 450
    assert fake.commits()[0]["metadata"] == {"stream_outcome": "failed"}


async def test_async_cancelled_stream_commits_partial(fake: Any, aclient: Any) -> None:
    produced = asyncio.Event()

    async def consume() -> None:
        async with stream_reservation(aclient, **OPTIONS, cost_fn=price) as stream:
            for _ in range(1_000):
                stream.usage.add_output_tokens(1)
                if stream.usage.tokens_output == 7:
                    produced.set()
                await asyncio.sleep(0.001 if stream.usage.tokens_output < 7 else 60)

    task = asyncio.create_task(consume())
    await produced.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 7 * 30
    assert commit["metadata"] == {"stream_outcome": "cancelled"}


async def test_async_generator_closed_early_commits_partial(fake: Any, aclient: Any) -> None:
    async def relay() -> AsyncGenerator[int, None]:
        async with stream_reservation(aclient, **OPTIONS, cost_fn=price) as stream:
            for index in range(100):
                stream.usage.add_output_tokens(1)
                yield index

    consumer = relay()
    assert [await consumer.__anext__() for _ in range(4)] == [0, 1, 2, 3]
    await consumer.aclose()
    assert fake.commits()[0]["actual"]["amount"] == 4 * 30
    assert fake.commits()[0]["metadata"] == {"stream_outcome": "cancelled"}


async def test_async_empty_stream_is_released(fake: Any, aclient: Any) -> None:
    async with stream_reservation(aclient, **OPTIONS):
        pass
    assert fake.statuses() == ["RELEASED"]


async def test_async_explicit_commit(fake: Any, aclient: Any) -> None:
    async with stream_reservation(aclient, **OPTIONS) as stream:
        result = await stream.commit(99)
        assert result.outcome == "committed"
        with pytest.raises(ReservationAlreadyFinalizedError):
            await stream.release()
    assert fake.commits()[0]["actual"]["amount"] == 99
