"""Run every client-recovery scenario through the profile's process adapter, one at a time.

This is what the profile's shared runner does with an SDK: for each scenario of the catalog
(``spec/client-recovery-scenarios.yaml``; levels core, durable and boundary) it starts
``python -m runcycles.testing.recovery_adapter SCENARIO_ID`` with the scenario as JSON on
stdin and reads the one JSON result the adapter prints on stdout. It prints a table and
exits with status 1 if any scenario failed, is bound to no native test, or the adapter broke
its contract (not exactly one JSON object on stdout, another ``scenario_id``, an exit status
that contradicts ``passed``).

Usage::

    python tests-integration/run_recovery_profile.py [--catalog PATH] [--jobs N] [--verbose]

``nox -s recovery`` runs it; ``tests-integration/test_recovery_adapter_process.py`` runs it
in the test suite. Each adapter run is its own pytest process (a few seconds); ``--jobs``
runs that many at once (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = ROOT / "spec" / "client-recovery-scenarios.yaml"
LEVELS = ("core", "durable", "boundary")
ADAPTER = "runcycles.testing.recovery_adapter"
TIMEOUT_S = 300.0
STDERR_TAIL = 40  # lines of a failed adapter's stderr shown without --verbose
# Set by the adapter for its own child pytest; an inherited value would redirect its output.
_ADAPTER_PRIVATE_ENV = ("RUNCYCLES_RECOVERY_OBSERVATIONS", "RUNCYCLES_RECOVERY_REPORT")


@dataclass(frozen=True)
class Verdict:
    """How one scenario went through the adapter."""

    scenario_id: str
    level: str
    status: str  # PASS, FAIL, UNBOUND or ERROR
    native_tests: int
    seconds: float
    detail: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == "PASS"


def load_scenarios(catalog: Path) -> list[dict[str, Any]]:
    """Return the catalog's scenarios.

    Raises:
        ValueError: The catalog has no scenarios, or one without an id or a known level.
    """
    data = yaml.safe_load(catalog.read_text(encoding="utf-8"))
    scenarios = data.get("scenarios") if isinstance(data, dict) else None
    if not isinstance(scenarios, list) or not scenarios:
        raise ValueError(f"{catalog}: no scenarios found (expected a 'scenarios' list)")
    for scenario in scenarios:
        if not isinstance(scenario, dict) or not isinstance(scenario.get("id"), str):
            raise ValueError(f"{catalog}: a scenario has no string 'id': {scenario!r}")
        if scenario.get("level") not in LEVELS:
            raise ValueError(
                f"{catalog}: scenario {scenario['id']} has level {scenario.get('level')!r}; "
                f"this runner knows {', '.join(LEVELS)}"
            )
    return scenarios


def _adapter_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in _ADAPTER_PRIVATE_ENV:
        env.pop(name, None)
    return env


def run_one(scenario: dict[str, Any]) -> Verdict:
    """Feed one scenario to the adapter process and judge its answer."""
    sid: str = scenario["id"]
    level: str = scenario["level"]
    started = time.monotonic()
    try:
        completed = subprocess.run(
            [sys.executable, "-m", ADAPTER, sid],
            input=json.dumps(scenario),
            capture_output=True,
            text=True,
            env=_adapter_env(),
            check=False,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return Verdict(sid, level, "ERROR", 0, TIMEOUT_S, f"no answer in {TIMEOUT_S:.0f} s", "")
    seconds = time.monotonic() - started

    def verdict(status: str, detail: str, native: int = 0) -> Verdict:
        return Verdict(sid, level, status, native, seconds, detail, completed.stderr)

    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if len(lines) != 1:
        return verdict("ERROR", f"expected one JSON line on stdout, got {len(lines)}")
    try:
        result = json.loads(lines[0])
    except ValueError as exc:
        return verdict("ERROR", f"stdout is not JSON: {exc}")
    if not isinstance(result, dict) or result.get("scenario_id") != sid:
        return verdict("ERROR", f"answer is not about {sid}: {lines[0][:200]}")
    native = result.get("native_tests")
    count = len(native) if isinstance(native, list) else 0
    passed = result.get("passed")
    if passed is True and completed.returncode != 0:
        return verdict("ERROR", f"passed, but exit status {completed.returncode}", count)
    if passed is not True and completed.returncode == 0:
        return verdict("ERROR", "not passed, but exit status 0", count)
    if count == 0:
        return verdict("UNBOUND", str(result.get("diagnostic", "no native test ran")))
    if passed is not True:
        return verdict("FAIL", str(result.get("diagnostic", "failed")), count)
    return verdict("PASS", "", count)


def format_table(verdicts: list[Verdict]) -> str:
    """Render the verdicts as an aligned text table."""
    rows = [("scenario", "level", "result", "tests", "seconds", "detail")]
    for v in verdicts:
        rows.append(
            (v.scenario_id, v.level, v.status, str(v.native_tests), f"{v.seconds:.1f}", v.detail)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the catalog; return 0 only when every scenario passed with bound native tests."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--jobs", type=int, default=2, help="adapter processes at once")
    parser.add_argument(
        "--verbose", action="store_true", help="print each adapter's stderr (pytest output)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        scenarios = load_scenarios(args.catalog)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"cannot read the scenario catalog: {exc}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        verdicts = list(pool.map(run_one, scenarios))
    for v in verdicts:
        if args.verbose or not v.ok:
            lines = v.stderr.rstrip().splitlines()
            if not args.verbose and len(lines) > STDERR_TAIL:
                note = f"[{len(lines) - STDERR_TAIL} earlier lines; --verbose shows them]"
                lines = [note, *lines[-STDERR_TAIL:]]
            print(f"--- {v.scenario_id}: adapter stderr ---", *lines, sep="\n", file=sys.stderr)
    print(format_table(verdicts))
    failed = [v.scenario_id for v in verdicts if not v.ok]
    print(f"\n{len(verdicts) - len(failed)}/{len(verdicts)} scenarios passed", end="")
    print(f"; not passed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
