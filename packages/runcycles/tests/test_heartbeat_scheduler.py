"""HeartbeatScheduler / AsyncHeartbeatScheduler behaviour (sync and async variants)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import tracemalloc

import pytest

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig
from runcycles.heartbeat import AsyncHeartbeatScheduler, HeartbeatEvent, HeartbeatScheduler
from runcycles.testing.recovery_fakes import FakeLedger, Fault

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key", tenant="acme")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance_ms(self, ms: float) -> None:
        self.now_s += ms / 1000


class Harness:
    """Drives either scheduler by hand, on a fake clock."""

    def __init__(self, mode: str, ledger: FakeLedger, clock: FakeClock, **kwargs) -> None:
        self.mode = mode
        self.events: list[HeartbeatEvent] = []
        common = {
            "attempt_timeout_ms": 1_000,
            "clock": clock,
            "autostart": False,
            "on_event": self.events.append,
            **kwargs,
        }
        if mode == "sync":
            self.client: object = CyclesClient(CONFIG, transport=ledger.transport())
            self.scheduler: HeartbeatScheduler | AsyncHeartbeatScheduler = HeartbeatScheduler(
                self.client, **common
            )
        else:
            self.client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
            self.scheduler = AsyncHeartbeatScheduler(self.client, **common)

    async def run_pending(self) -> int:
        if isinstance(self.scheduler, AsyncHeartbeatScheduler):
            return await self.scheduler.run_pending()
        return self.scheduler.run_pending()

    async def close(self) -> None:
        if isinstance(self.scheduler, AsyncHeartbeatScheduler):
            await self.scheduler.aclose()
            assert isinstance(self.client, AsyncCyclesClient)
            await self.client.aclose()
        else:
            self.scheduler.close()
            assert isinstance(self.client, CyclesClient)
            self.client.close()


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger(remaining_ttl_ms=60_000)


@MODES
async def test_beats_at_spec_delay_with_fresh_keys(mode, ledger, clock):
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    # next_delay = 60000 - (2 * 1000 + 1000)
    clock.advance_ms(56_999)
    assert await h.run_pending() == 0
    clock.advance_ms(1)
    assert await h.run_pending() == 1
    assert handle.expires_at_ms == 60_000
    assert handle.beats == 1
    clock.advance_ms(57_000)
    assert await h.run_pending() == 1
    assert handle.expires_at_ms == 120_000
    extends = ledger.requests_to("extend")
    assert [r.body["extend_by_ms"] for r in extends] == [60_000, 60_000]
    assert extends[0].idempotency_key != extends[1].idempotency_key
    assert ledger.labels() == ["extend", "extend"]
    assert [e.disposition for e in h.events] == ["extended", "extended"]
    await h.close()


@MODES
async def test_transport_error_retries_same_key_and_reports(mode, ledger, clock, caplog):
    ledger.script("extend", Fault.transport())
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    clock.advance_ms(57_000)
    with caplog.at_level(logging.WARNING, logger="runcycles.heartbeat"):
        assert await h.run_pending() == 1
    retry = h.events[-1]
    assert retry.reservation_id == "r1"
    assert retry.disposition == "retrying"
    assert retry.status == -1
    assert "r1" in caplog.text
    assert "retrying" in caplog.text
    # lead 3000, window 1000, delay min(30000, 750, 1000) = 750
    assert retry.next_delay_ms == 750
    clock.advance_ms(750)
    assert await h.run_pending() == 1
    assert ledger.labels() == ["extend", "extend_same_key"]
    assert handle.active
    assert handle.beats == 1
    await h.close()


@MODES
async def test_terminal_answers_stop_the_heartbeat(mode, ledger, clock):
    ledger.script("extend", Fault.error(409, "MAX_EXTENSIONS_EXCEEDED"))
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    clock.advance_ms(57_000)
    await h.run_pending()
    assert not handle.active
    assert h.events[-1].disposition == "stopped_terminal"
    assert h.events[-1].error_code == "MAX_EXTENSIONS_EXCEEDED"
    clock.advance_ms(600_000)
    assert await h.run_pending() == 0
    assert len(h.scheduler) == 0
    await h.close()


@MODES
async def test_other_4xx_stops_as_rejected(mode, ledger, clock):
    ledger.script("extend", Fault.error(400, "INVALID_REQUEST"))
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    clock.advance_ms(57_000)
    await h.run_pending()
    assert not handle.active
    assert h.events[-1].disposition == "stopped_rejected"
    await h.close()


@MODES
async def test_rate_limit_waits_retry_after(mode, ledger, clock):
    ledger.script("extend", Fault.error(429, "LIMIT_EXCEEDED", {"Retry-After": "1"}))
    h = Harness(mode, ledger, clock, attempt_timeout_ms=2_000)
    h.scheduler.track("r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0)
    # delay = 60000 - (4000 + 1000) = 55000; at the beat lead 5000, window 2000
    clock.advance_ms(55_000)
    await h.run_pending()
    assert h.events[-1].disposition == "retrying"
    assert h.events[-1].next_delay_ms == 1_000
    clock.advance_ms(999)
    assert await h.run_pending() == 0
    clock.advance_ms(1)
    assert await h.run_pending() == 1
    assert ledger.labels() == ["extend", "extend_same_key"]
    await h.close()


@MODES
async def test_ambiguous_2xx_is_retried_with_same_key(mode, ledger, clock):
    ledger.script("extend", Fault.raw(200, b'{"status": "ACTIVE"}', apply=True))
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    clock.advance_ms(57_000)
    await h.run_pending()
    assert h.events[-1].disposition == "retrying"
    assert handle.expires_at_ms == 0  # the malformed body was not used
    clock.advance_ms(750)
    await h.run_pending()
    assert ledger.labels() == ["extend", "extend_same_key"]
    assert handle.expires_at_ms == 60_000  # the replayed stored response
    await h.close()


@MODES
async def test_stop_is_idempotent_and_prevents_beats(mode, ledger, clock):
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    handle.stop()
    handle.stop()
    clock.advance_ms(120_000)
    assert await h.run_pending() == 0
    assert ledger.requests == []
    # the id can be tracked again once stopped
    again = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0
    )
    assert again.active
    await h.close()
    assert not again.active


@MODES
async def test_callback_errors_are_contained(mode, ledger, clock, caplog):
    h = Harness(mode, ledger, clock)

    def boom(event):
        raise RuntimeError("callback bug")

    handle = h.scheduler.track(
        "r1", ttl_ms=60_000, remaining_ttl_ms=60_000, expires_at_ms=0, rtt_ms=0, on_event=boom
    )
    clock.advance_ms(57_000)
    with caplog.at_level(logging.ERROR, logger="runcycles.heartbeat"):
        await h.run_pending()
    assert handle.beats == 1
    assert "callback raised" in caplog.text
    await h.close()


@MODES
async def test_track_validates_input(mode, ledger, clock):
    h = Harness(mode, ledger, clock)
    with pytest.raises(ValueError, match="ttl_ms"):
        h.scheduler.track("r1", ttl_ms=0)
    with pytest.raises(ValueError, match="reservation_id"):
        h.scheduler.track("", ttl_ms=1_000)
    h.scheduler.track("r1", ttl_ms=1_000, remaining_ttl_ms=60_000, rtt_ms=0)
    with pytest.raises(ValueError, match="already tracked"):
        h.scheduler.track("r1", ttl_ms=1_000)
    await h.close()
    with pytest.raises(RuntimeError, match="closed"):
        h.scheduler.track("r2", ttl_ms=1_000)


@MODES
async def test_fallback_without_remaining_ttl(mode, clock):
    ledger = FakeLedger(remaining_ttl_ms=None)
    h = Harness(mode, ledger, clock)
    handle = h.scheduler.track("r1", ttl_ms=20_000, expires_at_ms=0, rtt_ms=0)
    assert await h.run_pending() == 1  # first extend immediately
    assert handle.expires_at_ms == 20_000
    assert h.events[-1].next_delay_ms == 10_000  # normal regime: grant / 2
    await h.close()


def test_default_attempt_budget_comes_from_client_timeouts():
    client = CyclesClient(
        CyclesConfig(base_url="http://x", api_key="k", connect_timeout=1.5, read_timeout=4.0)
    )
    scheduler = HeartbeatScheduler(client)
    assert scheduler.attempt_timeout_ms == 5_500
    scheduler.close()
    client.close()


# --------------------------------------------------------------------------- real workers


def test_sync_scheduler_beats_from_one_background_thread():
    ledger = FakeLedger(remaining_ttl_ms=3_030)  # next beat ~30 ms after each answer
    client = CyclesClient(CONFIG, transport=ledger.transport())
    before = threading.active_count()
    scheduler = HeartbeatScheduler(client, attempt_timeout_ms=1_000)
    handles = [
        scheduler.track(f"r{i}", ttl_ms=3_000, remaining_ttl_ms=3_030, expires_at_ms=0, rtt_ms=0)
        for i in range(50)
    ]
    assert threading.active_count() == before + 1
    deadline = time.monotonic() + 5
    while min(h.beats for h in handles) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert min(h.beats for h in handles) >= 2
    assert threading.active_count() == before + 1
    for handle in handles:
        handle.stop()
    scheduler.close()
    client.close()
    assert threading.active_count() == before


async def test_async_scheduler_beats_from_one_task():
    ledger = FakeLedger(remaining_ttl_ms=3_030)
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    scheduler = AsyncHeartbeatScheduler(client, attempt_timeout_ms=1_000)
    handles = [
        scheduler.track(f"r{i}", ttl_ms=3_000, remaining_ttl_ms=3_030, expires_at_ms=0, rtt_ms=0)
        for i in range(50)
    ]
    deadline = time.monotonic() + 5
    while min(h.beats for h in handles) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert min(h.beats for h in handles) >= 2
    await scheduler.aclose()
    await client.aclose()
    assert scheduler.background_tasks == 0


async def test_async_scheduler_handles_10000_reservations_with_one_task():
    ledger = FakeLedger()
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    scheduler = AsyncHeartbeatScheduler(client, attempt_timeout_ms=1_000)
    tasks_before = len(asyncio.all_tasks())
    tracemalloc.start()
    start_bytes = tracemalloc.get_traced_memory()[0]
    handles = [
        scheduler.track(f"res-{i:05d}", ttl_ms=60_000, remaining_ttl_ms=60_000, rtt_ms=1)
        for i in range(10_000)
    ]
    used_bytes = tracemalloc.get_traced_memory()[0] - start_bytes
    tracemalloc.stop()
    await asyncio.sleep(0)
    assert len(scheduler) == 10_000
    assert scheduler.background_tasks == 1
    assert len(asyncio.all_tasks()) == tasks_before + 1
    per_reservation = used_bytes / 10_000
    assert per_reservation < 1_500, per_reservation
    for handle in handles:
        handle.stop()
    assert len(scheduler) == 0
    await scheduler.aclose()
    await client.aclose()


async def test_async_close_from_another_thread_is_handed_to_the_loop():
    ledger = FakeLedger()
    client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
    scheduler = AsyncHeartbeatScheduler(client, attempt_timeout_ms=1_000)
    handle = scheduler.track("r1", ttl_ms=60_000, remaining_ttl_ms=60_000, rtt_ms=1)
    await asyncio.sleep(0)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    closer.join()
    for _ in range(100):
        if scheduler.background_tasks == 0:
            break
        await asyncio.sleep(0.001)
    assert scheduler.background_tasks == 0
    assert not handle.active
    await client.aclose()


def test_async_close_after_the_loop_ended_is_quiet():
    ledger = FakeLedger()

    async def run() -> tuple[AsyncHeartbeatScheduler, AsyncCyclesClient]:
        client = AsyncCyclesClient(CONFIG, transport=ledger.async_transport())
        scheduler = AsyncHeartbeatScheduler(client, attempt_timeout_ms=1_000)
        scheduler.track("r1", ttl_ms=60_000, remaining_ttl_ms=60_000, rtt_ms=1)
        await client.aclose()
        return scheduler, client

    scheduler, _ = asyncio.run(run())
    scheduler.close()
    assert len(scheduler) == 0
