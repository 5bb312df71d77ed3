"""The adapter base's contract, run through LangChain's own callback and middleware calls."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from langchain.agents.middleware import ModelRequest, ModelResponse
from langchain.tools.tool_node import ToolCallRequest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from runcycles import Usage
from runcycles.testing.adapter_contract import MODEL, AdapterContract, AdapterDriver, expected_cost
from runcycles_langchain import CyclesBudgetMiddleware, CyclesCallbackHandler
from runcycles_langchain.testing import ScriptedChatModel


def _message(usage: Usage) -> AIMessage:
    return AIMessage(
        content="ok",
        usage_metadata={
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        },
        response_metadata={"model_name": usage.model} if usage.model else {},
    )


class HandlerDriver(AdapterDriver):
    """Fires CyclesCallbackHandler's callbacks as LangChain does: a call's run under a run."""

    def make(self, client: Any, **options: Any) -> CyclesCallbackHandler:
        return CyclesCallbackHandler(client, **options)

    def adapter(self, target: CyclesCallbackHandler) -> CyclesCallbackHandler:
        return target

    def start_llm(self, target, run_id, call_id, *, model, max_tokens):
        params = {"model": model, "max_tokens": max_tokens}
        target.on_chat_model_start(
            {}, [[HumanMessage("hi")]], run_id=call_id, parent_run_id=run_id,
            invocation_params=params,
        )  # fmt: skip

    def end_llm(self, target, run_id, call_id, usage):
        result = LLMResult(generations=[[ChatGeneration(message=_message(usage))]])
        target.on_llm_end(result, run_id=call_id, parent_run_id=run_id)

    def start_tool(self, target, run_id, call_id, *, tool):
        target.on_tool_start({"name": tool}, "{}", run_id=call_id, parent_run_id=run_id)

    def end_tool(self, target, run_id, call_id):
        target.on_tool_end("ok", run_id=call_id, parent_run_id=run_id)

    def fail(self, target, run_id, call_id, error):
        target.on_llm_error(error, run_id=call_id, parent_run_id=run_id)

    def end_run(self, target, run_id):
        target.on_chain_end({}, run_id=run_id, parent_run_id=None)


class TestHandlerContract(AdapterContract):
    @pytest.fixture
    def driver(self) -> HandlerDriver:
        return HandlerDriver()


class _InFlight:
    """One wrapped call running in its own thread, held inside the handler until told."""

    def __init__(self, wrap: Any, request: Any, run_id: str, call_id: str) -> None:
        self.started, self.done = threading.Event(), threading.Event()
        self.outcome: Any = None
        self.error: BaseException | None = None
        ids = SimpleNamespace(run_id=run_id, checkpoint_ns=call_id)  # LangGraph's run and task
        self.request = request(SimpleNamespace(execution_info=ids))
        self.thread = threading.Thread(target=self._run, args=(wrap,), daemon=True)
        self.thread.start()

    def _handler(self, request: Any) -> Any:
        self.started.set()
        self.done.wait(10)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome(request)

    def _run(self, wrap: Any) -> None:
        try:
            wrap(self.request, self._handler)
        except BaseException as error:
            self.error = error
        self.started.set()

    def finish(self, outcome: Any) -> None:
        self.outcome = outcome
        self.done.set()
        self.thread.join(10)
        if self.error is not None and self.error is not outcome:
            raise self.error


class MiddlewareDriver(AdapterDriver):
    """Runs each call through CyclesBudgetMiddleware's wrap hooks, held open between events."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], _InFlight] = {}

    def make(self, client: Any, **options: Any) -> CyclesBudgetMiddleware:
        return CyclesBudgetMiddleware(client, on_model_denied="raise", **options)

    def adapter(self, target: CyclesBudgetMiddleware) -> Any:
        return target.adapter

    def _start(self, wrap: Any, request: Any, run_id: str, call_id: str) -> None:
        call = _InFlight(wrap, request, run_id, call_id)
        call.started.wait(10)
        if call.error is not None:  # denied: the call never ran
            raise call.error
        self.calls[(run_id, call_id)] = call

    def start_llm(self, target, run_id, call_id, *, model, max_tokens):
        def request(runtime: Any) -> ModelRequest:
            return ModelRequest(
                model=ScriptedChatModel([], name=model), messages=[HumanMessage("hi")],
                system_prompt=None, tool_choice=None, tools=[], response_format=None,
                state={"messages": []},
                runtime=runtime, model_settings={"max_tokens": max_tokens},
            )  # fmt: skip

        self._start(target.wrap_model_call, request, run_id, call_id)

    def end_llm(self, target, run_id, call_id, usage):
        call = self.calls.pop((run_id, call_id), None)
        if call is None:  # a duplicated end: LangGraph cannot end a wrapped call twice
            return
        call.finish(lambda _request: ModelResponse(result=[_message(usage)]))

    def start_tool(self, target, run_id, call_id, *, tool):
        def request(runtime: Any) -> ToolCallRequest:
            tool_call = {"name": tool, "args": {}, "id": call_id, "type": "tool_call"}
            return ToolCallRequest(tool_call=tool_call, tool=None, state={}, runtime=runtime)  # type: ignore[arg-type]

        self._start(target.wrap_tool_call, request, run_id, call_id)

    def end_tool(self, target, run_id, call_id):
        result = ToolMessage("ok", tool_call_id=call_id)
        self.calls.pop((run_id, call_id)).finish(lambda _request: result)

    def fail(self, target, run_id, call_id, error):
        self.calls.pop((run_id, call_id)).finish(error)

    def end_run(self, target, run_id):
        for key in [key for key in self.calls if key[0] == run_id]:  # the run was cancelled
            self.calls.pop(key).finish(asyncio.CancelledError())


class TestMiddlewareContract(AdapterContract):
    @pytest.fixture
    def driver(self) -> MiddlewareDriver:
        return MiddlewareDriver()

    async def test_a_retried_callback_charges_once(self, driver, make, server) -> None:
        """The same ids, even from a new process, replay one reservation; a wrapped call that
        runs again within its step (a retry around this middleware) is a new model call: the
        spend is real, it is charged again."""
        usage = Usage(input_tokens=1_000, output_tokens=100, model=MODEL)
        await self.llm(driver, make(), "run-r", "call-r", usage)
        await self.llm(driver, make(), "run-r", "call-r", usage)  # after a restart
        assert len(server.reservations) == 1
        assert server.spent["USD_MICROCENTS"] == expected_cost(usage)
        target = make()
        await self.llm(driver, target, "run-r", "call-s", usage)
        await self.llm(driver, target, "run-r", "call-s", usage)  # again in the same process
        assert len(server.reservations) == 3
        assert server.spent["USD_MICROCENTS"] == 3 * expected_cost(usage)
        assert server.reserved() == 0
