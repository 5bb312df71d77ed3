"""Scale-out on Redis: real ``cycles serve --redis`` processes sharing one Redis.

Skipped without Redis, failed instead under ``CYCLES_REQUIRE_REDIS=1`` (one shared helper:
:func:`runcycles_server.stores.redis_testing.require_redis`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from runcycles_server.stores.redis_testing import require_redis
from runcycles_server.testing import ProvisionedTenant, ServerProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]

U = "USD_MICROCENTS"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    url = require_redis()
    with ServerProcess.start(store="redis", workers=2, redis_url=url) as process:
        yield process


def reserve_body(key: str, amount: int, tenant: str, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
        **extra,
    }


def balance(tenant: ProvisionedTenant) -> dict[str, Any]:
    response = httpx.get(
        f"{tenant.server.base_url}/v1/balances",
        params={"tenant": tenant.tenant_id},
        headers={"X-Cycles-API-Key": tenant.api_key},
    )
    assert response.status_code == 200, response.text
    (row,) = response.json()["balances"]
    return dict(row)


async def _race(tenant: ProvisionedTenant, clients: int, amount: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=tenant.server.base_url,
        headers={"X-Cycles-API-Key": tenant.api_key},
        limits=limits,
        timeout=30,
    ) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(
                        "/v1/reservations", json=reserve_body(f"k{i}", amount, tenant.tenant_id)
                    )
                    for i in range(clients)
                )
            )
        )


def test_two_workers_never_oversubscribe_one_budget(server: ServerProcess) -> None:
    tenant = server.provision(budget=1000, unit=U)
    responses = asyncio.run(_race(tenant, 150, 7))
    statuses = sorted(r.status_code for r in responses)
    granted = [r for r in responses if r.status_code == 200]
    assert len(granted) == 1000 // 7, statuses
    assert {r.json()["error"] for r in responses if r.status_code != 200} == {"BUDGET_EXCEEDED"}
    row = balance(tenant)
    assert row["reserved"]["amount"] == 142 * 7
    assert row["remaining"]["amount"] == 1000 - 142 * 7


def test_the_sweeper_expires_abandoned_reservations(server: ServerProcess) -> None:
    tenant = server.provision(budget=1000, unit=U)
    response = httpx.post(
        f"{server.base_url}/v1/reservations",
        json=reserve_body("lost", 300, tenant.tenant_id, ttl_ms=1000, grace_period_ms=0),
        headers={"X-Cycles-API-Key": tenant.api_key},
    )
    assert response.status_code == 200, response.text
    rid = response.json()["reservation_id"]
    assert balance(tenant)["reserved"]["amount"] == 300
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and balance(tenant)["reserved"]["amount"]:
        time.sleep(0.2)
    row = balance(tenant)
    assert (row["reserved"]["amount"], row["remaining"]["amount"]) == (0, 1000)
    detail = httpx.get(
        f"{server.base_url}/v1/reservations/{rid}",
        headers={"X-Cycles-API-Key": tenant.api_key},
    )
    assert detail.status_code == 410 or detail.json()["status"] == "EXPIRED", detail.text
