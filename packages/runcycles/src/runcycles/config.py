"""Client configuration: :class:`CyclesConfig`, validated on construction.

A config is immutable once built (use :func:`dataclasses.replace` to derive a variant) and
every value is checked up front, so a typo in an environment variable fails at start-up with
a message naming the variable instead of at the first reservation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from runcycles.exceptions import CyclesConfigError
from runcycles.models import STANDARD_SUBJECT_FIELDS, Subject

__all__ = ["CyclesConfig"]

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class CyclesConfig:
    """Where the Cycles server is, how to authenticate, and how patient to be.

    Every field, its default, its environment variable (:meth:`from_env`) and its meaning are
    in the table of ``docs/client.md``; the ``journal_*`` fields (durable journal on, where,
    ``fsync``-ed or not) are described in ``docs/recovery.md``. ``tenant`` ... ``toolset``
    are the default subject fields (see :meth:`default_subject`). ``retry_after_max_s`` is
    the longest ``Retry-After`` slept inside a call: a 429 asking for more is returned to the
    caller. ``api_key`` is masked in ``repr``.
    """

    base_url: str
    api_key: str = dataclasses.field(repr=False)
    tenant: str | None = None
    workspace: str | None = None
    app: str | None = None
    workflow: str | None = None
    agent: str | None = None
    toolset: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    retry_enabled: bool = True
    retry_max_attempts: int = 5
    retry_initial_delay: float = 0.5
    retry_multiplier: float = 2.0
    retry_max_delay: float = 30.0
    retry_after_max_s: float = 60.0
    max_connections: int = 100
    journal_enabled: bool = True
    journal_dir: str | None = None
    journal_fsync: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", _check_base_url(self.base_url))
        _check_api_key(self.api_key)
        for name in STANDARD_SUBJECT_FIELDS:
            _check_subject_value(name, getattr(self, name))
        for name in ("connect_timeout", "read_timeout"):
            _check_number(name, getattr(self, name), minimum=0.0, inclusive=False)
        _check_bool("retry_enabled", self.retry_enabled)
        _check_int("retry_max_attempts", self.retry_max_attempts, minimum=1)
        _check_number("retry_initial_delay", self.retry_initial_delay, minimum=0.0)
        _check_number("retry_multiplier", self.retry_multiplier, minimum=1.0, unit="")
        _check_number("retry_max_delay", self.retry_max_delay, minimum=0.0)
        _check_number("retry_after_max_s", self.retry_after_max_s, minimum=0.0)
        _check_int("max_connections", self.max_connections, minimum=1)
        _check_bool("journal_enabled", self.journal_enabled)
        _check_bool("journal_fsync", self.journal_fsync)
        if self.journal_dir is not None and not isinstance(self.journal_dir, str):
            raise CyclesConfigError(
                f"journal_dir must be a path string or None, got {type(self.journal_dir).__name__}"
            )

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return f"CyclesConfig({fields}, api_key='***')"

    @classmethod
    def from_env(
        cls,
        prefix: str = "CYCLES_",
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> CyclesConfig:
        """Build a config from environment variables named ``<prefix><FIELD>``.

        ``CYCLES_BASE_URL`` and ``CYCLES_API_KEY`` are required; every other field is
        optional (``CYCLES_TENANT``, ``CYCLES_CONNECT_TIMEOUT``, ``CYCLES_RETRY_ENABLED``, ...).
        Booleans accept ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case). Empty
        variables count as unset.

        Args:
            prefix: Prefix of the variable names.
            environ: Mapping to read instead of ``os.environ`` (handy in tests).
            **overrides: Field values that win over the environment.

        Returns:
            The validated config.

        Raises:
            CyclesConfigError: If a required variable is missing or a value does not parse;
                the message names the variable.
        """
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise CyclesConfigError(
                f"CyclesConfig.from_env() got unknown field(s) {', '.join(unknown)}; "
                f"valid fields are: {', '.join(fields)}"
            )
        values: dict[str, Any] = {}
        for name, field in fields.items():
            if name in overrides:
                values[name] = overrides[name]
                continue
            var = f"{prefix}{name.upper()}"
            raw = env.get(var, "").strip()
            if not raw:
                if field.default is dataclasses.MISSING:
                    raise CyclesConfigError(
                        f"environment variable {var} is not set; set it (e.g. "
                        f"{var}={_EXAMPLES[name]}) or pass {name}= to CyclesConfig"
                    )
                continue
            values[name] = _parse_env(var, raw, _FIELD_TYPES[name])
        return cls(**values)

    def default_subject(self, **overrides: str | None) -> Subject | None:
        """Return the :class:`~runcycles.models.Subject` made of this config's subject fields.

        Args:
            **overrides: Subject fields that replace the config's (``None`` clears one).

        Returns:
            The subject, or ``None`` when no standard subject field is set anywhere.
        """
        unknown = sorted(set(overrides) - set(STANDARD_SUBJECT_FIELDS))
        if unknown:
            raise TypeError(
                f"default_subject() got unknown field(s) {', '.join(unknown)}; "
                f"subject fields are: {', '.join(STANDARD_SUBJECT_FIELDS)}"
            )
        fields = {name: getattr(self, name) for name in STANDARD_SUBJECT_FIELDS}
        fields.update(overrides)
        present = {name: value for name, value in fields.items() if value is not None}
        if not present:
            return None
        return Subject(**present)


_FIELD_TYPES: Final[Mapping[str, type]] = {
    # each field's annotation without its ``| None``: what its environment variable parses to
    name: next(arg for arg in (*typing.get_args(hint), hint) if arg is not type(None))
    for name, hint in typing.get_type_hints(CyclesConfig).items()
}
_EXAMPLES: Final = {"base_url": "http://localhost:7878", "api_key": "<your tenant API key>"}


def _parse_env(var: str, raw: str, kind: type) -> Any:
    if kind is str:
        return raw
    if kind is bool:
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise CyclesConfigError(
            f"environment variable {var}={raw!r} is not a boolean; use true/false, 1/0 or yes/no"
        )
    try:
        return int(raw) if kind is int else float(raw)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise CyclesConfigError(
            f"environment variable {var}={raw!r} is not {expected}; fix or unset it"
        ) from None


def _check_base_url(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CyclesConfigError(
            "base_url is required: pass the Cycles server URL, e.g. "
            "CyclesConfig(base_url='http://localhost:7878', ...) or set CYCLES_BASE_URL"
        )
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CyclesConfigError(
            f"base_url={value!r} is not an http(s) URL; use e.g. 'http://localhost:7878'"
        )
    if parts.query or parts.fragment:
        raise CyclesConfigError(
            f"base_url={value!r} must not contain a query or fragment; pass only the server root"
        )
    return url


def _check_api_key(value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise CyclesConfigError(
            "api_key is required: pass your tenant API key as CyclesConfig(api_key=...) "
            "or set CYCLES_API_KEY"
        )
    if value != value.strip() or any(ch in value for ch in "\r\n\0"):
        raise CyclesConfigError(
            "api_key contains whitespace or control characters; check how it was copied"
        )


def _check_subject_value(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise CyclesConfigError(f"{name} must be a non-empty string or None, got {value!r}")
    if len(value) > 128:
        raise CyclesConfigError(f"{name} is {len(value)} characters long; the limit is 128")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise CyclesConfigError(f"{name} must be True or False, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CyclesConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(
    name: str, value: object, *, minimum: float, inclusive: bool = True, unit: str = " seconds"
) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= minimum if inclusive else value > minimum)
    )
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise CyclesConfigError(f"{name} must be a finite number {bound}{unit}, got {value!r}")
