"""OpenAI Agents SDK: tools hold risk points; the expensive one runs out first, reads are free.

Run: ``uv run --all-packages python examples/tool_governance.py`` (offline, scripted model).
A ``ToolEstimateMap`` says what each call holds: ``send_email`` 50 risk points, ``update_crm``
10 (its own action kind), ``search_knowledge`` nothing (no reservation at all), any other tool
1. With 130 points the third email is denied before it is sent; the CRM updates went through.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from _local import cycles_config, tenant_of
from agents import Agent, Runner, function_tool, set_tracing_disabled

from runcycles import AsyncCyclesClient, BudgetExceededError, Unit
from runcycles_openai_agents import CyclesRunHooks, ToolEstimateConfig, ToolEstimateMap
from runcycles_openai_agents.testing import ScriptedModel, reply, tool_call

RAN: Counter[str] = Counter()


@function_tool
def search_knowledge(query: str) -> str:
    """Search the knowledge base (read-only)."""
    RAN["search_knowledge"] += 1
    return "refund within 30 days"


@function_tool
def update_crm(customer: str, note: str) -> str:
    """Add a note to a customer's CRM record."""
    RAN["update_crm"] += 1
    return "saved"


@function_tool
def send_email(to: str) -> str:
    """Email a customer."""
    RAN["send_email"] += 1
    return "sent"


def script() -> list[object]:
    turns: list[object] = []
    for customer in ("ana", "bo", "cy"):
        turns.append([tool_call("search_knowledge", {"query": f"refund for {customer}"})])
        turns.append([tool_call("update_crm", {"customer": customer, "note": "refund"})])
        turns.append([tool_call("send_email", {"to": f"{customer}@example.com"})])
    return [*turns, [reply("done")]]


async def main() -> None:
    set_tracing_disabled(True)
    estimates = ToolEstimateMap(
        mapping={
            "send_email": 50,
            "update_crm": ToolEstimateConfig(10, action_kind="tool.crm.update"),
            "search_knowledge": 0,
        },
        default_estimate=1,
        default_unit=Unit.RISK_POINTS,
    )
    agent = Agent(
        name="refund-bot",
        model=ScriptedModel(script()),
        tools=[search_knowledge, update_crm, send_email],
    )
    with cycles_config(budget=10**8, risk_points=130) as config:
        async with AsyncCyclesClient(config) as client:
            hooks = CyclesRunHooks(client=client, tool_estimates=estimates)
            try:
                await Runner.run(agent, "Refund ana, bo and cy.", hooks=hooks)
            except BudgetExceededError as error:
                print(
                    f"email #{RAN['send_email'] + 1} denied before it was sent: {error.error_code}"
                )
            data = (await client.get_balances(tenant=tenant_of(config))).raise_for_error().data
    print("tools that ran:", ", ".join(f"{name} x{n}" for name, n in sorted(RAN.items())))
    for balance in data.balances:
        if balance.remaining.unit is Unit.RISK_POINTS and balance.spent is not None:
            print(f"risk points: spent {balance.spent.amount}, left {balance.remaining.amount}")


if __name__ == "__main__":
    asyncio.run(main())
