"""An async client outlives event loops: each loop's connections close when that loop ends.

Pooled connections belong to the loop that opened them. A client used under one
``asyncio.run`` and never closed (as in the published README's async example) must neither
leak those sockets nor fail on the next loop.
"""

from __future__ import annotations

import asyncio
import gc

import httpx

from runcycles import AsyncCyclesClient
from runcycles_server.testing import ProvisionedTenant


def test_each_loops_connections_close_with_it(tenant: ProvisionedTenant) -> None:
    client: AsyncCyclesClient = tenant.async_client(journal_enabled=False)

    async def balances() -> httpx.AsyncClient:
        pool = client.http_client
        (await client.get_balances(tenant=tenant.tenant_id)).raise_for_error()
        return pool

    first_pool = asyncio.run(balances())
    assert first_pool.is_closed  # closed at the loop's shutdown, not left to the GC
    second_pool = asyncio.run(balances())  # a new loop, a new pool: still works
    assert second_pool is not first_pool
    assert second_pool.is_closed

    async def close() -> None:
        await client.aclose()

    asyncio.run(close())
    assert client.http_client.is_closed
    gc.collect()  # an unclosed socket would raise ResourceWarning here (warnings are errors)
