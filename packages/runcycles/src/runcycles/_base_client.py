"""The Cycles protocol clients: the nine calls, their pool, and what each client runs.

:class:`BaseCyclesClient` and :class:`AsyncBaseCyclesClient` are adjacent twins that differ
only in ``await``: each call encodes the request (:mod:`runcycles._protocol`), sends it with
retries (:mod:`runcycles.retry`) and returns a :class:`~runcycles.response.CyclesResponse`
(no exception for a server error or an unreachable server; a bad *input* raises before
sending). :mod:`runcycles.client` adds the guard shortcuts on top.

Each client owns, started on first use and stopped by ``close()`` / ``aclose()``, its
heartbeat scheduler, its settlement engine, its API key's tenant and the replay of what
earlier processes left in the journal; a client inherited across ``fork()`` starts afresh in
the child (see ``docs/architecture.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import sys
import threading
import urllib.request
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from runcycles import _autoreplay, _fastpath
from runcycles._http11 import AsyncHTTP11Transport
from runcycles._protocol import (
    BalanceFilters,
    ClientCore,
    ReservationFilters,
    balance_params,
    next_page_cursor,
    parse_http_response,
    reservation_params,
    transport_failure,
)
from runcycles._wire import AsyncWire, SyncWire
from runcycles.config import CyclesConfig
from runcycles.evidence import ResolutionFailure, Verification, verify_envelope
from runcycles.exceptions import SubjectRequiredError
from runcycles.heartbeat import AsyncHeartbeatScheduler, HeartbeatScheduler
from runcycles.models import (
    Balance,
    BalanceResponse,
    CommitRequest,
    CommitResponse,
    CyclesEvidence,
    CyclesEvidenceJwks,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    ReservationSummary,
)
from runcycles.response import CyclesResponse, ModelT
from runcycles.retry import RetryPolicy, asleep_s, sleep_s
from runcycles.settlement import AsyncSettlement, Settlement, default_journal

if sys.version_info >= (3, 11):
    from typing import Self, Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Self, Unpack

__all__ = ["AsyncBaseCyclesClient", "BalanceFilters", "BaseCyclesClient", "ReservationFilters"]


def _evidence_id(evidence_id: str) -> str:
    """Check an evidence id before it goes into a URL.

    Raises:
        ValueError: not 64 lower-case hex digits.
    """
    if len(evidence_id) != 64 or any(c not in "0123456789abcdef" for c in evidence_id):
        raise ValueError(
            f"evidence_id must be 64 lower-case hex digits (a sha256), not {evidence_id!r}"
        )
    return evidence_id


def _verify(
    envelope: bytes, keys: CyclesResponse[CyclesEvidenceJwks], expected_signer: str | None
) -> Verification:
    jwks: Any = keys.content
    if not keys.is_success:
        jwks = ResolutionFailure(f"the JWK Set could not be fetched ({keys.error_message})")
    return verify_envelope(envelope, jwks=jwks, expected_signer=expected_signer)


_logger = logging.getLogger("runcycles")


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """Return the process-wide TLS context of clients that create their own pool.

    Loading the CA bundle takes tens of milliseconds, so it is done once per process, not
    per client. It honours ``SSL_CERT_FILE``/``SSL_CERT_DIR`` like httpx's default.
    """
    return httpx.create_ssl_context()


Headers = Mapping[str, str]

_generation = 0
"""How many times this process is a ``fork()`` child: a client built in another generation
starts afresh (its pool's connections and its background work stayed in the parent)."""


def _forked() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_forked)


def _key_tenant_of(response: CyclesResponse[Any]) -> str:
    """The API key's tenant from ``response`` (``X-Cycles-Tenant``); raise if it is missing."""
    if response.cycles_tenant:
        return response.cycles_tenant
    error = response.to_exception()
    if error is not None and not response.is_success:
        raise error
    raise SubjectRequiredError(
        "the reservation has no subject and the server did not say which tenant the API key "
        "belongs to (no X-Cycles-Tenant header); pass tenant=... or set "
        "CyclesConfig(tenant=...)"
    )


_closers: set[AsyncGenerator[None, None]] = set()
"""Started closer generators, kept alive here until their loop shuts down (a loop holds its
async generators only weakly)."""


def at_loop_shutdown(cleanup: Callable[[], Awaitable[None]]) -> AsyncGenerator[None, None]:
    """Run ``cleanup()`` when the running event loop shuts down.

    ``asyncio.run()`` (and every well-behaved loop runner) calls ``loop.shutdown_asyncgens()``
    before closing the loop, which closes every started async generator of that loop: the
    ``finally`` of the one started here then awaits ``cleanup()``, on that loop. Returns the
    generator: :func:`forget_loop_shutdown` drops it early (its ``cleanup`` then runs when
    the loop finalizes it, or never if the loop is gone).
    """

    async def closer() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            _closers.discard(generator)
            await cleanup()

    generator = closer()
    _closers.add(generator)
    step = generator.__anext__()  # registers the generator with the running loop
    with contextlib.suppress(StopIteration):
        step.send(None)  # runs to the ``yield`` without suspending (nothing is awaited)
    return generator


def forget_loop_shutdown(generator: AsyncGenerator[None, None] | None) -> None:
    """Stop keeping a closer of :func:`at_loop_shutdown` alive (its work is done)."""
    if generator is not None:
        _closers.discard(generator)


class BaseCyclesClient:
    """The protocol half of :class:`~runcycles.CyclesClient` (documented there)."""

    def __init__(
        self,
        config: CyclesConfig,
        *,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        if http_client is not None and transport is not None:
            raise TypeError("pass either http_client or transport, not both")
        self._core = core = ClientCore(config)
        self._retry = retry_policy or RetryPolicy.from_config(config)
        self._owns_http = http_client is None
        self._transport = transport
        self._http = http_client or self._new_pool()
        self._wire = SyncWire(
            self._http, owned=self._owns_http, base_url=config.base_url, fixed_urls=core.fixed_urls
        )
        self._generation = _generation
        self._lock = threading.Lock()
        self._heartbeat: HeartbeatScheduler | None = None
        self._settlement: Settlement | None = None
        self._key_tenant: str | None = None
        if _autoreplay.wanted(config):  # settle what earlier processes left in the journal
            _autoreplay.start(self)

    def _new_pool(self) -> httpx.Client:
        core = self._core
        return httpx.Client(
            headers=core.base_headers,
            timeout=core.timeout(),
            limits=core.limits(),
            transport=self._transport,
            verify=default_ssl_context(),
        )

    def _after_fork(self) -> None:
        """Start afresh in a ``fork()`` child: nothing the parent started runs here."""
        self._generation = _generation
        self._lock = threading.Lock()  # maybe held by a thread of the parent at the fork
        self._heartbeat = None  # its thread stayed in the parent
        self._settlement = None
        if self._owns_http and not self._http.is_closed:
            # The parent's connections are the parent's: writing to them from here would
            # interleave two processes' requests on one socket.
            self._http = self._new_pool()
            config = self.config
            self._wire = SyncWire(
                self._http, owned=True, base_url=config.base_url, fixed_urls=self._core.fixed_urls
            )

    @property
    def config(self) -> CyclesConfig:
        """The configuration this client was built with."""
        return self._core.config

    @property
    def http_client(self) -> httpx.Client:
        """The ``httpx.Client`` (connection pool) this client sends with."""
        return self._http

    def with_options(self, *, retry_policy: RetryPolicy) -> Self:
        """Return a sibling client that shares this one's pool but uses ``retry_policy``.

        The sibling never closes the shared pool; close the original when done. (A single
        call takes its own policy too: every method accepts ``retry_policy=``.)
        """
        with _autoreplay.building_sibling():
            sibling = type(self)(self.config, http_client=self._http, retry_policy=retry_policy)
        sibling._core = self._core
        sibling._wire = self._wire  # the same (direct) way to the shared pool
        return sibling

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def heartbeat(self) -> HeartbeatScheduler:
        """This client's heartbeat scheduler (started on first use, stopped by :meth:`close`).

        One background thread extends every live reservation of the client.
        """
        scheduler = self._heartbeat
        if scheduler is None or self._generation != _generation:
            if self._generation != _generation:
                self._after_fork()
            with self._lock:
                scheduler = self._heartbeat
                if scheduler is None:
                    scheduler = self._heartbeat = HeartbeatScheduler(self)
        return scheduler

    @property
    def settlement(self) -> Settlement:
        """This client's settlement engine: durable, exactly-once commits.

        It journals to :func:`~runcycles.settlement.default_journal` of the client's config;
        ``client.settlement.flush(timeout_s)`` settles what the journal holds.
        """
        engine = self._settlement
        if engine is None or self._generation != _generation:
            if self._generation != _generation:
                self._after_fork()
            with self._lock:
                engine = self._settlement
                if engine is None:
                    engine = Settlement(self, journal=default_journal(self.config))
                    self._settlement = engine
        return engine

    @property
    def api_key_tenant(self) -> str | None:
        """The tenant of the API key, once :meth:`discover_tenant` asked the server."""
        return self._key_tenant

    def discover_tenant(self) -> str:
        """Return the tenant of the API key, asking the server once per client.

        Every server answer carries the key's tenant in ``X-Cycles-Tenant``, so one
        ``GET /v1/reservations?limit=1`` reveals it. Guards and ``@cycles`` use it when no
        subject field is configured anywhere.

        Raises:
            CyclesError: The server could not be asked (transport or auth failure).
            SubjectRequiredError: The server did not report the tenant.
        """
        if self._key_tenant is None:
            self._key_tenant = _key_tenant_of(self.list_reservations(limit=1))
        return self._key_tenant

    def close(self) -> None:
        """Stop the heartbeat and close the connection pool.

        The pool is left open when it was passed in as ``http_client``. Reservations still
        held stop being extended: they expire at the end of their lease.
        """
        if self._generation != _generation:  # a fork child: the parent's lock, thread, pool
            self._after_fork()
        with self._lock:
            scheduler, self._heartbeat = self._heartbeat, None
        if scheduler is not None:
            scheduler.close()
        if self._owns_http:
            self._http.close()

    def create_reservation(
        self,
        request: ReservationCreateRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReservationCreateResponse]:
        """Reserve budget: ``POST /v1/reservations``."""
        content, hdrs = self._core.post_body(request, ReservationCreateRequest, headers)
        url = self._core.reservations_url
        return self._send(
            "POST", url, ReservationCreateResponse, hdrs, content=content, retry=retry_policy
        )

    def _create_encoded(
        self, content: bytes, idempotency_key: str
    ) -> CyclesResponse[ReservationCreateResponse]:
        """``create_reservation`` of a request the library already serialized (``@cycles``)."""
        hdrs = self._core.encoded_headers(idempotency_key)
        url = self._core.reservations_url
        return self._send("POST", url, ReservationCreateResponse, hdrs, content=content)

    def commit_reservation(
        self,
        reservation_id: str,
        request: CommitRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[CommitResponse]:
        """Record actual usage: ``POST /v1/reservations/{reservation_id}/commit``."""
        content, hdrs = self._core.post_body(request, CommitRequest, headers)
        url = self._core.reservation_url(reservation_id, "/commit")
        return self._send("POST", url, CommitResponse, hdrs, content=content, retry=retry_policy)

    def release_reservation(
        self,
        reservation_id: str,
        request: ReleaseRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReleaseResponse]:
        """Give a reservation back: ``POST /v1/reservations/{reservation_id}/release``."""
        content, hdrs = self._core.post_body(request, ReleaseRequest, headers)
        url = self._core.reservation_url(reservation_id, "/release")
        return self._send("POST", url, ReleaseResponse, hdrs, content=content, retry=retry_policy)

    def extend_reservation(
        self,
        reservation_id: str,
        request: ReservationExtendRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReservationExtendResponse]:
        """Move a reservation's expiry: ``POST /v1/reservations/{reservation_id}/extend``.

        ``request.extend_by_ms`` is added to the current expiry.
        """
        content, hdrs = self._core.post_body(request, ReservationExtendRequest, headers)
        url = self._core.reservation_url(reservation_id, "/extend")
        return self._send(
            "POST", url, ReservationExtendResponse, hdrs, content=content, retry=retry_policy
        )

    def decide(
        self,
        request: DecisionRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[DecisionResponse]:
        """Ask whether a reservation would be allowed, holding nothing: ``POST /v1/decide``."""
        content, hdrs = self._core.post_body(request, DecisionRequest, headers)
        url = self._core.decide_url
        return self._send("POST", url, DecisionResponse, hdrs, content=content, retry=retry_policy)

    def create_event(
        self,
        request: EventCreateRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[EventCreateResponse]:
        """Debit usage directly, without a reservation: ``POST /v1/events`` (HTTP 201)."""
        content, hdrs = self._core.post_body(request, EventCreateRequest, headers)
        url = self._core.events_url
        return self._send(
            "POST", url, EventCreateResponse, hdrs, content=content, retry=retry_policy
        )

    def get_reservation(
        self,
        reservation_id: str,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReservationDetail]:
        """Fetch one reservation: ``GET /v1/reservations/{reservation_id}``."""
        url = self._core.reservation_url(reservation_id)
        return self._send(
            "GET", url, ReservationDetail, self._core.headers_for_get(headers), retry=retry_policy
        )

    def get_evidence(
        self, evidence_id: str, *, retry_policy: RetryPolicy | None = None
    ) -> CyclesResponse[CyclesEvidence]:
        """Fetch a signed envelope: ``GET /v1/evidence/{evidence_id}`` (public; 404 till stored)."""
        url = f"{self._core.config.base_url}/v1/evidence/{_evidence_id(evidence_id)}"
        return self._send("GET", url, CyclesEvidence, {}, retry=retry_policy)

    def get_evidence_jwks(
        self, *, retry_policy: RetryPolicy | None = None
    ) -> CyclesResponse[CyclesEvidenceJwks]:
        """Fetch the server's signing keys: ``GET /v1/.well-known/cycles-jwks.json`` (public)."""
        url = f"{self._core.config.base_url}/v1/.well-known/cycles-jwks.json"
        return self._send("GET", url, CyclesEvidenceJwks, {}, retry=retry_policy)

    def verify_evidence(
        self,
        evidence_id: str,
        *,
        expected_signer: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> Verification:
        """Fetch an envelope and this server's JWK Set, and verify it offline.

        The envelope is checked by content (its id must re-derive), so the server that served
        it is not trusted; authority comes from the JWK Set (``authentic``), or, if the set
        cannot be fetched, the result says ``signer_resolution_failed``.

        Raises:
            CyclesProtocolError: the envelope could not be fetched (404 until it is stored:
                retry shortly).
        """
        envelope = self.get_evidence(evidence_id, retry_policy=retry_policy).raise_for_error()
        keys = self.get_evidence_jwks(retry_policy=retry_policy)
        return _verify(envelope.content, keys, expected_signer)

    def list_reservations(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[ReservationFilters],
    ) -> CyclesResponse[ReservationListResponse]:
        """List one page of reservations: ``GET /v1/reservations``.

        ``filters``: see :class:`ReservationFilters` (``status``, ``tenant``, ...,
        ``limit``, ``cursor``).
        """
        params = reservation_params(filters)
        url = self._core.reservations_url
        return self._list(url, ReservationListResponse, params, headers, retry_policy)

    def iter_reservations(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[ReservationFilters],
    ) -> Iterator[ReservationSummary]:
        """Iterate over every reservation matching ``filters``, following ``next_cursor``.

        Filters are checked now; pages are fetched as the iterator advances (a page that
        cannot be fetched raises its ``CyclesError`` then). ``headers`` and
        ``retry_policy`` apply to every page request.
        """
        params = reservation_params(filters)
        url = self._core.reservations_url
        return self._pages(
            url, ReservationListResponse, "reservations", params, headers, retry_policy
        )

    def get_balances(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[BalanceFilters],
    ) -> CyclesResponse[BalanceResponse]:
        """Read one page of balances: ``GET /v1/balances``.

        ``filters``: see :class:`BalanceFilters`; at least one subject field is required.

        Raises:
            ValueError: No subject filter was given (checked before sending).
        """
        params = balance_params(filters)
        return self._list(self._core.balances_url, BalanceResponse, params, headers, retry_policy)

    def iter_balances(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[BalanceFilters],
    ) -> Iterator[Balance]:
        """Iterate over every balance matching ``filters`` (as :meth:`iter_reservations`)."""
        params = balance_params(filters)
        return self._pages(
            self._core.balances_url, BalanceResponse, "balances", params, headers, retry_policy
        )

    def _list(
        self,
        url: str,
        model: type[ModelT],
        params: dict[str, str],
        headers: Headers | None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ModelT]:
        hdrs = self._core.headers_for_get(headers)
        return self._send("GET", url, model, hdrs, params=params, retry=retry_policy)

    def _pages(
        self,
        url: str,
        model: type[ReservationListResponse] | type[BalanceResponse],
        field: str,
        params: dict[str, str],
        headers: Headers | None,
        retry_policy: RetryPolicy | None = None,
    ) -> Iterator[Any]:
        while True:
            page = self._list(url, model, params, headers, retry_policy).data
            yield from getattr(page, field)
            cursor = next_page_cursor(params.get("cursor"), page)
            if cursor is None:
                return
            params = {**params, "cursor": cursor}

    def _send(
        self,
        method: str,
        url: str,
        model: type[ModelT],
        headers: dict[str, str],
        *,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> CyclesResponse[ModelT]:
        if self._generation != _generation:
            self._after_fork()
        wire = self._wire
        request = wire.build(method, url, headers, content, params)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = parse_http_response(wire.send(request), model)
            except (httpx.TransportError, httpx.DecodingError) as exc:
                response = transport_failure(request, model, exc)
            delay_s = (retry or self._retry).next_delay_s(attempt, response)
            if delay_s is None:
                return response
            _log_retry(response, attempt, delay_s)
            sleep_s(delay_s)


class AsyncBaseCyclesClient:
    """The protocol half of :class:`~runcycles.AsyncCyclesClient` (documented there)."""

    def __init__(
        self,
        config: CyclesConfig,
        *,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        if http_client is not None and transport is not None:
            raise TypeError("pass either http_client or transport, not both")
        self._core = core = ClientCore(config)
        self._retry = retry_policy or RetryPolicy.from_config(config)
        self._owns_http = http_client is None
        self._transport = transport
        self._http = http_client or self._new_pool()
        self._wire = AsyncWire(
            self._http, owned=self._owns_http, base_url=config.base_url, fixed_urls=core.fixed_urls
        )
        self._generation = _generation
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._loop_closer: AsyncGenerator[None, None] | None = None
        self._heartbeats: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, AsyncHeartbeatScheduler
        ] = weakref.WeakKeyDictionary()
        self._settlement: AsyncSettlement | None = None
        self._key_tenant: str | None = None
        # the journal replay starts with the first request, inside the running event loop
        self._replay_since_ms = _autoreplay.now_ms() if _autoreplay.wanted(config) else None

    def _new_pool(self) -> httpx.AsyncClient:
        core = self._core
        transport = self._transport
        if transport is None and _fastpath.enabled and not urllib.request.getproxies():
            # Our lean pool (runcycles._http11); with a proxy configured, httpx's own mounts.
            transport = AsyncHTTP11Transport(
                ssl_context=default_ssl_context(), max_connections=core.config.max_connections
            )
        return httpx.AsyncClient(
            headers=core.base_headers,
            timeout=core.timeout(),
            limits=core.limits(),
            transport=transport,
            verify=default_ssl_context(),
        )

    def _after_fork(self) -> None:
        """Start afresh in a ``fork()`` child: nothing the parent started runs here."""
        self._generation = _generation
        self._heartbeats = weakref.WeakKeyDictionary()  # the parent's loops and tasks
        self._settlement = None
        self._pool_loop = None
        if self._owns_http and not self._http.is_closed:
            # The parent's connections are the parent's (see the sync twin).
            self._renew_pool()

    def _renew_pool(self) -> httpx.AsyncClient:
        """Swap in a new, empty pool; return the old one (for the caller to close)."""
        old = self._http
        self._http = self._new_pool()
        config = self.config
        self._wire = AsyncWire(
            self._http, owned=True, base_url=config.base_url, fixed_urls=self._core.fixed_urls
        )
        return old

    def _enter_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """First request on ``loop``: its connections are closed when that loop shuts down.

        Pooled connections belong to the event loop that opened them and die with it. So
        that none outlives its loop (``asyncio.run`` returning while the client is still
        open), the pool this client owns is swapped for a new one at the loop's shutdown
        and the old one closed there; the client stays usable on a later loop.
        """
        self._pool_loop = loop
        ref = weakref.ref(self)  # a client dropped without aclose() must stay collectable

        async def release_loop_pool() -> None:
            client = ref()
            if client is None:
                return
            if client._pool_loop is loop:
                client._pool_loop = None
            if not client._http.is_closed:
                await client._renew_pool().aclose()

        self._loop_closer = at_loop_shutdown(release_loop_pool)

    @property
    def config(self) -> CyclesConfig:
        """The configuration this client was built with."""
        return self._core.config

    @property
    def http_client(self) -> httpx.AsyncClient:
        """The ``httpx.AsyncClient`` (connection pool) this client sends with."""
        return self._http

    def with_options(self, *, retry_policy: RetryPolicy) -> Self:
        """Async twin of :meth:`BaseCyclesClient.with_options`."""
        with _autoreplay.building_sibling():
            sibling = type(self)(self.config, http_client=self._http, retry_policy=retry_policy)
        sibling._core = self._core
        sibling._wire = self._wire  # the same (direct) way to the shared pool
        return sibling

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def heartbeat(self) -> AsyncHeartbeatScheduler:
        """Async twin of :attr:`BaseCyclesClient.heartbeat`: one task per event loop.

        Raises:
            RuntimeError: No event loop is running in this thread.
        """
        if self._generation != _generation:
            self._after_fork()
        loop = asyncio.get_running_loop()
        scheduler = self._heartbeats.get(loop)
        if scheduler is None:
            scheduler = self._heartbeats[loop] = AsyncHeartbeatScheduler(self)
        return scheduler

    @property
    def settlement(self) -> AsyncSettlement:
        """Async twin of :attr:`BaseCyclesClient.settlement`."""
        if self._generation != _generation:
            self._after_fork()
        engine = self._settlement
        if engine is None:
            engine = self._settlement = AsyncSettlement(self, journal=default_journal(self.config))
        return engine

    @property
    def api_key_tenant(self) -> str | None:
        """The tenant of the API key, once :meth:`discover_tenant` asked the server."""
        return self._key_tenant

    async def discover_tenant(self) -> str:
        """Async twin of :meth:`BaseCyclesClient.discover_tenant`."""
        if self._key_tenant is None:
            self._key_tenant = _key_tenant_of(await self.list_reservations(limit=1))
        return self._key_tenant

    async def aclose(self) -> None:
        """Stop the heartbeat and the journal replay, and close the connection pool.

        The pool is left open when it was passed in as ``http_client``. Reservations still
        held stop being extended: they expire at the end of their lease. A heartbeat
        running on another event loop is stopped there without waiting.
        """
        schedulers = list(self._heartbeats.values())
        self._heartbeats.clear()
        if self._generation == _generation:
            for scheduler in schedulers:
                if scheduler.on_running_loop():
                    await scheduler.aclose()
                else:
                    scheduler.close()
            await _autoreplay.astop(self)
        if self._owns_http:
            await self._http.aclose()
        forget_loop_shutdown(self._loop_closer)
        self._loop_closer = None

    async def create_reservation(
        self,
        request: ReservationCreateRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReservationCreateResponse]:
        """Async twin of :meth:`BaseCyclesClient.create_reservation`."""
        content, hdrs = self._core.post_body(request, ReservationCreateRequest, headers)
        url = self._core.reservations_url
        return await self._send(
            "POST", url, ReservationCreateResponse, hdrs, content=content, retry=retry_policy
        )

    async def _create_encoded(
        self, content: bytes, idempotency_key: str
    ) -> CyclesResponse[ReservationCreateResponse]:
        """``create_reservation`` of a request the library already serialized (``@cycles``)."""
        hdrs = self._core.encoded_headers(idempotency_key)
        url = self._core.reservations_url
        return await self._send("POST", url, ReservationCreateResponse, hdrs, content=content)

    async def commit_reservation(
        self,
        reservation_id: str,
        request: CommitRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[CommitResponse]:
        """Async twin of :meth:`BaseCyclesClient.commit_reservation`."""
        content, hdrs = self._core.post_body(request, CommitRequest, headers)
        url = self._core.reservation_url(reservation_id, "/commit")
        return await self._send(
            "POST", url, CommitResponse, hdrs, content=content, retry=retry_policy
        )

    async def release_reservation(
        self,
        reservation_id: str,
        request: ReleaseRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReleaseResponse]:
        """Async twin of :meth:`BaseCyclesClient.release_reservation`."""
        content, hdrs = self._core.post_body(request, ReleaseRequest, headers)
        url = self._core.reservation_url(reservation_id, "/release")
        return await self._send(
            "POST", url, ReleaseResponse, hdrs, content=content, retry=retry_policy
        )

    async def extend_reservation(
        self,
        reservation_id: str,
        request: ReservationExtendRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReservationExtendResponse]:
        """Async twin of :meth:`BaseCyclesClient.extend_reservation`."""
        content, hdrs = self._core.post_body(request, ReservationExtendRequest, headers)
        url = self._core.reservation_url(reservation_id, "/extend")
        return await self._send(
            "POST", url, ReservationExtendResponse, hdrs, content=content, retry=retry_policy
        )

    async def decide(
        self,
        request: DecisionRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[DecisionResponse]:
        """Async twin of :meth:`BaseCyclesClient.decide`."""
        content, hdrs = self._core.post_body(request, DecisionRequest, headers)
        url = self._core.decide_url
        return await self._send(
            "POST", url, DecisionResponse, hdrs, content=content, retry=retry_policy
        )

    async def create_event(
        self,
        request: EventCreateRequest | Mapping[str, Any],
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[EventCreateResponse]:
        """Async twin of :meth:`BaseCyclesClient.create_event`."""
        content, hdrs = self._core.post_body(request, EventCreateRequest, headers)
        url = self._core.events_url
        return await self._send(
            "POST", url, EventCreateResponse, hdrs, content=content, retry=retry_policy
        )

    async def get_reservation(
        self,
        reservation_id: str,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ReservationDetail]:
        """Async twin of :meth:`BaseCyclesClient.get_reservation`."""
        url = self._core.reservation_url(reservation_id)
        return await self._send(
            "GET", url, ReservationDetail, self._core.headers_for_get(headers), retry=retry_policy
        )

    async def get_evidence(
        self, evidence_id: str, *, retry_policy: RetryPolicy | None = None
    ) -> CyclesResponse[CyclesEvidence]:
        """Async twin of :meth:`BaseCyclesClient.get_evidence`."""
        url = f"{self._core.config.base_url}/v1/evidence/{_evidence_id(evidence_id)}"
        return await self._send("GET", url, CyclesEvidence, {}, retry=retry_policy)

    async def get_evidence_jwks(
        self, *, retry_policy: RetryPolicy | None = None
    ) -> CyclesResponse[CyclesEvidenceJwks]:
        """Async twin of :meth:`BaseCyclesClient.get_evidence_jwks`."""
        url = f"{self._core.config.base_url}/v1/.well-known/cycles-jwks.json"
        return await self._send("GET", url, CyclesEvidenceJwks, {}, retry=retry_policy)

    async def verify_evidence(
        self,
        evidence_id: str,
        *,
        expected_signer: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> Verification:
        """Async twin of :meth:`BaseCyclesClient.verify_evidence`."""
        fetched = await self.get_evidence(evidence_id, retry_policy=retry_policy)
        envelope = fetched.raise_for_error()
        keys = await self.get_evidence_jwks(retry_policy=retry_policy)
        return _verify(envelope.content, keys, expected_signer)

    async def list_reservations(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[ReservationFilters],
    ) -> CyclesResponse[ReservationListResponse]:
        """Async twin of :meth:`BaseCyclesClient.list_reservations`."""
        params = reservation_params(filters)
        url = self._core.reservations_url
        return await self._list(url, ReservationListResponse, params, headers, retry_policy)

    def iter_reservations(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[ReservationFilters],
    ) -> AsyncIterator[ReservationSummary]:
        """Async twin of :meth:`BaseCyclesClient.iter_reservations` (use ``async for``)."""
        params = reservation_params(filters)
        url = self._core.reservations_url
        return self._pages(
            url, ReservationListResponse, "reservations", params, headers, retry_policy
        )

    async def get_balances(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[BalanceFilters],
    ) -> CyclesResponse[BalanceResponse]:
        """Async twin of :meth:`BaseCyclesClient.get_balances`."""
        params = balance_params(filters)
        return await self._list(
            self._core.balances_url, BalanceResponse, params, headers, retry_policy
        )

    def iter_balances(
        self,
        *,
        headers: Headers | None = None,
        retry_policy: RetryPolicy | None = None,
        **filters: Unpack[BalanceFilters],
    ) -> AsyncIterator[Balance]:
        """Async twin of :meth:`BaseCyclesClient.iter_balances` (use ``async for``)."""
        params = balance_params(filters)
        return self._pages(
            self._core.balances_url, BalanceResponse, "balances", params, headers, retry_policy
        )

    async def _list(
        self,
        url: str,
        model: type[ModelT],
        params: dict[str, str],
        headers: Headers | None,
        retry_policy: RetryPolicy | None = None,
    ) -> CyclesResponse[ModelT]:
        hdrs = self._core.headers_for_get(headers)
        return await self._send("GET", url, model, hdrs, params=params, retry=retry_policy)

    async def _pages(
        self,
        url: str,
        model: type[ReservationListResponse] | type[BalanceResponse],
        field: str,
        params: dict[str, str],
        headers: Headers | None,
        retry_policy: RetryPolicy | None = None,
    ) -> AsyncIterator[Any]:
        while True:
            page = (await self._list(url, model, params, headers, retry_policy)).data
            for item in getattr(page, field):
                yield item
            cursor = next_page_cursor(params.get("cursor"), page)
            if cursor is None:
                return
            params = {**params, "cursor": cursor}

    async def _send(
        self,
        method: str,
        url: str,
        model: type[ModelT],
        headers: dict[str, str],
        *,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> CyclesResponse[ModelT]:
        if self._replay_since_ms is not None:  # first request: replay the journal now
            since_ms, self._replay_since_ms = self._replay_since_ms, None
            _autoreplay.astart(self, since_ms)
        if self._generation != _generation:
            self._after_fork()
        if self._owns_http and self._pool_loop is not asyncio.get_running_loop():
            self._enter_loop(asyncio.get_running_loop())
        wire = self._wire
        request = wire.build(method, url, headers, content, params)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = parse_http_response(await wire.send(request), model)
            except (httpx.TransportError, httpx.DecodingError) as exc:
                response = transport_failure(request, model, exc)
            delay_s = (retry or self._retry).next_delay_s(attempt, response)
            if delay_s is None:
                return response
            _log_retry(response, attempt, delay_s)
            await asleep_s(delay_s)


def _log_retry(response: CyclesResponse[Any], attempt: int, delay_s: float) -> None:
    outcome = "transport error" if response.is_transport_error else f"HTTP {response.status}"
    _logger.info(
        "retrying %s %s in %.2f s after %s (attempt %d failed: %s)",
        response.method,
        response.url,
        delay_s,
        outcome,
        attempt,
        response.error_message,
    )
