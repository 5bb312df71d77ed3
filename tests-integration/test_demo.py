"""The README's first command: ``cycles demo`` runs a governed agent until the budget stops it."""

from __future__ import annotations

import io

from rich.console import Console

from runcycles_server.demo import DEMO_BUDGET, FakeModel, run_demo, worst_case_microcents


def test_demo_stops_the_loop_before_the_model_runs():
    out = io.StringIO()
    code = run_demo(delay_s=0, console=Console(file=out, width=120))
    text = out.getvalue()
    assert code == 0, text
    assert "DENIED BUDGET_EXCEEDED" in text
    assert "the next one was stopped before the model ran" in text
    assert "reserved" in text
    assert "remaining" in text


def test_demo_budget_allows_several_calls_but_not_endless_ones():
    model = FakeModel()
    reply = model.complete("Summarise the refund policy for a customer", 1_500)
    # every call commits less than it reserves, and the budget covers several calls
    assert 0 < reply.cost_microcents < worst_case_microcents("x" * 44)
    assert 3 * worst_case_microcents("x" * 44) < DEMO_BUDGET < 40 * reply.cost_microcents


def test_agent_demo_stops_the_third_email_before_it_is_sent():
    from runcycles_server.agent_demo import run_agent_demo

    out = io.StringIO()
    code = run_agent_demo(delay_s=0, console=Console(file=out, width=140))
    text = out.getvalue()
    assert code == 0, text
    assert "DENIED BUDGET_EXCEEDED" in text
    assert "2 emails sent; the next send_email was denied before it ran" in text
    assert text.count("tool send_email") == 3  # two committed, the third denied
    assert "Final balances" in text
    assert (
        "│ tenant:demo-agents │ RISK_POINTS    │       120 │       103 │         0 │        17 │"
        in text
    )


def test_cycles_demo_runs_the_agent_by_default():
    from typer.testing import CliRunner

    from runcycles_server.cli import cli

    result = CliRunner().invoke(cli, ["demo", "--delay", "0"])
    assert result.exit_code == 0, result.output
    assert "tool send_email" in result.output
    loop = CliRunner().invoke(cli, ["demo", "--loop", "--delay", "0"])
    assert loop.exit_code == 0, loop.output
    assert "Governed model calls" in loop.output
