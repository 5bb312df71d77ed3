"""Fixtures for the server tests: a fake clock, a store, the ASGI app and a client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles_server.app import create_app
from runcycles_server.stores.base import Store
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.sqlite import SqliteStore

ADMIN_KEY = "test-admin-key"
START_MS = 1_800_000_000_000


class FakeClock:
    """A settable epoch-ms clock; tests move time with advance() instead of sleeping."""

    def __init__(self, now_ms: int = START_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    if request.param == "sqlite":
        yield SqliteStore(tmp_path / "cycles.db", clock=clock)
    elif request.param == "redis":
        # Skips when Redis is unreachable, fails instead when CYCLES_REQUIRE_REDIS=1.
        from runcycles_server.stores.redis_testing import redis_store_for_tests_sync

        with redis_store_for_tests_sync(clock=clock) as redis_store:
            yield redis_store
    else:
        yield MemoryStore(clock=clock)


class SyncClient:
    """A synchronous facade over ``httpx.AsyncClient`` + ``ASGITransport`` (one private loop)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self._client.aclose())
        self.loop.close()


@pytest.fixture
def client(store: Store) -> Iterator[SyncClient]:
    app = create_app(store, admin_api_key=ADMIN_KEY, sweep_interval_s=None, max_body_bytes=64_000)
    sync_client = SyncClient(app)
    yield sync_client
    sync_client.run(store.close())
    sync_client.close()


class Api:
    """Small helpers over the test client for provisioning and calling the runtime API."""

    def __init__(self, client: SyncClient) -> None:
        self.client = client
        self.admin_headers = {"X-Admin-API-Key": ADMIN_KEY}

    def admin(self, method: str, path: str, expect: int | None = None, **kwargs: Any) -> Any:
        response = self.client.request(method, path, headers=self.admin_headers, **kwargs)
        if expect is not None:
            assert response.status_code == expect, response.text
        return response.json()

    def tenant(self, tenant_id: str = "acme", **fields: Any) -> str:
        """Create a tenant and return a fresh API key secret for it."""
        self.admin(
            "POST", "/v1/admin/tenants", json={"tenant_id": tenant_id, "name": tenant_id, **fields}
        )
        key = self.admin(
            "POST", "/v1/admin/api-keys", 201, json={"tenant_id": tenant_id, "name": "test"}
        )
        return str(key["key_secret"])

    def budget(
        self, tenant_id: str, scope: str, amount: int, unit: str = "USD_MICROCENTS", **fields: Any
    ) -> Any:
        return self.admin(
            "POST",
            "/v1/admin/budgets",
            201,
            json={
                "tenant_id": tenant_id,
                "scope": scope,
                "unit": unit,
                "allocated": {"unit": unit, "amount": amount},
                **fields,
            },
        )

    def fund(
        self,
        tenant_id: str,
        scope: str,
        operation: str,
        amount: int,
        unit: str = "USD_MICROCENTS",
        expect: int = 200,
        **fields: Any,
    ) -> Any:
        return self.admin(
            "POST",
            "/v1/admin/budgets/fund",
            expect,
            params={"scope": scope, "unit": unit, "tenant_id": tenant_id},
            json={"operation": operation, "amount": {"unit": unit, "amount": amount}, **fields},
        )

    def balance(self, key: str, scope: str, unit: str = "USD_MICROCENTS") -> dict[str, Any]:
        tenant = scope.split("/")[0].split(":")[1]
        response = self.client.get(
            "/v1/balances",
            params={"tenant": tenant, "limit": 200},
            headers={"X-Cycles-API-Key": key},
        )
        assert response.status_code == 200, response.text
        for item in response.json()["balances"]:
            if item["scope_path"] == scope and item["remaining"]["unit"] == unit:
                return dict(item)
        raise AssertionError(f"no balance for {scope}")

    def post(self, key: str, path: str, body: dict[str, Any], **headers: str) -> Any:
        return self.client.post(path, json=body, headers={"X-Cycles-API-Key": key, **headers})


@pytest.fixture
def api(client: SyncClient) -> Api:
    return Api(client)


@pytest.fixture
def make_api(store: Store) -> Iterator[Callable[..., Api]]:
    """Build the app over ``store`` with extra ``create_app`` options; return its :class:`Api`."""
    clients: list[SyncClient] = []

    def make(**options: Any) -> Api:
        options.setdefault("sweep_interval_s", None)
        sync_client = SyncClient(create_app(store, admin_api_key=ADMIN_KEY, **options))
        clients.append(sync_client)
        return Api(sync_client)

    yield make
    for sync_client in clients:
        sync_client.run(store.close())
        sync_client.close()


@pytest.fixture
def acme(api: Api) -> str:
    """Tenant acme with a 1,000,000 USD_MICROCENTS tenant budget; returns its API key."""
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000_000)
    return key


Counter = Callable[[], str]


@pytest.fixture
def idem() -> Counter:
    n = 0

    def next_key() -> str:
        nonlocal n
        n += 1
        return f"k-{n}"

    return next_key
