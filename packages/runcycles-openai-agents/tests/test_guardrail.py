"""cycles_budget_guardrail: a blocking decide before the run, and a client it never leaks."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import httpx
import pytest
from agents import Agent, InputGuardrailTripwireTriggered, Runner

from runcycles import AsyncCyclesClient, CyclesConfig
from runcycles_openai_agents import cycles_budget_guardrail, guardrail
from runcycles_openai_agents.testing import ScriptedModel, reply

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="k", tenant="acme")


class RecordingClient(AsyncCyclesClient):
    """An AsyncCyclesClient on a scripted /v1/decide that records its requests and closes."""

    decision = "ALLOW"
    opened: ClassVar[list[RecordingClient]] = []
    bodies: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, config: CyclesConfig) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            self.bodies.append(json.loads(request.content))
            return httpx.Response(200, json={"decision": self.decision})

        super().__init__(config, transport=httpx.MockTransport(answer))
        self.closed = False
        self.opened.append(self)

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


@pytest.fixture(autouse=True)
def _recording(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingClient.opened, RecordingClient.bodies = [], []
    monkeypatch.setattr(guardrail, "AsyncCyclesClient", RecordingClient)


@pytest.mark.parametrize("decision", ["ALLOW", "DENY"])
async def test_a_guardrail_without_a_client_closes_the_one_it_opens(
    decision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RecordingClient, "decision", decision)
    check = cycles_budget_guardrail(config=CONFIG, estimate=5_000, workflow="triage")
    model = ScriptedModel([[reply("hi")], [reply("hi")]])
    agent = Agent(name="support", model=model, input_guardrails=[check])
    for _ in range(2):
        if decision == "DENY":
            with pytest.raises(InputGuardrailTripwireTriggered):
                await Runner.run(agent, "go")
        else:
            await Runner.run(agent, "go")
    assert len(RecordingClient.opened) == 2
    assert all(client.closed for client in RecordingClient.opened)
    assert len(model.calls) == (2 if decision == "ALLOW" else 0)
    body = RecordingClient.bodies[0]
    assert body["subject"] == {"tenant": "acme", "workflow": "triage", "agent": "support"}
    assert body["estimate"] == {"unit": "USD_MICROCENTS", "amount": 5_000}


def test_a_bad_configuration_fails_when_the_guardrail_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CYCLES_BASE_URL", raising=False)
    monkeypatch.delenv("CYCLES_API_KEY", raising=False)
    with pytest.raises(Exception, match="CYCLES_"):
        cycles_budget_guardrail(estimate=1)
