"""The guard's explicit start/finish API, for callbacks that split "before" and "after".

Every test runs on the sync and the async guard through one driver (``mode``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from runcycles import (
    Amount,
    BudgetExceededError,
    ModelPrice,
    Pricer,
    ReservationAlreadyFinalizedError,
    Unit,
    UnknownActualError,
    UnknownModelError,
    Usage,
    get_cycles_context,
    reserve,
)

OPTIONS: dict[str, Any] = {"estimate": 500, "action_kind": "llm.completion", "action_name": "m"}
MODES = pytest.mark.parametrize("mode", ["sync", "async"])


class Driver:
    """Calls a guard's methods the same way whichever twin it is."""

    def __init__(self, mode: str, fake: Any) -> None:
        self.client = fake.sync_client() if mode == "sync" else fake.async_client()
        self.mode = mode

    def guard(self, **options: Any) -> Any:
        return reserve(self.client, **{**OPTIONS, **options})

    async def call(self, guard: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(guard, name)(*args, **kwargs)
        return await result if self.mode == "async" else result

    async def close(self) -> None:
        if self.mode == "async":
            await self.client.aclose()
        else:
            self.client.close()


@pytest.fixture
async def drive(request: pytest.FixtureRequest, fake: Any) -> Any:
    driver = Driver(request.node.callspec.params["mode"], fake)
    yield driver
    await driver.close()


@MODES
async def test_start_reserves_without_publishing_a_context(mode: str, fake: Any, drive: Any):
    guard = drive.guard()
    assert await drive.call(guard, "start") is guard
    assert guard.reservation_id == "rsv_1"
    assert get_cycles_context() is None  # a callback never leaves a context variable set
    await drive.call(guard, "commit", 300)
    assert fake.commits()[0]["actual"]["amount"] == 300
    assert get_cycles_context() is None


@MODES
async def test_start_publish_sets_the_context(mode: str, drive: Any):
    guard = drive.guard()
    await drive.call(guard, "start", publish=True)
    context = get_cycles_context()
    assert context is not None
    assert context.reservation_id == guard.reservation_id
    await drive.call(guard, "release")


@MODES
async def test_a_denial_raises_from_start(mode: str, fake: Any, drive: Any):
    fake.reject = (409, "BUDGET_EXCEEDED")
    guard = drive.guard()
    with pytest.raises(BudgetExceededError):
        await drive.call(guard, "start")
    assert guard.reservation_id is None
    await drive.call(guard, "fail", RuntimeError("never ran"))  # not live: a no-op
    assert fake.releases() == []


@MODES
async def test_fail_releases_with_the_errors_name_and_never_raises(mode: str, fake, drive):
    guard = drive.guard()
    await drive.call(guard, "start")
    await drive.call(guard, "fail", ValueError("boom"))
    assert fake.releases()[0]["reason"] == "guarded_code_raised:ValueError"
    assert guard.is_finalized
    await drive.call(guard, "fail", ValueError("again"))  # finalized: a no-op
    assert len(fake.releases()) == 1


@MODES
async def test_fail_without_an_error_and_with_a_reason(mode: str, fake: Any, drive: Any):
    first, second = drive.guard(), drive.guard()
    await drive.call(first, "start")
    await drive.call(second, "start")
    await drive.call(first, "fail")
    await drive.call(second, "fail", reason="tool_denied")
    assert [body["reason"] for body in fake.releases()] == ["guarded_code_failed", "tool_denied"]


@MODES
async def test_fail_logs_a_failed_release(mode: str, fake: Any, drive: Any, caplog):
    fake.release_status = (500, "INTERNAL_ERROR")
    guard = drive.guard()
    await drive.call(guard, "start")
    with caplog.at_level(logging.WARNING, "runcycles"):
        await drive.call(guard, "fail", OSError("x"))  # does not raise
    assert "could not release reservation rsv_1" in caplog.text


@MODES
async def test_abandon_sends_nothing_and_stops_the_heartbeat(mode: str, fake: Any, drive: Any):
    guard = drive.guard()
    assert guard.abandon() is False  # nothing reserved yet
    await drive.call(guard, "start")
    assert guard.abandon() is True
    assert guard.abandon() is False
    assert fake.commits() == []
    assert fake.releases() == []
    assert guard._heartbeat is None
    with pytest.raises(ReservationAlreadyFinalizedError):
        await drive.call(guard, "commit", 1)


@MODES
async def test_settle_commits_a_known_actual(mode: str, fake: Any, drive: Any):
    guard = drive.guard()
    await drive.call(guard, "start")
    result = await drive.call(guard, "settle", 120, metadata={"k": "v"})
    assert result.settled
    assert fake.commits()[0]["actual"]["amount"] == 120
    assert fake.commits()[0]["metadata"] == {"k": "v"}


def _unknown(cause: bool = True) -> UnknownActualError:
    error = UnknownActualError("the usage of r is unknown", reservation_id="rsv_1", reason="E: x")
    if cause:
        error.__cause__ = KeyError("x")
    return error


@MODES
async def test_settle_unknown_raise_leaves_it_to_expire(mode: str, fake: Any, drive: Any):
    guard = drive.guard()
    await drive.call(guard, "start")
    with pytest.raises(UnknownActualError, match=r"left to expire.*Fix the pricing"):
        await drive.call(guard, "settle", _unknown(), fix="the pricing")
    assert fake.commits() == []
    assert fake.releases() == []
    assert guard.is_finalized
    assert guard._heartbeat is None


@MODES
async def test_settle_unknown_release(mode: str, fake: Any, drive: Any, caplog):
    guard = drive.guard()
    await drive.call(guard, "start")
    with caplog.at_level(logging.ERROR, "runcycles"):
        assert await drive.call(guard, "settle", _unknown(), on_unknown_actual="release") is None
    assert fake.releases()[0]["reason"] == "actual_unknown"
    assert fake.commits() == []
    assert "releasing it (on_unknown_actual='release')" in caplog.text


@MODES
@pytest.mark.parametrize("cause", [True, False])
async def test_settle_unknown_commit_estimate_flags_it(mode, fake, drive, cause, caplog):
    guard = drive.guard()
    await drive.call(guard, "start")
    with caplog.at_level(logging.ERROR, "runcycles"):
        result = await drive.call(
            guard,
            "settle",
            _unknown(cause),
            on_unknown_actual="commit_estimate",
            metadata={"outcome": "ok"},
        )
    assert result.settled
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 500
    expected = {"outcome": "ok", "actual_source": "estimate"}
    if cause:
        expected["actual_error"] = "E: x"
    assert commit["metadata"] == expected
    assert "committing the estimate instead" in caplog.text


@MODES
async def test_settle_refuses_an_unknown_policy(mode: str, drive: Any):
    guard = drive.guard()
    await drive.call(guard, "start")
    with pytest.raises(ValueError, match="on_unknown_actual must be one of"):
        await drive.call(guard, "settle", _unknown(), on_unknown_actual="guess")
    await drive.call(guard, "release")


@MODES
async def test_start_twice_is_refused(mode: str, drive: Any):
    guard = drive.guard()
    await drive.call(guard, "start")
    with pytest.raises(RuntimeError, match="entered only once"):
        await drive.call(guard, "start")
    await drive.call(guard, "release")


def test_a_guard_started_in_one_thread_is_finished_in_another(fake: Any, client: Any) -> None:
    guard = reserve(client, **OPTIONS).start()
    finished: list[object] = []
    worker = threading.Thread(target=lambda: finished.append(guard.commit(250)))
    worker.start()
    worker.join(5)
    assert finished
    assert fake.commits()[0]["actual"]["amount"] == 250


PRICER = Pricer(overrides={"m": ModelPrice(input_per_mtok="1", output_per_mtok="2")}, builtin=False)


@MODES
async def test_commit_prices_a_usage_and_sends_its_tokens(mode: str, fake: Any, drive: Any):
    guard = drive.guard()
    await drive.call(guard, "start")
    usage = Usage(input_tokens=1_000, output_tokens=500, model="m")
    await drive.call(guard, "commit", usage, pricer=PRICER)
    (commit,) = fake.commits()
    # 1,000 x $1/M + 500 x $2/M = $0.002 = 200,000 microcents (10^8 per dollar)
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 200_000}
    assert commit["metrics"] == {"tokens_input": 1_000, "tokens_output": 500, "model_version": "m"}


@MODES
async def test_commit_of_an_unpriced_model_raises_before_sending(mode: str, fake, drive):
    guard = drive.guard()
    await drive.call(guard, "start")
    with pytest.raises(UnknownModelError):
        await drive.call(guard, "commit", Usage(input_tokens=5, model="nope"), pricer=PRICER)
    assert fake.commits() == []
    assert not guard.is_finalized
    await drive.call(guard, "release")


@MODES
async def test_settle_turns_an_unpriced_usage_into_an_unknown_actual(mode: str, fake, drive):
    released, left = drive.guard(), drive.guard()
    await drive.call(released, "start")
    await drive.call(left, "start")
    usage = Usage(input_tokens=5, model="nope")
    assert (
        await drive.call(released, "settle", usage, pricer=PRICER, on_unknown_actual="release")
        is None
    )
    with pytest.raises(UnknownActualError, match="UnknownModelError") as raised:
        await drive.call(left, "settle", usage, pricer=PRICER)
    assert isinstance(raised.value.__cause__, UnknownModelError)
    assert fake.commits() == []
    assert [body["reason"] for body in fake.releases()] == ["actual_unknown"]


@MODES
async def test_the_estimate_policy_commits_the_estimate_flagged(mode: str, fake, drive):
    pricer = Pricer(builtin=False, unknown_model="estimate")
    guard = drive.guard()
    await drive.call(guard, "start")
    await drive.call(guard, "settle", Usage(input_tokens=5, model="nope"), pricer=pricer)
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 500
    assert commit["metadata"] == {"actual_source": "estimate"}


@MODES
async def test_usage_in_a_token_reservation_counts_tokens(mode: str, fake, drive):
    guard = drive.guard(unit="TOKENS", estimate=4_000)
    await drive.call(guard, "start")
    await drive.call(guard, "commit", Usage(input_tokens=1_200, output_tokens=300, model="x"))
    assert fake.commits()[0]["actual"] == {"unit": "TOKENS", "amount": 1_500}


@MODES
async def test_a_direct_amount_is_committed_as_it_is(mode: str, fake, drive):
    guard = drive.guard()
    await drive.call(guard, "start")
    await drive.call(guard, "commit", Usage(amount=Amount(unit=Unit.USD_MICROCENTS, amount=77)))
    assert fake.commits()[0]["actual"]["amount"] == 77
