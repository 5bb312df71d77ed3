"""The public clients: :class:`CyclesClient` and :class:`AsyncCyclesClient`.

The protocol client of :mod:`runcycles._base_client` plus the guard shortcuts
:meth:`CyclesClient.reserve` and :meth:`CyclesClient.stream_reservation`: the top of the
core's layers (see ``docs/architecture.md``).
"""

from __future__ import annotations

import sys

from runcycles._base_client import (
    AsyncBaseCyclesClient,
    BalanceFilters,
    BaseCyclesClient,
    ReservationFilters,
)
from runcycles.lifecycle import (
    AsyncReservationGuard,
    OnUnknownActual,
    ReservationGuard,
    ReserveOptions,
)
from runcycles.models import ReservationCreateRequest
from runcycles.streaming import AsyncStreamReservation, CostFn, StreamReservation

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

__all__ = ["AsyncCyclesClient", "BalanceFilters", "CyclesClient", "ReservationFilters"]


class CyclesClient(BaseCyclesClient):
    """Synchronous client of a Cycles server; one connection pool per instance.

    Use it as a context manager (or call :meth:`close`) to release the pool and stop the
    heartbeat. It is safe to share one client between threads, and to keep one across
    ``fork()``: the child starts afresh.

    Each protocol call (``docs/client.md`` lists them) returns a
    :class:`~runcycles.CyclesResponse` whose ``data`` is the endpoint's response model, and
    takes ``headers=`` (extra headers for that call, e.g. ``traceparent``) and
    ``retry_policy=`` (its retries; default: the client's policy).

    Args:
        config: Server URL, API key, timeouts and retry settings.
        http_client: An ``httpx.Client`` to send with (its timeouts and pool are used as
            they are, and :meth:`close` leaves it open). By default the client creates one.
        transport: An ``httpx`` transport for the client created by default (e.g.
            ``httpx.MockTransport`` in tests). Not allowed together with ``http_client``.
        retry_policy: Overrides the policy derived from ``config``'s ``retry_*`` fields.
    """

    def reserve(
        self,
        request: ReservationCreateRequest | None = None,
        /,
        **options: Unpack[ReserveOptions],
    ) -> ReservationGuard:
        """Return a guard that reserves when its ``with`` block is entered.

        The method spelling of :func:`runcycles.reserve`: ``client.reserve(...)`` is
        ``reserve(client, ...)`` (options: :class:`~runcycles.lifecycle.ReserveOptions`).
        """
        return ReservationGuard(self, request, **options)

    def stream_reservation(
        self,
        request: ReservationCreateRequest | None = None,
        /,
        *,
        cost_fn: CostFn | None = None,
        on_unknown_actual: OnUnknownActual = "raise",
        **options: Unpack[ReserveOptions],
    ) -> StreamReservation:
        """Return a stream reservation that reserves when its ``with`` block is entered.

        The method spelling of :func:`runcycles.stream_reservation` (same options).
        """
        return StreamReservation(
            self, request, cost_fn=cost_fn, on_unknown_actual=on_unknown_actual, **options
        )


class AsyncCyclesClient(AsyncBaseCyclesClient):
    """Asyncio client of a Cycles server; the twin of :class:`CyclesClient`.

    Use it with ``async with`` (or await :meth:`aclose`) to release the pool and stop the
    heartbeat.

    Args:
        config: Server URL, API key, timeouts and retry settings.
        http_client: An ``httpx.AsyncClient`` to send with (else the client creates one).
        transport: An ``httpx`` async transport for the client created by default.
        retry_policy: Overrides the policy derived from ``config``'s ``retry_*`` fields.
    """

    def reserve(
        self,
        request: ReservationCreateRequest | None = None,
        /,
        **options: Unpack[ReserveOptions],
    ) -> AsyncReservationGuard:
        """Async twin of :meth:`CyclesClient.reserve` (enter the guard with ``async with``)."""
        return AsyncReservationGuard(self, request, **options)

    def stream_reservation(
        self,
        request: ReservationCreateRequest | None = None,
        /,
        *,
        cost_fn: CostFn | None = None,
        on_unknown_actual: OnUnknownActual = "raise",
        **options: Unpack[ReserveOptions],
    ) -> AsyncStreamReservation:
        """Async twin of :meth:`CyclesClient.stream_reservation` (``async with``).

        Raises:
            ValueError: An unknown ``on_unknown_actual``.
        """
        return AsyncStreamReservation(
            self, request, cost_fn=cost_fn, on_unknown_actual=on_unknown_actual, **options
        )
