"""Durable settlement journal: known spend survives crashes, restarts and outages.

The settlement engine (:mod:`runcycles.settlement`) writes one record here before the first
commit (or event) of a reservation leaves the process and removes it only after a
schema-valid success or an understood rejection; a later process (or ``flush()``) replays
what is left with the *same* idempotency key. ``docs/recovery.md`` describes the layout
(per-(server, principal) partitions, ``v2-<sha256(id)>.json`` records, intent logs,
quarantine), the atomic writes and ``fsync``, and the per-record locks that keep concurrent
replays exactly-once. The API key itself is never written anywhere.

Everything here is blocking file I/O; async code runs it through :func:`run_journal_io`
(one shared worker thread, never the event loop), except the intent-log append without
``fsync``, which is a memory copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import mmap
import os
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runcycles import _fastpath
from runcycles.models import (
    Action,
    Amount,
    CommitOveragePolicy,
    CommitRequest,
    EventCreateRequest,
    StandardMetrics,
    Subject,
)

if TYPE_CHECKING:
    from typing_extensions import Self

    from runcycles.config import CyclesConfig

try:
    import fcntl as _fcntl

    _HAVE_FCNTL = True
except ImportError:  # pragma: no cover - Windows
    _HAVE_FCNTL = False

__all__ = [
    "JOURNAL_SCHEMA_VERSION",
    "IntentEntry",
    "IntentLog",
    "Journal",
    "JournalRecord",
    "JournalScan",
    "QuarantinedRecord",
    "RecordLock",
    "SettlementMode",
    "default_journal_dir",
    "record_file_name",
    "run_journal_io",
]

logger = logging.getLogger("runcycles.journal")

JOURNAL_SCHEMA_VERSION: Final = 2
"""Version written in every record (and in the ``v2-`` file-name prefix)."""

_PREFIX: Final = f"v{JOURNAL_SCHEMA_VERSION}-"
_SUFFIX: Final = ".json"
_LEGACY_VERSIONS: Final = frozenset({1, 2})
_QUARANTINE: Final = "quarantine"
_TEMP_PREFIX: Final = ".tmp-"
_STALE_TEMP_S: Final = 3600.0
_STALE_CLAIM_S: Final = 600.0
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600
_INTENT_PREFIX: Final = "intent-"
# Free space an intent log needs for async code to append on the event loop (an entry is
# about 1 KiB; a larger one that does not fit starts a new log, which is file I/O).
_INLINE_INTENT_ROOM: Final = 64 * 1024
_INTENT_SUFFIX: Final = ".log"
_INTENT_SEGMENT_BYTES: Final = 1 << 20

SettlementMode = Literal["commit", "event"]
_T = TypeVar("_T")


def default_journal_dir() -> Path:
    """Return where journals live unless configured otherwise.

    ``$RUNCYCLES_JOURNAL_DIR`` if set, else the platform's per-user state directory (the
    table is in ``docs/recovery.md``).
    """
    override = os.environ.get("RUNCYCLES_JOURNAL_DIR", "").strip()
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":  # pragma: no cover - platform specific
        local = os.environ.get("LOCALAPPDATA", "").strip()
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "runcycles" / "journal"
    if sys.platform == "darwin":  # pragma: no cover - platform specific
        return Path.home() / "Library" / "Application Support" / "runcycles" / "journal"
    state = os.environ.get("XDG_STATE_HOME", "").strip()
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "runcycles" / "journal"


def record_file_name(reservation_id: str) -> str:
    """Return ``v2-<sha256 hex of the exact UTF-8 reservation_id>.json``."""
    digest = hashlib.sha256(reservation_id.encode("utf-8")).hexdigest()
    return f"{_PREFIX}{digest}{_SUFFIX}"


def normalize_base_url(base_url: str) -> str:
    """Return ``base_url`` with a lower-case scheme and host, no default port, no end slash."""
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default_port = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port is None or port == default_port else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def partition_key(base_url: str, *, tenant: str | None, api_key: str | None) -> str:
    """Return the hex partition name for a server and principal (never contains the key).

    Raises:
        ValueError: Neither ``tenant`` nor ``api_key`` is given.
    """
    if tenant:
        principal = f"tenant={tenant}"
    elif api_key:
        principal = "api-key-sha256=" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()
    else:
        raise ValueError("a journal partition needs a tenant or an API key to identify the caller")
    material = f"cycles-journal\n{normalize_base_url(base_url)}\n{principal}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


class JournalRecord(BaseModel):
    """One unresolved settlement, exactly as stored on disk.

    ``docs/recovery.md`` ("What is stored") describes every field.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    schema_version: Literal[2] = JOURNAL_SCHEMA_VERSION
    reservation_id: str = Field(min_length=1, max_length=128)
    mode: SettlementMode = "commit"
    idempotency_key: str = Field(min_length=1, max_length=256)
    actual: Amount
    metrics: StandardMetrics | None = None
    metadata: dict[str, Any] | None = None
    subject: Subject | None = None
    action: Action | None = None
    overage_policy: CommitOveragePolicy | None = None
    server: str | None = None
    attempts: int = Field(default=0, ge=0)
    not_before_ms: int = Field(default=0, ge=0)
    created_at_ms: int = Field(default_factory=_now_ms, ge=0)
    updated_at_ms: int = Field(default_factory=_now_ms, ge=0)
    last_error: str | None = None

    @classmethod
    def for_commit(
        cls,
        reservation_id: str,
        request: CommitRequest,
        *,
        subject: Subject | None,
        action: Action | None,
        overage_policy: CommitOveragePolicy | None = None,
        server: str | None = None,
    ) -> JournalRecord:
        """Build the record of a commit about to be sent."""
        now = _now_ms()
        fields: dict[str, Any] = {
            "schema_version": JOURNAL_SCHEMA_VERSION,
            "reservation_id": reservation_id,
            "mode": "commit",
            "idempotency_key": request.idempotency_key,
            "actual": request.actual,
            "metrics": request.metrics,
            "metadata": request.metadata,
            "subject": subject,
            "action": action,
            "overage_policy": overage_policy,
            "server": server,
            "attempts": 0,
            "not_before_ms": 0,
            "created_at_ms": now,
            "updated_at_ms": now,
            "last_error": None,
        }
        given: tuple[object, ...] = (reservation_id, subject, action, overage_policy, server)
        rid, subj, act, overage, url = given  # checked at run time, whatever the types say
        if (
            cls is JournalRecord
            and type(request) is CommitRequest
            and type(rid) is str
            and 0 < len(rid) <= 128
            and (subj is None or isinstance(subj, Subject))
            and (act is None or isinstance(act, Action))
            and (overage is None or isinstance(overage, CommitOveragePolicy))
            and (url is None or type(url) is str)
        ):
            # Every value is one validation would keep as it is (the request and the
            # reservation's models are validated already): assemble the record directly.
            return _fastpath.construct(cls, fields, _FOR_COMMIT_FIELDS)
        return cls(**{name: fields[name] for name in _FOR_COMMIT_FIELDS})

    def commit_request(self) -> CommitRequest:
        """Return the commit body to (re)send, with the stored key."""
        return CommitRequest(
            idempotency_key=self.idempotency_key,
            actual=self.actual,
            metrics=self.metrics,
            metadata=self.metadata,
        )

    def event_request(self) -> EventCreateRequest:
        """Return the ``POST /v1/events`` body that settles an expired reservation.

        Raises:
            ValueError: The record has no subject or action (the event is impossible).
        """
        if self.subject is None or self.action is None:
            raise ValueError(
                f"reservation {self.reservation_id!r} expired and its journal record has no "
                "subject/action, so it cannot be settled as an event"
            )
        metadata = dict(self.metadata or {})
        metadata["recovered_reservation_id"] = self.reservation_id
        return EventCreateRequest(
            idempotency_key=self.idempotency_key,
            subject=self.subject,
            action=self.action,
            actual=self.actual,
            overage_policy=self.overage_policy,
            metrics=self.metrics,
            metadata=metadata,
        )

    def to_json(self) -> bytes:
        """Serialize for disk (stable key order)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


_FOR_COMMIT_FIELDS: Final = frozenset(
    {
        "reservation_id",
        "idempotency_key",
        "actual",
        "metrics",
        "metadata",
        "subject",
        "action",
        "overage_policy",
        "server",
    }
)


@dataclass(frozen=True)
class QuarantinedRecord:
    """A record that could not be used and was moved aside.

    Attributes:
        original: Where it was.
        moved_to: Where it is now (``None`` if moving failed).
        reason: Why it was quarantined.
    """

    original: Path
    moved_to: Path | None
    reason: str


@dataclass
class JournalScan:
    """Result of :meth:`Journal.scan`.

    Attributes:
        records: Every valid record, oldest first.
        quarantined: Records moved to ``quarantine/``.
        migrated: Legacy files moved to their standard name (old paths).
        conflicts: Legacy files left in place because the standard file holds another record.
    """

    records: list[JournalRecord] = field(default_factory=list)
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    migrated: list[Path] = field(default_factory=list)
    conflicts: list[Path] = field(default_factory=list)


class RecordLock:
    """An exclusive claim on one record (release it, or use it as a context manager)."""

    __slots__ = ("_fd", "_path", "_released")

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._released = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Drop the claim (idempotent, thread-safe).

        The claim ends even if the lock file cannot be deleted (the error is raised after
        the file descriptor, and with it the ``flock``, is closed).
        """
        with _claims_lock:
            if self._released:
                return
            self._released = True
            fd, self._fd = self._fd, None
            _loop_claims.pop(self, None)
        try:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()  # unlink while still holding the lock: no stale-inode race
        finally:
            if fd is not None:
                os.close(fd)


class Journal:
    """The journal partition of one server and principal.

    ``root`` defaults to :func:`default_journal_dir`. The partition is named after
    ``base_url`` and ``tenant`` (stable across API-key rotation), or the hashed ``api_key``
    when no tenant is configured (never stored). ``fsync`` makes every write survive a power
    loss too (``docs/recovery.md``; :meth:`for_config` takes it from ``journal_fsync``).

    Raises:
        ValueError: Neither ``tenant`` nor ``api_key`` is given.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        base_url: str,
        tenant: str | None = None,
        api_key: str | None = None,
        fsync: bool = True,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_journal_dir()
        self.fsync = fsync
        self.server = normalize_base_url(base_url)
        self.partition = partition_key(base_url, tenant=tenant, api_key=api_key)
        self.directory = self.root / self.partition
        self._dir_ready = False
        self._dir_lock = threading.Lock()
        self._intents: IntentLog | None = None

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r})"

    @classmethod
    def for_config(
        cls, config: CyclesConfig, root: str | os.PathLike[str] | None = None
    ) -> Journal:
        """Open the partition of ``config``'s server and tenant (or API key).

        Writes are fsynced when ``config.journal_fsync`` is set (default: atomic, no fsync).
        """
        return cls(
            root if root is not None else config.journal_dir,
            base_url=config.base_url,
            tenant=config.tenant,
            api_key=config.api_key,
            fsync=config.journal_fsync,
        )

    # ------------------------------------------------------------------------------ records

    def path_for(self, reservation_id: str) -> Path:
        """Return the file of a reservation's record."""
        return self.directory / record_file_name(reservation_id)

    def write(self, record: JournalRecord) -> Path:
        """Store ``record`` atomically and durably (replacing any previous version).

        Returns:
            The record's path.

        Raises:
            OSError: The record could not be written (surface it; do not skip settling).
        """
        self._ensure_dirs()
        record.updated_at_ms = max(_now_ms(), record.created_at_ms)
        if record.server is None:
            record.server = self.server
        target = self.path_for(record.reservation_id)
        _atomic_write(target, record.to_json(), fsync=self.fsync)
        return target

    def read(self, reservation_id: str) -> JournalRecord | None:
        """Return a reservation's record, or ``None`` if there is none.

        A settlement still in flight, known only from an intent log, is found too.

        Raises:
            ValueError: The file exists but is corrupt or of an unknown version.
        """
        path = self.path_for(reservation_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return self._read_intent(reservation_id)
        return _parse(raw)

    # ------------------------------------------------------------------------------ intents

    @property
    def uses_intent_log(self) -> bool:
        """Whether :meth:`log_intent` is available (it needs ``fcntl`` locks)."""
        return _HAVE_FCNTL

    def can_log_intent_inline(self) -> bool:
        """Whether :meth:`log_intent` is a plain memory copy right now.

        True when writes are not fsynced and this process's intent log is open with room
        to spare, so async code may append on the event loop. Otherwise the append may
        create the partition's folder or a new log file (file I/O) and belongs off the loop.
        """
        log = self._intents
        return not self.fsync and log is not None and log.has_room(_INLINE_INTENT_ROOM)

    def log_intent(self, record: JournalRecord) -> IntentEntry:
        """Append ``record`` to this process's intent log before its first request is sent.

        The cheap journal-first write (``docs/recovery.md``). A settlement that stays
        unresolved must be written with :meth:`write` before its intent is resolved.

        Raises:
            OSError: The entry could not be written.
        """
        self._ensure_dirs()
        if record.server is None:
            record.server = self.server
        log = self._intents
        if log is None:
            with self._dir_lock:
                if self._intents is None:
                    self._intents = IntentLog(self.directory, fsync=self.fsync)
                log = self._intents
        return log.append_open(record)

    def resolve_intent(self, entry: IntentEntry) -> None:
        """Mark an intent as done: settled, or kept in a record file written meanwhile.

        Raises:
            OSError: The mark could not be written (harmless: a later replay resends the
                settlement with its key, and the server answers with its stored result).
        """
        assert self._intents is not None
        self._intents.append_done(entry)

    def _intent_logs(self) -> list[Path]:
        try:
            return sorted(self.directory.glob(f"{_INTENT_PREFIX}*{_INTENT_SUFFIX}"))
        except FileNotFoundError:
            return []

    def _read_intent(self, reservation_id: str) -> JournalRecord | None:
        for path in self._intent_logs():
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            found = _open_intents(raw).get(reservation_id)
            if found is not None:
                return found
        return None

    def _recover_intents(self, result: JournalScan) -> None:
        """Turn the open entries of dead processes' intent logs into record files."""
        if not _HAVE_FCNTL:  # pragma: no cover - Windows: no intent logs are written
            return
        for path in self._intent_logs():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                except OSError:
                    continue  # its process is alive (maybe this one): its settlements run
                try:
                    with open(fd, "rb", closefd=False) as handle:
                        raw = handle.read()
                    for record in _open_intents(raw).values():
                        target = self.path_for(record.reservation_id)
                        if not target.exists():  # a record file written later is newer
                            _atomic_write(target, record.to_json(), fsync=self.fsync)
                            logger.info(
                                "journal: recovered the unresolved settlement of %s from %s",
                                record.reservation_id,
                                path.name,
                            )
                    path.unlink()
                    if self.fsync:
                        _fsync_dir(self.directory)
                except OSError as exc:  # keep the log: the next scan tries again
                    logger.error("journal: could not recover intent log %s: %s", path, exc)
            finally:
                os.close(fd)

    def remove(self, reservation_id: str) -> bool:
        """Delete a reservation's record; return whether one existed.

        The directory is not fsynced: if a crash undoes the unlink, the next replay resends
        the settlement with the same key, the server replays its stored success, and the
        record is removed again. Nothing is applied twice.
        """
        path = self.path_for(reservation_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def try_lock(self, reservation_id: str) -> RecordLock | None:
        """Claim a record for replay without blocking; ``None`` if another worker holds it.

        Claims left by async replays whose event loop was closed under them (they can never
        run again) are released first, so this process can take their records.
        """
        _release_orphaned_claims()
        self._ensure_dirs()
        lock_path = self.directory / (record_file_name(reservation_id) + ".lock")
        return _try_lock(lock_path)

    # ------------------------------------------------------------------------------ scanning

    def scan(self) -> JournalScan:
        """Read every record: quarantine bad ones, migrate legacy names, clean stale temps.

        Returns:
            What was found (valid records oldest first) and what was done.
        """
        result = JournalScan()
        self._recover_intents(result)
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return result
        for path in entries:
            name = path.name
            if not path.is_file() or name.endswith((".lock", ".claim")):
                continue
            if name.startswith(_TEMP_PREFIX):
                _remove_stale_temp(path)
                continue
            if not name.endswith(_SUFFIX):
                continue
            if name.startswith(_PREFIX):
                self._scan_standard(path, result)
            else:
                self._migrate_legacy(path, result)
        result.records.sort(key=lambda record: (record.created_at_ms, record.reservation_id))
        return result

    def _scan_standard(self, path: Path, result: JournalScan) -> None:
        try:
            record = _parse(path.read_bytes())
        except FileNotFoundError:
            return  # removed by a concurrent replay
        except (OSError, ValueError) as exc:
            result.quarantined.append(self.quarantine(path, str(exc)))
            return
        if path.name != record_file_name(record.reservation_id):
            result.quarantined.append(
                self.quarantine(path, "file name does not match the record's reservation_id")
            )
            return
        result.records.append(record)

    def _migrate_legacy(self, path: Path, result: JournalScan) -> None:
        try:
            raw = json.loads(path.read_bytes())
            if not isinstance(raw, dict) or raw.get("schema_version") not in _LEGACY_VERSIONS:
                raise ValueError(f"unsupported schema_version {raw.get('schema_version')!r}")
            raw["schema_version"] = JOURNAL_SCHEMA_VERSION
            record = JournalRecord.model_validate(raw)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            result.quarantined.append(self.quarantine(path, f"legacy record: {exc}"))
            return
        target = self.path_for(record.reservation_id)
        try:
            existing = _parse(target.read_bytes())
        except FileNotFoundError:
            existing = None
        except (OSError, ValueError):
            existing = None
            result.quarantined.append(self.quarantine(target, "corrupt record (legacy migration)"))
        if existing is None:
            _atomic_write(target, record.to_json(), fsync=self.fsync)
            path.unlink()
            _fsync_dir(self.directory)
            result.migrated.append(path)
            result.records.append(record)
            logger.info("journal: migrated legacy record %s to %s", path.name, target.name)
        elif _same_settlement(existing, record):
            path.unlink()
            _fsync_dir(self.directory)
            result.migrated.append(path)
        else:
            result.conflicts.append(path)
            logger.warning(
                "journal: legacy record %s (reservation %r) collides with %s, which holds a "
                "different settlement; both are kept, resolve by hand",
                path,
                record.reservation_id,
                target.name,
            )

    def quarantine(self, path: Path, reason: str) -> QuarantinedRecord:
        """Move a bad record into ``quarantine/`` and log it."""
        folder = self.directory / _QUARANTINE
        moved_to: Path | None = folder / f"{path.name}.{_now_ms()}.{uuid.uuid4().hex[:8]}"
        try:
            _make_dir(folder)
            assert moved_to is not None
            os.replace(path, moved_to)
            _fsync_dir(self.directory)
        except OSError as exc:
            logger.error("journal: could not quarantine %s: %s", path, exc)
            moved_to = None
        logger.error("journal: quarantined %s (%s) -> %s", path, reason, moved_to)
        return QuarantinedRecord(original=path, moved_to=moved_to, reason=reason)

    def _ensure_dirs(self) -> None:
        if self._dir_ready:
            return
        with self._dir_lock:
            if not self.root.exists():
                os.makedirs(self.root, mode=_DIR_MODE, exist_ok=True)
            _make_dir(self.directory)
            self._dir_ready = True


def _same_settlement(a: JournalRecord, b: JournalRecord) -> bool:
    return (
        a.reservation_id == b.reservation_id
        and a.idempotency_key == b.idempotency_key
        and a.actual == b.actual
    )


def _parse(raw: bytes) -> JournalRecord:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    version = data.get("schema_version")
    if version != JOURNAL_SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {version!r}")
    try:
        return JournalRecord.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid record: {exc.error_count()} error(s): {exc}") from None


def _make_dir(path: Path) -> None:
    os.makedirs(path, mode=_DIR_MODE, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, _DIR_MODE)


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - directories cannot be fsynced there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(target: Path, content: bytes, *, fsync: bool = True) -> None:
    temp = target.with_name(f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags, _FILE_MODE)
    try:
        try:
            view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    if fsync:
        _fsync_dir(target.parent)


def _remove_stale_temp(path: Path) -> None:
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > _STALE_TEMP_S:
            path.unlink()


def _try_lock(lock_path: Path) -> RecordLock | None:
    if not _HAVE_FCNTL:  # pragma: no cover - Windows
        return _try_claim(lock_path.with_suffix(".claim"))
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            try:
                linked = os.stat(lock_path)
            except FileNotFoundError:
                linked = None
            if linked is not None and linked.st_ino == os.fstat(fd).st_ino:
                return RecordLock(fd, lock_path)
        except BaseException:
            os.close(fd)  # never keep a lock nobody holds a RecordLock for
            raise
        os.close(fd)  # the previous holder unlinked it in between: take the new file


def _try_claim(claim_path: Path) -> RecordLock | None:  # pragma: no cover - Windows
    for _ in range(2):
        try:
            fd = os.open(claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        except FileExistsError:
            try:
                age_s = time.time() - claim_path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age_s < _STALE_CLAIM_S:
                return None
            with contextlib.suppress(FileNotFoundError):
                claim_path.unlink()  # a crashed claimant: recover the stale claim
            continue
        os.write(fd, f"{os.getpid()} {time.time()}".encode())
        os.close(fd)
        return RecordLock(None, claim_path)
    return None


# --------------------------------------------------------------------------------------------
# Intent logs: the cheap journal-first write


class IntentEntry:
    """One settlement appended to an intent log (see :meth:`Journal.log_intent`)."""

    __slots__ = ("_segment", "finished", "materialized", "record", "resolved")

    def __init__(self, segment: _Segment, record: JournalRecord) -> None:
        self._segment = segment
        self.record = record
        self.finished = False
        """Whether the settlement ended for good (settled or rejected)."""
        self.materialized = False
        """Whether a record file now holds the settlement (it outlives the intent)."""
        self.resolved = False
        """Whether :meth:`Journal.resolve_intent` ran."""


class _Segment:
    """One intent log file: preallocated, memory-mapped, appended to by copying bytes.

    The file is allocated up front, so a full disk is an ``OSError`` when the segment is
    created, never a fault while writing.
    """

    __slots__ = ("capacity", "fd", "live", "map", "path", "retired", "size")

    def __init__(self, fd: int, path: Path, capacity: int) -> None:
        self.fd = fd
        self.path = path
        self.capacity = capacity
        self.map = mmap.mmap(fd, capacity)
        self.size = 0
        self.live = 0
        self.retired = False

    def fits(self, length: int) -> bool:
        return self.size + length <= self.capacity

    def append(self, line: bytes, *, flush: bool = False) -> None:
        start = self.size
        end = start + len(line)
        self.map[start:end] = line
        self.size = end
        if flush:
            page = start - start % mmap.PAGESIZE
            self.map.flush(page, end - page)

    def drop(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()  # unlink while still holding the lock: no stale-file race
        with contextlib.suppress(OSError, ValueError, BufferError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _IntentState:
    """What the exit-time cleanup of an :class:`IntentLog` needs (no reference to the log)."""

    __slots__ = ("current", "pid", "retired")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.current: _Segment | None = None
        self.retired: list[_Segment] = []

    def close(self) -> None:
        """Delete the segments whose every entry is resolved (at exit or collection)."""
        if os.getpid() != self.pid:  # a forked child: the segments are the parent's
            return
        for segment in [self.current, *self.retired]:
            if segment is not None and segment.live == 0:
                segment.drop()


class IntentLog:
    """This process's append-only log of settlements in flight, in one journal partition.

    Its lines, locking, segments and recovery are described in ``docs/recovery.md``.
    """

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        self._directory = directory
        self._fsync = fsync
        self._lock = threading.Lock()
        self._state = self._new_state()

    def _new_state(self) -> _IntentState:
        state = _IntentState()
        weakref.finalize(self, state.close)
        return state

    def has_room(self, size: int) -> bool:
        """Whether the current log of this process can take ``size`` more bytes."""
        state = self._state
        current = state.current
        return state.pid == os.getpid() and current is not None and current.fits(size)

    def append_open(self, record: JournalRecord) -> IntentEntry:
        """Append an open entry; return its handle.

        Raises:
            OSError: It could not be written.
        """
        data = _fastpath.dump_json(record)
        line = b'{"op":"open","record":' + data + b"}\n"
        with self._lock:
            segment = self._segment_for(len(line))
            segment.append(line, flush=self._fsync)
            segment.live += 1
        return IntentEntry(segment, record)

    def append_done(self, entry: IntentEntry) -> None:
        """Append the done line of ``entry`` (once); delete a retired log left empty.

        Raises:
            OSError: It could not be written.
        """
        if entry.resolved:
            return
        entry.resolved = True
        segment = entry._segment
        rid = _json_string(entry.record.reservation_id)
        line = b'{"op":"done","reservation_id":' + rid.encode() + b"}\n"
        with self._lock:
            segment.live -= 1
            if segment.retired and segment.live == 0:
                self._state.retired.remove(segment)
                segment.drop()
                return
            if not segment.fits(len(line)):  # a full segment: the mark goes to the next one
                segment = self._segment_for(len(line))
            segment.append(line)

    def _segment_for(self, size: int) -> _Segment:
        state = self._state
        if state.pid != os.getpid():  # a forked child writes its own log
            state = self._state = self._new_state()
        current = state.current
        if current is not None and not current.fits(size):
            if current.live == 0:
                current.drop()
            else:
                current.retired = True
                state.retired.append(current)
            current = None
        if current is None:
            current = state.current = self._new_segment(max(_INTENT_SEGMENT_BYTES, size))
        return current

    def _new_segment(self, capacity: int) -> _Segment:
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}{_INTENT_SUFFIX}"
        temp = self._directory / f"{_TEMP_PREFIX}{_INTENT_PREFIX}{name}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            allocate = getattr(os, "posix_fallocate", None)
            if allocate is not None:
                allocate(fd, 0, capacity)  # ENOSPC now, not SIGBUS on a later append
            else:  # pragma: no cover - platforms without posix_fallocate
                os.ftruncate(fd, capacity)
            segment = _Segment(fd, temp, capacity)
            path = self._directory / f"{_INTENT_PREFIX}{name}"
            os.replace(temp, path)  # visible to scans only once locked
            segment.path = path
            if self._fsync:
                os.fsync(fd)
                _fsync_dir(self._directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return segment


_json_string: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


def _open_intents(raw: bytes) -> dict[str, JournalRecord]:
    """Return the entries of an intent log without a ``done`` line, by reservation id."""
    found: dict[str, JournalRecord] = {}
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip(b" \t\r\0"):  # the unused, zero-filled end of a segment
            continue
        try:
            item = json.loads(line)
            if item.get("op") == "done":
                found.pop(item["reservation_id"], None)
                continue
            record = _parse(json.dumps(item["record"]).encode())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # a torn last line: its write never returned, so its request was never sent
            logger.warning("journal: skipping unreadable intent line %d (%s)", number, exc)
            continue
        found[record.reservation_id] = record
    return found


# --------------------------------------------------------------------------------------------
# Off-loop I/O for async code

IO_IDLE_S: Final = 0.2
"""How long the journal's I/O thread waits for more work before it ends (it starts again
with the next job): no thread is left behind once settlements are done."""


class _IoWorker(Executor):
    """Runs journal I/O in order on one thread that exists only while there is work.

    Jobs run one at a time, in submission order (a claim's release runs after the I/O queued
    before it). The thread is not a daemon: at interpreter exit the I/O already queued
    finishes before the process ends, as with a ``ThreadPoolExecutor``.
    """

    def __init__(self, idle_s: float = IO_IDLE_S) -> None:
        self._idle_s = idle_s
        self._cond = threading.Condition(threading.Lock())
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._thread: threading.Thread | None = None
        self._shutdown = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Queue ``fn(*args)``; return its future.

        Raises:
            RuntimeError: The worker was shut down (interpreter exit).
        """
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        future: Future[_T] = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.append((future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="runcycles-journal")
                self._thread.start()
            else:
                self._cond.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new jobs; optionally wait until the queued ones ran."""
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._jobs:
                    self._jobs.popleft()[0].cancel()
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def idle(self, timeout_s: float) -> bool:
        """Wait until the thread has ended; return whether it did (for tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._thread is None, timeout_s)

    def _run(self) -> None:
        _io_thread.active = True
        while True:
            with self._cond:
                if not self._jobs and not self._shutdown:
                    self._cond.wait(self._idle_s)
                if not self._jobs:
                    self._thread = None
                    self._cond.notify_all()
                    return
                future, fn, args = self._jobs.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args


_executor: _IoWorker | None = None
_executor_lock = threading.Lock()
_io_thread = threading.local()


def _journal_executor() -> _IoWorker:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = _IoWorker()
    return _executor


def _new_worker_in_child() -> None:
    global _executor, _executor_lock
    _executor_lock = threading.Lock()
    _executor = None  # the parent's thread does not exist in the child


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_new_worker_in_child)


async def run_journal_io(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking journal I/O on the one shared journal worker thread; await the result.

    Async settlement uses this so the event loop never blocks on ``fsync``.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_journal_executor(), fn, *args)


# --------------------------------------------------------------------------------------------
# Record claims of async replays: released whatever happens to the task or its event loop
#
# An async replay claims a record on the journal's I/O thread and holds the claim across
# awaits. If the task is cancelled (``asyncio.run`` returning, a timeout) the claim is released
# on the I/O thread, after the journal I/O the replay queued there, without awaiting anything
# that needs the loop; a claim that arrives after its awaiter was cancelled is released as
# soon as it is made. A loop closed without cancelling its tasks never runs them again: the
# claims of such a loop are released by the next :meth:`Journal.try_lock` of this process.

_claims_lock = threading.Lock()
_loop_claims: dict[RecordLock, weakref.ref[asyncio.AbstractEventLoop]] = {}


def _forget_claims_in_child() -> None:
    global _claims_lock
    _claims_lock = threading.Lock()  # maybe held by another thread of the parent at the fork
    _loop_claims.clear()  # the parent's claims: a child must not release (unlink) them


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_forget_claims_in_child)


def _claim_for_loop(
    journal: Journal, reservation_id: str, loop: asyncio.AbstractEventLoop
) -> RecordLock | None:
    """:meth:`Journal.try_lock`, the claim belonging to ``loop`` (runs on the I/O thread)."""
    lock = journal.try_lock(reservation_id)
    if lock is not None:
        with _claims_lock:
            if not lock._released:
                _loop_claims[lock] = weakref.ref(loop)
    return lock


def _release_orphaned_claims() -> None:
    """Release the claims of loops that are closed (or gone): their tasks never run again."""
    if not _loop_claims:
        return
    with _claims_lock:
        orphans = [
            lock
            for lock, ref in _loop_claims.items()
            if (loop := ref()) is None or loop.is_closed()
        ]
    if not orphans:
        return
    executor = _executor
    if executor is not None and not getattr(_io_thread, "active", False):
        # Behind the journal I/O those replays left queued: none of it lands after a release.
        try:
            executor.submit(_release_each, orphans).result()
        except RuntimeError:  # no new jobs at interpreter exit
            pass
        else:
            return
    _release_each(orphans)


def _release_each(locks: list[RecordLock]) -> None:
    for lock in locks:
        try:
            lock.release()
        except OSError as exc:  # the claim ended all the same; the file is left
            logger.warning("journal: could not delete lock file %s: %s", lock._path, exc)


def _release_claimed(job: Future[RecordLock | None]) -> None:
    """Done-callback: release the claim a cancelled awaiter will never use."""
    if job.cancelled() or job.exception() is not None:
        return
    lock = job.result()
    if lock is not None:
        _release_each([lock])


def _release_soon(lock: RecordLock) -> Future[None] | None:
    """Queue ``lock``'s release on the I/O thread (``None``: released here, at exit)."""
    try:
        return _journal_executor().submit(lock.release)
    except RuntimeError:  # no new jobs at interpreter exit
        lock.release()
        return None


async def _aclaim(claim: Callable[..., RecordLock | None], *args: Any) -> RecordLock | None:
    """Run ``claim(*args, loop)`` on the I/O thread for async code; never lose the claim it makes.

    The claim belongs to the running loop: it is released if that loop is closed with the
    claim still held (:func:`_release_orphaned_claims`). E.g. ``_aclaim(_claim_for_loop,
    journal, reservation_id)``; use the claim with ``async with _ReleaseOnExit(lock)``.
    """
    loop = asyncio.get_running_loop()
    job = _journal_executor().submit(claim, *args, loop)
    try:
        return await asyncio.wrap_future(job, loop=loop)
    except BaseException:
        # Cancelled or closed while the claim was being made: release it once it is made
        # (a job not started yet is cancelled with its awaiter and claims nothing).
        job.add_done_callback(_release_claimed)
        raise


class _ReleaseOnExit:
    """Release a claim of async code when the block ends, however it ends.

    The release runs on the I/O thread, after the journal I/O queued there before it, and
    is queued before anything is awaited: a second cancellation, or the coroutine being
    closed with its loop gone, cannot skip it.
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: RecordLock) -> None:
        self._lock = lock

    async def __aenter__(self) -> RecordLock:
        return self._lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        job = _release_soon(self._lock)
        if job is None or (exc_type is not None and issubclass(exc_type, GeneratorExit)):
            return  # a closing coroutine must not await (its loop may be gone)
        await asyncio.shield(asyncio.wrap_future(job))
