"""Run the AnyAgent guide's quick start with the built wheels only (``nox -s packaging``).

Run with the Python of a fresh virtualenv holding the wheels (``runcycles-anyagent[openai]``)
and nothing from this workspace: ``python packaging_check_anyagent.py SEED_GUIDE``. It starts
a server from the installed ``runcycles-server``, provisions the tenant ``acme``, puts a
scripted model in place of OpenAI's (any-agent's openai backend), imports our
``CyclesBudgetCallback`` in place of the guide's hand-written class, and runs the quick start.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agents import set_tracing_disabled
from any_agent.frameworks import openai as openai_backend

import runcycles_anyagent
from runcycles_anyagent.testing import ScriptedModel, reply
from runcycles_server.testing import ServerProcess


def main(guide: Path) -> None:
    assert "site-packages" in runcycles_anyagent.__file__, runcycles_anyagent.__file__
    text = guide.read_text()
    start = text.index("from any_agent import AnyAgent, AgentConfig")
    end = text.index("print(trace.final_output)", start) + len("print(trace.final_output)")
    quick_start = text[start:end]
    set_tracing_disabled(True)
    openai_backend.DEFAULT_MODEL_TYPE = lambda model, **_: ScriptedModel(  # type: ignore[assignment]
        [reply("Budget authority stops spend before it happens.")], model
    )
    with ServerProcess.start(store="sqlite") as server:
        tenant = server.provision(tenant_id="acme", budget=10**9)
        os.environ.update(
            CYCLES_BASE_URL=server.base_url, CYCLES_API_KEY=tenant.api_key, OPENAI_API_KEY="sk-x"
        )
        namespace: dict[str, object] = {"__name__": "quick_start"}
        exec("from runcycles_anyagent import BudgetExceeded, CyclesBudgetCallback", namespace)
        exec(compile(quick_start, "<quick start>", "exec"), namespace)
        with tenant.client() as observer:
            (balance,) = observer.get_balances(tenant="acme").raise_for_error().data.balances
        assert balance.spent is not None, balance
        assert balance.spent.amount > 0, balance
        namespace["client"].close()  # type: ignore[attr-defined]
        print("AnyAgent quick start ran from the wheels; spent", balance.spent.amount)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
