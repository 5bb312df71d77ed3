"""The README's first command: ``cycles demo`` runs a governed loop until the budget stops it."""

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
