"""Cycles budget authority for the OpenAI Agents SDK.

``CyclesRunHooks`` reserves before every model and tool call of a run and commits what it used;
``cycles_budget_guardrail`` checks the budget before the run starts; ``ToolEstimateMap`` says
what each tool holds.
"""

from __future__ import annotations

from runcycles import BudgetExceededError
from runcycles_openai_agents.guardrail import cycles_budget_guardrail
from runcycles_openai_agents.hooks import CyclesRunHooks, ToolNotAllowedError
from runcycles_openai_agents.tools import (
    ToolEstimateConfig,
    ToolEstimateMap,
    ToolRiskConfig,
    ToolRiskMap,
)

__all__ = [
    "BudgetExceededError",
    "CyclesRunHooks",
    "ToolEstimateConfig",
    "ToolEstimateMap",
    "ToolNotAllowedError",
    "ToolRiskConfig",
    "ToolRiskMap",
    "cycles_budget_guardrail",
]
