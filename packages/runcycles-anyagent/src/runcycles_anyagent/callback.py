"""``CyclesBudgetCallback``: any-agent's callbacks mapped onto the Cycles adapter base."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from any_agent import AgentCancel
from any_agent.callbacks import Callback, Context

from runcycles import (
    BudgetExceededError,
    CallPlan,
    CyclesAdapter,
    CyclesClient,
    CyclesError,
    Pricer,
    Unit,
    Usage,
)
from runcycles.adapters import MaxTokensLowering, ToolEstimateMap, ToolNotAllowedError, recast
from runcycles.lifecycle import to_amount

__all__ = ["BudgetExceeded", "CyclesBudgetCallback", "DEFAULT_LLM_ESTIMATE", "ToolNotAllowed"]

logger = logging.getLogger("runcycles_anyagent")
DEFAULT_LLM_ESTIMATE = 2_000_000
"""What a model call holds when the pricer does not know its model (USD micro-cents: $0.02)."""
_IN, _OUT = "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"


class BudgetExceeded(BudgetExceededError, AgentCancel):
    """The budget cannot cover the next call, which did not run.

    An ``AgentCancel``: any-agent stops the run and raises it unwrapped, the partial trace in
    ``error.trace``. A ``BudgetExceededError``: ``except BudgetExceededError`` works as with
    every runcycles adapter.
    """


class ToolNotAllowed(ToolNotAllowedError, AgentCancel):
    """The budget's caps (``tool_allowlist``/``tool_denylist``) forbid this tool; it did not run."""


class CyclesBudgetCallback(Callback, CyclesAdapter[tuple[str, str, Any], Any]):
    """Reserve before every model and tool call of an any-agent run, commit after.

    Put it in ``AgentConfig(callbacks=[...])``; it works with ``agent.run`` and
    ``agent.run_async`` on every backend (its hooks are synchronous, as any-agent's backends
    other than tinyagent require). A model call commits its usage from the span attributes
    (``gen_ai.usage.*``), priced to the micro-cent; a tool call commits its estimate. When the
    run ends, or fails, whatever it left open is released.

    Args:
        client: The client (default: one from ``config=`` or the ``CYCLES_*`` variables,
            closed by :meth:`close`).
        tenant: Subject fields (default: the client config's).
        workflow: See ``tenant``.
        agent: See ``tenant``.
        llm_estimate: A fixed amount (USD micro-cents) each model call holds (default: the
            pricer's worst case for the model and its ``max_tokens``, else
            :data:`DEFAULT_LLM_ESTIMATE`).
        tool_estimate: What a tool call holds unless ``tool_estimates`` names it (USD
            micro-cents, default 100,000).
        action_kind: The model calls' action kind (default ``"llm.completion"``).
        action_name: The model calls' action name (default: the model).
        tool_estimates: Tool name to what one call of it holds (0: not metered), or a
            :class:`~runcycles.adapters.ToolEstimateMap` (per tool also the unit, the action
            kind and the policy keys; its own default instead of ``tool_estimate``).
        **options: Other :class:`~runcycles.AdapterOptions`: ``workspace``, ``app``,
            ``toolset``, ``dimensions``, ``fail_open``, ``dry_run``, ``pricer``, ``ttl_ms``...
    """

    framework = "any-agent"
    tool_error = ToolNotAllowed

    def __init__(
        self,
        client: CyclesClient | None = None,
        tenant: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        llm_estimate: int | None = None,
        tool_estimate: int = 100_000,
        action_kind: str = "llm.completion",
        action_name: str | None = None,
        *,
        tool_estimates: Mapping[str, int] | ToolEstimateMap | None = None,
        **options: Any,
    ) -> None:
        estimates = {"llm_estimate": llm_estimate, "tool_estimate": tool_estimate}
        if not isinstance(tool_estimates, ToolEstimateMap):  # a map checks its own at lookup
            estimates.update(
                {f"tool_estimates[{k!r}]": v for k, v in (tool_estimates or {}).items()}
            )
        for what, value in estimates.items():  # a bad amount fails here, not at the first call
            if value is not None:
                to_amount(value, Unit.USD_MICROCENTS, what)
        options.setdefault("pricer", Pricer(unknown_model="estimate"))
        super().__init__(
            client, tenant=tenant, workflow=workflow, agent=agent, tool_estimates=tool_estimates,
            default_tool_estimate=tool_estimate, llm_estimate=DEFAULT_LLM_ESTIMATE, **options,
        )  # fmt: skip
        self._llm_fixed, self._action_kind, self._action_name = (
            llm_estimate, action_kind, action_name,
        )  # fmt: skip
        self._current: dict[tuple[str, str, int], str] = {}  # (run, kind, task) -> call id
        self._lowered = MaxTokensLowering()  # the model settings each run's calls capped
        self._warned_caps = False

    # -- what a call is and what it used (the adapter base's two hooks) ------------------

    def plan(self, event: tuple[str, str, Any]) -> CallPlan | None:
        """Plan a model call (``("llm", model, max_tokens)``) or a tool (``("tool", name, _)``)."""
        kind, name, max_tokens = event
        if kind == "tool":
            return self.tool_plan(name)  # None for a tool that holds 0: not metered
        return CallPlan(
            self._action_kind, self._action_name or name, estimate=self._llm_fixed,
            model=name, max_tokens=max_tokens,
        )  # fmt: skip

    def usage(self, result: Any) -> Usage | None:
        """A model call's usage from its span attributes (a tool, or none there: the estimate)."""
        if not isinstance(result, Mapping) or _IN not in result:
            return None
        return Usage(input_tokens=int(result[_IN]), output_tokens=int(result.get(_OUT) or 0))

    # -- any-agent's callbacks -----------------------------------------------------------

    @staticmethod
    def run_id(context: Context) -> str:
        """The run's id (one per ``run``/``run_async``, kept in ``context.shared``)."""
        return str(context.shared.setdefault("cycles_run_id", uuid.uuid4().hex))

    def _slot(self, context: Context, kind: str) -> tuple[str, str, int]:
        # Parallel tool calls share one Context (and its current_span), but each runs its
        # before/after pair in its own task: pair them by the task, never by the span.
        try:
            task = id(asyncio.current_task())
        except RuntimeError:  # no running loop
            task = 0
        return self.run_id(context), kind, task

    @staticmethod
    def _attrs(context: Context) -> Mapping[str, Any]:
        return getattr(context.current_span, "attributes", None) or {}

    @staticmethod
    def _span_id(context: Context) -> str:
        span = context.current_span.get_span_context()
        return f"{span.span_id:016x}" if span.span_id else uuid.uuid4().hex

    def _start(self, context: Context, kind: str, call_id: str, event: tuple[str, str, Any]) -> Any:
        slot = self._slot(context, kind)
        self._current[slot] = call_id
        try:
            call = self.begin(slot[0], call_id, event)
            return self.check_tool(call, event[1]) if kind == "tool" else call
        except CyclesError as error:
            self._current.pop(slot, None)
            if isinstance(error, BudgetExceededError):  # AgentCancel's trace: set by any-agent
                recast(error, BudgetExceeded, _trace=None)
            raise

    def before_llm_call(self, context: Context, *args: Any, **kwargs: Any) -> Context:
        """Reserve for the model call; lower its ``max_tokens`` to the budget's caps."""
        attrs = self._attrs(context)
        model = str(attrs.get("gen_ai.request.model") or context.shared.get("model_id") or "?")
        settings = kwargs.get("model_settings")  # openai backend: the call's own settings
        limit = getattr(settings, "max_tokens", None) or kwargs.get("max_tokens")
        call = self._start(context, "llm", self._span_id(context), ("llm", model, limit))
        cap = call.max_tokens if call.caps and call.guarded else None
        if cap is None:
            return context
        if settings is None:
            if cap != limit and not self._warned_caps:
                self._warned_caps = True
                logger.warning(
                    "any-agent: this backend gives callbacks no way to change a call's "
                    "max_tokens; the budget's cap (%s) is not applied to the model", cap
                )  # fmt: skip
            return context
        # The object the model receives, shared by the agent's concurrent runs: each run's
        # call lowers it, and the agent's own value is put back after the last of them.
        self._lowered.lower(self.run_id(context), settings, cap)
        return context

    def after_llm_call(self, context: Context, *args: Any, **kwargs: Any) -> Context:
        """Commit the model call's usage (the span's ``gen_ai.usage.*``), priced."""
        self._lowered.restore(self.run_id(context))
        call_id = self._current.pop(self._slot(context, "llm"), None)
        if call_id is not None:
            self.end(self.run_id(context), call_id, dict(self._attrs(context)))
        return context

    def before_tool_execution(self, context: Context, *args: Any, **kwargs: Any) -> Context:
        """Reserve the tool's estimate; refuse a tool the budget's caps forbid."""
        attrs = self._attrs(context)
        call_id = str(
            getattr(args[0] if args else None, "tool_call_id", None)  # openai backend
            or kwargs.get("tool_call_id")  # langchain
            or attrs.get("gen_ai.tool.call.id")  # agno
            or self._span_id(context)  # tinyagent: tools run one at a time
        )
        name = str(attrs.get("gen_ai.tool.name") or "unknown")
        self._start(context, "tool", call_id, ("tool", name, None))
        return context

    def after_tool_execution(self, context: Context, *args: Any, **kwargs: Any) -> Context:
        """Commit the tool's estimate."""
        slot = self._slot(context, "tool")
        call_id = getattr(args[0] if args else None, "tool_call_id", None)  # langchain's message
        if call_id is None or self._current.get(slot) == call_id:
            call_id = self._current.pop(slot, None)
        if call_id is not None:
            self.end(self.run_id(context), str(call_id), None)
        return context

    def after_agent_invocation(self, context: Context, *args: Any, **kwargs: Any) -> Context:
        """The run is over (finished or failed): release whatever it left open."""
        run = self.run_id(context)
        self._lowered.restore(run)
        for slot in [slot for slot in self._current if slot[0] == run]:
            self._current.pop(slot, None)
        self.end_run(run)
        return context
