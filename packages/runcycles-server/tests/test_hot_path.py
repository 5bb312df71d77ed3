"""The request hot path: group commit, the API key cache, direct dispatch and streamed bodies."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from runcycles.models import ReservationCreateRequest
from runcycles_server import ledger
from runcycles_server.app import create_app
from runcycles_server.ledger import ApiKeyRow, BudgetRow, LedgerError, Outcome, TenantRow
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.web import AUTH_CACHE_TTL_S, Authenticator

U = "USD_MICROCENTS"
SECRET = "cyc_live_hot-path-test-secret-000000"


def reserve_request(key: str, amount: int) -> ReservationCreateRequest:
    return ReservationCreateRequest.model_validate(
        {
            "idempotency_key": key,
            "subject": {"tenant": "acme", "agent": "bot"},
            "action": {"kind": "k", "name": "n"},
            "estimate": {"unit": U, "amount": amount},
        }
    )


async def provision(store: SqliteStore, allocated: int) -> None:
    await store.create_tenant(TenantRow("acme", "Acme"))
    await store.create_budget(
        BudgetRow("tenant:acme", U, "acme", allocated, allocated, ledger_id="l1")
    )
    await store.create_api_key(
        ApiKeyRow(
            key_id="key_1",
            key_hash=ledger.hash_api_key(SECRET),
            key_prefix=SECRET[:14],
            tenant_id="acme",
            name="k",
            permissions=["reservations:create", "reservations:commit"],
        )
    )


class CountingConnection:
    """Wraps a sqlite3 connection, counting COMMITs and optionally failing the first one."""

    def __init__(self, conn: sqlite3.Connection, fail_first_commit: bool = False) -> None:
        self.conn = conn
        self.commits = 0
        self.fail_next_commit = fail_first_commit

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            if self.fail_next_commit:
                self.fail_next_commit = False
                raise sqlite3.OperationalError("disk I/O error")
            self.commits += 1
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


async def test_concurrent_mutations_share_one_commit_and_refusals_fail_alone(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await provision(store, 1_000)
    counting = CountingConnection(store._conn)
    store._conn = counting  # type: ignore[assignment]
    answers = await asyncio.gather(
        *(store.reserve("acme", reserve_request(f"k{i}", 100), "h") for i in range(12)),
        return_exceptions=True,
    )
    assert counting.commits == 1  # one group, one transaction
    granted = [a for a in answers if isinstance(a, Outcome)]
    refused = [a for a in answers if isinstance(a, LedgerError)]
    assert len(granted) == 10  # in submission order, until the budget ran out
    assert all(isinstance(a, Outcome) for a in answers[:10])
    assert [e.code for e in refused] == ["BUDGET_EXCEEDED", "BUDGET_EXCEEDED"]
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.reserved, budget.remaining) == (1_000, 0)
    assert store.count_rows("reservations") == 10
    await store.close()


async def test_a_repeated_key_inside_one_group_replays_the_first_answer(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await provision(store, 1_000)
    first, again = await asyncio.gather(
        store.reserve("acme", reserve_request("same", 100), "h"),
        store.reserve("acme", reserve_request("same", 100), "h"),
    )
    assert json.loads(first.body)["reservation_id"] == json.loads(again.body)["reservation_id"]
    assert store.count_rows("reservations") == 1
    await store.close()


async def test_an_unexpected_error_fails_only_its_own_mutation(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await provision(store, 1_000)
    real_apply = store._apply

    def apply(outcome: Outcome) -> None:
        real_apply(outcome)  # writes first, then fails: the group must roll back
        if outcome.reservation is not None and outcome.reservation.idempotency_key == "bad":
            raise RuntimeError("boom")

    store._apply = apply  # type: ignore[method-assign]
    good1, bad, good2 = await asyncio.gather(
        store.reserve("acme", reserve_request("good1", 100), "h"),
        store.reserve("acme", reserve_request("bad", 100), "h"),
        store.reserve("acme", reserve_request("good2", 100), "h"),
        return_exceptions=True,
    )
    assert isinstance(good1, Outcome)
    assert isinstance(good2, Outcome)
    assert isinstance(bad, RuntimeError)
    assert store.count_rows("reservations") == 2
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert budget.reserved == 200
    await store.close()


async def test_a_failed_group_commit_is_retried_one_transaction_each(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await provision(store, 1_000)
    store._conn = CountingConnection(store._conn, fail_first_commit=True)  # type: ignore[assignment]
    answers = await asyncio.gather(
        *(store.reserve("acme", reserve_request(f"k{i}", 100), "h") for i in range(3))
    )
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert store.count_rows("reservations") == 3
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert budget.reserved == 300
    await store.close()


def _request(secret: str) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"x-cycles-api-key", secret.encode())],
        "state": {},
    }
    return Request(scope)


async def test_api_key_cache_bounds_revocation_by_another_process(tmp_path: Path) -> None:
    here = SqliteStore(tmp_path / "c.db")
    await provision(here, 1_000)
    now = [100.0]
    auth = Authenticator(here, None, monotonic_s=lambda: now[0])
    assert (await auth.tenant(_request(SECRET))).tenant_id == "acme"
    elsewhere = SqliteStore(tmp_path / "c.db")  # e.g. another worker or the CLI
    await elsewhere.revoke_api_key("key_1", "leaked")
    now[0] += AUTH_CACHE_TTL_S / 2
    assert (await auth.tenant(_request(SECRET))).tenant_id == "acme"  # cached, within the TTL
    now[0] += AUTH_CACHE_TTL_S
    with pytest.raises(LedgerError) as refused:
        await auth.tenant(_request(SECRET))
    assert refused.value.code == "UNAUTHORIZED"
    assert "REVOKED" in refused.value.message
    await elsewhere.close()
    await here.close()


async def test_api_key_cache_drops_a_key_revoked_through_the_same_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await provision(store, 1_000)
    auth = Authenticator(store, None, monotonic_s=lambda: 0.0)  # the TTL never runs out
    assert (await auth.tenant(_request(SECRET))).tenant_id == "acme"
    await store.revoke_api_key("key_1", None)
    with pytest.raises(LedgerError) as refused:
        await auth.tenant(_request(SECRET))
    assert refused.value.code == "UNAUTHORIZED"
    with pytest.raises(LedgerError):  # unknown secrets are refused (and never cached)
        await auth.tenant(_request("cyc_live_unknown"))
    await store.close()


async def _call(app: Any, path: str, chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-cycles-api-key", SECRET.encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    await app(scope, receive, send)
    start = sent[0]
    headers = dict(start["headers"])
    assert b"x-request-id" in headers
    assert b"x-cycles-trace-id" in headers
    return start["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def test_a_body_in_several_chunks_is_read_whole_and_still_size_limited(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await provision(store, 1_000)
    app = create_app(store, sweep_interval_s=None, max_body_bytes=1_000, close_store=False)
    body = reserve_request("chunked", 10).model_dump_json(exclude_none=True).encode()
    status, answer = await _call(app, "/v1/reservations", [body[:20], body[20:50], body[50:]])
    assert (status, answer["decision"]) == (200, "ALLOW")
    status, answer = await _call(app, "/v1/reservations", [b" " * 600, b" " * 600])
    assert (status, answer["error"]) == (413, "INVALID_REQUEST")
    await store.close()
