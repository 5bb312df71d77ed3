"""runcycles.pricing: exact prices from genai-prices' own figures, custom tables, policies."""

from __future__ import annotations

import logging
import math
import pickle
import re
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from runcycles import (
    Amount,
    CyclesConfigError,
    CyclesError,
    ModelPrice,
    Pricer,
    Unit,
    UnknownModelError,
    Usage,
)
from runcycles.pricing import (
    DEFAULT_PROMPT_TOKENS,
    default_pricer,
    estimate,
    price,
    rough_token_count,
)

MICROCENTS_PER_USD = 10**8


def _figures(model: str, provider: str | None = None) -> Any:
    """genai-prices' own price record for a model (USD per million tokens, as Decimals)."""
    return calc_price(GenaiUsage(), model, provider_id=provider).model_price


def _from_figures(usage: Usage, figures: Any) -> int:
    """The expected microcents, computed here from the table's Decimal figures (untiered)."""
    rates = {
        key: getattr(figures, key)
        for key in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    }
    assert all(value is None or isinstance(value, Decimal) for value in rates.values()), rates
    plain_in = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    usd = (
        Fraction(plain_in * rates["input_mtok"])
        + Fraction(usage.cached_input_tokens * (rates["cache_read_mtok"] or rates["input_mtok"]))
        + Fraction(usage.cache_write_tokens * (rates["cache_write_mtok"] or rates["input_mtok"]))
        + Fraction(usage.output_tokens * rates["output_mtok"])
    ) / 10**6
    return math.ceil(usd * MICROCENTS_PER_USD)


def _genai_total(usage: Usage, model: str, provider: str | None = None) -> int:
    """genai-prices' own total for the same usage, rounded up to a microcent."""
    genai_usage = GenaiUsage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )
    total = calc_price(genai_usage, model, provider_id=provider).total_price
    return math.ceil(total * MICROCENTS_PER_USD)


# -- against genai-prices' figures ----------------------------------------------------------

PROVIDER_MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet"),
    ("anthropic", "claude-3-haiku"),
    ("google", "gemini-2.5-flash"),
    ("google", "gemini-2.0-flash-lite"),
]
USAGES = [
    Usage(input_tokens=1_234, output_tokens=567),
    Usage(input_tokens=10_000, output_tokens=2_000, cached_input_tokens=8_192),
    Usage(input_tokens=5_000, output_tokens=333, cached_input_tokens=1_000, cache_write_tokens=3),
    Usage(input_tokens=7, output_tokens=1),
]


@pytest.mark.parametrize(("provider", "model"), PROVIDER_MODELS)
@pytest.mark.parametrize("usage", USAGES, ids=lambda u: f"{u.input_tokens}in")
def test_prices_follow_the_tables_own_figures(provider: str, model: str, usage: Usage) -> None:
    priced = Usage(**{**_fields(usage), "model": model, "provider": provider})
    figures = _figures(model, provider)
    expected = _from_figures(priced, figures)

    assert Pricer().price(priced) == expected
    assert Pricer().price(priced) == _genai_total(priced, model, provider)


def _fields(usage: Usage) -> dict[str, Any]:
    return {field: getattr(usage, field) for field in Usage.__dataclass_fields__}


def test_cached_tokens_are_cheaper_where_the_table_says_so() -> None:
    figures = _figures("gpt-4o")
    assert figures.cache_read_mtok < figures.input_mtok  # the premise of this test
    pricer = Pricer()
    cold = pricer.price(Usage(input_tokens=100_000, model="gpt-4o"))
    warm = pricer.price(Usage(input_tokens=100_000, cached_input_tokens=100_000, model="gpt-4o"))
    assert cold == math.ceil(Fraction(100_000 * figures.input_mtok) * 100)
    assert warm == math.ceil(Fraction(100_000 * figures.cache_read_mtok) * 100)


def test_reasoning_tokens_cost_the_output_rate_when_the_table_has_no_reasoning_rate() -> None:
    figures = _figures("o3")
    assert figures.output_reasoning_mtok is None
    pricer = Pricer()
    plain = pricer.price(Usage(output_tokens=1_000, model="o3"))
    thinking = pricer.price(Usage(output_tokens=1_000, reasoning_tokens=900, model="o3"))
    assert plain == thinking == math.ceil(Fraction(1_000 * figures.output_mtok) * 100)


@pytest.mark.parametrize(
    ("model", "above"), [("claude-sonnet-4-5", 200_000), ("gemini-2.5-pro", 200_000)]
)
def test_tiered_prices_switch_on_the_prompt_size(model: str, above: int) -> None:
    figures = _figures(model)
    tiers = figures.input_mtok.tiers
    assert [tier.start for tier in tiers] == [above]  # the premise of this test
    pricer = Pricer()
    for prompt in (above, above + 1):
        usage = Usage(input_tokens=prompt, output_tokens=1_000, cached_input_tokens=50, model=model)
        assert pricer.price(usage) == _genai_total(usage, model)
    small = pricer.price(Usage(input_tokens=above, model=model))
    large = pricer.price(Usage(input_tokens=above + 1, model=model))
    assert small == math.ceil(Fraction(above * figures.input_mtok.base) * 100)
    assert large == math.ceil(Fraction((above + 1) * tiers[0].price) * 100)


def test_time_dependent_prices_match_genai_prices_now() -> None:
    info = calc_price(GenaiUsage(), "o3").model
    assert isinstance(info.prices, list)  # conditional prices: the premise of this test
    usage = Usage(input_tokens=3_000, output_tokens=700, cached_input_tokens=1_000, model="o3")
    pricer = Pricer()
    assert pricer.price(usage) == pricer.price(usage) == _genai_total(usage, "o3")


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", None),
        ("GPT-4o", None),
        ("openai:gpt-4o", None),
        ("openai/gpt-4o", None),
        ("gpt-4o", "openai"),
        ("gpt-4o-2024-08-06", None),
        ("gpt-4o", "some-gateway"),
    ],
)
def test_model_names_match_in_every_spelling(model: str, provider: str | None) -> None:
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    reference = Pricer().price(Usage(**{**_fields(usage), "model": "gpt-4o"}))
    spelled = Usage(**{**_fields(usage), "model": model, "provider": provider})
    assert Pricer().price(spelled) == reference
    assert reference == _from_figures(usage, _figures("gpt-4o"))


def test_a_dated_variant_is_priced_as_genai_prices_matches_it() -> None:
    dated = "claude-3-5-sonnet-20241022"
    usage = Usage(input_tokens=4_000, output_tokens=900, model=dated)
    assert Pricer().price(usage) == _from_figures(usage, _figures(dated))


# -- hand-checked literal cases (custom table, so the figures cannot drift) ------------------

TABLE = {
    "acme-large": ModelPrice(
        input_per_mtok="2.5",
        output_per_mtok="10",
        cached_input_per_mtok="1.25",
        cache_write_per_mtok="3.125",
    ),
    "acme-thinker": ModelPrice(input_per_mtok=1, output_per_mtok=4, reasoning_per_mtok=2),
    "acme-tiny": ModelPrice(input_per_mtok="0.001", output_per_mtok="0.005"),
}


def test_literal_case_with_cache_reads_and_writes() -> None:
    # 1 USD per Mtok = 10**8 microcents / 10**6 tokens = 100 microcents per token.
    # plain input  (10_000 - 6_000 - 1_000) * 2.5   * 100 =   750_000
    # cached input                  6_000 * 1.25  * 100 =   750_000
    # cache writes                  1_000 * 3.125 * 100 =   312_500
    # output                        2_000 * 10    * 100 = 2_000_000
    #                                                total 3_812_500 microcents ($0.038125)
    usage = Usage(
        input_tokens=10_000,
        output_tokens=2_000,
        cached_input_tokens=6_000,
        cache_write_tokens=1_000,
        model="acme-large",
    )
    assert Pricer(table=TABLE, builtin=False).price(usage) == 3_812_500


def test_literal_case_with_a_reasoning_rate() -> None:
    # input 100 * 1 * 100 = 10_000; plain output (50 - 30) * 4 * 100 = 8_000;
    # reasoning 30 * 2 * 100 = 6_000; total 24_000
    usage = Usage(input_tokens=100, output_tokens=50, reasoning_tokens=30, model="acme-thinker")
    assert Pricer(table=TABLE, builtin=False).price(usage) == 24_000


def test_rounding_is_up_once_per_priced_usage() -> None:
    pricer = Pricer(table=TABLE, builtin=False)
    # acme-tiny: 0.001 USD/Mtok = 0.1 microcent per input token, 0.5 per output token.
    # 1 input token = 0.1 microcent -> rounded up to 1
    assert pricer.price(Usage(input_tokens=1, model="acme-tiny")) == 1
    # 7 input (0.7) + 1 output (0.5) = 1.2 -> 2
    assert pricer.price(Usage(input_tokens=7, output_tokens=1, model="acme-tiny")) == 2
    # 5 input (0.5) + 1 output (0.5) = exactly 1.0 -> 1 (rounding each part up would say 2)
    assert pricer.price(Usage(input_tokens=5, output_tokens=1, model="acme-tiny")) == 1
    # an exact whole number is not rounded
    assert pricer.price(Usage(input_tokens=10, model="acme-tiny")) == 1
    assert pricer.price(Usage(model="acme-tiny")) == 0


def test_genai_price_with_a_fraction_of_a_microcent_rounds_up() -> None:
    model = "gemini-2.0-flash-lite"
    exact = Fraction(_figures(model).input_mtok) * 100  # microcents for one input token
    assert exact.denominator != 1  # the premise: e.g. $0.075/Mtok = 7.5 microcents a token
    pricer = Pricer()
    assert pricer.price(Usage(input_tokens=1, model=model)) == math.floor(exact) + 1
    assert pricer.price(Usage(input_tokens=2, model=model)) == 2 * exact  # whole: not rounded


# -- overrides and custom tables --------------------------------------------------------------


def test_overrides_win_over_the_table_and_genai_prices() -> None:
    cheap = ModelPrice(input_per_mtok="0.01", output_per_mtok="0.02")
    pricer = Pricer(overrides={"gpt-4o": cheap}, table={"gpt-4o": TABLE["acme-large"]})
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, model="gpt-4o")
    assert pricer.price(usage) == 3_000_000  # (0.01 + 0.02) USD = 3 cents
    assert Pricer(table={"gpt-4o": TABLE["acme-large"]}).price(usage) == 1_250_000_000


def test_override_keys_may_name_the_provider() -> None:
    price_a = ModelPrice(input_per_mtok=1, output_per_mtok=1)
    price_b = ModelPrice(input_per_mtok=2, output_per_mtok=2)
    pricer = Pricer(overrides={"azure:gpt-4o": price_a, "gpt-4o": price_b}, builtin=False)
    tokens = 1_000_000
    assert pricer.price(Usage(tokens, model="gpt-4o", provider="azure")) == 100_000_000
    assert pricer.price(Usage(tokens, model="Azure/GPT-4o")) == 100_000_000
    assert pricer.price(Usage(tokens, model="gpt-4o", provider="openai")) == 200_000_000


class CountingTable:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def lookup(self, model: str, provider: str | None) -> ModelPrice | None:
        self.calls.append((model, provider))
        return TABLE.get(model)


def test_a_price_table_object_is_asked_once_per_model() -> None:
    table = CountingTable()
    pricer = Pricer(table=table, builtin=False)
    usage = Usage(input_tokens=10_000, output_tokens=2_000, model="acme:acme-large")
    assert [pricer.price(usage) for _ in range(3)] == [4_500_000] * 3
    assert table.calls == [("acme-large", "acme")]
    pricer.clear_cache()
    pricer.price(usage)
    assert len(table.calls) == 2


def test_the_lookup_cache_is_bounded() -> None:
    table = CountingTable()
    pricer = Pricer(table=table, builtin=False, cache_size=2)
    for model in ("acme-large", "acme-tiny", "acme-thinker", "acme-large"):
        pricer.price(Usage(input_tokens=1, model=model))
    assert [model for model, _ in table.calls] == [
        "acme-large",
        "acme-tiny",
        "acme-thinker",
        "acme-large",  # evicted by acme-thinker, looked up again
    ]


def test_a_custom_table_is_consulted_before_genai_prices() -> None:
    own = ModelPrice(input_per_mtok=1, output_per_mtok=1)
    pricer = Pricer(table={"gpt-4o": own})
    assert pricer.price(Usage(input_tokens=1_000_000, model="gpt-4o")) == 100_000_000


def test_bad_tables_are_refused() -> None:
    with pytest.raises(TypeError, match="overrides must map model names"):
        Pricer(overrides={"gpt-4o": {"input": "1"}})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="lookup"):
        Pricer(table=["gpt-4o"])  # type: ignore[arg-type]

    class Broken:
        def lookup(self, model: str, provider: str | None) -> Any:
            return "2.5"

    with pytest.raises(TypeError, match="not a ModelPrice"):
        Pricer(table=Broken(), builtin=False).price(Usage(model="x"))


# -- ModelPrice -------------------------------------------------------------------------------


def test_model_price_accepts_decimal_str_and_int() -> None:
    price_ = ModelPrice(Decimal("2.50"), "10", cached_input_per_mtok=1)
    assert price_.input_per_mtok == Decimal("2.5")
    assert price_.output_per_mtok == Decimal(10)
    assert price_.cached_input_per_mtok == Decimal(1)
    assert price_.cache_write_per_mtok is None
    assert price_ == ModelPrice("2.5", 10, "1")


def test_model_price_pickles() -> None:
    rate = ModelPrice("2.5", "10", "1.25", "3.125", "7")
    assert pickle.loads(pickle.dumps(rate)) == rate


def test_model_price_refuses_floats_with_a_fix() -> None:
    with pytest.raises(TypeError, match=r"float 2\.5: pass the price as a string, e.g. '2\.5'"):
        ModelPrice(input_per_mtok=2.5, output_per_mtok="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reasoning_per_mtok got the float"):
        ModelPrice("1", "1", reasoning_per_mtok=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("-1", ValueError, "must be a finite price >= 0"),
        (Decimal("NaN"), ValueError, "must be a finite price >= 0"),
        ("Infinity", ValueError, "must be a finite price >= 0"),
        ("two", ValueError, "is not a number"),
        (True, TypeError, "must be a Decimal, str or int"),
        (None, TypeError, "must be a Decimal, str or int"),
    ],
)
def test_model_price_validation(value: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"ModelPrice.input_per_mtok {message}|{message}"):
        ModelPrice(input_per_mtok=value, output_per_mtok="1")


# -- unknown models -----------------------------------------------------------------------------

UNKNOWN = Usage(input_tokens=1_000, output_tokens=1_000, model="no-such-model-xyz")


def test_unknown_model_error_by_default() -> None:
    with pytest.raises(UnknownModelError, match=r"'no-such-model-xyz'.*overrides=") as caught:
        Pricer().price(UNKNOWN)
    assert isinstance(caught.value, CyclesError)
    assert caught.value.model == "no-such-model-xyz"
    with pytest.raises(UnknownModelError):
        Pricer().cost(UNKNOWN)


def test_a_usage_without_a_model_cannot_be_priced() -> None:
    with pytest.raises(UnknownModelError, match=r"names no model.*Usage\(model=\.\.\.\)"):
        Pricer(builtin=False).price(Usage(input_tokens=1))


def test_unknown_model_error_pickles() -> None:
    error = UnknownModelError("m", "p", "detail")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.model, copy.provider, str(copy)) == ("m", "p", str(error))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "runcycles.pricing" and record.levelno == logging.WARNING
    ]


def test_estimate_policy_says_commit_the_estimate_and_warns_once_per_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pricer = Pricer(unknown_model="estimate")
    with caplog.at_level(logging.WARNING, logger="runcycles.pricing"):
        assert [pricer.cost(UNKNOWN) for _ in range(3)] == [None, None, None]
        other = Usage(input_tokens=1, model="another-unknown-model")
        assert pricer.cost(other) is None
        assert pricer.cost(Usage(input_tokens=1, model="gpt-4o")) is not None
    messages = _warnings(caplog)
    assert len(messages) == 2
    assert "no-such-model-xyz" in messages[0]
    assert "estimate" in messages[0]
    assert "another-unknown-model" in messages[1]
    with pytest.raises(UnknownModelError, match=r"Pricer\.cost\(\)"):
        pricer.price(UNKNOWN)
    with pytest.raises(UnknownModelError, match="cannot estimate"):
        pricer.estimate("no-such-model-xyz", max_tokens=10)


def test_each_pricer_warns_for_itself(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runcycles.pricing"):
        Pricer(unknown_model="estimate", builtin=False).cost(UNKNOWN)
        Pricer(unknown_model="estimate", builtin=False).cost(UNKNOWN)
    assert len(_warnings(caplog)) == 2


def test_default_rate_policy_prices_unknown_models_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rate = ModelPrice(input_per_mtok=3, output_per_mtok=15)
    pricer = Pricer(unknown_model="default_rate", default_rate=rate)
    with caplog.at_level(logging.WARNING, logger="runcycles.pricing"):
        # 1_000 * 3 * 100 + 1_000 * 15 * 100
        assert [pricer.price(UNKNOWN) for _ in range(2)] == [1_800_000, 1_800_000]
        assert pricer.estimate("no-such-model-xyz", max_tokens=1_000, prompt_tokens=1_000) == (
            1_800_000
        )
    messages = _warnings(caplog)
    assert len(messages) == 1
    assert "default rate" in messages[0]


def test_the_error_policy_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="runcycles.pricing"),
        pytest.raises(UnknownModelError),
    ):
        Pricer(builtin=False).price(UNKNOWN)
    assert not _warnings(caplog)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unknown_model": "ignore"}, "unknown_model must be one of 'error', 'estimate'"),
        ({"unknown_model": "default_rate"}, "needs default_rate=ModelPrice"),
        ({"default_rate": ModelPrice(1, 1)}, "only used with it"),
        (
            {"unknown_model": "default_rate", "default_rate": {"input": 1}},
            "default_rate must be a ModelPrice",
        ),
        ({"default_prompt_tokens": -1}, "default_prompt_tokens must be an int >= 0"),
        ({"cache_size": 0}, "cache_size must be an int >= 1"),
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(CyclesConfigError, match=re.escape(message)):
        Pricer(**options)


# -- amounts, estimates, module helpers -----------------------------------------------------------


def test_a_known_amount_is_returned_as_it_is() -> None:
    usage = Usage(input_tokens=10**6, amount=Amount(unit=Unit.USD_MICROCENTS, amount=4_321))
    assert Pricer(builtin=False).price(usage) == 4_321


def test_an_amount_in_another_unit_is_refused() -> None:
    usage = Usage(amount=Amount(unit=Unit.TOKENS, amount=5))
    with pytest.raises(ValueError, match=r"usage\.amount is in TOKENS.*USD_MICROCENTS"):
        Pricer(builtin=False).price(usage)


def test_only_usage_is_priced() -> None:
    with pytest.raises(TypeError, match=r"Usage\.from_openai"):
        Pricer().price({"prompt_tokens": 3})  # type: ignore[arg-type]


def test_estimate_is_the_worst_case() -> None:
    pricer = Pricer(table=TABLE, builtin=False)
    # 2_000 prompt tokens * 2.5 * 100 + 500 max output tokens * 10 * 100
    assert pricer.estimate("acme-large", max_tokens=500, prompt_tokens=2_000) == 1_000_000
    # no prompt size: DEFAULT_PROMPT_TOKENS (4_000) * 2.5 * 100 + 500_000
    assert DEFAULT_PROMPT_TOKENS == 4_000
    assert pricer.estimate("acme-large", max_tokens=500) == 1_500_000
    smaller = Pricer(table=TABLE, builtin=False, default_prompt_tokens=1_000)
    assert smaller.estimate("acme-large", max_tokens=500) == 750_000


def test_estimate_validates_counts() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        Pricer(table=TABLE, builtin=False).estimate("acme-large", max_tokens=-1)


def test_estimate_with_genai_prices_uses_the_uncached_input_rate() -> None:
    figures = _figures("gpt-4o")
    expected = math.ceil(Fraction(3_000 * figures.input_mtok + 1_000 * figures.output_mtok) * 100)
    assert Pricer().estimate("gpt-4o", max_tokens=1_000, prompt_tokens=3_000) == expected
    assert estimate("gpt-4o", max_tokens=1_000, prompt_tokens=3_000) == expected


def test_rough_token_count_is_four_characters_per_token_rounded_up() -> None:
    assert rough_token_count("") == 0
    assert rough_token_count("abcd") == 1
    assert rough_token_count("abcde") == 2


def test_module_level_price_uses_one_default_pricer() -> None:
    assert default_pricer() is default_pricer()
    usage = Usage(input_tokens=100, output_tokens=10, model="gpt-4o")
    assert price(usage) == Pricer().price(usage)
    assert default_pricer().unknown_model == "error"


def test_a_missing_genai_prices_is_a_configuration_error_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "genai_prices", None)  # as if not installed (Python 3.10)
    with pytest.raises(CyclesConfigError, match=r"pip install genai-prices.*builtin=False"):
        Pricer().price(Usage(input_tokens=1, model="gpt-4o"))
    own = Pricer(table=TABLE, builtin=False)
    assert own.price(Usage(input_tokens=10, model="acme-tiny")) == 1


# -- the hot path ---------------------------------------------------------------------------------


def test_pricing_a_known_model_again_is_cheap() -> None:
    import time

    pricer = Pricer()
    usage = Usage(input_tokens=1_200, output_tokens=300, cached_input_tokens=200, model="gpt-4o")
    pricer.price(usage)  # the lookup
    started = time.perf_counter()
    for _ in range(10_000):
        pricer.price(usage)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"10k prices of a cached model took {elapsed:.3f}s"


# -- docs/pricing.md ------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[3] / "docs" / "pricing.md"
BLOCK = re.compile(r"<!-- example: offline -->\n```python\n(.*?)```", re.DOTALL)


def test_the_pricing_page_examples_run() -> None:
    blocks = BLOCK.findall(DOCS.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    for index, code in enumerate(blocks):
        exec(compile(code, f"docs/pricing.md#{index + 1}", "exec"), {"__name__": "__main__"})
