"""Stream reservations: hold budget while a streamed response arrives, commit what it used.

The accumulated usage is committed whatever ended the block (completed, raised, cancelled):
tokens a provider produced are spend. Only a stream that consumed nothing is released. What
is committed (``actual_cost``, ``cost_fn``, token count, estimate) and what an unknown actual
does (``on_unknown_actual``; never a charge made up) are in ``docs/streaming.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, overload

from runcycles._base_client import AsyncBaseCyclesClient, BaseCyclesClient
from runcycles.exceptions import CyclesError
from runcycles.lifecycle import (
    ACTUAL_SOURCE_KEY,
    AsyncReservationGuard,
    OnUnknownActual,
    ReservationGuard,
    ReserveOptions,
    UnknownActualError,
    check_on_unknown_actual,
    run_shielded,
)
from runcycles.models import (
    Amount,
    Caps,
    CyclesMetrics,
    Decision,
    ReleaseResponse,
    ReservationCreateRequest,
    Unit,
)
from runcycles.pricing import Pricer, default_pricer
from runcycles.settlement import SettlementResult
from runcycles.usage import Usage

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

    from runcycles.context import CyclesContext

__all__ = [
    "AsyncStreamReservation",
    "CostFn",
    "OUTCOME_KEY",
    "StreamReservation",
    "StreamUsage",
    "priced",
    "stream_reservation",
]

logger = logging.getLogger("runcycles")

CostFn = Callable[["StreamUsage"], int]
"""Prices accumulated usage: returns the amount to commit, in the reservation's unit."""

OUTCOME_KEY: Final = "stream_outcome"
"""Commit metadata key recording how the stream ended: completed, failed or cancelled."""

_FIX: Final = "cost_fn (or the usage it prices)"


@dataclass
class StreamUsage:
    """Usage accumulated while a stream runs; update it as chunks arrive.

    Attributes:
        tokens_input: Prompt tokens consumed.
        tokens_output: Completion tokens produced so far.
        actual_cost: The exact cost in the reservation's unit, when the provider reports
            it; it wins over ``cost_fn`` and token counts.
        model_version: The model that actually served the stream.
        custom: Free-form metrics sent with the commit (not counted as consumption).
    """

    tokens_input: int = 0
    tokens_output: int = 0
    actual_cost: int | None = None
    model_version: str | None = None
    custom: dict[str, Any] = field(default_factory=dict)

    def add_input_tokens(self, count: int) -> None:
        """Add ``count`` prompt tokens."""
        self.tokens_input += _non_negative(count, "count")

    def add_output_tokens(self, count: int) -> None:
        """Add ``count`` completion tokens."""
        self.tokens_output += _non_negative(count, "count")

    def add_tokens(self, *, input: int = 0, output: int = 0) -> None:
        """Add prompt (``input``) and completion (``output``) tokens at once."""
        self.tokens_input += _non_negative(input, "input")
        self.tokens_output += _non_negative(output, "output")

    def add_cost(self, amount: int) -> None:
        """Add ``amount`` (in the reservation's unit) to ``actual_cost``."""
        self.actual_cost = (self.actual_cost or 0) + _non_negative(amount, "amount")

    def set_cost(self, amount: int) -> None:
        """Set ``actual_cost`` to ``amount`` (in the reservation's unit)."""
        self.actual_cost = _non_negative(amount, "amount")

    def set_model_version(self, model_version: str) -> None:
        """Record the model that actually served the stream."""
        self.model_version = model_version

    def put_custom(self, key: str, value: Any) -> None:
        """Set one free-form metric."""
        self.custom[key] = value

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.tokens_input + self.tokens_output

    def is_empty(self) -> bool:
        """Return whether nothing was consumed (no tokens and no cost)."""
        return not self.tokens_input and not self.tokens_output and not self.actual_cost

    def to_usage(self, *, model: str | None = None, provider: str | None = None) -> Usage:
        """Return these counts as a :class:`~runcycles.Usage` (default model: ``model_version``)."""
        return Usage(
            input_tokens=self.tokens_input,
            output_tokens=self.tokens_output,
            model=model or self.model_version,
            provider=provider,
        )

    def to_metrics(self, base: CyclesMetrics | None = None) -> CyclesMetrics:
        """Return the commit metrics: these counts over ``base`` (the context's metrics)."""
        update: dict[str, Any] = {}
        if self.tokens_input:
            update["tokens_input"] = self.tokens_input
        if self.tokens_output:
            update["tokens_output"] = self.tokens_output
        if self.model_version is not None:
            update["model_version"] = self.model_version
        if self.custom:
            update["custom"] = {**(base.custom or {}), **self.custom} if base else self.custom
        if base is None:
            return CyclesMetrics(**update)
        return base.model_copy(update=update)


def priced(
    pricer: Pricer | None = None, *, model: str | None = None, provider: str | None = None
) -> CostFn:
    """Return a ``cost_fn`` that prices a stream's tokens with ``pricer``.

    ``stream_reservation(..., cost_fn=priced(model="gpt-4o"))`` commits the stream's input
    and output tokens at the model's price in ``USD_MICROCENTS`` (the model the stream
    reported with ``usage.set_model_version()`` when ``model`` is not given). A model without
    a price makes the actual unknown: ``on_unknown_actual`` decides what happens.
    ``pricer`` defaults to :func:`~runcycles.default_pricer`; ``provider`` disambiguates a
    model name.
    """

    def cost(usage: StreamUsage) -> int:
        return (pricer or default_pricer()).price(usage.to_usage(model=model, provider=provider))

    return cost


def _non_negative(value: int, name: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


class _StreamState:
    """Pure logic shared by the sync and async stream reservations."""

    __slots__ = ("_cost_fn", "_guard", "_on_unknown_actual", "settlement_error", "usage")

    _guard: ReservationGuard | AsyncReservationGuard

    def __init__(self, cost_fn: CostFn | None, on_unknown_actual: OnUnknownActual) -> None:
        if cost_fn is not None and not callable(cost_fn):
            raise TypeError(f"cost_fn must be a callable of StreamUsage, got {cost_fn!r}")
        check_on_unknown_actual(on_unknown_actual)
        self._cost_fn = cost_fn
        self._on_unknown_actual: OnUnknownActual = on_unknown_actual
        self.usage = StreamUsage()
        self.settlement_error: CyclesError | None = None
        """Why the final commit or release failed, or the :class:`UnknownActualError` of a
        reservation left to expire (``on_unknown_actual="raise"``); also logged or raised."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._guard!r} usage={self.usage!r}>"

    @property
    def context(self) -> CyclesContext:
        """The live reservation."""
        return self._guard.context

    @property
    def reservation_id(self) -> str | None:
        """The reservation's id (``None`` before entering)."""
        return self._guard.reservation_id

    @property
    def decision(self) -> Decision:
        """``ALLOW`` or ``ALLOW_WITH_CAPS``."""
        return self._guard.decision

    @property
    def caps(self) -> Caps | None:
        """Caps of an ``ALLOW_WITH_CAPS`` reservation (e.g. ``max_tokens``)."""
        return self._guard.caps

    @property
    def estimate(self) -> Amount:
        """The amount reserved for the stream."""
        return self._guard.estimate

    def _final_amount(
        self, context: CyclesContext, outcome: str
    ) -> tuple[int | None, dict[str, Any]]:
        """Return ``(actual, metadata)``; ``actual is None`` with empty usage means release.

        Without ``cost_fn`` outside ``TOKENS`` the estimate is the amount (flagged
        ``actual_source``): the caller gave no way to measure.

        Raises:
            UnknownActualError: The usage cannot be priced (``cost_fn`` raised or returned
                something that is not a non-negative ``int``; an invalid ``actual_cost`` or
                token count was assigned); its ``__cause__`` is the failure. The guard's
                ``settle`` applies ``on_unknown_actual`` to it.
        """
        usage = self.usage
        metadata: dict[str, Any] = {OUTCOME_KEY: outcome}
        try:
            if usage.actual_cost is not None:
                return _non_negative(usage.actual_cost, "usage.actual_cost"), metadata
            if usage.is_empty():
                return None, metadata
            if self._cost_fn is not None:
                return _non_negative(self._cost_fn(usage), "cost_fn(usage)"), metadata
            if context.estimate.unit is Unit.TOKENS:
                return _non_negative(usage.total_tokens, "usage.total_tokens"), metadata
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:512]
            rid = context.reservation_id
            raise UnknownActualError(
                f"cannot price the usage of stream reservation {rid} ({reason})",
                reservation_id=rid,
                reason=reason,
            ) from exc
        metadata[ACTUAL_SOURCE_KEY] = "estimate"
        return context.estimate.amount, metadata

    def _settle_unknown(
        self, unknown: UnknownActualError, metrics: CyclesMetrics | None, outcome: str
    ) -> Any:
        """Apply ``on_unknown_actual`` through the guard: its result (async twin: coroutine)."""
        return self._guard.settle(
            unknown,
            on_unknown_actual=self._on_unknown_actual,
            metrics=metrics,
            metadata={OUTCOME_KEY: outcome},
            fix=_FIX,
        )

    def _unknown_settled(self, unknown: UnknownActualError) -> UnknownActualError:
        """Record ``unknown`` once the guard's ``settle`` applied ``on_unknown_actual``."""
        if self._on_unknown_actual == "raise":
            self.settlement_error = unknown
        elif self._on_unknown_actual == "release":
            unknown.args = (f"{unknown.args[0]}: the reservation was released",)
        return unknown

    @staticmethod
    def _surface(unknown: UnknownActualError | None, exc: BaseException | None) -> None:
        """Raise ``unknown`` after a block that ended normally; else only log it.

        The block's own exception (or cancellation) always propagates unchanged.
        """
        if unknown is None:
            return
        if exc is None:
            raise unknown from unknown.__cause__
        logger.error(
            "%s (the stream's own %s propagates)",
            unknown,
            type(exc).__name__,
            exc_info=unknown.__cause__,
        )

    def _explicit_commit(
        self, context: CyclesContext, actual: int | Amount | None
    ) -> tuple[int | Amount, dict[str, Any]]:
        if actual is not None:
            return actual, {OUTCOME_KEY: "completed"}
        amount, metadata = self._final_amount(context, "completed")
        return (0 if amount is None else amount), metadata

    def _safe_metrics(self, context: CyclesContext) -> CyclesMetrics | None:
        """The commit metrics, or none at all if they are invalid (never block the commit)."""
        base: object = context.metrics
        try:
            return self.usage.to_metrics(base if isinstance(base, CyclesMetrics) else None)
        except ValueError as exc:  # e.g. a model_version over 128 characters
            logger.warning(
                "dropping invalid metrics of stream reservation %s: %s",
                context.reservation_id,
                exc,
            )
            return None

    def _record_failure(self, context: CyclesContext, exc: CyclesError) -> None:
        self.settlement_error = exc
        logger.error("settling stream reservation %s failed: %s", context.reservation_id, exc)


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "completed"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)):
        return "cancelled"
    return "failed"


class StreamReservation(_StreamState):
    """A reservation held while a stream is consumed (sync twin); see the module docs.

    Args:
        client: The client to reserve and settle with.
        request: A ready reservation request, instead of the keyword options.
        cost_fn: Prices the accumulated :class:`StreamUsage`.
        on_unknown_actual: What to do when the usage cannot be priced (nothing is ever
            committed from an unknown actual): ``"raise"`` (default), ``"release"`` or
            ``"commit_estimate"``; see the module docs.
        **options: See :class:`~runcycles.lifecycle.ReserveOptions`.

    Raises:
        ValueError: An unknown ``on_unknown_actual``.
    """

    __slots__ = ()
    _guard: ReservationGuard

    def __init__(
        self,
        client: BaseCyclesClient,
        request: ReservationCreateRequest | None = None,
        /,
        *,
        cost_fn: CostFn | None = None,
        on_unknown_actual: OnUnknownActual = "raise",
        **options: Unpack[ReserveOptions],
    ) -> None:
        super().__init__(cost_fn, on_unknown_actual)
        self._guard = ReservationGuard(client, request, **options)

    def __enter__(self) -> Self:
        self._guard.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._guard
        unknown: UnknownActualError | None = None
        try:
            if not guard.is_finalized:
                unknown = self._settle(_outcome(exc))
        finally:
            guard.__exit__(exc_type, exc, tb)
        self._surface(unknown, exc)

    def commit(self, actual: int | Amount | None = None) -> SettlementResult:
        """End the stream now, committing ``actual`` (default: the accumulated usage).

        Raises:
            UnknownActualError: No ``actual`` was given and the usage cannot be priced:
                nothing was committed, and the reservation was left to expire
                (``on_unknown_actual="raise"``) or released (``"release"``).
                (``"commit_estimate"`` commits the estimate, flagged, instead.)
            ReservationAlreadyFinalizedError: The stream already committed or released.
        """
        guard = self._guard
        context = guard.context
        metrics = self.usage.to_metrics(context.metrics)
        try:
            amount, metadata = self._explicit_commit(context, actual)
        except UnknownActualError as unknown:
            try:
                result: SettlementResult | None = self._settle_unknown(
                    unknown, metrics, "completed"
                )
            except CyclesError as exc:
                if not isinstance(exc, UnknownActualError):
                    self._record_failure(context, exc)
                result = None
            if result is None:  # left to expire, released or failed: no commit to return
                raise self._unknown_settled(unknown) from unknown.__cause__
            return result
        return guard.commit(amount, metrics=metrics, metadata=metadata)

    def release(self, reason: str | None = None) -> ReleaseResponse:
        """End the stream now, charging nothing."""
        return self._guard.release(reason)

    def _settle(self, outcome: str) -> UnknownActualError | None:
        """Settle at the block's end; return the unknown actual of a reservation left to expire."""
        guard = self._guard
        context = guard.context
        try:
            try:
                amount, metadata = self._final_amount(context, outcome)
            except UnknownActualError as unknown:
                try:
                    self._settle_unknown(unknown, self._safe_metrics(context), outcome)
                except UnknownActualError:
                    return self._unknown_settled(unknown)
            else:
                if amount is None:
                    guard.release(f"stream_{outcome}_without_usage")
                else:
                    guard.commit(amount, metrics=self._safe_metrics(context), metadata=metadata)
        except CyclesError as exc:
            self._record_failure(context, exc)
        return None


class AsyncStreamReservation(_StreamState):
    """A reservation held while a stream is consumed (async twin of :class:`StreamReservation`).

    A cancelled stream still commits its partial usage, shielded from a second cancellation.
    The arguments are those of :class:`StreamReservation`, with an async client.
    """

    __slots__ = ()
    _guard: AsyncReservationGuard

    def __init__(
        self,
        client: AsyncBaseCyclesClient,
        request: ReservationCreateRequest | None = None,
        /,
        *,
        cost_fn: CostFn | None = None,
        on_unknown_actual: OnUnknownActual = "raise",
        **options: Unpack[ReserveOptions],
    ) -> None:
        super().__init__(cost_fn, on_unknown_actual)
        self._guard = AsyncReservationGuard(client, request, **options)

    async def __aenter__(self) -> Self:
        await self._guard.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard = self._guard
        unknown: UnknownActualError | None = None
        try:
            if not guard.is_finalized:
                outcome = _outcome(exc)
                settle = self._settle(outcome)
                unknown = await (run_shielded(settle) if outcome == "cancelled" else settle)
        finally:
            await guard.__aexit__(exc_type, exc, tb)
        self._surface(unknown, exc)

    async def commit(self, actual: int | Amount | None = None) -> SettlementResult:
        """Async twin of :meth:`StreamReservation.commit`."""
        guard = self._guard
        context = guard.context
        metrics = self.usage.to_metrics(context.metrics)
        try:
            amount, metadata = self._explicit_commit(context, actual)
        except UnknownActualError as unknown:
            try:
                result: SettlementResult | None = await self._settle_unknown(
                    unknown, metrics, "completed"
                )
            except CyclesError as exc:
                if not isinstance(exc, UnknownActualError):
                    self._record_failure(context, exc)
                result = None
            if result is None:  # left to expire, released or failed: no commit to return
                raise self._unknown_settled(unknown) from unknown.__cause__
            return result
        return await guard.commit(amount, metrics=metrics, metadata=metadata)

    async def release(self, reason: str | None = None) -> ReleaseResponse:
        """End the stream now, charging nothing."""
        return await self._guard.release(reason)

    async def _settle(self, outcome: str) -> UnknownActualError | None:
        """Settle at the block's end; return the unknown actual of a reservation left to expire."""
        guard = self._guard
        context = guard.context
        try:
            try:
                amount, metadata = self._final_amount(context, outcome)
            except UnknownActualError as unknown:
                try:
                    await self._settle_unknown(unknown, self._safe_metrics(context), outcome)
                except UnknownActualError:
                    return self._unknown_settled(unknown)
            else:
                if amount is None:
                    await guard.release(f"stream_{outcome}_without_usage")
                else:
                    await guard.commit(
                        amount, metrics=self._safe_metrics(context), metadata=metadata
                    )
        except CyclesError as exc:
            self._record_failure(context, exc)
        return None


@overload
def stream_reservation(
    client: BaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    *,
    cost_fn: CostFn | None = None,
    on_unknown_actual: OnUnknownActual = "raise",
    **options: Unpack[ReserveOptions],
) -> StreamReservation: ...


@overload
def stream_reservation(
    client: AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    *,
    cost_fn: CostFn | None = None,
    on_unknown_actual: OnUnknownActual = "raise",
    **options: Unpack[ReserveOptions],
) -> AsyncStreamReservation: ...


def stream_reservation(
    client: BaseCyclesClient | AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    *,
    cost_fn: CostFn | None = None,
    on_unknown_actual: OnUnknownActual = "raise",
    **options: Unpack[ReserveOptions],
) -> StreamReservation | AsyncStreamReservation:
    """Return a stream reservation for ``with`` (sync client) or ``async with`` (async client).

    A :class:`StreamReservation` or an :class:`AsyncStreamReservation`, whose arguments these
    are (``docs/streaming.md``).
    """
    if isinstance(client, AsyncBaseCyclesClient):
        return AsyncStreamReservation(
            client, request, cost_fn=cost_fn, on_unknown_actual=on_unknown_actual, **options
        )
    return StreamReservation(
        client, request, cost_fn=cost_fn, on_unknown_actual=on_unknown_actual, **options
    )
