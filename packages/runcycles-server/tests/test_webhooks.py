"""Webhook subscriptions and delivery on every store, against a real local HTTP receiver.

The dispatcher is driven round by round (``app.state.webhook_dispatcher.run_once()``) and
time moves with the fake clock, so retries, backoff and leases need no sleeping. The receiver
is a real HTTP server on 127.0.0.1 (allowed by relaxing the SSRF configuration through its
admin route, as an operator would in development).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from runcycles import (
    InMemorySeenEventStore,
    WebhookReplayError,
    WebhookVerificationError,
    verify_delivery,
)
from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.app import WebhookOptions
from runcycles_server.stores.base import Store
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.sqlite import SqliteStore
from runcycles_server.webhooks import Dispatcher, storage_for
from runcycles_server.webhooks.models import SubscriptionRow
from runcycles_server.webhooks.sealing import SecretBox
from runcycles_server.webhooks.storage import WebhookTxn

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"
GOVERNANCE = "cycles-governance-admin-v0.1.25.yaml"


def valid(schema: str, body: Any, spec: str = GOVERNANCE) -> Any:
    """Validate ``body`` against the governance spec's ``schema``; return it."""
    schema_validator(schema, spec).validate(body)
    return body


HOOK_PERMS = ["reservations:create", "reservations:commit", "reservations:release",
              "balances:read", "webhooks:read", "webhooks:write", "events:read"]  # fmt: skip


class Receiver:
    """A real HTTP server that records each request and answers from a script of statuses."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[int] = []
        self.default = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.script.pop(0) if receiver.script else receiver.default
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hook"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


class Dns:
    """The resolver seam: a host's address can change between save and delivery."""

    def __init__(self) -> None:
        self.hosts: dict[str, str] = {"hooks.example": "127.0.0.1"}

    async def __call__(self, host: str, port: int) -> list[str]:
        if host not in self.hosts:
            raise OSError(f"unknown host {host}")
        return [self.hosts[host]]


@pytest.fixture
def dns() -> Dns:
    return Dns()


@pytest.fixture
def hooks(make_api: Callable[..., Api], dns: Dns) -> Api:
    return relaxed(make_api(webhook_options=WebhookOptions(resolver=dns),
                            webhook_key=SecretBox.generate()))  # fmt: skip


def relaxed(api: Api) -> Api:
    """``api`` with the SSRF configuration relaxed for a receiver on 127.0.0.1."""
    defaults = api.admin("GET", "/v1/admin/config/webhook-security", 200)
    assert valid("WebhookSecurityConfig", defaults)["allow_http"] is False
    assert "127.0.0.0/8" in defaults["blocked_cidr_ranges"]
    config = {"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8", "169.254.0.0/16"]}
    valid("WebhookSecurityConfig", config)
    saved = api.admin("PUT", "/v1/admin/config/webhook-security", 200, json=config)
    assert valid("WebhookSecurityConfig", saved)["allow_http"] is True
    return api


def dispatch(api: Api, rounds: int = 1) -> int:
    app = api.client._client._transport.app  # type: ignore[attr-defined]
    return sum(api.client.run(app.state.webhook_dispatcher.run_once()) for _ in range(rounds))


def tenant_key(api: Api, tenant: str = "acme") -> str:
    api.admin("POST", "/v1/admin/tenants", json={"tenant_id": tenant, "name": tenant})
    body = {"tenant_id": tenant, "name": "ops", "permissions": HOOK_PERMS}
    return str(api.admin("POST", "/v1/admin/api-keys", 201, json=body)["key_secret"])


def subscribe(api: Api, key: str, url: str, expect: int = 201, **fields: Any) -> Any:
    body = {"url": url, "event_types": ["budget.threshold_crossed", "budget.exhausted"], **fields}
    valid("WebhookCreateRequest", body)
    response = api.client.post("/v1/webhooks", json=body, headers={"X-Cycles-API-Key": key})
    assert response.status_code == expect, response.text
    return valid("WebhookCreateResponse" if expect == 201 else "ErrorResponse", response.json())


def reserve(api: Api, key: str, idem: str, amount: int, agent: str = "bot") -> Any:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": "acme", "agent": agent},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
    }
    response = api.post(key, "/v1/reservations", body)
    assert response.status_code in (200, 409), response.text
    return response.json()


def crossings(receiver: Receiver) -> list[tuple[str, Any, Any]]:
    return [
        (e["event_type"], e["data"].get("threshold"), e["data"].get("direction"))
        for e in receiver.events()
    ]


def test_crossings_and_exhaustion_each_deliver_once(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    created = subscribe(hooks, key, receiver.url())
    secret = created["signing_secret"]
    reserve(hooks, key, "a", 800)  # 80 %
    dispatch(hooks, 3)
    assert crossings(receiver) == [("budget.threshold_crossed", 0.8, "rising")]
    second = reserve(hooks, key, "b", 150)  # 95 %
    dispatch(hooks, 3)
    assert crossings(receiver)[1:] == [("budget.threshold_crossed", 0.95, "rising")]
    rid = second["reservation_id"]
    hooks.post(key, f"/v1/reservations/{rid}/release", {"idempotency_key": "r"})  # back to 80 %
    dispatch(hooks, 3)
    reserve(hooks, key, "c", 150)  # 95 % again: delivered again
    dispatch(hooks, 3)
    assert crossings(receiver)[2:] == [
        ("budget.threshold_crossed", 0.95, "falling"),
        ("budget.threshold_crossed", 0.95, "rising"),
    ]
    reserve(hooks, key, "d", 50)  # 100 %: exhausted once
    reserve(hooks, key, "e", 10)  # refused: nothing new
    dispatch(hooks, 4)
    tail = crossings(receiver)[4:]
    assert tail == [
        ("budget.threshold_crossed", 1.0, "rising"),
        ("budget.exhausted", None, "rising"),
    ]
    # every delivery verifies with the secret answered at creation, ids are unique
    seen = InMemorySeenEventStore()
    for headers, body in receiver.requests:
        event = json.loads(body)
        assert headers["x-cycles-event-id"] == event["event_id"]
        assert headers["x-cycles-event-type"] == event["event_type"]
        assert headers["traceparent"].split("-")[1] == event["trace_id"]
        assert headers["x-request-id"] == event["request_id"]
        assert headers["x-cycles-signature"].startswith("sha256=")
        assert headers["user-agent"].startswith("runcycles-server-webhooks")
        verify_delivery(body, headers, [secret], seen=seen, now=clock.now_ms / 1000)
    # the secret is never answered again
    sid = created["subscription"]["subscription_id"]
    got = hooks.client.get(f"/v1/webhooks/{sid}", headers={"X-Cycles-API-Key": key}).json()
    valid("WebhookSubscription", got)
    assert "signing_secret" not in got
    assert secret not in str(got)
    listed = valid("WebhookListResponse", hooks.admin("GET", "/v1/admin/webhooks", 200))
    assert secret not in str(listed)
    page = hooks.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries", 200)
    deliveries = valid("WebhookDeliveryListResponse", page)["deliveries"]
    assert len(deliveries) == 6
    assert {d["status"] for d in deliveries} == {"SUCCESS"}


def test_retries_until_success_then_exactly_once(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    secret = subscribe(hooks, key, receiver.url())["signing_secret"]
    receiver.script = [500, 503, 502]
    reserve(hooks, key, "a", 800)
    dispatch(hooks)
    for _ in range(3):
        clock.advance(61_000)  # past any backoff (capped at 60 s)
        dispatch(hooks)
    clock.advance(61_000)
    dispatch(hooks, 2)
    statuses = [h for h, _ in receiver.requests]
    assert len(statuses) == 4
    ids = [e["event_id"] for e in receiver.events()]
    assert len(set(ids)) == 1  # the same event, four attempts
    seen = InMemorySeenEventStore()
    verify_delivery(receiver.requests[-1][1], receiver.requests[-1][0], [secret],
                    seen=seen, now=clock.now_ms / 1000)  # fmt: skip
    with pytest.raises(WebhookReplayError):
        verify_delivery(receiver.requests[-2][1], receiver.requests[-2][0], [secret],
                        seen=seen, now=clock.now_ms / 1000)  # fmt: skip
    # timestamps are fresh on every attempt
    stamps = [h["x-cycles-timestamp"] for h, _ in receiver.requests]
    assert len(set(stamps)) == 4


def test_always_failing_receiver_disables_after_n(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    created = subscribe(hooks, key, receiver.url(), disable_after_failures=2,
                        retry_policy={"max_retries": 1, "initial_delay_ms": 100})  # fmt: skip
    sid = created["subscription"]["subscription_id"]
    receiver.default = 500
    reserve(hooks, key, "a", 800)
    reserve(hooks, key, "b", 150)
    for _ in range(6):
        dispatch(hooks)
        clock.advance(1_000)
    assert len(receiver.requests) == 4  # two deliveries, each tried twice
    sub = valid("WebhookSubscription", hooks.admin("GET", f"/v1/admin/webhooks/{sid}", 200))
    assert sub["status"] == "DISABLED"
    assert sub["consecutive_failures"] == 2
    params = {"tenant_id": "acme", "event_type": "webhook.disabled"}
    events = hooks.admin("GET", "/v1/admin/events", 200, params=params)
    events = valid("EventListResponse", events, EXTENDED_ADMIN)["events"]
    assert [e["data"]["disable_reason"] for e in events] == [
        "consecutive_failures_exceeded_threshold"
    ]
    failed = hooks.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries", 200,
                         params={"status": "FAILED"})["deliveries"]  # fmt: skip
    assert len(failed) == 2
    assert failed[0]["response_status"] == 500
    # re-enabled by PATCH: resumed, counter reset
    resumed = hooks.admin("PATCH", f"/v1/admin/webhooks/{sid}", 200, json={"status": "ACTIVE"})
    assert resumed["status"] == "ACTIVE"
    assert resumed["consecutive_failures"] == 0


def test_ssrf_refused_at_save_and_at_delivery(
    hooks: Api, receiver: Receiver, dns: Dns, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    dns.hosts["internal.example"] = "10.1.2.3"
    refused = subscribe(hooks, key, receiver.url("internal.example"), expect=400)
    assert "10.1.2.3" in refused["message"]
    metadata = subscribe(hooks, key, "http://169.254.169.254/latest", expect=400)
    assert "169.254" in metadata["message"]
    created = subscribe(hooks, key, receiver.url("hooks.example"),
                        retry_policy={"max_retries": 0})  # fmt: skip
    sid = created["subscription"]["subscription_id"]
    dns.hosts["hooks.example"] = "10.9.9.9"  # rebinding after the save
    reserve(hooks, key, "a", 800)
    dispatch(hooks, 2)
    assert receiver.requests == []
    (delivery,) = hooks.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries", 200)["deliveries"]
    assert delivery["status"] == "FAILED"
    assert "10.9.9.9" in delivery["error_message"]
    # back to an allowed address: the pinned connection carries the real Host header
    dns.hosts["hooks.example"] = "127.0.0.1"
    reserve(hooks, key, "b", 150)
    dispatch(hooks, 2)
    assert receiver.requests[0][0]["host"] == f"hooks.example:{receiver.port}"
    # https only by default
    hooks.admin("PUT", "/v1/admin/config/webhook-security", 200, json={})
    assert "https" in subscribe(hooks, key, receiver.url(), expect=400)["message"]


def test_replay_resends_a_window(hooks: Api, receiver: Receiver, clock: FakeClock) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    reserve(hooks, key, "a", 800)  # before the subscription existed
    clock.advance(1_000)
    created = subscribe(hooks, key, receiver.url())
    sid = created["subscription"]["subscription_id"]
    reserve(hooks, key, "b", 150)
    dispatch(hooks, 2)
    assert crossings(receiver) == [("budget.threshold_crossed", 0.95, "rising")]
    accepted = hooks.admin("POST", f"/v1/admin/webhooks/{sid}/replay", 202,
                           json={"from": "2020-01-01T00:00:00Z"})  # fmt: skip
    assert accepted["events_queued"] == 2
    dispatch(hooks, 3)
    assert crossings(receiver)[1:] == [
        ("budget.threshold_crossed", 0.8, "rising"),
        ("budget.threshold_crossed", 0.95, "rising"),
    ]
    receiver.default = 500  # a replay still being retried blocks the next one
    hooks.admin("POST", f"/v1/admin/webhooks/{sid}/replay", 202,
                json={"from": "2020-01-01T00:00:00Z"})  # fmt: skip
    dispatch(hooks)
    busy = hooks.admin("POST", f"/v1/admin/webhooks/{sid}/replay", 409,
                       json={"from": "2020-01-01T00:00:00Z"})  # fmt: skip
    assert "still being delivered" in busy["message"]
    too_many = hooks.admin("POST", f"/v1/admin/webhooks/{sid}/replay", 400,
                           json={"from": "2020-01-01T00:00:00Z", "max_events": 1})  # fmt: skip
    assert "max_events" in too_many["message"]


def test_tenant_isolation(hooks: Api, receiver: Receiver) -> None:
    acme = tenant_key(hooks, "acme")
    other = tenant_key(hooks, "globex")
    hooks.budget("acme", "tenant:acme", 1_000)
    hooks.budget("globex", "tenant:globex", 1_000)
    created = subscribe(hooks, other, receiver.url())
    sid = created["subscription"]["subscription_id"]
    # acme cannot see, change or test globex's subscription
    for method, path in [("GET", f"/v1/webhooks/{sid}"), ("PATCH", f"/v1/webhooks/{sid}"),
                         ("DELETE", f"/v1/webhooks/{sid}"), ("POST", f"/v1/webhooks/{sid}/test"),
                         ("GET", f"/v1/webhooks/{sid}/deliveries")]:  # fmt: skip
        kwargs: dict[str, Any] = {"json": {}} if method == "PATCH" else {}
        response = hooks.client.request(method, path, headers={"X-Cycles-API-Key": acme}, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
    assert (
        hooks.client.get("/v1/webhooks", headers={"X-Cycles-API-Key": acme}).json()["subscriptions"]
        == []
    )
    # nor subscribe to admin-only events
    bad = subscribe(hooks, acme, receiver.url(), expect=400, event_types=["api_key.created"])
    assert "admin-only" in bad["message"]
    subscribe(hooks, acme, receiver.url(), expect=400, event_categories=["system"])
    # globex's subscription never receives acme's events
    reserve(hooks, acme, "a", 900)
    dispatch(hooks, 2)
    assert receiver.requests == []


def test_subscription_thresholds_are_recorded_and_filtered(hooks: Api, receiver: Receiver) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    subscribe(hooks, key, receiver.url(), thresholds={"budget_utilization": [0.5]},
              event_types=["budget.threshold_crossed"])  # fmt: skip
    reserve(hooks, key, "a", 600)  # crosses 0.5 only
    reserve(hooks, key, "b", 250)  # crosses 0.8 (recorded, not this subscription's)
    dispatch(hooks, 3)
    assert crossings(receiver) == [("budget.threshold_crossed", 0.5, "rising")]


def test_lifecycle_events_pause_resume_rotate_delete(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    created = subscribe(hooks, key, receiver.url())
    sid = created["subscription"]["subscription_id"]
    old = created["signing_secret"]
    headers = {"X-Cycles-API-Key": key}
    patch = f"/v1/webhooks/{sid}"
    paused = hooks.client.request("PATCH", patch, json={"status": "PAUSED"}, headers=headers)
    assert paused.json()["status"] == "PAUSED"
    hooks.client.request("PATCH", patch, json={"status": "ACTIVE"}, headers=headers)
    rotated = hooks.client.post(f"/v1/webhooks/{sid}/rotate-secret", json={}, headers=headers)
    new = rotated.json()["signing_secret"]
    assert new != old
    test = valid(
        "WebhookTestResponse", hooks.client.post(f"/v1/webhooks/{sid}/test", headers=headers).json()
    )
    assert test["success"] is True
    assert test["response_status"] == 200
    hdrs, body = receiver.requests[-1]
    assert receiver.events()[-1]["event_type"] == "system.webhook_test"
    now = clock.now_ms / 1000
    verify_delivery(body, hdrs, [old], now=now)  # both secrets sign during the overlap
    verify_delivery(body, hdrs, [new], now=now)
    assert hooks.client.request("DELETE", patch, headers=headers).status_code == 204
    events = hooks.admin("GET", "/v1/admin/events", 200,
                         params={"tenant_id": "acme", "category": "webhook"})["events"]  # fmt: skip
    kinds = [e["event_type"] for e in reversed(events)]
    assert kinds == ["webhook.created", "webhook.paused", "webhook.resumed", "webhook.updated",
                     "webhook.deleted"]  # fmt: skip


def test_bulk_action(hooks: Api, receiver: Receiver) -> None:
    key = tenant_key(hooks)
    for _ in range(3):
        subscribe(hooks, key, receiver.url())
    body = {"filter": {"tenant_id": "acme"}, "action": "PAUSE", "idempotency_key": "k1",
            "expected_count": 3}  # fmt: skip
    valid("WebhookBulkActionRequest", body)
    preview = hooks.client.post("/v1/admin/webhooks/bulk-action", params={"dry_run": "true"},
                                json=body, headers=hooks.admin_headers)  # fmt: skip
    assert preview.headers["X-Cycles-Dry-Run"] == "true"
    assert len(valid("WebhookBulkActionResponse", preview.json())["succeeded"]) == 3
    assert (
        hooks.admin("GET", "/v1/admin/webhooks", 200, params={"status": "PAUSED"})["subscriptions"]
        == []
    )  # the preview changed nothing
    out = hooks.admin("POST", "/v1/admin/webhooks/bulk-action", 200, json=body)
    valid("WebhookBulkActionResponse", out)
    assert out["total_matched"] == 3
    assert len(out["succeeded"]) == 3
    again = hooks.admin("POST", "/v1/admin/webhooks/bulk-action", 200, json=body)
    assert again == out
    mismatch = {**body, "idempotency_key": "k2", "expected_count": 2}
    hooks.admin("POST", "/v1/admin/webhooks/bulk-action", 409, json=mismatch)
    listed = hooks.admin("GET", "/v1/admin/webhooks", 200, params={"status": "PAUSED"})
    assert len(listed["subscriptions"]) == 3


def test_a_late_event_inside_the_lag_window_is_delivered(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    subscribe(hooks, key, receiver.url())
    clock.advance(3_000)
    dispatch(hooks)  # the cursor moves to now
    clock.now_ms -= 2_000  # another process's clock, 2 s behind, writes an event now
    reserve(hooks, key, "a", 800)
    clock.now_ms += 2_000
    dispatch(hooks, 2)
    assert crossings(receiver) == [("budget.threshold_crossed", 0.8, "rising")]
    dispatch(hooks, 2)  # re-reading the window queues nothing twice
    assert len(receiver.requests) == 1


def test_a_lease_makes_one_dispatcher_send_and_an_expired_one_is_taken_over(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    app = hooks.client._client._transport.app  # type: ignore[attr-defined]
    first = app.state.webhook_dispatcher
    second = Dispatcher(first.store, first.storage, resolver=first.sender.resolver)
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    subscribe(hooks, key, receiver.url())
    reserve(hooks, key, "a", 800)
    run = hooks.client.run
    run(first.follow(list(run(first._subs()))))
    assert len(run(first.claim())) == 1  # first takes it, then "dies" before sending
    assert run(second.claim()) == []  # leased: second does not send it too
    clock.advance(first.lease_ms + 1)
    ((sub, row),) = run(second.claim())  # the lease ran out: second takes it over
    assert row.attempts == 2
    run(second._deliver(sub, row))
    assert len(receiver.requests) == 1
    page = hooks.admin("GET", f"/v1/admin/webhooks/{sub.subscription_id}/deliveries", 200)
    assert page["deliveries"][0]["status"] == "SUCCESS"
    run(second.close())


def test_admin_on_the_tenant_plane(hooks: Api, receiver: Receiver) -> None:
    key = tenant_key(hooks)
    sid = subscribe(hooks, key, receiver.url())["subscription"]["subscription_id"]
    missing = hooks.admin("GET", "/v1/webhooks", 400)
    assert "tenant query parameter is required" in missing["message"]
    listed = hooks.admin("GET", "/v1/webhooks", 200, params={"tenant": "acme"})
    assert [s["subscription_id"] for s in listed["subscriptions"]] == [sid]
    hooks.admin("PATCH", f"/v1/webhooks/{sid}", 400, json={"url": None})
    bad = hooks.admin("PATCH", f"/v1/webhooks/{sid}", 400, json={"event_types": []})
    assert "at least one selector" in bad["message"]
    hooks.admin("PATCH", f"/v1/webhooks/{sid}", 200, json={"status": "PAUSED"})
    params = {"tenant_id": "acme", "event_type": "webhook.paused"}
    (paused,) = hooks.admin("GET", "/v1/admin/events", 200, params=params)["events"]
    assert paused["actor"]["type"] == "admin_on_behalf_of"
    assert paused["data"]["previous_status"] == "ACTIVE"
    # a key without webhooks:write cannot create
    agent = hooks.tenant("globex")
    body = {"url": receiver.url(), "event_types": ["budget.exhausted"]}
    response = hooks.client.post("/v1/webhooks", json=body, headers={"X-Cycles-API-Key": agent})
    assert response.status_code == 403


def test_finished_deliveries_are_purged_after_the_retention(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    sid = subscribe(hooks, key, receiver.url())["subscription"]["subscription_id"]
    reserve(hooks, key, "a", 800)
    dispatch(hooks, 2)
    path = f"/v1/admin/webhooks/{sid}/deliveries"
    assert len(hooks.admin("GET", path, 200)["deliveries"]) == 1
    clock.advance(8 * 86_400_000)  # past the 7-day retention (and the purge interval)
    dispatch(hooks)
    assert hooks.admin("GET", path, 200)["deliveries"] == []


def test_https_delivery_is_pinned_with_the_hostname_as_sni_and_host(
    make_api: Callable[..., Api], dns: Dns, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=hooks.example",
         "-addext", "subjectAltName=DNS:hooks.example"],
        check=True, capture_output=True,
    )  # fmt: skip
    seen_sni: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    receiver = Receiver()
    receiver.server.socket = server_ctx.wrap_socket(receiver.server.socket, server_side=True)
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        options = WebhookOptions(
            resolver=dns, transport=httpx.AsyncHTTPTransport(verify=client_ctx)
        )
        api = make_api(webhook_options=options)
        config = {"blocked_cidr_ranges": ["10.0.0.0/8"]}  # https only (the default)
        api.admin("PUT", "/v1/admin/config/webhook-security", 200, json=config)
        key_secret = tenant_key(api)
        api.budget("acme", "tenant:acme", 1_000)
        url = f"https://hooks.example:{receiver.port}/hook"
        sid = subscribe(api, key_secret, url)["subscription"]["subscription_id"]
        reserve(api, key_secret, "a", 800)
        dispatch(api, 2)
        page = api.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries", 200)
        assert page["deliveries"][0]["status"] == "SUCCESS", page
        assert seen_sni == ["hooks.example"]
        assert receiver.requests[0][0]["host"] == f"hooks.example:{receiver.port}"
    finally:
        receiver.close()


def test_a_delivery_older_than_a_day_is_given_up(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    policy = {"max_retries": 10, "initial_delay_ms": 60_000, "max_delay_ms": 3_600_000}
    sid = subscribe(hooks, key, receiver.url(), retry_policy=policy)["subscription"][
        "subscription_id"
    ]
    receiver.default = 503
    reserve(hooks, key, "a", 800)
    dispatch(hooks, 2)
    (retrying,) = hooks.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries", 200)["deliveries"]
    assert retrying["status"] == "RETRYING"
    assert "next_retry_at" in retrying
    clock.advance(86_400_000 + 1)
    dispatch(hooks, 2)
    (given_up,) = hooks.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries", 200)["deliveries"]
    assert given_up["status"] == "FAILED"
    assert "older than" in given_up["error_message"]
    assert len(receiver.requests) == 1  # not sent again once too old


def test_the_old_secret_retires_when_its_window_ends_or_on_demand(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    created = subscribe(hooks, key, receiver.url())
    sid, old = created["subscription"]["subscription_id"], created["signing_secret"]
    headers = {"X-Cycles-API-Key": key}
    body = {"signing_secret": "whsec_new_secret_0123456789", "previous_secret_ttl_s": 60}
    hooks.client.post(f"/v1/webhooks/{sid}/rotate-secret", json=body, headers=headers)

    def signatures() -> int:
        hooks.client.post(f"/v1/webhooks/{sid}/test", headers=headers)
        return receiver.requests[-1][0]["x-cycles-signature-256"].count("v1=")

    assert signatures() == 2
    clock.advance(61_000)
    assert signatures() == 1  # the window ended
    hooks.client.post(f"/v1/webhooks/{sid}/rotate-secret", json={}, headers=headers)
    assert signatures() == 2
    newer = "whsec_newer_secret_012345678"
    again = {"signing_secret": newer, "previous_secret_ttl_s": 0}
    hooks.client.post(f"/v1/webhooks/{sid}/rotate-secret", json=again, headers=headers)
    assert signatures() == 1  # retired at once
    hdrs, raw = receiver.requests[-1]
    verify_delivery(raw, hdrs, [newer], now=clock.now_ms / 1000)
    with pytest.raises(WebhookVerificationError):
        verify_delivery(raw, hdrs, [old], now=clock.now_ms / 1000)


def test_listings_page_and_refuse_a_forged_cursor(hooks: Api, receiver: Receiver) -> None:
    key = tenant_key(hooks)
    made = [subscribe(hooks, key, receiver.url())["subscription"]["subscription_id"]
            for _ in range(3)]  # fmt: skip
    first = hooks.admin("GET", "/v1/admin/webhooks", 200, params={"limit": 2})
    assert first["has_more"] is True
    second = hooks.admin(
        "GET", "/v1/admin/webhooks", 200, params={"limit": 2, "cursor": first["next_cursor"]}
    )
    assert second["has_more"] is False
    got = [s["subscription_id"] for s in first["subscriptions"] + second["subscriptions"]]
    assert sorted(got) == sorted(made)
    for path in ("/v1/admin/webhooks", f"/v1/admin/webhooks/{made[0]}/deliveries"):
        for forged in ("nonsense", "WyJhIl0", "WyJhIiwgMV0"):  # junk, ["a"], ["a", 1]
            body = hooks.admin("GET", path, 400, params={"cursor": forged})
            assert body["error"] == "INVALID_REQUEST"


# --------------------------------------------------------------------------------------------
# The tenant-close cascade (spec CASCADE SEMANTICS, Rules 1 and 2)


def test_closing_a_tenant_disables_its_subscriptions_with_one_event_each(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    own = subscribe(hooks, key, receiver.url(), name="ops",
                    event_types=["tenant.closed", "budget.exhausted"])  # fmt: skip
    own_id = own["subscription"]["subscription_id"]
    paused_id = subscribe(hooks, key, receiver.url())["subscription"]["subscription_id"]
    hooks.admin("PATCH", f"/v1/admin/webhooks/{paused_id}", 200, json={"status": "PAUSED"})
    beta = tenant_key(hooks, "beta")
    beta_id = subscribe(hooks, beta, receiver.url())["subscription"]["subscription_id"]
    watcher = Receiver()
    try:
        body = {"url": watcher.url(), "event_types": ["tenant.closed", CASCADE]}
        system = hooks.admin("POST", "/v1/admin/webhooks", 201, json=body)
        system_id = system["subscription"]["subscription_id"]
        dispatch(hooks, 2)
        # suspension is reversible: the subscriptions stay as they are
        hooks.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "SUSPENDED"})
        dispatch(hooks, 2)
        assert status_of(hooks, own_id) == "ACTIVE"
        hooks.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
        # Rule 2 holds from the close on, before the cascade has run
        refused = hooks.client.request("PATCH", f"/v1/admin/webhooks/{own_id}",
                                       json={"name": "x"}, headers=hooks.admin_headers)  # fmt: skip
        assert refused.status_code == 409, refused.text
        assert valid("ErrorResponse", refused.json())["error"] == "TENANT_CLOSED"
        dispatch(hooks, 3)
        assert status_of(hooks, own_id) == status_of(hooks, paused_id) == "DISABLED"
        assert status_of(hooks, beta_id) == status_of(hooks, system_id) == "ACTIVE"
        found = events_of(hooks, "acme", CASCADE)
        (close_event,) = events_of(hooks, "acme", "tenant.closed")
        assert len(found) == 2
        by_sub = {e["data"]["subscription_id"]: e for e in found}
        for event in found:
            valid("Event", event)
            valid("EventDataTenantCascade", event["data"])
            assert event["category"] == "webhook"
            assert (
                event["correlation_id"] == f"tenant_close_cascade:acme:{close_event['request_id']}"
            )
            assert event["request_id"] == close_event["request_id"]
            assert event["actor"]["type"] == close_event["actor"]["type"] == "admin"
        assert by_sub[own_id]["data"] == {
            "subscription_id": own_id, "name": "ops", "prior_status": "ACTIVE",
            "new_status": "DISABLED", "cascade_reason": "tenant_closed",
        }  # fmt: skip
        assert by_sub[paused_id]["data"]["prior_status"] == "PAUSED"
        # the closed tenant's own subscription received nothing after the close; the
        # system-wide one received the close and both cascade events
        assert [e["event_type"] for e in receiver.events()] == []
        assert sorted(e["event_type"] for e in watcher.events()) == [
            "tenant.closed",
            CASCADE,
            CASCADE,
        ]
        # DISABLED is terminal for a closed tenant: no re-enable, test, replay, delete, bulk
        for method, path, payload in [
            ("PATCH", f"/v1/admin/webhooks/{own_id}", {"status": "ACTIVE"}),
            ("POST", f"/v1/admin/webhooks/{own_id}/test", None),
            ("POST", f"/v1/admin/webhooks/{own_id}/replay", {"from": "2020-01-01T00:00:00Z"}),
            ("DELETE", f"/v1/admin/webhooks/{own_id}", None),
        ]:
            answer = hooks.client.request(method, path, json=payload, headers=hooks.admin_headers)
            assert answer.status_code == 409, (method, path, answer.text)
            assert answer.json()["error"] == "TENANT_CLOSED"
        bulk = {"filter": {"tenant_id": "acme"}, "action": "RESUME", "idempotency_key": "b1"}
        answered = hooks.admin("POST", "/v1/admin/webhooks/bulk-action", 200, json=bulk)
        out = valid("WebhookBulkActionResponse", answered)
        assert {f["error_code"] for f in out["failed"]} == {"TENANT_CLOSED"}
        assert hooks.client.get(f"/v1/admin/webhooks/{own_id}",
                                headers=hooks.admin_headers).status_code == 200  # fmt: skip
        # running the cascade again (the periodic check) records nothing twice
        clock.advance(31_000)
        dispatch(hooks, 2)
        assert len(events_of(hooks, "acme", CASCADE)) == 2
    finally:
        watcher.close()


def test_a_close_the_dispatcher_did_not_follow_is_cascaded_by_the_periodic_check(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    """A tenant with only a PAUSED subscription is not followed: the periodic check finds it."""
    key = tenant_key(hooks)
    sid = subscribe(hooks, key, receiver.url())["subscription"]["subscription_id"]
    hooks.admin("PATCH", f"/v1/admin/webhooks/{sid}", 200, json={"status": "PAUSED"})
    dispatch(hooks)  # the first round checks every tenant once
    hooks.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"status": "CLOSED"})
    dispatch(hooks)
    assert status_of(hooks, sid) == "PAUSED"  # not yet: checked every 30 s
    clock.advance(30_000)
    dispatch(hooks)
    assert status_of(hooks, sid) == "DISABLED"
    found = events_of(hooks, "acme", CASCADE)
    assert [e["data"]["prior_status"] for e in found] == ["PAUSED"]
    create = {"url": receiver.url(), "event_types": ["budget.exhausted"]}
    refused = hooks.client.post("/v1/admin/webhooks", params={"tenant_id": "acme"}, json=create,
                                headers=hooks.admin_headers)  # fmt: skip
    assert refused.status_code == 409
    assert refused.json()["error"] == "TENANT_CLOSED"


CASCADE = "webhook.disabled_via_tenant_cascade"


def status_of(api: Api, subscription_id: str) -> str:
    return str(api.admin("GET", f"/v1/admin/webhooks/{subscription_id}", 200)["status"])


def events_of(api: Api, tenant: str, event_type: str) -> list[dict[str, Any]]:
    params = {"tenant_id": tenant, "event_type": event_type}
    body = valid("EventListResponse", api.admin("GET", "/v1/admin/events", 200, params=params))
    return list(body["events"])


# --------------------------------------------------------------------------------------------
# Secrets and header values sealed at rest


def stored_bytes(api: Api, store: Store) -> bytes:
    """Everything the store holds for webhooks, as bytes (files, rows, keys)."""
    if isinstance(store, SqliteStore):
        rows = store.connection.execute("SELECT body FROM webhook_subscriptions").fetchall()
        files = [Path(store.path), Path(store.path + "-wal")]
        return b"".join(bytes(r[0]) for r in rows) + b"".join(
            f.read_bytes() for f in files if f.exists()
        )
    if isinstance(store, MemoryStore):
        return b"".join(storage_for(store).subs.values())  # type: ignore[attr-defined]

    async def dump() -> bytes:
        client = store.client  # type: ignore[attr-defined]
        keys = [k async for k in client.scan_iter(match=f"{store.key_prefix()}*")]  # type: ignore[attr-defined]
        values = []
        for k in keys:  # uncompressed values (a DUMP may compress them)
            kind = await client.type(k)
            if kind == b"string":
                values.append(await client.get(k))
            elif kind == b"hash":
                values += [b for pair in (await client.hgetall(k)).items() for b in pair]
            else:
                values.append(await client.dump(k))
        return b"".join(v for v in values if v)

    return bytes(api.client.run(dump()))


def test_secrets_and_header_values_are_sealed_at_rest(
    hooks: Api, receiver: Receiver, store: Store, clock: FakeClock
) -> None:
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    secret = "whsec_" + "s3cr3t-signing-value-0123456789"
    token = "Bearer receiver-credential-abcdef0123456789"
    created = subscribe(hooks, key, receiver.url(), signing_secret=secret,
                        headers={"Authorization": token})  # fmt: skip
    sid = created["subscription"]["subscription_id"]
    rotated = hooks.admin("POST", f"/v1/admin/webhooks/{sid}/rotate-secret", 200, json={})
    new_secret = rotated["signing_secret"]
    raw = stored_bytes(hooks, store)
    assert sid.encode() in raw  # the rows are there...
    for value in (secret, new_secret, token, "receiver-credential"):
        assert value.encode() not in raw  # ...their secrets are not
    assert b"sealed:v1:" in raw
    reserve(hooks, key, "a", 800)
    dispatch(hooks, 3)
    ((headers, body),) = receiver.requests
    assert headers["authorization"] == token  # opened for the delivery
    now = clock.now_ms / 1000
    verify_delivery(body, headers, [secret], now=now)  # both live secrets sign
    verify_delivery(body, headers, [new_secret], now=now)


def test_rows_stored_plain_keep_working_and_are_sealed_on_the_first_round(
    make_api: Callable[..., Api], dns: Dns, receiver: Receiver, store: Store, clock: FakeClock
) -> None:
    """A server without a key (an earlier version) stored plain values; given a key (as the
    next version's start does, before its dispatcher's first round), it reads them, delivers
    with them and seals them."""
    before = relaxed(make_api(webhook_options=WebhookOptions(resolver=dns)))
    key = tenant_key(before)
    before.budget("acme", "tenant:acme", 1_000)
    token = "Bearer plain-credential-0123456789"
    created = subscribe(before, key, receiver.url(), headers={"Authorization": token})
    secret = created["signing_secret"]
    assert secret.encode() in stored_bytes(before, store)
    storage_for(store).box = SecretBox.generate()  # one app: a store's connections, one loop
    after = before
    reserve(after, key, "a", 800)
    dispatch(after, 3)
    ((headers, body),) = receiver.requests
    assert headers["authorization"] == token
    verify_delivery(body, headers, [secret], now=clock.now_ms / 1000)
    sealed = stored_bytes(after, store)
    if isinstance(store, SqliteStore):  # the file keeps freed pages until reused or VACUUM
        rows = store.connection.execute("SELECT body FROM webhook_subscriptions").fetchall()
        sealed = b"".join(bytes(r[0]) for r in rows)
    assert secret.encode() not in sealed
    assert token.encode() not in sealed
    storage = storage_for(store)
    assert storage.box is not None

    async def subs(t: WebhookTxn) -> list[SubscriptionRow]:
        return await t.subs()

    async def read() -> list[SubscriptionRow]:
        return await storage.read(subs)

    (row,) = after.client.run(read())
    assert not row.stored_plain  # read back sealed
    assert row.live_secrets(clock.now_ms) == [secret]


# --------------------------------------------------------------------------------------------
# Per-subscription detector thresholds


def tick_monitor(api: Api) -> list[str]:
    app = api.client._client._transport.app  # type: ignore[attr-defined]
    return [e.event_type for e in api.client.run(app.state.monitor.tick())]


def test_each_subscription_gets_the_rate_spikes_of_its_own_threshold(
    hooks: Api, receiver: Receiver, clock: FakeClock
) -> None:
    """The server judges denials at 10 %; one subscription asks for 5 %. At 7 % only it hears
    of a spike; at 15 % the other one does too, and the first is not told twice."""
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 10_000_000)
    hooks.budget("acme", "tenant:acme/agent:bot", 100)
    strict = Receiver()
    try:
        kinds = ["reservation.denial_rate_spike"]
        subscribe(hooks, key, strict.url(), event_types=kinds,
                  thresholds={"denial_rate_threshold": 0.05})  # fmt: skip
        subscribe(hooks, key, receiver.url(), event_types=kinds)

        def burst(prefix: str, allowed: int, denied: int) -> None:
            for i in range(allowed):
                assert reserve(hooks, key, f"{prefix}ok{i}", 1, agent="x")["decision"] == "ALLOW"
            for i in range(denied):
                assert reserve(hooks, key, f"{prefix}no{i}", 1_000)["error"] == "BUDGET_EXCEEDED"

        burst("a", 93, 7)  # 7 % denied
        assert tick_monitor(hooks) == ["reservation.denied", "reservation.denial_rate_spike"]
        dispatch(hooks, 3)
        assert [e["data"]["ratio_threshold"] for e in strict.events()] == [0.05]
        assert receiver.events() == []
        clock.advance(5_000)
        burst("b", 0, 10)  # 17 of 110: 15 %
        assert "reservation.denial_rate_spike" in tick_monitor(hooks)
        dispatch(hooks, 3)
        (spike,) = receiver.events()
        assert spike["data"]["ratio_threshold"] == 0.10
        assert spike["data"]["ratio"] > 0.15
        assert len(strict.events()) == 1  # its own spike still holds: once
        clock.advance(5_000)
        assert "reservation.denial_rate_spike" not in tick_monitor(hooks)
        spikes = events_of(hooks, "acme", "reservation.denial_rate_spike")
        assert sorted(e["data"]["ratio_threshold"] for e in spikes) == [0.05, 0.10]
    finally:
        strict.close()


def test_a_server_with_another_key_says_so_without_a_traceback(
    hooks: Api, receiver: Receiver, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    key = tenant_key(hooks)
    sid = subscribe(hooks, key, receiver.url())["subscription"]["subscription_id"]
    wrong = SecretBox.generate()
    storage_for(store).box = wrong  # as a server started with another key file would be
    response = hooks.client.get("/v1/admin/webhooks", headers=hooks.admin_headers)
    assert response.status_code == 500
    body = valid("ErrorResponse", response.json())
    assert body["error"] == "INTERNAL_ERROR"
    assert "webhook key" in body["message"]
    dispatcher = hooks.client.app.state.webhook_dispatcher
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # rounds of the dispatcher's loop: each fails to open the secrets
            assert hooks.client.run(dispatcher.run_round()) == 0
    lines = [r for r in caplog.records if "cannot be opened" in r.getMessage()
             or "dispatch stopped" in r.getMessage()]  # fmt: skip
    assert all(r.exc_info is None for r in lines)
    stopped = [r for r in lines if "dispatch stopped" in r.getMessage()]
    assert len(stopped) == 1
    assert sid in stopped[0].getMessage()
    assert wrong.active in stopped[0].getMessage()


def test_stop_lets_the_round_in_progress_finish(hooks: Api, receiver: Receiver) -> None:
    """A shutdown stops the dispatcher after its round, never in the middle of one."""
    app = hooks.client._client._transport.app  # type: ignore[attr-defined]
    dispatcher = app.state.webhook_dispatcher
    key = tenant_key(hooks)
    hooks.budget("acme", "tenant:acme", 1_000)
    subscribe(hooks, key, receiver.url())
    reserve(hooks, key, "a", 800)  # crosses 80 %
    original = dispatcher.run_once

    async def scenario() -> asyncio.Task[None]:
        started = asyncio.Event()

        async def slow_round() -> int:
            started.set()
            await asyncio.sleep(0.2)  # the round is still running when stop() comes
            return int(await original())

        dispatcher.run_once = slow_round
        task = asyncio.create_task(dispatcher.run())
        await started.wait()
        dispatcher.stop()
        await asyncio.wait_for(asyncio.shield(task), 10)  # it returns by itself
        return task

    task = hooks.client.run(scenario())
    assert task.done()
    assert not task.cancelled()
    assert [e["event_type"] for e in receiver.events()] == ["budget.threshold_crossed"]
