"""``cycles demo``: a governed OpenAI Agents SDK agent against an embedded server, offline.

In about ten seconds and with no API key:

1. an embedded Cycles server starts in this process (SQLite in a temporary folder);
2. a tenant gets a small budget: one US cent for model calls and 120 risk points for tools;
3. a support agent runs (OpenAI Agents SDK, a scripted model) with ``CyclesRunHooks``: every
   model call reserves its worst case and commits its priced usage; every tool call reserves
   its risk points (``search_kb`` is free, ``lookup_order`` costs 1, ``send_email`` 50); a live
   table shows each reservation and commit and what is left;
4. the agent tries a third email: the reservation is denied and the email is **not sent** (the
   demo counts the emails to prove it); ``BudgetExceededError`` reaches the caller of
   ``Runner.run``;
5. the final balances are printed.

``--real`` runs the same agent on OpenAI's ``gpt-4o-mini`` with your ``OPENAI_API_KEY``.
Needs the ``runcycles-openai-agents`` package (``pip install 'runcycles-server[agents]'``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Hashable
from typing import Any, Final

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from runcycles_server.demo import EmbeddedServer, embedded_server, provision, usd

__all__ = ["AGENT_BUDGET", "RISK_BUDGET", "run_agent_demo"]

AGENT_BUDGET: Final = 1_000_000  # one US cent, in USD_MICROCENTS
RISK_BUDGET: Final = 120  # risk points: two emails, not three
TENANT: Final = "demo-agents"
TOOL_RISK: Final = {"search_kb": 0, "lookup_order": 1, "send_email": 50}
INSTRUCTIONS: Final = (
    "You are a support agent. Look up each late order and email its customer an apology. "
    "Use search_kb for the policy first."
)
TASK: Final = "Orders #4512, #4513 and #4514 are late: apologise to each customer by email."


def _script() -> list[Any]:
    from runcycles_openai_agents.testing import reply, tool_call, usage

    steps: list[Any] = [[tool_call("search_kb", {"query": "late delivery policy"})]]
    for order, email in (("4512", "ana@example.com"), ("4513", "bo@example.com")):
        steps.append([tool_call("lookup_order", {"order": order})])
        steps.append([tool_call("send_email", {"to": email, "subject": f"Order #{order}"})])
    steps.append([tool_call("lookup_order", {"order": "4514"})])
    steps.append([tool_call("send_email", {"to": "cy@example.com", "subject": "Order #4514"})])
    steps.append([reply("All three customers have been emailed.")])
    return [(turn, usage(1_400 + 180 * n, 120 + 15 * n)) for n, turn in enumerate(steps)]


def _agent(real: bool, sent: list[str]) -> Any:
    from agents import Agent, ModelSettings, function_tool

    from runcycles_openai_agents.testing import ScriptedModel

    @function_tool
    def search_kb(query: str) -> str:
        """Search the support knowledge base."""
        return "Late orders: apologise, offer free shipping on the next order."

    @function_tool
    def lookup_order(order: str) -> str:
        """Look up an order by number."""
        return f"Order #{order}: 3 days late, customer is a repeat buyer."

    @function_tool
    def send_email(to: str, subject: str) -> str:
        """Send an email to a customer (expensive: it reaches a real person)."""
        sent.append(to)
        return f"email sent to {to}"

    return Agent(
        name="support-bot",
        instructions=INSTRUCTIONS,
        model="gpt-4o-mini" if real else ScriptedModel(_script(), name="gpt-4o-mini"),
        model_settings=ModelSettings(max_tokens=400),
        tools=[search_kb, lookup_order, send_email],
    )


def _table(rows: list[tuple[str, ...]]) -> Table:
    table = Table(title="Governed agent run: reserve → run → commit", title_justify="left")
    for name in ("#", "call", "reserved", "committed", "USD left", "risk left", "outcome"):
        table.add_column(name, justify="left" if name in ("call", "outcome") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _hooks_class() -> type[Any]:
    from runcycles import AdapterCall, CyclesError
    from runcycles_openai_agents import CyclesRunHooks

    class ShowingHooks(CyclesRunHooks):
        """CyclesRunHooks that also draws each reservation and commit in a live table."""

        rows: list[tuple[str, ...]]
        live: Live | None = None
        delay_s: float = 0.0

        def _name(self, event: tuple[str, Any, str]) -> str:
            return f"tool {event[2]}" if event[0] == "tool" else "model gpt-4o-mini"

        async def _left(self) -> tuple[str, str]:
            data = (await self.client.get_balances(tenant=TENANT)).raise_for_error().data
            left = {b.remaining.unit.value: b.remaining.amount for b in data.balances}
            return usd(left.get("USD_MICROCENTS", 0)), f"{left.get('RISK_POINTS', 0)} pts"

        def _show(self, *row: str) -> None:
            self.rows.append((str(len(self.rows) + 1), *row))
            if self.live is not None:
                self.live.update(_table(self.rows))

        async def begin(self, run_id: Hashable, call_id: Hashable, event: Any) -> AdapterCall:
            try:
                call = await super().begin(run_id, call_id, event)
            except CyclesError as error:
                code = getattr(error, "error_code", None) or type(error).__name__
                left = await self._left()
                self._show(self._name(event), "—", "—", *left, f"[bold red]DENIED[/] {code}")
                raise
            if call.estimate is None:
                self._show(self._name(event), "free", "—", *await self._left(), "not metered")
            return call

        async def end(
            self, run_id: Hashable, call_id: Hashable, result: Any = None
        ) -> AdapterCall | None:
            call = await super().end(run_id, call_id, result)
            if call is not None and call.estimate is not None and call.plan is not None:
                used = self.usage(result)
                if used is not None:
                    used = dataclasses.replace(used, model=call.plan.model)
                amount = call.estimate.amount if used is None else self._pricer.cost(used)
                unit = call.estimate.unit.value

                def shown(n: int) -> str:
                    return usd(n) if unit == "USD_MICROCENTS" else f"{n} pts"

                name = f"tool {call.plan.name}" if call.plan.is_tool else "model gpt-4o-mini"
                held, left = shown(call.estimate.amount), await self._left()
                self._show(name, held, shown(amount or 0), *left, f"[green]{call.outcome}[/]")
            await asyncio.sleep(self.delay_s)
            return call

    return ShowingHooks


def _add_risk_budget(server: EmbeddedServer) -> None:
    with httpx.Client(
        base_url=server.base_url, headers={"X-Admin-API-Key": server.admin_key}, timeout=10
    ) as admin:
        body = {"tenant_id": TENANT, "scope": f"tenant:{TENANT}", "unit": "RISK_POINTS"}
        body["allocated"] = {"unit": "RISK_POINTS", "amount": RISK_BUDGET}  # type: ignore[assignment]
        admin.post("/v1/admin/budgets", json=body).raise_for_status()


def run_agent_demo(
    *, delay_s: float = 0.35, real: bool = False, console: Console | None = None
) -> int:
    """Run the demo; return 0 when the budget stopped the third email before it was sent."""
    from agents import Runner, set_tracing_disabled

    from runcycles import AsyncCyclesClient, BudgetExceededError, CyclesConfig

    set_tracing_disabled(not real)
    console = console or Console(width=None if Console().is_terminal else 110)
    started, sent = time.perf_counter(), list[str]()
    with embedded_server() as server:
        console.print(f"[bold]Embedded Cycles server[/] listening on {server.base_url} (SQLite)")
        api_key = provision(server, TENANT, AGENT_BUDGET)
        _add_risk_budget(server)
        console.print(
            f"Tenant [bold]{TENANT}[/]: {usd(AGENT_BUDGET)} for model calls, {RISK_BUDGET} risk "
            f"points for tools (send_email costs 50)\n"
        )
        config = CyclesConfig(base_url=server.base_url, api_key=api_key, tenant=TENANT)

        async def run() -> str | None:
            async with AsyncCyclesClient(config) as client:
                hooks = _hooks_class()(client=client, tool_estimates=TOOL_RISK, fail_open=False)
                hooks.rows, hooks.delay_s = [], delay_s
                with Live(_table(hooks.rows), console=console, refresh_per_second=20) as live:
                    hooks.live = live
                    try:
                        result = await Runner.run(_agent(real, sent), TASK, hooks=hooks)
                    except BudgetExceededError as error:
                        return str(error.error_code)
                    finally:
                        await hooks.release_pending("demo_over")
                console.print(f"\nThe agent finished: {result.final_output}")
                return None

        denied = asyncio.run(run())
        with httpx.Client(base_url=server.base_url, timeout=10) as plain:
            balances = plain.get(
                "/v1/balances", params={"tenant": TENANT}, headers={"X-Cycles-API-Key": api_key}
            ).json()["balances"]
    console.print()
    final = Table(title="Final balances", title_justify="left")
    for column in ("scope", "unit", "allocated", "spent", "reserved", "remaining"):
        final.add_column(column, justify="left" if column in ("scope", "unit") else "right")
    for b in balances:
        amounts = [(b.get(k) or {}).get("amount", 0) for k in ("allocated", "spent", "reserved")]
        amounts.append(b["remaining"]["amount"])
        in_usd = b["remaining"]["unit"] == "USD_MICROCENTS"
        final.add_row(
            b["scope_path"],
            b["remaining"]["unit"],
            *(usd(a) if in_usd else str(a) for a in amounts),
        )
    console.print(final)
    elapsed = time.perf_counter() - started
    if denied is None or len(sent) > 2:
        console.print(f"\n[red]The budget did not stop the agent ({len(sent)} emails sent).[/]")
        return 1
    console.print(
        f"\n{len(sent)} emails sent; the next send_email was denied before it ran ({denied}). "
        f"Runner.run raised BudgetExceededError. Done in {elapsed:.1f} s."
    )
    return 0
