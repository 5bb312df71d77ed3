"""The adapter contract, run on a dummy framework, sync and async.

The dummy framework's events are tiny dataclasses; its package is the ~20 lines below, the
shape every real framework package takes (hooks + forwarding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from runcycles import Usage
from runcycles.adapters import AsyncCyclesAdapter, CallPlan, CyclesAdapter
from runcycles.testing.adapter_contract import AdapterContract, AdapterDriver


@dataclass
class LlmStart:
    model: str
    max_tokens: int


@dataclass
class ToolStart:
    tool: str


@dataclass
class LlmEnd:
    prompt_tokens: int
    completion_tokens: int
    model: str | None


class DummyHooks:
    """The two hooks of the dummy framework, shared by its sync and async adapters."""

    framework = "dummy"

    def plan(self, event: LlmStart | ToolStart) -> CallPlan:
        if isinstance(event, ToolStart):
            return CallPlan.tool(event.tool)
        return CallPlan.llm(event.model, max_tokens=event.max_tokens)

    def usage(self, result: LlmEnd | None) -> Usage | None:
        if result is None:
            return None
        return Usage(
            input_tokens=result.prompt_tokens,
            output_tokens=result.completion_tokens,
            model=result.model,
        )


class DummyAdapter(DummyHooks, CyclesAdapter[LlmStart | ToolStart, LlmEnd | None]):
    pass


class AsyncDummyAdapter(DummyHooks, AsyncCyclesAdapter[LlmStart | ToolStart, LlmEnd | None]):
    pass


def _end(usage: Usage) -> LlmEnd:
    return LlmEnd(usage.input_tokens, usage.output_tokens, usage.model)


class SyncDriver(AdapterDriver):
    def make(self, client: Any, **options: Any) -> DummyAdapter:
        return DummyAdapter(client, **options)

    def adapter(self, target: Any) -> Any:
        return target

    def start_llm(self, target: Any, run_id: str, call_id: str, *, model: str, max_tokens: int):
        return target.begin(run_id, call_id, LlmStart(model, max_tokens))

    def end_llm(self, target: Any, run_id: str, call_id: str, usage: Usage):
        return target.end(run_id, call_id, _end(usage))

    def start_tool(self, target: Any, run_id: str, call_id: str, *, tool: str):
        return target.begin(run_id, call_id, ToolStart(tool))

    def end_tool(self, target: Any, run_id: str, call_id: str):
        return target.end(run_id, call_id)

    def fail(self, target: Any, run_id: str, call_id: str, error: BaseException):
        return target.fail(run_id, call_id, error)

    def end_run(self, target: Any, run_id: str):
        return target.end_run(run_id)


class AsyncDriver(SyncDriver):
    is_async = True

    def make(self, client: Any, **options: Any) -> Any:
        return AsyncDummyAdapter(client, **options)


class TestSyncDummyAdapter(AdapterContract):
    @pytest.fixture
    def driver(self) -> AdapterDriver:
        return SyncDriver()


class TestAsyncDummyAdapter(AdapterContract):
    @pytest.fixture
    def driver(self) -> AdapterDriver:
        return AsyncDriver()
