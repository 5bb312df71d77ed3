"""Per-call work of a guarded call that must stay off the hot path, and its correctness.

The heartbeat worker (thread or task) must not be woken for each short reservation, yet must
still beat a reservation whose first beat is due earlier than its current wake-up; the
shielded commit must hand back results and errors like ``asyncio.shield``; the settlement's
first attempt sends the caller's commit body as built.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any

import httpx
import pytest

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig
from runcycles.heartbeat import AsyncHeartbeatScheduler, HeartbeatHandle, HeartbeatScheduler
from runcycles.lifecycle import _track, context_for, request_from_options, run_shielded
from runcycles.models import (
    Action,
    Amount,
    CommitRequest,
    Decision,
    ReservationCreateRequest,
    ReservationCreateResponse,
    StandardMetrics,
    Subject,
    Unit,
)
from runcycles.settlement import Settlement
from runcycles.testing.recovery_fakes import FakeLedger

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key", tenant="acme")
LONG: dict[str, Any] = {
    "ttl_ms": 60_000,
    "remaining_ttl_ms": 60_000,
    "expires_at_ms": 0,
    "rtt_ms": 1.0,
}
SHORT: dict[str, Any] = {
    "ttl_ms": 3_000,
    "remaining_ttl_ms": 3_030,
    "expires_at_ms": 0,
    "rtt_ms": 0,
}


def _wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_sync_worker_sleeps_through_short_reservations_and_wakes_for_earlier_ones() -> None:
    ledger = FakeLedger(remaining_ttl_ms=3_030)
    client = CyclesClient(CONFIG, transport=ledger.transport())
    scheduler = HeartbeatScheduler(client, attempt_timeout_ms=1_000)
    notified: list[int] = []
    real_notify = scheduler._cond.notify

    def counting_notify(n: int = 1) -> None:
        notified.append(n)
        real_notify(n)

    scheduler._cond.notify = counting_notify  # type: ignore[method-assign]
    try:
        scheduler.track("first", **LONG).stop()
        _wait_until(lambda: 0 < scheduler._wake_at_ms < float("inf"), "the worker to sleep")
        notified.clear()
        for i in range(200):  # more than the compaction threshold of stopped entries
            scheduler.track(f"short-{i}", **LONG).stop()
        assert notified == []  # every one of them is due after the worker's wake-up
        assert ledger.requests_to("extend") == []

        early = scheduler.track("early", **SHORT)  # due in ~30 ms: the worker must wake
        assert notified == [1]
        _wait_until(lambda: early.beats >= 2, "beats of the early reservation")
        early.stop()
    finally:
        scheduler.close()
        client.close()


async def test_async_worker_sleeps_through_short_reservations_and_wakes_for_earlier_ones() -> None:
    ledger = FakeLedger(remaining_ttl_ms=3_030)
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    scheduler = AsyncHeartbeatScheduler(client, attempt_timeout_ms=1_000)
    steps: list[object] = []
    real_pop_due = scheduler._pop_due

    def counting_pop_due(now_ms: float) -> object:
        result = real_pop_due(now_ms)
        steps.append(result)
        return result

    scheduler._pop_due = counting_pop_due  # type: ignore[assignment, method-assign]
    try:
        scheduler.track("first", **LONG).stop()
        for _ in range(3):
            await asyncio.sleep(0)  # the task starts, arms its timer and sleeps
        steps.clear()
        for i in range(200):
            handle = scheduler.track(f"short-{i}", **LONG)
            await asyncio.sleep(0)
            handle.stop()
            await asyncio.sleep(0)
        assert steps == []  # the task never ran for them
        assert scheduler.background_tasks == 1

        early = scheduler.track("early", **SHORT)
        deadline = time.monotonic() + 5
        while early.beats < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert early.beats >= 2
        early.stop()
    finally:
        await scheduler.aclose()
        await client.aclose()
    assert scheduler.background_tasks == 0


async def test_run_shielded_returns_the_result_and_raises_the_error() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 42

    async def failure() -> int:
        await asyncio.sleep(0)
        raise ValueError("commit rejected")

    assert await run_shielded(value()) == 42
    with pytest.raises(ValueError, match="commit rejected"):
        await run_shielded(failure())


async def test_run_shielded_finishes_after_the_caller_is_cancelled_and_drops_its_error() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    release = asyncio.Event()
    finished: list[str] = []

    async def settle(fail: bool) -> str:
        await release.wait()
        finished.append("failed" if fail else "done")
        if fail:
            raise RuntimeError("server said no")
        return "ok"

    callers = [asyncio.ensure_future(run_shielded(settle(fail))) for fail in (False, True)]
    await asyncio.sleep(0)
    for caller in callers:
        caller.cancel()
    for caller in callers:
        with pytest.raises(asyncio.CancelledError):
            await caller
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert sorted(finished) == ["done", "failed"]
    gc.collect()
    await asyncio.sleep(0)
    assert reported == []  # no "exception was never retrieved"
    loop.set_exception_handler(None)


def test_ready_request_is_used_as_is_and_still_checked() -> None:
    request = ReservationCreateRequest(
        idempotency_key="k-1",
        subject=Subject(tenant="acme"),
        action=Action(kind="llm.completion", name="gpt-4o"),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=5),
    )
    assert request_from_options(CONFIG, request, {}) is request
    assert request_from_options(CONFIG, request, {"heartbeat": False}) is request
    with pytest.raises(TypeError, match="not both"):
        request_from_options(CONFIG, request, {"heartbeat": True, "ttl_ms": 5_000})
    with pytest.raises(TypeError, match="unknown reservation option"):
        request_from_options(CONFIG, request, {"heartbeat": True}, allowed=frozenset())
    with pytest.raises(TypeError, match="cannot dry-run"):
        request_from_options(CONFIG, request.model_copy(update={"dry_run": True}), {})


def test_settlement_sends_the_callers_commit_body_and_resends_it_unchanged() -> None:
    bodies: list[bytes] = []
    ledger = FakeLedger()

    def flaky(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            return httpx.Response(503, json={"error": "INTERNAL_ERROR", "message": "later"})
        return ledger.handle(request)

    client = CyclesClient(CONFIG, transport=httpx.MockTransport(flaky))
    settlement = Settlement(client, sleep=lambda _s: None)
    request = CommitRequest(
        idempotency_key="commit-1",
        actual=Amount(unit=Unit.USD_MICROCENTS, amount=40),
        metrics=StandardMetrics(latency_ms=3),
        metadata={"model": "gpt-4o"},
    )
    result = settlement.commit("res-1", request, subject=Subject(tenant="acme"), action=None)
    assert result.outcome == "committed"
    expected = request.__pydantic_serializer__.to_json(request, exclude_none=True)
    assert bodies == [expected, expected]
    client.close()


def test_a_stopped_heartbeat_does_not_keep_the_reservation_context_alive() -> None:
    client = CyclesClient(CONFIG, transport=FakeLedger().transport())
    scheduler = HeartbeatScheduler(client, autostart=False)
    request = ReservationCreateRequest(
        idempotency_key="k-2",
        subject=Subject(tenant="acme"),
        action=Action(kind="llm.completion", name="gpt-4o"),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=5),
    )
    data = ReservationCreateResponse(
        decision=Decision.ALLOW,
        affected_scopes=["tenant:acme"],
        reservation_id="res-ctx",
        expires_at_ms=1_000,
        remaining_ttl_ms=60_000,
    )
    context = context_for(request, data)
    handle = _track(scheduler, 60_000, data, context, 0.001)
    assert isinstance(handle, HeartbeatHandle)
    alive = weakref.ref(context)
    handle.stop()
    del context
    assert alive() is None  # the stale heap entry holds the handle, not the context
    assert len(scheduler._heap) == 1
    scheduler.close()
    client.close()
