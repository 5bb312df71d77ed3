"""CyclesBudgetMiddleware in real create_agent runs (scripted model), sync and async."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import ToolMessage

from runcycles import (
    BudgetExceededError,
    CyclesConfigError,
    CyclesTransportError,
    ModelPrice,
    Pricer,
)
from runcycles.testing.fake_server import FakeCyclesServer
from runcycles_langchain import CyclesBudgetMiddleware, ToolNotAllowedError
from runcycles_langchain.testing import ScriptedChatModel, reply, tool_calls, usage

PRICER = Pricer(overrides={"tiny": ModelPrice(Decimal("2.5"), 10)}, builtin=False)
WORST = PRICER.estimate("tiny", max_tokens=4_096)
USER: Any = {"messages": [{"role": "user", "content": "go"}]}


@pytest.fixture(params=["invoke", "ainvoke"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server() -> FakeCyclesServer:
    return FakeCyclesServer(budget=10**9)


def gate(server: FakeCyclesServer, mode: str, **options: Any) -> CyclesBudgetMiddleware:
    options.setdefault("tenant", "acme")
    options.setdefault("pricer", PRICER)
    options.setdefault("tool_estimates", {"search": 7_000, "send_email": 50_000})
    client = server.client() if mode == "invoke" else server.async_client()
    return CyclesBudgetMiddleware(client, **options)


def run(model: Any, tools: list[Any], middleware: list[Any], mode: str) -> Any:
    agent = create_agent(model, tools=tools, middleware=middleware)
    if mode == "ainvoke":
        return asyncio.run(agent.ainvoke(USER))
    return agent.invoke(USER)


def test_the_ledger_is_the_priced_usage_of_the_calls_that_ran(kit, server, mode):
    model = ScriptedChatModel(
        [
            tool_calls(("search", {"query": "a"}), used=usage(1_000, 50, cached=400)),
            reply("done", usage(1_200, 80, reasoning=30)),
        ],
        name="tiny",
    )
    out = run(model, [kit.search], [gate(server, mode)], mode)
    assert out["messages"][-1].content == "done"
    assert server.spent["USD_MICROCENTS"] == kit.cost(1_000, 50) + kit.cost(1_200, 80) + 7_000
    assert server.reserved() == 0
    kinds = [r["request"]["action"]["kind"] for r in server.reservations.values()]
    assert kinds == ["llm.completion", "web.search", "llm.completion"]  # the registry's


def test_exhaustion_ends_the_run_cleanly(kit, server, mode):
    server.budget = 2 * kit.cost(1_000, 50) + WORST - 1  # two calls, not a third's worst case
    turns = [tool_calls(("search", {"query": str(n)}), used=usage(1_000, 50)) for n in range(9)]
    model = ScriptedChatModel(turns, name="tiny")
    out = run(model, [kit.search], [gate(server, mode, tool_estimates={})], mode)
    last = out["messages"][-1]
    assert last.content == "Stopped: the budget refused the next model call (BUDGET_EXCEEDED)."
    assert last.response_metadata["cycles_denied"] == "BUDGET_EXCEEDED"
    assert len(model.calls) == 2
    assert kit.RAN == ["search:0", "search:1"]
    assert server.spent["USD_MICROCENTS"] == 2 * kit.cost(1_000, 50)
    assert server.reserved() == 0


def test_exhaustion_can_raise(server, mode):
    server.reject = (409, "BUDGET_EXCEEDED")
    model = ScriptedChatModel([reply("never")], name="tiny")
    with pytest.raises(BudgetExceededError):
        run(model, [], [gate(server, mode, on_model_denied="raise")], mode)
    assert model.calls == []


def test_caps_reach_the_model_call(kit, server, mode):
    server.caps = {"max_tokens": 64, "tool_denylist": ["send_email"]}
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    run(model, [kit.search, kit.send_email], [gate(server, mode)], mode)
    assert [call.get("max_tokens") for call in model.calls] == [64, 64]
    assert [call["tools"] for call in model.calls] == [["search"], ["search"]]  # not send_email


class MaxTokens(AgentMiddleware):
    """Outside the budget gate: the request's own max_tokens."""

    def wrap_model_call(self, request: Any, handler: Any) -> Any:
        return handler(request.override(model_settings={"max_tokens": 100}))

    async def awrap_model_call(self, request: Any, handler: Any) -> Any:
        return await handler(request.override(model_settings={"max_tokens": 100}))


@pytest.mark.parametrize("cap", [640, 64])
def test_the_request_max_tokens_is_estimated_and_lowered_to_the_cap(server, mode, cap):
    server.caps = {"max_tokens": cap}
    model = ScriptedChatModel([reply("ok")], name="tiny")
    run(model, [], [MaxTokens(), gate(server, mode)], mode)
    (reservation,) = server.posts("/v1/reservations")
    assert reservation["estimate"]["amount"] == PRICER.estimate("tiny", max_tokens=100)
    assert model.calls[0]["max_tokens"] == min(cap, 100)


@pytest.mark.parametrize("denial", ["budget", "caps"])
def test_a_denied_tool_can_be_a_soft_deny(kit, server, mode, denial):
    if denial == "caps":
        server.caps = {"tool_denylist": ["send_email"]}
    model = ScriptedChatModel(
        [tool_calls(("send_email", {"to": "x"}, "mail-1")), reply("could not")], name="tiny"
    )
    middleware = gate(server, mode, on_tool_denied="message")
    if denial == "budget":
        middleware = gate(
            server, mode, on_tool_denied="message", tool_estimates={"send_email": 2 * 10**9}
        )
    out = run(model, [kit.send_email], [middleware], mode)
    (denied,) = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert denied.status == "error"
    assert denied.tool_call_id == "mail-1"
    assert ("BUDGET_EXCEEDED" if denial == "budget" else "not allowed") in denied.content
    assert kit.RAN == []
    assert out["messages"][-1].content == "could not"  # the model saw it and answered
    assert server.reserved() == 0


@pytest.mark.parametrize("denial", ["budget", "caps"])
def test_a_denied_tool_is_a_hard_stop_by_default(kit, server, mode, denial):
    estimates = {"send_email": 2 * 10**9} if denial == "budget" else {"send_email": 5}
    if denial == "caps":
        server.caps = {"tool_denylist": ["send_email"]}
    model = ScriptedChatModel([tool_calls(("send_email", {"to": "x"})), reply("no")], name="tiny")
    error = BudgetExceededError if denial == "budget" else ToolNotAllowedError
    with pytest.raises(error):
        run(model, [kit.send_email], [gate(server, mode, tool_estimates=estimates)], mode)
    assert kit.RAN == []
    assert server.reserved() == 0


def test_parallel_tool_calls_are_paired(kit, server, mode):
    calls = [("send_email", {"to": f"u{n}"}, f"mail-{n}") for n in range(5)]
    model = ScriptedChatModel([tool_calls(*calls), reply("sent")], name="tiny")
    middleware = gate(server, mode)
    run(model, [kit.send_email], [middleware], mode)
    assert sorted(kit.RAN) == [f"send_email:u{n}" for n in range(5)]
    tools = [
        r
        for r in server.reservations.values()
        if r["request"]["action"]["kind"] == "message.email.send"
    ]
    assert [r["commit"]["actual"]["amount"] for r in tools] == [50_000] * 5
    assert len({r["request"]["idempotency_key"] for r in tools}) == 5
    adapter = middleware.adapter if mode == "invoke" else middleware.async_adapter
    assert adapter.pending == []


def test_a_failing_run_leaves_no_reservation_open(kit, server, mode):
    model = ScriptedChatModel([tool_calls(("broken", {"query": "x"})), reply("no")], name="tiny")
    with pytest.raises(RuntimeError, match="tool crashed"):
        run(model, [kit.broken], [gate(server, mode, default_tool_estimate=9_000)], mode)
    assert sorted(server.statuses()) == ["COMMITTED", "RELEASED"]
    assert server.reserved() == 0


class RetryOnce(AgentMiddleware):
    """Outside the budget gate: calls the model again after its first failure."""

    def wrap_model_call(self, request: Any, handler: Any) -> Any:
        try:
            return handler(request)
        except RuntimeError:
            return handler(request)

    async def awrap_model_call(self, request: Any, handler: Any) -> Any:
        try:
            return await handler(request)
        except RuntimeError:
            return await handler(request)


def test_a_retried_model_call_is_released_then_charged_once(kit, server, mode):
    model = ScriptedChatModel(
        [RuntimeError("provider timeout"), reply("ok", usage(300, 30))], name="tiny"
    )
    out = run(model, [], [RetryOnce(), gate(server, mode)], mode)
    assert out["messages"][-1].content == "ok"
    assert server.statuses() == ["RELEASED", "COMMITTED"]
    assert server.spent["USD_MICROCENTS"] == kit.cost(300, 30)


def test_dry_run_never_blocks_nor_caps(kit, server, mode):
    server.budget, server.caps = 10, {"max_tokens": 8, "tool_denylist": ["search"]}
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    middleware = gate(server, mode, dry_run=True)
    assert run(model, [kit.search], [middleware], mode)["messages"][-1].content == "ok"
    adapter = middleware.adapter if mode == "invoke" else middleware.async_adapter
    assert [d.decision.value for d in adapter.decisions] == ["DENY", "DENY", "DENY"]
    assert kit.RAN == ["search:q"]
    assert [call.get("max_tokens") for call in model.calls] == [None, None]
    assert server.remaining() == 10
    assert server.reservations == {}


def test_fail_open_runs_through_an_outage_and_fail_closed_stops(kit, server, mode):
    server.outage = True
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    middleware = gate(server, mode, fail_open=True)
    assert run(model, [kit.search], [middleware], mode)["messages"][-1].content == "ok"
    adapter = middleware.adapter if mode == "invoke" else middleware.async_adapter
    assert adapter.unguarded_calls == 3
    closed = ScriptedChatModel([reply("never")], name="tiny")
    with pytest.raises(CyclesTransportError):
        run(closed, [], [gate(server, mode)], mode)
    assert closed.calls == []


def test_bad_options_are_clear_errors(server):
    expected = "on_tool_denied 'raise' or 'message'; got 'end' and 'soft'"
    with pytest.raises(CyclesConfigError, match=re.escape(expected)):
        CyclesBudgetMiddleware(server.client(), on_tool_denied="soft")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown adapter option"):
        CyclesBudgetMiddleware(server.client(), tenat="acme")


@pytest.mark.parametrize("stream_mode", ["messages", "updates"])
def test_streamed_runs_are_metered_like_invoked_ones(kit, server, mode, stream_mode):
    model = ScriptedChatModel(
        [tool_calls(("search", {"query": "a"}), used=usage(1_000, 50)), reply("done", usage(9, 9))],
        name="tiny",
    )
    agent = create_agent(model, tools=[kit.search], middleware=[gate(server, mode)])

    async def consume() -> None:
        async for _ in agent.astream(USER, stream_mode=stream_mode):
            pass

    if mode == "ainvoke":
        asyncio.run(consume())
    else:
        for _ in agent.stream(USER, stream_mode=stream_mode):
            pass
    assert kit.RAN == ["search:a"]
    assert server.spent["USD_MICROCENTS"] == kit.cost(1_000, 50) + kit.cost(9, 9) + 7_000
    assert server.reserved() == 0
