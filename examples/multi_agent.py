"""OpenAI Agents SDK: a triage agent hands off to a specialist; one budget, one guardrail.

Run: ``uv run --all-packages python examples/multi_agent.py`` (offline, scripted models).
One ``CyclesRunHooks`` governs the whole run: the triage agent's and the specialist's model
calls reserve and commit under their own agent names, and the handoff is recorded as an event.
``cycles_budget_guardrail`` checks the budget before each run starts: once what is left
cannot cover a run's estimate, the next run is refused before any model call.
"""

from __future__ import annotations

import asyncio

from _local import cycles_config, tenant_of
from agents import (
    Agent,
    InputGuardrailTripwireTriggered,
    ModelSettings,
    Runner,
    handoff,
    set_tracing_disabled,
)

from runcycles import AsyncCyclesClient
from runcycles_openai_agents import CyclesRunHooks, cycles_budget_guardrail
from runcycles_openai_agents.testing import ScriptedModel, reply, tool_call, usage

RUN_ESTIMATE = 150_000  # what one support conversation may cost, in USD micro-cents


def agents_for(guardrail: object) -> tuple[Agent[None], list[ScriptedModel]]:
    specialist_model = ScriptedModel(
        [[reply("Your refund is on its way.")]], usage=usage(3_000, 400)
    )
    triage_model = ScriptedModel([[tool_call("transfer_to_billing")]], usage=usage(800, 30))
    settings = ModelSettings(max_tokens=500)  # what each model call reserves for
    billing = Agent(name="billing", model=specialist_model, model_settings=settings)
    triage = Agent(
        name="triage", model=triage_model, handoffs=[handoff(billing)], model_settings=settings,
        input_guardrails=[guardrail],  # type: ignore[list-item]
    )  # fmt: skip
    return triage, [triage_model, specialist_model]


async def main() -> None:
    set_tracing_disabled(True)
    with cycles_config(budget=400_000) as config:
        async with AsyncCyclesClient(config) as client:
            guardrail = cycles_budget_guardrail(client=client, estimate=RUN_ESTIMATE)
            hooks = CyclesRunHooks(client=client)
            for number in range(1, 10):
                triage, models = agents_for(guardrail)
                try:
                    result = await Runner.run(triage, "I was charged twice", hooks=hooks)
                except InputGuardrailTripwireTriggered as refused:
                    info = refused.guardrail_result.output.output_info
                    calls = sum(len(m.calls) for m in models)
                    print(f"run {number} refused up front: {info['decision']}, {calls} model calls")
                    break
                print(f"run {number}: {result.last_agent.name} answered {result.final_output!r}")
            data = (await client.get_balances(tenant=tenant_of(config))).raise_for_error().data
    (balance,) = data.balances
    assert balance.spent is not None
    print(
        f"spent {balance.spent.amount:,} µ¢, {balance.remaining.amount:,} left < {RUN_ESTIMATE:,}"
    )


if __name__ == "__main__":
    asyncio.run(main())
