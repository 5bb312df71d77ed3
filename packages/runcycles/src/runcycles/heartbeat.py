"""Keep live reservations from expiring: one heartbeat scheduler per client.

One worker per client (a daemon thread, or one asyncio task), over a heap of due times. The
pure :class:`LeasePlanner` implements the spec's ``extendReservation`` HEARTBEAT GUIDANCE;
``docs/heartbeat.md`` has the API, the formulas and the failure policy (log and report every
retry and stop as a :class:`HeartbeatEvent`; never cancel the work nor suppress the commit).

Times are milliseconds. Budgets and margins round up, leads and delays round down, and an
unknown request timeout counts as infinite, as the spec requires.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Protocol, TypeVar

from runcycles.exceptions import CyclesError
from runcycles.models import ErrorCode, ReservationExtendRequest, ReservationExtendResponse
from runcycles.retry import single_attempt_options

if TYPE_CHECKING:
    from typing_extensions import Self

    from runcycles.response import CyclesResponse

__all__ = [
    "TERMINAL_EXTEND_ERRORS",
    "AsyncHeartbeatScheduler",
    "Disposition",
    "FailureKind",
    "HeartbeatEvent",
    "HeartbeatHandle",
    "HeartbeatScheduler",
    "HeartbeatStep",
    "LeasePlanner",
    "attempt_budget_ms",
    "classify_extend_response",
    "next_delay_ms",
    "retry_delay_ms",
    "safety_margin_ms",
]

logger = logging.getLogger("runcycles.heartbeat")
_T = TypeVar("_T")

Disposition = Literal[
    "extended",
    "retrying",
    "stopped_terminal",
    "stopped_rejected",
    "stopped_window_exhausted",
    "stopped_rate_limited",
    "stopped_no_progress",
    "stopped_lease_too_short",
]
"""What happened after one extend attempt (``stopped_*`` means the heartbeat has ended)."""

FailureKind = Literal["transient", "rate_limited", "terminal", "rejected"]
"""How a failed extend is treated: retry (``transient``, ``rate_limited``) or stop."""

TERMINAL_EXTEND_ERRORS: Final = frozenset(
    {
        ErrorCode.RESERVATION_EXPIRED,
        ErrorCode.RESERVATION_FINALIZED,
        ErrorCode.MAX_EXTENSIONS_EXCEEDED,
        ErrorCode.TENANT_CLOSED,
        ErrorCode.NOT_FOUND,
    }
)
"""Error codes that end a heartbeat for good (the condition is permanent)."""

_MIN_BUDGET_MS: Final = 1_000
_RETRY_DELAY_CAP_MS: Final = 30_000
_FALLBACK_CADENCE_CAP_MS: Final = 30_000
_FALLBACK_MIN_CADENCE_MS: Final = 1_000


# --------------------------------------------------------------------------------------------
# Pure arithmetic (spec: extendReservation HEARTBEAT GUIDANCE, primary algorithm)


def attempt_budget_ms(request_timeout_ms: int | None, max_rtt_ms: int) -> int | None:
    """Return ``max(request_timeout_ms, 1000, 2 * max_rtt_ms)``; ``None`` means infinite.

    ``request_timeout_ms`` bounds one extend attempt (``None``: unknown or unbounded).
    """
    if request_timeout_ms is None:
        return None
    return max(request_timeout_ms, _MIN_BUDGET_MS, 2 * max_rtt_ms)


def safety_margin_ms(max_rtt_ms: int) -> int:
    """Return ``max(1000, 2 * max_rtt)``."""
    return max(_MIN_BUDGET_MS, 2 * max_rtt_ms)


def next_delay_ms(
    *,
    remaining_ttl_ms: int,
    rtt_ms: int | None,
    request_timeout_ms: int | None,
    max_rtt_ms: int = 0,
) -> int:
    """Return how long after a successful response the next extend is due.

    ``next_delay = max(0, lead_floor - (2 * attempt_budget + safety_margin))`` with
    ``lead_floor = max(0, remaining_ttl_ms - rtt)`` (``docs/heartbeat.md`` has an example).
    Unknown timing (``rtt_ms=None``) or an unbounded timeout gives 0: unknown time is never
    treated as zero elapsed. ``max_rtt_ms`` is the largest rtt observed before this one.
    """
    if rtt_ms is None or rtt_ms < 0:
        return 0
    max_rtt = max(max_rtt_ms, rtt_ms)
    budget = attempt_budget_ms(request_timeout_ms, max_rtt)
    if budget is None:
        return 0
    lead_floor = max(0, remaining_ttl_ms - rtt_ms)
    return max(0, lead_floor - (2 * budget + safety_margin_ms(max_rtt)))


def retry_delay_ms(
    *,
    current_lead_ms: int,
    attempt_budget: int | None,
    safety_margin: int,
    retry_after_ms: int | None = None,
    rate_limited: bool = False,
) -> int | None:
    """Return the wait before a same-key retry of a failed extend, or ``None`` to stop.

    ``retry_window = current_lead - attempt_budget - safety_margin`` (not clamped). A negative
    window stops. Otherwise a transient failure waits ``min(30000, current_lead / 4,
    retry_window)``; a 429 waits exactly ``retry_after_ms`` if that fits in the window, and
    stops if it does not or if the server sent no valid ``Retry-After``.
    """
    if attempt_budget is None:
        return None
    window = current_lead_ms - attempt_budget - safety_margin
    if window < 0:
        return None
    if rate_limited:
        if retry_after_ms is None or retry_after_ms < 0 or retry_after_ms > window:
            return None
        return retry_after_ms
    return min(_RETRY_DELAY_CAP_MS, current_lead_ms // 4, window)


def _ceil_ms(value: float) -> int:
    return math.ceil(value) if math.isfinite(value) else 0


class HeartbeatStep(NamedTuple):
    """The planner's answer: when to send the next extend, or that the heartbeat is over.

    Attributes:
        delay_ms: Wait before the next attempt; ``None`` means stop.
        fresh_key: Whether the next attempt is a new beat (new idempotency key) rather than a
            retry of the current one (same key).
        disposition: What the last outcome means (see :data:`Disposition`).
        detail: A human-readable reason, used in logs and events.
    """

    delay_ms: int | None
    fresh_key: bool
    disposition: Disposition
    detail: str


class LeasePlanner:
    """Pure heartbeat state machine of one reservation (no I/O, no clock of its own).

    Feed it the outcome of every attempt with the monotonic time in ms; it answers with a
    :class:`HeartbeatStep`. It implements the spec's primary algorithm whenever a response
    carries ``remaining_ttl_ms`` (retry window, 429 handling, zero-delay and progress guards)
    and the non-normative measured-grant fallback otherwise.

    Args:
        ttl_ms: The ttl requested at create; also the ``extend_by_ms`` of every beat.
        request_timeout_ms: Enforced bound of one extend attempt (``None``: unbounded).
    """

    __slots__ = (
        "_fail_elapsed_ms",
        "_fail_window_ms",
        "_fallback",
        "_grant_sum_ms",
        "_last_expires_at_ms",
        "_last_grant_ms",
        "_last_success_ms",
        "_lead_anchor_ms",
        "_lead_floor_ms",
        "_max_rtt_ms",
        "_reserve_anchor_ms",
        "_zero_delay_seen",
        "_zero_window_retry_used",
        "cadence_ms",
        "request_timeout_ms",
        "ttl_ms",
    )

    def __init__(self, ttl_ms: int, request_timeout_ms: int | None) -> None:
        self.ttl_ms = ttl_ms
        self.request_timeout_ms = request_timeout_ms
        self.cadence_ms = 0
        self._max_rtt_ms = 0
        self._lead_floor_ms = 0
        self._lead_anchor_ms = 0.0
        self._zero_delay_seen = False
        self._fail_elapsed_ms: int | None = None
        self._fail_window_ms: int | None = None
        self._zero_window_retry_used = False
        self._fallback = False
        self._reserve_anchor_ms = 0.0
        self._grant_sum_ms = 0
        self._last_expires_at_ms: int | None = None
        self._last_grant_ms: int | None = None
        self._last_success_ms = 0.0

    @property
    def max_rtt_ms(self) -> int:
        """Largest round-trip time observed so far."""
        return self._max_rtt_ms

    @property
    def lead_floor_ms(self) -> int:
        """Lead lower bound established by the last schema-valid response (primary path)."""
        return self._lead_floor_ms

    @property
    def uses_fallback(self) -> bool:
        """Whether the last success lacked ``remaining_ttl_ms`` (measured-grant fallback)."""
        return self._fallback

    def on_success(
        self,
        now_ms: float,
        *,
        rtt_ms: float | None,
        remaining_ttl_ms: int | None,
        expires_at_ms: int | None,
        initial: bool = False,
    ) -> HeartbeatStep:
        """Plan after a schema-valid 200 received at ``now_ms`` (the create one if ``initial``).

        ``rtt_ms`` is the attempt's duration (``None``: unknown); the other two are the
        response's fields (``remaining_ttl_ms=None``: absent, the measured-grant fallback).
        """
        self._fail_elapsed_ms = None
        self._fail_window_ms = None
        self._zero_window_retry_used = False
        rtt = None if rtt_ms is None or not rtt_ms >= 0 else _ceil_ms(rtt_ms)
        if rtt is not None:
            self._max_rtt_ms = max(self._max_rtt_ms, rtt)
        if remaining_ttl_ms is None:
            return self._fallback_success(now_ms, expires_at_ms, initial)
        self._fallback = False
        self._lead_floor_ms = 0 if rtt is None else max(0, remaining_ttl_ms - rtt)
        self._lead_anchor_ms = now_ms
        delay = next_delay_ms(
            remaining_ttl_ms=remaining_ttl_ms,
            rtt_ms=rtt,
            request_timeout_ms=self.request_timeout_ms,
            max_rtt_ms=self._max_rtt_ms,
        )
        if delay == 0:
            if self._zero_delay_seen:
                return HeartbeatStep(
                    None,
                    True,
                    "stopped_lease_too_short",
                    "the lease is shorter than the heartbeat's retry-safety budget "
                    f"(lead {self._lead_floor_ms} ms); use a longer ttl_ms or shorter timeouts",
                )
            self._zero_delay_seen = True
        else:
            self._zero_delay_seen = False
        return HeartbeatStep(delay, True, "extended", f"next extend in {delay} ms")

    def on_failure(
        self, now_ms: float, kind: FailureKind, *, retry_after_ms: int | None = None
    ) -> HeartbeatStep:
        """Plan after a failed or ambiguous attempt observed at ``now_ms``.

        ``kind`` comes from :func:`classify_extend_response`; ``retry_after_ms`` is the
        429's ``Retry-After`` (``None``: missing or invalid).
        """
        if kind == "terminal":
            return HeartbeatStep(
                None, False, "stopped_terminal", "the reservation cannot be extended"
            )
        if kind == "rejected":
            return HeartbeatStep(None, False, "stopped_rejected", "the server rejected the extend")
        if self._fallback:
            horizon_ms = max(self.ttl_ms, self._lead_min_ms(self._last_success_ms))
            elapsed = _ceil_ms(now_ms - self._last_success_ms)
            current_lead = horizon_ms - elapsed
            window = current_lead
        else:
            budget = attempt_budget_ms(self.request_timeout_ms, self._max_rtt_ms)
            margin = safety_margin_ms(self._max_rtt_ms)
            elapsed = _ceil_ms(now_ms - self._lead_anchor_ms)
            current_lead = max(0, self._lead_floor_ms - elapsed)
            window = -1 if budget is None else current_lead - budget - margin
        if window < 0:
            return HeartbeatStep(
                None,
                False,
                "stopped_window_exhausted",
                "no complete retry fits in the remaining lease any more",
            )
        if (
            self._fail_elapsed_ms is not None
            and self._fail_window_ms is not None
            and elapsed <= self._fail_elapsed_ms
            and window >= self._fail_window_ms
        ):
            return HeartbeatStep(
                None, False, "stopped_no_progress", "no time passed between two failures"
            )
        self._fail_elapsed_ms, self._fail_window_ms = elapsed, window
        if window == 0:
            if self._zero_window_retry_used:
                return HeartbeatStep(
                    None, False, "stopped_window_exhausted", "the zero-window retry also failed"
                )
            self._zero_window_retry_used = True
        if kind == "rate_limited":
            if retry_after_ms is None or retry_after_ms < 0 or retry_after_ms > window:
                return HeartbeatStep(
                    None,
                    False,
                    "stopped_rate_limited",
                    f"the server's Retry-After ({retry_after_ms} ms) does not fit in the "
                    f"remaining retry window ({window} ms)",
                )
            return HeartbeatStep(retry_after_ms, False, "retrying", "rate limited")
        if self._fallback:
            delay = max(0, min(_RETRY_DELAY_CAP_MS, self.ttl_ms // 4, window))
        else:
            delay = min(_RETRY_DELAY_CAP_MS, current_lead // 4, window)
        return HeartbeatStep(delay, False, "retrying", f"retrying the same beat in {delay} ms")

    def on_due(self, now_ms: float) -> int:
        """Return 0 to send the due beat now, or ms to skip it (fallback ``lead_min`` rule)."""
        if not self._fallback or not self._last_grant_ms or self._last_grant_ms <= 0:
            return 0
        if self._lead_min_ms(now_ms) >= 1.5 * self._last_grant_ms:
            return max(self.cadence_ms, _FALLBACK_MIN_CADENCE_MS)
        return 0

    # ------------------------------------------------------------------------ fallback path

    def _lead_min_ms(self, now_ms: float) -> int:
        return self._grant_sum_ms - _ceil_ms(now_ms - self._reserve_anchor_ms)

    def _fallback_success(
        self, now_ms: float, expires_at_ms: int | None, initial: bool
    ) -> HeartbeatStep:
        if initial or not self._fallback:
            self._fallback = True
            self._reserve_anchor_ms = now_ms
            self._grant_sum_ms = 0
            self._last_grant_ms = None
            self._last_expires_at_ms = expires_at_ms
            self._last_success_ms = now_ms
            self.cadence_ms = min(self.ttl_ms // 2, _FALLBACK_CADENCE_CAP_MS)
            return HeartbeatStep(0, True, "extended", "no remaining_ttl_ms: first extend now")
        elapsed = max(0, _ceil_ms(now_ms - self._last_success_ms))
        grant: int | None = None
        if expires_at_ms is not None and self._last_expires_at_ms is not None:
            grant = expires_at_ms - self._last_expires_at_ms
            self._grant_sum_ms += grant
            self._last_grant_ms = grant
        if expires_at_ms is not None:
            self._last_expires_at_ms = expires_at_ms
        self._last_success_ms = now_ms
        held = min(self.ttl_ms // 2, _FALLBACK_CADENCE_CAP_MS)
        if grant is None or grant <= 0:
            cadence = held
        elif grant >= 0.9 * self.ttl_ms:
            cadence = max(_FALLBACK_MIN_CADENCE_MS, grant // 2)
        elif 0.75 * elapsed <= grant <= 1.25 * elapsed:
            cadence = held  # maximum-lead clamping: hold the cadence, let the server stop us
        else:
            cadence = max(_FALLBACK_MIN_CADENCE_MS, grant // 2)
        self.cadence_ms = max(1, cadence)
        return HeartbeatStep(self.cadence_ms, True, "extended", f"grant {grant} ms")


# --------------------------------------------------------------------------------------------
# Classification of one extend answer


class _Outcome(NamedTuple):
    data: ReservationExtendResponse | None
    kind: FailureKind | None
    status: int
    error_code: str | None
    message: str | None
    retry_after_ms: int | None


def classify_extend_response(
    response: CyclesResponse[ReservationExtendResponse],
) -> tuple[ReservationExtendResponse | None, FailureKind | None]:
    """Return ``(data, None)`` for a schema-valid 200, else ``(None, failure kind)``.

    Only an HTTP 200 whose body validates as ``ReservationExtendResponse`` is a success. Any
    other 2xx, a transport failure or a 5xx is ``transient`` (ambiguous: retry with the same
    key); 429 is ``rate_limited``; the permanent codes of :data:`TERMINAL_EXTEND_ERRORS` (or
    HTTP 404/410) are ``terminal``; every other answer is ``rejected``.
    """
    outcome = _classify(response)
    return outcome.data, outcome.kind


def _classify(response: CyclesResponse[ReservationExtendResponse]) -> _Outcome:
    status = response.status
    error_code = None
    if response.body is not None and not 200 <= status < 300:
        code = response.body.get("error")
        error_code = code if isinstance(code, str) else None
    kind: FailureKind
    if status == 200 and response.body is not None:
        try:
            data = response.data
        except CyclesError as exc:
            return _Outcome(None, "transient", status, None, str(exc), None)
        return _Outcome(data, None, status, None, None, None)
    if response.is_transport_error or 200 <= status < 300 or status >= 500:
        kind = "transient"
    elif status == 429:
        kind = "rate_limited"
    elif error_code in TERMINAL_EXTEND_ERRORS or status in (404, 410):
        kind = "terminal"
    else:
        kind = "rejected"
    message = response.error_message or f"HTTP {status}"
    retry_after = response.retry_after_ms if status == 429 else None
    return _Outcome(None, kind, status, error_code, message, retry_after)


# --------------------------------------------------------------------------------------------
# Events and handles


@dataclass(frozen=True, slots=True)
class HeartbeatEvent:
    """What one extend attempt led to; passed to ``on_event`` callbacks and logged.

    Attributes:
        reservation_id: The reservation concerned.
        disposition: ``extended``, ``retrying`` or a ``stopped_*`` value (see
            :data:`Disposition`); every ``stopped_*`` ends the heartbeat, never the work.
        status: HTTP status of the answer (``-1``: transport error; ``None``: no request).
        error_code: The error body's ``error`` code, if any.
        message: Why it failed, or what happens next.
        expires_at_ms: Latest expiry known for the reservation.
        next_delay_ms: Wait before the next attempt (``None`` once stopped).
        attempt: Attempt number within the current beat (1 = first try of the beat).
    """

    reservation_id: str
    disposition: Disposition
    status: int | None = None
    error_code: str | None = None
    message: str | None = None
    expires_at_ms: int | None = None
    next_delay_ms: int | None = None
    attempt: int = 1

    @property
    def stopped(self) -> bool:
        """Whether the heartbeat of this reservation has ended."""
        return self.disposition.startswith("stopped")


EventCallback = Callable[[HeartbeatEvent], object]


class _Stoppable(Protocol):
    def _forget(self, handle: HeartbeatHandle) -> None: ...


class HeartbeatHandle:
    """A tracked reservation. Read the latest lease from it; :meth:`stop` it before settling.

    Handles are created by ``track()``; they are cheap (``__slots__``) and safe to keep after
    the heartbeat ended.
    """

    __slots__ = (
        "_attempt",
        "_expires_at_ms",
        "_gen",
        "_init",
        "_key",
        "_last_event",
        "_on_event",
        "_owner",
        "_planner",
        "_remaining_ttl_ms",
        "_stopped",
        "beats",
        "reservation_id",
    )

    def __init__(
        self,
        owner: _Stoppable,
        reservation_id: str,
        planner: LeasePlanner | None,
        expires_at_ms: int | None,
        remaining_ttl_ms: int | None,
        on_event: EventCallback | None,
    ) -> None:
        self._owner = owner
        self.reservation_id = reservation_id
        self._planner = planner
        # (ttl_ms, now_ms, rtt_ms) of the create response while the planner is not built:
        # most reservations end before their first beat, so it is built when first due.
        self._init: tuple[int, float, float | None] | None = None
        self._expires_at_ms = expires_at_ms
        self._remaining_ttl_ms = remaining_ttl_ms
        self._on_event = on_event
        self._stopped = False
        self._gen = 0
        self._key: str | None = None
        self._attempt = 0
        self._last_event: HeartbeatEvent | None = None
        self.beats = 0
        """Number of successful extends so far."""

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return (
            f"<HeartbeatHandle {self.reservation_id!r} {state} expires_at_ms={self._expires_at_ms}>"
        )

    @property
    def expires_at_ms(self) -> int | None:
        """The latest ``expires_at_ms`` the server returned (authoritative)."""
        return self._expires_at_ms

    @property
    def remaining_ttl_ms(self) -> int | None:
        """``remaining_ttl_ms`` of the latest successful response (``None`` if omitted)."""
        return self._remaining_ttl_ms

    @property
    def active(self) -> bool:
        """Whether beats are still scheduled for this reservation."""
        return not self._stopped

    @property
    def last_event(self) -> HeartbeatEvent | None:
        """The most recent event of this reservation (``None`` before the first attempt)."""
        return self._last_event

    def stop(self) -> None:
        """Stop extending this reservation. Idempotent; never blocks.

        An extend already on the wire may still complete; its answer is ignored (if it lands
        after a commit the server answers ``RESERVATION_FINALIZED``, which is harmless).
        """
        if not self._stopped:
            self._stopped = True
            self._owner._forget(self)


# --------------------------------------------------------------------------------------------
# Shared scheduler state (both schedulers are thin shells around this)


def _timeout_ms_of(client: object) -> int | None:
    config = getattr(client, "config", None)
    connect = getattr(config, "connect_timeout", None)
    read = getattr(config, "read_timeout", None)
    if isinstance(connect, (int, float)) and isinstance(read, (int, float)):
        return math.ceil((connect + read) * 1000)
    return None


class _SyncExtender(Protocol):
    def extend_reservation(
        self, reservation_id: str, request: ReservationExtendRequest, /
    ) -> CyclesResponse[ReservationExtendResponse]: ...


class _AsyncExtender(Protocol):
    async def extend_reservation(
        self, reservation_id: str, request: ReservationExtendRequest, /
    ) -> CyclesResponse[ReservationExtendResponse]: ...


class _SchedulerCore:
    """Heap, bookkeeping and event delivery shared by the sync and async schedulers."""

    def __init__(
        self,
        client: _SyncExtender | _AsyncExtender,
        attempt_timeout_ms: int | None,
        clock: Callable[[], float],
        on_event: EventCallback | None,
        autostart: bool,
    ) -> None:
        if attempt_timeout_ms is None:
            attempt_timeout_ms = _timeout_ms_of(client)
        # single attempts on the client's pool: the planner runs its own retry schedule
        self._send_options = single_attempt_options(client.extend_reservation)
        self._autostart = autostart
        if attempt_timeout_ms is not None and attempt_timeout_ms <= 0:
            raise ValueError(f"attempt_timeout_ms must be > 0, got {attempt_timeout_ms}")
        self._attempt_timeout_ms = attempt_timeout_ms
        self._clock = clock
        self._on_event = on_event
        self._heap: list[tuple[float, int, HeartbeatHandle, int]] = []
        self._seq = itertools.count()
        self._live: dict[str, HeartbeatHandle] = {}
        self._stale = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._live)

    @property
    def attempt_timeout_ms(self) -> int | None:
        """Bound of one extend attempt used in the schedule (``None``: unbounded)."""
        return self._attempt_timeout_ms

    def _now_ms(self) -> float:
        return self._clock() * 1000.0

    def _new_handle(
        self,
        reservation_id: str,
        ttl_ms: int,
        remaining_ttl_ms: int | None,
        expires_at_ms: int | None,
        rtt_ms: float | None,
        on_event: EventCallback | None,
    ) -> HeartbeatHandle:
        if self._closed:
            raise RuntimeError("this heartbeat scheduler is closed; create a new one")
        checked_id: object = reservation_id
        if not isinstance(checked_id, str) or not checked_id:
            raise ValueError(f"reservation_id must be a non-empty string, got {reservation_id!r}")
        checked_ttl: object = ttl_ms
        if (
            isinstance(checked_ttl, bool)
            or not isinstance(checked_ttl, int)
            or not 1 <= checked_ttl <= 86_400_000
        ):
            raise ValueError(
                "ttl_ms must be the reservation's requested ttl in ms (1..86400000), "
                f"got {ttl_ms!r}"
            )
        if reservation_id in self._live:
            raise ValueError(
                f"reservation {reservation_id!r} is already tracked; stop() its handle first"
            )
        now = self._now_ms()
        handle = HeartbeatHandle(
            self, reservation_id, None, expires_at_ms, remaining_ttl_ms, on_event
        )
        handle._init = (ttl_ms, now, rtt_ms)
        if remaining_ttl_ms is None:  # the measured-grant fallback: plan now
            delay_ms = self._first_step(handle).delay_ms or 0
        else:
            # Same first delay as _first_step(), which _planner_of() runs when the beat is
            # first due.
            rtt = None if rtt_ms is None or not rtt_ms >= 0 else _ceil_ms(rtt_ms)
            delay_ms = next_delay_ms(
                remaining_ttl_ms=remaining_ttl_ms,
                rtt_ms=rtt,
                request_timeout_ms=self._attempt_timeout_ms,
                max_rtt_ms=rtt or 0,
            )
        self._live[reservation_id] = handle
        self._push(handle, now + delay_ms)
        return handle

    def _first_step(self, handle: HeartbeatHandle) -> HeartbeatStep:
        """Build the handle's planner from the create response; return its first step."""
        assert handle._init is not None
        ttl_ms, now_ms, rtt_ms = handle._init
        planner = handle._planner = LeasePlanner(ttl_ms, self._attempt_timeout_ms)
        handle._init = None
        return planner.on_success(
            now_ms,
            rtt_ms=rtt_ms,
            remaining_ttl_ms=handle._remaining_ttl_ms,
            expires_at_ms=handle._expires_at_ms,
            initial=True,
        )

    def _planner_of(self, handle: HeartbeatHandle) -> LeasePlanner:
        """Return the handle's planner, building it from the create response if needed."""
        if handle._planner is None:
            self._first_step(handle)
        assert handle._planner is not None
        return handle._planner

    def _push(self, handle: HeartbeatHandle, due_ms: float) -> None:
        handle._gen += 1
        heapq.heappush(self._heap, (due_ms, next(self._seq), handle, handle._gen))

    def _forget(self, handle: HeartbeatHandle) -> None:
        if self._live.get(handle.reservation_id) is handle:
            del self._live[handle.reservation_id]
        self._stale += 1
        if self._stale > 64 and self._stale > 2 * len(self._live):
            self._heap = [
                entry for entry in self._heap if entry[2].active and entry[3] == entry[2]._gen
            ]
            heapq.heapify(self._heap)
            self._stale = 0

    def _pop_due(self, now_ms: float) -> HeartbeatHandle | float | None:
        """Return a due handle, the ms until the next due entry, or ``None`` if idle.

        Entries of stopped handles are dropped only once due (or by ``_forget``'s
        compaction): the next wake-up then stays where it was when a reservation ends, so
        the next reservation's ``track()`` (due later) need not wake the worker.
        """
        heap = self._heap
        while heap:
            due_ms, _, handle, gen = heap[0]
            if due_ms > now_ms:
                return due_ms - now_ms
            heapq.heappop(heap)
            if not handle.active or gen != handle._gen:
                continue
            skip_ms = self._planner_of(handle).on_due(now_ms)
            if skip_ms:
                self._push(handle, now_ms + skip_ms)
                continue
            return handle
        return None

    def _request_for(self, handle: HeartbeatHandle) -> ReservationExtendRequest:
        if handle._key is None:
            handle._key = f"heartbeat-{uuid.uuid4().hex}"  # a new beat: a new key
            handle._attempt = 0
        handle._attempt += 1
        return ReservationExtendRequest(
            idempotency_key=handle._key, extend_by_ms=self._planner_of(handle).ttl_ms
        )

    def _settle(
        self,
        handle: HeartbeatHandle,
        outcome: _Outcome,
        sent_ms: float,
        received_ms: float,
    ) -> HeartbeatEvent | None:
        """Apply one attempt's outcome; return the event to deliver (``None`` if stopped)."""
        if not handle.active or self._closed:
            return None
        planner = self._planner_of(handle)
        attempt = handle._attempt
        data = outcome.data
        if data is not None:
            handle._expires_at_ms = data.expires_at_ms
            handle._remaining_ttl_ms = data.remaining_ttl_ms
            handle.beats += 1
            step = planner.on_success(
                received_ms,
                rtt_ms=received_ms - sent_ms,
                remaining_ttl_ms=data.remaining_ttl_ms,
                expires_at_ms=data.expires_at_ms,
            )
        else:
            assert outcome.kind is not None
            step = planner.on_failure(
                received_ms, outcome.kind, retry_after_ms=outcome.retry_after_ms
            )
        if step.fresh_key:
            handle._key = None
        message = step.detail if data is not None else f"{outcome.message} ({step.detail})"
        event = HeartbeatEvent(
            reservation_id=handle.reservation_id,
            disposition=step.disposition,
            status=outcome.status,
            error_code=outcome.error_code,
            message=message,
            expires_at_ms=handle._expires_at_ms,
            next_delay_ms=step.delay_ms,
            attempt=attempt,
        )
        if step.delay_ms is None:
            handle.stop()
        else:
            self._push(handle, received_ms + step.delay_ms)
        handle._last_event = event
        return event

    def _deliver(self, handle: HeartbeatHandle, event: HeartbeatEvent) -> None:
        if event.disposition == "extended":
            logger.debug(
                "heartbeat extended reservation %s: expires_at_ms=%s, next in %s ms",
                event.reservation_id,
                event.expires_at_ms,
                event.next_delay_ms,
            )
        else:
            logger.warning(
                "heartbeat %s for reservation %s (attempt %d, status %s, error %s): %s; "
                "the guarded work continues",
                event.disposition,
                event.reservation_id,
                event.attempt,
                event.status,
                event.error_code,
                event.message,
            )
        for callback in (handle._on_event, self._on_event):
            if callback is None:
                continue
            try:
                callback(event)
            except Exception:
                logger.exception("heartbeat on_event callback raised; ignored")

    def _stop_all(self) -> None:
        self._closed = True
        for handle in list(self._live.values()):
            handle.stop()
        self._heap.clear()


def _failure_outcome(exc: BaseException) -> _Outcome:
    return _Outcome(None, "transient", -1, None, f"{type(exc).__name__}: {exc}", None)


# --------------------------------------------------------------------------------------------
# Sync scheduler: one daemon thread


class HeartbeatScheduler(_SchedulerCore):
    """Extends every tracked reservation of one sync client from ONE background thread.

    The thread starts with the first :meth:`track` and is a daemon, so it never delays
    interpreter exit. Beats are sent one at a time by that thread, as single attempts on
    the client's pool (the heartbeat does its own retries). ``attempt_timeout_ms`` (default:
    the client's ``connect_timeout + read_timeout``), ``on_event`` (called in the thread),
    ``clock`` and ``autostart`` (``False``: nothing runs until :meth:`run_pending`) are
    described in ``docs/heartbeat.md``.
    """

    def __init__(
        self,
        client: _SyncExtender,
        *,
        attempt_timeout_ms: int | None = None,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        autostart: bool = True,
    ) -> None:
        super().__init__(client, attempt_timeout_ms, clock, on_event, autostart)
        self._client = client
        self._cond = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None
        # When the waiting thread wakes up by itself (clock ms); -inf while it is awake.
        self._wake_at_ms = math.inf

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def track(
        self,
        reservation_id: str,
        *,
        ttl_ms: int,
        remaining_ttl_ms: int | None = None,
        expires_at_ms: int | None = None,
        rtt_ms: float | None = None,
        on_event: EventCallback | None = None,
    ) -> HeartbeatHandle:
        """Start extending a reservation; returns its handle (call ``handle.stop()`` later).

        ``ttl_ms`` is the one requested at create (every beat extends by it); the other
        values come from the create response, and ``rtt_ms`` is how long it took (pass it:
        without it the first extend is sent immediately). See ``docs/heartbeat.md``.

        Raises:
            ValueError: Bad ``ttl_ms``/``reservation_id``, or the id is already tracked.
            RuntimeError: The scheduler is closed.
        """
        with self._cond:
            handle = self._new_handle(
                reservation_id, ttl_ms, remaining_ttl_ms, expires_at_ms, rtt_ms, on_event
            )
            # Wake the thread only when its next wake-up moves earlier; otherwise every
            # guarded call would cost a context switch of the heartbeat thread.
            head_ms, _, head, _ = self._heap[0]
            if head is handle and head_ms < self._wake_at_ms:
                self._cond.notify()
            if self._autostart and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="runcycles-heartbeat", daemon=True
                )
                self._thread.start()
        return handle

    def _forget(self, handle: HeartbeatHandle) -> None:
        # Called from handle.stop() in any thread; the lock is re-entrant for _settle.
        with self._cond:
            super()._forget(handle)

    def run_pending(self) -> int:
        """Send every beat that is due now (by ``clock``) in the calling thread.

        Returns:
            The number of extend attempts made.
        """
        attempts = 0
        while True:
            with self._cond:
                due = self._pop_due(self._now_ms())
            if not isinstance(due, HeartbeatHandle):
                return attempts
            self._beat(due)
            attempts += 1

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop every heartbeat and the background thread (waits at most ``timeout_s``)."""
        with self._cond:
            self._stop_all()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now_ms = self._now_ms()
                due = self._pop_due(now_ms)
                if not isinstance(due, HeartbeatHandle):
                    self._wake_at_ms = math.inf if due is None else now_ms + due
                    self._cond.wait(None if due is None else due / 1000.0)
                    self._wake_at_ms = -math.inf
                    continue
            try:
                self._beat(due)
            except Exception:  # a bug must not silently end every heartbeat of the client
                logger.exception("heartbeat of reservation %s failed", due.reservation_id)

    def _beat(self, handle: HeartbeatHandle) -> None:
        with self._cond:
            if not handle.active:
                return
            request = self._request_for(handle)
        sent_ms = self._now_ms()
        try:
            outcome = _classify(
                self._client.extend_reservation(
                    handle.reservation_id, request, **self._send_options
                )
            )
        except Exception as exc:  # never let one reservation kill the heartbeat thread
            outcome = _failure_outcome(exc)
        received_ms = self._now_ms()
        with self._cond:
            event = self._settle(handle, outcome, sent_ms, received_ms)
        if event is not None:
            self._deliver(handle, event)


# --------------------------------------------------------------------------------------------
# Async scheduler: one asyncio task


class AsyncHeartbeatScheduler(_SchedulerCore):
    """Extends every tracked reservation of one async client from ONE asyncio task.

    The async twin of :class:`HeartbeatScheduler`: the task starts with the first
    :meth:`track` (on the event loop) and sleeps until the earliest due beat; up to
    ``max_in_flight`` extend requests run concurrently, each a task only while on the wire.
    ``attempt_timeout_ms`` is also enforced (an attempt that exceeds it counts as a
    transport failure); ``on_event`` runs on the event loop.
    """

    def __init__(
        self,
        client: _AsyncExtender,
        *,
        attempt_timeout_ms: int | None = None,
        on_event: EventCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_in_flight: int = 16,
        autostart: bool = True,
    ) -> None:
        super().__init__(client, attempt_timeout_ms, clock, on_event, autostart)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._client = client
        self._max_in_flight = max_in_flight
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def track(
        self,
        reservation_id: str,
        *,
        ttl_ms: int,
        remaining_ttl_ms: int | None = None,
        expires_at_ms: int | None = None,
        rtt_ms: float | None = None,
        on_event: EventCallback | None = None,
    ) -> HeartbeatHandle:
        """Async twin of :meth:`HeartbeatScheduler.track`; call it from the event loop.

        Raises:
            ValueError: Bad ``ttl_ms``/``reservation_id``, or the id is already tracked.
            RuntimeError: The scheduler is closed, or no event loop is running.
        """
        handle = self._new_handle(
            reservation_id, ttl_ms, remaining_ttl_ms, expires_at_ms, rtt_ms, on_event
        )
        if self._autostart and self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                handle.stop()
                raise RuntimeError(
                    "AsyncHeartbeatScheduler.track() must be called from a running event loop"
                ) from None
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="runcycles-heartbeat")
        # Only move the task's wake-up timer earlier (never wake the task itself for a beat
        # that is not due): otherwise every guarded call would cost a step of the task.
        if self._wake is not None and self._heap[0][2] is handle:
            self._wake_in((self._heap[0][0] - self._now_ms()) / 1000.0)
        return handle

    def _wake_in(self, delay_s: float) -> None:
        """Make the task wake up at most ``delay_s`` from now (one timer, moved only earlier).

        A timer that fires for a beat that was stopped meanwhile costs one idle step.
        """
        assert self._wake is not None
        assert self._task is not None
        if delay_s <= 0:
            self._wake.set()
            return
        loop = self._task.get_loop()
        when = loop.time() + delay_s
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._wake is not None:
            self._wake.set()

    @property
    def background_tasks(self) -> int:
        """Tasks this scheduler currently owns (the loop task plus in-flight extends)."""
        running = self._task is not None and not self._task.done()
        return int(running) + len(self._in_flight)

    async def run_pending(self) -> int:
        """Async twin of :meth:`HeartbeatScheduler.run_pending`: the beats run concurrently."""
        beats = []
        while True:
            due = self._pop_due(self._now_ms())
            if not isinstance(due, HeartbeatHandle):
                break
            beats.append(self._beat(due))
        await asyncio.gather(*beats)
        return len(beats)

    def on_running_loop(self) -> bool:
        """Whether this scheduler's task, if it has one, runs on the running event loop."""
        return self._task is None or _running_in(self._task.get_loop())

    def close(self) -> None:
        """Stop every heartbeat and cancel the background task (does not wait).

        Safe to call from any thread (for example a finalizer): off the event loop's thread
        the work is handed to the loop; with the loop already closed nothing is left to stop.
        """
        loop = self._task.get_loop() if self._task is not None else None
        if loop is not None and not loop.is_closed() and not _running_in(loop):
            try:
                loop.call_soon_threadsafe(self._close_now)
            except RuntimeError:  # the loop closed meanwhile
                pass
            else:
                return
        self._close_now()

    def _close_now(self) -> None:
        self._stop_all()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        tasks = list(self._in_flight)
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            if not task.done() and not task.get_loop().is_closed():
                task.cancel()

    async def aclose(self) -> None:
        """Stop every heartbeat, cancel the background task and wait for it to end."""
        tasks = list(self._in_flight)
        if self._task is not None:
            tasks.append(self._task)
        self.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._closed:
            wake.clear()
            while len(self._in_flight) < self._max_in_flight:
                due = self._pop_due(self._now_ms())
                if isinstance(due, HeartbeatHandle):
                    task = asyncio.ensure_future(self._guarded_beat(due))
                    self._in_flight.add(task)
                    task.add_done_callback(self._beat_done)
                    continue
                if due is not None:
                    # A timer callback, not a timeout wrapper: no extra task while idle.
                    self._wake_in(due / 1000.0)
                break
            await wake.wait()

    async def _guarded_beat(self, handle: HeartbeatHandle) -> None:
        try:
            await self._beat(handle)
        except Exception:  # a bug must not surface as an unretrieved task exception
            logger.exception("heartbeat of reservation %s failed", handle.reservation_id)

    def _beat_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._wake is not None:
            self._wake.set()

    async def _beat(self, handle: HeartbeatHandle) -> None:
        if not handle.active:
            return
        request = self._request_for(handle)
        timeout_s = None if self._attempt_timeout_ms is None else self._attempt_timeout_ms / 1000
        sent_ms = self._now_ms()
        try:
            response = await _with_timeout(
                self._client.extend_reservation(
                    handle.reservation_id, request, **self._send_options
                ),
                timeout_s,
            )
            outcome = _classify(response)
        except Exception as exc:  # a timeout too; never let one reservation kill the heartbeat
            outcome = _failure_outcome(exc)
        event = self._settle(handle, outcome, sent_ms, self._now_ms())
        if event is not None:
            self._deliver(handle, event)


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _with_timeout(awaitable: Awaitable[_T], timeout_s: float | None) -> _T:
    """Await with a time limit, without an extra task where the runtime allows it."""
    if timeout_s is None:
        return await awaitable
    timeout_cm = getattr(asyncio, "timeout", None)  # Python >= 3.11
    if timeout_cm is None:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(awaitable, timeout_s)
    async with timeout_cm(timeout_s):
        return await awaitable
