"""The OpenAI Agents SDK adapter against a real server (SQLite and Redis), scripted models.

Every run is a real ``Runner.run`` / ``Runner.run_streamed`` with ``CyclesRunHooks``; the
model is scripted (no network, no key) and priced by a fixed table, so the ledger can be
checked to the micro-cent against usage priced here, independently of the pricer.
"""

from __future__ import annotations

import asyncio
import socket
from decimal import Decimal
from typing import Any

import pytest
from agents import (
    Agent,
    InputGuardrailTripwireTriggered,
    ModelSettings,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import Model, ModelProvider

from runcycles import (
    AsyncCyclesClient,
    BudgetExceededError,
    CyclesConfig,
    CyclesTransportError,
    ModelPrice,
    Pricer,
)
from runcycles_openai_agents import CyclesRunHooks, ToolNotAllowedError, cycles_budget_guardrail
from runcycles_openai_agents.testing import ScriptedModel, reply, tool_call, usage
from runcycles_server.testing import ProvisionedTenant, ServerProcess

set_tracing_disabled(True)

PRICE = ModelPrice(Decimal("2.5"), Decimal(10), cached_input_per_mtok=Decimal("1.25"))
PRICER = Pricer(overrides={"tiny": PRICE}, builtin=False)
MAX_TOKENS = 500
TOOLS_RAN: list[str] = []


def priced(inp: int, out: int, cached: int = 0) -> int:
    """Micro-cents at PRICE, worked out here (1 USD/Mtok = 100 micro-cents a token)."""
    exact = (inp - cached) * Decimal("2.5") + cached * Decimal("1.25") + out * 10
    return int((exact * 100).to_integral_value(rounding="ROUND_CEILING"))


@function_tool
async def search(query: str) -> str:
    """Search the knowledge base."""
    TOOLS_RAN.append(f"search:{query}")
    await asyncio.sleep(0.01)
    return "found"


@function_tool
def send_email(to: str) -> str:
    """Send an email."""
    TOOLS_RAN.append(f"send_email:{to}")
    return "sent"


@pytest.fixture(autouse=True)
def _clear() -> None:
    TOOLS_RAN.clear()


def balance(tenant: ProvisionedTenant, unit: str = "USD_MICROCENTS") -> tuple[int, int, int]:
    """(spent, reserved, remaining) of the tenant's budget in ``unit``."""
    with tenant.client() as observer:
        data = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data
    (found,) = [b for b in data.balances if b.remaining.unit.value == unit]
    spent = found.spent.amount if found.spent else 0
    return spent, found.reserved.amount if found.reserved else 0, found.remaining.amount


def agent(turns: list[Any], **kwargs: Any) -> tuple[Agent[Any], ScriptedModel]:
    model = ScriptedModel(turns, name="tiny")
    kwargs.setdefault("tools", [search, send_email])
    kwargs.setdefault("model_settings", ModelSettings(max_tokens=MAX_TOKENS))
    return Agent(name="support", model=model, **kwargs), model


def hooks(client: AsyncCyclesClient, **options: Any) -> CyclesRunHooks:
    options.setdefault("fail_open", False)
    return CyclesRunHooks(client=client, pricer=PRICER, **options)


TURN = usage(2_000, 150, cached=1_200)  # each model call
WORST = PRICER.estimate("tiny", max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
async def test_a_multi_turn_agent_stops_exactly_when_the_budget_cannot_cover_the_next_call(
    server: ServerProcess, streamed: bool
) -> None:
    cost = priced(2_000, 150, cached=1_200)
    budget = 5 * cost + WORST - 1  # covers 5 calls and a 6th's worst case only just not
    tenant = server.provision(budget=budget)
    turns = [([tool_call("search", {"query": str(n)})], TURN) for n in range(20)]
    bot, model = agent(turns)
    async with tenant.async_client() as client:
        run_hooks = hooks(client, tool_estimates={"search": 0})

        async def run() -> None:
            if streamed:
                result = Runner.run_streamed(bot, "go", hooks=run_hooks)
                async for _ in result.stream_events():
                    pass
            else:
                await Runner.run(bot, "go", hooks=run_hooks)

        with pytest.raises(BudgetExceededError) as caught:
            await run()
    assert caught.value.error_code == "BUDGET_EXCEEDED"
    calls = len(model.calls)
    spent, reserved, remaining = balance(tenant)
    assert spent == calls * cost  # the ledger holds the priced usage, to the micro-cent
    assert reserved == 0
    assert remaining == budget - calls * cost < WORST  # the next call could not be covered
    assert budget - (calls - 1) * cost >= WORST  # ... and the last one could
    assert calls == 5  # then WORST - 1 remains: the 6th call is refused before the model
    assert [f"search:{n}" for n in range(calls)] == TOOLS_RAN


async def test_the_ledger_is_the_sum_of_priced_usage(tenant: ProvisionedTenant) -> None:
    usages = [usage(1_234, 321, cached=1_000, reasoning=100), usage(99, 7), usage(5_000, 499)]
    turns = [
        ([tool_call("search", {"query": "a"})], usages[0]),
        ([tool_call("search", {"query": "b"})], usages[1]),
        ([reply("done")], usages[2]),
    ]
    bot, _ = agent(turns)
    async with tenant.async_client() as client:
        result = await Runner.run(bot, "go", hooks=hooks(client, tool_estimates={"search": 0}))
    assert result.final_output == "done"
    expected = sum(
        priced(u.input_tokens, u.output_tokens, u.input_tokens_details.cached_tokens)
        for u in usages
    )
    assert balance(tenant)[:2] == (expected, 0)


async def test_parallel_tool_calls_are_paired(tenant: ProvisionedTenant) -> None:
    tenant.add_budget(100, unit="RISK_POINTS")
    calls = [tool_call("send_email", {"to": f"u{n}@x"}, call_id=f"mail-{n}") for n in range(5)]
    bot, _ = agent([([*calls], TURN), ([reply("sent")], TURN)])
    async with tenant.async_client() as client:
        run_hooks = hooks(client, tool_estimates={"send_email": 7})
        await Runner.run(bot, "mail everyone", hooks=run_hooks)
        assert run_hooks.pending == []
    assert sorted(TOOLS_RAN) == [f"send_email:u{n}@x" for n in range(5)]
    assert balance(tenant, "RISK_POINTS") == (35, 0, 65)


async def test_an_expensive_tool_is_denied_before_it_runs(tenant: ProvisionedTenant) -> None:
    tenant.add_budget(60, unit="RISK_POINTS")
    turns = [([tool_call("send_email", {"to": f"u{n}"})], TURN) for n in range(3)]
    bot, model = agent(turns)
    async with tenant.async_client() as client:
        with pytest.raises(BudgetExceededError):
            await Runner.run(bot, "go", hooks=hooks(client, tool_estimates={"send_email": 50}))
    assert TOOLS_RAN == ["send_email:u0"]
    assert len(model.calls) == 2
    assert balance(tenant, "RISK_POINTS") == (50, 0, 10)


async def test_the_guardrail_blocks_before_any_model_call(tenant: ProvisionedTenant) -> None:
    async with tenant.async_client() as client:
        guard = cycles_budget_guardrail(client=client, estimate=2_000_000_000)  # > the budget
        bot, model = agent([[reply("never")]], input_guardrails=[guard])
        with pytest.raises(InputGuardrailTripwireTriggered) as caught:
            await Runner.run(bot, "go", hooks=hooks(client))
    assert model.calls == []
    assert caught.value.guardrail_result.output.output_info["decision"] == "DENY"
    assert balance(tenant)[:2] == (0, 0)
    allowed = cycles_budget_guardrail(config=tenant.config(), estimate=1_000)
    bot, _ = agent([[reply("ok")]], input_guardrails=[allowed])
    assert (await Runner.run(bot, "go")).final_output == "ok"


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_fail_open_continues_when_unreachable_but_a_denial_still_stops(
    tenant: ProvisionedTenant,
) -> None:
    config = CyclesConfig(base_url=_dead_url(), api_key="cyc_x", tenant="t", retry_enabled=False)
    async with AsyncCyclesClient(config) as dead:
        guard = cycles_budget_guardrail(client=dead, estimate=1, fail_open=True)
        bot, model = agent(
            [([tool_call("search", {"query": "q"})], TURN), [reply("ok")]], input_guardrails=[guard]
        )
        run_hooks = CyclesRunHooks(client=dead, pricer=PRICER)  # fail_open=True by default
        assert (await Runner.run(bot, "go", hooks=run_hooks)).final_output == "ok"
        assert run_hooks.unguarded_calls == 3  # two model calls, one tool call
        assert len(model.calls) == 2
        closed, closed_model = agent([[reply("x")]])
        with pytest.raises(CyclesTransportError):  # fail_open=False: the outage stops the run
            await Runner.run(closed, "go", hooks=hooks(dead))
        assert closed_model.calls == []
    exhausted = tenant.server.provision(budget=10)
    async with exhausted.async_client() as client:
        bot, model = agent([[reply("never")]])
        with pytest.raises(BudgetExceededError):
            await Runner.run(bot, "go", hooks=CyclesRunHooks(client=client, pricer=PRICER))
    assert model.calls == []


async def test_dry_run_never_blocks_and_consumes_nothing(server: ServerProcess) -> None:
    tenant = server.provision(budget=10)
    tenant.add_budget(0, unit="RISK_POINTS")
    bot, model = agent([([tool_call("send_email", {"to": "x"})], TURN), [reply("ok")]])
    async with tenant.async_client() as client:
        run_hooks = hooks(client, dry_run=True, tool_estimates={"send_email": 50})
        assert (await Runner.run(bot, "go", hooks=run_hooks)).final_output == "ok"
    assert [d.decision.value for d in run_hooks.decisions] == ["DENY", "DENY", "DENY"]
    assert len(model.calls) == 2  # never blocked: both model calls and the tool ran
    assert TOOLS_RAN == ["send_email:x"]
    assert balance(tenant) == (0, 0, 10)
    assert balance(tenant, "RISK_POINTS") == (0, 0, 0)


class _Provider(ModelProvider):
    def __init__(self, model: ScriptedModel) -> None:
        self.model = model

    def get_model(self, model_name: str | None) -> Model:
        return self.model


async def test_run_config_caps_every_call_of_a_named_model(server: ServerProcess) -> None:
    tenant = server.provision()
    tenant.add_budget(10**9, caps={"max_tokens": 64})
    model = ScriptedModel(
        [([tool_call("search", {"query": "q"})], TURN), [reply("ok")]], name="tiny"
    )
    bot = Agent(name="support", model="tiny", tools=[search])  # default settings, a name
    async with tenant.async_client() as client:
        run_hooks = hooks(client, tool_estimates={"search": 0})
        base = RunConfig(model_provider=_Provider(model), model_settings=ModelSettings(top_p=1))
        await Runner.run(bot, "go", hooks=run_hooks, run_config=run_hooks.run_config(base))
    assert [settings.max_tokens for settings in model.calls] == [64, 64]
    assert balance(tenant)[1] == 0


async def test_caps_lower_max_tokens_and_deny_tools(server: ServerProcess) -> None:
    tenant = server.provision()
    caps = {"max_tokens": 64, "tool_denylist": ["send_email"]}
    tenant.add_budget(10**9, caps=caps)
    turns = [
        ([tool_call("search", {"query": "q"})], TURN),
        ([tool_call("send_email", {"to": "x"})], TURN),
    ]
    bot, model = agent(turns)
    async with tenant.async_client() as client:
        with pytest.raises(ToolNotAllowedError, match="send_email"):
            await Runner.run(
                bot, "go", hooks=hooks(client, tool_estimates={"search": 0, "send_email": 0})
            )
    assert [settings.max_tokens for settings in model.calls] == [64, 64]
    assert TOOLS_RAN == ["search:q"]
    assert bot.model_settings.max_tokens == MAX_TOKENS
    assert balance(tenant)[:2] == (2 * priced(2_000, 150, cached=1_200), 0)
