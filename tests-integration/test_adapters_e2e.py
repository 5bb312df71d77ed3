"""The adapter base class against a real server (SQLite and Redis), sync and async.

A dummy framework adapter makes a few model calls; the tenant's ledger must then hold
exactly the priced usage, to the micro-cent, and replaying a call's callbacks with the same
ids (in the same adapter, and in a fresh one as after a restart) must not charge again: the
server answers the deterministic idempotency key with its stored reservation.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from runcycles import (
    AsyncCyclesAdapter,
    BudgetExceededError,
    CallPlan,
    CyclesAdapter,
    ModelPrice,
    Pricer,
    Usage,
)
from runcycles_server.testing import ProvisionedTenant

PRICER = Pricer(overrides={"tiny-1": ModelPrice(Decimal("0.15"), Decimal("0.6"))}, builtin=False)
USAGES = [Usage(input_tokens=1_234, output_tokens=567), Usage(input_tokens=9, output_tokens=1)]
# 1234 * 0.15 + 567 * 0.6 = 525.3 USD/Mtok-units -> 52,530 µ¢; 9 * 0.15 + 0.6 = 1.95 -> 195 µ¢
EXPECTED = [52_530, 195]


def _plan(event: str | CallPlan) -> CallPlan:
    return event if isinstance(event, CallPlan) else CallPlan.llm(event, max_tokens=1_000)


class Dummy(CyclesAdapter[str | CallPlan, Usage]):
    framework = "dummy-e2e"
    plan = staticmethod(_plan)


class AsyncDummy(AsyncCyclesAdapter[str | CallPlan, Usage]):
    framework = "dummy-e2e"
    plan = staticmethod(_plan)


def _spent_and_reserved(tenant: ProvisionedTenant) -> tuple[int, int]:
    with tenant.client() as observer:
        balances = observer.get_balances(tenant=tenant.tenant_id).data
    assert balances is not None
    (balance,) = balances.balances
    assert balance.spent is not None
    return balance.spent.amount, balance.reserved.amount if balance.reserved else 0


def test_sync_adapter_charges_priced_usage_once(tenant: ProvisionedTenant) -> None:
    with tenant.client() as client:
        adapter = Dummy(client, pricer=PRICER)
        for n, usage in enumerate(USAGES):
            adapter.begin("run-1", f"call-{n}", "tiny-1")
            adapter.end("run-1", f"call-{n}", usage)
        assert _spent_and_reserved(tenant) == (sum(EXPECTED), 0)
        # The framework retries the first call's callbacks: same ids, same adapter ...
        adapter.begin("run-1", "call-0", "tiny-1")
        replayed = adapter.end("run-1", "call-0", USAGES[0])
        assert replayed is not None
        assert replayed.outcome == "already_settled"
        # ... and after a restart, in a fresh adapter on a fresh client.
        with tenant.client() as fresh_client:
            fresh = Dummy(fresh_client, pricer=PRICER)
            fresh.begin("run-1", "call-1", "tiny-1")
            fresh.end("run-1", "call-1", USAGES[1])
        assert _spent_and_reserved(tenant) == (sum(EXPECTED), 0)


async def test_async_adapter_charges_priced_usage_once(tenant: ProvisionedTenant) -> None:
    async with tenant.async_client() as client:
        adapter = AsyncDummy(client, pricer=PRICER)
        for n, usage in enumerate(USAGES):
            await adapter.begin("run-2", f"call-{n}", "tiny-1")
            await adapter.end("run-2", f"call-{n}", usage)
        for n, usage in enumerate(USAGES):  # every callback again, same ids
            await adapter.begin("run-2", f"call-{n}", "tiny-1")
            await adapter.end("run-2", f"call-{n}", usage)
        await adapter.close()
    assert _spent_and_reserved(tenant) == (sum(EXPECTED), 0)


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_real_409_stops_the_call_whatever_fail_open_says(
    tenant: ProvisionedTenant, fail_open: bool
) -> None:
    with tenant.client() as client:
        adapter = Dummy(client, pricer=PRICER, fail_open=fail_open)
        with pytest.raises(BudgetExceededError):
            adapter.begin("run-3", "huge", CallPlan("llm.completion", "x", estimate=10**15))
        assert adapter.pending == []
        assert adapter.unguarded_calls == 0
