"""Milliseconds since the epoch to and from the RFC 3339 strings of the admin plane.

The engine keeps every time as integer milliseconds (rows compare and round-trip exactly);
only the wire bodies carry strings.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Final

__all__ = ["DAY_MS", "HOUR_MS", "MINUTE_MS", "iso", "ms_from_datetime", "utc"]

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 60 * MINUTE_MS
DAY_MS: Final = 24 * HOUR_MS


def utc(ms: int) -> datetime:
    """Return the UTC datetime of ``ms``, computed on integers (no float rounding at .999)."""
    seconds, millis = divmod(ms, 1000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.replace(microsecond=millis * 1000)


def iso(ms: int) -> str:
    """Return ``ms`` as the server's timestamp string (``2026-04-09T14:32:17.000Z``)."""
    return utc(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ms_from_datetime(moment: datetime) -> int:
    """Return the epoch milliseconds of an aware datetime (sub-millisecond digits dropped)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
