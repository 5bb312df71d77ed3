"""The behaviour every Cycles adapter must show, written once (imports pytest).

A framework package runs it on itself by subclassing :class:`AdapterContract` and providing
one fixture, ``driver``: an :class:`AdapterDriver` that fires the framework's own callbacks
(sync or async) on the package's framework-facing object::

    from runcycles.testing.adapter_contract import AdapterContract, AdapterDriver

    class TinyDriver(AdapterDriver):
        def make(self, client, **options):  return TinyCallback(client, **options)
        def adapter(self, target):          return target.adapter
        def start_llm(self, target, run_id, call_id, *, model, max_tokens): ...
        def end_llm(self, target, run_id, call_id, usage): ...
        def start_tool(self, target, run_id, call_id, *, tool): ...
        def end_tool(self, target, run_id, call_id): ...
        def fail(self, target, run_id, call_id, error): ...
        def end_run(self, target, run_id): ...

    class TestTinyContract(AdapterContract):
        @pytest.fixture
        def driver(self):
            return TinyDriver()

For an async framework set ``is_async = True`` and make those methods coroutines. The
scenarios run against :class:`~runcycles.testing.fake_server.FakeCyclesServer` (exact
ledger, idempotent replay); sync drivers are called from worker threads, so parallel calls
really are parallel. Needs ``pytest`` and ``pytest-asyncio``; only test suites import this.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, ClassVar

import pytest

from runcycles.adapters import AsyncCyclesAdapter, CyclesAdapter
from runcycles.exceptions import BudgetExceededError, CyclesTransportError, UnauthorizedError
from runcycles.lifecycle import UnknownActualError
from runcycles.pricing import ModelPrice, Pricer
from runcycles.testing.fake_server import FakeCyclesServer
from runcycles.usage import Usage

__all__ = [
    "AdapterContract",
    "AdapterDriver",
    "MODEL",
    "PRICE",
    "TOOL",
    "TOOL_ESTIMATE",
    "expected_cost",
]

MODEL = "contract-model"
"""The model the scenarios call, priced by :data:`PRICE` (the pricer has nothing else)."""
PRICE = ModelPrice(input_per_mtok=Decimal("2.5"), output_per_mtok=10)
TOOL = "search"
"""The tool the scenarios call, estimated at :data:`TOOL_ESTIMATE` USD micro-cents."""
TOOL_ESTIMATE = 2_000
_MICROCENTS_PER_TOKEN_AT_1_USD_PER_MTOK = 100
Make = Callable[..., Any]


def expected_cost(usage: Usage) -> int:
    """What :data:`PRICE` charges for ``usage``, worked out independently of the pricer."""
    units = usage.input_tokens * PRICE.input_per_mtok + usage.output_tokens * PRICE.output_per_mtok
    exact = units * _MICROCENTS_PER_TOKEN_AT_1_USD_PER_MTOK
    return int(exact.to_integral_value(rounding="ROUND_CEILING"))


class AdapterDriver:
    """Fires a framework's callbacks on the object a package gives its users.

    ``target`` is what :meth:`make` built (a callback handler, a hooks object, ...). Every
    method returns what the framework callback returns (awaitable when ``is_async``).
    """

    is_async: ClassVar[bool] = False

    def make(self, client: Any, **options: Any) -> Any:
        """Build the framework-facing object on ``client`` with adapter ``options``."""
        raise NotImplementedError

    def adapter(self, target: Any) -> CyclesAdapter[Any, Any] | AsyncCyclesAdapter[Any, Any]:
        """The adapter inside ``target`` (to inspect ``pending`` and ``decisions``)."""
        raise NotImplementedError

    def start_llm(
        self, target: Any, run_id: str, call_id: str, *, model: str, max_tokens: int
    ) -> Any:
        """Fire "a model call starts"."""
        raise NotImplementedError

    def end_llm(self, target: Any, run_id: str, call_id: str, usage: Usage) -> Any:
        """Fire "the model call ended" with ``usage`` in the framework's shape."""
        raise NotImplementedError

    def start_tool(self, target: Any, run_id: str, call_id: str, *, tool: str) -> Any:
        """Fire "a tool call starts"."""
        raise NotImplementedError

    def end_tool(self, target: Any, run_id: str, call_id: str) -> Any:
        """Fire "the tool call ended"."""
        raise NotImplementedError

    def fail(self, target: Any, run_id: str, call_id: str, error: BaseException) -> Any:
        """Fire "the call failed"."""
        raise NotImplementedError

    def end_run(self, target: Any, run_id: str) -> Any:
        """Fire "the run ended"."""
        raise NotImplementedError


def _caused_by(error: BaseException, cls: type[BaseException]) -> bool:
    """Whether ``error`` or anything in its cause/context chain is a ``cls``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, cls):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class AdapterContract:
    """The scenarios; subclass it (name it ``Test...``) and provide a ``driver`` fixture."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    @pytest.fixture
    def driver(self) -> AdapterDriver:
        """Override: return the package's :class:`AdapterDriver`."""
        raise NotImplementedError("provide a `driver` fixture returning an AdapterDriver")

    @pytest.fixture
    def server(self) -> FakeCyclesServer:
        """The ledger every scenario runs against."""
        return FakeCyclesServer()

    @pytest.fixture(autouse=True)
    def _journal(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(tmp_path / "journal"))

    @pytest.fixture
    async def make(
        self, driver: AdapterDriver, server: FakeCyclesServer
    ) -> AsyncIterator[Callable[..., Any]]:
        """``make(**options)``: a fresh framework-facing object on a fresh client."""
        clients: list[Any] = []

        def build(**options: Any) -> Any:
            client = server.async_client() if driver.is_async else server.client()
            clients.append(client)
            defaults: dict[str, Any] = {
                "tenant": "acme",
                "pricer": Pricer(overrides={MODEL: PRICE}, builtin=False),
                "tool_estimates": {TOOL: TOOL_ESTIMATE},
            }
            return driver.make(client, **{**defaults, **options})

        yield build
        for client in clients:
            if driver.is_async:
                await client.aclose()
            else:
                client.close()

    async def fire(self, driver: AdapterDriver, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a driver method: awaited when async, from a worker thread when sync."""
        method = getattr(driver, name)
        if driver.is_async:
            return await method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    async def llm(
        self, driver: AdapterDriver, target: Any, run: str, call: str, usage: Usage
    ) -> None:
        """One model call start to end."""
        await self.fire(driver, "start_llm", target, run, call, model=MODEL, max_tokens=500)
        await self.fire(driver, "end_llm", target, run, call, usage)

    # -- the scenarios -----------------------------------------------------------------

    async def test_usage_is_priced_to_the_microcent(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """A model call commits its usage priced by the pricer, exactly."""
        target = make()
        usage = Usage(input_tokens=1_234, output_tokens=321, model=MODEL)
        await self.llm(driver, target, "run-1", "call-1", usage)
        assert server.posts("/commit")[0]["actual"]["amount"] == expected_cost(usage)
        assert server.spent["USD_MICROCENTS"] == expected_cost(usage) == 629_500
        assert server.reserved() == 0

    async def test_parallel_calls_commit_their_own_usage(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """8 concurrent calls, ended out of order, each commit their own usage."""
        target = make()
        ids = [f"call-{n}" for n in range(8)]
        usages = {
            cid: Usage(input_tokens=100 * (n + 1), output_tokens=7 * n) for n, cid in enumerate(ids)
        }
        await asyncio.gather(
            *(
                self.fire(driver, "start_llm", target, "run", c, model=MODEL, max_tokens=500)
                for c in ids
            )
        )
        assert len(driver.adapter(target).pending) == 8
        random.Random(7).shuffle(ids)
        await asyncio.gather(
            *(self.fire(driver, "end_llm", target, "run", c, usages[c]) for c in ids)
        )
        committed = {
            r["request"]["metadata"]["call_id"]: r["commit"]["actual"]["amount"]
            for r in server.reservations.values()
        }
        assert committed == {c: expected_cost(u) for c, u in usages.items()}
        assert server.spent["USD_MICROCENTS"] == sum(map(expected_cost, usages.values()))
        assert driver.adapter(target).pending == []

    async def test_a_retried_callback_charges_once(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """Repeated callbacks with the same ids reserve and charge once, even after a restart."""
        usage = Usage(input_tokens=1_000, output_tokens=100, model=MODEL)
        target = make()
        await self.llm(driver, target, "run-r", "call-r", usage)
        await self.fire(driver, "end_llm", target, "run-r", "call-r", usage)  # duplicated end
        await self.llm(driver, target, "run-r", "call-r", usage)  # the whole callback again
        await self.llm(driver, make(), "run-r", "call-r", usage)  # ... after a restart
        assert len(server.reservations) == 1
        assert server.spent["USD_MICROCENTS"] == expected_cost(usage)
        assert server.reserved() == 0

    @pytest.mark.parametrize("denial", ["409", "200 DENY"])
    async def test_a_denial_stops_the_call_even_with_fail_open(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer, denial: str
    ) -> None:
        """``fail_open`` never overrides a denial (409 or 200 DENY)."""
        target = make(fail_open=True)
        if denial == "409":
            server.reject = (409, "BUDGET_EXCEEDED")
        else:
            server.deny_reason = "BUDGET_EXCEEDED"
        with pytest.raises(Exception) as raised:  # noqa: PT011 - packages may wrap it
            await self.fire(
                driver, "start_llm", target, "run-d", "call-d", model=MODEL, max_tokens=500
            )
        assert _caused_by(raised.value, BudgetExceededError), raised.value
        assert driver.adapter(target).pending == []
        assert driver.adapter(target).unguarded_calls == 0

    async def test_bad_credentials_raise_even_with_fail_open(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """A 401 is not an outage: it stops the call whatever ``fail_open`` says."""
        target = make(fail_open=True)
        server.reject = (401, "UNAUTHORIZED")
        with pytest.raises(Exception) as raised:  # noqa: PT011 - packages may wrap it
            await self.fire(driver, "start_tool", target, "run-a", "call-a", tool=TOOL)
        assert _caused_by(raised.value, UnauthorizedError), raised.value

    async def test_an_outage_with_fail_open_runs_unguarded_and_logs_once(
        self,
        driver: AdapterDriver,
        make: Make,
        server: FakeCyclesServer,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An unreachable server lets calls run under ``fail_open``; one log record."""
        target = make(fail_open=True)
        server.outage = True
        with caplog.at_level(logging.WARNING, logger="runcycles.adapters"):
            for n in range(5):
                await self.llm(driver, target, "run-o", f"call-{n}", Usage(input_tokens=10))
        outage_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(outage_logs) == 1, [r.getMessage() for r in caplog.records]
        assert driver.adapter(target).unguarded_calls == 5
        assert driver.adapter(target).pending == []

    async def test_an_outage_without_fail_open_stops_the_call(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """Without ``fail_open`` an unreachable server stops the call."""
        target = make()
        server.outage = True
        with pytest.raises(Exception) as raised:  # noqa: PT011 - packages may wrap it
            await self.fire(
                driver, "start_llm", target, "run-x", "call-x", model=MODEL, max_tokens=9
            )
        assert _caused_by(raised.value, CyclesTransportError), raised.value

    async def test_dry_run_never_blocks_and_consumes_nothing(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """Dry run records decisions, never raises, never holds or charges."""
        server.budget = 10  # far too little for any call
        target = make(dry_run=True)
        await self.llm(driver, target, "run-s", "call-1", Usage(input_tokens=10, output_tokens=10))
        await self.fire(driver, "start_tool", target, "run-s", "call-2", tool=TOOL)
        await self.fire(driver, "end_tool", target, "run-s", "call-2")
        await self.fire(driver, "end_run", target, "run-s")
        assert server.remaining() == 10
        assert server.reservations == {}
        assert server.posts("/commit") == server.posts("/release") == []
        decisions = driver.adapter(target).decisions
        assert [d.decision.value for d in decisions] == ["DENY", "DENY"]
        assert [d.action_name for d in decisions] == [MODEL, TOOL]

    async def test_a_failing_run_leaves_no_reservation_open(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """Failed calls are released, and ``end_run`` releases calls never ended."""
        target = make()
        usage = Usage(input_tokens=500, output_tokens=50)
        for call in ("a", "b", "c"):
            await self.fire(driver, "start_llm", target, "run-f", call, model=MODEL, max_tokens=99)
        await self.fire(driver, "end_llm", target, "run-f", "a", usage)
        await self.fire(driver, "fail", target, "run-f", "b", RuntimeError("tool crashed"))
        await self.fire(driver, "end_run", target, "run-f")  # "c" never ended
        assert sorted(server.statuses()) == ["COMMITTED", "RELEASED", "RELEASED"]
        assert server.reserved() == 0
        assert server.spent["USD_MICROCENTS"] == expected_cost(usage)
        assert driver.adapter(target).pending == []

    async def test_caps_are_surfaced(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """``ALLOW_WITH_CAPS`` caps reach the framework package."""
        server.caps = {"max_tokens": 64, "tool_denylist": ["shell"]}
        target = make()
        await self.fire(driver, "start_llm", target, "run-c", "call-c", model=MODEL, max_tokens=500)
        (call,) = driver.adapter(target).pending
        assert call.caps is not None
        assert call.caps.max_tokens == 64
        assert call.max_tokens == 64
        assert not call.allows_tool("shell")
        assert call.allows_tool(TOOL)
        await self.fire(driver, "end_run", target, "run-c")

    async def test_a_tool_holds_its_estimate_and_commits_it(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """A tool holds its ``tool_estimates`` entry and commits it, flagged."""
        target = make()
        await self.fire(driver, "start_tool", target, "run-t", "call-t", tool=TOOL)
        assert server.reserved() == TOOL_ESTIMATE
        await self.fire(driver, "end_tool", target, "run-t", "call-t")
        (commit,) = server.posts("/commit")
        assert commit["actual"]["amount"] == TOOL_ESTIMATE
        assert commit["metadata"]["actual_source"] == "estimate"

    async def test_an_unpriceable_usage_commits_the_estimate(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """By default an unpriceable usage commits the estimate, flagged."""
        target = make()
        await self.fire(driver, "start_llm", target, "run-u", "call-u", model=MODEL, max_tokens=100)
        held = server.reserved()
        await self.fire(
            driver, "end_llm", target, "run-u", "call-u", Usage(output_tokens=5, model="mystery")
        )
        (commit,) = server.posts("/commit")
        assert commit["actual"]["amount"] == held > 0
        assert commit["metadata"]["actual_source"] == "estimate"
        assert "mystery" in commit["metadata"]["actual_error"]

    async def test_an_unpriceable_usage_can_raise(
        self, driver: AdapterDriver, make: Make, server: FakeCyclesServer
    ) -> None:
        """``on_unknown_actual='raise'`` sends nothing and raises from the end callback."""
        target = make(on_unknown_actual="raise")
        await self.fire(driver, "start_llm", target, "run-u", "call-u", model=MODEL, max_tokens=100)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - packages may wrap it
            await self.fire(driver, "end_llm", target, "run-u", "call-u", Usage(model="mystery"))
        assert _caused_by(raised.value, UnknownActualError), raised.value
        assert server.posts("/commit") == server.posts("/release") == []
        assert server.statuses() == ["ACTIVE"]  # left to expire at the end of its lease
