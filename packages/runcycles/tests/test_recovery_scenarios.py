"""Every scenario of the client-recovery profile, bound to native tests (sync and async).

Each test is marked ``@pytest.mark.recovery("<scenario id>")`` (what the process adapter
``python -m runcycles.testing.recovery_adapter`` runs), asserts the request choreography
against the catalog's ``expected_requests`` and checks the catalog's assertions, then reports
what it saw with :func:`runcycles.testing.recovery_adapter.observe`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitRequest,
    CyclesClient,
    CyclesConfig,
    Subject,
    Unit,
    UnknownActualError,
    cycles,
)
from runcycles.heartbeat import AsyncHeartbeatScheduler, HeartbeatEvent, HeartbeatScheduler
from runcycles.journal import Journal, JournalRecord, record_file_name, run_journal_io
from runcycles.retry import RetryPolicy
from runcycles.settlement import AsyncSettlement, ReplayReport, Settlement, SettlementResult
from runcycles.testing.recovery_adapter import observe
from runcycles.testing.recovery_fakes import (
    FakeLedger,
    Fault,
    ProcessCrash,
    serve,
)

CATALOG_PATH = Path(__file__).resolve().parents[3] / "spec" / "client-recovery-scenarios.yaml"
CATALOG: dict[str, dict[str, Any]] = {
    scenario["id"]: scenario for scenario in yaml.safe_load(CATALOG_PATH.read_text())["scenarios"]
}
CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key-1", tenant="acme")
SUBJECT = Subject(tenant="acme", workflow="wf")
ACTION = Action(kind="tool.search", name="web")
MODES = pytest.mark.parametrize("mode", ["sync", "async"])
POLICY = RetryPolicy(max_attempts=5, jitter=False)


def expected(scenario_id: str) -> list[str]:
    return list(CATALOG[scenario_id]["expected_requests"])


def report_to_adapter(scenario_id: str, observed: list[str], assertions: list[str]) -> None:
    missing = set(assertions) - set(CATALOG[scenario_id]["assertions"])
    assert not missing, f"not catalog assertions: {missing}"
    observe(scenario_id, observed, assertions)


class Wall:
    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now_s


class Process:
    """One 'process': a fresh client and settlement built from config + journal only."""

    def __init__(
        self,
        mode: str,
        transport_handler: Any,
        journal: Journal | None,
        *,
        config: CyclesConfig = CONFIG,
        wall: Wall | None = None,
        sleep: Any = None,
    ) -> None:
        self.wall = wall or Wall()
        sleeper = sleep or (lambda seconds: None)
        if mode == "sync":
            self.client: Any = CyclesClient(
                config, transport=httpx.MockTransport(transport_handler)
            )
            self.settlement: Any = Settlement(
                self.client,
                journal=journal,
                retry_policy=POLICY,
                sleep=sleeper,
                wall_clock=self.wall,
            )
        else:

            async def asleep(seconds: float) -> None:
                sleeper(seconds)

            self.client = AsyncCyclesClient(
                config, transport=httpx.MockTransport(transport_handler)
            )
            self.settlement = AsyncSettlement(
                self.client,
                journal=journal,
                retry_policy=POLICY,
                sleep=asleep,
                wall_clock=self.wall,
            )

    async def commit(
        self, rid: str = "r1", key: str = "settle-key", amount: int = 900
    ) -> SettlementResult:
        request = CommitRequest(
            idempotency_key=key,
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=amount),
            metadata={"source": "test"},
        )
        result = self.settlement.commit(rid, request, subject=SUBJECT, action=ACTION)
        if isinstance(self.settlement, AsyncSettlement):
            result = await result
        return result  # type: ignore[no-any-return]

    async def replay(self) -> ReplayReport:
        report = self.settlement.replay()
        if isinstance(self.settlement, AsyncSettlement):
            report = await report
        return report  # type: ignore[no-any-return]

    async def exit(self) -> None:
        if isinstance(self.client, AsyncCyclesClient):
            await self.client.aclose()
        else:
            self.client.close()


def stored_record(rid: str = "r1", key: str = "settle-key") -> JournalRecord:
    return JournalRecord.for_commit(
        rid,
        CommitRequest(
            idempotency_key=key,
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=900),
            metadata={"source": "test"},
        ),
        subject=SUBJECT,
        action=ACTION,
    )


def assert_secret_not_stored(root: Path, secret: str) -> int:
    files = 0
    for path in root.rglob("*"):
        assert secret not in path.name
        if path.is_file():
            files += 1
            assert secret.encode() not in path.read_bytes()
    return files


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "journal-root"


def test_every_catalog_scenario_is_bound_to_a_native_test():
    bound: set[str] = set()
    for value in globals().values():
        for mark in getattr(value, "pytestmark", []):
            if mark.name == "recovery":
                bound.update(mark.args)
    assert bound == set(CATALOG)


# --------------------------------------------------------------------------- core


@pytest.mark.recovery("CR-CORE-001")
@MODES
async def test_core_001_lost_commit_response_reuses_key(mode, ledger):
    ledger.script("commit", Fault.lost())
    process = Process(mode, ledger.handle, None)
    result = await process.commit()
    await process.exit()
    assert result.outcome == "committed"
    observed = ledger.labels()
    assert observed == expected("CR-CORE-001")
    assert ledger.applied_commits == {"r1": 1}
    assert {r.idempotency_key for r in ledger.requests} == {"settle-key"}
    report_to_adapter(
        "CR-CORE-001",
        observed,
        ["settlement_occurs_at_most_once", "retry_uses_original_idempotency_key"],
    )


@pytest.mark.recovery("CR-CORE-002")
@MODES
async def test_core_002_expired_commit_falls_back_to_event(mode, ledger):
    ledger.expire("r1")
    process = Process(mode, ledger.handle, None)
    result = await process.commit()
    await process.exit()
    assert result.outcome == "event_applied"
    observed = ledger.labels()
    assert observed == expected("CR-CORE-002")
    (event,) = ledger.requests_to("event")
    assert event.body["subject"] == SUBJECT.model_dump(exclude_none=True)
    assert event.body["action"] == ACTION.model_dump(exclude_none=True)
    assert event.body["actual"] == {"unit": "USD_MICROCENTS", "amount": 900}
    assert event.body["metadata"]["source"] == "test"
    assert ledger.applied_commits == {}
    assert ledger.applied_events == {"r1": 1}
    report_to_adapter(
        "CR-CORE-002",
        observed,
        ["event_carries_original_subject_action_actual", "settlement_occurs_at_most_once"],
    )


class Clock:
    def __init__(self) -> None:
        self.now_s = 50.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.recovery("CR-CORE-003")
@MODES
async def test_core_003_heartbeat_transport_failure_is_observable_and_non_fatal(
    mode, ledger, caplog
):
    ledger.script("extend", Fault.transport())
    clock = Clock()
    events: list[HeartbeatEvent] = []
    process = Process(mode, ledger.handle, None)
    options: dict[str, Any] = {"attempt_timeout_ms": 1_000, "clock": clock, "autostart": False}
    if mode == "sync":
        scheduler: Any = HeartbeatScheduler(process.client, **options)
    else:
        scheduler = AsyncHeartbeatScheduler(process.client, **options)
    handle = scheduler.track(
        "r1",
        ttl_ms=60_000,
        remaining_ttl_ms=60_000,
        expires_at_ms=0,
        rtt_ms=0,
        on_event=events.append,
    )

    async def pump(advance_s: float) -> None:
        clock.now_s += advance_s
        ran = scheduler.run_pending()
        if mode == "async":
            await ran

    # the guarded action: three steps of work while the lease is kept alive
    steps_done = 0
    with caplog.at_level(logging.WARNING, logger="runcycles.heartbeat"):
        for advance_s in (57.0, 0.75, 10.0):
            await pump(advance_s)  # the heartbeat runs "during" the work
            steps_done += 1
    actual = 900 if steps_done == 3 else None
    handle.stop()
    assert actual is not None
    result = await process.commit(amount=actual)
    await process.exit()

    observed = ledger.labels()
    assert observed == expected("CR-CORE-003")
    failure = events[0]
    assert failure.reservation_id == "r1"
    assert failure.disposition == "retrying"
    assert "r1" in caplog.text
    assert "retrying" in caplog.text
    assert steps_done == 3
    assert result.outcome == "committed"
    report_to_adapter(
        "CR-CORE-003",
        observed,
        [
            "heartbeat_failure_reports_reservation_and_disposition",
            "guarded_action_continues_under_warn_policy",
            "final_settlement_is_attempted",
        ],
    )


@pytest.mark.recovery("CR-CORE-004")
@MODES
@pytest.mark.parametrize(
    "fault",
    [
        Fault.raw(200, b'{"status": "OK"}', apply=True),
        Fault.raw(200, b"<html>proxy</html>", apply=True),
        Fault.raw(
            202,
            b'{"status": "COMMITTED", "charged": {"unit": "USD_MICROCENTS", "amount": 900}}',
            apply=True,
        ),
        Fault.raw(204, b"", apply=True),
    ],
    ids=["invalid-body", "not-json", "wrong-2xx", "no-content"],
)
async def test_core_004_nonconformant_success_is_ambiguous(mode, ledger, fault):
    ledger.script("commit", fault)
    process = Process(mode, ledger.handle, None)
    result = await process.commit()
    await process.exit()
    assert result.outcome == "committed"
    assert result.attempts == 2  # the nonconformant answer did not count as success
    observed = ledger.labels()
    assert observed == expected("CR-CORE-004")
    assert {r.idempotency_key for r in ledger.requests} == {"settle-key"}
    assert ledger.applied_commits == {"r1": 1}
    report_to_adapter(
        "CR-CORE-004",
        observed,
        [
            "only_schema_valid_expected_status_is_terminal_success",
            "ambiguous_success_retains_original_idempotency_key",
        ],
    )


# --------------------------------------------------------------------------- durable


@pytest.mark.recovery("CR-DURABLE-001")
@MODES
async def test_durable_001_journal_precedes_first_commit_and_survives_restart(
    mode: str, ledger: FakeLedger, root: Path
) -> None:
    journal = Journal.for_config(CONFIG, root)
    on_disk_at_send: list[JournalRecord | None] = []

    def first_process(request: httpx.Request) -> httpx.Response:
        on_disk_at_send.append(journal.read("r1"))
        ledger.script("commit", Fault.crash(apply=True))  # applied, then the process dies
        return ledger.handle(request)

    first = Process(mode, first_process, journal)
    with pytest.raises(ProcessCrash):
        await first.commit()
    assert on_disk_at_send[0] is not None
    assert on_disk_at_send[0].idempotency_key == "settle-key"

    ledger.mark("_after_restart")
    restarted = Process(mode, ledger.handle, Journal.for_config(CONFIG, root))
    assert [r.reservation_id for r in journal.scan().records] == ["r1"]
    report = await restarted.replay()
    await restarted.exit()
    assert report.settled == ["r1"]
    observed = ledger.labels()
    assert observed == expected("CR-DURABLE-001")
    assert journal.scan().records == []
    assert ledger.applied_commits == {"r1": 1}
    report_to_adapter(
        "CR-DURABLE-001",
        observed,
        [
            "journal_write_precedes_first_settlement_request",
            "unresolved_record_survives_restart",
            "successful_replay_removes_record",
            "settlement_occurs_at_most_once",
        ],
    )


@pytest.mark.recovery("CR-DURABLE-002")
@MODES
async def test_durable_002_expired_replay_switches_durably_to_event_mode(
    mode, ledger, root, monkeypatch
):
    Journal.for_config(CONFIG, root).write(stored_record())  # left by an earlier process
    ledger.expect_key("r1", "settle-key")
    ledger.expire("r1")
    ledger.mark("_after_restart")
    real_write = Journal.write

    def write_then_die_after_mode_switch(self: Journal, record: JournalRecord) -> Path:
        path = real_write(self, record)
        if record.mode == "event":
            raise ProcessCrash("terminated right after persisting event mode")
        return path

    monkeypatch.setattr(Journal, "write", write_then_die_after_mode_switch)
    first = Process(mode, ledger.handle, Journal.for_config(CONFIG, root))
    with pytest.raises(ProcessCrash):
        await first.replay()
    monkeypatch.setattr(Journal, "write", real_write)
    persisted = Journal.for_config(CONFIG, root).read("r1")
    assert persisted is not None
    assert persisted.mode == "event"
    assert ledger.requests_to("event") == []  # the switch was durable before any event left

    second = Process(mode, ledger.handle, Journal.for_config(CONFIG, root))
    report = await second.replay()
    await second.exit()
    assert report.settled == ["r1"]
    observed = ledger.labels()
    assert observed == expected("CR-DURABLE-002")
    assert Journal.for_config(CONFIG, root).scan().records == []
    assert ledger.applied_events == {"r1": 1}
    assert ledger.applied_commits == {}
    report_to_adapter(
        "CR-DURABLE-002",
        observed,
        [
            "event_mode_is_persisted_before_event_attempt",
            "successful_event_removes_record",
            "settlement_occurs_at_most_once",
        ],
    )


@pytest.mark.recovery("CR-DURABLE-003")
@MODES
async def test_durable_003_rate_limit_floor_survives_restart(mode, ledger, root):
    ledger.script("commit", Fault.error(429, "LIMIT_EXCEEDED", {"Retry-After": "30"}))
    wall = Wall()
    start_s = wall.now_s

    def die_while_waiting(seconds: float) -> None:
        raise ProcessCrash("terminated while waiting for Retry-After")

    first = Process(
        mode, ledger.handle, Journal.for_config(CONFIG, root), wall=wall, sleep=die_while_waiting
    )
    with pytest.raises(ProcessCrash):
        await first.commit()
    record = Journal.for_config(CONFIG, root).read("r1")
    assert record is not None
    assert record.not_before_ms == int(start_s * 1000) + 30_000

    wall.now_s = start_s + 29.999  # restarted before Retry-After elapsed
    early = Process(mode, ledger.handle, Journal.for_config(CONFIG, root), wall=wall)
    report = await early.replay()
    await early.exit()
    assert report.not_due == ["r1"]
    assert len(ledger.requests_to("commit")) == 1

    wall.now_s = start_s + 30.0
    ledger.mark("_after_retry_after")
    later = Process(mode, ledger.handle, Journal.for_config(CONFIG, root), wall=wall)
    report = await later.replay()
    await later.exit()
    assert report.settled == ["r1"]
    observed = ledger.labels()
    assert observed == expected("CR-DURABLE-003")
    assert Journal.for_config(CONFIG, root).scan().records == []
    report_to_adapter(
        "CR-DURABLE-003",
        observed,
        ["no_retry_before_persisted_not_before", "successful_replay_removes_record"],
    )


@pytest.mark.recovery("CR-DURABLE-004")
@MODES
async def test_durable_004_tenant_journal_survives_key_rotation(
    mode: str, ledger: FakeLedger, root: Path
) -> None:
    old = CyclesConfig(base_url="http://cycles.test", api_key="old-secret-key", tenant="acme")
    new = CyclesConfig(base_url="http://cycles.test", api_key="new-secret-key", tenant="acme")
    Journal.for_config(old, root).write(stored_record())
    assert assert_secret_not_stored(root, "old-secret-key") == 1  # the record, key-free
    ledger.expect_key("r1", "settle-key")
    ledger.mark("_after_restart")
    seen_keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_keys.append(request.headers["X-Cycles-API-Key"])
        return ledger.handle(request)

    restarted = Process(mode, handler, Journal.for_config(new, root), config=new)
    report = await restarted.replay()
    await restarted.exit()
    assert report.settled == ["r1"]
    assert seen_keys == ["new-secret-key"]
    observed = ledger.labels()
    assert observed == expected("CR-DURABLE-004")
    assert_secret_not_stored(root, "old-secret-key")
    report_to_adapter(
        "CR-DURABLE-004",
        observed,
        ["new_tenant_credential_finds_record", "old_api_key_is_not_stored"],
    )


@pytest.mark.recovery("CR-DURABLE-005")
@MODES
async def test_durable_005_corrupt_records_are_quarantined(mode, ledger, root, caplog):
    journal = Journal.for_config(CONFIG, root)
    journal.write(stored_record("good", "good-key"))
    journal.directory.joinpath(record_file_name("corrupt")).write_bytes(
        b'{"schema_version": 2, "reserv'
    )
    future = json.loads(stored_record("future", "future-key").to_json())
    future["schema_version"] = 3
    journal.directory.joinpath(record_file_name("future")).write_text(json.dumps(future))

    restarted = Process(mode, ledger.handle, Journal.for_config(CONFIG, root))
    with caplog.at_level(logging.ERROR, logger="runcycles.journal"):
        report = await restarted.replay()
    await restarted.exit()
    assert len(report.quarantined) == 2
    reasons = sorted(q.reason for q in report.quarantined)
    assert any("not valid JSON" in r for r in reasons)
    assert any("unsupported schema_version 3" in r for r in reasons)
    assert "quarantined" in caplog.text
    quarantine = journal.directory / "quarantine"
    assert len(list(quarantine.iterdir())) == 2
    assert report.settled == ["good"]
    assert journal.scan().records == []
    observed = [
        label
        for label, r in zip(ledger.labels(), ledger.requests, strict=True)
        if r.reservation_id != "good"
    ]
    assert observed == expected("CR-DURABLE-005")
    report_to_adapter(
        "CR-DURABLE-005",
        observed,
        [
            "corrupt_record_is_quarantined",
            "unsupported_record_version_is_quarantined",
            "other_valid_records_still_replay",
            "corruption_is_reported",
        ],
    )


@pytest.mark.recovery("CR-DURABLE-006")
@MODES
def test_durable_006_concurrent_replay_settles_once(mode, root):
    ledger = FakeLedger(apply_delay_s=0.3)  # keeps the first commit in flight while others race
    ledger.expect_key("r1", "settle-key")
    with serve(ledger) as url:
        config = CyclesConfig(base_url=url, api_key="key-1", tenant="acme")
        Journal.for_config(config, root).write(stored_record())
        command = [sys.executable, "-m", "runcycles.testing.recovery_fakes", "replay"]
        workers = [
            subprocess.Popen(
                [*command, mode, str(root), url, "acme", "key-1"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:  # release both workers at once
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        summaries = []
        for worker in workers:
            out, _ = worker.communicate(timeout=60)
            assert worker.returncode == 0
            summaries.append(json.loads(out))
        remaining = Journal.for_config(config, root).scan().records
    settled = [s for s in summaries if s["settled"] == ["r1"]]
    assert len(settled) == 1, summaries
    assert ledger.applied_commits == {"r1": 1}
    assert remaining == []
    observed = [f"concurrent_{label}" for label in ledger.labels()]
    assert observed == expected("CR-DURABLE-006")
    report_to_adapter(
        "CR-DURABLE-006",
        observed,
        ["settlement_occurs_at_most_once", "terminal_record_is_removed"],
    )


@pytest.mark.recovery("CR-DURABLE-007")
@MODES
async def test_durable_007_legacy_names_migrate_without_losing_collisions(mode, ledger, root):
    journal = Journal.for_config(CONFIG, root)
    # a record already under the standard name for "a_b"
    journal.write(stored_record("a_b", "key-a_b"))
    # legacy name "a_b.json" holds the record of a DIFFERENT id, "a/b" ('/' sanitized to '_')
    journal.directory.joinpath("a_b.json").write_bytes(stored_record("a/b", "key-a/b").to_json())
    # legacy "x_y.json" holds x_y, but the standard x_y file holds another settlement
    journal.write(stored_record("x_y", "key-new"))
    collision = journal.directory / "x_y.json"
    collision.write_bytes(stored_record("x_y", "key-old").to_json())

    scan = await run_journal_io(journal.scan) if mode == "async" else journal.scan()

    names = {p.name for p in journal.directory.iterdir() if p.is_file()}
    assert record_file_name("a/b") in names
    assert record_file_name("a_b") in names
    assert record_file_name("a/b") != record_file_name("a_b")
    migrated_ab = journal.read("a/b")
    assert migrated_ab is not None
    assert migrated_ab.idempotency_key == "key-a/b"
    still_ab = journal.read("a_b")
    assert still_ab is not None
    assert still_ab.idempotency_key == "key-a_b"
    assert not (journal.directory / "a_b.json").exists()
    assert collision.exists()  # never deleted
    assert scan.conflicts == [collision]
    kept = journal.read("x_y")
    assert kept is not None
    assert kept.idempotency_key == "key-new"
    observed = ledger.labels()
    assert observed == expected("CR-DURABLE-007")
    report_to_adapter(
        "CR-DURABLE-007",
        observed,
        [
            "standard_filename_is_sha256_of_exact_utf8_identifier",
            "distinct_identifiers_never_share_a_journal_file",
            "matching_legacy_record_migrates_without_deleting_collision",
        ],
    )


# --------------------------------------------------------------------------- boundary


@pytest.mark.recovery("CR-BOUNDARY-001")
@MODES
async def test_boundary_001_missing_actual_is_surfaced_without_settlement(
    mode, ledger, root, monkeypatch
):
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(root))
    journal = Journal.for_config(CONFIG, root)
    process = Process(mode, ledger.handle, journal)

    # 1. The settlement primitives refuse to settle without a known actual.
    def guarded_action() -> int | None:
        return None  # the action ran but could not report what it used

    actual = guarded_action()
    with pytest.raises(ValueError, match="actual"):
        CommitRequest(idempotency_key="k", actual=actual)  # type: ignore[arg-type]

    async def settle_without_actual() -> None:
        result = process.settlement.commit("r1", None, subject=SUBJECT, action=ACTION)
        if mode == "async":
            await result

    with pytest.raises(TypeError, match="CommitRequest"):
        await settle_without_actual()

    # 2. @cycles whose actual= is unknown (returns None, or raises): the condition is
    #    raised to the caller with the action's result, and nothing is sent after the
    #    reservation: no commit, no event (and no release: it expires at its lease).
    def no_actual(result: str) -> int | None:
        return None

    def broken_actual(result: str) -> int:
        raise KeyError("usage")

    missing: set[str] = set()
    for measure in (no_actual, broken_actual):
        guard = cycles(500, actual=measure, client=process.client, workflow="wf")
        if mode == "sync":

            def action() -> str:
                return "ran"

            with pytest.raises(UnknownActualError) as raised:
                guard(action)()
        else:

            async def aaction() -> str:
                return "ran"

            with pytest.raises(UnknownActualError) as raised:
                await guard(aaction)()
        assert raised.value.result == "ran"
        assert raised.value.reservation_id is not None
        missing.add(raised.value.reservation_id)
        assert (raised.value.__cause__ is None) == (measure is no_actual)

    # 3. A guarded action that fails is surfaced too (re-raised), never settled.
    def failing() -> str:
        raise RuntimeError("tool failed")

    if mode == "sync":
        with pytest.raises(RuntimeError, match="tool failed"):
            cycles(500, workflow="wf", client=process.client)(failing)()
    else:

        async def afailing() -> str:
            raise RuntimeError("tool failed")

        with pytest.raises(RuntimeError, match="tool failed"):
            await cycles(500, workflow="wf", client=process.client)(afailing)()
    assert ledger.labels() == []  # no commit, event or extend
    await process.exit()

    # every request about the two missing-actual reservations after they were created
    # (the failed action's reservation was released, which charges nothing)
    assert len(missing) == 2
    observed = [
        label
        for label, request in zip(
            ledger.labels(("create", "commit", "event", "extend", "release")),
            ledger.requests,
            strict=True,
        )
        if request.reservation_id in missing
    ]
    assert observed == expected("CR-BOUNDARY-001")
    assert [r.endpoint for r in ledger.requests] == ["create", "create", "create", "release"]
    assert ledger.applied_commits == {}
    assert ledger.applied_events == {}
    assert journal.scan().records == []
    report_to_adapter(
        "CR-BOUNDARY-001",
        observed,
        [
            "no_commit_or_event_without_known_actual",
            "missing_actual_or_guarded_action_failure_is_surfaced",
        ],
    )


def test_catalog_is_the_repository_copy():
    assert CATALOG_PATH.exists()
    assert sys.version_info >= (3, 10)
