r"""Query and path parameter validation as the specs declare it, plus the control-character rule.

Each route declares its query parameters as :class:`Param` rules (the spec's enums, ranges,
patterns, maximum lengths and item counts); :func:`check_query` applies them and refuses the
first bad value with 400 ``INVALID_REQUEST`` naming the parameter and what it accepts. A blank
value (``?status=``) means "unset", the protocol's convention for query filters. Parameters a
route does not declare are ignored (the spec's additive-parameter guarantee).

Ids and names never contain control characters (C0, DEL and C1: ``\x00``-``\x1f``,
``\x7f``-``\x9f``): :func:`check_text` refuses them, naming the field. Every string query
parameter, every path parameter and the id and name fields of request bodies
(:data:`ID_FIELDS`, checked by :func:`check_body_ids`) go through it. Free text (``reason``,
``description``, ``metadata``) may hold newlines and is not checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, NoReturn

from pydantic import BaseModel
from starlette.requests import Request

from runcycles_server.ledger import LedgerError

__all__ = [
    "ID_FIELDS",
    "Param",
    "check_body_ids",
    "check_path",
    "check_query",
    "check_text",
    "has_control_chars",
]

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHOWN_MAX: Final = 60

ID_FIELDS: Final = frozenset(
    {
        "idempotency_key",
        "name",
        "kind",
        "scope",
        "tenant_id",
        "parent_tenant_id",
        "key_id",
        "reservation_id",
        "tenant",
        "workspace",
        "app",
        "workflow",
        "agent",
        "toolset",
        "dimensions",
        "scope_filter",
    }
)
"""Body fields (at any depth; keys of ``subject.dimensions`` too) that are ids or names."""


def has_control_chars(value: str) -> bool:
    """Return whether ``value`` holds a control character."""
    return _CONTROL.search(value) is not None


def check_text(value: str, field: str) -> None:
    """Refuse a control character in an id or name.

    Raises:
        LedgerError: INVALID_REQUEST (400) naming ``field`` and the character's position.
    """
    found = _CONTROL.search(value)
    if found is not None:
        raise LedgerError(
            "INVALID_REQUEST",
            f"{field} contains a control character (U+{ord(found.group()):04X} at position "
            f"{found.start()}); ids and names must be printable text",
        )


def check_path(request: Request) -> None:
    """Refuse control characters in every path parameter of ``request`` (400 naming it)."""
    for name, value in request.path_params.items():
        check_text(str(value), name)


def check_body_ids(body: BaseModel, prefix: str = "") -> None:
    """Refuse control characters in the id and name fields (:data:`ID_FIELDS`) of ``body``.

    Walks nested models, lists and dicts; a field is named by its dotted path
    (``action.name``, ``subject.dimensions.team``).

    Raises:
        LedgerError: INVALID_REQUEST (400) naming the field.
    """
    for name in type(body).model_fields:
        value = getattr(body, name)
        if value is not None:
            _walk(value, f"{prefix}{name}", name in ID_FIELDS)


def _walk(value: Any, path: str, is_id: bool) -> None:
    if isinstance(value, str):
        if is_id:
            check_text(value, path)
    elif isinstance(value, BaseModel):
        check_body_ids(value, f"{path}.")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", is_id)
    elif isinstance(value, Mapping) and is_id:  # e.g. subject.dimensions: keys and values
        for key, item in value.items():
            check_text(str(key), f"{path} key")
            _walk(item, f"{path}.{key}", True)


Kind = Literal["string", "enum", "integer", "number", "boolean", "date-time", "array"]


@dataclass(frozen=True, slots=True)
class Param:
    """What a query parameter accepts (the spec's schema of it).

    Attributes:
        kind: the value's type.
        choices: an enum's values.
        minimum: the smallest number allowed.
        maximum: the largest number allowed.
        max_length: the most characters a string (or each array item) may have.
        pattern: a regular expression a string must match in full.
        max_items: the most values an array may have.
    """

    kind: Kind = "string"
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    pattern: str | None = None
    max_items: int | None = None

    def check(self, name: str, values: list[str]) -> None:
        """Validate the (non-blank) values sent for ``name``.

        Raises:
            LedgerError: INVALID_REQUEST naming the parameter and what it accepts.
        """
        if self.kind == "array":
            items = [item for value in values for item in value.split(",")]
            if self.max_items is not None and len(items) > self.max_items:
                _bad(name, f"takes at most {self.max_items} values, not {len(items)}")
            for item in items:
                self._one(name, item)
            return
        self._one(name, values[-1])

    def _one(self, name: str, value: str) -> None:
        check_text(value, f"query parameter {name}")
        if self.max_length is not None and len(value) > self.max_length:
            _bad(name, f"must be at most {self.max_length} characters, not {len(value)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            _bad(name, f"must match {self.pattern}, not {_shown(value)}")
        if self.kind == "enum" and value not in self.choices:
            _bad(name, f"must be one of {', '.join(self.choices)}, not {_shown(value)}")
        elif self.kind == "boolean" and value not in ("true", "false"):
            _bad(name, f"must be true or false, not {_shown(value)}")
        elif self.kind == "date-time":
            _date_time(name, value)
        elif self.kind in ("integer", "number"):
            self._number(name, value)

    def _number(self, name: str, value: str) -> None:
        what = "an integer" if self.kind == "integer" else "a number"
        if self.minimum is not None and self.maximum is not None:
            what += f" from {self.minimum:g} to {self.maximum:g}"
        elif self.minimum is not None:
            what += f" of at least {self.minimum:g}"
        try:
            number = int(value) if self.kind == "integer" else float(value)
        except ValueError:
            _bad(name, f"must be {what}, not {_shown(value)}")
        if not math.isfinite(number):  # NaN, infinities
            _bad(name, f"must be {what}, not {_shown(value)}")
        if (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            _bad(name, f"must be {what}, not {_shown(value)}")


def check_query(request: Request, params: Mapping[str, Param]) -> None:
    """Validate every declared query parameter ``request`` carries (blank values are unset).

    Raises:
        LedgerError: INVALID_REQUEST (400) naming the first bad parameter.
    """
    query = request.query_params
    for name, rule in params.items():
        values = [value for value in query.getlist(name) if value != ""]
        if values:
            rule.check(name, values)


def _date_time(name: str, value: str) -> None:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        datetime.fromisoformat(text)
    except ValueError:
        _bad(
            name, f"must be an ISO-8601 date-time such as 2026-01-31T12:00:00Z, not {_shown(value)}"
        )


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN_MAX else value[:_SHOWN_MAX] + "...")


def _bad(name: str, problem: str) -> NoReturn:
    raise LedgerError("INVALID_REQUEST", f"query parameter {name} {problem}")
