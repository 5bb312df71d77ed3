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
