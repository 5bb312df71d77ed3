"""Store outages: which errors mean "the store is unavailable", and one log line per outage.

When the store (Redis, usually) is down or hung, every request fails the same way; a traceback
per request would flood the log (3.5 KB each) and say nothing new. :class:`StoreHealth` turns
an outage into two lines on the ``runcycles_server`` logger, whatever the number of requests::

    store unavailable (TimeoutError: Timeout reading from 10.0.0.5:6379); answering 503 [...]
    store available again after 12.4 s; 57 requests were answered 503 meanwhile

The first is written by the first failure (ERROR), the second (WARNING) by the first store call
that succeeds afterwards: the expiry sweep (every second) or ``GET /readyz``. Requests that
fail meanwhile are counted, not logged, and answered ``503`` with ``Retry-After`` (see
:class:`runcycles_server.web.ContextMiddleware`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from runcycles_server.stores.base import Store, StoreUnavailable

__all__ = ["RETRY_AFTER_S", "StoreHealth"]

RETRY_AFTER_S: Final = 1
"""``Retry-After`` (seconds) of a 503 answered because the store is unavailable."""


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
        if request:
            self.failed_requests += 1
            self.total_failed_requests += 1
        else:
            self.background_failures += 1

    def succeeded(self) -> None:
        """Record that the store answered; ends an outage (writing its closing line)."""
        if self.down_since is None:
            return
        lasted = self._monotonic_s() - self.down_since
        self.down_since = None
        self.logger.warning(
            "store available again after %.1f s; %d requests were answered 503 meanwhile",
            lasted,
            self.failed_requests,
        )
