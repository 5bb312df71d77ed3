"""App wiring: unexpected errors, the background expiry sweep, size limits and CLI factory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles.models import ReservationCreateRequest
from runcycles_server.app import create_app
from runcycles_server.cli import app_from_env, bootstrap_dev
from runcycles_server.ledger import BudgetRow, TenantRow
from runcycles_server.stores.memory import MemoryStore

U = "USD_MICROCENTS"


class ExplodingStore(MemoryStore):
    async def decide(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")


async def test_unexpected_errors_become_structured_500s() -> None:
    store = ExplodingStore()
    key = await bootstrap_dev(store)
    app = create_app(store, sweep_interval_s=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/decide",
            headers={"X-Cycles-API-Key": key},
            json={
                "idempotency_key": "d",
                "subject": {"tenant": "demo"},
                "action": {"kind": "k", "name": "n"},
                "estimate": {"unit": U, "amount": 1},
            },
        )
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "INTERNAL_ERROR"
    assert "disk on fire" not in body["message"]  # internals are logged, not leaked
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["trace_id"] == response.headers["x-cycles-trace-id"]


async def test_background_sweep_expires_reservations() -> None:
    now = [1_000_000]
    store = MemoryStore(clock=lambda: now[0])
    await store.create_tenant(TenantRow("acme", "Acme"))
    await store.create_budget(BudgetRow("tenant:acme", U, "acme", 100, 100, ledger_id="l"))
    request = ReservationCreateRequest.model_validate(
        {
            "idempotency_key": "r",
            "subject": {"tenant": "acme"},
            "action": {"kind": "k", "name": "n"},
            "estimate": {"unit": U, "amount": 40},
            "ttl_ms": 1000,
            "grace_period_ms": 0,
        }
    )
    rid = json.loads((await store.reserve("acme", request, "h")).body)["reservation_id"]
    app = create_app(store, sweep_interval_s=0.01)
    async with app.router.lifespan_context(app):
        now[0] += 1001
        for _ in range(200):
            res = await store.get_reservation(rid)
            if res is not None and res.status == "EXPIRED":
                break
            await asyncio.sleep(0.01)
    res = await store.get_reservation(rid)
    assert res is not None
    assert res.status == "EXPIRED"
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert budget.reserved == 0
    assert budget.remaining == 100


async def test_chunked_bodies_over_the_limit_are_413() -> None:
    store = MemoryStore()
    key = await bootstrap_dev(store)
    app = create_app(store, sweep_interval_s=None, max_body_bytes=1000)

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 200

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/reservations", headers={"X-Cycles-API-Key": key}, content=chunks()
        )
    assert response.status_code == 413
    assert "1000-byte limit" in response.json()["message"]


def test_app_from_env_uses_the_configured_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CYCLES_DB", str(tmp_path / "x.db"))
    monkeypatch.delenv("CYCLES_REDIS_URL", raising=False)
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", "sekret")
    app = app_from_env()
    assert (tmp_path / "x.db").exists()
    asyncio.run(app.state.store.close())
