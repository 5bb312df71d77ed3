"""``CyclesRunHooks``: the Agents SDK's run hooks mapped onto the Cycles adapter base."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from agents import (
    Agent,
    AgentsException,
    ModelResponse,
    RunConfig,
    RunContextWrapper,
    RunHooks,
    Tool,
)
from agents.models.interface import Model

from runcycles import (
    AdapterCall,
    AsyncCyclesAdapter,
    AsyncCyclesClient,
    CallPlan,
    CommitOveragePolicy,
    CyclesConfig,
    CyclesError,
    Unit,
    Usage,
    adapters,
)
from runcycles.adapters import MaxTokensLowering, RunIds, ToolEstimateMap, recast
from runcycles_openai_agents.capping import CappedModel, CappedProvider, Caps

__all__ = ["CyclesRunHooks", "ToolNotAllowedError"]

_default_model: Callable[[], str] | None
try:
    from agents.models import get_default_model as _default_model
except ImportError:  # openai-agents < 0.4
    _default_model = None

DEFAULT_LLM_ESTIMATE = 500_000
"""What a model call holds when the pricer does not know its model (about $0.005)."""


class ToolNotAllowedError(adapters.ToolNotAllowedError, AgentsException):
    """The budget's caps (``tool_allowlist``/``tool_denylist``) forbid this tool; it did not run."""


def _model_name(agent: Agent[Any]) -> str | None:
    model = agent.model
    if model is None:
        return _default_model() if _default_model is not None else None
    return model if isinstance(model, str) else getattr(model, "model", None)


class CyclesRunHooks(RunHooks[Any], AsyncCyclesAdapter[tuple[str, Any, str], Any]):
    """Reserve before every model and tool call of a run, commit after; a denial stops the run.

    Pass it as ``Runner.run(agent, input, hooks=CyclesRunHooks(...))`` (or ``run_streamed``).
    A denial raises :class:`~runcycles.BudgetExceededError` (or another
    :class:`~runcycles.CyclesProtocolError`) from ``Runner.run`` before the call runs. Give
    ``Runner.run(context=...)`` an object with a ``cycles_run_id`` attribute for a run id that
    is stable across processes (idempotent retries); otherwise each run gets a fresh one.

    Args:
        client: The async client (default: one from ``config`` or the ``CYCLES_*`` variables).
        config: Builds the client when ``client`` is not given.
        tenant: Subject fields (default: the config's); ``agent`` and ``toolset`` are
            overridden per call by the running agent's and the tool's name.
        workspace: See ``tenant``.
        app: See ``tenant``.
        workflow: See ``tenant``.
        agent: See ``tenant``.
        toolset: See ``tenant``.
        tool_estimates: A :class:`ToolEstimateMap` or a dict of tool name to ``int`` estimate.
        default_tool_estimate: What an unmapped tool holds (with a dict; default 1).
        tool_unit: Unit of ``int`` tool estimates (with a dict; default ``RISK_POINTS``).
        llm_estimate: A fixed per-model-call estimate in ``llm_unit`` (default: the pricer's
            worst case for the agent's model and ``max_tokens``, else 500,000).
        llm_unit: Unit of model-call reservations (default ``USD_MICROCENTS``).
        fail_open: Run unguarded while the server is unreachable (default ``True``); a
            denial stops the call whatever this says.
        ttl_ms: Reservation lease; the heartbeat extends it while a call runs.
        overage_policy: What a commit above the estimate does (server default).
        dry_run: Shadow mode: evaluate every call, never block, never hold or charge.
        tool_risk: Older name of ``tool_estimates``.
        default_tool_risk: Older name of ``default_tool_estimate``.
        **options: Other :class:`~runcycles.AdapterOptions` (``pricer``, ``dimensions``...).
    """

    framework = "openai-agents"
    tool_error = ToolNotAllowedError

    def __init__(
        self,
        client: AsyncCyclesClient | None = None,
        config: CyclesConfig | None = None,
        *,
        tool_estimates: ToolEstimateMap | Mapping[str, Any] | None = None,
        default_tool_estimate: int | None = None,
        tool_unit: Unit | str = Unit.RISK_POINTS,
        llm_estimate: int | None = None,
        llm_unit: Unit | str = Unit.USD_MICROCENTS,
        fail_open: bool = True,
        ttl_ms: int = 60_000,
        overage_policy: CommitOveragePolicy | str | None = None,
        dry_run: bool = False,
        tool_risk: ToolEstimateMap | Mapping[str, Any] | None = None,
        default_tool_risk: int | None = None,
        **options: Any,
    ) -> None:
        tools = tool_estimates if tool_estimates is not None else tool_risk
        default = default_tool_estimate if default_tool_estimate is not None else default_tool_risk
        if not isinstance(tools, ToolEstimateMap):
            tools = ToolEstimateMap(dict(tools or {}), 1 if default is None else default, tool_unit)
        super().__init__(
            client, config=config, fail_open=fail_open, ttl_ms=ttl_ms,
            overage_policy=overage_policy, dry_run=dry_run, tool_estimates=tools, unit=llm_unit,
            **options,
        )  # fmt: skip
        self.tool_estimates = tools
        self._llm_estimate_fixed, self._llm_unit = llm_estimate, Unit(llm_unit)
        self._runs = RunIds()
        self._llm: dict[str, tuple[AdapterCall, int]] = {}  # run → its latest model call, input id
        self._model_caps: Caps = {}
        self._lowered = MaxTokensLowering()  # agents' own settings, without CappedModel

    # -- what a call is and what it used (the adapter base's two hooks) ------------------

    def plan(self, event: tuple[str, Any, str]) -> CallPlan | None:
        """Plan a model call (``("llm", agent, "")``) or a tool call (``("tool", agent, name)``)."""
        kind, agent, tool = event
        if kind == "tool":
            return self.tool_plan(tool, agent=agent.name, toolset=tool)
        # The base holds the worst case (max_tokens, 4,096 when unset, at the model's price),
        # else the fallback.
        model = _model_name(agent)
        return CallPlan(
            "llm.completion", model or "default", estimate=self._llm_estimate_fixed,
            fallback_estimate=DEFAULT_LLM_ESTIMATE, unit=self._llm_unit, model=model,
            max_tokens=agent.model_settings.max_tokens, agent=agent.name,
        )  # fmt: skip

    def usage(self, result: Any) -> Usage | None:
        """Turn a ``ModelResponse``'s usage into a :class:`~runcycles.Usage` (a tool: ``None``)."""
        return Usage.from_openai(result.usage) if isinstance(result, ModelResponse) else None

    # -- caps on the model call ---------------------------------------------------------

    def run_config(self, base: RunConfig | None = None) -> RunConfig:
        """Return ``base`` (default ``RunConfig()``) with models that apply every call's caps.

        Pass it as ``Runner.run(..., hooks=hooks, run_config=hooks.run_config(...))`` when
        agents name their model (``model="gpt-4.1"``), or with ``RunConfig.model_settings``:
        the caps' ``max_tokens`` then reaches every model call (see the docs' "Caps").
        """
        base = base or RunConfig()
        model = self.capped(base.model) if isinstance(base.model, Model) else base.model
        provider = CappedProvider(base.model_provider, self._model_caps)
        return dataclasses.replace(base, model=model, model_provider=provider)

    def capped(self, model: Model) -> Model:
        """Wrap a model instance (``Agent(model=hooks.capped(model))``) so caps reach it."""
        return CappedModel(model, self._model_caps)

    # -- the SDK's hooks -----------------------------------------------------------------

    def run_id(self, context: RunContextWrapper[Any]) -> str:
        """The run's id: ``context.context.cycles_run_id``, else one per run (its usage)."""
        explicit = getattr(context.context, "cycles_run_id", None)
        if explicit is not None:
            return str(explicit)
        return self._runs.of(context.usage)

    async def _begin(self, run: str, call_id: str, event: tuple[str, Any, str]) -> AdapterCall:
        try:
            call = await self.begin(run, call_id, event)
            if event[0] == "tool":  # the model call's caps govern the tools it chose, too
                await self.check_tool(call, event[2], under=self._llm.get(run, (None, 0))[0])
            return call
        except CyclesError as error:
            self._uncap(run)
            # The SDK wraps a hook's exception in UserError unless it is an AgentsException.
            recast(error, AgentsException, run_data=None)
            raise

    def _uncap(self, run: str | None) -> None:
        """Give the agents their own ``max_tokens`` back (the run, or every run, is over)."""
        for key in [run] if run is not None else list(self._llm):
            self._model_caps.pop(self._llm.get(key, (None, 0))[1], None)
        self._lowered.restore(run)

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[Any],
    ) -> None:
        """Reserve for the model call; lower its ``max_tokens`` to the caps."""
        run = self.run_id(context)
        call = await self._begin(run, f"llm-{context.usage.requests}", ("llm", agent, ""))
        self._llm[run] = (call, id(input_items))
        cap = call.max_tokens if call.caps else None
        if cap is not None:
            self._model_caps[id(input_items)] = (input_items, cap)  # CappedModel applies it
            # Without CappedModel: the SDK resolved this call's settings before this hook;
            # they are this object only with explicit agent settings and no
            # RunConfig.model_settings. Kept for the run, undone when it ends.
            self._lowered.lower(run, agent.model_settings, cap)

    async def on_llm_end(
        self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse
    ) -> None:
        """Commit the model call's usage, priced to the micro-cent."""
        run = self.run_id(context)
        if run in self._llm:  # a repeated callback: the base ends a call once
            call, input_id = self._llm[run]
            self._model_caps.pop(input_id, None)
            await self.end(run, call.call_id, response)

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Any, tool: Tool) -> None:
        """Reserve the tool's estimate; refuse a tool the budget's caps forbid."""
        run = self.run_id(context)
        call_id = getattr(context, "tool_call_id", None) or f"tool-{tool.name}-{id(context)}"
        await self._begin(run, call_id, ("tool", agent, tool.name))

    async def on_tool_end(
        self, context: RunContextWrapper[Any], agent: Any, tool: Tool, result: object
    ) -> None:
        """Commit the tool's estimate."""
        call_id = getattr(context, "tool_call_id", None) or f"tool-{tool.name}-{id(context)}"
        await self.end(self.run_id(context), call_id, None)

    async def on_handoff(
        self, context: RunContextWrapper[Any], from_agent: Any, to_agent: Any
    ) -> None:
        """Record the handoff as a zero-amount event (never blocks the run)."""
        await self.record_event(
            self.run_id(context), f"{from_agent.name}->{to_agent.name}", kind="agent.delegate",
            agent=from_agent.name, metadata={"to_agent": to_agent.name},
        )  # fmt: skip

    async def on_agent_end(self, context: RunContextWrapper[Any], agent: Any, output: Any) -> None:
        """The run is over: release whatever it left open."""
        run = self.run_id(context)
        self._uncap(run)
        self._llm.pop(run, None)
        await self.end_run(run)

    async def release_pending(self, reason: str = "released_by_adapter") -> int:
        """Release every open reservation of every run (after a run raised); return how many."""
        self._uncap(None)
        return await super().release_pending(reason)
