from __future__ import annotations

from any_agent import AgentCancel

import runcycles_anyagent
from runcycles import BudgetExceededError


def test_public_names_are_sorted_and_importable():
    names = runcycles_anyagent.__all__
    assert names == sorted(names)
    assert names == [
        "BudgetExceeded",
        "BudgetExceededError",
        "CyclesBudgetCallback",
        "DEFAULT_LLM_ESTIMATE",
        "ToolNotAllowed",
    ]
    for name in names:
        assert getattr(runcycles_anyagent, name) is not None


def test_budget_exceeded_is_both_an_agent_cancel_and_a_budget_error():
    error = runcycles_anyagent.BudgetExceeded("no budget", status=409, error_code="BUDGET_EXCEEDED")
    assert isinstance(error, AgentCancel)
    assert isinstance(error, BudgetExceededError)
    assert error.trace is None  # any-agent sets it when the run stops
    assert error.error_code == "BUDGET_EXCEEDED"
