"""Webhook rows on Redis: optimistic transactions on keys of one hash slot.

Every webhook key carries the hash tag ``{wh}``, so one transaction never spans slots (Redis
Cluster routes them all to one node; webhook traffic is small next to the ledger's). A
transaction ``WATCH``es every key it reads, buffers its writes, and applies them with
``MULTI``/``EXEC``; if another process changed a key it read, ``EXEC`` fails and the
transaction runs again on fresh rows. Two dispatchers claiming the same delivery therefore
cannot both win: the loser re-reads it and sees the winner's lease.

Key layout (``P`` = the store's prefix):

=====================================  ===========================================================
``P:{wh}:s:<subscription_id>``         subscription (JSON, secrets included)
``P:{wh}:subs``                        set of every subscription id
``P:{wh}:d:<delivery_id>``             delivery (JSON, with its lease); a finished one expires
                                       after the store's retention
``P:{wh}:q:<subscription_id>``         zset (lex, score 0): ``<order>|<delivery_id>`` of the
                                       deliveries still to send, in sending order
``P:{wh}:l:<subscription_id>``         zset: every delivery id by when it was queued (listing)
``P:{wh}:st:<name>``                   dispatcher cursors, the security configuration
=====================================  ===========================================================

Lifecycle events (``webhook.*``) are appended to the owning tenant's event log right after the
transaction commits (the log lives in the tenant's slot).

Redis Cluster: redis-py's asyncio cluster pipeline cannot run ``WATCH`` transactions, so on a
cluster the transactions go over a plain connection to the master that owns the ``{wh}`` slot
(found through the cluster client; found again after a failover or a resharding, when that
connection answers ``MOVED`` or fails).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError

from runcycles_server.stores.base import Page, StoreUnavailable
from runcycles_server.stores.redis import RedisStore
from runcycles_server.stores.sqlite import decode_cursor, encode_cursor
from runcycles_server.webhooks.models import DeliveryRow, SubscriptionRow
from runcycles_server.webhooks.storage import DeliveryQuery, WebhookStorage, WebhookTxn

T = TypeVar("T")
MAX_ATTEMPTS: Final = 50
"""Transaction attempts before giving up (503): only under heavy contention on one key."""


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.p = f"{prefix}:{{wh}}"
        self.subs = f"{self.p}:subs"

    def sub(self, sid: str) -> str:
        return f"{self.p}:s:{sid}"

    def delivery(self, did: str) -> str:
        return f"{self.p}:d:{did}"

    def queue(self, sid: str) -> str:
        return f"{self.p}:q:{sid}"

    def listing(self, sid: str) -> str:
        return f"{self.p}:l:{sid}"

    def state(self, name: str) -> str:
        return f"{self.p}:st:{name}"


class _RedisTxn(WebhookTxn):
    def __init__(self, storage: RedisWebhookStorage, pipe: Any, now: int) -> None:
        super().__init__(now)
        self.pipe = pipe
        self.k = storage.k
        self.storage = storage

    async def _get(self, key: str) -> bytes | None:
        await self.pipe.watch(key)
        value: bytes | None = await self.pipe.get(key)
        return value

    async def _sub(self, subscription_id: str) -> SubscriptionRow | None:
        raw = await self._get(self.k.sub(subscription_id))
        return None if raw is None else self.storage.load_sub(raw)

    async def _subs(self) -> list[SubscriptionRow]:
        await self.pipe.watch(self.k.subs)
        ids = sorted(m.decode() for m in await self.pipe.smembers(self.k.subs))
        if not ids:
            return []
        keys = [self.k.sub(i) for i in ids]
        await self.pipe.watch(*keys)
        raws = await self.pipe.mget(keys)
        return [self.storage.load_sub(r) for r in raws if r is not None]

    async def _delivery(self, delivery_id: str) -> DeliveryRow | None:
        raw = await self._get(self.k.delivery(delivery_id))
        return None if raw is None else DeliveryRow.from_json(raw)

    async def _open(self, subscription_id: str, limit: int) -> list[DeliveryRow]:
        queue = self.k.queue(subscription_id)
        await self.pipe.watch(queue)
        members = await self.pipe.zrange(queue, 0, limit - 1)
        if not members:
            return []
        keys = [self.k.delivery(m.decode().rpartition("|")[2]) for m in members]
        await self.pipe.watch(*keys)
        raws = await self.pipe.mget(keys)
        return [DeliveryRow.from_json(r) for r in raws if r is not None]

    async def _state(self, name: str) -> bytes | None:
        return await self._get(self.k.state(name))


class RedisWebhookStorage(WebhookStorage):
    """Webhook rows beside a :class:`RedisStore` (see the module docstring)."""

    def __init__(self, store: RedisStore) -> None:
        super().__init__(store)
        self.ledger = store
        self.k = _Keys(store.key_prefix())
        self._direct: Any = None

    async def _transaction_client(self) -> Any:
        """The client whose pipelines can ``WATCH``.

        The store's own, or on a cluster a plain client of the master owning the ``{wh}`` slot.
        """
        base = self.ledger.client
        if not self.ledger.cluster:
            return base
        if self._direct is None:
            if getattr(base, "_initialize", False):
                await base.initialize()
            node = base.get_node_from_key(self.k.subs)
            pool = aioredis.ConnectionPool(
                connection_class=node.connection_class, **node.connection_kwargs
            )
            self._direct = aioredis.Redis(connection_pool=pool)
        return self._direct

    async def close(self) -> None:
        """Close the cluster master's connection (the store closes its own client)."""
        if self._direct is not None:
            await self._direct.aclose()
            self._direct = None

    async def transact(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        """See :meth:`WebhookStorage.transact`."""
        try:
            return await self._transact(fn)
        except (ResponseError, RedisConnectionError) as exc:
            if self._direct is None or (
                isinstance(exc, ResponseError) and not str(exc).startswith("MOVED")
            ):
                raise
            await self.close()  # the slot moved or its master failed: find it again
            raise StoreUnavailable(f"the webhook slot's master changed: {exc}") from exc

    async def _transact(self, fn: Callable[[WebhookTxn], Awaitable[T]]) -> T:
        client = await self._transaction_client()
        for _ in range(MAX_ATTEMPTS):
            async with client.pipeline(transaction=True) as pipe:
                txn = _RedisTxn(self, pipe, self.clock())
                try:
                    result = await fn(txn)
                    pipe.multi()
                    self._queue_writes(pipe, txn)
                    await pipe.execute()
                except WatchError:
                    continue
            by_tenant: dict[str, list[Any]] = {}
            for ev in txn.writes.events:
                by_tenant.setdefault(ev.tenant_id, []).append(ev)
            for tenant_id, events in by_tenant.items():
                await self.ledger.append_events(tenant_id, events)
            return result
        raise StoreUnavailable("webhook transaction kept conflicting; try again")

    def _queue_writes(self, pipe: Any, txn: _RedisTxn) -> None:
        w = txn.writes
        k = self.k
        for sid, row in w.subs.items():
            if row is None:
                pipe.delete(k.sub(sid))
                pipe.srem(k.subs, sid)
            else:
                pipe.set(k.sub(sid), self.dump_sub(row))
                pipe.sadd(k.subs, sid)
        for sid in w.dropped_queues:
            pipe.delete(k.queue(sid), k.listing(sid))  # its rows expire by their TTL
        retention = self.ledger.retention_ms
        for did, (delivery, old) in w.deliveries.items():
            final = delivery.status in ("SUCCESS", "FAILED")
            if final and retention is not None:
                pipe.set(k.delivery(did), delivery.to_json(), px=retention)
            else:
                pipe.set(k.delivery(did), delivery.to_json())
            queue = k.queue(delivery.subscription_id)
            if old is not None and old.order != delivery.order:
                pipe.zrem(queue, f"{old.order}|{did}")
            if delivery.status in ("PENDING", "RETRYING"):
                pipe.zadd(queue, {f"{delivery.order}|{did}": 0})
            else:
                pipe.zrem(queue, f"{delivery.order}|{did}")
            if old is None:
                pipe.zadd(k.listing(delivery.subscription_id), {did: delivery.queued_at_ms})
        for name, value in w.state.items():
            pipe.set(k.state(name), value)

    async def purge_deliveries(self, before_ms: int, limit: int = 500) -> int:
        """See :meth:`WebhookStorage.purge_deliveries` (subscription by subscription)."""
        client = self.ledger.client
        done = 0
        for member in await client.smembers(self.k.subs):
            listing = self.k.listing(member.decode())
            ids = await client.zrangebyscore(listing, "-inf", f"({before_ms}", start=0,
                                             num=limit - done)  # fmt: skip
            if not ids:
                continue
            raws = await client.mget([self.k.delivery(i.decode()) for i in ids])
            gone = [
                i.decode()
                for i, raw in zip(ids, raws, strict=True)
                if raw is None or DeliveryRow.from_json(raw).status in ("SUCCESS", "FAILED")
            ]
            if gone:
                pipe = client.pipeline(transaction=False)
                pipe.delete(*[self.k.delivery(d) for d in gone])
                pipe.zrem(listing, *gone)
                await pipe.execute()
                done += len(gone)
            if done >= limit:
                break
        return done

    async def list_deliveries(self, query: DeliveryQuery) -> Page[DeliveryRow]:
        """See :meth:`WebhookStorage.list_deliveries`."""
        client = self.ledger.client
        listing = self.k.listing(query.subscription_id)
        top: Any = "+inf" if query.to_ms is None else query.to_ms
        bottom: Any = "-inf" if query.from_ms is None else query.from_ms
        after: tuple[int, str] | None = None
        if query.cursor:
            at, last = decode_cursor(query.cursor, 2)
            after = (int(at), str(last))
        found: list[DeliveryRow] = []
        offset = 0
        while len(found) <= query.limit:
            chunk = await client.zrevrangebyscore(
                listing, top, bottom, start=offset, num=500, withscores=True
            )
            if not chunk:
                break
            offset += len(chunk)
            ids = [(int(score), m.decode()) for m, score in chunk]
            ids = [x for x in ids if after is None or x < after]
            if not ids:
                continue
            raws = await client.mget([self.k.delivery(d) for _, d in ids])
            for raw in raws:
                if raw is None:
                    continue
                row = DeliveryRow.from_json(raw)
                if query.keeps(row):
                    found.append(row)
        items = found[: query.limit]
        if len(found) > query.limit:
            tail = items[-1]
            return Page(items, encode_cursor([tail.queued_at_ms, tail.delivery_id]))
        return Page(items, None)
