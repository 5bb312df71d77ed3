"""The LangChain package against a real server (SQLite and Redis), scripted models.

Every run is a real ``create_agent`` run (``invoke`` or ``ainvoke``) with the middleware or
the callback handler; the model is scripted (no network, no key) and priced by a fixed
table, so the ledger is checked to the micro-cent against usage priced here.
"""

from __future__ import annotations

import socket
import uuid
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tools import tool

from runcycles import (
    AsyncCyclesClient,
    BudgetExceededError,
    CyclesClient,
    CyclesConfig,
    CyclesTransportError,
    ModelPrice,
    Pricer,
)
from runcycles_langchain import CyclesBudgetMiddleware, CyclesCallbackHandler
from runcycles_langchain.testing import ScriptedChatModel, reply, tool_calls, usage
from runcycles_server.testing import ProvisionedTenant, ServerProcess

PRICER = Pricer(overrides={"tiny": ModelPrice(Decimal("2.5"), Decimal(10))}, builtin=False)
WORST = PRICER.estimate("tiny", max_tokens=4_096)
USER: Any = {"messages": [{"role": "user", "content": "go"}]}
RAN: list[str] = []


def priced(inp: int, out: int) -> int:
    """Micro-cents at 2.5 / 10 USD per Mtok, worked out here (1 USD/Mtok = 100 µ¢ a token)."""
    return inp * 250 + out * 1_000


@tool
def search(query: str) -> str:
    """Search the knowledge base."""
    RAN.append(f"search:{query}")
    return "found"


@tool
def broken(query: str) -> str:
    """Always fails."""
    raise RuntimeError("tool crashed")


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


def balance(tenant: ProvisionedTenant) -> tuple[int, int, int]:
    """(spent, reserved, remaining) of the tenant's USD_MICROCENTS budget."""
    with tenant.client() as observer:
        data = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data
    (found,) = [b for b in data.balances if b.remaining.unit.value == "USD_MICROCENTS"]
    spent = found.spent.amount if found.spent else 0
    return spent, found.reserved.amount if found.reserved else 0, found.remaining.amount


async def run_agent(
    tenant: ProvisionedTenant, model: Any, tools: list[Any], via: str, **options: Any
) -> Any:
    """One agent run through the middleware (invoke/ainvoke) or the handler (invoke)."""
    options.setdefault("pricer", PRICER)
    if via == "middleware-async":
        async with tenant.async_client() as client:
            gate = CyclesBudgetMiddleware(client, **options)
            agent = create_agent(model, tools=tools, middleware=[gate])
            return await agent.ainvoke(USER)
    with tenant.client() as sync_client:
        if via == "middleware":
            gate = CyclesBudgetMiddleware(sync_client, **options)
            return create_agent(model, tools=tools, middleware=[gate]).invoke(USER)
        handler = CyclesCallbackHandler(sync_client, **options)
        return create_agent(model, tools=tools).invoke(USER, config={"callbacks": [handler]})


VIAS = ["middleware", "middleware-async", "handler"]


@pytest.mark.parametrize("via", VIAS)
async def test_an_agent_with_tools_stops_when_the_budget_runs_out(
    server: ServerProcess, via: str
) -> None:
    cost = priced(2_000, 150)
    budget = 3 * cost + 3 * 5_000 + WORST - 1  # 3 calls and 3 searches, not a 4th worst case
    tenant = server.provision(budget=budget)
    turns = [tool_calls(("search", {"query": str(n)}), used=usage(2_000, 150)) for n in range(9)]
    model = ScriptedChatModel(turns, name="tiny")
    options: dict[str, Any] = {"tool_estimates": {"search": 5_000}}
    if via == "handler":
        with pytest.raises(BudgetExceededError):
            await run_agent(tenant, model, [search], via, **options)
    else:
        out = await run_agent(tenant, model, [search], via, **options)
        assert "BUDGET_EXCEEDED" in out["messages"][-1].content  # a clean end, no exception
    assert len(model.calls) == 3
    assert RAN == ["search:0", "search:1", "search:2"]
    spent, reserved, remaining = balance(tenant)
    assert spent == 3 * cost + 3 * 5_000  # the priced usage of the calls that ran
    assert reserved == 0
    assert remaining == WORST - 1


@pytest.mark.parametrize("via", VIAS)
async def test_the_ledger_is_the_priced_usage_and_parallel_tools_pair(
    tenant: ProvisionedTenant, via: str
) -> None:
    calls = [("search", {"query": f"q{n}"}, f"call-{n}") for n in range(4)]
    used = [usage(1_234, 321), usage(99, 7)]
    model = ScriptedChatModel(
        [tool_calls(*calls, used=used[0]), reply("done", used[1])], name="tiny"
    )
    out = await run_agent(tenant, model, [search], via, tool_estimates={"search": 3_000})
    assert out["messages"][-1].content == "done"
    assert sorted(RAN) == [f"search:q{n}" for n in range(4)]
    assert balance(tenant)[:2] == (priced(1_234, 321) + priced(99, 7) + 4 * 3_000, 0)


@pytest.mark.parametrize("via", VIAS)
async def test_a_failing_run_leaves_no_reservation_open(
    tenant: ProvisionedTenant, via: str
) -> None:
    model = ScriptedChatModel([tool_calls(("broken", {"query": "x"})), reply("no")], name="tiny")
    with pytest.raises(RuntimeError, match="tool crashed"):
        await run_agent(tenant, model, [broken], via, tool_estimates={"broken": 9_000})
    assert balance(tenant)[:2] == (priced(100, 20), 0)  # the first model call; the tool released


@pytest.mark.parametrize("via", VIAS)
async def test_caps_reach_the_model_call(server: ServerProcess, via: str) -> None:
    tenant = server.provision()
    tenant.add_budget(10**9, caps={"max_tokens": 64, "tool_denylist": ["broken"]})
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    await run_agent(tenant, model, [search, broken], via)
    if via == "handler":  # a callback cannot change a call
        assert [call.get("max_tokens") for call in model.calls] == [None, None]
        assert [call["tools"] for call in model.calls] == [["search", "broken"]] * 2
    else:
        assert [call.get("max_tokens") for call in model.calls] == [64, 64]
        assert [call["tools"] for call in model.calls] == [["search"]] * 2


def _dead_config() -> CyclesConfig:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return CyclesConfig(base_url=url, api_key="cyc_x", tenant="t", retry_enabled=False)


async def test_fail_open_runs_through_an_outage_but_a_denial_still_stops(
    server: ServerProcess,
) -> None:
    config = _dead_config()
    with CyclesClient(config) as dead:
        model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")])
        gate = CyclesBudgetMiddleware(dead, fail_open=True, default_tool_estimate=1)
        out = create_agent(model, tools=[search], middleware=[gate]).invoke(USER)
        assert out["messages"][-1].content == "ok"
        assert gate.adapter.unguarded_calls == 3
        closed = ScriptedChatModel([reply("never")])
        with pytest.raises(CyclesTransportError):
            create_agent(closed, middleware=[CyclesBudgetMiddleware(dead)]).invoke(USER)
        assert closed.calls == []
    exhausted = server.provision(budget=10)
    async with exhausted.async_client() as client:
        model = ScriptedChatModel([reply("never")], name="tiny")
        gate = CyclesBudgetMiddleware(client, fail_open=True, pricer=PRICER)
        out = await create_agent(model, middleware=[gate]).ainvoke(USER)
    assert "BUDGET_EXCEEDED" in out["messages"][-1].content
    assert model.calls == []


@pytest.mark.parametrize("via", VIAS)
async def test_dry_run_never_blocks_and_consumes_nothing(server: ServerProcess, via: str) -> None:
    tenant = server.provision(budget=10)
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    out = await run_agent(tenant, model, [search], via, dry_run=True, tool_estimates={"search": 50})
    assert out["messages"][-1].content == "ok"
    assert RAN == ["search:q"]
    assert balance(tenant) == (0, 0, 10)


async def test_a_retried_callback_does_not_charge_twice(tenant: ProvisionedTenant) -> None:
    run_id, call_id = uuid.uuid4(), uuid.uuid4()
    message = AIMessage(
        "ok", usage_metadata={"input_tokens": 500, "output_tokens": 50, "total_tokens": 550}
    )
    result = LLMResult(generations=[[ChatGeneration(message=message)]])
    params = {"model": "tiny", "max_tokens": 100}

    def fire(handler: CyclesCallbackHandler) -> None:
        handler.on_chat_model_start(
            {}, [[]], run_id=call_id, parent_run_id=run_id, invocation_params=params
        )
        handler.on_llm_end(result, run_id=call_id, parent_run_id=run_id)

    with tenant.client() as client:
        handler = CyclesCallbackHandler(client, pricer=PRICER)
        fire(handler)
        fire(handler)  # the same callbacks again
        handler.on_llm_end(result, run_id=call_id, parent_run_id=run_id)  # a duplicated end
        fire(CyclesCallbackHandler(client, pricer=PRICER))  # after a restart
    assert balance(tenant)[:2] == (priced(500, 50), 0)


async def test_the_async_side_is_built_from_a_sync_client(tenant: ProvisionedTenant) -> None:
    with tenant.client() as client:
        gate = CyclesBudgetMiddleware(client, pricer=PRICER)
        model = ScriptedChatModel([reply("ok", usage(10, 1))], name="tiny")
        await create_agent(model, middleware=[gate]).ainvoke(USER)
        assert isinstance(gate.async_adapter.client, AsyncCyclesClient)
        await gate.aclose()
    assert balance(tenant)[:2] == (priced(10, 1), 0)


@wrap_model_call
def retry_once(request: Any, handler: Any) -> Any:
    """Outside the budget gate: one more try after a failed model call."""
    try:
        return handler(request)
    except RuntimeError:
        return handler(request)


async def test_a_retried_model_call_is_released_then_charged_once(
    tenant: ProvisionedTenant,
) -> None:
    script: list[Any] = [RuntimeError("provider timeout"), reply("ok", usage(300, 30))]
    model = ScriptedChatModel(script, name="tiny")
    with tenant.client() as client:
        gate = CyclesBudgetMiddleware(client, pricer=PRICER)
        out = create_agent(model, middleware=[retry_once, gate]).invoke(USER)
    assert out["messages"][-1].content == "ok"
    assert balance(tenant)[:2] == (priced(300, 30), 0)
