"""The adapter base's contract, run through the Agents SDK's own hook calls."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from agents import Agent, ModelResponse, ModelSettings, RunContextWrapper, Runner
from agents.tool_context import ToolContext

from runcycles import Unit, UnknownActualError, Usage
from runcycles.testing.adapter_contract import MODEL, AdapterContract, AdapterDriver, expected_cost
from runcycles_openai_agents import CyclesRunHooks, ToolEstimateMap
from runcycles_openai_agents.testing import ScriptedModel, reply
from runcycles_openai_agents.testing import usage as sdk_usage


class AgentsDriver(AdapterDriver):
    """Maps the contract's (run, call) onto SDK contexts: a model call owns its context."""

    is_async = True

    def __init__(self) -> None:
        self.contexts: dict[tuple[str, str], RunContextWrapper[Any]] = {}

    def make(self, client: Any, **options: Any) -> CyclesRunHooks:
        tools = ToolEstimateMap(options.pop("tool_estimates"), 0, Unit.USD_MICROCENTS)
        options.setdefault("fail_open", False)
        return CyclesRunHooks(client=client, tool_estimates=tools, **options)

    def adapter(self, target: CyclesRunHooks) -> CyclesRunHooks:
        return target

    def _context(self, run: str, call: str) -> RunContextWrapper[Any]:
        # The SDK runs one model call at a time per run: parallel model calls are separate runs.
        key = (run, call)
        if key not in self.contexts:
            ids = SimpleNamespace(cycles_run_id=f"{run}/{call}")
            self.contexts[key] = RunContextWrapper(context=ids)
        return self.contexts[key]

    async def start_llm(self, target, run_id, call_id, *, model, max_tokens):
        agent = Agent(name="a", model=model, model_settings=ModelSettings(max_tokens=max_tokens))
        await target.on_llm_start(self._context(run_id, call_id), agent, None, [])

    async def end_llm(self, target, run_id, call_id, usage: Usage):
        response = ModelResponse(
            output=[], usage=sdk_usage(usage.input_tokens, usage.output_tokens), response_id="r"
        )
        await target.on_llm_end(self._context(run_id, call_id), Agent(name="a"), response)

    def _tool_context(self, run_id: str, call_id: str, tool: str) -> ToolContext[Any]:
        ids = SimpleNamespace(cycles_run_id=run_id)
        return ToolContext(context=ids, tool_name=tool, tool_call_id=call_id, tool_arguments="{}")

    async def start_tool(self, target, run_id, call_id, *, tool):
        context = self._tool_context(run_id, call_id, tool)
        await target.on_tool_start(context, Agent(name="a"), SimpleNamespace(name=tool))

    async def end_tool(self, target, run_id, call_id):
        context = self._tool_context(run_id, call_id, "search")
        await target.on_tool_end(context, Agent(name="a"), SimpleNamespace(name="search"), "ok")

    async def fail(self, target, run_id, call_id, error):
        # The SDK has no failure hook: a run that raises is cleaned up by release_pending().
        await target.fail(f"{run_id}/{call_id}", "llm-0", error)
        await target.fail(run_id, call_id, error)

    async def end_run(self, target, run_id):
        for (run, _call), context in list(self.contexts.items()):
            if run == run_id:
                await target.on_agent_end(context, Agent(name="a"), None)
        ids = SimpleNamespace(cycles_run_id=run_id)
        await target.on_agent_end(RunContextWrapper(context=ids), Agent(name="a"), None)


class TestAgentsContract(AdapterContract):
    @pytest.fixture
    def driver(self) -> AgentsDriver:
        return AgentsDriver()

    # Two scenarios need a different shape in the SDK (the rest run as written):

    async def test_parallel_calls_commit_their_own_usage(self, driver, make, server) -> None:
        """The SDK runs one model call at a time per run: 8 concurrent runs on one hooks object."""
        hooks = make()
        usages = {n: sdk_usage(100 * (n + 1), 7 * n) for n in range(8)}

        async def run(n: int) -> None:
            model = ScriptedModel([([reply("ok")], usages[n])], name=MODEL)
            await Runner.run(Agent(name=f"agent-{n}", model=model), "hi", hooks=hooks)

        await asyncio.gather(*(run(n) for n in range(8)))
        committed = {
            r["request"]["subject"]["agent"]: r["commit"]["actual"]["amount"]
            for r in server.reservations.values()
        }
        expected = {
            f"agent-{n}": expected_cost(
                Usage(input_tokens=u.input_tokens, output_tokens=u.output_tokens)
            )
            for n, u in usages.items()
        }
        assert committed == expected
        assert hooks.pending == []
        assert server.reserved() == 0

    async def test_an_unpriceable_usage_commits_the_estimate(self, driver, make, server) -> None:
        """A ModelResponse names no model: an agent model the pricer lacks commits the estimate."""
        hooks = make(llm_estimate=None)
        model = ScriptedModel([[reply("ok")]], name="mystery")
        await Runner.run(Agent(name="a", model=model), "hi", hooks=hooks)
        (commit,) = server.posts("/commit")
        (reservation,) = server.posts("/v1/reservations")
        assert commit["actual"]["amount"] == reservation["estimate"]["amount"] == 500_000
        assert commit["metadata"]["actual_source"] == "estimate"
        assert "mystery" in commit["metadata"]["actual_error"]

    async def test_an_unpriceable_usage_can_raise(self, driver, make, server) -> None:
        """``on_unknown_actual='raise'``: the run raises from on_llm_end, nothing is sent."""
        hooks = make(on_unknown_actual="raise")
        model = ScriptedModel([[reply("ok")]], name="mystery")
        with pytest.raises(UnknownActualError, match="mystery"):
            await Runner.run(Agent(name="a", model=model), "hi", hooks=hooks)
        assert server.posts("/commit") == server.posts("/release") == []
        assert server.statuses() == ["ACTIVE"]  # left to expire at the end of its lease
