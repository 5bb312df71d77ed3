"""Request latency of the runtime routes: a per-process histogram, and the high-latency rule.

The hot path pays one ``math.log`` and one list increment per runtime request
(:meth:`LatencyWatch.observe`): latencies fall into geometric buckets 5 % wide (from 1 µs to
about 100 s), so memory is fixed whatever the traffic, and a percentile read from the buckets
is within 5 % of the exact one. The monitor (:mod:`runcycles_server.monitor`) takes the
histogram every tick and keeps the ticks of the last ``latency_window_seconds``:
:class:`LatencyRule` then judges the window's percentile (p95 by default) against the
threshold and says when it **crosses** it. ``system.high_latency`` is recorded once when it
crosses; it can be recorded again only after the percentile has come back to the threshold or
below (a recovery, logged but not an event: the spec has no type for it).

Each process judges its own requests (a slow worker is reported by itself); an event names the
process in ``data.details.process``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

BUCKETS: Final = 400
"""Number of histogram buckets; the last one also holds everything slower (> ~100 s)."""
_GROWTH: Final = 1.05
_SCALE: Final = 1 / math.log(_GROWTH)


def bucket_upper_ms(index: int) -> float:
    """The upper edge of bucket ``index``, in milliseconds."""
    return float(_GROWTH ** (index + 1) / 1000)


class LatencyWatch:
    """The latency histogram of one process since the last :meth:`take` (event-loop confined)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts = [0] * BUCKETS

    def observe(self, seconds: float, _log: Any = math.log) -> None:
        """Count one request that took ``seconds``."""
        index = int(_log(seconds * 1e6) * _SCALE) if seconds > 1e-6 else 0
        self._counts[index if index < BUCKETS else BUCKETS - 1] += 1

    def take(self) -> list[int]:
        """Hand over the counts since the last call, and start afresh."""
        counts, self._counts = self._counts, [0] * BUCKETS
        return counts


def percentile_ms(counts: Sequence[int], fraction: float) -> float | None:
    """The ``fraction`` percentile (0.95: p95) of a histogram, in ms (``None``: empty)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = math.ceil(fraction * total)
    seen = 0
    for index, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return bucket_upper_ms(index)
    return bucket_upper_ms(len(counts) - 1)  # pragma: no cover - rank <= total


@dataclass(frozen=True, slots=True)
class Crossing:
    """The window's percentile went above the threshold: the ``system.high_latency`` data."""

    data: dict[str, Any]


class LatencyRule:
    """The rolling window and the crossed / recovered state of one process.

    Args:
        threshold_ms: the percentile above which latency is high.
        window_ms: the span judged (the most recent ticks covering it).
        fraction: which percentile (0.95: p95).
        min_samples: fewest requests in the window for a judgement (fewer: no change).
    """

    def __init__(
        self, threshold_ms: float, window_ms: int, fraction: float, min_samples: int
    ) -> None:
        self.threshold_ms = threshold_ms
        self.window_ms = window_ms
        self.fraction = fraction
        self.min_samples = min_samples
        self.high = False
        """Whether the last judgement found latency high (a crossing was reported)."""
        self._ticks: deque[tuple[int, list[int]]] = deque()

    def add(self, now_ms: int, counts: list[int]) -> None:
        """Add one tick's histogram and drop the ticks that left the window."""
        self._ticks.append((now_ms, counts))
        while self._ticks and self._ticks[0][0] <= now_ms - self.window_ms:
            self._ticks.popleft()

    def window(self) -> list[int]:
        """The histogram of the whole window."""
        total = [0] * BUCKETS
        for _, counts in self._ticks:
            for index, n in enumerate(counts):
                if n:
                    total[index] += n
        return total

    def judge(self) -> tuple[Crossing | None, float | None]:
        """Return ``(crossing or None, percentile in ms or None)`` and update the state.

        A crossing is returned only on the transition from not high to high.
        """
        counts = self.window()
        samples = sum(counts)
        if samples < self.min_samples:
            return None, None
        value = percentile_ms(counts, self.fraction)
        assert value is not None
        if value <= self.threshold_ms:
            self.high = False
            return None, value
        if self.high:
            return None, value
        self.high = True
        name = f"p{self.fraction * 100:g}"
        data = {
            "component": "runtime_api",
            "severity": "warning",
            "message": (
                f"{name} latency of the runtime routes is {value:.1f} ms over the last "
                f"{self.window_ms // 1000} s (threshold {self.threshold_ms:g} ms)"
            ),
            "details": {
                "percentile": name,
                "latency_ms": round(value, 3),
                "threshold_ms": self.threshold_ms,
                "window_seconds": self.window_ms // 1000,
                "sample_count": samples,
            },
        }
        return Crossing(data), value
