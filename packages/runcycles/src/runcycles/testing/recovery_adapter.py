"""Process adapter of the Cycles SDK recovery conformance profile.

Run as ``python -m runcycles.testing.recovery_adapter CR-CORE-001`` with the scenario JSON on
stdin (the shared runner's contract). It runs the native pytest tests bound to that scenario
with ``@pytest.mark.recovery("CR-CORE-001")`` in a child pytest process and prints exactly one
JSON object on stdout::

    {"scenario_id": "CR-CORE-001", "passed": true,
     "native_tests": ["packages/runcycles/tests/test_recovery_core.py::test_lost_commit[sync]"],
     "observed_requests": ["commit", "commit_same_key"],
     "assertions": ["retry_uses_original_idempotency_key", "settlement_occurs_at_most_once"]}

``observed_requests`` and ``assertions`` come from the tests themselves (they call
:func:`observe` with the choreography they saw and the assertions they checked). A scenario
passes only when every bound test passed, at least one ran, every observed choreography equals
the catalog's ``expected_requests``, and every catalog assertion was checked by some test.
Everything else (pytest's output, the reason of a failure) goes to stderr.

Where the tests are: ``$RUNCYCLES_RECOVERY_TESTS`` if set, else the ``tests`` folder next to the
package's ``src`` folder (a source checkout).

The module is also the pytest plugin the child process loads (``-p``): it deselects tests not
bound to the scenario and writes the outcomes to a report file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import runcycles

__all__ = ["evaluate", "main", "observe", "run_scenario"]

_OBSERVATIONS_ENV: Final = "RUNCYCLES_RECOVERY_OBSERVATIONS"
_TESTS_ENV: Final = "RUNCYCLES_RECOVERY_TESTS"


def observe(scenario_id: str, observed_requests: list[str], assertions: list[str]) -> None:
    """Record what a native test saw for a scenario (a no-op outside the adapter).

    Args:
        scenario_id: The scenario the test is bound to.
        observed_requests: The request choreography, in the catalog's vocabulary.
        assertions: The catalog assertions this test checked (and that held).
    """
    path = os.environ.get(_OBSERVATIONS_ENV)
    if not path:
        return
    line = json.dumps(
        {"scenario_id": scenario_id, "requests": observed_requests, "assertions": assertions}
    )
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


# --------------------------------------------------------------------------------------------
# pytest plugin (loaded in the child process with -p runcycles.testing.recovery_adapter)


def pytest_addoption(parser: Any) -> None:
    """Add ``--recovery-scenario`` (outcomes go to ``$RUNCYCLES_RECOVERY_REPORT``)."""
    group = parser.getgroup("cycles recovery")
    group.addoption("--recovery-scenario", default=None, help="run only tests bound to this id")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Keep only the tests whose ``recovery`` marker names the requested scenario."""
    scenario = config.getoption("--recovery-scenario")
    if not scenario:
        return
    selected: list[Any] = []
    deselected: list[Any] = []
    for item in items:
        bound = {arg for mark in item.iter_markers("recovery") for arg in mark.args}
        (selected if scenario in bound else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected


def pytest_runtest_logreport(report: Any) -> None:
    """Append each test's outcome to the report file."""
    path = os.environ.get("RUNCYCLES_RECOVERY_REPORT")
    if not path:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        line = json.dumps({"nodeid": report.nodeid, "outcome": report.outcome})
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


# --------------------------------------------------------------------------------------------
# The adapter


def _tests_dir() -> Path | None:
    override = os.environ.get(_TESTS_ENV)
    if override:
        return Path(override)
    candidate = Path(runcycles.__file__).resolve().parents[2] / "tests"
    return candidate if candidate.is_dir() else None


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def run_scenario(scenario_id: str, scenario: dict[str, Any]) -> dict[str, Any]:
    """Run the native tests bound to ``scenario_id``; return the adapter's JSON result."""
    tests = _tests_dir()
    if tests is None:
        return {
            "scenario_id": scenario_id,
            "passed": False,
            "native_tests": [],
            "diagnostic": "native tests not found; set RUNCYCLES_RECOVERY_TESTS to the "
            "runcycles tests folder",
        }
    with tempfile.TemporaryDirectory(prefix="cycles-recovery-") as tmp:
        report = Path(tmp) / "report.jsonl"
        observations = Path(tmp) / "observations.jsonl"
        env = {
            **os.environ,
            "RUNCYCLES_RECOVERY_REPORT": str(report),
            _OBSERVATIONS_ENV: str(observations),
        }
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(tests),
            "-p",
            "runcycles.testing.recovery_adapter",
            "--recovery-scenario",
            scenario_id,
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        completed = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False, cwd=tests.parent
        )
        sys.stderr.write(completed.stdout)
        sys.stderr.write(completed.stderr)
        outcomes = _read_lines(report)
        seen = _read_lines(observations)
    return evaluate(scenario_id, scenario, outcomes, seen, completed.returncode)


def evaluate(
    scenario_id: str,
    scenario: dict[str, Any],
    outcomes: list[dict[str, Any]],
    observations: list[dict[str, Any]],
    returncode: int,
) -> dict[str, Any]:
    """Turn test outcomes and observations into the adapter's JSON result (pure).

    Args:
        scenario_id: The scenario run.
        scenario: The catalog entry (``expected_requests`` and ``assertions`` are checked).
        outcomes: ``{"nodeid", "outcome"}`` per test phase reported by the child pytest.
        observations: What the tests passed to :func:`observe`.
        returncode: The child pytest's exit status.
    """
    result: dict[str, Any] = {"scenario_id": scenario_id, "passed": False, "native_tests": []}
    result["native_tests"] = sorted({entry["nodeid"] for entry in outcomes})
    failures = [entry["nodeid"] for entry in outcomes if entry["outcome"] != "passed"]
    problems: list[str] = []
    if not outcomes:
        problems.append(f"no native test is bound to {scenario_id} (@pytest.mark.recovery)")
    if failures:
        problems.append(f"failed: {', '.join(failures)}")
    if returncode != 0 and not failures:
        problems.append(f"pytest exited with status {returncode}")
    mine = [entry for entry in observations if entry["scenario_id"] == scenario_id]
    choreographies = {tuple(entry["requests"]) for entry in mine}
    expected = scenario.get("expected_requests")
    if isinstance(expected, list):
        if outcomes and not mine:
            problems.append("no bound test reported its observed requests (observe())")
        wrong = [list(c) for c in choreographies if list(c) != expected]
        if wrong:
            problems.append(f"observed {wrong}, expected {expected}")
    checked = sorted({name for entry in mine for name in entry["assertions"]})
    required = scenario.get("assertions")
    if isinstance(required, list):
        missing = sorted(set(required) - set(checked))
        if missing:
            problems.append(f"assertions not checked by any test: {', '.join(missing)}")
    if choreographies:
        result["observed_requests"] = list(sorted(choreographies)[0])
    result["assertions"] = checked
    result["passed"] = not problems
    if problems:
        result["diagnostic"] = "; ".join(problems)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: scenario id as the last argument, scenario JSON on stdin."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stderr.write("usage: python -m runcycles.testing.recovery_adapter SCENARIO_ID\n")
        print(json.dumps({"scenario_id": "", "passed": False, "native_tests": []}))
        return 2
    scenario_id = args[-1]
    scenario: dict[str, Any] = {}
    if not sys.stdin.isatty():
        raw = sys.stdin.read()
        if raw.strip():
            try:
                loaded = json.loads(raw)
            except ValueError as exc:
                sys.stderr.write(f"scenario JSON on stdin is invalid: {exc}\n")
            else:
                scenario = loaded if isinstance(loaded, dict) else {}
    result = run_scenario(scenario_id, scenario)
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
