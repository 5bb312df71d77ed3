"""The Redis seen-event store shown in ``docs/webhooks.md`` works as written, on real Redis.

Two receivers (two stores on one Redis) share the memory of handled events: a delivery
handled by one is refused as a replay by the other, and ``discard`` lets a retry through.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio

from runcycles import (
    AsyncSeenEventStore,
    Event,
    EventType,
    SeenEventStore,
    WebhookReplayError,
    averify_delivery,
    sign_delivery,
    verify_delivery,
)
from runcycles_server.stores.redis_testing import redis_unavailable
from runcycles_server.testing import redis_url_for_tests

PAGE = Path(__file__).resolve().parents[1] / "docs" / "webhooks.md"


def _documented_store(name: str = "RedisSeenEventStore") -> type:
    code = next(
        block
        for block in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
        if f"class {name}" in block
    )
    namespace: dict[str, object] = {"__name__": "docs_webhooks"}
    exec(compile(code, f"{PAGE.name}:{name}", "exec"), namespace)
    store = namespace[name]
    assert isinstance(store, type)
    return store


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(redis_url_for_tests(), socket_connect_timeout=1)
    try:
        client.ping()
    except Exception as exc:  # any failure means "not usable here"
        redis_unavailable(f"{type(exc).__name__}: {exc}")
    yield client
    client.close()


def test_the_documented_redis_store_is_shared_by_receivers(redis_client):
    store = _documented_store()
    first, second = store(redis_client, ttl_s=60), store(redis_client, ttl_s=60)
    assert isinstance(first, SeenEventStore)
    event = Event.new(
        EventType.BUDGET_EXHAUSTED,
        tenant_id="acme",
        source="test",
        event_id=f"evt_{uuid.uuid4().hex}",
    )
    body = event.encode()
    headers = sign_delivery(body, "whsec_x", event_id=event.event_id, event_type=event.event_type)
    try:
        assert verify_delivery(body, headers, "whsec_x", seen=first) == event
        with pytest.raises(WebhookReplayError):
            verify_delivery(body, headers, "whsec_x", seen=second)
        assert 0 < redis_client.ttl(f"cycles:webhook:{event.event_id}") <= 60
        second.discard(event.event_id)
        assert verify_delivery(body, headers, "whsec_x", seen=second) == event
    finally:
        redis_client.delete(f"cycles:webhook:{event.event_id}")


async def test_the_documented_async_redis_store(redis_client):
    store = _documented_store("AsyncRedisSeenEventStore")
    client = redis.asyncio.Redis.from_url(redis_url_for_tests(), socket_connect_timeout=1)
    seen = store(client, ttl_s=60)
    assert isinstance(seen, AsyncSeenEventStore)
    event = Event.new(
        EventType.BUDGET_EXHAUSTED,
        tenant_id="acme",
        source="test",
        event_id=f"evt_{uuid.uuid4().hex}",
    )
    body = event.encode()
    headers = sign_delivery(body, "whsec_x", event_id=event.event_id, event_type=event.event_type)
    try:
        assert await averify_delivery(body, headers, "whsec_x", seen=seen) == event
        with pytest.raises(WebhookReplayError):
            await averify_delivery(body, headers, "whsec_x", seen=seen)
        await seen.discard(event.event_id)
        assert await averify_delivery(body, headers, "whsec_x", seen=seen) == event
    finally:
        await client.delete(f"cycles:webhook:{event.event_id}")
        await client.aclose()
