"""The ``cycles policy`` / ``cycles quota`` commands and ``serve --action-kinds`` without a server.

Value parsing, the one-line errors (exit code 2, nothing sent), and the action-kind file of
``serve`` and of the worker factory. The commands against a real server are tested in
``tests-integration/test_cli_governance.py``.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from runcycles_server.cli import app_from_env, cli
from runcycles_server.cli_admin import CliError
from runcycles_server.cli_governance import parse_quota, parse_window, read_policy_file

CLEAN_ENV: dict[str, str | None] = {
    "CYCLES_BASE_URL": None,
    "CYCLES_ADMIN_API_KEY": None,
    "CYCLES_API_KEY": None,
    "CYCLES_ACTION_KINDS": None,
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=CLEAN_ENV)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_error_line(result: Result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "window"),
    [
        ("per_run", "per_run"),
        ("run", "per_run"),
        (" Hour ", "per_hour_tumbling"),
        ("tenant-day", "per_tenant_per_day"),
        ("tenant_day", "per_tenant_per_day"),
        ("per_minute_tumbling", "per_minute_tumbling"),
    ],
)
def test_parse_window_takes_spec_names_and_aliases(text: str, window: str) -> None:
    assert parse_window(text) == window


def test_parse_quota() -> None:
    assert parse_quota("message.email.send:20:per_run") == {
        "action_kind": "message.email.send",
        "max_calls": 20,
        "window": "per_run",
    }
    assert parse_quota("high_risk:1_000:day", risk=True) == {
        "risk_class": "high_risk",
        "max_calls": 1000,
        "window": "per_day_tumbling",
    }
    for text, words in (
        ("message.email.send:20", ("KIND:MAX:WINDOW",)),
        ("message.email.send:0:run", ("MAX must be",)),
        ("message.email.send:lots:run", ("MAX must be",)),
        ("message.email.send:5:weekly", ("unknown window 'weekly'", "per_run")),
    ):
        with pytest.raises(CliError) as caught:
            parse_quota(text)
        assert caught.value.exit_code == 2
        for word in words:
            assert word in caught.value.message
    with pytest.raises(CliError, match="unknown risk class 'scary'"):
        parse_quota("scary:5:day", risk=True)


def test_read_policy_file(tmp_path: Path) -> None:
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("name: x\nscope_pattern: tenant:acme\ndenied_action_kinds: [a.b]\n")
    assert read_policy_file(yaml_file)["denied_action_kinds"] == ["a.b"]
    json_file = tmp_path / "p.json"
    json_file.write_text('{"name": "x", "priority": 3}')
    assert read_policy_file(json_file) == {"name": "x", "priority": 3}
    for name, text, words in (
        ("bad.json", "{nope", ("not valid JSON",)),
        ("bad.yaml", "name: [unclosed", ("not valid YAML",)),
        ("list.yaml", "- 1\n- 2\n", ("expected a mapping", "list")),
    ):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(CliError) as caught:
            read_policy_file(path)
        assert caught.value.exit_code == 2
        for word in words:
            assert word in caught.value.message
    with pytest.raises(CliError, match="cannot read it"):
        read_policy_file(tmp_path / "missing.yaml")


def test_bad_values_exit_2_before_calling_the_server() -> None:
    url = f"http://127.0.0.1:{closed_port()}"  # nothing listens: a call would exit 1
    admin = ["--url", url, "--admin-key", "adm"]
    one_error_line(
        invoke("policy", "create", "p", "--scope", "tenant:a", *admin, "--quota", "x:1"),
        2,
        "KIND:MAX:WINDOW",
    )
    one_error_line(invoke("policy", "create", "p", *admin), 2, "--scope")
    one_error_line(invoke("policy", "create", "--scope", "tenant:a", *admin), 2, "NAME")
    one_error_line(invoke("policy", "create", "p", "--scope", "agent:*", *admin), 2, "--tenant")
    one_error_line(invoke("policy", "list", *admin), 2, "--tenant is required")
    one_error_line(invoke("policy", "update", "pol_1", *admin), 2, "nothing to change")
    one_error_line(
        invoke("policy", "update", "pol_1", "--clear", "everything", *admin), 2, "--clear"
    )
    one_error_line(invoke("quota", "counters", *admin), 2, "--tenant is required")
    one_error_line(
        invoke("quota", "counters", "--tenant", "a", "--window", "weekly", *admin), 2, "weekly"
    )
    one_error_line(invoke("policy", "list", "--tenant", "a", "--url", url), 2, "no key")
    reset = ["--tenant", "a", "--scope", "tenant:a", "--kind", "k.x", "--key", "r", "--yes"]
    one_error_line(
        invoke("quota", "reset", *reset, "--window", "fortnight", *admin), 2, "fortnight"
    )
    unreachable = invoke("policy", "list", "--tenant", "a", *admin)
    one_error_line(unreachable, 1, "cannot reach the Cycles server")


def test_serve_refuses_a_bad_action_kinds_file_in_one_line(tmp_path: Path) -> None:
    kinds = tmp_path / "kinds.yaml"
    kinds.write_text("kinds:\n  - kind: custom.acme.erp.post\n")  # no risk_class
    db = tmp_path / "x.db"
    result = invoke(
        "serve", "--db", str(db), "--port", str(closed_port()), "--action-kinds", str(kinds)
    )
    one_error_line(result, 2, "--action-kinds", str(kinds), "entry 1", "risk_class")
    missing = invoke("serve", "--db", str(db), "--action-kinds", str(tmp_path / "nope.yaml"))
    one_error_line(missing, 2, "nope.yaml", "check the path")
    assert not db.exists()


def test_the_worker_factory_serves_the_declared_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = tmp_path / "kinds.yaml"
    kinds.write_text(
        "kinds:\n  - kind: custom.acme.erp.post\n    risk_class: external_side_effect\n"
    )
    monkeypatch.setenv("CYCLES_DB", str(tmp_path / "x.db"))
    monkeypatch.delenv("CYCLES_REDIS_URL", raising=False)
    monkeypatch.setenv("CYCLES_ADMIN_API_KEY", "adm")
    monkeypatch.setenv("CYCLES_ACTION_KINDS", str(kinds))
    app = app_from_env()

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(
                "/v1/action-kinds/custom.acme.erp.post", headers={"X-Admin-API-Key": "adm"}
            )

    try:
        response = asyncio.run(get())
        assert response.status_code == 200, response.text
        assert response.json()["risk_class"] == "external_side_effect"
    finally:
        asyncio.run(app.state.store.close())
    kinds.write_text("kinds: 3\n")
    with pytest.raises(SystemExit, match=r"CYCLES_ACTION_KINDS: .*kinds\.yaml"):
        app_from_env()
