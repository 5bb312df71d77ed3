"""Run the seed README's quick start with the built wheels only (``nox -s packaging``).

Run with the Python of a fresh virtualenv holding the three wheels and nothing from this
workspace: ``python packaging_check.py SEED_README``. It starts a server from the installed
``runcycles-server``, provisions the quick start's tenant, puts a scripted model in place of
OpenAI's, and runs the quick start block as written.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import sys
import types
from pathlib import Path

from agents import set_tracing_disabled
from agents.models.multi_provider import MultiProvider

import runcycles_openai_agents
from runcycles_openai_agents.testing import ScriptedModel, reply
from runcycles_server.testing import ServerProcess


def main(seed: Path) -> None:
    assert "site-packages" in runcycles_openai_agents.__file__, runcycles_openai_agents.__file__
    blocks = re.findall(r"```python\n(.*?)```", seed.read_text(), flags=re.S)
    (quick_start,) = [b for b in blocks if 'name="case-resolver"' in b]
    set_tracing_disabled(True)
    MultiProvider.get_model = lambda self, name=None: ScriptedModel([[reply("resolved")]])  # type: ignore[method-assign,misc]
    with ServerProcess.start(store="sqlite") as server:
        tenant = server.provision(tenant_id="acme-corp", budget=10**9)
        tenant.add_budget(1_000, unit="RISK_POINTS")
        os.environ.update(CYCLES_BASE_URL=server.base_url, CYCLES_API_KEY=tenant.api_key)
        code = compile(quick_start, "<quick start>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        assert code.co_flags & inspect.CO_COROUTINE
        namespace: dict[str, object] = {"__name__": "quick_start"}
        asyncio.run(types.FunctionType(code, namespace)())
        print("quick start ran from the wheels:", namespace["result"].final_output)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
