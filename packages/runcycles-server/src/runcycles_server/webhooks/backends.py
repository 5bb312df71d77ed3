"""Which webhook storage goes with which ledger store (one storage object per store)."""

from __future__ import annotations

import sys
import weakref
from typing import Any

from runcycles_server.ledger import LedgerError
from runcycles_server.stores.base import Store
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.webhooks.storage import (
    MemoryWebhookStorage,
    SqliteWebhookStorage,
    WebhookStorage,
)

_CACHE: weakref.WeakKeyDictionary[Any, WebhookStorage] = weakref.WeakKeyDictionary()


def storage_for(store: Store) -> WebhookStorage:
    """The webhook storage of ``store`` (the same object for the same store).

    Raises:
        LedgerError: the store keeps no webhooks (a custom store), 501.
    """
    found = _CACHE.get(store)
    if found is not None:
        return found
    if isinstance(store, SqliteStore):
        found = SqliteWebhookStorage(store)
    elif isinstance(store, MemoryStore):
        found = MemoryWebhookStorage(store)
    elif _is_redis(store):
        # Imported only for a Redis store: a SQLite server starts without the Redis client.
        from runcycles_server.webhooks.redis_storage import (
            RedisWebhookStorage,
        )

        found = RedisWebhookStorage(store)  # type: ignore[arg-type]
    else:
        raise LedgerError(
            "INVALID_REQUEST", f"webhooks are not supported on {type(store).__name__}", status=501
        )
    _CACHE[store] = found
    return found


def _is_redis(store: Store) -> bool:
    """Whether ``store`` is a ``RedisStore`` (without importing the Redis client library)."""
    module = sys.modules.get("runcycles_server.stores.redis")
    return module is not None and isinstance(store, module.RedisStore)
