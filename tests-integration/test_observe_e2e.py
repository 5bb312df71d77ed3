"""Observe mode and registry action kinds, client side, against real servers (both stores).

Observe mode requested per call (``observe_mode="OBSERVE"``) and a tenant an operator put in
observe mode (``PATCH /v1/admin/tenants/{id}``): guarded code runs whatever the server would
have decided (a budget denial here), nothing is held, committed or released (the ledger does
not move), the server records what it observed, and ``ENFORCE`` still enforces. And the
adapters' tool calls reach the server under the registry's kinds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runcycles import (
    ActionKindDeniedError,
    AsyncCyclesAdapter,
    BudgetExceededError,
    CallPlan,
    CyclesAdapter,
    Decision,
    cycles,
    get_cycles_context,
    reserve,
)
from runcycles_server.testing import ProvisionedTenant, ServerProcess

BUDGET = 1_000
OVER = 5_000  # every reservation of this estimate would be denied (BUDGET_EXCEEDED)


class Tools(CyclesAdapter[str, Any]):
    framework = "e2e-tools"

    def plan(self, event: str) -> CallPlan | None:
        return self.tool_plan(event)


class AsyncTools(AsyncCyclesAdapter[str, Any]):
    framework = "e2e-tools"

    def plan(self, event: str) -> CallPlan | None:
        return self.tool_plan(event)


@pytest.fixture
def small(server: ServerProcess) -> ProvisionedTenant:
    return server.provision(budget=BUDGET)


def _ledger(tenant: ProvisionedTenant) -> tuple[int, int, int]:
    """(remaining, reserved, spent) of the tenant's budget."""
    with tenant.client() as observer:
        (balance,) = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data.balances
    return (
        balance.remaining.amount,
        balance.reserved.amount if balance.reserved else 0,
        balance.spent.amount if balance.spent else 0,
    )


def _observed_operations(server: ServerProcess, tenant: ProvisionedTenant) -> list[str]:
    logs = server.admin("GET", "/v1/admin/audit/logs", params={"tenant_id": tenant.tenant_id})
    return sorted(e["operation"] for e in logs["logs"] if "observed" in e["operation"])


def _observe_tenant(server: ServerProcess, tenant: ProvisionedTenant, mode: str) -> None:
    answer = server.admin(
        "PATCH", f"/v1/admin/tenants/{tenant.tenant_id}", json={"observe_mode": mode}
    )
    assert answer["observe_mode"] == mode


def _run_everything(tenant: ProvisionedTenant, observe_mode: str | None = None) -> list[str]:
    """A guard, ``@cycles`` and an adapter, each over the budget; return what ran."""
    ran: list[str] = []
    with tenant.client() as client:
        with reserve(
            client,
            estimate=OVER,
            action_kind="message.email.send",
            action_name="smtp",
            observe_mode=observe_mode,
        ) as guard:
            ran.append("guard")
            assert guard.observed is not None
            assert guard.observed.decision is Decision.DENY
            assert guard.observed.reason_code == "BUDGET_EXCEEDED"
            assert guard.observed.deny_detail is not None
            assert guard.reservation_id is None
            assert guard.commit(OVER).outcome == "observed"

        @cycles(
            OVER, actual=OVER, action_kind="web.search", client=client, observe_mode=observe_mode
        )
        def search() -> str:
            context = get_cycles_context()
            assert context is not None
            assert context.observed
            ran.append("decorator")
            return "found"

        assert search() == "found"
        adapter = Tools(client, default_tool_estimate=OVER, observe_mode=observe_mode)
        tool = "send_email"
        assert adapter.wrap("run-1", "c1", tool, lambda c: ran.append("tool"), tool=tool) is None
        assert [d.decision for d in adapter.decisions] == [Decision.DENY]
        assert adapter.decisions[0].action_kind == "message.email.send"
    return ran


def test_a_requested_observe_runs_guarded_code_over_budget_and_moves_nothing(
    server: ServerProcess, small: ProvisionedTenant
) -> None:
    ran = _run_everything(small, observe_mode="OBSERVE")
    assert ran == ["guard", "decorator", "tool"]
    assert _ledger(small) == (BUDGET, 0, 0)
    assert _observed_operations(server, small) == ["reservation.observed_denied"] * 3
    with small.client() as client, pytest.raises(BudgetExceededError):  # without it: enforced
        reserve(client, estimate=OVER, action_kind="web.search", action_name="s").start()


def test_a_tenant_in_observe_mode_runs_code_that_sends_no_mode(
    server: ServerProcess, small: ProvisionedTenant
) -> None:
    _observe_tenant(server, small, "OBSERVE")
    ran = _run_everything(small)
    assert ran == ["guard", "decorator", "tool"]
    with (
        small.client() as client,
        reserve(client, estimate=400, action_kind="web.search", action_name="s") as allowed,
    ):
        assert allowed.observed is not None
        assert allowed.decision is Decision.ALLOW
        allowed.commit(300)
    assert _ledger(small) == (BUDGET, 0, 0)
    assert _observed_operations(server, small) == [
        "reservation.observed_allowed",
        *["reservation.observed_denied"] * 3,
    ]
    # a request's ENFORCE overrides the tenant's OBSERVE: denied, or really held and charged
    with small.client() as client:
        with pytest.raises(BudgetExceededError):
            reserve(
                client, estimate=OVER, action_kind="web.search", action_name="s",
                observe_mode="ENFORCE",
            ).start()  # fmt: skip
        with reserve(
            client, estimate=400, action_kind="web.search", action_name="s",
            observe_mode="ENFORCE",
        ) as live:  # fmt: skip
            assert live.observed is None
            assert live.reservation_id
            assert live.commit(300).outcome == "committed"
    assert _ledger(small) == (BUDGET - 300, 0, 300)
    _observe_tenant(server, small, "ENFORCE")
    with small.client() as client, pytest.raises(BudgetExceededError):
        reserve(client, estimate=OVER, action_kind="web.search", action_name="s").start()


def test_async_guards_decorator_and_adapters_observe_the_tenants_mode(
    server: ServerProcess, small: ProvisionedTenant
) -> None:
    _observe_tenant(server, small, "OBSERVE")
    ran: list[str] = []

    async def main() -> None:
        async with small.async_client() as client:
            async with reserve(
                client, estimate=OVER, action_kind="llm.completion", action_name="m"
            ) as guard:
                ran.append("guard")
                assert guard.observed is not None
                assert (await guard.settle(OVER)) is not None

            @cycles(OVER, client=client)
            async def work() -> str:
                ran.append("decorator")
                return "done"

            assert await work() == "done"
            adapter = AsyncTools(client, default_tool_estimate=OVER)
            call = await adapter.begin("run-1", "c1", "stripe_charge")
            assert call.mode == "dry_run"
            assert call.decision is Decision.DENY
            ran.append("tool")
            await adapter.end("run-1", "c1")
            assert adapter.decisions[0].action_kind == "payment.charge"

    asyncio.run(main())
    assert ran == ["guard", "decorator", "tool"]
    assert _ledger(small) == (BUDGET, 0, 0)


def test_adapter_tool_calls_reach_the_server_under_registry_kinds(
    tenant: ProvisionedTenant,
) -> None:
    with tenant.client() as client:
        adapter = Tools(client, default_tool_estimate=100)
        for n, tool in enumerate(["send_email", "search_docs", "lookup_order"]):
            adapter.wrap("run-1", f"c{n}", tool, lambda call: None, tool=tool)
        rows = client.list_reservations(tenant=tenant.tenant_id).raise_for_error().data
    kinds = {row.action.name: row.action.kind for row in rows.reservations}
    assert kinds == {
        "send_email": "message.email.send",
        "search_docs": "web.search",
        "lookup_order": "unknown.call",
    }
    assert {row.status.value for row in rows.reservations} == {"COMMITTED"}


def test_a_deny_list_stops_a_tool_by_the_kind_of_its_name_and_observe_lets_it_run(
    server: ServerProcess, tenant: ProvisionedTenant
) -> None:
    """What registry kinds are for: a policy names ``message.email.send``, not a tool."""
    server.admin(
        "POST",
        "/v1/admin/policies",
        json={
            "tenant_id": tenant.tenant_id,
            "name": "no-email",
            "scope_pattern": f"tenant:{tenant.tenant_id}",
            "denied_action_kinds": ["message.email.send"],
        },
    )
    ran: list[str] = []
    with tenant.client() as client:
        adapter = Tools(client, default_tool_estimate=100)
        with pytest.raises(ActionKindDeniedError) as denied:
            adapter.wrap("run-1", "c1", "send_email", lambda c: ran.append("email"))
        assert denied.value.deny_detail is not None
        adapter.wrap("run-1", "c2", "search_docs", lambda c: ran.append("search"))
        assert ran == ["search"]
        observing = Tools(client, default_tool_estimate=100, observe_mode="OBSERVE")
        observing.wrap("run-2", "c1", "send_email", lambda c: ran.append("email"))
        assert ran == ["search", "email"]
        (decision,) = observing.decisions
        assert decision.result.reason_code == "ACTION_KIND_DENIED"
    assert _observed_operations(server, tenant) == ["reservation.observed_denied"]
