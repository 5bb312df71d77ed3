"""Run the LangChain page's quick start with the built wheels only (``nox -s packaging``).

Run with the Python of a fresh virtualenv holding the wheels and nothing from this
workspace: ``python packaging_check_langchain.py docs/langchain.md``. It starts a server from
the installed ``runcycles-server``, provisions a tenant, and runs the page's first quick start
(the ``create_agent`` middleware, with the package's scripted model) as written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import runcycles_langchain
from runcycles_server.testing import ServerProcess


def main(page: Path) -> None:
    assert "site-packages" in runcycles_langchain.__file__, runcycles_langchain.__file__
    blocks = re.findall(r"<!-- example: server -->\n```python\n(.*?)```", page.read_text(), re.S)
    (quick_start,) = [b for b in blocks if "CyclesBudgetMiddleware(" in b]
    with ServerProcess.start(store="sqlite") as server:
        tenant = server.provision(budget=10**9)
        os.environ.update(
            CYCLES_BASE_URL=server.base_url,
            CYCLES_API_KEY=tenant.api_key,
            CYCLES_TENANT=tenant.tenant_id,
        )
        namespace: dict[str, object] = {"__name__": "quick_start"}
        exec(compile(quick_start, "<quick start>", "exec"), namespace)
        with tenant.client() as observer:
            balances = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data
        spent = balances.balances[0].spent
        assert spent is not None
        assert spent.amount > 0
        print(f"LangChain quick start ran from the wheels: spent {spent.amount:,} µ¢")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
