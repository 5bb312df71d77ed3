"""Cycles budget authority for LangChain.

``CyclesCallbackHandler`` budgets every model and tool call of any runnable, sync or async;
``CyclesBudgetMiddleware`` gates the model and tool calls of a ``create_agent``
agent, applies the budget's caps to each model request and ends a run cleanly on exhaustion.
"""

from __future__ import annotations

from runcycles import BudgetExceededError
from runcycles_langchain._hooks import ToolNotAllowedError
from runcycles_langchain.handler import CyclesCallbackHandler
from runcycles_langchain.middleware import CyclesBudgetMiddleware

__all__ = [
    "BudgetExceededError",
    "CyclesBudgetMiddleware",
    "CyclesCallbackHandler",
    "ToolNotAllowedError",
]
