"""The seam: every shortcut through a library's private internals, each with its plain twin.

A few hot spots go around ``pydantic`` and ``httpx`` internals to save CPU per guarded call
(``benchmarks/guarded_call.py``). Each relies on how the library works inside, not on what it
promises, so each lives here next to its public-API spelling (each function's docstring
names both paths), and one switch picks between them.

The switch is ``RUNCYCLES_FASTPATH``, read once at import: ``0`` (or ``false``, ``no``,
``off``) selects the plain twins everywhere. Tests flip it with :func:`set_enabled`,
:func:`plain_path` / :func:`fast_path` or ``monkeypatch``. The model functions read
:data:`enabled` per call; the wire reads it when a client is built, so flip it before that.

A fast function that finds its internal missing or changed (a future library version) falls
back to its plain twin: the ``pydantic`` slots are checked once at import, failed attribute
lookups fall back per call, and the reserve-body splice is verified against the plain
serialization before it is cached. ``tests/test_fastpath.py`` compares both paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from typing import TypeAlias

    import httpx

    from runcycles.models import ReservationCreateRequest

    RequestBuilder: TypeAlias = Callable[
        [str, str | httpx.URL, Mapping[str, str], bytes | None, Mapping[str, str] | None, Any],
        httpx.Request,
    ]
    """``(method, url, headers, content, params, extensions) -> httpx.Request``."""

__all__ = [
    "ENV_VAR",
    "body_after_key",
    "construct",
    "copy_with_key",
    "direct_transport",
    "dump_json",
    "enabled",
    "fast_path",
    "keyed_request",
    "plain_path",
    "request_builder",
    "set_enabled",
    "set_unchecked",
]

ENV_VAR: Final = "RUNCYCLES_FASTPATH"
"""The environment variable of the switch (``0`` turns every shortcut off)."""

_OFF: Final = frozenset({"0", "false", "no", "off"})


def _from_env() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


enabled: bool = _from_env()
"""Whether the fast paths are used (``RUNCYCLES_FASTPATH`` at import; see :func:`set_enabled`)."""

M = TypeVar("M", bound=BaseModel)


def set_enabled(value: bool) -> bool:
    """Turn the fast paths on or off for the whole process.

    Args:
        value: ``True`` for the fast paths, ``False`` for the plain twins.

    Returns:
        The previous setting.
    """
    global enabled
    previous = enabled
    enabled = bool(value)
    return previous


@contextmanager
def plain_path() -> Iterator[None]:
    """Use the plain twins (public APIs only) inside the ``with`` block."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


@contextmanager
def fast_path() -> Iterator[None]:
    """Use the fast paths inside the ``with`` block (where the libraries allow them)."""
    previous = set_enabled(True)
    try:
        yield
    finally:
        set_enabled(previous)


# --------------------------------------------------------------------------------------------
# pydantic

_MODEL_SLOTS: Final = (
    "__dict__",
    "__pydantic_fields_set__",
    "__pydantic_extra__",
    "__pydantic_private__",
)


def _model_internals_present(base: type = BaseModel) -> bool:
    """Whether ``base`` keeps an instance's state in exactly the slots the shortcuts write."""
    return tuple(getattr(base, "__slots__", ())) == _MODEL_SLOTS


_MODELS_OK: Final = _model_internals_present()


def _plain_dump_json(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=True).encode()


def _fast_dump_json(model: BaseModel) -> bytes:
    try:
        serializer = type(model).__pydantic_serializer__
    except AttributeError:  # pragma: no cover - depends on the pydantic version
        return _plain_dump_json(model)
    return serializer.to_json(model, exclude_none=True)


def dump_json(model: BaseModel) -> bytes:
    """Return ``model`` as JSON bytes, ``None`` fields left out (the request bodies' form).

    Fast: the model's serializer directly (``model_dump_json`` processes a dozen keyword
    arguments and decodes the bytes to ``str``). Plain: ``model_dump_json(exclude_none=True)``
    encoded as UTF-8: the same bytes.
    """
    if enabled:
        return _fast_dump_json(model)
    return _plain_dump_json(model)


_KEY_FIELD: Final = frozenset({"idempotency_key"})
_KEY_PREFIX: Final = b'{"idempotency_key":"'


def _plain_copy_with_key(template: ReservationCreateRequest, key: str) -> ReservationCreateRequest:
    return template.model_copy(update={"idempotency_key": key})


def _assemble(
    cls: type[M], state: dict[str, Any], fields_set: set[str], extra: Any, private: Any
) -> M:
    """The model of ``cls`` whose ``_MODEL_SLOTS`` hold these, validation skipped."""
    model = cls.__new__(cls)
    object.__setattr__(model, "__dict__", state)
    object.__setattr__(model, "__pydantic_fields_set__", fields_set)
    object.__setattr__(model, "__pydantic_extra__", extra)
    object.__setattr__(model, "__pydantic_private__", private)
    return model


def _fast_copy_with_key(template: ReservationCreateRequest, key: str) -> ReservationCreateRequest:
    if not _MODELS_OK:
        return _plain_copy_with_key(template, key)
    try:
        state = template.__dict__ | {"idempotency_key": key}  # same order, one value replaced
        fields_set = template.__pydantic_fields_set__ | _KEY_FIELD
        extra = template.__pydantic_extra__
        private = template.__pydantic_private__
    except AttributeError:  # pragma: no cover - depends on the pydantic version
        return _plain_copy_with_key(template, key)
    return _assemble(type(template), state, fields_set, extra, private)


def copy_with_key(template: ReservationCreateRequest, key: str) -> ReservationCreateRequest:
    """Return a copy of the validated ``template`` with another (valid) idempotency key.

    Plain: ``template.model_copy(update={"idempotency_key": key})``. Fast: the same model
    assembled from the template's state, for less than half the cost.
    """
    if enabled:
        return _fast_copy_with_key(template, key)
    return _plain_copy_with_key(template, key)


def _fast_body_after_key(template: ReservationCreateRequest) -> bytes | None:
    try:
        serializer = type(template).__pydantic_serializer__
    except AttributeError:  # pragma: no cover - depends on the pydantic version
        return None
    rest = serializer.to_json(template, exclude_none=True, exclude={"idempotency_key"})
    after_key = b"," + rest[1:]
    # The splice holds only while ``idempotency_key`` is serialized first, unescaped: check
    # it once against the plain serialization of the template itself.
    key = template.idempotency_key
    if _KEY_PREFIX + key.encode() + b'"' + after_key != _plain_dump_json(template):
        return None
    return after_key


def body_after_key(template: ReservationCreateRequest) -> bytes | None:
    """Return what follows the idempotency key in ``template``'s JSON, for :func:`keyed_request`.

    The body is ``{"idempotency_key":"<key>"`` followed by this (``,"subject":...}``).
    ``None`` when the fast path is off or the splice does not reproduce the plain
    serialization of ``template``: :func:`keyed_request` then serializes each copy in full.
    """
    if enabled:
        return _fast_body_after_key(template)
    return None


def keyed_request(
    template: ReservationCreateRequest, after_key: bytes | None, key: str
) -> tuple[ReservationCreateRequest, bytes]:
    """Return a copy of ``template`` with ``key`` and the copy's JSON body.

    The body is ``dump_json(copy)``, byte for byte. Fast: the copy from
    :func:`copy_with_key` and, given ``after_key`` from :func:`body_after_key`, the body
    spliced from it. Plain: ``model_copy`` and ``model_dump_json``.

    Args:
        template: The validated request every call shares but for its key.
        after_key: :func:`body_after_key` of ``template`` (``None`` serializes the copy).
        key: From :func:`~runcycles.lifecycle.new_idempotency_key` (hex digits and dashes:
            nothing in it needs JSON escaping, which the splice relies on).
    """
    if not enabled:
        copy = _plain_copy_with_key(template, key)
        return copy, _plain_dump_json(copy)
    copy = _fast_copy_with_key(template, key)
    if after_key is None:
        return copy, _fast_dump_json(copy)
    return copy, _KEY_PREFIX + key.encode("ascii") + b'"' + after_key


def _plain_construct(cls: type[M], values: dict[str, Any], fields_set: frozenset[str]) -> M:
    return cls(**{name: values[name] for name in fields_set})


def _fast_construct(cls: type[M], values: dict[str, Any], fields_set: frozenset[str]) -> M:
    if not _MODELS_OK:
        return _plain_construct(cls, values, fields_set)
    return _assemble(cls, values, set(fields_set), None, None)


def construct(cls: type[M], values: dict[str, Any], fields_set: frozenset[str]) -> M:
    """Return the model ``cls(**{name: values[name] for name in fields_set})`` builds.

    For values validation would keep as they are (already validated models, plain ``str``
    and ``int``), of a model with ``extra`` not ``"allow"`` and no private attributes.

    Args:
        cls: The model class.
        values: Every field of ``cls``, in declaration order; those not in ``fields_set``
            at the values their defaults give (fast path: taken as they are; plain path:
            pydantic computes the defaults). The fast path keeps the dict itself.
        fields_set: The fields given explicitly (``model_fields_set``).
    """
    if enabled:
        return _fast_construct(cls, values, fields_set)
    return _plain_construct(cls, values, fields_set)


def set_unchecked(model: BaseModel, name: str, value: Any) -> None:
    """Set field ``name`` of ``model`` to a value its validation would keep as it is.

    Plain: ``setattr`` (re-validated on models with ``validate_assignment``). Fast: the
    value written where pydantic keeps it, skipping the validation.
    """
    if enabled and _MODELS_OK:
        try:
            state = model.__dict__
            fields_set = model.__pydantic_fields_set__
        except AttributeError:  # pragma: no cover - depends on the pydantic version
            pass
        else:
            state[name] = value
            fields_set.add(name)
            return
    setattr(model, name, value)  # the plain twin


# --------------------------------------------------------------------------------------------
# httpx (imported by these functions only: ``runcycles.journal`` uses this module too and
# must not load the HTTP stack)

_AUTO: Final = frozenset({"host", "content-length", "transfer-encoding"})
"""Headers httpx derives from the URL and body: given by the caller, httpx's way applies."""
_TRANSPORT_FOR_URL: Final = "_transport_for_url"
"""The private ``httpx`` method :func:`direct_transport` relies on."""
_MAX_PLANS: Final = 64
"""Header-name sets remembered per client (requests with extra headers may vary them)."""


def direct_transport(
    http: httpx.Client | httpx.AsyncClient, base_url: str, *, fast: bool | None = None
) -> httpx.BaseTransport | httpx.AsyncBaseTransport | None:
    """Return the transport ``http`` would use for ``base_url``, or ``None``.

    ``httpx`` resolves the transport per request from the client's mounts (proxy
    environment variables become mounts); every URL of one Cycles server resolves alike, so
    the lookup is done once, through ``httpx``'s private ``_transport_for_url``. ``None``
    (the plain twin, or the fallback) means: send through ``http.send``.

    Args:
        http: The client's ``httpx`` client.
        base_url: The server's URL.
        fast: Force the fast (``True``) or plain (``False``) path; default: the switch.
    """
    if not (enabled if fast is None else fast):
        return None
    import httpx

    pick = getattr(http, _TRANSPORT_FOR_URL, None)
    if pick is None:
        return None
    try:
        transport: object = pick(httpx.URL(base_url))
    except Exception:
        return None
    if isinstance(transport, (httpx.BaseTransport, httpx.AsyncBaseTransport)):
        return transport
    return None


def request_builder(
    http: httpx.Client | httpx.AsyncClient, host: str, *, fast: bool | None = None
) -> RequestBuilder:
    """Return the function that builds a complete request of ``http`` to the server at ``host``.

    Plain: ``http.build_request(...)``, the request ``http.send`` would send. Fast: the same
    request without the per-request merging: the client's default headers are read once,
    here, and which of them a request keeps is worked out once per set of header names; a
    bytes body gets the headers ``httpx`` would add (``Host`` first, then ``Content-Length``)
    and a ``ByteStream`` (a third of the cost of ``content=``). Headers naming ``Host``,
    ``Content-Length`` or ``Transfer-Encoding``, or repeating a name in another case, are
    merged the ``httpx`` way. Unlike ``build_request``, the fast one sends no cookies (the
    jar stays empty without ``http.send``) and misses headers set on ``http`` later.

    Args:
        http: The client's ``httpx`` client.
        host: The server URL's ``netloc`` (as ``httpx.URL(...).netloc``), ``""`` if unknown
            (the plain builder then).
        fast: Force the fast (``True``) or plain (``False``) builder; default: the switch.
    """
    import httpx

    def plain(
        method: str,
        url: str | httpx.URL,
        headers: Mapping[str, str],
        content: bytes | None,
        params: Mapping[str, str] | None,
        extensions: Any,
    ) -> httpx.Request:
        return http.build_request(
            method, url, content=content, headers=headers, params=params, extensions=extensions
        )

    stream_type = getattr(httpx, "ByteStream", None)
    if not (enabled if fast is None else fast) or not host or stream_type is None:
        return plain

    encoding = http.headers.encoding
    defaults = [(name.decode(encoding), value.decode(encoding)) for name, value in http.headers.raw]
    plans: dict[tuple[str, ...], dict[str, str] | None] = {}
    unplanned: Any = object()

    def plan(names: tuple[str, ...]) -> dict[str, str] | None:
        """The client's default headers a request with header ``names`` keeps (or ``None``)."""
        lowered = {name.lower() for name in names}
        if len(lowered) < len(names) or lowered & _AUTO:
            kept = None
        else:
            kept = {name: value for name, value in defaults if name.lower() not in lowered}
        if len(plans) < _MAX_PLANS:
            plans[names] = kept
        return kept

    def fast_build(
        method: str,
        url: str | httpx.URL,
        headers: Mapping[str, str],
        content: bytes | None,
        params: Mapping[str, str] | None,
        extensions: Any,
    ) -> httpx.Request:
        names = tuple(headers)
        kept = plans.get(names, unplanned)
        if kept is unplanned:
            kept = plan(names)
        if kept is not None and content:
            request = httpx.Request(
                method,
                url,
                params=params,
                headers={"Host": host, **kept, **headers, "Content-Length": str(len(content))},
                stream=stream_type(content),
                extensions=extensions,
            )
            request.read()  # ``request.content`` readable, as with ``content=``
            return request
        merged: httpx.Headers | dict[str, str]
        if kept is None:
            merged = httpx.Headers(defaults)
            merged.update(headers)
        else:  # no body, or an empty one: httpx's own headers (none, or 0)
            merged = {**kept, **headers}
        return httpx.Request(
            method, url, params=params, headers=merged, content=content, extensions=extensions
        )

    return fast_build
