"""The public evidence routes, and the evidence of denials.

* ``GET /v1/evidence/{evidence_id}``: the signed envelope, RFC 8785 canonical bytes, no API
  key (the sha256 id is an unguessable capability), ``Cache-Control: public, max-age=31536000,
  immutable``; ``404`` until stored (a client that got an id retries: see
  ``CyclesEvidenceRef``), ``400`` for an id that is not 64 lower-case hex digits.
* ``GET /v1/.well-known/cycles-jwks.json``: the public keys with their validity windows
  (``Cache-Control: public, max-age=60``: it changes on rotation only).

Both are throttled per client address (:data:`PUBLIC_REQUESTS_PER_MINUTE`, ``429`` with
``Retry-After``). With evidence off both answer ``404``.

:meth:`EvidenceApi.denied` gives a denial (``409 BUDGET_EXCEEDED``, ``403`` ...) its ``error``
envelope: built, stored durably (group-committed with concurrent writes, so a denial storm
costs one shared transaction or pipeline per batch, not one each), and only then named on the
error response. If storing fails, the denial is answered without ``cycles_evidence``: an id is
never sent before its envelope is stored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles_server.errors import LedgerError
from runcycles_server.evidence.canonical import NO_RFC8785_FORM
from runcycles_server.evidence.issuer import DENIAL_CODES, Issuer
from runcycles_server.ratelimit import TokenBucketLimiter
from runcycles_server.stores.base import EvidenceStore, Store
from runcycles_server.web import (
    EVIDENCE_OMITTED_HEADER,
    error_body,
    error_response,
    json_response,
    request_ids,
)

logger = logging.getLogger("runcycles_server")

PUBLIC_REQUESTS_PER_MINUTE: Final = 300
"""Requests a minute each client address may make to the two public evidence routes."""
EVIDENCE_ID_RE: Final = re.compile(r"^[0-9a-f]{64}$")
IMMUTABLE: Final = "public, max-age=31536000, immutable"
JWKS_CACHE: Final = "public, max-age=60"
_REF: Final = b'"cycles_evidence":{'


class EvidenceApi:
    """The evidence routes and denial evidence of one app.

    Args:
        store: where envelopes are stored (must implement
            :class:`~runcycles_server.stores.base.EvidenceStore` when ``issuer`` is given).
        issuer: makes the envelopes; ``None``: evidence off.
        requests_per_minute: per-address limit of the public routes (``None``: off).
    """

    def __init__(
        self,
        store: Store,
        issuer: Issuer | None,
        *,
        requests_per_minute: int | None = PUBLIC_REQUESTS_PER_MINUTE,
        monotonic_s: Callable[[], float] | None = None,
    ) -> None:
        if issuer is not None and not isinstance(store, EvidenceStore):
            raise TypeError(f"{type(store).__name__} cannot store evidence envelopes")
        self.store = store
        self.issuer = issuer
        self.limiter = None
        if requests_per_minute:
            extra: dict[str, Any] = {} if monotonic_s is None else {"monotonic_s": monotonic_s}
            self.limiter = TokenBucketLimiter(
                requests_per_minute / 60, burst=requests_per_minute, **extra
            )

    def routes(self) -> list[BaseRoute]:
        """Return the two public routes."""
        return [
            Route("/v1/evidence/{evidence_id}", self.get_evidence, methods=["GET"]),
            Route("/v1/.well-known/cycles-jwks.json", self.jwks, methods=["GET"]),
        ]

    def _throttled(self, request: Request) -> Response | None:
        if self.limiter is None:
            return None
        address = request.client.host if request.client is not None else "unknown"
        allowed, _, _, retry_after = self.limiter.take(address)
        if allowed:
            return None
        response = error_response(
            request,
            LedgerError(
                "LIMIT_EXCEEDED",
                f"too many evidence requests from {address}; retry after {retry_after} s "
                "(envelopes never change: cache them)",
            ),
        )
        response.headers["Retry-After"] = str(retry_after)
        return response

    def _off(self) -> LedgerError:
        return LedgerError(
            "NOT_FOUND",
            "this server does not emit signed evidence (it was started with --no-evidence)",
        )

    async def get_evidence(self, request: Request) -> Response:
        """``GET /v1/evidence/{evidence_id}`` (public)."""
        throttled = self._throttled(request)
        if throttled is not None:
            return throttled
        evidence_id = str(request.path_params["evidence_id"])
        if not EVIDENCE_ID_RE.match(evidence_id):
            raise LedgerError(
                "INVALID_REQUEST",
                "evidence_id must be 64 lower-case hex digits (the sha256 content id from a "
                "response's cycles_evidence.evidence_id)",
            )
        if self.issuer is None:
            raise self._off()
        assert isinstance(self.store, EvidenceStore)
        row = await self.store.get_evidence(evidence_id)
        if row is None:
            raise LedgerError(
                "NOT_FOUND",
                f"no evidence envelope {evidence_id} is stored here (yet): an id just returned "
                "may take a moment to appear, retry; an old one may be past its retention",
            )
        signed = self.issuer.signed(row)
        if signed is None:
            raise LedgerError(
                "INTERNAL_ERROR",
                f"evidence envelope {evidence_id} was issued with a signing key this server no "
                "longer has; restore that key to the evidence key ring",
            )
        response = json_response(signed)
        response.headers["Cache-Control"] = IMMUTABLE
        return response

    async def jwks(self, request: Request) -> Response:
        """``GET /v1/.well-known/cycles-jwks.json`` (public)."""
        throttled = self._throttled(request)
        if throttled is not None:
            return throttled
        if self.issuer is None:
            raise self._off()
        self.issuer.keys.reload_if_changed()
        response = json_response(self.issuer.keys.jwks(self.store.clock()))
        response.headers["Cache-Control"] = JWKS_CACHE
        return response

    def answer(self, body: bytes, status: int) -> Response:
        """A decision's response; flagged ``X-Cycles-Evidence-Omitted`` if it has no envelope.

        With evidence on, a decide, reserve, commit or release answer lacks ``cycles_evidence``
        only when its envelope has no RFC 8785 form (see
        :mod:`runcycles_server.evidence.canonical`); the header says so, so a caller never
        mistakes it for a server with evidence off.
        """
        response = json_response(body, status)
        if self.issuer is not None and body.rfind(_REF) < 0:  # the ref is the last member
            response.headers[EVIDENCE_OMITTED_HEADER] = NO_RFC8785_FORM
        return response

    async def reservation_refs(self, reservation_id: str) -> dict[str, dict[str, str]] | None:
        """The ``ReservationEvidence`` of a reservation (``None``: evidence off or none)."""
        if self.issuer is None:
            return None
        assert isinstance(self.store, EvidenceStore)
        ids = await self.store.reservation_evidence(reservation_id)
        issuer = self.issuer
        return {artifact: issuer.ref(eid) for artifact, eid in sorted(ids.items())} or None

    async def denied(
        self,
        request: Request,
        error: LedgerError,
        operation: str,
        body: BaseModel | None,
        tenant_id: str | None,
        reservation_id: str | None = None,
    ) -> None:
        """Give a denial its stored ``error`` envelope and set ``error.evidence`` (its ref).

        ``operation`` is ``decide``, ``reserve``, ``commit`` or ``release``; ``tenant_id`` the
        caller's (``None`` for the admin key: the reservation's owner, if it exists).
        """
        issuer = self.issuer
        if issuer is None or error.code not in DENIAL_CODES:
            return
        assert isinstance(self.store, EvidenceStore)
        if tenant_id is None and reservation_id is not None:
            res = await self.store.get_reservation(reservation_id)
            tenant_id = res.tenant_id if res is not None else None
        if tenant_id is None:
            return
        _, trace_id = request_ids(request)
        row = issuer.error(
            operation,
            error.status,
            error_body(request, error),
            body,
            tenant_id=tenant_id,
            reservation_id=reservation_id,
            issued_at_ms=self.store.clock(),
            trace_id=trace_id,
        )
        if row is None:  # no RFC 8785 form: say so rather than answer as if evidence were off
            error.evidence_omitted = NO_RFC8785_FORM
            return
        try:
            await self.store.put_evidence([row])
        except Exception:  # answered without a ref rather than with one that may not resolve
            logger.warning("could not store the evidence of a %s denial", operation, exc_info=True)
            return
        error.evidence = issuer.ref(row.evidence_id)
