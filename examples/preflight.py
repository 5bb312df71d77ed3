"""OpenAI Agents SDK: check before you spend: a pre-run guardrail, a dry run, observe mode.

Run: ``uv run --all-packages python examples/preflight.py`` (offline, scripted models).
``cycles_budget_guardrail`` asks the server (``/v1/decide``, nothing held) whether a run's
estimate fits before the agent starts: a big job is refused with zero model calls, a small one
starts. ``CyclesRunHooks(dry_run=True)`` then shadows a whole run: every call is evaluated,
nothing blocks, nothing is charged, and ``hooks.decisions`` says which calls would be denied
(here each email holds 40 risk points of a 30-point budget). ``observe_mode="OBSERVE"`` is the
protocol's shadow mode for production: the same, and the server itself records every
would-be decision (``reservation.observed_denied``) for the operator. Each email reserves
under the registry's kind for ``send_email``: ``message.email.send``.
"""

from __future__ import annotations

import asyncio

from _local import cycles_config, tenant_of
from agents import (
    Agent,
    InputGuardrailTripwireTriggered,
    ModelSettings,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from runcycles import AsyncCyclesClient
from runcycles_openai_agents import CyclesRunHooks, cycles_budget_guardrail
from runcycles_openai_agents.testing import ScriptedModel, reply, tool_call


@function_tool
def send_email(to: str) -> str:
    """Email a customer."""
    return "sent"


def agent(estimate: int, client: AsyncCyclesClient, turns: list[object]) -> Agent[None]:
    guardrail = cycles_budget_guardrail(client=client, estimate=estimate)
    return Agent(
        name="mailer", model=ScriptedModel(turns), tools=[send_email],
        model_settings=ModelSettings(max_tokens=300), input_guardrails=[guardrail],
    )  # fmt: skip


async def main() -> None:
    set_tracing_disabled(True)
    with cycles_config(budget=200_000, risk_points=30) as config:
        async with AsyncCyclesClient(config) as client:
            big = agent(5_000_000, client, [[reply("never")]])
            try:
                await Runner.run(big, "Email all 10,000 customers.")
            except InputGuardrailTripwireTriggered as refused:
                info = refused.guardrail_result.output.output_info
                calls = len(big.model.calls)  # type: ignore[union-attr]
                print(f"big job ($0.05): {info['decision']} before it started, {calls} model calls")
            emails = [[tool_call("send_email", {"to": f"c{n}@example.com"})] for n in range(3)]
            small = agent(100_000, client, [*emails, [reply("3 emails sent")]])
            shadow = CyclesRunHooks(client=client, dry_run=True, tool_estimates={"send_email": 40})
            result = await Runner.run(small, "Email 3 customers.", hooks=shadow)
            print(f"small job ($0.001): ran in shadow mode -> {result.final_output!r}")
            for d in shadow.decisions:
                print(f"  would be {d.decision.value:5} {d.action_kind:18} {d.action_name}")
            emails = [[tool_call("send_email", {"to": f"c{n}@example.com"})] for n in range(3)]
            observed = agent(100_000, client, [*emails, [reply("3 emails sent")]])
            observe = CyclesRunHooks(
                client=client, observe_mode="OBSERVE", tool_estimates={"send_email": 40}
            )
            result = await Runner.run(observed, "Email 3 customers.", hooks=observe)
            denied = sum(d.decision.value == "DENY" for d in observe.decisions)
            print(f"observe mode: ran -> {result.final_output!r}, {denied} would-be denials")
            data = (await client.get_balances(tenant=tenant_of(config))).raise_for_error().data
    spent = sum(b.spent.amount for b in data.balances if b.spent is not None)
    print(f"charged in all: {spent}")


if __name__ == "__main__":
    asyncio.run(main())
