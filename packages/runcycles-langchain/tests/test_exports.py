from __future__ import annotations

import runcycles_langchain
from runcycles import BudgetExceededError, CyclesError
from runcycles_langchain import *  # noqa: F403  (what a star import gives is the public API)


def test_the_public_api():
    public = {"BudgetExceededError", "CyclesBudgetMiddleware", "CyclesCallbackHandler"}
    assert set(runcycles_langchain.__all__) == {*public, "ToolNotAllowedError"}
    assert sorted(runcycles_langchain.__all__) == runcycles_langchain.__all__
    assert BudgetExceededError is runcycles_langchain.BudgetExceededError
    assert issubclass(ToolNotAllowedError, CyclesError)  # noqa: F405
