"""Acceptance: a webhook dispatcher SIGKILLed mid-delivery loses no delivery; several
processes send each delivery once.

A real ``cycles serve`` process (SQLite, then Redis) delivers a threshold event to a real HTTP
receiver on 127.0.0.1 that holds the first request open. The server is SIGKILLed while the
request is in flight (claimed, not recorded), then started again on the same database / Redis
prefix: once the claim's lease (``--webhook-lease 1``) has run out the new process sends the
delivery again, the receiver gets the same event, and the delivery is recorded ``SUCCESS``.

Then three worker processes share one queue (SQLite file, Redis): 20 events, each delivered
exactly once to a slow receiver.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from runcycles_server.testing import ServerProcess

pytestmark = pytest.mark.slow

PERMS = ["reservations:create", "reservations:commit", "balances:read", "webhooks:read",
         "webhooks:write"]  # fmt: skip
FAST = ["--webhook-lease", "1", "--webhook-poll", "0.1"]


class HoldingReceiver:
    """Answers 200, except the first request, which it holds open until released."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.bodies.append(json.loads(body))
                if len(receiver.bodies) == 1:
                    receiver.first_arrived.set()
                    receiver.release.wait(30)
                try:
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender died while we held the request
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[HoldingReceiver]:
    found = HoldingReceiver()
    yield found
    found.close()


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_sigkill_mid_delivery_loses_nothing(store: str, receiver: HoldingReceiver) -> None:
    first = ServerProcess.start(store, extra_args=FAST)  # type: ignore[arg-type]
    second: ServerProcess | None = None
    try:
        first.admin(
            "PUT",
            "/v1/admin/config/webhook-security",
            json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
        )
        tenant = first.provision(budget=1_000, permissions=PERMS)
        headers = {"X-Cycles-API-Key": tenant.api_key}
        created = httpx.post(
            f"{first.base_url}/v1/webhooks",
            json={"url": receiver.url, "event_types": ["budget.threshold_crossed"]},
            headers=headers,
        )
        assert created.status_code == 201, created.text
        sid = created.json()["subscription"]["subscription_id"]
        reserve = {
            "idempotency_key": "r1",
            "subject": {"tenant": tenant.tenant_id},
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": "USD_MICROCENTS", "amount": 850},
        }
        answer = httpx.post(f"{first.base_url}/v1/reservations", json=reserve, headers=headers)
        assert answer.status_code == 200, answer.text
        assert receiver.first_arrived.wait(15), "the first delivery never arrived"
        first.kill()  # mid-delivery: claimed and in flight, not recorded
        receiver.release.set()
        second = ServerProcess.start(
            store,  # type: ignore[arg-type]
            db_path=first.workdir / "cycles.db" if store == "sqlite" else None,
            redis_url=first.redis_url,
            redis_prefix=first.redis_prefix,
            extra_args=FAST,
        )
        wait_for(lambda: len(receiver.bodies) >= 2, 20, "the delivery to be sent again")
        assert receiver.bodies[0]["event_id"] == receiver.bodies[1]["event_id"]
        assert receiver.bodies[1]["data"]["threshold"] == 0.8

        def recorded() -> bool:
            assert second is not None
            page = second.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries")
            return bool(page["deliveries"]) and page["deliveries"][0]["status"] == "SUCCESS"

        wait_for(recorded, 10, "the delivery to be recorded")
        (delivery,) = second.admin("GET", f"/v1/admin/webhooks/{sid}/deliveries")["deliveries"]
        assert delivery["attempts"] == 2
        time.sleep(1.5)  # nothing more is sent: exactly one redelivery
        assert len(receiver.bodies) == 2
    finally:
        if second is not None:
            second.stop()
        first.stop()


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_several_processes_send_each_delivery_once(store: str) -> None:
    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
            with lock:
                bodies.append(body)
            time.sleep(0.02)  # a slow receiver: claims overlap in time
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    # A lease far longer than any stall of a loaded machine: a delivery sent twice here can
    # only come from two processes claiming it at once (not from a lease that ran out, after
    # which sending it again is the at-least-once contract).
    steady = ["--webhook-lease", "20", "--webhook-poll", "0.1"]
    server = ServerProcess.start(store, workers=3, extra_args=steady)  # type: ignore[arg-type]
    try:
        server.admin(
            "PUT",
            "/v1/admin/config/webhook-security",
            json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
        )
        tenant = server.provision(budget=1_000)
        server.admin(
            "POST",
            "/v1/admin/webhooks",
            params={"tenant_id": tenant.tenant_id},
            json={
                "url": f"http://127.0.0.1:{http.server_address[1]}/hook",
                "event_types": ["budget.funded"],
            },
        )
        for i in range(20):  # 20 events, answered by whichever worker gets the request
            server.admin(
                "POST",
                "/v1/admin/budgets/fund",
                params={"scope": f"tenant:{tenant.tenant_id}", "unit": "USD_MICROCENTS",
                        "tenant_id": tenant.tenant_id},
                json={"operation": "CREDIT", "amount": {"unit": "USD_MICROCENTS", "amount": 1},
                      "idempotency_key": f"f{i}"},
            )  # fmt: skip
        wait_for(lambda: len(bodies) >= 20, 30, "20 deliveries")
        time.sleep(1.5)  # three more polls of each process: a double claim would show by now
        ids = [b["event_id"] for b in bodies]
        assert len(ids) == 20, f"{len(ids)} deliveries of {len(set(ids))} events"
        assert len(set(ids)) == 20
    finally:
        server.stop()
        http.shutdown()
        http.server_close()
