"""The result of every client call: :class:`CyclesResponse`.

Client methods return a response instead of raising when the server answers with an error or
cannot be reached: check ``is_success``, read ``data`` (the validated model, or the mapped
exception raised) or call ``raise_for_error()``. A 2xx body is validated straight from the
received bytes and its dict view (``body``) decoded only when first read; any other body is
decoded eagerly (it decides ``is_success``) and validated only when ``data`` is first read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from runcycles.exceptions import (
    CyclesError,
    CyclesProtocolError,
    CyclesTimeoutError,
    CyclesTransportError,
    MalformedResponseError,
    protocol_error_class,
)
from runcycles.models import ErrorResponse, parse_response

__all__ = [
    "CyclesResponse",
    "TRANSPORT_ERROR_STATUS",
]

TRANSPORT_ERROR_STATUS: Final = -1
"""``CyclesResponse.status`` when no HTTP answer was received (the same value upstream uses)."""

ModelT = TypeVar("ModelT", bound=BaseModel)

_UNSET: Final[Any] = object()
_LAZY: Final[Any] = object()
"""``_body`` of a response whose bytes are known to hold a JSON object not decoded yet."""


class CyclesResponse(Generic[ModelT]):
    """One answer of the Cycles server (or the transport failure that prevented it).

    Attributes:
        status: HTTP status, or ``-1`` (:data:`TRANSPORT_ERROR_STATUS`) on a transport error.
        headers: Response headers (case-insensitive; empty on a transport error).
        body: The decoded JSON object, or ``None`` if there was no JSON object.
        content: The raw body bytes (``b""`` on a transport error).
        error_message: Why the call failed (``None`` on success).
        exception: The ``httpx`` exception of a transport error, else ``None``.
        model: The endpoint's response model, used by :attr:`data`.
        request: The ``httpx.Request`` that was sent (``None`` if built by hand).
    """

    __slots__ = (
        "_body",
        "_data",
        "content",
        "error_message",
        "exception",
        "headers",
        "model",
        "request",
        "status",
    )

    def __init__(
        self,
        *,
        status: int,
        model: type[ModelT],
        headers: httpx.Headers | None = None,
        body: dict[str, Any] | None = None,
        content: bytes = b"",
        error_message: str | None = None,
        exception: BaseException | None = None,
        request: httpx.Request | None = None,
    ):
        self.status = status
        self.model = model
        self.headers = httpx.Headers() if headers is None else headers
        self._body: Any = body
        self.content = content
        self.error_message = error_message
        self.exception = exception
        self.request = request
        self._data: Any = _UNSET

    @classmethod
    def _validated(
        cls,
        *,
        status: int,
        model: type[ModelT],
        headers: httpx.Headers,
        content: bytes,
        data: ModelT,
        request: httpx.Request | None,
    ) -> CyclesResponse[ModelT]:
        """Build the response of a 2xx whose ``content`` already validated as ``data``."""
        response = cls(
            status=status, model=model, headers=headers, content=content, request=request
        )
        response._body = _LAZY
        response._data = data
        return response

    @property
    def body(self) -> dict[str, Any] | None:
        """The decoded JSON object, or ``None`` if there was no JSON object."""
        body = self._body
        if body is _LAZY:
            body = self._body = from_json(self.content)
        result: dict[str, Any] | None = body
        return result

    @body.setter
    def body(self, value: dict[str, Any] | None) -> None:
        self._body = value

    def __repr__(self) -> str:
        outcome = "ok" if self.is_success else repr(self.error_message)
        return f"<CyclesResponse {self.status} {self.method} {self.url} {outcome}>"

    @property
    def method(self) -> str:
        """HTTP method of the request (``""`` if unknown)."""
        return "" if self.request is None else self.request.method

    @property
    def url(self) -> str:
        """URL of the request (``""`` if unknown)."""
        return "" if self.request is None else str(self.request.url)

    # ---------------------------------------------------------------------------- outcome

    @property
    def is_success(self) -> bool:
        """Whether the server answered 2xx with a JSON object (see :attr:`data` for schema)."""
        return 200 <= self.status < 300 and self._body is not None

    @property
    def is_transport_error(self) -> bool:
        """Whether no HTTP answer arrived (connection, DNS, TLS failure or timeout)."""
        return self.status == TRANSPORT_ERROR_STATUS

    @property
    def is_client_error(self) -> bool:
        """Whether the status is a 4xx."""
        return 400 <= self.status < 500

    @property
    def is_server_error(self) -> bool:
        """Whether the status is a 5xx."""
        return self.status >= 500

    @property
    def is_ambiguous(self) -> bool:
        """Whether a 2xx arrived without a JSON object: the operation may or may not be done.

        Resend with the same idempotency key to learn the outcome.
        """
        return 200 <= self.status < 300 and self._body is None

    # ---------------------------------------------------------------------------- headers

    @property
    def request_id(self) -> str | None:
        """``X-Request-Id`` header, else the error body's ``request_id``."""
        header: str | None = self.headers.get("x-request-id")
        return header or self._body_str("request_id")

    @property
    def trace_id(self) -> str | None:
        """``X-Cycles-Trace-Id`` header, else the error body's ``trace_id``."""
        header: str | None = self.headers.get("x-cycles-trace-id")
        return header or self._body_str("trace_id")

    @property
    def cycles_tenant(self) -> str | None:
        """``X-Cycles-Tenant``: the tenant the server derived from the API key."""
        tenant: str | None = self.headers.get("x-cycles-tenant")
        return tenant

    @property
    def evidence_omitted(self) -> str | None:
        """``X-Cycles-Evidence-Omitted``: why a decision came without its ``cycles_evidence``.

        A server with signed evidence on sets it when the answer cannot be signed exactly (it
        holds a number beyond ``2**53 - 1``, which RFC 8785 cannot represent); ``None``
        otherwise, so a missing ``cycles_evidence`` is never mistaken for evidence being off.
        """
        why: str | None = self.headers.get("x-cycles-evidence-omitted")
        return why

    @property
    def rate_limit_remaining(self) -> int | None:
        """``X-RateLimit-Remaining`` as an int (``None`` if absent or malformed)."""
        return _header_int(self.headers.get("x-ratelimit-remaining"))

    @property
    def rate_limit_reset(self) -> int | None:
        """``X-RateLimit-Reset`` (unix seconds) as an int (``None`` if absent or malformed)."""
        return _header_int(self.headers.get("x-ratelimit-reset"))

    @property
    def retry_after_ms(self) -> int | None:
        """How long the server asked to wait, in ms.

        The body's ``retry_after_ms`` wins; otherwise ``Retry-After`` in delta-seconds (the
        HTTP-date form is invalid in this protocol and ignored). ``None`` if neither is valid.
        """
        if self.body is not None:
            value = self.body.get("retry_after_ms")
            if type(value) is int and value >= 0:
                return value
        seconds = _header_int(self.headers.get("retry-after"))
        return None if seconds is None else seconds * 1000

    # ---------------------------------------------------------------------------- body

    def get_body_attribute(self, name: str, default: Any = None) -> Any:
        """Return ``body[name]``, or ``default`` if there is no body or no such key."""
        if self.body is None:
            return default
        return self.body.get(name, default)

    def get_error_response(self) -> ErrorResponse | None:
        """Return the body as an :class:`~runcycles.models.ErrorResponse`, if it is one."""
        if self.is_success or self.body is None:
            return None
        try:
            return parse_response(ErrorResponse, self.body)
        except ValidationError:
            return None

    @property
    def data(self) -> ModelT:
        """The body validated as the endpoint's response model (computed once).

        Raises:
            CyclesTransportError: The server was not reached.
            CyclesProtocolError: The server answered with an error (the subclass for its
                error code, e.g. ``BudgetExceededError``).
            MalformedResponseError: A 2xx body does not match the response model.
        """
        if self._data is _UNSET:
            error = self.to_exception()
            if error is not None:
                raise error
            self._data = self._validate()
        result: ModelT = self._data
        return result

    def raise_for_error(self) -> CyclesResponse[ModelT]:
        """Raise the mapped exception unless the call fully succeeded; return ``self``.

        After this returns, :attr:`data` is valid and does not raise.

        Raises:
            CyclesTransportError: The server was not reached.
            CyclesProtocolError: The server answered with an error, or with a body that does
                not match the endpoint's response model (``MalformedResponseError``).
        """
        _ = self.data
        return self

    def to_exception(self) -> CyclesError | None:
        """Return the exception describing this failure (not raised), or ``None`` on success.

        Schema validation is not part of this check; see :attr:`data`.
        """
        if self.is_success:
            return None
        if self.exception is not None:
            kind = CyclesTransportError
            if isinstance(self.exception, httpx.TimeoutException):
                kind = CyclesTimeoutError
            transport_error = kind(
                self.error_message or str(self.exception), method=self.method, url=self.url
            )
            transport_error.__cause__ = self.exception
            return transport_error
        body = self.body or {}
        error_code = _str_or_none(body.get("error"))
        cls: type[CyclesProtocolError] = (
            MalformedResponseError if self.body is None else protocol_error_class(error_code)
        )
        details = body.get("details")
        return cls(
            self.error_message or f"HTTP {self.status}",
            status=self.status,
            error_code=error_code,
            reason_code=_str_or_none(body.get("reason_code")),
            request_id=self.request_id,
            trace_id=self.trace_id,
            retry_after_ms=self.retry_after_ms,
            details=details if isinstance(details, Mapping) else None,
        )

    def _validate(self) -> ModelT:
        try:
            return parse_response(self.model, self.body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or '<body>'}: {err['msg']}"
                for err in exc.errors(include_url=False)[:5]
            )
            raise MalformedResponseError(
                f"the server's {self.status} answer to {self.method} {self.url} is not a valid "
                f"{self.model.__name__} ({problems}); check that the server speaks the Cycles "
                f"protocol v0",
                status=self.status,
                request_id=self.request_id,
                trace_id=self.trace_id,
            ) from exc

    def _body_str(self, name: str) -> str | None:
        return None if self.body is None else _str_or_none(self.body.get(name))


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _header_int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value)
