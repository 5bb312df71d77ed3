"""Fixtures for the core client tests: a respx router and both clients behind one facade."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import respx

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig
from runcycles.testing.fake_server import FakeCyclesServer

BASE_URL = "http://cycles.test"
API_KEY = "test-api-key"


def make_config(**overrides: Any) -> CyclesConfig:
    values: dict[str, Any] = {"base_url": BASE_URL, "api_key": API_KEY}
    values.update(overrides)
    return CyclesConfig(**values)


class Api:
    """Call a sync or an async client the same way: ``await api.method(...)``.

    ``await api.collect(name, **filters)`` drains an iterator method into a list.
    """

    def __init__(self, client: CyclesClient | AsyncCyclesClient) -> None:
        self.client = client
        self.is_async = isinstance(client, AsyncCyclesClient)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return call

    async def collect(self, name: str, **filters: Any) -> list[Any]:
        iterator = getattr(self.client, name)(**filters)
        if self.is_async:
            return [item async for item in iterator]
        return list(iterator)

    async def close(self) -> None:
        if isinstance(self.client, AsyncCyclesClient):
            await self.client.aclose()
        else:
            self.client.close()


@pytest.fixture(autouse=True)
def journal_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Default journals go to a per-test directory, never the user's state dir.

    Clients replay their journal partition when they start, so a shared directory would let
    one test's leftovers send requests in another.
    """
    path = tmp_path / "default-journal"
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(path))
    return path


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as mock:
        yield mock


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_api(flavour: str) -> AsyncIterator[Any]:
    """Build an :class:`Api` over the parametrized client flavour from config overrides."""
    created: list[Api] = []

    def build(**overrides: Any) -> Api:
        config = make_config(**overrides)
        client = AsyncCyclesClient(config) if flavour == "async" else CyclesClient(config)
        api = Api(client)
        created.append(api)
        return api

    yield build
    for api in created:
        await api.close()


@pytest.fixture
def api(make_api: Any) -> Api:
    built: Api = make_api()
    return built


@pytest.fixture
def config_factory() -> Any:
    return make_config


@pytest.fixture
def server() -> FakeCyclesServer:
    """An in-memory Cycles server (the adapter tests talk to it)."""
    return FakeCyclesServer()
