"""``cycles tenant bulk`` and ``cycles budget bulk``: one action on every row a filter matches.

Preview first, apply second::

    cycles tenant bulk suspend --search acme          # preview: what would happen to each row
    cycles tenant bulk suspend --search acme --yes    # preview, then apply to exactly that many
    cycles budget bulk reset-spent '$100' --tenant acme --scope-prefix tenant:acme/workspace:a -y

Without ``--yes`` the command only previews (the server's ``?dry_run=true``: the same checks,
each row's predicted outcome, nothing written). With ``--yes`` it previews, then applies with
``expected_count`` set to the previewed number, so a row that started matching in between makes
the server refuse the whole request (409 ``COUNT_MISMATCH``, nothing changed) instead of acting
on more than was shown. ``--expected-count N`` pins the count from an earlier preview instead.
The request carries an ``idempotency_key`` (``--idempotency-key``, default a fresh one): a
retried command with the same key gets the first answer back without applying twice.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Final

import typer

from runcycles_server.cli_admin import (
    DEFAULT_URL,
    FUND_OPERATIONS,
    AdminKey,
    AsJson,
    CliError,
    ServerClient,
    Url,
    check_unit,
    console,
    make_table,
    parse_amount,
    print_json,
    reported,
)

TENANT_ACTIONS: Final = {"suspend": "SUSPEND", "reactivate": "REACTIVATE", "close": "CLOSE"}

Yes = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Apply after the preview (default: preview only)."),
]
ExpectedCount = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Apply only if the filter still matches exactly this many rows (implies --yes).",
        show_default=False,
    ),
]
IdempotencyKey = Annotated[
    str | None,
    typer.Option(help="Reuse to make a retried command apply once (default: a fresh key)."),
]
Search = Annotated[str | None, typer.Option(help="Case-insensitive substring of the id or name.")]


def _action(value: str, known: dict[str, str], what: str) -> str:
    found = known.get(value.strip().lower().replace("_", "-"))
    if found is None:
        raise CliError(f"unknown {what} {value!r}; use one of {', '.join(known)}", 2)
    return found


def _run(
    client: ServerClient,
    path: str,
    body: dict[str, Any],
    *,
    noun: str,
    yes: bool,
    expected: int | None,
    as_json: bool,
) -> None:
    """Preview, then (``yes`` or ``expected``) apply with the expected count; print both."""
    if expected is None:
        preview = client.call("POST", path, json_body=body, params={"dry_run": "true"})
        if not yes:
            _show(preview, noun, applied=False, as_json=as_json)
            if not as_json:
                typer.echo(
                    f"preview only: run again with --yes to apply {preview['action']} to these "
                    f"{preview['total_matched']} {noun}(s)"
                )
            return
        expected = int(preview["total_matched"])
    answer = client.call("POST", path, json_body={**body, "expected_count": expected})
    _show(answer, noun, applied=True, as_json=as_json)


def _show(body: dict[str, Any], noun: str, *, applied: bool, as_json: bool) -> None:
    if as_json:
        print_json(body)
        return
    verb = "applied" if applied else "would apply"
    table = make_table(
        f"{body['action']} {verb}: {body['total_matched']} {noun}(s) matched",
        [("id", "left"), ("outcome", "left"), ("detail", "left")],
    )
    label = {"succeeded": "changed" if applied else "would change",
             "skipped": "skipped", "failed": "failed" if applied else "would fail"}  # fmt: skip
    for bucket in ("succeeded", "skipped", "failed"):
        for row in body[bucket]:
            detail = row.get("reason") or " ".join(
                part for part in (row.get("error_code"), row.get("message")) if part
            )
            table.add_row(row["id"], label[bucket], detail)
    console().print(table)
    typer.echo(
        f"{len(body['succeeded'])} {'changed' if applied else 'to change'}, "
        f"{len(body['skipped'])} skipped, {len(body['failed'])} failed"
    )


def tenant_bulk(
    action: Annotated[str, typer.Argument(help="suspend, reactivate or close.")],
    status: Annotated[
        str | None, typer.Option(help="Only tenants in this status (ACTIVE, SUSPENDED, CLOSED).")
    ] = None,
    parent: Annotated[str | None, typer.Option(help="Only children of this tenant.")] = None,
    observe_mode: Annotated[
        str | None, typer.Option(help="Only tenants in this observe mode.")
    ] = None,
    search: Search = None,
    yes: Yes = False,
    expected_count: ExpectedCount = None,
    idempotency_key: IdempotencyKey = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """Suspend, reactivate or close every tenant the filter matches (preview unless --yes)."""
    with reported():
        name = _action(action, TENANT_ACTIONS, "action")
        found = {"status": status.upper() if status else None, "parent_tenant_id": parent,
                 "observe_mode": observe_mode, "search": search}  # fmt: skip
        filt = {k: v for k, v in found.items() if v}
        if not filt:
            raise CliError(
                "give a filter (--status, --parent, --observe-mode or --search): an empty one "
                "would act on every tenant",
                2,
            )
        client = ServerClient(url, admin_key=admin_key)
        body = {"filter": filt, "action": name,
                "idempotency_key": idempotency_key or f"cli-{uuid.uuid4()}"}  # fmt: skip
        _run(client, "/v1/admin/tenants/bulk-action", body, noun="tenant", yes=yes,
             expected=expected_count, as_json=as_json)  # fmt: skip


def budget_bulk(
    action: Annotated[str, typer.Argument(help=", ".join(FUND_OPERATIONS) + ".")],
    amount: Annotated[str, typer.Argument(help="A whole number, or $1.50 in USD.")],
    tenant: Annotated[str, typer.Option(help="The tenant whose budgets to change (required).")],
    unit: Annotated[
        str, typer.Option(help="Unit of AMOUNT (budgets in another unit fail).")
    ] = "USD_MICROCENTS",
    scope_prefix: Annotated[
        str | None, typer.Option(help="Only this scope and the scopes below it.")
    ] = None,
    only_unit: Annotated[
        bool, typer.Option("--only-unit", help="Match only budgets in --unit.")
    ] = False,
    status: Annotated[str | None, typer.Option(help="ACTIVE, FROZEN or CLOSED.")] = None,
    over_limit: Annotated[
        bool | None, typer.Option("--over-limit/--not-over-limit", show_default=False)
    ] = None,
    has_debt: Annotated[
        bool | None, typer.Option("--has-debt/--no-debt", show_default=False)
    ] = None,
    utilization_min: Annotated[
        float | None, typer.Option(min=0, max=1, help="spent / allocated at least this.")
    ] = None,
    utilization_max: Annotated[
        float | None, typer.Option(min=0, max=1, help="spent / allocated at most this.")
    ] = None,
    search: Search = None,
    spent: Annotated[
        str | None, typer.Option(help="reset-spent only: the new spent (default 0).")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why, kept in the audit trail.")] = None,
    yes: Yes = False,
    expected_count: ExpectedCount = None,
    idempotency_key: IdempotencyKey = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """Fund every budget of one tenant the filter matches (preview unless --yes)."""
    with reported():
        name = _action(action, FUND_OPERATIONS, "action")
        unit = check_unit(unit)
        value = parse_amount(amount, unit)
        found: dict[str, Any] = {
            "tenant_id": tenant, "scope_prefix": scope_prefix,
            "unit": unit if only_unit else None, "status": status.upper() if status else None,
            "over_limit": over_limit, "has_debt": has_debt, "utilization_min": utilization_min,
            "utilization_max": utilization_max, "search": search,
        }  # fmt: skip
        body: dict[str, Any] = {
            "filter": {k: v for k, v in found.items() if v is not None},
            "action": name,
            "amount": {"unit": unit, "amount": value},
            "idempotency_key": idempotency_key or f"cli-{uuid.uuid4()}",
        }
        if spent is not None:
            if name != "RESET_SPENT":
                raise CliError("--spent goes only with reset-spent", 2)
            body["spent"] = {"unit": unit, "amount": parse_amount(spent, unit, what="--spent")}
        if reason:
            body["reason"] = reason
        client = ServerClient(url, admin_key=admin_key)
        _run(client, "/v1/admin/budgets/bulk-action", body, noun="budget", yes=yes,
             expected=expected_count, as_json=as_json)  # fmt: skip


def register(tenant_app: typer.Typer, budget_app: typer.Typer) -> None:
    """Add ``bulk`` to the ``tenant`` and ``budget`` command groups."""
    tenant_app.command("bulk")(tenant_bulk)
    budget_app.command("bulk")(budget_bulk)
