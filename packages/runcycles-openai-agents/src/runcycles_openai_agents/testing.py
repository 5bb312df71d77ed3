"""A scripted Agents SDK model: drive real runs offline, with no API key (tests, docs, demos).

::

    model = ScriptedModel([
        [tool_call("search", {"q": "refunds"})],          # turn 1: call a tool
        [reply("Refunds take 5 days.")],                    # turn 2: answer
    ], usage=usage(1_200, 300))
    agent = Agent(name="support", model=model, tools=[search])
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from agents import ModelSettings, Usage
from agents.items import ModelResponse
from agents.models.interface import Model
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

__all__ = ["ScriptedModel", "reply", "tool_call", "usage"]

_ids = itertools.count(1)


def tool_call(name: str, arguments: dict[str, Any] | None = None, call_id: str = "") -> Any:
    """A function call the model makes (``call_id`` default: a fresh one)."""
    call_id = call_id or f"call_{next(_ids)}"
    return ResponseFunctionToolCall(
        id=f"fc_{call_id}", call_id=call_id, type="function_call", name=name,
        arguments=json.dumps(arguments or {}),
    )  # fmt: skip


def reply(text: str) -> Any:
    """A final text answer."""
    content: list[Any] = [ResponseOutputText(type="output_text", text=text, annotations=[])]
    return ResponseOutputMessage(
        id=f"msg_{next(_ids)}", type="message", role="assistant", status="completed",
        content=content,
    )  # fmt: skip


def usage(input_tokens: int, output_tokens: int, *, cached: int = 0, reasoning: int = 0) -> Usage:
    """One model call's usage (``cached`` input and ``reasoning`` output tokens are parts)."""
    return Usage(
        requests=1, input_tokens=input_tokens, output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_tokens_details=InputTokensDetails.model_validate(
            {"cached_tokens": cached, "cache_write_tokens": 0}
        ),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
    )  # fmt: skip


class ScriptedModel(Model):
    """Answers each model call with the next scripted turn; records what it was called with.

    Args:
        turns: One list of output items per call, or ``(items, Usage)`` pairs.
        usage: The usage of turns given without one (default 100 in, 20 out).
        name: The model name (what pricing sees through ``agent.model``).
    """

    def __init__(
        self, turns: Sequence[Any], *, usage: Usage | None = None, name: str = "gpt-4o-mini"
    ) -> None:
        self.turns = list(turns)
        self.default_usage = usage
        self.model = name
        self.calls: list[ModelSettings] = []

    def _next(self, settings: ModelSettings) -> tuple[list[Any], Usage]:
        self.calls.append(copy.copy(settings))  # as it was at call time
        if not self.turns:
            raise RuntimeError(f"ScriptedModel: no turn left for call {len(self.calls)}")
        turn = self.turns.pop(0)
        if isinstance(turn, tuple):
            return list(turn[0]), turn[1]
        return list(turn), self.default_usage or globals()["usage"](100, 20)

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """Return the next turn."""
        output, used = self._next(kwargs.get("model_settings") or args[2])
        return ModelResponse(output=output, usage=used, response_id=f"resp_{len(self.calls)}")

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Stream the next turn as one ``response.completed`` event."""
        output, used = self._next(kwargs.get("model_settings") or args[2])
        details = used.input_tokens_details
        response = Response(
            id=f"resp_{len(self.calls)}", created_at=0, model=self.model, object="response",
            output=output, tool_choice="auto", tools=[], top_p=None, parallel_tool_calls=True,
            status="completed",
            usage=ResponseUsage(
                input_tokens=used.input_tokens, output_tokens=used.output_tokens,
                total_tokens=used.total_tokens,
                input_tokens_details=InputTokensDetails.model_validate(details.model_dump()),
                output_tokens_details=used.output_tokens_details,
            ),
        )  # fmt: skip
        yield ResponseCompletedEvent(
            type="response.completed", response=response, sequence_number=0
        )
