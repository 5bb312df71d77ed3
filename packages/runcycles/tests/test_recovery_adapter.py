"""The recovery-profile process adapter (python -m runcycles.testing.recovery_adapter)."""

from __future__ import annotations

from typing import Any

from runcycles.testing.recovery_adapter import evaluate

SCENARIO: dict[str, Any] = {
    "id": "CR-CORE-001",
    "level": "core",
    "name": "lost commit response reuses the same key",
    "expected_requests": ["commit", "commit_same_key"],
    "assertions": ["settlement_occurs_at_most_once", "retry_uses_original_idempotency_key"],
}

# --------------------------------------------------------------------------- evaluation (pure)

GOOD_OBSERVATION = {
    "scenario_id": "CR-CORE-001",
    "requests": ["commit", "commit_same_key"],
    "assertions": list(SCENARIO["assertions"]),
}
PASSED = [{"nodeid": "t.py::test_a", "outcome": "passed"}]


def test_evaluate_passes_when_everything_matches():
    result = evaluate("CR-CORE-001", SCENARIO, PASSED, [GOOD_OBSERVATION], 0)
    assert result["passed"] is True
    assert result["native_tests"] == ["t.py::test_a"]


def test_evaluate_fails_on_a_failed_test():
    outcomes = [*PASSED, {"nodeid": "t.py::test_b", "outcome": "failed"}]
    result = evaluate("CR-CORE-001", SCENARIO, outcomes, [GOOD_OBSERVATION], 1)
    assert result["passed"] is False
    assert "failed: t.py::test_b" in result["diagnostic"]


def test_evaluate_fails_on_wrong_choreography_and_unchecked_assertions():
    bad = {
        **GOOD_OBSERVATION,
        "requests": ["commit"],
        "assertions": ["settlement_occurs_at_most_once"],
    }
    result = evaluate("CR-CORE-001", SCENARIO, PASSED, [bad], 0)
    assert result["passed"] is False
    assert "expected ['commit', 'commit_same_key']" in result["diagnostic"]
    assert "retry_uses_original_idempotency_key" in result["diagnostic"]


def test_evaluate_fails_without_bound_tests_or_observations():
    unbound = evaluate("CR-DURABLE-009", {"expected_requests": []}, [], [], 5)
    assert unbound["passed"] is False
    assert "no native test" in unbound["diagnostic"]
    silent = evaluate("CR-CORE-001", SCENARIO, PASSED, [], 0)
    assert silent["passed"] is False
    assert "observe()" in silent["diagnostic"]


def test_evaluate_ignores_other_scenarios_observations():
    other = {**GOOD_OBSERVATION, "scenario_id": "CR-CORE-002", "requests": ["x"]}
    result = evaluate("CR-CORE-001", SCENARIO, PASSED, [GOOD_OBSERVATION, other], 0)
    assert result["passed"] is True
