"""SQLite store: one file; each write (or group of runtime mutations) one ``BEGIN IMMEDIATE``.

Durability and concurrency:

* The database runs in WAL mode. ``synchronous=NORMAL`` (the default here) makes every
  acknowledged transaction survive a killed or crashed *process* (the WAL is in the OS page
  cache the moment COMMIT returns), but the last transactions can be lost if the *machine*
  loses power. ``synchronous=FULL`` fsyncs the WAL on every commit and survives power loss too,
  at roughly 10x the commit cost (about 200 us instead of 20 us on a typical SSD). Choose with
  ``SqliteStore(path, synchronous="FULL")``.
* Every write is a ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, so
  several server processes on one file serialize correctly and never hit a lock upgrade
  deadlock; ``busy_timeout`` makes a waiting process block instead of failing. On POSIX,
  writers first take an ``flock`` on ``<db>.lock``: the kernel hands the lock to the next
  waiting process the moment it is released, where SQLite's own busy handler would sleep
  1 ms or more between retries (a large cost when transactions take ~50 us).
* Runtime mutations are *group committed* (see ``RowStore._mutate``): the ones that arrive
  while the event loop is busy run back to back in one transaction, each answered only after
  it committed. ``COMMIT`` (writing the WAL frames) and the cross-process lock hand-off were
  the largest costs of a request; a group pays them once.
* Transactions run inline on the calling (event loop) thread: each operation takes tens of
  microseconds, cheaper than handing it to a worker thread. Statements are prepared once and
  cached by the ``sqlite3`` module.
* Reads go through a memory map (``mmap_size``): when another process wrote, SQLite drops its
  page cache, and re-reading the pages then costs no system calls.
* WAL checkpoints run in a background thread every :data:`CHECKPOINT_EVERY_COMMITS` commits
  (``PRAGMA wal_checkpoint(PASSIVE)``, which never blocks writers), instead of inside a
  ``COMMIT`` that holds the writer lock; SQLite's own autocheckpoint stays as a backstop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

try:  # POSIX: a kernel lock queues writer processes without SQLite's sleep-and-retry
    import fcntl
except ImportError:  # pragma: no cover - Windows falls back to busy_timeout alone
    fcntl = None  # type: ignore[assignment]

from runcycles.models import INT64_MAX
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
from runcycles_server.stores.base import (
    Clock,
    EventQuery,
    Page,
    ReservationQuery,
    RowStore,
    SignalCount,
    StoreUnavailable,
)

SCHEMA_VERSION: Final = 9
_UPSERT_COUNTER: Final = (
    "INSERT INTO quota_counters (tenant_id, name, expires_at_ms, body) VALUES (?,?,?,?) "
    "ON CONFLICT (tenant_id, name) DO UPDATE"
)
CHECKPOINT_EVERY_COMMITS: Final = 1000
"""Write transactions between two background WAL checkpoints (see :class:`SqliteStore`)."""
CHECKPOINT_EVERY_EVIDENCE_BYTES: Final = 2 * 1024 * 1024
"""Evidence envelope bytes written between two background checkpoints, whatever the number of
commits: envelopes grow the WAL fast, and every page read searches the WAL's index, so a
long WAL slows every read (a checkpoint lets the next writer restart it)."""
AUTOCHECKPOINT_PAGES: Final = 20_000
"""SQLite's own checkpoint-on-commit threshold: only a backstop (no event loop running)."""
MMAP_BYTES: Final = 256 * 1024 * 1024
"""The memory map of a store opened with ``mmap=True`` (see :class:`SqliteStore`)."""

_MIGRATIONS: Final[dict[int, str]] = {
    1: """
CREATE TABLE tenants (
    tenant_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    parent_tenant_id TEXT,
    default_commit_overage_policy TEXT,
    default_reservation_ttl_ms INTEGER,
    max_reservation_ttl_ms INTEGER,
    max_reservation_extensions INTEGER,
    reservation_expiry_policy TEXT,
    metadata TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    suspended_at_ms INTEGER,
    closed_at_ms INTEGER
) WITHOUT ROWID;

CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT,
    permissions TEXT NOT NULL,
    scope_filter TEXT,
    metadata TEXT,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER,
    revoked_reason TEXT
) WITHOUT ROWID;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, key_id);

CREATE TABLE budgets (
    scope TEXT NOT NULL,
    unit TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    allocated INTEGER NOT NULL,
    remaining INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    spent INTEGER NOT NULL,
    debt INTEGER NOT NULL,
    overdraft_limit INTEGER NOT NULL,
    is_over_limit INTEGER NOT NULL,
    status TEXT NOT NULL,
    commit_overage_policy TEXT,
    caps TEXT,
    ledger_id TEXT NOT NULL,
    rollover_policy TEXT,
    period_start TEXT,
    period_end TEXT,
    metadata TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, unit)
) WITHOUT ROWID;
CREATE INDEX budgets_tenant ON budgets (tenant_id, scope, unit);

CREATE TABLE reservations (
    reservation_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    status TEXT NOT NULL,
    subject TEXT NOT NULL,
    action TEXT NOT NULL,
    unit TEXT NOT NULL,
    estimate INTEGER NOT NULL,
    scope_path TEXT NOT NULL,
    affected_scopes TEXT NOT NULL,
    budgeted_scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    grace_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    overage_policy TEXT NOT NULL,
    max_extensions INTEGER NOT NULL,
    extension_count INTEGER NOT NULL,
    idempotency_key TEXT,
    metadata TEXT,
    committed INTEGER,
    committed_metadata TEXT,
    finalized_at_ms INTEGER,
    s_tenant TEXT,
    s_workspace TEXT,
    s_app TEXT,
    s_workflow TEXT,
    s_agent TEXT,
    s_toolset TEXT,
    settle_endpoint TEXT,
    settle_key TEXT,
    settle_hash TEXT,
    settle_status INTEGER,
    settle_body BLOB
) WITHOUT ROWID;
CREATE INDEX reservations_tenant_created ON reservations (tenant_id, created_at_ms);
CREATE INDEX reservations_due ON reservations (deadline_ms) WHERE status = 'ACTIVE';

CREATE TABLE idempotency (
    tenant_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    body BLOB NOT NULL,
    reservation_id TEXT,
    created_at_ms INTEGER NOT NULL,
    retain_until_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, idem_key)
) WITHOUT ROWID;
CREATE INDEX idempotency_retention ON idempotency (retain_until_ms);

CREATE TABLE events (
    event_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    action TEXT NOT NULL,
    unit TEXT NOT NULL,
    actual INTEGER NOT NULL,
    charged INTEGER NOT NULL,
    scope_path TEXT NOT NULL,
    affected_scopes TEXT NOT NULL,
    budgeted_scopes TEXT NOT NULL,
    overage_policy TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    metrics TEXT,
    metadata TEXT,
    client_time_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX events_tenant_created ON events (tenant_id, created_at_ms);

CREATE TABLE audit_log (
    audit_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    actor_type TEXT NOT NULL,
    operation TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    request_id TEXT,
    trace_id TEXT,
    details TEXT
) WITHOUT ROWID;
""",
    # 2: indexes for the retention purge (finished reservations by deadline, events by age)
    2: """
CREATE INDEX reservations_finished ON reservations (deadline_ms) WHERE status != 'ACTIVE';
CREATE INDEX events_created ON events (created_at_ms);
""",
    # 3: action governance (policies, quota counters, observe mode)
    3: """
ALTER TABLE tenants ADD COLUMN observe_mode TEXT;
ALTER TABLE reservations ADD COLUMN quota_counters TEXT;
CREATE TABLE policies (
    policy_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX policies_tenant ON policies (tenant_id);
CREATE TABLE quota_counters (
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (tenant_id, name)
) WITHOUT ROWID;
CREATE INDEX quota_counters_expiry ON quota_counters (expires_at_ms);
""",
    # 4: the event plane's events (the `events` table holds POST /v1/events debits)
    4: """
CREATE TABLE event_log (
    event_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    scope TEXT,
    correlation_id TEXT,
    request_id TEXT,
    trace_id TEXT,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX event_log_tenant_time ON event_log (tenant_id, created_at_ms, event_id);
CREATE INDEX event_log_time ON event_log (created_at_ms, event_id);
""",
    # 5: a tenant's policy count (a reservation of a tenant without policies skips them)
    5: """
ALTER TABLE tenants ADD COLUMN policy_count INTEGER;
UPDATE tenants SET policy_count = (
    SELECT count(*) FROM policies WHERE policies.tenant_id = tenants.tenant_id
);
""",
    # 6: unused (a number left free while two changes landed side by side)
    6: "",
    # 7: the rate detectors' per-minute counters and flags (see runcycles_server.monitor)
    7: """
CREATE TABLE signal_counts (
    bucket_ms INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, tenant_id, name)
) WITHOUT ROWID;
CREATE TABLE signal_flags (
    name TEXT PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX api_keys_expiry ON api_keys (status, expires_at_ms);
""",
    # 8: webhook subscriptions, their delivery queue (with leases), the dispatcher's cursors,
    # and each tenant's extra threshold set (see runcycles_server.webhooks)
    8: """
ALTER TABLE tenants ADD COLUMN event_thresholds TEXT;
CREATE TABLE webhook_subscriptions (
    subscription_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL,
    status TEXT NOT NULL,
    sort_key TEXT NOT NULL,
    queued_at_ms INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until_ms INTEGER,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_deliveries_open ON webhook_deliveries (subscription_id, sort_key)
    WHERE status IN ('PENDING', 'RETRYING');
CREATE INDEX webhook_deliveries_listing ON webhook_deliveries (subscription_id, queued_at_ms);
CREATE INDEX webhook_deliveries_done ON webhook_deliveries (queued_at_ms)
    WHERE status IN ('SUCCESS', 'FAILED');
CREATE TABLE webhook_state (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
""",
    # 9: signed evidence envelopes (body = the canonical signing input; see .evidence).
    # `evidence` has no index: the hot path only appends to it (rowid = issue order).
    # `evidence_index` (row = the envelope's rowid; the id's first 64 bits; its reservation)
    # is filled in the background in large batches (see SqliteStore._index_evidence), so the
    # random inserts a content-addressed index needs cost one page write per batch, not per
    # envelope. Rows past the index's highest row are found by a scan of that short tail.
    9: """
CREATE TABLE evidence (
    evidence_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    artifact_type TEXT NOT NULL,
    reservation_id TEXT,
    created_at_ms INTEGER NOT NULL,
    retain_until_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE evidence_index (
    row INTEGER PRIMARY KEY,
    id_key INTEGER NOT NULL,
    reservation_id TEXT
);
CREATE INDEX evidence_index_id ON evidence_index (id_key);
CREATE INDEX evidence_index_reservation ON evidence_index (reservation_id)
    WHERE reservation_id IS NOT NULL;
""",
}


def _j(value: Any) -> str | None:
    return None if value is None else ledger.dumps(value).decode()


def _uj(value: str | None) -> Any:
    return None if value is None else ledger.loads(value)


def encode_cursor(values: Sequence[Any]) -> str:
    """Encode a keyset position as an opaque URL-safe cursor."""
    return base64.urlsafe_b64encode(_j(list(values)).encode()).decode().rstrip("=")  # type: ignore[union-attr]


def decode_cursor(cursor: str, size: int) -> list[Any]:
    """Decode a cursor made by :func:`encode_cursor`.

    Raises:
        LedgerError: INVALID_REQUEST if it is not one of ours.
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, TypeError):
        values = None
    if not isinstance(values, list) or len(values) != size:
        raise LedgerError(
            "INVALID_REQUEST",
            "cursor is not valid: pass back next_cursor from the previous page unchanged",
        )
    return values


_TENANT_COLS: Final = (
    "tenant_id, name, status, parent_tenant_id, default_commit_overage_policy, "
    "default_reservation_ttl_ms, max_reservation_ttl_ms, max_reservation_extensions, "
    "reservation_expiry_policy, metadata, created_at_ms, updated_at_ms, suspended_at_ms, "
    "closed_at_ms, observe_mode, policy_count, event_thresholds"
)
_KEY_COLS: Final = (
    "key_id, key_hash, key_prefix, tenant_id, name, status, description, permissions, "
    "scope_filter, metadata, created_at_ms, expires_at_ms, revoked_at_ms, revoked_reason"
)
_BUDGET_COLS: Final = (
    "scope, unit, tenant_id, allocated, remaining, reserved, spent, debt, overdraft_limit, "
    "is_over_limit, status, commit_overage_policy, caps, ledger_id, rollover_policy, "
    "period_start, period_end, metadata, created_at_ms, updated_at_ms"
)
_RES_COLS: Final = (
    "reservation_id, tenant_id, status, subject, action, unit, estimate, scope_path, "
    "affected_scopes, budgeted_scopes, created_at_ms, expires_at_ms, grace_ms, overage_policy, "
    "max_extensions, extension_count, idempotency_key, metadata, committed, committed_metadata, "
    "finalized_at_ms, quota_counters"
)
_SELECT_RESERVATION: Final = f"SELECT {_RES_COLS} FROM reservations WHERE reservation_id = ?"
_SETTLE_KINDS: Final = ("commit", "release")
"""Idempotency endpoints stored on the reservation row instead of the idempotency table."""
_SORT_COLUMNS: Final = {
    "reservation_id": "reservation_id",
    "tenant": "s_tenant",
    "scope_path": "scope_path",
    "status": "status",
    "reserved": "estimate",
    "created_at_ms": "created_at_ms",
    "expires_at_ms": "expires_at_ms",
}


_INSERT_EVIDENCE: Final = (
    "INSERT INTO evidence (evidence_id, tenant_id, artifact_type, reservation_id, "
    "created_at_ms, retain_until_ms, body) VALUES (?,?,?,?,?,?,?)"
)
_EVIDENCE_COLS: Final = (
    "e.evidence_id, e.tenant_id, e.artifact_type, e.reservation_id, e.created_at_ms, "
    "e.retain_until_ms, e.body"
)
_INDEXED_UPTO: Final = "(SELECT COALESCE(MAX(row), 0) FROM evidence_index)"
"""The highest envelope row the index covers (rows above it are the unindexed tail)."""


def _id_key(evidence_id: str) -> int:
    """The first 64 bits of an evidence id as a signed integer (the id index's key)."""
    return int.from_bytes(bytes.fromhex(evidence_id[:16]), "big", signed=True)


def _tenant(r: sqlite3.Row | tuple[Any, ...]) -> TenantRow:
    return TenantRow(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        r[7],
        r[8],
        _uj(r[9]),
        r[10],
        r[11],
        r[12],
        r[13],
        r[14],
        r[15],
        _uj(r[16]),
    )


def _key(r: tuple[Any, ...]) -> ApiKeyRow:
    return ApiKeyRow(
        key_id=r[0],
        key_hash=r[1],
        key_prefix=r[2],
        tenant_id=r[3],
        name=r[4],
        status=r[5],
        description=r[6],
        permissions=_uj(r[7]),
        scope_filter=_uj(r[8]),
        metadata=_uj(r[9]),
        created_at_ms=r[10],
        expires_at_ms=r[11],
        revoked_at_ms=r[12],
        revoked_reason=r[13],
    )


def _budget(r: tuple[Any, ...]) -> BudgetRow:
    return BudgetRow(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), r[10], r[11],
        _uj(r[12]), r[13], r[14], r[15], r[16], _uj(r[17]), r[18], r[19],
    )  # fmt: skip


def _reservation(r: tuple[Any, ...]) -> ReservationRow:
    return ReservationRow(
        r[0], r[1], r[2], _uj(r[3]), _uj(r[4]), r[5], r[6], r[7], _uj(r[8]),
        _uj(r[9]), r[10], r[11], r[12], r[13], r[14], r[15], r[16], _uj(r[17]), r[18],
        _uj(r[19]), r[20], _uj(r[21]),
    )  # fmt: skip


def default_path() -> Path:
    """Return the default database file: ``cycles.db`` in the user data directory."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("runcycles", appauthor=False)) / "cycles.db"


class _WriteTx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception) under the writer lock.

    A plain class rather than a generator context manager: it runs twice per request.
    """

    __slots__ = ("nested", "store")

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.nested = False

    def __enter__(self) -> None:
        store = self.store
        conn = store._conn
        if conn.in_transaction:  # nested use inside one operation
            self.nested = True
            return
        if store._lock_fd is not None and not store._locked:
            # Blocking on purpose: handing the wait to a thread (to keep the event loop
            # serving) measured slower, the thread hand-offs costing more than they saved.
            fcntl.flock(store._lock_fd, fcntl.LOCK_EX)
            store._locked = True
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            store._release_lock()
            if "locked" in str(exc) or "busy" in str(exc):
                # Another program held the write lock past busy_timeout (a backup tool, an
                # sqlite3 shell): the store is unavailable for now, the request can be retried.
                raise StoreUnavailable(
                    f"SQLite database {store.path} stayed locked by another program for "
                    f"{store.busy_timeout_ms} ms"
                ) from exc
            raise
        except BaseException:
            store._release_lock()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.nested:
            return
        store = self.store
        conn = store._conn
        try:
            if exc_type is not None:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # COMMIT itself failed (disk full)
                    conn.execute("ROLLBACK")
                raise
        finally:
            store._release_lock()
        store._after_commit()


class SqliteStore(RowStore):
    """A :class:`~runcycles_server.stores.base.Store` on one SQLite file.

    Args:
        path: database file (created with its directory if missing), ``":memory:"``, or
            ``None`` for :func:`default_path`.
        clock: epoch-milliseconds clock (inject a fake one in tests).
        synchronous: ``"NORMAL"`` (survives process crashes) or ``"FULL"`` (also power loss).
        busy_timeout_ms: how long to wait for another process's write lock.
        mmap: read pages through a memory map (:data:`MMAP_BYTES`). For several processes
            writing one file (``cycles serve --workers N``): each one's commit makes the others
            drop their page cache, and re-reading the pages then costs no system calls. A lone
            process keeps its cache, where a page lookup is cheaper than through the map
            (SQLite searches the WAL index on every mapped page fetch: 19 K instructions per
            reserve+commit pair, 70 K with evidence on, measured in-process).
    """

    reads_prove_writes: Final = False
    """A file another program holds locked answers reads but not writes (see
    :class:`runcycles_server.health.StoreHealth`): only a write ends an outage."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        clock: Clock | None = None,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_ms: int = 10_000,
        mmap: bool = False,
    ) -> None:
        super().__init__(clock)
        if path is None:
            path = default_path()
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._lock_fd: int | None = None
        self._locked = False  # this process holds the flock on <db>.lock
        self._commits = 0
        self._evidence_bytes = 0
        self._checkpointing = False
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._seen_reservation: str | None = None  # last reservation id read (and found)
        if self.path != ":memory:" and fcntl is not None:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout_ms / 1000,
            cached_statements=256,
        )
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -32768")  # 32 MiB of page cache
        if mmap:
            conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        # Checkpoints run in a background thread after every CHECKPOINT_EVERY_COMMITS commits
        # (see _after_commit), not inside a COMMIT that holds the writer lock.
        conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA journal_size_limit = 67108864")  # a reset WAL shrinks to 64 MiB
        self._migrate()

    # -- schema ----------------------------------------------------------------------------------

    def _migrate(self) -> None:
        conn = self._conn
        with self._write():
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database {self.path} has schema version {current}, newer than this server "
                    f"supports ({SCHEMA_VERSION}); upgrade runcycles-server"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, self.clock()))

    def schema_version(self) -> int:
        """Return the applied schema version."""
        row = self._conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    # -- transactions ----------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[None]:
        return _WriteTx(self)

    def write_transaction(self) -> AbstractContextManager[None]:
        """One write transaction, for tables this module does not own (webhooks).

        ``BEGIN IMMEDIATE`` under the writer lock; nests inside an open one.
        """
        return _WriteTx(self)

    def read_transaction(self) -> AbstractContextManager[None]:
        """One read transaction (a consistent snapshot; takes no writer lock)."""
        return self._read_tx()

    @property
    def connection(self) -> sqlite3.Connection:
        """The store's connection (use it inside :meth:`write_transaction` to write)."""
        return self._conn

    @contextmanager
    def _read_tx(self) -> Iterator[None]:
        conn = self._conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def _read(self) -> AbstractContextManager[None]:
        return self._read_tx()

    def _release_lock(self) -> None:
        if self._locked:
            self._locked = False
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _after_commit(self) -> None:
        """Count a commit; every CHECKPOINT_EVERY_COMMITS, checkpoint the WAL in a thread."""
        self._commits += 1
        due = (
            self._commits >= CHECKPOINT_EVERY_COMMITS
            or self._evidence_bytes >= CHECKPOINT_EVERY_EVIDENCE_BYTES
        )
        if not due or self._checkpointing:
            return
        if self.path == ":memory:":
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: SQLite's autocheckpoint is the backstop
            return
        self._commits = 0
        self._evidence_bytes = 0
        self._checkpointing = True
        loop.run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> None:
        """Copy committed WAL frames into the database file (PASSIVE: never blocks writers)."""
        try:
            conn = self._checkpoint_conn
            if conn is None:
                conn = self._checkpoint_conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:  # busy or closing: the next round (or the backstop) catches up
            pass
        finally:
            self._checkpointing = False

    async def close(self) -> None:
        """Close the connection (after a running background checkpoint finished)."""
        for _ in range(1000):
            if not self._checkpointing:
                break
            await asyncio.sleep(0.01)
        if self._checkpoint_conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._checkpoint_conn.close()
            self._checkpoint_conn = None
        self._release_lock()
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def ping(self) -> bool:
        """Return whether the database answers."""
        try:
            self._conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    # -- primitives ------------------------------------------------------------------------------

    def _get_tenant(self, tenant_id: str) -> TenantRow | None:
        r = self._conn.execute(
            f"SELECT {_TENANT_COLS} FROM tenants WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return None if r is None else _tenant(r)

    def _put_tenant(self, row: TenantRow, *, insert: bool) -> None:
        self._conn.execute(
            f"INSERT OR REPLACE INTO tenants ({_TENANT_COLS}) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.tenant_id, row.name, row.status, row.parent_tenant_id,
                row.default_commit_overage_policy, row.default_reservation_ttl_ms,
                row.max_reservation_ttl_ms, row.max_reservation_extensions,
                row.reservation_expiry_policy, _j(row.metadata), row.created_at_ms,
                row.updated_at_ms, row.suspended_at_ms, row.closed_at_ms, row.observe_mode,
                row.policy_count, _j(row.event_thresholds),
            ),
        )  # fmt: skip

    def _get_budgets(self, scopes: Sequence[str]) -> list[BudgetRow]:
        if not scopes:
            return []
        marks = ",".join("?" * len(scopes))
        rows = self._conn.execute(
            f"SELECT {_BUDGET_COLS} FROM budgets WHERE scope IN ({marks})", tuple(scopes)
        ).fetchall()
        return [_budget(r) for r in rows]

    def _put_budget(self, row: BudgetRow, *, insert: bool) -> None:
        self._conn.execute(
            f"INSERT OR REPLACE INTO budgets ({_BUDGET_COLS}) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.scope, row.unit, row.tenant_id, row.allocated, row.remaining, row.reserved,
                row.spent, row.debt, row.overdraft_limit, int(row.is_over_limit), row.status,
                row.commit_overage_policy, _j(row.caps), row.ledger_id, row.rollover_policy,
                row.period_start, row.period_end, _j(row.metadata), row.created_at_ms,
                row.updated_at_ms,
            ),
        )  # fmt: skip

    def _get_reservation(self, reservation_id: str) -> ReservationRow | None:
        r = self._conn.execute(_SELECT_RESERVATION, (reservation_id,)).fetchone()
        if r is None:
            return None
        self._seen_reservation = reservation_id  # exists: _apply may UPDATE it in place
        return _reservation(r)

    def _get_idem(self, tenant_id: str, endpoint: str, key: str) -> IdempotencyRow | None:
        kind, _, reservation_id = endpoint.partition(":")
        if kind in _SETTLE_KINDS:
            # commit/release keys live on the (terminal) reservation row: one row write fewer
            r = self._conn.execute(
                "SELECT settle_hash, settle_status, settle_body, finalized_at_ms FROM "
                "reservations WHERE reservation_id = ? AND tenant_id = ? AND settle_endpoint = ? "
                "AND settle_key = ?",
                (reservation_id, tenant_id, kind, key),
            ).fetchone()
            if r is None:
                return None
            return IdempotencyRow(
                tenant_id, endpoint, key, r[0], r[1], r[2], reservation_id, r[3] or 0,
                INT64_MAX,
            )  # fmt: skip
        r = self._conn.execute(
            "SELECT tenant_id, endpoint, idem_key, payload_hash, status_code, body, "
            "reservation_id, created_at_ms, retain_until_ms FROM idempotency "
            "WHERE tenant_id = ? AND endpoint = ? AND idem_key = ?",
            (tenant_id, endpoint, key),
        ).fetchone()
        return None if r is None else IdempotencyRow(*r)

    def _apply(self, outcome: Outcome) -> None:
        conn = self._conn
        if outcome.budgets:
            conn.executemany(
                "UPDATE budgets SET allocated = ?, remaining = ?, reserved = ?, spent = ?, "
                "debt = ?, is_over_limit = ?, updated_at_ms = ? WHERE scope = ? AND unit = ?",
                [
                    (
                        b.allocated, b.remaining, b.reserved, b.spent, b.debt,
                        int(b.is_over_limit), b.updated_at_ms, b.scope, b.unit,
                    )
                    for b in outcome.budgets
                ],
            )  # fmt: skip
        res = outcome.reservation
        idem = outcome.idempotency
        settle: tuple[Any, ...] = (None, None, None, None, None)
        if idem is not None and idem.endpoint.partition(":")[0] in _SETTLE_KINDS:
            kind = idem.endpoint.partition(":")[0]
            settle = (kind, idem.key, idem.payload_hash, idem.status_code, idem.body)
            idem = None
        if res is not None and res.reservation_id == self._seen_reservation:
            # A settle or extend of a row this operation loaded: only mutable columns change.
            updated = conn.execute(
                "UPDATE reservations SET status = ?, expires_at_ms = ?, deadline_ms = ?, "
                "extension_count = ?, committed = ?, committed_metadata = ?, "
                "finalized_at_ms = ?, settle_endpoint = COALESCE(?, settle_endpoint), "
                "settle_key = COALESCE(?, settle_key), settle_hash = COALESCE(?, settle_hash), "
                "settle_status = COALESCE(?, settle_status), "
                "settle_body = COALESCE(?, settle_body) WHERE reservation_id = ?",
                (
                    res.status, res.expires_at_ms, res.deadline_ms, res.extension_count,
                    res.committed, _j(res.committed_metadata), res.finalized_at_ms, *settle,
                    res.reservation_id,
                ),
            ).rowcount  # fmt: skip
            if updated == 1:
                res = None
        if res is not None:  # a new reservation (or one this operation did not load)
            s = res.subject
            conn.execute(
                f"INSERT INTO reservations ({_RES_COLS}, deadline_ms, s_tenant, s_workspace, "
                "s_app, s_workflow, s_agent, s_toolset, settle_endpoint, settle_key, "
                "settle_hash, settle_status, settle_body) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (reservation_id) DO UPDATE SET status = excluded.status, "
                "expires_at_ms = excluded.expires_at_ms, deadline_ms = excluded.deadline_ms, "
                "extension_count = excluded.extension_count, committed = excluded.committed, "
                "committed_metadata = excluded.committed_metadata, "
                "finalized_at_ms = excluded.finalized_at_ms, "
                "settle_endpoint = COALESCE(excluded.settle_endpoint, settle_endpoint), "
                "settle_key = COALESCE(excluded.settle_key, settle_key), "
                "settle_hash = COALESCE(excluded.settle_hash, settle_hash), "
                "settle_status = COALESCE(excluded.settle_status, settle_status), "
                "settle_body = COALESCE(excluded.settle_body, settle_body)",
                (
                    res.reservation_id, res.tenant_id, res.status, _j(res.subject),
                    _j(res.action), res.unit, res.estimate, res.scope_path,
                    _j(res.affected_scopes), _j(res.budgeted_scopes), res.created_at_ms,
                    res.expires_at_ms, res.grace_ms, res.overage_policy, res.max_extensions,
                    res.extension_count, res.idempotency_key, _j(res.metadata), res.committed,
                    _j(res.committed_metadata), res.finalized_at_ms, _j(res.quota_counters),
                    res.deadline_ms, s.get("tenant"), s.get("workspace"), s.get("app"),
                    s.get("workflow"), s.get("agent"), s.get("toolset"), *settle,
                ),
            )  # fmt: skip
        if idem is not None:
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (tenant_id, endpoint, idem_key, payload_hash, "
                "status_code, body, reservation_id, created_at_ms, retain_until_ms) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    idem.tenant_id, idem.endpoint, idem.key, idem.payload_hash, idem.status_code,
                    idem.body, idem.reservation_id, idem.created_at_ms, idem.retain_until_ms,
                ),
            )  # fmt: skip
        ev = outcome.event
        if ev is not None:
            conn.execute(
                "INSERT INTO events (event_id, tenant_id, subject, action, unit, actual, charged, "
                "scope_path, affected_scopes, budgeted_scopes, overage_policy, idempotency_key, "
                "created_at_ms, metrics, metadata, client_time_ms) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    ev.event_id, ev.tenant_id, _j(ev.subject), _j(ev.action), ev.unit, ev.actual,
                    ev.charged, ev.scope_path, _j(ev.affected_scopes), _j(ev.budgeted_scopes),
                    ev.overage_policy, ev.idempotency_key, ev.created_at_ms, _j(ev.metrics),
                    _j(ev.metadata), ev.client_time_ms,
                ),
            )  # fmt: skip
        audit = outcome.audit
        if audit is not None:
            conn.execute(
                "INSERT INTO audit_log (audit_id, tenant_id, actor_type, operation, resource_id, "
                "created_at_ms, request_id, trace_id, details) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    audit.audit_id, audit.tenant_id, audit.actor_type, audit.operation,
                    audit.resource_id, audit.created_at_ms, audit.request_id, audit.trace_id,
                    _j(audit.details),
                ),
            )  # fmt: skip

    def _get_policies(self, tenant_id: str) -> list[PolicyRow]:
        rows = self._conn.execute("SELECT body FROM policies WHERE tenant_id = ?", (tenant_id,))
        return [policy_from_json(r[0]) for r in rows]

    def _get_policy(self, policy_id: str) -> PolicyRow | None:
        r = self._conn.execute(
            "SELECT body FROM policies WHERE policy_id = ?", (policy_id,)
        ).fetchone()
        return None if r is None else policy_from_json(r[0])

    def _put_policy(self, row: PolicyRow, *, insert: bool) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO policies (policy_id, tenant_id, body) VALUES (?,?,?)",
            (row.policy_id, row.tenant_id, policy_to_json(row)),
        )

    def _get_counters(self, tenant_id: str, names: Sequence[str]) -> dict[str, CounterRow]:
        marks = ",".join("?" * len(names))
        rows = self._conn.execute(
            f"SELECT body FROM quota_counters WHERE tenant_id = ? AND name IN ({marks})",
            (tenant_id, *names),
        )
        counters = (CounterRow.from_json(r[0]) for r in rows)
        return {c.name: c for c in counters}

    def _put_counters(
        self, tenant_id: str, rows: Sequence[CounterRow], read: Mapping[str, CounterRow]
    ) -> None:
        # A counter whose expiry stays (a calendar bucket's, every increment in its window)
        # updates its body only, leaving the expiry index alone: about half the work.
        same: list[tuple[str, str, int, bytes]] = []
        moved: list[tuple[str, str, int, bytes]] = []
        for c in rows:
            old = read.get(c.name)
            stays = old is not None and old.expires_at_ms == c.expires_at_ms
            (same if stays else moved).append((tenant_id, c.name, c.expires_at_ms, c.to_json()))
        if same:
            self._conn.executemany(_UPSERT_COUNTER + " SET body = excluded.body", same)
        if moved:
            self._conn.executemany(
                _UPSERT_COUNTER
                + " SET expires_at_ms = excluded.expires_at_ms, body = excluded.body",
                moved,
            )

    def _live_counters(self, tenant_id: str, now_ms: int) -> list[CounterRow]:
        rows = self._conn.execute(
            "SELECT body FROM quota_counters WHERE tenant_id = ? AND expires_at_ms > ? "
            "ORDER BY name",
            (tenant_id, now_ms),
        )
        return [CounterRow.from_json(r[0]) for r in rows]

    def _put_events(self, rows: Sequence[EventRecord]) -> None:
        self._conn.executemany(
            "INSERT INTO event_log (event_id, tenant_id, created_at_ms, event_type, scope, "
            "correlation_id, request_id, trace_id, body) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (e.event_id, e.tenant_id, e.created_at_ms, e.event_type, e.scope,
                 e.correlation_id, e.request_id, e.trace_id, event_to_json(e))
                for e in rows
            ],
        )  # fmt: skip

    async def add_signal_counts(self, rows: Sequence[SignalCount], keep_ms: int) -> None:
        """See :class:`~runcycles_server.stores.base.SignalStore` (one short transaction)."""
        with self._write():
            self._conn.executemany(
                "INSERT INTO signal_counts VALUES (?, ?, ?, ?) ON CONFLICT "
                "(bucket_ms, tenant_id, name) DO UPDATE SET n = n + excluded.n",
                rows,
            )
            self._conn.execute(
                "DELETE FROM signal_counts WHERE bucket_ms < ?", (self.clock() - keep_ms,)
            )

    async def signal_counts(self, since_ms: int) -> dict[tuple[int, str, str], int]:
        """See :class:`~runcycles_server.stores.base.SignalStore`."""
        rows = self._conn.execute(
            "SELECT bucket_ms, tenant_id, name, n FROM signal_counts WHERE bucket_ms >= ?",
            (since_ms,),
        ).fetchall()
        return {(b, t, n): count for b, t, n, count in rows}

    async def raise_flag(self, name: str, ttl_ms: int) -> bool:
        """See :class:`~runcycles_server.stores.base.SignalStore`."""
        now = self.clock()
        with self._write():
            row = self._conn.execute(
                "SELECT expires_at_ms FROM signal_flags WHERE name = ?", (name,)
            ).fetchone()
            self._conn.execute(
                "INSERT OR REPLACE INTO signal_flags VALUES (?, ?)", (name, now + ttl_ms)
            )
            if row is None:
                self._conn.execute("DELETE FROM signal_flags WHERE expires_at_ms <= ?", (now,))
            return row is None or row[0] <= now

    def _list_events(self, query: EventQuery) -> Page[EventRecord]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("tenant_id", query.tenant_id),
            ("event_type", query.event_type),
            ("correlation_id", query.correlation_id),
            ("request_id", query.request_id),
            ("trace_id", query.trace_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.category is not None:
            where.append("substr(event_type, 1, ?) = ?")
            args += [len(query.category) + 1, query.category + "."]
        if query.scope is not None:
            where.append("(scope = ? OR substr(scope, 1, ?) = ?)")
            args += [query.scope, len(query.scope) + 1, query.scope + "/"]
        if query.from_ms is not None:
            where.append("created_at_ms >= ?")
            args.append(query.from_ms)
        if query.to_ms is not None:
            where.append("created_at_ms <= ?")
            args.append(query.to_ms)
        if query.cursor:
            at, last_id = decode_cursor(query.cursor, 2)
            where.append("(created_at_ms < ? OR (created_at_ms = ? AND event_id < ?))")
            args += [at, at, last_id]
        sql = "SELECT body FROM event_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at_ms DESC, event_id DESC LIMIT ?"
        rows = self._conn.execute(sql, (*args, query.limit + 1)).fetchall()
        items = [event_from_json(r[0]) for r in rows[: query.limit]]
        last = items[-1] if len(rows) > query.limit else None
        return Page(items, encode_cursor([last.created_at_ms, last.event_id]) if last else None)

    def _get_api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        r = self._conn.execute(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE key_hash = ?", (key_hash,)
        ).fetchone()
        return None if r is None else _key(r)

    def _due_api_keys(self, now_ms: int, limit: int) -> list[ApiKeyRow]:
        rows = self._conn.execute(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE status = 'ACTIVE' "
            "AND expires_at_ms <= ? ORDER BY expires_at_ms LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [_key(r) for r in rows]

    def _get_api_key(self, key_id: str) -> ApiKeyRow | None:
        r = self._conn.execute(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        return None if r is None else _key(r)

    def _put_api_key(self, row: ApiKeyRow, *, insert: bool) -> None:
        self._conn.execute(
            f"INSERT OR REPLACE INTO api_keys ({_KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.key_id, row.key_hash, row.key_prefix, row.tenant_id, row.name, row.status,
                row.description, _j(row.permissions), _j(row.scope_filter), _j(row.metadata),
                row.created_at_ms, row.expires_at_ms, row.revoked_at_ms, row.revoked_reason,
            ),
        )  # fmt: skip

    def _tenant_children(
        self, tenant_id: str
    ) -> tuple[list[ReservationRow], list[BudgetRow], list[ApiKeyRow]]:
        conn = self._conn
        reservations = [
            _reservation(r)
            for r in conn.execute(
                f"SELECT {_RES_COLS} FROM reservations WHERE tenant_id = ? AND status = 'ACTIVE'",
                (tenant_id,),
            )
        ]
        budgets = [
            _budget(r)
            for r in conn.execute(
                f"SELECT {_BUDGET_COLS} FROM budgets WHERE tenant_id = ?", (tenant_id,)
            )
        ]
        keys = [
            _key(r)
            for r in conn.execute(
                f"SELECT {_KEY_COLS} FROM api_keys WHERE tenant_id = ?", (tenant_id,)
            )
        ]
        return reservations, budgets, keys

    def _due_reservations(self, now_ms: int, limit: int) -> list[ReservationRow]:
        rows = self._conn.execute(
            f"SELECT {_RES_COLS} FROM reservations WHERE status = 'ACTIVE' AND deadline_ms < ? "
            "ORDER BY deadline_ms LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [_reservation(r) for r in rows]

    def _purge_idem(self, now_ms: int, limit: int) -> int:
        cur = self._conn.execute(
            "DELETE FROM idempotency WHERE (tenant_id, endpoint, idem_key) IN "
            "(SELECT tenant_id, endpoint, idem_key FROM idempotency WHERE retain_until_ms < ? "
            "LIMIT ?)",
            (now_ms, limit),
        )
        # expired quota counters go with them (an expired counter reads as 0 anyway)
        self._conn.execute(
            "DELETE FROM quota_counters WHERE (tenant_id, name) IN "
            "(SELECT tenant_id, name FROM quota_counters WHERE expires_at_ms <= ? LIMIT ?)",
            (now_ms, limit),
        )
        return cur.rowcount

    def _put_evidence(self, rows: Sequence[EvidenceRow]) -> None:
        # An id is written once: the operation that emits it runs once (replays answer the
        # stored body and emit nothing), so no uniqueness check is needed on the hot path.
        values = [
            (r.evidence_id, r.tenant_id, r.artifact_type, r.reservation_id, r.created_at_ms,
             r.retain_until_ms, r.body)
            for r in rows
        ]  # fmt: skip
        self._evidence_bytes += sum(len(r.body) for r in rows)
        if len(values) == 1:
            self._conn.execute(_INSERT_EVIDENCE, values[0])
        else:
            self._conn.executemany(_INSERT_EVIDENCE, values)

    def _get_evidence(self, evidence_id: str) -> EvidenceRow | None:
        conn = self._conn
        r = conn.execute(
            f"SELECT {_EVIDENCE_COLS} FROM evidence_index i JOIN evidence e ON e.rowid = i.row "
            "WHERE i.id_key = ? AND e.evidence_id = ? LIMIT 1",
            (_id_key(evidence_id), evidence_id),
        ).fetchone()
        if r is None:  # not indexed yet: the tail
            r = conn.execute(
                f"SELECT {_EVIDENCE_COLS} FROM evidence e WHERE e.rowid > {_INDEXED_UPTO} "
                "AND e.evidence_id = ? LIMIT 1",
                (evidence_id,),
            ).fetchone()
        return None if r is None else EvidenceRow(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]))

    def _reservation_evidence(self, reservation_id: str) -> dict[str, str]:
        rows = self._conn.execute(
            "SELECT e.artifact_type, e.evidence_id FROM evidence_index i "
            "JOIN evidence e ON e.rowid = i.row WHERE i.reservation_id = ? "
            f"UNION ALL SELECT artifact_type, evidence_id FROM evidence "
            f"WHERE rowid > {_INDEXED_UPTO} AND reservation_id = ? AND artifact_type != 'error'",
            (reservation_id, reservation_id),
        ).fetchall()
        return dict(rows)

    def _evidence_unindexed(self) -> bool:
        row = self._conn.execute(
            f"SELECT COALESCE(MAX(rowid), 0) > {_INDEXED_UPTO} FROM evidence"
        ).fetchone()
        return bool(row[0])

    def _index_evidence(self, limit: int) -> int:
        rows = self._conn.execute(
            "SELECT rowid, evidence_id, artifact_type, reservation_id FROM evidence "
            f"WHERE rowid > {_INDEXED_UPTO} ORDER BY rowid LIMIT ?",
            (limit,),
        ).fetchall()
        self._conn.executemany(
            "INSERT OR IGNORE INTO evidence_index (row, id_key, reservation_id) VALUES (?,?,?)",
            [
                (row, _id_key(eid), rid if artifact != "error" else None)
                for row, eid, artifact, rid in rows
            ],
        )
        return len(rows)

    def _purge_evidence(self, now_ms: int, limit: int) -> int:
        # Oldest first (rowid = issue order) up to the first one still retained: no index on
        # retain_until_ms. (After a shortened retention, rows behind a longer-kept one wait
        # for it: deleted late, never early.)
        rows = self._conn.execute(
            "SELECT rowid, retain_until_ms FROM evidence ORDER BY rowid LIMIT ?", (limit,)
        ).fetchall()
        due = 0
        while due < len(rows) and rows[due][1] < now_ms:
            due += 1
        if due:
            last = rows[due - 1][0]
            self._conn.execute("DELETE FROM evidence WHERE rowid <= ?", (last,))
            self._conn.execute("DELETE FROM evidence_index WHERE row <= ?", (last,))
        return due

    def _purge_finished(self, before_ms: int, limit: int) -> int:
        conn = self._conn
        finished = conn.execute(
            "SELECT reservation_id, tenant_id, idempotency_key FROM reservations "
            "WHERE status != 'ACTIVE' AND deadline_ms < ? LIMIT ?",
            (before_ms, limit),
        ).fetchall()
        if finished:
            # commit/release replays live on the reservation row itself (settle_* columns)
            conn.executemany(
                "DELETE FROM idempotency WHERE tenant_id = ? AND endpoint = ?",
                [(tenant, f"extend:{rid}") for rid, tenant, _ in finished],
            )
            conn.executemany(
                "DELETE FROM idempotency WHERE tenant_id = ? AND endpoint = 'reserve' "
                "AND idem_key = ? AND reservation_id = ?",
                [(tenant, key, rid) for rid, tenant, key in finished if key is not None],
            )
            conn.executemany(
                "DELETE FROM reservations WHERE reservation_id = ?",
                [(rid,) for rid, _, _ in finished],
            )
            self._seen_reservation = None
        events = conn.execute(
            "DELETE FROM events WHERE event_id IN "
            "(SELECT event_id FROM events WHERE created_at_ms < ? LIMIT ?)",
            (before_ms, limit),
        ).rowcount
        events += conn.execute(
            "DELETE FROM event_log WHERE event_id IN (SELECT event_id FROM event_log "
            "WHERE created_at_ms < ? ORDER BY created_at_ms LIMIT ?)",
            (before_ms, limit),
        ).rowcount
        return len(finished) + events

    # -- listings --------------------------------------------------------------------------------

    async def list_reservations(self, query: ReservationQuery) -> Page[ReservationRow]:
        """See :meth:`Store.list_reservations` (keyset pagination on the sort key and id)."""
        column = _SORT_COLUMNS.get(query.sort_by, "created_at_ms")
        where = ["tenant_id = ?"]
        args: list[Any] = [query.tenant_id]
        if query.idempotency_key is not None:  # via the reserve idempotency record
            where.append(
                "reservation_id IN (SELECT reservation_id FROM idempotency WHERE tenant_id = ? "
                "AND endpoint = 'reserve' AND idem_key = ?)"
            )
            args += [query.tenant_id, query.idempotency_key]
        if query.status is not None:
            where.append("status = ?")
            args.append(query.status)
        for level, value in query.subject.items():
            where.append(f"s_{level} = ?")
            args.append(value)
        for col, lo, hi in (
            ("created_at_ms", query.created_from_ms, query.created_to_ms),
            ("expires_at_ms", query.expires_from_ms, query.expires_to_ms),
            ("finalized_at_ms", query.finalized_from_ms, query.finalized_to_ms),
        ):
            if lo is not None:
                where.append(f"{col} >= ?")
                args.append(lo)
            if hi is not None:
                where.append(f"{col} <= ?")
                args.append(hi)
        fingerprint = ledger.payload_hash(
            "list",
            {
                "q": [
                    query.idempotency_key, query.status, sorted(query.subject.items()),
                    query.created_from_ms, query.created_to_ms, query.expires_from_ms,
                    query.expires_to_ms, query.finalized_from_ms, query.finalized_to_ms,
                    column, query.sort_desc,
                ]
            },
        )[:16]  # fmt: skip
        op = "<" if query.sort_desc else ">"
        if query.cursor:
            value, last_id, seen_fp = decode_cursor(query.cursor, 3)
            if seen_fp != fingerprint:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "cursor was issued for different filters or sort order; restart paging "
                    "without a cursor",
                )
            where.append(
                f"({column} {op} ? OR ({column} = ? AND reservation_id {op} ?))"
                if value is not None
                else f"({column} IS NULL AND reservation_id {op} ?)"
            )
            args.extend([value, value, last_id] if value is not None else [last_id])
        direction = "DESC" if query.sort_desc else "ASC"
        sql = (
            f"SELECT {_RES_COLS}, {column} FROM reservations WHERE {' AND '.join(where)} "
            f"ORDER BY {column} {direction}, reservation_id {direction} LIMIT ?"
        )
        rows = self._conn.execute(sql, (*args, query.limit + 1)).fetchall()
        items = [_reservation(r) for r in rows[: query.limit]]
        next_cursor = None
        if len(rows) > query.limit:
            last = rows[query.limit - 1]
            next_cursor = encode_cursor([last[-1], last[0], fingerprint])
        return Page(items, next_cursor)

    async def list_balances(
        self, tenant_id: str, segments: Sequence[str], limit: int, cursor: str | None
    ) -> Page[BudgetRow]:
        """See :meth:`Store.list_balances`."""
        return self._page_budgets(
            "tenant_id = ?", [tenant_id], limit, cursor,
            lambda row: ledger.scope_matches_filters(row.scope, segments),
        )  # fmt: skip

    def _page_budgets(
        self,
        where: str,
        args: list[Any],
        limit: int,
        cursor: str | None,
        keep: Any = None,
    ) -> Page[BudgetRow]:
        if cursor:
            scope, unit = decode_cursor(cursor, 2)
            where += " AND (scope > ? OR (scope = ? AND unit > ?))"
            args = [*args, scope, scope, unit]
        items: list[BudgetRow] = []
        sql = f"SELECT {_BUDGET_COLS} FROM budgets WHERE {where} ORDER BY scope, unit"
        more = False
        for r in self._conn.execute(sql, args):
            row = _budget(r)
            if keep is not None and not keep(row):
                continue
            if len(items) == limit:
                more = True
                break
            items.append(row)
        next_cursor = encode_cursor([items[-1].scope, items[-1].unit]) if more else None
        return Page(items, next_cursor)

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
        where = ["1 = 1"]
        args: list[Any] = []
        if tenant_id is not None:
            where.append("tenant_id = ?")
            args.append(tenant_id)
        if unit is not None:
            where.append("unit = ?")
            args.append(unit)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        prefix = scope_prefix
        keep = (
            None
            if prefix is None
            else (lambda row: row.scope == prefix or row.scope.startswith(prefix + "/"))
        )
        return self._page_budgets(" AND ".join(where), args, limit, cursor, keep)

    async def count_active_reservations(self) -> int:
        """See :class:`~runcycles_server.stores.base.ActiveCounter` (the partial due index)."""
        row = self._conn.execute(
            "SELECT COUNT(*) FROM reservations WHERE status = 'ACTIVE'"
        ).fetchone()
        return int(row[0])

    async def list_tenants(
        self, status: str | None, limit: int, cursor: str | None
    ) -> Page[TenantRow]:
        """See :meth:`Store.list_tenants`."""
        where, args = ["1 = 1"], []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if cursor:
            (after,) = decode_cursor(cursor, 1)
            where.append("tenant_id > ?")
            args.append(after)
        rows = self._conn.execute(
            f"SELECT {_TENANT_COLS} FROM tenants WHERE {' AND '.join(where)} "
            "ORDER BY tenant_id LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        items = [_tenant(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor([items[-1].tenant_id]) if more else None)

    async def list_api_keys(
        self, tenant_id: str | None, status: str | None, limit: int, cursor: str | None
    ) -> Page[ApiKeyRow]:
        """See :meth:`Store.list_api_keys`."""
        where, args = ["1 = 1"], []
        if tenant_id is not None:
            where.append("tenant_id = ?")
            args.append(tenant_id)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if cursor:
            (after,) = decode_cursor(cursor, 1)
            where.append("key_id > ?")
            args.append(after)
        rows = self._conn.execute(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE {' AND '.join(where)} ORDER BY key_id LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        items = [_key(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor([items[-1].key_id]) if more else None)

    async def list_debits(
        self, tenant_id: str, from_ms: int, to_ms: int, limit: int
    ) -> list[EventRow]:
        """See :class:`~runcycles_server.stores.base.DebitReader` (``events_tenant_created``)."""
        rows = self._conn.execute(
            "SELECT event_id, tenant_id, subject, action, unit, actual, charged, scope_path, "
            "affected_scopes, budgeted_scopes, overage_policy, idempotency_key, created_at_ms, "
            "metrics, metadata, client_time_ms FROM events WHERE tenant_id = ? AND "
            "created_at_ms BETWEEN ? AND ? ORDER BY created_at_ms, event_id LIMIT ?",
            (tenant_id, from_ms, to_ms, limit),
        ).fetchall()
        return [
            EventRow(r[0], r[1], _uj(r[2]), _uj(r[3]), r[4], r[5], r[6], r[7], _uj(r[8]),
                     _uj(r[9]), r[10], r[11], r[12], _uj(r[13]), _uj(r[14]), r[15])
            for r in rows
        ]  # fmt: skip

    async def list_audit_logs(
        self, tenant_id: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRow]:
        """Return one page of audit entries, newest first (see :class:`AuditReader`)."""
        where, args = ["1 = 1"], []
        if tenant_id is not None:
            where.append("tenant_id = ?")
            args.append(tenant_id)
        if cursor:
            created, audit_id = decode_cursor(cursor, 2)
            where.append("(created_at_ms < ? OR (created_at_ms = ? AND audit_id < ?))")
            args += [created, created, audit_id]
        rows = self._conn.execute(
            "SELECT audit_id, tenant_id, actor_type, operation, resource_id, created_at_ms, "
            f"request_id, trace_id, details FROM audit_log WHERE {' AND '.join(where)} "
            "ORDER BY created_at_ms DESC, audit_id DESC LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        items = [
            AuditRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], _uj(r[8]))
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        last = items[-1] if items else None
        return Page(
            items, encode_cursor([last.created_at_ms, last.audit_id]) if more and last else None
        )

    # -- inspection (tests, CLI) -----------------------------------------------------------------

    def count_rows(self, table: str) -> int:
        """Return the number of rows of one of the store's tables."""
        if table not in ("tenants", "api_keys", "budgets", "reservations", "idempotency",
                         "events", "audit_log"):  # fmt: skip
            raise ValueError(f"unknown table {table!r}")
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
