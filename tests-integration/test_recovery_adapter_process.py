"""The recovery-profile adapter as a real process: ``python -m runcycles.testing.recovery_adapter``.

Each test starts the adapter, which itself runs pytest in a child process (seconds each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCENARIO: dict[str, Any] = {
    "id": "CR-CORE-001",
    "level": "core",
    "name": "lost commit response reuses the same key",
    "expected_requests": ["commit", "commit_same_key"],
    "assertions": ["settlement_occurs_at_most_once", "retry_uses_original_idempotency_key"],
}

BOUND_TEST = """
import pytest

from runcycles.testing.recovery_adapter import evaluate
from runcycles.testing.recovery_adapter import observe

@pytest.mark.recovery("CR-CORE-001")
def test_bound():
    observe("CR-CORE-001", {requests!r}, {assertions!r})
    assert {ok!r}

@pytest.mark.recovery("CR-CORE-002")
def test_other_scenario():
    raise AssertionError("must be deselected")

def test_unbound():
    raise AssertionError("must be deselected")
"""


def run_adapter(
    tests_dir: Path | None, scenario_id: str, scenario: dict[str, Any]
) -> tuple[int, dict[str, Any], str]:
    env = dict(os.environ)
    env.pop("RUNCYCLES_RECOVERY_OBSERVATIONS", None)
    env.pop("RUNCYCLES_RECOVERY_REPORT", None)
    if tests_dir is not None:
        env["RUNCYCLES_RECOVERY_TESTS"] = str(tests_dir)
    completed = subprocess.run(
        [sys.executable, "-m", "runcycles.testing.recovery_adapter", scenario_id],
        input=json.dumps(scenario),
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, completed.stdout  # exactly one JSON object on stdout
    return completed.returncode, json.loads(lines[0]), completed.stderr


def synthetic_suite(
    tmp_path: Path, *, requests: list[str], assertions: list[str], ok: bool
) -> Path:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    recovery(scenario_id): bound scenario\n"
    )
    (tests / "test_bound.py").write_text(
        BOUND_TEST.format(requests=requests, assertions=assertions, ok=ok)
    )
    return tests


def test_passing_scenario_reports_native_tests_and_observations(tmp_path):
    tests = synthetic_suite(
        tmp_path, requests=SCENARIO["expected_requests"], assertions=SCENARIO["assertions"], ok=True
    )
    code, result, stderr = run_adapter(tests, "CR-CORE-001", SCENARIO)
    assert code == 0
    assert result["scenario_id"] == "CR-CORE-001"
    assert result["passed"] is True
    assert result["native_tests"] == ["tests/test_bound.py::test_bound"]
    assert result["observed_requests"] == ["commit", "commit_same_key"]
    assert sorted(result["assertions"]) == sorted(SCENARIO["assertions"])
    assert "1 passed" in stderr
    assert "diagnostic" not in result


@pytest.mark.slow
def test_real_suite_scenario_end_to_end():
    scenario = {
        "id": "CR-CORE-004",
        "expected_requests": ["commit", "commit_same_key"],
        "assertions": [
            "only_schema_valid_expected_status_is_terminal_success",
            "ambiguous_success_retains_original_idempotency_key",
        ],
    }
    code, result, _ = run_adapter(None, "CR-CORE-004", scenario)
    assert code == 0, result
    assert result["passed"] is True
    assert len(result["native_tests"]) == 8  # 4 faults x (sync, async)
    assert all("test_core_004" in name for name in result["native_tests"])


def test_evidence_report_covers_every_scenario_and_matches_the_schema():
    import jsonschema

    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "runcycles.testing.recovery_adapter",
            "--report",
            str(root / "spec" / "client-recovery-scenarios.yaml"),
            "--claim",
            "durable",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    schema = json.loads((root / "spec" / "client-recovery-report.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    validator.validate(report)
    assert report["summary"] == {"total": 12, "passed": 12, "failed": 0}
    assert all(entry["native_tests"] for entry in report["scenarios"])


# ------------------------------------------------------------------ the per-scenario runner

RUNNER = Path(__file__).resolve().parent / "run_recovery_profile.py"


def run_runner(*args: str, tests_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if tests_dir is not None:
        env["RUNCYCLES_RECOVERY_TESTS"] = str(tests_dir)
    return subprocess.run(
        [sys.executable, str(RUNNER), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("CR-"):
            rows[cells[0]] = cells[1:]
    return rows


def test_runner_passes_every_catalog_scenario_through_the_adapter():
    """What ``nox -s recovery`` runs: each scenario in its own adapter process."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    catalog = yaml.safe_load((root / "spec" / "client-recovery-scenarios.yaml").read_text())
    ids = [scenario["id"] for scenario in catalog["scenarios"]]
    completed = run_runner()
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    rows = table_rows(completed.stdout)
    assert sorted(rows) == sorted(ids)
    assert all(row[1] == "PASS" and int(row[2]) >= 1 for row in rows.values()), rows
    assert f"{len(ids)}/{len(ids)} scenarios passed" in completed.stdout


def test_runner_fails_on_a_failing_or_unbound_scenario(tmp_path):
    tests = synthetic_suite(
        tmp_path, requests=SCENARIO["expected_requests"], assertions=SCENARIO["assertions"], ok=True
    )
    catalog = tmp_path / "scenarios.yaml"
    catalog.write_text(
        "scenarios:\n"
        "  - {id: CR-CORE-001, level: core, name: bound and passing,"
        "     expected_requests: [commit, commit_same_key],"
        "     assertions: [settlement_occurs_at_most_once, retry_uses_original_idempotency_key]}\n"
        "  - {id: CR-CORE-002, level: core, name: bound and failing}\n"
        "  - {id: CR-DURABLE-001, level: durable, name: bound to no test}\n"
    )
    completed = run_runner("--catalog", str(catalog), tests_dir=tests)
    assert completed.returncode == 1, completed.stdout
    rows = table_rows(completed.stdout)
    assert {sid: row[1] for sid, row in rows.items()} == {
        "CR-CORE-001": "PASS",
        "CR-CORE-002": "FAIL",
        "CR-DURABLE-001": "UNBOUND",
    }
    assert "not passed: CR-CORE-002, CR-DURABLE-001" in completed.stdout
    assert "must be deselected" in completed.stderr  # the failing test's output is shown


def test_runner_refuses_a_catalog_it_cannot_run_completely(tmp_path):
    catalog = tmp_path / "scenarios.yaml"
    catalog.write_text("scenarios:\n  - {id: CR-X-001, level: experimental, name: new level}\n")
    completed = run_runner("--catalog", str(catalog))
    assert completed.returncode == 2
    assert "CR-X-001 has level 'experimental'" in completed.stderr
    assert completed.stdout == ""
