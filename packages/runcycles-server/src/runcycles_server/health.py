"""Store outages: which errors mean "the store is unavailable", and one log line per outage.

When the store (Redis, usually) is down or hung, every request fails the same way; a traceback
per request would flood the log (3.5 KB each) and say nothing new. :class:`StoreHealth` turns
an outage into two lines on the ``runcycles_server`` logger, whatever the number of requests::

    store unavailable (TimeoutError: Timeout reading from 10.0.0.5:6379); answering 503 [...]
    store available again after 12.4 s; 57 requests were answered 503 meanwhile

The first is written by the first failure (ERROR), the second (WARNING) by the first store call
that succeeds afterwards: the expiry sweep (every second) or ``GET /readyz`` (on SQLite, whose
file another program may hold locked for writes while reads go on, a write: the sweep's
purge). Requests that
fail meanwhile are counted, not logged, and answered ``503`` with ``Retry-After`` (see
:class:`runcycles_server.web.ContextMiddleware`).

The same two transitions are events: ``system.store_connection_lost`` and
``system.store_connection_restored`` (tenant ``__system__``, the spec's ``EventDataSystem``
payload, one ``correlation_id`` for both). The lost event cannot be written to the store that
is down, so both are kept in memory with the time each transition happened and written by
:meth:`StoreHealth.flush` once the store answers again (the sweeper calls it every round, the
event monitor every tick): the event log shows when the outage began and ended, not when the
events could be written. A process that stops during an outage loses its pending pair (memory
only); the log lines stay. Each server process watches its own connection, so an outage seen
by several processes is reported by each (``details.process`` names it).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from runcycles_server.events.records import SOURCE, EventRecord, new_event_id
from runcycles_server.events.signals import SYSTEM_TENANT
from runcycles_server.stores.base import Store, StoreUnavailable

__all__ = ["RETRY_AFTER_S", "StoreHealth"]

RETRY_AFTER_S: Final = 1
"""``Retry-After`` (seconds) of a 503 answered because the store is unavailable."""
MAX_PENDING_EVENTS: Final = 1_000
"""Most outage events kept in memory while the store cannot take them (oldest dropped)."""


class StoreHealth:
    """Recognizes store outages and logs each once (see the module docstring).

    Args:
        store: its ``unavailable_errors`` attribute (a tuple of exception types, optional)
            lists the errors that mean "unavailable", besides
            :class:`~runcycles_server.stores.base.StoreUnavailable`.
        logger: where the two lines go (default: the ``runcycles_server`` logger).
        monotonic_s: clock of the outage's duration (tests inject one).
    """

    def __init__(
        self,
        store: Store,
        *,
        logger: logging.Logger | None = None,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        extra: tuple[type[BaseException], ...] = getattr(store, "unavailable_errors", ())
        self.errors: tuple[type[BaseException], ...] = (StoreUnavailable, *extra)
        self.logger = logger or logging.getLogger("runcycles_server")
        self._monotonic_s = monotonic_s
        self.down_since: float | None = None
        """When the current outage began (``None``: the store is considered available)."""
        self.failed_requests = 0
        """Requests answered 503 during the current (or last) outage."""
        self.outages = 0
        """Outages seen by this process."""
        self.total_failed_requests = 0
        """Requests answered 503 because the store was unavailable, since the process began."""
        self.background_failures = 0
        """Background rounds (expiry sweep, retention purge) that failed on an unavailable
        store, since the process began."""
        self.store = store
        self.reads_prove_writes: bool = getattr(store, "reads_prove_writes", True)
        """Whether a read that succeeds ends an outage. Not on SQLite, where a file another
        program holds locked answers reads and refuses writes: there only a write ends it
        (else the outage would end and begin again with every read and failed write)."""
        self.process = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        """This process's name in the events' ``details`` and correlation ids."""
        self.pending: list[EventRecord] = []
        """Outage events not yet written (see :meth:`flush`)."""
        self._outage_id: str | None = None
        self._down_at_ms = 0
        self._error = ""

    def is_unavailable(self, exc: BaseException) -> bool:
        """Return whether ``exc`` means the store is unavailable."""
        return isinstance(exc, self.errors)

    def failed(self, exc: BaseException, *, request: bool = True) -> None:
        """Record a failure; the first one of an outage writes its line.

        Args:
            exc: the error (named in the log line, without a traceback).
            request: whether a client request failed (counted), or background work did.
        """
        if self.down_since is None:
            self.down_since = self._monotonic_s()
            self.failed_requests = 0
            self.outages += 1
            self.logger.error(
                "store unavailable (%s: %s); answering 503 with Retry-After until it answers again",
                type(exc).__name__,
                exc,
            )
            self._down_at_ms = self._now_ms()
            self._outage_id = f"store_outage:{self.process}:{self.outages}"
            self._error = f"{type(exc).__name__}: {exc}"[:500]
            self._pend(
                "system.store_connection_lost",
                "critical",
                f"store unavailable ({self._error}); requests are answered 503",
                {"error": self._error, "down_since_ms": self._down_at_ms},
                self._down_at_ms,
            )
        if request:
            self.failed_requests += 1
            self.total_failed_requests += 1
        else:
            self.background_failures += 1

    def succeeded(self, *, wrote: bool = True) -> None:
        """Record that the store answered; ends an outage (writing its closing line).

        Args:
            wrote: the call that succeeded wrote (else it only read, which ends an outage only
                where reads prove writes, see :attr:`reads_prove_writes`).
        """
        if self.down_since is None or not (wrote or self.reads_prove_writes):
            return
        lasted = self._monotonic_s() - self.down_since
        self.down_since = None
        self.logger.warning(
            "store available again after %.1f s; %d requests were answered 503 meanwhile",
            lasted,
            self.failed_requests,
        )
        details = {
            "error": self._error,
            "down_since_ms": self._down_at_ms,
            "outage_ms": round(lasted * 1000),
            "failed_requests": self.failed_requests,
        }
        message = f"store available again after {lasted:.1f} s"
        self._pend("system.store_connection_restored", "info", message, details, self._now_ms())

    def _now_ms(self) -> int:
        clock = getattr(self.store, "clock", None)
        return int(clock()) if callable(clock) else int(time.time() * 1000)

    def _pend(
        self, event_type: str, severity: str, message: str, details: dict[str, Any], at_ms: int
    ) -> None:
        data = {
            "component": "store",
            "severity": severity,
            "message": message,
            "details": {"store": type(self.store).__name__, "process": self.process, **details},
        }
        self.pending.append(
            EventRecord(
                event_id=new_event_id(at_ms),
                event_type=event_type,
                tenant_id=SYSTEM_TENANT,
                created_at_ms=at_ms,
                source=SOURCE,
                actor_type="system",
                data=data,
                correlation_id=self._outage_id,
            )
        )
        del self.pending[:-MAX_PENDING_EVENTS]

    async def flush(self) -> int:
        """Write the pending outage events, if the store is considered available.

        Returns how many were written. A write that fails keeps them for the next call (an
        unavailable store also starts, or continues, an outage).
        """
        if not self.pending or self.down_since is not None:
            return 0
        batch = list(self.pending)
        try:
            await self.store.record_events(batch)
        except Exception as exc:
            if self.is_unavailable(exc):
                self.failed(exc, request=False)
                return 0
            raise
        del self.pending[: len(batch)]
        return len(batch)
