"""The one adapter base class every framework package builds on.

A framework package maps its events onto two small hooks and forwards its callbacks::

    class TinyAdapter(CyclesAdapter[TinyEvent, TinyResult]):
        framework = "tiny"

        def plan(self, event: TinyEvent) -> CallPlan | None:      # what the call is
            return CallPlan.llm(event.model, max_tokens=event.max_tokens)

        def usage(self, result: TinyResult) -> Usage | None:      # what it used
            return Usage(input_tokens=result.prompt, output_tokens=result.completion)

    adapter = TinyAdapter(client, tenant="acme", fail_open=True)
    call = adapter.begin(run_id, call_id, event)    # reserve (a denial raises here)
    adapter.end(run_id, call_id, result)            # price the usage and commit
    adapter.fail(run_id, call_id, error)            # or release
    adapter.end_run(run_id)                         # release whatever the run left open

A framework that wraps each call (middleware) does all of it in one step, ``adapter.wrap(run_id,
call_id, event, proceed)``; a tool call goes through ``check_tool()`` so that a tool the
budget's caps forbid never runs.

Everything else lives here, once: the table of open reservations keyed by the framework's
own ids (safe under parallel calls), estimates and prices from a
:class:`~runcycles.pricing.Pricer`, deterministic idempotency keys (a retried callback never
reserves or charges twice), ``fail_open`` (an unreachable server only, never a denial),
``dry_run`` (shadow mode), caps, and the reservation guard underneath (heartbeat, retries,
durable settlement journal). :class:`AsyncCyclesAdapter` is the async twin: same hooks, same
method names, awaited.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar

from runcycles.adapter_glue import (
    DENIALS,
    MaxTokensLowering,
    RunIds,
    ToolNotAllowedError,
    is_denial,
    recast,
)
from runcycles.adapter_plan import (
    DEFAULT_MAX_TOKENS,
    AdapterCall,
    AdapterOptions,
    CallPlan,
    DryRunDecision,
    PendingReservationsWarning,
    ToolEstimateConfig,
    ToolEstimateMap,
    call_idempotency_key,
    client_config,
    is_outage,
    tool_allowed,
)
from runcycles.client import AsyncCyclesClient, CyclesClient
from runcycles.config import CyclesConfig
from runcycles.exceptions import CyclesConfigError, CyclesError, ReservationFinalizedError
from runcycles.lifecycle import (
    DEFAULT_TTL_MS,
    AsyncReservationGuard,
    DryRunResult,
    OnUnknownActual,
    ReservationGuard,
    ReserveOptions,
    UnknownActualError,
    check_on_unknown_actual,
    dry_run,
    reserve,
    to_amount,
)
from runcycles.models import (
    STANDARD_SUBJECT_FIELDS,
    Action,
    Amount,
    CyclesMetrics,
    Decision,
    EventCreateRequest,
    ObserveMode,
    Subject,
    Unit,
)
from runcycles.pricing import Pricer, UnknownModelError, default_pricer
from runcycles.usage import Usage

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = [
    "AdapterCall",
    "AdapterOptions",
    "AsyncCyclesAdapter",
    "CallPlan",
    "CyclesAdapter",
    "DENIALS",
    "DryRunDecision",
    "MaxTokensLowering",
    "PendingReservationsWarning",
    "RunIds",
    "ToolEstimateConfig",
    "ToolEstimateMap",
    "ToolNotAllowedError",
    "call_idempotency_key",
    "client_config",
    "is_denial",
    "is_outage",
    "recast",
    "tool_allowed",
]

logger = logging.getLogger("runcycles.adapters")

StartT = TypeVar("StartT")
EndT = TypeVar("EndT")
R = TypeVar("R")

_OPTION_NAMES: Final = frozenset(AdapterOptions.__annotations__)
_RECENT: Final = 4_096  # ended keys remembered, so a second end() is a silent no-op


def _on_collect(table: dict[tuple[str, str], AdapterCall], name: str) -> None:
    """Finalizer of a garbage-collected adapter: abandon and report what it left open."""
    leaked = [call for call in table.values() if call.guard is not None]
    if not leaked:
        return
    for call in leaked:
        call.guard.abandon()  # type: ignore[union-attr]
    warnings.warn(
        f"{name} was garbage-collected with {len(leaked)} open reservation(s) "
        f"({', '.join(sorted(str(c.reservation_id) for c in leaked)[:5])}); they were "
        "abandoned and expire at the end of their lease. Call end_run(run_id) at the end of "
        "each run, or close() the adapter.",
        PendingReservationsWarning,
        stacklevel=2,
    )


class _AdapterBase(Generic[StartT, EndT]):
    """Hooks, options and the pure bookkeeping shared by both twins (no I/O here)."""

    framework: ClassVar[str] = "custom"
    """The framework's name: part of every idempotency key, reservation metadata, logs."""

    tool_error: ClassVar[type[ToolNotAllowedError]] = ToolNotAllowedError
    """What :meth:`~CyclesAdapter.check_tool` raises: a framework package's subclass that is
    also the framework's own exception type, so the framework stops the run as intended."""

    def __init__(self, config: CyclesConfig, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - _OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"unknown adapter option(s) {', '.join(unknown)}; valid options are: "
                f"{', '.join(sorted(_OPTION_NAMES))}"
            )
        self._subject = {
            name: value
            for name in STANDARD_SUBJECT_FIELDS
            if (value := options.get(name) or getattr(config, name)) is not None
        }
        self._dimensions = dict(options.get("dimensions") or {}) or None
        if self._subject:  # check lengths and the like now, not at the first call
            Subject(**self._subject, dimensions=self._dimensions)
        self._unit = Unit(options.get("unit", Unit.USD_MICROCENTS))
        self._pricer: Pricer = options.get("pricer") or default_pricer()
        tools = options.get("tool_estimates")
        self._tool_map = tools if isinstance(tools, ToolEstimateMap) else None
        self._tool_estimates = {} if self._tool_map else dict(tools or {})
        self._default_tool_estimate = options.get("default_tool_estimate")
        self._llm_estimate = options.get("llm_estimate")
        self.fail_open: bool = options.get("fail_open", False)
        self.dry_run: bool = options.get("dry_run", False)
        self.observe_mode = _observe_mode(options.get("observe_mode"))
        self._ttl_ms: int = options.get("ttl_ms", DEFAULT_TTL_MS)
        self._overage_policy = options.get("overage_policy")
        self._on_unknown: OnUnknownActual = options.get("on_unknown_actual", "commit_estimate")
        check_on_unknown_actual(self._on_unknown)
        self._namespace = options.get("idempotency_namespace")
        self._heartbeat: bool = options.get("heartbeat", True)
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], AdapterCall] = {}
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._warned_unknown = False
        self._outage: str | None = None  # what the current outage is, once logged
        self._unguarded = 0
        self._decisions: deque[DryRunDecision] = deque(maxlen=10_000)
        self._events: dict[str, int] = {}  # events recorded per run (their idempotency keys)
        weakref.finalize(self, _on_collect, self._open, type(self).__name__)

    # -- the hooks a framework package fills ---------------------------------------------

    def plan(self, event: StartT) -> CallPlan | None:
        """Say what a call is and what to hold for it; ``None``: do not meter it.

        Pure (no I/O). The default accepts a ready :class:`CallPlan` as the event.
        """
        if isinstance(event, CallPlan):
            return event
        raise NotImplementedError(
            f"{type(self).__name__}.plan() must turn {type(event).__name__} into a CallPlan"
        )

    def usage(self, result: EndT) -> Usage | int | Amount | None:
        """Say what a finished call used; ``None``: commit the estimate.

        A :class:`~runcycles.Usage` is priced with the pricer; an ``int`` or ``Amount`` is
        the amount itself, in the reservation's unit. Pure (no I/O). The default accepts
        a ``Usage``, an ``int`` or an ``Amount`` as the result, anything else as ``None``.
        """
        return result if isinstance(result, (Usage, int, Amount)) else None

    def tool_plan(self, name: str, **fields: Any) -> CallPlan | None:
        """Plan a call of tool ``name`` from ``tool_estimates``; ``None`` if it holds 0.

        A :class:`ToolEstimateMap` also gives the call's unit, action kind and policy keys
        (the kind defaults to the registry's for the tool's name). ``fields`` go to
        :meth:`CallPlan.tool` (``agent=``, ``toolset=``...) and win over the map.
        """
        if self._tool_map is not None:
            entry = self._tool_map.lookup(name)
            mapped = {
                "kind": entry.action_kind,
                "estimate": entry.estimate,
                "unit": entry.unit,
                "policy_keys": entry.policy_keys,
            }
            fields = {**mapped, **fields}
        elif "estimate" not in fields:
            fields["estimate"] = self._tool_estimates.get(name, self._default_tool_estimate)
        plan = CallPlan.tool(name, **fields)
        held = plan.estimate.amount if isinstance(plan.estimate, Amount) else plan.estimate
        return None if held == 0 else plan

    def _event(
        self, run_id: Hashable, name: str, kind: str, agent: str | None, metadata: Mapping[str, str]
    ) -> EventCreateRequest:
        run = str(run_id)
        with self._lock:
            number = self._events[run] = self._events.get(run, 0) + 1
        key = call_idempotency_key(self.framework, run, f"event-{number}", "event", self._namespace)
        return EventCreateRequest(
            idempotency_key=key,
            subject=Subject(
                **{**self._subject, **({"agent": agent} if agent else {})},
                dimensions=self._dimensions,
            ),
            action=Action(kind=kind, name=name[:256]),
            actual=Amount(unit=self._unit, amount=0),
            metadata={"framework": self.framework, "run_id": run, **metadata},
        )

    # -- what the twins share ------------------------------------------------------------

    @property
    def subject(self) -> dict[str, str]:
        """The subject fields resolved at construction (a copy; a plan may override some)."""
        return dict(self._subject)

    @property
    def pricer(self) -> Pricer:
        """The pricer of this adapter's estimates and usage."""
        return self._pricer

    @property
    def decisions(self) -> list[DryRunDecision]:
        """Decisions seen in dry-run or observe mode, oldest first (the last 10,000)."""
        return list(self._decisions)

    @property
    def _shadow(self) -> bool:
        """Whether calls are only evaluated, never blocked (a dry run or observe mode)."""
        return self.dry_run or self.observe_mode is ObserveMode.OBSERVE

    @property
    def unguarded_calls(self) -> int:
        """Calls ``fail_open`` let run unguarded because the server was unreachable."""
        return self._unguarded

    @property
    def pending(self) -> list[AdapterCall]:
        """Calls begun and not yet ended."""
        with self._lock:
            return list(self._open.values())

    def _refusal(
        self, call: AdapterCall, tool: str, under: AdapterCall | None
    ) -> ToolNotAllowedError | None:
        """The error to stop ``tool`` with, if the caps of ``call`` (or of ``under``) forbid it."""
        if call.allows_tool(tool) and (under is None or under.allows_tool(tool)):
            return None
        return self.tool_error(tool)

    def _open_call(
        self, run_id: Hashable, call_id: Hashable, event: StartT
    ) -> tuple[AdapterCall, ReserveOptions | None]:
        """Register a call; return it and the reservation to make (``None``: nothing to do)."""
        key = (str(run_id), str(call_id))
        plan = self.plan(event)
        with self._lock:
            existing = self._open.get(key)
            if existing is not None:
                logger.info("%s: call %s/%s begun twice; ignored", self.framework, *key)
                return existing, None
            call = self._open[key] = AdapterCall(*key, plan=plan)
            self._recent.pop(key, None)
        if plan is None:
            return call, None
        try:
            call.estimate = self._estimate(plan)
            operation = "dry_run" if self.dry_run else "reserve"
            if operation == "reserve" and self.observe_mode is ObserveMode.OBSERVE:
                operation = "observe"  # its answer is stored apart from a live one's
            call.idempotency_key = call_idempotency_key(
                self.framework, key[0], key[1], operation, self._namespace
            )
        except BaseException:
            self._forget(call)
            raise
        call.mode = "pending"
        return call, self._reserve_options(call, plan)

    def _estimate(self, plan: CallPlan) -> Amount:
        unit = Unit(plan.unit or self._unit)
        if plan.estimate is not None:
            return to_amount(plan.estimate, unit, "estimate")
        fallback = self._llm_estimate
        if plan.is_tool:
            fallback = self._tool_estimates.get(plan.name, self._default_tool_estimate)
        elif plan.model is not None and unit is Unit.USD_MICROCENTS:
            try:
                amount = self._pricer.estimate(
                    plan.model,
                    max_tokens=DEFAULT_MAX_TOKENS if plan.max_tokens is None else plan.max_tokens,
                    prompt_tokens=plan.prompt_tokens,
                    provider=plan.provider,
                )
                return Amount(unit=Unit.USD_MICROCENTS, amount=amount)
            except UnknownModelError:
                strict = fallback is None or self._pricer.unknown_model == "error"
                if strict and plan.fallback_estimate is None:
                    raise
        if plan.fallback_estimate is not None:
            fallback = plan.fallback_estimate
        if fallback is None:
            what = "default_tool_estimate" if plan.is_tool else "llm_estimate"
            raise CyclesConfigError(
                f"no estimate for {plan.kind} {plan.name!r}: give the plan an estimate or a "
                f"model, or the adapter {what}=..."
            )
        return to_amount(fallback, unit, "estimate")

    def _reserve_options(self, call: AdapterCall, plan: CallPlan) -> ReserveOptions:
        subject = {**self._subject}
        subject.update((k, v) for k, v in (("agent", plan.agent), ("toolset", plan.toolset)) if v)
        metadata = {"framework": self.framework, "run_id": call.run_id, "call_id": call.call_id}
        metadata.update(plan.metadata or {})
        assert call.estimate is not None
        return ReserveOptions(
            estimate=call.estimate,
            action_kind=plan.kind,
            action_name=plan.name,
            action_tags=plan.tags,
            action_policy_keys=plan.policy_keys,
            tenant=subject.get("tenant"),
            workspace=subject.get("workspace"),
            app=subject.get("app"),
            workflow=subject.get("workflow"),
            agent=subject.get("agent"),
            toolset=subject.get("toolset"),
            dimensions=self._dimensions,
            ttl_ms=self._ttl_ms,
            overage_policy=self._overage_policy,
            metadata=metadata,
            idempotency_key=call.idempotency_key,
            observe_mode=self.observe_mode,
            heartbeat=self._heartbeat,
        )

    def _granted(self, call: AdapterCall, guard: ReservationGuard | AsyncReservationGuard) -> None:
        if guard.observed is not None:  # observe mode (the option's or the tenant's)
            self._evaluated(call, guard.observed, log=False)  # the guard logged it
            return
        self._reachable()
        call.guard, call.mode = guard, "live"
        call.reservation_id, call.decision, call.caps = (
            guard.reservation_id,
            guard.decision,
            guard.caps,
        )

    def _evaluated(self, call: AdapterCall, result: DryRunResult, *, log: bool = True) -> None:
        self._reachable()
        assert call.plan is not None
        assert call.estimate is not None
        call.mode, call.decision, call.caps = "dry_run", result.decision, result.caps
        self._decisions.append(
            DryRunDecision(
                call.run_id, call.call_id, call.plan.kind, call.plan.name, call.estimate, result
            )
        )
        if not log:
            return
        level = logging.WARNING if result.decision is Decision.DENY else logging.INFO
        logger.log(
            level,
            "%s %s: %s %r (estimate %s %s) would be %s%s",
            self.framework,
            "dry run" if self.dry_run else "observe mode",
            call.plan.kind,
            call.plan.name,
            call.estimate.amount,
            call.estimate.unit.value,
            result.decision.value,
            f" ({result.reason_code})" if result.reason_code else "",
        )

    def _refused(self, call: AdapterCall, error: CyclesError) -> None:
        """Decide what a failed reservation means; raise ``error`` unless the call may run."""
        if not is_outage(error) or not (self.fail_open or self._shadow):
            self._forget(call)
            raise error
        call.mode = "unguarded"
        with self._lock:
            self._unguarded += 1
            first, self._outage = self._outage is None, str(error)
        if first:
            logger.warning(
                "%s: the Cycles server is unreachable (%s); %s lets calls run unguarded "
                "until it answers again (logged once per outage)",
                self.framework,
                error,
                "shadow mode" if self._shadow else "fail_open=True",
            )

    def _reachable(self) -> None:
        if self._outage is not None:
            with self._lock:
                outage, self._outage = self._outage, None
            if outage is not None:
                logger.warning(
                    "%s: the Cycles server answers again; %d call(s) ran unguarded so far",
                    self.framework,
                    self._unguarded,
                )

    def _forget(self, call: AdapterCall) -> None:
        key = (call.run_id, call.call_id)
        with self._lock:
            if self._open.get(key) is call:
                del self._open[key]
            self._recent[key] = None
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)

    def _close_call(self, run_id: Hashable, call_id: Hashable, what: str) -> AdapterCall | None:
        """Take a call out of the table; ``None`` (logged once) when it is not open."""
        key = (str(run_id), str(call_id))
        with self._lock:
            call = self._open.get(key)
            if call is None:
                if key in self._recent:
                    return None  # a second end()/fail(): a no-op
                warn, self._warned_unknown = not self._warned_unknown, True
            elif call.mode == "pending":
                return None  # still reserving on another thread; its begin() owns it
        if call is None:
            logger.log(
                logging.WARNING if warn else logging.DEBUG,
                "%s: %s() for call %s/%s that was never begun; ignored%s",
                self.framework,
                what,
                *key,
                " (further ones are logged at DEBUG)" if warn else "",
            )
            return None
        self._forget(call)
        return call

    def _take(self, run_id: str | None) -> list[AdapterCall]:
        with self._lock:
            keys = [k for k in self._open if run_id is None or k[0] == run_id]
            calls = [self._open[k] for k in keys if self._open[k].mode != "pending"]
            if run_id is None:
                self._events.clear()
            else:
                self._events.pop(run_id, None)
        for call in calls:
            self._forget(call)
        return [call for call in calls if call.guard is not None]

    def _actual(
        self, call: AdapterCall, result: EndT
    ) -> tuple[int | Amount | UnknownActualError | None, CyclesMetrics]:
        """What to commit for ``call``: an amount, ``None`` (the estimate) or unknown."""
        metrics = CyclesMetrics(latency_ms=int((time.monotonic() - call.started_s) * 1000))
        assert call.estimate is not None
        assert call.plan is not None
        unit = call.estimate.unit
        try:
            used = self.usage(result)
            if not isinstance(used, Usage):
                return (None if used is None else to_amount(used, unit, "actual")), metrics
            metrics.tokens_input, metrics.tokens_output = used.input_tokens, used.output_tokens
            if used.model is None and call.plan.model is not None:
                used = replace(used, model=call.plan.model, provider=call.plan.provider)
            metrics.model_version = used.model[:128] if used.model else None
            if unit is Unit.TOKENS and used.amount is None:
                return used.total_tokens, metrics
            if unit is not Unit.USD_MICROCENTS:
                raise ValueError(f"a Usage is priced in USD_MICROCENTS, the call holds {unit}")
            return self._pricer.cost(used), metrics
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:512]
            unknown = UnknownActualError(
                f"{self.framework}: the usage of call {call.run_id}/{call.call_id} "
                f"(reservation {call.reservation_id}) cannot be priced ({reason})",
                reservation_id=call.reservation_id,
                reason=reason,
            )
            unknown.__cause__ = exc
            return unknown, metrics

    def _replayed(self, call: AdapterCall, error: ReservationFinalizedError) -> None:
        call.outcome = "already_settled"
        logger.info(
            "%s: reservation %s of call %s/%s was already settled (a retried callback); "
            "nothing more was charged (%s)",
            self.framework,
            call.reservation_id,
            call.run_id,
            call.call_id,
            error,
        )


_FIX: Final = "the adapter's usage() hook, or add the model to Pricer(overrides=...)"


def _observe_mode(value: object) -> ObserveMode | None:
    """The ``observe_mode`` option, checked where the adapter is made."""
    if value is None:
        return None
    try:
        return ObserveMode(value)
    except ValueError:
        modes = ", ".join(repr(mode.value) for mode in ObserveMode)
        raise CyclesConfigError(
            f"observe_mode={value!r} is not an observe mode; use one of {modes} (or None: "
            "the tenant's mode)"
        ) from None


class CyclesAdapter(_AdapterBase[StartT, EndT]):
    """Turn a framework's start/end/error callbacks into reserve/commit/release (sync).

    Subclass it, set :attr:`framework`, fill :meth:`plan` (and :meth:`usage`), and forward
    the framework's callbacks to :meth:`begin`, :meth:`end` and :meth:`fail`.

    Args:
        client: The client to reserve, commit and release with; the adapter does not close
            it. Default: one built from ``config``, which :meth:`close` closes.
        config: Builds the client when none is given (default: the ``CYCLES_*`` variables,
            :meth:`CyclesConfig.from_env`).
        **options: See :class:`AdapterOptions`.

    Raises:
        TypeError: An unknown option.
        CyclesConfigError: A bad option value (the message says which).
    """

    def __init__(
        self,
        client: CyclesClient | None = None,
        /,
        *,
        config: CyclesConfig | None = None,
        **options: Unpack[AdapterOptions],
    ) -> None:
        config = client_config(client, config)
        super().__init__(config, options)  # options checked before a client is built
        self._owns_client = client is None
        self.client = client if client is not None else CyclesClient(config)

    def begin(self, run_id: Hashable, call_id: Hashable, event: StartT) -> AdapterCall:
        """A call is about to run: reserve for it (or evaluate it, in dry-run mode).

        Args:
            run_id: The framework's id of the run (``end_run`` releases by it).
            call_id: The framework's id of this call, unique within the run.
            event: What the framework passed; :meth:`plan` reads it.

        Returns:
            The call: its ``caps``, ``max_tokens`` and ``allows_tool()`` for the framework
            package to apply. Beginning an open call again returns it unchanged.

        Raises:
            CyclesProtocolError: The server denied the call (e.g.
                :class:`~runcycles.BudgetExceededError`), whatever ``fail_open`` says, or
                refused the credentials (:class:`~runcycles.UnauthorizedError`,
                :class:`~runcycles.ForbiddenError`): the call must not run.
            CyclesTransportError: The server is unreachable and ``fail_open`` is off.
            UnknownModelError: The pricer cannot estimate the plan's model.
        """
        call, options = self._open_call(run_id, call_id, event)
        if options is None:
            return call
        try:
            if self.dry_run:
                self._evaluated(call, dry_run(self.client, **options))
            else:
                self._granted(call, reserve(self.client, **options).start())
        except CyclesError as error:
            self._refused(call, error)
        except BaseException:
            self._forget(call)
            raise
        return call

    def end(
        self, run_id: Hashable, call_id: Hashable, result: EndT | None = None
    ) -> AdapterCall | None:
        """The call finished: commit what :meth:`usage` says it used (see ``call.outcome``).

        A second ``end`` (or an ``end`` after ``fail``) is a no-op; an ``end`` for a call
        never begun is logged (once) and ignored; both return ``None``.

        Raises:
            UnknownActualError: The usage cannot be priced and ``on_unknown_actual="raise"``.
        """
        call = self._close_call(run_id, call_id, "end")
        if call is None or not isinstance(call.guard, ReservationGuard):
            return call
        actual, metrics = self._actual(call, result)  # type: ignore[arg-type]
        call.outcome = "abandoned"  # unless settled below
        try:
            settled = call.guard.settle(
                actual, on_unknown_actual=self._on_unknown, metrics=metrics, fix=_FIX
            )
            call.outcome = "released" if settled is None else settled.outcome
        except ReservationFinalizedError as error:
            self._replayed(call, error)
        return call

    def fail(self, run_id: Hashable, call_id: Hashable, error: BaseException | None = None) -> None:
        """The call failed: release its reservation. Never raises."""
        call = self._close_call(run_id, call_id, "fail")
        if call is not None:
            self._release([call], None, error)

    def check_tool(
        self, call: AdapterCall, tool: str, *, under: AdapterCall | None = None
    ) -> AdapterCall:
        """Let a begun tool call run only if the budget's caps allow ``tool``; return ``call``.

        The caps are those of ``call`` and, with ``under``, of another call too (the model
        call that chose the tool: its reservation may carry the run's tool lists). A dry
        run never forbids. A forbidden tool's call is released before the error is raised.

        Raises:
            ToolNotAllowedError: Of the adapter's :attr:`tool_error` class; the tool must not run.
        """
        refusal = self._refusal(call, tool, under)
        if refusal is None:
            return call
        self.fail(call.run_id, call.call_id)
        raise refusal

    def wrap(
        self,
        run_id: Hashable,
        call_id: Hashable,
        event: StartT,
        proceed: Callable[[AdapterCall], R],
        *,
        tool: str | None = None,
        denied: Callable[[CyclesError], R] | None = None,
    ) -> R:
        """Run ``proceed(call)`` under a reservation: for frameworks that wrap each call.

        Begin the call (a tool call, with ``tool``, through :meth:`check_tool`), run
        ``proceed``, and commit: a model call its result's usage, a tool call its estimate.
        An exception from ``proceed`` releases the call and propagates.

        Args:
            run_id: See :meth:`begin`.
            call_id: See :meth:`begin`.
            event: See :meth:`begin`.
            proceed: Runs the call; it gets the begun call (caps to apply) and its result is
                returned.
            tool: The tool's name, for a tool call.
            denied: What to return instead when the budget refuses the call before it runs
                (:func:`is_denial`); without it the denial is raised.
        """
        try:
            call = self.begin(run_id, call_id, event)
            if tool is not None:
                self.check_tool(call, tool)
        except CyclesError as error:
            if denied is None or not is_denial(error):
                raise
            return denied(error)
        try:
            result = proceed(call)
        except BaseException as error:
            self.fail(run_id, call_id, error)
            raise
        self.end(run_id, call_id, None if tool is not None else result)  # type: ignore[arg-type]
        return result

    def record_event(
        self,
        run_id: Hashable,
        name: str,
        *,
        kind: str,
        agent: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Record something that happened (a handoff, a step) as a zero-amount event.

        An audit record, never a gate: it returns whether the server stored it, logs a
        warning otherwise, and never raises. Nothing is sent in dry-run or observe mode.
        """
        if self._shadow:
            return False
        try:
            request = self._event(run_id, name, kind, agent, metadata or {})
            self.client.create_event(request).raise_for_error()
        except Exception as error:
            logger.warning("%s: %s %r not recorded: %s", self.framework, kind, name, error)
            return False
        return True

    def end_run(self, run_id: Hashable, reason: str = "run_ended") -> int:
        """Release every reservation the run left open (calls with no end); return how many."""
        return self._release(self._take(str(run_id)), reason)

    def release_pending(self, reason: str = "released_by_adapter") -> int:
        """Release every open reservation of every run; return how many."""
        return self._release(self._take(None), reason)

    def close(self) -> None:
        """Release whatever is still open (logged); close the client if the adapter built it."""
        if released := self.release_pending("adapter_closed"):
            logger.warning("%s: closed with %d open reservation(s)", self.framework, released)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _release(
        calls: list[AdapterCall], reason: str | None, error: BaseException | None = None
    ) -> int:
        released = 0
        for call in calls:
            if isinstance(call.guard, ReservationGuard):
                call.guard.fail(error, reason=reason)
                call.outcome, released = "released", released + 1
        return released


class AsyncCyclesAdapter(_AdapterBase[StartT, EndT]):
    """The async twin of :class:`CyclesAdapter`: the same hooks and names, awaited.

    Args:
        client: The async client (default: one built from ``config``, closed by
            :meth:`close`).
        config: See :class:`CyclesAdapter`.
        **options: See :class:`AdapterOptions`.
    """

    def __init__(
        self,
        client: AsyncCyclesClient | None = None,
        /,
        *,
        config: CyclesConfig | None = None,
        **options: Unpack[AdapterOptions],
    ) -> None:
        config = client_config(client, config)
        super().__init__(config, options)
        self._owns_client = client is None
        self.client = client if client is not None else AsyncCyclesClient(config)

    async def begin(self, run_id: Hashable, call_id: Hashable, event: StartT) -> AdapterCall:
        """A call is about to run: reserve for it. See :meth:`CyclesAdapter.begin`."""
        call, options = self._open_call(run_id, call_id, event)
        if options is None:
            return call
        try:
            if self.dry_run:
                self._evaluated(call, await dry_run(self.client, **options))
            else:
                self._granted(call, await reserve(self.client, **options).start())
        except CyclesError as error:
            self._refused(call, error)
        except BaseException:
            self._forget(call)
            raise
        return call

    async def end(
        self, run_id: Hashable, call_id: Hashable, result: EndT | None = None
    ) -> AdapterCall | None:
        """The call finished: commit its usage. See :meth:`CyclesAdapter.end`."""
        call = self._close_call(run_id, call_id, "end")
        if call is None or not isinstance(call.guard, AsyncReservationGuard):
            return call
        actual, metrics = self._actual(call, result)  # type: ignore[arg-type]
        call.outcome = "abandoned"  # unless settled below
        try:
            settled = await call.guard.settle(
                actual, on_unknown_actual=self._on_unknown, metrics=metrics, fix=_FIX
            )
            call.outcome = "released" if settled is None else settled.outcome
        except ReservationFinalizedError as error:
            self._replayed(call, error)
        return call

    async def fail(
        self, run_id: Hashable, call_id: Hashable, error: BaseException | None = None
    ) -> None:
        """The call failed: release its reservation. Never raises."""
        call = self._close_call(run_id, call_id, "fail")
        if call is not None:
            await self._release([call], None, error)

    async def check_tool(
        self, call: AdapterCall, tool: str, *, under: AdapterCall | None = None
    ) -> AdapterCall:
        """See :meth:`CyclesAdapter.check_tool`."""
        refusal = self._refusal(call, tool, under)
        if refusal is None:
            return call
        await self.fail(call.run_id, call.call_id)
        raise refusal

    async def wrap(
        self,
        run_id: Hashable,
        call_id: Hashable,
        event: StartT,
        proceed: Callable[[AdapterCall], Awaitable[R]],
        *,
        tool: str | None = None,
        denied: Callable[[CyclesError], R] | None = None,
    ) -> R:
        """See :meth:`CyclesAdapter.wrap` (``proceed`` returns an awaitable)."""
        try:
            call = await self.begin(run_id, call_id, event)
            if tool is not None:
                await self.check_tool(call, tool)
        except CyclesError as error:
            if denied is None or not is_denial(error):
                raise
            return denied(error)
        try:
            result = await proceed(call)
        except BaseException as error:
            await self.fail(run_id, call_id, error)
            raise
        await self.end(run_id, call_id, None if tool is not None else result)  # type: ignore[arg-type]
        return result

    async def record_event(
        self,
        run_id: Hashable,
        name: str,
        *,
        kind: str,
        agent: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """See :meth:`CyclesAdapter.record_event`."""
        if self._shadow:
            return False
        try:
            request = self._event(run_id, name, kind, agent, metadata or {})
            (await self.client.create_event(request)).raise_for_error()
        except Exception as error:
            logger.warning("%s: %s %r not recorded: %s", self.framework, kind, name, error)
            return False
        return True

    async def end_run(self, run_id: Hashable, reason: str = "run_ended") -> int:
        """Release every reservation the run left open; return how many."""
        return await self._release(self._take(str(run_id)), reason)

    async def release_pending(self, reason: str = "released_by_adapter") -> int:
        """Release every open reservation of every run; return how many."""
        return await self._release(self._take(None), reason)

    async def close(self) -> None:
        """Release whatever is still open (logged); close the client if the adapter built it."""
        if released := await self.release_pending("adapter_closed"):
            logger.warning("%s: closed with %d open reservation(s)", self.framework, released)
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    async def _release(
        calls: list[AdapterCall], reason: str | None, error: BaseException | None = None
    ) -> int:
        released = 0
        for call in calls:
            if isinstance(call.guard, AsyncReservationGuard):
                await call.guard.fail(error, reason=reason)
                call.outcome, released = "released", released + 1
        return released
