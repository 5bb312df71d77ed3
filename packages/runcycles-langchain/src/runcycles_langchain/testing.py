"""A scripted LangChain chat model: drive real agents offline, with no API key (tests, docs).

::

    model = ScriptedChatModel([
        tool_calls(("search", {"q": "refunds"})),       # call 1: call a tool
        reply("Refunds take 5 days."),                    # call 2: answer
    ], name="gpt-4o-mini")
    agent = create_agent(model, tools=[search])
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

__all__ = ["ScriptedChatModel", "reply", "tool_calls", "usage"]

_ids = itertools.count(1)
_lock = threading.Lock()


def usage(input_tokens: int, output_tokens: int, *, cached: int = 0, reasoning: int = 0) -> Any:
    """One call's ``usage_metadata`` (``cached`` input and ``reasoning`` output are parts)."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "input_token_details": {"cache_read": cached},
        "output_token_details": {"reasoning": reasoning},
    }


def reply(text: str, used: Any = None) -> AIMessage:
    """A final answer (usage default: 100 in, 20 out)."""
    return AIMessage(content=text, usage_metadata=used or usage(100, 20))


def tool_calls(*calls: tuple[Any, ...], used: Any = None) -> AIMessage:
    """An answer that calls tools: ``(name, args)`` or ``(name, args, call_id)`` each."""
    return AIMessage(
        content="",
        tool_calls=[
            {"name": c[0], "args": c[1], "id": c[2] if len(c) > 2 else f"call_{next(_ids)}"}
            for c in calls
        ],
        usage_metadata=used or usage(100, 20),
    )


class ScriptedChatModel(GenericFakeChatModel):
    """Answers each call with the next scripted message; records the settings of each call.

    A scripted exception is raised by its call (a provider error, a timeout...).

    Binds tools (``create_agent`` needs it) and streams a call as one chunk that keeps its
    tool calls and usage. ``calls`` holds each call's keyword arguments (``max_tokens``...,
    and ``tools``: the names of the tools it was given).

    Args:
        script: The messages to answer with, in order.
        name: The model name (what pricing sees as ``model_name``).
        max_tokens: The model's own output limit (as on ``ChatOpenAI``).
    """

    model_name: str = "gpt-4o-mini"
    max_tokens: int | None = None
    calls: list[dict[str, Any]] = Field(default_factory=list)

    def __init__(
        self,
        script: Sequence[AIMessage | BaseException],
        *,
        name: str = "gpt-4o-mini",
        max_tokens: int | None = None,
    ) -> None:
        super().__init__(messages=iter(list(script)), model_name=name, max_tokens=max_tokens)  # type: ignore[call-arg, arg-type]

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Any:
        """Bind ``tools`` (and the request's model settings, e.g. ``max_tokens``)."""
        specs = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=specs, tool_choice=tool_choice, **kwargs)

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        tools = [spec["function"]["name"] for spec in kwargs.get("tools") or []]
        self.calls.append({**kwargs, "tools": tools})
        with _lock:  # batches call from several threads
            answer = next(self.messages, None)
        if answer is None:
            raise RuntimeError(f"ScriptedChatModel: no answer left for call {len(self.calls)}")
        if isinstance(answer, BaseException):
            raise answer  # a scripted failure (a provider error, a timeout...)
        message = AIMessage(content=answer) if isinstance(answer, str) else answer
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        message = self._generate(messages, stop=stop, **kwargs).generations[0].message
        chunks = [
            {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
            for i, c in enumerate(getattr(message, "tool_calls", []))
        ]
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content=message.content, id=message.id, tool_call_chunks=chunks,  # type: ignore[arg-type]
                usage_metadata=getattr(message, "usage_metadata", None),
            )
        )  # fmt: skip
