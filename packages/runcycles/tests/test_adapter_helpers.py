"""What framework packages share through runcycles.adapters: tool refusal, wrap(), denials,
recast(), MaxTokensLowering, RunIds and a plan's fallback estimate."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from runcycles import (
    AsyncCyclesAdapter,
    BudgetExceededError,
    CallPlan,
    CyclesAdapter,
    CyclesConfigError,
    CyclesTransportError,
    ForbiddenError,
    ModelPrice,
    Pricer,
    Unit,
    UnknownModelError,
    Usage,
)
from runcycles.adapters import (
    MaxTokensLowering,
    RunIds,
    ToolNotAllowedError,
    client_config,
    is_denial,
    recast,
)
from runcycles.testing.fake_server import FakeCyclesServer

PRICER = Pricer(overrides={"m": ModelPrice(1, 2)}, builtin=False)


class FrameworkStop(Exception):
    """A framework's own exception type (as AgentsException or AgentCancel are)."""


class FrameworkToolStop(ToolNotAllowedError, FrameworkStop):
    """A framework package's tool_error."""


class FrameworkAdapter(CyclesAdapter[CallPlan, Any]):
    tool_error = FrameworkToolStop


@pytest.fixture
def adapter(server: FakeCyclesServer) -> Iterator[FrameworkAdapter]:
    with server.client() as client, FrameworkAdapter(client, pricer=PRICER) as built:
        yield built


# ---------------------------------------------------------------------- denials, recast


@pytest.mark.parametrize(
    ("error", "denial"),
    [
        (BudgetExceededError("no", status=409, error_code="BUDGET_EXCEEDED"), True),
        (ToolNotAllowedError("shell"), True),
        (CyclesTransportError("refused"), False),
        (ForbiddenError("no", status=403, error_code="FORBIDDEN"), False),
        (ValueError("a bug"), False),
    ],
)
def test_a_denial_is_the_budget_saying_no(error: BaseException, denial: bool) -> None:
    assert is_denial(error) is denial


def test_a_refused_tool_names_itself_and_what_to_do() -> None:
    error = ToolNotAllowedError("send_email")
    assert error.tool == "send_email"
    assert "'send_email' is not allowed" in str(error)
    assert "Change the budget's caps" in str(error)


def test_recast_keeps_the_error_and_adds_the_framework_type() -> None:
    first = BudgetExceededError("no", status=409, error_code="BUDGET_EXCEEDED")
    second = BudgetExceededError("again", status=409, error_code="BUDGET_EXCEEDED")
    assert recast(first, FrameworkStop, run_data=None) is first
    recast(second, FrameworkStop)
    assert isinstance(first, BudgetExceededError)
    assert isinstance(first, FrameworkStop)
    assert type(first) is type(second)  # one twin per pair of classes
    assert type(first).__name__ == "BudgetExceededError"
    assert first.error_code == "BUDGET_EXCEEDED"
    assert first.run_data is None  # type: ignore[attr-defined]
    assert not hasattr(second, "run_data")


def test_recast_uses_a_framework_subclass_of_the_error_itself() -> None:
    class Exceeded(BudgetExceededError, FrameworkStop):
        pass

    error = BudgetExceededError("no", status=409)
    error.trace = "kept"  # type: ignore[attr-defined]
    recast(error, Exceeded, trace=None)
    assert type(error) is Exceeded
    assert error.trace == "kept"  # type: ignore[attr-defined]  # defaults never overwrite


# --------------------------------------------------------------------------- check_tool


def test_check_tool_releases_and_raises_the_adapters_tool_error(
    server: FakeCyclesServer,
) -> None:
    server.caps = {"tool_denylist": ["shell"]}
    with server.client() as client:
        adapter = FrameworkAdapter(client)
        call = adapter.begin("r", "c1", CallPlan.tool("search", estimate=3))
        assert adapter.check_tool(call, "search") is call
        adapter.end("r", "c1")
        forbidden = adapter.begin("r", "c2", CallPlan.tool("shell", estimate=3))
        with pytest.raises(FrameworkToolStop, match="shell") as raised:
            adapter.check_tool(forbidden, "shell")
        assert isinstance(raised.value, FrameworkStop)
        assert adapter.pending == []
        adapter.close()
    assert server.reserved() == 0
    assert len(server.posts("/release")) == 1


def test_check_tool_obeys_the_caps_of_the_call_under_it(server: FakeCyclesServer) -> None:
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client)
        server.caps = {"tool_allowlist": ["search"]}
        model_call = adapter.begin("r", "llm", CallPlan("llm.completion", "m", estimate=1))
        server.caps = None
        tool = adapter.begin("r", "t", CallPlan.tool("shell", estimate=1))  # no caps of its own
        with pytest.raises(ToolNotAllowedError, match="shell"):
            adapter.check_tool(tool, "shell", under=model_call)
        assert [call.call_id for call in adapter.pending] == ["llm"]
        adapter.close()


def test_a_dry_run_never_forbids_a_tool(server: FakeCyclesServer) -> None:
    server.caps = {"tool_denylist": ["shell"]}
    with server.client() as client:
        adapter: CyclesAdapter[CallPlan, Any] = CyclesAdapter(client, dry_run=True)
        call = adapter.begin("r", "c", CallPlan.tool("shell", estimate=3))
        assert adapter.check_tool(call, "shell") is call
        adapter.close()


async def test_async_check_tool(server: FakeCyclesServer) -> None:
    server.caps = {"tool_denylist": ["shell"]}
    async with server.async_client() as client:
        adapter: AsyncCyclesAdapter[CallPlan, Any] = AsyncCyclesAdapter(client)
        call = await adapter.begin("r", "c", CallPlan.tool("shell", estimate=3))
        with pytest.raises(ToolNotAllowedError):
            await adapter.check_tool(call, "shell")
        assert adapter.pending == []
        await adapter.close()
    assert server.reserved() == 0


# -------------------------------------------------------------------------------- wrap


def test_wrap_commits_a_model_calls_usage(
    adapter: FrameworkAdapter, server: FakeCyclesServer
) -> None:
    seen: list[Any] = []

    def proceed(call: Any) -> Usage:
        seen.append(call.mode)
        return Usage(input_tokens=1_000, output_tokens=10)

    used = adapter.wrap("r", "c", CallPlan.llm("m", max_tokens=10), proceed)
    assert used == Usage(input_tokens=1_000, output_tokens=10)
    assert seen == ["live"]
    (commit,) = server.posts("/commit")
    assert commit["actual"] == {"unit": "USD_MICROCENTS", "amount": 102_000}
    assert adapter.pending == []


def test_wrap_commits_a_tools_estimate_not_its_result(
    adapter: FrameworkAdapter, server: FakeCyclesServer
) -> None:
    plan = CallPlan.tool("search", estimate=7)
    assert adapter.wrap("r", "c", plan, lambda _: 5, tool="search") == 5
    assert server.posts("/commit")[0]["actual"]["amount"] == 7


def test_wrap_releases_when_the_call_fails(
    adapter: FrameworkAdapter, server: FakeCyclesServer
) -> None:
    def boom(_: Any) -> None:
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError, match="model down"):
        adapter.wrap("r", "c", CallPlan("k", "n", estimate=3), boom)
    assert server.statuses() == ["RELEASED"]
    assert adapter.pending == []


def test_wrap_returns_denied_for_a_denial_before_the_call(
    adapter: FrameworkAdapter, server: FakeCyclesServer
) -> None:
    server.budget = 0
    ran: list[Any] = []
    answer = adapter.wrap(
        "r", "c", CallPlan("k", "n", estimate=3), ran.append, denied=lambda e: type(e).__name__
    )
    assert answer == "BudgetExceededError"
    assert ran == []
    with pytest.raises(BudgetExceededError):
        adapter.wrap("r", "c2", CallPlan("k", "n", estimate=3), ran.append)


def test_wrap_returns_denied_for_a_forbidden_tool(
    adapter: FrameworkAdapter, server: FakeCyclesServer
) -> None:
    server.caps = {"tool_denylist": ["shell"]}
    ran: list[Any] = []

    def proceed(call: Any) -> str:
        ran.append(call)
        return "ran"

    answer = adapter.wrap(
        "r", "c", CallPlan.tool("shell", estimate=3), proceed, tool="shell", denied=str
    )
    assert "'shell' is not allowed" in answer
    assert ran == []
    assert server.reserved() == 0


def test_a_denial_raised_by_the_call_itself_is_not_a_refusal(
    adapter: FrameworkAdapter, server: FakeCyclesServer
) -> None:
    def nested(_: Any) -> None:  # e.g. a sub-agent with a budget of its own
        raise BudgetExceededError("inner", status=409, error_code="BUDGET_EXCEEDED")

    with pytest.raises(BudgetExceededError, match="inner"):
        adapter.wrap("r", "c", CallPlan("k", "n", estimate=3), nested, denied=str)
    assert server.statuses() == ["RELEASED"]


async def test_async_wrap(server: FakeCyclesServer) -> None:
    async def proceed(call: Any) -> Usage:
        return Usage(input_tokens=1_000, output_tokens=10)

    async def boom(call: Any) -> None:
        raise RuntimeError("down")

    async with server.async_client() as client:
        adapter: AsyncCyclesAdapter[CallPlan, Any] = AsyncCyclesAdapter(client, pricer=PRICER)
        await adapter.wrap("r", "c1", CallPlan.llm("m", max_tokens=10), proceed)
        with pytest.raises(RuntimeError):
            await adapter.wrap("r", "c2", CallPlan("k", "n", estimate=3), boom)
        server.budget = 0
        plan = CallPlan("k", "n", estimate=3)
        denied = await adapter.wrap("r", "c3", plan, boom, denied=lambda e: type(e).__name__)
        assert denied == "BudgetExceededError"
        await adapter.close()
    assert server.statuses() == ["COMMITTED", "RELEASED"]


# ------------------------------------------------------------------ fallback estimate


def test_a_plans_fallback_covers_what_the_pricer_cannot_estimate(
    adapter: FrameworkAdapter,
) -> None:
    def held(plan: CallPlan) -> int:
        call = adapter.begin("r", len(adapter.pending), plan)
        assert call.estimate is not None
        return call.estimate.amount

    assert (
        held(CallPlan.llm("m", max_tokens=10, prompt_tokens=1000, fallback_estimate=5)) == 102_000
    )
    assert held(CallPlan.llm("unknown", fallback_estimate=5)) == 5  # even under policy "error"
    assert held(CallPlan("llm.completion", "default", fallback_estimate=6)) == 6  # no model
    assert held(CallPlan.llm("m", unit=Unit.TOKENS, fallback_estimate=7)) == 7  # not priced
    assert held(CallPlan.llm("m", estimate=8, fallback_estimate=9)) == 8
    with pytest.raises(UnknownModelError):
        adapter.begin("r", "strict", CallPlan.llm("unknown"))


# -------------------------------------------------------------------- MaxTokensLowering


def test_lowering_gives_a_shared_object_back_after_the_last_run() -> None:
    settings, lowering = SimpleNamespace(max_tokens=500), MaxTokensLowering()
    lowering.lower("a", settings, 64)
    lowering.lower("a", settings, 64)  # a repeated callback counts once
    lowering.lower("b", settings, 100)  # a higher cap keeps the lower value
    assert settings.max_tokens == 64
    lowering.restore("a")
    assert settings.max_tokens == 64  # run b still relies on it
    lowering.restore("b")
    assert settings.max_tokens == 500
    lowering.restore("b")  # nothing left: a no-op
    assert settings.max_tokens == 500


def test_lowering_restores_every_run_and_unset_values() -> None:
    first, second = SimpleNamespace(max_tokens=None), SimpleNamespace(max_tokens=900)
    lowering = MaxTokensLowering()
    lowering.lower("a", first, 64)
    lowering.lower("b", second, 32)
    assert (first.max_tokens, second.max_tokens) == (64, 32)
    lowering.restore()
    assert (first.max_tokens, second.max_tokens) == (None, 900)


# ------------------------------------------------------------------------------ RunIds


def test_run_ids_follow_the_life_of_their_object() -> None:
    class Run:
        pass

    ids, one, two = RunIds(), Run(), Run()
    assert ids.of(one) == ids.of(one) != ids.of(two)
    # Each temporary dies before the next is made, often at the same address: a new run.
    assert len({ids.of(Run()) for _ in range(100)}) == 100


# ----------------------------------------------------------------------- client_config


def test_client_config_prefers_the_client_then_the_config_then_the_environment(
    server: FakeCyclesServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = server.config(tenant="from-config")
    with server.client(tenant="from-client") as client:
        assert client_config(client, given).tenant == "from-client"
    assert client_config(None, given) is given
    monkeypatch.setenv("CYCLES_BASE_URL", "http://cycles.env")
    monkeypatch.setenv("CYCLES_API_KEY", "k")
    monkeypatch.setenv("CYCLES_TENANT", "from-env")
    assert client_config(None, None).tenant == "from-env"
    monkeypatch.delenv("CYCLES_API_KEY")
    with pytest.raises(CyclesConfigError, match="CYCLES_"):
        client_config(None, None)
