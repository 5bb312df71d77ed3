"""Redis store: several server processes share one Redis (``cycles serve --redis redis://...``).

Design in one paragraph: the protocol's rules and all ledger math stay in
:mod:`runcycles_server.ledger` (the same code the SQLite store runs), and Redis only has to make
each step atomic. An operation reads the rows it needs in one atomic snapshot (a read-only call
of the script), plans the outcome in Python, and writes it back with **one** call of one Lua
script (``redis_cas.lua``) that first checks that none of the rows it read has changed (a
compare-and-set on a per-row version) and then writes every new row and index entry. A
conflict answers with a fresh snapshot in the same round trip, and the operation is planned
again. Operations on one tenant are *group committed* inside a process: concurrent requests
queue per tenant and one drainer plans a whole batch against one snapshot and writes it with
one script call, so 200 concurrent reservers on one budget cost a few round trips, not 200
conflicting ones.

Why this shape:

* **Exact int64 arithmetic.** Lua numbers are doubles (exact only to 2**53) and Redis's cjson
  prints 14 significant digits, so the script does no arithmetic on amounts at all. Python
  computes every new value with unbounded integers, :mod:`ledger` rejects any result outside
  int64 (400), and rows travel as JSON text (decimal digits) that Lua stores opaquely (the
  writes reach the script as one JSON argument whose row values are *strings*, so cjson never
  parses an amount). Amounts up to ``2**63 - 1`` round-trip exactly; tests check the boundary.
* **Identical behaviour to SQLite by construction.** Both stores run the same operations
  (:mod:`runcycles_server.stores.operations`, each written once against one transaction
  interface; here ``_Work`` is that interface over a snapshot); only persistence differs.
  Tests run random operation sequences on the pure-ledger model store and
  on Redis and require identical answers and rows.
* **Serializable.** Every row an operation's decision depended on is version-checked,
  including the tenant row (so closing a tenant fences every in-flight mutation in every
  process) and absent rows (an idempotency key seen as unused must still be unused). A refusal
  (``LedgerError``) is only answered from an atomic snapshot or after the batch it was planned
  in has committed.
* **Redis Cluster compatible.** Every key a script call touches is passed in ``KEYS`` and
  carries the tenant's hash tag ``{t:<tenant>}`` (API keys: ``{keys}``), so one call never
  spans slots. Reservation ids embed their tenant (``rsv_<tenant>_<32 hex>``, opaque to
  clients), so any process finds a reservation's slot from its id without a global table.
* **No livelock, no starvation.** A compare-and-set only fails when another write succeeded,
  so the system always progresses. Group commit removes in-process conflicts. Across
  processes, a busy process (more work queued) takes the tenant for a short *turn*
  (``TURN_MS``) during which the others' writes wait and queue up, so processes contending on
  one tenant alternate in whole batches instead of conflicting on every write, and a process
  that loses a race gets the next turn, so its re-planned write cannot lose again (details in
  ``redis_cas.lua``). A lightly loaded tenant never waits; a crashed process delays others by
  at most two turns. After ``MAX_ATTEMPTS`` an operation answers a retryable 500 and changes
  nothing.

Round trips: a reserve, event or decide costs two per batch (snapshot, then the write). A
commit, release or extend costs two when this process has seen the reservation (it remembers
the budgeted scopes of recent reservations), else three. Authentication costs one once a key
has been seen (its tenant never changes, so key and tenant rows are fetched together).

Requirements: Redis 7.0 or newer (the script declares itself with a ``#!lua`` shebang so an
out-of-memory Redis refuses it whole instead of failing between two writes). Durability is
Redis's: run it with ``appendonly yes`` (``appendfsync everysec`` can lose the last second of
acknowledged spend on a crash of the Redis host; ``always`` cannot).

Key layout (``P`` = ``--redis-prefix``, default ``cycles``; rows are hashes with a ``_v``
version and JSON fields):

=====================================  ===========================================================
``P:{t:T}:tenant``                     tenant row (``d``)
``P:{t:T}:b:<scope>``                  the budgets at one scope, one field per unit (JSON row)
``P:{t:T}:r:<rid>``                    reservation (``d``); expires ``retention_ms`` (default 7
                                       days) after it is finalized
``P:{t:T}:i:<endpoint>|<key>``         idempotency record (``d`` meta, ``b`` exact body); TTL'd
                                       at its window (``ledger.RETAIN_*``; commit and release
                                       ones at most ``retention_ms``, like their reservation)
``P:{t:T}:e:<eid>``, ``:a:<aid>``      event (``retention_ms`` TTL), audit entry (kept)
``P:{t:T}:x:budgets``                  zset (lex): the tenant's budget scopes (balances paging)
``P:{t:T}:x:res``                      zset: reservation ids by ``created_at_ms`` (listing)
``P:{t:T}:x:active``                   zset: ACTIVE reservation ids by deadline (tenant close)
``P:{t:T}:x:done``                     zset: finalized reservation ids by when their row
                                       expires; writes that finalize trim ``x:res`` (and it)
                                       of the entries that are due
``P:{t:T}:x:audit``                    zset: audit ids by time
``P:{t:T}:x:debits``                   zset: direct debit (``e:``) ids by time; each new
                                       debit trims the entries older than ``retention_ms``
``P:{t:T}:v:<id>``                     evidence envelope (``b`` signing input, ``d`` metadata),
                                       TTL'd at its retention; written by the operation's script
``P:{t:T}:rv:<rid>``                   a reservation's envelope ids (field per artifact type)
``P:{v:<id>}``                         the tenant of envelope ``<id>`` (``d``; its own slot, so
                                       a public read finds the envelope from the id alone);
                                       one node: written by the script; a cluster: written
                                       *ahead* of the script (a pointer whose envelope never
                                       got written reads as 404, never as a wrong one)
``P:{t:T}:turn``, ``:turn:next``        whose turn it is / who waits next (tokens, ms TTLs)
``P:{due}:reservations``               **global** expiry index: reservation ids by
                                       ``expires_at + grace`` (own slot, see below)
``P:{idx}:tenants``, ``P:{idx}:budgets``  global lex indexes for the admin listings
``P:{keys}:h:<sha256>``, ``:id:<kid>``   API keys by hash (authentication) and by id; with the
``P:{keys}:x:all``, ``:x:t:<T>``          lex indexes for listing, ``:turn`` (one slot for
                                          all keys)
=====================================  ===========================================================

Expiry: a reserve adds its id to the global ``{due}`` index in the same pipeline, *before* the
script call that creates the reservation (write-ahead: an ACTIVE reservation always has an
entry whose score is at most its deadline; an entry without a live reservation is harmless).
The sweeper (:meth:`RedisStore.expire_due`, run by every server process) reads due entries in
bounded batches, expires each due ACTIVE reservation through its tenant's queue (one script
call per tenant batch; the version check makes concurrent sweepers in other processes safe),
re-files extended ones at their new deadline and drops entries of finalized or vanished
reservations (only if the entry's score is still the one it read, so a reserve being retried
right then keeps its entry). Commit and release do not touch the global index (it is in another
slot); the sweeper drops their entries when they come due. Commit, release and extend check the
deadline themselves, so correctness never waits for the sweep.

Listings use the per-tenant indexes, never ``KEYS``/``SCAN``. Idempotency records expire by
Redis TTL, so :meth:`RedisStore.purge_idempotency` has nothing to do.

Admin operations that span slots are ordered so a crash leaves nothing unsafe: a tenant or
budget row is written before its global listing entry (creating it again repairs the entry);
closing a tenant first marks it CLOSED (which fences every new reservation, commit, release and
event in every process, since each checks the tenant row's version), then releases its ACTIVE
reservations and closes its budgets in batches, then revokes its keys; repeating the close
finishes an interrupted cascade.

Redis Cluster: ``redis+cluster://host:port`` (any node) connects a
``redis.asyncio.cluster.RedisCluster`` client, which routes each call by its keys' hash slot.

Known limits: several processes hammering
*one* budget conflict on its row: they stay correct and fair (see above) but scale less than
separate tenants do. Listing reservations in an order other than ``created_at_ms`` (or with
filters that match few rows) loads the tenant's retained reservations into memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runcycles_server import ledger
from runcycles_server.events import EventRecord, event_from_json, event_to_json
from runcycles_server.evidence.records import EvidenceRow
from runcycles_server.governance import CounterRow, PolicyRow, policy_from_json, policy_to_json
from runcycles_server.ledger import (
    ApiKeyRow,
    AuditRow,
    BudgetRow,
    EventRow,
    IdempotencyRow,
    LedgerError,
    Outcome,
    ReservationRow,
    TenantRow,
)
from runcycles_server.stores import operations
from runcycles_server.stores.base import (
    AuthRecord,
    Clock,
    EventQuery,
    OperationStore,
    Page,
    ReservationQuery,
    SignalCount,
    StoreUnavailable,
    system_clock,
)
from runcycles_server.stores.operations import Op
from runcycles_server.stores.sqlite import decode_cursor, encode_cursor

__all__ = ["RedisStore", "reservation_tenant"]

DEFAULT_PREFIX: Final = "cycles"
MAX_BATCH: Final = 128
"""Most operations of one tenant planned and written by one script."""
TURN_MS: Final = 20
"""Length of one process's turn on a contended tenant (see ``redis_cas.lua``)."""
MAX_ATTEMPTS: Final = 200
"""Compare-and-set attempts before an operation gives up with a retryable 500."""
RESERVATION_CACHE_SIZE: Final = 65_536
"""Reservations whose budgeted scopes a process remembers (saves a round trip on commit)."""
SWEEP_BATCH: Final = 500
EVENT_SCAN_MAX: Final = 5_000
"""Most event index entries one ``list_events`` call examines."""
SWEEP_MAX_SCAN: Final = 50_000
"""Most due-index entries one :meth:`RedisStore.expire_due` call examines."""
CLOSE_BATCH: Final = 200
COUNT_BATCH: Final = 500
"""Tenants per pipeline when :meth:`RedisStore.count_active_reservations` sums their indexes."""
SIGNAL_BUCKET_MS: Final = 60_000
"""Width of one bucket of the rate detectors' counters (``events.rates.BUCKET_MS``)."""
DEFAULT_TIMEOUT_S: Final = 2.0
"""Longest wait for one Redis reply, a connection, or a free pooled connection (seconds)."""
UNAVAILABLE_ERRORS: Final[tuple[type[Exception], ...]] = (
    StoreUnavailable,
    RedisConnectionError,  # refused, reset, pool exhausted, still loading the dataset
    RedisTimeoutError,  # no reply within the timeout (a hung or overloaded Redis)
    ClusterDownError,  # a cluster without a master for some slot
    TryAgainError,  # a slot being migrated or resharded
    ReadOnlyError,  # a replica promoted to master is still read-only (failover)
    RedisClusterException,  # no cluster node answers
)
"""Errors that mean Redis is unavailable (the app answers 503 and logs the outage once)."""

_T = TypeVar("_T")
_Fields = dict[bytes, bytes]
DEFAULT_RETENTION_MS: Final = 7 * ledger.DAY_MS
"""How long finished reservations and events are kept (``app.DEFAULT_RETENTION_DAYS``)."""
TRIM_BATCH: Final = 256
"""Most listing-index entries of expired reservations one write removes."""
_FINISHING: Final = ("commit:", "release:")
_V: Final = b"_v"
_D: Final = b"d"
_BODY: Final = b"b"
_HEX: Final = frozenset("0123456789abcdef")


def reservation_tenant(reservation_id: str) -> str | None:
    """Return the tenant embedded in a Redis-store reservation id, or ``None`` if malformed.

    Ids look like ``rsv_<tenant>_<32 lower-case hex>``.
    """
    return _embedded_tenant(reservation_id, "rsv_")


def _embedded_tenant(row_id: str, prefix: str) -> str | None:
    """The tenant of an id shaped ``<prefix><tenant>_<32 lower-case hex>``, else ``None``."""
    if len(row_id) < len(prefix) + 1 + 33 or not row_id.startswith(prefix):
        return None
    tail = row_id[-32:]
    if row_id[-33] != "_" or not set(tail) <= _HEX:
        return None
    tenant = row_id[len(prefix) : -33]
    return tenant or None


def _new_reservation_id(tenant_id: str) -> str:
    return f"rsv_{tenant_id}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------
# Row encoding: JSON with exact integers; Lua never parses it.

_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        _FIELD_NAMES[cls] = names
    return names


def _enc_str(row: Any, *, skip: str | None = None) -> str:
    data = {name: getattr(row, name) for name in _names(type(row)) if name != skip}
    return ledger.dumps(data).decode()  # orjson (stdlib fallback beyond 64-bit ints)


def _dec(cls: type[_T], raw: bytes) -> _T:
    return cls(**ledger.loads(raw))


def _dec_idem(fields: _Fields) -> IdempotencyRow:
    data = ledger.loads(fields[_D])
    return IdempotencyRow(body=fields[_BODY], **data)


def _dec_idem_field(fields: _Fields, name: bytes) -> IdempotencyRow:
    return _dec_idem(fields)


def _dec_tenant(fields: _Fields, name: bytes) -> TenantRow:
    return _dec(TenantRow, fields[name])


def _dec_budget(fields: _Fields, name: bytes) -> BudgetRow:
    return _dec(BudgetRow, fields[name])


def _dec_reservation(fields: _Fields, name: bytes) -> ReservationRow:
    return _dec(ReservationRow, fields[name])


def _dec_policy(fields: _Fields, name: bytes) -> PolicyRow:
    return policy_from_json(fields[name])


def _dec_counter(fields: _Fields, name: bytes) -> CounterRow:
    return CounterRow.from_json(fields[name])


# --------------------------------------------------------------------------------------------
# Keys


def _evidence_meta(row: EvidenceRow) -> bytes:
    meta = [row.artifact_type, row.reservation_id, row.created_at_ms, row.retain_until_ms]
    return ledger.dumps(meta)


def _dec_evidence(tenant_id: str, evidence_id: str, fields: _Fields) -> EvidenceRow | None:
    body, meta = fields.get(_BODY), fields.get(_D)
    if body is None or meta is None:
        return None
    artifact, rid, created, retain = ledger.loads(meta)
    return EvidenceRow(evidence_id, tenant_id, artifact, rid, created, retain, body)


class _Keys:
    """Builds every key name; the first ``{...}`` in each is its Redis Cluster hash tag."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix
        self.due = f"{prefix}:{{due}}:reservations"
        self.tenants = f"{prefix}:{{idx}}:tenants"
        self.all_budgets = f"{prefix}:{{idx}}:budgets"
        self.keys_all = f"{prefix}:{{keys}}:x:all"
        self.keys_turn = (f"{prefix}:{{keys}}:turn", f"{prefix}:{{keys}}:turn:next")
        self._tags: dict[str, str] = {}

    def t(self, tenant_id: str) -> str:
        tag = self._tags.get(tenant_id)
        if tag is None:
            if len(self._tags) > 100_000:
                self._tags.clear()
            tag = self._tags[tenant_id] = f"{self.p}:{{t:{tenant_id}}}"
        return tag

    def tenant(self, tenant_id: str) -> str:
        return f"{self.t(tenant_id)}:tenant"

    def turn(self, tenant_id: str) -> tuple[str, str]:
        tag = self.t(tenant_id)
        return f"{tag}:turn", f"{tag}:turn:next"

    def budget(self, tenant_id: str, scope: str) -> str:
        return f"{self.t(tenant_id)}:b:{scope}"

    def res(self, tenant_id: str, reservation_id: str) -> str:
        return f"{self.t(tenant_id)}:r:{reservation_id}"

    def idem(self, tenant_id: str, endpoint: str, key: str) -> str:
        return f"{self.t(tenant_id)}:i:{endpoint}|{key}"

    def event(self, tenant_id: str, event_id: str) -> str:
        return f"{self.t(tenant_id)}:e:{event_id}"

    def audit(self, tenant_id: str, audit_id: str) -> str:
        return f"{self.t(tenant_id)}:a:{audit_id}"

    def x_budgets(self, tenant_id: str) -> str:
        return f"{self.t(tenant_id)}:x:budgets"

    def x_res(self, tenant_id: str) -> str:
        return f"{self.t(tenant_id)}:x:res"

    def x_active(self, tenant_id: str) -> str:
        return f"{self.t(tenant_id)}:x:active"

    def x_done(self, tenant_id: str) -> str:
        return f"{self.t(tenant_id)}:x:done"

    def x_audit(self, tenant_id: str) -> str:
        return f"{self.t(tenant_id)}:x:audit"

    def x_debits(self, tenant_id: str) -> str:
        """The tenant's direct debits (``POST /v1/events``) scored by time (spend charts)."""
        return f"{self.t(tenant_id)}:x:debits"

    def policies(self, tenant_id: str) -> str:
        """One hash per tenant: a field per policy (read whole by every governed request)."""
        return f"{self.t(tenant_id)}:pol"

    def counter(self, tenant_id: str, name: str) -> str:
        return f"{self.t(tenant_id)}:q:{name}"

    def event_log(self, tenant_id: str, event_id: str) -> str:
        return f"{self.t(tenant_id)}:ev:{event_id}"

    def x_event_log(self, tenant_id: str) -> str:
        """The tenant's events scored by time (ties ordered by id, as the listing wants)."""
        return f"{self.t(tenant_id)}:x:ev"

    def x_counters(self, tenant_id: str) -> str:
        """Counter names scored by when they expire (the counters listing)."""
        return f"{self.t(tenant_id)}:x:q"

    def evidence(self, tenant_id: str, evidence_id: str) -> str:
        """An envelope (``b`` its body, ``d`` its metadata), in its tenant's slot."""
        return f"{self.t(tenant_id)}:v:{evidence_id}"

    def reservation_evidence(self, tenant_id: str, reservation_id: str) -> str:
        """A reservation's envelope ids, one field per artifact type."""
        return f"{self.t(tenant_id)}:rv:{reservation_id}"

    def evidence_owner(self, evidence_id: str) -> str:
        """Which tenant an envelope id belongs to (its own slot: found from the id alone)."""
        return f"{self.p}:{{v:{evidence_id}}}"

    def key_by_hash(self, key_hash: str) -> str:
        return f"{self.p}:{{keys}}:h:{key_hash}"

    def key_by_id(self, key_id: str) -> str:
        return f"{self.p}:{{keys}}:id:{key_id}"

    def keys_of(self, tenant_id: str) -> str:
        return f"{self.p}:{{keys}}:x:t:{tenant_id}"

    def signal_bucket(self, bucket_ms: int) -> str:
        """One minute of the detectors' counters: a hash of ``tenant|name`` fields."""
        return f"{self.p}:{{sig}}:c:{bucket_ms}"

    def signal_flag(self, name: str) -> str:
        return f"{self.p}:{{sig}}:f:{name}"


# --------------------------------------------------------------------------------------------
# Snapshots and the working state of one batch


@dataclass(slots=True)
class _Snapshot:
    """Rows read atomically by one script call, and the time they were read."""

    now_ms: int
    rows: dict[str, _Fields]

    def version(self, key: str) -> bytes:
        return self.rows[key].get(_V, b"0")


class _NeedKeys(Exception):
    """Planning needs rows that are not in the snapshot yet (read them and plan again)."""

    def __init__(self, keys: Iterable[str]) -> None:
        super().__init__("snapshot incomplete")
        self.keys = list(keys)


class _Conflict(Exception):
    """A compare-and-set lost to a concurrent writer; carries the fresh snapshot."""

    def __init__(self, snapshot: _Snapshot, *, refused: bool, wait_ms: int) -> None:
        super().__init__("concurrent update")
        self.snapshot = snapshot
        self.refused = refused
        """Refused because it is another process's turn (nothing was compared or written)."""
        self.wait_ms = wait_ms
        """How long that turn lasts at most."""


@dataclass(slots=True)
class _ZOp:
    add: bool
    key: str
    member: str
    score: int = 0


class _Work:
    """The rows of one tenant as one batch sees them: the snapshot plus the batch's writes.

    Rows are decoded once per batch and written as objects; they are encoded to JSON only
    when the batch is sent (a hot budget row is planned against by every operation of the
    batch but encoded once).
    """

    def __init__(
        self,
        keys: _Keys,
        tenant_id: str,
        snap: _Snapshot,
        retention_ms: int | None = DEFAULT_RETENTION_MS,
    ) -> None:
        self.k = keys
        self.retention_ms = retention_ms
        self.trim = False
        """Whether the write also trims ``x:res`` entries whose reservation's retention ran out."""
        self.trim_debits = False
        """Whether the write also trims ``x:debits`` entries older than the retention."""
        self.tenant_id = tenant_id
        self.snap = snap
        self.now = snap.now_ms
        self.dirty: dict[str, dict[bytes, Any]] = {}
        self.ttl_ms: dict[str, int] = {}
        self.zops: list[_ZOp] = []
        self.due: list[tuple[int, str]] = []
        self.evidence: list[EvidenceRow] = []
        """Envelopes whose owner pointers must be written ahead of the script (cluster)."""
        self.inline_owners = False
        """Whether the script may write owner pointers (a single node: any key, any slot)."""
        self.seen_reservations: list[ReservationRow] = []
        self.seen_policies: list[PolicyRow] | None = None
        self._decoded: dict[tuple[str, bytes], Any] = {}

    # -- reading ---------------------------------------------------------------------------------

    def require(self, keys: Iterable[str]) -> None:
        """Raise :class:`_NeedKeys` for every key neither read nor written yet."""
        missing = [k for k in keys if k not in self.snap.rows and k not in self.dirty]
        if missing:
            raise _NeedKeys(missing)

    def _get(self, key: str, name: bytes, decode: Callable[[_Fields, bytes], Any]) -> Any:
        written = self.dirty.get(key)
        if written is not None and name in written:
            return written[name]
        base = self.snap.rows.get(key)
        if base is None:
            if written is not None:
                return None
            raise _NeedKeys([key])
        if name not in base:
            return None
        cached = self._decoded.get((key, name))
        if cached is None:
            cached = self._decoded[(key, name)] = decode(base, name)
        return cached

    def _own(self, tenant_id: str) -> None:
        if tenant_id != self.tenant_id:  # a batch holds one tenant's slot: a bug, not input
            raise AssertionError(f"tenant {tenant_id} read in tenant {self.tenant_id}'s batch")

    def tenant(self, tenant_id: str) -> TenantRow | None:
        self._own(tenant_id)
        row: TenantRow | None = self._get(self.k.tenant(self.tenant_id), _D, _dec_tenant)
        if row is not None and row.policy_count == 0 and self.seen_policies is None:
            self.seen_policies = []  # known to have none: later batches skip reading them
        return row  # shared within the batch: callers copy before changing it

    def budgets(self, scopes: Sequence[str]) -> list[BudgetRow]:
        """Return the budget rows (every unit) at ``scopes``; callers may not mutate them."""
        keys = [self.k.budget(self.tenant_id, s) for s in scopes]
        self.require(keys)
        rows = []
        for key in keys:
            names = set(self.snap.rows.get(key, ())) | set(self.dirty.get(key, ()))
            names.discard(_V)
            for name in sorted(names):
                rows.append(self._get(key, name, _dec_budget))
        return rows

    def current_budgets(self, rows: Sequence[BudgetRow]) -> list[BudgetRow]:
        """The batch's current state of these rows (what the next write replaces)."""
        budget = self.k.budget
        tenant = self.tenant_id
        return [self._get(budget(tenant, r.scope), r.unit.encode(), _dec_budget) for r in rows]

    def policies(self, tenant_id: str) -> list[PolicyRow]:
        """Every policy of the tenant (shared within the batch: rows are frozen)."""
        self._own(tenant_id)
        key = self.k.policies(tenant_id)
        self.require([key])
        names = set(self.snap.rows.get(key, ())) | set(self.dirty.get(key, ()))
        names.discard(_V)
        rows = [self._get(key, name, _dec_policy) for name in sorted(names)]
        self.seen_policies = rows
        return rows

    def put_policy(self, row: PolicyRow, *, new: bool = False) -> None:
        self._own(row.tenant_id)
        self._put(self.k.policies(row.tenant_id), row.policy_id.encode(), row)

    def counters(self, tenant_id: str, names: Sequence[str]) -> dict[str, CounterRow]:
        self._own(tenant_id)
        keys = [self.k.counter(tenant_id, name) for name in names]
        self.require(keys)
        found: dict[str, CounterRow] = {}
        for name, key in zip(names, keys, strict=True):
            row: CounterRow | None = self._get(key, _D, _dec_counter)
            if row is not None:
                found[name] = row
        return found

    def put_counters(self, tenant_id: str, rows: Sequence[CounterRow]) -> None:
        self._own(tenant_id)
        index = self.k.x_counters(tenant_id)
        for row in rows:
            key = self.k.counter(tenant_id, row.name)
            self._put(key, _D, row)
            self.ttl_ms[key] = max(1, row.expires_at_ms - self.now)
            self.zops.append(_ZOp(True, index, row.name, row.expires_at_ms))

    def reservation(self, reservation_id: str) -> ReservationRow | None:
        key = self.k.res(self.tenant_id, reservation_id)
        row: ReservationRow | None = self._get(key, _D, _dec_reservation)
        if row is None:
            return None
        self.seen_reservations.append(row)
        return row  # the ledger never mutates its inputs (it plans with dataclasses.replace)

    def idem(self, tenant_id: str, endpoint: str, key: str) -> IdempotencyRow | None:
        self._own(tenant_id)
        name = self.k.idem(self.tenant_id, endpoint, key)
        row: IdempotencyRow | None = self._get(name, _D, _dec_idem_field)
        return None if row is None or row.retain_until_ms < self.now else row

    # -- writing ---------------------------------------------------------------------------------

    def _put(self, key: str, name: bytes, value: Any) -> None:
        self.dirty.setdefault(key, {})[name] = value

    def put_tenant(self, row: TenantRow, *, new: bool = False) -> None:
        self._put(self.k.tenant(self.tenant_id), _D, row)

    def put_budget(self, row: BudgetRow, *, new: bool = False) -> None:
        self._put(self.k.budget(self.tenant_id, row.scope), row.unit.encode(), row)
        if new:
            self.zops.append(_ZOp(True, self.k.x_budgets(self.tenant_id), row.scope))

    def put_reservation(self, row: ReservationRow) -> None:
        key = self.k.res(self.tenant_id, row.reservation_id)
        existed = (key in self.snap.rows and _D in self.snap.rows[key]) or key in self.dirty
        self._put(key, _D, row)
        rid = row.reservation_id
        active = self.k.x_active(self.tenant_id)
        if row.status == "ACTIVE":
            self.zops.append(_ZOp(True, active, rid, row.deadline_ms))
            if not existed:
                self.zops.append(_ZOp(True, self.k.x_res(self.tenant_id), rid, row.created_at_ms))
                self.due.append((row.deadline_ms, rid))
                self.seen_reservations.append(row)  # remembered once written
        else:
            self.zops.append(_ZOp(False, active, rid))
            if self.retention_ms is not None:  # kept ``retention_ms`` after it finished
                self.ttl_ms[key] = self.retention_ms
                done = self.k.x_done(self.tenant_id)
                self.zops.append(_ZOp(True, done, rid, self.now + self.retention_ms))
                self.trim = True

    def put_idem(self, row: IdempotencyRow) -> None:
        key = self.k.idem(self.tenant_id, row.endpoint, row.key)
        self._put(key, _D, row)
        ttl = max(1, row.retain_until_ms - self.now)
        if self.retention_ms is not None and row.endpoint.startswith(_FINISHING):
            # A commit or release replay is answered only while its reservation exists (a
            # missing reservation is NOT_FOUND first): keep both exactly as long.
            ttl = min(ttl, self.retention_ms)
        self.ttl_ms[key] = ttl

    def apply(self, outcome: Outcome) -> None:
        """Record every row of an outcome, as ``RowStore._apply`` does."""
        for row in outcome.budgets:
            self.put_budget(row)
        if outcome.reservation is not None:
            self.put_reservation(outcome.reservation)
        if outcome.idempotency is not None:
            self.put_idem(outcome.idempotency)
        if outcome.event is not None:
            key = self.k.event(self.tenant_id, outcome.event.event_id)
            self._put(key, _D, outcome.event)
            if self.retention_ms is not None:
                self.ttl_ms[key] = self.retention_ms
            debits = self.k.x_debits(self.tenant_id)
            self.zops.append(
                _ZOp(True, debits, outcome.event.event_id, outcome.event.created_at_ms)
            )
            self.trim_debits = self.retention_ms is not None
        if outcome.counters:
            self.put_counters(self.tenant_id, outcome.counters)
        for ev in outcome.events:
            key = self.k.event_log(self.tenant_id, ev.event_id)
            self._put(key, _D, ev)
            if self.retention_ms is not None:
                self.ttl_ms[key] = self.retention_ms
            index = self.k.x_event_log(self.tenant_id)
            self.zops.append(_ZOp(True, index, ev.event_id, ev.created_at_ms))
        if outcome.evidence is not None:
            self.put_evidence(outcome.evidence)
        if outcome.audit is not None:
            audit = outcome.audit
            self._put(self.k.audit(self.tenant_id, audit.audit_id), _D, audit)
            self.zops.append(
                _ZOp(True, self.k.x_audit(self.tenant_id), audit.audit_id, audit.created_at_ms)
            )

    def put_evidence(self, row: EvidenceRow) -> None:
        key = self.k.evidence(self.tenant_id, row.evidence_id)
        self._put(key, _BODY, row.body)
        self._put(key, _D, _evidence_meta(row))
        ttl = max(1, row.retain_until_ms - self.now)
        self.ttl_ms[key] = ttl
        if row.reservation_id is not None and row.artifact_type != "error":
            link = self.k.reservation_evidence(self.tenant_id, row.reservation_id)
            self._put(link, row.artifact_type.encode(), row.evidence_id.encode())
            self.ttl_ms[link] = ttl
        if self.inline_owners:  # one node: the script itself writes the owner pointer
            owner = self.k.evidence_owner(row.evidence_id)
            self._put(owner, _D, self.tenant_id.encode())
            self.ttl_ms[owner] = ttl
        else:
            self.evidence.append(row)

    @property
    def writes(self) -> bool:
        return bool(self.dirty or self.zops)

    def encoded(self, key: str) -> list[str]:
        """Return ``[field, value, ...]`` of the writes to ``key`` (rows as JSON text)."""
        out: list[str] = []
        for name, value in self.dirty[key].items():
            if isinstance(value, bytes):
                out += [name.decode(), value.decode()]
            elif isinstance(value, IdempotencyRow):
                out += ["d", _enc_str(value, skip="body"), "b", value.body.decode()]
            elif isinstance(value, PolicyRow):
                out += [name.decode(), policy_to_json(value).decode()]
            elif isinstance(value, CounterRow):
                out += [name.decode(), value.to_json().decode()]
            elif isinstance(value, EventRecord):
                out += [name.decode(), event_to_json(value).decode()]
            else:
                out += [name.decode(), _enc_str(value)]
        return out


_RAISE_FLAG_LUA: Final = """#!lua
-- KEYS[1]: a detector flag; ARGV: raised until (ms), key TTL (ms), now (ms), by the store clock.
-- Raise (or refresh) the flag; 1 if it was not raised at ARGV[3].
local raised = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if raised and tonumber(raised) > tonumber(ARGV[3]) then
  return 0
end
return 1
"""

_DROP_DUE_LUA: Final = """#!lua
-- KEYS[1]: the due index; ARGV: member, score, member, score ...
-- ZREM each member whose score is still the given one (an exact integer below 2^53).
local removed = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


@dataclass(slots=True)
class _Script:
    source: str
    sha: str | None = None


@dataclass(slots=True)
class _Op:
    """One operation queued on a tenant: the rows it reads first, and how it plans."""

    keys: list[str]
    plan: Callable[[_Work], Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Queue:
    pending: list[_Op] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that select a Redis Cluster client, and the plain scheme each stands for."""


def is_cluster_url(url: str) -> bool:
    """Return whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _is_cluster_client(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def _client_from_url(url: str, max_connections: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Build the asyncio client for ``url``: a pooled single-node client, or a cluster client.

    Every wait (connect, reply, free pooled connection) is bounded by ``timeout_s``, and a
    command is retried once on a broken connection but never after a timeout, so a hung Redis
    fails a request within about ``timeout_s``. A cluster client retries a failed command
    once (after refreshing its slot map), so there it is about twice ``timeout_s``.
    Query parameters in the URL (e.g. ``?socket_timeout=5``) override these defaults.

    Raises:
        ValueError: for a cluster URL naming a database other than 0 (clusters have only 0),
            or any URL redis-py cannot parse.
    """
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    if plain is None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            # One immediate retry on a broken connection (not on a timeout): after a Redis
            # restart the pool's idle connections are dead, and the first use of each would
            # otherwise fail a request. Safe: a retried compare-and-set write that had applied
            # sees its own versions changed and re-plans into a replay.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import RedisClusterException

    try:
        # Any node is enough: the client discovers the others (CLUSTER SLOTS) on first use,
        # and routes every call by the hash slot of its keys (all keys of one call share one).
        return RedisCluster.from_url(
            f"{plain}{sep}{rest}",
            max_connections=max_connections,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            # One retry (after refreshing the slot map), not redis-py's default of ten with
            # backoff: a frozen node then fails a request within about two timeouts.
            retry=Retry(NoBackoff(), 1),
        )
    except RedisClusterException as exc:
        raise ValueError(f"{url.partition('@')[2] or url}: {exc}") from None


class RedisStore(OperationStore):
    """A :class:`~runcycles_server.stores.base.Store` on Redis, shared by many processes.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``); for a Redis
            Cluster ``redis+cluster://[:password@]host:port`` (or ``rediss+cluster://``), any
            node of the cluster (``redis.asyncio.cluster.RedisCluster``).
        prefix: key prefix (``--redis-prefix``); several deployments or test runs can share one
            Redis under different prefixes. Must not contain ``{`` or ``}``.
        clock: epoch-milliseconds clock; by default the Redis server's ``TIME``, so every
            process agrees on expiry. Inject a fake one in tests.
        max_connections: size of the connection pool (requests wait for a free connection).
        client: an existing ``redis.asyncio.Redis`` or ``RedisCluster`` (with
            ``decode_responses`` off) to use instead of ``url``; not closed by :meth:`close`.
        timeout_s: longest wait for a Redis reply, a connection or a free pooled connection
            (``cycles serve --store-timeout``); past it the request fails with one of
            :data:`UNAVAILABLE_ERRORS` (answered 503). Not applied to ``client``.
        retention_ms: how long a finished (committed, released or expired) reservation, with
            its commit or release replay record, and an event are kept (Redis key TTLs set by
            the write that finishes or creates them; listing-index entries are trimmed by later
            writes). At least one day (reserve replays are kept 24 h); ``None`` keeps them
            forever. Other idempotency records expire at their own windows (``ledger.RETAIN_*``).

    Raises:
        ValueError: for a bad ``prefix``, a ``retention_ms`` below one day or a ``timeout_s``
            that is not a positive number.
    """

    unavailable_errors: Final = UNAVAILABLE_ERRORS
    """Exceptions meaning Redis is unavailable (see ``runcycles_server.health``)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Clock | None = None,
        max_connections: int = 64,
        client: aioredis.Redis | None = None,
        retention_ms: int | None = DEFAULT_RETENTION_MS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not 0 < timeout_s < float("inf"):
            raise ValueError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        if retention_ms is not None and retention_ms < ledger.DAY_MS:
            raise ValueError(
                f"retention_ms must be at least {ledger.DAY_MS} (one day: reserve replays are "
                f"kept 24 h), not {retention_ms}; pass None to keep finished reservations forever"
            )
        self.retention_ms = retention_ms
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(
                f"redis prefix {prefix!r} must be non-empty and contain no '{{' or '}}' "
                "(braces would change the Redis Cluster hash tags of every key)"
            )
        self.prefix = prefix
        self._server_time = clock is None
        self.clock: Clock = clock or system_clock
        self._owns_client = client is None
        self.cluster = is_cluster_url(url) if client is None else _is_cluster_client(client)
        """Whether the store talks to a Redis Cluster (``redis+cluster://`` URL)."""
        if client is None:
            client = _client_from_url(url, max_connections, timeout_s)
        # redis-py's stubs type replies as unions of bytes/str/lists; replies are bytes here
        # (decode_responses is off), so the client is used untyped.
        self._redis: Any = client
        self._k = _Keys(prefix)
        source = resources.files("runcycles_server.stores").joinpath("redis_cas.lua")
        self._script = source.read_text(encoding="utf-8")
        self._sha: str | None = None
        self._token = uuid.uuid4().hex[:16]
        self._drop_script = _Script(_DROP_DUE_LUA)
        self._flag_script = _Script(_RAISE_FLAG_LUA)
        self._queues: dict[str, _Queue] = {}
        self._evidence_pending: list[tuple[Sequence[EvidenceRow], asyncio.Future[None]]] = []
        self._evidence_task: asyncio.Task[None] | None = None
        self._scopes_cache: OrderedDict[str, list[str]] = OrderedDict()
        self._key_tenants: dict[str, str] = {}
        self._policies_seen: dict[str, list[PolicyRow]] = {}
        """Each tenant's policies as the last batch read them (to prefetch quota counters)."""
        self.conflicts = 0
        """Compare-and-set conflicts seen by this instance (observability and tests)."""
        self.batches = 0
        """Scripts that wrote a batch (observability and tests)."""
        self.waits = 0
        """Writes that waited for another process's turn (observability and tests)."""
        self.auth_epoch = 0
        """Bumped when this instance revokes a key (drops ``web.Authenticator``'s key cache)."""

    # -- plumbing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish queued operations and close the connection pool."""
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client:
            await self._redis.aclose()

    async def ping(self) -> bool:
        """Return whether Redis answers."""
        try:
            return bool(await self._redis.ping())
        except Exception:  # any connection or protocol failure means "not ready"
            return False

    async def _now(self) -> int:
        if not self._server_time:
            return self.clock()
        seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _run_script(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if script.sha is None:
            script.sha = str(await self._redis.script_load(script.source))
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = str(await self._redis.script_load(script.source))
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _sha1(self) -> str:
        if self._sha is None:
            try:
                self._sha = str(await self._redis.script_load(self._script))
            except ResponseError as exc:
                raise RuntimeError(
                    f"Redis refused the store's Lua script ({exc}); the Redis store needs "
                    "Redis 7.0 or newer"
                ) from exc
        return self._sha

    async def _eval(self, keys: Sequence[str], args: Sequence[Any], pre: Sequence[Any]) -> Any:
        """Run the script (EVALSHA, loading it on NOSCRIPT) after ``pre`` commands."""
        sha = await self._sha1()
        if not pre:
            try:
                return await self._redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                self._sha = None
                sha = await self._sha1()
                return await self._redis.evalsha(sha, len(keys), *keys, *args)
        pipe = self._redis.pipeline(transaction=False)
        for command in pre:
            pipe.execute_command(*command)
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        results = await pipe.execute(raise_on_error=False)
        result = results[-1]
        if isinstance(result, NoScriptError):
            self._sha = None
            sha = await self._sha1()
            result = await self._redis.evalsha(sha, len(keys), *keys, *args)
        elif isinstance(result, Exception):
            raise result
        for command, outcome in zip(pre, results, strict=False):
            if isinstance(outcome, Exception):  # the script ran: its index entry must exist
                await self._redis.execute_command(*command)
        return result

    def _snapshot(self, keys: Sequence[str], reply: Sequence[Any]) -> _Snapshot:
        now = int(reply[1]) * 1000 + int(reply[2]) // 1000 if self._server_time else self.clock()
        rows: dict[str, _Fields] = {}
        for key, flat in zip(keys, reply[4:], strict=True):
            rows[key] = dict(zip(flat[0::2], flat[1::2], strict=True))
        return _Snapshot(now, rows)

    async def _read(self, keys: Sequence[str]) -> _Snapshot:
        reply = await self._eval(keys, [len(keys), "?"], ())
        return self._snapshot(keys, reply)

    async def _cas(
        self,
        keys: Sequence[str],
        snap: _Snapshot,
        work: _Work,
        turn: tuple[str, str],
        *,
        keep: bool = False,
    ) -> None:
        """Write a batch if none of ``keys`` changed since ``snap``; else raise _Conflict.

        ``turn`` is the slot's (turn, next-turn) key pair; ``keep`` asks to keep (or take) the
        turn because more work is queued.
        """
        all_keys = [*keys, *turn]
        index = {key: i + 1 for i, key in enumerate(all_keys)}

        def ix(key: str) -> int:
            i = index.get(key)
            if i is None:
                all_keys.append(key)
                i = index[key] = len(all_keys)
            return i

        writes: list[list[Any]] = []
        for key in work.dirty:
            writes.append(["H", ix(key), work.encoded(key)])
            ttl = work.ttl_ms.get(key)
            if ttl is not None:
                writes.append(["X", ix(key), str(ttl)])
        for z in work.zops:
            if z.add:
                writes.append(["Z", ix(z.key), str(z.score), z.member])
            else:
                writes.append(["R", ix(z.key), z.member])
        if work.trim:
            tenant = work.tenant_id
            done, res = ix(self._k.x_done(tenant)), ix(self._k.x_res(tenant))
            writes.append(["T", done, res, str(work.now), str(TRIM_BATCH)])
        if work.trim_debits and work.retention_ms is not None:
            # the debits whose row expired by TTL leave the index (at most a batch a write)
            debits = ix(self._k.x_debits(work.tenant_id))
            cutoff = work.now - work.retention_ms - 1
            writes.append(["T", debits, debits, str(cutoff), str(TRIM_BATCH)])
        args: list[Any] = [len(keys), *(snap.version(k) for k in keys)]
        args += [self._token, TURN_MS, "1" if keep else "0"]
        args.append(ledger.dumps(writes).decode())
        pre: list[Any] = []
        if work.due:
            due: list[Any] = []
            for score, member in work.due:
                due += [score, member]
            pre.append(("ZADD", self._k.due, *due))
        for row in work.evidence:  # write-ahead: a pointer without its envelope reads as 404
            ttl = max(1, row.retain_until_ms - work.now)
            owner = self._k.evidence_owner(row.evidence_id)
            pre.append(("HSET", owner, "d", work.tenant_id))
            pre.append(("PEXPIRE", owner, ttl))
        reply = await self._eval(all_keys, args, pre)
        code = int(reply[0])
        if code != 1:
            raise _Conflict(self._snapshot(keys, reply), refused=code == 2, wait_ms=int(reply[3]))
        self.batches += 1

    # -- the per-tenant queue ---------------------------------------------------------------------

    async def _submit(self, tenant_id: str, keys: list[str], plan: Callable[[_Work], _T]) -> _T:
        """Run one operation in its tenant's next batch and return what ``plan`` returned."""
        loop = asyncio.get_running_loop()
        op = _Op(keys, plan, loop.create_future())
        queue = self._queues.get(tenant_id)
        if queue is None:
            queue = self._queues[tenant_id] = _Queue()
        queue.pending.append(op)
        if queue.task is None:
            queue.task = loop.create_task(self._drain(tenant_id, queue))
        result: _T = await op.future
        return result

    async def _drain(self, tenant_id: str, queue: _Queue) -> None:
        try:
            while queue.pending:
                batch = queue.pending[:MAX_BATCH]
                del queue.pending[:MAX_BATCH]
                try:
                    await self._run_batch(tenant_id, batch, queue)
                except BaseException as exc:  # deliver every failure to the waiting callers
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(
                                exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                            )
                    if not isinstance(exc, Exception):  # cancelled (shutdown): fail the rest too
                        for op in queue.pending:
                            if not op.future.done():
                                op.future.set_exception(RuntimeError("store is shutting down"))
                        queue.pending.clear()
                        raise
                    if isinstance(exc, UNAVAILABLE_ERRORS):
                        # Redis did not answer: the operations queued meanwhile fail with it
                        # instead of each waiting out another timeout (so a request fails
                        # within about one timeout, not two).
                        for op in queue.pending:
                            if not op.future.done():
                                op.future.set_exception(exc)
                        queue.pending.clear()
        finally:
            queue.task = None
            if not queue.pending and self._queues.get(tenant_id) is queue:
                del self._queues[tenant_id]

    async def _run_batch(self, tenant_id: str, batch: list[_Op], queue: _Queue) -> None:
        keys: list[str] = []
        seen: set[str] = set()

        def want(more: Iterable[str]) -> None:
            for key in more:
                if key not in seen:
                    seen.add(key)
                    keys.append(key)

        want([self._k.tenant(tenant_id)])
        for op in batch:
            want(op.keys)
        snap = await self._read(keys)
        turn = self._k.turn(tenant_id)
        attempts = 0
        while True:
            work = _Work(self._k, tenant_id, snap, self.retention_ms)
            work.inline_owners = not self.cluster
            results: list[tuple[bool, Any]] = []
            missing: list[str] = []
            broken: _Op | None = None
            for op in batch:
                try:
                    results.append((True, op.plan(work)))
                except _NeedKeys as need:
                    missing += need.keys
                    results.append((False, None))
                except LedgerError as exc:  # a refusal writes nothing: it fails alone
                    results.append((False, exc))
                except Exception as exc:  # a bug may have half-planned: drop it, plan again
                    if not op.future.done():
                        op.future.set_exception(exc)
                    broken = op
                    break
            if broken is not None:
                batch.remove(broken)
                if not batch:
                    return
                continue
            if missing:
                # Read everything again in one atomic snapshot, now with the missing rows.
                want(missing)
                snap = await self._read(keys)
                continue
            if work.writes:
                conflict = await self._send(keys, snap, work, turn, queue)
                if conflict is not None:
                    self.conflicts += not conflict.refused
                    attempts += 1  # lost races and waited turns alike
                    if attempts >= MAX_ATTEMPTS:
                        raise LedgerError(
                            "INTERNAL_ERROR",
                            "the budget is under heavy concurrent update and this request could "
                            "not be applied; retry it with the same idempotency key",
                        )
                    if conflict.refused:
                        # Waited out another process's turn: requests kept arriving meanwhile,
                        # so take them into this batch (the next turn is ours) and re-plan on
                        # fresh rows: one bigger batch instead of several small ones.
                        room = MAX_BATCH - len(batch)
                        if room > 0 and queue.pending:
                            joined = queue.pending[:room]
                            del queue.pending[:room]
                            batch.extend(joined)
                            for op in joined:
                                want(op.keys)
                        snap = await self._read(keys)
                    else:
                        snap = conflict.snapshot
                    continue
            for row in work.seen_reservations:
                self._remember(row)
            if work.seen_policies is not None:
                if len(self._policies_seen) > 10_000:
                    self._policies_seen.clear()
                self._policies_seen[tenant_id] = work.seen_policies
            for op, (ok, value) in zip(batch, results, strict=True):
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)
            return

    async def _send(
        self,
        keys: Sequence[str],
        snap: _Snapshot,
        work: _Work,
        turn: tuple[str, str],
        queue: _Queue,
    ) -> _Conflict | None:
        """Send one planned batch; on another process's turn, wait until it ends.

        Returns ``None`` once written, else the conflict: a lost race (with the fresh rows to
        re-plan on) or a refusal (after waiting; the caller re-reads and re-plans).
        """
        try:
            await self._cas(keys, snap, work, turn, keep=bool(queue.pending))
        except _Conflict as conflict:
            if conflict.refused:  # another process's turn: sleep it out (we are queued next)
                self.waits += 1
                wait_ms = min(conflict.wait_ms, TURN_MS) + random.uniform(0, 1)
                await asyncio.sleep(wait_ms / 1000)
            return conflict
        return None

    def _remember(self, row: ReservationRow) -> None:
        cache = self._scopes_cache
        if row.reservation_id not in cache:
            cache[row.reservation_id] = row.budgeted_scopes
            if len(cache) > RESERVATION_CACHE_SIZE:
                cache.popitem(last=False)

    def _scope_keys(self, tenant_id: str, scopes: Sequence[str]) -> list[str]:
        return [self._k.budget(tenant_id, s) for s in scopes]

    def _owner_tenant(self, reservation_id: str) -> str:
        owner = reservation_tenant(reservation_id)
        if owner is None:
            raise LedgerError("NOT_FOUND", f"reservation {reservation_id} does not exist")
        return owner

    def new_reservation_id(self, tenant_id: str) -> str:
        """``rsv_<tenant>_<hex>``: the owning tenant (so its slot) is found from the id."""
        return _new_reservation_id(tenant_id)

    async def run(self, op: Op[_T]) -> _T:
        """Run ``op`` in its tenant's next batch, its rows read first in one round trip."""
        rid = op.reservation_id
        tenant = op.tenant_id if op.tenant_id is not None else self._owner_tenant(rid or "")
        keys: list[str] = []
        if rid is not None:
            keys.append(self._k.res(tenant, rid))
            keys += self._scope_keys(tenant, self._scopes_cache.get(rid, ()))
        if op.idem is not None:
            keys.append(self._k.idem(tenant, *op.idem))
        keys += self._scope_keys(tenant, op.scopes)
        if op.governed:
            seen = self._policies_seen.get(tenant)
            if seen is None or seen:  # not when the tenant is known to have none (a tenant
                keys.append(self._k.policies(tenant))  # that gained one reads them on demand)
            if seen and op.counter_hint is not None:
                keys += [self._k.counter(tenant, n) for n in op.counter_hint(seen, self.clock())]
        result = await self._submit(tenant, keys, op.plan)
        if (
            isinstance(result, Outcome)
            and result.evidence is None
            and self.issuer is not None
            and b'"cycles_evidence"' in result.body
        ):
            await self._reassert_owner(tenant, result.body, self.issuer.retention_ms)
        return result

    async def _reassert_owner(self, tenant_id: str, body: bytes, retention_ms: int) -> None:
        """Write a replayed answer's evidence pointer again (if absent).

        The pointer is written ahead of the script that stores the envelope, and again after
        it if that first write failed; if Redis failed both times the request failed too (503)
        and its client retries: this replay restores the pointer, so the id it answers
        resolves.
        """
        ref = ledger.loads(body).get("cycles_evidence") or {}
        evidence_id = ref.get("evidence_id")
        if isinstance(evidence_id, str):
            owner = self._k.evidence_owner(evidence_id)
            if await self._redis.hsetnx(owner, _D, tenant_id):
                await self._redis.pexpire(owner, retention_ms)

    # -- evidence --------------------------------------------------------------------------------

    async def put_evidence(self, rows: Sequence[EvidenceRow]) -> None:
        """See :meth:`EvidenceStore.put_evidence`: calls are batched into shared pipelines.

        Denial envelopes change no ledger row, so they need no compare-and-set. Calls made
        while a pipeline is in flight go out together in the next one (a storm of denials
        costs a round trip per batch); each returns once Redis acknowledged its writes
        (durable as Redis's ``appendfsync``), owner pointer first, then the envelope.
        """
        if not rows:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._evidence_pending.append((rows, future))
        if self._evidence_task is None:
            self._evidence_task = asyncio.get_running_loop().create_task(self._write_evidence())
        await future

    async def _write_evidence(self) -> None:
        try:
            while self._evidence_pending:
                batch, self._evidence_pending = self._evidence_pending, []
                now = self.clock()
                pipe = self._redis.pipeline(transaction=False)
                for rows, _ in batch:
                    for row in rows:
                        ttl = max(1, row.retain_until_ms - now)
                        owner = self._k.evidence_owner(row.evidence_id)
                        pipe.hset(owner, _D, row.tenant_id)
                        pipe.pexpire(owner, ttl)
                        key = self._k.evidence(row.tenant_id, row.evidence_id)
                        pipe.hset(key, mapping={_BODY: row.body, _D: _evidence_meta(row)})
                        pipe.pexpire(key, ttl)
                try:
                    await pipe.execute()
                except Exception as exc:  # every caller of the batch answers without a ref
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._evidence_task = None

    async def get_evidence(self, evidence_id: str) -> EvidenceRow | None:
        """See :meth:`EvidenceStore.get_evidence` (the owner pointer, then the envelope)."""
        owner = await self._redis.hget(self._k.evidence_owner(evidence_id), _D)
        if owner is None:
            return None
        tenant_id = owner.decode()
        fields = await self._redis.hgetall(self._k.evidence(tenant_id, evidence_id))
        row = _dec_evidence(tenant_id, evidence_id, fields)
        return None if row is None or row.retain_until_ms < self.clock() else row

    async def reservation_evidence(self, reservation_id: str) -> dict[str, str]:
        """See :meth:`EvidenceStore.reservation_evidence`."""
        tenant_id = reservation_tenant(reservation_id)
        if tenant_id is None:
            return {}
        fields = await self._redis.hgetall(self._k.reservation_evidence(tenant_id, reservation_id))
        return {k.decode(): v.decode() for k, v in fields.items() if k != b"_v"}

    async def purge_evidence(self, limit: int = 1000) -> int:
        """Nothing to do: envelopes expire by key TTL at their retention."""
        return 0

    async def index_evidence(self, limit: int = 5000) -> int:
        """Nothing to do: an envelope's keys are written with it."""
        return 0

    def new_policy_id(self, tenant_id: str) -> str:
        """``pol_<tenant>_<hex>``: the owning tenant (so its slot) is found from the id."""
        return f"pol_{tenant_id}_{uuid.uuid4().hex}"

    async def get_policy(self, policy_id: str) -> PolicyRow | None:
        """See :meth:`GovernanceStore.get_policy`."""
        owner = _embedded_tenant(policy_id, "pol_")
        if owner is None:
            return None
        raw = await self._redis.hget(self._k.policies(owner), policy_id)
        return None if raw is None else policy_from_json(raw)

    async def list_events(self, query: EventQuery) -> Page[EventRecord]:
        """See :meth:`Store.list_events`.

        Events are kept per tenant, so ``tenant_id`` is required. The tenant's time index is
        read newest first in chunks and filtered here; one call examines at most
        :data:`EVENT_SCAN_MAX` entries (a page may then hold fewer than ``limit`` events, with
        a cursor to go on from).

        Raises:
            LedgerError: INVALID_REQUEST without ``tenant_id`` or for a malformed cursor.
        """
        if query.tenant_id is None:
            raise LedgerError(
                "INVALID_REQUEST",
                "query parameter tenant_id is required with the Redis store, which keeps events "
                "per tenant; pass ?tenant_id=<tenant>",
            )
        tenant = query.tenant_id
        index = self._k.x_event_log(tenant)
        if self.retention_ms is not None:  # entries whose event expired by TTL
            await self._redis.zremrangebyscore(
                index, "-inf", f"({await self._now() - self.retention_ms}"
            )
        top: Any = "+inf" if query.to_ms is None else query.to_ms
        bottom: Any = "-inf" if query.from_ms is None else query.from_ms
        after: tuple[int, str] | None = None
        if query.cursor:
            at, last_id = decode_cursor(query.cursor, 2)
            after = (int(at), str(last_id))
            top = at if top == "+inf" else min(top, at)
        found: list[EventRecord] = []
        scanned = 0
        offset = 0
        last_seen: tuple[int, str] | None = None
        while len(found) <= query.limit and scanned < EVENT_SCAN_MAX:
            chunk = await self._redis.zrevrangebyscore(
                index, top, bottom, start=offset, num=SWEEP_BATCH, withscores=True
            )
            if not chunk:
                break
            offset += len(chunk)
            scanned += len(chunk)
            members = [(int(score), m.decode()) for m, score in chunk]
            members = [m for m in members if after is None or m < after]
            raws = await self._hget_many([self._k.event_log(tenant, eid) for _, eid in members])
            for (at_ms, eid), raw in zip(members, raws, strict=True):
                last_seen = (at_ms, eid)
                if raw is None:
                    continue
                row = event_from_json(raw)
                if query.matches(row):
                    found.append(row)
                    if len(found) > query.limit:
                        break
        items = found[: query.limit]
        if len(found) > query.limit:
            last = items[-1]
            return Page(items, encode_cursor([last.created_at_ms, last.event_id]))
        if scanned >= EVENT_SCAN_MAX and last_seen is not None:
            return Page(items, encode_cursor(list(last_seen)))
        return Page(items, None)

    async def list_counters(self, tenant_id: str) -> list[CounterRow]:
        """See :meth:`GovernanceStore.list_counters` (drops expired index entries on the way)."""
        index = self._k.x_counters(tenant_id)
        now = await self._now()
        await self._redis.zremrangebyscore(index, "-inf", now)
        names = [n.decode() for n in await self._redis.zrange(index, 0, -1)]
        raws = await self._hget_many([self._k.counter(tenant_id, n) for n in names])
        rows = [CounterRow.from_json(raw) for raw in raws if raw is not None]
        return sorted((r for r in rows if r.expires_at_ms > now), key=lambda r: r.name)

    # -- runtime ---------------------------------------------------------------------------------

    async def authenticate(self, key_hash: str) -> AuthRecord | None:
        """See :meth:`Store.authenticate`.

        One round trip once this process has seen the key: a key's tenant never changes, so
        the key row and its tenant row are fetched together (both are re-read every time, so
        revocation and tenant status changes take effect at once).
        """
        key_name = self._k.key_by_hash(key_hash)
        tenant_id = self._key_tenants.get(key_hash)
        if tenant_id is not None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(key_name, _D)
            pipe.hget(self._k.tenant(tenant_id), _D)
            raw, tenant_raw = await pipe.execute()
        else:
            raw, tenant_raw = await self._redis.hget(key_name, _D), None
        if raw is None:
            return None
        key = _dec(ApiKeyRow, raw)
        if key.tenant_id != tenant_id:
            tenant_raw = await self._redis.hget(self._k.tenant(key.tenant_id), _D)
            if len(self._key_tenants) > 100_000:
                self._key_tenants.clear()
            self._key_tenants[key_hash] = key.tenant_id
        tenant = None if tenant_raw is None else _dec(TenantRow, tenant_raw)
        return AuthRecord(key, tenant)

    async def get_reservation(self, reservation_id: str) -> ReservationRow | None:
        """See :meth:`Store.get_reservation`."""
        owner = reservation_tenant(reservation_id)
        if owner is None:
            return None
        raw = await self._redis.hget(self._k.res(owner, reservation_id), _D)
        return None if raw is None else _dec(ReservationRow, raw)

    async def append_events(self, tenant_id: str, events: Sequence[EventRecord]) -> None:
        """Write events to a tenant's event log outside any ledger operation.

        For webhook lifecycle events; one transaction on the tenant's slot.
        """
        if not events:
            return
        pipe = self._redis.pipeline(transaction=True)
        index = self._k.x_event_log(tenant_id)
        for ev in events:
            key = self._k.event_log(tenant_id, ev.event_id)
            pipe.hset(key, mapping={_V: 1, _D: event_to_json(ev)})
            if self.retention_ms is not None:
                pipe.pexpire(key, self.retention_ms)
            pipe.zadd(index, {ev.event_id: ev.created_at_ms})
        await pipe.execute()

    @property
    def client(self) -> Any:
        """The Redis client (for data this module does not own: webhooks)."""
        return self._redis

    def key_prefix(self) -> str:
        """The key prefix (``--redis-prefix``)."""
        return self.prefix

    async def get_event(self, tenant_id: str, event_id: str) -> EventRow | None:
        """Return a stored event (kept ``retention_ms``), or ``None``."""
        raw = await self._redis.hget(self._k.event(tenant_id, event_id), _D)
        return None if raw is None else _dec(EventRow, raw)

    async def list_debits(
        self, tenant_id: str, from_ms: int, to_ms: int, limit: int
    ) -> list[EventRow]:
        """See :class:`~runcycles_server.stores.base.DebitReader`."""
        index = self._k.x_debits(tenant_id)
        if self.retention_ms is not None:  # entries whose debit expired by TTL
            await self._redis.zremrangebyscore(
                index, "-inf", f"({await self._now() - self.retention_ms}"
            )
        ids = await self._redis.zrangebyscore(index, from_ms, to_ms, start=0, num=limit)
        rows = await self._hget_many([self._k.event(tenant_id, i.decode()) for i in ids])
        return [_dec(EventRow, raw) for raw in rows if raw is not None]

    async def list_audit(self, tenant_id: str, limit: int = 100) -> list[AuditRow]:
        """Return a tenant's most recent audit entries, newest first."""
        ids = await self._redis.zrange(self._k.x_audit(tenant_id), 0, limit - 1, desc=True)
        rows = await self._hget_many([self._k.audit(tenant_id, i.decode()) for i in ids])
        return [_dec(AuditRow, raw) for raw in rows if raw is not None]

    async def list_audit_logs(
        self, tenant_id: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRow]:
        """Return one page of a tenant's audit entries, newest first (see ``AuditReader``).

        Entries are kept per tenant, so ``tenant_id`` is required. The cursor names the last
        entry returned; entries are never deleted, so its rank is found again exactly.

        Raises:
            LedgerError: INVALID_REQUEST without ``tenant_id`` or with a cursor that is not one.
        """
        if tenant_id is None:
            raise LedgerError(
                "INVALID_REQUEST",
                "query parameter tenant_id is required with the Redis store, which keeps audit "
                "logs per tenant; pass ?tenant_id=<tenant>",
            )
        key = self._k.x_audit(tenant_id)
        start = 0
        if cursor:
            (after,) = decode_cursor(cursor, 1)
            rank = await self._redis.zrevrank(key, str(after))
            if rank is None:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "cursor is not valid: pass back next_cursor from the previous page unchanged",
                )
            start = int(rank) + 1
        ids = [i.decode() for i in await self._redis.zrange(key, start, start + limit, desc=True)]
        rows = await self._hget_many([self._k.audit(tenant_id, i) for i in ids[:limit]])
        items = [_dec(AuditRow, raw) for raw in rows if raw is not None]
        return Page(items, encode_cursor([ids[limit - 1]]) if len(ids) > limit else None)

    # -- expiry ----------------------------------------------------------------------------------

    async def expire_due(self, limit: int = 200) -> int:
        """See :meth:`Store.expire_due`.

        Reads the global due index in batches of at most ``SWEEP_BATCH``; examines at most
        ``SWEEP_MAX_SCAN`` entries per call (entries of finalized reservations are dropped on
        the way, extended ones are re-filed at their new deadline).
        """
        now = await self._now()
        expired = 0
        scanned = 0
        while expired < limit and scanned < SWEEP_MAX_SCAN:
            members = await self._redis.zrangebyscore(
                self._k.due, "-inf", f"({now}", start=0, num=SWEEP_BATCH, withscores=True
            )
            if not members:
                break
            scanned += len(members)
            ids = [m.decode() for m, _ in members]
            scores = {m.decode(): int(score) for m, score in members}
            owners = [reservation_tenant(rid) for rid in ids]
            raws = await self._hget_many(
                [self._k.res(o, rid) if o else "" for o, rid in zip(owners, ids, strict=True)]
            )
            drop: list[str] = []
            refile: list[Any] = []
            due: list[tuple[str, str]] = []
            for rid, owner, raw in zip(ids, owners, raws, strict=True):
                if owner is None or raw is None:
                    drop.append(rid)
                    continue
                res = _dec(ReservationRow, raw)
                if res.status != "ACTIVE":
                    drop.append(rid)
                elif res.deadline_ms >= now:
                    refile += [res.deadline_ms, rid]
                elif expired + len(due) < limit:
                    due.append((owner, rid))
            results = await asyncio.gather(*(self.run(operations.expire(r, now)) for _, r in due))
            for (_, rid), outcome in zip(due, results, strict=True):
                if outcome == "expired":
                    expired += 1
                    drop.append(rid)
                elif outcome == "gone":
                    drop.append(rid)
            if drop:
                # Remove an entry only if its score is still the one read: a reserve retried
                # after a conflict re-files its id (write-ahead) and must not lose that entry.
                flat: list[Any] = []
                for rid in drop:
                    flat += [rid, scores[rid]]
                await self._run_script(self._drop_script, [self._k.due], flat)
            if refile:
                await self._redis.execute_command("ZADD", self._k.due, *refile)
            if not drop and not refile:
                break  # nothing changed (only entries beyond the limit remain)
        return expired

    async def purge_idempotency(self, limit: int = 1000) -> int:
        """Return 0: Redis expires idempotency records by TTL at their retention."""
        return 0

    # -- listings --------------------------------------------------------------------------------

    async def _hget_many(self, keys: Sequence[str], name: bytes = _D) -> list[bytes | None]:
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            if key:
                pipe.hget(key, name)
        fetched = iter(await pipe.execute())
        return [next(fetched) if key else None for key in keys]

    async def _hgetall_many(self, keys: Sequence[str]) -> list[_Fields]:
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return list(await pipe.execute())

    async def list_reservations(self, query: ReservationQuery) -> Page[ReservationRow]:
        """See :meth:`Store.list_reservations`.

        The default order (``created_at_ms``) walks the tenant's ``x:res`` index from the
        cursor and stops after one page; other sort keys and filters load the tenant's
        reservations (bounded by the retention of finalized ones) and sort in memory.
        """
        column = query.sort_by if query.sort_by in _SORT_VALUE else "created_at_ms"
        fingerprint = ledger.payload_hash(
            "list",
            {
                "q": [
                    query.idempotency_key, query.status, sorted(query.subject.items()),
                    query.created_from_ms, query.created_to_ms, query.expires_from_ms,
                    query.expires_to_ms, query.finalized_from_ms, query.finalized_to_ms,
                    _SQL_COLUMN[column], query.sort_desc,
                ]
            },
        )[:16]  # fmt: skip
        after: tuple[Any, str] | None = None
        if query.cursor:
            value, last_id, seen_fp = decode_cursor(query.cursor, 3)
            if seen_fp != fingerprint or not isinstance(last_id, str):
                raise LedgerError(
                    "INVALID_REQUEST",
                    "cursor was issued for different filters or sort order; restart paging "
                    "without a cursor",
                )
            after = (value, last_id)
        tenant = query.tenant_id
        index = self._k.x_res(tenant)
        items: list[ReservationRow] = []
        more = False
        sort_value = _SORT_VALUE[column]
        if column == "created_at_ms" and query.idempotency_key is None:
            # Stream the created_at index in order from the cursor's score; stop after a page.
            bound = "+inf" if query.sort_desc else "-inf"
            if after is not None and isinstance(after[0], int):
                bound = str(after[0])
            offset = 0
            batch = max(query.limit * 2, 100)
            stale: list[str] = []
            seen: set[str] = set()
            done = False
            while not done:
                if query.sort_desc:
                    ids = await self._redis.zrevrangebyscore(
                        index, bound, "-inf", start=offset, num=batch
                    )
                else:
                    ids = await self._redis.zrangebyscore(
                        index, bound, "+inf", start=offset, num=batch
                    )
                if not ids:
                    break
                offset += len(ids)
                rids = [i.decode() for i in ids]
                raws = await self._hget_many([self._k.res(tenant, r) for r in rids])
                for rid, raw in zip(rids, raws, strict=True):
                    if rid in seen:  # offsets shift when reservations arrive meanwhile
                        continue
                    seen.add(rid)
                    if raw is None:
                        stale.append(rid)
                        continue
                    row = _dec(ReservationRow, raw)
                    if after is not None and not _beyond(
                        row.created_at_ms, rid, after, query.sort_desc
                    ):
                        continue
                    if not _matches(row, query):
                        continue
                    if len(items) == query.limit:
                        more = done = True
                        break
                    items.append(row)
            if stale:  # finalized reservations past their retention
                await self._redis.zrem(index, *stale)
        else:
            rows = await self._candidates(query)
            rows = [r for r in rows if _matches(r, query)]
            rows.sort(
                key=lambda r: (_sort_key(sort_value(r)), r.reservation_id), reverse=query.sort_desc
            )
            if after is not None:
                rows = [
                    r
                    for r in rows
                    if _beyond(sort_value(r), r.reservation_id, after, query.sort_desc)
                ]
            items = rows[: query.limit]
            more = len(rows) > query.limit
        cursor = None
        if more and items:
            last = items[-1]
            cursor = encode_cursor([sort_value(last), last.reservation_id, fingerprint])
        return Page(items, cursor)

    async def _candidates(self, query: ReservationQuery) -> list[ReservationRow]:
        tenant = query.tenant_id
        if query.idempotency_key is not None:
            fields = await self._redis.hgetall(
                self._k.idem(tenant, "reserve", query.idempotency_key)
            )
            if _D in fields:
                rid = _dec_idem(fields).reservation_id
                row = await self.get_reservation(rid) if rid else None
                if row is not None and row.tenant_id == tenant:
                    return [row]
        index = self._k.x_active(tenant) if query.status == "ACTIVE" else self._k.x_res(tenant)
        ids = [i.decode() for i in await self._redis.zrange(index, 0, -1)]
        raws = await self._hget_many([self._k.res(tenant, r) for r in ids])
        return [_dec(ReservationRow, raw) for raw in raws if raw is not None]

    async def _budgets_at(self, scopes: Sequence[str]) -> list[BudgetRow]:
        keyed = [(s, ledger.scope_tenant(s)) for s in scopes]
        hashes = await self._hgetall_many([self._k.budget(t, s) if t else "" for s, t in keyed])
        rows: list[BudgetRow] = []
        for fields in hashes:
            for name, raw in sorted(fields.items()):
                if name != _V:
                    rows.append(_dec(BudgetRow, raw))
        return rows

    async def _page_budgets(
        self,
        index: str,
        keep: Callable[[BudgetRow], bool],
        limit: int,
        cursor: str | None,
    ) -> Page[BudgetRow]:
        after: tuple[str, str] | None = None
        lower = "-"
        if cursor:
            scope, unit = decode_cursor(cursor, 2)
            after = (str(scope), str(unit))
            lower = f"[{scope}"
        items: list[BudgetRow] = []
        batch = max(limit * 2, 100)
        while True:
            scopes = [
                s.decode()
                for s in await self._redis.zrangebylex(index, lower, "+", start=0, num=batch)
            ]
            if not scopes:
                return Page(items, None)
            lower = f"({scopes[-1]}"
            for row in await self._budgets_at(scopes):
                if after is not None and (row.scope, row.unit) <= after:
                    continue
                if not keep(row):
                    continue
                if len(items) == limit:
                    last = items[-1]
                    return Page(items, encode_cursor([last.scope, last.unit]))
                items.append(row)

    async def list_balances(
        self, tenant_id: str, segments: Sequence[str], limit: int, cursor: str | None
    ) -> Page[BudgetRow]:
        """See :meth:`Store.list_balances` (walks the tenant's ``x:budgets`` index)."""
        return await self._page_budgets(
            self._k.x_budgets(tenant_id),
            lambda b: b.tenant_id == tenant_id and ledger.scope_matches_filters(b.scope, segments),
            limit,
            cursor,
        )

    async def list_budgets(
        self,
        tenant_id: str | None,
        *,
        scope_prefix: str | None,
        unit: str | None,
        status: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[BudgetRow]:
        """See :meth:`Store.list_budgets`."""
        index = self._k.all_budgets if tenant_id is None else self._k.x_budgets(tenant_id)
        return await self._page_budgets(
            index,
            lambda b: (
                (tenant_id is None or b.tenant_id == tenant_id)
                and (unit is None or b.unit == unit)
                and (status is None or b.status == status)
                and (
                    scope_prefix is None
                    or b.scope == scope_prefix
                    or b.scope.startswith(scope_prefix + "/")
                )
            ),
            limit,
            cursor,
        )

    async def _page_lex(
        self,
        index: str,
        load: Callable[[list[str]], Awaitable[list[_T | None]]],
        keep: Callable[[_T], bool],
        ident: Callable[[_T], str],
        limit: int,
        cursor: str | None,
    ) -> Page[_T]:
        lower = "-"
        if cursor:
            (after,) = decode_cursor(cursor, 1)
            lower = f"({after}"
        items: list[_T] = []
        batch = max(limit * 2, 100)
        while True:
            names = [
                n.decode()
                for n in await self._redis.zrangebylex(index, lower, "+", start=0, num=batch)
            ]
            if not names:
                return Page(items, None)
            lower = f"({names[-1]}"
            for row in await load(names):
                if row is None or not keep(row):
                    continue
                if len(items) == limit:
                    return Page(items, encode_cursor([ident(items[-1])]))
                items.append(row)

    # -- admin: tenants --------------------------------------------------------------------------

    async def get_tenant(self, tenant_id: str) -> TenantRow | None:
        """See :meth:`Store.get_tenant`."""
        raw = await self._redis.hget(self._k.tenant(tenant_id), _D)
        return None if raw is None else _dec(TenantRow, raw)

    async def _tenants(self, ids: list[str]) -> list[TenantRow | None]:
        raws = await self._hget_many([self._k.tenant(t) for t in ids])
        return [None if raw is None else _dec(TenantRow, raw) for raw in raws]

    async def count_active_reservations(self) -> int:
        """See :class:`~runcycles_server.stores.base.ActiveCounter`.

        Sums ``ZCARD`` of every tenant's ``x:active`` index (tenants read from the global
        tenant index in pages of :data:`COUNT_BATCH`, one pipeline per page).
        """
        total = 0
        start = 0
        while True:
            ids = await self._redis.zrange(self._k.tenants, start, start + COUNT_BATCH - 1)
            if not ids:
                return total
            pipe = self._redis.pipeline(transaction=False)
            for raw in ids:
                pipe.zcard(self._k.x_active(raw.decode()))
            total += sum(int(n) for n in await pipe.execute())
            if len(ids) < COUNT_BATCH:
                return total
            start += COUNT_BATCH

    async def list_tenants(
        self, status: str | None, limit: int, cursor: str | None
    ) -> Page[TenantRow]:
        """See :meth:`Store.list_tenants`."""
        return await self._page_lex(
            self._k.tenants,
            self._tenants,
            lambda t: status is None or t.status == status,
            lambda t: t.tenant_id,
            limit,
            cursor,
        )

    async def create_tenant(self, row: TenantRow) -> tuple[TenantRow, bool]:
        """See :meth:`Store.create_tenant`."""
        result = await self.run(operations.create_tenant(row))
        await self._redis.zadd(self._k.tenants, {row.tenant_id: 0})
        return result

    async def update_tenant(
        self,
        tenant_id: str,
        changes: dict[str, Any],
        *,
        correlation_id: str | None = None,
        only_from: Sequence[str] | None = None,
    ) -> TenantRow:
        """See :meth:`Store.update_tenant`.

        Closing runs in steps (see the module docstring): the tenant row first (a fence for
        every process), then its ACTIVE reservations are released and its budgets closed in
        batches, then its keys revoked. Asking to close an already closed tenant finishes an
        interrupted cascade.
        """
        op = operations.update_tenant(tenant_id, changes, correlation_id, only_from)
        updated = await self.run(op)
        if changes.get("status") == "CLOSED":
            await self._close_cascade(tenant_id)
        return updated

    async def _close_cascade(self, tenant_id: str) -> None:
        active = self._k.x_active(tenant_id)
        while True:
            ids = [i.decode() for i in await self._redis.zrange(active, 0, CLOSE_BATCH - 1)]
            if not ids:
                break
            stale = await self.run(operations.close_reservations(tenant_id, ids))
            if stale:  # index entries of reservations no longer ACTIVE
                await self._redis.zrem(active, *stale)
        scopes = [s.decode() for s in await self._redis.zrange(self._k.x_budgets(tenant_id), 0, -1)]
        for start in range(0, len(scopes), CLOSE_BATCH):
            chunk = scopes[start : start + CLOSE_BATCH]
            await self.run(operations.close_budgets(tenant_id, chunk))
        key_ids = [k.decode() for k in await self._redis.zrange(self._k.keys_of(tenant_id), 0, -1)]
        for key_id in key_ids:
            row = await self._api_key_by_id(key_id)
            if row is not None and row.status == "ACTIVE":
                await self._revoke(row, "tenant closed", only_active=True)

    # -- admin: API keys -------------------------------------------------------------------------

    async def _api_key_by_id(self, key_id: str) -> ApiKeyRow | None:
        key_hash = await self._redis.hget(self._k.key_by_id(key_id), b"h")
        if key_hash is None:
            return None
        raw = await self._redis.hget(self._k.key_by_hash(key_hash.decode()), _D)
        return None if raw is None else _dec(ApiKeyRow, raw)

    async def create_api_key(self, row: ApiKeyRow) -> ApiKeyRow:
        """See :meth:`Store.create_api_key`."""
        tenant = await self.get_tenant(row.tenant_id)
        if tenant is None:
            raise LedgerError(
                "TENANT_NOT_FOUND",
                f"tenant {row.tenant_id} does not exist; create it first (POST /v1/admin/tenants)",
                status=400,
            )
        if tenant.status == "CLOSED":
            raise LedgerError(
                "TENANT_CLOSED", f"tenant {row.tenant_id} is CLOSED; keys cannot be created"
            )
        row.created_at_ms = await self._now()
        by_hash, by_id = self._k.key_by_hash(row.key_hash), self._k.key_by_id(row.key_id)
        keys = [by_hash, by_id]
        while True:
            snap = await self._read(keys)
            if snap.rows[by_hash] or snap.rows[by_id]:
                raise LedgerError("DUPLICATE_RESOURCE", f"API key {row.key_id} already exists")
            work = _Work(self._k, row.tenant_id, snap)
            work.dirty[by_hash] = {_D: row}
            work.dirty[by_id] = {b"h": row.key_hash.encode()}
            work.zops.append(_ZOp(True, self._k.keys_all, row.key_id))
            work.zops.append(_ZOp(True, self._k.keys_of(row.tenant_id), row.key_id))
            try:
                await self._cas(keys, snap, work, self._k.keys_turn)
            except _Conflict:
                await asyncio.sleep(random.uniform(0, 0.002))
                continue  # read again: a concurrent create of the same key is a duplicate
            kind = "api_key.created"
            await self.record_events(operations.api_key_events(kind, row, None, snap.now_ms))
            return row

    async def _api_keys(self, ids: list[str]) -> list[ApiKeyRow | None]:
        hashes = await self._hget_many([self._k.key_by_id(i) for i in ids], b"h")
        raws = await self._hget_many([self._k.key_by_hash(h.decode()) if h else "" for h in hashes])
        return [None if raw is None else _dec(ApiKeyRow, raw) for raw in raws]

    async def list_api_keys(
        self, tenant_id: str | None, status: str | None, limit: int, cursor: str | None
    ) -> Page[ApiKeyRow]:
        """See :meth:`Store.list_api_keys`."""
        index = self._k.keys_all if tenant_id is None else self._k.keys_of(tenant_id)
        return await self._page_lex(
            index,
            self._api_keys,
            lambda k: (
                (tenant_id is None or k.tenant_id == tenant_id)
                and (status is None or k.status == status)
            ),
            lambda k: k.key_id,
            limit,
            cursor,
        )

    async def _revoke(self, row: ApiKeyRow, reason: str | None, *, only_active: bool) -> ApiKeyRow:
        by_hash = self._k.key_by_hash(row.key_hash)
        while True:
            snap = await self._read([by_hash])
            raw = snap.rows[by_hash].get(_D)
            if raw is None:
                raise LedgerError("NOT_FOUND", f"API key {row.key_id} does not exist")
            current = _dec(ApiKeyRow, raw)
            if current.status == "REVOKED":
                if only_active:
                    return current
                raise LedgerError("KEY_REVOKED", f"API key {row.key_id} is already revoked")
            current.status = "REVOKED"
            current.revoked_at_ms = snap.now_ms
            current.revoked_reason = reason
            work = _Work(self._k, current.tenant_id, snap)
            work.dirty[by_hash] = {_D: current}
            try:
                await self._cas([by_hash], snap, work, self._k.keys_turn)
            except _Conflict:
                await asyncio.sleep(random.uniform(0, 0.002))
                continue
            self.auth_epoch += 1
            # The key and its tenant's events live in different slots: two writes, in this
            # order (a crash between them loses the event, never the revocation).
            kind = "api_key.revoked_via_tenant_cascade" if only_active else "api_key.revoked"
            await self.record_events(
                operations.api_key_events(kind, current, "ACTIVE", snap.now_ms)
            )
            return current

    async def expire_api_keys(self, limit: int = 200) -> int:
        """See :meth:`Store.expire_api_keys`.

        Reads the key index in chunks (keys have no expiry index: a sweep reads every key id
        and row once, a few round trips per thousand keys) and marks each due ACTIVE key
        EXPIRED with a compare-and-set, then records its event (another slot, as for
        revocations). Concurrent sweeps in other processes expire each key once.
        """
        now = await self._now()
        done = 0
        start = 0
        while done < limit:
            ids = [
                i.decode() for i in await self._redis.zrange(self._k.keys_all, start, start + 499)
            ]
            if not ids:
                break
            start += len(ids)
            for row in await self._api_keys(ids):
                if done >= limit:
                    break
                if (
                    row is not None
                    and row.status == "ACTIVE"
                    and row.expires_at_ms is not None
                    and row.expires_at_ms <= now
                    and await self._expire_key(row)
                ):
                    done += 1
        return done

    async def _expire_key(self, row: ApiKeyRow) -> bool:
        by_hash = self._k.key_by_hash(row.key_hash)
        while True:
            snap = await self._read([by_hash])
            raw = snap.rows[by_hash].get(_D)
            if raw is None:
                return False
            current = _dec(ApiKeyRow, raw)
            if current.status != "ACTIVE":
                return False  # revoked or expired meanwhile (another process's sweep)
            current.status = "EXPIRED"
            work = _Work(self._k, current.tenant_id, snap)
            work.dirty[by_hash] = {_D: current}
            try:
                await self._cas([by_hash], snap, work, self._k.keys_turn)
            except _Conflict:
                await asyncio.sleep(random.uniform(0, 0.002))
                continue
            self.auth_epoch += 1
            events = operations.api_key_events(
                "api_key.expired", current, "ACTIVE", snap.now_ms, system=True
            )
            await self.record_events(events)
            return True

    async def update_api_key(
        self, key_id: str, changes: dict[str, Any], *, audit: AuditRow | None = None
    ) -> ApiKeyRow:
        """See :meth:`Store.update_api_key`.

        The key is changed with a compare-and-set; its event and audit entry live in its
        tenant's slot and follow in one more write (a crash between them loses the record,
        never the change), as for revocations.
        """
        row = await self._api_key_by_id(key_id)
        if row is None:
            raise LedgerError("NOT_FOUND", f"API key {key_id} does not exist")
        by_hash = self._k.key_by_hash(row.key_hash)
        while True:
            snap = await self._read([by_hash])
            raw = snap.rows[by_hash].get(_D)
            if raw is None:
                raise LedgerError("NOT_FOUND", f"API key {key_id} does not exist")
            current = _dec(ApiKeyRow, raw)
            new, events, entry = operations.plan_api_key_update(
                current, changes, snap.now_ms, audit
            )
            if new is current:  # nothing changed
                return current
            work = _Work(self._k, current.tenant_id, snap)
            work.dirty[by_hash] = {_D: new}
            try:
                await self._cas([by_hash], snap, work, self._k.keys_turn)
            except _Conflict:
                await asyncio.sleep(random.uniform(0, 0.002))
                continue
            self.auth_epoch += 1
            await self.run(operations.record_changes(new.tenant_id, events, entry))
            return new

    async def revoke_api_key(self, key_id: str, reason: str | None) -> ApiKeyRow:
        """See :meth:`Store.revoke_api_key`."""
        row = await self._api_key_by_id(key_id)
        if row is None:
            raise LedgerError("NOT_FOUND", f"API key {key_id} does not exist")
        return await self._revoke(row, reason, only_active=False)

    # -- admin: budgets --------------------------------------------------------------------------

    async def create_budget(self, row: BudgetRow) -> BudgetRow:
        """See :meth:`Store.create_budget`."""
        owner = ledger.scope_tenant(row.scope)
        if owner != row.tenant_id:
            raise LedgerError(
                "INVALID_REQUEST",
                f"scope {row.scope!r} must start with 'tenant:{row.tenant_id}' (the budget's "
                "tenant)",
            )
        try:
            new = await self.run(operations.create_budget(row))
        except LedgerError as exc:
            if exc.code == "DUPLICATE_RESOURCE":  # repair a missing global index entry
                await self._redis.zadd(self._k.all_budgets, {row.scope: 0})
            raise
        await self._redis.zadd(self._k.all_budgets, {row.scope: 0})
        return new

    async def get_budget(self, scope: str, unit: str) -> BudgetRow | None:
        """See :meth:`Store.get_budget`."""
        owner = ledger.scope_tenant(scope)
        if owner is None:
            return None
        raw = await self._redis.hget(self._k.budget(owner, scope), unit)
        return None if raw is None else _dec(BudgetRow, raw)

    # -- rate detectors (see runcycles_server.monitor) -------------------------------------------

    async def add_signal_counts(self, rows: Sequence[SignalCount], keep_ms: int) -> None:
        """See :class:`~runcycles_server.stores.base.SignalStore`.

        One pipeline of ``HINCRBY`` per counter and a ``PEXPIRE`` per minute touched (the
        counters go by TTL).
        """
        pipe = self._redis.pipeline(transaction=False)
        buckets = set()
        for bucket, tenant, name, n in rows:
            key = self._k.signal_bucket(bucket)
            pipe.hincrby(key, f"{tenant}\x1f{name}", n)
            buckets.add(key)
        for key in buckets:
            pipe.pexpire(key, keep_ms)
        await pipe.execute()

    async def signal_counts(self, since_ms: int) -> dict[tuple[int, str, str], int]:
        """See :class:`~runcycles_server.stores.base.SignalStore` (a ``HGETALL`` a minute)."""
        now = await self._now()
        first = since_ms // SIGNAL_BUCKET_MS * SIGNAL_BUCKET_MS
        buckets = list(range(first, now + 1, SIGNAL_BUCKET_MS))
        pipe = self._redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.hgetall(self._k.signal_bucket(bucket))
        found: dict[tuple[int, str, str], int] = {}
        for bucket, fields in zip(buckets, await pipe.execute(), strict=True):
            if bucket < since_ms:
                continue
            for raw, n in fields.items():
                tenant, _, name = raw.decode().partition("\x1f")
                found[(bucket, tenant, name)] = int(n)
        return found

    async def raise_flag(self, name: str, ttl_ms: int) -> bool:
        """See :class:`~runcycles_server.stores.base.SignalStore`.

        One atomic script call; the flag holds its expiry by the store clock (so an injected
        clock drives it), and the key itself goes by TTL a little later.
        """
        now = await self._now()
        args = [now + ttl_ms, ttl_ms + SIGNAL_BUCKET_MS, now]
        raised = await self._run_script(self._flag_script, [self._k.signal_flag(name)], args)
        return bool(raised)

    # -- maintenance (tests, CLI) ----------------------------------------------------------------

    async def delete_all_keys(self) -> int:
        """Delete every key under this store's prefix; return how many.

        Uses ``SCAN`` (never on a request path): meant for tests and for decommissioning a
        deployment's prefix. Never flushes the database.
        """
        deleted = 0
        batch: list[bytes] = []
        async for key in self._redis.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(await self._redis.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(await self._redis.delete(*batch))
        return deleted


# --------------------------------------------------------------------------------------------
# Listing helpers (same ordering and filters as the SQLite store)

_SORT_VALUE: Final[dict[str, Callable[[ReservationRow], Any]]] = {
    "reservation_id": lambda r: r.reservation_id,
    "tenant": lambda r: r.subject.get("tenant"),
    "scope_path": lambda r: r.scope_path,
    "status": lambda r: r.status,
    "reserved": lambda r: r.estimate,
    "created_at_ms": lambda r: r.created_at_ms,
    "expires_at_ms": lambda r: r.expires_at_ms,
}
_SQL_COLUMN: Final = {
    "reservation_id": "reservation_id",
    "tenant": "s_tenant",
    "scope_path": "scope_path",
    "status": "status",
    "reserved": "estimate",
    "created_at_ms": "created_at_ms",
    "expires_at_ms": "expires_at_ms",
}


def _sort_key(value: Any) -> tuple[bool, Any]:
    # NULLs sort first ascending, like SQLite.
    return (value is not None, value if value is not None else 0)


def _beyond(value: Any, rid: str, after: tuple[Any, str], desc: bool) -> bool:
    mine = (_sort_key(value), rid)
    theirs = (_sort_key(after[0]), after[1])
    try:
        return mine < theirs if desc else mine > theirs
    except TypeError:
        return False


def _within(value: int | None, lo: int | None, hi: int | None) -> bool:
    if value is None:
        return lo is None and hi is None
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _matches(r: ReservationRow, query: ReservationQuery) -> bool:
    return (
        r.tenant_id == query.tenant_id
        and (query.idempotency_key is None or r.idempotency_key == query.idempotency_key)
        and (query.status is None or r.status == query.status)
        and all(r.subject.get(level) == value for level, value in query.subject.items())
        and _within(r.created_at_ms, query.created_from_ms, query.created_to_ms)
        and _within(r.expires_at_ms, query.expires_from_ms, query.expires_to_ms)
        and (
            (query.finalized_from_ms is None and query.finalized_to_ms is None)
            or _within(r.finalized_at_ms, query.finalized_from_ms, query.finalized_to_ms)
        )
    )
