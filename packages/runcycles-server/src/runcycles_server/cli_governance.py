r"""Action-governance commands of the ``cycles`` CLI: policies and quota counters over HTTP.

::

    cycles policy create support-agent --scope 'tenant:acme/agent:support' \
        --deny payment.charge --quota message.email.send:20:per_run
    cycles policy create --from-file policy.yaml        # any Policy field (YAML or JSON)
    cycles policy list --tenant acme
    cycles policy update pol_... --priority 20 --quota message.email.send:10:run
    cycles policy update pol_... --disable
    cycles quota counters --tenant acme --run-id run-42
    cycles quota reset --tenant acme --scope tenant:acme --kind message.email.send \
        --window per_run --key run-42 --reason "double count"

They talk to the server as the other admin commands do (``--url``, ``--admin-key`` or
``CYCLES_ADMIN_API_KEY``); the policy and counter listings also work with a tenant API key
(``--api-key`` / ``CYCLES_API_KEY``) that holds the permission. ``--quota KIND:MAX:WINDOW``
takes the spec's window names or the short ``minute``, ``hour``, ``day``, ``tenant-day`` and
``run``. With ``--from-file``, a flag that is also given replaces the file's field. Bad values
exit with 2 before the server is called; a refusal prints the server's one-line reason and
exits with 1.
"""

from __future__ import annotations

import json
from pathlib import Path
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
    tenant_of_scope,
)

__all__ = ["WINDOWS", "parse_quota", "parse_window", "read_policy_file", "register_governance"]

DEFAULT_URL: Final = "http://127.0.0.1:7878"
WINDOWS: Final = {
    "per_minute_tumbling": "per_minute_tumbling",
    "per_hour_tumbling": "per_hour_tumbling",
    "per_day_tumbling": "per_day_tumbling",
    "per_tenant_per_day": "per_tenant_per_day",
    "per_run": "per_run",
    "minute": "per_minute_tumbling",
    "hour": "per_hour_tumbling",
    "day": "per_day_tumbling",
    "tenant-day": "per_tenant_per_day",
    "run": "per_run",
}
"""Window names ``--quota`` and ``--window`` accept: the spec's, and short aliases."""
RISK_CLASSES: Final = ("read_only", "side_effect", "external_side_effect", "high_risk")
UNLIMITED: Final = 2**63 - 1  # = governance_api.UNLIMITED (not imported: startup time)


# --------------------------------------------------------------------------------------------
# Values


def parse_window(text: str, what: str = "--window") -> str:
    """Return the spec's window name for ``text`` (a spec name or a short alias).

    Raises:
        CliError: naming the accepted windows (exit code 2).
    """
    normalized = text.strip().lower()
    window = WINDOWS.get(normalized) or WINDOWS.get(normalized.replace("_", "-"))
    if window is None:
        raise CliError(f"{what}: unknown window {text!r}; use one of {', '.join(WINDOWS)}", 2)
    return window


def parse_quota(text: str, *, risk: bool = False) -> dict[str, Any]:
    """Parse ``KIND:MAX:WINDOW`` (``CLASS:MAX:WINDOW`` with ``risk``) into a quota rule.

    Raises:
        CliError: naming the part that is wrong (exit code 2).
    """
    flag = "--risk-quota" if risk else "--quota"
    head = "CLASS" if risk else "KIND"
    parts = text.strip().rsplit(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise CliError(
            f"{flag} {text!r} is not {head}:MAX:WINDOW (e.g. "
            f"{'external_side_effect:50:day' if risk else 'message.email.send:20:per_run'})",
            2,
        )
    name, count, window = (p.strip() for p in parts)
    try:
        max_calls = int(count.replace("_", ""))
    except ValueError:
        max_calls = 0
    if not 1 <= max_calls <= 100_000:
        raise CliError(f"{flag} {text!r}: MAX must be a whole number from 1 to 100000", 2)
    rule: dict[str, Any] = {"max_calls": max_calls, "window": parse_window(window, flag)}
    if risk:
        if name not in RISK_CLASSES:
            raise CliError(
                f"{flag} {text!r}: unknown risk class {name!r}; use one of "
                f"{', '.join(RISK_CLASSES)}",
                2,
            )
        return {"risk_class": name, **rule}
    return {"action_kind": name, **rule}


def _kinds(values: list[str] | None) -> list[str] | None:
    """Repeated or comma-separated kinds; ``None`` when the flag was not given."""
    if values is None:
        return None
    return [kind.strip() for value in values for kind in value.split(",") if kind.strip()]


def read_policy_file(path: Path) -> dict[str, Any]:
    """Read a policy body from a YAML or JSON file (``.json``: JSON, otherwise YAML).

    Raises:
        CliError: the file cannot be read or is not a mapping (exit code 2).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--from-file {path}: cannot read it ({exc.strerror})", 2) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CliError(f"--from-file {path}: not valid JSON: {exc}", 2) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())
            raise CliError(f"--from-file {path}: not valid YAML: {problem}", 2) from None
    if not isinstance(data, dict):
        raise CliError(
            f"--from-file {path}: expected a mapping of Policy fields (name, scope_pattern, "
            f"...), got {type(data).__name__}",
            2,
        )
    return data


def _client(url: str, admin_key: str | None, api_key: str | None) -> ServerClient:
    if not admin_key and not api_key:
        raise CliError(
            "no key: pass --admin-key (or CYCLES_ADMIN_API_KEY), or --api-key (or "
            "CYCLES_API_KEY) for a tenant key that holds the permission",
            2,
        )
    if admin_key:
        return ServerClient(url, admin_key=admin_key)
    return ServerClient(url, api_key=api_key)


def _rules(policy: dict[str, Any]) -> str:
    """One line saying what a policy does to actions."""
    parts = []
    if policy.get("denied_action_kinds"):
        parts.append("deny " + ", ".join(policy["denied_action_kinds"]))
    if policy.get("allowed_action_kinds"):
        parts.append("only " + ", ".join(policy["allowed_action_kinds"]))
    for rule in policy.get("action_quotas") or []:
        parts.append(f"{rule['action_kind']} ≤{rule['max_calls']}/{rule['window']}")
    for rule in policy.get("risk_class_quotas") or []:
        parts.append(f"{rule['risk_class']} ≤{rule['max_calls']}/{rule['window']}")
    return "; ".join(parts) or "—"


def _describe(policy: dict[str, Any]) -> str:
    return (
        f"policy {policy['policy_id']} ({policy.get('name', '')}) on {policy['scope_pattern']}, "
        f"priority {policy.get('priority', 0)}, {policy['status']}: {_rules(policy)}"
    )


# --------------------------------------------------------------------------------------------
# policy

policy_app = typer.Typer(
    help="Create, list and update action-governance policies (allow/deny lists, quotas).",
    no_args_is_help=True,
)

Deny = Annotated[
    list[str] | None,
    typer.Option("--deny", help="Action kind to deny (repeatable or comma-separated)."),
]
Allow = Annotated[
    list[str] | None,
    typer.Option("--allow", help="Allow only these action kinds (repeatable or comma-separated)."),
]
Quota = Annotated[
    list[str] | None,
    typer.Option(
        "--quota",
        help="KIND:MAX:WINDOW, e.g. message.email.send:20:per_run (repeatable; windows: "
        "per_run/run, per_minute_tumbling/minute, hour, day, per_tenant_per_day/tenant-day).",
    ),
]
RiskQuota = Annotated[
    list[str] | None,
    typer.Option(
        "--risk-quota",
        help="CLASS:MAX:WINDOW over every kind of a risk class, e.g. high_risk:5:day.",
    ),
]
Priority = Annotated[
    int | None, typer.Option(min=0, help="Higher wins when several policies match.")
]
Description = Annotated[str | None, typer.Option(help="What the policy is for.")]
FromFile = Annotated[
    Path | None,
    typer.Option(
        "--from-file",
        help="YAML or JSON file with any Policy fields; flags given too replace its fields.",
    ),
]


def _flag_fields(
    *,
    description: str | None,
    priority: int | None,
    deny: list[str] | None,
    allow: list[str] | None,
    quota: list[str] | None,
    risk_quota: list[str] | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if description is not None:
        fields["description"] = description
    if priority is not None:
        fields["priority"] = priority
    denied, allowed = _kinds(deny), _kinds(allow)
    if denied is not None:
        fields["denied_action_kinds"] = denied
    if allowed is not None:
        fields["allowed_action_kinds"] = allowed
    if quota is not None:
        fields["action_quotas"] = [parse_quota(q) for q in quota]
    if risk_quota is not None:
        fields["risk_class_quotas"] = [parse_quota(q, risk=True) for q in risk_quota]
    return fields


@policy_app.command("create")
def policy_create(
    name: Annotated[
        str | None, typer.Argument(help="Policy name, unique in its tenant.", show_default=False)
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option(help="scope_pattern, e.g. tenant:acme or 'tenant:acme/agent:*'."),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="Owning tenant (default: from a tenant:<id> scope; admin key only)."),
    ] = None,
    priority: Priority = None,
    deny: Deny = None,
    allow: Allow = None,
    quota: Quota = None,
    risk_quota: RiskQuota = None,
    description: Description = None,
    from_file: FromFile = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Create a policy: which action kinds a scope may use, and how often."""
    with reported():
        body = read_policy_file(from_file) if from_file is not None else {}
        if name is not None:
            body["name"] = name
        if scope is not None:
            body["scope_pattern"] = scope
        body.update(
            _flag_fields(
                description=description,
                priority=priority,
                deny=deny,
                allow=allow,
                quota=quota,
                risk_quota=risk_quota,
            )
        )
        if not body.get("name"):
            raise CliError("give the policy a NAME (or a name in --from-file)", 2)
        if not body.get("scope_pattern"):
            raise CliError(
                "give --scope (the scope_pattern, e.g. tenant:acme) or scope_pattern in "
                "--from-file",
                2,
            )
        client = _client(url, admin_key, api_key)
        if client.is_admin:
            owner = tenant or body.get("tenant_id") or tenant_of_scope(str(body["scope_pattern"]))
            if not owner:
                raise CliError(
                    f"cannot tell the tenant of scope {body['scope_pattern']!r}; start it with "
                    "tenant:<id> or pass --tenant",
                    2,
                )
            body["tenant_id"] = owner
        elif tenant is not None:
            raise CliError("--tenant is for the admin key; a tenant key implies its tenant", 2)
        created = client.call("POST", "/v1/admin/policies", json_body=body)
        if as_json:
            print_json(created)
            return
        typer.echo(f"created {_describe(created)}")


@policy_app.command("list")
def policy_list(
    tenant: Annotated[
        str | None, typer.Option(help="Whose policies (required with the admin key).")
    ] = None,
    status: Annotated[str | None, typer.Option(help="ACTIVE or DISABLED only.")] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only policies naming this action kind in a rule or list.")
    ] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List policies, highest priority first (the first that matches a request applies)."""
    with reported():
        client = _client(url, admin_key, api_key)
        if client.is_admin and not tenant:
            raise CliError("--tenant is required with the admin key: whose policies?", 2)
        params = {
            "tenant_id": tenant if client.is_admin else None,
            "status": status.upper() if status else None,
            "references_action_kind": kind,
            "limit": 100,
        }
        policies = client.pages("/v1/admin/policies", "policies", params)
        if as_json:
            print_json(policies)
            return
        table = make_table(
            f"{len(policies)} policy(ies)" + (f" of {tenant}" if tenant else ""),
            [
                ("policy id", "left"),
                ("name", "left"),
                ("scope", "left"),
                ("priority", "right"),
                ("status", "left"),
                ("rules", "left"),
            ],
        )
        for p in policies:
            table.add_row(
                p["policy_id"],
                p.get("name", ""),
                p["scope_pattern"],
                str(p.get("priority", 0)),
                p["status"],
                _rules(p),
            )
        console().print(table)


@policy_app.command("update")
def policy_update(
    policy_id: Annotated[str, typer.Argument(help="Policy id (pol_...), as `policy list` shows.")],
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    priority: Priority = None,
    deny: Deny = None,
    allow: Allow = None,
    quota: Quota = None,
    risk_quota: RiskQuota = None,
    description: Description = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(
            "--clear",
            help="Empty a list: deny, allow, quotas or risk-quotas (repeatable).",
        ),
    ] = None,
    enable: Annotated[
        bool | None,
        typer.Option("--enable/--disable", help="Make the policy ACTIVE or DISABLED."),
    ] = None,
    from_file: FromFile = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Change a policy: only the fields given change; a list given replaces the stored one."""
    with reported():
        body = read_policy_file(from_file) if from_file is not None else {}
        if name is not None:
            body["name"] = name
        if enable is not None:
            body["status"] = "ACTIVE" if enable else "DISABLED"
        lists = {
            "deny": "denied_action_kinds",
            "allow": "allowed_action_kinds",
            "quotas": "action_quotas",
            "risk-quotas": "risk_class_quotas",
        }
        for item in clear or []:
            field = lists.get(item.strip().lower())
            if field is None:
                raise CliError(f"--clear {item!r}: use one of {', '.join(lists)}", 2)
            body[field] = []
        body.update(
            _flag_fields(
                description=description,
                priority=priority,
                deny=deny,
                allow=allow,
                quota=quota,
                risk_quota=risk_quota,
            )
        )
        if not body:
            raise CliError("nothing to change: give at least one option (see --help)", 2)
        client = _client(url, admin_key, api_key)
        updated = client.call("PATCH", f"/v1/admin/policies/{policy_id}", json_body=body)
        if as_json:
            print_json(updated)
            return
        typer.echo(f"updated {_describe(updated)}")


# --------------------------------------------------------------------------------------------
# quota

quota_app = typer.Typer(help="Inspect and reset action quota counters.", no_args_is_help=True)


@quota_app.command("counters")
def quota_counters(
    tenant: Annotated[
        str | None, typer.Option(help="Whose counters (required with the admin key).")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="This scope and the scopes below it.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this action kind (or __risk__).")] = None,
    window: Annotated[str | None, typer.Option(help="Only this window (e.g. per_run).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Only this run's per_run counters.")] = None,
    include_zero: Annotated[
        bool, typer.Option("--include-zero", help="Also counters at 0 (e.g. after a reset).")
    ] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Show live quota counters: what each rule has used in its current window."""
    with reported():
        params: dict[str, Any] = {
            "scope": scope,
            "action_kind": kind,
            "window": parse_window(window) if window else None,
            "run_id": run_id,
            "include_zero": "true" if include_zero else None,
            "limit": 200,
        }
        client = _client(url, admin_key, api_key)
        if client.is_admin:
            if not tenant:
                raise CliError("--tenant is required with the admin key: whose counters?", 2)
            params["tenant_id"] = tenant
        counters = client.pages("/v1/admin/action-quota-counters", "counters", params)
        if as_json:
            print_json(counters)
            return
        table = make_table(
            f"{len(counters)} counter(s)",
            [
                ("scope", "left"),
                ("kind", "left"),
                ("window", "left"),
                ("window key", "left"),
                ("used", "right"),
                ("limit", "right"),
                ("ends / expires", "left"),
            ],
        )
        for c in counters:
            kind_text = c["action_kind"]
            if c.get("risk_class"):
                kind_text = f"{kind_text} ({c['risk_class']})"
            limit = c["limit"]
            table.add_row(
                c["scope"],
                kind_text,
                c["window"],
                c.get("window_key", ""),
                str(c["used"]),
                "none (rule removed)" if limit >= UNLIMITED else str(limit),
                c.get("expires_at", ""),
            )
        console().print(table)


@quota_app.command("reset")
def quota_reset(
    tenant: Annotated[str, typer.Option(help="Tenant that owns the counter.")],
    scope: Annotated[str, typer.Option(help="The counter's scope, as `quota counters` shows.")],
    kind: Annotated[str, typer.Option(help="The counter's action kind (or __risk__).")],
    window: Annotated[str, typer.Option(help="The counter's window (e.g. per_run).")],
    key: Annotated[str, typer.Option(help="The window key: the run id, or the UTC bucket.")],
    risk_class: Annotated[
        str | None, typer.Option(help="The risk class of a __risk__ counter.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why, kept in the audit log.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Reset one quota counter to 0 (incident response; admin key only; audited)."""
    with reported():
        body: dict[str, Any] = {
            "tenant_id": tenant,
            "scope": scope,
            "action_kind": kind,
            "window": parse_window(window),
            "window_key": key,
        }
        if risk_class is not None:
            body["risk_class"] = risk_class
        if reason is not None:
            body["reason"] = reason
        client = ServerClient(url, admin_key=admin_key)
        if not yes:
            typer.confirm(
                f"Reset the {body['window']} counter of {kind} at {scope} ({key}) to 0? Its "
                "quota starts over; the reset is audited",
                abort=True,
            )
        answer = client.call("POST", "/v1/admin/action-quota-counters/reset", json_body=body)
        counter = answer["counter"]
        typer.echo(
            f"reset {counter['action_kind']} {counter['window']} counter at {counter['scope']} "
            f"({counter.get('window_key', key)}): used {answer['previous_used']} -> "
            f"{counter['used']}"
        )


def register_governance(cli: typer.Typer) -> None:
    """Add the ``policy`` and ``quota`` command groups to the ``cycles`` app."""
    cli.add_typer(policy_app, name="policy")
    cli.add_typer(quota_app, name="quota")
