"""The published AnyAgent integration guide runs as written, with runcycles-anyagent.

The examples are read from the seed document (``CYCLES_SEEDS_DIR``, default: ``seeds/`` in the
``shared`` folder beside this repository). The guide's hand-written ``CyclesBudgetCallback``
class is replaced by our package's import (``from runcycles_anyagent import BudgetExceeded,
CyclesBudgetCallback``): its constructor must take the same parameters, in the same order. Every
other example runs against the test server on the ``openai`` and the ``tinyagent`` backend (the
example's framework name replaced by the one under test; on tinyagent, whose Google client needs
Google's SDK, the Gemini model by ``openai:gpt-4o-mini``) with the substitutions a reader makes
too: ``CYCLES_*`` variables point at the test server, the tenant ``acme`` exists with a budget,
a scripted model stands in for OpenAI's (no network, no key) and a scripted ``search_web`` for
the web search. Examples that continue an earlier one find ``client``, ``callback``, ``agent``,
``researcher``, ``writer`` (and the reader's ``cached_research``) already defined. The note's
one-line snippet ``callbacks=[CyclesBudgetCallback(...), ...]`` gets the reader's arguments in
place of ``...``.

The guide is a web page saved as text: its code lost its line breaks inside one-line blocks and
its indentation. ``_guide_examples`` restores both (and nothing else): it cuts the prose glued
to the end of each block and re-indents the bodies of ``try``/``except``/``if``/``for`` blocks.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path
from typing import Any

import any_agent.tools
import pytest
from agents import set_tracing_disabled
from any_agent import AgentConfig, AnyAgent
from any_agent.callbacks import ConsolePrintSpan
from any_agent.frameworks import openai as openai_backend
from any_agent.frameworks.tinyagent import TinyAgent

from runcycles_anyagent import CyclesBudgetCallback
from runcycles_anyagent.testing import ScriptedCompletions, ScriptedModel, Turn, reply, tool_calls
from runcycles_server.testing import ProvisionedTenant, ServerProcess, run_example

set_tracing_disabled(True)
GUIDE = "guide-anyagent-integration.txt"
ANSWER = "Budget authority stops spend before it happens."
BACKENDS = ["openai", "tinyagent"]


def _seed(name: str) -> str | None:
    env = os.environ.get("CYCLES_SEEDS_DIR")
    folders = [Path(env)] if env else []
    folders += [p / "shared" / "seeds" for p in Path(__file__).resolve().parents]
    for folder in folders:
        if (folder / name).is_file():
            return (folder / name).read_text()
    return None


_PROSE = re.compile(
    r"(Every LLM call|Using the callback|With tools|Switching frameworks|No changes to|"
    r"This gives you|Async usage|Error handling|For pipelines|See Degradation|Key points)"
)
_STARTS = (
    "from any_agent",
    "from runcycles",
    "import uuid",
    "# OpenAI Agents",
    "researcher_callback =",
    "agent = await",
    "try:",
    "trace = agent.run(",
)
_CONTINUES = ("except", "else", "elif", "finally")
_OPENS = ("if", "try", "for", "while", "with", "def", "class", "async")


def _reindent(lines: list[str]) -> str:
    """Give back the indentation of compound statements (the text lost all of it)."""
    out: list[str] = []
    depth, opened = 0, list[int]()  # the depths of the open if/try/for... statements
    for line in lines:
        word = (re.match(r"\w+", line) or re.match("", line)).group()  # type: ignore[union-attr]
        if word in _CONTINUES:  # back to the statement it continues
            depth = opened[-1] if opened else 0
        elif word == "try":  # every try of the guide is a statement of its own
            depth, opened = 0, []
        out.append("    " * depth + line)
        if line.rstrip().endswith(":"):
            if word not in _CONTINUES:
                opened = [d for d in opened if d < depth] + [depth]
            depth += 1
    return "\n".join(out) + "\n"


def _guide_examples() -> tuple[list[str], str]:
    """The runnable examples (re-indented) and the text of the hand-written class."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in (_seed(GUIDE) or "").splitlines():
        if "pythonfrom any_agent.callbacks import ConsolePrintSpan" in line:  # the note
            snippet = line[line.index("pythonfrom") + len("python") :]
            blocks.append(snippet.replace(" callbacks=", "\ncallbacks=").splitlines())
            continue
        if current is None and line.startswith(_STARTS):
            current = []
        if current is None:
            continue
        glued = _PROSE.search(line)
        if glued and glued.start() > 0:
            current.append(line[: glued.start()])
            blocks.append(current)
            current = None
        else:
            current.append(line)
    classes = ["\n".join(b) for b in blocks if any(x.startswith("class Cycles") for x in b)]
    runnable = [_reindent(b) for b in blocks if not any(x.startswith("class ") for x in b)]
    return runnable, classes[0] if classes else ""


EXAMPLES, HAND_WRITTEN = _guide_examples()


def test_seed_document_is_available() -> None:
    if not EXAMPLES:
        message = f"seed {GUIDE} not found: set CYCLES_SEEDS_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert len(EXAMPLES) == 11  # every code example of the guide but the hand-written class
    for example in EXAMPLES:
        ast.parse(example, feature_version=(3, 11))  # valid after only the repairs above


def test_our_callback_takes_the_hand_written_class_parameters() -> None:
    if not HAND_WRITTEN:
        pytest.skip(f"seed {GUIDE} not found")
    (params,) = re.findall(r"def __init__\((.*?)\):", HAND_WRITTEN, flags=re.S)
    theirs = ast.parse(f"def f({params}): pass").body[0].args.args  # type: ignore[attr-defined]
    ours = list(inspect.signature(CyclesBudgetCallback).parameters.values())
    assert [a.arg for a in theirs[1:]] == [p.name for p in ours[: len(theirs) - 1]]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ours[: len(theirs) - 1])


class Replies(list[Turn]):
    """The turns the tests script, then the same answer for every further call."""

    def __bool__(self) -> bool:
        return True

    def pop(self, index: Any = -1) -> Turn:
        return super().pop(index) if len(self) else reply(ANSWER, usage=(1_000, 50))


def search_web(query: str) -> str:  # scripted: the real one searches the web
    """Perform a web search based on your query; returns the top search results.

    Args:
        query: The search query to perform.
    """
    SEARCHED.append(query)
    return "[AI safety papers](https://example.org/papers)"


SEARCHED: list[str] = []


@pytest.fixture(scope="module")
def acme(server: ServerProcess) -> ProvisionedTenant:
    return server.provision(tenant_id="acme", budget=10**12)


def _spent_and_reserved(tenant: ProvisionedTenant) -> tuple[int, int]:
    with tenant.client() as observer:
        balances = observer.get_balances(tenant=tenant.tenant_id).raise_for_error().data
    (usd,) = [b for b in balances.balances if b.remaining.unit.value == "USD_MICROCENTS"]
    return (usd.spent.amount if usd.spent else 0), (usd.reserved.amount if usd.reserved else 0)


def _check(
    source: str,
    backend: str,
    tenant: ProvisionedTenant,
    monkeypatch: pytest.MonkeyPatch,
    turns: list[Turn] | None = None,
) -> dict[str, Any]:
    """Run one example on ``backend`` for ``tenant``; return its namespace."""
    source = re.sub(r'(agent_framework=|AnyAgent\.create\()"\w+"', rf'\1"{backend}"', source)
    if backend == "tinyagent":  # its any-llm client for Google needs Google's SDK: not here
        source = source.replace('"google:gemini-2.0-flash"', '"openai:gpt-4o-mini"')
    source = source.replace(
        "CyclesBudgetCallback(...)", 'CyclesBudgetCallback(client=client, tenant="acme")'
    )
    monkeypatch.setenv("CYCLES_BASE_URL", tenant.server.base_url)
    monkeypatch.setenv("CYCLES_API_KEY", tenant.api_key)
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-never-sent")
    script = Replies(turns or [])
    models: list[Any] = []

    def scripted_model(model: str = "gpt-4o", **_: Any) -> ScriptedModel:
        scripted = ScriptedModel([], model)
        scripted.turns = script
        models.append(scripted)
        return scripted

    async def scripted_call(self: TinyAgent, **params: Any) -> Any:
        models.append(ScriptedCompletions([]))
        models[-1].turns = script
        return await models[-1](**params)

    monkeypatch.setattr(openai_backend, "DEFAULT_MODEL_TYPE", scripted_model)
    monkeypatch.setattr(TinyAgent, "call_model", scripted_call)
    monkeypatch.setattr(any_agent.tools, "search_web", search_web)
    SEARCHED.clear()
    client = tenant.client()

    def bot(name: str) -> AnyAgent:
        callback = CyclesBudgetCallback(client=client, tenant=tenant.tenant_id, agent=name)
        config = AgentConfig(model_id="openai:gpt-4o", callbacks=[callback], name=name)
        return AnyAgent.create(backend, config)

    namespace: dict[str, Any] = {
        "__name__": "seed_example",
        "AnyAgent": AnyAgent,  # imported by the reader's earlier examples
        "AgentConfig": AgentConfig,
        "client": client,
        "callback": CyclesBudgetCallback(
            client=client, tenant=tenant.tenant_id, agent="support-bot"
        ),
        "search_web": search_web,
        "agent": bot("support-bot"),
        "researcher": bot("researcher"),
        "writer": bot("writer"),
        "cached_research": {},  # the reader's own cache
    }
    exec("from runcycles_anyagent import BudgetExceeded, CyclesBudgetCallback", namespace)
    before = _spent_and_reserved(tenant)[0]
    try:
        run_example(source, namespace, "<seed example>")
    finally:
        for value in list(namespace.values()):  # the callbacks that made their own client
            for callback in value.config.callbacks if isinstance(value, AnyAgent) else []:
                if isinstance(callback, CyclesBudgetCallback):
                    callback.close()
        for own in {client, namespace["client"]}:  # the examples make their own too
            own.close()
    namespace["spent"], reserved = _spent_and_reserved(tenant)
    namespace["spent"] -= before
    namespace["model_calls"] = sum(len(m.calls) for m in models)
    assert reserved == 0  # whatever ran, nothing is left held
    return namespace


RUNS = re.compile(r"\.run(_async)?\(")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=lambda i: f"example{i + 1}")
def test_guide_example_runs_as_written(index, backend, acme, monkeypatch, capsys) -> None:
    source = EXAMPLES[index]
    turns = None
    if "search_web, visit_webpage" in source:  # "With tools": the model searches once
        turns = [tool_calls(("search_web", {"query": "AI safety"}), usage=(800, 20))]
    namespace = _check(source, backend, acme, monkeypatch, turns)
    if RUNS.search(source):  # it ran an agent: through the callback, charged
        assert namespace["model_calls"] >= 1
        assert namespace["spent"] >= namespace["model_calls"] * (1_000 * 250 + 50 * 1_000)
        out = capsys.readouterr().out
        if "print(trace.final_output)" in source:
            assert ANSWER in out
        elif "report = " in source:  # the pipeline: research, then the report
            assert namespace["research"] == namespace["report"] == ANSWER
        elif "Handle this support ticket" in source:  # the preflight said ALLOW
            assert namespace["decision"] == "ALLOW"
            assert namespace["trace"].final_output == ANSWER
        elif "Process this request" in source:  # error handling: no error here
            assert namespace["trace"].final_output == ANSWER
            assert out == ""
        else:  # post-run cost analysis
            assert "Tokens: input_tokens=1000 output_tokens=50" in out
            assert "Scope: tenant:acme, remaining: {" in out
    if turns:
        assert SEARCHED == ["AI safety"]
        tool = 200_000  # the example's tool_estimate, committed for the one search
        assert namespace["spent"] == tool + 800 * 250 + 20 * 1_000 + 1_000 * 250 + 50 * 1_000
    if "ConsolePrintSpan()" in source:
        kinds = [type(c) for c in namespace["callbacks"]]
        assert kinds == [CyclesBudgetCallback, ConsolePrintSpan]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_denial_reaches_the_guide_error_handlers(backend, server, monkeypatch, capsys) -> None:
    broke = server.provision(tenant_id=f"acme-broke-{backend}", budget=1)
    handlers = [
        e for e in EXAMPLES if "except BudgetExceeded as e" in e or "Budget exhausted." in e
    ]
    assert len(handlers) == 3  # basic agent, async usage, error handling
    for handler in handlers:
        namespace = _check(handler.replace('"acme"', repr(broke.tenant_id)), backend, broke,
                           monkeypatch)  # fmt: skip
        assert namespace["model_calls"] == 0  # stopped before the model was called
    out = capsys.readouterr().out
    assert out.count("Budget exhausted.") == 2
    assert "Budget denied:" in out
    assert "Budget denied: HTTP 409 BUDGET_EXCEEDED" in out
    assert "Partial trace: spans=[" in out  # the AgentCancel kept the trace
    assert "Unexpected error" not in out
