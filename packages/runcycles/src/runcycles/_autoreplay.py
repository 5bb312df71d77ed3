"""Replay the durable journal automatically when a client starts (internal).

A client whose config enables the journal settles, once, the records its (server,
principal) partition holds from *before* it started (spend an earlier process left); newer
records belong to live settlements. Sync clients hand this to one daemon thread per process
(``runcycles-replay``, ending after :data:`IDLE_S` idle), so construction never blocks;
async clients start it on their first request, looking at the journal off the loop and
creating a task only when it holds records (``aclose()`` cancels it). Exactly-once is kept
by the journal's locks and stored keys; siblings from ``with_options()`` never replay.
The clients are typed structurally (:class:`_Replayable`): this module sits below them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Protocol

from runcycles.config import CyclesConfig
from runcycles.journal import Journal, _journal_executor
from runcycles.settlement import AsyncSettlement, ReplayReport, Settlement, default_journal

if TYPE_CHECKING:
    import httpx


class _Replayable(Protocol):
    @property
    def config(self) -> CyclesConfig: ...

    @property
    def http_client(self) -> httpx.Client: ...

    @property
    def settlement(self) -> Settlement: ...


class _AsyncReplayable(Protocol):
    @property
    def config(self) -> CyclesConfig: ...

    @property
    def http_client(self) -> httpx.AsyncClient: ...

    @property
    def settlement(self) -> AsyncSettlement: ...


logger = logging.getLogger("runcycles")

REPLAY_TIMEOUT_S: Final = 30.0
"""Bound of one automatic replay: no new attempt starts after it (records stay on disk)."""

IDLE_S: Final = 0.5
"""How long the sync replay thread waits for another client before it ends."""

_OFF: Final = frozenset({"0", "false", "no", "off"})

_building_sibling: ContextVar[bool] = ContextVar("runcycles_building_sibling", default=False)


@contextlib.contextmanager
def building_sibling() -> Iterator[None]:
    """Clients constructed inside this block do not replay (``with_options`` siblings)."""
    token = _building_sibling.set(True)
    try:
        yield
    finally:
        _building_sibling.reset(token)


def wanted(config: CyclesConfig) -> bool:
    """Whether a client being constructed with ``config`` should replay its journal."""
    if _building_sibling.get() or not getattr(config, "journal_enabled", True):
        return False
    return os.environ.get("RUNCYCLES_JOURNAL", "").strip().lower() not in _OFF


def now_ms() -> int:
    return int(time.time() * 1000)


def _journal_with_records(config: CyclesConfig) -> Journal | None:
    """The client's journal partition if it may hold records, else ``None`` (blocking I/O)."""
    journal = default_journal(config)
    if journal is None:
        return None
    try:
        names = os.listdir(journal.directory)
    except OSError:  # no partition yet (the usual case), or unreadable: nothing to do
        return None
    if any(name.endswith((".json", ".log")) for name in names):
        return journal
    return None


def _log_report(report: ReplayReport, journal: Journal) -> None:
    if report.settled or report.rejected:
        logger.info(
            "journal %s replayed at client start: settled %s, rejected %s",
            journal.directory,
            report.settled,
            report.rejected,
        )
    if report.pending:
        logger.warning(
            "journal %s replayed at client start: %d settlement(s) still pending (%s); they "
            "stay in the journal for the next replay or flush()",
            journal.directory,
            len(report.pending),
            ", ".join(report.pending[:10]),
        )


def _log_stopped(exc: BaseException) -> None:
    logger.warning(
        "automatic journal replay stopped (%s: %s); the records stay in the journal for the "
        "next replay or flush()",
        type(exc).__name__,
        exc,
    )


# --------------------------------------------------------------------------------------------
# Sync: one daemon thread per process


class _SyncReplayer:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[weakref.ref[_Replayable], int]] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._unfinished = 0

    def submit(self, client: _Replayable) -> None:
        with self._lock:
            self._unfinished += 1
            self._queue.put((weakref.ref(client), now_ms()))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="runcycles-replay", daemon=True
                )
                self._thread.start()

    def wait(self, timeout_s: float) -> bool:
        """Wait until every submitted replay ended; return whether they did."""
        with self._lock:
            return self._lock.wait_for(lambda: self._unfinished == 0, timeout_s)

    def idle(self, timeout_s: float) -> bool:
        """Wait until the thread ended (nothing to do for :data:`IDLE_S`); return whether it did."""
        with self._lock:
            return self._lock.wait_for(lambda: self._thread is None, timeout_s)

    def _next(self) -> tuple[weakref.ref[_Replayable], int] | None:
        """The next replay, or ``None`` once the thread should end (it was idle)."""
        while True:
            try:
                return self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:  # submit() puts under this lock: no replay is missed
                    if self._queue.empty():
                        self._thread = None
                        self._lock.notify_all()
                        return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            ref, started_ms = item
            try:
                client = ref()
                if client is not None:
                    _replay_sync(client, started_ms)
            except BaseException as exc:  # the thread serves every later client: keep it
                _log_stopped(exc)
            finally:
                client = None
                with self._lock:
                    self._unfinished -= 1
                    self._lock.notify_all()


def _replay_sync(client: _Replayable, started_ms: int) -> None:
    if client.http_client.is_closed:
        return
    journal = _journal_with_records(client.config)
    if journal is None:
        return
    settlement = client.settlement
    if settlement.journal is None:
        return
    report = settlement.flush(REPLAY_TIMEOUT_S, created_before_ms=started_ms + 1)
    _log_report(report, settlement.journal)


_sync = _SyncReplayer()


def _after_fork_in_child() -> None:
    global _sync
    _sync = _SyncReplayer()  # the parent's thread does not exist in the child
    _tasks.clear()  # nor do its event loops


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start(client: _Replayable) -> None:
    """Replay ``client``'s journal partition in the background (called by its constructor)."""
    _sync.submit(client)


def wait_sync(timeout_s: float = REPLAY_TIMEOUT_S) -> bool:
    """Wait for every automatic replay of sync clients started so far (for tests)."""
    return _sync.wait(timeout_s)


def wait_idle(timeout_s: float = REPLAY_TIMEOUT_S) -> bool:
    """Wait until the sync replay thread has ended (for tests)."""
    return _sync.idle(timeout_s)


# --------------------------------------------------------------------------------------------
# Async: probe off the loop, then one task per client if there is anything to replay

_tasks: dict[asyncio.Future[Any], weakref.ref[Any]] = {}
"""Running probes and replays, with the client each serves."""


def astart(client: _AsyncReplayable, started_ms: int) -> None:
    """Start replaying ``client``'s journal partition (called on its first request)."""
    loop = asyncio.get_running_loop()
    probe = loop.run_in_executor(_journal_executor(), _journal_with_records, client.config)
    ref = weakref.ref(client)
    _tasks[probe] = ref

    def probed(future: asyncio.Future[Journal | None]) -> None:
        _tasks.pop(future, None)
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            logger.warning("could not look at the journal for an automatic replay: %s", error)
            return
        target = ref()
        if future.result() is None or target is None or target.http_client.is_closed:
            return
        task = loop.create_task(_areplay(target, started_ms), name="runcycles-replay")
        _tasks[task] = ref
        task.add_done_callback(_forget)

    probe.add_done_callback(probed)


def _forget(task: asyncio.Future[Any]) -> None:
    _tasks.pop(task, None)


async def astop(client: _AsyncReplayable) -> None:
    """Cancel ``client``'s replay on the running loop and wait for it (``aclose()``)."""
    loop = asyncio.get_running_loop()
    mine = [
        future
        for future, ref in list(_tasks.items())
        if ref() is client and future.get_loop() is loop
    ]
    for future in mine:
        future.cancel()
    if mine:
        await asyncio.gather(*mine, return_exceptions=True)


async def _areplay(client: _AsyncReplayable, started_ms: int) -> None:
    try:
        settlement = client.settlement
        if settlement.journal is None:
            return
        report = await settlement.flush(REPLAY_TIMEOUT_S, created_before_ms=started_ms + 1)
        _log_report(report, settlement.journal)
    except Exception as exc:
        _log_stopped(exc)


async def wait_async(timeout_s: float = REPLAY_TIMEOUT_S) -> bool:
    """Wait for the automatic replays of async clients on this loop (for tests).

    Returns whether they all ended.
    """
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s
    while True:
        mine = {future for future in list(_tasks) if future.get_loop() is loop}
        left_s = deadline - time.monotonic()
        if not mine:
            return True
        if left_s <= 0:
            return False
        await asyncio.wait(mine, timeout=left_s)
        await asyncio.sleep(0)  # let done-callbacks (a probe starting its task) run
