"""An in-memory Cycles server with a ledger, for adapter and integration-style unit tests.

:class:`FakeCyclesServer` answers reservations (live and dry run), commits, releases,
extends and events over ``httpx.MockTransport`` like a conformant server where it matters to
a client: one budget per unit, exact integer balances, stored responses replayed for a
repeated idempotency key (``409 IDEMPOTENCY_MISMATCH`` for a changed payload), ``409
RESERVATION_FINALIZED`` for a second settlement, ``observe_mode=OBSERVE`` (the request's, or
the tenant's: :attr:`FakeCyclesServer.observe_mode`) evaluated like a dry run. Knobs
inject denials (with a ``DenyDetail`` if you like), caps, auth failures and outages::

    server = FakeCyclesServer(budget=1_000_000)
    client = server.client()                  # a CyclesClient (async_client() for async)
    server.reject = (409, "BUDGET_EXCEEDED")  # every live reservation is refused
    server.outage = True                      # every request fails to connect
    server.remaining()                        # budget - reserved - spent, in USD_MICROCENTS

It needs no pytest; every request is recorded in :attr:`FakeCyclesServer.calls`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

from runcycles.client import AsyncCyclesClient, CyclesClient
from runcycles.config import CyclesConfig

__all__ = ["FakeCyclesServer", "RecordedCall"]

BASE_URL = "http://cycles.fake"


@dataclass(frozen=True)
class RecordedCall:
    """One request the fake server received."""

    method: str
    path: str
    body: dict[str, Any]


@dataclass
class FakeCyclesServer:
    """In-memory Cycles server; change the attributes to change how it answers.

    Attributes:
        budget: Budget of each unit (``USD_MICROCENTS`` unless ``budgets`` says otherwise).
        budgets: Budget per unit name, overriding ``budget``.
        tenant: The API key's tenant (sent as ``X-Cycles-Tenant``).
        caps: Caps of every allowed reservation (then ``ALLOW_WITH_CAPS``).
        reject: ``(status, error code)`` answered to every live reservation.
        reject_detail: ``details.deny_detail`` of the ``reject`` error (a ``DenyDetail`` as
            a dict), as a server that explains its denials sends it.
        deny_reason: Answer ``200 DENY`` with this reason code to every live reservation.
        observe_mode: The tenant's observe mode: ``"OBSERVE"`` evaluates every reservation
            that names no mode of its own like a dry run (no reservation id).
        outage: Fail every request with a connection error.
        server_error: Answer every request ``500 INTERNAL_ERROR``.
    """

    budget: int = 10**12
    budgets: dict[str, int] = field(default_factory=dict)
    tenant: str = "acme"
    caps: dict[str, Any] | None = None
    reject: tuple[int, str] | None = None
    reject_detail: dict[str, Any] | None = None
    deny_reason: str | None = None
    observe_mode: str | None = None
    outage: bool = False
    server_error: bool = False
    calls: list[RecordedCall] = field(default_factory=list)
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)
    _stored: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- clients -----------------------------------------------------------------------

    def config(self, **overrides: Any) -> CyclesConfig:
        """A config pointing at this server (no client retries, so outages are quick)."""
        values: dict[str, Any] = {
            "base_url": BASE_URL,
            "api_key": "fake-key",
            "tenant": self.tenant,
            "retry_enabled": False,
        }
        values.update(overrides)
        return CyclesConfig(**values)

    def client(self, **overrides: Any) -> CyclesClient:
        """A sync client talking to this server."""
        return CyclesClient(self.config(**overrides), transport=httpx.MockTransport(self.handle))

    def async_client(self, **overrides: Any) -> AsyncCyclesClient:
        """An async client talking to this server."""
        transport = httpx.MockTransport(self.handle)
        return AsyncCyclesClient(self.config(**overrides), transport=transport)

    # -- inspection --------------------------------------------------------------------

    def remaining(self, unit: str = "USD_MICROCENTS") -> int:
        """Budget left in ``unit``: budget minus what is reserved and what is spent."""
        with self._lock:
            return self._remaining(unit)

    def reserved(self, unit: str = "USD_MICROCENTS") -> int:
        """Amount held by ACTIVE reservations in ``unit``."""
        with self._lock:
            return self._reserved(unit)

    def posts(self, suffix: str) -> list[dict[str, Any]]:
        """Bodies of the POSTs whose path ends with ``suffix`` (``/commit``, ``/release``)."""
        return [c.body for c in self.calls if c.method == "POST" and c.path.endswith(suffix)]

    def statuses(self) -> list[str]:
        """Status of every reservation, in creation order."""
        return [r["status"] for r in self.reservations.values()]

    # -- transport ---------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (the ``httpx.MockTransport`` handler)."""
        if self.outage:
            raise httpx.ConnectError("fake outage: connection refused", request=request)
        body = json.loads(request.content) if request.content else {}
        with self._lock:
            self.calls.append(RecordedCall(request.method, request.url.path, body))
            if self.server_error:
                response = self._error(500, "INTERNAL_ERROR")
            else:
                response = self._route(request.method, request.url.path, body)
        response.headers["X-Cycles-Tenant"] = self.tenant
        return response

    def _route(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        if method == "GET" and path == "/v1/reservations":
            return httpx.Response(200, json={"reservations": [], "has_more": False})
        if method != "POST":
            return self._error(404, "NOT_FOUND")
        key = body.get("idempotency_key")
        if key is None:
            return self._error(400, "INVALID_REQUEST")
        payload = json.dumps(body, sort_keys=True)
        stored = self._stored.get((path, key))
        if stored is not None:
            if stored[0] != payload:
                return self._error(409, "IDEMPOTENCY_MISMATCH")
            return httpx.Response(stored[1], json=stored[2])
        status, answer = self._apply(path, body)
        if status < 300:
            self._stored[(path, key)] = (payload, status, answer)
        return httpx.Response(status, json=answer)

    def _apply(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/reservations":
            return self._create(body)
        if path == "/v1/events":
            return 201, {"status": "APPLIED", "event_id": f"evt_{len(self.calls)}"}
        parts = path.split("/")
        reservation = self.reservations.get(parts[3]) if len(parts) == 5 else None
        if reservation is None:
            return self._body(404, "NOT_FOUND")
        if reservation["status"] != "ACTIVE":
            return self._body(409, "RESERVATION_FINALIZED")
        estimate = reservation["estimate"]
        if parts[4] == "extend":
            return 200, {"status": "ACTIVE", "expires_at_ms": 2_000_000_000_000}
        if parts[4] == "commit":
            reservation["status"] = "COMMITTED"
            actual = body["actual"]
            self.spent[actual["unit"]] = self.spent.get(actual["unit"], 0) + actual["amount"]
            reservation["commit"] = body
            return 200, {"status": "COMMITTED", "charged": actual}
        reservation["status"] = "RELEASED"
        return 200, {"status": "RELEASED", "released": estimate}

    def _create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        estimate = body["estimate"]
        scope = f"tenant:{body['subject'].get('tenant', self.tenant)}"
        enough = estimate["amount"] <= self._remaining(estimate["unit"])
        decision = ("ALLOW_WITH_CAPS" if self.caps else "ALLOW") if enough else "DENY"
        answer: dict[str, Any] = {"decision": decision, "affected_scopes": [scope]}
        if self.caps and enough:
            answer["caps"] = self.caps
        mode = body.get("observe_mode") or self.observe_mode
        if body.get("dry_run") or mode == "OBSERVE":
            # Observe mode: the decision, nothing held, no reservation id (like a dry run).
            if not enough:
                answer["reason_code"] = "BUDGET_EXCEEDED"
                answer["deny_detail"] = {
                    "reason_code": "BUDGET_EXCEEDED",
                    "blocked_by_scope": scope,
                }
            return 200, answer
        if self.reject is not None:
            status, answer = self._body(*self.reject)
            if self.reject_detail is not None:
                answer["details"] = {"deny_detail": self.reject_detail}
            return status, answer
        if self.deny_reason is not None:
            return 200, {
                "decision": "DENY",
                "affected_scopes": [scope],
                "reason_code": self.deny_reason,
            }
        if not enough:
            return self._body(409, "BUDGET_EXCEEDED")
        rid = f"rsv_{len(self.reservations) + 1}"
        self.reservations[rid] = {"status": "ACTIVE", "estimate": estimate, "request": body}
        answer.update(
            reservation_id=rid,
            reserved=estimate,
            scope_path=scope,
            expires_at_ms=2_000_000_000_000,
            remaining_ttl_ms=body.get("ttl_ms", 60_000),
        )
        return 200, answer

    def _reserved(self, unit: str) -> int:
        return sum(
            r["estimate"]["amount"]
            for r in self.reservations.values()
            if r["status"] == "ACTIVE" and r["estimate"]["unit"] == unit
        )

    def _remaining(self, unit: str) -> int:
        budget = self.budgets.get(unit, self.budget)
        return budget - self._reserved(unit) - self.spent.get(unit, 0)

    @staticmethod
    def _body(status: int, code: str) -> tuple[int, dict[str, Any]]:
        return status, {"error": code, "message": f"fake {code}", "request_id": "req-fake"}

    def _error(self, status: int, code: str) -> httpx.Response:
        return httpx.Response(status, json=self._body(status, code)[1])
