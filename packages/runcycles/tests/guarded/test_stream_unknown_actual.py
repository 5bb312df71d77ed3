"""Stream reservations never turn an unknown actual into a charge (``on_unknown_actual``).

When a way to price the usage was given but fails (``cost_fn`` raises or returns something
that is not a non-negative int, ``usage.actual_cost`` or a ``TOKENS`` count is invalid), no
commit and no event is sent (recovery scenario ``CR-BOUNDARY-001``, as for ``@cycles``):
``"raise"`` (default) leaves the reservation to expire and raises ``UnknownActualError``,
``"release"`` releases it, ``"commit_estimate"`` commits the flagged estimate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runcycles import (
    AsyncStreamReservation,
    ReservationAlreadyFinalizedError,
    StreamReservation,
    StreamUsage,
    UnknownActualError,
    stream_reservation,
)
from runcycles.lifecycle import OnUnknownActual
from runcycles.testing.recovery_adapter import observe

OPTIONS: dict[str, Any] = {
    "estimate": 20_000,
    "action_kind": "llm.completion",
    "action_name": "gpt-4o",
}
CREATE = "POST /v1/reservations"
RELEASE = "POST /v1/reservations/rsv_1/release"
COMMIT = "POST /v1/reservations/rsv_1/commit"
CATALOG_PATH = Path(__file__).resolve().parents[4] / "spec" / "client-recovery-scenarios.yaml"


def price(usage: StreamUsage) -> int:
    return usage.tokens_input * 10 + usage.tokens_output * 30


def no_price(usage: StreamUsage) -> int:
    raise KeyError("no price for model")


def add_tokens(usage: StreamUsage) -> None:
    usage.add_tokens(input=4, output=5)


def negative_cost(usage: StreamUsage) -> None:
    usage.add_output_tokens(5)
    usage.actual_cost = -5  # assigned directly, bypassing the helpers


def float_cost(usage: StreamUsage) -> None:
    usage.add_output_tokens(5)
    usage.actual_cost = 2.5  # type: ignore[assignment]


def negative_tokens(usage: StreamUsage) -> None:
    usage.tokens_output = -7


# (extra options, how the block fills the usage, the failure's type name)
UNKNOWN: list[Any] = [
    pytest.param({"cost_fn": no_price}, add_tokens, "KeyError", id="cost_fn-raises"),
    pytest.param({"cost_fn": lambda u: -1}, add_tokens, "ValueError", id="cost_fn-negative"),
    pytest.param({"cost_fn": lambda u: 1.5}, add_tokens, "ValueError", id="cost_fn-float"),
    pytest.param({"cost_fn": lambda u: True}, add_tokens, "ValueError", id="cost_fn-bool"),
    pytest.param({"cost_fn": lambda u: None}, add_tokens, "ValueError", id="cost_fn-none"),
    pytest.param({}, negative_cost, "ValueError", id="actual_cost-negative"),
    pytest.param({"cost_fn": price}, float_cost, "ValueError", id="actual_cost-float"),
    pytest.param({"unit": "TOKENS"}, negative_tokens, "ValueError", id="tokens-negative"),
]


def options(extra: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {**OPTIONS, **(extra or {}), **more}


def assert_left_to_expire(
    fake: Any, stream: StreamReservation | AsyncStreamReservation, error: UnknownActualError
) -> None:
    assert fake.paths() == [CREATE]  # no commit, no event, no release, no extend
    assert fake.statuses() == ["ACTIVE"]  # it expires at the end of its lease
    assert error.reservation_id == "rsv_1"
    assert "left to expire" in str(error)
    assert "on_unknown_actual='release'" in str(error)
    assert stream.settlement_error is error
    guard = stream._guard
    assert guard.is_finalized
    assert guard._heartbeat is None  # the heartbeat was stopped


# --------------------------------------------------------------------------- sync: raise


@pytest.mark.parametrize(("extra", "fill", "failure"), UNKNOWN)
def test_raise_is_the_default_and_sends_nothing(
    fake: Any,
    client: Any,
    extra: dict[str, Any],
    fill: Callable[[StreamUsage], None],
    failure: str,
) -> None:
    stream = stream_reservation(client, **options(extra))
    with pytest.raises(UnknownActualError) as raised, stream:
        fill(stream.usage)
    error = raised.value
    assert_left_to_expire(fake, stream, error)
    assert error.reason is not None
    assert error.reason.startswith(failure)
    assert type(error.__cause__).__name__ == failure


def test_raise_never_masks_the_block_exception(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    broken = ConnectionError("stream broke")
    stream = stream_reservation(client, **OPTIONS, cost_fn=no_price)

    def relay() -> None:
        with stream:
            stream.usage.add_output_tokens(5)
            raise broken

    with caplog.at_level(logging.ERROR, "runcycles"), pytest.raises(ConnectionError) as raised:
        relay()
    assert raised.value is broken
    assert isinstance(stream.settlement_error, UnknownActualError)
    assert_left_to_expire(fake, stream, stream.settlement_error)
    assert "the stream's own ConnectionError propagates" in caplog.text


def test_raise_on_a_closed_generator_sends_nothing(fake: Any, client: Any) -> None:
    streams: list[StreamReservation] = []

    def relay() -> Generator[int, None, None]:
        with stream_reservation(client, **OPTIONS, cost_fn=no_price) as stream:
            streams.append(stream)
            for index in range(100):
                stream.usage.add_output_tokens(1)
                yield index

    consumer = relay()
    assert [next(consumer) for _ in range(3)] == [0, 1, 2]
    consumer.close()  # GeneratorExit: nothing may be raised over it
    (stream,) = streams
    assert isinstance(stream.settlement_error, UnknownActualError)
    assert_left_to_expire(fake, stream, stream.settlement_error)


# --------------------------------------------------------------------------- sync: release


def test_release_mode_releases(fake: Any, client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.ERROR, "runcycles"),
        stream_reservation(client, **OPTIONS, cost_fn=no_price, on_unknown_actual="release") as s,
    ):
        s.usage.add_output_tokens(5)
    assert fake.paths() == [CREATE, RELEASE]
    assert fake.releases()[0]["reason"] == "actual_unknown"
    assert fake.statuses() == ["RELEASED"]
    assert s.settlement_error is None
    assert "releasing it (on_unknown_actual='release')" in caplog.text


def test_release_mode_never_masks_the_block_exception(fake: Any, client: Any) -> None:
    broken = ConnectionError("stream broke")

    def relay() -> None:
        with stream_reservation(
            client, **OPTIONS, cost_fn=no_price, on_unknown_actual="release"
        ) as stream:
            stream.usage.add_output_tokens(5)
            raise broken

    with pytest.raises(ConnectionError) as raised:
        relay()
    assert raised.value is broken
    assert fake.paths() == [CREATE, RELEASE]
    assert fake.releases()[0]["reason"] == "actual_unknown"


# --------------------------------------------------------------------------- sync: estimate


@pytest.mark.parametrize(("extra", "fill", "failure"), UNKNOWN)
def test_commit_estimate_mode_commits_the_flagged_estimate(
    fake: Any,
    client: Any,
    extra: dict[str, Any],
    fill: Callable[[StreamUsage], None],
    failure: str,
) -> None:
    opts = options(extra, on_unknown_actual="commit_estimate")
    with stream_reservation(client, **opts) as stream:
        fill(stream.usage)
    assert fake.paths() == [CREATE, COMMIT]
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 20_000
    assert commit["metadata"]["actual_source"] == "estimate"
    assert commit["metadata"]["actual_error"].startswith(failure)
    assert stream.settlement_error is None


# --------------------------------------------------------------------------- sync: commit()


def test_explicit_commit_raise_leaves_it_to_expire(fake: Any, client: Any) -> None:
    with stream_reservation(client, **OPTIONS, cost_fn=no_price) as stream:
        stream.usage.add_output_tokens(5)
        with pytest.raises(UnknownActualError) as raised:
            stream.commit()
        with pytest.raises(ReservationAlreadyFinalizedError):
            stream.commit(5)  # the stream is over: settle by hand with the client
    assert_left_to_expire(fake, stream, raised.value)
    assert isinstance(raised.value.__cause__, KeyError)


def test_explicit_commit_release_mode_releases_and_raises(fake: Any, client: Any) -> None:
    with stream_reservation(
        client, **OPTIONS, cost_fn=no_price, on_unknown_actual="release"
    ) as stream:
        stream.usage.add_output_tokens(5)
        with pytest.raises(UnknownActualError, match="the reservation was released"):
            stream.commit()
    assert fake.paths() == [CREATE, RELEASE]
    assert fake.releases()[0]["reason"] == "actual_unknown"


def test_explicit_commit_commit_estimate_mode(fake: Any, client: Any) -> None:
    with stream_reservation(
        client, **OPTIONS, cost_fn=no_price, on_unknown_actual="commit_estimate"
    ) as stream:
        stream.usage.add_output_tokens(5)
        assert stream.commit().settled
    assert fake.paths() == [CREATE, COMMIT]
    assert fake.commits()[0]["metadata"]["actual_error"].startswith("KeyError")


# --------------------------------------------------------------------------- not unknown


@pytest.mark.parametrize(
    "case", ["no-way-to-measure", "empty-usage", "explicit-actual", "priced-by-actual-cost"]
)
def test_known_or_unmeasured_actuals_are_not_unknown(fake: Any, client: Any, case: str) -> None:
    """The default ``"raise"`` only applies to a *failed* measurement."""
    cost_fn = None if case == "no-way-to-measure" else no_price
    with stream_reservation(client, **OPTIONS, cost_fn=cost_fn) as stream:
        if case == "no-way-to-measure":
            stream.usage.add_output_tokens(5)
        elif case == "explicit-actual":
            stream.usage.add_output_tokens(5)
            stream.commit(77)
        elif case == "priced-by-actual-cost":
            stream.usage.add_output_tokens(5)
            stream.usage.set_cost(55)
    if case == "empty-usage":  # cost_fn is not even asked
        assert fake.paths() == [CREATE, RELEASE]
        assert fake.releases()[0]["reason"] == "stream_completed_without_usage"
        return
    (commit,) = fake.commits()
    if case == "no-way-to-measure":
        assert commit["actual"]["amount"] == 20_000
        assert commit["metadata"] == {"stream_outcome": "completed", "actual_source": "estimate"}
    else:
        assert commit["actual"]["amount"] == (77 if case == "explicit-actual" else 55)
        assert "actual_source" not in commit["metadata"]


# --------------------------------------------------------------------------- options


def test_unknown_mode_is_refused_everywhere(fake: Any, client: Any, aclient: Any) -> None:
    message = "on_unknown_actual must be one of 'raise', 'release', 'commit_estimate', got 'ignore'"
    builders: list[Callable[[], object]] = [
        lambda: StreamReservation(client, **OPTIONS, on_unknown_actual="ignore"),  # type: ignore[arg-type]
        lambda: AsyncStreamReservation(aclient, **OPTIONS, on_unknown_actual="ignore"),  # type: ignore[arg-type]
        lambda: stream_reservation(client, **OPTIONS, on_unknown_actual="ignore"),  # type: ignore[call-overload]
        lambda: stream_reservation(aclient, **OPTIONS, on_unknown_actual="ignore"),  # type: ignore[call-overload]
        lambda: client.stream_reservation(**OPTIONS, on_unknown_actual="ignore"),
        lambda: aclient.stream_reservation(**OPTIONS, on_unknown_actual="ignore"),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="on_unknown_actual must be one of") as raised:
            build()
        assert str(raised.value) == message
    assert fake.calls == []


def test_client_method_passes_the_mode(fake: Any, client: Any) -> None:
    with client.stream_reservation(
        **OPTIONS, cost_fn=no_price, on_unknown_actual="release"
    ) as stream:
        stream.usage.add_output_tokens(5)
    assert fake.paths() == [CREATE, RELEASE]
    with (
        pytest.raises(UnknownActualError),
        client.stream_reservation(**OPTIONS, cost_fn=no_price) as stream,
    ):
        stream.usage.add_output_tokens(5)
    assert fake.paths() == [CREATE, RELEASE, CREATE]


# --------------------------------------------------------------------------- async


@pytest.mark.parametrize(("extra", "fill", "failure"), UNKNOWN)
async def test_async_raise_is_the_default_and_sends_nothing(
    fake: Any,
    aclient: Any,
    extra: dict[str, Any],
    fill: Callable[[StreamUsage], None],
    failure: str,
) -> None:
    stream = stream_reservation(aclient, **options(extra))
    with pytest.raises(UnknownActualError) as raised:
        async with stream:
            fill(stream.usage)
    assert_left_to_expire(fake, stream, raised.value)
    assert type(raised.value.__cause__).__name__ == failure


async def test_async_raise_never_masks_the_block_exception(fake: Any, aclient: Any) -> None:
    broken = ConnectionError("stream broke")
    stream = stream_reservation(aclient, **OPTIONS, cost_fn=no_price)

    async def relay() -> None:
        async with stream:
            stream.usage.add_output_tokens(5)
            raise broken

    with pytest.raises(ConnectionError) as raised:
        await relay()
    assert raised.value is broken
    assert isinstance(stream.settlement_error, UnknownActualError)
    assert_left_to_expire(fake, stream, stream.settlement_error)


async def cancelled_stream(aclient: Any, mode: OnUnknownActual) -> AsyncStreamReservation:
    """Run a stream with a failing cost_fn until it produced tokens, then cancel it."""
    produced = asyncio.Event()
    streams: list[AsyncStreamReservation] = []

    async def consume() -> None:
        async with stream_reservation(
            aclient, **OPTIONS, cost_fn=no_price, on_unknown_actual=mode
        ) as stream:
            streams.append(stream)
            stream.usage.add_output_tokens(7)
            produced.set()
            await asyncio.Event().wait()  # parked until cancelled

    task = asyncio.create_task(consume())
    waiter = asyncio.create_task(produced.wait())
    # wait for the tokens, or for the task to end early (e.g. the option was refused)
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert not task.done(), task.exception()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return streams[0]


async def test_async_cancelled_stream_under_raise_sends_no_commit(fake: Any, aclient: Any) -> None:
    stream = await cancelled_stream(aclient, "raise")
    assert fake.commits() == []
    assert isinstance(stream.settlement_error, UnknownActualError)
    assert_left_to_expire(fake, stream, stream.settlement_error)


async def test_async_cancelled_stream_under_release_releases(fake: Any, aclient: Any) -> None:
    await cancelled_stream(aclient, "release")
    assert fake.paths() == [CREATE, RELEASE]
    assert fake.releases()[0]["reason"] == "actual_unknown"


async def test_async_cancelled_stream_under_commit_estimate_commits_it(
    fake: Any, aclient: Any
) -> None:
    await cancelled_stream(aclient, "commit_estimate")
    assert fake.paths() == [CREATE, COMMIT]
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 20_000
    assert commit["metadata"]["stream_outcome"] == "cancelled"
    assert commit["metadata"]["actual_error"].startswith("KeyError")


async def test_async_closed_generator_under_raise_sends_nothing(fake: Any, aclient: Any) -> None:
    streams: list[AsyncStreamReservation] = []

    async def relay() -> AsyncGenerator[int, None]:
        async with stream_reservation(aclient, **OPTIONS, cost_fn=no_price) as stream:
            streams.append(stream)
            for index in range(100):
                stream.usage.add_output_tokens(1)
                yield index

    consumer = relay()
    assert [await consumer.__anext__() for _ in range(3)] == [0, 1, 2]
    await consumer.aclose()
    (stream,) = streams
    assert isinstance(stream.settlement_error, UnknownActualError)
    assert_left_to_expire(fake, stream, stream.settlement_error)


async def test_async_release_mode_releases(fake: Any, aclient: Any) -> None:
    async with aclient.stream_reservation(
        **OPTIONS, cost_fn=no_price, on_unknown_actual="release"
    ) as stream:
        stream.usage.add_output_tokens(5)
    assert fake.paths() == [CREATE, RELEASE]
    assert fake.releases()[0]["reason"] == "actual_unknown"


async def test_async_commit_estimate_mode(fake: Any, aclient: Any) -> None:
    async with stream_reservation(
        aclient, **OPTIONS, cost_fn=no_price, on_unknown_actual="commit_estimate"
    ) as stream:
        stream.usage.add_output_tokens(5)
    assert fake.paths() == [CREATE, COMMIT]
    assert fake.commits()[0]["metadata"]["actual_source"] == "estimate"


async def test_async_explicit_commit_per_mode(fake: Any, aclient: Any) -> None:
    async with stream_reservation(aclient, **OPTIONS, cost_fn=no_price) as first:
        first.usage.add_output_tokens(5)
        with pytest.raises(UnknownActualError) as raised:
            await first.commit()
    assert_left_to_expire(fake, first, raised.value)
    async with stream_reservation(
        aclient, **OPTIONS, cost_fn=no_price, on_unknown_actual="release"
    ) as second:
        second.usage.add_output_tokens(5)
        with pytest.raises(UnknownActualError, match="the reservation was released"):
            await second.commit()
    async with stream_reservation(
        aclient, **OPTIONS, cost_fn=no_price, on_unknown_actual="commit_estimate"
    ) as third:
        third.usage.add_output_tokens(5)
        assert (await third.commit()).settled
    assert fake.paths() == [
        CREATE,
        CREATE,
        "POST /v1/reservations/rsv_2/release",
        CREATE,
        "POST /v1/reservations/rsv_3/commit",
    ]
    assert fake.releases()[0]["reason"] == "actual_unknown"


# --------------------------------------------------------------------------- CR-BOUNDARY-001


@pytest.mark.recovery("CR-BOUNDARY-001")
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_boundary_001_stream_with_unknown_actual_is_surfaced_without_settlement(
    fake: Any, mode: str
) -> None:
    """A stream whose usage cannot be priced sends nothing after its reservation and
    surfaces the condition; a stream whose own action failed surfaces that failure."""
    scenario = "CR-BOUNDARY-001"
    catalog = yaml.safe_load(CATALOG_PATH.read_text(encoding="utf-8"))
    (entry,) = [s for s in catalog["scenarios"] if s["id"] == scenario]
    broken = RuntimeError("provider failed")
    streams: list[StreamReservation | AsyncStreamReservation] = []

    def sync_relay(client: Any, fail: bool) -> None:
        with stream_reservation(client, **OPTIONS, cost_fn=no_price) as stream:
            streams.append(stream)
            stream.usage.add_output_tokens(5)
            if fail:
                raise broken

    async def async_relay(aclient: Any, fail: bool) -> None:
        async with stream_reservation(aclient, **OPTIONS, cost_fn=no_price) as stream:
            streams.append(stream)
            stream.usage.add_output_tokens(5)
            if fail:
                raise broken

    if mode == "sync":
        with fake.sync_client() as client:
            with pytest.raises(UnknownActualError) as raised:
                sync_relay(client, fail=False)
            with pytest.raises(RuntimeError) as failed:
                sync_relay(client, fail=True)
    else:
        async with fake.async_client() as aclient:
            with pytest.raises(UnknownActualError) as raised:
                await async_relay(aclient, fail=False)
            with pytest.raises(RuntimeError) as failed:
                await async_relay(aclient, fail=True)
    assert raised.value.reservation_id == "rsv_1"
    assert failed.value is broken  # the action's own failure is surfaced unchanged
    assert isinstance(streams[1].settlement_error, UnknownActualError)
    assert fake.paths() == [CREATE, CREATE]
    observed = [
        call.path.rsplit("/", 1)[-1] for call in fake.calls if call.path != "/v1/reservations"
    ]
    assert observed == entry["expected_requests"] == []
    assertions = [
        "no_commit_or_event_without_known_actual",
        "missing_actual_or_guarded_action_failure_is_surfaced",
    ]
    assert set(assertions) <= set(entry["assertions"])
    observe(scenario, observed, assertions)
