"""``create_agent`` middleware: a model gate (with caps) and a tool gate, sync and async."""

from __future__ import annotations

import functools
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.tools.tool_node import ToolCallRequest  # langchain.agents.middleware's from 1.1
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.config import get_config

from runcycles import (
    AdapterCall,
    AsyncCyclesAdapter,
    AsyncCyclesClient,
    CallPlan,
    CyclesAdapter,
    CyclesClient,
    CyclesConfig,
    CyclesConfigError,
    CyclesError,
)
from runcycles_langchain._hooks import LangChainHooks

__all__ = ["CyclesBudgetMiddleware"]

ToolResult = Any  # ToolMessage | langgraph Command


def _tool_name(tool: Any) -> str | None:
    """A bound tool's name: a ``BaseTool``'s, or a provider tool dict's (``None``: unnamed)."""
    if isinstance(tool, dict):
        return tool.get("name") or (tool.get("function") or {}).get("name")
    return getattr(tool, "name", None)


class _Gate(LangChainHooks, CyclesAdapter[CallPlan | None, Any]):
    """The sync side's adapter."""


class _AsyncGate(LangChainHooks, AsyncCyclesAdapter[CallPlan | None, Any]):
    """The async side's adapter."""


class CyclesBudgetMiddleware(AgentMiddleware):
    """Budget every model and tool call of a ``create_agent`` agent (sync and async).

    ``create_agent(model, tools, middleware=[CyclesBudgetMiddleware(...)])``. Before each
    model call it reserves the call's worst case and applies the budget's caps to the request
    (``max_tokens`` lowered in its model settings, forbidden tools left out); after it, it
    commits the priced usage. Each metered tool call reserves its estimate. Every reservation
    settles before the hook returns: a failing call is released, nothing is left open.

    Args:
        client: A ``CyclesClient`` for ``invoke``/``stream`` (an ``AsyncCyclesClient`` here
            counts as ``async_client``). With neither client, both are built from
            ``config`` (or the ``CYCLES_*`` variables) and closed by :meth:`aclose`.
        async_client: An ``AsyncCyclesClient`` for ``ainvoke``/``astream``.
        config: Builds the clients when none is given.
        model: The model to price calls at when the chat model does not name one.
        on_model_denied: ``"end"`` (default): a denied model call ends the run cleanly with
            an ``AIMessage`` saying why; ``"raise"``: the denial reaches the caller.
        on_tool_denied: ``"raise"`` (default): a denied tool call (or one the caps forbid)
            stops the run with the error; ``"message"``: the tool does not run and the model
            gets an error ``ToolMessage`` instead.
        **options: :class:`~runcycles.AdapterOptions` (``tenant``, ``tool_estimates``,
            ``fail_open``, ``dry_run``, ``pricer``...). Tools with no estimate are not metered.
    """

    def __init__(
        self,
        client: CyclesClient | AsyncCyclesClient | None = None,
        *,
        async_client: AsyncCyclesClient | None = None,
        config: CyclesConfig | None = None,
        model: str | None = None,
        on_model_denied: Literal["end", "raise"] = "end",
        on_tool_denied: Literal["raise", "message"] = "raise",
        **options: Any,
    ) -> None:
        super().__init__()
        if on_model_denied not in ("end", "raise") or on_tool_denied not in ("raise", "message"):
            raise CyclesConfigError(
                "on_model_denied must be 'end' or 'raise', on_tool_denied 'raise' or "
                f"'message'; got {on_model_denied!r} and {on_tool_denied!r}"
            )
        self.on_model_denied, self.on_tool_denied = on_model_denied, on_tool_denied
        if isinstance(client, AsyncCyclesClient):
            client, async_client = None, client
        given = client or async_client
        config = config or (given.config if given else None)  # None: each from the environment
        self.adapter = _Gate(client, config=config, model=model, **options)
        self.async_adapter = _AsyncGate(async_client, config=config, model=model, **options)
        self._attempts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._lock = threading.Lock()

    # -- what both variants share --------------------------------------------------------

    def _ids(self, runtime: Any) -> tuple[str, str]:
        """(run id, call id): the run, the graph step's own run id, the attempt within it."""
        info = getattr(runtime, "execution_info", None)  # langgraph >= 1.1
        try:
            config = get_config()
        except RuntimeError:  # outside a graph step
            config = {}
        run = getattr(info, "run_id", None) or (config.get("configurable") or {}).get("thread_id")
        step = getattr(config.get("callbacks"), "parent_run_id", None)  # unique per execution
        key = (
            str(run or "langgraph"),
            str(step or getattr(info, "checkpoint_ns", None) or uuid.uuid4()),
        )
        with self._lock:  # a retry of the call within the step is a new call
            attempt = self._attempts[key] = self._attempts.pop(key, -1) + 1
            if len(self._attempts) > 10_000:
                self._attempts.popitem(last=False)
        return key[0], f"{key[1]}#{attempt}" if attempt else key[1]

    def _plan(self, gate: LangChainHooks, request: ModelRequest) -> CallPlan:
        model = request.model
        name = getattr(model, "model_name", None) or getattr(model, "model", None)
        limit = request.model_settings.get("max_tokens") or getattr(model, "max_tokens", None)
        return gate.model_plan(name, limit)

    @staticmethod
    def _capped(request: ModelRequest, call: AdapterCall) -> ModelRequest:
        """The request under the caps: ``max_tokens`` lowered, forbidden tools left out."""
        if call.mode == "dry_run" or call.caps is None:
            return request
        changes: dict[str, Any] = {}
        if call.caps.max_tokens is not None:
            changes["model_settings"] = {**request.model_settings, "max_tokens": call.max_tokens}
        tools = [t for t in request.tools if call.allows_tool(_tool_name(t) or "")]
        if len(tools) < len(request.tools):
            changes["tools"] = tools
        return request.override(**changes) if changes else request

    def _model_denied(self, error: CyclesError) -> ModelResponse:
        if self.on_model_denied == "raise":
            raise error
        code = getattr(error, "error_code", None) or type(error).__name__
        text = f"Stopped: the budget refused the next model call ({code})."
        message = AIMessage(content=text, response_metadata={"cycles_denied": str(code)})
        return ModelResponse(result=[message])

    def _tool_denied(self, request: ToolCallRequest, error: CyclesError) -> ToolMessage:
        if self.on_tool_denied == "raise":
            raise error
        call = request.tool_call
        text = f"Tool {call['name']!r} was not run: {error}"
        return ToolMessage(text, tool_call_id=call["id"], name=call["name"], status="error")

    # -- the hooks ------------------------------------------------------------------------

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """Reserve the model call's worst case, apply the caps, call, commit the usage."""
        gate, (run, call_id) = self.adapter, self._ids(request.runtime)
        return gate.wrap(
            run, call_id, self._plan(gate, request),
            lambda call: handler(self._capped(request, call)), denied=self._model_denied,
        )  # fmt: skip

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        """The async twin of :meth:`wrap_model_call`."""
        gate, (run, call_id) = self.async_adapter, self._ids(request.runtime)
        return await gate.wrap(
            run, call_id, self._plan(gate, request),
            lambda call: handler(self._capped(request, call)), denied=self._model_denied,
        )  # fmt: skip

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[..., Any]) -> ToolResult:
        """Reserve the tool's estimate; deny (raise or message) a refused tool; commit."""
        gate, name = self.adapter, request.tool_call["name"]
        run, call_id = self._ids(request.runtime)
        return gate.wrap(
            run, call_id, gate.tool_plan(name), lambda _: handler(request), tool=name,
            denied=functools.partial(self._tool_denied, request),
        )  # fmt: skip

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[..., Awaitable[Any]]
    ) -> ToolResult:
        """The async twin of :meth:`wrap_tool_call`."""
        gate, name = self.async_adapter, request.tool_call["name"]
        run, call_id = self._ids(request.runtime)
        return await gate.wrap(
            run, call_id, gate.tool_plan(name), lambda _: handler(request), tool=name,
            denied=functools.partial(self._tool_denied, request),
        )  # fmt: skip

    def close(self) -> None:
        """Close the sync side (and its client, if this middleware built it)."""
        self.adapter.close()

    async def aclose(self) -> None:
        """Close both sides (and the clients this middleware built)."""
        await self.async_adapter.close()
        self.close()
