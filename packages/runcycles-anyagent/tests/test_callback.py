"""CyclesBudgetCallback through real any-agent runs (tinyagent and openai backends), offline.

A scripted model stands in for the LLM; an in-memory ledger (FakeCyclesServer) for the server.
"""

from __future__ import annotations

import asyncio
import logging
import re
from decimal import Decimal
from typing import Any

import pytest
from any_agent import AgentCancel, AgentConfig, AgentRunError, AnyAgent

from runcycles import (
    ActionPolicyKeys,
    BudgetExceededError,
    CyclesTransportError,
    ModelPrice,
    Pricer,
    Unit,
    action_kinds,
)
from runcycles.adapters import ToolEstimateConfig, ToolEstimateMap
from runcycles.testing.fake_server import FakeCyclesServer
from runcycles_anyagent import BudgetExceeded, CyclesBudgetCallback, ToolNotAllowed
from runcycles_anyagent.testing import (
    ScriptedCompletions,
    ScriptedModel,
    Turn,
    reply,
    tool_calls,
)

MODEL = "acme-model"  # $2.50 / $10 per million tokens: 250 / 1,000 micro-cents per token
PRICER = Pricer(overrides={MODEL: ModelPrice(Decimal("2.5"), 10)}, builtin=False)
BACKENDS = ["tinyagent", "openai"]
RAN: list[str] = []


def lookup(city: str) -> str:
    """Look up a city.

    Args:
        city: The city.
    """
    RAN.append(f"lookup {city}")
    return f"sunny in {city}"


async def fetch(url: str) -> str:
    """Fetch a page.

    Args:
        url: The page.
    """
    RAN.append(f"fetch {url}")
    await asyncio.sleep(0.05)  # parallel calls overlap on the openai backend
    return "page"


def cost(input_tokens: int, output_tokens: int) -> int:
    return input_tokens * 250 + output_tokens * 1_000


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


@pytest.fixture
def server() -> FakeCyclesServer:
    return FakeCyclesServer(budget=10**10)


async def build(
    backend: str, callbacks: list[Any], turns: list[Turn], **config: Any
) -> tuple[AnyAgent, Any]:
    """An agent on ``backend`` answering with ``turns``; returns it and the scripted model."""
    model: Any
    if backend == "openai":
        model = ScriptedModel(turns, f"openai:{MODEL}")
        config["model_type"] = lambda **_: model
    agent = await AnyAgent.create_async(
        backend,
        AgentConfig(
            model_id=f"openai:{MODEL}", tools=[lookup, fetch], callbacks=callbacks, **config
        ),
    )
    if backend == "tinyagent":
        model = ScriptedCompletions(turns)
        agent.call_model = model  # type: ignore[attr-defined]
    return agent, model


def callback(server: FakeCyclesServer, **options: Any) -> CyclesBudgetCallback:
    options = {"tenant": "acme", "pricer": PRICER, **options}
    return CyclesBudgetCallback(server.client(), **options)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_run_commits_priced_usage_and_tool_estimates(server, backend) -> None:
    cb = callback(server, tool_estimates={"lookup": 30_000})
    turns = [
        tool_calls(("lookup", {"city": "Paris"}), usage=(1_000, 50)),
        reply("Sunny.", usage=(1_200, 10)),
    ]
    agent, _ = await build(backend, [cb], turns)
    trace = await agent.run_async("Weather in Paris?")
    assert trace.final_output == "Sunny."
    assert RAN == ["lookup Paris"]
    assert server.spent["USD_MICROCENTS"] == cost(1_000, 50) + 30_000 + cost(1_200, 10)
    commits = [(r["request"]["action"]["kind"], r["commit"]["actual"]["amount"])
               for r in server.reservations.values()]  # fmt: skip
    assert commits == [
        ("llm.completion", cost(1_000, 50)),
        ("unknown.call", 30_000),  # "lookup" maps to no registry kind
        ("llm.completion", cost(1_200, 10)),
    ]
    assert server.reserved() == 0
    assert cb.pending == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_tools_reserve_registry_kinds_and_a_map_sets_kind_and_policy_keys(
    server, backend
) -> None:
    keys = ActionPolicyKeys(host="weather.example.com")
    tools = ToolEstimateMap(
        {"lookup": ToolEstimateConfig(30_000, action_kinds.HTTP_GET, policy_keys=keys)},
        default_estimate=70_000,
        default_unit=Unit.USD_MICROCENTS,
    )
    cb = callback(server, tool_estimates=tools)
    turns = [tool_calls(("lookup", {"city": "Oslo"}), ("fetch", {"url": "a"})), reply("Done.")]
    agent, _ = await build(backend, [cb], turns)
    await agent.run_async("Both?")
    actions = {
        r["request"]["action"]["name"]: (r["request"]["action"], r["commit"]["actual"]["amount"])
        for r in server.reservations.values()
        if r["request"]["action"]["kind"] != "llm.completion"
    }
    assert actions == {
        "lookup": (
            {"kind": "http.get", "name": "lookup", "policy_keys": {"host": "weather.example.com"}},
            30_000,
        ),
        "fetch": ({"kind": "unknown.call", "name": "fetch"}, 70_000),  # the name maps to none
    }


@pytest.mark.parametrize("backend", BACKENDS)
async def test_parallel_tool_calls_are_paired_by_call_id(server, backend) -> None:
    """Two tool calls in one turn (concurrent on the openai backend) each commit their own."""
    cb = callback(server, tool_estimates={"lookup": 30_000, "fetch": 70_000})
    turns = [
        tool_calls(("fetch", {"url": "a"}, "call_A"), ("lookup", {"city": "Rome"}, "call_B")),
        reply("Done."),
    ]
    agent, _ = await build(backend, [cb], turns)
    await agent.run_async("Both?")
    tools = {
        r["request"]["action"]["name"]: (
            r["request"]["metadata"]["call_id"],
            r["commit"]["actual"]["amount"],
        )
        for r in server.reservations.values()
        if r["request"]["action"]["kind"] == "unknown.call"
    }
    assert {name: amount for name, (_, amount) in tools.items()} == {
        "fetch": 70_000,
        "lookup": 30_000,
    }
    if backend == "openai":  # the SDK's tool call ids are the call ids
        assert {name: call for name, (call, _) in tools.items()} == {
            "fetch": "call_A",
            "lookup": "call_B",
        }
    assert sorted(RAN) == ["fetch a", "lookup Rome"]
    assert server.reserved() == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_exhaustion_stops_the_run_before_the_call(server, backend) -> None:
    """The first model call fits, the tool does not: it never runs; the trace is kept."""
    server.budget = (
        cost(1_000, 50) + 4_096 * 1_000 + 4_000 * 250 + 10
    )  # the 1st call's hold + change
    cb = callback(server, tool_estimate=10**9)
    turns = [tool_calls(("lookup", {"city": "Paris"}), usage=(1_000, 50)), reply("never")]
    agent, model = await build(backend, [cb], turns)
    with pytest.raises(BudgetExceeded) as raised:
        await agent.run_async("Weather?")
    error = raised.value
    assert isinstance(error, AgentCancel)
    assert isinstance(error, BudgetExceededError)
    assert error.error_code == "BUDGET_EXCEEDED"
    assert error.trace is not None
    assert error.trace.tokens.input_tokens == 1_000  # the call that ran
    assert RAN == []
    assert len(model.calls) == 1
    assert server.spent["USD_MICROCENTS"] == cost(1_000, 50)
    assert server.reserved() == 0
    assert cb.pending == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_model_call_is_denied_before_it_runs(server, backend) -> None:
    server.reject = (409, "BUDGET_EXCEEDED")
    agent, model = await build(backend, [callback(server)], [reply("never")])
    with pytest.raises(BudgetExceeded):
        await agent.run_async("hi")
    assert model.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failing_run_leaves_no_reservation_open(server, backend) -> None:
    """The model crashes on its 2nd call: the 1st is committed, the 2nd released."""
    cb = callback(server)
    agent, _ = await build(backend, [cb], [tool_calls(("lookup", {"city": "Oslo"}))])
    with pytest.raises(AgentRunError, match="no turn left"):
        await agent.run_async("hi")
    assert sorted(server.statuses()) == ["COMMITTED", "COMMITTED", "RELEASED"]
    assert server.reserved() == 0
    assert cb.pending == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_retried_callback_does_not_charge_twice(server, backend) -> None:
    """The same callback fired twice per hook: one reservation and one commit per call."""
    cb = callback(server, tool_estimates={"lookup": 30_000})
    turns = [tool_calls(("lookup", {"city": "Oslo"}), usage=(10, 1)), reply("ok", usage=(20, 2))]
    agent, _ = await build(backend, [cb, cb], turns)
    await agent.run_async("hi")
    assert len(server.reservations) == 3
    assert server.spent["USD_MICROCENTS"] == cost(10, 1) + 30_000 + cost(20, 2)
    assert len(server.posts("/commit")) == 3


async def test_caps_lower_max_tokens_of_the_call_on_the_openai_backend(server) -> None:
    server.caps = {"max_tokens": 64}
    cb = callback(server)
    agent, model = await build(
        "openai", [cb], [reply("a"), reply("b")], model_args={"max_tokens": 500}
    )
    await agent.run_async("one")
    await agent.run_async("two")
    assert [settings.max_tokens for settings in model.calls] == [64, 64]
    assert agent._agent.model_settings.max_tokens == 500  # type: ignore[attr-defined]  # restored
    (first, *_) = server.posts("/v1/reservations")
    assert first["estimate"]["amount"] == 4_000 * 250 + 500 * 1_000  # the uncapped worst case


async def test_concurrent_capped_runs_give_the_agent_its_own_max_tokens_back(server) -> None:
    server.caps = {"max_tokens": 64}
    cb = callback(server)
    agent, model = await build("openai", [cb], [reply("a"), reply("b"), reply("c")],
                               model_args={"max_tokens": 500})  # fmt: skip
    slow = model.get_response

    async def overlapping(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)  # the runs' model calls overlap
        return await slow(*args, **kwargs)

    model.get_response = overlapping
    await asyncio.gather(*(agent.run_async(p) for p in ("one", "two", "three")))
    assert [settings.max_tokens for settings in model.calls] == [64, 64, 64]
    assert agent._agent.model_settings.max_tokens == 500  # type: ignore[attr-defined]


async def test_a_repeated_capping_callback_still_gives_max_tokens_back(server) -> None:
    server.caps = {"max_tokens": 64}
    cb = callback(server)
    agent, model = await build("openai", [cb, cb], [reply("a")], model_args={"max_tokens": 500})
    await agent.run_async("one")
    assert [settings.max_tokens for settings in model.calls] == [64]
    assert agent._agent.model_settings.max_tokens == 500  # type: ignore[attr-defined]


async def test_dry_run_enforces_no_caps(server) -> None:
    server.caps = {"max_tokens": 64, "tool_denylist": ["lookup"]}
    cb = callback(server, dry_run=True)
    turns = [tool_calls(("lookup", {"city": "Oslo"})), reply("ok")]
    agent, model = await build("openai", [cb], turns, model_args={"max_tokens": 500})
    assert (await agent.run_async("hi")).final_output == "ok"
    assert RAN == ["lookup Oslo"]
    assert [settings.max_tokens for settings in model.calls] == [500, 500]


async def test_caps_on_tinyagent_are_reported_not_applied(server, caplog) -> None:
    server.caps = {"max_tokens": 64}
    agent, model = await build("tinyagent", [callback(server)], [reply("a")])
    with caplog.at_level(logging.WARNING, logger="runcycles_anyagent"):
        await agent.run_async("one")
    assert "not applied" in caplog.text
    assert model.calls[0].get("max_tokens") is None


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_tool_the_caps_deny_does_not_run(server, backend) -> None:
    server.caps = {"tool_denylist": ["lookup"]}
    cb = callback(server)
    agent, _ = await build(backend, [cb], [tool_calls(("lookup", {"city": "Oslo"})), reply("x")])
    with pytest.raises(ToolNotAllowed, match="lookup"):
        await agent.run_async("hi")
    assert RAN == []
    assert server.reserved() == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fail_open_runs_unguarded_through_an_outage(server, backend) -> None:
    server.outage = True
    cb = callback(server, fail_open=True)
    agent, _ = await build(backend, [cb], [tool_calls(("lookup", {"city": "Oslo"})), reply("ok")])
    assert (await agent.run_async("hi")).final_output == "ok"
    assert cb.unguarded_calls == 3
    assert RAN == ["lookup Oslo"]


async def test_without_fail_open_an_outage_stops_the_run(server) -> None:
    server.outage = True
    agent, model = await build("tinyagent", [callback(server)], [reply("never")])
    with pytest.raises(AgentRunError) as raised:
        await agent.run_async("hi")
    assert isinstance(raised.value.original_exception, CyclesTransportError)
    assert model.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_dry_run_never_blocks_nor_charges(server, backend) -> None:
    server.budget = 10
    cb = callback(server, dry_run=True)
    agent, _ = await build(backend, [cb], [tool_calls(("lookup", {"city": "Oslo"})), reply("ok")])
    assert (await agent.run_async("hi")).final_output == "ok"
    assert [d.decision.value for d in cb.decisions] == ["DENY", "DENY", "DENY"]
    assert server.remaining() == 10
    assert server.reservations == {}


def test_sync_run_works_outside_an_event_loop(server) -> None:
    cb = callback(server, llm_estimate=5_000)
    agent = AnyAgent.create("tinyagent", AgentConfig(model_id=f"openai:{MODEL}", callbacks=[cb]))
    agent.call_model = ScriptedCompletions([reply("ok", usage=(4, 2))])  # type: ignore[attr-defined]
    assert agent.run("hi").final_output == "ok"
    (reservation,) = server.posts("/v1/reservations")
    assert reservation["estimate"]["amount"] == 5_000  # llm_estimate: a fixed hold
    assert server.spent["USD_MICROCENTS"] == cost(4, 2)


async def test_guide_options_name_the_action_and_subject(server) -> None:
    cb = callback(server, workflow="pipeline", agent="researcher", action_kind="llm.chat",
                  action_name="house-model", dimensions={"team": "a"})  # fmt: skip
    agent, _ = await build("tinyagent", [cb], [reply("ok")])
    await agent.run_async("hi")
    (reservation,) = server.posts("/v1/reservations")
    assert reservation["action"] == {"kind": "llm.chat", "name": "house-model"}
    assert reservation["subject"] == {
        "tenant": "acme", "workflow": "pipeline", "agent": "researcher", "dimensions": {"team": "a"}
    }  # fmt: skip


async def test_concurrent_runs_of_one_agent_keep_their_own_calls(server) -> None:
    cb = callback(server)
    agent = await AnyAgent.create_async(
        "tinyagent", AgentConfig(model_id=f"openai:{MODEL}", callbacks=[cb])
    )

    async def answer(**params: Any) -> Any:
        await asyncio.sleep(0.01)
        prompt = params["messages"][-1]["content"]
        return await ScriptedCompletions([reply(prompt, usage=(len(prompt), 1))])(**params)

    agent.call_model = answer  # type: ignore[attr-defined]
    prompts = ["a" * n for n in range(1, 6)]
    traces = await asyncio.gather(*(agent.run_async(p) for p in prompts))
    assert [t.final_output for t in traces] == prompts
    assert sorted(r["commit"]["actual"]["amount"] for r in server.reservations.values()) == [
        cost(n, 1) for n in range(1, 6)
    ]
    assert len({r["request"]["metadata"]["run_id"] for r in server.reservations.values()}) == 5


def test_the_client_comes_from_the_environment_and_is_closed(server, monkeypatch) -> None:
    monkeypatch.setenv("CYCLES_BASE_URL", "http://cycles.invalid")
    monkeypatch.setenv("CYCLES_API_KEY", "cyc_test_key")
    closed: list[str] = []
    cb = CyclesBudgetCallback(tenant="acme")
    assert cb.client.config.base_url == "http://cycles.invalid"
    monkeypatch.setattr(cb.client, "close", lambda: closed.append("own"))
    cb.close()
    mine = server.client()
    monkeypatch.setattr(mine, "close", lambda: closed.append("mine"))
    CyclesBudgetCallback(mine, tenant="acme").close()
    assert closed == ["own"]  # a client given is the caller's to close
    built = CyclesBudgetCallback(config=server.config(), tenant="acme")
    assert built.client.config.base_url == server.config().base_url
    built.close()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"llm_estimate": -5}, ValueError, "llm_estimate must be >= 0, got -5"),
        ({"tool_estimate": "big"}, TypeError, "tool_estimate must be an int"),
        ({"tool_estimates": {"lookup": -1}}, ValueError, "tool_estimates['lookup'] must be >= 0"),
    ],
)
def test_bad_estimates_are_refused_up_front(options, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        CyclesBudgetCallback(FakeCyclesServer().client(), **options)


def test_bad_options_are_named() -> None:
    with pytest.raises(TypeError, match=r"unknown adapter option.*fail_opn"):
        CyclesBudgetCallback(FakeCyclesServer().client(), fail_opn=True)
