"""Where the examples find a Cycles server.

With ``CYCLES_BASE_URL`` (and ``CYCLES_API_KEY``, ``CYCLES_TENANT``) set, an example talks to
that server. Without them it starts the embedded server (SQLite in a temporary folder) on a
free loopback port, creates a tenant, an agent API key (runtime permissions only) and a
budget, and stops it at the end, so every example runs offline with nothing else installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from runcycles import CyclesConfig


@contextmanager
def cycles_config(*, budget: int, risk_points: int | None = None) -> Iterator[CyclesConfig]:
    """Yield a client config for a tenant holding at least ``budget`` USD micro-cents.

    With ``risk_points``, the embedded server's tenant also gets a ``RISK_POINTS`` budget (the
    unit tool estimates default to). The config always names its tenant (``config.tenant``);
    see :func:`tenant_of`.
    """
    if os.environ.get("CYCLES_BASE_URL"):
        config = CyclesConfig.from_env()
        if not config.tenant:
            raise SystemExit("set CYCLES_TENANT too: the examples read that tenant's balances")
        yield config
        return
    from runcycles_server.roles import AGENT_PERMISSIONS
    from runcycles_server.testing import ServerProcess

    with ServerProcess.start(store="sqlite") as server:
        # an agent key: it spends the budget but cannot create, fund or change budgets
        tenant = server.provision(
            tenant_id="examples", budget=budget, permissions=AGENT_PERMISSIONS
        )
        if risk_points is not None:
            tenant.add_budget(risk_points, unit="RISK_POINTS")
        print(f"(embedded Cycles server at {server.base_url}, tenant 'examples')")
        yield tenant.config()


def tenant_of(config: CyclesConfig) -> str:
    """Return the tenant a config from :func:`cycles_config` names."""
    assert config.tenant is not None
    return config.tenant
