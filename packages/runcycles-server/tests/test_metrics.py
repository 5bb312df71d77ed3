"""``GET /metrics``: off by default, admin-only unless public, counters that follow real traffic.

Every scrape is parsed with ``prometheus_client``'s own parser, so the exposition is valid
Prometheus text, not just text that contains the expected substrings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import PlainTextResponse

from runcycles_server.app import create_app, run_sweeper
from runcycles_server.cli import bootstrap_dev
from runcycles_server.ledger import BudgetRow, TenantRow
from runcycles_server.metrics import BUDGET_PAGE, MAX_TOP_SCOPES, Metrics
from runcycles_server.stores.base import Store, StoreUnavailable
from runcycles_server.stores.memory import MemoryStore

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"
ADMIN = "admin-secret"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Parse an exposition into ``{(sample name, labels): value}``."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    """Return one sample's value (0 when the series does not exist yet)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def series(found: Samples, name: str) -> list[dict[str, str]]:
    """Return the label sets of every sample named ``name``."""
    return [dict(labels) for sample, labels in found if sample == name]


def scrape(api: Api, **headers: str) -> Samples:
    response = api.client.get("/metrics", headers=headers or api.admin_headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return samples(response.text)


def reservation(key: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "openai:gpt-4o"},
        "estimate": {"unit": U, "amount": amount},
        **extra,
    }


def reserve(api: Api, key: str, idem: str, amount: int, expect: int = 200) -> dict[str, Any]:
    response = api.post(key, "/v1/reservations", reservation(idem, amount))
    assert response.status_code == expect, response.text
    return dict(response.json())


def settle(api: Api, key: str, rid: str, action: str, idem: str, expect: int = 200) -> None:
    body: dict[str, Any] = {"idempotency_key": idem}
    if action == "commit":
        body["actual"] = {"unit": U, "amount": 10}
    response = api.post(key, f"/v1/reservations/{rid}/{action}", body)
    assert response.status_code == expect, response.text


COMMIT_ROUTE = "/v1/reservations/{reservation_id}/commit"


def test_metrics_are_off_by_default(make_api: Callable[..., Api]) -> None:
    api = make_api()
    response = api.client.get("/metrics", headers=api.admin_headers)
    assert response.status_code == 404
    assert response.json()["error"] == "NOT_FOUND"


def test_counters_follow_reserve_commit_release_and_denials(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(metrics=True)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    before = scrape(api)
    assert value(before, "cycles_commits_total") == 0
    assert value(before, "cycles_reservations_active") == 0

    first = reserve(api, key, "r1", 100)["reservation_id"]
    second = reserve(api, key, "r2", 100)["reservation_id"]
    third = reserve(api, key, "r3", 100)["reservation_id"]
    mid = scrape(api)
    assert value(mid, "cycles_reservations_active") == 3
    settle(api, key, first, "commit", "c1")
    settle(api, key, first, "commit", "c1")  # an idempotent replay is an answer too
    settle(api, key, second, "release", "x1")
    settle(api, key, first, "commit", "c2", expect=409)  # finalized: not a commit
    reserve(api, key, "big", 5_000, expect=409)  # live denial: BUDGET_EXCEEDED
    denied = api.post(key, "/v1/decide", reservation("d1", 5_000))
    assert denied.json()["decision"] == "DENY"
    allowed = api.post(key, "/v1/decide", reservation("d2", 1))
    assert allowed.json()["decision"] == "ALLOW"
    assert api.client.get("/v1/reservations/nope-123/extend").status_code == 405

    after = scrape(api)
    assert value(after, "cycles_reservations_active") == 1  # third
    assert value(after, "cycles_commits_total") == 2
    assert value(after, "cycles_releases_total") == 1
    requests = "cycles_http_requests_total"
    assert value(after, requests, route="/v1/reservations", method="POST", status="200") == 3
    assert value(after, requests, route="/v1/reservations", method="POST", status="409") == 1
    assert value(after, requests, route=COMMIT_ROUTE, method="POST", status="200") == 2
    assert value(after, requests, route=COMMIT_ROUTE, method="POST", status="409") == 1
    assert value(after, requests, route="/metrics", method="GET", status="200") == 2
    assert not any("nope-123" in labels["route"] for labels in series(after, requests))
    decisions = "cycles_decisions_total"
    assert value(after, decisions, endpoint="reserve", decision="ALLOW", reason="none") == 3
    assert (
        value(after, decisions, endpoint="reserve", decision="DENY", reason="BUDGET_EXCEEDED") == 1
    )
    assert (
        value(after, decisions, endpoint="decide", decision="DENY", reason="BUDGET_EXCEEDED") == 1
    )
    assert value(after, decisions, endpoint="decide", decision="ALLOW", reason="none") == 1
    count = "cycles_http_request_duration_seconds_count"
    assert value(after, count, route="/v1/reservations", method="POST") == 4
    # the budget: 1000 allocated, 10 spent, 100 reserved (third)
    ratio = value(after, "cycles_budget_utilization_ratio", scope="tenant:acme", unit=U)
    assert ratio == pytest.approx(110 / 1000)
    assert value(after, "cycles_budgets") == 1
    assert value(after, "cycles_budget_utilization_omitted") == 0
    assert value(after, "cycles_store_up") == 1
    assert value(after, "cycles_store_read_ok") == 1
    assert value(after, "process_start_time_seconds") > 0
    settle(api, key, third, "release", "x3")
    assert value(scrape(api), "cycles_reservations_active") == 0


def test_allow_with_caps_is_its_own_decision(make_api: Callable[..., Api]) -> None:
    api = make_api(metrics=True)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme/agent:bot", 5_000)
    api.admin(
        "PATCH",
        "/v1/admin/budgets",
        200,
        params={"scope": "tenant:acme/agent:bot", "unit": U},
        json={"caps": {"max_tokens": 256}},
    )
    reserve(api, key, "c1", 10)
    dry = api.post(key, "/v1/reservations", reservation("c2", 99_999, dry_run=True))
    assert dry.json()["decision"] == "DENY"
    found = scrape(api)
    decisions = "cycles_decisions_total"
    assert value(found, decisions, endpoint="reserve", decision="ALLOW_WITH_CAPS", reason="none")
    assert value(found, decisions, endpoint="reserve", decision="DENY", reason="BUDGET_EXCEEDED")


def test_metrics_need_the_admin_key(make_api: Callable[..., Api]) -> None:
    api = make_api(metrics=True)
    tenant_key = api.tenant("acme")
    for headers in (
        {},
        {"X-Cycles-API-Key": tenant_key},
        {"X-Admin-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic YWRtaW46eA=="},
    ):
        response = api.client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "UNAUTHORIZED"
        assert "cycles_" not in response.text
    assert "admin key" in api.client.get("/metrics").json()["message"]
    admin_key = api.admin_headers["X-Admin-API-Key"]
    ok = api.client.get("/metrics", headers={"Authorization": f"Bearer {admin_key}"})
    assert ok.status_code == 200
    assert "cycles_http_requests_total" in ok.text


def test_public_metrics_leave_out_tenant_data_without_the_admin_key(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(metrics=True, metrics_public=True)
    key = api.tenant("secretcorp")
    api.budget("secretcorp", "tenant:secretcorp", 1_000)
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert "secretcorp" not in response.text
    public = samples(response.text)
    assert "cycles_budget_utilization_ratio" not in {name for name, _ in public}
    assert value(public, "cycles_reservations_active") == 0
    assert value(public, "cycles_store_up") == 1
    assert api.client.get("/metrics", headers={"X-Admin-API-Key": "wrong"}).status_code == 401
    assert api.client.get("/metrics", headers={"X-Cycles-API-Key": key}).status_code == 200
    full = scrape(api)
    labels = series(full, "cycles_budget_utilization_ratio")
    assert labels == [{"scope": "tenant:secretcorp", "unit": U}]


def test_utilization_series_are_bounded_to_the_most_used_budgets(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(metrics=True, metrics_top_scopes=5)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 10**9)
    for i in range(30):  # agent a<i>: 100 of 100 + 10 i used, so a00 is the most used
        api.budget("acme", f"tenant:acme/agent:a{i:02d}", 100 + 10 * i)
        body = reservation(f"r{i}", 100)
        body["subject"]["agent"] = f"a{i:02d}"
        response = api.post(key, "/v1/reservations", body)
        assert response.status_code == 200, response.text
    found = scrape(api)
    top = {
        labels["scope"]: value(found, "cycles_budget_utilization_ratio", **labels)
        for labels in series(found, "cycles_budget_utilization_ratio")
    }
    assert top == {
        f"tenant:acme/agent:a{i:02d}": pytest.approx(100 / (100 + 10 * i)) for i in range(5)
    }
    assert value(found, "cycles_budgets") == 31
    assert value(found, "cycles_budget_utilization_omitted") == 26


def test_top_scopes_zero_turns_the_budget_series_off(make_api: Callable[..., Api]) -> None:
    api = make_api(metrics=True, metrics_top_scopes=0)
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    found = scrape(api)
    names = {name for name, _ in found}
    assert not names & {
        "cycles_budget_utilization_ratio",
        "cycles_budgets",
        "cycles_budget_utilization_omitted",
    }
    assert value(found, "cycles_reservations_active") == 0
    assert ("cycles_reservations_active", frozenset()) in found


def test_top_scopes_must_be_in_range(store: Store) -> None:
    for bad in (-1, MAX_TOP_SCOPES + 1):
        with pytest.raises(ValueError, match="top_scopes must be from 0"):
            create_app(store, metrics=True, metrics_top_scopes=bad)


def test_unmatched_paths_and_odd_methods_have_bounded_labels(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(metrics=True)
    for i in range(5):
        assert api.client.get(f"/probe/{i}").status_code == 404
    assert api.client.request("BREW", "/v1/decide").status_code in (400, 405)
    found = scrape(api)
    routes = {labels["route"] for labels in series(found, "cycles_http_requests_total")}
    assert "unmatched" in routes
    assert not any(route.startswith("/probe") for route in routes)
    assert "other" not in routes

    async def extra(request: Any) -> Any:
        return PlainTextResponse("extra")

    api.client.app.add_route("/extra/{thing}", extra)  # added after create_app built the app
    assert api.client.get("/extra/1").status_code == 200
    routes = {labels["route"] for labels in series(scrape(api), "cycles_http_requests_total")}
    assert "other" in routes
    assert not any(route.startswith("/extra") for route in routes)
    methods = {labels["method"] for labels in series(found, "cycles_http_requests_total")}
    assert "BREW" not in methods
    assert "OTHER" in methods


def test_expiries_are_counted_by_the_sweeper(
    make_api: Callable[..., Api], store: Store, clock: FakeClock
) -> None:
    api = make_api(metrics=True)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    response = api.post(key, "/v1/reservations", reservation("e1", 5, ttl_ms=1_000))
    assert response.status_code == 200, response.text
    clock.advance(600_000)
    app_metrics = api.client.app.state.metrics
    assert isinstance(app_metrics, Metrics)

    async def one_round() -> None:
        task = asyncio.create_task(run_sweeper(store, 0.01, metrics=app_metrics))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if app_metrics.expiries._value.get():
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    api.client.run(one_round())
    found = scrape(api)
    assert value(found, "cycles_expiries_total") == 1
    assert value(found, "cycles_reservations_active") == 0


class DownStore(MemoryStore):
    """A memory store whose key lookups and counts fail as unavailable while ``down``."""

    down = False

    async def authenticate(self, key_hash: str) -> Any:
        if self.down:
            raise StoreUnavailable("connection refused")
        return await super().authenticate(key_hash)

    async def count_active_reservations(self) -> int:
        if self.down:
            raise StoreUnavailable("connection refused")
        return await super().count_active_reservations()


async def test_store_outages_are_counted_and_the_scrape_still_answers() -> None:
    store = DownStore()
    key = await bootstrap_dev(store)
    app = create_app(store, admin_api_key=ADMIN, sweep_interval_s=None, metrics=True)
    admin = {"X-Admin-API-Key": ADMIN}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/metrics", headers=admin)).status_code == 200
        store.down = True
        for _ in range(3):
            response = await client.get(
                "/v1/balances", params={"tenant": "demo"}, headers={"X-Cycles-API-Key": key}
            )
            assert response.status_code == 503, response.text
        scraped = await client.get("/metrics", headers=admin)
    assert scraped.status_code == 200
    found = samples(scraped.text)
    assert value(found, "cycles_store_unavailable_requests_total") == 3
    assert value(found, "cycles_store_outages_total") == 1
    assert value(found, "cycles_store_up") == 0
    assert value(found, "cycles_store_read_ok") == 0
    assert "cycles_reservations_active" not in {name for name, _ in found}
    requests = "cycles_http_requests_total"
    assert value(found, requests, route="/v1/balances", method="GET", status="503") == 3


def test_the_webhook_seam_counts_deliveries_and_reports_gauge_callbacks(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(metrics=True)
    meter = api.client.app.state.metrics
    assert isinstance(meter, Metrics)
    zero = scrape(api)
    for outcome in ("SUCCESS", "RETRYING", "FAILED", "REFUSED"):
        assert (
            "cycles_webhook_deliveries_total",
            frozenset({("outcome", outcome)}),
        ) in zero
    meter.record_webhook_delivery("SUCCESS")
    meter.record_webhook_delivery("SUCCESS")
    meter.record_webhook_delivery("FAILED")
    with pytest.raises(ValueError, match="must be one of SUCCESS, RETRYING, FAILED, REFUSED"):
        meter.record_webhook_delivery("maybe")
    depth = [7.0]
    meter.add_gauge_callback("cycles_webhook_queue_depth", "Deliveries waiting.", lambda: depth[0])
    meter.add_gauge_callback("cycles_broken", "Raises.", lambda: 1 / 0)
    with pytest.raises(ValueError, match="already registered"):
        meter.add_gauge_callback("cycles_webhook_queue_depth", "again", lambda: 0.0)
    with pytest.raises(ValueError, match="must start with cycles_"):
        meter.add_gauge_callback("queue_depth", "no prefix", lambda: 0.0)
    found = scrape(api)
    assert value(found, "cycles_webhook_deliveries_total", outcome="SUCCESS") == 2
    assert value(found, "cycles_webhook_deliveries_total", outcome="FAILED") == 1
    assert value(found, "cycles_webhook_queue_depth") == 7
    assert "cycles_broken" not in {name for name, _ in found}


async def test_a_scrape_lets_requests_run_between_budget_pages() -> None:
    store = MemoryStore()
    await store.create_tenant(TenantRow("acme", "acme"))
    for i in range(1_000):
        await store.create_budget(
            BudgetRow(
                scope=f"tenant:acme/agent:a{i:04d}",
                unit=U,
                tenant_id="acme",
                allocated=1_000,
                remaining=1_000 - i,
                ledger_id=f"ldg-{i}",
            )
        )
    meter = Metrics(top_scopes=3)
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    started = ticks
    snapshot = await meter.read_store(store, scopes=True)
    task.cancel()
    assert snapshot.budgets == 1_000
    assert [scope for _, scope, _ in snapshot.top] == [
        "tenant:acme/agent:a0999",
        "tenant:acme/agent:a0998",
        "tenant:acme/agent:a0997",
    ]
    assert ticks - started >= 1_000 // BUDGET_PAGE - 1  # one turn per page at least
