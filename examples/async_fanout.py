"""Fan out 50 concurrent tool calls against one shared budget, without overspending it.

Run it with ``uv run --all-packages python examples/async_fanout.py``. The budget covers 20
calls' worst case; 50 tasks race for it. The server's atomic ledger grants exactly the
reservations the budget can hold; the others are refused before their tool runs, and
whatever happens, ``spent + reserved`` never passes the allocation.
"""

from __future__ import annotations

import asyncio

from _local import cycles_config, tenant_of

from runcycles import AsyncCyclesClient, BudgetExceededError, cycles

WORST_CASE = 5_000  # µ¢ a search may cost
BUDGET = 20 * WORST_CASE
TASKS = 50


async def main() -> None:
    with cycles_config(budget=BUDGET) as config:
        async with AsyncCyclesClient(config) as client:
            ran = 0

            @cycles(
                estimate=WORST_CASE,
                actual=WORST_CASE,
                action_kind="tool.search",
                action_name="web-search",
                client=client,
            )
            async def search(query: str) -> str:
                nonlocal ran
                ran += 1
                await asyncio.sleep(0.05)  # the tool's own latency
                return f"results for {query}"

            async def one(i: int) -> bool:
                try:
                    await search(f"query {i}")
                except BudgetExceededError:
                    return False
                return True

            outcomes = await asyncio.gather(*(one(i) for i in range(TASKS)))
            granted = sum(outcomes)
            balances = (await client.get_balances(tenant=tenant_of(config))).data
            assert balances is not None
            scope = balances.balances[0]
            spent = scope.spent.amount if scope.spent else 0
            reserved = scope.reserved.amount if scope.reserved else 0
            allocated = scope.allocated.amount if scope.allocated else 0
            print(f"{TASKS} concurrent calls: {granted} ran, {TASKS - granted} refused up front")
            print(f"spent {spent:,} µ¢ of {allocated:,} µ¢, reserved {reserved:,} µ¢")
            assert ran == granted
            assert spent + reserved <= allocated


if __name__ == "__main__":
    asyncio.run(main())
