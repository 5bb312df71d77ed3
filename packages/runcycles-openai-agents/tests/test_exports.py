from __future__ import annotations

import runcycles_openai_agents


def test_public_names_are_sorted_and_importable():
    names = runcycles_openai_agents.__all__
    assert names == sorted(names)
    assert names == [
        "BudgetExceededError",
        "CyclesRunHooks",
        "ToolEstimateConfig",
        "ToolEstimateMap",
        "ToolNotAllowedError",
        "ToolRiskConfig",
        "ToolRiskMap",
        "cycles_budget_guardrail",
    ]
    for name in names:
        assert getattr(runcycles_openai_agents, name) is not None
