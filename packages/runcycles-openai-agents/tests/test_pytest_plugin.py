"""The pytest plugin's fixtures, as a user's test suite sees them (no conftest needed)."""

from __future__ import annotations

from agents import Agent, Runner

from runcycles_openai_agents import CyclesRunHooks
from runcycles_openai_agents.testing import reply, tool_call


async def test_fixtures_run_a_governed_agent(cycles_tenant, scripted_model):
    model = scripted_model([[tool_call("lookup")], [reply("ok")]], name="tiny")
    assert model.model == "tiny"
    assert len(model.turns) == 2
    async with cycles_tenant.async_client() as client:
        hooks = CyclesRunHooks(client=client, fail_open=False)
        result = await Runner.run(
            Agent(name="a", model=scripted_model([[reply("ok")]])), "hi", hooks=hooks
        )
        assert result.final_output == "ok"
        data = (await client.get_balances(tenant=cycles_tenant.tenant_id)).raise_for_error().data
    units = {b.remaining.unit.value: b for b in data.balances}
    assert set(units) == {"USD_MICROCENTS", "RISK_POINTS"}
    spent = units["USD_MICROCENTS"].spent
    assert spent is not None
    assert spent.amount > 0
