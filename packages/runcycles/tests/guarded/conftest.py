"""A small in-memory Cycles server for the guarded-execution tests (decorator, guards, streams).

It speaks just enough of the protocol over ``httpx.MockTransport`` (or respx) to exercise
reserve / commit / release / extend / events, and records every call so tests can assert
what was sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig, set_default_config

BASE_URL = "http://cycles.test"


@dataclass
class Call:
    method: str
    path: str
    body: dict[str, Any]
    headers: httpx.Headers


@dataclass
class FakeCycles:
    """In-memory server. Tweak the attributes to change how it answers."""

    calls: list[Call] = field(default_factory=list)
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)
    caps: dict[str, Any] | None = None
    reject: tuple[int, str] | None = None  # (status, error code) for every create
    deny_reason: str | None = None  # 200 DENY for every create
    dry_run_decision: str = "ALLOW"
    create_override: Callable[[dict[str, Any]], httpx.Response] | None = None
    commit_status: tuple[int, str] | None = None  # (status, error code) for every commit
    release_status: tuple[int, str] | None = None
    now_ms: int = 1_800_000_000_000
    key_tenant: str | None = "acme"  # sent as X-Cycles-Tenant (the API key's tenant)
    list_status: int = 200
    lenient_extends: bool = False  # keep extending finalized reservations (to catch leaks)
    _next: int = 0

    # ------------------------------------------------------------------ transport
    def handler(self, request: httpx.Request) -> httpx.Response:
        response = self._route(request)
        if self.key_tenant is not None:
            response.headers["X-Cycles-Tenant"] = self.key_tenant
        return response

    def _route(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        path = request.url.path
        self.calls.append(Call(request.method, path, body, request.headers))
        if request.method == "GET" and path == "/v1/reservations":
            if self.list_status != 200:
                code = "UNAUTHORIZED" if self.list_status == 401 else "INTERNAL_ERROR"
                return httpx.Response(self.list_status, json=self._error(code, "no"))
            return httpx.Response(200, json={"reservations": [], "has_more": False})
        if request.method == "POST" and path == "/v1/reservations":
            return self._create(body)
        if request.method == "POST" and path == "/v1/events":
            return httpx.Response(201, json={"status": "APPLIED", "event_id": "evt_1"})
        if request.method == "POST" and path.startswith("/v1/reservations/"):
            _, _, _, rid, action = path.split("/")
            return self._mutate(rid, action, body)
        return httpx.Response(404, json=self._error("NOT_FOUND", "no route"))

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        if self.create_override is not None:
            return self.create_override(body)
        scopes = [f"tenant:{body['subject'].get('tenant', '-')}"]
        if body.get("dry_run") or body.get("observe_mode") == "OBSERVE":  # evaluated only
            answer: dict[str, Any] = {"decision": self.dry_run_decision, "affected_scopes": scopes}
            if self.dry_run_decision == "DENY":
                answer["reason_code"] = "BUDGET_EXCEEDED"
            if self.caps is not None and self.dry_run_decision == "ALLOW_WITH_CAPS":
                answer["caps"] = self.caps
            answer["balances"] = [
                {"scope": "tenant", "scope_path": scopes[0], "remaining": body["estimate"]}
            ]
            return httpx.Response(200, json=answer)
        if self.reject is not None:
            status, code = self.reject
            return httpx.Response(status, json=self._error(code, f"{code} for test"))
        if self.deny_reason is not None:
            return httpx.Response(
                200,
                json={
                    "decision": "DENY",
                    "affected_scopes": scopes,
                    "reason_code": self.deny_reason,
                },
            )
        self._next += 1
        rid = f"rsv_{self._next}"
        ttl = body.get("ttl_ms", 60_000)
        self.reservations[rid] = {
            "status": "ACTIVE",
            "request": body,
            "expires_at_ms": self.now_ms + ttl,
        }
        answer = {
            "decision": "ALLOW_WITH_CAPS" if self.caps is not None else "ALLOW",
            "reservation_id": rid,
            "affected_scopes": scopes,
            "scope_path": scopes[0],
            "reserved": body["estimate"],
            "expires_at_ms": self.now_ms + ttl,
            "remaining_ttl_ms": ttl,
        }
        if self.caps is not None:
            answer["caps"] = self.caps
        return httpx.Response(200, json=answer)

    def _mutate(self, rid: str, action: str, body: dict[str, Any]) -> httpx.Response:
        reservation = self.reservations.get(rid)
        if reservation is None:
            return httpx.Response(404, json=self._error("NOT_FOUND", f"no reservation {rid}"))
        if action == "extend":
            if reservation["status"] != "ACTIVE" and not self.lenient_extends:
                return httpx.Response(409, json=self._error("RESERVATION_FINALIZED", "done"))
            reservation["expires_at_ms"] += body["extend_by_ms"]
            return httpx.Response(
                200,
                json={
                    "status": "ACTIVE",
                    "expires_at_ms": reservation["expires_at_ms"],
                    "remaining_ttl_ms": body["extend_by_ms"],
                },
            )
        forced = self.commit_status if action == "commit" else self.release_status
        if forced is not None:
            status, code = forced
            return httpx.Response(status, json=self._error(code, f"{code} for test"))
        if reservation["status"] != "ACTIVE":
            return httpx.Response(409, json=self._error("RESERVATION_FINALIZED", "finalized"))
        if action == "commit":
            reservation["status"] = "COMMITTED"
            reservation["commit"] = body
            return httpx.Response(200, json={"status": "COMMITTED", "charged": body["actual"]})
        reservation["status"] = "RELEASED"
        reservation["release"] = body
        return httpx.Response(
            200, json={"status": "RELEASED", "released": reservation["request"]["estimate"]}
        )

    @staticmethod
    def _error(code: str, message: str) -> dict[str, Any]:
        return {"error": code, "message": message, "request_id": "req-test"}

    # ------------------------------------------------------------------ helpers for tests
    def paths(self) -> list[str]:
        return [f"{call.method} {call.path}" for call in self.calls]

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [call.body for call in self.calls if call.path.endswith(suffix)]

    def creates(self) -> list[dict[str, Any]]:
        return [
            call.body
            for call in self.calls
            if call.method == "POST" and call.path == "/v1/reservations"
        ]

    def commits(self) -> list[dict[str, Any]]:
        return self.bodies("/commit")

    def releases(self) -> list[dict[str, Any]]:
        return self.bodies("/release")

    def statuses(self) -> list[str]:
        return [r["status"] for r in self.reservations.values()]

    def config(self, **overrides: Any) -> CyclesConfig:
        values: dict[str, Any] = {
            "base_url": BASE_URL,
            "api_key": "test-key",
            "tenant": "acme",
            "retry_enabled": False,
        }
        values.update(overrides)
        return CyclesConfig(**values)

    def sync_client(self, **overrides: Any) -> CyclesClient:
        return CyclesClient(self.config(**overrides), transport=httpx.MockTransport(self.handler))

    def async_client(self, **overrides: Any) -> AsyncCyclesClient:
        return AsyncCyclesClient(
            self.config(**overrides), transport=httpx.MockTransport(self.handler)
        )


@pytest.fixture
def fake() -> FakeCycles:
    return FakeCycles()


@pytest.fixture
def client(fake: FakeCycles) -> Iterator[CyclesClient]:
    with fake.sync_client() as built:
        yield built


@pytest.fixture
async def aclient(fake: FakeCycles) -> AsyncIterator[AsyncCyclesClient]:
    async with fake.async_client() as built:
        yield built


@pytest.fixture(autouse=True)
def journal_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Settlement journals go to a per-test directory, never the user's state dir."""
    path = tmp_path / "journal"
    monkeypatch.setenv("RUNCYCLES_JOURNAL_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _clean_defaults() -> Iterator[None]:
    """Every test starts and ends without a default @cycles client."""
    set_default_config(None)
    yield
    set_default_config(None)
