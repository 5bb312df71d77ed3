r"""RFC 8785 (JCS) canonical JSON, fast for the values evidence envelopes hold.

:func:`canonical_bytes` is the one canonicaliser evidence uses (ids, signing input, served
bodies). The maintained ``rfc8785`` package is the reference; it is pure Python and costs about
100 us for a reservation envelope, too much for the hot path, so values in the common domain
take a fast path instead: ``orjson`` with sorted keys produces **byte-identical** output when

* every number is an integer in the I-JSON safe range ``|n| <= 2**53 - 1`` (JCS serialises
  numbers the way ECMAScript does; for such integers that is their decimal digits, and a float
  such as ``1.0`` or ``1e21`` needs ECMAScript's shortest form, which ``orjson`` does not give),
* every object key is ASCII (JCS sorts keys by UTF-16 code units, ``orjson`` by UTF-8 bytes:
  the orders agree on ASCII and differ only between astral and ``U+E000..U+FFFF`` characters),

and strings are escaped the same way by both (``"``, ``\\``, and control characters, short forms
for ``\\b \\t \\n \\f \\r``, lower-case ``\\u00xx`` otherwise; everything else as raw UTF-8). A
property test compares both paths on random values. Anything else (a float in free-form
metadata, a non-ASCII metadata key) goes through ``rfc8785``.

Integers beyond ``2**53 - 1`` have **no** RFC 8785 form: the RFC requires its input to be
I-JSON (section 3.1: "JSON number data MUST be expressible as IEEE 754 double-precision
values"), and a double cannot hold ``2**53 + 1``; a verifier that parses numbers as doubles
would re-derive a different id, and the reference ``rfc8785`` package refuses them
(``IntegerDomainError``). The evidence spec types amounts as JSON integers (``int64``), never
strings, so there is no conformant way to write one. Such a value raises
:class:`NotCanonicalizable`, and the caller emits no envelope (and says so on the answer)
rather than one that independent verifiers cannot check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson
import rfc8785

SAFE_INT: Final = 2**53 - 1

_PLAIN = 0
_BIG_INT = 1
_FOREIGN = 2
"""Flags of :func:`_scan`: fine for orjson / holds an integer beyond 2**53 / needs rfc8785."""


NO_RFC8785_FORM: Final = (
    "no-rfc8785-form: the answer holds a number beyond 2^53-1 (or text that is not Unicode), "
    "which RFC 8785 cannot sign exactly"
)
"""Why a decision was answered without an envelope (the ``X-Cycles-Evidence-Omitted`` value)."""


class NotCanonicalizable(ValueError):
    """The value has no RFC 8785 form this module can produce (see the module docstring)."""


def _scan(value: Any) -> int:
    """Return the OR of the flags of every value inside ``value`` (iterative, no recursion)."""
    flags = 0
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        v = pop()
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is int:
            if v > SAFE_INT or v < -SAFE_INT:
                flags |= _BIG_INT
        elif t is dict:
            for k, item in v.items():
                if type(k) is not str or not k.isascii():
                    flags |= _FOREIGN
                push(item)
        elif t is list or t is tuple:
            stack.extend(v)
        else:  # float, or a type only the reference implementation may know
            flags |= _FOREIGN
    return flags


_STRICT: Final = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_BIG_INT_MESSAGE: Final = (
    "an integer beyond 2**53 - 1 in magnitude: RFC 8785 (I-JSON) numbers must be exact IEEE 754 "
    "doubles"
)


def canonical_bytes(value: Any, *, free: Sequence[Any] | None = None) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of a JSON value.

    ``free``: the only parts of ``value`` that may hold a float or a non-ASCII object key
    (free-form metadata, say), when the caller built the rest itself and knows it holds
    neither; only they are scanned (integer sizes are checked by ``orjson`` either way).
    ``None``: scan everything.

    Raises:
        NotCanonicalizable: the value holds an integer beyond ``2**53 - 1`` in magnitude, or
            something that is not JSON (NaN, a lone surrogate...).
    """
    flags = _scan(value if free is None else list(free))
    if flags & _BIG_INT:
        raise NotCanonicalizable(_BIG_INT_MESSAGE)
    if flags & _FOREIGN == 0:
        try:
            return orjson.dumps(value, option=_STRICT)
        except orjson.JSONEncodeError as exc:  # an integer beyond 2**53, or not JSON at all
            if _scan(value) & _BIG_INT:
                raise NotCanonicalizable(_BIG_INT_MESSAGE) from None
            raise NotCanonicalizable(str(exc)) from None
    try:
        return rfc8785.dumps(value)
    except rfc8785.IntegerDomainError:
        raise NotCanonicalizable(_BIG_INT_MESSAGE) from None
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise NotCanonicalizable(str(exc)) from None
