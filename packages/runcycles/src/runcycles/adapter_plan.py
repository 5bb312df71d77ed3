"""What an adapter reserves for a framework call: plans, calls, options and keys (pure).

The value types and pure helpers of :mod:`runcycles.adapters` (which re-exports them):
:class:`CallPlan` (what a framework package's ``plan()`` hook returns), :class:`AdapterCall`
(what ``begin()`` returns: caps, ``max_tokens``, ``allows_tool()``), :class:`DryRunDecision`,
:class:`AdapterOptions`, :func:`call_idempotency_key`, :func:`is_outage`,
:func:`tool_allowed` and :func:`client_config`. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol, TypedDict

from runcycles.action_kinds import LLM_COMPLETION, kind_for_tool, validate_kind
from runcycles.config import CyclesConfig
from runcycles.exceptions import CyclesProtocolError, CyclesTransportError, MalformedResponseError
from runcycles.lifecycle import (
    AsyncReservationGuard,
    DryRunResult,
    OnUnknownActual,
    ReservationGuard,
)
from runcycles.models import (
    ActionPolicyKeys,
    Amount,
    Caps,
    CommitOveragePolicy,
    Decision,
    ObserveMode,
    Unit,
)
from runcycles.pricing import Pricer

__all__ = [
    "AdapterCall",
    "AdapterOptions",
    "CallMode",
    "CallPlan",
    "DEFAULT_MAX_TOKENS",
    "DryRunDecision",
    "PendingReservationsWarning",
    "call_idempotency_key",
    "client_config",
    "is_outage",
    "tool_allowed",
]

CallMode = Literal["pending", "live", "dry_run", "unguarded", "untracked"]
"""How ``begin()`` left a call (see :attr:`AdapterCall.mode`)."""

DEFAULT_MAX_TOKENS: Final = 4_096
"""Output tokens assumed for a model call whose plan gives no ``max_tokens``."""

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
    ``max_tokens``; else ``fallback_estimate``; else, for a tool, the adapter's
    ``tool_estimates[name]`` or ``default_tool_estimate``; else the adapter's ``llm_estimate``.

    Attributes:
        kind: Action kind, a kind of the registry (:mod:`runcycles.action_kinds`):
            ``"llm.completion"``, or for a tool the kind its name maps to
            (``"message.email.send"`` for ``send_email``, else ``"unknown.call"``).
        name: Action name: the model or the tool.
        estimate: An explicit amount (an ``int`` is in ``unit``).
        fallback_estimate: What to hold when the pricer cannot estimate the call (no model,
            a unit other than ``USD_MICROCENTS``, a model it does not know, whatever its
            ``unknown_model`` policy): a framework package's own default.
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
        policy_keys: The action's policy routing dimensions (host, recipient domain...).
    """

    kind: str
    name: str
    estimate: int | Amount | None = None
    fallback_estimate: int | Amount | None = None
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
    policy_keys: ActionPolicyKeys | None = None

    @classmethod
    def llm(cls, model: str, *, kind: str = LLM_COMPLETION, **fields: Any) -> CallPlan:
        """Plan a model call, estimated from ``model`` and ``max_tokens`` by the pricer."""
        return cls(kind=kind, name=model, model=model, **fields)

    @classmethod
    def tool(cls, name: str, *, kind: str | None = None, **fields: Any) -> CallPlan:
        """Plan a tool call, estimated from the adapter's ``tool_estimates``.

        The kind defaults to the registry's for the tool's name
        (:func:`~runcycles.action_kinds.kind_for_tool`), so policies can name it.
        """
        return cls(kind=kind or kind_for_tool(name), name=name, is_tool=True, **fields)


@dataclass(frozen=True)
class ToolEstimateConfig:
    """What one call of a tool holds.

    Attributes:
        estimate: Amount held per call, in ``unit`` (0: no reservation, no request).
        action_kind: The reservation's action kind (default: the registry's kind for the
            tool's name, :func:`~runcycles.action_kinds.kind_for_tool`); checked by
            :func:`~runcycles.action_kinds.validate_kind` (a malformed kind raises
            :class:`~runcycles.CyclesConfigError` saying what to send instead).
        unit: Unit of ``estimate`` (default: the map's ``default_unit``).
        policy_keys: The calls' policy routing dimensions, for policies that match on them
            (``ActionPolicyKeys(host="api.sendgrid.com")``).
    """

    estimate: int
    action_kind: str | None = None
    unit: Unit | str | None = None
    policy_keys: ActionPolicyKeys | None = None

    def __post_init__(self) -> None:
        if self.action_kind is not None:  # a malformed kind fails here, not at the first call
            validate_kind(self.action_kind)


@dataclass(frozen=True)
class ToolEstimateMap:
    """Estimate per tool name (the adapters' ``tool_estimates=``); others hold the default.

    Attributes:
        mapping: Tool name to an ``int`` (in ``default_unit``) or a :class:`ToolEstimateConfig`.
        default_estimate: What an unmapped tool holds (0: unmapped tools are not metered).
        default_unit: Unit of ``int`` values (default ``RISK_POINTS``).
    """

    mapping: Mapping[str, int | ToolEstimateConfig] = field(default_factory=dict)
    default_estimate: int = 1
    default_unit: Unit | str = Unit.RISK_POINTS

    def lookup(self, tool: str) -> ToolEstimateConfig:
        """Return the estimate, unit, action kind and policy keys of one call of ``tool``."""
        entry = self.mapping.get(tool, self.default_estimate)
        if not isinstance(entry, ToolEstimateConfig):
            entry = ToolEstimateConfig(entry)
        if isinstance(entry.estimate, bool) or not isinstance(entry.estimate, int):
            raise TypeError(f"tool estimate of {tool!r} must be an int, got {entry.estimate!r}")
        kind = entry.action_kind or kind_for_tool(tool)
        return replace(entry, unit=entry.unit or self.default_unit, action_kind=kind)


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
        mode: ``live`` (reserved), ``dry_run`` (evaluated only: a dry run, or observe
            mode), ``unguarded`` (the server was unreachable and ``fail_open`` or shadow
            mode let it run) or ``untracked`` (not metered).
        estimate: The amount held (or evaluated).
        decision: ``ALLOW``, ``ALLOW_WITH_CAPS`` (or ``DENY`` in a dry run).
        caps: Caps the framework package should apply (``ALLOW_WITH_CAPS``).
        reservation_id: The live reservation's id.
        idempotency_key: The reservation's key, derived from the ids.
        outcome: How the reservation ended: ``committed``, ``event_applied`` (it had
            expired, the spend became an event), ``pending`` (not confirmed yet; retried
            from the journal), ``released``, ``abandoned`` (left to expire) or
            ``already_settled`` (a retried callback found it settled); ``None`` while open.
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
    outcome: str | None = None
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
        """Return whether ``tool`` (default: this call's tool) may run under the caps.

        Always true in a dry run: shadow mode records the caps (``caps``), it never blocks.
        """
        name = tool if tool is not None else (self.plan.name if self.plan else "")
        return self.mode == "dry_run" or tool_allowed(self.caps, name)


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
        tool_estimates: Estimate per tool name (an ``int`` is in ``unit``), or a
            :class:`ToolEstimateMap` (per-tool unit and action kind, its own default).
        default_tool_estimate: Estimate of a tool missing from ``tool_estimates``.
        llm_estimate: Estimate of a model call the pricer cannot estimate (a plan without a
            model, or an unknown model under ``Pricer(unknown_model="estimate")``).
        unit: Unit of ``int`` estimates (default ``USD_MICROCENTS``).
        fail_open: Let calls run unguarded while the server is *unreachable* (transport
            error, timeout, 5xx, ambiguous answer); logged once per outage. A denial still
            stops the call, and 401/403 still raise. Default ``False``.
        dry_run: Shadow mode: ask the server to evaluate each call, log and keep the
            decision (:attr:`CyclesAdapter.decisions`); never block, never hold or charge.
        observe_mode: ``"OBSERVE"``: the protocol's shadow mode. Each call is reserved with
            ``observe_mode=OBSERVE``: the server evaluates it, holds nothing and records
            what it would have decided; the call runs as in a dry run (decision logged and
            kept, never blocked, nothing committed). ``"ENFORCE"`` overrides a tenant in
            observe mode. Default: the tenant's mode (a tenant in observe mode gives the
            same result without the option).
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
    tool_estimates: Mapping[str, int | Amount] | ToolEstimateMap | None
    default_tool_estimate: int | Amount | None
    llm_estimate: int | Amount | None
    unit: Unit | str
    fail_open: bool
    dry_run: bool
    observe_mode: ObserveMode | str | None
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


class Configured(Protocol):
    """Anything with a client's ``config`` (a ``CyclesClient`` or an ``AsyncCyclesClient``)."""

    @property
    def config(self) -> CyclesConfig:
        """The configuration the client was built with."""


def client_config(client: Configured | None, config: CyclesConfig | None) -> CyclesConfig:
    """Return the configuration meant by an optional client and an optional config.

    The client's own when one is given (it is what requests go through), else ``config``,
    else the ``CYCLES_*`` variables, read now: a missing setting fails where the adapter
    or guardrail is made, not at its first call.
    """
    return client.config if client is not None else config or CyclesConfig.from_env()


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
