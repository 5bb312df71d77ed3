"""The ``cycles`` command line: run the server, provision tenants, keys and budgets, run the demo.

::

    cycles demo                              # offline: a governed agent until the budget says no
    cycles serve --dev                       # SQLite in the user data dir, demo tenant + key
    cycles serve --db ./cycles.db --admin-key "$ADMIN" --workers 4 --port 7878
    cycles serve --redis redis://localhost:6379/0 --admin-key "$ADMIN"
    cycles tenant create acme && eval "$(cycles key create acme)"
    cycles budget create tenant:acme '$25' && cycles balances
    cycles serve --action-kinds kinds.yaml   # declare the operator's custom.* action kinds
    cycles policy create support --scope 'tenant:acme/agent:*' --deny payment.charge
    cycles quota counters --tenant acme

Several workers share one SQLite file safely (one ``BEGIN IMMEDIATE`` transaction per
mutation). Configuration reaches worker processes through environment variables
(``CYCLES_DB``, ``CYCLES_ADMIN_API_KEY``, ``CYCLES_SQLITE_SYNCHRONOUS``, ``CYCLES_REDIS_URL``,
``CYCLES_ACCESS_LOG``, ``CYCLES_MAX_BODY_BYTES``, ``CYCLES_RATE_LIMIT``,
``CYCLES_RETENTION_DAYS``, ``CYCLES_ACTION_KINDS``, ``CYCLES_METRICS``,
``CYCLES_METRICS_PUBLIC``, ``CYCLES_METRICS_TOP_SCOPES``, and the evidence settings of
:mod:`runcycles_server.cli_evidence`), which :func:`app_from_env` reads.

Imports of the server itself are deferred to the commands that need them, so ``cycles --help``
and the admin commands start quickly.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final
from urllib.parse import urlsplit, urlunsplit

import typer

from runcycles_server.cli_admin import CliError, budget_app, register, reported, tenant_app
from runcycles_server.cli_bulk import register as register_bulk
from runcycles_server.cli_events import register_events
from runcycles_server.cli_evidence import (
    DEFAULT_EVIDENCE_RATE_LIMIT,
    DEFAULT_EVIDENCE_RETENTION_DAYS,
    ENV_EVIDENCE,
    default_keys_path,
    evidence_rate_limit_from_env,
    issuer_from_env,
    prepare_serve,
    register_evidence,
)
from runcycles_server.cli_governance import register_governance
from runcycles_server.cli_webhooks import register_webhooks

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from runcycles_server.governance import Registry
    from runcycles_server.stores.base import Store

DEV_TENANT: Final = "demo"
DEV_BUDGET_USD_MICROCENTS: Final = 100 * 10**8  # 100 USD
ENV_DB: Final = "CYCLES_DB"
ENV_ADMIN_KEY: Final = "CYCLES_ADMIN_API_KEY"
ENV_SYNCHRONOUS: Final = "CYCLES_SQLITE_SYNCHRONOUS"
ENV_SQLITE_MMAP: Final = "CYCLES_SQLITE_MMAP"
"""``1``: several worker processes share the SQLite file (``SqliteStore(mmap=True)``)."""
ENV_REDIS: Final = "CYCLES_REDIS_URL"
ENV_REDIS_PREFIX: Final = "CYCLES_REDIS_PREFIX"
ENV_ACCESS_LOG: Final = "CYCLES_ACCESS_LOG"
ENV_MAX_BODY: Final = "CYCLES_MAX_BODY_BYTES"
ENV_RATE_LIMIT: Final = "CYCLES_RATE_LIMIT"
ENV_RETENTION_DAYS: Final = "CYCLES_RETENTION_DAYS"
ENV_STORE_TIMEOUT: Final = "CYCLES_STORE_TIMEOUT_S"
ENV_ACTION_KINDS: Final = "CYCLES_ACTION_KINDS"
ENV_METRICS: Final = "CYCLES_METRICS"
ENV_METRICS_PUBLIC: Final = "CYCLES_METRICS_PUBLIC"
ENV_METRICS_TOP_SCOPES: Final = "CYCLES_METRICS_TOP_SCOPES"
DEFAULT_METRICS_TOP_SCOPES: Final = 100  # = metrics.DEFAULT_TOP_SCOPES (not imported: startup)
ENV_DETECTORS: Final = "CYCLES_DETECTORS"
ENV_WEBHOOK_POLL: Final = "CYCLES_WEBHOOK_POLL_S"
ENV_WEBHOOK_LEASE: Final = "CYCLES_WEBHOOK_LEASE_S"
ENV_WEBHOOK_TIMEOUT: Final = "CYCLES_WEBHOOK_TIMEOUT_S"
ENV_CONSOLE: Final = "CYCLES_CONSOLE"
DEV_POLICY: Final = "dev-example-guardrails"
DEV_POLICY_BODY: Final = {
    "name": DEV_POLICY,
    "description": "Example created by `cycles serve --dev`: change it with `cycles policy update`",
    "scope_pattern": f"tenant:{DEV_TENANT}",
    "denied_action_kinds": ["payment.charge"],
    "action_quotas": [{"action_kind": "message.email.send", "max_calls": 20, "window": "per_run"}],
}
"""The example policy of the dev tenant: no payments, at most 20 emails per run."""
DEFAULT_RETENTION_DAYS: Final = 7  # = app.DEFAULT_RETENTION_DAYS (not imported: startup time)
LOG_LEVELS: Final = ("critical", "error", "warning", "info", "debug", "trace")
GRACEFUL_SHUTDOWN_S: Final = 30
DEFAULT_STORE_TIMEOUT_S: Final = 2.0  # = stores.redis.DEFAULT_TIMEOUT_S (not imported: startup)
FD_HEADROOM: Final = 128
"""File descriptors kept free beyond --max-connections (store connections, logs, sockets)."""

cli = typer.Typer(
    add_completion=False,
    help="Cycles: runtime budget authority for AI agents (server, admin commands, demo).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"runcycles-server {version('runcycles-server')}")
        raise typer.Exit()


@cli.callback()
def _group(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Cycles: runtime budget authority for AI agents (server, admin commands, demo)."""


def default_db_path() -> Path:
    """Return the default database file: ``<user data dir>/runcycles/cycles.db``."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("runcycles", appauthor=False)) / "cycles.db"


def _prepare_webhook_key(path: Path | None, redis: str | None, db: Path | None) -> str:
    """Create (or check) the webhook key and point the workers at it; describe it.

    Raises:
        CliError: an unusable key file or document.
    """
    from runcycles_server.webhooks.sealing import KEY_ENV, KEY_FILE_ENV, SealingError, SecretBox

    try:
        if os.environ.get(KEY_ENV):
            box = SecretBox.from_environment(None)
            return f"webhook secrets: sealed with ${KEY_ENV} (key {box.active})"
        chosen = path or default_webhook_key_path(redis, db)
        box = SecretBox.load_or_create(chosen)
    except SealingError as exc:
        raise CliError(str(exc)) from None
    os.environ[KEY_FILE_ENV] = str(chosen.resolve())
    return f"webhook secrets: sealed with {chosen} (key {box.active})"


def default_webhook_key_path(redis_url: str | None, db: Path | None = None) -> Path:
    """The webhook sealing key file: beside the SQLite file, or in the data directory (Redis)."""
    if redis_url:
        return default_db_path().with_name("webhook-key.json")
    path = db or Path(os.environ.get(ENV_DB) or default_db_path())
    return path.with_name(path.stem + ".webhook-key.json")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and banners)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def app_from_env() -> Starlette:
    """Build the app from environment variables (the uvicorn factory for worker processes)."""
    from runcycles_server.app import create_app
    from runcycles_server.web import DEFAULT_MAX_BODY_BYTES

    admin_key = os.environ.get(ENV_ADMIN_KEY) or None
    max_body = int(os.environ.get(ENV_MAX_BODY) or DEFAULT_MAX_BODY_BYTES)
    rate_limit = _env_number(ENV_RATE_LIMIT, None)
    retention_days = _env_number(ENV_RETENTION_DAYS, DEFAULT_RETENTION_DAYS)
    store: Store
    redis_url = os.environ.get(ENV_REDIS)
    if redis_url:
        from runcycles_server.ledger import DAY_MS
        from runcycles_server.stores.redis import DEFAULT_PREFIX, RedisStore

        timeout_s = _env_number(ENV_STORE_TIMEOUT, DEFAULT_STORE_TIMEOUT_S)
        if not timeout_s:
            raise SystemExit(f"{ENV_STORE_TIMEOUT} must be a positive number of seconds")
        try:
            store = RedisStore(
                redis_url,
                prefix=os.environ.get(ENV_REDIS_PREFIX) or DEFAULT_PREFIX,
                # the TTL of finished reservations and events (0 = keep them forever)
                retention_ms=round(retention_days * DAY_MS) if retention_days else None,
                timeout_s=timeout_s,
            )
        except ValueError as exc:
            raise SystemExit(f"{ENV_RETENTION_DAYS}: {exc}") from None
    else:
        from runcycles_server.stores.sqlite import SqliteStore

        synchronous = os.environ.get(ENV_SYNCHRONOUS, "NORMAL").upper()
        if synchronous not in ("NORMAL", "FULL"):
            raise SystemExit(f"{ENV_SYNCHRONOUS} must be NORMAL or FULL, not {synchronous!r}")
        mmap = os.environ.get(ENV_SQLITE_MMAP, "0")
        if mmap not in ("0", "1"):
            raise SystemExit(
                f"{ENV_SQLITE_MMAP} must be 1 (several worker processes share the file) or 0, "
                f"not {mmap!r}"
            )
        store = SqliteStore(
            os.environ.get(ENV_DB) or default_db_path(),
            synchronous="FULL" if synchronous == "FULL" else "NORMAL",
            mmap=mmap == "1",
        )
    kinds_file = os.environ.get(ENV_ACTION_KINDS)
    if kinds_file:
        from runcycles_server.governance import DeclarationError, Registry

        try:
            store.registry = Registry.load(kinds_file)
        except DeclarationError as exc:
            raise SystemExit(f"{ENV_ACTION_KINDS}: {exc}") from None
    from runcycles_server.events.rates import DetectorConfig

    try:
        detectors = DetectorConfig.parse(os.environ.get(ENV_DETECTORS) or "")
    except ValueError as exc:
        raise SystemExit(f"{ENV_DETECTORS}: {exc}") from None
    from runcycles_server.app import WebhookOptions
    from runcycles_server.webhooks.sealing import SealingError, SecretBox

    try:
        webhook_key = SecretBox.from_environment(default_webhook_key_path(redis_url))
    except SealingError as exc:
        raise SystemExit(f"webhook key: {exc}") from None
    hooks = WebhookOptions(
        poll_interval_s=_env_number(ENV_WEBHOOK_POLL, None) or 1.0,
        lease_ms=round((_env_number(ENV_WEBHOOK_LEASE, None) or 60.0) * 1000),
        timeout_s=_env_number(ENV_WEBHOOK_TIMEOUT, None) or 10.0,
    )
    try:
        app = create_app(
            store,
            admin_api_key=admin_key,
            max_body_bytes=max_body,
            rate_limit_per_s=rate_limit or None,  # 0 (or unset) = no rate limit
            retention_days=retention_days or None,  # 0 = keep finished reservations forever
            metrics=os.environ.get(ENV_METRICS) == "1",
            metrics_public=os.environ.get(ENV_METRICS_PUBLIC) == "1",
            metrics_top_scopes=int(
                _env_number(ENV_METRICS_TOP_SCOPES, DEFAULT_METRICS_TOP_SCOPES) or 0
            ),
            detectors=detectors,
            webhook_options=hooks,
            evidence=issuer_from_env(),
            evidence_requests_per_minute=evidence_rate_limit_from_env(),
            console=os.environ.get(ENV_CONSOLE, "1") == "1",
            webhook_key=webhook_key,
        )
    except ValueError as exc:
        raise SystemExit(
            f"{ENV_RATE_LIMIT} / {ENV_RETENTION_DAYS} / {ENV_METRICS_TOP_SCOPES}: {exc}"
        ) from None
    if os.environ.get(ENV_ACCESS_LOG) == "1":
        from runcycles_server.access_log import AccessLogMiddleware, configure_access_logger

        configure_access_logger()
        app.add_middleware(AccessLogMiddleware)  # outermost: sees request id and tenant
    return app


def _env_number(name: str, default: float | None) -> float | None:
    """Read a non-negative number from the environment (unset or blank: ``default``)."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, not {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise SystemExit(f"{name} must be a finite number >= 0, not {raw!r}")
    return value


async def bootstrap_dev(store: Store) -> str:
    """Create the demo tenant and budget if missing and a fresh agent key; return its secret."""
    from runcycles_server import ledger
    from runcycles_server.ledger import ApiKeyRow, BudgetRow, LedgerError, TenantRow
    from runcycles_server.roles import AGENT_PERMISSIONS, describe_permissions
    from runcycles_server.stores.base import new_id

    await store.create_tenant(TenantRow(DEV_TENANT, "Demo tenant"))
    secret = "cyc_live_" + secrets.token_urlsafe(24)
    await store.create_api_key(
        ApiKeyRow(
            key_id=new_id("key"),
            key_hash=ledger.hash_api_key(secret),
            key_prefix=secret[:14],
            tenant_id=DEV_TENANT,
            name="dev",
            permissions=list(AGENT_PERMISSIONS),
        )
    )
    typer.echo(
        f"# the dev API key is an agent key ({describe_permissions(AGENT_PERMISSIONS)})", err=True
    )
    scope = f"tenant:{DEV_TENANT}"
    if await store.get_budget(scope, "USD_MICROCENTS") is None:
        try:
            await store.create_budget(
                BudgetRow(
                    scope=scope,
                    unit="USD_MICROCENTS",
                    tenant_id=DEV_TENANT,
                    allocated=DEV_BUDGET_USD_MICROCENTS,
                    remaining=DEV_BUDGET_USD_MICROCENTS,
                    ledger_id=new_id("ldg"),
                    rollover_policy="NONE",
                )
            )
        except LedgerError as exc:  # e.g. the demo tenant was closed earlier
            typer.echo(f"note: could not create the demo budget: {exc.message}", err=True)
    await _example_policy(store)
    return secret


async def _example_policy(store: Store) -> None:
    """Create the dev tenant's example policy unless it exists; say what it does (stderr)."""
    from runcycles_server.governance import policy_from_create
    from runcycles_server.ledger import LedgerError

    policy = next((p for p in await store.list_policies(DEV_TENANT) if p.name == DEV_POLICY), None)
    if policy is None:
        try:
            policy = await store.create_policy(
                policy_from_create(
                    DEV_TENANT,
                    DEV_POLICY_BODY,
                    policy_id=store.new_policy_id(DEV_TENANT),
                    now_ms=store.clock(),
                    registry=store.registry,
                )
            )
        except LedgerError as exc:  # e.g. the demo tenant was closed earlier
            typer.echo(f"note: could not create the example policy: {exc.message}", err=True)
            return
    typer.echo(
        f"# example policy {policy.policy_id} ({policy.name}) on {policy.scope_pattern}: "
        "payment.charge is denied (409 ACTION_KIND_DENIED); at most 20 message.email.send per "
        "run (send subject.dimensions.run_id; the 21st is 409 ACTION_QUOTA_EXCEEDED)",
        err=True,
    )
    typer.echo(
        f"# see it with `cycles policy list --tenant {DEV_TENANT}`, change it with "
        f"`cycles policy update {policy.policy_id} ...` (docs/governance.md)",
        err=True,
    )


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CliError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); stop whatever uses "
                "that port or pick another with --port"
            ) from None


def _open_store(
    db: Path | None, redis: str | None, redis_prefix: str | None, durability: str
) -> tuple[Store, str]:
    """Open the configured store (creating or migrating the SQLite file); describe it."""
    if redis is not None:
        import asyncio

        from runcycles_server.stores.redis import DEFAULT_PREFIX, RedisStore, is_cluster_url

        prefix = redis_prefix or DEFAULT_PREFIX
        try:
            probe = RedisStore(redis, prefix=prefix)
        except ValueError as exc:
            raise CliError(f"--redis / --redis-prefix: {exc}", 2) from None
        if not asyncio.run(_answers(probe)):
            raise CliError(
                f"no Redis answers at {redact_url(redis)}; start Redis or fix --redis "
                "(e.g. redis://localhost:6379/0)"
            )
        if not is_cluster_url(redis) and _is_cluster_node(redis):
            raise CliError(
                f"{redact_url(redis)} is a Redis Cluster node; connect with a cluster URL "
                f"instead: --redis redis+cluster://{urlsplit(redis).netloc}",
                2,
            )
        return RedisStore(redis, prefix=prefix), f"Redis {redact_url(redis)} (prefix {prefix!r})"
    import sqlite3

    from runcycles_server.stores.sqlite import SqliteStore

    path = db or default_db_path()
    try:
        store = SqliteStore(path, synchronous="FULL" if durability == "full" else "NORMAL")
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise CliError(
            f"cannot open the SQLite database {path}: {exc}; pass a writable file with --db"
        ) from None
    return store, f"SQLite {Path(path).resolve()} (durability {durability})"


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 7878,
    db: Annotated[
        Path | None,
        typer.Option(help="SQLite file, the default store (default: in the user data directory)."),
    ] = None,
    redis: Annotated[
        str | None,
        typer.Option(
            help="Redis URL (redis://host:6379/0; a cluster: redis+cluster://host:port): use "
            "Redis instead of SQLite."
        ),
    ] = None,
    redis_prefix: Annotated[
        str | None, typer.Option(help="Redis key prefix (several ledgers on one Redis).")
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_ADMIN_KEY,
            help="Secret for X-Admin-API-Key; without it the admin API is off.",
            show_default=False,
        ),
    ] = None,
    dev: Annotated[
        bool,
        typer.Option(
            help="Create a demo tenant, API key and 100 USD budget; print `export CYCLES_*` lines."
        ),
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    durability: Annotated[
        str,
        typer.Option(
            help="SQLite: normal survives process crashes; full also power loss (fsync per commit)."
        ),
    ] = "normal",
    log_level: Annotated[
        str, typer.Option(help="critical, error, warning, info, debug or trace.")
    ] = "info",
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log",
            help="One JSON line per request on stderr (default: on at log level info or debug).",
            show_default=False,
        ),
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Larger request bodies are refused with 413.")
    ] = 1_048_576,
    rate_limit: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Requests/s per tenant (token bucket, per worker process; 429 when over). "
            "0 = no limit.",
        ),
    ] = 0.0,
    retention_days: Annotated[
        int,
        typer.Option(
            min=0,
            help="Delete finished reservations and event records this many days after "
            "their deadline / creation (SQLite: by a periodic purge; Redis: by key TTL set when "
            "they finish) (0 = keep forever).",
        ),
    ] = DEFAULT_RETENTION_DAYS,
    header_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send a request's line and headers (from connecting, "
            "or from the next request's first byte); then 408 and the connection is closed."
        ),
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send a request's whole body after its headers; "
            "then 408 and the connection is closed."
        ),
    ] = 30.0,
    idle_timeout: Annotated[
        int,
        typer.Option(min=1, help="Seconds a kept-alive connection may stay idle between requests."),
    ] = 5,
    max_connections: Annotated[
        int,
        typer.Option(
            min=1,
            help="Open connections per worker process; one more is answered 503 and closed "
            "(established connections are unaffected).",
        ),
    ] = 1000,
    action_kinds: Annotated[
        Path | None,
        typer.Option(
            "--action-kinds",
            help="YAML or JSON file declaring this server's custom.* action kinds (each with "
            "its risk_class); see docs/governance.md.",
        ),
    ] = None,
    detectors: Annotated[
        str | None,
        typer.Option(
            "--detectors",
            help='Event monitor parameters as JSON, e.g. \'{"burn_rate_multiplier": 4, '
            '"rate_window_seconds": 600, "latency_threshold_ms": 250}\' (spec defaults '
            "otherwise; system.high_latency: p95 over 60 s above 500 ms), or 'off'; see "
            "docs/events.md.",
        ),
    ] = None,
    store_timeout: Annotated[
        float,
        typer.Option(
            help="Redis: seconds to wait for a reply or a connection; past it the request is "
            "answered 503 with Retry-After (and /readyz 503 within a second either way).",
        ),
    ] = DEFAULT_STORE_TIMEOUT_S,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            envvar=ENV_METRICS,
            help="Serve Prometheus metrics at GET /metrics (admin key required unless "
            "--metrics-public); see docs/metrics.md.",
        ),
    ] = False,
    metrics_public: Annotated[
        bool,
        typer.Option(
            "--metrics-public",
            envvar=ENV_METRICS_PUBLIC,
            help="Serve /metrics without credentials (a scraper on a private network); the "
            "per-budget series, which name tenants, still need the admin key.",
        ),
    ] = False,
    metrics_top_scopes: Annotated[
        int,
        typer.Option(
            min=0,
            max=10_000,
            help="Budgets reported by cycles_budget_utilization_ratio (the most used ones; "
            "the rest are counted in cycles_budget_utilization_omitted; 0: no budget series).",
        ),
    ] = DEFAULT_METRICS_TOP_SCOPES,
    webhook_poll: Annotated[
        float,
        typer.Option(
            help="Seconds between webhook dispatcher rounds when nothing wakes it (events "
            "written by this process wake it at once)."
        ),
    ] = 1.0,
    webhook_lease: Annotated[
        float,
        typer.Option(
            help="Seconds a delivery stays claimed by the process sending it; a process that "
            "dies mid-delivery has it sent again by another after this long."
        ),
    ] = 60.0,
    webhook_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds one webhook delivery attempt may take (at most 80% of --webhook-lease)."
        ),
    ] = 10.0,
    evidence: Annotated[
        bool,
        typer.Option(
            "--evidence/--no-evidence",
            help="Sign every decide, reserve, commit, release and denial (docs/evidence.md).",
        ),
    ] = True,
    evidence_keys: Annotated[
        Path | None,
        typer.Option(
            envvar="CYCLES_EVIDENCE_KEYS_FILE",
            help="Evidence signing key file, created (mode 0600) if missing; share it between "
            "servers of one identity (default: beside the SQLite file, or in the user data "
            "directory with --redis).",
            show_default=False,
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            envvar="CYCLES_PUBLIC_URL",
            help="The URL clients reach this server at (the evidence server_id is it plus /v1; "
            "default: http://HOST:PORT).",
            show_default=False,
        ),
    ] = None,
    evidence_retention_days: Annotated[
        int, typer.Option(min=1, help="Days signed evidence envelopes are kept.")
    ] = DEFAULT_EVIDENCE_RETENTION_DAYS,
    evidence_rate_limit: Annotated[
        int,
        typer.Option(
            min=0,
            help="Requests a minute per client address on the public evidence routes (429 "
            "over it; 0 = no limit).",
        ),
    ] = DEFAULT_EVIDENCE_RATE_LIMIT,
    webhook_key: Annotated[
        Path | None,
        typer.Option(
            envvar="CYCLES_WEBHOOK_KEY_FILE",
            help="Key file sealing webhook secrets and custom header values at rest, created "
            "(mode 0600) if missing; share it between servers of one store (default: beside "
            "the SQLite file, or in the user data directory with --redis).",
            show_default=False,
        ),
    ] = None,
    console: Annotated[
        bool,
        typer.Option(
            "--console/--no-console",
            help="Serve the operator console at /console (sign in with the admin key or a "
            "tenant key); see docs/console.md.",
        ),
    ] = True,
) -> None:
    """Run the Cycles server (SQLite by default, Redis with --redis)."""
    with reported():
        level = log_level.strip().lower()
        if level not in LOG_LEVELS:
            raise CliError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}", 2)
        mode = durability.strip().lower()
        if mode not in ("normal", "full"):
            raise CliError(f"--durability {durability!r} must be normal or full", 2)
        if db is not None and redis is not None:
            raise CliError("--db and --redis are alternatives; pass only one of them", 2)
        if metrics_public and not metrics:
            raise CliError("--metrics-public needs --metrics (it says who may read them)", 2)
        if metrics and not metrics_public and not admin_key and not dev:
            raise CliError(
                "--metrics needs --admin-key (scrapers authenticate with it) or "
                "--metrics-public (no credentials, for a scraper on a private network)",
                2,
            )
        if not rate_limit < float("inf"):  # also NaN
            raise CliError("--rate-limit must be a finite number of requests/s", 2)
        for flag, seconds in (
            ("--header-timeout", header_timeout),
            ("--body-timeout", body_timeout),
            ("--store-timeout", store_timeout),
            ("--webhook-poll", webhook_poll),
            ("--webhook-lease", webhook_lease),
            ("--webhook-timeout", webhook_timeout),
        ):
            if not 0 < seconds < float("inf"):  # also NaN
                raise CliError(f"{flag} must be a positive number of seconds, not {seconds}", 2)
        if detectors is not None:
            from runcycles_server.events.rates import DetectorConfig

            try:
                DetectorConfig.parse(detectors)
            except ValueError as exc:
                raise CliError(f"--detectors: {exc}", 2) from None
        registry = _load_action_kinds(action_kinds)
        max_connections, fd_note = _fit_connection_cap(max_connections)
        _check_port_free(host, port)
        if dev and not admin_key:
            admin_key = "adm_" + secrets.token_urlsafe(24)
        store, description = _open_store(db, redis, redis_prefix, mode)
        if registry is not None:
            store.registry = registry
        import asyncio

        secret = asyncio.run(_bootstrap_and_close(store)) if dev else None
        if secret is None:
            asyncio.run(store.close())
        if redis is not None:
            from runcycles_server.stores.redis import DEFAULT_PREFIX

            os.environ[ENV_REDIS] = redis
            os.environ[ENV_REDIS_PREFIX] = redis_prefix or DEFAULT_PREFIX
        else:
            os.environ.pop(ENV_REDIS, None)
            os.environ[ENV_DB] = str(db or default_db_path())
            os.environ[ENV_SYNCHRONOUS] = mode.upper()
            os.environ[ENV_SQLITE_MMAP] = "1" if workers > 1 else "0"
        if admin_key:
            os.environ[ENV_ADMIN_KEY] = admin_key
        else:
            os.environ.pop(ENV_ADMIN_KEY, None)
        log_requests = access_log if access_log is not None else level in ("info", "debug", "trace")
        os.environ[ENV_ACCESS_LOG] = "1" if log_requests else "0"
        os.environ[ENV_MAX_BODY] = str(max_body_bytes)
        os.environ[ENV_RATE_LIMIT] = repr(rate_limit)
        os.environ[ENV_RETENTION_DAYS] = str(retention_days)
        os.environ[ENV_STORE_TIMEOUT] = repr(store_timeout)
        os.environ[ENV_METRICS] = "1" if metrics else "0"
        os.environ[ENV_METRICS_PUBLIC] = "1" if metrics_public else "0"
        os.environ[ENV_METRICS_TOP_SCOPES] = str(metrics_top_scopes)
        os.environ[ENV_CONSOLE] = "1" if console else "0"
        if detectors is not None:
            os.environ[ENV_DETECTORS] = detectors
        else:
            os.environ.pop(ENV_DETECTORS, None)
        os.environ[ENV_WEBHOOK_POLL] = repr(webhook_poll)
        os.environ[ENV_WEBHOOK_LEASE] = repr(webhook_lease)
        os.environ[ENV_WEBHOOK_TIMEOUT] = repr(webhook_timeout)
        if action_kinds is not None:
            os.environ[ENV_ACTION_KINDS] = str(action_kinds.resolve())
        else:
            os.environ.pop(ENV_ACTION_KINDS, None)
        from runcycles_server.connections import ConnectionLimits

        limits = ConnectionLimits(header_timeout, body_timeout, idle_timeout, max_connections)
        os.environ.update(limits.to_env())
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        base_url = f"http://{f'[{shown_host}]' if ':' in shown_host else shown_host}:{port}"
        evidence_note = "evidence: off"
        if evidence:
            keys_default = default_keys_path(db or default_db_path())
            if redis is not None:
                keys_default = default_db_path().with_name("evidence-keys.json")
            evidence_note = prepare_serve(
                keys=evidence_keys,
                default=keys_default,
                public_url=public_url or base_url,
                retention_days=evidence_retention_days,
                rate_limit=evidence_rate_limit,
            )
        else:
            os.environ[ENV_EVIDENCE] = "0"
        webhook_note = _prepare_webhook_key(webhook_key, redis, db)
        if dev:
            typer.echo("# Cycles dev server: paste these into your shell")
            typer.echo(f"export CYCLES_BASE_URL={base_url}")
            typer.echo(f"export CYCLES_API_KEY={secret}")
            typer.echo(f"export CYCLES_TENANT={DEV_TENANT}")
            typer.echo(f"export CYCLES_ADMIN_API_KEY={admin_key}")
        typer.echo(
            f"cycles: listening on http://{host}:{port} | store: {description} | admin API: "
            f"{'on' if admin_key else 'off (pass --admin-key)'} | workers: {workers}"
            + (f" | rate limit: {rate_limit:g} req/s per tenant per worker" if rate_limit else "")
            + (
                f" | metrics: /metrics ({'public' if metrics_public else 'admin key'}"
                + (", per worker" if workers > 1 else "")
                + ")"
                if metrics
                else ""
            )
            + (f" | console: {base_url}/console" if console else ""),
            err=True,
        )
        typer.echo(evidence_note, err=True)
        typer.echo(webhook_note, err=True)
        if fd_note:
            typer.echo(fd_note, err=True)
    import uvicorn

    from runcycles_server.connections import GuardedHttpToolsProtocol

    uvicorn.run(
        "runcycles_server.cli:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ws="none",  # no WebSocket routes: skip importing a WebSocket implementation
        # uvicorn's httptools protocol plus header/body timeouts and a connection cap
        # (uvicorn has neither; see runcycles_server.connections)
        http=GuardedHttpToolsProtocol,
        timeout_keep_alive=idle_timeout,
    )


def _load_action_kinds(path: Path | None) -> Registry | None:
    """Load ``--action-kinds`` (a bad file: one line naming file, entry and fix; exit 2)."""
    if path is None:
        return None
    from runcycles_server.governance import DeclarationError, Registry

    try:
        registry = Registry.load(path)
    except DeclarationError as exc:
        raise CliError(f"--action-kinds {exc}", 2) from None
    for warning in registry.warnings:
        typer.echo(f"note: {warning}", err=True)
    typer.echo(f"cycles: {len(registry.custom)} custom action kind(s) declared in {path}", err=True)
    return registry


def _fit_connection_cap(cap: int) -> tuple[int, str | None]:
    """Make room for ``cap`` connections in the open-file limit; return the cap and a note.

    Raises the soft ``RLIMIT_NOFILE`` up to the hard one if needed (worker processes inherit
    it); if that is still too low, lowers the cap so the process cannot run out of file
    descriptors (the note says so).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: no such limit to fit
        return cap, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = cap + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return cap, None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= needed:
        return cap, None
    fitted = max(1, soft - min(FD_HEADROOM, max(16, soft // 4)))  # small limits: less headroom
    return fitted, (
        f"note: --max-connections lowered from {cap} to {fitted} to fit the open-file limit "
        f"({soft}; raise it with `ulimit -n`)"
    )


@cli.command()
def demo(
    real: Annotated[
        bool,
        typer.Option(help="Call a real model (gpt-4o-mini) with your OPENAI_API_KEY."),
    ] = False,
    loop: Annotated[
        bool,
        typer.Option(
            "--loop",
            help="Run the plain @cycles loop of model calls instead of the agent (no agent "
            "framework needed).",
        ),
    ] = False,
    delay: Annotated[
        float | None, typer.Option(min=0.0, help="Seconds to pause between calls.")
    ] = None,
    budget: Annotated[
        int,
        typer.Option(min=1, help="--loop: budget in USD_MICROCENTS (default: half a US cent)."),
    ] = 500_000,
) -> None:
    """Watch a budget stop an agent: an embedded server and a governed OpenAI Agents SDK agent.

    Offline by default (a scripted model); nothing to configure. The agent runs when
    runcycles-openai-agents is installed (`pip install 'runcycles-server[agents]'`); without
    it, or with --loop, a governed loop of model calls runs instead.
    """
    with reported():
        agent = not loop and importlib.util.find_spec("runcycles_openai_agents") is not None
        if real:
            if not os.environ.get("OPENAI_API_KEY"):
                raise CliError(
                    "--real needs OPENAI_API_KEY in the environment; set it or drop --real", 2
                )
            if importlib.util.find_spec("openai") is None:
                raise CliError(
                    "--real needs the openai package; `pip install openai` (or drop --real)", 2
                )
    if agent:
        from runcycles_server.agent_demo import run_agent_demo

        raise typer.Exit(run_agent_demo(real=real, delay_s=0.35 if delay is None else delay))
    from runcycles_server.demo import run_demo

    raise typer.Exit(run_demo(budget=budget, delay_s=0.25 if delay is None else delay, real=real))


async def _bootstrap_and_close(store: Store) -> str:
    # One event loop for both: a Redis connection pool must not outlive its loop.
    try:
        return await bootstrap_dev(store)
    finally:
        await store.close()


def _is_cluster_node(url: str) -> bool:
    """Return whether the (single-node) Redis at ``url`` runs in cluster mode."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        info: dict[str, object] = client.info("cluster")
    except redis.RedisError:  # e.g. INFO disabled: assume a plain server
        return False
    finally:
        client.close()
    return info.get("cluster_enabled") in (1, "1")


async def _answers(store: Store) -> bool:
    try:
        return await store.ping()
    finally:
        await store.close()


register(cli)  # tenant, key, budget and balances, listed after serve and demo
register_bulk(tenant_app, budget_app)  # tenant bulk, budget bulk
register_governance(cli)  # policy and quota
register_events(cli)  # events and overview
register_webhooks(cli)  # webhook
register_evidence(cli)  # evidence get / verify / keys


def main() -> None:
    """Entry point of the ``cycles`` script."""
    cli()
