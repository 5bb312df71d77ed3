"""What a LangChain call is and what it used: the adapter base's two hooks, shared."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from runcycles import CallPlan, Usage
from runcycles.adapters import ToolEstimateMap, ToolNotAllowedError

__all__ = ["LangChainHooks", "ToolNotAllowedError", "message_usage"]


def message_usage(message: Any) -> Usage | None:
    """A message's ``usage_metadata`` (LangChain's provider-neutral counts) as a ``Usage``."""
    used = getattr(message, "usage_metadata", None)
    if not isinstance(message, BaseMessage) or not used:
        return None
    meta = message.response_metadata or {}
    model = meta.get("model_name") or meta.get("model")
    return Usage.from_langchain(used, model=model if isinstance(model, str) else None)


class LangChainHooks:
    """``plan()`` and ``usage()`` for LangChain calls; mixed into every adapter class here.

    Events are :class:`~runcycles.CallPlan` objects built by :meth:`model_plan` and
    :meth:`tool_plan`; results are an ``LLMResult`` (callbacks), a ``ModelResponse`` or an
    ``AIMessage`` (middleware), or ``None`` (a tool: its estimate).
    """

    framework = "langchain"

    def __init__(self, client: Any, /, *, model: str | None = None, **options: Any) -> None:
        super().__init__(client, **options)  # type: ignore[call-arg]  # the adapter base
        self._default_model = model
        tools = options.get("tool_estimates")
        everything = (
            isinstance(tools, ToolEstimateMap) or options.get("default_tool_estimate") is not None
        )
        self._metered: set[str] | None = None if everything else set(tools or ())

    def model_plan(self, model: Any, max_tokens: Any) -> CallPlan:
        """Plan a model call: priced as ``model`` (else the ``model=`` option), worst case."""
        name = model if isinstance(model, str) and model else self._default_model
        limit = max_tokens if type(max_tokens) is int else None
        if name is None:  # the adapter's llm_estimate, or a clear error
            return CallPlan("llm.completion", "unknown-model", max_tokens=limit)
        return CallPlan.llm(name, max_tokens=limit)

    def tool_plan(self, name: str, **fields: Any) -> CallPlan | None:
        """Plan a tool call from ``tool_estimates``; a tool with no estimate is not metered."""
        if self._metered is not None and name not in self._metered:
            return None
        return super().tool_plan(name, **{"toolset": name, **fields})  # type: ignore[misc, no-any-return]

    def plan(self, event: CallPlan | None) -> CallPlan | None:
        """The event is the plan."""
        return event

    def usage(self, result: Any) -> Usage | None:
        """What a model call used (summed over a batch); ``None`` (its estimate) if unknown."""
        if isinstance(result, LLMResult):
            found = [
                message_usage(getattr(g, "message", None)) for gs in result.generations for g in gs
            ]
            known = [used for used in found if used is not None]
            if known and len(known) == len(found):
                return sum(known[1:], known[0])
            token_usage = (result.llm_output or {}).get("token_usage")  # plain LLMs (OpenAI)
            return Usage.from_openai(token_usage) if token_usage else None
        messages: Iterable[Any] = getattr(result, "result", None) or [result]
        return message_usage(list(messages)[-1])
