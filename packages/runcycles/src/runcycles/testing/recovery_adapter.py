"""Process adapter of the Cycles SDK recovery conformance profile.

``python -m runcycles.testing.recovery_adapter CR-CORE-001`` (scenario JSON on stdin) runs
the native tests marked ``@pytest.mark.recovery("CR-CORE-001")`` in a child pytest and prints
one JSON object (``scenario_id``, ``passed``, ``native_tests``, ``observed_requests``,
``assertions``; the last two come from the tests' :func:`observe` calls). A scenario passes
only when every bound test passed, at least one ran, every observed choreography equals the
catalog's ``expected_requests`` and every catalog assertion was checked. Everything else
goes to stderr. Tests are found in ``$RUNCYCLES_RECOVERY_TESTS``, else in the ``tests``
folder next to the package's ``src`` folder.

``--report spec/client-recovery-scenarios.yaml --claim durable`` runs every claimed scenario
and prints the profile's evidence report. The module is also the pytest plugin the child
loads (``-p``): it deselects unbound tests and writes the outcomes to a report file.
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

__all__ = ["REPORT_SCHEMA_ID", "build_report", "evaluate", "main", "observe", "run_scenario"]

_OBSERVATIONS_ENV: Final = "RUNCYCLES_RECOVERY_OBSERVATIONS"
_TESTS_ENV: Final = "RUNCYCLES_RECOVERY_TESTS"
_REPORT_ENV: Final = "RUNCYCLES_RECOVERY_REPORT"
_ALL: Final = "ALL"
REPORT_SCHEMA_ID: Final = (
    "https://raw.githubusercontent.com/runcycles/cycles-protocol/main/client-recovery/"
    "report.schema.json"
)
_CLAIM_LEVELS: Final = {"core": ("core", "boundary"), "durable": ("core", "durable", "boundary")}


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
    """Keep only the tests bound to the requested scenario (``ALL``: to any scenario)."""
    scenario = config.getoption("--recovery-scenario")
    if not scenario:
        return
    selected: list[Any] = []
    deselected: list[Any] = []
    bindings: list[str] = []
    for item in items:
        bound = sorted({arg for mark in item.iter_markers("recovery") for arg in mark.args})
        if scenario in bound or (scenario == _ALL and bound):
            selected.append(item)
            bindings.append(json.dumps({"nodeid": item.nodeid, "scenarios": bound}))
        else:
            deselected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    path = os.environ.get(_REPORT_ENV)
    if path and bindings:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n".join(bindings) + "\n")


def pytest_runtest_logreport(report: Any) -> None:
    """Append each test's outcome to the report file."""
    path = os.environ.get(_REPORT_ENV)
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


class _Run:
    """What one child pytest run produced."""

    def __init__(self, lines: list[dict[str, Any]], observations: list[dict[str, Any]], rc: int):
        self.outcomes = [line for line in lines if "outcome" in line]
        self.bindings = {line["nodeid"]: line["scenarios"] for line in lines if "scenarios" in line}
        self.observations = observations
        self.returncode = rc

    def outcomes_for(self, scenario_id: str) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if scenario_id in self.bindings.get(o["nodeid"], ())]


def _run_pytest(tests: Path, selector: str) -> _Run:
    with tempfile.TemporaryDirectory(prefix="cycles-recovery-") as tmp:
        report = Path(tmp) / "report.jsonl"
        observations = Path(tmp) / "observations.jsonl"
        env = {**os.environ, _REPORT_ENV: str(report), _OBSERVATIONS_ENV: str(observations)}
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(tests),
            "-p",
            "runcycles.testing.recovery_adapter",
            "--recovery-scenario",
            selector,
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        completed = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False, cwd=tests.parent
        )
        sys.stderr.write(completed.stdout)
        sys.stderr.write(completed.stderr)
        return _Run(_read_lines(report), _read_lines(observations), completed.returncode)


_NO_TESTS: Final = (
    "native tests not found; set RUNCYCLES_RECOVERY_TESTS to the runcycles tests folder"
)


def run_scenario(scenario_id: str, scenario: dict[str, Any]) -> dict[str, Any]:
    """Run the native tests bound to ``scenario_id``; return the adapter's JSON result."""
    tests = _tests_dir()
    if tests is None:
        return {
            "scenario_id": scenario_id,
            "passed": False,
            "native_tests": [],
            "diagnostic": _NO_TESTS,
        }
    run = _run_pytest(tests, scenario_id)
    return evaluate(scenario_id, scenario, run.outcomes, run.observations, run.returncode)


def build_report(
    catalog_path: Path,
    *,
    claim: str = "durable",
    profile_commit: str = "unknown",
    implementation_commit: str | None = None,
) -> dict[str, Any]:
    """Run every scenario of ``claim`` in ONE pytest run; return the evidence report.

    The result follows the profile's ``report.schema.json``. Reading the YAML catalog needs
    ``pyyaml``.

    Args:
        catalog_path: The profile's ``scenarios.yaml``.
        claim: ``core`` (core + boundary scenarios) or ``durable`` (all of them).
        profile_commit: Commit of the profile repository the catalog comes from.
        implementation_commit: Commit of this implementation (default: ``git rev-parse``).

    Raises:
        ValueError: Unknown claim.
        RuntimeError: The native tests were not found.
    """
    import datetime
    import hashlib

    import yaml  # a development dependency, needed only to produce the report

    if claim not in _CLAIM_LEVELS:
        raise ValueError(f"claim must be 'core' or 'durable', got {claim!r}")
    raw = catalog_path.read_bytes()
    catalog = yaml.safe_load(raw)
    scenarios = [s for s in catalog["scenarios"] if s["level"] in _CLAIM_LEVELS[claim]]
    tests = _tests_dir()
    if tests is None:
        raise RuntimeError(_NO_TESTS)
    run = _run_pytest(tests, _ALL)
    entries = []
    for scenario in scenarios:
        sid = scenario["id"]
        result = evaluate(sid, scenario, run.outcomes_for(sid), run.observations, 0)
        if run.returncode not in (0, 1) and result["passed"]:
            result = {**result, "passed": False, "diagnostic": f"pytest exit {run.returncode}"}
        entry = {
            "id": sid,
            "level": scenario["level"],
            "name": scenario["name"],
            "passed": result["passed"],
            "native_tests": result["native_tests"],
        }
        if "diagnostic" in result:
            entry["diagnostic"] = result["diagnostic"]
        entries.append(entry)
    passed = sum(1 for entry in entries if entry["passed"])
    return {
        "$schema": REPORT_SCHEMA_ID,
        "schema_version": "1.0",
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "profile": {
            "name": "cycles-sdk-recovery",
            "version": str(catalog.get("version", "unknown")),
            "commit": profile_commit,
            "catalog_sha256": hashlib.sha256(raw).hexdigest(),
        },
        "claim": claim,
        "implementation": {
            "id": "runcycles-python",
            "commit": implementation_commit or _git_commit(tests),
            "version": runcycles.__version__,
        },
        "summary": {"total": len(entries), "passed": passed, "failed": len(entries) - passed},
        "scenarios": entries,
    }


def _git_commit(where: Path) -> str:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and commit else "unknown"


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
    """Entry point.

    ``SCENARIO_ID`` (last argument, scenario JSON on stdin): the adapter contract, one JSON
    result on stdout. ``--report CATALOG [--claim core|durable] [--profile-commit SHA]``:
    run every claimed scenario and print the evidence report (report.schema.json).
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--report"] and len(args) >= 2:
        options = dict(zip(args[2::2], args[3::2], strict=False))
        report = build_report(
            Path(args[1]),
            claim=options.get("--claim", "durable"),
            profile_commit=options.get("--profile-commit", "unknown"),
        )
        print(json.dumps(report, indent=2))
        return 0 if report["summary"]["failed"] == 0 else 1
    if not args:
        sys.stderr.write(
            "usage: python -m runcycles.testing.recovery_adapter SCENARIO_ID < scenario.json\n"
            "       python -m runcycles.testing.recovery_adapter --report CATALOG "
            "[--claim durable]\n"
        )
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
