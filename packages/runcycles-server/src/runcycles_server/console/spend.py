"""Spend over time for one budget scope, from the reservations committed against it.

There is no separate spend table: every commit finalizes a reservation, and finished
reservations are kept for the server's ``retention_days`` (7 by default) with their
``committed`` amount, ``finalized_at_ms`` and ``affected_scopes``. The console lists a
tenant's COMMITTED reservations finalized in the chosen range (``GET /v1/reservations`` with
``finalized_from``/``finalized_to``) and sums those that touched the scope into buckets.

What this does not count, and the page says so: post-hoc spend recorded with
``POST /v1/events`` (no reservation), and anything older than the retention. At most
:data:`MAX_RESERVATIONS` reservations are read per chart; past that the series is partial.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

MAX_RESERVATIONS: Final = 20_000
"""Reservations read for one chart (100 pages of 200)."""
HOUR_MS: Final = 3_600_000


@dataclass(frozen=True)
class Range:
    """A chart's time range and its bucket size."""

    name: str
    label: str
    span_ms: int
    buckets: int

    @property
    def bucket_ms(self) -> int:
        """The width of one bucket."""
        return self.span_ms // self.buckets


RANGES: Final = {
    "hour": Range("hour", "last hour (5-minute bars)", HOUR_MS, 12),
    "day": Range("day", "last 24 hours (hourly bars)", 24 * HOUR_MS, 24),
    "week": Range("week", "last 7 days (6-hour bars)", 7 * 24 * HOUR_MS, 28),
}


@dataclass(frozen=True)
class Series:
    """Spend per bucket over a range, with its burn rates."""

    start_ms: int
    bucket_ms: int
    amounts: list[int]
    last_hour: int
    """Spent in the hour before the range's end (the current burn rate, per hour)."""
    counted: int
    """Reservations that touched the scope."""
    partial: bool
    """Whether :data:`MAX_RESERVATIONS` cut the listing short (the amounts are a lower bound)."""

    @property
    def total(self) -> int:
        """Spent over the whole range."""
        return sum(self.amounts)

    @property
    def peak(self) -> int:
        """The largest bucket (the chart's scale)."""
        return max(self.amounts, default=0)

    def per_hour(self) -> float:
        """The average burn rate over the range, per hour."""
        span = self.bucket_ms * len(self.amounts)
        return self.total * HOUR_MS / span if span else 0.0

    def hours_left(self, remaining: int) -> float | None:
        """Hours until ``remaining`` is spent at the last hour's rate (``None``: not burning)."""
        if self.last_hour <= 0:
            return None
        return max(remaining, 0) / self.last_hour


def series(
    reservations: Iterable[dict[str, Any]],
    scope: str,
    unit: str,
    chart: Range,
    end_ms: int,
    *,
    partial: bool = False,
) -> Series:
    """Sum the ``committed`` amounts of reservations that touched ``scope`` into buckets."""
    start = end_ms - chart.span_ms
    width = chart.bucket_ms
    amounts = [0] * chart.buckets
    last_hour = counted = 0
    for res in reservations:
        committed = res.get("committed")
        done = res.get("finalized_at_ms")
        if not isinstance(committed, dict) or not isinstance(done, int):
            continue
        if committed.get("unit") != unit or scope not in res.get("affected_scopes", ()):
            continue
        amount = committed.get("amount")
        if not isinstance(amount, int) or not start <= done <= end_ms:
            continue
        counted += 1
        amounts[min((done - start) // width, chart.buckets - 1)] += amount
        if done > end_ms - HOUR_MS:
            last_hour += amount
    return Series(start, width, amounts, last_hour, counted, partial)
