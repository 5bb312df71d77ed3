"""Optional per-tenant request rate limit: a token bucket per tenant, in this process.

``cycles serve --rate-limit N`` (or ``create_app(..., rate_limit_per_s=N)``) gives every tenant a
bucket holding at most ``N`` tokens, refilled at ``N`` tokens per second. Each request
authenticated with a tenant API key takes one token; when the bucket is empty the request is
refused with ``429 LIMIT_EXCEEDED`` (the spec's ``ErrorResponse``) carrying ``Retry-After``
(whole seconds until a token is back, at least 1) and ``X-RateLimit-Reset``. Every response to
a tenant-key request carries:

* ``X-RateLimit-Remaining``: whole tokens left in the tenant's bucket after this request;
* ``X-RateLimit-Reset``: Unix time (seconds, rounded up) at which the bucket is full again.

Requests with the admin key, and ``/healthz`` and ``/readyz``, are never limited. The limit
is off by default; off, the only per-request cost is one dictionary lookup.

The buckets live in the server process: with ``--workers W`` (or several server processes
sharing one SQLite file or one Redis) a tenant may reach up to ``W x N`` requests per second in
total, ``N`` on each process. That bounds the damage one tenant can do to one process without
a round trip to a shared store on every request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final

from runcycles_server.ledger import LedgerError

__all__ = ["RATE_LIMIT_STATE_KEY", "TokenBucketLimiter"]

RATE_LIMIT_STATE_KEY: Final = "rate_limit_headers"
"""Key in the request's ``scope["state"]`` holding the headers :class:`ContextMiddleware` adds."""

MAX_TRACKED_TENANTS: Final = 10_000
"""Buckets kept before idle (full) ones are dropped; a dropped bucket restarts full anyway."""


class TokenBucketLimiter:
    """Token buckets keyed by tenant id, ``rate_per_s`` tokens per second, ``burst`` at most.

    Args:
        rate_per_s: tokens added per second (the sustained requests/s per tenant); > 0.
        burst: bucket size (default: ``rate_per_s``, i.e. one second's worth, at least 1).
        monotonic_s: clock for refills (seconds; tests inject one).
        wall_s: Unix clock for ``X-RateLimit-Reset`` (seconds; tests inject one).

    Raises:
        ValueError: if ``rate_per_s`` or ``burst`` is not a positive finite number.
    """

    def __init__(
        self,
        rate_per_s: float,
        *,
        burst: float | None = None,
        monotonic_s: Callable[[], float] = time.monotonic,
        wall_s: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(
                f"rate limit must be a positive number of requests/s, not {rate_per_s}"
            )
        capacity = max(1.0, rate_per_s) if burst is None else burst
        if not (math.isfinite(capacity) and capacity >= 1):
            raise ValueError(f"rate limit burst must be at least 1, not {burst}")
        self.rate = float(rate_per_s)
        self.capacity = float(capacity)
        self._monotonic_s = monotonic_s
        self._wall_s = wall_s
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at monotonic s)

    def take(self, tenant_id: str) -> tuple[bool, int, int, int]:
        """Take one token for ``tenant_id``.

        Returns:
            ``(allowed, remaining, reset_epoch_s, retry_after_s)``: whether the request may
            proceed, whole tokens left, the Unix second by which the bucket is full again, and
            (when refused) whole seconds until one token is back (else 0).
        """
        now = self._monotonic_s()
        state = self._buckets.get(tenant_id)
        if state is None:
            tokens = self.capacity
        else:
            tokens = min(self.capacity, state[0] + (now - state[1]) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if state is None and len(self._buckets) >= MAX_TRACKED_TENANTS:
            self._drop_full(now)
        self._buckets[tenant_id] = (tokens, now)
        wall = self._wall_s()
        reset = math.ceil(wall + (self.capacity - tokens) / self.rate)
        retry_after = 0 if allowed else max(1, math.ceil((1.0 - tokens) / self.rate))
        return allowed, int(tokens), reset, retry_after

    def check(self, state: MutableMapping[str, Any], tenant_id: str) -> None:
        """Take a token; record the rate-limit headers in the request ``state``.

        Raises:
            LedgerError: LIMIT_EXCEEDED (429) when the tenant's bucket is empty.
        """
        allowed, remaining, reset, retry_after = self.take(tenant_id)
        headers = [
            (b"x-ratelimit-remaining", str(remaining).encode()),
            (b"x-ratelimit-reset", str(reset).encode()),
        ]
        if not allowed:
            headers.append((b"retry-after", str(retry_after).encode()))
        state[RATE_LIMIT_STATE_KEY] = headers
        if not allowed:
            raise LedgerError(
                "LIMIT_EXCEEDED",
                f"tenant {tenant_id!r} is over this server's rate limit of {self.rate:g} "
                f"requests/s; retry after {retry_after} s (Retry-After header)",
                details={"limit_per_s": self.rate, "retry_after_s": retry_after},
            )

    def _drop_full(self, now: float) -> None:
        """Forget buckets that have refilled completely (they would restart full anyway)."""
        full = [
            tenant
            for tenant, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.capacity
        ]
        for tenant in full:
            del self._buckets[tenant]
        if len(self._buckets) >= MAX_TRACKED_TENANTS:  # all busy: bound memory regardless
            self._buckets.clear()
