"""CyclesConfig: the seed README's constructor calls, validation and from_env."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from runcycles import CyclesConfig, CyclesConfigError, CyclesError, Subject

FULL_ENV = {
    "CYCLES_BASE_URL": "https://cycles.example.com/",
    "CYCLES_API_KEY": "key-123",
    "CYCLES_TENANT": "acme",
    "CYCLES_WORKSPACE": "prod",
    "CYCLES_APP": "chat",
    "CYCLES_WORKFLOW": "refund-flow",
    "CYCLES_AGENT": "planner",
    "CYCLES_TOOLSET": "search-tools",
    "CYCLES_CONNECT_TIMEOUT": "1.5",
    "CYCLES_READ_TIMEOUT": "9",
    "CYCLES_RETRY_ENABLED": "no",
    "CYCLES_RETRY_MAX_ATTEMPTS": "3",
    "CYCLES_RETRY_INITIAL_DELAY": "0.25",
    "CYCLES_RETRY_MULTIPLIER": "3",
    "CYCLES_RETRY_MAX_DELAY": "10",
    "CYCLES_RETRY_AFTER_MAX_S": "15",
    "CYCLES_MAX_CONNECTIONS": "7",
}


def test_seed_readme_constructor_calls() -> None:
    minimal = CyclesConfig(base_url="http://localhost:7878", api_key="your-api-key")
    with_tenant = CyclesConfig(
        base_url="http://localhost:7878", api_key="your-api-key", tenant="acme"
    )
    full = CyclesConfig(
        base_url="http://localhost:7878",
        api_key="your-api-key",
        tenant="acme",
        workspace="prod",
        app="chat",
        workflow="refund-flow",
        agent="planner",
        toolset="search-tools",
        connect_timeout=2.0,
        read_timeout=5.0,
        retry_enabled=True,
        retry_max_attempts=5,
        retry_initial_delay=0.5,
        retry_multiplier=2.0,
        retry_max_delay=30.0,
    )

    assert minimal.tenant is None
    assert with_tenant.tenant == "acme"
    assert (full.connect_timeout, full.read_timeout, full.retry_max_attempts) == (2.0, 5.0, 5)
    assert full.toolset == "search-tools"


def test_defaults() -> None:
    config = CyclesConfig(base_url="http://localhost:7878", api_key="k")

    assert config.connect_timeout == 2.0
    assert config.read_timeout == 5.0
    assert config.retry_enabled is True
    assert config.retry_max_attempts == 5
    assert config.retry_initial_delay == 0.5
    assert config.retry_multiplier == 2.0
    assert config.retry_max_delay == 30.0
    assert config.retry_after_max_s == 60.0


def test_base_url_is_normalised() -> None:
    config = CyclesConfig(base_url="  http://localhost:7878/  ", api_key="k")

    assert config.base_url == "http://localhost:7878"


def test_config_is_immutable_and_replaceable() -> None:
    config = CyclesConfig(base_url="http://localhost:7878", api_key="k")

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tenant = "acme"  # type: ignore[misc]
    assert dataclasses.replace(config, tenant="acme").tenant == "acme"
    with pytest.raises(CyclesConfigError, match="retry_max_attempts"):
        dataclasses.replace(config, retry_max_attempts=0)


def test_repr_hides_the_api_key() -> None:
    config = CyclesConfig(base_url="http://localhost:7878", api_key="sk-secret-value")

    assert "sk-secret-value" not in repr(config)
    assert "api_key='***'" in repr(config)
    assert "http://localhost:7878" in repr(config)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"base_url": ""}, "base_url is required"),
        ({"base_url": "localhost:7878"}, "not an http"),
        ({"base_url": "ftp://host"}, "not an http"),
        ({"base_url": "http://"}, "not an http"),
        ({"base_url": "http://host/?x=1"}, "query"),
        ({"base_url": None}, "base_url is required"),
        ({"api_key": ""}, "api_key is required"),
        ({"api_key": "   "}, "api_key is required"),
        ({"api_key": "abc\n"}, "whitespace"),
        ({"tenant": ""}, "tenant must be a non-empty string"),
        ({"agent": "x" * 129}, "agent is 129 characters"),
        ({"connect_timeout": 0}, "connect_timeout must be a finite number > 0"),
        ({"read_timeout": -1.0}, "read_timeout"),
        ({"read_timeout": math.inf}, "read_timeout"),
        ({"read_timeout": "5"}, "read_timeout"),
        ({"retry_enabled": "yes"}, "retry_enabled must be True or False"),
        ({"retry_max_attempts": 0}, "retry_max_attempts must be an integer >= 1"),
        ({"retry_max_attempts": 2.5}, "retry_max_attempts"),
        ({"retry_max_attempts": True}, "retry_max_attempts"),
        ({"retry_initial_delay": -0.1}, "retry_initial_delay"),
        ({"retry_multiplier": 0.5}, "retry_multiplier must be a finite number >= 1.0,"),
        ({"retry_max_delay": math.nan}, "retry_max_delay"),
        ({"retry_after_max_s": -1}, "retry_after_max_s"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_invalid_values_name_the_field(overrides: dict[str, Any], match: str) -> None:
    values: dict[str, Any] = {"base_url": "http://localhost:7878", "api_key": "k", **overrides}

    with pytest.raises(CyclesConfigError, match=match) as caught:
        CyclesConfig(**values)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, CyclesError)


def test_from_env_reads_every_field() -> None:
    config = CyclesConfig.from_env(environ=FULL_ENV)

    assert config == CyclesConfig(
        base_url="https://cycles.example.com",
        api_key="key-123",
        tenant="acme",
        workspace="prod",
        app="chat",
        workflow="refund-flow",
        agent="planner",
        toolset="search-tools",
        connect_timeout=1.5,
        read_timeout=9.0,
        retry_enabled=False,
        retry_max_attempts=3,
        retry_initial_delay=0.25,
        retry_multiplier=3.0,
        retry_max_delay=10.0,
        retry_after_max_s=15.0,
        max_connections=7,
    )


def test_from_env_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYCLES_BASE_URL", "http://localhost:7878")
    monkeypatch.setenv("CYCLES_API_KEY", "env-key")
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    monkeypatch.delenv("CYCLES_AGENT", raising=False)

    config = CyclesConfig.from_env()

    assert (config.api_key, config.tenant, config.agent) == ("env-key", "acme", None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("off", False),
    ],
)
def test_from_env_booleans(raw: str, expected: bool) -> None:
    env = {"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "k", "CYCLES_RETRY_ENABLED": raw}

    assert CyclesConfig.from_env(environ=env).retry_enabled is expected


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"CYCLES_API_KEY": "k"}, "CYCLES_BASE_URL is not set"),
        ({"CYCLES_BASE_URL": "http://h"}, "CYCLES_API_KEY is not set"),
        ({"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "  "}, "CYCLES_API_KEY is not set"),
        (
            {"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "k", "CYCLES_RETRY_ENABLED": "maybe"},
            "CYCLES_RETRY_ENABLED='maybe' is not a boolean",
        ),
        (
            {"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "k", "CYCLES_READ_TIMEOUT": "5s"},
            "CYCLES_READ_TIMEOUT='5s' is not a number",
        ),
        (
            {
                "CYCLES_BASE_URL": "http://h",
                "CYCLES_API_KEY": "k",
                "CYCLES_RETRY_MAX_ATTEMPTS": "2.0",
            },
            "CYCLES_RETRY_MAX_ATTEMPTS='2.0' is not an integer",
        ),
        (
            {"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "k", "CYCLES_READ_TIMEOUT": "-2"},
            "read_timeout must be",
        ),
    ],
)
def test_from_env_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(CyclesConfigError, match=match):
        CyclesConfig.from_env(environ=env)


def test_from_env_prefix_and_overrides() -> None:
    env = {"MYAPP_BASE_URL": "http://h", "MYAPP_API_KEY": "k", "MYAPP_TENANT": "from-env"}

    config = CyclesConfig.from_env("MYAPP_", environ=env, tenant="override", read_timeout=1.0)

    assert (config.base_url, config.tenant, config.read_timeout) == ("http://h", "override", 1.0)
    with pytest.raises(CyclesConfigError, match="unknown field"):
        CyclesConfig.from_env(environ=env, tenat="x")


def test_empty_env_values_count_as_unset() -> None:
    env = {"CYCLES_BASE_URL": "http://h", "CYCLES_API_KEY": "k", "CYCLES_TENANT": ""}

    assert CyclesConfig.from_env(environ=env).tenant is None


def test_default_subject() -> None:
    config = CyclesConfig(base_url="http://h", api_key="k", tenant="acme", agent="bot")

    assert config.default_subject() == Subject(tenant="acme", agent="bot")
    assert config.default_subject(agent=None, app="chat") == Subject(tenant="acme", app="chat")
    assert CyclesConfig(base_url="http://h", api_key="k").default_subject() is None
    with pytest.raises(TypeError, match="unknown field"):
        config.default_subject(tennant="x")


def test_journal_settings_from_env_and_validation() -> None:
    config = CyclesConfig.from_env(
        environ={
            "CYCLES_BASE_URL": "http://x",
            "CYCLES_API_KEY": "k",
            "CYCLES_JOURNAL_ENABLED": "off",
            "CYCLES_JOURNAL_DIR": "/tmp/journal",
        }
    )
    assert config.journal_enabled is False
    assert config.journal_dir == "/tmp/journal"
    assert CyclesConfig(base_url="http://x", api_key="k").journal_enabled is True
    with pytest.raises(CyclesConfigError, match="journal_enabled"):
        CyclesConfig(base_url="http://x", api_key="k", journal_enabled="yes")  # type: ignore[arg-type]


def test_journal_fsync_is_off_by_default_and_read_from_env() -> None:
    assert CyclesConfig(base_url="http://x", api_key="k").journal_fsync is False
    config = CyclesConfig.from_env(
        environ={
            "CYCLES_BASE_URL": "http://x",
            "CYCLES_API_KEY": "k",
            "CYCLES_JOURNAL_FSYNC": "true",
        }
    )
    assert config.journal_fsync is True
    with pytest.raises(CyclesConfigError, match="journal_fsync"):
        CyclesConfig(base_url="http://x", api_key="k", journal_fsync=1)  # type: ignore[arg-type]
