"""Which webhook storage goes with which ledger store (one storage object per store)."""

from __future__ import annotations

import weakref
from typing import Any

from runcycles_server.ledger import LedgerError
from runcycles_server.stores.base import Store
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.redis import RedisStore
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.webhooks.redis_storage import RedisWebhookStorage
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
    elif isinstance(store, RedisStore):
        found = RedisWebhookStorage(store)
    else:
        raise LedgerError(
            "INVALID_REQUEST", f"webhooks are not supported on {type(store).__name__}", status=501
        )
    _CACHE[store] = found
    return found
