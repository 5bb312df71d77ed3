"""The adapter base's contract, fired through any-agent's own callback methods.

any-agent gives a callback one ``Context`` per run and the call's span as
``context.current_span``; an end callback carries no call id. The driver gives each of the
contract's calls its own context (whose ``shared`` holds the contract's run id) and a span
whose id is derived from the call id, as any-agent's span-generation callback would.
"""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace
from typing import Any

import pytest
from any_agent import AgentConfig, AgentRunError, AnyAgent
from any_agent.callbacks import Context
from opentelemetry.trace import SpanContext

from runcycles import Pricer, UnknownActualError, Usage
from runcycles.testing.adapter_contract import (
    MODEL,
    PRICE,
    AdapterContract,
    AdapterDriver,
    expected_cost,
)
from runcycles.testing.fake_server import FakeCyclesServer
from runcycles_anyagent import DEFAULT_LLM_ESTIMATE, CyclesBudgetCallback
from runcycles_anyagent.testing import ScriptedCompletions, reply


class FakeSpan:
    """What a callback reads of any-agent's OTel span: its id and attributes."""

    def __init__(self, run: str, call: str, attributes: dict[str, Any]) -> None:
        self.span_id = int(hashlib.sha256(f"{run}/{call}".encode()).hexdigest()[:16], 16)
        self.attributes = attributes

    def get_span_context(self) -> SpanContext:
        return SpanContext(trace_id=1, span_id=self.span_id, is_remote=False)


class AnyAgentDriver(AdapterDriver):
    def __init__(self) -> None:
        self.contexts: dict[tuple[str, str], Context] = {}

    def make(self, client: Any, **options: Any) -> CyclesBudgetCallback:
        return CyclesBudgetCallback(client, **options)

    def adapter(self, target: CyclesBudgetCallback) -> CyclesBudgetCallback:
        return target

    def context(self, run: str, call: str, **attributes: Any) -> Context:
        context = self.contexts.setdefault(
            (run, call),
            Context(current_span=None, trace=None, tracer=None, shared={"cycles_run_id": run}),  # type: ignore[arg-type]
        )
        context.current_span = FakeSpan(run, call, attributes)  # type: ignore[assignment]
        return context

    def start_llm(self, target, run_id, call_id, *, model, max_tokens):
        context = self.context(run_id, call_id, **{"gen_ai.request.model": model})
        target.before_llm_call(context, model=model, max_tokens=max_tokens, messages=[])

    def end_llm(self, target, run_id, call_id, usage: Usage):
        context = self.contexts[(run_id, call_id)]
        context.current_span.attributes.update(  # type: ignore[attr-defined]
            {"gen_ai.usage.input_tokens": usage.input_tokens,
             "gen_ai.usage.output_tokens": usage.output_tokens}
        )  # fmt: skip
        target.after_llm_call(context, SimpleNamespace())

    def start_tool(self, target, run_id, call_id, *, tool):
        context = self.context(run_id, call_id, **{"gen_ai.tool.name": tool})
        target.before_tool_execution(context, SimpleNamespace(tool_call_id=call_id), "{}")

    def end_tool(self, target, run_id, call_id):
        target.after_tool_execution(self.contexts[(run_id, call_id)], "ok")

    def fail(self, target, run_id, call_id, error):
        # any-agent has no per-call failure callback: a failed call fails the run, whose
        # after_agent_invocation releases it (test_a_failed_run_*); the base's fail() here.
        span = self.contexts[(run_id, call_id)].current_span.get_span_context().span_id
        target.fail(run_id, f"{span:016x}", error)

    def end_run(self, target, run_id):
        for (run, _call), context in list(self.contexts.items()):
            if run == run_id:
                target.after_agent_invocation(context, "prompt")


class TestAnyAgentContract(AdapterContract):
    @pytest.fixture
    def driver(self) -> AnyAgentDriver:
        return AnyAgentDriver()

    # Three scenarios need any-agent's shape (the rest run as written):

    async def test_parallel_calls_commit_their_own_usage(self, driver, make, server) -> None:
        """any-agent runs one model call at a time per run: 8 concurrent runs, one callback."""
        callback = make()
        usages = {n: (100 * (n + 1), 7 * n) for n in range(8)}

        async def run(n: int) -> None:
            agent = await AnyAgent.create_async(
                "tinyagent",
                AgentConfig(model_id=f"openai:{MODEL}", name=f"agent-{n}", callbacks=[callback]),
            )
            agent.call_model = ScriptedCompletions([reply(f"ok {n}", usage=usages[n])])  # type: ignore[attr-defined]
            await agent.run_async("hi")

        await asyncio.gather(*(run(n) for n in range(8)))
        committed = sorted(r["commit"]["actual"]["amount"] for r in server.reservations.values())
        expected = [
            expected_cost(Usage(input_tokens=i, output_tokens=o)) for i, o in usages.values()
        ]
        assert committed == sorted(expected)
        assert callback.pending == []
        assert server.reserved() == 0

    async def test_an_unpriceable_usage_commits_the_estimate(self, driver, make, server) -> None:
        """A model the pricer lacks holds DEFAULT_LLM_ESTIMATE and commits it, flagged."""
        lenient = Pricer(overrides={MODEL: PRICE}, builtin=False, unknown_model="estimate")
        callback = make(pricer=lenient)
        await self.fire(
            driver, "start_llm", callback, "run-u", "call-u", model="mystery", max_tokens=9
        )
        await self.fire(driver, "end_llm", callback, "run-u", "call-u", Usage(output_tokens=5))
        (reservation,) = server.posts("/v1/reservations")
        (commit,) = server.posts("/commit")
        assert (
            commit["actual"]["amount"] == reservation["estimate"]["amount"] == DEFAULT_LLM_ESTIMATE
        )
        assert commit["metadata"]["actual_source"] == "estimate"

    async def test_an_unpriceable_usage_can_raise(self, driver, make, server) -> None:
        """``on_unknown_actual='raise'``: after_llm_call raises, nothing is sent."""
        callback = make(on_unknown_actual="raise", llm_estimate=5_000)
        await self.fire(
            driver, "start_llm", callback, "run-u", "call-u", model="mystery", max_tokens=9
        )
        with pytest.raises(UnknownActualError, match="mystery"):
            await self.fire(driver, "end_llm", callback, "run-u", "call-u", Usage(output_tokens=5))
        assert server.posts("/commit") == server.posts("/release") == []
        assert server.statuses() == ["ACTIVE"]  # left to expire at the end of its lease


def test_a_failed_run_releases_through_any_agent() -> None:
    """The run-level path of the contract's failing run, through a real run (see fail above)."""
    server = FakeCyclesServer()
    with server.client() as client:
        callback = CyclesBudgetCallback(client, tenant="acme", llm_estimate=1_000)
        agent = AnyAgent.create("tinyagent", AgentConfig(model_id="openai:x", callbacks=[callback]))
        agent.call_model = ScriptedCompletions([])  # type: ignore[attr-defined]  # raises
        with pytest.raises(AgentRunError, match="no turn left"):
            agent.run("hi")
    assert server.statuses() == ["RELEASED"]
    assert server.reserved() == 0
