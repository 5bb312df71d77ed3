"""Reserve -> run -> commit or release: the plan, and reservation guards.

* **The plan** (pure, no I/O): build a :class:`~runcycles.models.ReservationCreateRequest`
  from options and the config's default subject, turn the answer into a live reservation, a
  :class:`DryRunResult` (a dry run, or an observe-mode answer: :func:`observed_result`) or
  the typed exception of a denial, and build the commit or release.
* **Guards**: :class:`ReservationGuard` (``with``) and :class:`AsyncReservationGuard`
  (``async with``) hold one live reservation, extended by the client's heartbeat and
  settled through its settlement engine. Their explicit lifecycle (``start()``, then one of
  ``commit()``, ``settle()``, ``release()``, ``fail()``, ``abandon()``) is what ``@cycles``,
  stream reservations and :mod:`runcycles.adapters` are built on; see ``docs/guards.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict, TypeVar, overload

from runcycles._base_client import AsyncBaseCyclesClient, BaseCyclesClient
from runcycles.context import CyclesContext, pop_context, push_context
from runcycles.exceptions import (
    CyclesError,
    CyclesProtocolError,
    MalformedResponseError,
    NotFoundError,
    SubjectRequiredError,
    protocol_error_class,
)
from runcycles.heartbeat import (
    AsyncHeartbeatScheduler,
    HeartbeatEvent,
    HeartbeatHandle,
    HeartbeatScheduler,
)
from runcycles.models import (
    STANDARD_SUBJECT_FIELDS,
    Action,
    ActionPolicyKeys,
    Amount,
    Balance,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    CyclesMetrics,
    Decision,
    DenyDetail,
    ObserveMode,
    ReasonCode,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    Subject,
    Unit,
)
from runcycles.pricing import Pricer, UnknownModelError, default_pricer
from runcycles.settlement import SettlementResult
from runcycles.usage import Usage

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

    from runcycles.config import CyclesConfig
    from runcycles.response import CyclesResponse

__all__ = [
    "ACTUAL_SOURCE_KEY",
    "AsyncReservationGuard",
    "DEFAULT_TTL_MS",
    "DryRunResult",
    "ReservationAlreadyFinalizedError",
    "ReservationGuard",
    "ReserveOptions",
    "SubjectRequiredError",
    "UnfinalizedReservationWarning",
    "UnknownActualError",
    "build_commit_request",
    "build_release_request",
    "build_reservation_request",
    "context_for",
    "dry_run",
    "dry_run_result",
    "exit_release_reason",
    "log_release_failure",
    "measure_actual",
    "new_idempotency_key",
    "observed_result",
    "price_usage",
    "request_from_options",
    "reservation_granted",
    "reserve",
    "resolve_subject",
    "run_shielded",
    "to_amount",
]

logger = logging.getLogger("runcycles")

DEFAULT_TTL_MS: Final = 60_000
"""Reservation lease asked for when none is given (the protocol's default).

It is sent explicitly so the heartbeat knows how far to extend each time.
"""

ACTUAL_SOURCE_KEY: Final = "actual_source"
"""Commit metadata key that says where the committed amount came from when it is not a
measured actual (``"estimate"``)."""

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Public value types


class ReservationAlreadyFinalizedError(CyclesError, RuntimeError):
    """``commit()`` or ``release()`` was called on a guard that was already finalized.

    Raised on the client side, before anything is sent: a guard ends its reservation
    exactly once. (The server's own ``409 RESERVATION_FINALIZED`` is
    :class:`~runcycles.ReservationFinalizedError`.)
    """


class UnfinalizedReservationWarning(UserWarning):
    """A guard's block ended normally without ``commit()`` or ``release()`` (it released)."""


class UnknownActualError(CyclesError):
    """A guarded call ran, but its actual amount is unknown (``@cycles``, stream reservations).

    The ``actual`` callable of ``@cycles`` (or a stream's ``cost_fn`` or usage; ``result`` is
    then ``None``) gave no non-negative amount in the reservation's unit. Nothing was
    committed and no event was sent: a charge is never made up. With
    ``on_unknown_actual="raise"`` (the default) the reservation expires at the end of its
    lease (its heartbeat is stopped); until then the spend can still be committed by hand,
    e.g. with ``client.commit_reservation(error.reservation_id, ...)``.

    Attributes:
        reservation_id: The reservation, still unsettled.
        reason: Why the actual is unknown (``"actual returned None"``,
            ``"ValueError: ..."``); the callable's own exception, if any, is ``__cause__``.
        result: What the guarded function returned (not kept when the error is pickled).
    """

    def __init__(
        self,
        message: str,
        *,
        reservation_id: str | None = None,
        reason: str | None = None,
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.reservation_id = reservation_id
        self.reason = reason
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args, {**self.__dict__, "result": None})


OnUnknownActual = Literal["raise", "release", "commit_estimate"]
"""What ``@cycles`` and stream reservations do when the actual amount is unknown."""

_ON_UNKNOWN_ACTUAL: Final = ("raise", "release", "commit_estimate")


def check_on_unknown_actual(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is one of the ``on_unknown_actual`` choices."""
    if value not in _ON_UNKNOWN_ACTUAL:
        raise ValueError(
            f"on_unknown_actual must be one of {', '.join(map(repr, _ON_UNKNOWN_ACTUAL))}, "
            f"got {value!r}"
        )


def left_to_expire(
    guard: ReservationGuard | AsyncReservationGuard, unknown: UnknownActualError, fix: str
) -> UnknownActualError:
    """Stop ``guard`` without a request (``on_unknown_actual="raise"``); explain ``unknown``.

    ``fix`` names what the caller should repair (``"the actual= callable"``, ...).
    """
    guard.abandon()
    unknown.args = (
        f"{unknown.args[0]}: the reservation was left to expire at the end of its lease "
        f"(no commit, no event, no release). Fix {fix}, or pass "
        "on_unknown_actual='release' or 'commit_estimate'",
    )
    return unknown


UNKNOWN_ACTUAL_RELEASE_REASON: Final = "actual_unknown"
"""Release reason of a reservation whose actual is unknown (``on_unknown_actual="release"``)."""

_RELEASE: Final[dict[str, Any]] = {}


def _unknown_rule(
    guard: ReservationGuard | AsyncReservationGuard,
    unknown: UnknownActualError,
    on_unknown_actual: OnUnknownActual,
    fix: str,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Apply ``on_unknown_actual`` to ``unknown``: the one place that rule is written.

    Returns :data:`_RELEASE` (release the reservation) or the metadata of a commit of the
    estimate; raises ``unknown`` (after abandoning ``guard``) for ``"raise"``.
    """
    check_on_unknown_actual(on_unknown_actual)
    if on_unknown_actual == "raise":
        raise left_to_expire(guard, unknown, fix) from unknown.__cause__
    if on_unknown_actual == "release":
        logger.error(
            "%s; releasing it (on_unknown_actual='release')", unknown, exc_info=unknown.__cause__
        )
        return _RELEASE
    logger.error(
        "%s; committing the estimate instead (on_unknown_actual='commit_estimate')",
        unknown,
        exc_info=unknown.__cause__,
    )
    merged = dict(metadata) if metadata else {}
    merged[ACTUAL_SOURCE_KEY] = "estimate"
    if unknown.reason is not None and unknown.__cause__ is not None:
        merged["actual_error"] = unknown.reason  # what measuring raised
    return merged


def _fail_reason(exc: BaseException | None) -> str:
    return "guarded_code_failed" if exc is None else exit_release_reason(exc)


@dataclass(frozen=True)
class DryRunResult:
    """The server's evaluation of a reservation it did not hold (dry run or observe mode).

    Nothing was held or charged. After :func:`dry_run` the guarded code did not run; in
    observe mode (a guard's :attr:`~ReservationGuard.observed`) it ran anyway.

    Attributes:
        decision: ``ALLOW``, ``ALLOW_WITH_CAPS`` or ``DENY``.
        caps: Caps that would apply (``ALLOW_WITH_CAPS`` only).
        reason_code: Why the reservation would be denied (an open string; see
            :class:`~runcycles.models.ReasonCode`).
        affected_scopes: Every scope the reservation would hold budget on.
        balances: Balances of those scopes before the evaluation, if the server sent them.
        scope_path: The subject's canonical scope path, if sent.
        reserved: The amount that would be held, if sent.
        retry_after_ms: The server's retry hint for a denial, if sent.
        deny_detail: Why it would be denied (a v0.1.26 server's structured context: the
            quota, policy or scope that blocks it), if sent.
    """

    decision: Decision
    caps: Caps | None = None
    reason_code: str | None = None
    affected_scopes: tuple[str, ...] = ()
    balances: tuple[Balance, ...] | None = None
    scope_path: str | None = None
    reserved: Amount | None = None
    retry_after_ms: int | None = None
    deny_detail: DenyDetail | None = None

    @property
    def is_allowed(self) -> bool:
        """Whether the live reservation would be allowed (with or without caps)."""
        return self.decision is not Decision.DENY

    def has_caps(self) -> bool:
        """Return whether caps would apply."""
        return self.caps is not None


class ReserveOptions(TypedDict, total=False):
    """Keyword options of :func:`reserve` and ``client.reserve()``.

    ``estimate``, ``action_kind`` and ``action_name`` are required unless a ready
    :class:`~runcycles.models.ReservationCreateRequest` is passed instead.

    Attributes:
        estimate: Amount to hold, an ``int`` in ``unit`` or an :class:`Amount`.
        action_kind: What kind of action: a kind of the registry
            (:mod:`runcycles.action_kinds`), e.g. ``"llm.completion"`` or ``"web.search"``.
        action_name: Which one, e.g. ``"openai:gpt-4o"``.
        action_tags: Up to 10 tags for the action.
        action_policy_keys: The action's policy routing dimensions (host, recipient
            domain...: :class:`~runcycles.models.ActionPolicyKeys` or a dict of its fields).
        unit: Unit of an ``int`` estimate (default ``USD_MICROCENTS``).
        subject: A complete subject (instead of the fields below).
        tenant: Subject tenant (default: the config's); likewise ``workspace``, ``app``,
            ``workflow``, ``agent`` and ``toolset``.
        dimensions: Free-form subject tags (up to 16).
        ttl_ms: Lease in ms (default :data:`DEFAULT_TTL_MS`); the heartbeat extends it.
        grace_period_ms: How long after expiry a commit is still accepted.
        overage_policy: What a commit above the estimate does (server default
            ``ALLOW_IF_AVAILABLE``).
        metadata: Metadata stored with the reservation.
        idempotency_key: Key of the reservation (default: a fresh UUID).
        observe_mode: ``OBSERVE``: shadow mode. The server evaluates the reservation and
            holds nothing; the guarded code runs whatever it decided, and nothing is
            committed or released (:attr:`ReservationGuard.observed`). ``ENFORCE``
            overrides a tenant in observe mode. Default: the tenant's mode.
        heartbeat: Whether to keep the reservation alive while it is held (default ``True``).
    """

    estimate: int | Amount
    action_kind: str
    action_name: str
    action_tags: Sequence[str] | None
    action_policy_keys: ActionPolicyKeys | Mapping[str, Any] | None
    unit: Unit | str
    subject: Subject | None
    tenant: str | None
    workspace: str | None
    app: str | None
    workflow: str | None
    agent: str | None
    toolset: str | None
    dimensions: Mapping[str, str] | None
    ttl_ms: int | None
    grace_period_ms: int | None
    overage_policy: CommitOveragePolicy | str | None
    metadata: Mapping[str, Any] | None
    idempotency_key: str | None
    observe_mode: ObserveMode | str | None
    heartbeat: bool


# --------------------------------------------------------------------------------------------
# The plan: pure functions shared by guards, @cycles, streams and adapters


def new_idempotency_key() -> str:
    """Return a fresh idempotency key (a random UUID) for one logical operation.

    Reuse the key for every retry of that operation; never share it between operations.
    The key is an RFC 4122 version-4 UUID, built without ``uuid.uuid4()``'s object overhead
    (this runs several times per guarded call).
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def to_amount(value: int | Amount, unit: Unit | str, what: str = "amount") -> Amount:
    """Return ``value`` as an :class:`Amount` (an ``int`` is taken to be in ``unit``).

    Raises:
        TypeError: ``value`` is neither a non-negative ``int`` nor an :class:`Amount`.
        ValueError: ``value`` is negative.
    """
    if type(value) is int:
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")
        return Amount(unit=Unit(unit), amount=value)
    if isinstance(value, Amount):
        return value
    raise TypeError(
        f"{what} must be an int (in {Unit(unit).value}) or an Amount, got "
        f"{type(value).__name__} {value!r}"
    )


def resolve_subject(
    config: CyclesConfig | None,
    fields: Mapping[str, str | None] | None = None,
    *,
    subject: Subject | None = None,
    dimensions: Mapping[str, str] | None = None,
    tenant: str | None = None,
) -> Subject:
    """Return the subject of a reservation: explicit fields over the config's defaults.

    ``fields`` are standard subject fields (``None`` keeps the config's value); a complete
    ``subject`` excludes every other field. ``tenant``, the API key's (see
    ``client.discover_tenant()``), is used only when no standard field is set anywhere else.

    Raises:
        TypeError: ``subject`` was combined with separate fields, or a field is unknown.
        SubjectRequiredError: No standard subject field is set anywhere (and no ``tenant``).
    """
    fields = dict(fields) if fields else {}
    if subject is not None:
        if dimensions is not None or any(value is not None for value in fields.values()):
            raise TypeError(
                "pass either subject=Subject(...) or separate subject fields "
                "(tenant=..., agent=..., dimensions=...), not both"
            )
        return subject
    values: dict[str, Any] = {}
    for name in STANDARD_SUBJECT_FIELDS:
        value = fields.pop(name, None)
        if value is None and config is not None:
            value = getattr(config, name)
        if value is not None:
            values[name] = value
    if fields:
        raise TypeError(
            f"unknown subject field(s) {', '.join(sorted(fields))}; subject fields are: "
            f"{', '.join(STANDARD_SUBJECT_FIELDS)}"
        )
    if not values:
        if tenant is None:
            raise SubjectRequiredError(
                "the reservation has no subject: pass tenant=... (or workspace, app, "
                "workflow, agent, toolset), or set a default with CyclesConfig(tenant=...)"
            )
        values["tenant"] = tenant
    if dimensions is not None:
        values["dimensions"] = dict(dimensions)
    return Subject(**values)


def build_reservation_request(
    *,
    subject: Subject,
    action: Action,
    estimate: Amount,
    ttl_ms: int | None = DEFAULT_TTL_MS,
    grace_period_ms: int | None = None,
    overage_policy: CommitOveragePolicy | str | None = None,
    dry_run: bool = False,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    observe_mode: ObserveMode | str | None = None,
) -> ReservationCreateRequest:
    """Build the body of ``POST /v1/reservations``.

    Raises:
        pydantic.ValidationError: An option breaks the spec (e.g. ``ttl_ms`` under 1000).
    """
    return ReservationCreateRequest(
        idempotency_key=idempotency_key or new_idempotency_key(),
        subject=subject,
        action=action,
        estimate=estimate,
        ttl_ms=ttl_ms,
        grace_period_ms=grace_period_ms,
        overage_policy=None if overage_policy is None else CommitOveragePolicy(overage_policy),
        dry_run=True if dry_run else None,
        metadata=dict(metadata) if metadata else None,
        observe_mode=observe_mode,  # type: ignore[arg-type]  # a str is validated here
    )


def request_from_options(
    config: CyclesConfig,
    request: ReservationCreateRequest | None,
    options: Mapping[str, Any],
    *,
    allowed: frozenset[str] | None = None,
    tenant: str | None = None,
) -> ReservationCreateRequest:
    """Turn guard options (see :class:`ReserveOptions`) into a reservation request.

    A ready ``request`` allows no option but ``heartbeat``; ``allowed`` narrows the option
    names accepted; ``tenant`` (the API key's) is used when no subject field is set anywhere.

    Raises:
        TypeError: Unknown or missing options, or a request combined with options.
        SubjectRequiredError: No subject field anywhere and no ``tenant``.
    """
    if (  # the @cycles path: a ready request and at most the heartbeat switch
        type(request) is ReservationCreateRequest
        and not request.dry_run
        and all(name == "heartbeat" for name in options)
        and (allowed is None or not options or "heartbeat" in allowed)
    ):
        return request
    known = allowed if allowed is not None else _RESERVE_OPTION_NAMES
    if options.get("dry_run") or (request is not None and getattr(request, "dry_run", None)):
        raise TypeError(
            "a reservation guard cannot dry-run (its block would run without a reservation); "
            "call runcycles.dry_run(client, ...) to evaluate a reservation without holding it"
        )
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown reservation option(s) {', '.join(unknown)}; valid options are: "
            f"{', '.join(sorted(known))}"
        )
    if request is not None:
        clashing = sorted(set(options) & _REQUEST_FIELD_OPTIONS)
        if clashing:
            raise TypeError(
                f"pass either a ReservationCreateRequest or the option(s) {', '.join(clashing)}, "
                "not both"
            )
        if not isinstance(request, ReservationCreateRequest):
            raise TypeError(
                f"expected a ReservationCreateRequest, got {type(request).__name__}; or pass "
                "estimate=..., action_kind=..., action_name=... as keywords"
            )
        return request
    missing = [name for name in ("estimate", "action_kind", "action_name") if name not in options]
    if missing:
        raise TypeError(
            f"reserve() needs {', '.join(missing)}: e.g. reserve(estimate=5_000, "
            "action_kind='llm.completion', action_name='gpt-4o')"
        )
    unit = options.get("unit") or Unit.USD_MICROCENTS
    tags = options.get("action_tags")
    keys = options.get("action_policy_keys")
    subject = resolve_subject(
        config,
        subject=options.get("subject"),
        dimensions=options.get("dimensions"),
        fields={name: options.get(name) for name in STANDARD_SUBJECT_FIELDS},
        tenant=tenant,
    )
    return build_reservation_request(
        subject=subject,
        action=Action(
            kind=options["action_kind"],
            name=options["action_name"],
            tags=list(tags) if tags is not None else None,
            policy_keys=ActionPolicyKeys.model_validate(keys) if keys is not None else None,
        ),
        estimate=to_amount(options["estimate"], unit, "estimate"),
        ttl_ms=options.get("ttl_ms", DEFAULT_TTL_MS),
        grace_period_ms=options.get("grace_period_ms"),
        overage_policy=options.get("overage_policy"),
        metadata=options.get("metadata"),
        idempotency_key=options.get("idempotency_key"),
        observe_mode=options.get("observe_mode"),
    )


_RESERVE_OPTION_NAMES: Final = frozenset(ReserveOptions.__annotations__)
_REQUEST_FIELD_OPTIONS: Final = _RESERVE_OPTION_NAMES - {"heartbeat"}


def _denial_error(data: ReservationCreateResponse, status: int) -> CyclesProtocolError:
    reason = data.reason_code
    cls = NotFoundError if reason == ReasonCode.BUDGET_NOT_FOUND else protocol_error_class(reason)
    return cls(
        f"the reservation was denied ({reason or 'no reason_code given'}); the guarded code "
        "did not run",
        status=status,
        error_code=reason,
        reason_code=reason,
        retry_after_ms=data.retry_after_ms,
        deny_detail=data.deny_detail,
    )


def reservation_granted(
    response: CyclesResponse[ReservationCreateResponse],
) -> ReservationCreateResponse:
    """Return the body of a live reservation the server granted, or raise why not.

    Raises:
        CyclesTransportError: The server was not reached.
        CyclesProtocolError: The server refused (the subclass for its error code, e.g.
            ``BudgetExceededError`` for ``409 BUDGET_EXCEEDED``), or answered ``200 DENY``
            (the subclass for its ``reason_code``).
        MalformedResponseError: The answer breaks the spec (e.g. no ``reservation_id``).
    """
    data = response.data
    if data.decision is Decision.DENY:
        raise _denial_error(data, response.status)
    if not data.reservation_id:
        raise MalformedResponseError(
            f"the server answered {data.decision.value} without a reservation_id; check "
            "that it speaks the Cycles protocol v0",
            status=response.status,
            request_id=response.request_id,
        )
    return data


def dry_run_result(response: CyclesResponse[ReservationCreateResponse]) -> DryRunResult:
    """Return the evaluation in the answer to a ``dry_run`` reservation.

    A ``DENY`` is a result here, not an error: shadow mode observes, it does not block.

    Raises:
        CyclesTransportError: The server was not reached.
        CyclesProtocolError: The server refused the request itself (bad input, auth, ...).
    """
    data = response.data
    return DryRunResult(
        decision=data.decision,
        caps=data.caps,
        reason_code=data.reason_code,
        affected_scopes=tuple(data.affected_scopes),
        balances=None if data.balances is None else tuple(data.balances),
        scope_path=data.scope_path,
        reserved=data.reserved,
        retry_after_ms=data.retry_after_ms,
        deny_detail=data.deny_detail,
    )


def observed_result(
    request: ReservationCreateRequest, response: CyclesResponse[ReservationCreateResponse]
) -> DryRunResult | None:
    """Return the evaluation when the server only observed a live reservation, else ``None``.

    In observe mode (the request's ``observe_mode=OBSERVE``, or the tenant's when the request
    names no mode) the server answers a live reservation as it answers a dry run: ``200``,
    the decision it would have taken, no ``reservation_id``, no ``expires_at_ms``, and
    ``affected_scopes`` (the spec's SIDE-EFFECT CONTRACT). Without an ``OBSERVE`` of its
    own, the request takes such an answer for the tenant's observe mode only when it is
    one a live reservation never gets: a ``DENY`` of a live reservation is a ``409`` whose
    ``deny_detail`` is in the error, so a ``200 DENY`` *with* ``deny_detail`` is an
    observed one, and one without it stays a denial.
    """
    data = response.data
    if data.reservation_id or data.expires_at_ms is not None:
        return None
    mode = request.observe_mode
    if mode is None:
        if not data.affected_scopes:
            return None
        if data.decision is Decision.DENY and data.deny_detail is None:
            return None
    elif mode is not ObserveMode.OBSERVE:
        return None  # ENFORCE sent: the tenant's observe mode does not apply
    return dry_run_result(response)


def context_for(
    request: ReservationCreateRequest, data: ReservationCreateResponse
) -> CyclesContext:
    """Build the :class:`CyclesContext` of a granted reservation."""
    return CyclesContext(
        reservation_id=data.reservation_id or "",
        decision=data.decision,
        estimate=request.estimate,
        caps=data.caps,
        expires_at_ms=data.expires_at_ms,
        affected_scopes=data.affected_scopes,
        scope_path=data.scope_path,
        reserved=data.reserved,
        balances=data.balances,
    )


def build_commit_request(
    context: CyclesContext,
    actual: int | Amount | None = None,
    *,
    metrics: CyclesMetrics | None = None,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> CommitRequest:
    """Build the commit that ends the reservation of ``context``.

    An ``int`` ``actual`` is in the estimate's unit; ``None`` commits the estimate, marked
    ``metadata["actual_source"] = "estimate"``. ``metrics`` default to ``context.metrics``,
    ``metadata`` goes over ``context.commit_metadata``, the key defaults to a fresh UUID.

    Raises:
        TypeError: ``actual`` has the wrong type.
        ValueError: ``actual`` is negative or in another unit than the estimate.
    """
    estimate = context.estimate
    merged: dict[str, Any] = {}
    if context.commit_metadata:
        merged.update(context.commit_metadata)
    if metadata:
        merged.update(metadata)
    if actual is None:
        amount = estimate
        merged.setdefault(ACTUAL_SOURCE_KEY, "estimate")
    else:
        amount = to_amount(actual, estimate.unit, "actual")
        if amount.unit is not estimate.unit:
            raise ValueError(
                f"actual is in {amount.unit.value} but the reservation is in "
                f"{estimate.unit.value}; commit in the reservation's unit"
            )
    return CommitRequest(
        idempotency_key=idempotency_key or new_idempotency_key(),
        actual=amount,
        metrics=metrics if metrics is not None else context.metrics,
        metadata=merged or None,
    )


def measure_actual(
    spec: int | Amount | Callable[[Any], int | Amount | Usage | None] | None,
    result: Any,
    context: CyclesContext,
) -> Amount | Usage | None:
    """Work out what a successful guarded call used, refusing to guess.

    ``spec`` is a callable of ``result``, a fixed amount (an ``int`` is in the estimate's
    unit), or ``None`` (no actual configured: the estimate is the agreed charge; returns
    ``None``). A :class:`~runcycles.Usage` the callable returns is priced when committed.

    Raises:
        UnknownActualError: ``spec`` raised (the exception is the ``__cause__``), returned
            ``None``, or gave something that is not a non-negative amount in the estimate's
            unit.
    """
    if spec is None:
        return None
    rid = context.reservation_id
    try:
        value = spec(result) if callable(spec) else spec
        if value is None:
            reason = "actual returned None"
        elif isinstance(value, Usage):
            return value
        else:
            amount = to_amount(value, context.estimate.unit, "actual")
            if amount.unit is context.estimate.unit:
                return amount
            raise ValueError(
                f"actual is in {amount.unit.value} but the reservation is in "
                f"{context.estimate.unit.value}"
            )
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:512]
        raise UnknownActualError(
            f"the actual= of reservation {rid} failed ({reason})",
            reservation_id=rid,
            reason=reason,
        ) from exc
    raise UnknownActualError(
        f"the actual= of reservation {rid} gave no amount ({reason})",
        reservation_id=rid,
        reason=reason,
    )


def price_usage(
    usage: Usage, estimate: Amount, pricer: Pricer | None = None
) -> tuple[int | None, CyclesMetrics]:
    """Turn ``usage`` into ``(amount, metrics)`` to commit against a reservation of ``estimate``.

    The estimate's unit decides how usage is counted; ``pricer`` prices tokens in
    ``USD_MICROCENTS`` (default: :func:`~runcycles.default_pricer`). ``amount`` is ``None``
    when the pricer's unknown-model policy says to commit the estimate.

    Raises:
        UnknownModelError: The model has no price and the policy is ``"error"``.
        ValueError: The usage cannot be counted in the reservation's unit.
    """
    metrics = CyclesMetrics(
        tokens_input=usage.input_tokens,
        tokens_output=usage.output_tokens,
        model_version=usage.model[:128] if usage.model else None,
    )
    unit = estimate.unit
    if usage.amount is not None:
        if usage.amount.unit is not unit:
            raise ValueError(
                f"usage.amount is in {usage.amount.unit.value} but the reservation is in "
                f"{unit.value}; commit in the reservation's unit"
            )
        return usage.amount.amount, metrics
    if unit is Unit.TOKENS:
        return usage.total_tokens, metrics
    if unit is not Unit.USD_MICROCENTS:
        raise ValueError(
            f"token usage cannot be committed to a reservation in {unit.value}: pass the "
            "amount (Usage(amount=...) or an int) instead"
        )
    return (pricer or default_pricer()).cost(usage), metrics


def _unpriced(exc: Exception, reservation_id: str | None) -> UnknownActualError:
    reason = f"{type(exc).__name__}: {exc}"[:512]
    unknown = UnknownActualError(
        f"cannot price the usage of reservation {reservation_id} ({reason})",
        reservation_id=reservation_id,
        reason=reason,
    )
    unknown.__cause__ = exc
    return unknown


def build_release_request(reason: str | None = None) -> ReleaseRequest:
    """Build a release (``reason`` is cut to the protocol's 256 characters)."""
    return ReleaseRequest(
        idempotency_key=new_idempotency_key(),
        reason=None if reason is None else reason[:256],
    )


def log_release_failure(reservation_id: str | None, exc: Exception) -> None:
    """Log a release that failed (the reservation expires at the end of its lease)."""
    logger.warning(
        "could not release reservation %s (%s); it will expire on its own", reservation_id, exc
    )


def exit_release_reason(exc: BaseException) -> str:
    """Return the release reason recorded when a guarded block raised ``exc``."""
    if isinstance(exc, asyncio.CancelledError):
        return "guarded_code_cancelled"
    return f"guarded_code_raised:{type(exc).__name__}"


# --------------------------------------------------------------------------------------------
# The client's heartbeat and settlement, as a guard uses them


class NoHeartbeat:
    """Stands in for a heartbeat that could not be started (nothing to stop)."""

    __slots__ = ()

    def stop(self) -> None:
        """Nothing to stop."""


NO_HEARTBEAT: Final = NoHeartbeat()


def _track(
    scheduler: HeartbeatScheduler | AsyncHeartbeatScheduler,
    ttl_ms: int,
    data: ReservationCreateResponse,
    context: CyclesContext,
    rtt_s: float,
) -> HeartbeatHandle | NoHeartbeat:
    """Keep the reservation of ``context`` alive on the client's heartbeat scheduler."""
    # A weak reference: a stopped handle waits in the scheduler's heap until it is
    # compacted away, and must not keep the reservation's context (and its response
    # models) alive that long; it would only add garbage-collector work per call.
    context_ref = weakref.ref(context)

    def follow(event: HeartbeatEvent) -> None:
        live = context_ref()
        if event.expires_at_ms is not None and live is not None:
            live.expires_at_ms = event.expires_at_ms

    try:
        return scheduler.track(
            context.reservation_id,
            ttl_ms=ttl_ms,
            remaining_ttl_ms=data.remaining_ttl_ms,
            expires_at_ms=data.expires_at_ms,
            rtt_ms=rtt_s * 1000.0,
            on_event=follow,
        )
    except Exception as exc:  # e.g. the same id tracked twice; never fail the work
        logger.warning(
            "reservation %s runs without a heartbeat (%s); it may expire if the work "
            "outlasts ttl_ms",
            context.reservation_id,
            exc,
        )
        return NO_HEARTBEAT


def _checked(result: SettlementResult) -> SettlementResult:
    """Raise the error of a settlement the server rejected for good; return the others."""
    if result.outcome == "rejected" and result.error is not None:
        raise result.error
    return result


# --------------------------------------------------------------------------------------------
# Guards


_NEW: Final = 0
_LIVE: Final = 1
_FINALIZED: Final = 2
_OBSERVED: Final = 3  # the server only evaluated (observe mode): nothing to settle


class _GuardState:
    """State and pure logic shared by the sync and async guards (no I/O)."""

    __slots__ = (
        "_body",
        "_claim",
        "_client",
        "_context",
        "_heartbeat",
        "_observed",
        "_options",
        "_pending",
        "_request",
        "_state",
        "_token",
        "_use_heartbeat",
    )
    _client: BaseCyclesClient | AsyncBaseCyclesClient

    def __init__(
        self,
        config: CyclesConfig,
        request: ReservationCreateRequest | None,
        options: Mapping[str, Any],
        tenant: str | None,
    ) -> None:
        self._options = options
        # The request's JSON when the caller (``@cycles``) already has it, else ``None``.
        self._body: bytes | None = None
        try:
            self._request = request_from_options(config, request, options, tenant=tenant)
            self._pending = False
        except SubjectRequiredError:
            # No subject anywhere: the API key's tenant is asked for on entering. Build a
            # stand-in now so every other option is still checked before anything is sent.
            self._request = request_from_options(config, None, options, tenant="?")
            self._pending = True
        self._use_heartbeat: bool = options.get("heartbeat", True)
        self._state = _NEW
        self._claim = [True]
        self._context: CyclesContext | None = None
        self._observed: DryRunResult | None = None
        self._heartbeat: HeartbeatHandle | NoHeartbeat | None = None
        self._token: Token[CyclesContext | None] | None = None

    def __repr__(self) -> str:
        state = ("new", "live", "finalized", "observed")[self._state]
        return (
            f"<{type(self).__name__} {state} reservation_id={self.reservation_id!r} "
            f"estimate={self._request.estimate.amount} {self._request.estimate.unit.value}>"
        )

    @property
    def request(self) -> ReservationCreateRequest:
        """The reservation request this guard sends (or sent).

        Before entering, a request without any subject field carries the placeholder tenant
        ``"?"``: the API key's tenant is filled in when the guard is entered.
        """
        return self._request

    @property
    def context(self) -> CyclesContext:
        """The live reservation (also returned by :func:`~runcycles.get_cycles_context`).

        Raises:
            RuntimeError: The guard has not been entered yet.
        """
        if self._context is None:
            raise RuntimeError(
                f"{type(self).__name__} has no reservation yet: use it as a context manager "
                "(`with reserve(client, ...) as guard:`)"
            )
        return self._context

    @property
    def reservation_id(self) -> str | None:
        """The reservation's id (``None`` before the guard is entered, or when observed)."""
        return None if self._context is None else self._context.reservation_id or None

    @property
    def decision(self) -> Decision:
        """``ALLOW`` or ``ALLOW_WITH_CAPS`` (observed: also ``DENY``)."""
        return self.context.decision

    @property
    def observed(self) -> DryRunResult | None:
        """The server's evaluation when it only observed the reservation, else ``None``.

        Observe mode (``observe_mode="OBSERVE"``, or the tenant's): the server held nothing
        and answered the decision it would have taken, a ``DENY`` included. The block runs
        anyway; ``commit()``, ``settle()``, ``release()`` and ``fail()`` send nothing.
        """
        return self._observed

    @property
    def caps(self) -> Caps | None:
        """Caps that came with ``ALLOW_WITH_CAPS``, else ``None``."""
        return self.context.caps

    def is_capped(self) -> bool:
        """Return whether the reservation came with caps."""
        return self.context.caps is not None

    @property
    def affected_scopes(self) -> list[str]:
        """Every scope the reservation holds budget on."""
        return self.context.affected_scopes

    @property
    def expires_at_ms(self) -> int | None:
        """Current expiry (server clock, epoch ms), kept up to date by the heartbeat."""
        return self.context.expires_at_ms

    @property
    def estimate(self) -> Amount:
        """The amount asked for."""
        return self._request.estimate

    @property
    def is_finalized(self) -> bool:
        """Whether ``commit()`` or ``release()`` already ended the reservation."""
        return self._state == _FINALIZED

    def _check_enter(self) -> None:
        if self._state != _NEW:
            raise RuntimeError(f"{type(self).__name__} can be entered only once")

    def _complete(self, config: CyclesConfig, tenant: str) -> None:
        """Build the real request once the API key's tenant is known."""
        built = request_from_options(config, None, self._options, tenant=tenant)
        # keep the stand-in's idempotency key (it may have been given as an option)
        self._request = built.model_copy(update={"idempotency_key": self._request.idempotency_key})
        self._pending = False
        self._body = None  # it was the stand-in's

    def _go_live(
        self, response: CyclesResponse[ReservationCreateResponse], rtt_s: float, publish: bool
    ) -> None:
        """Hold the granted reservation: its heartbeat, and the context if ``publish``."""
        if not response.data.reservation_id:
            observed = observed_result(self._request, response)
            if observed is not None:
                self._observe(observed, response.data, publish)
                return
        data = reservation_granted(response)
        context = self._context = context_for(self._request, data)
        self._state = _LIVE
        if self._use_heartbeat:  # each beat extends by the ttl_ms asked for, else granted
            lease_ms = self._request.ttl_ms or data.remaining_ttl_ms or DEFAULT_TTL_MS
            self._heartbeat = _track(self._client.heartbeat, lease_ms, data, context, rtt_s)
        if publish:
            self._token = push_context(context)

    def _observe(
        self, observed: DryRunResult, data: ReservationCreateResponse, publish: bool
    ) -> None:
        """Run the block under an observed evaluation: no heartbeat, nothing to settle."""
        self._observed = observed
        self._context = context_for(self._request, data)
        self._context.observed = True
        self._state = _OBSERVED
        action = self._request.action
        logger.log(
            logging.INFO if observed.is_allowed else logging.WARNING,
            "observe mode: %s %r would be %s%s; nothing is held, the guarded code runs",
            action.kind,
            action.name,
            observed.decision.value,
            f" ({observed.reason_code})" if observed.reason_code else "",
        )
        if publish:
            self._token = push_context(self._context)

    def _observed_settlement(self) -> SettlementResult:
        """What a commit of an observed guard returns: nothing was held, nothing is sent."""
        return SettlementResult(
            reservation_id="",
            outcome="observed",
            mode="commit",
            idempotency_key="",
            attempts=0,
        )

    def _observed_release(self) -> ReleaseResponse:
        """What a release of an observed guard returns: nothing was held, nothing is sent."""
        unit = self._request.estimate.unit
        return ReleaseResponse(status="RELEASED", released=Amount(unit=unit, amount=0))

    def _begin_finalize(self, operation: str) -> CyclesContext:
        if self._state == _NEW:
            raise RuntimeError(
                f"cannot {operation}: {type(self).__name__} has not reserved yet (enter it "
                "with `with` / `async with` first)"
            )
        context = self.context
        if self._state == _FINALIZED:
            raise ReservationAlreadyFinalizedError(
                f"cannot {operation} reservation {context.reservation_id}: this guard already "
                "committed or released it (each reservation is finalized exactly once)"
            )
        return context

    def _start_commit(
        self,
        actual: int | Amount | Usage | None,
        metrics: CyclesMetrics | None,
        metadata: Mapping[str, Any] | None,
        pricer: Pricer | None,
    ) -> Any:
        """Check and claim the commit, then settle it: the result (async twin: its coroutine)."""
        context = self._begin_finalize("commit")
        if isinstance(actual, Usage):
            actual, usage_metrics = price_usage(actual, context.estimate, pricer)
            if metrics is None:
                metrics = usage_metrics
            else:  # what the caller measured (latency, ...) plus the usage's tokens
                known = metrics.model_dump(exclude_none=True)
                extra = usage_metrics.model_dump(exclude_none=True)
                metrics = metrics.model_copy(update={**extra, **known})
        commit_request = build_commit_request(context, actual, metrics=metrics, metadata=metadata)
        self._mark_finalized("commit")
        return self._client.settlement.commit(
            context.reservation_id,
            commit_request,
            subject=self._request.subject,
            action=self._request.action,
            overage_policy=self._request.overage_policy,
        )

    def _mark_finalized(self, operation: str = "finalize") -> None:
        """Claim the one finalization atomically (two threads cannot both); stop the heartbeat."""
        try:
            self._claim.pop()  # list.pop is atomic: exactly one caller gets the item
        except IndexError:
            raise ReservationAlreadyFinalizedError(
                f"cannot {operation} reservation {self.reservation_id}: it is already being "
                "committed or released by another caller"
            ) from None
        self._state = _FINALIZED
        self._stop_heartbeat()

    def abandon(self) -> bool:
        """End the guard without sending anything: the reservation expires at its lease.

        Stops the heartbeat (what an unknown actual under ``on_unknown_actual="raise"``
        does); returns whether this call ended it (``False``: it was already finalized).
        """
        if self._state in (_NEW, _OBSERVED):
            return False  # nothing reserved, nothing to abandon
        try:
            self._mark_finalized("abandon")
        except ReservationAlreadyFinalizedError:
            return False
        return True

    def _stop_heartbeat(self) -> None:
        handle, self._heartbeat = self._heartbeat, None
        if handle is not None:
            handle.stop()

    def _leave(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            pop_context(token)

    def _warn_unfinalized(self) -> None:
        warnings.warn(
            f"reservation {self.reservation_id} left its guard without commit() or release(); "
            "it was released, so nothing was charged. Call guard.commit(...) when the work "
            "used budget, or guard.release() when it did not.",
            UnfinalizedReservationWarning,
            stacklevel=3,
        )


class ReservationGuard(_GuardState):
    """One live reservation held while a ``with`` block runs (sync twin).

    Build it with :func:`reserve` (or ``client.reserve(...)``); entering the block reserves.

    Args:
        client: The client to reserve, commit and release with.
        request: A ready reservation request, instead of the keyword options.
        **options: See :class:`ReserveOptions`.

    Raises:
        TypeError: Missing or unknown options.
        CyclesConfigError: No subject (no subject field given and none in the config).
    """

    __slots__ = ()
    _client: BaseCyclesClient

    def __init__(
        self,
        client: BaseCyclesClient,
        request: ReservationCreateRequest | None = None,
        /,
        **options: Unpack[ReserveOptions],
    ) -> None:
        super().__init__(client.config, request, options, client.api_key_tenant)
        self._client = client

    def start(self, *, publish: bool = False) -> Self:
        """Reserve now (a denial raises before anything runs), start the heartbeat; return self.

        The explicit spelling of entering the guard, for framework callbacks
        (``docs/guards.md``): end the reservation later with :meth:`commit`, :meth:`settle`,
        :meth:`release`, :meth:`fail` or :meth:`abandon`. ``publish=True`` also makes the
        reservation :func:`~runcycles.get_cycles_context` until the guard is left (what
        ``with`` does; a callback never leaves a context variable set).

        Raises:
            CyclesProtocolError: The server denied the reservation (e.g.
                :class:`~runcycles.BudgetExceededError`).
            CyclesTransportError: The server could not be reached.
            RuntimeError: The guard was already started.
        """
        self._check_enter()
        if self._pending:
            self._complete(self._client.config, self._client.discover_tenant())
        started = time.perf_counter()
        body = self._body
        if body is None:
            response = self._client.create_reservation(self._request)
        else:
            response = self._client._create_encoded(body, self._request.idempotency_key)
        self._go_live(response, time.perf_counter() - started, publish)
        return self

    def __enter__(self) -> Self:
        return self.start(publish=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._state == _LIVE:
                if exc is None:
                    self._warn_unfinalized()
                    self._release_quietly("guard_exited_without_commit")
                else:
                    self._release_quietly(exit_release_reason(exc))
        finally:
            self._stop_heartbeat()
            self._leave()

    def fail(self, exc: BaseException | None = None, *, reason: str | None = None) -> None:
        """Release the reservation because the work failed; never raises.

        A no-op when the guard is not live, so an error callback may call it unconditionally;
        a failed release is logged. The release reason is ``reason``, else derived from
        ``exc`` (what the work raised), else ``"guarded_code_failed"``.
        """
        if self._state != _LIVE:
            return
        self._release_quietly(reason or _fail_reason(exc))

    def settle(
        self,
        actual: int | Amount | Usage | UnknownActualError | None = None,
        *,
        on_unknown_actual: OnUnknownActual = "raise",
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
        pricer: Pricer | None = None,
        fix: str = "the actual",
    ) -> SettlementResult | None:
        """End the reservation after the work ran, applying ``on_unknown_actual`` once.

        ``actual`` is as for :meth:`commit`, or an :class:`UnknownActualError` (a
        :class:`~runcycles.Usage` that cannot be priced counts as one). For an unknown actual,
        ``on_unknown_actual`` decides (``docs/guards.md``): ``"raise"`` (send nothing, leave
        the reservation to its lease, raise the error naming ``fix``), ``"release"`` (return
        ``None``) or ``"commit_estimate"`` (commit the estimate flagged ``actual_error``).

        Raises:
            UnknownActualError: The actual is unknown and ``on_unknown_actual="raise"``.
            CyclesError: The commit or release failed.
        """
        if self._state == _OBSERVED:
            return self._observed_settlement()
        if isinstance(actual, Usage):
            try:
                return self.commit(actual, metrics=metrics, metadata=metadata, pricer=pricer)
            except (UnknownModelError, ValueError) as exc:
                if self.is_finalized:  # it failed after pricing: not an unknown actual
                    raise
                actual = _unpriced(exc, self.reservation_id)
        if not isinstance(actual, UnknownActualError):
            return self.commit(actual, metrics=metrics, metadata=metadata)
        rule = _unknown_rule(self, actual, on_unknown_actual, fix, metadata)
        if rule is _RELEASE:
            self.release(UNKNOWN_ACTUAL_RELEASE_REASON)
            return None
        return self.commit(None, metrics=metrics, metadata=rule)

    def commit(
        self,
        actual: int | Amount | Usage | None = None,
        *,
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
        pricer: Pricer | None = None,
    ) -> SettlementResult:
        """Charge what was used and end the reservation; check ``result.settled``.

        ``actual``: an ``int`` in the estimate's unit, an :class:`Amount`, or a
        :class:`~runcycles.Usage` (priced by ``pricer``, default
        :func:`~runcycles.default_pricer`; its tokens become the metrics); ``None`` commits
        the estimate (marked ``actual_source="estimate"``). ``metrics`` and ``metadata`` are
        merged over the context's. The outcome is ``committed``, ``event_applied`` (the
        reservation had expired) or ``pending`` (retried later from the journal).

        Raises:
            ReservationAlreadyFinalizedError: The guard already committed or released.
            CyclesProtocolError: The server rejected the commit for good (e.g.
                ``BudgetExceededError`` for an overage under ``REJECT``).
            ValueError: ``actual`` is negative or in another unit than the estimate.
            UnknownModelError: A :class:`~runcycles.Usage` of a model without a price (under
                the pricer's ``"error"`` policy); nothing was sent.
        """
        if self._state == _OBSERVED:
            return self._observed_settlement()
        return _checked(self._start_commit(actual, metrics, metadata, pricer))

    def release(self, reason: str | None = None) -> ReleaseResponse:
        """Give the whole reservation back, charging nothing (``reason``: 256 characters kept).

        Raises:
            ReservationAlreadyFinalizedError: The guard already committed or released.
            CyclesError: The release failed (the reservation then expires on its own).
        """
        if self._state == _OBSERVED:
            return self._observed_release()
        context = self._begin_finalize("release")
        self._mark_finalized("release")
        return self._send_release(context, reason)

    def _release_quietly(self, reason: str) -> None:
        context = self.context
        try:
            self._mark_finalized()
        except ReservationAlreadyFinalizedError:
            return  # another thread finalized it meanwhile
        try:
            self._send_release(context, reason)
        except Exception as exc:  # never mask the block's own exception
            log_release_failure(context.reservation_id, exc)

    def _send_release(self, context: CyclesContext, reason: str | None) -> ReleaseResponse:
        request = build_release_request(reason)
        response = self._client.settlement.release(
            context.reservation_id, request.reason, idempotency_key=request.idempotency_key
        )
        return response.data


class AsyncReservationGuard(_GuardState):
    """One live reservation held while an ``async with`` block runs (async twin).

    As :class:`ReservationGuard`, on an :class:`~runcycles.AsyncCyclesClient`. If the block is
    cancelled, the release is shielded from a second cancellation; ``commit()`` always is.
    """

    __slots__ = ()
    _client: AsyncBaseCyclesClient

    def __init__(
        self,
        client: AsyncBaseCyclesClient,
        request: ReservationCreateRequest | None = None,
        /,
        **options: Unpack[ReserveOptions],
    ) -> None:
        super().__init__(client.config, request, options, client.api_key_tenant)
        self._client = client

    async def start(self, *, publish: bool = False) -> Self:
        """Async twin of :meth:`ReservationGuard.start`."""
        self._check_enter()
        if self._pending:
            self._complete(self._client.config, await self._client.discover_tenant())
        started = time.perf_counter()
        body = self._body
        if body is None:
            response = await self._client.create_reservation(self._request)
        else:
            response = await self._client._create_encoded(body, self._request.idempotency_key)
        self._go_live(response, time.perf_counter() - started, publish)
        return self

    async def __aenter__(self) -> Self:
        return await self.start(publish=True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._state == _LIVE:
                if exc is None:
                    self._warn_unfinalized()
                    await self._release_quietly("guard_exited_without_commit", shield=False)
                else:
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    await self._release_quietly(exit_release_reason(exc), shield=cancelled)
        finally:
            self._stop_heartbeat()
            self._leave()

    async def fail(self, exc: BaseException | None = None, *, reason: str | None = None) -> None:
        """Async twin of :meth:`ReservationGuard.fail`; the release is shielded."""
        if self._state != _LIVE:
            return
        await self._release_quietly(reason or _fail_reason(exc), shield=True)

    async def settle(
        self,
        actual: int | Amount | Usage | UnknownActualError | None = None,
        *,
        on_unknown_actual: OnUnknownActual = "raise",
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
        pricer: Pricer | None = None,
        fix: str = "the actual",
    ) -> SettlementResult | None:
        """Async twin of :meth:`ReservationGuard.settle`."""
        if self._state == _OBSERVED:
            return self._observed_settlement()
        if isinstance(actual, Usage):
            try:
                return await self.commit(actual, metrics=metrics, metadata=metadata, pricer=pricer)
            except (UnknownModelError, ValueError) as exc:
                if self.is_finalized:  # it failed after pricing: not an unknown actual
                    raise
                actual = _unpriced(exc, self.reservation_id)
        if not isinstance(actual, UnknownActualError):
            return await self.commit(actual, metrics=metrics, metadata=metadata)
        rule = _unknown_rule(self, actual, on_unknown_actual, fix, metadata)
        if rule is _RELEASE:
            await self.release(UNKNOWN_ACTUAL_RELEASE_REASON)
            return None
        return await self.commit(None, metrics=metrics, metadata=rule)

    async def commit(
        self,
        actual: int | Amount | Usage | None = None,
        *,
        metrics: CyclesMetrics | None = None,
        metadata: Mapping[str, Any] | None = None,
        pricer: Pricer | None = None,
    ) -> SettlementResult:
        """Async twin of :meth:`ReservationGuard.commit`; the settlement is shielded."""
        if self._state == _OBSERVED:
            return self._observed_settlement()
        # Known spend: a cancellation of the caller must not interrupt the settlement.
        return _checked(await run_shielded(self._start_commit(actual, metrics, metadata, pricer)))

    async def release(self, reason: str | None = None) -> ReleaseResponse:
        """Async twin of :meth:`ReservationGuard.release`."""
        if self._state == _OBSERVED:
            return self._observed_release()
        context = self._begin_finalize("release")
        self._mark_finalized("release")
        return await self._send_release(context, reason)

    async def _release_quietly(self, reason: str, *, shield: bool) -> None:
        context = self.context
        try:
            self._mark_finalized()
        except ReservationAlreadyFinalizedError:
            return  # finalized meanwhile
        try:
            release = self._send_release(context, reason)
            await (run_shielded(release) if shield else release)
        except Exception as exc:  # never mask the block's own exception
            log_release_failure(context.reservation_id, exc)

    async def _send_release(self, context: CyclesContext, reason: str | None) -> ReleaseResponse:
        request = build_release_request(reason)
        response = await self._client.settlement.release(
            context.reservation_id, request.reason, idempotency_key=request.idempotency_key
        )
        return response.data


_background: set[asyncio.Future[Any]] = set()


async def run_shielded(awaitable: Coroutine[Any, Any, _T]) -> _T:
    """Await ``awaitable`` so that cancelling the caller does not interrupt it.

    Used to settle a reservation while a cancellation unwinds: if the caller is cancelled
    again, the settlement still runs to completion in the background.
    """
    # Like ``asyncio.shield(task)``, but the task resolves the caller's future itself (one
    # event-loop step fewer per call than a done callback chain).
    outer: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_settle_into(awaitable, outer))
    _background.add(task)
    task.add_done_callback(_background.discard)
    return await outer


async def _settle_into(awaitable: Coroutine[Any, Any, _T], outer: asyncio.Future[_T]) -> None:
    """Run ``awaitable`` to the end and hand its outcome to ``outer`` (unless cancelled).

    Once the caller stopped waiting (``outer`` cancelled), a failure is dropped here, as
    ``asyncio.shield`` does: the settlement logs its own outcome.
    """
    try:
        result = await awaitable
    except asyncio.CancelledError:
        outer.cancel()
        raise
    except BaseException as exc:
        if not outer.done():
            outer.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
    else:
        if not outer.done():
            outer.set_result(result)


@overload
def reserve(
    client: BaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    **options: Unpack[ReserveOptions],
) -> ReservationGuard: ...


@overload
def reserve(
    client: AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    **options: Unpack[ReserveOptions],
) -> AsyncReservationGuard: ...


def reserve(
    client: BaseCyclesClient | AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    **options: Unpack[ReserveOptions],
) -> ReservationGuard | AsyncReservationGuard:
    """Return a guard that reserves when its block is entered (``with`` or ``async with``).

    A :class:`ReservationGuard` for a sync client, an :class:`AsyncReservationGuard` for an
    async one; ``request`` or ``options`` (:class:`ReserveOptions`) as for the guard.
    """
    if isinstance(client, AsyncBaseCyclesClient):
        return AsyncReservationGuard(client, request, **options)
    return ReservationGuard(client, request, **options)


@overload
def dry_run(
    client: BaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    **options: Unpack[ReserveOptions],
) -> DryRunResult: ...


@overload
def dry_run(
    client: AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    **options: Unpack[ReserveOptions],
) -> Awaitable[DryRunResult]: ...


def dry_run(
    client: BaseCyclesClient | AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None = None,
    /,
    **options: Unpack[ReserveOptions],
) -> DryRunResult | Awaitable[DryRunResult]:
    """Ask the server to evaluate a reservation without holding anything (shadow mode).

    Returns the :class:`DryRunResult` (a ``DENY`` is a result, not an error); await it with an
    :class:`~runcycles.AsyncCyclesClient`. ``request`` (its ``dry_run`` forced on) or
    ``options`` as for :func:`reserve` (``heartbeat`` is ignored).
    """
    if request is not None:
        request = request.model_copy(update={"dry_run": None})
    config = client.config
    tenant = client.api_key_tenant
    try:
        checked: ReservationCreateRequest | None = request_from_options(
            config, request, options, tenant=tenant
        )
    except SubjectRequiredError:
        request_from_options(config, None, options, tenant="?")  # check the other options now
        checked = None
    if isinstance(client, AsyncBaseCyclesClient):
        return _adry_run(client, checked, options)
    if checked is None:
        checked = request_from_options(config, None, options, tenant=client.discover_tenant())
    return dry_run_result(client.create_reservation(checked.model_copy(update={"dry_run": True})))


async def _adry_run(
    client: AsyncBaseCyclesClient,
    request: ReservationCreateRequest | None,
    options: Mapping[str, Any],
) -> DryRunResult:
    if request is None:
        tenant = await client.discover_tenant()
        request = request_from_options(client.config, None, options, tenant=tenant)
    return dry_run_result(
        await client.create_reservation(request.model_copy(update={"dry_run": True}))
    )
