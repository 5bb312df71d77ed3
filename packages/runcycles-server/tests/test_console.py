"""The operator console at ``/console``, through HTTP: sign-in, sessions, CSRF, tenant
isolation, and actions that go through the admin API (events, audit log)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.app import create_app
from runcycles_server.console import format as fmt
from runcycles_server.console import signin_limits, webhook_pages
from runcycles_server.console import spend as spending
from runcycles_server.console.pages import SESSION_COOKIE
from runcycles_server.console.sessions import SessionStore
from runcycles_server.ledger import EventRow
from runcycles_server.stores.base import DebitReader
from runcycles_server.stores.redis import RedisStore

if TYPE_CHECKING:
    from conftest import Api, FakeClock, SyncClient

    from runcycles_server.stores.base import Store

U = "USD_MICROCENTS"


def sign_in(client: SyncClient, key: str, next_url: str = "") -> Any:
    page = client.get("/console/sign-in" + (f"?next={next_url}" if next_url else ""))
    assert page.status_code == 200
    token = re.search(r'name="signin_token" value="([^"]+)"', page.text)
    assert token is not None
    form = {"signin_token": token.group(1), "key": key}
    if next_url:
        form["next"] = next_url
    return client.post("/console/sign-in", data=form)


def csrf(client: SyncClient, path: str = "/console/budgets") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def reserve(api: Api, key: str, tenant: str, idem: str, amount: int) -> Any:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": tenant},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
    }
    return api.post(key, "/v1/reservations", body)


@pytest.fixture
def admin(api: Api) -> SyncClient:
    """The test client, signed in to the console with the admin key."""
    response = sign_in(api.client, api.admin_headers["X-Admin-API-Key"])
    assert response.status_code == 303, response.text
    return api.client


def test_sign_in_sets_a_strict_http_only_session_cookie(api: Api) -> None:
    response = sign_in(api.client, api.admin_headers["X-Admin-API-Key"])
    assert response.status_code == 303
    assert response.headers["location"] == "/console/"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/console" in cookie
    assert api.admin_headers["X-Admin-API-Key"] not in cookie
    home = api.client.get("/console/")
    assert home.headers["location"] == "/console/overview"
    page = api.client.get("/console/overview")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


def test_a_wrong_key_is_refused_and_pages_need_a_session(api: Api) -> None:
    response = sign_in(api.client, "not-a-key")
    assert response.status_code == 401
    assert "not valid" in response.text
    page = api.client.get("/console/budgets?status=FROZEN")
    assert page.status_code == 303
    assert (
        page.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fbudgets%3Fstatus%3DFROZEN"
    )


def test_sign_in_without_its_form_token_is_refused(api: Api) -> None:
    response = api.client.post("/console/sign-in", data={"key": "x", "signin_token": "forged"})
    assert response.status_code == 403


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(api: Api) -> None:
    key = api.admin_headers["X-Admin-API-Key"]
    assert sign_in(api.client, key, "/console/events").headers["location"] == "/console/events"
    assert sign_in(api.client, key, "https://evil.example/").headers["location"] == "/console/"


def test_the_overview_lists_a_tenant_at_80_percent(api: Api, admin: SyncClient) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    assert reserve(api, key, "acme", "r1", 800).status_code == 200
    page = admin.get("/console/overview")
    assert page.status_code == 200
    assert "tenant:acme" in page.text
    assert "80 %" in page.text
    near = admin.get("/console/budgets?attention=near")
    assert "tenant:acme" in near.text
    assert "near limit" in near.text


def test_actions_without_the_csrf_token_are_refused(api: Api, admin: SyncClient) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    form = {"scope": "tenant:acme", "unit": U, "reason": "incident 42"}
    refused = admin.post("/console/budgets/freeze", data=form)
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    wrong = admin.post("/console/budgets/freeze", data={**form, "csrf_token": "x" * 43})
    assert wrong.status_code == 403
    assert admin.post("/console/sign-out", data={}).status_code == 403
    budget = api.admin(
        "GET", "/v1/admin/budgets/lookup", 200, params={"scope": "tenant:acme", "unit": U}
    )
    assert budget["status"] == "ACTIVE"


def test_freeze_needs_a_reason_and_goes_through_the_admin_api(api: Api, admin: SyncClient) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    token = csrf(admin)
    form = {"scope": "tenant:acme", "unit": U, "csrf_token": token}
    no_reason = admin.post("/console/budgets/freeze", data={**form, "reason": " "})
    assert no_reason.status_code == 303
    assert "A reason" in admin.get("/console/budgets").text
    done = admin.post("/console/budgets/freeze", data={**form, "reason": "incident 42"})
    assert done.status_code == 303
    assert "frozen" in admin.get("/console/budgets").text
    assert reserve(api, key, "acme", "r1", 10).json()["error"] == "BUDGET_FROZEN"
    events = api.admin(
        "GET", "/v1/admin/events", 200, params={"tenant_id": "acme", "event_type": "budget.frozen"}
    )
    assert events["events"][0]["actor"]["type"] == "admin"
    # the console request and the API call it made are one trace
    assert events["events"][0]["trace_id"] == done.headers["x-cycles-trace-id"]
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})["logs"]
    entry = next(log for log in logs if log["operation"] == "freezeBudget")
    assert entry["resource_type"] == "budget"
    assert entry["metadata"]["reason"] == "incident 42"
    assert entry["metadata"]["new_status"] == "FROZEN"
    assert "incident 42" in admin.get("/console/audit?tenant_id=acme").text
    admin.post("/console/budgets/unfreeze", data={**form, "reason": "resolved"})
    assert reserve(api, key, "acme", "r2", 10).status_code == 200


def test_fund_credits_a_budget(api: Api, admin: SyncClient) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    form = {"scope": "tenant:acme", "unit": U, "tenant_id": "acme", "csrf_token": csrf(admin),
            "operation": "CREDIT", "amount": "1,500", "reason": "top-up"}  # fmt: skip
    assert admin.post("/console/budgets/fund", data=form).status_code == 303
    budget = api.admin(
        "GET", "/v1/admin/budgets/lookup", 200, params={"scope": "tenant:acme", "unit": U}
    )
    assert budget["allocated"]["amount"] == 2500
    logs = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})["logs"]
    funded = [log for log in logs if log["operation"] == "fundBudget"]
    assert [log["metadata"]["reason"] for log in funded] == ["top-up"]
    assert funded[0]["metadata"]["amount"] == 1500
    bad = admin.post("/console/budgets/fund", data={**form, "amount": "lots"})
    assert bad.status_code == 303
    assert "whole number" in admin.get("/console/budgets").text


def test_force_release_is_audited(api: Api, admin: SyncClient) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    rid = reserve(api, key, "acme", "r1", 300).json()["reservation_id"]
    page = admin.get("/console/reservations?tenant=acme")
    assert rid in page.text
    response = admin.post(
        f"/console/reservations/{rid}/release",
        data={"reason": "stuck agent", "csrf_token": csrf(admin), "next": "/console/reservations"},
    )
    assert response.status_code == 303
    after = admin.get("/console/reservations?tenant=acme").text
    assert f"Reservation {rid} released." in after
    assert f'data-reservation="{rid}"' not in after
    audit = admin.get("/console/audit?tenant_id=acme")
    assert rid in audit.text
    assert "stuck agent" in audit.text


def test_events_are_filtered_as_the_api_does(api: Api, admin: SyncClient) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    page = admin.get("/console/events?tenant_id=acme&event_type=budget.created")
    assert page.status_code == 200
    assert page.text.count('data-event-type="budget.created"') == 1
    assert 'data-event-type="tenant.created"' not in page.text
    bad = admin.get("/console/events?tenant_id=acme&trace_id=nope")
    assert bad.status_code == 400
    assert "trace_id" in bad.text


def test_a_tenant_key_sees_only_its_tenant_and_cannot_act(api: Api) -> None:
    key = api.tenant("acme")
    api.tenant("globex")
    api.budget("acme", "tenant:acme", 1000)
    api.budget("globex", "tenant:globex", 1000)
    client = api.client
    assert sign_in(client, key).status_code == 303
    assert client.get("/console/").headers["location"] == "/console/tenants/acme"
    own = client.get("/console/tenants/acme")
    assert own.status_code == 200
    assert "tenant:acme" in own.text
    assert client.get("/console/tenants/globex").status_code == 403
    assert client.get("/console/overview").status_code == 403
    assert client.get("/console/audit").status_code == 403
    budgets = client.get("/console/budgets?tenant_id=globex")
    assert "tenant:globex" not in budgets.text
    assert "tenant:acme" in budgets.text
    assert "globex" not in client.get("/console/reservations?tenant=globex").text.replace(
        "tenant=globex", ""
    )
    form = {"scope": "tenant:acme", "unit": U, "reason": "r", "csrf_token": csrf(client)}
    assert client.post("/console/budgets/freeze", data=form).status_code == 403


def test_sign_out_ends_the_session(api: Api, admin: SyncClient) -> None:
    token = csrf(admin)
    assert admin.post("/console/sign-out", data={"csrf_token": token}).status_code == 303
    assert admin.get("/console/overview").status_code == 303


def test_the_console_can_be_turned_off(make_api: Any) -> None:
    api = make_api(console=False)
    assert api.client.get("/console/sign-in").status_code == 404


def test_sessions_end_when_idle_or_too_old() -> None:
    now = [0.0]
    store = SessionStore(idle_timeout_s=60, absolute_timeout_s=300, clock=lambda: now[0])
    session = store.create("admin", "k", None)
    now[0] = 59
    assert store.get(session.session_id) is session
    now[0] = 110
    assert store.get(session.session_id, touch=False) is session  # a poll keeps nothing alive
    now[0] = 121
    assert store.get(session.session_id) is None
    busy = store.create("admin", "k", None)
    for t in range(150, 421, 50):
        now[0] = t
        assert store.get(busy.session_id) is not None
    now[0] = 121 + 301
    assert store.get(busy.session_id) is None
    assert store.get("unknown") is None
    assert store.get(None) is None


def test_sessions_are_capped() -> None:
    store = SessionStore(max_sessions=2)
    first = store.create("admin", "k", None)
    store.create("admin", "k", None)
    store.create("tenant", "k2", "acme")
    assert len(store) == 2
    assert store.get(first.session_id) is None


def test_a_tenant_page_shows_its_budgets_keys_and_policies(api: Api, admin: SyncClient) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 250_000_000)
    page = admin.get("/console/tenants/acme")
    assert page.status_code == 200
    assert "tenant:acme" in page.text
    assert "$2.50" in page.text
    assert "cyc_live_" in page.text  # the key's prefix, never its secret
    assert "Not shown" not in page.text
    assert "No policies." in page.text
    assert admin.get("/console/tenants/nobody").status_code == 404


def test_a_tenant_page_shows_what_its_policies_do_and_its_webhooks(
    api: Api, admin: SyncClient, receiver: Receiver
) -> None:
    key, sid = hooked_tenant(api, "acme", receiver.url)
    quota = {"action_kind": "email.send", "max_calls": 20, "window": "per_run"}
    body = {"tenant_id": "acme", "name": "guard-rails", "scope_pattern": "tenant:acme/*",
            "denied_action_kinds": ["payment.charge"], "action_quotas": [quota]}  # fmt: skip
    policy = api.admin("POST", "/v1/admin/policies", 201, json=body)
    page = admin.get("/console/tenants/acme")
    assert page.status_code == 200
    row = re.search(rf'<tr data-policy="{policy["policy_id"]}">(.*?)</tr>', page.text, re.S)
    assert row is not None
    assert "guard-rails" in row.group(1)
    assert "Denies: payment.charge" in row.group(1)
    assert "Quota: 20 calls of email.send per run" in row.group(1)
    assert "always" in row.group(1)
    assert f'href="/console/webhooks/{sid}"' in page.text
    assert "Not shown" not in page.text
    assert sign_in(api.client, key).status_code == 303  # the tenant's own read-only view
    mine = api.client.get("/console/tenants/acme")
    assert "API keys are listed to the admin key only" in mine.text
    assert f'href="/console/webhooks/{sid}"' in mine.text
    assert key not in mine.text  # the session's key never reaches the page


@pytest.mark.parametrize(
    ("microcents", "shown"),
    [(0, "$0.00"), (200_000, "$0.002"), (1_250_000_000, "$12.50"), (1, "$0.00000001"),
     (-300_000_000, "-$3.00"), (123_456_789_000, "$1,234.56789")],
)  # fmt: skip
def test_dollar_amounts_never_round_a_small_budget_to_zero(microcents: int, shown: str) -> None:
    assert fmt.amount({"unit": U, "amount": microcents}) == shown


def test_other_units_and_utilization() -> None:
    assert fmt.amount({"unit": "TOKENS", "amount": 12_000}) == "12,000 tokens"
    assert fmt.amount(None) == "—"
    budget = {"allocated": {"amount": 1000}, "remaining": {"amount": 200}}
    assert fmt.utilization(budget) == 0.8
    assert fmt.level(0.8) == "near"
    assert fmt.level(1.2) == "over"
    assert fmt.level(0.5, "FROZEN") == "frozen"
    assert fmt.utilization({"allocated": {"amount": 0}, "spent": {"amount": 5}}) == 1.0


def committed(scope: str, amount: int, done_ms: int, unit: str = U) -> dict[str, Any]:
    return {"status": "COMMITTED", "committed": {"unit": unit, "amount": amount},
            "finalized_at_ms": done_ms, "affected_scopes": [scope]}  # fmt: skip


def test_a_spend_series_buckets_the_commits_of_its_scope() -> None:
    end = 10 * spending.HOUR_MS
    day = spending.RANGES["day"]
    rows = [
        committed("tenant:acme", 100, end - 1),  # last bucket, last hour
        committed("tenant:acme", 50, end - 90 * 60_000),  # two hours' bucket, not last hour
        committed("tenant:acme", 7, end - 25 * spending.HOUR_MS),  # before the range
        committed("tenant:other", 1_000, end - 1),  # another scope
        committed("tenant:acme", 1_000, end - 1, unit="TOKENS"),  # another unit
        {"status": "COMMITTED", "affected_scopes": ["tenant:acme"]},  # no amount
    ]
    series = spending.series(rows, "tenant:acme", U, day, end)
    assert series.amounts[-1] == 100
    assert series.amounts[-2] == 50
    assert series.total == 150
    assert series.counted == 2
    assert series.last_hour == 100
    assert series.per_hour() == 150 / 24
    assert series.hours_left(1_000) == 10
    assert spending.series([], "tenant:acme", U, day, end).hours_left(5) is None


def test_the_spend_page_charts_committed_spend(api: Api, admin: SyncClient) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 100_000_000)
    for n in (1, 2):
        rid = reserve(api, key, "acme", f"r{n}", 1_000_000).json()["reservation_id"]
        body = {"idempotency_key": f"c{n}", "actual": {"unit": U, "amount": n * 400_000}}
        assert api.post(key, f"/v1/reservations/{rid}/commit", body).status_code == 200
    page = admin.get("/console/spend?tenant=acme&range=week")
    assert page.status_code == 200
    assert 'name="range" value="week" checked' in page.text
    assert 'data-total="1200000"' in page.text
    assert "$0.012 (2 commits)" in page.text
    assert page.text.count('class="spend-bar"') == 28
    assert admin.get("/console/spend?range=year").status_code == 400
    assert "no budgets" in admin.get("/console/spend?tenant=nobody").text


def test_the_spend_page_counts_direct_debits_from_post_events(
    api: Api, admin: SyncClient, clock: FakeClock
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 100_000_000)
    rid = reserve(api, key, "acme", "r1", 1_000_000).json()["reservation_id"]
    body = {"idempotency_key": "c1", "actual": {"unit": U, "amount": 400_000}}
    assert api.post(key, f"/v1/reservations/{rid}/commit", body).status_code == 200
    for n, amount in enumerate((300_000, 200_000)):
        event = {
            "idempotency_key": f"e{n}",
            "subject": {"tenant": "acme", "agent": "bot"},
            "action": {"kind": "tool.call", "name": "search"},
            "actual": {"unit": U, "amount": amount},
        }
        assert api.post(key, "/v1/events", event).status_code == 201
    page = admin.get("/console/spend?tenant=acme&range=hour")
    assert page.status_code == 200
    assert 'data-total="900000"' in page.text  # 0.4 committed + 0.3 + 0.2 debited
    assert "(1 commits, 2 direct debits by <code>POST /v1/events</code>)" in page.text
    clock.advance(2 * spending.HOUR_MS)  # out of the hour's range, still in the day's
    assert 'data-total="0"' in admin.get("/console/spend?tenant=acme&range=hour").text
    assert 'data-total="900000"' in admin.get("/console/spend?tenant=acme&range=day").text
    other = api.tenant("globex")
    api.budget("globex", "tenant:globex", 1_000_000)
    assert sign_in(api.client, other).status_code == 303
    mine = api.client.get("/console/spend?tenant=acme&range=day")  # a tenant key: its own only
    assert 'data-total="0"' in mine.text


def test_direct_debits_are_listed_by_window_and_their_index_is_trimmed(
    api: Api, store: Store, clock: FakeClock
) -> None:
    assert isinstance(store, DebitReader)
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 100_000_000)

    def debit(n: int) -> None:
        event = {"idempotency_key": f"e{n}", "subject": {"tenant": "acme"},
                 "action": {"kind": "tool.call", "name": "search"},
                 "actual": {"unit": U, "amount": 1_000 * (n + 1)}}  # fmt: skip
        assert api.post(key, "/v1/events", event).status_code == 201

    start = clock.now_ms
    debit(0)
    clock.advance(1_000)
    debit(1)
    rows = api.client.run(store.list_debits("acme", 0, start + 10_000, 10))
    assert [(r.charged, r.created_at_ms) for r in rows] == [(1_000, start), (2_000, start + 1_000)]
    assert [r.charged for r in api.client.run(store.list_debits("acme", 0, 2**62, 1))] == [1_000]
    later = api.client.run(store.list_debits("acme", start + 1, 2**62, 10))
    assert [r.charged for r in later] == [2_000]
    assert api.client.run(store.list_debits("other", 0, 2**62, 10)) == []
    if isinstance(store, RedisStore):  # the index does not outgrow the retention
        index = store._k.x_debits("acme")
        clock.advance((store.retention_ms or 0) + 1_000)  # both older than the retention
        debit(2)
        assert api.client.run(store.client.zcard(index)) == 1


def test_a_spend_series_adds_direct_debits_of_its_scope_and_unit() -> None:
    end = 10 * spending.HOUR_MS
    day = spending.RANGES["day"]

    def debit(scope: str, charged: int, at_ms: int, unit: str = U) -> EventRow:
        return EventRow("evt", "acme", {}, {}, unit, charged, charged, scope, [scope], [scope],
                        "REJECT", "k", at_ms)  # fmt: skip

    rows = [committed("tenant:acme", 100, end - 1)]
    debits = [
        debit("tenant:acme", 40, end - 2),
        debit("tenant:acme", 5, end - 30 * 3_600_000),
        debit("tenant:other", 9, end - 1),
        debit("tenant:acme", 7, end - 1, "TOKENS"),
    ]
    series = spending.series(rows, "tenant:acme", U, day, end, debits=debits)  # fmt: skip
    assert series.total == 140
    assert (series.counted, series.debits) == (1, 1)
    assert series.last_hour == 140


def test_the_console_adds_nothing_in_front_of_the_api(store: Store) -> None:
    """Same middleware, same routes first, console last: no API request pays for it."""
    on = create_app(store, admin_api_key="k", sweep_interval_s=None, close_store=False)
    off = create_app(store, admin_api_key="k", sweep_interval_s=None, console=False)
    assert [m.cls for m in on.user_middleware] == [m.cls for m in off.user_middleware]
    api_routes = len(off.routes)
    assert [getattr(r, "path", None) for r in on.routes[:api_routes]] == [
        getattr(r, "path", None) for r in off.routes
    ]
    assert all(getattr(r, "path", "").startswith("/console") for r in on.routes[api_routes:])


def test_a_post_from_another_site_is_refused_even_with_the_token(
    api: Api, admin: SyncClient
) -> None:
    api.tenant("acme")
    api.budget("acme", "tenant:acme", 1000)
    form = {"scope": "tenant:acme", "unit": U, "reason": "r", "csrf_token": csrf(admin)}
    for origin in ("https://evil.example", "null"):
        refused = admin.post("/console/budgets/freeze", data=form, headers={"Origin": origin})
        assert refused.status_code == 403
        assert "another site" in refused.text
    same = admin.post("/console/budgets/freeze", data=form, headers={"Origin": "http://testserver"})
    assert same.status_code == 303


def test_an_oversized_form_is_refused(api: Api, admin: SyncClient) -> None:
    big = {"reason": "x" * 20_000, "csrf_token": csrf(admin)}
    assert admin.post("/console/budgets/freeze", data=big).status_code == 413
    assert api.client.post("/console/sign-in", data={"key": "k" * 20_000}).status_code == 413


# --------------------------------------------------------------------------------------------
# Webhooks


HOOK_PERMS = ["reservations:create", "reservations:commit", "balances:read", "webhooks:read",
              "webhooks:write"]  # fmt: skip


class Receiver:
    """A real local HTTP receiver answering ``status`` and keeping each event it got."""

    def __init__(self) -> None:
        self.status = 200
        self.events: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.events.append(json.loads(body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def types(self) -> list[str]:
        return [e["event_type"] for e in self.events]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()
    found.server.server_close()


def hooked_tenant(api: Api, tenant: str, url: str, **fields: Any) -> tuple[str, str]:
    """A tenant with a budget, a key allowed webhooks, and a subscription to ``url``."""
    config = {"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]}
    api.admin("PUT", "/v1/admin/config/webhook-security", 200, json=config)
    api.admin("POST", "/v1/admin/tenants", json={"tenant_id": tenant, "name": tenant})
    body = {"tenant_id": tenant, "name": "ops", "permissions": HOOK_PERMS}
    key = str(api.admin("POST", "/v1/admin/api-keys", 201, json=body)["key_secret"])
    api.budget(tenant, f"tenant:{tenant}", 1_000)
    hook = {"url": url, "event_types": ["budget.threshold_crossed"], "name": f"{tenant}-alerts",
            "retry_policy": {"max_retries": 0}, **fields}  # fmt: skip
    created = api.client.post("/v1/webhooks", json=hook, headers={"X-Cycles-API-Key": key})
    assert created.status_code == 201, created.text
    return key, str(created.json()["subscription"]["subscription_id"])


def dispatch(api: Api) -> int:
    return int(api.client.run(api.client.app.state.webhook_dispatcher.run_once()))


def test_the_webhooks_page_shows_health_and_a_failing_subscriptions_deliveries(
    api: Api, admin: SyncClient, receiver: Receiver
) -> None:
    key, sid = hooked_tenant(api, "acme", receiver.url, disable_after_failures=2)
    receiver.status = 500
    assert reserve(api, key, "acme", "r1", 850).status_code == 200  # crosses 80 %
    assert dispatch(api) == 1
    listing = admin.get("/console/webhooks")
    assert listing.status_code == 200
    row = re.search(rf'<tr data-subscription="{sid}">(.*?)</tr>', listing.text, re.S)
    assert row is not None
    assert "acme-alerts" in row.group(1)
    assert "ACTIVE" in row.group(1)
    assert "failing" in row.group(1)  # said in words, not by colour alone
    assert "1 of 2" in row.group(1)
    detail = admin.get(f"/console/webhooks/{sid}")
    assert detail.status_code == 200
    delivery = re.search(r'<tr data-delivery="[^"]+" data-status="FAILED">(.*?)</tr>', detail.text,
                         re.S)  # fmt: skip
    assert delivery is not None
    assert "budget.threshold_crossed" in delivery.group(1)
    assert "HTTP 500" in delivery.group(1)
    assert reserve(api, key, "acme", "r2", 100).status_code == 200  # crosses 95 %
    dispatch(api)
    detail = admin.get(f"/console/webhooks/{sid}")
    assert "DISABLED" in detail.text
    assert "disabled: consecutive failures exceeded threshold" in detail.text
    assert detail.text.count('data-status="FAILED"') == 2
    only_ok = admin.get(f"/console/webhooks/{sid}?status=SUCCESS")
    assert "data-status=" not in only_ok.text
    overview = api.admin("GET", "/v1/admin/overview", 200)
    schema_validator("AdminOverviewResponse", EXTENDED_ADMIN).validate(overview)
    assert overview["webhook_counts"] == {"total": 1, "active": 0, "disabled": 1,
                                          "with_failures": 1}  # fmt: skip
    (failing,) = overview["failing_webhooks"]
    assert (failing["subscription_id"], failing["consecutive_failures"]) == (sid, 2)
    card = (
        r'class="card card-alert" href="/console/webhooks\?health=failing">\s*<span class="num">1<'
    )
    assert re.search(card, admin.get("/console/overview").text) is not None
    assert sid in admin.get("/console/webhooks?health=failing").text
    api.admin("PATCH", f"/v1/admin/webhooks/{sid}", 200, json={"status": "ACTIVE"})  # resets
    assert sid not in admin.get("/console/webhooks?health=failing").text
    assert "No failing webhook subscriptions" in admin.get("/console/webhooks?health=failing").text
    assert admin.get(f"/console/webhooks/{sid}?status=BOGUS").status_code == 400
    assert admin.get("/console/webhooks?status=BOGUS").status_code == 400
    assert "health must be failing" in admin.get("/console/webhooks?health=sick").text
    assert admin.get("/console/webhooks/whsub_nope").status_code == 404


def test_webhook_test_replay_pause_resume_are_audited_admin_actions(
    api: Api, admin: SyncClient, receiver: Receiver
) -> None:
    key, sid = hooked_tenant(api, "acme", receiver.url)
    assert reserve(api, key, "acme", "r1", 850).status_code == 200
    dispatch(api)
    assert receiver.types() == ["budget.threshold_crossed"]
    page = f"/console/webhooks/{sid}"
    token = csrf(admin, page)
    assert admin.post(f"{page}/test", data={}).status_code == 403  # no CSRF token
    sent = admin.post(f"{page}/test", data={"csrf_token": token})
    assert sent.status_code == 303
    assert "Test delivered: the receiver answered HTTP 200" in admin.get(page).text
    assert receiver.types()[-1] == "system.webhook_test"
    no_reason = admin.post(f"{page}/replay", data={"csrf_token": token, "window": "day"})
    assert no_reason.status_code == 303
    assert "A reason" in admin.get(page).text
    form = {
        "csrf_token": token,
        "window": "day",
        "max_events": "100",
        "reason": "receiver lost data",
    }
    assert admin.post(f"{page}/replay", data=form).status_code == 303
    assert "1 event(s) of the last 24 hours queued" in admin.get(page).text
    dispatch(api)
    assert receiver.types().count("budget.threshold_crossed") == 2  # sent again
    bad = admin.post(f"{page}/replay", data={**form, "max_events": "5000"})
    assert bad.status_code == 303
    assert "at most 1 to 1000 events" in admin.get(page).text
    paused = admin.post(f"{page}/pause", data={"csrf_token": token, "reason": "maintenance"})
    assert paused.status_code == 303
    assert f"Subscription {sid} is now PAUSED." in admin.get(page).text
    sub = api.admin("GET", f"/v1/admin/webhooks/{sid}", 200)
    assert sub["status"] == "PAUSED"
    refused = admin.post(f"{page}/replay", data=form)
    assert refused.status_code == 303
    assert "resume it" in admin.get(page).text
    admin.post(f"{page}/resume", data={"csrf_token": token, "reason": "back"})
    assert api.admin("GET", f"/v1/admin/webhooks/{sid}", 200)["status"] == "ACTIVE"
    assert admin.post(f"{page}/delete", data={"csrf_token": token}).status_code == 404
    page_body = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})
    schema_validator("AuditLogListResponse", EXTENDED_ADMIN).validate(page_body)
    by_op = {entry["operation"]: entry for entry in page_body["logs"]}
    for operation in ("testWebhookSubscription", "replayEvents", "pauseWebhookSubscription",
                      "resumeWebhookSubscription"):  # fmt: skip
        assert by_op[operation]["resource_id"] == sid
        assert by_op[operation]["resource_type"] == "webhook"
        assert by_op[operation]["metadata"]["actor_type"] == "admin_on_behalf_of"
    assert by_op["replayEvents"]["metadata"]["reason"] == "receiver lost data"
    assert by_op["replayEvents"]["metadata"]["events_queued"] == 1
    assert by_op["pauseWebhookSubscription"]["metadata"]["reason"] == "maintenance"
    events = api.admin("GET", "/v1/admin/events", 200,
                       params={"tenant_id": "acme", "event_type": "webhook.paused"})  # fmt: skip
    assert events["events"][0]["actor"]["type"] == "admin"


def test_the_webhook_api_audits_its_test_and_replay_too(api: Api, receiver: Receiver) -> None:
    key, sid = hooked_tenant(api, "acme", receiver.url)
    tested = api.client.post(f"/v1/webhooks/{sid}/test", headers={"X-Cycles-API-Key": key})
    assert tested.status_code == 200, tested.text
    schema_validator("WebhookTestResponse", EXTENDED_ADMIN).validate(tested.json())
    window = {"from": "2020-01-01T00:00:00Z"}
    api.admin("POST", f"/v1/admin/webhooks/{sid}/replay", 202, json=window)
    api.admin("PATCH", f"/v1/admin/webhooks/{sid}", 200, json={"status": "PAUSED"})
    api.admin("PATCH", f"/v1/admin/webhooks/{sid}", 200, json={"name": "renamed"})  # not audited
    page_body = api.admin("GET", "/v1/admin/audit/logs", 200, params={"tenant_id": "acme"})
    schema_validator("AuditLogListResponse", EXTENDED_ADMIN).validate(page_body)
    logs = page_body["logs"]
    # newest first; entries written in the same millisecond may come in either order
    assert sorted(e["operation"] for e in logs) == [
        "pauseWebhookSubscription", "replayEvents", "testWebhookSubscription"]  # fmt: skip
    stamps = [e["timestamp"] for e in logs]
    assert stamps == sorted(stamps, reverse=True)
    ops = {entry["operation"]: entry["metadata"] for entry in logs}
    assert ops["testWebhookSubscription"]["actor_type"] == "api_key"
    assert ops["testWebhookSubscription"]["success"] is True
    assert ops["replayEvents"]["actor_type"] == "admin_on_behalf_of"


def test_a_tenant_key_sees_only_its_own_subscriptions_and_cannot_act(
    api: Api, receiver: Receiver
) -> None:
    key, mine = hooked_tenant(api, "acme", receiver.url)
    _, theirs = hooked_tenant(api, "globex", receiver.url)
    assert sign_in(api.client, key).status_code == 303
    listing = api.client.get("/console/webhooks")
    assert listing.status_code == 200
    assert mine in listing.text
    assert theirs not in listing.text
    assert "globex" not in api.client.get("/console/webhooks?tenant_id=globex").text
    assert api.client.get(f"/console/webhooks/{theirs}").status_code == 404
    page = api.client.get(f"/console/webhooks/{mine}")
    assert page.status_code == 200
    assert "Send a test event" not in page.text  # read-only: no action forms
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    for action in ("test", "pause"):
        refused = api.client.post(f"/console/webhooks/{mine}/{action}",
                                  data={"csrf_token": token.group(1), "reason": "r"})  # fmt: skip
        assert refused.status_code == 403
        assert "read-only" in refused.text
    assert receiver.events == []
    assert api.admin("GET", f"/v1/admin/webhooks/{mine}", 200)["status"] == "ACTIVE"


def test_a_long_webhooks_list_says_how_many_are_not_shown(
    api: Api, admin: SyncClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooked_tenant(api, "acme", receiver.url)
    _, second = hooked_tenant(api, "globex", receiver.url)
    monkeypatch.setattr(webhook_pages, "MAX_LISTED", 1)
    page = admin.get("/console/webhooks")
    assert page.text.count("<tr data-subscription=") == 1
    assert "1 more subscription(s) not shown" in page.text
    narrowed = admin.get("/console/webhooks?tenant_id=globex")
    assert second in narrowed.text
    assert "not shown" not in narrowed.text


def test_a_tenant_key_without_webhooks_read_is_told_so(api: Api) -> None:
    key = api.tenant("acme")
    assert sign_in(api.client, key).status_code == 303
    page = api.client.get("/console/webhooks")
    assert page.status_code == 403
    assert "webhooks:read" in page.text


# --------------------------------------------------------------------------------------------
# Sign-in limits


def test_repeated_failed_sign_ins_are_refused_for_a_while(api: Api, clock: FakeClock) -> None:
    admin_key = api.admin_headers["X-Admin-API-Key"]
    for n in range(signin_limits.CLIENT_FAILURES):
        assert sign_in(api.client, f"guess-{n}").status_code == 401
    refused = sign_in(api.client, "guess-again")
    assert refused.status_code == 401  # the 6th failure is counted: the address is locked
    locked = sign_in(api.client, admin_key)  # even the right key waits: it is not checked
    assert locked.status_code == 429
    assert locked.headers["retry-after"] == "30"
    assert "Too many failed sign-ins" in locked.text
    assert "paused for 30 seconds" in locked.text
    assert SESSION_COOKIE + "=" not in locked.headers.get("set-cookie", "")
    clock.advance(31_000)
    assert sign_in(api.client, "guess-7").status_code == 401  # one more: locked twice as long
    assert sign_in(api.client, admin_key).headers["retry-after"] == "60"
    clock.advance(61_000)
    assert sign_in(api.client, admin_key).status_code == 303  # the lock ends; success clears
    for n in range(signin_limits.CLIENT_FAILURES):
        assert sign_in(api.client, f"later-{n}").status_code == 401
    assert sign_in(api.client, admin_key).status_code == 303


def test_locks_are_per_address_and_per_key_and_never_longer_than_the_cap() -> None:
    now = [0.0]
    limiter = signin_limits.SignInLimiter(clock=lambda: now[0])
    for _ in range(30):
        limiter.failed("10.0.0.1", "wrong")
    assert limiter.retry_after("10.0.0.1", "admin-key") == signin_limits.MAX_LOCK_S
    assert limiter.retry_after("10.0.0.2", "admin-key") is None  # another address: not locked
    assert limiter.retry_after("10.0.0.2", "wrong") is not None  # the same wrong key is
    # guesses at one tenant key from many addresses add up on its public prefix
    for n in range(signin_limits.KEY_FAILURES + 1):
        limiter.failed(f"192.0.2.{n}", f"cyc_live_AbCdE{n:030d}")
    assert limiter.retry_after("198.51.100.1", "cyc_live_AbCdEzzzz") == 30
    assert limiter.retry_after("198.51.100.1", "cyc_live_XyZwVzzzz") is None
    now[0] += signin_limits.MAX_LOCK_S + 1
    assert limiter.retry_after("10.0.0.1", "admin-key") is None
    small = signin_limits.SignInLimiter(max_tracked=4, clock=lambda: now[0])
    for n in range(10):
        small.failed(f"10.1.0.{n}", f"k{n}")
    assert len(small) == 4
