"""Where subscriptions, deliveries and the dispatcher's cursors live, on every store.

Every change goes through :meth:`WebhookStorage.transact`: a function that reads rows from a
:class:`WebhookTxn` and writes through it, run atomically. Writes are buffered in the txn and
applied together at the end, so a function that raises has written nothing, and a store may
run the function again (Redis does, when a row it read changed meanwhile). Like the ledger's
operations (:mod:`runcycles_server.stores.operations`) the logic is written once, in
:mod:`runcycles_server.webhooks.service` and :mod:`runcycles_server.webhooks.dispatch`; a
storage supplies atomicity and a few row primitives:

* :class:`MemoryWebhookStorage` (with :class:`~runcycles_server.stores.memory.MemoryStore`):
  dicts, one process.
* :class:`SqliteWebhookStorage`: tables of schema version 6 in the ledger's database, each
  transaction one ``BEGIN IMMEDIATE`` under the store's writer lock, so several server
  processes on one file share the queue safely.
* :class:`~runcycles_server.webhooks.redis_storage.RedisWebhookStorage`: optimistic
  ``WATCH``/``MULTI`` transactions on keys of one hash slot.

A delivery being sent carries a *lease* (``lease_owner``, ``lease_until_ms``): the dispatcher
that claimed it owns it until the lease ends, after which any dispatcher may take it again. So
a dispatcher that dies mid-delivery loses nothing, and a delivery is sent by one dispatcher at a
time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from runcycles_server.events import EventRecord
from runcycles_server.stores.base import Clock, Page, Store
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.sqlite import SqliteStore, decode_cursor, encode_cursor
from runcycles_server.webhooks.models import (
    OPEN_STATUSES,
    DeliveryRow,
    SecurityConfig,
    SubscriptionRow,
)
from runcycles_server.webhooks.sealing import SecretBox

T = TypeVar("T")
FINAL: Final = ("SUCCESS", "FAILED")
SECURITY_KEY: Final = "security"
"""The state name of the webhook security configuration."""


@dataclass(slots=True)
class DeliveryQuery:
    """Filters of ``GET .../deliveries`` (newest first)."""

    subscription_id: str
    status: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    limit: int = 50
    cursor: str | None = None

    def keeps(self, row: DeliveryRow) -> bool:
        """Whether ``row`` passes the filters (the cursor aside)."""
        at = row.queued_at_ms
        return (
            (self.status is None or row.status == self.status)
            and (self.from_ms is None or at >= self.from_ms)
            and (self.to_ms is None or at <= self.to_ms)
        )


@dataclass(slots=True)
class _Writes:
    subs: dict[str, SubscriptionRow | None] = field(default_factory=dict)
    deliveries: dict[str, tuple[DeliveryRow, DeliveryRow | None]] = field(default_factory=dict)
    dropped_queues: list[str] = field(default_factory=list)
    state: dict[str, bytes] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)


class WebhookTxn(ABC):
    """The rows of one webhook transaction (reads go to the store, writes are buffered)."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.writes = _Writes()

    # -- reads (a storage implements them) ----------------------------------------------------

    @abstractmethod
    async def _sub(self, subscription_id: str) -> SubscriptionRow | None: ...

    @abstractmethod
    async def _subs(self) -> list[SubscriptionRow]: ...

    @abstractmethod
    async def _delivery(self, delivery_id: str) -> DeliveryRow | None: ...

    @abstractmethod
    async def _open(self, subscription_id: str, limit: int) -> list[DeliveryRow]: ...

    @abstractmethod
    async def _state(self, name: str) -> bytes | None: ...

    # -- reads, seeing this txn's own writes --------------------------------------------------

    async def sub(self, subscription_id: str) -> SubscriptionRow | None:
        """A subscription, or ``None``."""
        if subscription_id in self.writes.subs:
            return self.writes.subs[subscription_id]
        return await self._sub(subscription_id)

    async def subs(self) -> list[SubscriptionRow]:
        """Every subscription (any tenant, any status), by id."""
        found = {s.subscription_id: s for s in await self._subs()}
        for sid, row in self.writes.subs.items():
            if row is None:
                found.pop(sid, None)
            else:
                found[sid] = row
        return [found[k] for k in sorted(found)]

    async def delivery(self, delivery_id: str) -> DeliveryRow | None:
        """A delivery, or ``None``."""
        if delivery_id in self.writes.deliveries:
            return self.writes.deliveries[delivery_id][0]
        return await self._delivery(delivery_id)

    async def open_deliveries(self, subscription_id: str, limit: int = 1) -> list[DeliveryRow]:
        """The subscription's first ``limit`` deliveries still to send, in sending order.

        This txn's own writes are not reflected: read before writing.
        """
        return await self._open(subscription_id, limit)

    async def state(self, name: str) -> bytes | None:
        """A named state value (a dispatcher cursor, the security configuration)."""
        if name in self.writes.state:
            return self.writes.state[name]
        return await self._state(name)

    async def security(self) -> SecurityConfig:
        """The webhook security configuration (the spec's defaults until one is saved)."""
        raw = await self.state(SECURITY_KEY)
        return SecurityConfig() if raw is None else SecurityConfig.model_validate_json(raw)

    # -- writes --------------------------------------------------------------------------------

    def put_sub(self, row: SubscriptionRow) -> None:
        """Write a subscription."""
        self.writes.subs[row.subscription_id] = row

    def delete_sub(self, subscription_id: str) -> None:
        """Delete a subscription and cancel its deliveries still to send."""
        self.writes.subs[subscription_id] = None
        self.writes.dropped_queues.append(subscription_id)

    def put_delivery(self, row: DeliveryRow, old: DeliveryRow | None) -> None:
        """Write a delivery (``old``: as read, ``None`` when new)."""
        previous = self.writes.deliveries.get(row.delivery_id)
        self.writes.deliveries[row.delivery_id] = (row, previous[1] if previous else old)

    def put_state(self, name: str, value: bytes) -> None:
        """Write a named state value."""
        self.writes.state[name] = value

    def put_security(self, config: SecurityConfig) -> None:
        """Save the webhook security configuration."""
        self.put_state(SECURITY_KEY, config.model_dump_json().encode())

    def record(self, events: list[EventRecord]) -> None:
        """Write events to the event log with this transaction."""
        self.writes.events += events


class WebhookStorage(ABC):
    """Atomic webhook transactions and read-only listings over one ledger store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock: Clock = store.clock
        self.box: SecretBox | None = None
        """Seals the subscriptions' secrets and header values (``None``: stored plain; see
        :mod:`.sealing`)."""

    def load_sub(self, raw: bytes | str) -> SubscriptionRow:
        """A subscription row from its storage form (opened with :attr:`box`)."""
        return SubscriptionRow.from_json(raw, self.box)

    def dump_sub(self, row: SubscriptionRow) -> bytes:
        """The storage form of a subscription (sealed with :attr:`box`)."""
        return row.to_json(self.box)

    async def reseal(self) -> int:
        """Write again, sealed, every subscription stored with plain values; return how many."""
        if self.box is None:
            return 0

        async def write(t: WebhookTxn) -> int:
            plain = [row for row in await t.subs() if row.stored_plain]
            for row in plain:
                t.put_sub(row)
            return len(plain)

        return await self.transact(write)

    @abstractmethod
    async def transact(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        """Run ``fn`` atomically (possibly more than once) and return its result."""

    async def read(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        """Run a function that only reads (a store may skip its write lock for it).

        Raises:
            RuntimeError: ``fn`` wrote.
        """
        return await self.transact(fn)

    @abstractmethod
    async def list_deliveries(self, query: DeliveryQuery) -> Page[DeliveryRow]:
        """A subscription's deliveries, newest first."""

    @abstractmethod
    async def purge_deliveries(self, before_ms: int, limit: int = 500) -> int:
        """Delete up to ``limit`` finished deliveries queued before ``before_ms``.

        Only ``SUCCESS`` and ``FAILED`` ones; returns how many were deleted.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook, most storages own nothing
        """Release what the storage holds beside its store (nothing by default)."""


def _page(rows: list[DeliveryRow], query: DeliveryQuery) -> Page[DeliveryRow]:
    """Keyset page over rows sorted newest first by ``(queued_at_ms, delivery_id)``."""
    if query.cursor:
        at, last = decode_cursor(query.cursor, 2)
        rows = [r for r in rows if (r.queued_at_ms, r.delivery_id) < (int(at), str(last))]
    rows = [r for r in rows if query.keeps(r)]
    items = rows[: query.limit]
    if len(rows) > query.limit:
        tail = items[-1]
        return Page(items, encode_cursor([tail.queued_at_ms, tail.delivery_id]))
    return Page(items, None)


def _newest_first(rows: list[DeliveryRow]) -> list[DeliveryRow]:
    return sorted(rows, key=lambda r: (r.queued_at_ms, r.delivery_id), reverse=True)


# --------------------------------------------------------------------------------------------
# In memory


class _MemoryTxn(WebhookTxn):
    def __init__(self, storage: MemoryWebhookStorage, now: int) -> None:
        super().__init__(now)
        self.s = storage

    async def _sub(self, subscription_id: str) -> SubscriptionRow | None:
        raw = self.s.subs.get(subscription_id)
        return None if raw is None else self.s.load_sub(raw)

    async def _subs(self) -> list[SubscriptionRow]:
        return [self.s.load_sub(raw) for raw in self.s.subs.values()]

    async def _delivery(self, delivery_id: str) -> DeliveryRow | None:
        raw = self.s.deliveries.get(delivery_id)
        return None if raw is None else DeliveryRow.from_json(raw)

    async def _open(self, subscription_id: str, limit: int) -> list[DeliveryRow]:
        rows = [
            DeliveryRow.from_json(self.s.deliveries[d])
            for d in self.s.by_sub.get(subscription_id, ())
        ]
        rows = [r for r in rows if r.status in OPEN_STATUSES]
        return sorted(rows, key=lambda r: r.order)[:limit]

    async def _state(self, name: str) -> bytes | None:
        return self.s.state.get(name)


class MemoryWebhookStorage(WebhookStorage):
    """Webhook rows in dicts beside a :class:`MemoryStore` (one process)."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store)
        self.ledger = store
        self.subs: dict[str, bytes] = {}
        self.deliveries: dict[str, bytes] = {}
        self.by_sub: dict[str, list[str]] = {}
        self.state: dict[str, bytes] = {}

    async def transact(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        """See :meth:`WebhookStorage.transact`."""
        txn = _MemoryTxn(self, self.clock())
        result = await fn(txn)
        w = txn.writes
        for sid, row in w.subs.items():
            if row is None:
                self.subs.pop(sid, None)
            else:
                self.subs[sid] = self.dump_sub(row)
        for sid in w.dropped_queues:
            for did in self.by_sub.pop(sid, []):
                self.deliveries.pop(did, None)
        for did, (delivery, old) in w.deliveries.items():
            if old is None and did not in self.deliveries:
                self.by_sub.setdefault(delivery.subscription_id, []).append(did)
            self.deliveries[did] = delivery.to_json()
        self.state.update(w.state)
        if w.events:
            with self.ledger._write():
                self.ledger._put_events(w.events)
        return result

    async def list_deliveries(self, query: DeliveryQuery) -> Page[DeliveryRow]:
        """See :meth:`WebhookStorage.list_deliveries`."""
        rows = [
            DeliveryRow.from_json(self.deliveries[d])
            for d in self.by_sub.get(query.subscription_id, ())
        ]
        return _page(_newest_first(rows), query)

    async def purge_deliveries(self, before_ms: int, limit: int = 500) -> int:
        """See :meth:`WebhookStorage.purge_deliveries`."""
        done = 0
        for sid, ids in self.by_sub.items():
            kept = []
            for did in ids:
                row = DeliveryRow.from_json(self.deliveries[did])
                if done < limit and row.status in FINAL and row.queued_at_ms < before_ms:
                    del self.deliveries[did]
                    done += 1
                else:
                    kept.append(did)
            self.by_sub[sid] = kept
        return done


# --------------------------------------------------------------------------------------------
# SQLite


class _SqliteTxn(WebhookTxn):
    def __init__(self, storage: SqliteWebhookStorage, now: int) -> None:
        super().__init__(now)
        self.conn = storage.ledger.connection
        self.storage = storage

    async def _sub(self, subscription_id: str) -> SubscriptionRow | None:
        r = self.conn.execute(
            "SELECT body FROM webhook_subscriptions WHERE subscription_id = ?", (subscription_id,)
        ).fetchone()
        return None if r is None else self.storage.load_sub(r[0])

    async def _subs(self) -> list[SubscriptionRow]:
        rows = self.conn.execute("SELECT body FROM webhook_subscriptions").fetchall()
        return [self.storage.load_sub(r[0]) for r in rows]

    async def _delivery(self, delivery_id: str) -> DeliveryRow | None:
        r = self.conn.execute(
            "SELECT body FROM webhook_deliveries WHERE delivery_id = ?", (delivery_id,)
        ).fetchone()
        return None if r is None else DeliveryRow.from_json(r[0])

    async def _open(self, subscription_id: str, limit: int) -> list[DeliveryRow]:
        rows = self.conn.execute(
            "SELECT body FROM webhook_deliveries WHERE subscription_id = ? "
            "AND status IN ('PENDING', 'RETRYING') ORDER BY sort_key LIMIT ?",
            (subscription_id, limit),
        ).fetchall()
        return [DeliveryRow.from_json(r[0]) for r in rows]

    async def _state(self, name: str) -> bytes | None:
        r = self.conn.execute("SELECT value FROM webhook_state WHERE name = ?", (name,)).fetchone()
        return None if r is None else bytes(r[0])


class SqliteWebhookStorage(WebhookStorage):
    """Webhook tables in the ledger's SQLite database (schema version 6).

    A transaction is one ``BEGIN IMMEDIATE`` under the store's writer lock (reads included),
    so claims and enqueues of several processes on one file never interleave. The function
    run inside must not suspend (it awaits nothing that waits).
    """

    def __init__(self, store: SqliteStore) -> None:
        super().__init__(store)
        self.ledger = store

    async def transact(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        """See :meth:`WebhookStorage.transact`."""
        with self.ledger.write_transaction():
            txn = _SqliteTxn(self, self.clock())
            result = _run_now(fn(txn))
            self._commit(txn)
        return result

    async def read(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        """See :meth:`WebhookStorage.read`: a read transaction, no writer lock."""
        with self.ledger.read_transaction():
            txn = _SqliteTxn(self, self.clock())
            result = _run_now(fn(txn))
        w = txn.writes
        if w.subs or w.deliveries or w.state or w.events or w.dropped_queues:
            raise RuntimeError("a read-only webhook function wrote")
        return result

    def _commit(self, txn: _SqliteTxn) -> None:
        conn = txn.conn
        w = txn.writes
        for sid, row in w.subs.items():
            if row is None:
                conn.execute("DELETE FROM webhook_subscriptions WHERE subscription_id = ?", (sid,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO webhook_subscriptions VALUES (?, ?, ?)",
                    (sid, row.tenant_id, self.dump_sub(row)),
                )
        for sid in w.dropped_queues:
            conn.execute("DELETE FROM webhook_deliveries WHERE subscription_id = ?", (sid,))
        conn.executemany(
            "INSERT OR REPLACE INTO webhook_deliveries (delivery_id, subscription_id, status, "
            "sort_key, queued_at_ms, lease_owner, lease_until_ms, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (did, row.subscription_id, row.status, row.order, row.queued_at_ms,
                 row.lease_owner, row.lease_until_ms, row.to_json())
                for did, (row, _old) in w.deliveries.items()
            ],
        )  # fmt: skip
        conn.executemany(
            "INSERT OR REPLACE INTO webhook_state VALUES (?, ?)", list(w.state.items())
        )
        if w.events:
            self.ledger._put_events(w.events)

    async def list_deliveries(self, query: DeliveryQuery) -> Page[DeliveryRow]:
        """See :meth:`WebhookStorage.list_deliveries`."""
        sql = "SELECT body FROM webhook_deliveries WHERE subscription_id = ?"
        args: list[Any] = [query.subscription_id]
        if query.status is not None:
            sql += " AND status = ?"
            args.append(query.status)
        if query.from_ms is not None:
            sql += " AND queued_at_ms >= ?"
            args.append(query.from_ms)
        if query.to_ms is not None:
            sql += " AND queued_at_ms <= ?"
            args.append(query.to_ms)
        if query.cursor:
            at, last = decode_cursor(query.cursor, 2)
            sql += " AND (queued_at_ms < ? OR (queued_at_ms = ? AND delivery_id < ?))"
            args += [at, at, last]
        sql += " ORDER BY queued_at_ms DESC, delivery_id DESC LIMIT ?"
        rows = self.ledger.connection.execute(sql, (*args, query.limit + 1)).fetchall()
        items = [DeliveryRow.from_json(r[0]) for r in rows]
        return _page(items, DeliveryQuery(query.subscription_id, limit=query.limit))

    async def purge_deliveries(self, before_ms: int, limit: int = 500) -> int:
        """See :meth:`WebhookStorage.purge_deliveries`."""
        return _purge_sql(self, before_ms, limit)


def _purge_sql(storage: SqliteWebhookStorage, before_ms: int, limit: int) -> int:
    with storage.ledger.write_transaction():
        cursor = storage.ledger.connection.execute(
            "DELETE FROM webhook_deliveries WHERE delivery_id IN (SELECT delivery_id FROM "
            "webhook_deliveries WHERE status IN ('SUCCESS', 'FAILED') AND queued_at_ms < ? "
            "LIMIT ?)",
            (before_ms, limit),
        )
        return int(cursor.rowcount)


def _run_now(awaitable: Awaitable[T]) -> T:
    """Run a coroutine that never suspends to its end, synchronously.

    Raises:
        RuntimeError: it suspended (awaited real I/O inside a SQLite transaction).
    """
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a SQLite webhook transaction awaited I/O")


__all__ = [
    "DeliveryQuery",
    "MemoryWebhookStorage",
    "SqliteWebhookStorage",
    "WebhookStorage",
    "WebhookTxn",
]
