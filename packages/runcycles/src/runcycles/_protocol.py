"""Request building and response parsing shared by both clients. Pure: no I/O here.

Everything the sync and async clients have in common lives in :class:`ClientCore`, so each
client method is only "encode, send (with retries), parse".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final, Literal, TypedDict, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from runcycles import _fastpath
from runcycles._version import __version__
from runcycles.config import CyclesConfig
from runcycles.exceptions import MalformedResponseError
from runcycles.models import (
    STANDARD_SUBJECT_FIELDS,
    BalanceResponse,
    ReservationListResponse,
    ReservationStatus,
)
from runcycles.response import TRANSPORT_ERROR_STATUS, CyclesResponse, ModelT

__all__ = [
    "BalanceFilters",
    "ClientCore",
    "ReservationFilters",
    "USER_AGENT",
    "balance_params",
    "encode_body",
    "next_page_cursor",
    "parse_http_response",
    "reservation_params",
    "transport_failure",
]

USER_AGENT: Final = (
    f"runcycles-python/{__version__} httpx/{httpx.__version__} "
    f"python/{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
)

RequestT = TypeVar("RequestT", bound=BaseModel)

_MAX_ID_LENGTH: Final = 128
_SNIPPET_CHARS: Final = 200


class BalanceFilters(TypedDict, total=False):
    """Query filters of ``GET /v1/balances``; at least one subject field is required."""

    tenant: str
    workspace: str
    app: str
    workflow: str
    agent: str
    toolset: str
    include_children: bool
    limit: int
    cursor: str


class ReservationFilters(TypedDict, total=False):
    """Query filters of ``GET /v1/reservations`` (all optional, combined with AND).

    ``from_``/``to`` bound ``created_at_ms`` (sent as ``from``/``to``); time bounds accept a
    timezone-aware ``datetime`` or an ISO-8601 string. ``include`` takes names such as
    ``"metadata"`` (a sequence or a comma-separated string).
    """

    idempotency_key: str
    status: ReservationStatus | str
    tenant: str
    workspace: str
    app: str
    workflow: str
    agent: str
    toolset: str
    from_: datetime | str
    to: datetime | str
    expires_from: datetime | str
    expires_to: datetime | str
    finalized_from: datetime | str
    finalized_to: datetime | str
    sort_by: str
    sort_dir: Literal["asc", "desc"]
    include: str | Iterable[str]
    limit: int
    cursor: str


class ClientCore:
    """State and pure helpers shared by :class:`~runcycles.CyclesClient` and its async twin.

    Built once per client: base URLs and header sets are computed here, not per call.
    """

    __slots__ = (
        "balances_url",
        "base_headers",
        "config",
        "decide_url",
        "events_url",
        "fixed_urls",
        "get_headers",
        "post_headers",
        "reservations_url",
    )

    def __init__(self, config: CyclesConfig):
        """Precompute URLs and headers (every request carries them all: see ``_wire``)."""
        if not isinstance(config, CyclesConfig):
            raise TypeError(
                f"expected a CyclesConfig, got {type(config).__name__}; build one with "
                "CyclesConfig(base_url=..., api_key=...) or CyclesConfig.from_env()"
            )
        self.config = config
        base = config.base_url
        self.reservations_url = f"{base}/v1/reservations"
        self.decide_url = f"{base}/v1/decide"
        self.events_url = f"{base}/v1/events"
        self.balances_url = f"{base}/v1/balances"
        self.fixed_urls = (
            self.reservations_url,
            self.decide_url,
            self.events_url,
            self.balances_url,
        )
        self.base_headers: dict[str, str] = {
            "X-Cycles-API-Key": config.api_key,
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        self.get_headers: dict[str, str] = dict(self.base_headers)
        self.post_headers: dict[str, str] = {
            **self.get_headers,
            "Content-Type": "application/json",
        }

    def timeout(self) -> httpx.Timeout:
        """Return the ``httpx.Timeout`` described by the config."""
        read = self.config.read_timeout
        return httpx.Timeout(connect=self.config.connect_timeout, read=read, write=read, pool=read)

    def limits(self) -> httpx.Limits:
        """Return the connection-pool limits described by the config."""
        size = self.config.max_connections
        return httpx.Limits(max_connections=size, max_keepalive_connections=size)

    def reservation_url(self, reservation_id: str, action: str = "") -> str:
        """Return the URL of a reservation (``action`` is ``""``, ``/commit``, ...).

        The id is percent-encoded as one path segment, so it can never change the route.
        """
        checked: object = reservation_id
        if not isinstance(checked, str) or not 0 < len(checked) <= _MAX_ID_LENGTH:
            raise ValueError(
                f"reservation_id must be a non-empty string of at most {_MAX_ID_LENGTH} "
                f"characters, got {reservation_id!r}"
            )
        segment = quote(reservation_id, safe="")
        if segment in (".", ".."):
            segment = segment.replace(".", "%2E")
        return f"{self.reservations_url}/{segment}{action}"

    def post_body(
        self,
        request: RequestT | Mapping[str, Any],
        model: type[RequestT],
        extra_headers: Mapping[str, str] | None,
    ) -> tuple[bytes, dict[str, str]]:
        """Encode a request body and the headers that go with it.

        Returns:
            The JSON body and the request headers, ``X-Idempotency-Key`` mirroring the body.
            The header is optional in the spec and left out when the key cannot travel in
            an HTTP header unchanged (non-ASCII, control characters, surrounding spaces):
            the body's key, which any string of 1..256 characters may be, is authoritative.
        """
        content, idempotency_key = encode_body(request, model)
        headers = self.encoded_headers(idempotency_key)
        if extra_headers:
            headers.update(extra_headers)
        return content, headers

    def encoded_headers(self, idempotency_key: str) -> dict[str, str]:
        """Return the headers of a body the library serialized itself (no extra headers)."""
        headers = dict(self.post_headers)
        if _header_safe(idempotency_key):
            headers["X-Idempotency-Key"] = idempotency_key
        return headers

    def headers_for_get(self, extra_headers: Mapping[str, str] | None) -> dict[str, str]:
        """Return the headers of a GET request."""
        if extra_headers:
            return {**self.get_headers, **extra_headers}
        return self.get_headers


def encode_body(request: RequestT | Mapping[str, Any], model: type[RequestT]) -> tuple[bytes, str]:
    """Serialize a request model, or a dict validated as ``model``, to JSON bytes.

    Fields left as ``None`` are omitted so the server's defaults apply.

    Returns:
        The JSON body and the request's idempotency key.

    Raises:
        pydantic.ValidationError: A dict violates the spec's constraints for ``model``.
        TypeError: ``request`` is neither a ``model`` nor a mapping.
    """
    if isinstance(request, model):
        obj = request
    elif isinstance(request, Mapping):
        obj = model.model_validate(request)
    else:
        raise TypeError(
            f"expected a {model.__name__} or a dict, got {type(request).__name__}; "
            f"build the body with runcycles.{model.__name__}(...)"
        )
    content = _fastpath.dump_json(obj)
    key: str = getattr(obj, "idempotency_key")  # noqa: B009 - every request model has one
    return content, key


def parse_http_response(raw: httpx.Response, model: type[ModelT]) -> CyclesResponse[ModelT]:
    """Turn a received ``httpx.Response`` into a :class:`CyclesResponse`; never raises.

    A body that is not a JSON object leaves ``body`` as ``None`` with an ``error_message``
    that says what arrived (so even a 200 with garbage is not a success).
    """
    status = raw.status_code
    content = raw.content
    request = raw.request
    if 200 <= status < 300 and content:
        # The usual answer: validate the model straight from the bytes; the dict view is
        # decoded only if someone reads ``body``. Anything else takes the general path below.
        try:
            data = model.model_validate_json(content, extra="allow")
        except ValidationError:
            pass
        else:
            return CyclesResponse._validated(
                status=status,
                model=model,
                headers=raw.headers,
                content=content,
                data=data,
                request=request,
            )
    try:
        # pydantic's JSON parser: about twice as fast as json.loads on these bodies (JSON
        # over HTTP is UTF-8; invalid UTF-8 and lone surrogates count as invalid JSON).
        decoded = from_json(content) if content else None
    except (ValueError, RecursionError):
        decoded = None
        problem = "is not valid JSON"
    else:
        problem = "is empty" if not content else "is not a JSON object"
    if type(decoded) is dict:
        body: dict[str, Any] | None = decoded
        error_message = None if status < 400 else _error_text(status, decoded)
        if status >= 300 and error_message is None:
            error_message = f"unexpected HTTP {status} from the Cycles server"
    else:
        body = None
        error_message = (
            f"the HTTP {status} answer to {request.method} {request.url} {problem} "
            f"({_snippet(content)}); check base_url points at a Cycles server"
        )
    return CyclesResponse(
        status=status,
        model=model,
        headers=raw.headers,
        body=body,
        content=content,
        error_message=error_message,
        request=request,
    )


def transport_failure(
    request: httpx.Request, model: type[ModelT], exc: httpx.TransportError | httpx.DecodingError
) -> CyclesResponse[ModelT]:
    """Describe a request that got no HTTP answer as a :class:`CyclesResponse` (status -1)."""
    url = str(request.url)
    origin = f"{request.url.scheme}://{request.url.netloc.decode('ascii', 'replace')}"
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        hint = (
            "the Cycles server did not answer in time; check it is healthy, or raise "
            "connect_timeout/read_timeout in CyclesConfig"
        )
    elif isinstance(exc, httpx.ConnectError):
        hint = f"could not connect to {origin}; check the Cycles server is running and base_url"
    else:
        hint = "the connection to the Cycles server failed"
    return CyclesResponse(
        status=TRANSPORT_ERROR_STATUS,
        model=model,
        error_message=(
            f"{hint} ({type(exc).__name__}: {detail}) while calling {request.method} {url}"
        ),
        exception=exc,
        request=request,
    )


def balance_params(filters: Mapping[str, Any]) -> dict[str, str]:
    """Validate ``get_balances`` filters and render them as query parameters.

    Raises:
        TypeError: An unknown filter name.
        ValueError: No subject filter, or a value out of range.
    """
    params = _render(filters, BalanceFilters.__annotations__, "get_balances")
    if not any(name in params for name in STANDARD_SUBJECT_FIELDS):
        raise ValueError(
            "get_balances() needs at least one subject filter (tenant, workspace, app, "
            "workflow, agent or toolset), e.g. get_balances(tenant='acme')"
        )
    return params


def reservation_params(filters: Mapping[str, Any]) -> dict[str, str]:
    """Validate ``list_reservations`` filters and render them as query parameters.

    Raises:
        TypeError: An unknown filter name.
        ValueError: A value out of range (bad status, limit, sort direction, naive datetime).
    """
    params = _render(filters, ReservationFilters.__annotations__, "list_reservations")
    status = params.get("status")
    if status is not None and status not in ReservationStatus.__members__:
        raise ValueError(
            f"status={status!r} is not a reservation status; use one of "
            f"{', '.join(ReservationStatus.__members__)}"
        )
    if params.get("sort_dir", "desc") not in ("asc", "desc"):
        raise ValueError(f"sort_dir must be 'asc' or 'desc', got {params['sort_dir']!r}")
    if "from_" in params:
        params["from"] = params.pop("from_")
    return params


def next_page_cursor(
    previous: str | None, page: ReservationListResponse | BalanceResponse
) -> str | None:
    """Return the cursor of the page after ``page``, or ``None`` if it was the last one.

    Raises:
        MalformedResponseError: The server handed back the cursor it was just given, which
            would loop forever.
    """
    cursor = page.next_cursor
    if not cursor or page.has_more is False:
        return None
    if cursor == previous:
        raise MalformedResponseError(
            f"the server returned next_cursor={cursor!r} again for the page it identifies; "
            "stopping instead of looping forever (a server bug)",
            status=200,
        )
    return cursor


def _render(filters: Mapping[str, Any], allowed: Mapping[str, Any], method: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in filters.items():
        if name not in allowed:
            raise TypeError(
                f"{method}() got an unknown filter {name!r}; valid filters are: "
                f"{', '.join(allowed)}"
            )
        if value is None:
            continue
        params[name] = _render_value(name, value)
    return params


def _render_value(name: str, value: object) -> str:
    if name == "limit":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 200:
            raise ValueError(f"limit must be an integer from 1 to 200, got {value!r}")
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if name == "include_children":
        raise ValueError(f"include_children must be True or False, got {value!r}")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(
                f"{name} must be a timezone-aware datetime (e.g. datetime.now(timezone.utc)), "
                f"got the naive {value.isoformat()}"
            )
        return value.isoformat()
    if isinstance(value, ReservationStatus):
        return value.value
    if isinstance(value, str):
        return value
    if name == "include" and isinstance(value, Iterable):
        return ",".join(str(item) for item in value)
    raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")


def _error_text(status: int, body: Mapping[str, Any]) -> str:
    message = body.get("message")
    code = body.get("error")
    if isinstance(message, str) and message:
        return message
    if isinstance(code, str):
        return f"{code} (HTTP {status})"
    return f"HTTP {status} from the Cycles server without an error message"


def _snippet(content: bytes) -> str:
    if not content:
        return "no body"
    text = content[:_SNIPPET_CHARS].decode("utf-8", "replace")
    suffix = "..." if len(content) > _SNIPPET_CHARS else ""
    return f"body starts {text!r}{suffix}"


def _header_safe(value: str) -> bool:
    """Return whether ``value`` survives as an HTTP header value byte for byte."""
    return value.isascii() and value.isprintable() and value.strip() == value
