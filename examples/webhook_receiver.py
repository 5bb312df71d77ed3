"""A webhook receiver with Starlette: verify, deduplicate, and alert on budget thresholds.

Every Cycles webhook delivery is signed. The receiver checks the signature and its age with
``runcycles.verify_delivery``, refuses a replayed request, answers a redelivery of an event
it already handled with 200 (so the sender stops retrying) without handling it twice, and
turns ``budget.threshold_crossed`` / ``budget.exhausted`` into alert lines.

Offline it plays the sender too: it serves the receiver with uvicorn on a free loopback
port and posts deliveries signed the way a Cycles server signs them
(``runcycles.sign_delivery``), including a retry, a replay captured ten minutes ago, a
tampered body and a handler failure. Run it with ``CYCLES_WEBHOOK_SECRET`` set to use your
subscription's signing secret.
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
    WebhookPayloadError,
    WebhookReplayError,
    WebhookVerificationError,
    sign_delivery,
    verify_delivery,
)

SECRET = os.environ.get("CYCLES_WEBHOOK_SECRET", "whsec_example_only")
seen = InMemorySeenEventStore()  # one process; several need a shared store (e.g. Redis)
pager_up = threading.Event()  # the alert channel fails until set (shows the retry path)


def handle(event: Event) -> str:
    """Act on a verified event; raise to make the sender retry it later."""
    payload = event.payload
    if event.event_type == EventType.BUDGET_EXHAUSTED and not pager_up.is_set():
        pager_up.set()
        raise RuntimeError("pager unreachable")
    if isinstance(payload, EventDataBudgetThreshold):
        used = f"{payload.utilization or 0:.0%}"
        if event.event_type == EventType.BUDGET_EXHAUSTED:
            return f"PAGE: {payload.scope} exhausted its {payload.unit} budget ({used} used)"
        return (
            f"alert: {payload.scope} at {used} of its {payload.unit} budget "
            f"(crossed {payload.threshold or 0:.0%}, {payload.direction})"
        )
    return f"ignored {event.event_type}"


async def receive(request: Request) -> JSONResponse:
    body = await request.body()  # the raw bytes: the signature covers them exactly
    try:
        event = verify_delivery(body, request.headers, [SECRET], seen=seen)
    except WebhookReplayError:
        return JSONResponse({"status": "duplicate, already handled"})
    except WebhookPayloadError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    except WebhookVerificationError as error:
        return JSONResponse({"error": str(error)}, status_code=401)
    try:
        outcome = handle(event)
    except Exception as error:  # any failure: let the sender retry
        seen.discard(event.event_id)  # or the retry would be refused as a duplicate
        return JSONResponse({"error": f"handler failed: {error}"}, status_code=500)
    return JSONResponse({"status": outcome})


app = Starlette(routes=[Route("/cycles/webhooks", receive, methods=["POST"])])


def threshold_event(event_type: str, utilization: float, threshold: float) -> Event:
    return Event.new(
        event_type,
        tenant_id="acme",
        source="cycles-server",
        scope="tenant:acme/workspace:prod",
        data=EventDataBudgetThreshold(
            scope="tenant:acme/workspace:prod",
            unit="USD_MICROCENTS",
            threshold=threshold,
            utilization=utilization,
            allocated=10_000_000,
            remaining=int(10_000_000 * (1 - utilization)),
            direction="rising",
        ),
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


def deliver(url: str, event: Event, *, body: bytes | None = None, age_s: int = 0) -> None:
    """POST one delivery as a Cycles server would (signed at ``now - age_s``)."""
    signed = event.encode()
    headers = sign_delivery(
        signed,
        [SECRET],
        event_id=event.event_id,
        event_type=event.event_type,
        timestamp=int(time.time()) - age_s,
        trace_id=event.trace_id,
    )
    answer = httpx.post(url, content=body if body is not None else signed, headers=headers)
    print(f"  -> {answer.status_code} {answer.json()}")


def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cycles/webhooks"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        crossed = threshold_event(EventType.BUDGET_THRESHOLD_CROSSED, 0.82, 0.80)
        print("1. budget crossed 80%:")
        deliver(url, crossed)
        print("2. the same event again (a retry after a lost 200):")
        deliver(url, crossed)
        print("3. a request captured 10 minutes ago, replayed:")
        deliver(url, threshold_event(EventType.BUDGET_THRESHOLD_CROSSED, 0.96, 0.95), age_s=600)
        print("4. a tampered body (utilization rewritten):")
        tampered = crossed.encode().replace(b'"utilization":0.82', b'"utilization":0.12')
        deliver(url, crossed, body=tampered)
        exhausted = threshold_event(EventType.BUDGET_EXHAUSTED, 1.0, 1.0)
        print("5. budget exhausted, but the pager is down:")
        deliver(url, exhausted)
        print("6. the sender retries it:")
        deliver(url, exhausted)
    finally:
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
