"""``@cycles``: guard a function with a reservation (reserve -> run -> commit or release).

Each call reserves (a denial raises before the function runs), runs the function with the
reservation published as :func:`~runcycles.get_cycles_context`, then settles it through the
guard: commit the actual, apply ``on_unknown_actual`` when it is unknown (never a charge made
up), or release if the function raised. ``docs/decorator.md`` has the details. Sync or async
is decided once, at decoration; generator functions are refused (use
:func:`~runcycles.streaming.stream_reservation`). Without ``client=`` the default of
:func:`set_default_client` / :func:`set_default_config` is looked up at each call; one
default serves sync *and* async functions.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, Protocol, TypeVar, overload

from runcycles import _fastpath
from runcycles._base_client import at_loop_shutdown
from runcycles.client import AsyncCyclesClient, CyclesClient
from runcycles.config import CyclesConfig
from runcycles.exceptions import CyclesConfigError, CyclesError
from runcycles.lifecycle import (
    DEFAULT_TTL_MS,
    AsyncReservationGuard,
    DryRunResult,
    OnUnknownActual,
    ReservationGuard,
    SubjectRequiredError,
    UnknownActualError,
    build_reservation_request,
    check_on_unknown_actual,
    dry_run_result,
    log_release_failure,
    measure_actual,
    new_idempotency_key,
    resolve_subject,
    to_amount,
)
from runcycles.models import (
    STANDARD_SUBJECT_FIELDS,
    Action,
    ActionPolicyKeys,
    Amount,
    CommitOveragePolicy,
    CyclesMetrics,
    ObserveMode,
    Subject,
    Unit,
)
from runcycles.pricing import Pricer
from runcycles.usage import Usage

if TYPE_CHECKING:
    from runcycles.context import CyclesContext
    from runcycles.models import ReservationCreateRequest

__all__ = [
    "DEFAULT_ACTION_KIND",
    "cycles",
    "get_default_async_client",
    "get_default_client",
    "set_default_client",
    "set_default_config",
]

logger = logging.getLogger("runcycles")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_ACTION_KIND: Final = "function"
"""``action.kind`` of a ``@cycles`` function that does not set ``action_kind``."""

EstimateArg = int | Amount | Callable[..., int | Amount]
ActualArg = int | Amount | Callable[[Any], int | Amount | Usage | None] | None
SubjectArg = str | Callable[..., str | None] | None
DimensionsArg = Mapping[str, str] | Callable[..., Mapping[str, str] | None] | None

_ACTION_NAME_MAX: Final = 256


# --------------------------------------------------------------------------------------------
# Default client


class _Defaults:
    """The process-wide default config and clients (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.config: CyclesConfig | None = None
        self.sync_client: CyclesClient | None = None
        self.async_client: AsyncCyclesClient | None = None
        self.sync_derived = False
        self.async_per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncCyclesClient
        ] = weakref.WeakKeyDictionary()

    def source_config(self) -> CyclesConfig:
        if self.config is not None:
            return self.config
        if self.async_client is not None:
            return self.async_client.config
        if self.sync_client is not None:
            return self.sync_client.config
        raise CyclesConfigError(
            "@cycles has no client: pass client=... to the decorator, or call "
            "runcycles.set_default_config(CyclesConfig(...)) or "
            "runcycles.set_default_client(...) once at start-up"
        )

    def sync(self) -> CyclesClient:
        client = self.sync_client
        if client is not None:
            return client
        with self.lock:
            if self.sync_client is None:
                self.sync_client = CyclesClient(self.source_config())
                self.sync_derived = True
            return self.sync_client

    def async_(self) -> AsyncCyclesClient:
        client = self.async_client
        if client is not None:
            return client
        # A lazily built async client belongs to the event loop it first ran on (its
        # pooled connections cannot move between loops), so keep one per running loop.
        loop = asyncio.get_running_loop()
        client = self.async_per_loop.get(loop)
        if client is not None:
            return client
        with self.lock:
            client = self.async_per_loop.get(loop)
            if client is None:
                client = AsyncCyclesClient(self.source_config())
                at_loop_shutdown(client.aclose)  # closed when the running loop shuts down
                self.async_per_loop[loop] = client
            return client

    def drop_derived(self) -> None:
        """Forget the clients built from a config; close the sync one (we own it).

        Called with the lock held. Async clients are closed by their event loop's shutdown.
        """
        if self.sync_derived and self.sync_client is not None:
            self.sync_client.close()
            self.sync_client = None
        self.sync_derived = False
        self.async_per_loop.clear()


def _close_derived_at_exit() -> None:
    with _defaults.lock:
        if _defaults.sync_derived and _defaults.sync_client is not None:
            _defaults.sync_client.close()


_defaults: Final = _Defaults()
atexit.register(_close_derived_at_exit)


def set_default_config(config: CyclesConfig | None) -> None:
    """Set the config ``@cycles`` builds its default clients from (``None`` clears it).

    A :class:`~runcycles.CyclesClient` for sync functions and an
    :class:`~runcycles.AsyncCyclesClient` for async ones are built lazily from it. It also
    replaces any client set with :func:`set_default_client`.

    Raises:
        TypeError: ``config`` is not a :class:`~runcycles.CyclesConfig`.
    """
    if config is not None and not isinstance(config, CyclesConfig):
        raise TypeError(
            f"set_default_config() expects a CyclesConfig, got {type(config).__name__}; "
            "build one with CyclesConfig(base_url=..., api_key=...) or CyclesConfig.from_env()"
        )
    with _defaults.lock:
        _defaults.drop_derived()
        _defaults.config = config
        _defaults.sync_client = None
        _defaults.async_client = None


def set_default_client(client: CyclesClient | AsyncCyclesClient | None) -> None:
    """Set the client ``@cycles`` uses when none is passed (``None`` clears both flavours).

    Set a :class:`~runcycles.CyclesClient` for sync functions and/or an
    :class:`~runcycles.AsyncCyclesClient` for async ones (call this once per flavour to set
    both). A flavour that was not set is built from the other one's config when first
    needed, so one call is enough for code that mixes sync and async functions.

    Raises:
        TypeError: ``client`` is neither client class.
    """
    if client is not None and not isinstance(client, (CyclesClient, AsyncCyclesClient)):
        raise TypeError(
            "set_default_client() expects a CyclesClient or an AsyncCyclesClient, got "
            f"{type(client).__name__}"
        )
    with _defaults.lock:
        _defaults.drop_derived()  # built from the previous default; the new one replaces it
        _defaults.config = None
        if client is None:
            _defaults.sync_client = None
            _defaults.async_client = None
        elif isinstance(client, CyclesClient):
            _defaults.sync_client = client
        else:
            _defaults.async_client = client


def get_default_client() -> CyclesClient:
    """Return the default sync client (building it from the default config if needed).

    Raises:
        CyclesConfigError: No default config or client was set.
    """
    return _defaults.sync()


def get_default_async_client() -> AsyncCyclesClient:
    """Return the default async client for the running event loop.

    Must be called from a coroutine.

    Raises:
        CyclesConfigError: No default config or client was set.
    """
    return _defaults.async_()


# --------------------------------------------------------------------------------------------
# Policy: everything about a decorated function that can be decided once


class _Policy:
    """The decorated function's reservation plan, built once at decoration time."""

    __slots__ = (
        "action",
        "actual",
        "client",
        "dimensions",
        "dimensions_fn",
        "dry_run",
        "estimate",
        "estimate_fn",
        "grace_period_ms",
        "heartbeat",
        "metadata",
        "observe_mode",
        "on_unknown_actual",
        "overage_policy",
        "pricer",
        "request_cache",
        "static_subject",
        "subject_cache",
        "subject_fns",
        "ttl_ms",
        "unit",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        estimate: EstimateArg,
        actual: ActualArg,
        action_kind: str,
        action_name: str | None,
        action_tags: Sequence[str] | None,
        action_policy_keys: ActionPolicyKeys | Mapping[str, Any] | None,
        unit: Unit | str,
        ttl_ms: int | None,
        grace_period_ms: int | None,
        overage_policy: CommitOveragePolicy | str | None,
        dry_run: bool,
        observe_mode: ObserveMode | str | None,
        subject: Mapping[str, SubjectArg],
        dimensions: DimensionsArg,
        metadata: Mapping[str, Any] | None,
        client: CyclesClient | AsyncCyclesClient | None,
        heartbeat: bool,
        on_unknown_actual: OnUnknownActual,
        pricer: Pricer | None,
    ) -> None:
        check_on_unknown_actual(on_unknown_actual)
        self.on_unknown_actual = on_unknown_actual
        self.pricer = pricer
        self.unit = Unit(unit)
        self.estimate: Amount | None = None
        self.estimate_fn: Callable[..., int | Amount] | None = None
        if callable(estimate):
            self.estimate_fn = estimate
        else:
            self.estimate = to_amount(estimate, self.unit, "estimate")
        if actual is not None and not callable(actual):
            checked = to_amount(actual, self.unit, "actual")  # type and sign, now
            if self.estimate is not None and checked.unit is not self.estimate.unit:
                raise ValueError(
                    f"actual is in {checked.unit.value} but estimate is in "
                    f"{self.estimate.unit.value}; use one unit"
                )
        self.actual = actual
        name = action_name or getattr(fn, "__qualname__", None) or repr(fn)
        self.action = Action(
            kind=action_kind,
            name=name[:_ACTION_NAME_MAX],
            tags=list(action_tags) if action_tags is not None else None,
            policy_keys=None
            if action_policy_keys is None
            else ActionPolicyKeys.model_validate(action_policy_keys),
        )
        self.ttl_ms = ttl_ms
        self.grace_period_ms = grace_period_ms
        self.overage_policy = (
            None if overage_policy is None else CommitOveragePolicy(overage_policy)
        )
        self.dry_run = dry_run
        self.observe_mode = observe_mode
        self.metadata = dict(metadata) if metadata else None
        self.client = client
        self.heartbeat = heartbeat
        self.static_subject: dict[str, str | None] = {}
        self.subject_fns: dict[str, Callable[..., str | None]] = {}
        for field, value in subject.items():
            if callable(value):
                self.subject_fns[field] = value
            else:
                self.static_subject[field] = value
        self.dimensions: Mapping[str, str] | None = None
        self.dimensions_fn: Callable[..., Mapping[str, str] | None] | None = None
        if callable(dimensions):
            self.dimensions_fn = dimensions
        else:
            self.dimensions = dimensions
        self.subject_cache: tuple[CyclesConfig, Subject] | None = None
        self.request_cache: (
            tuple[CyclesConfig, str | None, ReservationCreateRequest, bytes | None] | None
        ) = None
        self._check()

    def _check(self) -> None:
        """Fail at decoration time for options the server would refuse anyway."""
        static = {name: value for name, value in self.static_subject.items() if value}
        build_reservation_request(
            subject=Subject(
                **{"tenant": "decoration-check", **static},
                dimensions=dict(self.dimensions) if self.dimensions is not None else None,
            ),
            action=self.action,
            estimate=self.estimate or Amount(unit=self.unit, amount=0),
            ttl_ms=self.ttl_ms,
            grace_period_ms=self.grace_period_ms,
            overage_policy=self.overage_policy,
            metadata=self.metadata,
            idempotency_key="decoration-check",
            observe_mode=self.observe_mode,
        )

    def subject(self, config: CyclesConfig, args: Any, kwargs: Any, tenant: str | None) -> Subject:
        if self.subject_fns or self.dimensions_fn is not None:
            fields = dict(self.static_subject)
            for field, fn in self.subject_fns.items():
                fields[field] = fn(*args, **kwargs)
            dims = self.dimensions_fn(*args, **kwargs) if self.dimensions_fn else self.dimensions
            return resolve_subject(config, fields, dimensions=dims, tenant=tenant)
        cached = self.subject_cache
        if cached is not None and cached[0] is config:
            return cached[1]
        subject = resolve_subject(
            config, self.static_subject, dimensions=self.dimensions, tenant=tenant
        )
        # One config means one API key, hence one tenant: the subject is fixed per config.
        self.subject_cache = (config, subject)
        return subject

    def request(
        self, config: CyclesConfig, args: Any, kwargs: Any, tenant: str | None = None
    ) -> tuple[ReservationCreateRequest, bytes | None]:
        """Return the call's reservation request and, when it is the fixed one, its body.

        The body (``None`` when the request depends on the call's arguments) is exactly
        what the client would serialize from the request, made without pydantic.
        """
        estimate = self.estimate
        static = estimate is not None and not self.subject_fns and self.dimensions_fn is None
        if static:
            # Everything but the idempotency key is fixed per (config, tenant): validate and
            # serialize the request once; per call, copy it (no re-validation) with a fresh
            # key and splice that key into the serialized body.
            cached = self.request_cache
            if cached is not None and cached[0] is config and cached[1] == tenant:
                key = new_idempotency_key()
                return _fastpath.keyed_request(cached[2], cached[3], key)
        if estimate is None:
            assert self.estimate_fn is not None
            estimate = to_amount(self.estimate_fn(*args, **kwargs), self.unit, "estimate")
        request = build_reservation_request(
            subject=self.subject(config, args, kwargs, tenant),
            action=self.action,
            estimate=estimate,
            ttl_ms=self.ttl_ms,
            grace_period_ms=self.grace_period_ms,
            overage_policy=self.overage_policy,
            dry_run=self.dry_run,
            metadata=self.metadata,
            observe_mode=self.observe_mode,
        )
        if static:
            self.request_cache = (config, tenant, request, _fastpath.body_after_key(request))
        return request, None

    def settlement(
        self, result: Any, context: CyclesContext, elapsed_s: float
    ) -> tuple[Amount | Usage | UnknownActualError | None, CyclesMetrics]:
        """Return ``(actual, metrics)`` of the commit after a successful call.

        ``actual`` is an :class:`UnknownActualError` (carrying ``result``) when the
        ``actual`` callable gave no usable amount: the guard's ``settle`` applies
        ``on_unknown_actual`` to it.
        """
        actual: Amount | Usage | UnknownActualError | None
        try:
            actual = measure_actual(self.actual, result, context)
        except UnknownActualError as unknown:
            unknown.result = result
            actual = unknown
        latency_ms = int(elapsed_s * 1000)
        # The guarded code writes these; a wrong type must not cost the commit.
        written: object = context.metrics
        metrics = written if isinstance(written, CyclesMetrics) else None
        if written is not None and metrics is None:
            logger.warning(
                "ignoring ctx.metrics of reservation %s: expected CyclesMetrics, got %s",
                context.reservation_id,
                type(written).__name__,
            )
        extra: object = context.commit_metadata
        if extra is not None and not isinstance(extra, Mapping):
            logger.warning(
                "ignoring ctx.commit_metadata of reservation %s: expected a dict, got %s",
                context.reservation_id,
                type(extra).__name__,
            )
            context.commit_metadata = None
        if metrics is None:
            metrics = CyclesMetrics(latency_ms=latency_ms)
        elif metrics.latency_ms is None:
            metrics = metrics.model_copy(update={"latency_ms": latency_ms})
        return actual, metrics


# --------------------------------------------------------------------------------------------
# The decorator


class _DryRunDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, Any]]
    ) -> Callable[P, Coroutine[Any, Any, DryRunResult]]: ...

    @overload
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, DryRunResult]: ...


@overload
def cycles(
    estimate: EstimateArg,
    *,
    actual: ActualArg = None,
    action_kind: str = DEFAULT_ACTION_KIND,
    action_name: str | None = None,
    action_tags: Sequence[str] | None = None,
    action_policy_keys: ActionPolicyKeys | Mapping[str, Any] | None = None,
    unit: Unit | str = Unit.USD_MICROCENTS,
    ttl_ms: int | None = DEFAULT_TTL_MS,
    grace_period_ms: int | None = None,
    overage_policy: CommitOveragePolicy | str | None = None,
    dry_run: Literal[False] = False,
    observe_mode: ObserveMode | str | None = None,
    tenant: SubjectArg = None,
    workspace: SubjectArg = None,
    app: SubjectArg = None,
    workflow: SubjectArg = None,
    agent: SubjectArg = None,
    toolset: SubjectArg = None,
    dimensions: DimensionsArg = None,
    metadata: Mapping[str, Any] | None = None,
    client: CyclesClient | AsyncCyclesClient | None = None,
    heartbeat: bool = True,
    on_unknown_actual: OnUnknownActual = "raise",
    pricer: Pricer | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


@overload
def cycles(
    estimate: EstimateArg,
    *,
    actual: ActualArg = None,
    action_kind: str = DEFAULT_ACTION_KIND,
    action_name: str | None = None,
    action_tags: Sequence[str] | None = None,
    action_policy_keys: ActionPolicyKeys | Mapping[str, Any] | None = None,
    unit: Unit | str = Unit.USD_MICROCENTS,
    ttl_ms: int | None = DEFAULT_TTL_MS,
    grace_period_ms: int | None = None,
    overage_policy: CommitOveragePolicy | str | None = None,
    dry_run: Literal[True],
    observe_mode: ObserveMode | str | None = None,
    tenant: SubjectArg = None,
    workspace: SubjectArg = None,
    app: SubjectArg = None,
    workflow: SubjectArg = None,
    agent: SubjectArg = None,
    toolset: SubjectArg = None,
    dimensions: DimensionsArg = None,
    metadata: Mapping[str, Any] | None = None,
    client: CyclesClient | AsyncCyclesClient | None = None,
    heartbeat: bool = True,
    on_unknown_actual: OnUnknownActual = "raise",
    pricer: Pricer | None = None,
) -> _DryRunDecorator: ...


def cycles(
    estimate: EstimateArg,
    *,
    actual: ActualArg = None,
    action_kind: str = DEFAULT_ACTION_KIND,
    action_name: str | None = None,
    action_tags: Sequence[str] | None = None,
    action_policy_keys: ActionPolicyKeys | Mapping[str, Any] | None = None,
    unit: Unit | str = Unit.USD_MICROCENTS,
    ttl_ms: int | None = DEFAULT_TTL_MS,
    grace_period_ms: int | None = None,
    overage_policy: CommitOveragePolicy | str | None = None,
    dry_run: bool = False,
    observe_mode: ObserveMode | str | None = None,
    tenant: SubjectArg = None,
    workspace: SubjectArg = None,
    app: SubjectArg = None,
    workflow: SubjectArg = None,
    agent: SubjectArg = None,
    toolset: SubjectArg = None,
    dimensions: DimensionsArg = None,
    metadata: Mapping[str, Any] | None = None,
    client: CyclesClient | AsyncCyclesClient | None = None,
    heartbeat: bool = True,
    on_unknown_actual: OnUnknownActual = "raise",
    pricer: Pricer | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Guard every call of the decorated function with a reservation.

    ``docs/decorator.md`` describes every option and what happens on each call.

    Args:
        estimate: Amount to reserve per call: an ``int`` (in ``unit``), an :class:`Amount`,
            or a callable receiving the function's arguments and returning one.
        actual: What a call used: a callable of the function's result (an ``int``, an
            :class:`Amount`, or a :class:`~runcycles.Usage` priced by ``pricer``), an ``int``
            or an :class:`Amount`; ``None`` commits the estimate (marked in the metadata).
        action_kind: ``action.kind``, e.g. ``"llm.completion"``.
        action_name: ``action.name`` (default: the function's qualified name).
        action_tags: Up to 10 tags for the action.
        action_policy_keys: The action's policy routing dimensions
            (:class:`~runcycles.ActionPolicyKeys` or a dict of its fields).
        unit: Unit of ``int`` amounts (default ``USD_MICROCENTS``).
        ttl_ms: Reservation lease; the heartbeat extends it while the function runs.
        grace_period_ms: How long after expiry a commit is still accepted.
        overage_policy: What a commit above the estimate does (default: the server's).
        dry_run: Shadow mode: hold nothing, do **not** run the function, and return a
            :class:`~runcycles.DryRunResult` instead.
        observe_mode: ``"OBSERVE"``: shadow mode for a live function. The server evaluates
            each call and holds nothing; the function runs whatever it decided (a ``DENY``
            is only logged and is on ``get_cycles_context()``), and nothing is committed.
            ``"ENFORCE"`` overrides a tenant in observe mode. Default: the tenant's mode.
        tenant: Subject ``tenant`` (default: the client config's): a string, or a callable
            of the function's arguments; likewise the five fields below.
        workspace: Subject ``workspace``.
        app: Subject ``app``.
        workflow: Subject ``workflow``.
        agent: Subject ``agent``.
        toolset: Subject ``toolset``.
        dimensions: Free-form subject tags, or a callable of the arguments returning them.
        metadata: Metadata stored with each reservation.
        client: The client (default: :func:`set_default_client` /
            :func:`set_default_config`); its flavour must match the function's.
        heartbeat: Whether to extend the reservation while the function runs.
        on_unknown_actual: When ``actual(result)`` gives no usable amount (or a
            :class:`~runcycles.Usage` without a price) nothing is committed; ``"raise"``
            (default: the reservation expires at its lease and
            :class:`~runcycles.UnknownActualError` carries the result), ``"release"`` or
            ``"commit_estimate"`` (flagged ``actual_error``) decides the rest.
        pricer: Prices a :class:`~runcycles.Usage` returned by ``actual`` (default:
            :func:`~runcycles.default_pricer`).

    Returns:
        The decorator.

    Raises:
        TypeError: At decoration: a generator function, or a client of the wrong flavour.
        ValueError: At decoration: an option the protocol does not allow, or an unknown
            ``on_unknown_actual``.
        UnknownActualError: At a call, with ``on_unknown_actual="raise"``: the function ran
            but its actual is unknown (nothing was committed).
    """
    given = (tenant, workspace, app, workflow, agent, toolset)
    fields = zip(STANDARD_SUBJECT_FIELDS, given, strict=True)
    subject = {field: value for field, value in fields if value is not None}
    options: dict[str, Any] = {
        "estimate": estimate,
        "actual": actual,
        "action_kind": action_kind,
        "action_name": action_name,
        "action_tags": action_tags,
        "action_policy_keys": action_policy_keys,
        "unit": unit,
        "ttl_ms": ttl_ms,
        "grace_period_ms": grace_period_ms,
        "overage_policy": overage_policy,
        "dry_run": dry_run,
        "observe_mode": observe_mode,
        "subject": subject,
        "dimensions": dimensions,
        "metadata": metadata,
        "client": client,
        "heartbeat": heartbeat,
        "on_unknown_actual": on_unknown_actual,
        "pricer": pricer,
    }

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@cycles cannot guard the generator function {fn.__qualname__}: the "
                "reservation would end before the values are consumed. Use "
                "runcycles.stream_reservation(...) inside the generator instead."
            )
        policy = _Policy(fn, **options)
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        # an object whose __call__ is async counts as an async function
        call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call):
            if isinstance(client, CyclesClient):
                raise TypeError(
                    f"{name} is async but client= is a CyclesClient; pass an "
                    "AsyncCyclesClient(config) for async functions"
                )
            return _async_wrapper(fn, policy)
        if isinstance(client, AsyncCyclesClient):
            raise TypeError(
                f"{name} is not async but client= is an AsyncCyclesClient; pass a "
                "CyclesClient(config) for sync functions"
            )
        return _sync_wrapper(fn, policy)

    return decorate


def _sync_wrapper(fn: Callable[P, R], policy: _Policy) -> Callable[P, Any]:
    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
        client = policy.client
        if client is None:
            client = _defaults.sync()
        assert isinstance(client, CyclesClient)
        try:
            request, body = policy.request(client.config, args, kwargs)
        except SubjectRequiredError:  # no subject configured: use the API key's tenant
            request, body = policy.request(client.config, args, kwargs, client.discover_tenant())
        if policy.dry_run:
            return dry_run_result(client.create_reservation(request))
        guard = ReservationGuard(client, request, heartbeat=policy.heartbeat)
        if body is not None and type(client).create_reservation is _SYNC_CREATE:
            guard._body = body  # unless a subclass overrides create_reservation
        with guard:
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            actual, metrics = policy.settlement(
                result, guard.context, time.perf_counter() - started
            )
            try:
                guard.settle(
                    actual,
                    on_unknown_actual=policy.on_unknown_actual,
                    metrics=metrics,
                    pricer=policy.pricer,
                    fix=_FIX,
                )
            except UnknownActualError:
                raise
            except CyclesError as exc:
                _log_settle_failure(guard.context, exc, actual)
        return result

    return guarded


def _async_wrapper(
    fn: Callable[P, Awaitable[R]], policy: _Policy
) -> Callable[P, Coroutine[Any, Any, Any]]:
    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
        client = policy.client
        if client is None:
            client = _defaults.async_()
        assert isinstance(client, AsyncCyclesClient)
        try:
            request, body = policy.request(client.config, args, kwargs)
        except SubjectRequiredError:  # no subject configured: use the API key's tenant
            tenant = await client.discover_tenant()
            request, body = policy.request(client.config, args, kwargs, tenant)
        if policy.dry_run:
            return dry_run_result(await client.create_reservation(request))
        guard = AsyncReservationGuard(client, request, heartbeat=policy.heartbeat)
        if body is not None and type(client).create_reservation is _ASYNC_CREATE:
            guard._body = body  # unless a subclass overrides create_reservation
        async with guard:
            started = time.perf_counter()
            result = await fn(*args, **kwargs)
            actual, metrics = policy.settlement(
                result, guard.context, time.perf_counter() - started
            )
            try:
                await guard.settle(
                    actual,
                    on_unknown_actual=policy.on_unknown_actual,
                    metrics=metrics,
                    pricer=policy.pricer,
                    fix=_FIX,
                )
            except UnknownActualError:
                raise
            except CyclesError as exc:
                _log_settle_failure(guard.context, exc, actual)
        return result

    return guarded


_SYNC_CREATE: Final = CyclesClient.create_reservation
_ASYNC_CREATE: Final = AsyncCyclesClient.create_reservation


_FIX: Final = "the actual= callable (the function's result is on this error's .result)"


def _log_settle_failure(context: CyclesContext, exc: CyclesError, actual: object) -> None:
    if isinstance(actual, UnknownActualError):  # it was released
        log_release_failure(context.reservation_id, exc)
        return
    logger.error(
        "commit of reservation %s failed after the guarded function ran: %s",
        context.reservation_id,
        exc,
    )
