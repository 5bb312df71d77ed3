"""Event-plane commands of the ``cycles`` CLI: the event log and the admin overview.

::

    cycles events --tenant acme                        # the 50 most recent, oldest first
    cycles events --tenant acme --type budget.threshold_crossed --since 2026-12-01T00:00:00Z
    cycles events --tenant acme --category reservation --follow    # then new ones as they come
    cycles events --api-key $KEY --follow --json       # a tenant key: its own events, JSON lines
    cycles overview                                     # tenants, budgets, the last hour

``cycles events`` calls ``GET /v1/admin/events`` with the admin key, or ``GET /v1/events`` with
a tenant key (``events:read``), with the API's filters. ``--follow`` keeps polling every
``--interval`` seconds for events from a few seconds before the newest one seen on (following
``next_cursor`` through each answer, so a burst between two polls is printed whole, oldest
first, and an event another server process committed a moment late is not missed) and prints
each new event once; Ctrl-C stops it cleanly (exit 0). With ``--json`` the listing is one JSON
array, and with ``--follow`` one JSON object per line (for ``jq``).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Annotated, Any, Final

import typer

from runcycles_server.cli_admin import (
    AdminKey,
    ApiKey,
    AsJson,
    CliError,
    ServerClient,
    Url,
    console,
    make_table,
    print_json,
    reported,
)

__all__ = ["register_events", "summary"]

DEFAULT_URL: Final = "http://127.0.0.1:7878"
FOLLOW_PAGES: Final = 50
"""Most pages one ``--follow`` poll reads (5,000 events at 100 a page)."""
OVERLAP_MS: Final = 5_000
"""How far before the newest event seen each ``--follow`` poll reads again."""


def _ms(timestamp: str) -> int:
    return round(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _client(url: str, admin_key: str | None, api_key: str | None) -> ServerClient:
    if admin_key:
        return ServerClient(url, admin_key=admin_key)
    if api_key:
        return ServerClient(url, api_key=api_key)
    raise CliError(
        "no key: pass --admin-key (or CYCLES_ADMIN_API_KEY), or --api-key (or CYCLES_API_KEY) "
        "for a tenant key that holds events:read",
        2,
    )


def summary(event: dict[str, Any]) -> str:
    """One line of what an event says (its payload's telling fields)."""
    data = event.get("data") or {}
    kind = event["event_type"]
    parts: list[str] = []
    if "count" in data:
        parts.append(f"x{data['count']}")
    for name in ("reason_code", "failure_reason", "direction", "operation", "metric"):
        if name in data:
            parts.append(str(data[name]))
    if "threshold" in data:
        parts.append(f"{data['threshold']:.0%} (now {data.get('utilization', 0):.1%})")
    for name in ("ratio", "multiplier"):
        if name in data:
            parts.append(f"{name} {data[name]:.2f}")
    for name in ("previous_status", "prior_status"):
        if name in data and "new_status" in data:
            parts.append(f"{data[name]} -> {data['new_status']}")
    if data.get("changed_fields"):
        parts.append("changed " + ", ".join(data["changed_fields"]))
    for name in ("reservation_id", "key_id", "policy_id"):
        if name in data:
            parts.append(str(data[name]))
    if kind.endswith("commit_overage"):
        parts.append(f"{data.get('estimated_amount')} -> {data.get('actual_amount')}")
    return " ".join(parts)


def _actor(event: dict[str, Any]) -> str:
    actor = event.get("actor") or {}
    kind = str(actor.get("type", ""))
    return f"{kind} {actor['key_id']}" if actor.get("key_id") else kind


def _print_table(events: list[dict[str, Any]], title: str) -> None:
    table = make_table(
        title,
        [("time", "left"), ("type", "left"), ("tenant", "left"), ("scope", "left"),
         ("actor", "left"), ("details", "left")],
    )  # fmt: skip
    for e in events:
        table.add_row(
            e["timestamp"], e["event_type"], e["tenant_id"], e.get("scope", ""), _actor(e),
            summary(e),
        )  # fmt: skip
    console().print(table)


def _line(event: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(event, separators=(",", ":"))
    details = summary(event)
    scope = event.get("scope", "")
    return f"{event['timestamp']}  {event['event_type']:<40} {scope}  {details}".rstrip()


def _newer(
    client: ServerClient, path: str, params: dict[str, Any], since: str, seen: set[str]
) -> list[dict[str, Any]]:
    """Events from ``since`` on (inclusive) not in ``seen``, oldest first."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(FOLLOW_PAGES):
        page = {**params, "from": since, "limit": 100, "cursor": cursor}
        body = client.call("GET", path, params=page)
        found += [e for e in body.get("events", []) if e["event_id"] not in seen]
        cursor = body.get("next_cursor")
        if not body.get("has_more") or not cursor:
            break
    found.reverse()
    return found


def events_command(
    tenant: Annotated[
        str | None,
        typer.Option(help="Whose events (admin key; required on a Redis-backed server)."),
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Only this event type (e.g. budget.exhausted).")
    ] = None,
    category: Annotated[
        str | None,
        typer.Option(help="Only this category: budget, reservation, tenant, api_key, policy..."),
    ] = None,
    scope: Annotated[str | None, typer.Option(help="This scope and the scopes below it.")] = None,
    correlation_id: Annotated[str | None, typer.Option(help="Only this correlation id.")] = None,
    trace_id: Annotated[str | None, typer.Option(help="Only this trace id (32 hex).")] = None,
    request_id: Annotated[str | None, typer.Option(help="Only this request id.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", "--from", help="From this ISO 8601 time on.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", "--to", help="Up to this ISO 8601 time.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10_000, help="How many of the most recent to show.")
    ] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between two polls with --follow.")
    ] = 2.0,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List events (newest last) with the API's filters; --follow prints new ones as they come."""
    with reported():
        client = _client(url, admin_key, api_key)
        if tenant is not None and not client.is_admin:
            raise CliError("--tenant is for the admin key; a tenant key reads its own tenant", 2)
        path = "/v1/admin/events" if client.is_admin else "/v1/events"
        params: dict[str, Any] = {
            "tenant_id": tenant,
            "event_type": event_type,
            "category": category,
            "scope": scope,
            "correlation_id": correlation_id,
            "trace_id": trace_id,
            "request_id": request_id,
            "from": since,
            "to": until,
        }
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(found) < limit:
            page = {**params, "limit": min(100, limit - len(found)), "cursor": cursor}
            body = client.call("GET", path, params=page)
            found += body.get("events", [])
            cursor = body.get("next_cursor")
            if not body.get("has_more") or not cursor:
                break
        found.reverse()  # oldest first, so the newest is at the bottom, where --follow goes on
        if not follow:
            if as_json:
                print_json(found)
            else:
                what = f" of {tenant}" if tenant else ""
                _print_table(found, f"{len(found)} event(s){what}, oldest first")
            return
        for e in found:
            typer.echo(_line(e, as_json))
        # Events are listed by their time, and a transaction in another server process may
        # commit an event stamped a moment before one already seen: each poll reads again from
        # OVERLAP_MS before the newest event seen, and skips the ids it printed.
        seen = {e["event_id"]: _ms(e["timestamp"]) for e in found}
        try:
            while True:
                time.sleep(interval)
                newest = max(seen.values(), default=None)
                if newest is None:
                    start = since or "1970-01-01T00:00:00Z"
                else:
                    start = _iso(newest - OVERLAP_MS)
                    seen = {i: at for i, at in seen.items() if at >= newest - OVERLAP_MS}
                fresh = _newer(client, path, params, start, set(seen))
                fresh.sort(key=lambda e: e["timestamp"])
                for e in fresh:
                    typer.echo(_line(e, as_json))
                    seen[e["event_id"]] = _ms(e["timestamp"])
        except KeyboardInterrupt:
            return


def overview_command(
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """Show the operational overview: tenants, budgets, debt, the last hour's events."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        body = client.call("GET", "/v1/admin/overview")
        if as_json:
            print_json(body)
            return
        t, b, w = body["tenant_counts"], body["budget_counts"], body["webhook_counts"]
        out = console()
        out.print(f"as of {body['as_of']}")
        out.print(
            f"tenants: {t['total']} ({t['active']} active, {t['suspended']} suspended, "
            f"{t['closed']} closed)"
        )
        units = ", ".join(f"{n} {unit}" for unit, n in b["by_unit"].items()) or "none"
        out.print(
            f"budgets: {b['total']} ({b['active']} active, {b['frozen']} frozen, {b['closed']} "
            f"closed; {b['over_limit']} over limit, {b['with_debt']} with debt) - {units}"
        )
        out.print(
            f"webhooks: {w['total']} ({w['active']} active, {w['disabled']} disabled, "
            f"{w['with_failures']} failing)"
        )
        hours = body["event_window_seconds"] / 3600
        counts = body["event_counts"]
        by_category = ", ".join(f"{n} {c}" for c, n in counts["by_category"].items())
        out.print(
            f"events in the last {hours:g} h: {counts['total_recent']}"
            + (f" ({by_category})" if by_category else "")
        )
        reasons = body.get("recent_denials_by_reason") or {}
        if reasons:
            out.print("denials by reason: " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
        if body["debt_scopes"]:
            table = make_table(
                "budgets with debt",
                [("scope", "left"), ("unit", "left"), ("debt", "right"),
                 ("overdraft limit", "right"), ("over limit", "left")],
            )  # fmt: skip
            over = {(s["scope"], s["unit"]) for s in body["over_limit_scopes"]}
            for s in body["debt_scopes"]:
                table.add_row(
                    s["scope"], s["unit"], str(s["debt"]), str(s["overdraft_limit"]),
                    "yes" if (s["scope"], s["unit"]) in over else "",
                )  # fmt: skip
            out.print(table)
        for field, title in (("recent_denials", "recent denials"),
                             ("recent_expiries", "recent expiries")):  # fmt: skip
            if body[field]:
                _print_table(list(reversed(body[field])), title)


def register_events(cli: typer.Typer) -> None:
    """Add ``events`` and ``overview`` to the ``cycles`` app."""
    cli.command("events")(events_command)
    cli.command("overview")(overview_command)
