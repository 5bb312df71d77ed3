r"""Webhook commands of the ``cycles`` CLI: subscriptions, deliveries, tests and replays.

::

    cycles webhook create https://hooks.example.com/cycles --tenant acme \
        --event budget.threshold_crossed --event budget.exhausted --threshold 0.5
    cycles webhook list --tenant acme
    cycles webhook pause whsub_...          # resume, delete the same way
    cycles webhook update whsub_... --url https://new.example.com/hook
    cycles webhook test whsub_...
    cycles webhook deliveries whsub_... --status FAILED
    cycles webhook replay whsub_... --from 2026-12-07T00:00:00Z

With the admin key (``--admin-key`` / ``CYCLES_ADMIN_API_KEY``) they use
``/v1/admin/webhooks`` (``create`` without ``--tenant`` makes a system-wide subscription that
receives every tenant's events); with a tenant key (``--api-key`` / ``CYCLES_API_KEY``, holding
``webhooks:read``/``webhooks:write``) they use ``/v1/webhooks`` for the key's own tenant.
``create`` prints the signing secret once: store it, it cannot be read again. Bad values exit
with 2 before the server is called; a refusal prints the server's reason and exits with 1.
"""

from __future__ import annotations

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

__all__ = ["register_webhooks"]

DEFAULT_URL: Final = "http://127.0.0.1:7878"
webhook_app = typer.Typer(
    help="Webhook subscriptions: where events are POSTed, signed.", no_args_is_help=True
)
SubscriptionId = Annotated[
    str, typer.Argument(help="Subscription id (whsub_...), as `webhook list` shows.")
]
Events = Annotated[
    list[str] | None,
    typer.Option("--event", help="An event type to receive, e.g. budget.exhausted (repeatable)."),
]
Categories = Annotated[
    list[str] | None,
    typer.Option("--category", help="Receive every event of a category, e.g. budget (repeatable)."),
]
Thresholds = Annotated[
    list[float] | None,
    typer.Option(
        "--threshold",
        help="A budget utilization (0-1) whose crossings to receive (repeatable; default "
        "0.8, 0.95 and 1.0).",
    ),
]
Headers = Annotated[
    list[str] | None,
    typer.Option("--header", help="A custom header NAME:VALUE sent with each delivery."),
]


def _client(url: str, admin_key: str | None, api_key: str | None) -> ServerClient:
    if not admin_key and not api_key:
        raise CliError(
            "no key: pass --admin-key (or CYCLES_ADMIN_API_KEY), or --api-key (or "
            "CYCLES_API_KEY) for a tenant key with webhooks:read / webhooks:write",
            2,
        )
    if admin_key:
        return ServerClient(url, admin_key=admin_key)
    return ServerClient(url, api_key=api_key)


def _base(client: ServerClient) -> str:
    return "/v1/admin/webhooks" if client.is_admin else "/v1/webhooks"


def _headers(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    found: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise CliError(f"--header {item!r}: use NAME:VALUE, e.g. Authorization:Bearer x", 2)
        found[name.strip()] = value.strip()
    return found


def _thresholds(values: list[float] | None) -> dict[str, Any] | None:
    if not values:
        return None
    for value in values:
        if not 0 <= value <= 1:
            raise CliError(f"--threshold {value}: a utilization from 0 to 1 (0.8 = 80 %)", 2)
    return {"budget_utilization": sorted(set(values))}


def _selectors(events: list[str] | None, categories: list[str] | None) -> str:
    shown = [*(events or []), *(f"{c}.*" for c in categories or [])]
    return ", ".join(shown) or "-"


def _describe(sub: dict[str, Any]) -> str:
    selectors = _selectors(sub.get("event_types"), sub.get("event_categories"))
    return (
        f"{sub['subscription_id']} ({sub['status']}) of {sub['tenant_id']} -> {sub['url']} "
        f"[{selectors}]"
    )


@webhook_app.command("create")
def webhook_create(
    target: Annotated[str, typer.Argument(help="The https URL deliveries are POSTed to.")],
    event: Events = None,
    category: Categories = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="Owning tenant (admin key; omit for a system-wide subscription)."),
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="Only events at this scope pattern (tenant:acme/*).")
    ] = None,
    threshold: Thresholds = None,
    header: Headers = None,
    name: Annotated[str | None, typer.Option(help="A name for people.")] = None,
    max_retries: Annotated[
        int | None, typer.Option(min=0, max=10, help="Retries after a failed attempt.")
    ] = None,
    disable_after: Annotated[
        int | None,
        typer.Option(min=1, help="Disable after this many failed deliveries in a row."),
    ] = None,
    secret: Annotated[
        str | None, typer.Option(help="Signing secret to use (default: the server makes one).")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Subscribe a URL to events; print the signing secret (shown only this once)."""
    with reported():
        if not event:
            raise CliError(
                "give at least one --event (e.g. --event budget.exhausted); add --category "
                "budget to receive every budget event",
                2,
            )
        body: dict[str, Any] = {"url": target, "event_types": event}
        optional = {
            "event_categories": category,
            "scope_filter": scope,
            "thresholds": _thresholds(threshold),
            "headers": _headers(header),
            "name": name,
            "disable_after_failures": disable_after,
            "signing_secret": secret,
            "retry_policy": None if max_retries is None else {"max_retries": max_retries},
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        client = _client(url, admin_key, api_key)
        if tenant is not None and not client.is_admin:
            raise CliError("--tenant is for the admin key; a tenant key implies its tenant", 2)
        params = {"tenant_id": tenant} if client.is_admin else None
        created = client.call("POST", _base(client), json_body=body, params=params)
        if as_json:
            print_json(created)
            return
        typer.echo(f"created {_describe(created['subscription'])}")
        typer.echo(f"signing secret (shown once, store it now): {created['signing_secret']}")


@webhook_app.command("list")
def webhook_list(
    tenant: Annotated[
        str | None, typer.Option(help="Only this tenant's (with the admin key).")
    ] = None,
    status: Annotated[str | None, typer.Option(help="ACTIVE, PAUSED or DISABLED only.")] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List subscriptions with their health (secrets are never shown)."""
    with reported():
        client = _client(url, admin_key, api_key)
        params: dict[str, Any] = {"status": status.upper() if status else None, "limit": 100}
        if client.is_admin:
            params["tenant_id"] = tenant
        subs = client.pages(_base(client), "subscriptions", params)
        if as_json:
            print_json(subs)
            return
        table = make_table(
            f"{len(subs)} subscription(s)",
            [
                ("subscription id", "left"),
                ("tenant", "left"),
                ("status", "left"),
                ("url", "left"),
                ("events", "left"),
                ("failures", "right"),
                ("last success", "left"),
            ],
        )
        for s in subs:
            table.add_row(
                s["subscription_id"],
                s["tenant_id"],
                s["status"],
                s["url"],
                _selectors(s.get("event_types"), s.get("event_categories")),
                str(s.get("consecutive_failures", 0)),
                s.get("last_success_at", "-"),
            )
        console().print(table)


def _patch(
    subscription_id: str,
    body: dict[str, Any],
    url: str,
    admin_key: str | None,
    api_key: str | None,
    as_json: bool,
    verb: str,
) -> None:
    client = _client(url, admin_key, api_key)
    updated = client.call("PATCH", f"{_base(client)}/{subscription_id}", json_body=body)
    if as_json:
        print_json(updated)
        return
    typer.echo(f"{verb} {_describe(updated)}")


@webhook_app.command("update")
def webhook_update(
    subscription_id: SubscriptionId,
    target: Annotated[str | None, typer.Option("--target", help="New delivery URL.")] = None,
    event: Events = None,
    category: Categories = None,
    scope: Annotated[str | None, typer.Option(help="New scope pattern.")] = None,
    threshold: Thresholds = None,
    header: Headers = None,
    secret: Annotated[
        str | None,
        typer.Option(help="Rotate to this signing secret (the old one signs for 24 h more)."),
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Change a subscription: only the options given change (a list replaces the stored one)."""
    with reported():
        body = {
            "url": target,
            "event_types": event,
            "event_categories": category,
            "scope_filter": scope,
            "thresholds": _thresholds(threshold),
            "headers": _headers(header),
            "signing_secret": secret,
        }
        body = {k: v for k, v in body.items() if v is not None}
        if not body:
            raise CliError("nothing to change: give at least one option (see --help)", 2)
        _patch(subscription_id, body, url, admin_key, api_key, as_json, "updated")


@webhook_app.command("pause")
def webhook_pause(
    subscription_id: SubscriptionId,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Stop deliveries (events meanwhile are not queued)."""
    with reported():
        _patch(subscription_id, {"status": "PAUSED"}, url, admin_key, api_key, as_json, "paused")


@webhook_app.command("resume")
def webhook_resume(
    subscription_id: SubscriptionId,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Deliver again (also re-enables a DISABLED subscription and resets its failures)."""
    with reported():
        _patch(subscription_id, {"status": "ACTIVE"}, url, admin_key, api_key, as_json, "resumed")


@webhook_app.command("delete")
def webhook_delete(
    subscription_id: SubscriptionId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
) -> None:
    """Delete a subscription (its pending deliveries are cancelled)."""
    with reported():
        client = _client(url, admin_key, api_key)
        if not yes:
            typer.confirm(f"Delete webhook subscription {subscription_id}?", abort=True)
        client.call("DELETE", f"{_base(client)}/{subscription_id}")
        typer.echo(f"deleted {subscription_id}")


@webhook_app.command("test")
def webhook_test(
    subscription_id: SubscriptionId,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Send a signed system.webhook_test event now and show what the endpoint answered."""
    with reported():
        client = _client(url, admin_key, api_key)
        result = client.call("POST", f"{_base(client)}/{subscription_id}/test")
        if as_json:
            print_json(result)
            return
        status = result.get("response_status", "no response")
        took = result.get("response_time_ms", 0)
        if result["success"]:
            typer.echo(f"ok: HTTP {status} in {took} ms (event {result.get('event_id')})")
            return
        raise CliError(f"test delivery failed: {result.get('error_message', status)}")


@webhook_app.command("deliveries")
def webhook_deliveries(
    subscription_id: SubscriptionId,
    status: Annotated[
        str | None, typer.Option(help="PENDING, RETRYING, SUCCESS or FAILED only.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most deliveries shown.")] = 50,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show a subscription's deliveries, newest first (status, attempts, answer, error)."""
    with reported():
        client = _client(url, admin_key, api_key)
        params = {"status": status.upper() if status else None, "limit": min(limit, 100)}
        path = f"{_base(client)}/{subscription_id}/deliveries"
        rows = client.pages(path, "deliveries", params)[:limit]
        if as_json:
            print_json(rows)
            return
        table = make_table(
            f"{len(rows)} delivery(ies) of {subscription_id}",
            [
                ("event", "left"),
                ("type", "left"),
                ("status", "left"),
                ("attempts", "right"),
                ("answer", "right"),
                ("ms", "right"),
                ("attempted at", "left"),
                ("error", "left"),
            ],
        )
        for d in rows:
            table.add_row(
                d["event_id"],
                d.get("event_type", ""),
                d["status"],
                str(d.get("attempts", 0)),
                str(d.get("response_status", "-")),
                str(d.get("response_time_ms", "-")),
                d.get("attempted_at", ""),
                (d.get("error_message") or "")[:80],
            )
        console().print(table)


@webhook_app.command("replay")
def webhook_replay(
    subscription_id: SubscriptionId,
    since: Annotated[str, typer.Option("--from", help="Window start (ISO 8601, inclusive).")],
    until: Annotated[
        str | None, typer.Option("--to", help="Window end (ISO 8601, inclusive; default now).")
    ] = None,
    event: Events = None,
    max_events: Annotated[
        int, typer.Option(min=1, max=1000, help="Refuse a window holding more events.")
    ] = 100,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """Send a window of past events again, oldest first (admin key)."""
    with reported():
        body: dict[str, Any] = {"from": since, "max_events": max_events}
        if until is not None:
            body["to"] = until
        if event:
            body["event_types"] = event
        if not admin_key:
            raise CliError("replay needs the admin key (--admin-key or CYCLES_ADMIN_API_KEY)", 2)
        client = ServerClient(url, admin_key=admin_key)
        answer = client.call("POST", f"/v1/admin/webhooks/{subscription_id}/replay", json_body=body)
        if as_json:
            print_json(answer)
            return
        typer.echo(f"replay {answer['replay_id']}: {answer['events_queued']} event(s) queued")


def register_webhooks(cli: typer.Typer) -> None:
    """Add the ``webhook`` command group to the ``cycles`` app."""
    cli.add_typer(webhook_app, name="webhook")
