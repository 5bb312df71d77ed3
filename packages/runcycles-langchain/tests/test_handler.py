"""CyclesCallbackHandler driving real LangChain runs (scripted model) on the in-memory ledger."""

from __future__ import annotations

import asyncio
import logging
import uuid
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from runcycles import BudgetExceededError, CyclesConfigError, ModelPrice, Pricer, UnknownModelError
from runcycles.adapters import ToolEstimateConfig, ToolEstimateMap
from runcycles.testing.fake_server import FakeCyclesServer
from runcycles_langchain import CyclesCallbackHandler, ToolNotAllowedError
from runcycles_langchain.testing import ScriptedChatModel, reply, tool_calls, usage

USER: Any = {"messages": [{"role": "user", "content": "go"}]}
PRICER = Pricer(overrides={"tiny": ModelPrice(Decimal("2.5"), 10)}, builtin=False)


@pytest.fixture
def server() -> FakeCyclesServer:
    return FakeCyclesServer(budget=10**9)


def handler_for(server: FakeCyclesServer, **options: Any) -> CyclesCallbackHandler:
    options.setdefault("tenant", "acme")
    options.setdefault("pricer", PRICER)
    options.setdefault("tool_estimates", {"search": 7_000, "send_email": 50_000})
    return CyclesCallbackHandler(server.client(), **options)


def run(agent: Any, handler: CyclesCallbackHandler, asynchronous: bool = False) -> Any:
    config: Any = {"callbacks": [handler]}
    if asynchronous:
        return asyncio.run(agent.ainvoke(USER, config=config))
    return agent.invoke(USER, config=config)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["invoke", "ainvoke"])
def test_an_agent_run_commits_priced_usage_and_tool_estimates(kit, server, asynchronous):
    model = ScriptedChatModel(
        [
            tool_calls(("search", {"query": "a"}), used=usage(1_000, 50, cached=400)),
            reply("done", usage(1_200, 80, reasoning=30)),
        ],
        name="tiny",
    )
    handler = handler_for(server)
    out = run(create_agent(model, tools=[kit.search]), handler, asynchronous)
    assert out["messages"][-1].content == "done"
    # the price has no cached rate, so cached input is priced as input; reasoning is output
    assert server.spent["USD_MICROCENTS"] == kit.cost(1_000, 50) + kit.cost(1_200, 80) + 7_000
    assert server.reserved() == 0
    assert handler.pending == []
    kinds = [r["request"]["action"]["kind"] for r in server.reservations.values()]
    assert kinds == ["llm.completion", "web.search", "llm.completion"]  # the registry's
    runs = {r["request"]["metadata"]["run_id"] for r in server.reservations.values()}
    assert len(runs) == 1  # one top-level run


@pytest.mark.parametrize("asynchronous", [False, True], ids=["invoke", "ainvoke"])
def test_a_denied_model_call_stops_the_run_before_the_model_is_called(kit, server, asynchronous):
    server.reject = (409, "BUDGET_EXCEEDED")
    model = ScriptedChatModel([reply("never")], name="tiny")
    handler = handler_for(server)
    with pytest.raises(BudgetExceededError):
        run(create_agent(model, tools=[kit.search]), handler, asynchronous)
    assert model.calls == []
    assert server.reserved() == 0


@pytest.mark.parametrize("asynchronous", [False, True], ids=["invoke", "ainvoke"])
def test_the_budget_runs_out_mid_run(kit, server, asynchronous):
    worst = PRICER.estimate("tiny", max_tokens=4_096)
    server.budget = 2 * kit.cost(1_000, 50) + worst - 1  # two calls, not a third's worst case
    turns = [tool_calls(("search", {"query": str(n)}), used=usage(1_000, 50)) for n in range(9)]
    model = ScriptedChatModel(turns, name="tiny")
    handler = handler_for(server, tool_estimates={})  # tools not metered
    with pytest.raises(BudgetExceededError):
        run(create_agent(model, tools=[kit.search]), handler, asynchronous)
    assert len(model.calls) == 2
    assert kit.RAN == ["search:0", "search:1"]
    assert server.spent["USD_MICROCENTS"] == 2 * kit.cost(1_000, 50)
    assert server.reserved() == 0


def test_parallel_tool_calls_are_paired_by_run_id(kit, server):
    calls = [("send_email", {"to": f"u{n}"}, f"mail-{n}") for n in range(5)]
    model = ScriptedChatModel([tool_calls(*calls), reply("sent")], name="tiny")
    handler = handler_for(server)
    run(create_agent(model, tools=[kit.send_email]), handler)
    assert sorted(kit.RAN) == [f"send_email:u{n}" for n in range(5)]
    tools = [
        r
        for r in server.reservations.values()
        if r["request"]["action"]["kind"] == "message.email.send"
    ]
    assert len(tools) == 5
    assert {r["commit"]["actual"]["amount"] for r in tools} == {50_000}
    assert len({r["request"]["metadata"]["call_id"] for r in tools}) == 5
    assert handler.pending == []


def test_a_failing_tool_is_released_and_the_run_leaves_nothing_open(kit, server):
    model = ScriptedChatModel([tool_calls(("broken", {"query": "x"})), reply("no")], name="tiny")
    handler = handler_for(server, tool_estimates={"broken": 9_000})
    with pytest.raises(RuntimeError, match="tool crashed"):
        run(create_agent(model, tools=[kit.broken]), handler)
    assert sorted(server.statuses()) == ["COMMITTED", "RELEASED"]
    assert server.reserved() == 0
    assert handler.pending == []


def test_the_end_of_a_top_level_run_releases_what_it_left_open(kit, server):
    handler = handler_for(server)
    run_id, call_id = uuid.uuid4(), uuid.uuid4()
    handler.on_chain_start({}, {}, run_id=run_id, parent_run_id=None)
    handler.on_tool_start({"name": "search"}, "q", run_id=call_id, parent_run_id=run_id)
    assert server.reserved() == 7_000
    handler.on_chain_error(RuntimeError("boom"), run_id=run_id, parent_run_id=None)
    assert server.statuses() == ["RELEASED"]
    assert handler.pending == []


def test_a_tool_the_caps_forbid_does_not_run(kit, server):
    server.caps = {"tool_denylist": ["send_email"]}
    model = ScriptedChatModel([tool_calls(("send_email", {"to": "x"})), reply("no")], name="tiny")
    with pytest.raises(ToolNotAllowedError, match="send_email"):
        run(create_agent(model, tools=[kit.send_email]), handler_for(server))
    assert kit.RAN == []
    assert server.reserved() == 0


def test_tools_without_an_estimate_are_not_metered(kit, server):
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    run(create_agent(model, tools=[kit.search]), handler_for(server, tool_estimates={}))
    assert [r["request"]["action"]["kind"] for r in server.reservations.values()] == [
        "llm.completion",
        "llm.completion",
    ]
    assert kit.RAN == ["search:q"]


def test_a_bare_chat_model_and_a_plain_llm(kit, server):
    handler = handler_for(server, llm_estimate=3_000)
    model = ScriptedChatModel([reply("hi", usage(10, 5))], name="tiny")
    assert model.invoke("hi", config={"callbacks": [handler]}).content == "hi"
    FakeListLLM(responses=["plain"]).invoke("hi", config={"callbacks": [handler]})
    chat, plain = server.posts("/commit")
    assert chat["actual"]["amount"] == kit.cost(10, 5)
    assert plain["actual"]["amount"] == 3_000  # no usage reported: the estimate, flagged
    assert plain["metadata"]["actual_source"] == "estimate"


def test_a_model_with_no_name_and_no_estimate_is_a_clear_error(kit, server):
    with pytest.raises(CyclesConfigError, match="llm_estimate"):
        FakeListLLM(responses=["x"]).invoke("hi", config={"callbacks": [handler_for(server)]})
    assert server.reservations == {}


def test_the_model_option_names_the_price_of_unnamed_models(kit, server):
    handler = handler_for(server, model="tiny")
    FakeListLLM(responses=["x"]).invoke("hi", config={"callbacks": [handler]})
    (reservation,) = server.posts("/v1/reservations")
    assert reservation["action"]["name"] == "tiny"
    assert reservation["estimate"]["amount"] == PRICER.estimate("tiny", max_tokens=4_096)


def test_sync_tools_run_in_threads_and_the_handler_pairs_them(kit, server):
    calls = [("search", {"query": str(n)}) for n in range(4)]
    model = ScriptedChatModel([tool_calls(*calls), reply("ok")], name="tiny")
    run(create_agent(model, tools=[kit.search]), handler_for(server))
    assert kit.THREADS
    assert "MainThread" not in kit.THREADS
    assert server.spent["USD_MICROCENTS"] == 2 * kit.cost(100, 20) + 4 * 7_000


def test_dry_run_never_blocks(kit, server, caplog):
    server.budget = 10
    model = ScriptedChatModel([tool_calls(("search", {"query": "q"})), reply("ok")], name="tiny")
    handler = handler_for(server, dry_run=True)
    with caplog.at_level(logging.WARNING):
        assert run(create_agent(model, tools=[kit.search]), handler)["messages"][-1].content == "ok"
    assert [d.decision.value for d in handler.decisions] == ["DENY", "DENY", "DENY"]
    assert server.remaining() == 10
    assert server.reservations == {}


def test_close_closes_a_client_it_built(kit, monkeypatch):
    monkeypatch.setenv("CYCLES_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CYCLES_API_KEY", "cyc_x")
    handler = CyclesCallbackHandler(tenant="acme")
    handler.close()
    assert handler.client._http.is_closed
    given = FakeCyclesServer().client()
    CyclesCallbackHandler(given, tenant="acme").close()
    assert not given._http.is_closed
    given.close()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["stream", "astream"])
def test_a_streamed_run_commits_the_usage_of_its_chunks(kit, server, asynchronous):
    model = ScriptedChatModel(
        [tool_calls(("search", {"query": "a"}), used=usage(1_000, 50)), reply("done", usage(9, 9))],
        name="tiny",
    )
    agent = create_agent(model, tools=[kit.search])
    config: Any = {"callbacks": [handler_for(server)]}

    async def consume() -> None:
        async for _ in agent.astream(USER, config=config, stream_mode="messages"):
            pass

    if asynchronous:
        asyncio.run(consume())
    else:
        for _ in agent.stream(USER, config=config, stream_mode="messages"):
            pass
    assert server.spent["USD_MICROCENTS"] == kit.cost(1_000, 50) + kit.cost(9, 9) + 7_000
    assert server.reserved() == 0


def test_an_lcel_chain_and_a_batch_are_metered_call_by_call(kit, server):
    handler = handler_for(server)
    model = ScriptedChatModel(
        [reply(f"r{n}", usage(100 * (n + 1), n)) for n in range(5)], name="tiny"
    )
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    chain = prompt | model | StrOutputParser()
    assert chain.invoke({"q": "hi"}, config={"callbacks": [handler]}) == "r0"
    answers = model.batch(["a", "b", "c", "d"], config={"callbacks": [handler]})
    assert sorted(str(a.content) for a in answers) == ["r1", "r2", "r3", "r4"]
    assert server.spent["USD_MICROCENTS"] == sum(kit.cost(100 * (n + 1), n) for n in range(5))
    assert server.reserved() == 0
    assert handler.pending == []


def test_a_chain_that_fails_after_its_model_call_leaves_nothing_open(kit, server):
    handler = handler_for(server)
    model = ScriptedChatModel([reply("ok", usage(10, 1))], name="tiny")

    def boom(_: Any) -> str:
        raise ValueError("parser failed")

    with pytest.raises(ValueError, match="parser failed"):
        (model | RunnableLambda(boom)).invoke("hi", config={"callbacks": [handler]})
    assert server.statuses() == ["COMMITTED"]
    assert server.spent["USD_MICROCENTS"] == kit.cost(10, 1)


def test_a_tool_estimate_map_gives_units_kinds_and_a_default(kit, server):
    server.budgets = {"USD_MICROCENTS": 10**9, "RISK_POINTS": 100}
    tools = ToolEstimateMap(
        {"send_email": ToolEstimateConfig(30, action_kind="tool.email"), "search": 0},
        default_estimate=5,
        default_unit="RISK_POINTS",
    )
    calls = [("send_email", {"to": "x"}), ("search", {"query": "q"})]
    model = ScriptedChatModel([tool_calls(*calls), reply("ok")], name="tiny")
    run(
        create_agent(model, tools=[kit.send_email, kit.search]),
        handler_for(server, tool_estimates=tools),
    )
    (email,) = [
        r for r in server.reservations.values() if r["request"]["action"]["kind"] == "tool.email"
    ]
    assert email["request"]["estimate"] == {"unit": "RISK_POINTS", "amount": 30}
    assert server.spent["RISK_POINTS"] == 30  # search holds 0: not metered
    assert sorted(kit.RAN) == ["search:q", "send_email:x"]


def test_an_unpriced_model_is_a_clear_error_before_the_call(server):
    model = ScriptedChatModel([reply("never")], name="my-private-model")
    handler = handler_for(server, pricer=None, default_tool_estimate=None)
    with pytest.raises(UnknownModelError, match=r"my-private-model.*Pricer\(overrides="):
        model.invoke("hi", config={"callbacks": [handler]})
    assert model.calls == []
    assert server.reservations == {}
