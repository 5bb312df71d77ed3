"""any-agent's langchain backend (``any-agent[langchain]``), when it is installed.

Not in this workspace's lock by itself: run with ``uv run --with "any-agent[langchain]"
pytest packages/runcycles-anyagent/tests/test_langchain_backend.py``. LangGraph runs the
model's tool calls concurrently, and any-agent's langchain wrapper calls the callbacks from
LangChain's callback manager: the tool calls pair by LangChain's tool call ids.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from any_agent import AgentConfig, AnyAgent

from runcycles.testing.fake_server import FakeCyclesServer
from runcycles_anyagent import BudgetExceeded, CyclesBudgetCallback
from runcycles_anyagent.testing import ScriptedCompletions, reply, tool_calls

pytest.importorskip("langgraph", reason="needs any-agent[langchain]")
langchain_backend = pytest.importorskip("any_agent.frameworks.langchain")
# any-agent builds its agent with LangGraph's create_react_agent, deprecated in LangGraph 1.0
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RAN: list[str] = []


async def search(query: str) -> str:
    """Search the knowledge base.

    Args:
        query: What to look for.
    """
    RAN.append(query)
    await asyncio.sleep(0.05)  # the two calls overlap
    return "found"


async def test_parallel_tools_are_paired_and_a_denial_stops_the_run(monkeypatch, caplog) -> None:
    server = FakeCyclesServer()
    turns = [
        tool_calls(("search", {"query": "a"}, "c1"), ("search", {"query": "b"}, "c2")),
        reply("done"),
    ]
    monkeypatch.setattr(langchain_backend, "acompletion", ScriptedCompletions(turns))
    callback = CyclesBudgetCallback(
        server.client(), tenant="acme", llm_estimate=50_000, tool_estimates={"search": 7_000}
    )
    config = AgentConfig(model_id="openai:gpt-4o-mini", tools=[search], callbacks=[callback])
    agent = await AnyAgent.create_async("langchain", config)
    assert (await agent.run_async("go")).final_output == "done"
    tools = sorted(
        (r["request"]["metadata"]["call_id"], r["status"], r["commit"]["actual"]["amount"])
        for r in server.reservations.values()
        if r["request"]["action"]["kind"] == "web.search"  # the registry's kind of "search"
    )
    assert tools == [("c1", "COMMITTED", 7_000), ("c2", "COMMITTED", 7_000)]
    assert sorted(RAN) == ["a", "b"]
    assert server.reserved() == 0
    server.reject = (409, "BUDGET_EXCEEDED")
    monkeypatch.setattr(langchain_backend, "acompletion", ScriptedCompletions([reply("x")]))
    with caplog.at_level(logging.CRITICAL), pytest.raises(BudgetExceeded):
        await agent.run_async("again")
    assert callback.pending == []
