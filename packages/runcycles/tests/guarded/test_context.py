"""``get_cycles_context()``: nested and concurrent guarded calls each see their own."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from runcycles import (
    Amount,
    Caps,
    CyclesContext,
    CyclesMetrics,
    Decision,
    Unit,
    cycles,
    get_cycles_context,
    reserve,
)
from runcycles.context import pop_context, push_context


def make_context(rid: str = "r", caps: Caps | None = None) -> CyclesContext:
    return CyclesContext(
        reservation_id=rid,
        decision=Decision.ALLOW,
        estimate=Amount(unit=Unit.TOKENS, amount=1),
        caps=caps,
    )


def test_no_context_outside_guarded_code() -> None:
    assert get_cycles_context() is None


def test_has_caps() -> None:
    assert not make_context().has_caps()
    assert make_context(caps=Caps(max_tokens=5)).has_caps()


def test_nested_decorated_calls_restore_the_outer_context(fake: Any, client: Any) -> None:
    seen: dict[str, Any] = {}

    @cycles(estimate=10, client=client)
    def inner() -> None:
        ctx = get_cycles_context()
        assert ctx is not None
        seen["inner"] = ctx.reservation_id
        ctx.metrics = CyclesMetrics(tokens_output=1)

    @cycles(estimate=100, client=client)
    def outer() -> None:
        before = get_cycles_context()
        assert before is not None
        inner()
        after = get_cycles_context()
        seen["outer_before"] = before.reservation_id
        seen["outer_after"] = after.reservation_id if after else None
        assert after is before
        after.metrics = CyclesMetrics(tokens_output=2)

    outer()
    assert seen == {"inner": "rsv_2", "outer_before": "rsv_1", "outer_after": "rsv_1"}
    assert get_cycles_context() is None
    commits = {r: fake.reservations[r]["commit"] for r in ("rsv_1", "rsv_2")}
    assert commits["rsv_2"]["metrics"]["tokens_output"] == 1
    assert commits["rsv_1"]["metrics"]["tokens_output"] == 2  # outer metrics not lost


def test_inner_failure_restores_the_outer_context(fake: Any, client: Any) -> None:
    @cycles(estimate=10, client=client)
    def inner() -> None:
        raise ValueError("inner")

    @cycles(estimate=100, client=client)
    def outer() -> str | None:
        with pytest.raises(ValueError, match="inner"):
            inner()
        ctx = get_cycles_context()
        return ctx.reservation_id if ctx else None

    assert outer() == "rsv_1"
    assert fake.reservations["rsv_1"]["status"] == "COMMITTED"
    assert fake.reservations["rsv_2"]["status"] == "RELEASED"


def test_guard_inside_decorated_function(fake: Any, client: Any) -> None:
    @cycles(estimate=100, client=client)
    def outer() -> None:
        ctx = get_cycles_context()
        with reserve(client, estimate=5, action_kind="tool", action_name="search") as guard:
            assert get_cycles_context() is guard.context
            guard.commit(5)
        assert get_cycles_context() is ctx

    outer()
    assert fake.statuses() == ["COMMITTED", "COMMITTED"]


def test_threads_see_their_own_context(fake: Any, client: Any) -> None:
    barrier = threading.Barrier(8)

    @cycles(estimate=lambda i: i + 1, client=client)
    def job(i: int) -> tuple[int, str]:
        barrier.wait(timeout=5)  # all eight reservations are live at once
        ctx = get_cycles_context()
        assert ctx is not None
        return ctx.estimate.amount, ctx.reservation_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(job, range(8)))
    assert [amount for amount, _ in results] == list(range(1, 9))
    assert len({rid for _, rid in results}) == 8
    # each reservation committed its own estimate
    for amount, rid in results:
        assert fake.reservations[rid]["commit"]["actual"]["amount"] == amount


async def test_tasks_see_their_own_context(fake: Any, aclient: Any) -> None:
    @cycles(estimate=lambda i: i + 1, client=aclient)
    async def job(i: int) -> tuple[int, str]:
        await asyncio.sleep(0.01 * (8 - i))  # interleave
        ctx = get_cycles_context()
        assert ctx is not None
        inner = await nested(i)
        after = get_cycles_context()
        assert after is ctx
        return ctx.estimate.amount, inner

    @cycles(estimate=1_000, client=aclient)
    async def nested(i: int) -> str:
        await asyncio.sleep(0)
        ctx = get_cycles_context()
        assert ctx is not None
        assert ctx.estimate.amount == 1_000
        return ctx.reservation_id

    results = await asyncio.gather(*(job(i) for i in range(8)))
    assert [amount for amount, _ in results] == list(range(1, 9))
    assert len({rid for _, rid in results}) == 8
    assert get_cycles_context() is None
    assert set(fake.statuses()) == {"COMMITTED"}


async def test_async_guard_context_is_restored(fake: Any, aclient: Any) -> None:
    async with reserve(aclient, estimate=1, action_kind="a", action_name="b") as outer:
        async with reserve(aclient, estimate=2, action_kind="a", action_name="c") as inner:
            assert get_cycles_context() is inner.context
            await inner.commit()
        assert get_cycles_context() is outer.context
        await outer.commit()
    assert get_cycles_context() is None


def test_concurrent_reservations_share_one_heartbeat_thread(fake: Any, client: Any) -> None:
    workers = 8
    barrier = threading.Barrier(workers + 1)
    release = threading.Event()

    @cycles(estimate=1, client=client)
    def hold() -> None:
        barrier.wait(timeout=5)
        release.wait(timeout=5)

    @cycles(estimate=1, client=client)
    def warm_up() -> None:
        return None

    warm_up()  # the client's heartbeat thread now exists
    with ThreadPoolExecutor(max_workers=workers) as pool:
        baseline = threading.active_count()
        futures = [pool.submit(hold) for _ in range(workers)]
        barrier.wait(timeout=5)  # eight reservations are live at once
        during = threading.active_count()
        release.set()
        for future in futures:
            future.result(timeout=5)
    assert during - baseline <= workers  # the pool's threads, and nothing per reservation
    assert fake.statuses().count("COMMITTED") == workers + 1


async def test_concurrent_async_reservations_share_one_heartbeat_task(
    fake: Any, aclient: Any
) -> None:
    release = asyncio.Event()
    live = 0
    all_live = asyncio.Event()

    @cycles(estimate=1, client=aclient)
    async def hold() -> None:
        nonlocal live
        live += 1
        if live == 20:
            all_live.set()
        await release.wait()

    @cycles(estimate=1, client=aclient)
    async def warm_up() -> None:
        return None

    await warm_up()
    baseline = len(asyncio.all_tasks())
    tasks = [asyncio.create_task(hold()) for _ in range(20)]
    await all_live.wait()
    during = len(asyncio.all_tasks())
    release.set()
    await asyncio.gather(*tasks)
    assert during - baseline == 20  # the callers' own tasks, none per reservation


def test_pop_with_a_token_from_another_context_clears_instead_of_failing() -> None:
    outer = make_context("outer")
    token = contextvars.copy_context().run(push_context, outer)  # set in another context
    inner = make_context("inner")
    own = push_context(inner)
    assert get_cycles_context() is inner
    pop_context(token)  # cannot reset here: the finished reservation must not stay visible
    assert get_cycles_context() is None
    pop_context(own)
    assert get_cycles_context() is None
