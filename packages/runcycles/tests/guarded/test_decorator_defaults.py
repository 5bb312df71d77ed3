"""The default client of ``@cycles``: one default serves sync and async functions alike."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import respx

from runcycles import (
    AsyncCyclesClient,
    CyclesClient,
    CyclesConfigError,
    cycles,
    get_default_async_client,
    get_default_client,
    set_default_client,
    set_default_config,
)

BASE_URL = "http://cycles.test"


@pytest.fixture
def routed(fake: Any) -> Iterator[Any]:
    """Route every httpx client (including ones built lazily from a config) to the fake."""
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as router:
        router.route().mock(side_effect=fake.handler)
        yield fake


@cycles(estimate=10)
def sync_job() -> str:
    return "sync"


@cycles(estimate=20)
async def async_job() -> str:
    return "async"


async def test_default_config_serves_sync_then_async(routed: Any) -> None:
    set_default_config(routed.config())
    assert sync_job() == "sync"
    assert await async_job() == "async"
    assert sync_job() == "sync"
    assert routed.statuses() == ["COMMITTED"] * 3
    assert isinstance(get_default_client(), CyclesClient)
    assert isinstance(get_default_async_client(), AsyncCyclesClient)


async def test_default_config_serves_async_then_sync(routed: Any) -> None:
    set_default_config(routed.config())
    assert await async_job() == "async"
    assert sync_job() == "sync"
    assert await async_job() == "async"
    assert routed.statuses() == ["COMMITTED"] * 3


async def test_explicit_sync_default_also_serves_async(fake: Any, routed: Any) -> None:
    with fake.sync_client() as client:
        set_default_client(client)
        assert await async_job() == "async"  # twin built from client.config
        assert sync_job() == "sync"
        assert get_default_client() is client
    assert routed.statuses() == ["COMMITTED"] * 2


async def test_explicit_async_default_also_serves_sync(fake: Any, routed: Any) -> None:
    async with fake.async_client() as aclient:
        set_default_client(aclient)
        assert sync_job() == "sync"
        assert await async_job() == "async"
        assert get_default_async_client() is aclient


async def test_both_flavours_can_be_set_explicitly(fake: Any) -> None:
    with fake.sync_client() as client:
        async with fake.async_client() as aclient:
            set_default_client(client)
            set_default_client(aclient)
            assert get_default_client() is client
            assert get_default_async_client() is aclient
            assert sync_job() == "sync"
            assert await async_job() == "async"
    assert fake.statuses() == ["COMMITTED"] * 2


def test_a_later_default_takes_effect_for_decorated_functions(fake: Any) -> None:
    first, second = type(fake)(), type(fake)()
    with first.sync_client() as one, second.sync_client() as two:
        set_default_client(one)
        sync_job()
        set_default_client(two)
        sync_job()
    assert len(first.creates()) == 1
    assert len(second.creates()) == 1


def test_no_default_says_what_to_do() -> None:
    with pytest.raises(CyclesConfigError, match="set_default_config"):
        sync_job()


async def test_no_default_async_says_what_to_do() -> None:
    with pytest.raises(CyclesConfigError, match="client="):
        await async_job()


def test_set_default_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="CyclesConfig"):
        set_default_config("http://localhost")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CyclesClient or an AsyncCyclesClient"):
        set_default_client(object())  # type: ignore[arg-type]


def test_async_default_is_per_event_loop(routed: Any) -> None:
    set_default_config(routed.config())

    async def which() -> AsyncCyclesClient:
        await async_job()
        return get_default_async_client()

    first = asyncio.run(which())
    second = asyncio.run(which())
    assert first is not second  # a loop's pooled connections never leak into another loop
    assert routed.statuses() == ["COMMITTED"] * 2


def test_lazily_built_async_client_closes_with_its_loop(routed: Any) -> None:
    set_default_config(routed.config())

    async def run_once() -> AsyncCyclesClient:
        assert await async_job() == "async"
        return get_default_async_client()

    built = asyncio.run(run_once())  # asyncio.run shuts the loop down properly
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(built.get_balances(tenant="acme"))


def test_replacing_the_default_closes_the_sync_client_it_built(routed: Any) -> None:
    set_default_config(routed.config())
    assert sync_job() == "sync"
    built = get_default_client()
    set_default_config(routed.config())
    assert get_default_client() is not built
    with pytest.raises(RuntimeError, match="closed"):
        built.get_balances(tenant="acme")
    assert sync_job() == "sync"


def test_an_explicit_default_client_is_never_closed_by_us(fake: Any) -> None:
    with fake.sync_client() as mine:
        set_default_client(mine)
        set_default_config(None)
        assert mine.get_balances(tenant="acme").status == 404  # still usable
