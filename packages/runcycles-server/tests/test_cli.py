"""The ``cycles`` CLI without a server: value parsing, error lines, help, access-log wiring.

Commands that talk to a running server are tested end to end in
``tests-integration/test_cli_admin.py`` and ``tests-integration/test_serve.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from runcycles.models import Unit
from runcycles_server.access_log import AccessLogMiddleware, configure_access_logger
from runcycles_server.app import create_app
from runcycles_server.cli import app_from_env, bootstrap_dev, cli, redact_url
from runcycles_server.cli_admin import (
    UNITS,
    CliError,
    format_amount,
    parse_amount,
    tenant_of_scope,
)
from runcycles_server.demo import DEMO_BUDGET
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.sqlite import MMAP_BYTES

U = "USD_MICROCENTS"
CLEAN_ENV: dict[str, str | None] = {
    "CYCLES_BASE_URL": None,
    "CYCLES_ADMIN_API_KEY": None,
    "CYCLES_API_KEY": None,
    "OPENAI_API_KEY": None,
    "CYCLES_METRICS": None,
    "CYCLES_METRICS_PUBLIC": None,
}


def invoke(*args: str, **env: str | None) -> Result:
    return CliRunner().invoke(cli, list(args), env={**CLEAN_ENV, **env})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("1000", U, 1000),
        ("1_000_000", "TOKENS", 1_000_000),
        ("$1", U, 100_000_000),
        ("$1.50", U, 150_000_000),
        ("$1,000", U, 100_000_000_000),
        ("$0.00000001", U, 1),
        (" $0.25 ", U, 25_000_000),
        ("0", "CREDITS", 0),
        (str(2**63 - 1), "RISK_POINTS", 2**63 - 1),
    ],
)
def test_parse_amount_accepts_units_and_dollars(text: str, unit: str, expected: int) -> None:
    assert parse_amount(text, unit) == expected


@pytest.mark.parametrize(
    ("text", "unit", "message"),
    [
        ("1.5", U, "not a whole number of USD_MICROCENTS; give e.g. 1000000 or a dollar"),
        ("ten", "TOKENS", "not a whole number of TOKENS; give e.g. 1000000"),
        ("-5", U, "must not be negative"),
        ("$-5", U, "must not be negative"),
        ("$0.000000001", U, "finer than one USD_MICROCENT"),
        ("$abc", U, "not a dollar amount"),
        ("$inf", U, "not a dollar amount"),
        ("$3", "TOKENS", "in dollars but the unit is TOKENS"),
        (str(2**63), "TOKENS", "int64"),
    ],
)
def test_parse_amount_rejects_with_a_reason(text: str, unit: str, message: str) -> None:
    with pytest.raises(CliError, match=message) as info:
        parse_amount(text, unit)
    assert info.value.exit_code == 2


def test_format_amount() -> None:
    assert format_amount(150_000_000, U) == "$1.50"
    assert format_amount(1, U) == "$0.00000001"
    assert format_amount(-2_500_000_000, U) == "-$25.00"
    assert format_amount(123_456_789_000, U) == "$1,234.56789"
    assert format_amount(150_000_000, U, raw=True) == "150,000,000"
    assert format_amount(1234, "TOKENS") == "1,234"


def test_tenant_of_scope() -> None:
    assert tenant_of_scope("tenant:acme") == "acme"
    assert tenant_of_scope("Tenant:Acme/agent:bot") == "acme"
    assert tenant_of_scope("workspace:x") is None
    assert tenant_of_scope("tenant:") is None


def test_cli_units_match_the_protocol() -> None:
    assert set(UNITS) == set(Unit.__members__)


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://:s3cret@db:6380/2") == "redis://:***@db:6380/2"
    assert redact_url("rediss://user:pw@db/0") == "rediss://user:***@db/0"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


# -- help and import cost ---------------------------------------------------------------------

COMMANDS = [
    ["serve"],
    ["demo"],
    ["balances"],
    ["tenant"],
    ["tenant", "create"],
    ["tenant", "list"],
    ["tenant", "close"],
    ["key"],
    ["key", "create"],
    ["key", "list"],
    ["key", "revoke"],
    ["budget"],
    ["budget", "create"],
    ["budget", "list"],
    ["budget", "fund"],
    ["policy"],
    ["policy", "create"],
    ["policy", "list"],
    ["policy", "update"],
    ["quota"],
    ["quota", "counters"],
    ["quota", "reset"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout.strip()
    assert text.startswith("Usage: ")
    assert "--help" in text
    assert len(text.splitlines()) > 4  # a description and the options


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("runcycles-server 0.")


def test_cli_module_does_not_import_the_server() -> None:
    code = (
        "import sys, runcycles_server.cli; "
        "print(sorted(m for m in ('runcycles_server.app', 'starlette', 'httpx', 'uvicorn', "
        "'runcycles_server.stores.sqlite') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_default_budget_matches_the_demo() -> None:
    result = invoke("demo", "--help")
    assert f"{DEMO_BUDGET}" in result.stdout.replace(",", "").replace("_", "")


# -- errors without a server ------------------------------------------------------------------


def _one_error_line(result: Result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.output


def test_admin_command_without_admin_key() -> None:
    result = invoke("tenant", "list")
    _one_error_line(result, 2, "pass --admin-key or set CYCLES_ADMIN_API_KEY")


def test_admin_command_with_unreachable_server() -> None:
    port = closed_port()
    result = invoke("tenant", "list", "--url", f"http://127.0.0.1:{port}", "--admin-key", "k")
    _one_error_line(result, 1, f"cannot reach the Cycles server at http://127.0.0.1:{port}")
    assert "cycles serve" in result.stderr


def test_admin_command_with_a_bad_url() -> None:
    result = invoke("tenant", "list", "--url", "localhost:7878", "--admin-key", "k")
    _one_error_line(result, 2, "is not an http(s) URL")


def test_balances_without_any_key() -> None:
    _one_error_line(invoke("balances"), 2, "--api-key (or CYCLES_API_KEY)")


def test_serve_rejects_bad_options_in_one_line(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    _one_error_line(invoke("serve", "--db", db, "--log-level", "loud"), 2, "--log-level 'loud'")
    _one_error_line(invoke("serve", "--db", db, "--durability", "max"), 2, "normal or full")
    _one_error_line(invoke("serve", "--db", db, "--redis", "redis://localhost"), 2, "alternatives")
    assert not Path(db).exists()


def test_serve_refuses_metrics_nobody_could_read(tmp_path: Path) -> None:
    db = str(tmp_path / "x.db")
    no_admin = invoke("serve", "--db", db, "--metrics")
    _one_error_line(no_admin, 2, "--metrics needs --admin-key")
    assert "--metrics-public" in no_admin.stderr
    _one_error_line(invoke("serve", "--db", db, "--metrics-public"), 2, "needs --metrics")
    too_many = invoke("serve", "--db", db, "--metrics", "--metrics-top-scopes", "10001")
    assert too_many.exit_code == 2
    assert not Path(db).exists()


def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = invoke("serve", "--db", str(tmp_path / "x.db"), "--port", str(port))
    _one_error_line(result, 1, f"cannot listen on 127.0.0.1:{port}")
    assert "--port" in result.stderr


def test_serve_reports_an_unusable_database(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke("serve", "--db", str(blocker / "cycles.db"), "--port", str(closed_port()))
    _one_error_line(result, 1, "cannot open the SQLite database")


def test_serve_reports_an_unreachable_redis() -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    result = invoke("serve", "--redis", url, "--port", str(closed_port()))
    _one_error_line(result, 1, "no Redis answers at redis://:***@127.0.0.1")
    assert "hunter2" not in result.output


def test_demo_real_needs_an_openai_key() -> None:
    _one_error_line(invoke("demo", "--real"), 2, "OPENAI_API_KEY")


# -- access log and factory wiring ------------------------------------------------------------


async def test_access_log_writes_one_json_line_per_request() -> None:
    store = MemoryStore()
    key = await bootstrap_dev(store)
    app = create_app(store, sweep_interval_s=None)
    stream = io.StringIO()
    logger = logging.getLogger("test.access")
    logger.handlers = [logging.StreamHandler(stream)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    app.add_middleware(AccessLogMiddleware, logger=logger)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.get("/v1/balances?tenant=demo", headers={"X-Cycles-API-Key": key})
        missing = await client.get("/v1/reservations/res_x", headers={"X-Cycles-API-Key": key})
        unknown = await client.get("/nope")
        settle = await client.post(
            "/v1/reservations/res_y/commit",
            headers={"X-Cycles-API-Key": key},
            json={"idempotency_key": "c", "actual": {"unit": U, "amount": 1}},
        )
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["status"] for line in lines] == [200, 404, 404, 404]
    first, second, third, fourth = lines
    assert first["method"] == "GET"
    assert first["path"] == "/v1/balances"
    assert first["tenant"] == "demo"
    assert first["request_id"] == ok.headers["x-request-id"]
    assert first["ts"].endswith("Z")
    assert second["path"] == "/v1/reservations/{reservation_id}"  # the template, not the id
    assert second["request_id"] == missing.headers["x-request-id"]
    assert third["path"] == "/nope"
    assert "tenant" not in third
    assert third["request_id"] == unknown.headers["x-request-id"]
    assert fourth["path"] == "/v1/reservations/{reservation_id}/commit"
    assert fourth["request_id"] == settle.headers["x-request-id"]
    assert fourth["tenant"] == "demo"


def test_configure_access_logger_is_idempotent() -> None:
    first = configure_access_logger(io.StringIO())
    stream = io.StringIO()
    second = configure_access_logger(stream)
    assert first is second
    assert len(second.handlers) == 1
    second.info("x")
    assert stream.getvalue() == "x\n"


def _middleware(app: Any) -> list[object]:
    return [m.cls for m in app.user_middleware]


def test_app_from_env_applies_access_log_and_body_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CYCLES_DB", str(tmp_path / "x.db"))
    monkeypatch.delenv("CYCLES_REDIS_URL", raising=False)
    monkeypatch.setenv("CYCLES_ACCESS_LOG", "1")
    monkeypatch.setenv("CYCLES_MAX_BODY_BYTES", "1500")
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", "adm")
    app = app_from_env()
    assert AccessLogMiddleware in _middleware(app)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(
                "/v1/admin/tenants", headers={"X-Admin-API-Key": "adm"}, content=b" " * 2000
            )

    try:
        response = asyncio.run(post())
        assert response.status_code == 413
        assert "1500-byte limit" in response.json()["message"]
    finally:
        asyncio.run(app.state.store.close())
        configure_access_logger()  # leave the logger on stderr, as the server sets it up

    monkeypatch.setenv("CYCLES_ACCESS_LOG", "0")
    quiet = app_from_env()
    assert AccessLogMiddleware not in _middleware(quiet)
    asyncio.run(quiet.state.store.close())


def test_app_from_env_maps_the_sqlite_file_only_for_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CYCLES_DB", str(tmp_path / "x.db"))
    monkeypatch.delenv("CYCLES_REDIS_URL", raising=False)
    for value, size in (("0", 0), ("1", MMAP_BYTES)):
        monkeypatch.setenv("CYCLES_SQLITE_MMAP", value)
        app = app_from_env()
        try:
            assert app.state.store._conn.execute("PRAGMA mmap_size").fetchone()[0] == size
        finally:
            asyncio.run(app.state.store.close())
    monkeypatch.setenv("CYCLES_SQLITE_MMAP", "yes")
    with pytest.raises(SystemExit, match=r"CYCLES_SQLITE_MMAP must be 1 .* or 0, not 'yes'"):
        app_from_env()


def test_app_from_env_turns_metrics_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYCLES_DB", str(tmp_path / "x.db"))
    monkeypatch.delenv("CYCLES_REDIS_URL", raising=False)
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", "adm")
    monkeypatch.delenv("CYCLES_METRICS", raising=False)
    off = app_from_env()
    assert off.state.metrics is None
    asyncio.run(off.state.store.close())
    monkeypatch.setenv("CYCLES_METRICS", "1")
    monkeypatch.setenv("CYCLES_METRICS_PUBLIC", "1")
    monkeypatch.setenv("CYCLES_METRICS_TOP_SCOPES", "7")
    on = app_from_env()
    assert on.state.metrics.public
    assert on.state.metrics.top_scopes == 7
    asyncio.run(on.state.store.close())


@pytest.mark.parametrize(("days", "retention_ms"), [("3", 3 * 86_400_000), ("0", None)])
def test_app_from_env_gives_the_redis_store_its_retention(
    monkeypatch: pytest.MonkeyPatch, days: str, retention_ms: int | None
) -> None:
    monkeypatch.setenv("CYCLES_REDIS_URL", "redis://127.0.0.1:6379/15")  # not connected here
    monkeypatch.setenv("CYCLES_RETENTION_DAYS", days)
    app = app_from_env()
    try:
        assert app.state.store.retention_ms == retention_ms
    finally:
        asyncio.run(app.state.store.close())
    monkeypatch.setenv("CYCLES_RETENTION_DAYS", "0.5")
    with pytest.raises(SystemExit, match="CYCLES_RETENTION_DAYS: retention_ms must be at least"):
        app_from_env()
