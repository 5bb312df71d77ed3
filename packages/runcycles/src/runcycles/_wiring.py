"""The one place that knows the settlement and heartbeat APIs (internal).

Guards (:mod:`runcycles.lifecycle`) reach the client's single heartbeat scheduler and its
settlement engine only through :data:`heartbeat` and :data:`settlement` here:

* one :class:`~runcycles.heartbeat.HeartbeatScheduler` per sync client and one
  :class:`~runcycles.heartbeat.AsyncHeartbeatScheduler` per (event loop, async client), never
  one per reservation; each is closed when its client is garbage-collected;
* one :class:`~runcycles.settlement.Settlement` / :class:`~runcycles.settlement.AsyncSettlement`
  per client, journaling to :func:`~runcycles.settlement.default_journal` of its config.

If the core clients grow ``heartbeat``/``settlement`` attributes of their own, only this
module changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

from runcycles.context import CyclesContext
from runcycles.heartbeat import (
    AsyncHeartbeatScheduler,
    HeartbeatEvent,
    HeartbeatHandle,
    HeartbeatScheduler,
)
from runcycles.models import (
    CommitRequest,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
)
from runcycles.settlement import AsyncSettlement, Settlement, SettlementResult, default_journal

if TYPE_CHECKING:
    from runcycles.client import AsyncCyclesClient, CyclesClient

__all__ = [
    "NO_HEARTBEAT",
    "HeartbeatSeam",
    "NoHeartbeat",
    "SettlementSeam",
    "heartbeat",
    "settlement",
]

logger = logging.getLogger("runcycles")


class NoHeartbeat:
    __slots__ = ()

    def stop(self) -> None:
        """Nothing to stop."""


NO_HEARTBEAT: Final = NoHeartbeat()


class HeartbeatSeam:
    """Track a reservation on its client's single heartbeat scheduler.

    One :class:`~runcycles.heartbeat.HeartbeatScheduler` per sync client, one
    :class:`~runcycles.heartbeat.AsyncHeartbeatScheduler` per (event loop, async client);
    each is closed when its client is garbage-collected.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: weakref.WeakKeyDictionary[Any, HeartbeatScheduler] = weakref.WeakKeyDictionary()
        self._async: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Any, AsyncHeartbeatScheduler]
        ] = weakref.WeakKeyDictionary()

    def scheduler(self, client: CyclesClient) -> HeartbeatScheduler:
        scheduler = self._sync.get(client)
        if scheduler is None:
            with self._lock:
                scheduler = self._sync.get(client)
                if scheduler is None:
                    scheduler = HeartbeatScheduler(client)
                    self._sync[client] = scheduler
                    weakref.finalize(client, scheduler.close, 0.0)
        return scheduler

    def ascheduler(self, client: AsyncCyclesClient) -> AsyncHeartbeatScheduler:
        loop = asyncio.get_running_loop()
        per_client = self._async.get(loop)
        if per_client is None:
            per_client = self._async.setdefault(loop, weakref.WeakKeyDictionary())
        scheduler = per_client.get(client)
        if scheduler is None:
            scheduler = AsyncHeartbeatScheduler(client)
            per_client[client] = scheduler
            weakref.finalize(client, _close_quietly, scheduler)
        return scheduler

    @staticmethod
    def _track(
        scheduler: HeartbeatScheduler | AsyncHeartbeatScheduler,
        ttl_ms: int,
        data: ReservationCreateResponse,
        context: CyclesContext,
        rtt_s: float,
    ) -> HeartbeatHandle | NoHeartbeat:
        # A weak reference: a stopped handle waits in the scheduler's heap until it is
        # compacted away, and must not keep the reservation's context (and its response
        # models) alive that long; it would only add garbage-collector work per call.
        context_ref = weakref.ref(context)

        def follow(event: HeartbeatEvent) -> None:
            live = context_ref()
            if event.expires_at_ms is not None and live is not None:
                live.expires_at_ms = event.expires_at_ms

        try:
            return scheduler.track(
                context.reservation_id,
                ttl_ms=ttl_ms,
                remaining_ttl_ms=data.remaining_ttl_ms,
                expires_at_ms=data.expires_at_ms,
                rtt_ms=rtt_s * 1000.0,
                on_event=follow,
            )
        except Exception as exc:  # e.g. the same id tracked twice; never fail the work
            logger.warning(
                "reservation %s runs without a heartbeat (%s); it may expire if the work "
                "outlasts ttl_ms",
                context.reservation_id,
                exc,
            )
            return NO_HEARTBEAT

    def track(
        self,
        client: CyclesClient,
        ttl_ms: int,
        data: ReservationCreateResponse,
        context: CyclesContext,
        rtt_s: float,
    ) -> HeartbeatHandle | NoHeartbeat:
        return self._track(self.scheduler(client), ttl_ms, data, context, rtt_s)

    def atrack(
        self,
        client: AsyncCyclesClient,
        ttl_ms: int,
        data: ReservationCreateResponse,
        context: CyclesContext,
        rtt_s: float,
    ) -> HeartbeatHandle | NoHeartbeat:
        return self._track(self.ascheduler(client), ttl_ms, data, context, rtt_s)


def _close_quietly(scheduler: AsyncHeartbeatScheduler) -> None:
    with contextlib.suppress(RuntimeError):  # its event loop is closed: nothing left to stop
        scheduler.close()


class SettlementSeam:
    """Commit and release through one :class:`~runcycles.settlement.Settlement` per client.

    Its journal is :func:`~runcycles.settlement.default_journal` of the client's config.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: weakref.WeakKeyDictionary[Any, Settlement] = weakref.WeakKeyDictionary()
        self._async: weakref.WeakKeyDictionary[Any, AsyncSettlement] = weakref.WeakKeyDictionary()

    def settlement(self, client: CyclesClient) -> Settlement:
        settlement = self._sync.get(client)
        if settlement is None:
            with self._lock:
                settlement = self._sync.get(client)
                if settlement is None:
                    settlement = Settlement(client, journal=default_journal(client.config))
                    self._sync[client] = settlement
        return settlement

    def asettlement(self, client: AsyncCyclesClient) -> AsyncSettlement:
        settlement = self._async.get(client)
        if settlement is None:
            with self._lock:
                settlement = self._async.get(client)
                if settlement is None:
                    settlement = AsyncSettlement(client, journal=default_journal(client.config))
                    self._async[client] = settlement
        return settlement

    def commit(
        self,
        client: CyclesClient,
        request: ReservationCreateRequest,
        context: CyclesContext,
        commit_request: CommitRequest,
    ) -> SettlementResult:
        result = self.settlement(client).commit(
            context.reservation_id,
            commit_request,
            subject=request.subject,
            action=request.action,
            overage_policy=request.overage_policy,
        )
        return _checked(result)

    async def acommit(
        self,
        client: AsyncCyclesClient,
        request: ReservationCreateRequest,
        context: CyclesContext,
        commit_request: CommitRequest,
    ) -> SettlementResult:
        result = await self.asettlement(client).commit(
            context.reservation_id,
            commit_request,
            subject=request.subject,
            action=request.action,
            overage_policy=request.overage_policy,
        )
        return _checked(result)

    def release(
        self, client: CyclesClient, context: CyclesContext, release_request: ReleaseRequest
    ) -> ReleaseResponse:
        response = self.settlement(client).release(
            context.reservation_id,
            release_request.reason,
            idempotency_key=release_request.idempotency_key,
        )
        return response.data

    async def arelease(
        self, client: AsyncCyclesClient, context: CyclesContext, release_request: ReleaseRequest
    ) -> ReleaseResponse:
        response = await self.asettlement(client).release(
            context.reservation_id,
            release_request.reason,
            idempotency_key=release_request.idempotency_key,
        )
        return response.data


def _checked(result: SettlementResult) -> SettlementResult:
    """Raise the error of a settlement the server rejected for good; return the others."""
    if result.outcome == "rejected" and result.error is not None:
        raise result.error
    return result


heartbeat: Final = HeartbeatSeam()
settlement: Final = SettlementSeam()
