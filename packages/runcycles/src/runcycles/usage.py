"""What one model call (or several calls of one model) used, in a provider-neutral shape.

:class:`Usage` is what :mod:`runcycles.pricing` prices. Its token convention is the one of
OpenAI and genai-prices:

* ``input_tokens`` is the **total** prompt size, *including* the tokens read from a prompt
  cache (``cached_input_tokens``) and the tokens written to it (``cache_write_tokens``);
  those two are parts of ``input_tokens``, so they can never exceed it together.
* ``output_tokens`` is the total completion size, *including* ``reasoning_tokens``.

Providers that count differently are converted by the constructors (``from_openai``,
``from_anthropic``, ``from_langchain``): Anthropic reports ``input_tokens`` *without* its
cache reads and writes, so :meth:`Usage.from_anthropic` adds them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runcycles.models import Amount

__all__ = ["Usage"]

_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
_FIELDS = (*_TOKEN_FIELDS, "model", "provider", "amount")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one model call used, the model that served it, or a price already known.

    Attributes:
        input_tokens: All prompt tokens, including ``cached_input_tokens`` and
            ``cache_write_tokens``.
        output_tokens: All completion tokens, including ``reasoning_tokens``.
        cached_input_tokens: The part of ``input_tokens`` read from the provider's prompt cache.
        cache_write_tokens: The part of ``input_tokens`` written to the provider's prompt cache.
        reasoning_tokens: The part of ``output_tokens`` spent on reasoning ("thinking").
        model: The model name as the provider reports it (``"gpt-4o-2024-08-06"``); may carry
            a provider prefix (``"openai:gpt-4o"``, ``"openai/gpt-4o"``).
        provider: The provider (``"openai"``, ``"anthropic"``, ``"google"``...), when known.
        amount: A cost already known (e.g. reported by the provider): a pricer returns it as
            it is, without looking at the tokens.

    Raises:
        TypeError: A count is not an ``int`` (``bool`` and ``float`` are refused), ``model``
            or ``provider`` is not a ``str``, or ``amount`` is not an :class:`Amount`.
        ValueError: A count is negative, or a part is larger than its total.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    provider: str | None = None
    amount: Amount | None = None

    def __post_init__(self) -> None:
        for name in _TOKEN_FIELDS:
            _check_count(getattr(self, name), name)
        for name in ("model", "provider"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"Usage.{name} must be a str or None, got {value!r}")
        if self.amount is not None and not isinstance(self.amount, Amount):
            raise TypeError(
                f"Usage.amount must be a runcycles.Amount or None, got {self.amount!r}: "
                "pass Amount(unit=Unit.USD_MICROCENTS, amount=...)"
            )
        cache_parts = self.cached_input_tokens + self.cache_write_tokens
        if cache_parts > self.input_tokens:
            raise ValueError(
                f"cached_input_tokens ({self.cached_input_tokens}) + cache_write_tokens "
                f"({self.cache_write_tokens}) exceed input_tokens ({self.input_tokens}): "
                "input_tokens must be the total prompt size including cached and cache-write "
                "tokens (use Usage.from_anthropic for Anthropic's counts, which exclude them)"
            )
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError(
                f"reasoning_tokens ({self.reasoning_tokens}) exceed output_tokens "
                f"({self.output_tokens}): output_tokens must be the total including reasoning"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit, so that pickling works on Python 3.10 too (frozen + slots).
        return (Usage, tuple(getattr(self, name) for name in _FIELDS))

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens (cached, cache-write and reasoning tokens are inside them)."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: object) -> Usage:
        """Accumulate the usage of two calls.

        Token counts add up. ``model`` and ``provider`` are kept when both sides agree and
        become ``None`` when they differ (price calls of different models separately and add
        the prices). Amounts add up when both are set in the same unit.

        Raises:
            ValueError: Only one side has an ``amount``, or the amounts' units differ
                (adding them would lose or invent spend: price each usage and add the
                results).
        """
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            model=self.model if self.model == other.model else None,
            provider=self.provider if self.provider == other.provider else None,
            amount=_add_amounts(self.amount, other.amount),
        )

    @classmethod
    def from_openai(
        cls, usage: object, *, model: str | None = None, provider: str | None = None
    ) -> Usage:
        """Convert an OpenAI usage object or dict.

        Both shapes are accepted: Chat Completions (``prompt_tokens``, ``completion_tokens``,
        ``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``)
        and the Responses API / Agents SDK (``input_tokens``, ``output_tokens``,
        ``input_tokens_details.cached_tokens`` and ``.cache_write_tokens``,
        ``output_tokens_details.reasoning_tokens``).
        OpenAI's counts already follow this class's convention. Missing or ``None`` details
        count as 0.

        Args:
            usage: ``response.usage`` (an object with attributes) or its ``dict`` form.
            model: The model that served the call (``response.model``).
            provider: The provider, when it is not OpenAI itself (``"azure"``...).

        Raises:
            ValueError: ``usage`` has neither shape.
            TypeError: A count is not an ``int``.
        """
        if _get(usage, "prompt_tokens") is not None or _get(usage, "completion_tokens") is not None:
            prefix, fields = "Chat Completions", ("prompt_tokens", "completion_tokens")
        elif _get(usage, "input_tokens") is not None or _get(usage, "output_tokens") is not None:
            prefix, fields = "Responses", ("input_tokens", "output_tokens")
        else:
            raise ValueError(
                f"not an OpenAI usage: {usage!r} has neither prompt_tokens/completion_tokens "
                "(Chat Completions) nor input_tokens/output_tokens (Responses API, Agents SDK); "
                "pass response.usage, or build Usage(...) yourself"
            )
        source = f"OpenAI {prefix} usage"
        input_name, output_name = fields
        return cls(
            input_tokens=_count(usage, input_name, source),
            output_tokens=_count(usage, output_name, source),
            cached_input_tokens=_count(
                _get(usage, f"{input_name}_details"), "cached_tokens", source
            ),
            cache_write_tokens=_count(
                _get(usage, f"{input_name}_details"), "cache_write_tokens", source
            ),
            reasoning_tokens=_count(
                _get(usage, f"{output_name}_details"), "reasoning_tokens", source
            ),
            model=model,
            provider=provider,
        )

    @classmethod
    def from_anthropic(
        cls, usage: object, *, model: str | None = None, provider: str | None = None
    ) -> Usage:
        """Convert an Anthropic usage object or dict (``message.usage``).

        Anthropic's ``input_tokens`` *excludes* ``cache_read_input_tokens`` and
        ``cache_creation_input_tokens``; they are added back so that ``input_tokens`` is the
        total prompt size. Thinking tokens are inside Anthropic's ``output_tokens`` and are not
        reported apart, so ``reasoning_tokens`` stays 0.

        Args:
            usage: ``message.usage`` (an object with attributes) or its ``dict`` form.
            model: The model that served the call (``message.model``).
            provider: The provider, when it is not Anthropic itself (``"bedrock"``...).

        Raises:
            ValueError: ``usage`` has no ``input_tokens`` nor ``output_tokens``.
            TypeError: A count is not an ``int``.
        """
        if _get(usage, "input_tokens") is None and _get(usage, "output_tokens") is None:
            raise ValueError(
                f"not an Anthropic usage: {usage!r} has no input_tokens/output_tokens; "
                "pass message.usage, or build Usage(...) yourself"
            )
        source = "Anthropic usage"
        cache_read = _count(usage, "cache_read_input_tokens", source)
        cache_write = _count(usage, "cache_creation_input_tokens", source)
        return cls(
            input_tokens=_count(usage, "input_tokens", source) + cache_read + cache_write,
            output_tokens=_count(usage, "output_tokens", source),
            cached_input_tokens=cache_read,
            cache_write_tokens=cache_write,
            model=model,
            provider=provider,
        )

    @classmethod
    def from_langchain(
        cls, usage: object, *, model: str | None = None, provider: str | None = None
    ) -> Usage:
        """Convert LangChain's ``usage_metadata`` (``AIMessage.usage_metadata``), any provider.

        LangChain's convention is this class's: ``input_tokens`` is the whole prompt (its
        ``input_token_details`` ``cache_read`` and ``cache_creation`` are parts of it) and
        ``output_tokens`` includes ``output_token_details.reasoning``. Provider integrations
        fill the details unevenly, so a missing or non-``int`` count is 0 and a part larger
        than what is left of its total is cut to it: a wrong detail never makes a finished
        call's usage unpriceable (the totals, what the call is charged by, are kept).

        Args:
            usage: ``message.usage_metadata`` (a dict, or an object with attributes).
            model: The model that served the call (``response_metadata["model_name"]``).
            provider: The provider, when the model name alone is ambiguous.
        """
        inp, out = _loose(usage, "input_tokens"), _loose(usage, "output_tokens")
        details_in = _get(usage, "input_token_details")
        cached = min(_loose(details_in, "cache_read"), inp)
        return cls(
            input_tokens=inp,
            output_tokens=out,
            cached_input_tokens=cached,
            cache_write_tokens=min(_loose(details_in, "cache_creation"), inp - cached),
            reasoning_tokens=min(_loose(_get(usage, "output_token_details"), "reasoning"), out),
            model=model,
            provider=provider,
        )


def _check_count(value: object, name: str) -> None:
    if type(value) is not int:
        raise TypeError(f"Usage.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"Usage.{name} must be >= 0, got {value}")


def _get(source: object, name: str) -> Any:
    """Read ``name`` from a mapping or an object; ``None`` when absent."""
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _count(source: object, name: str, what: str) -> int:
    value = _get(source, name)
    if value is None:
        return 0
    if type(value) is not int:
        raise TypeError(f"{what}: {name} must be an int, got {value!r}")
    return value


def _loose(source: object, name: str) -> int:
    value = _get(source, name)
    return value if type(value) is int else 0


def _add_amounts(left: Amount | None, right: Amount | None) -> Amount | None:
    if left is None and right is None:
        return None
    if left is None or right is None:
        raise ValueError(
            "cannot add a Usage that has an amount to one that has none (the sum would be "
            "priced either by the amount, losing the other's tokens, or by the tokens, losing "
            "the amount): price each usage and add the results"
        )
    if left.unit != right.unit:
        raise ValueError(
            f"cannot add amounts in {left.unit} and {right.unit}: price each usage separately"
        )
    return Amount(unit=left.unit, amount=left.amount + right.amount)
