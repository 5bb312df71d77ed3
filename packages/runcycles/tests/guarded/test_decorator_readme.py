"""The seed README's decorator, context, default-client, dry-run and overage examples, as written.

Each example's code is copied verbatim (inside a function); respx routes its real httpx
clients to the in-memory fake server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import respx

from runcycles.testing import no_backoff

BASE_URL = "http://localhost:7878"


@pytest.fixture
def server(fake: Any) -> Iterator[Any]:
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as router:
        router.route().mock(side_effect=fake.handler)
        yield fake


def test_quick_start_decorator(server: Any) -> None:
    server.caps = {"max_tokens": 50}

    from runcycles import CyclesClient, CyclesConfig, CyclesMetrics, cycles, get_cycles_context

    config = CyclesConfig(
        base_url="http://localhost:7878",
        api_key="your-api-key",
        tenant="acme",
    )
    client = CyclesClient(config)

    @cycles(
        estimate=lambda prompt, tokens: tokens * 10,
        actual=lambda result: len(result) * 5,
        action_kind="llm.completion",
        action_name="gpt-4",
        client=client,
    )
    def call_llm(prompt: str, tokens: int) -> str:
        # Access the reservation context inside the guarded function
        ctx = get_cycles_context()
        if ctx and ctx.has_caps():
            tokens = min(tokens, ctx.caps.max_tokens or tokens)  # type: ignore[union-attr]

        result = f"Response to: {prompt}"

        # Report metrics (included in the commit)
        if ctx:
            ctx.metrics = CyclesMetrics(tokens_input=tokens, tokens_output=len(result))

        return result

    result = call_llm("Hello", tokens=100)

    assert result == "Response to: Hello"
    (create,) = server.creates()
    assert create["estimate"] == {"unit": "USD_MICROCENTS", "amount": 1_000}
    assert create["subject"] == {"tenant": "acme"}
    assert create["action"] == {"kind": "llm.completion", "name": "gpt-4"}
    (commit,) = server.commits()
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": len(result) * 5}
    assert commit["metrics"]["tokens_input"] == 50  # capped by ctx.caps.max_tokens
    assert commit["metrics"]["tokens_output"] == len(result)
    client.close()


async def test_async_support(server: Any) -> None:
    from runcycles import AsyncCyclesClient, CyclesConfig, cycles

    config = CyclesConfig(base_url="http://localhost:7878", api_key="your-api-key")
    client = AsyncCyclesClient(config)

    @cycles(estimate=1000, client=client)
    async def call_llm(prompt: str) -> str:
        return f"Response to: {prompt}"

    # In an async context:
    result = await call_llm("Hello")

    assert result == "Response to: Hello"
    assert server.creates()[0]["subject"] == {"tenant": "acme"}  # the API key's tenant
    assert server.commits()[0]["actual"]["amount"] == 1000
    await client.aclose()


async def test_default_client_and_config(server: Any) -> None:
    from runcycles import CyclesClient, CyclesConfig, cycles, set_default_client, set_default_config

    # Option 1: Set a config (client created lazily)
    set_default_config(
        CyclesConfig(base_url="http://localhost:7878", api_key="your-key", tenant="acme")
    )

    @cycles(estimate=1000)
    def my_func() -> str:
        return "hello"

    assert my_func() == "hello"

    # Option 2: Set an explicit client
    set_default_client(
        CyclesClient(CyclesConfig(base_url="http://localhost:7878", api_key="your-key"))
    )

    # Now @cycles works without client=
    @cycles(estimate=1000)
    def my_func2() -> str:
        return "hello"

    @cycles(estimate=1000)
    async def my_async_func() -> str:
        return "hello async"

    assert my_func2() == "hello"  # this config has no tenant: the API key's is used
    assert await my_async_func() == "hello async"
    assert server.statuses() == ["COMMITTED"] * 3
    assert all(body["subject"] == {"tenant": "acme"} for body in server.creates())


def test_typed_exceptions(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server.reject = (409, "BUDGET_EXCEEDED")
    from runcycles import (
        BudgetExceededError,
        CyclesClient,
        CyclesConfig,
        CyclesProtocolError,
        cycles,
    )

    config = CyclesConfig(base_url="http://localhost:7878", api_key="your-key")
    client = CyclesClient(config)

    @cycles(estimate=1000, client=client)
    def guarded_func() -> str:
        return "result"

    try:
        guarded_func()
    except BudgetExceededError:
        print("Budget exhausted — degrade or queue")
    except CyclesProtocolError as e:
        if e.is_retryable() and e.retry_after_ms:
            print(f"Retry after {e.retry_after_ms}ms")
        print(f"Protocol error: {e}, code: {e.error_code}")

    assert capsys.readouterr().out == "Budget exhausted — degrade or queue\n"

    server.reject = (429, "LIMIT_EXCEEDED")
    with no_backoff() as delays:  # the client retries the 429 first; do not sleep in tests
        try:
            guarded_func()
        except BudgetExceededError:
            print("Budget exhausted — degrade or queue")
        except CyclesProtocolError as e:
            if e.is_retryable() and e.retry_after_ms:
                print(f"Retry after {e.retry_after_ms}ms")
            print(f"Protocol error: {e}, code: {e.error_code}")
    assert len(delays) == 4  # retried with the same key before giving up
    assert "code: LIMIT_EXCEEDED" in capsys.readouterr().out
    assert len({body["idempotency_key"] for body in server.creates()[1:]}) == 1
    client.close()


def test_dry_run(server: Any) -> None:
    from runcycles import CyclesClient, CyclesConfig, DryRunResult, cycles

    config = CyclesConfig(base_url="http://localhost:7878", api_key="your-key")
    client = CyclesClient(config)

    @cycles(estimate=1000, dry_run=True, client=client)
    def shadow_func() -> str:
        return "result"

    outcome = shadow_func()
    assert isinstance(outcome, DryRunResult)
    assert server.reservations == {}  # no budget held or consumed
    client.close()


def test_overage_policies(server: Any) -> None:
    from runcycles import CommitOveragePolicy, CyclesClient, CyclesConfig, cycles

    config = CyclesConfig(base_url="http://localhost:7878", api_key="your-key")
    client = CyclesClient(config)

    # REJECT (default) — commit fails if budget is insufficient for the overage
    # ALLOW_IF_AVAILABLE — commit succeeds if remaining budget covers the overage
    # ALLOW_WITH_OVERDRAFT — commit always succeeds, may create debt

    @cycles(estimate=1000, overage_policy="ALLOW_WITH_OVERDRAFT", client=client)
    def overdraft_func() -> str:
        return "result"

    assert overdraft_func() == "result"
    assert server.creates()[0]["overage_policy"] == CommitOveragePolicy.ALLOW_WITH_OVERDRAFT.value
    client.close()
