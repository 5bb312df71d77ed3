"""The durable settlement journal: storage, naming, partitions, quarantine, migration, locks."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runcycles import Action, Amount, CommitRequest, CyclesConfig, Subject, Unit
from runcycles.journal import (
    Journal,
    JournalRecord,
    default_journal_dir,
    normalize_base_url,
    partition_key,
    record_file_name,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


def make_record(reservation_id: str = "r1", key: str = "key-1", amount: int = 42) -> JournalRecord:
    return JournalRecord.for_commit(
        reservation_id,
        CommitRequest(
            idempotency_key=key,
            actual=Amount(unit=Unit.TOKENS, amount=amount),
            metadata={"run": "7"},
        ),
        subject=Subject(tenant="acme", agent="bot"),
        action=Action(kind="llm.completion", name="gpt"),
    )


@pytest.fixture
def journal(tmp_path) -> Journal:
    return Journal(tmp_path / "journal", base_url="http://cycles.test", tenant="acme")


def test_file_name_is_sha256_of_exact_utf8_id():
    rid = "rés/ervation:1"
    digest = hashlib.sha256(rid.encode("utf-8")).hexdigest()
    assert record_file_name(rid) == f"v2-{digest}.json"


def test_distinct_ids_never_share_a_file():
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    ids = ["a/b", "a_b", "A_B", "a b", nfc, nfd, "../x", "x" * 128]
    assert len({record_file_name(rid) for rid in ids}) == len(ids)


@posix_only
def test_write_is_atomic_private_and_round_trips(journal):
    record = make_record()
    path = journal.write(record)
    assert path.name == record_file_name("r1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(journal.directory.stat().st_mode) == 0o700
    assert [p.name for p in journal.directory.iterdir()] == [path.name]  # no temp left behind
    loaded = journal.read("r1")
    assert loaded is not None
    assert loaded.idempotency_key == "key-1"
    assert loaded.commit_request() == record.commit_request()
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == 2
    assert stored["mode"] == "commit"
    assert stored["subject"] == {"tenant": "acme", "agent": "bot"}


def test_write_fsyncs_file_and_directory(journal, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    journal.write(make_record())
    assert len(synced) >= 2  # the temp file, then the directory


def test_remove(journal):
    journal.write(make_record())
    assert journal.remove("r1") is True
    assert journal.remove("r1") is False
    assert journal.read("r1") is None


def test_event_request_carries_original_fields_and_recovered_id():
    event = make_record().event_request()
    assert event.idempotency_key == "key-1"
    assert event.subject == Subject(tenant="acme", agent="bot")
    assert event.action.name == "gpt"
    assert event.actual.amount == 42
    assert event.metadata == {"run": "7", "recovered_reservation_id": "r1"}


def test_event_request_without_subject_is_refused():
    record = JournalRecord.for_commit(
        "r1",
        CommitRequest(idempotency_key="k", actual=Amount(unit=Unit.TOKENS, amount=1)),
        subject=None,
        action=None,
    )
    with pytest.raises(ValueError, match="no subject"):
        record.event_request()


# --------------------------------------------------------------------------- partitions


def test_partition_is_stable_across_api_key_rotation_with_tenant(tmp_path):
    old = CyclesConfig(base_url="http://Cycles.Test:80/", api_key="old-key", tenant="acme")
    new = CyclesConfig(base_url="http://cycles.test", api_key="new-key", tenant="acme")
    assert (
        Journal.for_config(old, tmp_path).directory == Journal.for_config(new, tmp_path).directory
    )


def test_partition_differs_per_server_and_tenant():
    base = partition_key("http://a.test", tenant="acme", api_key=None)
    assert base != partition_key("http://b.test", tenant="acme", api_key=None)
    assert base != partition_key("http://a.test", tenant="other", api_key=None)


def test_partition_without_tenant_uses_key_hash_and_never_the_key(tmp_path):
    one = Journal(tmp_path, base_url="http://a.test", api_key="secret-key-1")
    two = Journal(tmp_path, base_url="http://a.test", api_key="secret-key-2")
    assert one.directory != two.directory
    one.write(make_record())
    for path in tmp_path.rglob("*"):
        assert "secret-key-1" not in path.name
        if path.is_file():
            assert b"secret-key-1" not in path.read_bytes()


def test_partition_needs_an_identity():
    with pytest.raises(ValueError, match="tenant or an API key"):
        partition_key("http://a.test", tenant=None, api_key=None)


def test_normalize_base_url():
    assert normalize_base_url("HTTPS://Host.Example:443/base/") == "https://host.example/base"
    assert normalize_base_url("http://h:8080") == "http://h:8080"


def test_default_dir_follows_xdg_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNCYCLES_JOURNAL_DIR", raising=False)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        assert default_journal_dir() == tmp_path / "state" / "runcycles" / "journal"
        monkeypatch.delenv("XDG_STATE_HOME")
        expected = os.path.expanduser("~/.local/state/runcycles/journal")
        assert str(default_journal_dir()) == expected
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path / "custom"))
    assert default_journal_dir() == tmp_path / "custom"


# --------------------------------------------------------------------------- scan


def test_scan_quarantines_corrupt_and_unknown_versions(journal):
    journal.write(make_record("good"))
    journal.directory.joinpath(record_file_name("bad-json")).write_text("{not json")
    future = make_record("future").model_dump(mode="json")
    future["schema_version"] = 99
    journal.directory.joinpath(record_file_name("future")).write_text(json.dumps(future))
    scan = journal.scan()
    assert [r.reservation_id for r in scan.records] == ["good"]
    assert len(scan.quarantined) == 2
    reasons = " ".join(q.reason for q in scan.quarantined)
    assert "not valid JSON" in reasons
    assert "unsupported schema_version 99" in reasons
    quarantine = journal.directory / "quarantine"
    assert len(list(quarantine.iterdir())) == 2
    assert all(q.moved_to is not None and q.moved_to.parent == quarantine for q in scan.quarantined)


def test_scan_quarantines_record_under_the_wrong_name(journal):
    record = make_record("r1")
    journal.directory.mkdir(parents=True)
    journal.directory.joinpath(record_file_name("other")).write_bytes(record.to_json())
    scan = journal.scan()
    assert scan.records == []
    assert "does not match" in scan.quarantined[0].reason


def test_scan_of_missing_directory_is_empty(journal):
    scan = journal.scan()
    assert scan.records == []
    assert scan.quarantined == []


def test_scan_removes_only_stale_temp_files(journal):
    journal.write(make_record())
    fresh = journal.directory / ".tmp-fresh"
    stale = journal.directory / ".tmp-stale"
    fresh.write_text("x")
    stale.write_text("x")
    os.utime(stale, (0, 0))
    journal.scan()
    assert fresh.exists()
    assert not stale.exists()


# --------------------------------------------------------------------------- locks


def test_lock_is_exclusive_and_released(journal):
    first = journal.try_lock("r1")
    assert first is not None
    assert journal.try_lock("r1") is None
    assert journal.try_lock("r2") is not None
    first.release()
    first.release()  # idempotent
    second = journal.try_lock("r1")
    assert second is not None
    second.release()


def test_lock_files_do_not_leak(journal):
    with journal.try_lock("r1"):
        pass
    assert list(journal.directory.glob("*.lock")) == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reservation_id=st.text(min_size=1, max_size=128),
    amount=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_any_id_round_trips_under_its_own_name(journal, reservation_id, amount):
    record = make_record(reservation_id, key="k", amount=amount)
    path = journal.write(record)
    assert path.name == record_file_name(reservation_id)
    loaded = journal.read(reservation_id)
    assert loaded is not None
    assert loaded.reservation_id == reservation_id
    assert loaded.actual.amount == amount
    assert journal.remove(reservation_id)


# --------------------------------------------------------------------------- fsync mode


def test_for_config_takes_fsync_from_the_config(tmp_path):
    config = CyclesConfig(base_url="http://cycles.test", api_key="k", tenant="acme")
    assert Journal.for_config(config, tmp_path).fsync is False
    fsynced = CyclesConfig(
        base_url="http://cycles.test", api_key="k", tenant="acme", journal_fsync=True
    )
    assert Journal.for_config(fsynced, tmp_path).fsync is True


def test_write_without_fsync_is_atomic_and_never_flushes(tmp_path, monkeypatch):
    journal = Journal(tmp_path, base_url="http://cycles.test", tenant="acme", fsync=False)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync called with fsync=False"))
    path = journal.write(make_record())
    assert [p.name for p in journal.directory.iterdir()] == [path.name]  # no temp left
    loaded = journal.read("r1")
    assert loaded is not None
    assert loaded.idempotency_key == "key-1"


# --------------------------------------------------------------------------- intent logs

posix_locks = pytest.mark.skipif(sys.platform == "win32", reason="intent logs need fcntl")


def _intent_logs(journal: Journal) -> list[str]:
    return sorted(p.name for p in journal.directory.glob("intent-*.log"))


@posix_locks
@pytest.mark.parametrize("fsync", [False, True])
def test_live_intent_is_readable_but_left_to_its_process(tmp_path, fsync):
    journal = Journal(tmp_path, base_url="http://cycles.test", tenant="acme", fsync=fsync)
    entry = journal.log_intent(make_record())
    assert len(_intent_logs(journal)) == 1
    assert not journal.path_for("r1").exists()  # no record file on the fast path
    seen = journal.read("r1")
    assert seen is not None
    assert seen.idempotency_key == "key-1"
    other = Journal(tmp_path, base_url="http://cycles.test", tenant="acme")
    assert other.scan().records == []  # its owner (this process) is alive: not replayed
    journal.resolve_intent(entry)
    assert journal.read("r1") is None
    journal.resolve_intent(entry)  # idempotent


@posix_locks
def test_intent_of_a_dead_process_becomes_a_record_on_scan(tmp_path):
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import os
        from runcycles import Action, Amount, CommitRequest, Subject, Unit
        from runcycles.journal import Journal, JournalRecord
        journal = Journal({str(tmp_path)!r}, base_url="http://cycles.test", tenant="acme")
        def record(rid, key):
            return JournalRecord.for_commit(
                rid,
                CommitRequest(idempotency_key=key, actual=Amount(unit=Unit.TOKENS, amount=5)),
                subject=Subject(tenant="acme"),
                action=Action(kind="llm", name="m"),
            )
        done = journal.log_intent(record("settled", "k-settled"))
        journal.log_intent(record("in-flight", "k-in-flight"))
        journal.resolve_intent(done)
        os._exit(0)  # dies like a crash: no cleanup, the in-flight intent stays open
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    journal = Journal(tmp_path, base_url="http://cycles.test", tenant="acme")
    assert len(_intent_logs(journal)) == 1
    scan = journal.scan()
    assert [(r.reservation_id, r.idempotency_key) for r in scan.records] == [
        ("in-flight", "k-in-flight")
    ]
    assert _intent_logs(journal) == []  # recovered, then deleted
    assert journal.read("in-flight") is not None
    assert journal.scan().records[0].reservation_id == "in-flight"  # now an ordinary record


@posix_locks
def test_recovery_keeps_a_newer_record_file(tmp_path):
    journal = Journal(tmp_path, base_url="http://cycles.test", tenant="acme")
    newer = make_record()
    newer.attempts = 3
    journal.write(newer)
    log_dir = journal.directory
    line = b'{"op":"open","record":' + make_record().to_json() + b"}\n"
    (log_dir / "intent-1-dead.log").write_bytes(line + b"\0" * 64)  # nobody holds its lock
    (record,) = journal.scan().records
    assert record.attempts == 3
    assert _intent_logs(journal) == []


@posix_locks
def test_torn_intent_line_is_skipped(tmp_path):
    journal = Journal(tmp_path, base_url="http://cycles.test", tenant="acme")
    journal.directory.mkdir(parents=True)
    good = b'{"op":"open","record":' + make_record("r2", "k2").to_json() + b"}\n"
    torn = b'{"op":"open","record":{"schema_version":2,"reserv'
    (journal.directory / "intent-1-dead.log").write_bytes(good + torn)
    assert [r.reservation_id for r in journal.scan().records] == ["r2"]


@posix_locks
def test_full_segment_rotates_and_is_deleted_when_resolved(tmp_path, monkeypatch):
    import runcycles.journal as journal_module

    monkeypatch.setattr(journal_module, "_INTENT_SEGMENT_BYTES", 4096)
    journal = Journal(tmp_path, base_url="http://cycles.test", tenant="acme", fsync=False)
    entries = [journal.log_intent(make_record(f"r{i}", f"k{i}")) for i in range(40)]
    assert len(_intent_logs(journal)) > 1
    for i, entry in enumerate(entries):
        assert journal.read(f"r{i}") is not None
        journal.resolve_intent(entry)
    assert len(_intent_logs(journal)) == 1  # only the current one is left
    assert all(journal.read(f"r{i}") is None for i in range(40))


@pytest.mark.parametrize(
    ("subject", "action", "overage_policy", "server", "metrics", "metadata"),
    [
        (None, None, None, None, None, None),
        (
            Subject(tenant="t", agent="a", dimensions={"k": "v"}),
            Action(kind="llm", name="x", tags=["a"]),
            "REJECT",
            "https://cycles.example",
            {"latency_ms": 3, "tokens_input": 1},
            {"m": [1, {"n": None}]},
        ),
    ],
)
def test_for_commit_builds_what_validation_builds(
    subject: Subject | None,
    action: Action | None,
    overage_policy: str | None,
    server: str | None,
    metrics: dict[str, int] | None,
    metadata: dict[str, object] | None,
) -> None:
    from runcycles.models import CommitOveragePolicy, StandardMetrics

    request = CommitRequest(
        idempotency_key="key-1",
        actual=Amount(unit=Unit.TOKENS, amount=42),
        metrics=StandardMetrics.model_validate(metrics) if metrics is not None else None,
        metadata=metadata,
    )
    policy = CommitOveragePolicy(overage_policy) if overage_policy else None
    built = JournalRecord.for_commit(
        "res-1", request, subject=subject, action=action, overage_policy=policy, server=server
    )
    validated = JournalRecord(
        reservation_id="res-1",
        idempotency_key="key-1",
        actual=request.actual,
        metrics=request.metrics,
        metadata=request.metadata,
        subject=subject,
        action=action,
        overage_policy=policy,
        server=server,
        created_at_ms=built.created_at_ms,
        updated_at_ms=built.updated_at_ms,
    )
    assert built.created_at_ms == built.updated_at_ms > 0
    assert built == validated
    assert built.to_json() == validated.to_json()
    assert built.model_fields_set == validated.model_fields_set - {
        "created_at_ms",
        "updated_at_ms",
    }
    built.mode = "event"  # still validated on assignment, like any record
    with pytest.raises(ValueError, match="attempts"):
        built.attempts = -1


def test_for_commit_validates_what_it_cannot_trust() -> None:
    request = CommitRequest(idempotency_key="k", actual=Amount(unit=Unit.TOKENS, amount=1))
    with pytest.raises(ValueError, match="reservation_id"):
        JournalRecord.for_commit("x" * 129, request, subject=None, action=None)
    with pytest.raises(ValueError, match="reservation_id"):
        JournalRecord.for_commit("", request, subject=None, action=None)
    with pytest.raises(ValueError, match="subject"):
        JournalRecord.for_commit(
            "r",
            request,
            subject={"tenant": 5},  # type: ignore[arg-type]
            action=None,
        )
