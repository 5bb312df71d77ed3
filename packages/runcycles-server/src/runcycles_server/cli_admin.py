"""Admin commands of the ``cycles`` CLI: tenants, API keys, budgets and balances over HTTP.

They talk to a running server (``--url``, default ``http://127.0.0.1:7878`` or
``CYCLES_BASE_URL``) with the admin key (``--admin-key`` or ``CYCLES_ADMIN_API_KEY``)::

    cycles tenant create acme --name "Acme Corp"
    eval "$(cycles key create acme)"            # an agent key: CYCLES_API_KEY, CYCLES_TENANT, ...
    cycles key create acme --role tenant-admin  # a key that may also create and fund budgets
    cycles budget create tenant:acme '$25'       # 25 USD = 2_500_000_000 USD_MICROCENTS
    cycles balances

Amounts are whole numbers in the budget's unit; for ``USD_MICROCENTS`` a dollar amount such as
``$1.50`` also works (1 USD = 10**8 USD_MICROCENTS). Every failure prints one line naming the
problem and what to do, and exits with 1 (the server refused or could not be reached) or 2 (a
bad value on the command line).

Imports stay light (no server modules but the import-free :mod:`runcycles_server.roles`) so
the commands start quickly.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final

import typer

from runcycles_server.roles import ALL_PERMISSIONS, ROLES, describe_permissions, role_of

__all__ = [
    "UNITS",
    "CliError",
    "ServerClient",
    "console",
    "format_amount",
    "make_table",
    "parse_amount",
    "print_json",
    "register",
    "reported",
    "tenant_of_scope",
]

UNITS: Final = ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS")
MICROCENTS_PER_USD: Final = 10**8
MAX_AMOUNT: Final = 2**63 - 1
DEFAULT_URL: Final = "http://127.0.0.1:7878"
FUND_OPERATIONS: Final = {
    "credit": "CREDIT",
    "debit": "DEBIT",
    "reset": "RESET",
    "reset-spent": "RESET_SPENT",
    "repay-debt": "REPAY_DEBT",
}


class CliError(Exception):
    """A failure to report as one line; ``exit_code`` 2 for bad input, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn a :class:`CliError` into ``error: ...`` on stderr and the matching exit code."""
    try:
        yield
    except CliError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None


# --------------------------------------------------------------------------------------------
# Values


def check_unit(unit: str) -> str:
    """Return ``unit`` upper-cased if it is a protocol unit.

    Raises:
        CliError: naming the valid units (exit code 2).
    """
    value = unit.strip().upper()
    if value not in UNITS:
        raise CliError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}", 2)
    return value


def parse_amount(text: str, unit: str, *, what: str = "amount") -> int:
    """Parse a non-negative amount: a whole number in ``unit``, or ``$1.50`` for USD_MICROCENTS.

    ``_`` and ``,`` separators are allowed (``1_000_000``, ``$1,000``). Dollars convert exactly
    at 1 USD = 10**8 USD_MICROCENTS, so at most eight decimal places are accepted.

    Raises:
        CliError: naming the problem (exit code 2).
    """
    raw = text.strip().replace("_", "").replace(",", "")
    if raw.startswith("$"):
        if unit != "USD_MICROCENTS":
            raise CliError(
                f"{what} {text!r} is in dollars but the unit is {unit}; give a whole number of "
                f"{unit}",
                2,
            )
        try:
            dollars = Decimal(raw[1:])
        except InvalidOperation:
            raise CliError(f"{what} {text!r} is not a dollar amount such as $1.50", 2) from None
        if not dollars.is_finite():
            raise CliError(f"{what} {text!r} is not a dollar amount such as $1.50", 2)
        scaled = dollars * MICROCENTS_PER_USD
        if scaled != scaled.to_integral_value():
            raise CliError(
                f"{what} {text!r} is finer than one USD_MICROCENT (1e-8 USD); use at most "
                "eight decimal places",
                2,
            )
        value = int(scaled)
    else:
        try:
            value = int(raw)
        except ValueError:
            hint = " or a dollar amount such as $1.50" if unit == "USD_MICROCENTS" else ""
            raise CliError(
                f"{what} {text!r} is not a whole number of {unit}; give e.g. 1000000{hint}", 2
            ) from None
    if value < 0:
        raise CliError(f"{what} {text!r} must not be negative", 2)
    if value > MAX_AMOUNT:
        raise CliError(f"{what} {text!r} is larger than the int64 limit of amounts", 2)
    return value


def format_amount(amount: int, unit: str, *, raw: bool = False) -> str:
    """Format an amount for a table: dollars for USD_MICROCENTS (unless ``raw``), else grouped."""
    if unit != "USD_MICROCENTS" or raw:
        return f"{amount:,}"
    sign = "-" if amount < 0 else ""
    dollars = Decimal(abs(amount)) / MICROCENTS_PER_USD
    text = f"{dollars:,.8f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"{sign}${whole}.{cents.ljust(2, '0')}"


def tenant_of_scope(scope: str) -> str | None:
    """Return the tenant id a scope such as ``tenant:acme/agent:bot`` starts with."""
    head = scope.split("/", 1)[0]
    kind, _, value = head.partition(":")
    return value.lower() if kind.strip().lower() == "tenant" and value else None


# --------------------------------------------------------------------------------------------
# HTTP


class ServerClient:
    """A small synchronous client for the admin and balance endpoints."""

    def __init__(self, url: str, *, admin_key: str | None = None, api_key: str | None = None):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise CliError(
                f"--url {url!r} is not an http(s) URL; use e.g. {DEFAULT_URL} (or set "
                "CYCLES_BASE_URL)",
                2,
            )
        if admin_key is None and api_key is None:
            raise CliError(
                "no admin key: pass --admin-key or set CYCLES_ADMIN_API_KEY to the key the server "
                "was started with (`cycles serve --admin-key ...`)",
                2,
            )
        headers = {"X-Admin-API-Key": admin_key} if admin_key else {"X-Cycles-API-Key": api_key}
        self.is_admin = admin_key is not None
        self._headers: dict[str, str] = {k: v for k, v in headers.items() if v is not None}

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Send one request and return its decoded JSON body.

        Raises:
            CliError: when the server cannot be reached or answers with an error.
        """
        import httpx

        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = httpx.request(
                method,
                self.url + path,
                json=json_body,
                params=clean,
                headers=self._headers,
                timeout=10.0,
            )
        except httpx.HTTPError as exc:
            raise CliError(
                f"cannot reach the Cycles server at {self.url} ({type(exc).__name__}: {exc}); "
                "start it with `cycles serve` or point --url / CYCLES_BASE_URL at it"
            ) from None
        if response.status_code < 300:
            return response.json() if response.content else None
        raise CliError(self._describe(response))

    def _describe(self, response: Any) -> str:
        try:
            body = response.json()
            code, message = body.get("error", "ERROR"), body.get("message", response.text)
        except ValueError:
            code, message = "ERROR", response.text.strip()[:200] or response.reason_phrase
        line = f"server refused ({response.status_code} {code}): {message}"
        if response.status_code == 401 and self.is_admin:
            line += (
                "; check that --admin-key / CYCLES_ADMIN_API_KEY matches the key the server was "
                "started with"
            )
        return line

    def pages(self, path: str, field: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Follow ``next_cursor`` through every page of a list endpoint."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            body = self.call("GET", path, params={**params, "cursor": cursor})
            items.extend(body.get(field, []))
            cursor = body.get("next_cursor")
            if not body.get("has_more") or not cursor:
                return items


# --------------------------------------------------------------------------------------------
# Options shared by the commands

Url = Annotated[
    str, typer.Option("--url", envvar="CYCLES_BASE_URL", help="Server root URL.", show_default=True)
]
AdminKey = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="CYCLES_ADMIN_API_KEY",
        help="Admin key of the server (X-Admin-API-Key).",
        show_default=False,
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="CYCLES_API_KEY",
        help="Tenant API key, used when no admin key is given.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the raw JSON instead of a table.")]
Raw = Annotated[
    bool, typer.Option("--raw", help="Show USD_MICROCENTS as integers instead of dollars.")
]


def console() -> Any:
    """A rich console that never truncates ids and amounts when output is piped."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: never truncate ids and amounts
        console = Console(width=200)
    return console


def make_table(title: str, columns: list[tuple[str, str]]) -> Any:
    """A table whose ``scope`` and ``name`` columns fold; ids and amounts never wrap."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name, justify in columns:
        # amounts, ids and units never wrap; long scopes and names fold onto more lines
        wraps = name in ("scope", "name")
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
        )
    return table


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON (the ``--json`` output)."""
    typer.echo(json.dumps(value, indent=2))


def _amount(body: dict[str, Any], field: str, raw: bool) -> str:
    value = body.get(field)
    if not isinstance(value, dict):
        return "—"
    return format_amount(int(value.get("amount", 0)), str(value.get("unit", "")), raw=raw)


# --------------------------------------------------------------------------------------------
# tenant

tenant_app = typer.Typer(help="Create, list and close tenants.", no_args_is_help=True)


@tenant_app.command("create")
def tenant_create(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id: 3-64 of a-z, 0-9 and '-'.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the id).")] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Create a tenant (creating the same tenant again is harmless)."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        body = client.call(
            "POST",
            "/v1/admin/tenants",
            json_body={"tenant_id": tenant_id, "name": name or tenant_id},
        )
        typer.echo(f"tenant {body['tenant_id']} ({body['status']}) ready")


@tenant_app.command("list")
def tenant_list(
    status: Annotated[
        str | None, typer.Option(help="Only tenants in this status (ACTIVE, SUSPENDED, CLOSED).")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """List tenants."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        params = {"status": status.upper() if status else None, "limit": 100}
        tenants = client.pages("/v1/admin/tenants", "tenants", params)
        if as_json:
            print_json(tenants)
            return
        table = make_table(
            f"{len(tenants)} tenant(s)",
            [("tenant", "left"), ("name", "left"), ("status", "left"), ("created", "left")],
        )
        for t in tenants:
            table.add_row(t["tenant_id"], t.get("name", ""), t["status"], t.get("created_at", ""))
        console().print(table)


@tenant_app.command("close")
def tenant_close(
    tenant_id: Annotated[str, typer.Argument(help="Tenant to close.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Close a tenant for good: releases its reservations, closes budgets, revokes keys."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        if not yes:
            typer.confirm(
                f"Close tenant {tenant_id}? This cannot be undone (its budgets close and its "
                "keys are revoked)",
                abort=True,
            )
        body = client.call(
            "PATCH", f"/v1/admin/tenants/{tenant_id}", json_body={"status": "CLOSED"}
        )
        typer.echo(f"tenant {body['tenant_id']} is {body['status']}")


# --------------------------------------------------------------------------------------------
# key

key_app = typer.Typer(help="Create, list and revoke tenant API keys.", no_args_is_help=True)


def key_permissions(role: str | None, permissions: list[str] | None) -> list[str]:
    """Return the permissions ``cycles key create`` asks for.

    No option: the ``agent`` role. ``--role`` alone: that role. ``--permission`` alone: exactly
    those. Both: the role's permissions plus the extra ones. ``--permission`` values may also be
    comma-separated.

    Raises:
        CliError: for an unknown role or permission (exit code 2).
    """
    extra: list[str] = []
    for value in permissions or []:
        extra.extend(part.strip() for part in value.split(",") if part.strip())
    for name in extra:
        if name not in ALL_PERMISSIONS:
            raise CliError(
                f"unknown permission {name!r}; use one of {', '.join(ALL_PERMISSIONS)}", 2
            )
    if role is None and extra:
        return list(dict.fromkeys(extra))
    name = (role or "agent").strip().lower()
    if name not in ROLES:
        raise CliError(f"unknown --role {role!r}; use one of {', '.join(ROLES)}", 2)
    return list(dict.fromkeys([*ROLES[name], *extra]))


@key_app.command("create")
def key_create(
    tenant_id: Annotated[str, typer.Argument(help="Tenant the key belongs to.")],
    name: Annotated[str, typer.Option(help="Label for the key.")] = "cli",
    role: Annotated[
        str | None,
        typer.Option(
            help="agent (the default: runtime only, cannot fund or change budgets or "
            "policies) or tenant-admin (adds budgets:read/write and policies:read/write).",
            show_default=False,
        ),
    ] = None,
    permission: Annotated[
        list[str] | None,
        typer.Option(
            "--permission",
            "--permissions",
            help="Grant exactly these permissions instead of a role (repeatable or "
            "comma-separated); with --role, grant them on top of the role's.",
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Create an API key (an agent key unless told otherwise); print its secret once.

    The secret is printed as ``export`` lines for your shell: ``eval "$(cycles key create
    acme)"`` sets ``CYCLES_BASE_URL``, ``CYCLES_API_KEY`` and ``CYCLES_TENANT``. A comment line
    on stderr says what the key may do.
    """
    with reported():
        granted = key_permissions(role, permission)
        client = ServerClient(url, admin_key=admin_key)
        payload: dict[str, Any] = {"tenant_id": tenant_id, "name": name, "permissions": granted}
        body = client.call("POST", "/v1/admin/api-keys", json_body=payload)
        typer.echo(
            f"# created key {body['key_id']} for tenant {body['tenant_id']} "
            f"(expires {body.get('expires_at', 'never')}); the secret is shown only this once",
            err=True,
        )
        typer.echo(
            f"# it may: {describe_permissions(body.get('permissions') or granted)}", err=True
        )
        typer.echo(f"export CYCLES_BASE_URL={client.url}")
        typer.echo(f"export CYCLES_API_KEY={body['key_secret']}")
        typer.echo(f"export CYCLES_TENANT={body['tenant_id']}")


@key_app.command("list")
def key_list(
    tenant_id: Annotated[str, typer.Argument(help="Tenant whose keys to list.")],
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
) -> None:
    """List a tenant's API keys (never their secrets) and their role (agent, tenant-admin...)."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        keys = client.pages("/v1/admin/api-keys", "keys", {"tenant_id": tenant_id, "limit": 100})
        if as_json:
            print_json(keys)
            return
        table = make_table(
            f"{len(keys)} key(s) of {tenant_id}",
            [
                ("key id", "left"),
                ("prefix", "left"),
                ("name", "left"),
                ("role", "left"),
                ("status", "left"),
                ("expires", "left"),
            ],
        )
        for k in keys:
            table.add_row(
                k["key_id"],
                k.get("key_prefix", "") + "…",
                k.get("name", ""),
                role_of(k.get("permissions") or []),
                k["status"],
                k.get("expires_at", ""),
            )
        console().print(table)


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (key_...), as `cycles key list` shows.")],
    reason: Annotated[str | None, typer.Option(help="Why, kept with the key.")] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Revoke an API key: it fails authentication from now on."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        body = client.call("DELETE", f"/v1/admin/api-keys/{key_id}", params={"reason": reason})
        typer.echo(f"key {body['key_id']} of tenant {body['tenant_id']} is {body['status']}")


@key_app.command("update")
def key_update(
    key_id: Annotated[str, typer.Argument(help="Key id (key_...), as `cycles key list` shows.")],
    name: Annotated[str | None, typer.Option(help="New label.")] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    role: Annotated[
        str | None,
        typer.Option(help="Replace the permissions with this role's (agent, tenant-admin)."),
    ] = None,
    permission: Annotated[
        list[str] | None,
        typer.Option(
            "--permission",
            "--permissions",
            help="Replace the permissions with exactly these (repeatable or comma-separated); "
            "with --role, the role's plus these.",
        ),
    ] = None,
    scope_filter: Annotated[
        list[str] | None,
        typer.Option("--scope-filter", help="Replace the scope filter (repeatable)."),
    ] = None,
    clear_scope_filter: Annotated[
        bool, typer.Option("--clear-scope-filter", help="Remove the scope filter.")
    ] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Change a key's name, description, permissions or scope filter (same secret).

    Its expiry and tenant cannot change: revoke it and create a new key instead.
    """
    with reported():
        payload: dict[str, Any] = {}
        if name is not None:
            payload["name"] = name
        if description is not None:
            payload["description"] = description
        if role is not None or permission:
            payload["permissions"] = key_permissions(role, permission)
        if scope_filter and clear_scope_filter:
            raise CliError("give --scope-filter or --clear-scope-filter, not both", 2)
        if scope_filter or clear_scope_filter:
            payload["scope_filter"] = list(scope_filter or [])
        if not payload:
            raise CliError(
                "nothing to change: give --name, --description, --role, --permission, "
                "--scope-filter or --clear-scope-filter",
                2,
            )
        client = ServerClient(url, admin_key=admin_key)
        body = client.call("PATCH", f"/v1/admin/api-keys/{key_id}", json_body=payload)
        typer.echo(
            f"key {body['key_id']} of tenant {body['tenant_id']} updated: "
            f"{body.get('name', '')!r}, may {describe_permissions(body.get('permissions') or [])}"
        )


# --------------------------------------------------------------------------------------------
# budget

budget_app = typer.Typer(help="Create, list and fund budgets.", no_args_is_help=True)

UnitOption = Annotated[
    str, typer.Option(help="USD_MICROCENTS, TOKENS, CREDITS or RISK_POINTS.", show_default=True)
]
TenantOption = Annotated[
    str | None, typer.Option(help="Owning tenant (default: taken from a tenant:<id> scope).")
]


def _budget_tenant(scope: str, tenant: str | None) -> str:
    found = tenant or tenant_of_scope(scope)
    if not found:
        raise CliError(
            f"cannot tell the tenant of scope {scope!r}; start the scope with tenant:<id> or "
            "pass --tenant",
            2,
        )
    return found


@budget_app.command("create")
def budget_create(
    scope: Annotated[str, typer.Argument(help="Scope, e.g. tenant:acme or tenant:acme/agent:bot.")],
    amount: Annotated[str, typer.Argument(help="Allocation: a whole number, or $1.50 in USD.")],
    unit: UnitOption = "USD_MICROCENTS",
    overdraft_limit: Annotated[
        str | None, typer.Option(help="Debt allowed at commit time (same format as AMOUNT).")
    ] = None,
    tenant: TenantOption = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Create a budget at SCOPE with AMOUNT allocated."""
    with reported():
        unit = check_unit(unit)
        allocated = parse_amount(amount, unit)
        overdraft = (
            parse_amount(overdraft_limit, unit, what="--overdraft-limit")
            if overdraft_limit is not None
            else None
        )
        tenant_id = _budget_tenant(scope, tenant)
        client = ServerClient(url, admin_key=admin_key)
        payload: dict[str, Any] = {
            "tenant_id": tenant_id,
            "scope": scope,
            "unit": unit,
            "allocated": {"unit": unit, "amount": allocated},
        }
        if overdraft is not None:
            payload["overdraft_limit"] = {"unit": unit, "amount": overdraft}
        body = client.call("POST", "/v1/admin/budgets", json_body=payload)
        typer.echo(
            f"budget {body['scope']} ({unit}) created: allocated "
            f"{_amount(body, 'allocated', False)}, remaining {_amount(body, 'remaining', False)}"
        )


@budget_app.command("list")
def budget_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's budgets.")] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    as_json: AsJson = False,
    raw: Raw = False,
) -> None:
    """List budgets with their limits and status."""
    with reported():
        client = ServerClient(url, admin_key=admin_key)
        ledgers = client.pages("/v1/admin/budgets", "ledgers", {"tenant_id": tenant, "limit": 100})
        if as_json:
            print_json(ledgers)
            return
        table = make_table(
            f"{len(ledgers)} budget(s)",
            [
                ("scope", "left"),
                ("unit", "left"),
                ("allocated", "right"),
                ("remaining", "right"),
                ("overdraft limit", "right"),
                ("debt", "right"),
                ("status", "left"),
            ],
        )
        for b in ledgers:
            table.add_row(
                b["scope"],
                b["unit"],
                _amount(b, "allocated", raw),
                _amount(b, "remaining", raw),
                _amount(b, "overdraft_limit", raw),
                _amount(b, "debt", raw),
                b.get("status", ""),
            )
        console().print(table)


@budget_app.command("fund")
def budget_fund(
    scope: Annotated[str, typer.Argument(help="Scope of the budget.")],
    amount: Annotated[str, typer.Argument(help="A whole number, or $1.50 in USD.")],
    op: Annotated[
        str,
        typer.Option(
            "--op",
            help="credit or debit AMOUNT; reset: allocation becomes AMOUNT; reset-spent: "
            "allocation becomes AMOUNT and spent 0 (new period); repay-debt: pay AMOUNT of debt.",
        ),
    ] = "credit",
    unit: UnitOption = "USD_MICROCENTS",
    tenant: TenantOption = None,
    reason: Annotated[str | None, typer.Option(help="Why, kept in the audit trail.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Reuse to make a retried command apply once.")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Change a budget: credit or debit it, reset its allocation or spent, or repay debt."""
    with reported():
        operation = FUND_OPERATIONS.get(op.strip().lower().replace("_", "-"))
        if operation is None:
            raise CliError(f"unknown --op {op!r}; use one of {', '.join(FUND_OPERATIONS)}", 2)
        unit = check_unit(unit)
        value = parse_amount(amount, unit)
        tenant_id = _budget_tenant(scope, tenant)
        client = ServerClient(url, admin_key=admin_key)
        payload: dict[str, Any] = {
            "operation": operation,
            "amount": {"unit": unit, "amount": value},
            "idempotency_key": idempotency_key or f"cli-{uuid.uuid4()}",
        }
        if reason:
            payload["reason"] = reason
        body = client.call(
            "POST",
            "/v1/admin/budgets/fund",
            json_body=payload,
            params={"scope": scope, "unit": unit, "tenant_id": tenant_id},
        )
        typer.echo(
            f"{operation} {scope}: allocated {_amount(body, 'previous_allocated', False)} -> "
            f"{_amount(body, 'new_allocated', False)}, remaining "
            f"{_amount(body, 'previous_remaining', False)} -> "
            f"{_amount(body, 'new_remaining', False)}, debt {_amount(body, 'new_debt', False)}"
        )


# --------------------------------------------------------------------------------------------
# balances


def balances(
    tenant: Annotated[
        str | None, typer.Option(help="Tenant to show (default: all, or the API key's tenant).")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    raw: Raw = False,
) -> None:
    """Show budgets as a table: allocated, reserved, spent, debt and remaining.

    With the admin key it lists every budget (of ``--tenant`` if given); with only a tenant API
    key it shows that tenant's balances (``GET /v1/balances``).
    """
    with reported():
        if admin_key:
            client = ServerClient(url, admin_key=admin_key)
            rows = client.pages("/v1/admin/budgets", "ledgers", {"tenant_id": tenant, "limit": 100})
        else:
            if not api_key:
                raise CliError(
                    "no key: pass --admin-key (or CYCLES_ADMIN_API_KEY) to see every budget, or "
                    "--api-key (or CYCLES_API_KEY) to see one tenant's",
                    2,
                )
            client = ServerClient(url, api_key=api_key)
            if tenant is None:
                tenant = client.call("GET", "/v1/auth/introspect").get("tenant_id")
            rows = client.pages("/v1/balances", "balances", {"tenant": tenant, "limit": 200})
        if as_json:
            print_json(rows)
            return
        table = make_table(
            f"Balances ({len(rows)} budget(s))",
            [
                ("scope", "left"),
                ("unit", "left"),
                ("allocated", "right"),
                ("reserved", "right"),
                ("spent", "right"),
                ("debt", "right"),
                ("remaining", "right"),
            ],
        )
        for row in rows:
            scope = row.get("scope_path") or row.get("scope", "")
            unit = row.get("unit") or row.get("remaining", {}).get("unit", "")
            table.add_row(
                scope,
                unit,
                _amount(row, "allocated", raw),
                _amount(row, "reserved", raw),
                _amount(row, "spent", raw),
                _amount(row, "debt", raw),
                _amount(row, "remaining", raw),
            )
        console().print(table)


def register(cli: typer.Typer) -> None:
    """Add the admin command groups and ``balances`` to the ``cycles`` app."""
    cli.add_typer(tenant_app, name="tenant")
    cli.add_typer(key_app, name="key")
    cli.add_typer(budget_app, name="budget")
    cli.command("balances")(balances)
