"""Pure helpers the console's templates use: amounts, utilization, attention levels."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Final

NEAR_LIMIT: Final = 0.8
"""Utilization from which a budget is listed as near its limit (the overview's card)."""
_MICROCENTS_PER_USD: Final = 100_000_000


def amount(value: Any) -> str:
    """An ``Amount`` (``{"unit", "amount"}``) for people: dollars for ``USD_MICROCENTS``."""
    if not isinstance(value, dict):
        return "—"
    number = value.get("amount")
    unit = str(value.get("unit", ""))
    if not isinstance(number, int):
        return "—"
    if unit == "USD_MICROCENTS":
        return dollars(number)
    return f"{number:,} {unit.lower().replace('_', ' ')}"


def dollars(microcents: int) -> str:
    """USD microcents as dollars, never rounding a small amount to ``$0.00``.

    Cents when whole (``$12.50``), else every digit needed (``$0.002``, ``$0.00000001``).
    """
    sign = "-" if microcents < 0 else ""
    whole, rest = divmod(abs(microcents), _MICROCENTS_PER_USD)
    fraction = f"{rest:08d}".rstrip("0")
    fraction = fraction.ljust(2, "0")
    return f"{sign}${whole:,}.{fraction}"


def utilization(budget: dict[str, Any]) -> float:
    """The used share of a budget: ``(allocated - remaining) / allocated`` (0 when unfunded).

    Remaining already subtracts spent, reserved and debt, so a budget whose reservations hold
    80 % of it is at 0.8 before anything is committed. Over 1 when in overdraft.
    """
    allocated = amount_of(budget.get("allocated"))
    if allocated <= 0:
        return (
            1.0 if amount_of(budget.get("spent")) + amount_of(budget.get("reserved")) > 0 else 0.0
        )
    return (allocated - amount_of(budget.get("remaining"))) / allocated


def level(share: float, status: str = "ACTIVE") -> str:
    """The attention level of a utilization: ``ok``, ``near`` (≥ 80 %) or ``over`` (≥ 100 %)."""
    if status == "FROZEN":
        return "frozen"
    if share >= 1:
        return "over"
    if share >= NEAR_LIMIT:
        return "near"
    return "ok"


def percent(share: float) -> str:
    """A share as a whole percentage (``80 %``)."""
    return f"{share * 100:.0f} %"


def compact_json(value: Any) -> str:
    """A short one-line JSON rendering of event data."""
    return json.dumps(value, separators=(", ", ": "), sort_keys=True, default=str)


def amount_of(value: Any) -> int:
    """The integer of an ``Amount`` (or a bare int); 0 when absent."""
    if isinstance(value, dict):
        value = value.get("amount")
    return value if isinstance(value, int) else 0


def when(epoch_ms: Any) -> str:
    """Epoch milliseconds as a UTC time people read (``2026-12-07 18:30:05 UTC``)."""
    if not isinstance(epoch_ms, int):
        return "—"
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(epoch_ms: int) -> str:
    """Epoch milliseconds as an RFC 3339 UTC timestamp (a query parameter of the API)."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(hours: float | None) -> str:
    """A number of hours for people: ``45 min``, ``6.5 h``, ``3.2 days``; ``—`` for none."""
    if hours is None:
        return "—"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"
