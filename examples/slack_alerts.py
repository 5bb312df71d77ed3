"""Budget alerts in Slack: a Cycles webhook subscription and a Slack-style receiver.

A real Cycles server (started here, SQLite in a temporary folder) sends a signed webhook
delivery when a budget crosses 80 % and 95 % and when it is exhausted. The receiver (Starlette,
on a loopback port) verifies each delivery with ``runcycles.verify_delivery``, deduplicates it
by event id and turns it into a Slack message (``{"text": ...}``, what a Slack incoming
webhook takes). With ``SLACK_WEBHOOK_URL`` set it posts the message there; otherwise it prints
it.

The operator side is three admin calls: allow plain http to 127.0.0.1 (development only: by
default webhook URLs must be https and may not point at private or loopback addresses),
create the subscription for the tenant (its signing secret is answered once), and fund the
budget. Then an agent spends and the alerts arrive.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runcycles import (
    Event,
    EventDataBudgetThreshold,
    EventType,
    InMemorySeenEventStore,
    WebhookReplayError,
    WebhookVerificationError,
    verify_delivery,
)
from runcycles_server.testing import ServerProcess

SLACK_WEBHOOK_URL = os.environ.get("SLACK_WEBHOOK_URL")
secrets: list[str] = []  # the subscription's signing secret, once it is created
seen = InMemorySeenEventStore()
posted: list[str] = []


def slack_text(event: Event) -> str:
    """The Slack message for one budget event."""
    data = event.payload
    if not isinstance(data, EventDataBudgetThreshold):
        return f":information_source: {event.event_type} for {event.tenant_id}"
    used = f"{data.utilization or 0:.0%}"
    if event.event_type == EventType.BUDGET_EXHAUSTED:
        return f":rotating_light: *{data.scope}* is out of budget ({used} used)"
    icon = ":warning:" if (data.threshold or 0) < 0.95 else ":fire:"
    return f"{icon} *{data.scope}* crossed {data.threshold or 0:.0%} of its budget ({used} used)"


async def receive(request: Request) -> JSONResponse:
    body = await request.body()  # the raw bytes: the signature covers them exactly
    try:
        event = verify_delivery(body, request.headers, secrets, seen=seen)
    except WebhookReplayError:
        return JSONResponse({"status": "duplicate"})  # 200: the sender stops retrying
    except WebhookVerificationError as error:
        return JSONResponse({"error": str(error)}, status_code=401)
    message = {"text": slack_text(event)}
    if SLACK_WEBHOOK_URL:
        async with httpx.AsyncClient(timeout=5) as slack:
            (await slack.post(SLACK_WEBHOOK_URL, json=message)).raise_for_status()
    print(f"slack <- {message['text']}")
    posted.append(message["text"])
    return JSONResponse({"status": "posted"})


def start_receiver() -> tuple[str, uvicorn.Server, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cycles"
    app = Starlette(routes=[Route("/cycles", receive, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return url, server, thread


def spend(server: ServerProcess, api_key: str, key: str, amount: int) -> None:
    """Reserve ``amount`` and commit it, as an agent would around a model call."""
    headers = {"X-Cycles-API-Key": api_key}
    reservation = httpx.post(
        f"{server.base_url}/v1/reservations",
        headers=headers,
        json={
            "idempotency_key": key,
            "subject": {"tenant": "acme", "agent": "support"},
            "action": {"kind": "llm.completion", "name": "gpt-4o"},
            "estimate": {"unit": "USD_MICROCENTS", "amount": amount},
        },
    ).json()
    httpx.post(
        f"{server.base_url}/v1/reservations/{reservation['reservation_id']}/commit",
        headers=headers,
        json={
            "idempotency_key": f"{key}-c",
            "actual": {"unit": "USD_MICROCENTS", "amount": amount},
        },
    )


def main() -> None:
    url, receiver, thread = start_receiver()
    try:
        with ServerProcess.start("sqlite", extra_args=["--webhook-poll", "0.2"]) as server:
            server.admin(  # development only: allow http to a loopback receiver
                "PUT",
                "/v1/admin/config/webhook-security",
                json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]},
            )
            tenant = server.provision(tenant_id="acme", budget=10_000_000)
            created = server.admin(
                "POST",
                "/v1/admin/webhooks",
                params={"tenant_id": "acme"},
                json={
                    "url": url,
                    "name": "slack budget alerts",
                    "event_types": ["budget.threshold_crossed", "budget.exhausted"],
                    "thresholds": {"budget_utilization": [0.8, 0.95]},
                },
            )
            secrets.append(created["signing_secret"])
            print(f"subscribed {created['subscription']['subscription_id']} -> {url}")
            for step, amount in enumerate([5_000_000, 3_200_000, 1_400_000, 400_000], start=1):
                spend(server, tenant.api_key, f"call-{step}", amount)
            deadline = time.monotonic() + 20
            while len(posted) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            print(f"{len(posted)} alerts posted")
    finally:
        receiver.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
