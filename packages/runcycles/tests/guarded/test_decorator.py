"""``@cycles`` on sync and async functions."""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
from typing import Any

import httpx
import pytest

from runcycles import (
    Amount,
    AsyncCyclesClient,
    BudgetExceededError,
    CommitOveragePolicy,
    CyclesClient,
    CyclesMetrics,
    CyclesProtocolError,
    Decision,
    DryRunResult,
    Unit,
    UnknownActualError,
    cycles,
    get_cycles_context,
)

# --------------------------------------------------------------------------- success


def test_commits_actual_of_the_result(fake: Any, client: Any) -> None:
    @cycles(estimate=1_000, actual=lambda result: len(result), client=client)
    def greet(name: str) -> str:
        ctx = get_cycles_context()
        assert ctx is not None
        assert ctx.reservation_id == "rsv_1"
        return f"hello {name}"

    assert greet("bob") == "hello bob"
    (create,) = fake.creates()
    assert create["estimate"] == {"unit": "USD_MICROCENTS", "amount": 1_000}
    assert create["action"] == {
        "kind": "function",
        "name": "test_commits_actual_of_the_result.<locals>.greet",
    }
    assert create["subject"] == {"tenant": "acme"}
    (commit,) = fake.commits()
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 9}
    assert "metadata" not in commit
    assert commit["metrics"]["latency_ms"] >= 0
    assert get_cycles_context() is None


async def test_async_commits_actual_of_the_result(fake: Any, aclient: Any) -> None:
    @cycles(estimate=1_000, actual=lambda result: result * 2, client=aclient)
    async def work(n: int) -> int:
        await asyncio.sleep(0)
        assert get_cycles_context() is not None
        return n

    assert await work(21) == 21
    assert fake.commits()[0]["actual"]["amount"] == 42
    assert fake.statuses() == ["COMMITTED"]


def test_estimate_and_subject_from_the_arguments(fake: Any, client: Any) -> None:
    @cycles(
        estimate=lambda prompt, tokens: tokens * 10,
        action_kind="llm.completion",
        action_name="gpt-4",
        action_tags=["chat"],
        unit="TOKENS",
        agent=lambda prompt, tokens: f"agent-{tokens}",
        workspace="prod",
        dimensions=lambda prompt, tokens: {"prompt_len": str(len(prompt))},
        metadata={"team": "search"},
        ttl_ms=30_000,
        grace_period_ms=2_000,
        client=client,
    )
    def call(prompt: str, tokens: int) -> str:
        return prompt

    call("hey", tokens=7)
    (create,) = fake.creates()
    assert create["estimate"] == {"unit": "TOKENS", "amount": 70}
    assert create["subject"] == {
        "tenant": "acme",
        "workspace": "prod",
        "agent": "agent-7",
        "dimensions": {"prompt_len": "3"},
    }
    assert create["action"] == {"kind": "llm.completion", "name": "gpt-4", "tags": ["chat"]}
    assert create["metadata"] == {"team": "search"}
    assert create["ttl_ms"] == 30_000
    assert create["grace_period_ms"] == 2_000
    # no actual: the estimate is committed, and says so
    (commit,) = fake.commits()
    assert commit["actual"] == {"unit": "TOKENS", "amount": 70}
    assert commit["metadata"] == {"actual_source": "estimate"}


def test_static_actual_and_amount_estimate(fake: Any, client: Any) -> None:
    @cycles(estimate=Amount(unit=Unit.CREDITS, amount=5), actual=3, unit="CREDITS", client=client)
    def job() -> None:
        return None

    job()
    assert fake.commits()[0]["actual"] == {"unit": "CREDITS", "amount": 3}


def test_metrics_and_commit_metadata_from_the_context(fake: Any, client: Any) -> None:
    @cycles(estimate=100, client=client)
    def job() -> str:
        ctx = get_cycles_context()
        assert ctx is not None
        ctx.metrics = CyclesMetrics(tokens_input=5, tokens_output=6, latency_ms=99)
        ctx.commit_metadata = {"trace": "t-1"}
        return "ok"

    job()
    (commit,) = fake.commits()
    assert commit["metrics"] == {"tokens_input": 5, "tokens_output": 6, "latency_ms": 99}
    assert commit["metadata"] == {"trace": "t-1", "actual_source": "estimate"}


def test_each_call_uses_fresh_idempotency_keys(fake: Any, client: Any) -> None:
    @cycles(estimate=1, client=client)
    def job() -> None:
        return None

    job()
    job()
    keys = [call.body["idempotency_key"] for call in fake.calls]
    assert len(keys) == 4
    assert len(set(keys)) == 4
    assert [c.headers["x-idempotency-key"] for c in fake.calls] == keys


def test_wraps_keeps_the_functions_identity(client: Any) -> None:
    @cycles(estimate=1, client=client)
    def documented(x: int) -> int:
        """Doc."""
        return x

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Doc."


def test_client_without_subject_uses_the_api_keys_tenant_once(fake: Any) -> None:
    fake.key_tenant = "keyco"
    with fake.sync_client(tenant=None) as bare:

        @cycles(estimate=1, agent=lambda: None, client=bare)
        def dynamic() -> None:
            return None

        @cycles(estimate=1, client=bare)
        def static() -> None:
            return None

        dynamic()
        static()
        static()
    assert [body["subject"] for body in fake.creates()] == [{"tenant": "keyco"}] * 3
    assert fake.paths().count("GET /v1/reservations") == 1


async def test_async_dry_run_without_subject_uses_the_api_keys_tenant(fake: Any) -> None:
    async with fake.async_client(tenant=None) as bare:

        @cycles(estimate=1, dry_run=True, client=bare)
        async def shadow() -> None:
            return None

        result = await shadow()
    assert result.decision is Decision.ALLOW
    assert fake.creates()[0]["subject"] == {"tenant": "acme"}


# --------------------------------------------------------------------------- actual errors


UNKNOWN_ACTUALS = [
    pytest.param(lambda result: None, "actual returned None", id="returns-None"),
    pytest.param(lambda result: result["missing"], "KeyError: 'missing'", id="raises"),
    pytest.param(lambda result: -3, "ValueError: actual must be >= 0", id="negative"),
    pytest.param(lambda result: 2.5, "TypeError: actual must be an int", id="float"),
    pytest.param(
        lambda result: Amount(unit=Unit.TOKENS, amount=3),
        "ValueError: actual is in TOKENS",
        id="other-unit",
    ),
]


def sent_after_create(fake: Any) -> list[str]:
    """Every request after the reservation was created (commit, event, release, extend)."""
    return [path for path in fake.paths() if path != "POST /v1/reservations"]


@pytest.mark.parametrize(("actual", "reason"), UNKNOWN_ACTUALS)
def test_unknown_actual_raises_and_sends_nothing(
    fake: Any, client: Any, actual: Any, reason: str
) -> None:
    @cycles(estimate=500, actual=actual, client=client)
    def job() -> dict[str, int]:
        return {"answer": 42}

    with pytest.raises(UnknownActualError, match="left to expire") as raised:
        job()
    error = raised.value
    assert error.reservation_id == "rsv_1"
    assert error.reason is not None
    assert error.reason.startswith(reason)
    assert error.result == {"answer": 42}
    assert (error.__cause__ is None) == (reason == "actual returned None")
    assert sent_after_create(fake) == []  # no commit, no event, no release
    assert fake.statuses() == ["ACTIVE"]  # left to expire at its lease
    assert len(client.heartbeat) == 0  # heartbeat stopped
    assert get_cycles_context() is None


@pytest.mark.parametrize(("actual", "reason"), UNKNOWN_ACTUALS)
async def test_async_unknown_actual_raises_and_sends_nothing(
    fake: Any, aclient: Any, actual: Any, reason: str
) -> None:
    @cycles(estimate=500, actual=actual, client=aclient)
    async def job() -> dict[str, int]:
        return {"answer": 42}

    with pytest.raises(UnknownActualError) as raised:
        await job()
    assert raised.value.result == {"answer": 42}
    assert raised.value.reason is not None
    assert raised.value.reason.startswith(reason)
    assert sent_after_create(fake) == []
    assert fake.statuses() == ["ACTIVE"]
    assert len(aclient.heartbeat) == 0
    assert get_cycles_context() is None


def test_unknown_actual_error_pickles_without_the_result(fake: Any, client: Any) -> None:
    @cycles(estimate=500, actual=lambda result: None, client=client)
    def job() -> object:
        return threading.Lock()  # not picklable

    with pytest.raises(UnknownActualError) as raised:
        job()
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is UnknownActualError
    assert str(copy) == str(raised.value)
    assert copy.reservation_id == "rsv_1"
    assert copy.reason == "actual returned None"
    assert copy.result is None


@pytest.mark.parametrize(("actual", "reason"), UNKNOWN_ACTUALS)
def test_unknown_actual_release_option_releases_and_returns(
    fake: Any, client: Any, actual: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    @cycles(estimate=500, actual=actual, client=client, on_unknown_actual="release")
    def job() -> str:
        return "done"

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert job() == "done"
    assert fake.commits() == []
    assert fake.paths().count("POST /v1/events") == 0
    (release,) = fake.releases()
    assert release["reason"] == "actual_unknown"
    assert fake.statuses() == ["RELEASED"]
    assert reason in caplog.text
    assert "on_unknown_actual='release'" in caplog.text


async def test_async_unknown_actual_release_option(
    fake: Any, aclient: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @cycles(estimate=500, actual=lambda result: None, client=aclient, on_unknown_actual="release")
    async def job() -> str:
        return "done"

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert await job() == "done"
    assert fake.commits() == []
    assert fake.statuses() == ["RELEASED"]
    assert "actual returned None" in caplog.text


def test_unknown_actual_release_failure_is_logged_and_result_returned(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake.release_status = (500, "INTERNAL_ERROR")

    @cycles(estimate=500, actual=lambda result: None, client=client, on_unknown_actual="release")
    def job() -> str:
        return "done"

    with caplog.at_level(logging.WARNING, "runcycles"):
        assert job() == "done"
    assert fake.commits() == []
    assert "could not release reservation rsv_1" in caplog.text


def test_failing_actual_commits_the_estimate_when_asked_to(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(result: str) -> int:
        raise ValueError("cannot measure")

    @cycles(estimate=500, actual=broken, client=client, on_unknown_actual="commit_estimate")
    def job() -> str:
        return "done"

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert job() == "done"
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 500
    assert commit["metadata"] == {
        "actual_source": "estimate",
        "actual_error": "ValueError: cannot measure",
    }
    assert (
        "the actual= of reservation rsv_1 failed (ValueError: cannot measure); committing"
        in caplog.text
    )
    assert fake.statuses() == ["COMMITTED"]


async def test_async_failing_actual_commits_the_estimate_when_asked_to(
    fake: Any, aclient: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @cycles(
        estimate=500,
        actual=lambda result: result["missing"],
        client=aclient,
        on_unknown_actual="commit_estimate",
    )
    async def job() -> dict[str, int]:
        return {}

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert await job() == {}
    assert fake.commits()[0]["metadata"]["actual_source"] == "estimate"
    assert fake.commits()[0]["metadata"]["actual_error"] == "KeyError: 'missing'"


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (-3, "ValueError: actual must be >= 0"),
        (2.5, "TypeError: actual must be an int"),
        (Amount(unit=Unit.TOKENS, amount=3), "ValueError: actual is in TOKENS"),
    ],
)
def test_unusable_actual_commits_the_estimate_flagged_when_asked_to(
    fake: Any, client: Any, bad: Any, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    @cycles(
        estimate=500, actual=lambda result: bad, client=client, on_unknown_actual="commit_estimate"
    )
    def job() -> str:
        return "done"

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert job() == "done"
    (commit,) = fake.commits()
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 500}
    assert commit["metadata"]["actual_source"] == "estimate"
    assert commit["metadata"]["actual_error"].startswith(error)
    assert fake.statuses() == ["COMMITTED"]


def test_actual_returning_none_commits_the_estimate_marked_when_asked_to(
    fake: Any, client: Any
) -> None:
    @cycles(
        estimate=500,
        actual=lambda result: None,
        client=client,
        on_unknown_actual="commit_estimate",
    )
    def job() -> str:
        return "done"

    assert job() == "done"
    (commit,) = fake.commits()
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 500}
    assert commit["metadata"] == {"actual_source": "estimate"}


def test_no_actual_at_all_still_commits_the_estimate(fake: Any, client: Any) -> None:
    @cycles(estimate=500, client=client)  # no actual=: the estimate is the agreed charge
    def job() -> str:
        return "done"

    assert job() == "done"
    assert fake.commits()[0]["metadata"] == {"actual_source": "estimate"}


def test_bad_on_unknown_actual_fails_at_decoration(client: Any) -> None:
    with pytest.raises(ValueError, match="on_unknown_actual must be one of 'raise'"):
        cycles(estimate=5, client=client, on_unknown_actual="ignore")(lambda: None)  # type: ignore[call-overload]


def test_static_actual_in_another_unit_fails_at_decoration(client: Any) -> None:
    with pytest.raises(ValueError, match="use one unit"):
        cycles(estimate=5, actual=Amount(unit=Unit.TOKENS, amount=1), client=client)(lambda: None)


def test_bad_static_subject_fails_at_decoration(fake: Any, client: Any) -> None:
    with pytest.raises(ValueError, match="128"):
        cycles(estimate=5, agent="x" * 129, client=client)(lambda: None)
    assert fake.calls == []


def test_wrong_types_on_the_context_never_lose_the_commit(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @cycles(estimate=50, actual=7, client=client)
    def job() -> str:
        ctx = get_cycles_context()
        assert ctx is not None
        ctx.metrics = {"tokens_input": 3}  # type: ignore[assignment]
        ctx.commit_metadata = ["not", "a", "dict"]  # type: ignore[assignment]
        return "done"

    with caplog.at_level(logging.WARNING, "runcycles"):
        assert job() == "done"
    (commit,) = fake.commits()
    assert commit["actual"]["amount"] == 7
    assert "tokens_input" not in commit["metrics"]
    assert "ignoring ctx.metrics" in caplog.text
    assert "ignoring ctx.commit_metadata" in caplog.text


def test_commit_failure_is_logged_and_the_result_returned(
    fake: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake.commit_status = (409, "BUDGET_EXCEEDED")

    @cycles(estimate=10, actual=1_000, overage_policy=CommitOveragePolicy.REJECT, client=client)
    def job() -> str:
        return "side effect happened"

    with caplog.at_level(logging.ERROR, "runcycles"):
        assert job() == "side effect happened"
    assert "commit of reservation rsv_1 failed" in caplog.text
    assert fake.releases() == []  # known spend is never released


# --------------------------------------------------------------------------- failures


def test_deny_raises_before_the_function_runs(fake: Any, client: Any) -> None:
    fake.reject = (409, "BUDGET_EXCEEDED")
    ran: list[bool] = []

    @cycles(estimate=1_000, client=client)
    def guarded_func() -> str:
        ran.append(True)
        return "result"

    with pytest.raises(BudgetExceededError) as info:
        guarded_func()
    assert ran == []
    assert info.value.error_code == "BUDGET_EXCEEDED"
    assert fake.paths() == ["POST /v1/reservations"]


async def test_async_deny_raises_before_the_function_runs(fake: Any, aclient: Any) -> None:
    fake.deny_reason = "BUDGET_EXCEEDED"
    ran: list[bool] = []

    @cycles(estimate=1_000, client=aclient)
    async def guarded_func() -> str:
        ran.append(True)
        return "result"

    with pytest.raises(BudgetExceededError):
        await guarded_func()
    assert ran == []


def test_exception_releases_and_reraises(fake: Any, client: Any) -> None:
    @cycles(estimate=1_000, client=client)
    def job() -> None:
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError, match="model down"):
        job()
    assert fake.statuses() == ["RELEASED"]
    assert fake.releases()[0]["reason"] == "guarded_code_raised:RuntimeError"
    assert fake.commits() == []
    assert get_cycles_context() is None


async def test_async_exception_releases_and_reraises(fake: Any, aclient: Any) -> None:
    @cycles(estimate=1_000, client=aclient)
    async def job() -> None:
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError):
        await job()
    assert fake.statuses() == ["RELEASED"]


async def test_async_cancellation_releases(fake: Any, aclient: Any) -> None:
    started = asyncio.Event()

    @cycles(estimate=1_000, client=aclient)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.statuses() == ["RELEASED"]
    assert fake.releases()[0]["reason"] == "guarded_code_cancelled"


# --------------------------------------------------------------------------- dry run


def test_dry_run_returns_result_and_never_runs(fake: Any, client: Any) -> None:
    ran: list[bool] = []

    @cycles(estimate=1000, dry_run=True, client=client)
    def shadow_func() -> str:
        ran.append(True)
        return "result"

    result = shadow_func()
    assert isinstance(result, DryRunResult)
    assert result.decision is Decision.ALLOW
    assert ran == []
    assert fake.creates()[0]["dry_run"] is True
    assert fake.reservations == {}
    assert fake.commits() == []
    assert fake.releases() == []


async def test_async_dry_run_deny_is_a_result(fake: Any, aclient: Any) -> None:
    fake.dry_run_decision = "DENY"
    ran: list[bool] = []

    @cycles(estimate=1000, dry_run=True, client=aclient)
    async def shadow_func() -> str:
        ran.append(True)
        return "result"

    result = await shadow_func()
    assert result.decision is Decision.DENY
    assert result.reason_code == "BUDGET_EXCEEDED"
    assert ran == []


# --------------------------------------------------------------------------- decoration errors


def test_generators_are_refused(client: Any) -> None:
    with pytest.raises(TypeError, match="stream_reservation"):

        @cycles(estimate=1, client=client)
        def gen() -> Any:
            yield 1

    with pytest.raises(TypeError, match="generator"):

        @cycles(estimate=1, client=client)
        async def agen() -> Any:
            yield 1


def test_client_of_the_wrong_flavour_is_refused(client: Any, aclient: Any) -> None:
    with pytest.raises(TypeError, match="AsyncCyclesClient"):

        @cycles(estimate=1, client=client)
        async def job() -> None:
            return None

    with pytest.raises(TypeError, match="pass a CyclesClient"):

        @cycles(estimate=1, client=aclient)
        def sync_job() -> None:
            return None


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"overage_policy": "SOMETIMES"}, ValueError),
        ({"ttl_ms": 10}, ValueError),
        ({"estimate": -5}, ValueError),
        ({"estimate": "5"}, TypeError),
        ({"unit": "EUROS"}, ValueError),
        ({"action_tags": ["x"] * 11}, ValueError),
    ],
)
def test_bad_options_fail_at_decoration(
    fake: Any, client: Any, options: dict[str, Any], error: type[Exception]
) -> None:
    values: dict[str, Any] = {"estimate": 1, "client": client, **options}
    with pytest.raises(error):
        cycles(**values)(lambda: None)
    assert fake.calls == []


def test_overage_policy_string_is_sent(fake: Any, client: Any) -> None:
    @cycles(estimate=1000, overage_policy="ALLOW_WITH_OVERDRAFT", client=client)
    def overdraft_func() -> str:
        return "result"

    assert overdraft_func() == "result"
    assert fake.creates()[0]["overage_policy"] == "ALLOW_WITH_OVERDRAFT"


def test_unknown_protocol_error_is_still_a_protocol_error(fake: Any, client: Any) -> None:
    fake.reject = (409, "SOMETHING_NEW")

    @cycles(estimate=1, client=client)
    def job() -> None:
        pytest.fail("must not run")

    with pytest.raises(CyclesProtocolError) as info:
        job()
    assert info.value.error_code == "SOMETHING_NEW"
    assert not info.value.is_retryable()


async def test_async_commit_survives_cancellation_of_the_caller(fake: Any) -> None:
    commit_started = asyncio.Event()
    let_commit_finish = asyncio.Event()

    async def slow_commits(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/commit"):
            commit_started.set()
            await let_commit_finish.wait()
        response: httpx.Response = fake.handler(request)
        return response

    async with AsyncCyclesClient(
        fake.config(), transport=httpx.MockTransport(slow_commits)
    ) as slow:

        @cycles(estimate=100, actual=40, client=slow)
        async def job() -> str:
            return "done"

        task = asyncio.create_task(job())
        await commit_started.wait()
        task.cancel()  # e.g. a timeout fires while the spend is being recorded
        with pytest.raises(asyncio.CancelledError):
            await task
        let_commit_finish.set()
        for _ in range(100):
            if fake.statuses() == ["COMMITTED"]:
                break
            await asyncio.sleep(0.01)
    assert fake.statuses() == ["COMMITTED"]
    assert fake.commits()[0]["actual"]["amount"] == 40
    assert fake.releases() == []


async def test_object_with_async_call_is_guarded_as_async(fake: Any, aclient: Any) -> None:
    class Tool:
        async def __call__(self, query: str) -> str:
            return query.upper()

    guarded = cycles(estimate=5, action_name="search", client=aclient)(Tool())
    assert await guarded("hi") == "HI"
    assert fake.statuses() == ["COMMITTED"]
    with pytest.raises(TypeError, match="Tool is async"):
        cycles(estimate=5, client=CyclesClient(fake.config()))(Tool())
