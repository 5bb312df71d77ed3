"""Price a :class:`~runcycles.usage.Usage` in ``USD_MICROCENTS`` (1 USD = 10**8 microcents).

::

    pricer = Pricer()                                   # genai-prices' table, unknown -> error
    cost = pricer.price(Usage(input_tokens=1200, output_tokens=300, model="gpt-4o"))

Where a price comes from, first match wins: ``overrides`` (a ``Mapping`` of model name to
:class:`ModelPrice`), then ``table`` (a ``Mapping`` or a :class:`PriceTable`), then the
built-in table of `genai-prices <https://pypi.org/project/genai-prices/>`_ (offline data,
imported the first time it is needed; ``builtin=False`` turns it off). A model found nowhere
is handled by ``unknown_model``: ``"error"``, ``"estimate"`` or ``"default_rate"``.

**Arithmetic and rounding.** Every rate is an exact decimal (``Decimal``/``str``/``int``,
never ``float``). Each part of the usage (plain input, cached input, cache writes, plain
output, reasoning, plus the per-request fee a few models have) is multiplied by its rate with
exact rational arithmetic, the parts are summed, and the sum is rounded **up** to the next
whole microcent, once per priced usage: a budget authority never under-charges, and rounds
at most one microcent per call.

**Which rate.** Cached input tokens use the table's cache-read rate, cache writes its
cache-write rate, reasoning tokens its reasoning rate; a rate the table does not give falls
back to the input rate (cached, cache write) or the output rate (reasoning). Tiered prices
("above 200k prompt tokens every token costs more") are chosen by ``input_tokens``, as
genai-prices does. Time-dependent prices are resolved at the time of pricing.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

from runcycles.exceptions import CyclesConfigError, CyclesError
from runcycles.models import Unit
from runcycles.usage import Usage

__all__ = [
    "DEFAULT_PROMPT_TOKENS",
    "ModelPrice",
    "PriceTable",
    "Pricer",
    "UnknownModelError",
    "UnknownModelPolicy",
    "default_pricer",
    "estimate",
    "price",
    "rough_token_count",
]

logger = logging.getLogger("runcycles.pricing")

UnknownModelPolicy: TypeAlias = Literal["error", "estimate", "default_rate"]
"""What a :class:`Pricer` does with a model no table knows (see :class:`Pricer`)."""

DEFAULT_PROMPT_TOKENS: Final = 4_000
"""Prompt size :meth:`Pricer.estimate` assumes when it is not told (``default_prompt_tokens``)."""

_POLICIES: Final = ("error", "estimate", "default_rate")
_MICROCENTS_PER_USD: Final = 10**8
_PER_MTOK: Final = Fraction(_MICROCENTS_PER_USD, 10**6)  # microcents per token at 1 USD / Mtok
_PER_KREQUEST: Final = Fraction(_MICROCENTS_PER_USD, 1_000)  # microcents per request at 1 USD / K


class UnknownModelError(CyclesError, LookupError):
    """No price is known for a model (or the usage names no model).

    Attributes:
        model: The model name as given (``None`` when the usage had none).
        provider: The provider as given.
    """

    def __init__(self, model: str | None, provider: str | None = None, detail: str = "") -> None:
        self.model = model
        self.provider = provider
        self.detail = detail
        where = f" (provider {provider!r})" if provider else ""
        if model is None:
            message = "the usage names no model, so it cannot be priced: set Usage(model=...)"
        else:
            message = (
                f"no price known for model {model!r}{where}: add it to "
                f"Pricer(overrides={{{model!r}: ModelPrice(input_per_mtok=..., "
                "output_per_mtok=...)}}), or choose unknown_model='default_rate' (with a "
                "default_rate) or 'estimate' (commit the reservation's estimate)"
            )
        super().__init__(f"{message}{'; ' + detail if detail else ''}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.model, self.provider, self.detail))


@dataclass(frozen=True, slots=True, init=False)
class ModelPrice:
    """A model's prices in USD per million tokens, as exact decimals.

    Pass ``Decimal``, ``str`` (``"2.5"``) or ``int``; a ``float`` is refused because most
    decimal prices have no exact binary value. A rate left ``None`` falls back to the input
    rate (``cached_input_per_mtok``, ``cache_write_per_mtok``) or to the output rate
    (``reasoning_per_mtok``).

    Raises:
        TypeError: A rate is a ``float``, a ``bool`` or another type.
        ValueError: A rate is negative, not finite, or not a number.
    """

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None
    cache_write_per_mtok: Decimal | None
    reasoning_per_mtok: Decimal | None

    def __init__(
        self,
        input_per_mtok: Decimal | str | int,
        output_per_mtok: Decimal | str | int,
        cached_input_per_mtok: Decimal | str | int | None = None,
        cache_write_per_mtok: Decimal | str | int | None = None,
        reasoning_per_mtok: Decimal | str | int | None = None,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "input_per_mtok", _rate(input_per_mtok, "input_per_mtok"))
        setattr_(self, "output_per_mtok", _rate(output_per_mtok, "output_per_mtok"))
        for name, value in (
            ("cached_input_per_mtok", cached_input_per_mtok),
            ("cache_write_per_mtok", cache_write_per_mtok),
            ("reasoning_per_mtok", reasoning_per_mtok),
        ):
            setattr_(self, name, None if value is None else _rate(value, name))

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit, so that pickling works on Python 3.10 too (frozen + slots + own __init__).
        return (
            ModelPrice,
            (
                self.input_per_mtok,
                self.output_per_mtok,
                self.cached_input_per_mtok,
                self.cache_write_per_mtok,
                self.reasoning_per_mtok,
            ),
        )


def _rate(value: object, name: str) -> Decimal:
    if isinstance(value, float):
        raise TypeError(
            f"ModelPrice.{name} got the float {value!r}: pass the price as a string, e.g. "
            f"'{value}', or a Decimal (a float cannot hold most decimal prices exactly)"
        )
    if isinstance(value, bool) or not isinstance(value, (Decimal, str, int)):
        raise TypeError(f"ModelPrice.{name} must be a Decimal, str or int, got {value!r}")
    try:
        rate = Decimal(value)
    except ArithmeticError:
        raise ValueError(f"ModelPrice.{name} is not a number: {value!r}") from None
    if not rate.is_finite() or rate < 0:
        raise ValueError(f"ModelPrice.{name} must be a finite price >= 0, got {value!r}")
    return rate


@runtime_checkable
class PriceTable(Protocol):
    """A source of prices a :class:`Pricer` can consult (``Pricer(table=...)``).

    A plain ``Mapping[str, ModelPrice]`` works too (keys as for ``overrides``).
    """

    def lookup(self, model: str, provider: str | None) -> ModelPrice | None:
        """Return the price of ``model`` (provider prefix removed), or ``None`` if unknown.

        ``provider`` is the one given with the usage or taken from a ``provider:`` or
        ``provider/`` prefix of the model name. The pricer caches the answer per
        ``(model, provider)``: call :meth:`Pricer.clear_cache` after changing the table.
        """
        ...


# -- exact rates --------------------------------------------------------------------------

# One row of scaled integer rates, microcents * denominator per token (per request for the
# last one): plain input, cached input, cache write, plain output, reasoning, per request.
_Row: TypeAlias = "tuple[int, int, int, int, int, int]"


@dataclass(frozen=True, slots=True)
class _Rates:
    """Exact rates of one model: rows by input-size tier, integers over one denominator."""

    denominator: int
    tiers: tuple[tuple[int, _Row], ...]  # (tier starts above N input tokens, row), ascending

    def microcents(self, usage: Usage) -> int:
        tokens_in = usage.input_tokens
        row = self.tiers[0][1]
        if len(self.tiers) > 1:
            for start, tier_row in reversed(self.tiers):
                if tokens_in > start:
                    row = tier_row
                    break
        cached, written, reasoning = (
            usage.cached_input_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
        )
        total = (
            (tokens_in - cached - written) * row[0]
            + cached * row[1]
            + written * row[2]
            + (usage.output_tokens - reasoning) * row[3]
            + reasoning * row[4]
            + row[5]
        )
        return -(-total // self.denominator)  # ceiling: never under-charge


# A rate as a table gives it: one exact value, or a base with (starts above, value) tiers.
_Tiered: TypeAlias = "tuple[Fraction, tuple[tuple[int, Fraction], ...]]"


def _compile(rates: list[_Tiered | None]) -> _Rates:
    """Build :class:`_Rates` from the six rates (microcents per unit), ``None`` = fallback."""
    plain_in, cached, written, plain_out, reasoning, per_request = rates
    zero: _Tiered = (Fraction(0), ())
    plain_in = plain_in or zero
    plain_out = plain_out or zero
    filled = [plain_in, cached or plain_in, written or plain_in, plain_out, reasoning or plain_out]
    filled.append(per_request or zero)
    starts = sorted({-1} | {start for _, tiers in filled for start, _ in tiers})

    def at(rate: _Tiered, start: int) -> Fraction:
        value = rate[0]
        for tier_start, tier_value in rate[1]:
            if tier_start <= start:
                value = tier_value
        return value

    table = [(start, [at(rate, start) for rate in filled]) for start in starts]
    denominator = math.lcm(*(value.denominator for _, row in table for value in row))

    def scaled(row: list[Fraction]) -> _Row:
        a, b, c, d, e, f = (int(value * denominator) for value in row)
        return a, b, c, d, e, f

    return _Rates(denominator, tuple((start, scaled(row)) for start, row in table))


def _from_model_price(price: ModelPrice) -> _Rates:
    def tiered(value: Decimal | None) -> _Tiered | None:
        return None if value is None else (Fraction(value) * _PER_MTOK, ())

    return _compile(
        [
            tiered(price.input_per_mtok),
            tiered(price.cached_input_per_mtok),
            tiered(price.cache_write_per_mtok),
            tiered(price.output_per_mtok),
            tiered(price.reasoning_per_mtok),
            None,
        ]
    )


def _from_genai(price: Any) -> _Rates | None:
    """Convert a genai-prices ``ModelPrice``; ``None`` when it has no per-token price."""

    def tiered(key: str, scale: Fraction) -> _Tiered | None:
        value = getattr(price, key, None)
        if value is None:
            return None
        if isinstance(value, Decimal):
            return (Fraction(value) * scale, ())
        tiers = tuple((tier.start, Fraction(tier.price) * scale) for tier in value.tiers)
        return (Fraction(value.base) * scale, tiers)

    if getattr(price, "input_mtok", None) is None and getattr(price, "output_mtok", None) is None:
        return None
    keys = ("input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok")
    return _compile(
        [
            *(tiered(key, _PER_MTOK) for key in keys),
            tiered("output_reasoning_mtok", _PER_MTOK),
            tiered("requests_kcount", _PER_KREQUEST),
        ]
    )


class _TimedRates:
    """A genai-prices model whose prices depend on the date or time of day."""

    __slots__ = ("_compiled", "_model")

    def __init__(self, model: Any) -> None:
        self._model = model
        self._compiled: dict[int, tuple[Any, _Rates | None]] = {}

    def now(self) -> _Rates | None:
        price = self._model.get_prices(datetime.now(timezone.utc))
        hit = self._compiled.get(id(price))
        if hit is None or hit[0] is not price:
            hit = self._compiled[id(price)] = (price, _from_genai(price))
        return hit[1]


# -- model names --------------------------------------------------------------------------


def _split(model: str, provider: str | None) -> tuple[str, str | None]:
    """Return ``(model without provider prefix, provider)`` for ``"p:m"`` / ``"p/m"`` names."""
    if provider is None:
        for separator in (":", "/"):
            head, found, tail = model.partition(separator)
            if found and head and tail:
                return tail, head
    return model, provider


def _keys(model: str, provider: str | None) -> list[str]:
    """Mapping keys to try, most specific first (all lower case)."""
    bare, prov = _split(model.strip(), provider.strip() if provider else None)
    keys = [f"{prov}:{bare}", f"{prov}/{bare}"] if prov else []
    keys += [model.strip(), bare]
    return list(dict.fromkeys(key.lower() for key in keys))


class _MappingTable:
    __slots__ = ("_prices",)

    def __init__(self, prices: Mapping[Any, object], what: str) -> None:
        self._prices: dict[str, ModelPrice] = {}
        for key, value in prices.items():
            if not isinstance(key, str) or not isinstance(value, ModelPrice):
                raise TypeError(
                    f"{what} must map model names (str) to ModelPrice, got {key!r}: {value!r}"
                )
            self._prices[key.strip().lower()] = value

    def find(self, model: str, provider: str | None) -> ModelPrice | None:
        for key in _keys(model, provider):
            if key in self._prices:
                return self._prices[key]
        return None


def _genai_lookup(model: str, provider: str | None) -> Any | None:
    """Find a model in genai-prices' table: its ``ModelInfo``, or ``None``."""
    try:
        from genai_prices import Usage as GenaiUsage
        from genai_prices import calc_price
    except ImportError as error:
        raise CyclesConfigError(
            f"the built-in price table needs the genai-prices package ({error}): install it "
            "(pip install genai-prices), or price from your own table with "
            "Pricer(table=..., builtin=False)"
        ) from error
    bare, prefix = _split(model, None)
    attempts = [(model, provider), (bare, provider), (bare, prefix), (model, None), (bare, None)]
    for ref, provider_id in dict.fromkeys(attempts):
        try:
            return calc_price(GenaiUsage(), ref, provider_id=provider_id).model
        except LookupError:
            continue
    return None


# -- the pricer ---------------------------------------------------------------------------

_Entry: TypeAlias = "_Rates | _TimedRates | None"  # None: no table knows the model


class Pricer:
    """Turns a :class:`Usage` into ``USD_MICROCENTS``, from configurable price tables.

    Model names are matched as ``"gpt-4o"``, ``"openai:gpt-4o"``, ``"openai/gpt-4o"`` or with
    ``provider`` given apart, case-insensitively; dated variants (``"gpt-4o-2024-08-06"``)
    match as genai-prices matches them. A provider narrows the search in genai-prices; when
    that provider does not list the model, the model name alone is matched.

    ``unknown_model`` decides what a model no table knows costs:

    * ``"error"`` (default): raise :class:`UnknownModelError`.
    * ``"estimate"``: :meth:`cost` returns ``None``, meaning "commit the reservation's
      estimate" (flag the commit with ``metadata={"actual_source": "estimate"}``);
      :meth:`price` and :meth:`estimate` raise :class:`UnknownModelError`.
    * ``"default_rate"``: price it at ``default_rate``.

    With the last two, one warning per unknown model is logged (logger
    ``runcycles.pricing``), the first time the model is seen by this pricer.

    Lookups are cached per pricer (up to ``cache_size`` models), so pricing a model again
    costs a dictionary lookup and a few integer operations.

    Args:
        overrides: Prices that win over every table, keyed by model name (``"gpt-4o"``) or by
            provider and model (``"openai:gpt-4o"``, ``"openai/gpt-4o"``).
        table: Your own table, consulted after ``overrides`` and before genai-prices: a
            mapping like ``overrides`` or a :class:`PriceTable`.
        builtin: Consult genai-prices' table (imported on first use).
        unknown_model: ``"error"``, ``"estimate"`` or ``"default_rate"`` (above).
        default_rate: The price of unknown models; required by (and only allowed with)
            ``unknown_model="default_rate"``.
        default_prompt_tokens: The prompt size :meth:`estimate` assumes when it is not told.
        cache_size: How many models' lookups are kept.

    Raises:
        CyclesConfigError: An option has a wrong value (the message says which).
        TypeError: ``overrides`` or ``table`` has the wrong type.
    """

    def __init__(
        self,
        *,
        overrides: Mapping[str, ModelPrice] | None = None,
        table: Mapping[str, ModelPrice] | PriceTable | None = None,
        builtin: bool = True,
        unknown_model: UnknownModelPolicy = "error",
        default_rate: ModelPrice | None = None,
        default_prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        cache_size: int = 1024,
    ) -> None:
        if unknown_model not in _POLICIES:
            raise CyclesConfigError(
                f"unknown_model must be one of {', '.join(map(repr, _POLICIES))}, "
                f"got {unknown_model!r}"
            )
        if (unknown_model == "default_rate") != (default_rate is not None):
            raise CyclesConfigError(
                "unknown_model='default_rate' needs default_rate=ModelPrice(...), and "
                f"default_rate is only used with it (got unknown_model={unknown_model!r}, "
                f"default_rate={default_rate!r})"
            )
        if default_rate is not None and not isinstance(default_rate, ModelPrice):
            raise CyclesConfigError(f"default_rate must be a ModelPrice, got {default_rate!r}")
        for name, value, least in (
            ("default_prompt_tokens", default_prompt_tokens, 0),
            ("cache_size", cache_size, 1),
        ):
            if type(value) is not int or value < least:
                raise CyclesConfigError(f"{name} must be an int >= {least}, got {value!r}")
        self._overrides = _MappingTable(overrides or {}, "overrides")
        self._table: Callable[[str, str | None], ModelPrice | None] | None
        if table is None:
            self._table = None
        elif isinstance(table, Mapping):
            self._table = _MappingTable(table, "table").find
        elif isinstance(table, PriceTable):
            self._table = table.lookup
        else:
            raise TypeError(
                f"table must be a Mapping[str, ModelPrice] or have a lookup(model, provider) "
                f"method (PriceTable), got {table!r}"
            )
        self._builtin = builtin
        self.unknown_model: UnknownModelPolicy = unknown_model
        self._default_rates = None if default_rate is None else _from_model_price(default_rate)
        self.default_prompt_tokens = default_prompt_tokens
        self._cache_size = cache_size
        self._cache: dict[tuple[str | None, str | None], _Entry] = {}
        self._warned: set[tuple[str | None, str | None]] = set()
        self._lock = threading.Lock()

    def cost(self, usage: Usage) -> int | None:
        """Return the cost of ``usage`` in ``USD_MICROCENTS``, or ``None`` (see below).

        ``usage.amount`` (in ``USD_MICROCENTS``) is returned as it is. ``None`` means the
        model is unknown and the policy is ``"estimate"``: commit the reservation's estimate
        and flag the commit with ``metadata={"actual_source": "estimate"}``.

        Raises:
            UnknownModelError: The model is unknown and the policy is ``"error"``.
            ValueError: ``usage.amount`` is not in ``USD_MICROCENTS``.
            TypeError: ``usage`` is not a :class:`Usage`.
        """
        if type(usage) is not Usage:
            raise TypeError(
                f"a Pricer prices runcycles.Usage, got {usage!r}: convert provider usage with "
                "Usage.from_openai(...) or Usage.from_anthropic(...)"
            )
        if usage.amount is not None:
            if usage.amount.unit is not Unit.USD_MICROCENTS:
                raise ValueError(
                    f"usage.amount is in {usage.amount.unit}, a Pricer returns USD_MICROCENTS: "
                    "commit that amount directly in a reservation of its own unit"
                )
            return usage.amount.amount
        rates = self._rates(usage.model, usage.provider)
        return None if rates is None else rates.microcents(usage)

    def price(self, usage: Usage) -> int:
        """Return the cost of ``usage`` in ``USD_MICROCENTS``; never ``None``.

        Raises:
            UnknownModelError: The model is unknown and the policy is ``"error"`` or
                ``"estimate"`` (use :meth:`cost` to get ``None`` instead).
            ValueError: ``usage.amount`` is not in ``USD_MICROCENTS``.
        """
        cost = self.cost(usage)
        if cost is None:
            raise UnknownModelError(
                usage.model, usage.provider, "use Pricer.cost() to be told to commit the estimate"
            )
        return cost

    def estimate(
        self,
        model: str,
        *,
        max_tokens: int,
        prompt_tokens: int | None = None,
        provider: str | None = None,
    ) -> int:
        """Return the worst-case cost of a call, in ``USD_MICROCENTS``, to reserve before it.

        Worst case: every prompt token at the (uncached) input rate and ``max_tokens`` output
        tokens at the output rate, rounded up like :meth:`cost`. When ``prompt_tokens`` is
        ``None``, the pricer's ``default_prompt_tokens`` (4,000 unless configured) is used;
        :func:`rough_token_count` gives a rough count from the prompt's text.

        Raises:
            UnknownModelError: The model is unknown and the policy is not ``"default_rate"``
                (there is no reservation estimate to fall back to yet).
            TypeError: A count is not an ``int``.
            ValueError: A count is negative.
        """
        prompt = self.default_prompt_tokens if prompt_tokens is None else prompt_tokens
        usage = Usage(input_tokens=prompt, output_tokens=max_tokens, model=model, provider=provider)
        rates = self._rates(model, provider)
        if rates is None:
            raise UnknownModelError(model, provider, "cannot estimate a call to it")
        return rates.microcents(usage)

    def clear_cache(self) -> None:
        """Forget every looked-up price (after changing a custom table), and the warnings."""
        with self._lock:
            self._cache.clear()
            self._warned.clear()

    def _rates(self, model: str | None, provider: str | None) -> _Rates | None:
        """The rates for a model; ``None`` for "commit the estimate" (unknown, policy)."""
        entry = self._cache.get((model, provider), self)
        if entry is self:
            entry = self._resolve(model, provider)
        if type(entry) is _Rates:
            return entry
        rates = entry.now() if isinstance(entry, _TimedRates) else None
        if rates is not None:
            return rates
        if self.unknown_model == "error":
            raise UnknownModelError(model, provider)
        return self._default_rates

    def _resolve(self, model: str | None, provider: str | None) -> _Entry:
        key = (model, provider)
        with self._lock:
            entry = self._cache.get(key, self)
            if entry is not self:
                return entry  # type: ignore[return-value]
            entry = self._lookup(model, provider)
            if entry is None and self.unknown_model != "error" and key not in self._warned:
                if len(self._warned) < 4 * self._cache_size:
                    self._warned.add(key)
                logger.warning(
                    "no price known for model %r (provider %r): %s; add it to the pricer's "
                    "overrides to price it exactly",
                    model,
                    provider,
                    "pricing it at the default rate"
                    if self.unknown_model == "default_rate"
                    else "committing the reservation's estimate",
                )
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = entry
            return entry

    def _lookup(self, model: str | None, provider: str | None) -> _Entry:
        if model is None or not model.strip():
            return None
        found = self._overrides.find(model, provider)
        if found is None and self._table is not None:
            found = self._table(*_split(model.strip(), provider))
            if found is not None and not isinstance(found, ModelPrice):
                raise TypeError(
                    f"the price table returned {found!r} for {model!r}, not a ModelPrice"
                )
        if found is not None:
            return _from_model_price(found)
        if not self._builtin:
            return None
        info = _genai_lookup(model.strip(), provider)
        if info is None:
            return None
        if isinstance(info.prices, list):
            return _TimedRates(info)
        return _from_genai(info.prices)


def rough_token_count(text: str) -> int:
    """Return a rough token count of ``text``: one token per 4 characters, rounded up.

    A rule of thumb for English prose with OpenAI-style tokenizers; code, other languages and
    other tokenizers differ. Good enough to size a reservation, not to charge one.
    """
    return -(-len(text) // 4)


_default: Pricer | None = None
_default_lock = threading.Lock()


def default_pricer() -> Pricer:
    """Return the shared default :class:`Pricer` (genai-prices' table, unknown -> error)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Pricer()
    return _default


def price(usage: Usage) -> int:
    """Return the cost of ``usage`` in ``USD_MICROCENTS`` with :func:`default_pricer`."""
    return default_pricer().price(usage)


def estimate(
    model: str, *, max_tokens: int, prompt_tokens: int | None = None, provider: str | None = None
) -> int:
    """Return the worst-case cost of a call with :func:`default_pricer` (see its estimate)."""
    return default_pricer().estimate(
        model, max_tokens=max_tokens, prompt_tokens=prompt_tokens, provider=provider
    )
