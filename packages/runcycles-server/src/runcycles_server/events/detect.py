"""Transition-based event detection: what an operation's changed rows mean, as events.

Pure functions over the rows before and after one operation. An event fires on the
*transition* only (a budget is exhausted once, when it runs out; not on every refusal after),
so detecting it needs nothing but the operation's own before and after states, read and
written in its transaction: no extra state, exact under any concurrency.

Utilization is the spec's ``(spent + reserved) / allocated``. A threshold ``t`` is crossed
``rising`` when utilization goes from below ``t`` to ``t`` or above, and ``falling`` when it
goes from ``t`` or above to below ``t``; a budget that falls back and rises again fires again.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

DEFAULT_THRESHOLDS: Final = (0.80, 0.95, 1.0)
"""The spec's default ``budget_utilization`` thresholds (``WebhookThresholdConfig``)."""
_DEFAULT: Final = tuple(sorted(DEFAULT_THRESHOLDS))


class BudgetState(Protocol):
    """The fields of a budget row detection reads (``ledger.BudgetRow`` has them)."""

    scope: str
    unit: str
    allocated: int
    remaining: int
    reserved: int
    spent: int
    debt: int
    overdraft_limit: int
    is_over_limit: bool


@dataclass(frozen=True, slots=True)
class Detected:
    """An event to record: its type, the scope it is about, and its ``data`` payload."""

    event_type: str
    scope: str
    data: dict[str, Any]
    correlation_id: str | None = None
    """The event's own ``correlation_id`` where its type defines one (``None``: the
    operation's); :data:`NO_CORRELATION` where its type defines one that does not apply."""


NO_CORRELATION: Final = ""
"""A :attr:`Detected.correlation_id` that records the event without any correlation id."""


def utilization(row: BudgetState) -> float | None:
    """``(spent + reserved) / allocated``; ``None`` for a budget with nothing allocated."""
    if row.allocated <= 0:
        return None
    return (row.spent + row.reserved) / row.allocated


def _amounts(row: BudgetState) -> dict[str, Any]:
    return {
        "scope": row.scope,
        "unit": row.unit,
        "allocated": row.allocated,
        "remaining": row.remaining,
        "spent": row.spent,
        "reserved": row.reserved,
    }


def budget_transitions(
    before: Iterable[BudgetState],
    after: Iterable[BudgetState],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[Detected]:
    """The events of every budget row that changed from ``before`` to ``after``.

    Rows are matched by ``(scope, unit)``; a row only in ``after`` is compared with nothing
    (a new budget crosses nothing). Per row, in this order: thresholds (ascending when
    rising, descending when falling), ``budget.exhausted`` (remaining reached 0 or below),
    ``budget.over_limit_entered`` / ``exited``, ``budget.debt_incurred``. Runs on every
    write of a budget, so the common case (nothing crossed) returns after a few comparisons.
    """
    old: Mapping[tuple[str, str], BudgetState] = {(b.scope, b.unit): b for b in before}
    ordered = tuple(sorted(thresholds)) if thresholds is not DEFAULT_THRESHOLDS else _DEFAULT
    found: list[Detected] = []
    for new in after:
        prev = old.get((new.scope, new.unit))
        if prev is None:
            continue
        if new.allocated > 0 and prev.allocated > 0:
            was = (prev.spent + prev.reserved) / prev.allocated
            now = (new.spent + new.reserved) / new.allocated
            low, high = (was, now) if was < now else (now, was)
            first_above = bisect.bisect_right(ordered, low)  # thresholds are sorted
            if was != now and first_above < len(ordered) and ordered[first_above] <= high:
                found += _threshold_crossings(prev, new, ordered)
        if prev.remaining > 0 >= new.remaining:
            data = {**_amounts(new), "utilization": utilization(new), "direction": "rising"}
            found.append(Detected("budget.exhausted", new.scope, data))
        if new.is_over_limit != prev.is_over_limit:
            kind = "entered" if new.is_over_limit else "exited"
            data = {
                "scope": new.scope,
                "unit": new.unit,
                "debt": new.debt,
                "overdraft_limit": new.overdraft_limit,
                "is_over_limit": new.is_over_limit,
            }
            if new.overdraft_limit > 0:
                data["debt_utilization"] = new.debt / new.overdraft_limit
            found.append(Detected(f"budget.over_limit_{kind}", new.scope, data))
        if new.debt > prev.debt:
            data = {
                "scope": new.scope,
                "unit": new.unit,
                "debt_incurred": new.debt - prev.debt,
                "total_debt": new.debt,
                "overdraft_limit": new.overdraft_limit,
            }
            found.append(Detected("budget.debt_incurred", new.scope, data))
    return found


def _threshold_crossings(
    prev: BudgetState, new: BudgetState, thresholds: Sequence[float]
) -> list[Detected]:
    was, now = utilization(prev), utilization(new)
    if was is None or now is None or was == now:
        return []
    rising = now > was
    crossed = [t for t in thresholds if (was < t <= now if rising else now < t <= was)]
    if not rising:
        crossed.reverse()
    direction = "rising" if rising else "falling"
    return [
        Detected(
            "budget.threshold_crossed",
            new.scope,
            {**_amounts(new), "threshold": t, "utilization": now, "direction": direction},
        )
        for t in crossed
    ]
