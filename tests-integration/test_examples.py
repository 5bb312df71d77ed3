"""Every script in ``examples/`` runs as written and shows what its docstring promises.

Offline, each example starts its own embedded server; with ``CYCLES_*`` set it uses that
server instead, which is checked against both stores for the examples that support it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runcycles_server.testing import ProvisionedTenant

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# What each example must print (beyond exiting 0): the behaviour it exists to show.
EXPECTED = {
    "decorator_quickstart.py": ["stopped before call 7 ran: BUDGET_EXCEEDED", "6 calls ran"],
    "async_fanout.py": ["50 concurrent calls: 20 ran, 30 refused up front", "reserved 0"],
    "multi_tenant.py": [
        "acme/research ran 3 calls",
        "acme     ran 12 calls",
        "globex reading acme's balances -> 403 FORBIDDEN",
        "tenant:acme/workspace:research       12,000     12,000          0",
    ],
    "streaming_chat.py": ["(cancelled)", "(completed)", "spent so far: 900"],
    "basic_budget.py": [
        "stopped before model call 8: BUDGET_EXCEEDED",
        "7 model calls ran, 34,500 µ¢ each",
        "spent 241,500 µ¢ = 7 x 34,500",
    ],
    "tool_governance.py": [
        "email #3 denied before it was sent: BUDGET_EXCEEDED",
        "tools that ran: search_knowledge x3, send_email x2, update_crm x3",
        "risk points: spent 130, left 0",
    ],
    "multi_agent.py": [
        "run 4: billing answered 'Your refund is on its way.'",
        "run 5 refused up front: DENY, 0 model calls",
        "spent 331,200 µ¢, 68,800 left < 150,000",
    ],
    "preflight.py": [
        "big job ($0.05): DENY before it started, 0 model calls",
        "small job ($0.001): ran in shadow mode -> '3 emails sent'",
        "would be DENY  message.email.send send_email",
        "observe mode: ran -> '3 emails sent', 3 would-be denials",
        "charged in all: 0",
    ],
    "anyagent_budget.py": [
        "tinyagent: 'Budgets stop runaway agents.' after 2 model calls and 2 searches",
        "openai: 'Budgets stop runaway agents.' after 2 model calls and 2 searches",
        "runaway agent stopped before model call 13: BUDGET_EXCEEDED",
        "16 model calls at 34,500 µ¢, 16 searches at 10,000",
        "spent 712,000 µ¢, exactly that; 0 held",
    ],
    "langchain_budget.py": [
        "escalate soft-denied: HTTP 409 BUDGET_EXCEEDED",
        "run ended cleanly: 'Stopped: the budget refused the next model call (BUDGET_EXCEEDED).'",
        "7 model calls ran, 34,500 µ¢ each",
        "spent 241,500 µ¢ = 7 x 34,500",
    ],
    "webhook_receiver.py": [
        "-> 200 {'status': 'alert: tenant:acme/workspace:prod at 82% of its USD_MICROCENTS budget"
        " (crossed 80%, rising)'}",
        "-> 200 {'status': 'duplicate, already handled'}",
        "-> 401 {'error': 'delivery signed at t=",
        " s old, outside the tolerance of 300 s: a replayed request",
        "-> 401 {'error': 'X-Cycles-Signature-256 matches none of the 1 secret(s) given",
        "-> 500 {'error': 'handler failed: pager unreachable'}",
        "-> 200 {'status': 'PAGE: tenant:acme/workspace:prod exhausted its USD_MICROCENTS budget",
    ],
    "slack_alerts.py": [
        "slack <- :warning: *tenant:acme* crossed 80% of its budget (82% used)",
        "slack <- :fire: *tenant:acme* crossed 95% of its budget (96% used)",
        "slack <- :rotating_light: *tenant:acme* is out of budget (100% used)",
        "3 alerts posted",
    ],
    "custom_adapter.py": [
        "run-1: 2 steps ran",
        "spent 650,000",
        "run-2 stopped before a step ran over budget: BUDGET_EXCEEDED",
    ],
}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYCLES_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(script: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_example_is_checked():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_offline(script: str):
    out = _run(script, _clean_env())
    for line in EXPECTED[script]:
        assert line in out, out


@pytest.mark.parametrize("script", ["async_fanout.py", "streaming_chat.py"])
def test_example_runs_against_a_configured_server(script: str, server, tenant: ProvisionedTenant):
    env = _clean_env()
    env.update(
        CYCLES_BASE_URL=server.base_url,
        CYCLES_API_KEY=tenant.api_key,
        CYCLES_TENANT=tenant.tenant_id,
    )
    out = _run(script, env)
    assert "embedded Cycles server" not in out  # it used the configured one
    assert "spent" in out


def test_the_adapter_docs_show_the_custom_adapter_example_as_it_is():
    page = (EXAMPLES.parent / "docs" / "adapters.md").read_text()
    source = (EXAMPLES / "custom_adapter.py").read_text()
    assert f"```python\n{source}```" in page
    assert len(source.splitlines()) < 100
