"""What a real server records parses into the client's typed event models, on both stores.

A budget driven past 80 % and 95 % and then exhausted is listed by ``/v1/admin/events`` and
``/v1/events``; ``runcycles.EventListResponse`` reads both pages, every event of a known type
gets its typed payload, and one of them survives a signed delivery round trip unchanged.
"""

from __future__ import annotations

import httpx

from runcycles import (
    EventDataBudgetThreshold,
    EventListResponse,
    EventType,
    sign_delivery,
    verify_delivery,
)
from runcycles_server.roles import AGENT_PERMISSIONS
from runcycles_server.testing import ProvisionedTenant, ServerProcess


def _reserve(server: ServerProcess, tenant: ProvisionedTenant, key: str, amount: int) -> int:
    answer = httpx.post(
        f"{server.base_url}/v1/reservations",
        headers={"X-Cycles-API-Key": tenant.api_key},
        json={
            "idempotency_key": key,
            "subject": {"tenant": tenant.tenant_id},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": "USD_MICROCENTS", "amount": amount},
        },
    )
    return answer.status_code


def test_recorded_events_parse_into_typed_models(server: ServerProcess) -> None:
    tenant = server.provision(budget=1_000, permissions=[*AGENT_PERMISSIONS, "events:read"])
    assert _reserve(server, tenant, "a", 850) == 200  # 0 -> 85 %: crosses 80 %
    assert _reserve(server, tenant, "b", 150) == 200  # -> 100 %: 95 %, 100 %, exhausted
    admin = httpx.get(
        f"{server.base_url}/v1/admin/events",
        headers={"X-Admin-API-Key": server.admin_key},
        params={"tenant_id": tenant.tenant_id},
    )
    assert admin.status_code == 200, admin.text
    page = EventListResponse.model_validate(admin.json())
    own = httpx.get(f"{server.base_url}/v1/events", headers={"X-Cycles-API-Key": tenant.api_key})
    assert own.status_code == 200, own.text
    visible = [e for e in page.events if e.category in ("budget", "reservation", "tenant")]
    assert EventListResponse.model_validate(own.json()).events == visible  # no api_key events
    assert {e.event_type for e in page.events} >= {
        EventType.TENANT_CREATED,
        EventType.API_KEY_CREATED,
        EventType.BUDGET_CREATED,
    }

    crossed = [e for e in page.events if e.event_type == EventType.BUDGET_THRESHOLD_CROSSED]
    payloads = [e.payload for e in crossed]
    assert all(isinstance(p, EventDataBudgetThreshold) for p in payloads)
    assert sorted(
        (p.threshold, p.direction) for p in payloads if isinstance(p, EventDataBudgetThreshold)
    ) == [(0.8, "rising"), (0.95, "rising"), (1.0, "rising")]
    exhausted = [e for e in page.events if e.event_type == EventType.BUDGET_EXHAUSTED]
    assert len(exhausted) == 1
    assert isinstance(exhausted[0].payload, EventDataBudgetThreshold)
    assert exhausted[0].payload.remaining == 0
    assert all(e.payload is not None for e in page.events if e.data is not None)

    event = exhausted[0]
    body = event.encode()
    headers = sign_delivery(body, "whsec_e2e", event_id=event.event_id, event_type=event.event_type)
    assert verify_delivery(body, headers, "whsec_e2e") == event
