"""AnyAgent: one callback budgets every model and tool call, whatever the backend.

Run: ``uv run --all-packages python examples/anyagent_budget.py`` (offline: a scripted model).
The same ``CyclesBudgetCallback`` guards a tinyagent and an openai-backend agent: each model
call commits its token usage priced at gpt-4o-mini's rates, each tool call its estimate (two
searches in one turn are paired by call id). A runaway agent is stopped with ``BudgetExceeded``
(an ``AgentCancel``: any-agent keeps the partial trace) before the call its budget cannot
cover, and the ledger holds exactly what ran.
"""

from __future__ import annotations

import asyncio
import logging
import os

from _local import cycles_config, tenant_of
from agents import set_tracing_disabled
from any_agent import AgentConfig, AnyAgent

from runcycles import CyclesClient, Usage, default_pricer
from runcycles_anyagent import BudgetExceeded, CyclesBudgetCallback
from runcycles_anyagent.testing import ScriptedCompletions, ScriptedModel, Turn, reply, tool_calls

TOKENS = (1_500, 200)  # each scripted model call's input and output tokens
SEARCH = 10_000  # what a search holds and commits: $0.0001
SEARCHES: list[str] = []


def search(query: str) -> str:
    """Search the knowledge base.

    Args:
        query: What to look for.
    """
    SEARCHES.append(query)
    return "nothing new"  # the runaway agent keeps searching


async def agent(backend: str, callback: CyclesBudgetCallback, turns: list[Turn]) -> AnyAgent:
    """An agent on ``backend`` whose model answers with ``turns`` (scripted, offline)."""
    config = AgentConfig(
        model_id="openai:gpt-4o-mini", tools=[search], callbacks=[callback],
        model_type=ScriptedModel.factory(turns) if backend == "openai" else None,
    )  # fmt: skip
    bot = await AnyAgent.create_async(backend, config)
    if backend == "tinyagent":
        bot.call_model = ScriptedCompletions(turns)  # type: ignore[attr-defined]
    return bot


async def main() -> None:
    os.environ.setdefault("OPENAI_API_KEY", "sk-scripted")  # any-llm wants one; nothing is sent
    set_tracing_disabled(True)
    # any-agent's openai backend shares one span between parallel tool calls (it logs about
    # it); the callback pairs them by call id, so the noise is only any-agent's own trace.
    logging.getLogger("opentelemetry.sdk.trace").setLevel(logging.ERROR)
    with cycles_config(budget=1_000_000) as config, CyclesClient(config) as client:  # $0.01
        callback = CyclesBudgetCallback(
            client, agent="researcher", tool_estimates={"search": SEARCH}
        )
        for backend in ("tinyagent", "openai"):
            turns = [
                tool_calls(("search", {"query": "budgets"}), ("search", {"query": "agents"}),
                           usage=TOKENS),
                reply("Budgets stop runaway agents.", usage=TOKENS),
            ]  # fmt: skip
            trace = await (await agent(backend, callback, turns)).run_async("What's new?")
            print(f"{backend}: {trace.final_output!r} after 2 model calls and 2 searches")
        calls = 0
        runaway = [tool_calls(("search", {"query": f"try {n}"}), usage=TOKENS) for n in range(99)]
        try:
            await (await agent("tinyagent", callback, runaway)).run_async("Find it.")
        except BudgetExceeded as error:
            spans = error.trace.spans if error.trace else []  # any-agent kept the partial trace
            calls = len([span for span in spans if span.is_llm_call()])
            print(f"runaway agent stopped before model call {calls + 1}: {error.error_code}")
        balance = client.get_balances(tenant=tenant_of(config)).raise_for_error().data.balances[0]
    per_call = default_pricer().cost(Usage(*TOKENS, model="gpt-4o-mini"))
    assert per_call is not None
    assert balance.spent is not None
    assert balance.reserved is not None
    model_calls = 4 + calls
    print(f"{model_calls} model calls at {per_call:,} µ¢, {len(SEARCHES)} searches at {SEARCH:,}")
    assert balance.spent.amount == model_calls * per_call + len(SEARCHES) * SEARCH
    print(f"spent {balance.spent.amount:,} µ¢, exactly that; {balance.reserved.amount} held")


if __name__ == "__main__":
    asyncio.run(main())
