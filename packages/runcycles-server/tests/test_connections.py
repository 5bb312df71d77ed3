"""``cycles serve``'s slow-client limits: validation, the environment hand-off, the fd budget.

The behaviour on real sockets (stalled connections closed on time, the connection cap) is
tested against a real server in ``tests-integration/test_serve_slow_clients.py``.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runcycles_server import cli as cli_module
from runcycles_server.cli import cli
from runcycles_server.connections import ConnectionLimits


def test_limits_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = ConnectionLimits(2.5, 7.0, 3, 42)
    for name, value in limits.to_env().items():
        monkeypatch.setenv(name, value)
    assert ConnectionLimits.from_env() == limits


def test_unset_environment_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ConnectionLimits().to_env():
        monkeypatch.delenv(name, raising=False)
    assert ConnectionLimits.from_env() == ConnectionLimits(10.0, 30.0, 5, 1000)


def test_bad_environment_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYCLES_HEADER_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="CYCLES_HEADER_TIMEOUT_S must be a number, not 'soon'"):
        ConnectionLimits.from_env()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"header_timeout_s": 0.0}, "header_timeout_s must be a positive number"),
        ({"body_timeout_s": float("nan")}, "body_timeout_s must be a positive number"),
        ({"idle_timeout_s": float("inf")}, "idle_timeout_s must be a positive number"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
    ],
)
def test_invalid_limits_are_refused(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionLimits(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout", "0"),
        ("--body-timeout", "-1"),
        ("--store-timeout", "nan"),
        ("--idle-timeout", "0"),
        ("--max-connections", "0"),
    ],
)
def test_serve_refuses_bad_limit_flags_naming_the_flag(
    tmp_path: Path, flag: str, value: str
) -> None:
    db = tmp_path / "x.db"
    result = CliRunner().invoke(cli, ["serve", "--db", str(db), flag, value])
    assert result.exit_code == 2, result.output
    assert flag in result.output
    assert "Traceback" not in result.output
    assert not db.exists()  # refused before anything was opened


def test_the_connection_cap_fits_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    # raised up to the hard limit, which is enough
    assert cli_module._fit_connection_cap(300) == (300, None)
    assert calls == [(300 + cli_module.FD_HEADROOM, 512)]
    # the hard limit is not enough: the cap is lowered, and the note says so
    calls.clear()
    cap, note = cli_module._fit_connection_cap(1000)
    assert calls == [(512, 512)]
    assert cap == 512 - cli_module.FD_HEADROOM
    assert note is not None
    assert "lowered from 1000 to 384" in note
    assert "ulimit -n" in note


def test_a_refused_rlimit_raise_lowers_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 100_000))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert cli_module._fit_connection_cap(1000)[0] == 1024 - cli_module.FD_HEADROOM
    monkeypatch.setattr(resource, "getrlimit", lambda _: (128, 128))  # `ulimit -n 128`
    assert cli_module._fit_connection_cap(1000)[0] == 96  # a quarter kept for the rest
