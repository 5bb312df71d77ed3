"""The adapter base and action governance: registry kinds for tools, policy keys, observe mode.

Against the in-memory :class:`FakeCyclesServer`; the real server (both stores) is in
``tests-integration/test_observe_e2e.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from runcycles import (
    ActionPolicyKeys,
    AsyncCyclesAdapter,
    CallPlan,
    CyclesAdapter,
    CyclesConfigError,
    Decision,
    Unit,
    action_kinds,
)
from runcycles.adapters import ToolEstimateConfig, ToolEstimateMap, call_idempotency_key
from runcycles.testing.fake_server import FakeCyclesServer

SENDGRID = ActionPolicyKeys(host="api.sendgrid.com", recipient_domain="example.com")


class Tools(CyclesAdapter[Any, Any]):
    """Every event is a tool name, planned from ``tool_estimates``."""

    framework = "tools"

    def plan(self, event: Any) -> CallPlan | None:
        return event if isinstance(event, CallPlan) else self.tool_plan(event)


class AsyncTools(AsyncCyclesAdapter[Any, Any]):
    framework = "tools"

    def plan(self, event: Any) -> CallPlan | None:
        return event if isinstance(event, CallPlan) else self.tool_plan(event)


def _actions(server: FakeCyclesServer) -> list[dict[str, Any]]:
    return [body["action"] for body in server.posts("/v1/reservations")]


# ---------------------------------------------------------------------------- action kinds


@pytest.mark.parametrize(
    ("tool", "kind"),
    [
        ("send_email", "message.email.send"),
        ("search_docs", "web.search"),
        ("stripe_charge", "payment.charge"),
        ("Send_Email_Now", "message.email.send"),
        ("frobnicate", "unknown.call"),
    ],
)
def test_a_tool_plan_carries_the_registry_kind_of_its_name(tool: str, kind: str) -> None:
    assert CallPlan.tool(tool).kind == kind == action_kinds.kind_for_tool(tool)
    assert CallPlan.tool(tool, kind="custom.acme.erp.post").kind == "custom.acme.erp.post"
    assert CallPlan.llm("gpt-4o").kind == action_kinds.LLM_COMPLETION


def test_tool_estimate_maps_default_to_the_registry_and_an_explicit_kind_wins() -> None:
    mapping = ToolEstimateMap(
        {
            "send_email": ToolEstimateConfig(5, policy_keys=SENDGRID),
            "update_crm": ToolEstimateConfig(2, action_kinds.CRM_RECORD_WRITE),
        }
    )
    assert mapping.lookup("send_email") == ToolEstimateConfig(
        5, "message.email.send", Unit.RISK_POINTS, SENDGRID
    )
    assert mapping.lookup("update_crm").action_kind == "crm.record.write"
    assert mapping.lookup("anything").action_kind == "unknown.call"


def test_a_malformed_tool_kind_fails_where_it_is_configured() -> None:
    with pytest.raises(CyclesConfigError, match=r"capital letters.*'tool\.crm'"):
        ToolEstimateConfig(1, "Tool.CRM")


def test_adapters_send_the_kinds_and_policy_keys_of_their_tools() -> None:
    server = FakeCyclesServer()
    mapping = ToolEstimateMap(
        {
            "send_email": ToolEstimateConfig(5, policy_keys=SENDGRID),
            "update_crm": ToolEstimateConfig(2, action_kinds.CRM_RECORD_WRITE),
        }
    )
    with server.client() as client:
        plain = Tools(client, default_tool_estimate=1)
        mapped = Tools(client, tool_estimates=mapping)
        for n, (adapter, tool) in enumerate(
            [
                (plain, "send_email"),
                (plain, "lookup"),
                (mapped, "send_email"),
                (mapped, "update_crm"),
            ]
        ):
            adapter.wrap("run", f"c{n}", tool, lambda call: None, tool=tool)
    assert _actions(server) == [
        {"kind": "message.email.send", "name": "send_email"},
        {"kind": "unknown.call", "name": "lookup"},
        {
            "kind": "message.email.send",
            "name": "send_email",
            "policy_keys": {"host": "api.sendgrid.com", "recipient_domain": "example.com"},
        },
        {"kind": "crm.record.write", "name": "update_crm"},
    ]


# ---------------------------------------------------------------------------- observe mode


@pytest.mark.parametrize("source", ["option", "tenant"])
def test_observe_mode_runs_every_call_like_a_dry_run_and_holds_nothing(
    source: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeCyclesServer(budget=10)  # every call is over budget: would be DENY
    options: dict[str, Any] = {"default_tool_estimate": 100}
    if source == "option":
        options["observe_mode"] = "OBSERVE"
    else:
        server.observe_mode = "OBSERVE"
    ran: list[Any] = []
    with server.client() as client, caplog.at_level(logging.WARNING, "runcycles"):
        adapter = Tools(client, **options)
        for n in range(3):
            result = adapter.wrap("run", f"c{n}", "send_email", ran.append, tool="send_email")
            assert result is None
        # with the option nothing is sent; a tenant's mode the adapter cannot know beforehand
        recorded = adapter.record_event("run", "a->b", kind=action_kinds.AGENT_DELEGATE)
        assert recorded is (source == "tenant")
        call = adapter.begin("run", "c9", "send_email")
        assert call.mode == "dry_run"
        assert call.allows_tool()
        assert adapter.end("run", "c9") is call
    assert len(ran) == 3
    assert [d.decision for d in adapter.decisions] == [Decision.DENY] * 4
    assert adapter.decisions[0].result.deny_detail is not None
    assert server.remaining() == 10
    paths = [c.path for c in server.calls if c.path != "/v1/events"]
    assert paths == ["/v1/reservations"] * 4  # no commit, no release
    bodies = server.posts("/v1/reservations")
    assert all("dry_run" not in body for body in bodies)
    assert [body.get("observe_mode") for body in bodies] == (
        ["OBSERVE"] * 4 if source == "option" else [None] * 4
    )
    operation = "observe" if source == "option" else "reserve"
    assert bodies[0]["idempotency_key"] == call_idempotency_key("tools", "run", "c0", operation)
    assert caplog.text.count("observe mode: message.email.send 'send_email' would be DENY") == 4


async def test_the_async_adapter_observes_and_enforce_overrides_the_tenant() -> None:
    server = FakeCyclesServer(budget=10, observe_mode="OBSERVE")
    async with server.async_client() as client:
        shadow = AsyncTools(client, default_tool_estimate=100, observe_mode="OBSERVE")
        call = await shadow.begin("run", "c1", "send_email")
        assert call.mode == "dry_run"
        assert call.decision is Decision.DENY
        await shadow.end("run", "c1")
        enforcing = AsyncTools(client, default_tool_estimate=100, observe_mode="ENFORCE")
        with pytest.raises(Exception, match="BUDGET_EXCEEDED"):
            await enforcing.begin("run", "c2", "send_email")
    assert server.posts("/v1/reservations")[-1]["observe_mode"] == "ENFORCE"
    assert server.remaining() == 10


def test_an_outage_in_observe_mode_lets_the_call_run_unguarded() -> None:
    server = FakeCyclesServer(outage=True)
    with server.client() as client:
        adapter = Tools(client, default_tool_estimate=1, observe_mode="OBSERVE")
        call = adapter.begin("run", "c1", "lookup")
    assert call.mode == "unguarded"
    assert adapter.unguarded_calls == 1


def test_a_bad_observe_mode_fails_where_the_adapter_is_made() -> None:
    with (
        FakeCyclesServer().client() as client,
        pytest.raises(CyclesConfigError, match=r"observe_mode='shadow'.*'OBSERVE'"),
    ):
        Tools(client, observe_mode="shadow")
