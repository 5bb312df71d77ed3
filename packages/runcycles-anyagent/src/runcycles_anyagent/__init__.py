"""Cycles budget authority for any-agent: one callback for every backend.

``CyclesBudgetCallback`` reserves before every model and tool call of a run, commits the
priced usage after, and releases what a failed run left open; ``BudgetExceeded`` (an
``AgentCancel`` and a ``BudgetExceededError``) stops the run before a call the budget cannot
cover.
"""

from __future__ import annotations

from runcycles import BudgetExceededError
from runcycles_anyagent.callback import (
    DEFAULT_LLM_ESTIMATE,
    BudgetExceeded,
    CyclesBudgetCallback,
    ToolNotAllowed,
)

__all__ = [
    "BudgetExceeded",
    "BudgetExceededError",
    "CyclesBudgetCallback",
    "DEFAULT_LLM_ESTIMATE",
    "ToolNotAllowed",
]
