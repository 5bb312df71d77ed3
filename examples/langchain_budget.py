"""LangChain: a ``create_agent`` agent under a Cycles budget ends cleanly when it runs out.

Run: ``uv run --all-packages python examples/langchain_budget.py`` (offline: a scripted model
that keeps calling a tool, as a stuck agent would). The middleware reserves each model call's
worst case (``max_tokens`` at gpt-4o-mini's price), commits its real token usage, soft-denies
a tool the budget cannot cover (the model gets a tool message instead), and ends the run with
a final message when the budget cannot cover the next model call.
"""

from __future__ import annotations

from _local import cycles_config, tenant_of
from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langchain_core.tools import tool

from runcycles import CyclesClient, Usage, default_pricer
from runcycles_langchain import CyclesBudgetMiddleware
from runcycles_langchain.testing import ScriptedChatModel, tool_calls, usage


@tool
def check_status(ticket: str) -> str:
    """Check a ticket's status."""
    return "still open"  # the agent never gives up: a runaway loop


@tool
def escalate(ticket: str) -> str:
    """Escalate a ticket to a human (expensive)."""
    return "escalated"


def main() -> None:
    turns = [tool_calls(("escalate", {"ticket": "4512"}), used=usage(1_500, 200))]
    turns += [tool_calls(("check_status", {"ticket": "4512"}), used=usage(1_500, 200))] * 50
    model = ScriptedChatModel(turns, name="gpt-4o-mini", max_tokens=500)
    with cycles_config(budget=300_000) as config, CyclesClient(config) as client:  # $0.003
        gate = CyclesBudgetMiddleware(
            client, tool_estimates={"escalate": 1_000_000}, on_tool_denied="message"
        )
        agent = create_agent(model, tools=[check_status, escalate], middleware=[gate])
        out = agent.invoke({"messages": [{"role": "user", "content": "Fix ticket 4512"}]})
        denied = next(m for m in out["messages"] if isinstance(m, ToolMessage))
        print(f"escalate soft-denied: {denied.text.split(': ', 1)[1][:60]}...")
        print(f"run ended cleanly: {out['messages'][-1].content!r}")
        each = default_pricer().cost(Usage(1_500, 200, model="gpt-4o-mini"))
        print(f"{len(model.calls)} model calls ran, {each:,} µ¢ each")
        balance = client.get_balances(tenant=tenant_of(config)).data.balances[0]
        assert balance.spent is not None
        print(f"spent {balance.spent.amount:,} µ¢ = {len(model.calls)} x {each:,}")


if __name__ == "__main__":
    main()
