"""OpenAI Agents SDK: a model-call budget stops a looping agent before the call it cannot pay.

Run: ``uv run --all-packages python examples/basic_budget.py`` (offline: a scripted model that
keeps calling a tool, as a stuck agent would). Every model call reserves its worst case
(``max_tokens`` at gpt-4o-mini's price) and commits its real token usage; the run stops when
the budget cannot cover the next call, and the ledger holds exactly the priced usage.
"""

from __future__ import annotations

import asyncio

from _local import cycles_config, tenant_of
from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled

from runcycles import AsyncCyclesClient, BudgetExceededError, Usage, default_pricer
from runcycles_openai_agents import CyclesRunHooks
from runcycles_openai_agents.testing import ScriptedModel, tool_call, usage


@function_tool
def check_status(ticket: str) -> str:
    """Check a ticket's status."""
    return "still open"  # the agent never gives up: a runaway loop


async def main() -> None:
    set_tracing_disabled(True)
    turns = [
        ([tool_call("check_status", {"ticket": "4512"})], usage(1_500, 200)) for _ in range(50)
    ]
    model = ScriptedModel(turns, name="gpt-4o-mini")
    agent = Agent(
        name="support-bot", model=model, tools=[check_status],
        model_settings=ModelSettings(max_tokens=500),
    )  # fmt: skip
    with cycles_config(budget=300_000) as config:  # $0.003
        async with AsyncCyclesClient(config) as client:
            hooks = CyclesRunHooks(client=client, tool_estimates={"check_status": 0})
            try:
                await Runner.run(agent, "Is ticket 4512 solved yet?", hooks=hooks, max_turns=100)
            except BudgetExceededError as error:
                print(f"stopped before model call {len(model.calls) + 1}: {error.error_code}")
            balances = await client.get_balances(tenant=tenant_of(config))
    (balance,) = balances.raise_for_error().data.balances
    per_call = default_pricer().cost(Usage(1_500, 200, model="gpt-4o-mini"))
    print(f"{len(model.calls)} model calls ran, {per_call:,} µ¢ each")
    assert balance.spent is not None
    print(f"spent {balance.spent.amount:,} µ¢ = {len(model.calls)} x {per_call:,}")


if __name__ == "__main__":
    asyncio.run(main())
