"""The console's routes: sign-in, pages and actions under ``/console``.

Pages are rendered on the server (Jinja2, autoescaped) from in-process calls to the JSON API
(:mod:`.backend`) made with the signed-in key; the browser only gets HTML, the package's own
CSS and a small script that refreshes the page's ``<main>`` every :data:`POLL_INTERVAL_S`
while the tab is visible. No asset comes from anywhere else (the Content-Security-Policy
says ``'self'`` only).

State-changing requests are ``POST`` forms carrying the session's CSRF token (refused with
403 without it); sign-in, which has no session yet, uses a double-submit token in a
short-lived cookie instead, and repeated failures are paused (:mod:`.signin_limits`). A
tenant-key session is read-only and sees only its tenant (the API enforces that too: the
console only ever calls it with the session's own key). The webhooks pages live in
:mod:`.webhook_pages` and are mounted here.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from runcycles_server.console import format as fmt
from runcycles_server.console import spend as spending
from runcycles_server.console.backend import ApiError, Backend, WebhookDesk, direct_debits
from runcycles_server.console.sessions import KeyKind, Session, SessionStore
from runcycles_server.console.signin_limits import SignInLimiter
from runcycles_server.console.web import (
    CONSOLE_PATH,
    REASON_MAX,
    cross_site,
    query_params,
    read_form,
    redirect,
    safe_next,
    secure,
)
from runcycles_server.console.webhook_pages import WebhookPages
from runcycles_server.events import CATEGORIES, EVENT_TYPES

if TYPE_CHECKING:
    import jinja2

SESSION_COOKIE: Final = "cycles_console"
SIGN_IN_COOKIE: Final = "cycles_console_signin"
POLL_INTERVAL_S: Final = 5
"""Seconds between two refreshes of a visible page."""
MAX_BUDGETS: Final = 2000
"""Budgets the budgets page and the near-limit card read (20 pages of 100)."""
_HERE: Final = Path(__file__).parent


class Forbidden(Exception):
    """The signed-in key may not see or do this (rendered as a 403 page)."""


def _environment() -> jinja2.Environment:
    """The template environment, built at the first page (see :attr:`Console.templates`)."""
    # Imported here, not at the top: Jinja2 costs every server start ~70 ms (several times
    # that with cold bytecode) and only someone opening the console needs it.
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        amount=fmt.amount,
        when=fmt.when,
        duration=fmt.duration,
        percent=fmt.percent,
        json=fmt.compact_json,
        utilization=fmt.utilization,
    )
    env.globals.update(level=fmt.level, poll_interval_s=POLL_INTERVAL_S, base=CONSOLE_PATH)
    return env


class Console:
    """The operator console (mounted at :data:`CONSOLE_PATH` by ``create_app``)."""

    def __init__(
        self,
        sessions: SessionStore | None = None,
        *,
        clock: Callable[[], int] | None = None,
        limiter: SignInLimiter | None = None,
    ) -> None:
        self.sessions = sessions or SessionStore()
        self._templates: jinja2.Environment | None = None
        self.clock = clock or (lambda: int(time.time() * 1000))
        """The server's epoch-ms clock (the store's), where spend charts end."""
        self.limiter = limiter or SignInLimiter(clock=lambda: self.clock() / 1000)
        """Failed sign-ins per address and per key (:mod:`.signin_limits`)."""
        self.webhook_pages = WebhookPages(self)

    @property
    def templates(self) -> jinja2.Environment:
        """The Jinja2 environment (autoescaping), made when the first page is rendered."""
        if self._templates is None:
            self._templates = _environment()
        return self._templates

    def routes(self) -> list[BaseRoute]:
        """One ``Mount`` holding every console route (nothing outside ``/console``)."""
        return [
            Route(CONSOLE_PATH, self.home, methods=["GET"]),
            Mount(
                CONSOLE_PATH,
                routes=[
                    Route("/", self.home, methods=["GET"]),
                    Route("/sign-in", self.sign_in_page, methods=["GET"]),
                    Route("/sign-in", self.sign_in, methods=["POST"]),
                    Route("/sign-out", self.sign_out, methods=["POST"]),
                    Route("/overview", self.overview, methods=["GET"]),
                    Route("/tenants", self.tenants, methods=["GET"]),
                    Route("/tenants/{tenant_id}", self.tenant, methods=["GET"]),
                    Route("/budgets", self.budgets, methods=["GET"]),
                    Route("/budgets/{action}", self.budget_action, methods=["POST"]),
                    Route("/reservations", self.reservations, methods=["GET"]),
                    Route("/reservations/{reservation_id}/release", self.release, methods=["POST"]),
                    Route("/spend", self.spend, methods=["GET"]),
                    Route("/events", self.events, methods=["GET"]),
                    Route("/audit", self.audit, methods=["GET"]),
                    *self.webhook_pages.routes(),
                    Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
                ],
            ),
        ]

    # ----------------------------------------------------------------------------------------
    # Rendering and sessions

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        """Render a page with the common context and the console's security headers."""
        flash = session_flash(session)
        html = self.templates.get_template(template).render(
            request=request,
            session=session,
            flash=flash,
            path=request.url.path,
            **context,
        )
        return secure(HTMLResponse(html, status_code=status))

    def session(self, request: Request) -> Session | None:
        """The request's live session (a background refresh does not count as activity)."""
        touch = request.headers.get("x-console-poll") != "1"
        return self.sessions.get(request.cookies.get(SESSION_COOKIE), touch=touch)

    def signed_in(self, request: Request) -> Session | Response:
        """The request's session, or the redirect to sign in (a 401 for a background refresh)."""
        session = self.session(request)
        if session is None:
            if request.headers.get("x-console-poll") == "1":
                return secure(Response("signed out", status_code=401))
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return redirect(f"{CONSOLE_PATH}/sign-in?{urlencode({'next': target})}")
        return session

    def forbidden(self, request: Request, session: Session | None, message: str) -> HTMLResponse:
        """A 403 page naming what is not allowed."""
        return self.render(
            request, "error.html", session, 403, title="Not allowed", message=message
        )

    async def admin_action(self, request: Request) -> tuple[Session, dict[str, str]] | Response:
        """The session and form of an admin action, or the page refusing it.

        Refused: a request without a session, with a wrong CSRF token, or from a read-only
        tenant-key session.
        """
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        form = await self._form(request, session)
        if isinstance(form, Response):
            return form
        if not session.is_admin:
            return self.forbidden(request, session, "A tenant-key session is read-only.")
        return session, form

    async def _form(self, request: Request, session: Session | None) -> dict[str, str] | Response:
        """The urlencoded form of a POST, or a 403 page when its CSRF token is missing/wrong."""
        form = await read_form(request)
        token = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if cross_site(request):
            return self.forbidden(request, session, "This request came from another site.")
        if session is None or not session.check_csrf(token):
            return self.forbidden(
                request,
                session,
                "This request carries no valid CSRF token. Reload the page and try again.",
            )
        return form

    # ----------------------------------------------------------------------------------------
    # Sign-in

    async def home(self, request: Request) -> Response:
        """``/console``: the overview (admin) or the tenant's own page (tenant key)."""
        session = self.session(request)
        if session is None:
            return redirect(f"{CONSOLE_PATH}/sign-in")
        if session.is_admin:
            return redirect(f"{CONSOLE_PATH}/overview")
        return redirect(f"{CONSOLE_PATH}/tenants/{session.tenant_id}")

    async def sign_in_page(
        self, request: Request, error: str | None = None, status: int | None = None
    ) -> Response:
        """The sign-in form, with a fresh double-submit token."""
        token = secrets.token_urlsafe(32)
        response = self.render(
            request,
            "sign_in.html",
            None,
            status or (401 if error else 200),
            error=error,
            signin_token=token,
            next=safe_next(request.query_params.get("next")),
        )
        response.set_cookie(
            SIGN_IN_COOKIE,
            token,
            max_age=600,
            path=f"{CONSOLE_PATH}/sign-in",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def sign_in(self, request: Request) -> Response:
        """Verify a key with ``GET /v1/auth/introspect`` and start a session."""
        form = await read_form(request)
        cookie = request.cookies.get(SIGN_IN_COOKIE)
        token = form.get("signin_token")
        if (
            cross_site(request)
            or not cookie
            or not token
            or not secrets.compare_digest(cookie, token)
        ):
            return self.forbidden(
                request, None, "The sign-in form expired or was not sent from this page; reload it."
            )
        key = form.get("key", "").strip()
        if not key:
            return await self.sign_in_page(request, "Enter the admin key or a tenant API key.")
        client = request.client.host if request.client else "unknown"
        wait = self.limiter.retry_after(client, key)
        if wait is not None:
            response = await self.sign_in_page(
                request,
                "Too many failed sign-ins from this address or with this key: sign-in is "
                f"paused for {_wait_words(wait)}. Try again then.",
                429,
            )
            response.headers["Retry-After"] = str(wait)
            return response
        found = await _identify(request, key)
        if found is None:
            self.limiter.failed(client, key)
            return await self.sign_in_page(request, "This key is not valid on this server.")
        self.limiter.succeeded(client, key)
        kind, tenant_id = found
        session = self.sessions.create(kind, key, tenant_id)
        response = redirect(safe_next(form.get("next")) or f"{CONSOLE_PATH}/")
        response.set_cookie(
            SESSION_COOKIE,
            session.session_id,
            path=CONSOLE_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        response.delete_cookie(SIGN_IN_COOKIE, path=f"{CONSOLE_PATH}/sign-in")
        return response

    async def sign_out(self, request: Request) -> Response:
        """End the session (CSRF token required, like every other action)."""
        session = self.session(request)
        form = await self._form(request, session)
        if isinstance(form, Response):
            return form
        assert session is not None
        self.sessions.end(session.session_id)
        response = redirect(f"{CONSOLE_PATH}/sign-in")
        response.delete_cookie(SESSION_COOKIE, path=CONSOLE_PATH)
        return response

    # ----------------------------------------------------------------------------------------
    # Pages

    async def overview(self, request: Request) -> Response:
        """The spec's ``AdminOverviewResponse`` as attention cards, plus near-limit budgets."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        if not session.is_admin:
            return self.forbidden(request, session, "The overview needs the admin key.")
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                data = await api.get("/v1/admin/overview")
                budgets = await _all_budgets(api, {})
            except ApiError as exc:
                return self.api_error(request, session, exc)
        near = sorted(
            (b for b in budgets if fmt.utilization(b) >= fmt.NEAR_LIMIT),
            key=fmt.utilization,
            reverse=True,
        )
        return self.render(
            request, "overview.html", session, data=data, near=near[:10], near_count=len(near)
        )

    async def tenants(self, request: Request) -> Response:
        """Every tenant (admin)."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        if not session.is_admin:
            return redirect(f"{CONSOLE_PATH}/tenants/{session.tenant_id}")
        params = query_params(request, "status", "cursor")
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                page = await api.get("/v1/admin/tenants", {**params, "limit": "100"})
            except ApiError as exc:
                return self.api_error(request, session, exc)
        return self.render(request, "tenants.html", session, page=page, params=params)

    async def tenant(self, request: Request) -> Response:
        """One tenant: its budgets, API keys and policies."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        tenant_id = str(request.path_params["tenant_id"])
        if not session.is_admin and tenant_id != session.tenant_id:
            return self.forbidden(
                request,
                session,
                f"This key belongs to tenant {session.tenant_id}; it cannot "
                f"see tenant {tenant_id}.",
            )
        sections: dict[str, Any] = {}
        errors: dict[str, str] = {}
        async with Backend.of(request, session.kind, session.key) as api:
            calls: dict[str, tuple[str, dict[str, str]]] = {
                "budgets": ("/v1/admin/budgets", {"tenant_id": tenant_id, "limit": "100"}),
                "policies": ("/v1/admin/policies", {"tenant_id": tenant_id, "limit": "100"}),
            }
            if session.is_admin:
                calls["tenant"] = (f"/v1/admin/tenants/{tenant_id}", {})
                calls["api_keys"] = ("/v1/admin/api-keys", {"tenant_id": tenant_id, "limit": "100"})
            else:
                calls["auth"] = ("/v1/auth/introspect", {})
            for name, (path, params) in calls.items():
                try:
                    sections[name] = await api.get(path, params)
                except ApiError as exc:
                    if name == "tenant" and exc.status == 404:
                        return self.api_error(request, session, exc)
                    errors[name] = exc.message
        caps = sections.get("auth", {}).get("capabilities", {})
        if session.is_admin or caps.get("view_webhooks"):
            desk = WebhookDesk.of(request, None if session.is_admin else session.tenant_id)
            try:
                sections["webhooks"] = await desk.subscriptions(tenant_id)
            except ApiError as exc:
                errors["webhooks"] = exc.message
        else:
            errors["webhooks"] = "this tenant key lacks the webhooks:read permission"
        return self.render(
            request, "tenant.html", session, tenant_id=tenant_id, sections=sections, errors=errors
        )

    async def budgets(self, request: Request) -> Response:
        """Budgets with utilization bars; filters; freeze, unfreeze and fund (admin)."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        params = query_params(request, "tenant_id", "status", "unit", "scope_prefix", "attention")
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                budgets = await _all_budgets(
                    api, {k: v for k, v in params.items() if k != "attention"}
                )
            except ApiError as exc:
                return self.api_error(request, session, exc)
        attention = params.get("attention", "")
        keep = {
            "near": lambda b: fmt.utilization(b) >= fmt.NEAR_LIMIT,
            "over_limit": lambda b: bool(b.get("is_over_limit")),
            "debt": lambda b: fmt.amount_of(b.get("debt")) > 0,
        }.get(attention)
        if keep is not None:
            budgets = [b for b in budgets if keep(b)]
        budgets.sort(key=fmt.utilization, reverse=True)
        return self.render(
            request,
            "budgets.html",
            session,
            budgets=budgets,
            params=params,
            units=("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS"),
        )

    async def budget_action(self, request: Request) -> Response:
        """``freeze``, ``unfreeze`` or ``fund`` one budget through the admin API."""
        checked = await self.admin_action(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        action = str(request.path_params["action"])
        reason = form.get("reason", "").strip()
        scope, unit = form.get("scope", ""), form.get("unit", "")
        back = safe_next(form.get("next")) or f"{CONSOLE_PATH}/budgets"
        if action not in ("freeze", "unfreeze", "fund"):
            return self.render(
                request,
                "error.html",
                session,
                404,
                title="Not found",
                message=f"no budget action {action!r}",
            )
        if not reason or len(reason) > REASON_MAX:
            session.flash = ("error", f"A reason (1 to {REASON_MAX} characters) is required.")
            return redirect(back)
        where = {"scope": scope, "unit": unit}
        body: dict[str, Any] = {"reason": reason}
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                if action == "fund":
                    operation = form.get("operation", "CREDIT")
                    try:
                        number = int(form.get("amount", "").replace(",", "").replace("_", ""))
                    except ValueError:
                        session.flash = ("error", "The amount must be a whole number.")
                        return redirect(back)
                    body.update(
                        operation=operation,
                        amount={"unit": unit, "amount": number},
                        idempotency_key=f"console-{uuid.uuid4()}",
                    )
                    where["tenant_id"] = form.get("tenant_id", "")
                await api.post(f"/v1/admin/budgets/{action}", body, where)
            except ApiError as exc:
                session.flash = ("error", f"{action} {scope} failed: {exc.message}")
                return redirect(back)
        done = {"freeze": "frozen", "unfreeze": "unfrozen", "fund": "funded"}[action]
        session.flash = ("ok", f"Budget {scope} ({unit}) {done}.")
        return redirect(back)

    async def reservations(self, request: Request) -> Response:
        """A tenant's reservations (ACTIVE by default) with force release (admin)."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        params = query_params(request, "tenant", "status", "cursor")
        params.setdefault("status", "ACTIVE")
        tenants: list[dict[str, Any]] = []
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                if session.is_admin:
                    tenants = (await api.get("/v1/admin/tenants", {"limit": "100"}))["tenants"]
                    if "tenant" not in params and tenants:
                        params["tenant"] = tenants[0]["tenant_id"]
                else:
                    params["tenant"] = session.tenant_id or ""
                page = (
                    await api.get("/v1/reservations", {**params, "limit": "100"})
                    if params.get("tenant")
                    else {"reservations": []}
                )
            except ApiError as exc:
                return self.api_error(request, session, exc)
        return self.render(
            request, "reservations.html", session, page=page, params=params, tenants=tenants
        )

    async def release(self, request: Request) -> Response:
        """Force-release a reservation as the admin (the API records it in the audit log)."""
        checked = await self.admin_action(request)
        if isinstance(checked, Response):
            return checked
        session, form = checked
        rid = str(request.path_params["reservation_id"])
        reason = form.get("reason", "").strip()
        back = safe_next(form.get("next")) or f"{CONSOLE_PATH}/reservations"
        if not reason or len(reason) > REASON_MAX:
            session.flash = ("error", f"A reason (1 to {REASON_MAX} characters) is required.")
            return redirect(back)
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                await api.post(
                    f"/v1/reservations/{rid}/release",
                    {"idempotency_key": f"console-{uuid.uuid4()}", "reason": reason},
                )
            except ApiError as exc:
                session.flash = ("error", f"Release of {rid} failed: {exc.message}")
                return redirect(back)
        session.flash = ("ok", f"Reservation {rid} released.")
        return redirect(back)

    async def spend(self, request: Request) -> Response:
        """Spend over time for one budget scope (hour, day or week) and its burn rate."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        params = query_params(request, "tenant", "scope", "unit", "range")
        chart = spending.RANGES.get(params.setdefault("range", "day"))
        if chart is None:
            return self.render(
                request,
                "error.html",
                session,
                400,
                title="INVALID_REQUEST",
                message="range must be hour, day or week",
            )
        tenants: list[dict[str, Any]] = []
        budgets: list[dict[str, Any]] = []
        budget: dict[str, Any] | None = None
        result = None
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                if session.is_admin:
                    tenants = (await api.get("/v1/admin/tenants", {"limit": "100"}))["tenants"]
                    if "tenant" not in params and tenants:
                        params["tenant"] = tenants[0]["tenant_id"]
                else:
                    params["tenant"] = session.tenant_id or ""
                if params.get("tenant"):
                    budgets = await _all_budgets(api, {"tenant_id": params["tenant"]})
                budget = next(
                    (
                        b
                        for b in budgets
                        if b["scope"] == params.get("scope")
                        and b["unit"] == params.get("unit", b["unit"])
                    ),
                    budgets[0] if budgets and "scope" not in params else None,
                )
                if budget is not None:
                    params["scope"], params["unit"] = budget["scope"], budget["unit"]
                    end = self.clock()
                    start = end - chart.span_ms
                    rows, partial = await _committed(api, params["tenant"], start, end)
                    debits, cut = await direct_debits(
                        request, params["tenant"], start, end, spending.MAX_DEBITS
                    )
                    result = spending.series(
                        rows, budget["scope"], budget["unit"], chart, end,
                        debits=debits, partial=partial or cut,
                    )  # fmt: skip
            except ApiError as exc:
                return self.api_error(request, session, exc)
        return self.render(
            request,
            "spend.html",
            session,
            params=params,
            tenants=tenants,
            budgets=budgets,
            budget=budget,
            series=result,
            chart=chart,
            ranges=spending.RANGES.values(),
        )

    async def events(self, request: Request) -> Response:
        """The event log with the API's filters."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        names = [
            "event_type",
            "category",
            "scope",
            "correlation_id",
            "trace_id",
            "request_id",
            "from",
            "to",
            "cursor",
        ]
        if session.is_admin:
            names.append("tenant_id")
        params = query_params(request, *names)
        path = "/v1/admin/events" if session.is_admin else "/v1/events"
        error = None
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                page = await api.get(path, {**params, "limit": "100"})
            except ApiError as exc:
                if exc.status != 400:
                    return self.api_error(request, session, exc)
                page, error = {"events": []}, exc.message
        return self.render(
            request,
            "events.html",
            session,
            400 if error else 200,
            page=page,
            params=params,
            error=error,
            event_types=EVENT_TYPES,
            categories=sorted(CATEGORIES),
        )

    async def audit(self, request: Request) -> Response:
        """The audit log (admin)."""
        session = self.signed_in(request)
        if isinstance(session, Response):
            return session
        if not session.is_admin:
            return self.forbidden(request, session, "The audit log needs the admin key.")
        params = query_params(request, "tenant_id", "cursor")
        async with Backend.of(request, session.kind, session.key) as api:
            try:
                page = await api.get("/v1/admin/audit/logs", {**params, "limit": "100"})
            except ApiError as exc:
                return self.api_error(request, session, exc)
        return self.render(request, "audit.html", session, page=page, params=params)

    def bad_request(self, request: Request, session: Session, message: str) -> HTMLResponse:
        """A 400 page naming what is wrong with the request."""
        return self.render(
            request, "error.html", session, 400, title="INVALID_REQUEST", message=message
        )

    def api_error(self, request: Request, session: Session, exc: ApiError) -> HTMLResponse:
        """The page of a refused API call, with its status (a 502 for anything else)."""
        status = exc.status if 400 <= exc.status < 600 else 502
        return self.render(
            request, "error.html", session, status, title=exc.code, message=exc.message
        )


# --------------------------------------------------------------------------------------------
# Helpers


def session_flash(session: Session | None) -> tuple[str, str] | None:
    """Take the session's one-time message (shown once, after a redirect)."""
    if session is None or session.flash is None:
        return None
    flash, session.flash = session.flash, None
    return flash


async def _identify(request: Request, key: str) -> tuple[KeyKind, str | None] | None:
    """Which kind of key this is (and its tenant), asked of ``GET /v1/auth/introspect``."""
    order: tuple[KeyKind, ...] = (
        ("tenant", "admin") if key.startswith("cyc_") else ("admin", "tenant")
    )
    for kind in order:
        async with Backend.of(request, kind, key) as api:
            try:
                found = await api.get("/v1/auth/introspect")
            except ApiError:
                continue
        if kind == "admin" and found.get("auth_type") == "admin":
            return "admin", None
        if kind == "tenant" and found.get("tenant_id"):
            return "tenant", str(found["tenant_id"])
    return None


async def _committed(
    api: Backend, tenant_id: str, start_ms: int, end_ms: int
) -> tuple[list[dict[str, Any]], bool]:
    """A tenant's reservations committed in ``[start_ms, end_ms]``; whether the cap cut them."""
    found: list[dict[str, Any]] = []
    cursor = None
    window = {
        "tenant": tenant_id,
        "status": "COMMITTED",
        "finalized_from": fmt.iso(start_ms),
        "finalized_to": fmt.iso(end_ms),
        "limit": "200",
    }
    while True:
        page = await api.get("/v1/reservations", {**window, "cursor": cursor or ""})
        found += page.get("reservations", [])
        cursor = page.get("next_cursor")
        if not page.get("has_more") or not cursor:
            return found, False
        if len(found) >= spending.MAX_RESERVATIONS:
            return found, True


async def _all_budgets(api: Backend, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every budget the filters select, up to :data:`MAX_BUDGETS`."""
    found: list[dict[str, Any]] = []
    cursor = None
    while len(found) < MAX_BUDGETS:
        page = await api.get(
            "/v1/admin/budgets", {**params, "limit": "100", "cursor": cursor or ""}
        )
        found += page.get("ledgers", [])
        cursor = page.get("next_cursor")
        if not page.get("has_more") or not cursor:
            break
    return found


def _wait_words(seconds: int) -> str:
    """A short wait for people: ``30 seconds``, ``1 minute``, ``15 minutes``."""
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = -(-seconds // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"
