"""Sign webhook deliveries (the server) and verify them (a receiver): one implementation.

A delivery is an HTTP ``POST`` whose body is one :class:`~runcycles.events.Event` as JSON.
It carries two signatures (the algorithm byte by byte is in ``docs/webhooks.md``):

* ``X-Cycles-Signature: sha256=<hex>``, the official format: HMAC-SHA256 of the body with
  the subscription's secret. It does not cover any time, so a captured request verifies
  forever: anyone who saw one delivery can replay it to the receiver later.
* ``X-Cycles-Signature-256: t=<unix seconds>,v1=<hex>[,v1=<hex>...]``, HMAC-SHA256 of
  ``b"<t>." + body``, one ``v1`` per active secret (two while a secret is rotated). The
  receiver rejects a ``t`` outside its tolerance (5 minutes by default), which bounds a
  replay to that window; a store of seen event ids (:class:`SeenEventStore`) closes it.

:func:`sign_delivery` returns the headers; :func:`verify_delivery` checks them and returns
the parsed event, or raises a :class:`WebhookVerificationError` naming what failed. Header
lookup is case-insensitive and takes any framework's header mapping (or raw ASGI pairs).
Standard library only (``hmac``, ``hashlib``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets as _secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

from pydantic import ValidationError

from runcycles.events import Event
from runcycles.exceptions import CyclesConfigError, CyclesError

__all__ = [
    "AsyncSeenEventStore",
    "DEFAULT_TOLERANCE_S",
    "EVENT_ID_HEADER",
    "EVENT_TYPE_HEADER",
    "InMemorySeenEventStore",
    "REQUEST_ID_HEADER",
    "SIGNATURE_256_HEADER",
    "SIGNATURE_HEADER",
    "SeenEventStore",
    "TIMESTAMP_HEADER",
    "TRACEPARENT_HEADER",
    "TRACE_ID_HEADER",
    "WebhookPayloadError",
    "WebhookReplayError",
    "WebhookSignatureError",
    "WebhookTimestampError",
    "WebhookVerificationError",
    "averify_delivery",
    "sign_body",
    "sign_delivery",
    "sign_timestamped",
    "verify_delivery",
]

SIGNATURE_HEADER: Final = "X-Cycles-Signature"
"""``sha256=<hex HMAC-SHA256(secret, body)>``: the official, body-only signature."""
SIGNATURE_256_HEADER: Final = "X-Cycles-Signature-256"
"""``t=<ts>,v1=<hex>...``: the timestamped signature(s), one ``v1`` per active secret."""
TIMESTAMP_HEADER: Final = "X-Cycles-Timestamp"
"""The signing time in unix seconds (the same ``t`` as in the timestamped signature)."""
EVENT_ID_HEADER: Final = "X-Cycles-Event-Id"
EVENT_TYPE_HEADER: Final = "X-Cycles-Event-Type"
TRACE_ID_HEADER: Final = "X-Cycles-Trace-Id"
REQUEST_ID_HEADER: Final = "X-Request-Id"
TRACEPARENT_HEADER: Final = "traceparent"

DEFAULT_TOLERANCE_S: Final = 300
"""How far a delivery's timestamp may be from the receiver's clock, either way (seconds)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_TRACE_FLAGS = re.compile(r"[0-9a-f]{2}")
Body = bytes | bytearray | memoryview
"""The raw request body (a ``bytearray`` or ``memoryview`` of it is copied once)."""
_MAX_SIGNATURES = 16  # v1 entries read from one header (a sender has one per active secret)


# --------------------------------------------------------------------------------------------
# Errors


class WebhookVerificationError(CyclesError):
    """A webhook delivery failed verification: do not act on it (answer ``400``/``401``).

    Attributes:
        message: What failed and what to check.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,), self.__dict__)


class WebhookSignatureError(WebhookVerificationError):
    """The signature is missing, malformed, or made with none of the given secrets."""


class WebhookTimestampError(WebhookVerificationError):
    """The signing time is missing, malformed, or outside the tolerance (stale or future).

    Attributes:
        timestamp: The delivery's signing time (unix seconds), if it could be read.
        now: The receiver's clock when checked.
        tolerance_s: The tolerance applied.
    """

    def __init__(
        self,
        message: str,
        *,
        timestamp: int | None = None,
        now: float | None = None,
        tolerance_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.timestamp = timestamp
        self.now = now
        self.tolerance_s = tolerance_s


class WebhookReplayError(WebhookVerificationError):
    """The event id was seen before: a replay, or a redelivery of a processed event.

    A sender retries until it gets a ``2xx``, so answer a redelivery with ``200`` (the event
    was handled) rather than an error status.

    Attributes:
        event_id: The repeated event id.
    """

    def __init__(self, message: str, *, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class WebhookPayloadError(WebhookVerificationError):
    """The signed body is not a valid Cycles event, or its headers contradict it."""


# --------------------------------------------------------------------------------------------
# Seen-event stores


@runtime_checkable
class SeenEventStore(Protocol):
    """Remembers the event ids a receiver accepted, to refuse a second delivery of one.

    ``add`` must be atomic (check and record in one step), or two concurrent deliveries of
    one event could both pass. With Redis: ``SET cycles:webhook:<event_id> 1 NX EX 86400``
    is ``add`` (true when it set the key) and ``DEL`` is ``discard``.
    """

    def add(self, event_id: str) -> bool:
        """Record ``event_id``; return ``False`` if it was already recorded."""
        ...

    def discard(self, event_id: str) -> None:
        """Forget ``event_id`` (processing failed: let the sender's retry through)."""
        ...


@runtime_checkable
class AsyncSeenEventStore(Protocol):
    """:class:`SeenEventStore` for async receivers (:func:`averify_delivery`)."""

    async def add(self, event_id: str) -> bool:
        """Record ``event_id``; return ``False`` if it was already recorded."""
        ...

    async def discard(self, event_id: str) -> None:
        """Forget ``event_id`` (processing failed: let the sender's retry through)."""
        ...


class InMemorySeenEventStore:
    """A bounded, thread-safe :class:`SeenEventStore` for one receiver process.

    Keeps an id for ``ttl_s`` (default one day, the longest a sender retries) and at most
    ``max_entries`` ids, forgetting the oldest first. A forgotten id is accepted again, but a
    replayed request is still refused by its timestamp once outside the tolerance: keep
    ``ttl_s`` well above the verifier's ``tolerance_s``. Several receiver processes need a
    shared store (Redis, a database table with a unique key).
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        ttl_s: float = 86_400,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise CyclesConfigError(f"max_entries must be at least 1, got {max_entries}")
        if not ttl_s > 0:
            raise CyclesConfigError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def add(self, event_id: str) -> bool:
        """Record ``event_id``; return ``False`` if it is already remembered."""
        now = self._clock()
        with self._lock:
            while self._expiry:
                oldest, expires = next(iter(self._expiry.items()))
                if expires > now:
                    break
                del self._expiry[oldest]
            if event_id in self._expiry:
                return False
            if len(self._expiry) >= self._max_entries:
                self._expiry.popitem(last=False)
            self._expiry[event_id] = now + self._ttl_s
            return True

    def discard(self, event_id: str) -> None:
        """Forget ``event_id`` (nothing happens if it is not remembered)."""
        with self._lock:
            self._expiry.pop(event_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)


# --------------------------------------------------------------------------------------------
# Signing


def _key(secret: str) -> bytes:
    return secret.encode("utf-8")


def sign_body(secret: str, body: bytes) -> str:
    """Return the hex HMAC-SHA256 of ``body`` under ``secret`` (the official signature)."""
    return hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def sign_timestamped(secret: str, timestamp: int, body: bytes) -> str:
    """Return the hex HMAC-SHA256 of ``b"<timestamp>." + body`` under ``secret``."""
    return hmac.new(
        _key(secret), f"{timestamp}.".encode("ascii") + body, hashlib.sha256
    ).hexdigest()


def _secret_list(secrets: str | Sequence[str]) -> list[str]:
    listed: list[object] = [secrets] if isinstance(secrets, str) else list(secrets)
    if not listed:
        raise CyclesConfigError(
            "no webhook signing secret given: pass the subscription's signing_secret "
            "(a list of them while a secret is rotated)"
        )
    for secret in listed:
        if not (isinstance(secret, str) and secret):  # callers without type checking
            raise CyclesConfigError(
                f"a webhook signing secret must be a non-empty string, got {secret!r}"
            )
    return [str(secret) for secret in listed]


def _check_body(body: object) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError(
        f"the body must be the raw request bytes as received, not {type(body).__name__}: "
        "a decoded or re-serialized body does not match the signature"
    )


def sign_delivery(
    body: Body,
    secrets: str | Sequence[str],
    *,
    event_id: str,
    event_type: str,
    timestamp: int | None = None,
    trace_id: str | None = None,
    trace_flags: str = "01",
    request_id: str | None = None,
) -> dict[str, str]:
    """Return the headers that sign one delivery of ``body`` (besides the sender's own).

    ``secrets[0]`` is the current secret: it makes the official body-only signature, which
    holds one value. During a rotation list the new secret first and the old one after it;
    the timestamped header then carries a ``v1`` for each, so receivers that still hold the
    old secret keep verifying until they switch.

    ``timestamp`` (unix seconds) defaults to now; sign again for every attempt, so a retry
    an hour later is not refused as stale. With ``trace_id`` (32 lowercase hex) the headers
    carry ``X-Cycles-Trace-Id`` and a W3C ``traceparent`` with a fresh span id and
    ``trace_flags``.

    Raises:
        CyclesConfigError: if no secret is given or one is empty.
        ValueError: if ``timestamp``, ``trace_id`` or ``trace_flags`` is malformed.
    """
    payload = _check_body(body)
    keys = _secret_list(secrets)
    if timestamp is None:
        timestamp = int(time.time())
    if type(timestamp) is not int or timestamp < 0:  # bool is an int: refused too
        raise ValueError(f"timestamp must be a non-negative int of unix seconds: {timestamp!r}")
    signatures = ",".join(f"v1={sign_timestamped(key, timestamp, payload)}" for key in keys)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: f"sha256={sign_body(keys[0], payload)}",
        SIGNATURE_256_HEADER: f"t={timestamp},{signatures}",
        TIMESTAMP_HEADER: str(timestamp),
        EVENT_ID_HEADER: event_id,
        EVENT_TYPE_HEADER: event_type,
    }
    if trace_id is not None:
        if not _TRACE_ID.fullmatch(trace_id) or trace_id == "0" * 32:
            raise ValueError(f"trace_id must be 32 lowercase hex digits, not all 0: {trace_id!r}")
        if not _TRACE_FLAGS.fullmatch(trace_flags):
            raise ValueError(f"trace_flags must be 2 lowercase hex digits: {trace_flags!r}")
        span_id = "0" * 16
        while span_id == "0" * 16:
            span_id = _secrets.token_hex(8)
        headers[TRACE_ID_HEADER] = trace_id
        headers[TRACEPARENT_HEADER] = f"00-{trace_id}-{span_id}-{trace_flags}"
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return headers


# --------------------------------------------------------------------------------------------
# Verification


HeaderSource = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]
"""A framework's header mapping (any key case), or raw ``(name, value)`` pairs (ASGI)."""


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _header_lookup(headers: HeaderSource) -> dict[str, str]:
    """Lower-case the header names; a signing header sent twice with two values is refused."""
    # ``items()`` also covers mappings that are not a ``Mapping`` (``http.client`` messages).
    items = getattr(headers, "items", None)
    pairs: Iterable[Any] = items() if callable(items) else headers
    found: dict[str, str] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(
                "headers must be a mapping of header names to values or (name, value) pairs, "
                f"got an item {pair!r}: pass the request's headers object as it is"
            )
        name, value = _text(pair[0]).lower(), _text(pair[1]).strip()
        if name in found and found[name] != value and name in _SIGNING_HEADERS:
            raise WebhookSignatureError(
                f"header {name} was sent twice with different values: refusing an ambiguous "
                "signature (check proxies that add or rewrite headers)"
            )
        found.setdefault(name, value)
    return found


_SIGNING_HEADERS = frozenset(
    name.lower()
    for name in (
        SIGNATURE_HEADER,
        SIGNATURE_256_HEADER,
        TIMESTAMP_HEADER,
        EVENT_ID_HEADER,
        EVENT_TYPE_HEADER,
    )
)


def _parse_timestamped(value: str) -> tuple[int, list[str]]:
    """Split ``t=<ts>,v1=<hex>,...`` into the timestamp and the v1 signatures."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in value.split(","):
        key, sep, field = item.strip().partition("=")
        if not sep:
            raise WebhookSignatureError(
                f"{SIGNATURE_256_HEADER} is malformed: {item.strip()!r} is not key=value "
                "(expected t=<unix seconds>,v1=<hex>[,v1=<hex>...])"
            )
        if key == "t":
            if timestamp is not None:
                raise WebhookSignatureError(f"{SIGNATURE_256_HEADER} names t= twice")
            if not _TIMESTAMP.fullmatch(field):
                raise WebhookTimestampError(
                    f"{SIGNATURE_256_HEADER} has a malformed timestamp t={field!r}: expected "
                    "unix seconds (digits only)"
                )
            timestamp = int(field)
        elif key == "v1" and len(signatures) < _MAX_SIGNATURES:
            signatures.append(field.lower())
        # other schemes (v0, a future v2) are ignored: a newer sender may add one
    if timestamp is None:
        raise WebhookTimestampError(f"{SIGNATURE_256_HEADER} has no t=<unix seconds>")
    if not signatures:
        raise WebhookSignatureError(
            f"{SIGNATURE_256_HEADER} has no v1=<hex> signature (only schemes this version "
            "does not know): upgrade runcycles"
        )
    return timestamp, signatures


def _matches(expected: Iterable[str], candidates: Sequence[str]) -> bool:
    # Compare every pair in constant time per comparison; stopping at a match leaks only
    # that one matched, which the caller learns anyway.
    return any(
        hmac.compare_digest(want, got)
        for want in expected
        for got in candidates
        if _HEX64.fullmatch(got)
    )


def _verify_timestamped(
    value: str,
    lookup: Mapping[str, str],
    payload: bytes,
    keys: list[str],
    now: float,
    tolerance_s: float,
) -> None:
    timestamp, signatures = _parse_timestamped(value)
    plain = lookup.get(TIMESTAMP_HEADER.lower())
    if plain is not None and plain != str(timestamp):
        raise WebhookTimestampError(
            f"{TIMESTAMP_HEADER}: {plain!r} disagrees with t={timestamp} of "
            f"{SIGNATURE_256_HEADER}: the headers were altered"
        )
    if not _matches((sign_timestamped(key, timestamp, payload) for key in keys), signatures):
        raise WebhookSignatureError(
            f"{SIGNATURE_256_HEADER} matches none of the {len(keys)} secret(s) given: the body "
            "was changed (verify the raw bytes, before any JSON parsing) or the secret is "
            "wrong or rotated (pass the old and the new one)"
        )
    skew = timestamp - now
    if abs(skew) > tolerance_s:
        when = f"{-skew:.0f} s old" if skew < 0 else f"{skew:.0f} s in the future"
        raise WebhookTimestampError(
            f"delivery signed at t={timestamp} is {when}, outside the tolerance of "
            f"{tolerance_s:g} s: a replayed request, or a clock that is off (sync it with NTP)",
            timestamp=timestamp,
            now=now,
            tolerance_s=tolerance_s,
        )


def _verify_body_only(value: str | None, payload: bytes, keys: list[str]) -> None:
    if value is None:
        raise WebhookSignatureError(
            f"no {SIGNATURE_256_HEADER} header, and no {SIGNATURE_HEADER} header either: "
            "the request is not a signed Cycles delivery"
        )
    scheme, _, signature = value.partition("=")
    if scheme != "sha256" or not signature:
        raise WebhookSignatureError(
            f"{SIGNATURE_HEADER} is malformed: expected sha256=<hex>, got {value[:80]!r}"
        )
    if not _matches((sign_body(key, payload) for key in keys), [signature.lower()]):
        raise WebhookSignatureError(
            f"{SIGNATURE_HEADER} matches none of the {len(keys)} secret(s) given: the body was "
            "changed (verify the raw bytes, before any JSON parsing) or the secret is wrong"
        )


def verify_delivery(
    body: Body,
    headers: HeaderSource,
    secrets: str | Sequence[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
    seen: SeenEventStore | None = None,
    allow_body_only: bool = False,
) -> Event:
    """Check a delivery's signature, its age and (with ``seen``) its novelty; return the event.

    ``body`` is the raw request body; ``headers`` any header mapping (names in any case);
    ``secrets`` the subscription's secret, or several while it is rotated (any may match).
    Checks, in order: the timestamped signature (``X-Cycles-Signature-256``) against every
    secret in constant time; its timestamp within ``tolerance_s`` of ``now`` (default: this
    machine's clock) either way; the body as an :class:`~runcycles.events.Event` whose id and
    type agree with the ``X-Cycles-Event-*`` headers; and, with ``seen``, that the event id
    is new (it is then recorded: call ``seen.discard(event.event_id)`` if handling fails, so
    the sender's retry is accepted).

    ``allow_body_only=True`` accepts a delivery that has only the official body signature
    (``X-Cycles-Signature``), for senders that do not send the timestamped one. It is off by
    default because that signature covers no time: a captured request verifies forever, and
    anyone who can strip the timestamped headers off a captured delivery could replay it
    through this fallback. With it on, only ``seen`` stands between a receiver and replays
    (and only for as long as the store remembers an id). A delivery that has the timestamped
    header is always checked by it.

    Raises:
        WebhookSignatureError: no valid signature for any given secret.
        WebhookTimestampError: the timestamp is missing, malformed, stale or in the future.
        WebhookPayloadError: the body is not a valid event, or the headers contradict it.
        WebhookReplayError: ``seen`` already holds the event id.
        CyclesConfigError: no secret, an empty secret, or a negative tolerance.
        TypeError: ``body`` is not bytes (pass the raw body, not parsed JSON).
    """
    event = _verified_event(body, headers, secrets, tolerance_s, now, allow_body_only)
    if seen is not None and not seen.add(event.event_id):
        raise _replayed(event)
    return event


async def averify_delivery(
    body: Body,
    headers: HeaderSource,
    secrets: str | Sequence[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
    seen: AsyncSeenEventStore | None = None,
    allow_body_only: bool = False,
) -> Event:
    """:func:`verify_delivery` with an async seen store (``redis.asyncio``, a database pool).

    The checks are the same and run without I/O; only ``seen.add`` is awaited.

    Raises:
        WebhookVerificationError: as :func:`verify_delivery` (and the same other errors).
    """
    event = _verified_event(body, headers, secrets, tolerance_s, now, allow_body_only)
    if seen is not None and not await seen.add(event.event_id):
        raise _replayed(event)
    return event


def _replayed(event: Event) -> WebhookReplayError:
    return WebhookReplayError(
        f"event {event.event_id} was already received: a replay or a redelivery "
        "(answer 200 so the sender stops retrying; do not process it again)",
        event_id=event.event_id,
    )


def _verified_event(
    body: Body,
    headers: HeaderSource,
    secrets: str | Sequence[str],
    tolerance_s: float,
    now: float | None,
    allow_body_only: bool,
) -> Event:
    """Every check but the seen store: signature, age, payload, header agreement."""
    payload = _check_body(body)
    keys = _secret_list(secrets)
    if not (tolerance_s >= 0 and math.isfinite(tolerance_s)):
        raise CyclesConfigError(f"tolerance_s must be a finite number >= 0, got {tolerance_s}")
    lookup = _header_lookup(headers)
    timestamped = lookup.get(SIGNATURE_256_HEADER.lower())
    if timestamped is not None:
        clock = time.time() if now is None else now
        _verify_timestamped(timestamped, lookup, payload, keys, clock, tolerance_s)
    elif allow_body_only:
        _verify_body_only(lookup.get(SIGNATURE_HEADER.lower()), payload, keys)
    else:
        raise WebhookSignatureError(
            f"no {SIGNATURE_256_HEADER} header: the delivery has no timestamped signature. "
            f"If the sender only sends the official {SIGNATURE_HEADER} (body only), pass "
            "allow_body_only=True and a seen store (such requests can be replayed)"
        )
    try:
        event = Event.decode(payload)
    except ValidationError as error:
        raise WebhookPayloadError(f"the signed body is not a valid Cycles event: {error}") from None
    for header, value in (
        (EVENT_ID_HEADER, event.event_id),
        (EVENT_TYPE_HEADER, event.event_type),
    ):
        sent = lookup.get(header.lower())
        if sent is not None and sent != value:
            raise WebhookPayloadError(
                f"{header}: {sent!r} disagrees with the signed body's {value!r}: the headers "
                "were altered (route by the returned event, never by unsigned headers)"
            )
    return event
