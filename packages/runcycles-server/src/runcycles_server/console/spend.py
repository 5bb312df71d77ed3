"""Spend over time for one budget scope: committed reservations and direct debits.

There is no separate spend table. Spend is recorded two ways, and the chart sums both:

* a commit finalizes a reservation; finished reservations are kept for the server's
  ``retention_days`` (7 by default) with their ``committed`` amount, ``finalized_at_ms`` and
  ``affected_scopes``. The console lists a tenant's COMMITTED reservations finalized in the
  range (``GET /v1/reservations`` with ``finalized_from``/``finalized_to``);
* ``POST /v1/events`` debits without a reservation; the store keeps each such debit (its
  ``charged`` amount, time and ``affected_scopes``) as long as events, and the console reads
  them from the store (:class:`~runcycles_server.stores.base.DebitReader`: there is no API
  path listing them).

Those that touched the scope in its unit are summed into buckets. Anything older than the
retention is not counted. At most :data:`MAX_RESERVATIONS` reservations and
:data:`MAX_DEBITS` debits are read per chart; past that the series is partial.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from runcycles_server.ledger import EventRow

MAX_RESERVATIONS: Final = 20_000
"""Reservations read for one chart (100 pages of 200)."""
MAX_DEBITS: Final = 20_000
"""Direct debits (``POST /v1/events``) read for one chart."""
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
    """Whether :data:`MAX_RESERVATIONS` or :data:`MAX_DEBITS` cut a listing short (the
    amounts are a lower bound)."""
    debits: int = 0
    """Direct debits (``POST /v1/events``) that touched the scope."""

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
    debits: Iterable[EventRow] = (),
    partial: bool = False,
) -> Series:
    """Sum what reservations committed and debits charged on ``scope`` into buckets."""
    start = end_ms - chart.span_ms
    width = chart.bucket_ms
    amounts = [0] * chart.buckets
    last_hour = 0
    counts = [0, 0]

    def add(amount: int, at_ms: int, kind: int) -> None:
        nonlocal last_hour
        if not start <= at_ms <= end_ms:
            return
        counts[kind] += 1
        amounts[min((at_ms - start) // width, chart.buckets - 1)] += amount
        if at_ms > end_ms - HOUR_MS:
            last_hour += amount

    for res in reservations:
        committed = res.get("committed")
        done = res.get("finalized_at_ms")
        if not isinstance(committed, dict) or not isinstance(done, int):
            continue
        if committed.get("unit") != unit or scope not in res.get("affected_scopes", ()):
            continue
        amount = committed.get("amount")
        if isinstance(amount, int):
            add(amount, done, 0)
    for debit in debits:
        if debit.unit == unit and scope in debit.affected_scopes:
            add(debit.charged, debit.created_at_ms, 1)
    return Series(start, width, amounts, last_hour, counts[0], partial, counts[1])
