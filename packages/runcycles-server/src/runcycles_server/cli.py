"""The ``cycles`` command line: ``cycles serve`` runs the server.

::

    cycles serve --dev                       # SQLite in the user data dir, demo tenant + key
    cycles serve --db ./cycles.db --admin-key "$ADMIN" --workers 4 --port 7878

Several workers share one SQLite file safely (one ``BEGIN IMMEDIATE`` transaction per
mutation). Configuration reaches worker processes through environment variables
(``CYCLES_DB``, ``CYCLES_ADMIN_API_KEY``, ``CYCLES_SQLITE_SYNCHRONOUS``), which
:func:`app_from_env` reads.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Annotated, Final

import typer
from starlette.applications import Starlette

from runcycles_server import ledger
from runcycles_server.admin import DEFAULT_PERMISSIONS
from runcycles_server.ledger import ApiKeyRow, BudgetRow, LedgerError, TenantRow
from runcycles_server.stores.base import Store, new_id
from runcycles_server.stores.sqlite import SqliteStore

DEV_TENANT: Final = "demo"
DEV_BUDGET_USD_MICROCENTS: Final = 100 * 10**8  # 100 USD
ENV_DB: Final = "CYCLES_DB"
ENV_ADMIN_KEY: Final = "CYCLES_ADMIN_API_KEY"
ENV_SYNCHRONOUS: Final = "CYCLES_SQLITE_SYNCHRONOUS"
ENV_REDIS: Final = "CYCLES_REDIS_URL"
ENV_REDIS_PREFIX: Final = "CYCLES_REDIS_PREFIX"

cli = typer.Typer(add_completion=False, help="Cycles protocol server.", no_args_is_help=True)


@cli.callback()
def _group() -> None:
    """Cycles protocol server: runtime budget authority for AI agents."""


def default_db_path() -> Path:
    """Return the default database file: ``<user data dir>/runcycles/cycles.db``."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("runcycles", appauthor=False)) / "cycles.db"


def app_from_env() -> Starlette:
    """Build the app from environment variables (the uvicorn factory for worker processes)."""
    from runcycles_server.app import create_app

    redis_url = os.environ.get(ENV_REDIS)
    if redis_url:
        from runcycles_server.stores.redis import DEFAULT_PREFIX, RedisStore

        redis_store = RedisStore(
            redis_url, prefix=os.environ.get(ENV_REDIS_PREFIX) or DEFAULT_PREFIX
        )
        return create_app(redis_store, admin_api_key=os.environ.get(ENV_ADMIN_KEY) or None)
    synchronous = os.environ.get(ENV_SYNCHRONOUS, "NORMAL").upper()
    if synchronous not in ("NORMAL", "FULL"):
        raise SystemExit(f"{ENV_SYNCHRONOUS} must be NORMAL or FULL, not {synchronous!r}")
    store = SqliteStore(
        os.environ.get(ENV_DB) or default_db_path(),
        synchronous="FULL" if synchronous == "FULL" else "NORMAL",
    )
    return create_app(store, admin_api_key=os.environ.get(ENV_ADMIN_KEY) or None)


async def bootstrap_dev(store: Store) -> str:
    """Create the demo tenant and budget if missing and a fresh API key; return its secret."""
    await store.create_tenant(TenantRow(DEV_TENANT, "Demo tenant"))
    secret = "cyc_live_" + secrets.token_urlsafe(24)
    await store.create_api_key(
        ApiKeyRow(
            key_id=new_id("key"),
            key_hash=ledger.hash_api_key(secret),
            key_prefix=secret[:14],
            tenant_id=DEV_TENANT,
            name="dev",
            permissions=list(DEFAULT_PERMISSIONS),
        )
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
    return secret


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 7878,
    db: Annotated[
        Path | None, typer.Option(help="SQLite file (default: in the user data directory).")
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar=ENV_ADMIN_KEY, help="Secret for X-Admin-API-Key (admin plane)."),
    ] = None,
    dev: Annotated[
        bool, typer.Option(help="Create a demo tenant, API key and budget; print env exports.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    durability: Annotated[
        str,
        typer.Option(
            help="normal: survives process crashes; full: also power loss (fsync per commit)."
        ),
    ] = "normal",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    redis: Annotated[
        str | None, typer.Option(help="Redis URL: use the Redis store instead of SQLite.")
    ] = None,
    redis_prefix: Annotated[str | None, typer.Option(help="Redis key prefix.")] = None,
) -> None:
    """Run the Cycles server."""
    import uvicorn

    if durability.lower() not in ("normal", "full"):
        raise typer.BadParameter("use normal or full", param_hint="--durability")
    path = db or default_db_path()
    if dev and not admin_key:
        admin_key = "adm_" + secrets.token_urlsafe(24)
    store: Store
    if redis is not None:
        from runcycles_server.stores.redis import DEFAULT_PREFIX, RedisStore

        try:
            probe = RedisStore(redis, prefix=redis_prefix or DEFAULT_PREFIX)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--redis / --redis-prefix") from None
        if not asyncio.run(_answers(probe)):
            raise typer.BadParameter(f"no Redis answers at {redis}", param_hint="--redis")
        store = RedisStore(redis, prefix=redis_prefix or DEFAULT_PREFIX)
        os.environ[ENV_REDIS] = redis
        os.environ[ENV_REDIS_PREFIX] = redis_prefix or DEFAULT_PREFIX
    else:
        os.environ.pop(ENV_REDIS, None)
        store = SqliteStore(path, synchronous="FULL" if durability.lower() == "full" else "NORMAL")
    if dev:
        secret = asyncio.run(_bootstrap_and_close(store))
        base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        typer.echo("# Cycles dev server: paste these into your shell")
        typer.echo(f"export CYCLES_BASE_URL={base_url}")
        typer.echo(f"export CYCLES_API_KEY={secret}")
        typer.echo(f"export CYCLES_TENANT={DEV_TENANT}")
        typer.echo(f"export CYCLES_ADMIN_API_KEY={admin_key}")
    else:
        asyncio.run(store.close())
    os.environ[ENV_DB] = str(path)
    os.environ[ENV_SYNCHRONOUS] = durability.upper()
    if admin_key:
        os.environ[ENV_ADMIN_KEY] = admin_key
    typer.echo(f"# database: {redis or path}", err=True)
    uvicorn.run(
        "runcycles_server.cli:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        lifespan="on",
    )


async def _bootstrap_and_close(store: Store) -> str:
    # One event loop for both: a Redis connection pool must not outlive its loop.
    try:
        return await bootstrap_dev(store)
    finally:
        await store.close()


async def _answers(store: Store) -> bool:
    try:
        return await store.ping()
    finally:
        await store.close()


def main() -> None:
    """Entry point of the ``cycles`` script."""
    cli()
