"""Retry policy of the clients: what is retried, and how long to wait. Pure, no I/O.

Retries always resend the *same* body and idempotency key, so the server replays the stored
outcome instead of applying the operation twice. Retried: transient transport failures,
5xx except 501 and 505, 429, and an ambiguous 2xx (a body that is not a JSON object or
cannot be decoded); a genuine 4xx never is. The wait is the server's ``Retry-After`` (the
call gives up beyond ``retry_after_max_s``) or an exponential backoff with equal jitter;
see ``docs/client.md``. Tests switch every wait off with :func:`runcycles.testing.no_backoff`.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import httpx

if TYPE_CHECKING:
    from runcycles.config import CyclesConfig
    from runcycles.response import CyclesResponse

__all__ = ["RetryPolicy", "asleep_s", "single_attempt_options", "sleep_s"]

_RETRYABLE_EXCEPTIONS: Final = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
    httpx.DecodingError,
)
_NOT_RETRIED_5XX: Final = frozenset({501, 505})
_MAX_EXPONENT: Final = 64


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry a failed call.

    Attributes:
        max_attempts: Total attempts per call, the first one included (``1``: never retry).
        initial_delay_s: Nominal backoff before the first retry.
        multiplier: Growth factor of the nominal backoff per attempt.
        max_delay_s: Cap of the nominal backoff.
        retry_after_max_s: Longest server-requested wait honoured inside a call.
        jitter: Whether to apply equal jitter (``False`` makes backoff deterministic).
        rng: Random source for the jitter (``None``: the ``random`` module); pass a seeded
            ``random.Random`` for reproducible delays.
    """

    max_attempts: int = 5
    initial_delay_s: float = 0.5
    multiplier: float = 2.0
    max_delay_s: float = 30.0
    retry_after_max_s: float = 60.0
    jitter: bool = True
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay_s < 0 or self.max_delay_s < 0 or self.retry_after_max_s < 0:
            raise ValueError("delays must be >= 0 seconds")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    @classmethod
    def from_config(cls, config: CyclesConfig) -> RetryPolicy:
        """Build the policy described by a config's ``retry_*`` fields."""
        return cls(
            max_attempts=config.retry_max_attempts if config.retry_enabled else 1,
            initial_delay_s=config.retry_initial_delay,
            multiplier=config.retry_multiplier,
            max_delay_s=config.retry_max_delay,
            retry_after_max_s=config.retry_after_max_s,
        )

    @classmethod
    def never(cls) -> RetryPolicy:
        """Return a policy that makes exactly one attempt."""
        return cls(max_attempts=1)

    def is_retryable(self, response: CyclesResponse[Any]) -> bool:
        """Return whether the outcome in ``response`` is worth another attempt (same key)."""
        status = response.status
        if 200 <= status < 300:
            return response.is_ambiguous
        if response.exception is not None:
            return isinstance(response.exception, _RETRYABLE_EXCEPTIONS)
        return status == 429 or (status >= 500 and status not in _NOT_RETRIED_5XX)

    def backoff_s(self, retry_number: int) -> float:
        """Return the (jittered) backoff before retry ``retry_number`` (1-based)."""
        exponent = min(max(retry_number - 1, 0), _MAX_EXPONENT)
        nominal = min(self.max_delay_s, self.initial_delay_s * self.multiplier**exponent)
        if not self.jitter:
            return nominal
        draw = (self.rng or random).random()
        return nominal / 2 + draw * nominal / 2

    def next_delay_s(self, attempt: int, response: CyclesResponse[Any]) -> float | None:
        """Decide what to do after attempt number ``attempt`` (1-based) ended in ``response``.

        Returns:
            Seconds to wait before the next attempt, or ``None`` to stop and return
            ``response`` to the caller (success, non-retryable error, attempts exhausted, or
            a ``Retry-After`` longer than ``retry_after_max_s``).
        """
        if attempt >= self.max_attempts or not self.is_retryable(response):
            return None
        if response.status == 429 or response.is_server_error:
            retry_after_ms = response.retry_after_ms
            if retry_after_ms is not None:
                retry_after_s = retry_after_ms / 1000
                return retry_after_s if retry_after_s <= self.retry_after_max_s else None
        return self.backoff_s(attempt)


_NEVER: Final = RetryPolicy.never()
_NO_OPTIONS: Final[dict[str, Any]] = {}


def single_attempt_options(method: Callable[..., Any]) -> dict[str, Any]:
    """Return the keyword arguments that make one call of a client ``method`` a single attempt.

    The heartbeat and the settlement engine run their own spec-driven retry schedules, so
    they send each attempt with ``retry_policy=RetryPolicy.never()``. A client subclass
    whose override of ``method`` does not take ``retry_policy`` keeps its own retries (its
    override must keep working): then no option is passed. Called once per engine, not per
    request.
    """
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return _NO_OPTIONS
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD or (
            parameter.name == "retry_policy" and parameter.kind is not parameter.POSITIONAL_ONLY
        ):
            return {"retry_policy": _NEVER}
    return _NO_OPTIONS


_recorders: list[list[float]] = []
"""Stack of delay recorders pushed by :func:`runcycles.testing.no_backoff`."""


def sleep_s(delay_s: float) -> None:
    """Block for ``delay_s`` seconds (recorded instead while ``no_backoff()`` is active)."""
    if _recorders:
        _recorders[-1].append(delay_s)
        return
    time.sleep(delay_s)


async def asleep_s(delay_s: float) -> None:
    """Wait ``delay_s`` seconds on the event loop (recorded instead under ``no_backoff()``)."""
    if _recorders:
        _recorders[-1].append(delay_s)
        return
    await asyncio.sleep(delay_s)
