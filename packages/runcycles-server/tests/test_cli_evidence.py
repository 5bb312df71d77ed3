"""``cycles evidence keys`` and the evidence settings ``cycles serve`` hands its workers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from runcycles_server.cli import cli
from runcycles_server.cli_evidence import issuer_from_env, prepare_serve
from runcycles_server.evidence.keys import KEYS_ENV, KEYS_FILE_ENV, KeyRing

CLEAN_ENV: dict[str, str | None] = {
    "CYCLES_BASE_URL": None,
    KEYS_FILE_ENV: None,
    KEYS_ENV: None,
    "CYCLES_EVIDENCE": None,
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=CLEAN_ENV)


def test_keys_show_prints_public_keys_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing.load_or_create(path, 0)
    result = invoke("evidence", "keys", "show", "--keys", str(path))
    assert result.exit_code == 0, result.output
    key = ring.keys[0]
    assert key.kid in result.output
    assert key.public_hex in result.output
    assert "active" in result.output
    assert json.loads(path.read_text())["keys"][0]["d"] not in result.output
    jwks = invoke("evidence", "keys", "show", "--keys", str(path), "--json")
    assert json.loads(jwks.output)["keys"][0]["x"]


def test_keys_rotate_schedules_a_new_key_and_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    KeyRing.load_or_create(path, 0)
    result = invoke("evidence", "keys", "rotate", "--keys", str(path), "--in", "30")
    assert result.exit_code == 0, result.output
    ring = KeyRing.load(path)
    assert len(ring.keys) == 2
    assert ring.keys[0].exp_ms == ring.keys[1].nbf_ms
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    shown = invoke("evidence", "keys", "show", "--keys", str(path)).output
    assert "active" in shown
    assert "next" in shown
    again = invoke("evidence", "keys", "rotate", "--keys", str(path), "--in", "5")
    assert again.exit_code == 2
    assert "after the active key's start" in again.output


def test_keys_commands_explain_a_missing_or_bad_file(tmp_path: Path) -> None:
    result = invoke("evidence", "keys", "show", "--keys", str(tmp_path / "none.json"))
    assert result.exit_code == 2
    assert "cycles serve" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = invoke("evidence", "keys", "show", "--keys", str(bad))
    assert result.exit_code == 2
    assert "expected" in result.output


def test_verify_and_get_refuse_what_is_neither_a_file_nor_an_id() -> None:
    for command in ("verify", "get"):
        result = invoke("evidence", command, "nope")
        assert result.exit_code == 2
        assert "64 lower-case hex" in result.output


def test_serve_settings_reach_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in (*CLEAN_ENV, "CYCLES_SERVER_ID"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "keys.json"
    note = prepare_serve(
        keys=None,
        default=path,
        public_url="https://cycles.example.com/",
        retention_days=30,
        rate_limit=0,
    )
    assert "server_id https://cycles.example.com/v1" in note
    assert path.exists()
    issuer = issuer_from_env()
    assert issuer is not None
    assert issuer.server_id == "https://cycles.example.com/v1"
    assert issuer.retention_ms == 30 * 86_400_000
    monkeypatch.setenv("CYCLES_EVIDENCE", "0")
    assert issuer_from_env() is None


def test_a_key_ring_in_the_environment_is_used_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = KeyRing.generate(0).document()
    monkeypatch.setenv(KEYS_ENV, document)
    monkeypatch.setenv("CYCLES_EVIDENCE", "1")
    issuer = issuer_from_env()
    assert issuer is not None
    assert issuer.keys.path is None
    monkeypatch.setenv(KEYS_ENV, "{not json")
    with pytest.raises(SystemExit, match="CYCLES_EVIDENCE_KEYS"):
        issuer_from_env()
