"""``cycles demo``: a governed loop of model calls against an embedded server, offline.

What it shows, in about ten seconds and with no API key:

1. an embedded Cycles server starts in this process (SQLite in a temporary folder);
2. a tenant gets a small budget (half a US cent) through the admin API;
3. a loop of ``@cycles``-guarded calls to a scripted fake model runs: each call *reserves* its
   worst case (prompt tokens plus ``max_tokens`` at the model's price), the model runs, and the
   real usage is *committed*; a live table shows each reservation, commit and the remaining
   budget;
4. the budget runs out: the next reservation is denied with ``BudgetExceededError`` and the
   model is **not called** (the demo counts model invocations to prove it);
5. the final balances are printed.

Set ``OPENAI_API_KEY`` and pass ``--real`` to call a real model instead of the fake one (needs
``pip install openai``); everything else stays the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from runcycles_server.roles import AGENT_PERMISSIONS

__all__ = ["FakeModel", "ModelReply", "embedded_server", "run_demo"]

# gpt-4o-mini list prices: $0.15 per million input tokens, $0.60 per million output tokens.
# 1 USD = 10**8 USD_MICROCENTS, so one input token costs 15 microcents, one output token 60.
INPUT_MICROCENTS_PER_TOKEN: Final = 15
OUTPUT_MICROCENTS_PER_TOKEN: Final = 60
MAX_TOKENS: Final = 1_500
DEMO_BUDGET: Final = 500_000  # half a US cent: seven calls of the demo model
DEMO_TENANT: Final = "demo-tenant"
PROMPTS: Final = (
    "Summarise the refund policy for a customer",
    "Draft a reply to ticket #4512 (late delivery)",
    "Classify this email: 'Where is my order?'",
    "Translate the shipping FAQ into Spanish",
    "Write a follow-up for an unanswered ticket",
    "Extract the order number from the chat log",
    "Suggest three upsell products for order #991",
    "Rewrite the apology email in a warmer tone",
    "Summarise yesterday's 40 support tickets",
    "Draft release notes for the help-center update",
    "Answer: can I change my delivery address?",
    "Propose a macro for password-reset requests",
    "Explain the warranty terms in plain words",
    "Write a short survey for resolved tickets",
    "Outline a training doc for new agents",
    "Summarise the escalation policy",
)


@dataclass(frozen=True)
class ModelReply:
    """What a model call returned, with its token usage."""

    text: str
    tokens_input: int
    tokens_output: int

    @property
    def cost_microcents(self) -> int:
        """The call's real cost at the demo model's prices."""
        return (
            self.tokens_input * INPUT_MICROCENTS_PER_TOKEN
            + self.tokens_output * OUTPUT_MICROCENTS_PER_TOKEN
        )


class FakeModel:
    """A scripted stand-in for a chat model: deterministic text and token counts."""

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, prompt: str, max_tokens: int) -> ModelReply:
        """Answer ``prompt`` with a canned reply whose length depends on the prompt."""
        self.calls += 1
        tokens_output = min(max_tokens, 350 + (len(prompt) * 37) % 900)
        return ModelReply(
            text=f"[fake model] reply to {prompt!r} ({tokens_output} tokens)",
            tokens_input=estimate_prompt_tokens(prompt),
            tokens_output=tokens_output,
        )


class OpenAIModel:
    """The real-model path, used only with ``--real`` and the user's own ``OPENAI_API_KEY``."""

    def __init__(self, model: str = "gpt-4o-mini") -> None:
        from openai import OpenAI  # type: ignore[import-not-found,unused-ignore]

        self._client = OpenAI()
        self._model = model
        self.calls = 0

    def complete(self, prompt: str, max_tokens: int) -> ModelReply:
        """Call the model and return its text and real usage."""
        self.calls += 1
        answer = self._client.chat.completions.create(
            model=self._model,
            max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}],
        )
        usage = answer.usage
        if usage is None:
            raise RuntimeError(f"{self._model} returned no usage; the demo cannot price the call")
        return ModelReply(
            text=answer.choices[0].message.content or "",
            tokens_input=usage.prompt_tokens,
            tokens_output=usage.completion_tokens,
        )


def estimate_prompt_tokens(prompt: str) -> int:
    """Rough token count of a prompt (about four characters a token, plus chat overhead)."""
    return len(prompt) // 4 + 12


def worst_case_microcents(prompt: str, max_tokens: int = MAX_TOKENS) -> int:
    """What a call can cost at most: its prompt plus ``max_tokens`` of output."""
    return (
        estimate_prompt_tokens(prompt) * INPUT_MICROCENTS_PER_TOKEN
        + max_tokens * OUTPUT_MICROCENTS_PER_TOKEN
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class EmbeddedServer:
    """Where the embedded server listens, and its admin key."""

    base_url: str
    admin_key: str


@contextlib.contextmanager
def embedded_server(db_path: Path | None = None) -> Iterator[EmbeddedServer]:
    """Run a Cycles server (SQLite store) on a free loopback port in a background thread."""
    import secrets

    import uvicorn

    from runcycles_server.app import create_app
    from runcycles_server.stores.sqlite import SqliteStore

    with tempfile.TemporaryDirectory(prefix="cycles-demo-") as folder:
        admin_key = "adm_" + secrets.token_urlsafe(18)
        store = SqliteStore(db_path or Path(folder) / "cycles.db")
        app = create_app(store, admin_api_key=admin_key)
        port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="cycles-demo-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded Cycles server did not start")
            time.sleep(0.01)
        try:
            yield EmbeddedServer(f"http://127.0.0.1:{port}", admin_key)
        finally:
            server.should_exit = True
            thread.join(timeout=10)


def provision(server: EmbeddedServer, tenant: str, budget: int) -> str:
    """Create ``tenant`` with a USD budget of ``budget`` microcents; return a new agent key."""
    with httpx.Client(
        base_url=server.base_url, headers={"X-Admin-API-Key": server.admin_key}, timeout=10
    ) as admin:
        admin.post(
            "/v1/admin/tenants", json={"tenant_id": tenant, "name": "Demo"}
        ).raise_for_status()
        key = admin.post(  # an agent key: it can spend the budget, never refill it
            "/v1/admin/api-keys",
            json={"tenant_id": tenant, "name": "demo", "permissions": list(AGENT_PERMISSIONS)},
        )
        key.raise_for_status()
        admin.post(
            "/v1/admin/budgets",
            json={
                "tenant_id": tenant,
                "scope": f"tenant:{tenant}",
                "unit": "USD_MICROCENTS",
                "allocated": {"unit": "USD_MICROCENTS", "amount": budget},
            },
        ).raise_for_status()
        secret: str = key.json()["key_secret"]
        return secret


def usd(microcents: int) -> str:
    """Format USD_MICROCENTS as dollars with six decimals."""
    return f"${microcents / 10**8:,.6f}"


def _table(rows: list[tuple[str, ...]], remaining: int, budget: int) -> Table:
    table = Table(title=f"Governed model calls — budget {usd(budget)}", title_justify="left")
    for name, justify in (
        ("#", "right"),
        ("prompt", "left"),
        ("reserved", "right"),
        ("committed", "right"),
        ("remaining", "right"),
        ("outcome", "left"),
    ):
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=True,
            overflow="ellipsis",
            max_width=30 if name == "prompt" else None,
            min_width=9 if justify == "right" and name != "#" else None,
        )
    for row in rows:
        table.add_row(*row)
    table.caption = f"remaining budget: {usd(remaining)}"
    return table


def run_demo(
    *,
    budget: int = DEMO_BUDGET,
    delay_s: float = 0.25,
    real: bool = False,
    console: Console | None = None,
) -> int:
    """Run the demo; return 0 when the budget stopped the loop as expected."""
    from runcycles import (
        BudgetExceededError,
        CyclesClient,
        CyclesConfig,
        CyclesMetrics,
        cycles,
        get_cycles_context,
    )

    console = console or Console(width=None if Console().is_terminal else 100)
    model: Any = OpenAIModel() if real else FakeModel()
    started = time.perf_counter()
    with embedded_server() as server:
        console.print(f"[bold]Embedded Cycles server[/] listening on {server.base_url} (SQLite)")
        api_key = provision(server, DEMO_TENANT, budget)
        console.print(f"Tenant [bold]{DEMO_TENANT}[/] funded with {usd(budget)}\n")
        config = CyclesConfig(base_url=server.base_url, api_key=api_key, tenant=DEMO_TENANT)
        with CyclesClient(config) as client:

            @cycles(
                estimate=lambda prompt: worst_case_microcents(prompt),
                actual=lambda reply: reply.cost_microcents,
                action_kind="llm.completion",
                action_name="openai:gpt-4o-mini",
                agent="support-bot",
                client=client,
            )
            def ask(prompt: str) -> ModelReply:
                reply: ModelReply = model.complete(prompt, MAX_TOKENS)
                context = get_cycles_context()
                if context is not None:
                    context.metrics = CyclesMetrics(
                        tokens_input=reply.tokens_input, tokens_output=reply.tokens_output
                    )
                return reply

            def remaining() -> int:
                balances = client.get_balances(tenant=DEMO_TENANT).raise_for_error().data
                return balances.balances[0].remaining.amount

            rows: list[tuple[str, ...]] = []
            left = remaining()
            denied_before_running = False
            with Live(_table(rows, left, budget), console=console, refresh_per_second=20) as live:
                for number, prompt in enumerate(PROMPTS * 4, start=1):
                    estimate = worst_case_microcents(prompt)
                    calls_before = model.calls
                    try:
                        reply = ask(prompt)
                    except BudgetExceededError as error:
                        denied_before_running = model.calls == calls_before
                        rows.append(
                            (
                                str(number),
                                prompt,
                                usd(estimate),
                                "—",
                                usd(left),
                                f"[bold red]DENIED[/] {error.error_code}",
                            )
                        )
                        live.update(_table(rows, left, budget))
                        break
                    left = remaining()
                    rows.append(
                        (
                            str(number),
                            prompt,
                            usd(estimate),
                            usd(reply.cost_microcents),
                            usd(left),
                            "[green]committed[/]",
                        )
                    )
                    live.update(_table(rows, left, budget))
                    time.sleep(delay_s)

            balances = client.get_balances(tenant=DEMO_TENANT).raise_for_error().data
            console.print("\n[bold]Final balances[/]")
            final = Table()
            for column in ("scope", "allocated", "spent", "reserved", "remaining"):
                final.add_column(column, justify="left" if column == "scope" else "right")
            for balance in balances.balances:
                final.add_row(
                    balance.scope_path,
                    usd(balance.allocated.amount if balance.allocated else 0),
                    usd(balance.spent.amount if balance.spent else 0),
                    usd(balance.reserved.amount if balance.reserved else 0),
                    usd(balance.remaining.amount),
                )
            console.print(final)
    elapsed = time.perf_counter() - started
    committed = len(rows) - 1 if denied_before_running else len(rows)
    console.print(
        f"\n{committed} calls committed; the next one was stopped before the model ran "
        f"({model.calls} model invocations in all). Done in {elapsed:.1f} s."
        if denied_before_running
        else "\n[red]The budget never stopped the loop — something is wrong.[/]"
    )
    return 0 if denied_before_running else 1


def main() -> None:  # pragma: no cover - thin CLI shim
    """Entry point used by ``cycles demo``."""
    raise SystemExit(run_demo(real=bool(os.environ.get("CYCLES_DEMO_REAL"))))
