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

Everything else lives here, once: the table of open reservations keyed by the framework's
own ids (safe under parallel calls), estimates and prices from a
:class:`~runcycles.pricing.Pricer`, deterministic idempotency keys (a retried callback never
reserves or charges twice), ``fail_open`` (an unreachable server only, never a denial),
``dry_run`` (shadow mode), caps, and the reservation guard underneath (heartbeat, retries,
durable settlement journal). :class:`AsyncCyclesAdapter` is the async twin: same hooks, same
method names, awaited.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Literal, TypedDict, TypeVar

from runcycles.exceptions import (
    CyclesConfigError,
    CyclesError,
    CyclesProtocolError,
    CyclesTransportError,
    MalformedResponseError,
    ReservationFinalizedError,
)
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
    Amount,
    Caps,
    CommitOveragePolicy,
    CyclesMetrics,
    Decision,
    Subject,
    Unit,
)
from runcycles.pricing import Pricer, UnknownModelError, default_pricer
from runcycles.usage import Usage

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

    from runcycles.client import AsyncCyclesClient, CyclesClient
    from runcycles.config import CyclesConfig
    from runcycles.settlement import SettlementResult

__all__ = [
    "AdapterCall",
    "AdapterOptions",
    "AsyncCyclesAdapter",
    "CallPlan",
    "CyclesAdapter",
    "DryRunDecision",
    "PendingReservationsWarning",
    "call_idempotency_key",
    "is_outage",
    "tool_allowed",
]

logger = logging.getLogger("runcycles.adapters")

StartT = TypeVar("StartT")
EndT = TypeVar("EndT")
CallMode = Literal["pending", "live", "dry_run", "unguarded", "untracked"]

DEFAULT_MAX_TOKENS: Final = 4_096
"""Output tokens assumed for a model call whose plan gives no ``max_tokens``."""

_RECENT: Final = 4_096  # ended keys remembered, so a second end() is a silent no-op
_SLUG = re.compile(r"[^A-Za-z0-9_.]+")


class PendingReservationsWarning(ResourceWarning):
    """An adapter was garbage-collected while reservations were still open.

    They were abandoned (heartbeat stopped, nothing sent): each expires at the end of its
    lease. Call ``adapter.end_run(run_id)`` at the end of every run, or ``adapter.close()``.
    """


@dataclass(frozen=True)
class CallPlan:
    """What one framework call is, and how much to hold for it (returned by ``plan()``).

    The estimate is, in order: ``estimate``; else the pricer's worst case for ``model`` and
    ``max_tokens``; else, for a tool, the adapter's ``tool_estimates[name]`` or
    ``default_tool_estimate``; else the adapter's ``llm_estimate``.

    Attributes:
        kind: Action kind (``"llm.completion"``, ``"tool.call"``).
        name: Action name: the model or the tool.
        estimate: An explicit amount (an ``int`` is in ``unit``).
        unit: Unit of an ``int`` estimate (default: the adapter's ``unit``).
        model: Model to price the estimate and, when the usage names none, the usage.
        provider: The model's provider, when the name alone is ambiguous.
        max_tokens: Output tokens the call may produce (default :data:`DEFAULT_MAX_TOKENS`).
        prompt_tokens: Prompt size, when known (default: the pricer's assumption).
        is_tool: Whether the call runs the tool ``name`` (tool estimates, caps).
        agent: The running agent (overrides the adapter's ``agent`` subject field).
        toolset: The tool's toolset (overrides the adapter's ``toolset``).
        tags: Action tags (up to 10).
        metadata: Extra reservation metadata (must be the same when a callback is retried).
    """

    kind: str
    name: str
    estimate: int | Amount | None = None
    unit: Unit | str | None = None
    model: str | None = None
    provider: str | None = None
    max_tokens: int | None = None
    prompt_tokens: int | None = None
    is_tool: bool = False
    agent: str | None = None
    toolset: str | None = None
    tags: Sequence[str] | None = None
    metadata: Mapping[str, Any] | None = None

    @classmethod
    def llm(cls, model: str, *, kind: str = "llm.completion", **fields: Any) -> CallPlan:
        """Plan a model call, estimated from ``model`` and ``max_tokens`` by the pricer."""
        return cls(kind=kind, name=model, model=model, **fields)

    @classmethod
    def tool(cls, name: str, *, kind: str = "tool.call", **fields: Any) -> CallPlan:
        """Plan a tool call, estimated from the adapter's ``tool_estimates``."""
        return cls(kind=kind, name=name, is_tool=True, **fields)


def tool_allowed(caps: Caps | None, tool: str) -> bool:
    """Return whether ``tool`` may run under ``caps`` (no caps: always).

    The spec's precedence: a non-empty allowlist admits only its tools, else a non-empty
    denylist excludes its tools; names match exactly (case-sensitive).
    """
    return caps is None or caps.is_tool_allowed(tool)


@dataclass(eq=False)
class AdapterCall:
    """One framework call as the adapter saw it (returned by ``begin()``).

    Attributes:
        run_id: The framework's run id (as a string).
        call_id: The framework's call id (as a string).
        plan: What the call is (``None``: ``plan()`` said not to meter it).
        mode: ``live`` (reserved), ``dry_run`` (evaluated only), ``unguarded`` (the server
            was unreachable and ``fail_open`` let it run) or ``untracked`` (not metered).
        estimate: The amount held (or evaluated).
        decision: ``ALLOW``, ``ALLOW_WITH_CAPS`` (or ``DENY`` in a dry run).
        caps: Caps the framework package should apply (``ALLOW_WITH_CAPS``).
        reservation_id: The live reservation's id.
        idempotency_key: The reservation's key, derived from the ids.
    """

    run_id: str
    call_id: str
    plan: CallPlan | None
    mode: CallMode = "untracked"
    estimate: Amount | None = None
    decision: Decision | None = None
    caps: Caps | None = None
    reservation_id: str | None = None
    idempotency_key: str | None = None
    guard: ReservationGuard | AsyncReservationGuard | None = field(default=None, repr=False)
    started_s: float = field(default_factory=time.monotonic, repr=False)

    @property
    def guarded(self) -> bool:
        """Whether a live reservation covers the call."""
        return self.mode == "live"

    @property
    def max_tokens(self) -> int | None:
        """The output-token limit to send: the plan's, lowered to the caps' ``max_tokens``."""
        limits = [self.plan.max_tokens if self.plan else None, self.caps and self.caps.max_tokens]
        known = [limit for limit in limits if isinstance(limit, int)]
        return min(known) if known else None

    def allows_tool(self, tool: str | None = None) -> bool:
        """Return whether ``tool`` (default: this call's tool) may run under the caps."""
        name = tool if tool is not None else (self.plan.name if self.plan else "")
        return tool_allowed(self.caps, name)


@dataclass(frozen=True)
class DryRunDecision:
    """What the server would have decided for one call in dry-run (shadow) mode."""

    run_id: str
    call_id: str
    action_kind: str
    action_name: str
    estimate: Amount
    result: DryRunResult

    @property
    def decision(self) -> Decision:
        """``ALLOW``, ``ALLOW_WITH_CAPS`` or ``DENY``."""
        return self.result.decision


class AdapterOptions(TypedDict, total=False):
    """Keyword options of :class:`CyclesAdapter` and :class:`AsyncCyclesAdapter`.

    Attributes:
        tenant: Subject tenant (default: the client config's).
        workspace: Subject workspace (default: the config's).
        app: Subject app (default: the config's).
        workflow: Subject workflow (default: the config's).
        agent: Subject agent (default: the config's; a plan's ``agent`` overrides it).
        toolset: Subject toolset (default: the config's; a plan's ``toolset`` overrides it).
        dimensions: Free-form subject tags.
        pricer: Prices estimates and usage (default :func:`~runcycles.default_pricer`).
        tool_estimates: Estimate per tool name (an ``int`` is in ``unit``).
        default_tool_estimate: Estimate of a tool missing from ``tool_estimates``.
        llm_estimate: Estimate of a model call the pricer cannot estimate (a plan without a
            model, or an unknown model under ``Pricer(unknown_model="estimate")``).
        unit: Unit of ``int`` estimates (default ``USD_MICROCENTS``).
        fail_open: Let calls run unguarded while the server is *unreachable* (transport
            error, timeout, 5xx, ambiguous answer); logged once per outage. A denial still
            stops the call, and 401/403 still raise. Default ``False``.
        dry_run: Shadow mode: ask the server to evaluate each call, log and keep the
            decision (:attr:`CyclesAdapter.decisions`); never block, never hold or charge.
        ttl_ms: Reservation lease (the heartbeat extends it while the call runs).
        overage_policy: What a commit above the estimate does (server default
            ``ALLOW_IF_AVAILABLE``).
        on_unknown_actual: A usage that cannot be priced: ``"commit_estimate"`` (default:
            charge the worst case held, flagged ``actual_source=estimate``; never loses
            spend), ``"release"`` (charge nothing) or ``"raise"`` (leave the reservation to
            expire and raise :class:`~runcycles.UnknownActualError` from ``end()``).
        idempotency_namespace: Mixed into every idempotency key, for run ids that repeat
            across deployments (``"run-1"``).
        heartbeat: Keep reservations alive while calls run (default ``True``).
    """

    tenant: str | None
    workspace: str | None
    app: str | None
    workflow: str | None
    agent: str | None
    toolset: str | None
    dimensions: Mapping[str, str] | None
    pricer: Pricer | None
    tool_estimates: Mapping[str, int | Amount] | None
    default_tool_estimate: int | Amount | None
    llm_estimate: int | Amount | None
    unit: Unit | str
    fail_open: bool
    dry_run: bool
    ttl_ms: int
    overage_policy: CommitOveragePolicy | str | None
    on_unknown_actual: OnUnknownActual
    idempotency_namespace: str | None
    heartbeat: bool


_OPTION_NAMES: Final = frozenset(AdapterOptions.__annotations__)


def call_idempotency_key(
    framework: str,
    run_id: Hashable,
    call_id: Hashable,
    operation: str = "reserve",
    namespace: str | None = None,
) -> str:
    """Return the idempotency key of one operation on one framework call.

    The same ids always give the same key, so a retried or duplicated callback is answered
    by the server's stored response instead of reserving again. The key is
    ``<framework>-<operation>-<sha256 of all parts>``: ASCII, at most 123 characters (the
    protocol allows 256).
    """
    parts = (framework, namespace or "", str(run_id), str(call_id), operation)
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{_SLUG.sub('_', framework)[:32]}-{_SLUG.sub('_', operation)[:24]}-{digest[:64]}"


def is_outage(error: BaseException) -> bool:
    """Return whether ``error`` means the server could not be reached (what ``fail_open`` covers).

    True for transport errors and timeouts, 5xx answers and ambiguous (malformed 2xx)
    answers. False for every answer the server meant: a denial (``409 BUDGET_EXCEEDED``,
    ``200 DENY``...), ``401``/``403``, bad requests.
    """
    if isinstance(error, CyclesTransportError):
        return True
    if isinstance(error, MalformedResponseError) and 200 <= error.status < 300:
        return True
    return isinstance(error, CyclesProtocolError) and error.status >= 500


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
        self._tool_estimates = dict(options.get("tool_estimates") or {})
        self._default_tool_estimate = options.get("default_tool_estimate")
        self._llm_estimate = options.get("llm_estimate")
        self.fail_open: bool = options.get("fail_open", False)
        self.dry_run: bool = options.get("dry_run", False)
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

    # -- what the twins share ------------------------------------------------------------

    @property
    def decisions(self) -> list[DryRunDecision]:
        """Decisions seen in dry-run mode, oldest first (the last 10,000)."""
        return list(self._decisions)

    @property
    def unguarded_calls(self) -> int:
        """Calls ``fail_open`` let run unguarded because the server was unreachable."""
        return self._unguarded

    @property
    def pending(self) -> list[AdapterCall]:
        """Calls begun and not yet ended."""
        with self._lock:
            return list(self._open.values())

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
        elif plan.model is not None:
            try:
                amount = self._pricer.estimate(
                    plan.model,
                    max_tokens=plan.max_tokens or DEFAULT_MAX_TOKENS,
                    prompt_tokens=plan.prompt_tokens,
                    provider=plan.provider,
                )
                return Amount(unit=Unit.USD_MICROCENTS, amount=amount)
            except UnknownModelError:
                if fallback is None or self._pricer.unknown_model == "error":
                    raise
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
            heartbeat=self._heartbeat,
        )

    def _granted(self, call: AdapterCall, guard: ReservationGuard | AsyncReservationGuard) -> None:
        self._reachable()
        call.guard, call.mode = guard, "live"
        call.reservation_id, call.decision, call.caps = (
            guard.reservation_id,
            guard.decision,
            guard.caps,
        )

    def _evaluated(self, call: AdapterCall, result: DryRunResult) -> None:
        self._reachable()
        assert call.plan is not None
        assert call.estimate is not None
        call.mode, call.decision, call.caps = "dry_run", result.decision, result.caps
        self._decisions.append(
            DryRunDecision(
                call.run_id, call.call_id, call.plan.kind, call.plan.name, call.estimate, result
            )
        )
        level = logging.WARNING if result.decision is Decision.DENY else logging.INFO
        logger.log(
            level,
            "%s dry run: %s %r (estimate %s %s) would be %s%s",
            self.framework,
            call.plan.kind,
            call.plan.name,
            call.estimate.amount,
            call.estimate.unit.value,
            result.decision.value,
            f" ({result.reason_code})" if result.reason_code else "",
        )

    def _refused(self, call: AdapterCall, error: CyclesError) -> None:
        """Decide what a failed reservation means; raise ``error`` unless the call may run."""
        if not is_outage(error) or not (self.fail_open or self.dry_run):
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
                "dry_run" if self.dry_run else "fail_open=True",
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


class CyclesAdapter(_AdapterBase[StartT, EndT]):
    """Turn a framework's start/end/error callbacks into reserve/commit/release (sync).

    Subclass it, set :attr:`framework`, fill :meth:`plan` (and :meth:`usage`), and forward
    the framework's callbacks to :meth:`begin`, :meth:`end` and :meth:`fail`. The adapter
    does not close ``client``.

    Args:
        client: The client to reserve, commit and release with.
        **options: See :class:`AdapterOptions`.

    Raises:
        TypeError: An unknown option.
        CyclesConfigError: A bad option value (the message says which).
    """

    def __init__(self, client: CyclesClient, /, **options: Unpack[AdapterOptions]) -> None:
        super().__init__(client.config, options)
        self.client = client

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
                guard = reserve(self.client, **options)
                self._granted(call, guard.start())
        except CyclesError as error:
            self._refused(call, error)
        except BaseException:
            self._forget(call)
            raise
        return call

    def end(
        self, run_id: Hashable, call_id: Hashable, result: EndT | None = None
    ) -> SettlementResult | None:
        """The call finished: commit what :meth:`usage` says it used.

        A second ``end`` (or an ``end`` after ``fail``) is a no-op; an ``end`` for a call
        never begun is logged (once) and ignored.

        Returns:
            The settlement of a live reservation, else ``None``.

        Raises:
            UnknownActualError: The usage cannot be priced and ``on_unknown_actual="raise"``.
        """
        call = self._close_call(run_id, call_id, "end")
        if call is None or not isinstance(call.guard, ReservationGuard):
            return None
        actual, metrics = self._actual(call, result)  # type: ignore[arg-type]
        try:
            return call.guard.settle(
                actual, on_unknown_actual=self._on_unknown, metrics=metrics, fix=_FIX
            )
        except ReservationFinalizedError as error:
            self._replayed(call, error)
            return None

    def fail(self, run_id: Hashable, call_id: Hashable, error: BaseException | None = None) -> None:
        """The call failed: release its reservation. Never raises."""
        call = self._close_call(run_id, call_id, "fail")
        if call is not None and isinstance(call.guard, ReservationGuard):
            call.guard.fail(error)

    def end_run(self, run_id: Hashable, reason: str = "run_ended") -> int:
        """Release every reservation the run left open (calls with no end); return how many."""
        return self._release(self._take(str(run_id)), reason)

    def release_pending(self, reason: str = "released_by_adapter") -> int:
        """Release every open reservation of every run; return how many."""
        return self._release(self._take(None), reason)

    def close(self) -> None:
        """Release whatever is still open (logged); the client stays open."""
        released = self.release_pending("adapter_closed")
        if released:
            logger.warning("%s: closed with %d open reservation(s)", self.framework, released)

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
    def _release(calls: list[AdapterCall], reason: str) -> int:
        for call in calls:
            if isinstance(call.guard, ReservationGuard):
                call.guard.fail(reason=reason)
        return len(calls)


class AsyncCyclesAdapter(_AdapterBase[StartT, EndT]):
    """The async twin of :class:`CyclesAdapter`: the same hooks and names, awaited.

    Args:
        client: The async client to reserve, commit and release with.
        **options: See :class:`AdapterOptions`.
    """

    def __init__(self, client: AsyncCyclesClient, /, **options: Unpack[AdapterOptions]) -> None:
        super().__init__(client.config, options)
        self.client = client

    async def begin(self, run_id: Hashable, call_id: Hashable, event: StartT) -> AdapterCall:
        """A call is about to run: reserve for it. See :meth:`CyclesAdapter.begin`."""
        call, options = self._open_call(run_id, call_id, event)
        if options is None:
            return call
        try:
            if self.dry_run:
                self._evaluated(call, await dry_run(self.client, **options))
            else:
                guard = reserve(self.client, **options)
                self._granted(call, await guard.start())
        except CyclesError as error:
            self._refused(call, error)
        except BaseException:
            self._forget(call)
            raise
        return call

    async def end(
        self, run_id: Hashable, call_id: Hashable, result: EndT | None = None
    ) -> SettlementResult | None:
        """The call finished: commit its usage. See :meth:`CyclesAdapter.end`."""
        call = self._close_call(run_id, call_id, "end")
        if call is None or not isinstance(call.guard, AsyncReservationGuard):
            return None
        actual, metrics = self._actual(call, result)  # type: ignore[arg-type]
        try:
            return await call.guard.settle(
                actual, on_unknown_actual=self._on_unknown, metrics=metrics, fix=_FIX
            )
        except ReservationFinalizedError as error:
            self._replayed(call, error)
            return None

    async def fail(
        self, run_id: Hashable, call_id: Hashable, error: BaseException | None = None
    ) -> None:
        """The call failed: release its reservation. Never raises."""
        call = self._close_call(run_id, call_id, "fail")
        if call is not None and isinstance(call.guard, AsyncReservationGuard):
            await call.guard.fail(error)

    async def end_run(self, run_id: Hashable, reason: str = "run_ended") -> int:
        """Release every reservation the run left open; return how many."""
        return await self._release(self._take(str(run_id)), reason)

    async def release_pending(self, reason: str = "released_by_adapter") -> int:
        """Release every open reservation of every run; return how many."""
        return await self._release(self._take(None), reason)

    async def close(self) -> None:
        """Release whatever is still open (logged); the client stays open."""
        released = await self.release_pending("adapter_closed")
        if released:
            logger.warning("%s: closed with %d open reservation(s)", self.framework, released)

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
    async def _release(calls: list[AdapterCall], reason: str) -> int:
        for call in calls:
            if isinstance(call.guard, AsyncReservationGuard):
                await call.guard.fail(reason=reason)
        return len(calls)
