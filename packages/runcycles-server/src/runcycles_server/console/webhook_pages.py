"""The console's webhooks pages: subscriptions with their health, deliveries, and actions.

``/console/webhooks`` lists the subscriptions the session may see (every tenant's for the
admin key, its own tenant's for a tenant key with ``webhooks:read``) with their health;
``/console/webhooks/{id}`` adds the deliveries and, for the admin, the actions: send a test,
pause or resume, replay a window. Reads and actions go through :class:`~.backend.WebhookDesk`
(the webhook service itself, bound to the session's tenant); every action is a CSRF-checked
``POST`` and is audited by :class:`~runcycles_server.webhooks.actions.WebhookActions`.

The pages render with the console's own machinery (:class:`Pages`, which
:class:`~.pages.Console` provides), so they share its sessions, checks and templates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from runcycles_server.console.backend import ApiError, Backend, WebhookDesk
from runcycles_server.console.sessions import Session
from runcycles_server.console.web import CONSOLE_PATH, REASON_MAX, query_params, redirect
from runcycles_server.events.context import set_actor
from runcycles_server.webhooks.models import (
    DELIVERY_STATUSES,
    STATUSES,
    SubscriptionRow,
    delivery_body,
    subscription_body,
)

REPLAY_WINDOWS: Final = {
    "hour": ("the last hour", 3_600_000),
    "day": ("the last 24 hours", 24 * 3_600_000),
    "week": ("the last 7 days", 7 * 24 * 3_600_000),
}
"""The windows a replay from the page may resend (ending now)."""
REPLAY_MAX_EVENTS: Final = 1000
MAX_LISTED: Final = 500
"""Subscriptions one webhooks page shows (the rest: filter by tenant or status)."""
WEBHOOK_ACTIONS: Final = ("test", "replay", "pause", "resume")


class Pages(Protocol):
    """What the webhooks pages use of the console (:class:`~.pages.Console` provides it)."""

    clock: Callable[[], int]

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        """A page rendered with the console's common context and security headers."""
        ...  # fmt: skip

    def signed_in(self, request: Request) -> Session | Response:
        """The request's session, or the redirect to the sign-in page."""
        ...

    async def admin_action(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The session and form of an admin action (CSRF checked), or the refusal."""
        ...

    def forbidden(self, request: Request, session: Session | None, message: str) -> HTMLResponse:
        """A 403 page naming what is not allowed."""
        ...

    def api_error(self, request: Request, session: Session, exc: ApiError) -> HTMLResponse:
        """The page of a refused call, with its status and message."""
        ...

    def bad_request(self, request: Request, session: Session, message: str) -> HTMLResponse:
        """A 400 page naming what is wrong with the request."""
        ...


class WebhookPages:
    """The routes under ``/console/webhooks`` (mounted by the console)."""

    def __init__(self, pages: Pages) -> None:
        self.pages = pages

    def routes(self) -> list[BaseRoute]:
        """The webhooks routes, relative to the console's mount."""
        return [
            Route("/webhooks", self.webhooks, methods=["GET"]),
            Route("/webhooks/{subscription_id}", self.webhook, methods=["GET"]),
            Route("/webhooks/{subscription_id}/{action}", self.webhook_action, methods=["POST"]),
        ]

    async def webhook_desk(self, request: Request, session: Session) -> WebhookDesk | Response:
        """The session's webhook desk, once its key is checked again and may see webhooks.

        The key is asked of ``GET /v1/auth/introspect`` on every page (a key revoked since
        sign-in sees nothing more); a tenant key needs ``webhooks:read``.
        """
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                found = await api.get("/v1/auth/introspect")
            except ApiError as exc:
                return self.pages.api_error(request, session, exc)
        if not session.is_admin and not found.get("capabilities", {}).get("view_webhooks"):
            return self.pages.forbidden(
                request, session, "This tenant key lacks the webhooks:read permission."
            )
        return WebhookDesk.of(request, None if session.is_admin else session.tenant_id)

    async def webhooks(self, request: Request) -> Response:
        """Subscriptions with their health; a tenant key sees its own tenant's only."""
        session = self.pages.signed_in(request)
        if isinstance(session, Response):
            return session
        desk = await self.webhook_desk(request, session)
        if isinstance(desk, Response):
            return desk
        params = query_params(request, "tenant_id", "status", "health")
        if params.get("status", "ACTIVE") not in STATUSES:
            return self.pages.bad_request(
                request, session, f"status must be one of {', '.join(STATUSES)}"
            )
        if params.get("health", "failing") != "failing":
            return self.pages.bad_request(request, session, "health must be failing (or empty)")
        try:
            rows = await desk.subscriptions(params.get("tenant_id"), params.get("status"))
            if params.get("health") == "failing":
                rows = sorted(
                    (r for r in rows if r.consecutive_failures > 0),
                    key=lambda r: -r.consecutive_failures,
                )
            items = [await _subscription_view(desk, r) for r in rows[:MAX_LISTED]]
        except ApiError as exc:
            return self.pages.api_error(request, session, exc)
        return self.pages.render(
            request, "webhooks.html", session, subscriptions=items, params=params,
            statuses=STATUSES, hidden=max(0, len(rows) - MAX_LISTED),
        )  # fmt: skip

    async def webhook(self, request: Request) -> Response:
        """One subscription: health, deliveries (filter by status), test, replay, pause."""
        session = self.pages.signed_in(request)
        if isinstance(session, Response):
            return session
        desk = await self.webhook_desk(request, session)
        if isinstance(desk, Response):
            return desk
        sid = str(request.path_params["subscription_id"])
        params = query_params(request, "status", "cursor")
        if params.get("status", "SUCCESS") not in DELIVERY_STATUSES:
            return self.pages.bad_request(
                request, session, f"status must be one of {', '.join(DELIVERY_STATUSES)}"
            )
        try:
            row = await desk.get(sid)
            sub = await _subscription_view(desk, row)
            page = await desk.deliveries(sid, params.get("status"), params.get("cursor"))
        except ApiError as exc:
            return self.pages.api_error(request, session, exc)
        return self.pages.render(
            request,
            "webhook.html",
            session,
            sub=sub,
            deliveries=[delivery_body(d) for d in page.items],
            next_cursor=page.next_cursor,
            params=params,
            statuses=DELIVERY_STATUSES,
            windows=REPLAY_WINDOWS,
            max_events=REPLAY_MAX_EVENTS,
        )

    async def webhook_action(self, request: Request) -> Response:
        """``test``, ``replay``, ``pause`` or ``resume`` one subscription (admin, audited)."""
        checked = await self.pages.admin_action(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        sid = str(request.path_params["subscription_id"])
        action = str(request.path_params["action"])
        back = f"{CONSOLE_PATH}/webhooks/{quote(sid, safe='')}"
        if action not in WEBHOOK_ACTIONS:
            return self.pages.render(
                request, "error.html", session, 404, title="Not found",
                message=f"no webhook action {action!r}: use one of {', '.join(WEBHOOK_ACTIONS)}",
            )  # fmt: skip
        reason = form.get("reason", "").strip()
        if action != "test" and (not reason or len(reason) > REASON_MAX):
            session.flash = ("error", f"A reason (1 to {REASON_MAX} characters) is required.")
            return redirect(back)
        desk = await self.webhook_desk(request, session)
        if isinstance(desk, Response):
            return desk
        set_actor("admin")  # the lifecycle events and audit entry are the admin's
        try:
            if action == "test":
                _, attempt = await desk.test(sid)
                session.flash = _test_outcome(attempt.ok, attempt.status, attempt.error,
                                              attempt.elapsed_ms)  # fmt: skip
            elif action == "replay":
                window = REPLAY_WINDOWS.get(form.get("window", ""))
                try:
                    most = int(form.get("max_events", "100"))
                except ValueError:
                    most = 0
                if window is None or not 1 <= most <= REPLAY_MAX_EVENTS:
                    session.flash = ("error", "Choose a window (last hour, 24 hours or 7 days) "
                                     f"and at most 1 to {REPLAY_MAX_EVENTS} events.")  # fmt: skip
                    return redirect(back)
                end = self.pages.clock()
                done = await desk.replay(sid, end - window[1], end, most, reason)
                session.flash = ("ok", f"Replay {done.replay_id}: {done.events_queued} "
                                 f"event(s) of {window[0]} queued for delivery again.")  # fmt: skip
            else:
                row = await (
                    desk.pause(sid, reason) if action == "pause" else desk.resume(sid, reason)
                )
                session.flash = ("ok", f"Subscription {sid} is now {row.status}.")
        except ApiError as exc:
            session.flash = ("error", f"{action} {sid} failed: {exc.message}")
        return redirect(back)


async def _subscription_view(desk: WebhookDesk, row: SubscriptionRow) -> dict[str, Any]:
    """A subscription as the pages show it: the spec's body and why it is disabled."""
    return {**subscription_body(row), "disable_reason": await desk.disable_reason(row)}


def _test_outcome(
    ok: bool, status: int | None, error: str | None, elapsed_ms: int
) -> tuple[str, str]:
    """The flash message of a test delivery, in words."""
    answered = f"HTTP {status}" if status is not None else "no answer"
    if ok:
        return "ok", f"Test delivered: the receiver answered {answered} in {elapsed_ms} ms."
    return "error", f"Test failed: {answered}" + (f" ({error})" if error else "") + "."
