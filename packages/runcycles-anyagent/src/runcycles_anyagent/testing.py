"""Scripted models: run any-agent agents offline, with no API key (tests, docs, examples).

One script drives both tested backends::

    turns = [tool_calls(("get_weather", {"city": "Paris"})), reply("Sunny in Paris.")]

    # tinyagent: replace the agent's model call
    agent = AnyAgent.create("tinyagent", AgentConfig(model_id="openai:gpt-4o-mini", ...))
    agent.call_model = ScriptedCompletions(turns)

    # openai backend (``pip install 'any-agent[openai]'``): a scripted Agents SDK model
    AgentConfig(model_id="openai:gpt-4o-mini", model_type=ScriptedModel.factory(turns), ...)
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from any_llm.types.completion import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    Choice,
    CompletionUsage,
)
from openai.types.chat.chat_completion_message_function_tool_call import Function

try:  # the openai backend's model needs the Agents SDK (any-agent[openai])
    from agents import ModelResponse, ModelSettings, Usage
    from agents.models.interface import Model
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )
    from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
except ImportError:  # pragma: no cover - tinyagent only
    Model = object  # type: ignore[assignment,misc]

__all__ = ["ScriptedCompletions", "ScriptedModel", "Turn", "reply", "tool_calls"]

_ids = itertools.count(1)


@dataclass
class Turn:
    """One model answer: a text, or tool calls ``(name, arguments, call_id)``; and its usage."""

    text: str = ""
    calls: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    input_tokens: int = 100
    output_tokens: int = 20


def reply(text: str, *, usage: tuple[int, int] = (100, 20)) -> Turn:
    """A final text answer (``usage``: input and output tokens)."""
    return Turn(text, [], *usage)


def tool_calls(*calls: tuple[Any, ...], usage: tuple[int, int] = (100, 20)) -> Turn:
    """Tool calls in one turn: ``(name, arguments)`` or ``(name, arguments, call_id)``."""
    full = [(c[0], c[1], c[2] if len(c) > 2 else f"call_{next(_ids)}") for c in calls]
    return Turn("", full, *usage)


class _Script:
    def __init__(self, turns: Sequence[Turn]) -> None:
        self.turns = list(turns)
        self.calls: list[Any] = []

    def _next(self, seen: Any) -> Turn:
        self.calls.append(seen)
        if not self.turns:
            raise RuntimeError(f"scripted model: no turn left for call {len(self.calls)}")
        return self.turns.pop(0)


class ScriptedCompletions(_Script):
    """tinyagent: ``agent.call_model = ScriptedCompletions(turns)``; ``.calls``: the params."""

    async def __call__(self, **params: Any) -> ChatCompletion:
        """Answer one completion request with the next turn."""
        turn = self._next(params)
        calls: list[Any] = [
            ChatCompletionMessageFunctionToolCall(
                id=call_id, type="function", function=Function(name=name, arguments=json.dumps(a))
            )
            for name, a, call_id in turn.calls
        ]
        message = ChatCompletionMessage(
            role="assistant", content=turn.text or None, tool_calls=calls or None
        )
        used = (turn.input_tokens, turn.output_tokens)
        return ChatCompletion(
            id=f"cc-{len(self.calls)}", object="chat.completion", created=0,
            model=str(params.get("model", "scripted")),
            choices=[Choice(index=0, finish_reason="tool_calls" if calls else "stop",
                            message=message)],
            usage=CompletionUsage(prompt_tokens=used[0], completion_tokens=used[1],
                                  total_tokens=sum(used)),
        )  # fmt: skip


class ScriptedModel(_Script, Model):
    """openai backend: an Agents SDK model answering with the turns; ``.calls``: its settings.

    Args:
        turns: The answers, one per model call.
        model: The model name (what any-agent's span, hence pricing, sees).
    """

    def __init__(self, turns: Sequence[Turn], model: str = "gpt-4o-mini") -> None:
        super().__init__(turns)
        self.model = model

    @classmethod
    def factory(cls, turns: Sequence[Turn]) -> Callable[..., ScriptedModel]:
        """A ``model_type`` for ``AgentConfig``: any-agent calls it with ``model=...``."""
        return lambda model="gpt-4o-mini", **_: cls(turns, model)

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        """Return the next turn as a ``ModelResponse``."""
        settings: ModelSettings = kwargs.get("model_settings") or args[2]
        turn = self._next(copy.copy(settings))
        output: list[Any] = [
            ResponseFunctionToolCall(
                id=f"fc_{call_id}", call_id=call_id, type="function_call", name=name,
                arguments=json.dumps(arguments),
            )
            for name, arguments, call_id in turn.calls
        ]  # fmt: skip
        if turn.text:
            text = ResponseOutputText(type="output_text", text=turn.text, annotations=[])
            output.append(
                ResponseOutputMessage(
                    id=f"msg_{next(_ids)}",
                    type="message",
                    role="assistant",
                    status="completed",
                    content=[text],
                )
            )
        used = Usage(
            requests=1, input_tokens=turn.input_tokens, output_tokens=turn.output_tokens,
            total_tokens=turn.input_tokens + turn.output_tokens,
            input_tokens_details=InputTokensDetails.model_validate(
                {"cached_tokens": 0, "cache_write_tokens": 0}
            ),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        )  # fmt: skip
        return ModelResponse(output=output, usage=used, response_id=f"resp_{len(self.calls)}")

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # pragma: no cover
        """Not scripted: any-agent's ``run`` does not stream."""
        raise NotImplementedError("ScriptedModel does not stream")
