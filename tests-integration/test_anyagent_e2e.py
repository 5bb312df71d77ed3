"""The any-agent adapter against a real server (SQLite and Redis), scripted models.

Every run is a real ``AnyAgent.run_async`` (or ``run``) on the tinyagent and openai backends
with ``CyclesBudgetCallback``; the model is scripted (no network, no key) and priced by a
fixed table, so the ledger is checked to the micro-cent against usage priced here.
"""

from __future__ import annotations

import asyncio
import socket
from decimal import Decimal
from typing import Any

import pytest
from agents import set_tracing_disabled
from any_agent import AgentConfig, AgentRunError, AnyAgent

from runcycles import CyclesClient, CyclesConfig, CyclesTransportError, ModelPrice, Pricer
from runcycles_anyagent import BudgetExceeded, CyclesBudgetCallback, ToolNotAllowed
from runcycles_anyagent.testing import ScriptedCompletions, ScriptedModel, Turn, reply, tool_calls
from runcycles_server.testing import ProvisionedTenant, ServerProcess

set_tracing_disabled(True)

PRICER = Pricer(overrides={"tiny": ModelPrice(Decimal("2.5"), Decimal(10))}, builtin=False)
BACKENDS = ["tinyagent", "openai"]
MAX_TOKENS = 500
WORST = PRICER.estimate("tiny", max_tokens=MAX_TOKENS)
TOOLS_RAN: list[str] = []


def priced(inp: int, out: int) -> int:
    """Micro-cents at the table's price, worked out here (1 USD/Mtok = 100 µ¢ a token)."""
    return int(((inp * Decimal("2.5") + out * 10) * 100).to_integral_value("ROUND_CEILING"))


async def search(query: str) -> str:
    """Search the knowledge base.

    Args:
        query: What to look for.
    """
    TOOLS_RAN.append(f"search:{query}")
    await asyncio.sleep(0.02)  # parallel calls overlap on the openai backend
    return "found"


def send_email(to: str) -> str:
    """Send an email.

    Args:
        to: The address.
    """
    TOOLS_RAN.append(f"send_email:{to}")
    return "sent"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    TOOLS_RAN.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-never-sent")


def balance(tenant: ProvisionedTenant) -> tuple[int, int, int]:
    """(spent, reserved, remaining) of the tenant's USD_MICROCENTS budget."""
    with tenant.client() as observer:
        data = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data
    (found,) = [b for b in data.balances if b.remaining.unit.value == "USD_MICROCENTS"]
    spent = found.spent.amount if found.spent else 0
    return spent, found.reserved.amount if found.reserved else 0, found.remaining.amount


async def agent(backend: str, callbacks: list[Any], turns: list[Turn]) -> tuple[AnyAgent, Any]:
    """An agent on ``backend`` answering with ``turns`` (max_tokens 500); and its model."""
    config: dict[str, Any] = {}
    model: Any
    if backend == "openai":
        model = ScriptedModel(turns, "openai:tiny")
        config = {"model_type": lambda **_: model, "model_args": {"max_tokens": MAX_TOKENS}}
    bot = await AnyAgent.create_async(
        backend,
        AgentConfig(
            model_id="openai:tiny", tools=[search, send_email], callbacks=callbacks, **config
        ),
    )
    if backend == "tinyagent":
        bot.completion_params["max_tokens"] = MAX_TOKENS  # type: ignore[attr-defined]
        model = ScriptedCompletions(turns)
        bot.call_model = model  # type: ignore[attr-defined]
    return bot, model


def budget_callback(client: CyclesClient, **options: Any) -> CyclesBudgetCallback:
    return CyclesBudgetCallback(client, pricer=PRICER, **options)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_agent_with_tools_stops_exactly_when_the_budget_runs_out(
    server: ServerProcess, backend: str
) -> None:
    cost = priced(2_000, 150)
    budget = 5 * cost + WORST - 1  # covers 5 calls and a 6th's worst case only just not
    tenant = server.provision(budget=budget)
    turns = [tool_calls(("search", {"query": str(n)}), usage=(2_000, 150)) for n in range(20)]
    with tenant.client() as client:
        callback = budget_callback(client, tool_estimates={"search": 0})
        bot, model = await agent(backend, [callback], turns)
        with pytest.raises(BudgetExceeded) as caught:
            await bot.run_async("go")
    assert caught.value.error_code == "BUDGET_EXCEEDED"
    assert caught.value.trace is not None  # any-agent kept the partial trace
    calls = len(model.calls)
    spent, reserved, remaining = balance(tenant)
    assert calls == 5  # the 6th call is refused before the model runs
    assert spent == calls * cost  # the ledger holds the priced usage, to the micro-cent
    assert reserved == 0
    assert remaining == budget - calls * cost == WORST - 1
    assert [f"search:{n}" for n in range(calls)] == TOOLS_RAN


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_ledger_is_the_priced_usage_and_parallel_tools_are_paired(
    tenant: ProvisionedTenant, backend: str
) -> None:
    mails = [("send_email", {"to": f"u{n}"}, f"mail-{n}") for n in range(4)]
    turns = [
        tool_calls(("search", {"query": "a"}), *mails, usage=(1_234, 321)),
        tool_calls(("search", {"query": "b"}), usage=(99, 7)),
        reply("done", usage=(5_000, 499)),
    ]
    with tenant.client() as client:
        callback = budget_callback(client, tool_estimates={"search": 1_000, "send_email": 7_000})
        bot, _ = await agent(backend, [callback], turns)
        assert (await bot.run_async("go")).final_output == "done"
        assert callback.pending == []
    assert sorted(TOOLS_RAN) == ["search:a", "search:b"] + [f"send_email:u{n}" for n in range(4)]
    tools = 2 * 1_000 + 4 * 7_000
    assert balance(tenant)[:2] == (
        priced(1_234, 321) + priced(99, 7) + priced(5_000, 499) + tools,
        0,
    )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failing_run_leaves_no_reservation_open(
    tenant: ProvisionedTenant, backend: str
) -> None:
    with tenant.client() as client:
        callback = budget_callback(client)
        bot, _ = await agent(backend, [callback], [tool_calls(("search", {"query": "q"}))])
        with pytest.raises(AgentRunError, match="no turn left"):  # the model crashes
            await bot.run_async("go")
        assert callback.pending == []
    spent, reserved, _ = balance(tenant)
    assert reserved == 0
    assert spent == priced(100, 20) + 100_000  # the call and the tool that ran


async def test_a_retried_callback_charges_once_even_from_another_client(
    tenant: ProvisionedTenant,
) -> None:
    """Each hook fires twice, once per callback: the second finds the same reservation."""
    turns = [tool_calls(("search", {"query": "q"}), usage=(300, 30)), reply("ok", usage=(40, 4))]
    with tenant.client() as client, tenant.client() as again:
        first = budget_callback(client)
        retry = budget_callback(again)  # a second process would send the same keys
        bot, _ = await agent("tinyagent", [first, first, retry], turns)
        await bot.run_async("go")
        assert first.pending == retry.pending == []
    assert balance(tenant)[:2] == (priced(300, 30) + 100_000 + priced(40, 4), 0)


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fail_open_continues_when_unreachable_but_a_denial_still_stops(
    tenant: ProvisionedTenant, backend: str
) -> None:
    config = CyclesConfig(base_url=_dead_url(), api_key="cyc_x", tenant="t", retry_enabled=False)
    with CyclesClient(config) as dead:
        callback = budget_callback(dead, fail_open=True)
        turns = [tool_calls(("search", {"query": "q"})), reply("ok")]
        bot, model = await agent(backend, [callback], turns)
        assert (await bot.run_async("go")).final_output == "ok"
        assert callback.unguarded_calls == 3  # two model calls, one tool call
        closed, closed_model = await agent(backend, [budget_callback(dead)], [reply("x")])
        with pytest.raises(AgentRunError) as caught:  # fail_open off: the outage stops the run
            await closed.run_async("go")
        assert isinstance(caught.value.original_exception, CyclesTransportError)
        assert closed_model.calls == []
    exhausted = tenant.server.provision(budget=10)
    with exhausted.client() as client:
        bot, model = await agent(backend, [budget_callback(client, fail_open=True)], [reply("x")])
        with pytest.raises(BudgetExceeded):
            await bot.run_async("go")
    assert model.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_dry_run_never_blocks_and_consumes_nothing(
    server: ServerProcess, backend: str
) -> None:
    tenant = server.provision(budget=10)
    with tenant.client() as client:
        callback = budget_callback(client, dry_run=True)
        turns = [tool_calls(("send_email", {"to": "x"})), reply("ok")]
        bot, model = await agent(backend, [callback], turns)
        assert (await bot.run_async("go")).final_output == "ok"
    assert [d.decision.value for d in callback.decisions] == ["DENY", "DENY", "DENY"]
    assert len(model.calls) == 2
    assert TOOLS_RAN == ["send_email:x"]
    assert balance(tenant) == (0, 0, 10)


async def test_caps_reach_the_model_call_and_deny_tools(server: ServerProcess) -> None:
    """On the openai backend the cap lowers this call's max_tokens (the agent's is restored)."""
    tenant = server.provision()
    tenant.add_budget(10**9, caps={"max_tokens": 64, "tool_denylist": ["send_email"]})
    turns = [tool_calls(("search", {"query": "q"})), tool_calls(("send_email", {"to": "x"}))]
    with tenant.client() as client:
        bot, model = await agent("openai", [budget_callback(client)], turns)
        with pytest.raises(ToolNotAllowed, match="send_email"):
            await bot.run_async("go")
    assert [settings.max_tokens for settings in model.calls] == [64, 64]
    assert bot._agent.model_settings.max_tokens == MAX_TOKENS  # type: ignore[attr-defined]
    assert TOOLS_RAN == ["search:q"]
    assert balance(tenant)[:2] == (2 * priced(100, 20) + 100_000, 0)


def test_the_sync_run_is_guarded_too(tenant: ProvisionedTenant) -> None:
    with tenant.client() as client:
        callback = budget_callback(client)
        config = AgentConfig(model_id="openai:tiny", callbacks=[callback])
        bot = AnyAgent.create("tinyagent", config)
        bot.call_model = ScriptedCompletions([reply("ok", usage=(10, 1))])  # type: ignore[attr-defined]
        assert bot.run("go").final_output == "ok"
    assert balance(tenant)[:2] == (priced(10, 1), 0)
