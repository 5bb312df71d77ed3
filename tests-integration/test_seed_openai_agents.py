"""The published runcycles-openai-agents README and integration guide run as written.

The examples are read from the seed documents (``CYCLES_SEEDS_DIR``, default: ``seeds/`` in
the folder beside this repository). Each runs against the test server with the substitutions a
reader makes too: the server URL and API key placeholders (and ``CYCLES_*`` variables) point at
the test server, the tenants ``acme`` and ``acme-corp`` exist with budgets, and a scripted model
stands in for OpenAI's (the SDK's default model provider is replaced; no network, no key).
Examples that continue an earlier one find ``agent`` and ``hooks`` already defined; the public
names of ``runcycles``, ``runcycles_openai_agents`` and ``agents`` are pre-imported.

The guide is a web page saved as text: its code lost its line breaks inside one-line blocks and
its indentation. ``_guide_examples`` restores both (and nothing else): it cuts the prose glued
to the end of each block and re-indents the bodies of ``try:``/``except:`` blocks.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import agents
import pytest
from agents import set_tracing_disabled
from agents.models.multi_provider import MultiProvider

import runcycles
import runcycles_openai_agents
from runcycles_openai_agents.testing import ScriptedModel, reply
from runcycles_server.testing import ProvisionedTenant, ServerProcess, run_example

set_tracing_disabled(True)
README = "runcycles-openai-agents-README.txt"
GUIDE = "guide-openai-agents-integration.txt"


def _seed(name: str) -> str | None:
    env = os.environ.get("CYCLES_SEEDS_DIR")
    folders = [Path(env)] if env else []
    folders += [p / "shared" / "seeds" for p in Path(__file__).resolve().parents]
    for folder in folders:
        if (folder / name).is_file():
            return (folder / name).read_text()
    return None


def _readme_examples() -> list[str]:
    text = _seed(README) or ""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


_PROSE = re.compile(r"(That's it|Or use a|Pre-run guardrail|Error handling|If Runner|See |This )")
_STARTS = ("pythonfrom runcycles", "from agents import", "from runcycles", "hooks = Cycles", "try:")


def _reindent(lines: list[str]) -> str:
    out, depth = [], 0
    for line in lines:
        if re.match(r"(except|finally|else)\b", line):
            depth = 0
        out.append("    " * depth + line)
        if line.endswith(":"):
            depth = 1
    return "\n".join(out) + "\n"


def _guide_examples() -> list[str]:
    examples: list[str] = []
    current: list[str] | None = None
    for line in (_seed(GUIDE) or "").splitlines():
        if current is None and line.startswith(_STARTS) and "pip install" not in line:
            current = []
        if current is None:
            continue
        line = line.removeprefix("python")
        glued = _PROSE.search(line)
        if glued and glued.start() > 0:
            current.append(line[: glued.start()])
            examples.append(_reindent(current))
            current = None
        else:
            current.append(line)
    # The vault example is one line: put its statements back on lines of their own.
    return [
        re.sub(r" (?=from |config = |hooks = )", "\n", e) if e.count("\n") == 1 else e
        for e in examples
    ]


README_EXAMPLES = _readme_examples()
GUIDE_EXAMPLES = _guide_examples()


def test_seed_documents_are_available() -> None:
    if not README_EXAMPLES:
        message = f"seeds {README}, {GUIDE} not found: set CYCLES_SEEDS_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert len(README_EXAMPLES) == 9  # every python block of the README
    assert len(GUIDE_EXAMPLES) == 8  # every code example of the guide
    for example in GUIDE_EXAMPLES:
        ast.parse(example, feature_version=(3, 10))  # valid after only the repairs above


@pytest.fixture(scope="module")
def tenants(server: ServerProcess) -> dict[str, ProvisionedTenant]:
    found = {}
    for name in ("acme", "acme-corp"):
        tenant = found[name] = server.provision(tenant_id=name, budget=10**10)
        tenant.add_budget(10**6, unit="RISK_POINTS")
    return found


def _check(
    source: str,
    server: ServerProcess,
    tenants: dict[str, ProvisionedTenant],
    monkeypatch: pytest.MonkeyPatch,
    *,
    succeeds: bool = True,
) -> dict[str, Any]:
    tenant = tenants["acme-corp" if '"acme-corp"' in source else "acme"]
    source = source.replace("http://localhost:7878", server.base_url)
    source = source.replace('"cyc_live_..."', repr(tenant.api_key))
    monkeypatch.setenv("CYCLES_BASE_URL", server.base_url)
    monkeypatch.setenv("CYCLES_API_KEY", tenant.api_key)
    models: list[ScriptedModel] = []

    def scripted(self: MultiProvider, name: str | None = None) -> ScriptedModel:
        models.append(ScriptedModel([[reply("Budget authority stops spend before it happens.")]]))
        return models[-1]

    monkeypatch.setattr(MultiProvider, "get_model", scripted)
    vault = {"cycles_base_url": server.base_url, "cycles_api_key": tenant.api_key}
    namespace: dict[str, Any] = {
        **{name: getattr(agents, name) for name in agents.__all__},
        **{name: getattr(runcycles, name) for name in runcycles.__all__},
        **{
            name: getattr(runcycles_openai_agents, name) for name in runcycles_openai_agents.__all__
        },
        "__name__": "seed_example",
        "agent": agents.Agent(name="bot", instructions="Answer."),
        "hooks": runcycles_openai_agents.CyclesRunHooks(tenant=tenant.tenant_id),
        "load_from_vault": vault.__getitem__,  # the reader's own secret manager
    }
    run_example(source, namespace, "<seed example>")
    if succeeds and "result = await Runner.run" in source:
        assert namespace["result"].final_output.startswith("Budget authority")
        assert len(models) == 1  # the model ran once, through the hooks
        with tenant.client() as observer:
            balances = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data
        assert all(not b.reserved or b.reserved.amount == 0 for b in balances.balances)
    return namespace


@pytest.mark.parametrize("index", range(len(README_EXAMPLES)), ids=lambda i: f"readme{i + 1}")
def test_readme_example_runs_as_written(index, server, tenants, monkeypatch):
    _check(README_EXAMPLES[index], server, tenants, monkeypatch)


@pytest.mark.parametrize("index", range(len(GUIDE_EXAMPLES)), ids=lambda i: f"guide{i + 1}")
def test_guide_example_runs_as_written(index, server, tenants, monkeypatch):
    _check(GUIDE_EXAMPLES[index], server, tenants, monkeypatch)


def test_a_denial_reaches_the_readme_error_handler(server, tenants, monkeypatch, capsys):
    (handler,) = [e for e in README_EXAMPLES if "except BudgetExceededError" in e]
    broke = {**tenants, "acme": server.provision(tenant_id="acme-broke", budget=1)}
    _check(handler, server, broke, monkeypatch, succeeds=False)  # `hooks` is on the broke tenant
    assert "Budget denied:" in capsys.readouterr().out
