"""runcycles.adapters beyond the contract: twins' parity, keys, outage rules, leaks, options."""

from __future__ import annotations

import gc
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from runcycles import (
    Amount,
    AsyncCyclesAdapter,
    AsyncCyclesClient,
    BudgetExceededError,
    CallPlan,
    Caps,
    CyclesAdapter,
    CyclesConfig,
    CyclesConfigError,
    CyclesProtocolError,
    CyclesTimeoutError,
    CyclesTransportError,
    ForbiddenError,
    InternalServerError,
    MalformedResponseError,
    ModelPrice,
    PendingReservationsWarning,
    Pricer,
    Unit,
    UnknownModelError,
    Usage,
    tool_allowed,
)
from runcycles.adapters import (
    ToolEstimateConfig,
    ToolEstimateMap,
    call_idempotency_key,
    is_outage,
)
from runcycles.testing.fake_server import FakeCyclesServer

PRICER = Pricer(overrides={"m": ModelPrice(1, 2)}, builtin=False)


@pytest.fixture(autouse=True)
def _journal(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path / "journal"))


@pytest.fixture
def adapter(server: FakeCyclesServer) -> Iterator[CyclesAdapter[CallPlan, Any]]:
    with server.client() as client:
        built: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, pricer=PRICER)
        yield built
        built.close()


# ---------------------------------------------------------------------------- the twins


def _public(cls: type) -> set[str]:
    return {n for k in cls.__mro__[:-1] for n in vars(k) if not n.startswith("_")}


def test_twins_have_the_same_names_and_signatures() -> None:
    assert _public(CyclesAdapter) == _public(AsyncCyclesAdapter)
    renamed = {"__enter__": "__aenter__", "__exit__": "__aexit__"}
    io = {"begin", "end", "fail", "end_run", "release_pending", "close", "record_event", *renamed}
    io |= {"check_tool", "wrap"}
    for name in [*_public(CyclesAdapter), "__init__", *renamed]:
        sync, other = (
            getattr(CyclesAdapter, name),
            getattr(AsyncCyclesAdapter, renamed.get(name, name)),
        )
        if isinstance(sync, property) or not callable(sync):
            assert type(sync) is type(other), name
            continue
        expected = str(inspect.signature(sync))
        assert expected == str(inspect.signature(other)).replace(
            "AsyncCyclesClient", "CyclesClient"
        ).replace("Awaitable[R]", "R")  # what wrap()'s proceed returns, awaited
        assert inspect.iscoroutinefunction(other) is (name in io), name
        assert not inspect.iscoroutinefunction(sync), name


# ---------------------------------------------------------------------------- pure rules


def test_idempotency_keys_are_deterministic_distinct_and_fit_the_spec() -> None:
    key = call_idempotency_key("langchain", "run-1", "call-1")
    assert key == call_idempotency_key("langchain", "run-1", "call-1")
    others = {
        call_idempotency_key("langchain", "run-1", "call-2"),
        call_idempotency_key("langchain", "run-2", "call-1"),
        call_idempotency_key("openai", "run-1", "call-1"),
        call_idempotency_key("langchain", "run-1", "call-1", "dry_run"),
        call_idempotency_key("langchain", "run-1", "call-1", namespace="prod"),
        call_idempotency_key("langchain", "run-1\x1fcall-1", ""),
    }
    assert key not in others
    assert len(others) == 6
    weird = call_idempotency_key("fw with spaces/é" * 20, "r" * 5000, ("tuple", 1))
    assert len(weird) <= 256
    assert weird.isascii()


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (CyclesTransportError("refused"), True),
        (CyclesTimeoutError("slow"), True),
        (InternalServerError("x", status=500, error_code="INTERNAL_ERROR"), True),
        (CyclesProtocolError("bad gateway", status=502), True),
        (MalformedResponseError("not json", status=200), True),
        (BudgetExceededError("no", status=409, error_code="BUDGET_EXCEEDED"), False),
        (CyclesProtocolError("denied", status=200, reason_code="BUDGET_FROZEN"), False),
        (ForbiddenError("no", status=403, error_code="FORBIDDEN"), False),
        (CyclesProtocolError("throttled", status=429, error_code="LIMIT_EXCEEDED"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_an_unreachable_server_is_an_outage(error: BaseException, outage: bool) -> None:
    assert is_outage(error) is outage


def test_tool_caps_follow_the_spec_precedence() -> None:
    assert tool_allowed(None, "x")
    assert not tool_allowed(Caps(tool_allowlist=["a"], tool_denylist=["x"]), "x")
    assert tool_allowed(Caps(tool_allowlist=["x"], tool_denylist=["x"]), "x")
    assert not tool_allowed(Caps(tool_denylist=["x"]), "x")
    assert tool_allowed(Caps(tool_denylist=["x"]), "X")


def test_a_dry_run_records_tool_caps_and_never_blocks(server: FakeCyclesServer) -> None:
    server.caps = {"tool_denylist": ["shell"]}
    with server.client() as client:
        live: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client)
        shadow: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, dry_run=True)
        for adapter, allowed in ((live, False), (shadow, True)):
            call = adapter.begin("r", "c", CallPlan.tool("shell", estimate=1))
            assert call.caps is not None
            assert call.caps.tool_denylist == ["shell"]
            assert call.allows_tool() is call.allows_tool("shell") is allowed
            assert call.allows_tool("search")
            adapter.end("r", "c")


# ---------------------------------------------------------------------------- estimates


def test_estimates_come_from_the_plan_the_pricer_or_the_options(server: FakeCyclesServer) -> None:
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(
            client,
            pricer=PRICER,
            tool_estimates={"search": 7},
            default_tool_estimate=3,
            llm_estimate=11,
        )
        assert adapter.begin("r", 1, CallPlan("k", "n", estimate=5)).estimate.amount == 5  # type: ignore[union-attr]
        # 1000 prompt tokens at $1/Mtok + 10 output tokens at $2/Mtok = 102,000 microcents
        priced = adapter.begin("r", 2, CallPlan.llm("m", max_tokens=10, prompt_tokens=1000))
        assert priced.estimate is not None
        assert priced.estimate.amount == 102_000
        assert adapter.begin("r", 3, CallPlan.tool("search")).estimate.amount == 7  # type: ignore[union-attr]
        assert adapter.begin("r", 4, CallPlan.tool("other")).estimate.amount == 3  # type: ignore[union-attr]
        assert adapter.begin("r", 5, CallPlan("llm.completion", "?")).estimate.amount == 11  # type: ignore[union-attr]
        with pytest.raises(UnknownModelError):  # policy "error": no silent fallback
            adapter.begin("r", 6, CallPlan.llm("unknown"))
        assert adapter.end_run("r") == 5
        assert adapter.pending == []


def test_an_unknown_model_falls_back_to_llm_estimate_under_policy_estimate(
    server: FakeCyclesServer,
) -> None:
    pricer = Pricer(builtin=False, unknown_model="estimate")
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, pricer=pricer, llm_estimate=9)
        call = adapter.begin("r", 1, CallPlan.llm("unknown"))
        assert call.estimate is not None
        assert call.estimate.amount == 9
        ended = adapter.end("r", 1, Usage(input_tokens=3))  # cost() -> None: the estimate
        assert ended is not None
        assert ended.outcome == "committed"
        assert server.posts("/commit")[0]["metadata"] == {"actual_source": "estimate"}


def test_a_plan_without_any_estimate_is_a_config_error(
    adapter: CyclesAdapter[CallPlan, Any], server: FakeCyclesServer
) -> None:
    with pytest.raises(CyclesConfigError, match="default_tool_estimate"):
        adapter.begin("r", 1, CallPlan.tool("search"))
    assert adapter.pending == []
    assert server.calls == []


def test_unknown_options_are_refused(server: FakeCyclesServer) -> None:
    with server.client() as client, pytest.raises(TypeError, match="fail_opne"):
        CyclesAdapter(client, fail_opne=True)  # type: ignore[call-arg]
    with server.client() as client, pytest.raises(ValueError, match="on_unknown_actual"):
        CyclesAdapter(client, on_unknown_actual="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- subject


def test_subject_defaults_come_from_the_config_and_calls_override_agent_and_toolset(
    server: FakeCyclesServer,
) -> None:
    with server.client(workspace="ws") as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(
            client, app="bot", agent="planner", dimensions={"env": "test"}
        )
        adapter.begin("r", 1, CallPlan("k", "n", estimate=1))
        adapter.begin("r", 2, CallPlan("k", "n", estimate=1, agent="coder", toolset="shell"))
        adapter.end_run("r")
    first, second = (c.body["subject"] for c in server.calls if c.path == "/v1/reservations")
    assert first == {
        "tenant": "acme",
        "workspace": "ws",
        "app": "bot",
        "agent": "planner",
        "dimensions": {"env": "test"},
    }
    assert second["agent"] == "coder"
    assert second["toolset"] == "shell"


def test_the_resolved_subject_and_the_pricer_are_public(server: FakeCyclesServer) -> None:
    pricer = Pricer(builtin=False)
    with server.client(workspace="ws") as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, app="bot", pricer=pricer)
    assert adapter.subject == {"tenant": "acme", "workspace": "ws", "app": "bot"}
    adapter.subject["app"] = "changed"  # a copy: the adapter's own stays
    assert adapter.subject["app"] == "bot"
    assert adapter.pricer is pricer


# ---------------------------------------------------------------------------- bookkeeping


def test_unknown_keys_are_logged_once_and_a_second_end_is_silent(
    adapter: CyclesAdapter[CallPlan, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="runcycles.adapters"):
        adapter.begin("r", "c", CallPlan("k", "n", estimate=1))
        assert adapter.end("r", "c") is not None
        assert adapter.end("r", "c") is None
        adapter.fail("r", "c")
        for n in range(3):
            assert adapter.end("r", f"never-{n}") is None
            adapter.fail("r", f"never-{n}")
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == [
        "end() for call r/never-0 that was never begun; ignored (further ones are logged at DEBUG)"
    ]


def test_begin_twice_reserves_once(
    adapter: CyclesAdapter[CallPlan, Any], server: FakeCyclesServer
) -> None:
    first = adapter.begin("r", "c", CallPlan("k", "n", estimate=1))
    assert adapter.begin("r", "c", CallPlan("k", "n", estimate=1)) is first
    assert len(server.posts("/v1/reservations")) == 1
    adapter.end("r", "c")


def test_a_plan_of_none_is_not_metered(server: FakeCyclesServer) -> None:
    class Skipping(CyclesAdapter[str, Any]):
        def plan(self, event: str) -> CallPlan | None:
            return None

    with server.client() as client:
        adapter = Skipping(client)
        call = adapter.begin("r", "c", "anything")
        assert call.mode == "untracked"
        assert adapter.end("r", "c") is call
    assert server.calls == []


def test_an_adapter_collected_with_open_reservations_warns_and_abandons(
    server: FakeCyclesServer,
) -> None:
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client)
        call = adapter.begin("r", "c", CallPlan("k", "n", estimate=1))
        guard = call.guard
        del call

        def collect() -> None:
            nonlocal adapter
            del adapter
            gc.collect()

        with pytest.warns(PendingReservationsWarning, match="end_run"):
            collect()
        assert guard is not None
        assert guard.is_finalized
    assert server.posts("/release") == []  # abandoned: it expires at the end of its lease


def test_close_releases_what_is_open(
    server: FakeCyclesServer, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        server.client() as client,
        caplog.at_level(logging.WARNING, logger="runcycles.adapters"),
        CyclesAdapter[CallPlan, Any](client) as adapter,
    ):
        adapter.begin("r1", "c", CallPlan("k", "n", estimate=1))
        adapter.begin("r2", "c", CallPlan("k", "n", estimate=1))
    assert "closed with 2 open reservation(s)" in caplog.text
    assert server.statuses() == ["RELEASED", "RELEASED"]
    assert [b["reason"] for b in server.posts("/release")] == ["adapter_closed"] * 2


async def test_async_release_pending_and_end_run(server: FakeCyclesServer) -> None:
    async with server.async_client() as client:
        adapter: AsyncCyclesAdapter[CallPlan, Any] = AsyncCyclesAdapter(client)
        for run in ("a", "a", "b"):
            await adapter.begin(run, len(adapter.pending), CallPlan("k", "n", estimate=1))
        assert await adapter.end_run("a") == 2
        assert await adapter.release_pending() == 1
        await adapter.close()
    assert server.statuses() == ["RELEASED"] * 3


def test_a_server_error_is_an_outage_for_fail_open(server: FakeCyclesServer) -> None:
    server.server_error = True
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, fail_open=True)
        assert adapter.begin("r", "c", CallPlan("k", "n", estimate=1)).mode == "unguarded"
        adapter.close()


def test_the_fake_server_replays_and_refuses_changed_payloads(server: FakeCyclesServer) -> None:
    body = {
        "idempotency_key": "k1",
        "subject": {"tenant": "acme"},
        "action": {"kind": "k", "name": "n"},
    }
    body["estimate"] = {"unit": "USD_MICROCENTS", "amount": 5}
    request = httpx.Request("POST", "http://cycles.fake/v1/reservations", json=body)
    first = server.handle(request).json()
    assert server.handle(request).json() == first
    body["estimate"] = {"unit": "USD_MICROCENTS", "amount": 6}
    changed = httpx.Request("POST", "http://cycles.fake/v1/reservations", json=body)
    assert server.handle(changed).status_code == 409
    assert server.reserved() == 5


# ---------------------------------------------------------------------------- tool plans, events


def test_tool_plans_come_from_a_tool_estimate_map_or_the_dict(server: FakeCyclesServer) -> None:
    tools = ToolEstimateMap(
        {"send_email": 50, "search": 0, "pay": ToolEstimateConfig(7, "payment.charge", "TOKENS")},
        default_estimate=2,
    )
    with server.client() as client:
        mapped: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, tool_estimates=tools)
        plain: CyclesAdapter[CallPlan, Any] = CyclesAdapter(
            client, tool_estimates={"search": 0, "crm": 3}, default_tool_estimate=1
        )
    assert mapped.tool_plan("search") is None  # a zero estimate: not metered at all
    assert plain.tool_plan("search") is None
    email = mapped.tool_plan("send_email", agent="support")
    assert email == CallPlan.tool("send_email", estimate=50, unit=Unit.RISK_POINTS, agent="support")
    pay = mapped.tool_plan("pay")
    assert pay is not None
    assert (pay.kind, pay.estimate, pay.unit) == ("payment.charge", 7, "TOKENS")
    other = mapped.tool_plan("other", toolset="misc")
    assert other is not None
    assert (other.estimate, other.toolset) == (2, "misc")
    assert plain.tool_plan("crm") == CallPlan.tool("crm", estimate=3)
    assert plain.tool_plan("other") == CallPlan.tool("other", estimate=1)
    with pytest.raises(TypeError, match="must be an int"):
        ToolEstimateMap({"bad": 1.5}).lookup("bad")  # type: ignore[dict-item]


def test_a_plan_with_a_model_in_another_unit_is_not_priced_in_dollars(
    server: FakeCyclesServer,
) -> None:
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(
            client, pricer=PRICER, unit="TOKENS", llm_estimate=4_000
        )
        call = adapter.begin("r", 1, CallPlan.llm("m", max_tokens=10))
        assert call.estimate == Amount(unit=Unit.TOKENS, amount=4_000)
        adapter.end_run("r")


def test_record_event_sends_a_zero_amount_event_with_a_stable_key(
    server: FakeCyclesServer,
) -> None:
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, tenant="acme", agent="a")
        assert adapter.record_event("run-1", "a->b", kind="agent.handoff", agent="triage")
        assert adapter.record_event("run-1", "b->c", kind="agent.handoff")
        adapter.end_run("run-1")
        again: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, tenant="acme", agent="a")
        assert again.record_event("run-1", "a->b", kind="agent.handoff", agent="triage")
        shadow: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, dry_run=True)
        assert not shadow.record_event("run-1", "x", kind="agent.handoff")
    first, second, retried = server.posts("/events")
    assert first["subject"] == {"tenant": "acme", "agent": "triage"}
    assert second["subject"] == {"tenant": "acme", "agent": "a"}
    assert first["action"] == {"kind": "agent.handoff", "name": "a->b"}
    assert first["actual"] == {"unit": "USD_MICROCENTS", "amount": 0}
    assert first["metadata"] == {"framework": "custom", "run_id": "run-1"}
    assert first["idempotency_key"] != second["idempotency_key"]
    assert retried["idempotency_key"] == first["idempotency_key"]  # a rerun is not doubled


async def test_record_event_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    config = CyclesConfig(base_url="http://cycles.test", api_key="k", tenant="acme")
    async with AsyncCyclesClient(
        config, http_client=httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    ) as client:
        adapter: AsyncCyclesAdapter[CallPlan, Any] = AsyncCyclesAdapter(client)
        with caplog.at_level(logging.WARNING, "runcycles.adapters"):
            assert not await adapter.record_event("r", "a->b", kind="agent.handoff")
    assert "agent.handoff 'a->b' not recorded" in caplog.text


def test_an_adapter_closes_only_the_client_it_built(
    server: FakeCyclesServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[object] = []
    with server.client() as client:
        monkeypatch.setattr(client, "close", lambda: closed.append(client))
        CyclesAdapter[CallPlan, Any](client).close()
        assert closed == []  # the caller's client is the caller's to close
    closed.clear()
    monkeypatch.setenv("CYCLES_BASE_URL", "http://cycles.test")
    monkeypatch.setenv("CYCLES_API_KEY", "k")
    monkeypatch.setenv("CYCLES_TENANT", "from-env")
    built: CyclesAdapter[CallPlan, Any] = CyclesAdapter(agent="a")
    assert built.subject == {"tenant": "from-env", "agent": "a"}
    original = built.client.close

    def close() -> None:
        closed.append(built.client)
        original()

    monkeypatch.setattr(built.client, "close", close)
    built.close()
    assert closed == [built.client]
    config = CyclesConfig(base_url="http://cycles.test", api_key="k", tenant="cfg")
    with pytest.raises(TypeError, match="fail_opne"):  # checked before a client is built
        CyclesAdapter(config=config, fail_opne=True)  # type: ignore[call-arg]


async def test_an_async_adapter_closes_only_the_client_it_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = CyclesConfig(base_url="http://cycles.test", api_key="k", tenant="cfg")
    closed: list[object] = []
    async with AsyncCyclesAdapter[CallPlan, Any](config=config) as adapter:
        assert adapter.subject == {"tenant": "cfg"}
        original = adapter.client.aclose

        async def aclose() -> None:
            closed.append(adapter.client)
            await original()

        monkeypatch.setattr(adapter.client, "aclose", aclose)
    assert closed == [adapter.client]
