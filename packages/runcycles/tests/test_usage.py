"""Usage: the token convention, validation, the provider constructors and accumulation."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from runcycles import Amount, Unit, Usage


def _usd(amount: int) -> Amount:
    return Amount(unit=Unit.USD_MICROCENTS, amount=amount)


def test_defaults_are_zero_and_unpriced() -> None:
    usage = Usage()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (0, 0, 0)
    assert usage.model is None
    assert usage.provider is None
    assert usage.amount is None


def test_total_tokens_counts_parts_once() -> None:
    usage = Usage(
        input_tokens=100,
        output_tokens=40,
        cached_input_tokens=30,
        cache_write_tokens=20,
        reasoning_tokens=10,
    )
    assert usage.total_tokens == 140


def test_is_immutable_and_slotted() -> None:
    usage = Usage(input_tokens=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.input_tokens = 2  # type: ignore[misc]
    assert not hasattr(usage, "__dict__")


@pytest.mark.parametrize(
    "field",
    [
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
    ],
)
def test_negative_counts_are_refused(field: str) -> None:
    totals: dict[str, Any] = {"input_tokens": 10, "output_tokens": 10}
    with pytest.raises(ValueError, match=rf"Usage\.{field} must be >= 0, got -1"):
        Usage(**{**totals, field: -1})


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_non_int_counts_are_refused(value: Any) -> None:
    with pytest.raises(TypeError, match=r"Usage\.output_tokens must be an int"):
        Usage(output_tokens=value)


def test_cache_parts_larger_than_the_prompt_are_refused() -> None:
    Usage(input_tokens=10, cached_input_tokens=6, cache_write_tokens=4)  # exactly the total
    with pytest.raises(ValueError, match=r"exceed input_tokens \(10\).*from_anthropic"):
        Usage(input_tokens=10, cached_input_tokens=6, cache_write_tokens=5)


def test_reasoning_larger_than_the_output_is_refused() -> None:
    with pytest.raises(ValueError, match=r"reasoning_tokens \(11\) exceed output_tokens \(10\)"):
        Usage(output_tokens=10, reasoning_tokens=11)


def test_model_provider_and_amount_types_are_checked() -> None:
    with pytest.raises(TypeError, match=r"Usage\.model must be a str"):
        Usage(model=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Usage\.provider must be a str"):
        Usage(provider=b"openai")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Usage\.amount must be a runcycles\.Amount"):
        Usage(amount=500)  # type: ignore[arg-type]


# -- OpenAI ---------------------------------------------------------------------------------

CHAT = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
}
RESPONSES = {
    "input_tokens": 900,
    "output_tokens": 250,
    "total_tokens": 1150,
    "input_tokens_details": {"cached_tokens": 512, "cache_write_tokens": 100},
    "output_tokens_details": {"reasoning_tokens": 64},
}


def _as_object(value: Any) -> Any:
    """The SDKs' shape: nested objects with attributes instead of dicts."""
    if isinstance(value, dict):
        return SimpleNamespace(**{key: _as_object(item) for key, item in value.items()})
    return value


@pytest.mark.parametrize("wrap", [dict, _as_object], ids=["dict", "object"])
def test_from_openai_chat_completions(wrap: Any) -> None:
    usage = Usage.from_openai(wrap(CHAT), model="gpt-4o-2024-08-06")
    assert usage == Usage(
        input_tokens=1200,
        output_tokens=300,
        cached_input_tokens=1024,
        reasoning_tokens=128,
        model="gpt-4o-2024-08-06",
    )


@pytest.mark.parametrize("wrap", [dict, _as_object], ids=["dict", "object"])
def test_from_openai_responses_and_agents_sdk(wrap: Any) -> None:
    usage = Usage.from_openai(wrap(RESPONSES), model="o3", provider="azure")
    assert usage == Usage(
        input_tokens=900,
        output_tokens=250,
        cached_input_tokens=512,
        cache_write_tokens=100,
        reasoning_tokens=64,
        model="o3",
        provider="azure",
    )


def test_from_openai_treats_missing_or_none_details_as_zero() -> None:
    usage = Usage.from_openai(
        _as_object({"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": None})
    )
    assert usage == Usage(input_tokens=7, output_tokens=3)


def test_from_openai_refuses_other_shapes_and_bad_counts() -> None:
    with pytest.raises(ValueError, match=r"not an OpenAI usage.*prompt_tokens/completion_tokens"):
        Usage.from_openai({"tokens": 5})
    with pytest.raises(TypeError, match="prompt_tokens must be an int, got '5'"):
        Usage.from_openai({"prompt_tokens": "5", "completion_tokens": 1})


# -- Anthropic ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [dict, _as_object], ids=["dict", "object"])
def test_from_anthropic_adds_the_cache_back_into_the_prompt(wrap: Any) -> None:
    raw = {
        "input_tokens": 50,  # Anthropic: uncached prompt tokens only
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 300,
        "output_tokens": 400,
    }
    usage = Usage.from_anthropic(wrap(raw), model="claude-sonnet-4-5")
    assert usage == Usage(
        input_tokens=2350,
        output_tokens=400,
        cached_input_tokens=2000,
        cache_write_tokens=300,
        model="claude-sonnet-4-5",
    )


def test_from_anthropic_with_no_cache_fields() -> None:
    raw = {"input_tokens": 12, "output_tokens": 5, "cache_read_input_tokens": None}
    assert Usage.from_anthropic(raw, provider="bedrock") == Usage(
        input_tokens=12, output_tokens=5, provider="bedrock"
    )


def test_from_anthropic_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match="not an Anthropic usage"):
        Usage.from_anthropic({"prompt_tokens": 3})


LANGCHAIN = {  # AIMessage.usage_metadata
    "input_tokens": 100,
    "output_tokens": 40,
    "total_tokens": 140,
    "input_token_details": {"cache_read": 30, "cache_creation": 10},
    "output_token_details": {"reasoning": 25},
}


@pytest.mark.parametrize("wrap", [dict, _as_object], ids=["dict", "object"])
def test_from_langchain_usage_metadata(wrap: Any) -> None:
    usage = Usage.from_langchain(wrap(LANGCHAIN), model="gpt-4o", provider="azure")
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (100, 40, 140)
    assert (usage.cached_input_tokens, usage.cache_write_tokens) == (30, 10)
    assert usage.reasoning_tokens == 25
    assert (usage.model, usage.provider) == ("gpt-4o", "azure")


def test_from_langchain_tolerates_what_integrations_fill_unevenly() -> None:
    raw = {
        "input_tokens": 10,
        "output_tokens": "5",  # not an int: 0
        "input_token_details": {"cache_read": 8, "cache_creation": 9},  # more than is left
        "output_token_details": None,
    }
    usage = Usage.from_langchain(raw)
    assert (usage.input_tokens, usage.output_tokens) == (10, 0)
    assert (usage.cached_input_tokens, usage.cache_write_tokens) == (8, 2)
    assert usage.reasoning_tokens == 0
    assert Usage.from_langchain({"output_tokens": 3}) == Usage(output_tokens=3)


# -- accumulation ---------------------------------------------------------------------------


def test_add_sums_every_count_and_keeps_a_shared_model() -> None:
    first = Usage(
        input_tokens=100,
        output_tokens=20,
        cached_input_tokens=60,
        cache_write_tokens=10,
        reasoning_tokens=5,
        model="gpt-4o",
        provider="openai",
    )
    second = Usage(
        input_tokens=1,
        output_tokens=2,
        cached_input_tokens=1,
        reasoning_tokens=2,
        model="gpt-4o",
        provider="openai",
    )
    assert first + second == Usage(
        input_tokens=101,
        output_tokens=22,
        cached_input_tokens=61,
        cache_write_tokens=10,
        reasoning_tokens=7,
        model="gpt-4o",
        provider="openai",
    )
    assert sum([second, second], first) == first + second + second


def test_add_forgets_a_model_or_provider_that_differs() -> None:
    total = Usage(model="gpt-4o", provider="openai") + Usage(model="o3", provider="openai")
    assert total.model is None
    assert total.provider == "openai"


def test_add_sums_amounts_of_one_unit() -> None:
    total = Usage(amount=_usd(5)) + Usage(amount=_usd(7))
    assert total.amount == _usd(12)


def test_add_refuses_to_lose_an_amount_or_mix_units() -> None:
    with pytest.raises(ValueError, match="has an amount to one that has none"):
        Usage(amount=_usd(5)) + Usage(input_tokens=3, model="gpt-4o")
    with pytest.raises(ValueError, match="cannot add amounts in USD_MICROCENTS and TOKENS"):
        Usage(amount=_usd(5)) + Usage(amount=Amount(unit=Unit.TOKENS, amount=5))


def test_add_with_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Usage() + 1


def test_pickles() -> None:
    import pickle

    usage = Usage(
        input_tokens=9,
        output_tokens=4,
        cached_input_tokens=2,
        cache_write_tokens=1,
        reasoning_tokens=3,
        model="m",
        provider="p",
        amount=_usd(7),
    )
    assert pickle.loads(pickle.dumps(usage)) == usage
