"""The one place tests decide what to do when Redis is not there.

Tests that need Redis get a :class:`~runcycles_server.stores.redis.RedisStore` on
``CYCLES_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) under a fresh, unique key
prefix, and every key under that prefix is deleted afterwards (never ``FLUSHDB``/``FLUSHALL``,
so parallel runs and other users of the database are untouched)::

    @pytest.fixture
    async def store():
        async with redis_store_for_tests() as store:
            yield store

If Redis is unreachable the test is **skipped** with the reason, except when the environment
sets ``CYCLES_REQUIRE_REDIS=1`` (CI does): then it **fails**, so a broken CI Redis can never
turn the Redis suite silently green.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, NoReturn

from runcycles_server.stores.base import Clock
from runcycles_server.stores.redis import RedisStore

__all__ = [
    "DEFAULT_TEST_REDIS_URL",
    "REQUIRE_ENV",
    "redis_store_for_tests",
    "redis_store_for_tests_sync",
    "redis_test_url",
    "redis_unavailable",
    "require_redis",
    "unique_test_prefix",
]

REQUIRE_ENV: Final = "CYCLES_REQUIRE_REDIS"
URL_ENV: Final = "CYCLES_TEST_REDIS_URL"
DEFAULT_TEST_REDIS_URL: Final = "redis://127.0.0.1:6379/15"


def redis_test_url() -> str:
    """Return the Redis URL tests use (``CYCLES_TEST_REDIS_URL``, default db 15 on loopback)."""
    return os.environ.get(URL_ENV, DEFAULT_TEST_REDIS_URL)


def unique_test_prefix() -> str:
    """Return a fresh key prefix, unique to one test."""
    return f"cyclestest-{uuid.uuid4().hex[:16]}"


def redis_unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it when ``CYCLES_REQUIRE_REDIS=1``.

    Raises:
        pytest.skip.Exception: Redis is optional here.
        pytest.fail.Exception: Redis is required (``CYCLES_REQUIRE_REDIS=1``).
    """
    import pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but Redis is unusable: {reason}", pytrace=False)
    pytest.skip(f"Redis not reachable ({reason}); set {URL_ENV} or start redis-server")


@asynccontextmanager
async def redis_store_for_tests(
    *,
    clock: Clock | None = None,
    prefix: str | None = None,
    url: str | None = None,
    **options: Any,
) -> AsyncIterator[RedisStore]:
    """Open a store under a unique prefix, yield it, then delete its keys and close it.

    Args:
        clock: the store clock (default: Redis server time).
        prefix: reuse a prefix (e.g. a second store sharing the first one's data); the
            store that *created* the prefix should be the one that cleans it up.
        url: Redis URL (default :func:`redis_test_url`).
        **options: passed to :class:`RedisStore` (e.g. ``max_connections``).
    """
    url = url or redis_test_url()
    owner = prefix is None
    store = RedisStore(url, prefix=prefix or unique_test_prefix(), clock=clock, **options)
    if not await store.ping():
        await store.close()
        redis_unavailable(f"no answer from {url}")
    try:
        yield store
    finally:
        try:
            if owner:
                await store.delete_all_keys()
        finally:
            await store.close()


def _ping_sync(url: str) -> str | None:
    """Return why Redis at ``url`` is unusable, or ``None`` if it answers."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{url}: {exc}"
    finally:
        client.close()
    return None


def _delete_prefix_sync(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch: list[Any] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


def require_redis(url: str | None = None) -> str:
    """Return the test Redis URL if it answers; otherwise skip (or fail, see above)."""
    url = url or redis_test_url()
    problem = _ping_sync(url)
    if problem is not None:
        redis_unavailable(problem)
    return url


@contextmanager
def redis_store_for_tests_sync(
    *, clock: Clock | None = None, url: str | None = None, **options: Any
) -> Iterator[RedisStore]:
    """Like :func:`redis_store_for_tests`, for synchronous fixtures.

    Checks Redis with a synchronous ping (skip or fail as described above), yields a store
    that has not connected yet (its pool connects in whatever event loop first uses it; the
    caller closes it there), and afterwards deletes its keys with a synchronous client.
    """
    url = require_redis(url)
    store = RedisStore(url, prefix=unique_test_prefix(), clock=clock, **options)
    try:
        yield store
    finally:
        _delete_prefix_sync(url, store.prefix)
